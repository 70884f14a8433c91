//! Data-parallel replicas with continuous batching, and the router in front of them.
//!
//! A [`Pool`] holds `dp` replicas. Each replica is a `tp × pp` layout of ranks (host backend): threads of
//! this process ([`Pool::start`]), or processes ([`Pool::start_process`], one replica), driven by one leader
//! thread that owns the replica's schedule: a bounded FIFO of waiting requests, the running
//! batch, and a KV budget in positions. Every step the leader
//!
//! 1. admits waiting requests while the batch has room and their whole KV reservation (prompt + max
//!    tokens) fits the budget (a request never starts and then runs out of memory);
//! 2. drops sequences whose client went away (their receiver is closed) and frees their caches;
//! 3. runs one step, one pass over the weights ([`crate::engine::Rank::step`]): every sequence that has a
//!    token to feed decodes it, and the prompts still being prefilled, oldest first, add at most
//!    `prefill_chunk` prompt tokens in all, so a long prompt never stalls the running decodes for more than
//!    one chunk, and a burst of short prompts is prefilled together instead of one per step (as vLLM's
//!    chunked prefill with a token budget per step).
//!
//! The same step plan goes to every rank of the replica through the communicator, threads or processes alike
//! (see [`super::ranks`]); the last stage's first rank returns the logits to rank 0 and the leader samples (one seeded [`Sampler`] per sequence, called exactly as
//! [`crate::engine::Rank::generate`] calls it, so a sequence's tokens do not depend on its batch).
//!
//! A rank that panics or fails makes the step fail on the leader (a panic is caught on the rank thread and
//! reported; a rank that does not answer within `step_timeout` counts as failed). The replica then leaves
//! the rotation, its requests are retried on a healthy replica when that is invisible to the client (greedy
//! or seeded sampling is deterministic here, and the tokens already delivered are not sent again) or end
//! with a 503, and the replica is rebuilt from the weights and rejoins. With ranks as processes this
//! process started itself ([`Ranks::Children`], `serve --nprocs N`) the rebuild starts them again. Ranks
//! that an outside launcher started (torchrun, mpirun, srun: [`Ranks::Launched`]) cannot be started again
//! from here: the replica's requests end with a 503 and the pool is [`Pool::dead`], for the server to exit
//! (as vLLM's does when its engine dies) and be restarted by whatever supervises it (e.g. torchrun's
//! `--max-restarts`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::metrics::{Metrics, ReplicaGauges};
use super::ranks::{Plan, RankSet, HEARTBEAT};
use super::text::TextState;
use crate::error::{EngineError, Result};
use crate::launch::{ChildRanks, RankComms};
use crate::model::WeightSource;
use crate::sample::{Sampler, SamplingParams};
use crate::shard::Layout;

/// How the replicas are laid out and scheduled.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Each replica's TP × PP layout.
    pub layout: Layout,
    /// Number of data-parallel replicas.
    pub dp: usize,
    /// Compute threads per rank.
    pub threads: usize,
    /// How decode steps compute on block-quantized weights (`--int8`/`--int16`; exact f32 by default).
    pub decode_path: crate::math::DecodePath,
    /// Most sequences in one replica's running batch.
    pub max_batch: usize,
    /// Most requests waiting for admission, over all replicas (more get 429).
    pub max_queue: usize,
    /// KV cache budget per rank, in bytes.
    pub kv_budget_bytes: usize,
    /// Most prompt tokens prefilled in one step, over all the sequences that are prefilling.
    pub prefill_chunk: usize,
    /// A step that takes longer than this marks the replica failed.
    pub step_timeout: Duration,
    /// Test hook: make world rank `rank` of replica `replica` panic at its `step`-th step (once).
    pub fault: Option<Fault>,
    /// Throttle for tests: each replica sleeps this long after every step (zero: never).
    pub step_delay: Duration,
    /// How long a failed replica waits before its first rebuild attempt after a failed one; each further
    /// failure doubles the wait, up to [`rebuild_backoff_max`](Self::rebuild_backoff_max) (see
    /// [`rebuild_wait`]). A successful rebuild starts over.
    pub rebuild_backoff: Duration,
    /// The longest wait between two rebuild attempts.
    pub rebuild_backoff_max: Duration,
    /// Where the ranks compute and how they communicate (host collectives and CPU compute by default).
    pub engine: super::ranks::RankEngine,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            layout: Layout { tp: 1, pp: 1 },
            dp: 1,
            threads: 1,
            decode_path: crate::math::DecodePath::Exact,
            max_batch: 32,
            max_queue: 256,
            kv_budget_bytes: 256 << 20,
            prefill_chunk: 256,
            step_timeout: Duration::from_secs(30),
            fault: None,
            step_delay: Duration::ZERO,
            rebuild_backoff: Duration::from_secs(1),
            rebuild_backoff_max: Duration::from_secs(60),
            engine: super::ranks::RankEngine::default(),
        }
    }
}

