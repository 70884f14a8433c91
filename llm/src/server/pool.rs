//! Data-parallel replicas with continuous batching, and the router in front of them.
//!
//! A [`Pool`] holds `dp` replicas. Each replica is a `tp × pp` layout of rank threads (host backend) driven
//! by one leader thread that owns the replica's schedule: a bounded FIFO of waiting requests, the running
//! batch, and a KV budget in positions. Every step the leader
//!
//! 1. admits waiting requests while the batch has room and their whole KV reservation (prompt + max
//!    tokens) fits the budget (a request never starts and then runs out of memory);
//! 2. drops sequences whose client went away (their receiver is closed) and frees their caches;
//! 3. runs at most one prefill chunk of one sequence (`prefill_chunk` tokens), so a long prompt never stalls
//!    the running decodes for more than one chunk;
//! 4. runs one decode step for every sequence that has a token to feed: one pass over the weights for all
//!    of them ([`crate::engine::Rank::step`]).
//!
//! The same step plan goes to every rank of the replica; the last stage's first rank returns the logits and
//! the leader samples (one seeded [`Sampler`] per sequence, called exactly as
//! [`crate::engine::Rank::generate`] calls it, so a sequence's tokens do not depend on its batch).
//!
//! A rank that panics or fails makes the step fail on the leader (a panic is caught on the rank thread and
//! reported; a rank that does not answer within `step_timeout` counts as failed). The replica then leaves
//! the rotation, its requests are retried on a healthy replica when that is invisible to the client (greedy
//! or seeded sampling is deterministic here, and the tokens already delivered are not sent again) or end
//! with a 503, and the replica is rebuilt from the weights and rejoins.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::metrics::{Metrics, ReplicaGauges};
use super::text::TextState;
use crate::engine::{KvCache, Rank, RankModel, RankPlace};
use crate::error::{EngineError, Result};
use crate::launch;
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
    /// Most sequences in one replica's running batch.
    pub max_batch: usize,
    /// Most requests waiting for admission, over all replicas (more get 429).
    pub max_queue: usize,
    /// KV cache budget per rank, in bytes.
    pub kv_budget_bytes: usize,
    /// Most prompt tokens prefilled in one step.
    pub prefill_chunk: usize,
    /// A step that takes longer than this marks the replica failed.
    pub step_timeout: Duration,
    /// Test hook: make world rank `rank` of replica `replica` panic at its `step`-th step (once).
    pub fault: Option<Fault>,
    /// Throttle for tests: each replica sleeps this long after every step (zero: never).
    pub step_delay: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            layout: Layout { tp: 1, pp: 1 },
            dp: 1,
            threads: 1,
            max_batch: 32,
            max_queue: 256,
            kv_budget_bytes: 256 << 20,
            prefill_chunk: 256,
            step_timeout: Duration::from_secs(30),
            fault: None,
            step_delay: Duration::ZERO,
        }
    }
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
    /// Loads every replica (blocking until all are ready) and starts their leaders.
    pub fn start(src: Arc<dyn WeightSource>, cfg: PoolConfig) -> Result<Arc<Pool>> {
        crate::engine::check_layout(src.config(), cfg.layout.tp, cfg.layout.pp)?;
        if cfg.dp == 0 || cfg.max_batch == 0 || cfg.prefill_chunk == 0 || cfg.threads == 0 {
            return Err(EngineError::Config(
                "--dp, --max-batch, --prefill-chunk and --threads must be at least 1".into(),
            ));
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
        });
        // Build every replica before serving: a broken model or layout fails here, not on the first request.
        let mut built = Vec::new();
        for r in &pool.replicas {
            built.push(RankSet::build(&pool, r.index)?);
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

    /// Per replica: healthy, queued, running, KV used, restarts.
    pub fn gauges(&self) -> Vec<ReplicaGauges> {
        self.replicas
            .iter()
            .map(|r| ReplicaGauges {
                index: r.index,
                healthy: r.healthy.load(Ordering::SeqCst),
                queued: r.queue.lock().unwrap_or_else(|e| e.into_inner()).waiting.len(),
                running: r.running.load(Ordering::Relaxed),
                kv_used: r.kv_used.load(Ordering::Relaxed),
                restarts: r.restarts.load(Ordering::Relaxed),
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
    }

    /// Sends a request to the least-loaded healthy replica; its events arrive on `events`.
    pub fn submit(&self, req: GenRequest, events: UnboundedSender<Event>) -> std::result::Result<(), Reject> {
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

/// The step plan every rank of a replica runs.
struct Plan {
    /// New caches: (sequence id, positions).
    alloc: Vec<(u64, usize)>,
    /// Caches to drop.
    free: Vec<u64>,
    /// Segments: (sequence id, tokens to feed).
    segs: Vec<(u64, Vec<u32>)>,
    /// Test hook: this world rank panics.
    panic_rank: Option<usize>,
}

/// A rank's answer to a plan: its logits (the reporter), or its error and whether it only reports a failed
/// peer.
type Reply = (usize, std::result::Result<Option<Vec<Vec<f32>>>, (bool, String)>);

/// The rank threads of one replica.
struct RankSet {
    cmds: Vec<mpsc::Sender<Arc<Plan>>>,
    replies: mpsc::Receiver<Reply>,
    reporter: usize,
    steps: u64,
}

impl RankSet {
    /// Loads the replica's shards on fresh rank threads with fresh communicators.
    fn build(pool: &Arc<Pool>, replica: usize) -> Result<RankSet> {
        let layout = pool.cfg.layout;
        let comms = launch::host_threads(layout)?;
        let (reply_tx, replies) = mpsc::channel::<Reply>();
        let (ready_tx, ready_rx) = mpsc::channel::<(usize, Result<()>)>();
        let mut cmds = Vec::new();
        for c in comms {
            let (tx, rx) = mpsc::channel::<Arc<Plan>>();
            cmds.push(tx);
            let (src, reply_tx, ready_tx) = (pool.src.clone(), reply_tx.clone(), ready_tx.clone());
            let threads = pool.cfg.threads;
            let w = c.world_rank;
            std::thread::Builder::new()
                .name(format!("replica{replica}-rank{w}"))
                .spawn(move || {
                    let (stage, tp_rank) = layout.coords(w);
                    let place = RankPlace {
                        tp: layout.tp,
                        tp_rank,
                        pp: layout.pp,
                        stage,
                        threads,
                    };
                    let rank = RankModel::load(&*src, place, &mut |_, _| {}).and_then(|m| Rank::new(m, c.tp, c.pp));
                    let rank = match rank {
                        Ok(r) => {
                            let _ = ready_tx.send((w, Ok(())));
                            r
                        }
                        Err(e) => {
                            let _ = ready_tx.send((w, Err(e)));
                            return;
                        }
                    };
                    drop(ready_tx);
                    rank_main(rank, w, rx, reply_tx)
                })
                .map_err(|e| EngineError::Config(format!("spawning a rank thread: {e}")))?;
        }
        drop(ready_tx);
        for _ in 0..layout.world() {
            match ready_rx.recv_timeout(Duration::from_secs(600)) {
                Ok((_, Ok(()))) => {}
                Ok((w, Err(e))) => {
                    return Err(EngineError::Rank {
                        rank: w,
                        source: Box::new(e),
                    })
                }
                Err(_) => return Err(EngineError::Config(format!("replica {replica}: a rank did not load"))),
            }
        }
        Ok(RankSet {
            cmds,
            replies,
            reporter: (layout.pp - 1) * layout.tp,
            steps: 0,
        })
    }

    /// Runs one plan on every rank; the reporter's logits, or what failed.
    fn run(&mut self, plan: Plan, timeout: Duration) -> std::result::Result<Vec<Vec<f32>>, String> {
        self.steps += 1;
        let plan = Arc::new(plan);
        for (w, c) in self.cmds.iter().enumerate() {
            c.send(plan.clone()).map_err(|_| format!("rank {w} has exited"))?;
        }
        let deadline = Instant::now() + timeout;
        let mut logits = None;
        let mut first_err: Option<String> = None;
        for _ in 0..self.cmds.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(left) {
                Ok((w, Ok(l))) => {
                    if w == self.reporter {
                        logits = l;
                    }
                }
                Ok((w, Err((peer, e)))) => {
                    // The rank that failed first names the cause; the others report its absence.
                    if first_err.is_none() || !peer {
                        first_err = Some(format!("rank {w}: {e}"));
                    }
                    if !peer {
                        break;
                    }
                }
                Err(_) => {
                    return Err(first_err.unwrap_or_else(|| {
                        format!("a rank did not finish its step within {:.1} s", timeout.as_secs_f64())
                    }))
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if plan.segs.is_empty() {
            return Ok(Vec::new());
        }
        logits.ok_or_else(|| "the last stage returned no logits".to_string())
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// A rank thread: runs plans until its channel closes or a step fails (then it exits, dropping its
/// communicators, which makes its peers fail instead of waiting).
fn rank_main(rank: Rank, w: usize, cmds: mpsc::Receiver<Arc<Plan>>, replies: mpsc::Sender<Reply>) {
    let mut caches: HashMap<u64, KvCache> = HashMap::new();
    while let Ok(plan) = cmds.recv() {
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| -> std::result::Result<_, (bool, String)> {
            if plan.panic_rank == Some(w) {
                panic!("injected fault: rank {w} panics");
            }
            for id in &plan.free {
                caches.remove(id);
            }
            for &(id, cap) in &plan.alloc {
                caches.insert(id, rank.model().new_cache(cap));
            }
            if plan.segs.is_empty() {
                return Ok(None);
            }
            let mut taken: Vec<(u64, KvCache)> = Vec::with_capacity(plan.segs.len());
            for (id, _) in &plan.segs {
                let c = caches
                    .remove(id)
                    .ok_or_else(|| (false, format!("no cache for sequence {id}")))?;
                taken.push((*id, c));
            }
            let out = {
                let mut segs: Vec<(&[u32], &mut KvCache)> = plan
                    .segs
                    .iter()
                    .zip(taken.iter_mut())
                    .map(|((_, t), (_, c))| (t.as_slice(), c))
                    .collect();
                rank.step(&mut segs).map_err(|e| {
                    let peer = matches!(e, EngineError::Comm(nccl::Error::PeerFailed { .. }));
                    (peer, e.to_string())
                })
            };
            for (id, c) in taken {
                caches.insert(id, c);
            }
            out
        }));
        let r = r.unwrap_or_else(|p| Err((false, format!("panicked: {}", panic_text(&*p)))));
        let failed = r.is_err();
        let _ = replies.send((w, r));
        if failed {
            return;
        }
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
                    return;
                }
                let _ = me.wake.wait_timeout(q, Duration::from_millis(50));
                continue;
            }
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

        let mut step = |ranks: &mut RankSet, plan_segs: Vec<(u64, Vec<u32>)>, alloc, free| {
            let panic_rank = match fault {
                Some(f) if ranks.steps + 1 >= f.step => {
                    fault = None;
                    Some(f.rank)
                }
                _ => None,
            };
            ranks.run(
                Plan {
                    alloc,
                    free,
                    segs: plan_segs,
                    panic_rank,
                },
                pool.cfg.step_timeout,
            )
        };

        // 3. One prefill chunk.
        let mut result = Ok(());
        let pre = running.iter().position(|s| s.prefilled < s.job.req.prompt.len());
        let mut free = std::mem::take(&mut to_free);
        let mut alloc_now = std::mem::take(&mut alloc);
        if let Some(i) = pre {
            let s = &running[i];
            let end = (s.prefilled + pool.cfg.prefill_chunk).min(s.job.req.prompt.len());
            let chunk = s.job.req.prompt[s.prefilled..end].to_vec();
            match step(
                &mut ranks,
                vec![(s.id, chunk)],
                std::mem::take(&mut alloc_now),
                std::mem::take(&mut free),
            ) {
                Ok(logits) => {
                    let s = &mut running[i];
                    s.prefilled = end;
                    if end == s.job.req.prompt.len() {
                        accept_token(&pool, s, &logits[0]);
                    }
                }
                Err(e) => result = Err(e),
            }
        }
        // 4. One decode step for every sequence with a token to feed.
        if result.is_ok() {
            let ids: Vec<usize> = (0..running.len())
                .filter(|&i| {
                    let s = &running[i];
                    !s.finished && s.prefilled == s.job.req.prompt.len() && !s.generated.is_empty()
                })
                .collect();
            // A sequence whose prefill just ended joins this decode step with its first token.
            if !ids.is_empty() || !free.is_empty() || !alloc_now.is_empty() {
                let segs: Vec<(u64, Vec<u32>)> = ids
                    .iter()
                    .map(|&i| (running[i].id, vec![*running[i].generated.last().expect("has a token")]))
                    .collect();
                if !segs.is_empty() {
                    pool.metrics.batch_size.observe(segs.len() as f64);
                }
                match step(&mut ranks, segs, alloc_now, free) {
                    Ok(logits) => {
                        for (k, &i) in ids.iter().enumerate() {
                            accept_token(&pool, &mut running[i], &logits[k]);
                        }
                    }
                    Err(e) => result = Err(e),
                }
            }
        }
        if !pool.cfg.step_delay.is_zero() {
            std::thread::sleep(pool.cfg.step_delay);
        }
        if let Err(e) = result {
            fail_over(&pool, &me, &mut running, &e);
            kv_used = 0;
            to_free.clear();
            ranks = rebuild(&pool, &me);
            if pool.stop.load(Ordering::SeqCst) && ranks.cmds.is_empty() {
                return;
            }
        }
    }
}

/// Takes the replica out of rotation and moves or ends its requests.
fn fail_over(pool: &Pool, me: &Replica, running: &mut Vec<Seq>, why: &str) {
    me.healthy.store(false, Ordering::SeqCst);
    Metrics::add(&pool.metrics.replica_failures, 1);
    tracing::warn!("replica {} failed: {why}", me.index);
    eprintln!("replica {} failed: {why}; rebuilding it", me.index);
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

/// Rebuilds the replica's ranks (retrying every second until it works or the pool stops).
fn rebuild(pool: &Arc<Pool>, me: &Replica) -> RankSet {
    loop {
        if pool.stop.load(Ordering::SeqCst) {
            return RankSet {
                cmds: Vec::new(),
                replies: mpsc::channel().1,
                reporter: 0,
                steps: 0,
            };
        }
        match RankSet::build(pool, me.index) {
            Ok(r) => {
                me.restarts.fetch_add(1, Ordering::Relaxed);
                me.healthy.store(true, Ordering::SeqCst);
                eprintln!("replica {} rebuilt and back in rotation", me.index);
                return r;
            }
            Err(e) => {
                eprintln!("replica {}: rebuilding failed: {e}; retrying", me.index);
                std::thread::sleep(Duration::from_secs(1));
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
