//! The command line shared by the `tp_llama` and `pp_llama` examples.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, ValueEnum};

use crate::chat::{self, Message};
use crate::engine::{GenerateOutput, GenerateParams, Rank, RankModel, RankPlace};
use crate::error::{EngineError, Result};
use crate::launch::{self, RankComms};
use crate::math::DecodePath;
use crate::model::{self, WeightSource};
use crate::sample::SamplingParams;
use crate::shard::Layout;

/// Which example is running (decides the default layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Example {
    /// `tp_llama`: `--tp 2` unless given.
    Tp,
    /// `pp_llama`: `--pp 2` unless given.
    Pp,
}

/// The communication backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// CPU ranks, collectives over host memory (threads or shared memory between processes).
    Host,
    /// NCCL between GPUs (needs a build with `--features cuda` and one GPU per rank: as threads rank r uses
    /// device r % device count, as processes device LOCAL_RANK). With `--device cpu` compute stays on the
    /// CPU and each collective is staged host → GPU → NCCL → host; with `--device cuda` the GPU engine
    /// computes on the device and the TP collectives run on device buffers.
    Nccl,
}

/// Where a rank computes its forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// On the CPU (f32 activations, weights as the file stores them or f32).
    Cpu,
    /// On the rank's GPU (the CUDA engine: bf16 weights, f32 activations and KV cache on the device, TP
    /// collectives by NCCL on the compute stream). Needs `--backend nccl`, a build with `--features cuda` and
    /// one GPU per rank. Not yet run on a GPU.
    Cuda,
}

/// Tensor- and pipeline-parallel Llama inference on CPU ranks.
///
/// Without --model, the real SmolLM2-135M-Instruct that scripts/setup.sh fetched
/// (.deps/models/SmolLM2-135M-Instruct.Q4_1.gguf) is used with a chat prompt; where that file is absent (or
/// with --tiny), a small built-in model with deterministic random weights (no tokenizer: the output is
/// token ids), and the program says so.
#[derive(Parser, Debug, Clone)]
#[command(version)]
pub struct Args {
    /// A GGUF file or a Hugging Face directory (config.json + *.safetensors). Default: the SmolLM2 GGUF that
    /// scripts/setup.sh puts in .deps/models (then also --chat with a default question), else the built-in
    /// tiny model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Use the built-in tiny model with deterministic random weights (no tokenizer), even where a real model
    /// was fetched.
    #[arg(long, conflicts_with = "model")]
    pub tiny: bool,
    /// The prompt text (tokenized with the model's tokenizer).
    #[arg(long, conflicts_with = "prompt_ids")]
    pub prompt: Option<String>,
    /// The prompt as comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Wrap the prompt in the model's chat template (as a user message).
    #[arg(long)]
    pub chat: bool,
    /// Do not stop at end-of-sequence tokens (for benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object at the end (and no streamed text).
    #[arg(long)]
    pub json: bool,
    /// Write the float32 logits at the last prompt position to this file, as a JSON array.
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
    /// Tensor-parallel degree (1 ..= number of query heads). Default: 2 for tp_llama, 1 for pp_llama.
    #[arg(long)]
    pub tp: Option<usize>,
    /// Pipeline-parallel degree (1 ..= number of layers). Default: 2 for pp_llama, 1 for tp_llama.
    #[arg(long)]
    pub pp: Option<usize>,
    /// Run the ranks as this many local processes instead of threads (must equal tp × pp).
    #[arg(long)]
    pub nprocs: Option<usize>,
    /// Communication backend. `nccl` moves the communication to NCCL on GPUs; compute stays on the CPU
    /// unless `--device cuda`.
    #[arg(long, value_enum, default_value = "host")]
    pub backend: Backend,
    /// Where each rank computes: `cpu` (default) or `cuda` (the GPU engine; needs `--backend nccl`, one GPU
    /// per rank and a `--features cuda` build; never run on a GPU yet).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    /// Decode through a CUDA graph (`--device cuda`, one pipeline stage): the third and later decode steps
    /// launch one recording of a whole step, its NCCL collectives included, instead of each kernel. Never
    /// run on a GPU yet.
    #[arg(long)]
    pub cuda_graph: bool,
    /// Run the TP collectives on their own CUDA stream (`--device cuda`, one pipeline stage), ordered by
    /// events, so that in a micro-batched prefill chunk k's all-reduces run while chunk k + 1 computes.
    /// Implies `--micro-batches 2` unless given. Not with `--cuda-graph`. Never run on a GPU yet.
    #[arg(long)]
    pub overlap_comm: bool,
    /// Prompt micro-batches in prefill (0 = one per pipeline stage): pipeline stages work on different
    /// chunks at once; on one stage the chunks go through the layers interleaved.
    #[arg(long, default_value_t = 0)]
    pub micro_batches: usize,
    /// Compute threads per rank (default: available cores ÷ ranks on this host, at least 1).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Fast decode: quantize the activations to int8 per block of 32 (f32 scale, as llama.cpp) and use
    /// integer dot products with the Q4_0/Q4_1/Q8_0 weight blocks (AVX-512 VNNI or AVX2 when the CPU has them,
    /// else portable code). Coarse: on SmolLM2 the logits are up to 0.11 relative L2 from the f64 reference (same
    /// greedy tokens as the exact path on the test prompts); prefer --int16. Default: the exact f32 path. Prefill (3 or more
    /// prompt tokens) stays exact. The path used is printed (`decode_path` in --json).
    #[arg(long, conflicts_with = "int16")]
    pub int8: bool,
    /// Fast decode as --int8 but with the activations quantized to int16 per block (AVX2 `vpmaddwd` when the
    /// CPU has it, else portable code): on SmolLM2 the logits stay within 7e-4 relative L2 of the f64
    /// reference. Prefill stays exact.
    #[arg(long)]
    pub int16: bool,
}

