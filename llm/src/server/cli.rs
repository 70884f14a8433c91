//! The `serve` example's command line: an HTTP server, or a batch run over a prompts file.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use super::pool::{generate_distributed, Fault, GenRequest, Pool, PoolConfig, Ranks};
use crate::error::{EngineError, Result};
use crate::launch::{self, ChildRanks, RankComms};
use crate::model::{self, WeightSource};
use crate::sample::SamplingParams;
use crate::shard::Layout;

/// An OpenAI-compatible inference server: --dp replicas of --tp × --pp ranks (CPU ranks, or GPUs with
/// --backend nccl --device cuda), continuous batching.
///
/// Without --model, the built-in tiny random model (no tokenizer: prompts as token ids, text as ids).
#[derive(Parser, Debug, Clone)]
#[command(version)]
pub struct Args {
    /// A GGUF file or a Hugging Face directory. Default: the built-in tiny model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The model name clients send (default: the file name without extension, or `tiny-random`).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Port (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Tensor-parallel degree of each replica.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Pipeline-parallel degree of each replica.
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// Data-parallel replicas.
    #[arg(long, default_value_t = 1)]
    pub dp: usize,
    /// Run the ranks as this many processes (--tp × --pp, with --dp 1) instead of threads: this process is
    /// rank 0, serves HTTP and leads; it starts the others, which run the engine and get each step through
    /// the communicator, and starts them again when one dies. Processes started by torchrun, mpirun or srun
    /// are used the same way without this flag (but are not started again).
    #[arg(long)]
    pub nprocs: Option<usize>,
    /// Communication backend of each replica's ranks: `host` (default), or `nccl` (ranks as threads, rank w
    /// of replica r on GPU (r × ranks per replica + w) mod GPUs; a build with `--features cuda`).
    #[arg(long, value_enum, default_value = "host")]
    pub backend: crate::cli::Backend,
    /// Where each rank computes: `cpu` (default) or `cuda` (the GPU engine: needs `--backend nccl` and one
    /// GPU per rank of every replica; never run on a GPU yet).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: crate::cli::Device,
    /// Compute threads per rank (default: cores ÷ all ranks, at least 1).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Decode with int16 activations and integer dot products on block-quantized weights (as tp_llama
    /// --int16: logits within 7e-4 relative L2 of the f64 reference on SmolLM2). Default: exact f32. Prefill
    /// chunks of 3 or more tokens stay exact; models without block-quantized weights decode exact anyway.
    #[arg(long, conflicts_with = "int8")]
    pub int16: bool,
    /// Decode with int8 activations (as tp_llama --int8; coarser: up to 0.11 relative L2 on SmolLM2).
    #[arg(long)]
    pub int8: bool,
    /// Most sequences in a replica's running batch.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Most requests waiting for admission (more get 429).
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// KV cache budget per rank, MiB (a request waits until its whole reservation fits).
    #[arg(long, default_value_t = 512)]
    pub kv_budget_mb: usize,
    /// Most prompt tokens prefilled per step, over all prefilling requests (long prompts are split so decodes
    /// keep running).
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Largest request body, KiB (more: 413).
    #[arg(long, default_value_t = 1024)]
    pub max_body_kb: usize,
    /// A replica whose step takes longer than this is taken out of rotation and rebuilt.
    #[arg(long, default_value_t = 30.0)]
    pub step_timeout_secs: f64,
    /// A failed replica whose rebuild fails waits this long before the next attempt, doubling after each
    /// further failure (up to --rebuild-backoff-max-secs); `/health` shows the attempts and the last error.
    #[arg(long, default_value_t = 1.0)]
    pub rebuild_backoff_secs: f64,
    /// The longest wait between two rebuild attempts of a failed replica.
    #[arg(long, default_value_t = 60.0)]
    pub rebuild_backoff_max_secs: f64,
    /// On SIGTERM, in-flight requests get this long to finish.
    #[arg(long, default_value_t = 60.0)]
    pub drain_timeout_secs: f64,
    /// Batch mode: a JSONL file of prompts (`{"prompt": "...", "max_tokens": N}` or a JSON string per line);
    /// no HTTP server.
    #[arg(long, requires = "out")]
    pub prompts_file: Option<PathBuf>,
    /// Batch mode: where to write the results, one JSON object per line in input order.
    #[arg(long, requires = "prompts_file")]
    pub out: Option<PathBuf>,
    /// Batch mode: default max_tokens per prompt.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Testing only: `REPLICA:RANK:STEP` makes that rank panic at that step once.
    #[arg(long, hide = true)]
    pub inject_fault: Option<String>,
    /// Testing only: sleep this many milliseconds after every step (slows generation down).
    #[arg(long, hide = true, default_value_t = 0)]
    pub step_delay_ms: u64,
}