/// The wait before the next rebuild attempt after `failures` consecutive failed ones (≥ 1): `first`, doubled
/// for each failure after the first, at most `max` (as a crash-looping container's back-off: a rank that
/// fails at every start, e.g. out of memory while loading, is not restarted in a tight loop).
pub fn rebuild_wait(failures: u64, first: Duration, max: Duration) -> Duration {
    let doublings = u32::try_from(failures.saturating_sub(1)).unwrap_or(u32::MAX).min(31);
    first.saturating_mul(1u32 << doublings).min(max)
}

/// An injected rank failure (for tests of the failover path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The replica.
    pub replica: usize,
    /// The world rank within it.
    pub rank: usize,
    /// The step (counted from 1 since the replica was built) at which it panics.
    pub step: u64,
}

/// What a sequence asks for.
#[derive(Clone, Debug)]
pub struct GenRequest {
    /// Prompt token ids (non-empty, in the vocabulary).
    pub prompt: Vec<u32>,
    /// Tokens to generate at most (≥ 1).
    pub max_tokens: usize,
    /// Sampling settings (temperature 0 = greedy).
    pub sampling: SamplingParams,
    /// Stop strings (the text ends before the first match).
    pub stop: Vec<String>,
    /// Do not stop at end-of-sequence tokens.
    pub ignore_eos: bool,
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` tokens were generated.
    Length,
}

impl Finish {
    /// The OpenAI `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a request's receiver gets, in order: tokens, then exactly one `Done` or `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// One generated token and the text that became final with it (possibly empty).
    Token {
        /// The token id.
        id: u32,
        /// New text.
        text: String,
    },
    /// The sequence ended.
    Done {
        /// Why.
        finish: Finish,
        /// Text held back until the end (a possible stop-string start), to append.
        text: String,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
    },
    /// The sequence could not be finished (its replica failed and it could not be retried).
    Failed {
        /// HTTP status to report (503).
        status: u16,
        /// What happened.
        message: String,
    },
}

/// Why a request was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reject {
    /// The waiting queue is full (429).
    QueueFull,
    /// No replica is in rotation, or the server is draining (503).
    Unavailable(String),
    /// The request can never be admitted (its KV reservation exceeds a replica's budget).
    TooLarge(String),
    /// The request is malformed (empty prompt, token out of the vocabulary, past the context).
    Invalid(String),
}

struct Job {
    req: GenRequest,
    events: UnboundedSender<Event>,
    arrived: Instant,
    /// Tokens already delivered to the client (a retried request does not send them again).
    delivered: usize,
    retries: usize,
}

struct Queue {
    waiting: VecDeque<Job>,
}

/// One replica as the router sees it.
pub struct Replica {
    index: usize,
    queue: Mutex<Queue>,
    wake: Condvar,
    healthy: AtomicBool,
    running: AtomicUsize,
    kv_used: AtomicUsize,
    restarts: AtomicU64,
    /// Rebuild attempts that failed since the replica last worked.
    rebuild_failures: AtomicU64,
    /// The last failed rebuild attempt's error and when the next attempt starts.
    rebuild_state: Mutex<Option<(String, Instant)>>,
}

impl Replica {
    fn load(&self) -> usize {
        self.running.load(Ordering::Relaxed) + self.queue.lock().unwrap_or_else(|e| e.into_inner()).waiting.len()
    }
}

/// Replicas, their router and the shared metrics.
pub struct Pool {
    cfg: PoolConfig,
    src: Arc<dyn WeightSource>,
    tokenizer: Option<Arc<tokenizers::Tokenizer>>,
    replicas: Vec<Arc<Replica>>,
    queued: AtomicUsize,
    draining: AtomicBool,
    stop: AtomicBool,
    /// KV positions per rank the budget allows (same for every replica).
    kv_positions: usize,
    /// The metrics (shared with the HTTP layer).
    pub metrics: Metrics,
    leaders: Mutex<Vec<JoinHandle<()>>>,
    /// Where the ranks run.
    ranks: Mutex<Ranks>,
    /// Ranks started by an outside launcher: set when the replica failed (they cannot be started again).
    dead: Mutex<Option<String>>,
}