/// Everything a rank needs, shared by the threads of this process.
struct Job {
    src: Arc<dyn WeightSource>,
    layout: Layout,
    threads: usize,
    prompt: Vec<u32>,
    params: GenerateParams,
    tokenizer: Option<Arc<tokenizers::Tokenizer>>,
    args: Args,
}

/// Runs an example with the process's command line; returns the process exit code.
pub fn main(example: Example) -> i32 {
    let args = Args::parse();
    match run(example, args) {
        Ok(code) => code,
        Err(e) => {
            say!("error: {}", nccl::report::chain(&e));
            1
        }
    }
}

fn layout_of(example: Example, args: &Args) -> Result<Layout> {
    let (mut tp, mut pp) = (args.tp, args.pp);
    if let Some(n) = args.nprocs {
        if n == 0 {
            return Err(EngineError::Config("--nprocs must be at least 1".into()));
        }
        match (tp, pp) {
            (None, None) if example == Example::Tp => tp = Some(n),
            (None, None) => pp = Some(n),
            (Some(t), None) => pp = Some((n / t.max(1)).max(1)),
            (None, Some(p)) => tp = Some((n / p.max(1)).max(1)),
            _ => {}
        }
    }
    let default = |mine| if mine { 2 } else { 1 };
    let tp = tp.unwrap_or(default(example == Example::Tp && args.pp.is_none()));
    let pp = pp.unwrap_or(default(example == Example::Pp));
    if tp == 0 || pp == 0 {
        return Err(EngineError::Config("--tp and --pp must be at least 1".into()));
    }
    let layout = Layout { tp, pp };
    if let Some(n) = args.nprocs {
        if n != layout.world() {
            return Err(EngineError::Config(format!(
                "--nprocs {n} must equal --tp {tp} × --pp {pp} = {}",
                layout.world()
            )));
        }
    }
    Ok(layout)
}

/// The sampling flags, checked before any worker starts or model loads.
fn sampling_of(args: &Args) -> Result<SamplingParams> {
    let p = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    p.validate().map_err(|e| {
        let flag = match e {
            crate::sample::SamplingError::Temperature(_) => "--temperature",
            _ => "--top-p",
        };
        EngineError::Config(format!("{flag}: {e}"))
    })?;
    Ok(p)
}