/// Runs the `serve` example with the process's command line; returns the exit code.
pub fn main() -> i32 {
    let args = Args::parse();
    match check_processes(&args).and_then(|()| run(args)) {
        Ok(()) => 0,
        Err(e) => {
            say!("error: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                say!("  caused by: {s}");
                src = s.source();
            }
            1
        }
    }
}

/// `--nprocs N` must be the replica's world and (ranks as processes) `--dp` 1: checked before any process
/// starts, so a bad flag fails once.
fn check_processes(args: &Args) -> Result<()> {
    check_engine(args)?;
    let Some(n) = args.nprocs else { return Ok(()) };
    let world = args.tp.saturating_mul(args.pp);
    if n != world {
        return Err(EngineError::Config(format!(
            "--nprocs {n} must equal --tp {} × --pp {} = {world} (one process per rank)",
            args.tp, args.pp
        )));
    }
    if args.dp != 1 {
        return Err(EngineError::Config(format!(
            "--nprocs with --dp {}: ranks as processes serve one replica (--dp 1); start one server per \
             replica, or use ranks as threads for --dp > 1",
            args.dp
        )));
    }
    Ok(())
}

/// `--backend`/`--device`: the combinations a replica can run, checked before anything starts.
fn check_engine(args: &Args) -> Result<()> {
    use crate::cli::{Backend, Device};
    let engine = engine_of(args);
    engine.check()?;
    if engine.device == Device::Cuda && (args.int8 || args.int16) {
        return Err(EngineError::Config(
            "--int8/--int16 are CPU decode paths; --device cuda computes in bf16/f32 on the GPU".into(),
        ));
    }
    if engine.backend == Backend::Nccl && args.nprocs.is_some() {
        return Err(EngineError::Config(
            "serve --backend nccl runs its ranks as threads of this process, or as processes an outside \
             launcher started (torchrun, mpirun, srun); --nprocs serves with --backend host only, for now"
                .into(),
        ));
    }
    Ok(())
}

fn engine_of(args: &Args) -> super::ranks::RankEngine {
    super::ranks::RankEngine {
        backend: args.backend,
        device: args.device,
    }
}

fn parse_fault(s: &str) -> Result<Fault> {
    let p: Vec<&str> = s.split(':').collect();
    let num = |i: usize| -> Result<u64> {
        p.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| EngineError::Config(format!("--inject-fault {s}: expected REPLICA:RANK:STEP")))
    };
    if p.len() != 3 {
        return Err(EngineError::Config(format!(
            "--inject-fault {s}: expected REPLICA:RANK:STEP"
        )));
    }
    Ok(Fault {
        replica: num(0)? as usize,
        rank: num(1)? as usize,
        step: num(2)?,
    })
}

fn secs(v: f64, what: &str) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v < 1e7) {
        return Err(EngineError::Config(format!(
            "{what} must be a positive number of seconds, got {v}"
        )));
    }
    Ok(Duration::from_secs_f64(v))
}

fn source_of(args: &Args) -> Result<Arc<dyn WeightSource>> {
    Ok(match &args.model {
        Some(p) => Arc::from(model::open(p)?),
        None => {
            say!("no --model given: serving the built-in tiny random model (prompts as token ids)");
            Arc::from(model::tiny_random(0))
        }
    })
}

/// The decode path `--int8`/`--int16` ask for (exact f32 otherwise).
fn decode_path(args: &Args) -> crate::math::DecodePath {
    crate::math::DecodePath::from_flags(args.int8, args.int16)
}

fn threads_of(args: &Args, layout: Layout) -> usize {
    let ranks = layout.world() * args.dp.max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    args.threads.unwrap_or((cores / ranks).max(1)).max(1)
}