/// Where a pool's ranks run.
#[derive(Debug)]
pub enum Ranks {
    /// Threads of this process (every replica).
    Threads,
    /// Processes started by an outside launcher (torchrun, mpirun, srun); this process is world rank 0 of
    /// the one replica. Its communicators can build the replica once: `None` after that.
    Launched(Option<RankComms>),
    /// Processes this one (world rank 0 of the one replica) starts, and starts again when the replica is
    /// rebuilt.
    Children(ChildRanks),
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

/// Bytes of KV cache the most loaded rank of `layout` holds per position.
fn kv_bytes_per_position(src: &dyn WeightSource, layout: Layout) -> usize {
    let cfg = src.config();
    let layers = cfg.num_hidden_layers.div_ceil(layout.pp);
    let kv = (0..layout.tp)
        .map(|t| {
            crate::shard::head_shard(cfg.num_attention_heads, cfg.num_key_value_heads, layout.tp, t)
                .kv_heads
                .len()
        })
        .max()
        .unwrap_or(0);
    2 * layers * kv * cfg.head_dim * std::mem::size_of::<f32>()
}

impl Pool {
    /// Loads every replica (blocking until all are ready) and starts their leaders. Ranks are threads of
    /// this process.
    pub fn start(src: Arc<dyn WeightSource>, cfg: PoolConfig) -> Result<Arc<Pool>> {
        Self::start_with(src, cfg, Ranks::Threads)
    }

    /// [`Pool::start`] with ranks as processes, this one world rank 0 of the one replica (`cfg.dp` must be
    /// 1); the other ranks are processes running [`super::ranks::serve_rank`]. Each step reaches them
    /// through the communicator, as it reaches rank threads. With [`Ranks::Children`] a replica whose rank
    /// fails is rebuilt by starting its processes again; with [`Ranks::Launched`] it cannot be: its requests
    /// end with a 503, and the pool reports itself dead ([`Pool::dead`]) for the server to exit.
    pub fn start_process(src: Arc<dyn WeightSource>, cfg: PoolConfig, ranks: Ranks) -> Result<Arc<Pool>> {
        if cfg.dp != 1 {
            return Err(EngineError::Config(format!(
                "--dp {}: ranks as processes serve one replica (--dp 1); start one server per replica",
                cfg.dp
            )));
        }
        match &ranks {
            Ranks::Threads => {
                return Err(EngineError::Config(
                    "Pool::start_process needs ranks as processes".into(),
                ))
            }
            Ranks::Launched(Some(c)) if c.world_rank != 0 => {
                return Err(EngineError::Config(format!(
                    "Pool::start_process runs on world rank 0, not {}",
                    c.world_rank
                )))
            }
            _ => {}
        }
        Self::start_with(src, cfg, ranks)
    }

    fn start_with(src: Arc<dyn WeightSource>, cfg: PoolConfig, ranks: Ranks) -> Result<Arc<Pool>> {
        crate::engine::check_layout(src.config(), cfg.layout.tp, cfg.layout.pp)?;
        if cfg.dp == 0 || cfg.max_batch == 0 || cfg.prefill_chunk == 0 || cfg.threads == 0 {
            return Err(EngineError::Config(
                "--dp, --max-batch, --prefill-chunk and --threads must be at least 1".into(),
            ));
        }
        if cfg.rebuild_backoff.is_zero() || cfg.rebuild_backoff_max < cfg.rebuild_backoff {
            return Err(EngineError::Config(format!(
                "--rebuild-backoff-secs ({:?}) must be positive and at most --rebuild-backoff-max-secs ({:?})",
                cfg.rebuild_backoff, cfg.rebuild_backoff_max
            )));
        }
        let per_pos = kv_bytes_per_position(&*src, cfg.layout).max(1);
        let kv_positions = cfg.kv_budget_bytes / per_pos;
        if kv_positions < 2 {
            return Err(EngineError::Config(format!(
                "--kv-budget-mb: {} bytes hold {kv_positions} KV positions ({per_pos} bytes each per rank); \
                 at least 2 are needed",
                cfg.kv_budget_bytes
            )));
        }
        let tokenizer = src.tokenizer()?.map(Arc::new);
        let replicas: Vec<Arc<Replica>> = (0..cfg.dp)
            .map(|index| {
                Arc::new(Replica {
                    index,
                    queue: Mutex::new(Queue {
                        waiting: VecDeque::new(),
                    }),
                    wake: Condvar::new(),
                    healthy: AtomicBool::new(false),
                    running: AtomicUsize::new(0),
                    kv_used: AtomicUsize::new(0),
                    restarts: AtomicU64::new(0),
                    rebuild_failures: AtomicU64::new(0),
                    rebuild_state: Mutex::new(None),
                })
            })
            .collect();
        let pool = Arc::new(Pool {
            cfg,
            src,
            tokenizer,
            replicas,
            queued: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            kv_positions,
            metrics: Metrics::default(),
            leaders: Mutex::new(Vec::new()),
            ranks: Mutex::new(ranks),
            dead: Mutex::new(None),
        });
        // Build every replica before serving: a broken model or layout fails here, not on the first request.
        let mut built = Vec::new();
        for r in &pool.replicas {
            built.push(pool.build_ranks(r.index)?);
        }
        let mut leaders = Vec::new();
        for (r, ranks) in pool.replicas.iter().zip(built) {
            r.healthy.store(true, Ordering::SeqCst);
            let (p, r) = (pool.clone(), r.clone());
            leaders.push(
                std::thread::Builder::new()
                    .name(format!("replica{}", r.index))
                    .spawn(move || leader(p, r, ranks))
                    .map_err(|e| EngineError::Config(format!("spawning a replica thread: {e}")))?,
            );
        }
        *pool.leaders.lock().unwrap_or_else(|e| e.into_inner()) = leaders;
        Ok(pool)
    }