/// Runs an example with parsed arguments; returns the process exit code.
pub fn run(example: Example, args: Args) -> Result<i32> {
    let layout = layout_of(example, &args)?;
    sampling_of(&args)?; // before spawning workers: a bad flag fails once, in the launcher
    let nccl = args.backend == Backend::Nccl;
    check_device(&args)?;
    if nccl {
        check_nccl_build()?;
    }
    if let Some(code) = launch::spawn_workers(args.nprocs)? {
        return Ok(code);
    }
    let multi_process = launch::is_worker()?;
    let local_ranks = if multi_process {
        args.nprocs.unwrap_or(layout.world())
    } else {
        layout.world()
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args.threads.unwrap_or((cores / local_ranks).max(1)).max(1);

    let mut args = args;
    let src: Arc<dyn WeightSource> = match (&args.model, args.tiny) {
        (Some(p), _) => Arc::from(model::open(p)?),
        (None, false) if default_model().is_some() => {
            let p = default_model().unwrap_or_default();
            if launch::reports_notices()? {
                say!("no --model given: using {} (fetched by scripts/setup.sh)", p.display());
            }
            // The main job's default: a question in the model's own chat template, so it shows fluent text.
            if args.prompt.is_none() && args.prompt_ids.is_none() {
                args.prompt = Some(DEFAULT_QUESTION.to_string());
                args.chat = true;
            }
            Arc::from(model::open(&p)?)
        }
        _ => {
            if launch::reports_notices()? {
                say!(
                    "{}: using the built-in tiny model with random weights (output is token ids; run \
                     scripts/setup.sh for the real SmolLM2, or pass --model)",
                    if args.tiny {
                        "--tiny"
                    } else {
                        "no --model given and no model fetched"
                    }
                );
            }
            Arc::from(model::tiny_random(0))
        }
    };
    crate::engine::check_layout(src.config(), layout.tp, layout.pp)?;
    let tokenizer = src.tokenizer()?.map(Arc::new);
    let prompt = prompt_ids(&args, &*src, tokenizer.as_deref())?;
    let params = GenerateParams {
        max_new_tokens: args.max_new_tokens,
        sampling: sampling_of(&args)?,
        ignore_eos: args.ignore_eos,
        micro_batches: match (args.micro_batches, args.overlap_comm) {
            (0, true) => 2,
            (mb, _) => mb,
        },
    };
    let job = Arc::new(Job {
        src,
        layout,
        threads,
        prompt,
        params,
        tokenizer,
        args,
    });
    let reporter = (layout.pp - 1) * layout.tp;

    if multi_process {
        let comms = if nccl {
            nccl_process(layout)?
        } else {
            launch::host_process(layout)?
        };
        let w = comms.world_rank;
        if nccl && w == reporter {
            say!(
                "{}",
                nccl_log_line(layout, "processes, device LOCAL_RANK each", job.args.device)
            );
        }
        let out = run_rank(&job, comms, w == reporter).map_err(|e| EngineError::Rank {
            rank: w,
            source: Box::new(e),
        })?;
        if w == reporter {
            report(&job, &out, if nccl { "nccl" } else { "host" })?;
        }
        return Ok(0);
    }

    // Each rank thread gets its communicators from `comms_of` (NCCL creates them on the rank's own thread).
    let (comms_of, backend) = if nccl {
        nccl_threads(layout, job.args.device)?
    } else {
        let comms = launch::host_threads(layout)?;
        let backend = comms[0].tp.backend_name();
        let backend = if backend == "single" { "host" } else { backend };
        let slots: Vec<std::sync::Mutex<Option<RankComms>>> =
            comms.into_iter().map(|c| std::sync::Mutex::new(Some(c))).collect();
        let take: CommsOf = Box::new(move |w| {
            slots
                .get(w)
                .and_then(|m| m.lock().ok()?.take())
                .ok_or_else(|| EngineError::Config(format!("no communicators for rank {w}")))
        });
        (take, backend)
    };
    let results: Vec<Result<GenerateOutput>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..layout.world())
            .map(|w| {
                let job = job.clone();
                let comms_of = &comms_of;
                std::thread::Builder::new()
                    .name(format!("rank{w}"))
                    .spawn_scoped(s, move || run_rank(&job, comms_of(w)?, w == reporter))
                    .expect("spawning a rank thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(EngineError::Config("a rank thread panicked".into())))
            })
            .collect()
    });
    let outs = launch::first_error(results)?;
    report(&job, &outs[reporter], backend)?;
    Ok(0)
}

