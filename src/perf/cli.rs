//! Command line: nccl-tests' flags with the same letters, long names, meanings and defaults, plus the operation
//! as the first argument and `--backend` / `--nprocs`.

use clap::{error::ErrorKind, CommandFactory, Parser, ValueEnum};
use nccl::{DataType, ReduceOp};

use super::ops::CollOp;

/// The scalar every rank passes for `-o mulsum` (a power of two, so products stay exact in every type).
pub const MULSUM_SCALAR: f64 = 2.0;

/// Which backend runs the collectives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The CPU host backend: ranks are threads (or processes with `--nprocs`), buffers are host memory.
    Host,
    /// NVIDIA NCCL on GPUs (needs the `cuda` feature and a GPU).
    Nccl,
}

/// The raw command line (see `nccl-perf --help`).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "nccl-perf",
    version,
    args_override_self = true,
    about = "nccl-tests compatible collective benchmark for the NCCL (GPU) and host (CPU) backends",
    after_help = "OPERATIONS: all_reduce all_gather broadcast reduce reduce_scatter alltoall gather scatter sendrecv \
                  (nccl-tests names such as all_reduce_perf are accepted too).\n\
                  Sizes take K, M, G suffixes (powers of 1024). Example: nccl-perf all_reduce -b 8 -e 64M -f 2 -g 2"
)]
pub struct Cli {
    /// The operation to benchmark (all_reduce, all_gather, ..., or all_reduce_perf, ...).
    #[arg(value_parser = parse_op)]
    pub op: CollOp,
    /// Backend [default: nccl when a GPU is visible, else host].
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// Launch this many local processes (one rank set each) through the bootstrap.
    #[arg(long)]
    pub nprocs: Option<usize>,
    /// Number of threads per process; ranks per process = threads × ranks per thread.
    #[arg(short = 't', long = "nthreads", default_value_t = 1)]
    pub nthreads: usize,
    /// Ranks (GPUs) per thread.
    #[arg(short = 'g', long = "ngpus", default_value_t = 1)]
    pub ngpus: usize,
    /// Minimum size in bytes (K/M/G suffixes).
    #[arg(short = 'b', long = "minbytes", default_value = "32M", value_parser = parse_size)]
    pub min_bytes: usize,
    /// Maximum size in bytes (K/M/G suffixes).
    #[arg(short = 'e', long = "maxbytes", default_value = "32M", value_parser = parse_size)]
    pub max_bytes: usize,
    /// Size increment in bytes when the step factor is 1.
    #[arg(short = 'i', long = "stepbytes", default_value = "1M", value_parser = parse_size)]
    pub step_bytes: usize,
    /// Size multiplication factor (used instead of -i when greater than 1).
    #[arg(short = 'f', long = "stepfactor", default_value_t = 1)]
    pub step_factor: usize,
    /// Timed iterations per size.
    #[arg(short = 'n', long = "iters", default_value_t = 20)]
    pub iters: usize,
    /// Operations per iteration, issued back to back (nccl-tests groups them on NCCL; nccl-perf does not).
    #[arg(short = 'm', long = "agg_iters", default_value_t = 1)]
    pub agg_iters: usize,
    /// Warm-up iterations (for every size, before the timed ones).
    #[arg(short = 'w', long = "warmup_iters", default_value_t = 1)]
    pub warmup_iters: usize,
    /// Check iterations (0 disables the correctness check).
    #[arg(short = 'c', long = "check", default_value_t = 1)]
    pub check: usize,
    /// Reduction: sum, prod, max, min, avg, mulsum or all.
    #[arg(short = 'o', long = "op", default_value = "sum", value_parser = parse_redop)]
    pub redop: RedopSel,
    /// Data type: int8 uint8 int32 uint32 int64 uint64 half float double bfloat16 f8e4m3 f8e5m2 or all.
    #[arg(short = 'd', long = "datatype", default_value = "float", value_parser = parse_dtype)]
    pub dtype: DtypeSel,
    /// Root rank for broadcast, reduce, gather and scatter (`all` or -1: every rank in turn).
    #[arg(short = 'r', long = "root", default_value = "0", value_parser = parse_root, allow_hyphen_values = true)]
    pub root: RootSel,
    /// 0: asynchronous; 1: wait and barrier after each operation; 2: wait after each operation; 3: wait and
    /// barrier after each iteration, time excludes the barrier.
    #[arg(short = 'z', long = "blocking", default_value_t = 0)]
    pub blocking: u32,
    /// Abort when an operation takes longer than this many seconds (0: never).
    #[arg(short = 'T', long = "timeout", default_value_t = 0)]
    pub timeout: u64,
    /// Capture the timed iterations (-n × -m operations) in a CUDA graph and launch it this many times; time per
    /// operation is over all launches (NCCL backend only, -z 0).
    #[arg(short = 'G', long = "cudagraph", default_value_t = 0)]
    pub cudagraph: usize,
    /// 1: report host (CPU) time per call instead of completion time (with -G: the host time of all the launches
    /// over the operations of one graph, as nccl-tests reports it).
    #[arg(short = 'C', long = "report_cputime", default_value_t = 0)]
    pub report_cputime: u32,
    /// How times are combined over ranks: 0 rank 0, 1 average, 2 minimum, 3 maximum.
    #[arg(short = 'a', long = "average", default_value_t = 1)]
    pub average: u32,
    /// Write the results as JSON to this file.
    #[arg(short = 'J', long = "output_file")]
    pub output_file: Option<std::path::PathBuf>,
}