/// Ranks as processes (`--nprocs` or an outside launcher): this process's communicators, after the
/// rendezvous of every rank; `None` when the ranks are threads.
fn process_comms(args: &Args) -> Result<Option<RankComms>> {
    if !launch::is_worker()? {
        return Ok(None);
    }
    if args.tp == 0 || args.pp == 0 {
        return Err(EngineError::Config("--tp and --pp must be at least 1".into()));
    }
    if args.dp != 1 {
        return Err(EngineError::Config(format!(
            "--dp {}: ranks as processes serve one replica (--dp 1)",
            args.dp
        )));
    }
    let layout = Layout {
        tp: args.tp,
        pp: args.pp,
    };
    if args.backend == crate::cli::Backend::Nccl {
        // Device LOCAL_RANK, NCCL communicators over the launcher's rendezvous.
        #[cfg(feature = "cuda")]
        return Ok(Some(launch::nccl_process(layout)?));
        #[cfg(not(feature = "cuda"))]
        return Err(crate::cli::no_cuda_feature());
    }
    Ok(Some(launch::host_process(layout)?))
}

/// A rank process other than 0: runs the engine for rank 0 until it stops the replica (or it fails).
fn rank_process(args: &Args, comms: RankComms) -> Result<()> {
    let layout = Layout {
        tp: args.tp,
        pp: args.pp,
    };
    ignore_sigterm();
    let w = comms.world_rank;
    let src = source_of(args)?;
    say!(
        "rank {w} of {}: pid {}, running the engine for rank 0",
        layout.world(),
        std::process::id()
    );
    super::ranks::serve_rank(
        &*src,
        layout,
        threads_of(args, layout),
        decode_path(args),
        engine_of(args),
        comms,
    )
}

/// A launcher's SIGTERM (torchrun, or the `--nprocs` parent going away) reaches every rank; only rank 0
/// acts on it (it drains, then sends the other ranks a stop plan), so the others ignore it. A rank whose
/// rank 0 is gone still ends: its next wait for a plan fails within the communicator's timeout.
fn ignore_sigterm() {
    // SAFETY: `signal` with `SIG_IGN` installs no handler code (the kernel discards the signal); it is called
    // before this process starts any thread of its own work and touches no Rust state.
    unsafe {
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
}

/// Builds the pool from the arguments (ranks as threads).
pub fn pool_from_args(args: &Args) -> Result<(Arc<Pool>, String)> {
    pool_with(args, Ranks::Threads)
}

/// Builds the pool: ranks as threads, or as processes with this one world rank 0.
fn pool_with(args: &Args, ranks: Ranks) -> Result<(Arc<Pool>, String)> {
    let src = source_of(args)?;
    let name = args.model_name.clone().unwrap_or_else(|| match &args.model {
        Some(p) => p
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned()),
        None => "tiny-random".into(),
    });
    if args.tp == 0 || args.pp == 0 || args.dp == 0 {
        return Err(EngineError::Config("--tp, --pp and --dp must be at least 1".into()));
    }
    let layout = Layout {
        tp: args.tp,
        pp: args.pp,
    };
    let cfg = PoolConfig {
        layout,
        dp: args.dp,
        threads: threads_of(args, layout),
        decode_path: decode_path(args),
        max_batch: args.max_batch,
        max_queue: args.max_queue,
        kv_budget_bytes: args.kv_budget_mb.saturating_mul(1 << 20),
        prefill_chunk: args.prefill_chunk,
        step_timeout: secs(args.step_timeout_secs, "--step-timeout-secs")?,
        fault: args.inject_fault.as_deref().map(parse_fault).transpose()?,
        step_delay: Duration::from_millis(args.step_delay_ms),
        rebuild_backoff: secs(args.rebuild_backoff_secs, "--rebuild-backoff-secs")?,
        rebuild_backoff_max: secs(args.rebuild_backoff_max_secs, "--rebuild-backoff-max-secs")?,
        engine: engine_of(args),
    };
    let t0 = std::time::Instant::now();
    let processes = !matches!(ranks, Ranks::Threads);
    let pool = match ranks {
        Ranks::Threads => Pool::start(src, cfg)?,
        r => Pool::start_process(src, cfg, r)?,
    };
    let engine = match (args.backend, args.device) {
        (crate::cli::Backend::Host, _) => "host collectives, CPU compute",
        (crate::cli::Backend::Nccl, crate::cli::Device::Cpu) => "NCCL collectives staged through the GPUs, CPU compute",
        (crate::cli::Backend::Nccl, crate::cli::Device::Cuda) => "the GPU engine, one GPU per rank, NCCL",
    };
    say!(
        "{}: {} replica(s) of tp {} × pp {} ({}; {engine}) loaded in {:.2} s",
        pool.source().describe(),
        args.dp,
        args.tp,
        args.pp,
        if processes {
            "ranks as processes"
        } else {
            "ranks as threads"
        },
        t0.elapsed().as_secs_f64()
    );
    Ok((pool, name))
}