    /// Builds replica `index`'s ranks: threads; or (ranks as processes) from this process's rank 0
    /// communicators, which an outside launch gives once and child ranks give every time they start.
    fn build_ranks(&self, index: usize) -> Result<RankSet> {
        let comms = match &mut *self.ranks.lock().unwrap_or_else(|e| e.into_inner()) {
            Ranks::Threads => None,
            Ranks::Launched(c) => Some(c.take().ok_or_else(|| {
                EngineError::Config("rank processes started by a launcher cannot be started again from here".into())
            })?),
            Ranks::Children(c) => Some(c.start_unless(&|| self.stop.load(Ordering::SeqCst))?),
        };
        let cfg = &self.cfg;
        let built = RankSet::build(
            &self.src,
            cfg.layout,
            cfg.threads,
            cfg.decode_path,
            cfg.engine,
            index,
            comms,
        );
        built.map_err(|e| {
            // A child rank that failed while loading (e.g. its model file is gone) shows up here only as a
            // peer that left: name the process and its exit code, which its own stderr explains.
            let exited = match &mut *self.ranks.lock().unwrap_or_else(|e| e.into_inner()) {
                Ranks::Children(c) => c.exited_within(Duration::from_secs(2)),
                _ => None,
            };
            match exited {
                Some(x) => EngineError::Config(format!("{x} while the replica was being built ({e})")),
                None => e,
            }
        })
    }

    /// True when the ranks are processes ([`Pool::start_process`]).
    pub fn is_process(&self) -> bool {
        !matches!(*self.ranks.lock().unwrap_or_else(|e| e.into_inner()), Ranks::Threads)
    }

    /// True when a failed replica can be built again (ranks as threads, or child processes).
    fn can_rebuild(&self) -> bool {
        !matches!(
            *self.ranks.lock().unwrap_or_else(|e| e.into_inner()),
            Ranks::Launched(_)
        )
    }

    /// Why the pool is dead (ranks as processes, one of which failed), if it is: it serves nothing more.
    pub fn dead(&self) -> Option<String> {
        self.dead.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The model's tokenizer, if it has one.
    pub fn tokenizer(&self) -> Option<&Arc<tokenizers::Tokenizer>> {
        self.tokenizer.as_ref()
    }

    /// The weights.
    pub fn source(&self) -> &Arc<dyn WeightSource> {
        &self.src
    }

    /// The configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// KV positions one sequence may reserve at most (the per-rank budget).
    pub fn kv_positions(&self) -> usize {
        self.kv_positions
    }

    /// Per replica: healthy, queued, running, KV used, restarts, failed rebuild attempts.
    pub fn gauges(&self) -> Vec<ReplicaGauges> {
        self.replicas
            .iter()
            .map(|r| {
                let rebuild = r.rebuild_state.lock().unwrap_or_else(|e| e.into_inner()).clone();
                ReplicaGauges {
                    index: r.index,
                    healthy: r.healthy.load(Ordering::SeqCst),
                    queued: r.queue.lock().unwrap_or_else(|e| e.into_inner()).waiting.len(),
                    running: r.running.load(Ordering::Relaxed),
                    kv_used: r.kv_used.load(Ordering::Relaxed),
                    restarts: r.restarts.load(Ordering::Relaxed),
                    rebuild_failures: r.rebuild_failures.load(Ordering::Relaxed),
                    last_rebuild_error: rebuild.as_ref().map(|(e, _)| e.clone()),
                    next_rebuild_in: rebuild.map(|(_, at)| at.saturating_duration_since(Instant::now())),
                }
            })
            .collect()
    }

    /// Refuses new requests from now on (503); running and queued ones finish.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// True once [`Pool::drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Requests admitted or waiting, over all replicas.
    pub fn in_flight(&self) -> usize {
        self.replicas.iter().map(|r| r.load()).sum()
    }

    /// Refuses new requests, lets every replica finish its running and queued requests, stops them and joins
    /// their leaders.
    pub fn shutdown(&self) {
        self.drain();
        self.stop.store(true, Ordering::SeqCst);
        for r in &self.replicas {
            r.wake.notify_all();
        }
        let leaders = std::mem::take(&mut *self.leaders.lock().unwrap_or_else(|e| e.into_inner()));
        for l in leaders {
            let _ = l.join();
        }
        // The leaders sent their ranks a stop plan; child rank processes exit on it.
        if let Ranks::Children(c) = &mut *self.ranks.lock().unwrap_or_else(|e| e.into_inner()) {
            c.finish(Duration::from_secs(10));
        }
    }

    /// Sends a request to the least-loaded healthy replica; its events arrive on `events`.
    pub fn submit(&self, req: GenRequest, events: UnboundedSender<Event>) -> std::result::Result<(), Reject> {
        if let Some(why) = self.dead() {
            return Err(Reject::Unavailable(format!(
                "the engine is dead ({why}); the server is exiting"
            )));
        }
        if self.is_draining() {
            return Err(Reject::Unavailable("the server is shutting down".into()));
        }
        self.check_fits(&req)?;
        if self.queued.load(Ordering::SeqCst) >= self.cfg.max_queue {
            return Err(Reject::QueueFull);
        }
        let job = Job {
            req,
            events,
            arrived: Instant::now(),
            delivered: 0,
            retries: 0,
        };
        self.enqueue(job).map_err(|b| b.1)
    }

    /// [`Pool::submit`] that waits (bounded by `timeout`) for room in the queue instead of refusing.
    pub fn submit_wait(
        &self,
        req: GenRequest,
        events: UnboundedSender<Event>,
        timeout: Duration,
    ) -> std::result::Result<(), Reject> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.submit(req.clone(), events.clone()) {
                Err(Reject::QueueFull) | Err(Reject::Unavailable(_))
                    if Instant::now() < deadline && !self.is_draining() =>
                {
                    std::thread::sleep(Duration::from_millis(5))
                }
                other => return other,
            }
        }
    }