/// `-o`: one reduction or all of them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RedopSel {
    /// One reduction.
    One(ReduceOp),
    /// `all`: sum, prod, max, min, avg, mulsum in turn.
    All,
}

impl RedopSel {
    /// The reductions to run.
    pub fn list(self) -> Vec<ReduceOp> {
        match self {
            RedopSel::One(op) => vec![op],
            RedopSel::All => REDOPS.to_vec(),
        }
    }
}

/// The reductions in nccl-tests' order.
pub const REDOPS: [ReduceOp; 6] = [
    ReduceOp::Sum,
    ReduceOp::Prod,
    ReduceOp::Max,
    ReduceOp::Min,
    ReduceOp::Avg,
    ReduceOp::PreMulSum(MULSUM_SCALAR),
];

/// `-d`: one data type or all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtypeSel {
    /// One data type.
    One(DataType),
    /// `all`: every type the backend supports, in `ncclDataType_t` order.
    All,
}

/// `-r`: one root or every rank in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootSel {
    /// One root rank.
    One(usize),
    /// `all` (or -1).
    All,
}

/// Parses a size as nccl-tests does: a number with an optional K, M or G suffix (powers of 1024, any case);
/// fractions are allowed and the byte count is rounded down.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let (num, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c),
        _ => (t, ' '),
    };
    let mult: f64 = match unit.to_ascii_uppercase() {
        ' ' => 1.0,
        'K' => 1024.0,
        'M' => 1024.0 * 1024.0,
        'G' => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("invalid size '{text}': the suffix must be K, M or G")),
    };
    let num = num.trim();
    let value: f64 = num
        .parse()
        .ok()
        .filter(|_| !num.is_empty() && num.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("invalid size '{text}': expected a number with an optional K, M or G suffix"))?;
    let bytes = value * mult;
    if !bytes.is_finite() || bytes > (1u64 << 50) as f64 {
        return Err(format!("invalid size '{text}': too large"));
    }
    Ok(bytes as usize)
}

fn parse_op(text: &str) -> Result<CollOp, String> {
    CollOp::parse(text).ok_or_else(|| {
        let names: Vec<_> = CollOp::ALL.iter().map(|o| o.name()).collect();
        format!("unknown operation '{text}'; expected one of {}", names.join(", "))
    })
}

fn parse_redop(text: &str) -> Result<RedopSel, String> {
    if text == "all" {
        return Ok(RedopSel::All);
    }
    REDOPS
        .into_iter()
        .find(|op| op.nccl_tests_name() == text)
        .map(RedopSel::One)
        .ok_or_else(|| format!("invalid op '{text}'; expected sum, prod, max, min, avg, mulsum or all"))
}