/// Runs with parsed arguments.
///
/// In a rank process other than 0 (ranks as processes) this runs the engine for rank 0 instead, until rank 0
/// stops the replica.
pub fn run(args: Args) -> Result<()> {
    let drain = secs(args.drain_timeout_secs, "--drain-timeout-secs")?;
    let ranks = match process_comms(&args)? {
        Some(c) if c.world_rank != 0 => return rank_process(&args, c),
        Some(c) => Ranks::Launched(Some(c)),
        // `--nprocs` without a launcher: this process is rank 0 and starts the others itself (and again
        // when a replica is rebuilt).
        None if args.nprocs.is_some() => Ranks::Children(ChildRanks::of_this_program(Layout {
            tp: args.tp,
            pp: args.pp,
        })?),
        None => Ranks::Threads,
    };
    if let (Some(inp), Some(out)) = (&args.prompts_file, &args.out) {
        return batch(&args, inp, out, ranks);
    }
    let (pool, name) = pool_with(&args, ranks)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| EngineError::Config(format!("tokio runtime: {e}")))?;
    let addr = SocketAddr::new(args.host, args.port);
    let app = super::App::new(pool.clone(), name, args.max_body_kb.saturating_mul(1024));
    let r = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        println!("listening on http://{local} (model `{}`)", app.model_name);
        let _ = std::io::stdout().flush();
        let dead = pool.clone();
        let stop = async move {
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = engine_dead(&dead) => {}
            }
        };
        super::serve(listener, app, stop, drain).await
    });
    // Dropping the runtime drops every connection still open after the drain timeout, which cancels their
    // sequences; then the replicas stop.
    drop(rt);
    pool.shutdown();
    if let Some(why) = pool.dead() {
        return Err(EngineError::Config(format!(
            "the engine died ({why}); in-flight requests were answered with 503 and the server exits (its rank \
             processes cannot be restarted from here: restart the server)"
        )));
    }
    say!("stopped");
    r.map_err(|e| EngineError::Io {
        path: PathBuf::from(addr.to_string()),
        source: e,
    })
}