    fn check_fits(&self, req: &GenRequest) -> std::result::Result<(), Reject> {
        let cfg = self.src.config();
        if req.prompt.is_empty() {
            return Err(Reject::Invalid("the prompt is empty".into()));
        }
        if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(Reject::Invalid(format!(
                "token id {t} is out of range for a vocabulary of {}",
                cfg.vocab_size
            )));
        }
        req.sampling.validate().map_err(|e| Reject::Invalid(e.to_string()))?;
        if req.max_tokens == 0 {
            return Err(Reject::Invalid("max_tokens must be at least 1".into()));
        }
        let need = req.prompt.len() + req.max_tokens;
        if need > cfg.max_position_embeddings {
            return Err(Reject::Invalid(format!(
                "this model's maximum context length is {} tokens; the prompt ({} tokens) + max_tokens ({}) \
                 is {need}",
                cfg.max_position_embeddings,
                req.prompt.len(),
                req.max_tokens
            )));
        }
        if need > self.kv_positions {
            return Err(Reject::TooLarge(format!(
                "prompt ({} tokens) + max_tokens ({}) needs {need} KV cache positions; this server's budget is \
                 {} per sequence",
                req.prompt.len(),
                req.max_tokens,
                self.kv_positions
            )));
        }
        Ok(())
    }

    fn enqueue(&self, job: Job) -> std::result::Result<(), Box<(Job, Reject)>> {
        let best = self
            .replicas
            .iter()
            .filter(|r| r.healthy.load(Ordering::SeqCst))
            .min_by_key(|r| (r.load(), r.index));
        let Some(r) = best else {
            return Err(Box::new((
                job,
                Reject::Unavailable("no replica is available (all are being rebuilt)".into()),
            )));
        };
        self.queued.fetch_add(1, Ordering::SeqCst);
        r.queue.lock().unwrap_or_else(|e| e.into_inner()).waiting.push_back(job);
        r.wake.notify_all();
        Ok(())
    }
}

static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

/// A sequence in a replica's running batch.
struct Seq {
    id: u64,
    job: Job,
    sampler: Sampler,
    text: TextState,
    prefilled: usize,
    generated: Vec<u32>,
    last_token_at: Option<Instant>,
    finished: bool,
    allocated: bool,
}

impl Seq {
    fn positions(&self) -> usize {
        self.job.req.prompt.len() + self.job.req.max_tokens
    }
}