/// The question asked when the default model runs without a prompt.
pub const DEFAULT_QUESTION: &str = "What is the capital of France? Answer in two sentences.";

/// The file name of the real model that scripts/setup.sh fetches into `.deps/models`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The real model fetched by scripts/setup.sh, where it exists: `$NCCL_STACK_DEPS/models/…` (set by the
/// workspace's `.cargo/config.toml` under `cargo run`), else the same folder as seen when this was built.
pub fn default_model() -> Option<PathBuf> {
    let at_run = std::env::var_os("NCCL_STACK_DEPS").map(PathBuf::from);
    let at_build = option_env!("NCCL_STACK_DEPS").map(PathBuf::from);
    [at_run, at_build]
        .into_iter()
        .flatten()
        .map(|d| d.join("models").join(DEFAULT_MODEL_FILE))
        .find(|p| p.is_file())
}

/// Gives rank thread `w` its communicators.
type CommsOf = Box<dyn Fn(usize) -> Result<RankComms> + Send + Sync>;

/// `--device cuda` needs `--backend nccl` (each rank's stream is its NCCL communicator's) and the exact
/// decode path (the integer paths are CPU kernels); checked before anything starts.
fn check_device(args: &Args) -> Result<()> {
    if args.device != Device::Cuda {
        if args.cuda_graph {
            return Err(EngineError::Config(
                "--cuda-graph records the GPU engine's decode step: it needs --device cuda".into(),
            ));
        }
        if args.overlap_comm {
            return Err(EngineError::Config(
                "--overlap-comm puts the GPU engine's collectives on their own CUDA stream: it needs --device cuda"
                    .into(),
            ));
        }
        return Ok(());
    }
    if args.overlap_comm && args.cuda_graph {
        return Err(EngineError::Config(
            "--overlap-comm and --cuda-graph cannot be combined: the recording holds one stream's work, and \
             --overlap-comm moves the collectives to another"
                .into(),
        ));
    }
    if let Some(pp) = args.overlap_comm.then_some(args.pp).flatten().filter(|&pp| pp != 1) {
        return Err(EngineError::Config(format!(
            "--overlap-comm needs --pp 1, not {pp}: it overlaps one stage's interleaved prefill chunks"
        )));
    }
    // A pipeline layout (pp_llama's default, or --pp N) is refused by `Rank::set_graph_decode`; an explicit
    // --pp is refused here, before anything loads.
    if let Some(pp) = args.cuda_graph.then_some(args.pp).flatten().filter(|&pp| pp != 1) {
        return Err(EngineError::Config(format!(
            "--cuda-graph needs --pp 1, not {pp}: pipeline stages hand their activations on through the host, \
             which a CUDA graph cannot record"
        )));
    }
    if args.backend != Backend::Nccl {
        return Err(EngineError::Config(
            "--device cuda needs --backend nccl (the GPU engine's collectives are NCCL calls on its stream)".into(),
        ));
    }
    if args.int8 || args.int16 {
        return Err(EngineError::Config(
            "--int8/--int16 are CPU decode paths; --device cuda computes in bf16/f32 on the GPU".into(),
        ));
    }
    Ok(())
}