/// Resolves once the pool is dead (ranks as processes, one of which failed): the server then stops taking
/// requests, answers those in flight (they already got their 503) and exits with an error.
async fn engine_dead(pool: &Pool) {
    loop {
        if pool.dead().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// One line of a prompts file: a JSON string (the prompt), or an object with these fields (any other field
/// is an error, not silently ignored).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    prompt: serde_json::Value,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    #[serde(default)]
    stop: Vec<String>,
    #[serde(default)]
    ignore_eos: bool,
}

/// A prompt as given: text (tokenized once the model is loaded) or token ids.
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// Reads and checks every line of the prompts file (JSON, fields, types) before any model is loaded, so a
/// bad line costs no model load; returns each line's number, prompt and request settings.
fn read_prompts(args: &Args, inp: &std::path::Path) -> Result<Vec<(usize, Prompt, GenRequest)>> {
    let io = |source| EngineError::Io {
        path: inp.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(inp).map_err(io)?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: String| EngineError::Config(format!("{}:{}: {m}", inp.display(), i + 1));
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        let l: Line = if let serde_json::Value::String(s) = v {
            Line {
                prompt: serde_json::Value::String(s),
                max_tokens: None,
                temperature: None,
                top_p: None,
                seed: None,
                stop: Vec::new(),
                ignore_eos: false,
            }
        } else {
            serde_json::from_value(v).map_err(|e| bad(e.to_string()))?
        };
        let prompt = match l.prompt {
            serde_json::Value::String(s) => Prompt::Text(s),
            other => Prompt::Ids(
                serde_json::from_value::<Vec<u32>>(other)
                    .map_err(|_| bad("prompt must be a string or a list of token ids".into()))?,
            ),
        };
        let req = GenRequest {
            prompt: Vec::new(),
            max_tokens: l.max_tokens.unwrap_or(args.max_tokens),
            sampling: SamplingParams {
                temperature: l.temperature.unwrap_or(0.0),
                top_p: l.top_p.unwrap_or(1.0),
                seed: l.seed.unwrap_or(0),
            },
            stop: l.stop,
            ignore_eos: l.ignore_eos,
        };
        out.push((i + 1, prompt, req));
    }
    Ok(out)
}

fn batch(args: &Args, inp: &std::path::Path, out: &std::path::Path, ranks: Ranks) -> Result<()> {
    let io = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| EngineError::Io { path, source }
    };
    let lines = read_prompts(args, inp)?;
    let (pool, _) = pool_with(args, ranks)?;
    let tok = pool.tokenizer().cloned();
    let mut reqs = Vec::with_capacity(lines.len());
    for (no, prompt, mut req) in lines {
        let bad = |m: String| EngineError::Config(format!("{}:{no}: {m}", inp.display()));
        req.prompt = match prompt {
            Prompt::Ids(ids) => ids,
            Prompt::Text(s) => {
                let t = tok
                    .as_ref()
                    .ok_or_else(|| bad("the model has no tokenizer: give prompts as lists of token ids".into()))?;
                t.encode(s.as_str(), true)
                    .map_err(|e| bad(e.to_string()))?
                    .get_ids()
                    .to_vec()
            }
        };
        reqs.push(req);
    }
    let n = reqs.len();
    let t0 = std::time::Instant::now();
    let results = generate_distributed(&pool, reqs, Duration::from_secs(3600));
    pool.shutdown();
    let mut w = std::io::BufWriter::new(std::fs::File::create(out).map_err(io(out))?);
    let mut failed = 0;
    for (i, r) in results.into_iter().enumerate() {
        let v = match r {
            Ok(o) => serde_json::json!({"index": i, "text": o.text, "token_ids": o.token_ids,
                                        "finish_reason": o.finish.as_str()}),
            Err(e) => {
                failed += 1;
                serde_json::json!({"index": i, "error": e})
            }
        };
        writeln!(w, "{v}").map_err(io(out))?;
    }
    w.flush().map_err(io(out))?;
    say!(
        "{n} prompt(s) over {} replica(s) in {:.2} s; results in {}",
        args.dp,
        t0.elapsed().as_secs_f64(),
        out.display()
    );
    if failed > 0 {
        return Err(EngineError::Config(format!(
            "{failed} of {n} prompt(s) failed (see {})",
            out.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(argv: &[&str]) -> std::result::Result<(), String> {
        let args = Args::try_parse_from(std::iter::once("serve").chain(argv.iter().copied())).unwrap();
        check_processes(&args).map_err(|e| e.to_string())
    }

    /// `--backend`/`--device` combinations no replica can run are refused before anything starts, in both
    /// builds (with and without the `cuda` feature, as CI tests the library).
    #[test]
    fn engines_a_replica_cannot_run_are_refused_first() {
        check(&[]).unwrap();
        let e = check(&["--device", "cuda"]).unwrap_err();
        assert!(e.contains("--device cuda needs --backend nccl"), "{e}");
        let nccl = check(&["--backend", "nccl", "--tp", "2", "--nprocs", "2"]);
        let cuda_int8 = check(&["--backend", "nccl", "--device", "cuda", "--int8"]);
        if cfg!(feature = "cuda") {
            let e = nccl.unwrap_err();
            assert!(e.contains("--nprocs serves with --backend host only"), "{e}");
            let e = cuda_int8.unwrap_err();
            assert!(e.contains("--int8/--int16 are CPU decode paths"), "{e}");
            check(&["--backend", "nccl", "--device", "cuda", "--tp", "2", "--dp", "2"]).unwrap();
        } else {
            for e in [nccl.unwrap_err(), cuda_int8.unwrap_err()] {
                assert!(e.contains("rebuild with --features cuda"), "{e}");
            }
        }
    }

    /// With the `cuda` feature on a host without a GPU (this one, CI) a NCCL replica fails to start with the
    /// error naming the missing device, never a panic or a hang.
    #[cfg(feature = "cuda")]
    #[test]
    fn a_nccl_replica_without_a_gpu_is_a_clear_error() {
        if nccl::cuda_device_count() > 0 {
            return; // a GPU host: the GPU tests cover it
        }
        for device in ["cpu", "cuda"] {
            let args = Args::try_parse_from(["serve", "--backend", "nccl", "--device", device, "--tp", "2"]).unwrap();
            let e = pool_from_args(&args).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains("no CUDA device"), "{device}: {e}");
        }
    }
}