/// Applies one sampled token: sends it, decides whether the sequence ends.
fn accept_token(pool: &Pool, s: &mut Seq, logits: &[f32]) {
    let t = s.sampler.sample(logits);
    s.generated.push(t);
    let now = Instant::now();
    let index = s.generated.len();
    // Timing only for tokens the client sees for the first time.
    if index > s.job.delivered {
        match s.last_token_at {
            None => pool
                .metrics
                .ttft
                .observe(now.duration_since(s.job.arrived).as_secs_f64()),
            Some(prev) => pool.metrics.itl.observe(now.duration_since(prev).as_secs_f64()),
        }
        s.last_token_at = Some(now);
        Metrics::add(&pool.metrics.generated_tokens, 1);
    }
    let delta = s.text.push(t);
    let cfg = pool.src.config();
    let eos = !s.job.req.ignore_eos && cfg.eos_token_ids.contains(&t);
    let finish = if delta.stopped || eos {
        Some(Finish::Stop)
    } else if s.generated.len() >= s.job.req.max_tokens {
        Some(Finish::Length)
    } else {
        None
    };
    if index > s.job.delivered {
        let _ = s.job.events.send(Event::Token {
            id: t,
            text: delta.text,
        });
        s.job.delivered = index;
    }
    if let Some(finish) = finish {
        let rest = if delta.stopped { String::new() } else { s.text.flush() };
        let _ = s.job.events.send(Event::Done {
            finish,
            text: rest,
            prompt_tokens: s.job.req.prompt.len(),
            completion_tokens: s.generated.len(),
        });
        Metrics::add(&pool.metrics.requests_ok, 1);
        s.finished = true;
    }
}

/// The leader of one replica: schedules, steps, and on failure fails over and rebuilds.
fn leader(pool: Arc<Pool>, me: Arc<Replica>, mut ranks: RankSet) {
    let mut running: Vec<Seq> = Vec::new();
    let mut to_free: Vec<u64> = Vec::new();
    let mut kv_used = 0usize;
    let mut fault = pool.cfg.fault.filter(|f| f.replica == me.index);
    loop {
        // 1. Admission.
        let mut alloc = Vec::new();
        {
            let mut q = me.queue.lock().unwrap_or_else(|e| e.into_inner());
            while running.len() < pool.cfg.max_batch {
                let Some(front) = q.waiting.front() else { break };
                let need = front.req.prompt.len() + front.req.max_tokens;
                if kv_used + need > pool.kv_positions {
                    break;
                }
                let job = q.waiting.pop_front().expect("front exists");
                pool.queued.fetch_sub(1, Ordering::SeqCst);
                if job.events.is_closed() {
                    Metrics::add(&pool.metrics.requests_cancelled, 1);
                    continue;
                }
                kv_used += need;
                if job.retries == 0 {
                    Metrics::add(&pool.metrics.prompt_tokens, job.req.prompt.len() as u64);
                }
                let id = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
                running.push(Seq {
                    id,
                    sampler: Sampler::new(job.req.sampling.clone()),
                    text: TextState::new(pool.tokenizer.clone(), job.req.stop.clone()),
                    job,
                    prefilled: 0,
                    generated: Vec::new(),
                    last_token_at: None,
                    finished: false,
                    allocated: false,
                });
            }
            if running.is_empty() && to_free.is_empty() {
                me.running.store(0, Ordering::Relaxed);
                me.kv_used.store(kv_used, Ordering::Relaxed);
                if pool.stop.load(Ordering::SeqCst) && q.waiting.is_empty() {
                    ranks.stop();
                    return;
                }
                if ranks.last_run.elapsed() < HEARTBEAT {
                    let _ = me.wake.wait_timeout(q, Duration::from_millis(50));
                    continue;
                }
            }
        }
        if running.is_empty() && to_free.is_empty() {
            // Idle for a while: an empty plan checks that every rank is still there.
            if let Err(e) = ranks.run(Plan::default(), pool.cfg.step_timeout) {
                match recover(&pool, &me, &mut running, &e) {
                    Some(r) => ranks = r,
                    None => return,
                }
                kv_used = 0;
                to_free.clear();
            }
            continue;
        }
        // 2. Cancellation: a closed receiver means the client went away.
        for s in running.iter_mut() {
            if !s.finished && s.job.events.is_closed() {
                s.finished = true;
                Metrics::add(&pool.metrics.requests_cancelled, 1);
            }
        }
        for s in running.iter().filter(|s| s.finished) {
            kv_used -= s.positions();
            if s.allocated {
                to_free.push(s.id);
            }
        }
        running.retain(|s| !s.finished);
        for s in running.iter_mut().filter(|s| !s.allocated) {
            alloc.push((s.id, s.positions()));
            s.allocated = true;
        }
        me.running.store(running.len(), Ordering::Relaxed);
        me.kv_used.store(kv_used, Ordering::Relaxed);

        // 3. One step, one pass over the weights: every sequence with a token to feed decodes it, and the
        //    prompts of the sequences still prefilling (in admission order) fill up to `prefill_chunk`
        //    prompt tokens after them (decodes first: see `RankModel::forward_batch`).
        let mut result = Ok(());
        let free = std::mem::take(&mut to_free);
        let alloc_now = std::mem::take(&mut alloc);
        let mut segs: Vec<(u64, Vec<u32>)> = Vec::new();
        // Per segment: the sequence's index in `running`, and where its prompt is prefilled to after this
        // step (`None`: a decode). `running` holds no finished sequence here (retained out above).
        let mut fed: Vec<(usize, Option<usize>)> = Vec::new();
        for (i, s) in running.iter().enumerate() {
            if s.prefilled == s.job.req.prompt.len() {
                if let Some(&t) = s.generated.last() {
                    segs.push((s.id, vec![t]));
                    fed.push((i, None));
                }
            }
        }
        let decodes = segs.len();
        let mut budget = pool.cfg.prefill_chunk;
        for (i, s) in running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            let len = s.job.req.prompt.len();
            if s.prefilled < len {
                let end = (s.prefilled + budget).min(len);
                budget -= end - s.prefilled;
                segs.push((s.id, s.job.req.prompt[s.prefilled..end].to_vec()));
                fed.push((i, Some(end)));
            }
        }
        if !segs.is_empty() || !free.is_empty() || !alloc_now.is_empty() {
            if decodes > 0 {
                pool.metrics.batch_size.observe(decodes as f64);
            }
            let panic_rank = match fault {
                Some(f) if ranks.steps + 1 >= f.step => {
                    fault = None;
                    Some(f.rank)
                }
                _ => None,
            };
            let plan = Plan {
                alloc: alloc_now,
                free,
                segs,
                panic_rank,
                stop: false,
            };
            match ranks.run(plan, pool.cfg.step_timeout) {
                Ok(logits) => {
                    for (&(i, prefill_end), l) in fed.iter().zip(&logits) {
                        let s = &mut running[i];
                        match prefill_end {
                            None => accept_token(&pool, s, l),
                            Some(end) => {
                                s.prefilled = end;
                                if end == s.job.req.prompt.len() {
                                    accept_token(&pool, s, l);
                                }
                            }
                        }
                    }
                }
                Err(e) => result = Err(e),
            }
        }
        if !pool.cfg.step_delay.is_zero() {
            std::thread::sleep(pool.cfg.step_delay);
        }
        if let Err(e) = result {
            match recover(&pool, &me, &mut running, &e) {
                Some(r) => ranks = r,
                None => return,
            }
            kv_used = 0;
            to_free.clear();
        }
    }
}