/// Parses a `-d` value: nccl-tests' type names, a few common aliases, or `all`.
pub fn parse_dtype(text: &str) -> Result<DtypeSel, String> {
    if text == "all" {
        return Ok(DtypeSel::All);
    }
    let alias = match text {
        "char" => "int8",
        "int" => "int32",
        "float16" | "fp16" | "f16" => "half",
        "float32" | "fp32" | "f32" => "float",
        "float64" | "fp64" | "f64" => "double",
        "bf16" => "bfloat16",
        other => other,
    };
    DataType::ALL
        .into_iter()
        .find(|d| d.nccl_tests_name() == alias)
        .map(DtypeSel::One)
        .ok_or_else(|| {
            let names: Vec<_> = DataType::ALL.iter().map(|d| d.nccl_tests_name()).collect();
            format!("invalid datatype '{text}'; expected one of {} or all", names.join(" "))
        })
}

fn parse_root(text: &str) -> Result<RootSel, String> {
    match text.trim() {
        "all" | "-1" => Ok(RootSel::All),
        t => t
            .parse::<usize>()
            .map(RootSel::One)
            .map_err(|_| format!("invalid root '{text}'; expected a rank number, all or -1")),
    }
}

impl Cli {
    /// Parses `args` (program name first) and checks the flags against each other. Errors carry the usage text.
    pub fn parse_and_check<I, S>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args).map_err(with_usage)?;
        cli.check()
            .map_err(|msg| Cli::command().error(ErrorKind::ArgumentConflict, msg))?;
        Ok(cli)
    }

    /// Consistency checks that clap cannot express. Returns the message of the first problem.
    pub fn check(&self) -> Result<(), String> {
        if self.min_bytes > self.max_bytes {
            return Err(format!(
                "invalid sizes for 'minbytes' and 'maxbytes': {} > {}",
                self.min_bytes, self.max_bytes
            ));
        }
        if self.min_bytes < self.max_bytes {
            if self.step_factor <= 1 && self.step_bytes == 0 {
                return Err("-i 0 with -f 1 would never reach -e: give a step (-i) or a factor (-f > 1)".into());
            }
            if self.step_factor > 1 && self.min_bytes == 0 {
                return Err("-b 0 with -f > 1 would never grow: start from a non-zero size".into());
            }
        }
        if let Some(n) = size_count(self.min_bytes, self.max_bytes, self.step_factor, self.step_bytes) {
            if n > MAX_SIZES {
                return Err(format!(
                    "-b {} -e {} -i {} would make {n} table rows (at most {MAX_SIZES}): use a larger -i or -f > 1",
                    self.min_bytes, self.max_bytes, self.step_bytes
                ));
            }
        }
        if self.nthreads == 0 || self.ngpus == 0 {
            return Err("-t and -g must be at least 1".into());
        }
        if self.iters == 0 {
            return Err("-n (iterations) must be at least 1".into());
        }
        if self.agg_iters == 0 {
            return Err("-m (operations per iteration) must be at least 1".into());
        }
        if self.blocking > 3 {
            return Err(format!("-z {} is not a blocking mode; use 0, 1, 2 or 3", self.blocking));
        }
        if self.report_cputime > 1 {
            return Err(format!("-C {} is not 0 or 1", self.report_cputime));
        }
        if self.average > 3 {
            return Err(format!(
                "-a {} is not 0 (rank 0), 1 (avg), 2 (min) or 3 (max)",
                self.average
            ));
        }
        if self.cudagraph > 0 && self.blocking == 3 {
            return Err("-z 3 cannot be combined with CUDA graphs (-G)".into());
        }
        if self.cudagraph > 0 && self.blocking != 0 {
            // nccl-tests would try and fail in the middle of the capture (a capturing stream cannot be waited
            // for); refused up front here.
            return Err(format!(
                "-z {} waits for each operation, which cannot be done while the operations are captured into a \
                 CUDA graph (-G): use -z 0 with -G",
                self.blocking
            ));
        }
        if self.cudagraph > 0 && self.backend == Some(BackendKind::Host) {
            return Err("-G (CUDA graph launches) needs the nccl backend; the host backend has no graphs".into());
        }
        if self.nprocs == Some(0) {
            return Err("--nprocs must be at least 1".into());
        }
        Ok(())
    }

    /// The sizes of the table, in bytes, as nccl-tests steps them (`-f` when > 1, else `-i`).
    pub fn sizes(&self) -> Vec<usize> {
        sizes(self.min_bytes, self.max_bytes, self.step_factor, self.step_bytes)
    }
}

