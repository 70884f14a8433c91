//! The `nccl-perf` program: parse flags, pick the backend, start the ranks, print the footer, exit.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::CommandFactory;
use nccl::bootstrap::RankInfo;
use nccl::{DataType, Error, Result};

use super::cli::{BackendKind, Cli, DtypeSel};
use super::device::PerfComm;
use super::driver::{self, Plan, Progress, Summary};
use super::format;
use super::json::{self, RunInfo};

/// Exit code when some value was wrong.
pub const EXIT_WRONG: i32 = 1;
/// Exit code for usage errors (clap's).
pub const EXIT_USAGE: i32 = 2;
/// Exit code for runtime errors.
pub const EXIT_ERROR: i32 = 3;
/// Exit code when `-T` fired.
pub const EXIT_TIMEOUT: i32 = 124;

/// The environment variable of the test hook that corrupts one result element (`1` to enable).
pub const CORRUPT_VAR: &str = "NCCL_PERF_TEST_CORRUPT";

/// Runs the program with `args` (program name first) and returns the process exit code.
pub fn main_with(args: Vec<String>) -> i32 {
    let cli = match Cli::parse_and_check(&args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    match run(cli, args) {
        Ok(code) => code,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("nccl-perf: error: {}", nccl::report::chain(&e));
            EXIT_ERROR
        }
    }
}

fn usage_error(msg: String) -> Result<i32> {
    let err = Cli::command().error(clap::error::ErrorKind::ArgumentConflict, msg);
    let _ = err.print();
    Ok(EXIT_USAGE)
}