/// After a failed step: fails over the replica's requests, then rebuilds it (ranks as threads or child
/// processes) or, with ranks an outside launcher started (which this process cannot start again), marks
/// the pool dead. `None`: the leader stops.
fn recover(pool: &Arc<Pool>, me: &Replica, running: &mut Vec<Seq>, why: &str) -> Option<RankSet> {
    let rebuildable = pool.can_rebuild();
    if !rebuildable {
        *pool.dead.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("replica {} failed: {why}", me.index));
    }
    fail_over(pool, me, running, why);
    if !rebuildable {
        say!(
            "error: replica {} failed: {why}; its ranks are processes started by a launcher, which this server \
             cannot start again: it stops serving (restart it)",
            me.index
        );
        return None;
    }
    say!("replica {} failed: {why}; rebuilding it", me.index);
    let r = rebuild(pool, me);
    if r.is_none() {
        return None;
    }
    Some(r)
}

/// Takes the replica out of rotation and moves or ends its requests.
fn fail_over(pool: &Pool, me: &Replica, running: &mut Vec<Seq>, why: &str) {
    me.healthy.store(false, Ordering::SeqCst);
    Metrics::add(&pool.metrics.replica_failures, 1);
    tracing::warn!("replica {} failed: {why}", me.index);
    let waiting: Vec<Job> = {
        let mut q = me.queue.lock().unwrap_or_else(|e| e.into_inner());
        let w: Vec<Job> = q.waiting.drain(..).collect();
        pool.queued.fetch_sub(w.len(), Ordering::SeqCst);
        w
    };
    let jobs = running.drain(..).filter(|s| !s.finished).map(|s| s.job).chain(waiting);
    for mut job in jobs {
        // Sampling here is deterministic (greedy, or seeded and batch-independent), so a retry repeats the
        // tokens already delivered exactly and they are not sent again.
        job.retries += 1;
        let retry = job.retries <= 2 && !job.events.is_closed();
        if retry {
            Metrics::add(&pool.metrics.requests_retried, 1);
            match pool.enqueue(job) {
                Ok(()) => continue,
                Err(b) => job = b.0,
            }
        }
        Metrics::add(&pool.metrics.requests_failed, 1);
        let _ = job.events.send(Event::Failed {
            status: 503,
            message: format!(
                "replica {} failed ({why}) and no other replica could take the request",
                me.index
            ),
        });
    }
    me.running.store(0, Ordering::Relaxed);
    me.kv_used.store(0, Ordering::Relaxed);
}