/// Rebuilds a clap error so that its text always ends with the usage line (clap leaves it out of value errors).
fn with_usage(e: clap::Error) -> clap::Error {
    let text = e.render().to_string();
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) || text.contains("Usage:") {
        return e;
    }
    let msg: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("For more information"))
        .collect();
    let msg = msg.join("\n");
    let msg = msg.strip_prefix("error: ").unwrap_or(&msg).to_string();
    Cli::command().error(e.kind(), msg)
}

/// The most rows (sizes) one run may have: the size list is built before the run, so `-b 1 -e 1G -i 1` must
/// be refused rather than allocate 8 GiB for it.
pub const MAX_SIZES: u128 = 100_000;

/// How many sizes [`sizes`] yields for an additive step (`None` for a factor > 1: at most 64 of them).
fn size_count(min: usize, max: usize, factor: usize, step: usize) -> Option<u128> {
    if factor > 1 || min > max {
        return None;
    }
    Some(if step == 0 {
        1
    } else {
        (max - min) as u128 / step as u128 + 1
    })
}

/// nccl-tests' size loop: from `min` to `max` inclusive, multiplying by `factor` when it is > 1, else adding
/// `step`. A loop that cannot advance yields `min` once.
pub fn sizes(min: usize, max: usize, factor: usize, step: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut size = min;
    while size <= max {
        out.push(size);
        let next = if factor > 1 {
            size.saturating_mul(factor)
        } else {
            size.saturating_add(step)
        };
        if next <= size {
            break;
        }
        size = next;
    }
    out
}

/// The warm-up sizes: nccl-tests warms every size from `min` to `max` doubling (whatever `-f` says).
pub fn warmup_sizes(min: usize, max: usize) -> Vec<usize> {
    sizes(min, max, 2, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_loop() {
        assert_eq!(sizes(8, 64, 2, 0), vec![8, 16, 32, 64]);
        assert_eq!(sizes(8, 70, 2, 0), vec![8, 16, 32, 64]);
        assert_eq!(sizes(1, 3, 1, 1), vec![1, 2, 3]);
        assert_eq!(sizes(5, 5, 1, 0), vec![5]);
        assert_eq!(sizes(0, 0, 2, 0), vec![0]);
    }

    #[test]
    fn a_size_list_too_long_to_build_is_refused() {
        let cli = |args: &[&str]| Cli::parse_and_check(["nccl-perf", "all_reduce"].iter().chain(args));
        let e = cli(&["-b", "1", "-e", "1G", "-i", "1"]).unwrap_err().to_string();
        assert!(e.contains("1073741824 table rows"), "{e}");
        assert!(cli(&["-b", "0", "-e", "99999", "-i", "1"]).is_ok());
        assert!(cli(&["-b", "0", "-e", "100000", "-i", "1"]).is_err());
        assert!(cli(&["-b", "1", "-e", "1G", "-f", "2"]).is_ok());
        assert_eq!(size_count(0, 99_999, 1, 1), Some(100_000));
        assert_eq!(size_count(8, 8, 1, 0), Some(1));
        assert_eq!(sizes(0, 99_999, 1, 1).len(), 100_000);
    }

    #[test]
    fn root_and_types() {
        assert_eq!(parse_root("all").unwrap(), RootSel::All);
        assert_eq!(parse_root("-1").unwrap(), RootSel::All);
        assert_eq!(parse_root("3").unwrap(), RootSel::One(3));
        assert!(parse_root("x").is_err());
        assert_eq!(parse_dtype("bfloat16").unwrap(), DtypeSel::One(DataType::Bfloat16));
        assert_eq!(parse_dtype("half").unwrap(), DtypeSel::One(DataType::Float16));
        assert!(parse_dtype("float128").is_err());
        assert_eq!(
            parse_redop("mulsum").unwrap(),
            RedopSel::One(ReduceOp::PreMulSum(MULSUM_SCALAR))
        );
        assert!(parse_redop("xor").is_err());
    }
}