/// `--backend nccl` needs the `cuda` feature and a CUDA device; checked before any worker process starts.
fn check_nccl_build() -> Result<()> {
    #[cfg(not(feature = "cuda"))]
    {
        Err(no_cuda_feature())
    }
    #[cfg(feature = "cuda")]
    {
        if nccl::cuda_device_count() == 0 {
            return Err(launch::no_cuda_device());
        }
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn no_cuda_feature() -> EngineError {
    EngineError::Config(
        "--backend nccl is not in this build: rebuild with --features cuda (e.g. cargo run --release \
         --features cuda --example tp_llama -- --backend nccl); use --backend host without GPUs"
            .into(),
    )
}

fn nccl_log_line(layout: Layout, placement: &str, device: Device) -> String {
    let compute = match device {
        Device::Cpu => "compute stays on the CPU, each collective is staged host → GPU → NCCL → host",
        Device::Cuda => "compute on each rank's GPU (--device cuda), TP collectives by NCCL on device buffers",
    };
    format!(
        "backend nccl: tp {} × pp {} ranks as {placement}; {compute}",
        layout.tp, layout.pp
    )
}

#[cfg(feature = "cuda")]
fn nccl_process(layout: Layout) -> Result<RankComms> {
    launch::nccl_process(layout)
}

#[cfg(not(feature = "cuda"))]
fn nccl_process(_layout: Layout) -> Result<RankComms> {
    Err(no_cuda_feature())
}

#[cfg(feature = "cuda")]
fn nccl_threads(layout: Layout, device: Device) -> Result<(CommsOf, &'static str)> {
    if device == Device::Cuda {
        // The GPU engine puts each rank on its own GPU.
        crate::cuda_engine::device_for_rank(0, layout.world(), nccl::cuda_device_count())?;
    }
    let nt = launch::NcclThreads::new(layout)?;
    let devices: Vec<String> = (0..layout.world())
        .filter_map(|w| nt.device(w))
        .map(|d| d.to_string())
        .collect();
    say!(
        "{}",
        nccl_log_line(
            layout,
            &format!("threads on CUDA device(s) {}", devices.join(",")),
            device
        )
    );
    Ok((Box::new(move |w| nt.rank(w)), "nccl"))
}

#[cfg(not(feature = "cuda"))]
fn nccl_threads(_layout: Layout, _device: Device) -> Result<(CommsOf, &'static str)> {
    Err(no_cuda_feature())
}

fn prompt_ids(args: &Args, src: &dyn WeightSource, tok: Option<&tokenizers::Tokenizer>) -> Result<Vec<u32>> {
    if let Some(ids) = &args.prompt_ids {
        if args.chat {
            return Err(EngineError::Config(
                "--chat needs --prompt text, not --prompt-ids".into(),
            ));
        }
        return Ok(ids.clone());
    }
    let Some(tok) = tok else {
        if args.prompt.is_some() || args.chat {
            return Err(EngineError::Config(format!(
                "{} has no tokenizer: give the prompt as --prompt-ids 1,2,3",
                src.describe()
            )));
        }
        let bos = src.config().bos_token_id.unwrap_or(1);
        return Ok(vec![bos, 10, 20, 30, 40]);
    };
    let text = args
        .prompt
        .clone()
        .unwrap_or_else(|| "The capital of France is".to_string());
    let (text, add_special) = if args.chat {
        let template = src
            .chat_template()
            .ok_or_else(|| EngineError::Config(format!("--chat: {} has no chat template", src.describe())))?;
        let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
        let cfg = src.config();
        let msgs = [Message {
            role: "user".into(),
            content: text,
        }];
        (
            chat::render(
                &template,
                &msgs,
                &name(cfg.bos_token_id),
                &name(cfg.eos_token_ids.first().copied()),
            )?,
            false,
        )
    } else {
        (text, true)
    };
    let enc = tok
        .encode(text, add_special)
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    let ids = enc.get_ids().to_vec();
    if ids.is_empty() {
        return Err(EngineError::Config("the prompt tokenizes to no tokens".into()));
    }
    Ok(ids)
}

fn progress_bar(total_hint: usize) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total_hint as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("loading weights {bar:30} {pos}/{len} tensors groups {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb
}

fn run_rank(job: &Job, comms: RankComms, reporter: bool) -> Result<GenerateOutput> {
    let (stage, tp_rank) = job.layout.coords(comms.world_rank);
    let place = RankPlace {
        tp: job.layout.tp,
        tp_rank,
        pp: job.layout.pp,
        stage,
        threads: job.threads,
    };
    let pb = reporter.then(|| progress_bar(0));
    let t0 = Instant::now();
    let mut model = RankModel::load(&*job.src, place, &mut |done, total| {
        if let Some(pb) = &pb {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        }
    })?;
    let requested = decode_path(&job.args);
    let path = model.set_decode_path(requested);
    let cuda = job.args.device == Device::Cuda;
    if path != requested && reporter {
        say!(
            "note: --{} needs block-quantized weights (Q4_0/Q4_1/Q8_0 GGUF) and this model has none: decoding exact",
            if requested == DecodePath::Int8 { "int8" } else { "int16" }
        );
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
        say!(
            "{}: loaded in {:.2} s; tp {} × pp {}, {} thread(s) per rank, decode path {}",
            job.src.describe(),
            t0.elapsed().as_secs_f64(),
            job.layout.tp,
            job.layout.pp,
            job.threads,
            if cuda {
                "GPU (bf16 weights)".to_string()
            } else {
                path.describe()
            }
        );
    }
    if cuda {
        #[cfg(feature = "cuda")]
        return generate_on(job, launch::cuda_rank(model, comms, job.args.overlap_comm)?, reporter);
        #[cfg(not(feature = "cuda"))]
        return Err(no_cuda_feature());
    }
    generate_on(job, Rank::new(model, comms.tp, comms.pp)?, reporter)
}

/// Generates on a ready rank, streaming the reporter's tokens.
fn generate_on<B: crate::compute::Compute>(job: &Job, mut rank: Rank<B>, reporter: bool) -> Result<GenerateOutput> {
    rank.set_graph_decode(job.args.cuda_graph)?;
    // All ranks start generating together so the timings measure generation, not loading skew.
    rank.barrier()?;
    let stream = reporter && !job.args.json;
    let mut printed = String::new();
    let mut ids = Vec::new();
    let mut on_token = |t: u32| {
        if !stream {
            return;
        }
        ids.push(t);
        let mut out = std::io::stdout().lock();
        match &job.tokenizer {
            Some(tok) => {
                if let Ok(text) = tok.decode(&ids, true) {
                    if let Some(new) = text.strip_prefix(printed.as_str()) {
                        let _ = write!(out, "{new}");
                        printed = text;
                    }
                }
            }
            None => {
                let _ = write!(out, "{t} ");
            }
        }
        let _ = out.flush();
    };
    if stream {
        if let Some(tok) = &job.tokenizer {
            if let Ok(p) = tok.decode(&job.prompt, false) {
                print!("{p}");
            }
        }
    }
    let out = rank.generate(&job.prompt, &job.params, &mut on_token)?;
    if stream {
        println!();
    }
    Ok(out)
}

fn decode_path(args: &Args) -> DecodePath {
    DecodePath::from_flags(args.int8, args.int16)
}

fn report(job: &Job, out: &GenerateOutput, backend: &str) -> Result<()> {
    let prefill_tps = job.prompt.len() as f64 / out.prefill_secs.max(1e-12);
    let decode_steps = out.generated.len().saturating_sub(1);
    let decode_tps = if decode_steps > 0 {
        decode_steps as f64 / out.decode_secs.max(1e-12)
    } else {
        0.0
    };
    if let Some(path) = &job.args.logits_out {
        let logits = out
            .prompt_logits
            .as_ref()
            .ok_or_else(|| EngineError::Config("no logits were computed".into()))?;
        let text = serde_json::to_string(logits).map_err(|e| EngineError::Config(e.to_string()))?;
        std::fs::write(path, text).map_err(|source| EngineError::Io {
            path: path.clone(),
            source,
        })?;
    }
    let text = job.tokenizer.as_ref().and_then(|t| t.decode(&out.generated, true).ok());
    if job.args.json {
        let v = serde_json::json!({
            "model": job.src.describe(),
            "prompt_ids": job.prompt,
            "generated_ids": out.generated,
            "text": text,
            "tp": job.layout.tp,
            "pp": job.layout.pp,
            "backend": backend,
            "processes": job.args.nprocs.is_some(),
            "threads_per_rank": job.threads,
            "prefill_tokens_per_s": prefill_tps,
            "decode_tokens_per_s": decode_tps,
            "decode_path": out.decode_path.describe(),
        });
        println!("{v}");
    } else {
        say!(
            "[{} prompt tokens, {} generated; prefill {:.1} tok/s, decode {:.1} tok/s ({}); tp {} × pp {}, backend {backend}]",
            job.prompt.len(),
            out.generated.len(),
            prefill_tps,
            decode_tps,
            out.decode_path.describe(),
            job.layout.tp,
            job.layout.pp
        );
    }
    Ok(())
}