/// Rebuilds the replica's ranks, retrying with back-off ([`rebuild_wait`]) until it works or the pool stops.
fn rebuild(pool: &Arc<Pool>, me: &Replica) -> RankSet {
    loop {
        if pool.stop.load(Ordering::SeqCst) {
            return RankSet::none();
        }
        match pool.build_ranks(me.index) {
            Ok(r) => {
                me.restarts.fetch_add(1, Ordering::Relaxed);
                me.rebuild_failures.store(0, Ordering::Relaxed);
                *me.rebuild_state.lock().unwrap_or_else(|e| e.into_inner()) = None;
                me.healthy.store(true, Ordering::SeqCst);
                say!("replica {} rebuilt and back in rotation", me.index);
                return r;
            }
            Err(e) => {
                let failures = me.rebuild_failures.fetch_add(1, Ordering::Relaxed) + 1;
                Metrics::add(&pool.metrics.rebuild_failures, 1);
                let wait = rebuild_wait(failures, pool.cfg.rebuild_backoff, pool.cfg.rebuild_backoff_max);
                let until = Instant::now() + wait;
                *me.rebuild_state.lock().unwrap_or_else(|e| e.into_inner()) = Some((e.to_string(), until));
                say!(
                    "replica {}: rebuilding failed (attempt {failures}): {e}; retrying in {:.3} s",
                    me.index,
                    wait.as_secs_f64()
                );
                // Short naps, so that a shutdown is not held up by a long back-off.
                while !pool.stop.load(Ordering::SeqCst) {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    std::thread::sleep(left.min(Duration::from_millis(50)));
                }
            }
        }
    }
}

/// One prompt's result in [`generate_distributed`].
#[derive(Clone, Debug, PartialEq)]
pub struct GenOutput {
    /// Generated token ids.
    pub token_ids: Vec<u32>,
    /// Their text (ids as ` 12 34` for a model without a tokenizer), stop strings cut.
    pub text: String,
    /// Why it ended.
    pub finish: Finish,
}

/// Runs every prompt on the pool's replicas (sharded by the router: each goes to the least-loaded replica,
/// so they run concurrently, batched within each replica) and returns the results in input order. Blocks;
/// each prompt is bounded by `timeout`.
pub fn generate_distributed(
    pool: &Pool,
    prompts: Vec<GenRequest>,
    timeout: Duration,
) -> Vec<std::result::Result<GenOutput, String>> {
    let mut rxs = Vec::with_capacity(prompts.len());
    let deadline = Instant::now() + timeout;
    for p in prompts {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let r = pool.submit_wait(p, tx, timeout);
        rxs.push(r.map(|_| rx));
    }
    rxs.into_iter()
        .map(|r| {
            let mut rx = r.map_err(|e| format!("{e:?}"))?;
            let mut out = GenOutput {
                token_ids: Vec::new(),
                text: String::new(),
                finish: Finish::Length,
            };
            loop {
                let ev = loop {
                    match rx.try_recv() {
                        Ok(ev) => break Some(ev),
                        Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                            if Instant::now() > deadline {
                                return Err("timed out".to_string());
                            }
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(_) => break None,
                    }
                };
                match ev {
                    Some(Event::Token { id, text }) => {
                        out.token_ids.push(id);
                        out.text += &text;
                    }
                    Some(Event::Done { finish, text, .. }) => {
                        out.text += &text;
                        out.finish = finish;
                        return Ok(out);
                    }
                    Some(Event::Failed { message, .. }) => return Err(message),
                    None => return Err("the replica went away".into()),
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::rebuild_wait;
    use std::time::Duration;

    #[test]
    fn rebuild_waits_double_from_the_first_up_to_the_cap() {
        let (first, max) = (Duration::from_millis(250), Duration::from_secs(2));
        let waits: Vec<u128> = (1..=7).map(|n| rebuild_wait(n, first, max).as_millis()).collect();
        assert_eq!(waits, [250, 500, 1000, 2000, 2000, 2000, 2000]);
        // No overflow however long a replica keeps failing.
        assert_eq!(rebuild_wait(u64::MAX, first, max), max);
        assert_eq!(
            rebuild_wait(40, Duration::from_secs(1), Duration::from_secs(60)),
            Duration::from_secs(60)
        );
        assert_eq!(
            rebuild_wait(1, Duration::from_secs(1), Duration::from_secs(1)),
            Duration::from_secs(1)
        );
    }
}