/// True when a CUDA device is visible (probed without panicking; always false without the `cuda` feature).
pub fn gpu_visible() -> bool {
    #[cfg(feature = "cuda")]
    {
        super::gpu::device_count() > 0
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

fn run(cli: Cli, args: Vec<String>) -> Result<i32> {
    let backend = cli.backend.unwrap_or(if gpu_visible() {
        BackendKind::Nccl
    } else {
        BackendKind::Host
    });
    if backend == BackendKind::Host && cli.cudagraph > 0 {
        return usage_error("-G (CUDA graph launches) needs the nccl backend; the host backend has no graphs".into());
    }
    if let Some(code) = nccl::bootstrap::launch::spawn_local_if_requested(cli.nprocs)? {
        return Ok(code);
    }
    let info = RankInfo::from_env()?;
    let local = cli.nthreads * cli.ngpus;
    match backend {
        BackendKind::Host => run_host(&cli, &args, &info, local),
        BackendKind::Nccl => {
            #[cfg(feature = "cuda")]
            {
                super::gpu::run_nccl(&cli, &args, &info, local)
            }
            #[cfg(not(feature = "cuda"))]
            {
                usage_error(
                    "--backend nccl needs a build with the cuda feature: cargo run --release --features cuda --bin \
                     nccl-perf -- ..."
                        .into(),
                )
            }
        }
    }
}

fn run_host(cli: &Cli, args: &[String], info: &RankInfo, local: usize) -> Result<i32> {
    use nccl::host::{HostComm, HostOptions};
    if info.world_size > 1 {
        if local != 1 {
            return usage_error(format!(
                "with {} processes ({}), the host backend runs one rank per process: drop -t/-g (got {} ranks \
                 per process)",
                info.world_size, info.launcher, local
            ));
        }
        let rv = nccl::bootstrap::Rendezvous::for_rank(info)?;
        let comm = HostComm::from_rendezvous(&rv, HostOptions::default())?;
        return run_ranks(cli, args, "host", vec![comm], info.world_size);
    }
    let comms = HostComm::threads(local, HostOptions::default())?;
    run_ranks(cli, args, "host", comms, local)
}

/// Builds the plan for communicators like `probe` (same on every rank).
pub fn make_plan<C: PerfComm>(cli: &Cli, probe: &C, nranks: usize, version: &str, backend: &str) -> Plan {
    let types = match cli.dtype {
        DtypeSel::One(dt) => vec![dt],
        DtypeSel::All => DataType::ALL.into_iter().filter(|&d| probe.supports(d)).collect(),
    };
    let mut preamble = format!(
        "# nccl-perf version {} (git {}) (nccl-tests format) backend: {backend} library: {version} ranks: {nranks}\n",
        env!("CARGO_PKG_VERSION"),
        env!("NCCL_STACK_GIT")
    );
    preamble += &format!("# Collective test starting: {}\n", cli.op.program_name());
    preamble += &format::config_line(
        cli.nthreads,
        cli.ngpus,
        cli.min_bytes,
        cli.max_bytes,
        cli.step_factor,
        cli.step_bytes,
        cli.warmup_iters,
        cli.iters,
        cli.agg_iters,
        cli.check,
        cli.cudagraph,
    );
    preamble += format::blocking_line(cli.blocking);
    preamble += "#\n";
    Plan {
        op: cli.op,
        types,
        redops: cli.redop.list(),
        root: cli.root,
        sizes: cli.sizes(),
        warmup_sizes: super::cli::warmup_sizes(cli.min_bytes, cli.max_bytes),
        iters: cli.iters,
        agg_iters: cli.agg_iters,
        warmup_iters: cli.warmup_iters,
        graph_launches: cli.cudagraph,
        check: cli.check,
        blocking: cli.blocking,
        cputime: cli.report_cputime == 1,
        average: cli.average,
        corrupt: std::env::var(CORRUPT_VAR).is_ok_and(|v| !v.is_empty() && v != "0"),
        preamble,
        progress: None,
    }
}

/// Runs `comms` (this process's ranks, one thread each), prints the footer on global rank 0, writes JSON, and
/// returns the exit code.
pub fn run_ranks<C>(cli: &Cli, args: &[String], backend: &str, comms: Vec<C>, nranks: usize) -> Result<i32>
where
    C: PerfComm + Send,
{
    let Some(first) = comms.first() else {
        return Err(Error::invalid("nccl-perf", "no ranks to run"));
    };
    if let (true, super::cli::RootSel::One(r)) = (cli.op.has_root(), cli.root) {
        if r >= nranks {
            return usage_error(format!("-r {r}: the root must be a rank below {nranks} (or all)"));
        }
    }
    let version = first.library_version();
    let mut plan = make_plan(cli, first, nranks, &version, backend);
    let progress = Arc::new(Progress::new(comms.len()));
    if cli.timeout > 0 {
        plan.progress = Some(progress.clone());
    }
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = (cli.timeout > 0).then(|| {
        let (done, progress, limit) = (done.clone(), progress.clone(), Duration::from_secs(cli.timeout));
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                if let Some((slot, busy)) = progress.longest_busy() {
                    if busy > limit {
                        let _ = std::io::stdout().flush();
                        println!(
                            "{}: Test timeout ({}s): local rank {slot} busy for {busy:.1?}",
                            driver::hostname(),
                            limit.as_secs()
                        );
                        let _ = std::io::stdout().flush();
                        std::process::exit(EXIT_TIMEOUT);
                    }
                }
            }
        })
    });
    let plan_ref = &plan;
    let results: Vec<Result<Summary>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(slot, comm)| {
                std::thread::Builder::new()
                    .name(format!("nccl-perf-rank{slot}"))
                    .spawn_scoped(s, move || {
                        let is_printer = comm.rank() == 0;
                        let mut stdout = std::io::stdout();
                        let out: Option<&mut (dyn Write + 'static)> = if is_printer { Some(&mut stdout) } else { None };
                        // The communicator is dropped when the thread ends, so a failing rank releases its
                        // peers with an error instead of leaving them waiting.
                        driver::run_rank(&comm, plan_ref, slot, out)
                    })
                    .map_err(|e| Error::io("spawn rank thread", e))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(Error::invalid("nccl-perf", "a rank thread panicked"))),
                Err(e) => Err(e),
            })
            .collect()
    });
    done.store(true, Ordering::Relaxed);
    drop(watchdog);
    let mut printer: Option<Summary> = None;
    let mut first_err = None;
    let mut any_wrong = false;
    for r in results {
        match r {
            Ok(sum) => {
                // The total is combined over all ranks, so every rank (and process) knows the verdict.
                any_wrong |= sum.wrong_total > 0;
                if !sum.device_lines.is_empty() {
                    printer = Some(sum);
                }
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let Some(summary) = printer else {
        // Not the process of rank 0 (which prints); the verdict is shared.
        return Ok(if any_wrong { EXIT_WRONG } else { 0 });
    };
    let program = cli.op.program_name();
    print!("{}", format::footer(summary.wrong_total, summary.avg_busbw, &program));
    let _ = std::io::stdout().flush();
    if let Some(path) = &cli.output_file {
        let info = RunInfo {
            args: args.to_vec(),
            backend: backend.to_string(),
            library_version: version,
            program,
            nranks,
            config: config_json(cli, nranks),
            cputime: cli.report_cputime == 1,
        };
        json::write(path, &info, &summary).map_err(|e| Error::io("write -J file", e))?;
        println!("# Wrote JSON results to {}", path.display());
    }
    Ok(if summary.wrong_total > 0 { EXIT_WRONG } else { 0 })
}

fn config_json(cli: &Cli, nranks: usize) -> serde_json::Value {
    serde_json::json!({
        "op": cli.op.name(),
        "nranks": nranks,
        "nthreads": cli.nthreads,
        "ngpus": cli.ngpus,
        "minimum_bytes": cli.min_bytes,
        "maximum_bytes": cli.max_bytes,
        "step_factor": cli.step_factor,
        "step_bytes": cli.step_bytes,
        "warmup_iters": cli.warmup_iters,
        "iterations": cli.iters,
        "aggregated_iterations": cli.agg_iters,
        "validation": cli.check,
        "graph": cli.cudagraph,
        "blocking": cli.blocking,
        "report_cputime": cli.report_cputime,
        "average": cli.average,
        "timeout": cli.timeout,
    })
}
