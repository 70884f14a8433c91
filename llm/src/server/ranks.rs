//! The ranks of one replica and how each batched step reaches them: through the communicator, the same way
//! whether the ranks are threads of this process or processes (`serve --nprocs N`, torchrun, mpirun).
//!
//! The replica's leader (in the process that serves HTTP) hands each step's plan to world rank 0, a
//! thread of its own process. Rank 0 encodes it and sends it down a tree over the engine's own
//! communicators: to the first rank of every later stage over its pipeline communicator, and each stage's
//! first rank to the rest of its TP group over the TP communicator. Every rank then runs the step
//! ([`crate::engine::Rank::step`]); the last stage's first rank sends the logits back to rank 0 over the
//! pipeline, and rank 0 answers the leader. A plan without segments (a heartbeat, sent every
//! [`HEARTBEAT`] while the replica is idle) makes every rank pass a barrier instead, so a rank that died
//! while nobody was generating is noticed then, and no rank waits for a plan longer than the
//! communicator's timeout.
//!
//! A rank that fails (an error, a panic, a decoding error in a plan) returns, dropping its communicators:
//! its peers' calls then fail with `PeerFailed` (host backend) and they return too, so the failure reaches
//! rank 0 and the leader within the communicator's timeout, never a hang.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cli::{Backend, Device};
use crate::comm::Comm;
use crate::compute::Compute;
use crate::engine::Rank;
use crate::error::{EngineError, Result};
use crate::launch::{load_model, RankComms};
use crate::math::DecodePath;
use crate::model::WeightSource;
use crate::shard::Layout;

/// An idle replica sends an empty plan this often, so every rank checks its peers and none waits for a
/// plan as long as the communicator's timeout.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// Most words a plan may take on the wire (a peer claiming more is refused, not allocated).
const MAX_PLAN_WORDS: usize = 1 << 26;

/// The step plan every rank of a replica runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// New caches: (sequence id, positions).
    pub alloc: Vec<(u64, usize)>,
    /// Caches to drop.
    pub free: Vec<u64>,
    /// Segments: (sequence id, tokens to feed).
    pub segs: Vec<(u64, Vec<u32>)>,
    /// Test hook: this world rank panics.
    pub panic_rank: Option<usize>,
    /// The replica stops: every rank returns.
    pub stop: bool,
}

fn push64(w: &mut Vec<u32>, v: u64) {
    w.push(v as u32);
    w.push((v >> 32) as u32);
}

impl Plan {
    /// The plan as 32-bit words: `stop, panic_rank + 1 (0: none), #alloc, (id, positions)…, #free, id…,
    /// #segs, (id, #tokens, tokens…)…`, 64-bit values as two words (low first).
    pub fn encode(&self) -> Vec<u32> {
        let mut w = vec![u32::from(self.stop)];
        push64(&mut w, self.panic_rank.map_or(0, |r| r as u64 + 1));
        push64(&mut w, self.alloc.len() as u64);
        for &(id, cap) in &self.alloc {
            push64(&mut w, id);
            push64(&mut w, cap as u64);
        }
        push64(&mut w, self.free.len() as u64);
        for &id in &self.free {
            push64(&mut w, id);
        }
        push64(&mut w, self.segs.len() as u64);
        for (id, toks) in &self.segs {
            push64(&mut w, *id);
            push64(&mut w, toks.len() as u64);
            w.extend_from_slice(toks);
        }
        w
    }

    /// The inverse of [`Plan::encode`]; words that do not form a plan are an error (never a panic).
    pub fn decode(words: &[u32]) -> std::result::Result<Plan, String> {
        struct R<'a>(&'a [u32]);
        impl R<'_> {
            fn word(&mut self) -> std::result::Result<u32, String> {
                let (&v, rest) = self.0.split_first().ok_or("a plan ends early")?;
                self.0 = rest;
                Ok(v)
            }
            fn u64(&mut self) -> std::result::Result<u64, String> {
                Ok(u64::from(self.word()?) | (u64::from(self.word()?) << 32))
            }
            /// A count of items of `min_words` words each, checked against what is left.
            fn count(&mut self, min_words: usize) -> std::result::Result<usize, String> {
                let n = self.u64()?;
                match usize::try_from(n) {
                    Ok(n) if n.saturating_mul(min_words) <= self.0.len() => Ok(n),
                    _ => Err(format!("a plan claims {n} items but has {} words left", self.0.len())),
                }
            }
        }
        let mut r = R(words);
        let stop = match r.word()? {
            0 => false,
            1 => true,
            v => return Err(format!("a plan's stop flag is {v}")),
        };
        let panic_rank = match r.u64()? {
            0 => None,
            v => Some(usize::try_from(v - 1).map_err(|_| "a plan's panic rank is out of range")?),
        };
        let n = r.count(4)?;
        let mut alloc = Vec::with_capacity(n);
        for _ in 0..n {
            let id = r.u64()?;
            let cap = usize::try_from(r.u64()?).map_err(|_| "a plan's cache size is out of range")?;
            alloc.push((id, cap));
        }
        let n = r.count(2)?;
        let mut free = Vec::with_capacity(n);
        for _ in 0..n {
            free.push(r.u64()?);
        }
        let n = r.count(4)?;
        let mut segs = Vec::with_capacity(n);
        for _ in 0..n {
            let id = r.u64()?;
            let len = r.count(1)?;
            let (toks, rest) = r.0.split_at(len);
            r.0 = rest;
            segs.push((id, toks.to_vec()));
        }
        if !r.0.is_empty() {
            return Err(format!("{} words after the end of a plan", r.0.len()));
        }
        Ok(Plan {
            alloc,
            free,
            segs,
            panic_rank,
            stop,
        })
    }
}

/// Sends `words` to `peer`: its length, then the words (as `f32` bit patterns: send/recv copy bytes).
fn send_frame<C: Comm + ?Sized>(c: &C, words: &[u32], peer: usize) -> Result<()> {
    c.send(&[f32::from_bits(words.len() as u32)], peer)?;
    let data: Vec<f32> = words.iter().map(|&w| f32::from_bits(w)).collect();
    c.send(&data, peer)?;
    Ok(())
}

/// Receives what [`send_frame`] sent from `peer`.
fn recv_frame<C: Comm + ?Sized>(c: &C, peer: usize) -> Result<Vec<u32>> {
    let mut len = [0.0f32];
    c.recv(&mut len, peer)?;
    let n = len[0].to_bits() as usize;
    if n > MAX_PLAN_WORDS {
        return Err(EngineError::Config(format!(
            "rank {peer} sent a plan of {n} words (at most {MAX_PLAN_WORDS})"
        )));
    }
    let mut data = vec![0.0f32; n];
    c.recv(&mut data, peer)?;
    Ok(data.into_iter().map(f32::to_bits).collect())
}

/// Brings the plan to every rank: rank 0 has it (from the leader) and sends it on; the others receive it
/// over their communicators (see the module documentation for the tree).
fn distribute<B: Compute>(rank: &Rank<B>, w: usize, mine: Option<&Plan>) -> Result<Plan> {
    let p = rank.model().place();
    let (tp, pp) = (rank.tp_comm(), rank.pp_comm());
    let (plan, words) = match mine {
        Some(plan) if w == 0 => (plan.clone(), plan.encode()),
        _ => {
            let words = if p.tp_rank == 0 {
                recv_frame(pp, 0)?
            } else {
                recv_frame(tp, 0)?
            };
            let plan = Plan::decode(&words).map_err(EngineError::Config)?;
            (plan, words)
        }
    };
    if p.tp_rank == 0 {
        if w == 0 {
            for s in 1..p.pp {
                send_frame(pp, &words, s)?;
            }
        }
        for t in 1..p.tp {
            send_frame(tp, &words, t)?;
        }
    }
    Ok(plan)
}

/// What one plan gave on rank 0.
enum Outcome {
    /// The replica stops.
    Stop,
    /// The logits at each segment's last row (empty for a plan without segments).
    Logits(Vec<Vec<f32>>),
}

/// Runs one plan on this rank: receives (or sends) it, applies its frees and allocations, runs the step or
/// (no segments) a barrier, and brings the logits to rank 0.
fn run_plan<B: Compute>(
    rank: &Rank<B>,
    w: usize,
    caches: &mut HashMap<u64, B::Cache>,
    mine: Option<&Plan>,
) -> std::result::Result<Outcome, String> {
    let plan = distribute(rank, w, mine).map_err(|e| e.to_string())?;
    if plan.stop {
        // Nobody drops its communicators before every rank has the stop plan.
        let _ = rank.barrier();
        return Ok(Outcome::Stop);
    }
    if plan.panic_rank == Some(w) {
        panic!("injected fault: rank {w} panics");
    }
    for id in &plan.free {
        caches.remove(id);
    }
    for &(id, cap) in &plan.alloc {
        let cache = rank.model().try_new_cache(cap).map_err(|e| e.to_string())?;
        caches.insert(id, cache);
    }
    if plan.segs.is_empty() {
        rank.barrier().map_err(|e| e.to_string())?;
        return Ok(Outcome::Logits(Vec::new()));
    }
    let mut taken: Vec<(u64, B::Cache)> = Vec::with_capacity(plan.segs.len());
    for (id, _) in &plan.segs {
        let c = caches.remove(id).ok_or_else(|| format!("no cache for sequence {id}"))?;
        taken.push((*id, c));
    }
    let out = {
        let mut segs: Vec<(&[u32], &mut B::Cache)> = plan
            .segs
            .iter()
            .zip(taken.iter_mut())
            .map(|((_, t), (_, c))| (t.as_slice(), c))
            .collect();
        rank.step(&mut segs).map_err(|e| e.to_string())
    };
    for (id, c) in taken {
        caches.insert(id, c);
    }
    let out = out?;
    // The last stage's first rank holds the logits; over the pipeline they come to rank 0.
    let place = rank.model().place();
    let vocab = rank.model().config().vocab_size;
    let reporter = place.stage + 1 == place.pp && place.tp_rank == 0;
    if place.pp == 1 {
        return Ok(Outcome::Logits(out.unwrap_or_default()));
    }
    if reporter {
        let flat: Vec<f32> = out.unwrap_or_default().concat();
        rank.pp_comm().send(&flat, 0).map_err(|e| e.to_string())?;
    }
    if w == 0 {
        let m = plan.segs.len();
        let mut flat = vec![0.0f32; m * vocab];
        rank.pp_comm()
            .recv(&mut flat, place.pp - 1)
            .map_err(|e| e.to_string())?;
        return Ok(Outcome::Logits(flat.chunks(vocab).map(<[f32]>::to_vec).collect()));
    }
    Ok(Outcome::Logits(Vec::new()))
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// Rank 0's link to its replica's leader: plans in, answers out.
struct Leader {
    plans: mpsc::Receiver<Plan>,
    replies: mpsc::Sender<Reply>,
}

/// Rank 0's answer to a plan: the logits, or what failed.
type Reply = std::result::Result<Vec<Vec<f32>>, String>;

/// One rank's loop: runs plans until a stop plan (rank 0: until the leader hangs up) or a failure (then it
/// returns, dropping its communicators, which makes its peers fail instead of waiting).
fn rank_main<B: Compute>(rank: Rank<B>, w: usize, leader: Option<Leader>) -> std::result::Result<(), String> {
    let mut caches: HashMap<u64, B::Cache> = HashMap::new();
    loop {
        // Rank 0: the leader's next plan (a stop plan once the leader hangs up).
        let mine = leader.as_ref().map(|l| {
            l.plans.recv().unwrap_or(Plan {
                stop: true,
                ..Plan::default()
            })
        });
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| run_plan(&rank, w, &mut caches, mine.as_ref())));
        let r = r.unwrap_or_else(|p| Err(format!("panicked: {}", panic_text(&*p))));
        match (r, &leader) {
            (Ok(Outcome::Stop), _) => return Ok(()),
            (Ok(Outcome::Logits(l)), Some(leader)) => {
                let _ = leader.replies.send(Ok(l));
            }
            (Ok(Outcome::Logits(_)), None) => {}
            (Err(e), leader) => {
                let e = format!("rank {w}: {e}");
                if let Some(leader) = leader {
                    let _ = leader.replies.send(Err(e.clone()));
                }
                return Err(e);
            }
        }
    }
}

/// Where a rank tells whether it loaded: the builder of its replica (rank threads), or nobody (a rank
/// process, whose load error is its result).
type Ready = Option<mpsc::Sender<(usize, Result<()>)>>;

/// Loads world rank `comms.world_rank`'s shard on the compute backend `engine` names, tells `ready`
/// whether it loaded (a load error goes to `ready` when there is one, else it is the result), then runs
/// the plans ([`rank_main`]; `link` is rank 0's link to the leader).
#[allow(clippy::too_many_arguments)]
fn load_and_run(
    src: &dyn WeightSource,
    layout: Layout,
    threads: usize,
    path: DecodePath,
    engine: RankEngine,
    comms: RankComms,
    link: Option<Leader>,
    ready: Ready,
) -> Result<()> {
    let w = comms.world_rank;
    let model = load_model(src, layout, threads, path, w);
    match engine.device {
        Device::Cpu => run_loaded(model.and_then(|m| Rank::new(m, comms.tp, comms.pp)), w, link, ready),
        #[cfg(feature = "cuda")]
        Device::Cuda => run_loaded(
            model.and_then(|m| crate::launch::cuda_rank(m, comms, false)),
            w,
            link,
            ready,
        ),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => run_loaded::<crate::compute::Cpu>(Err(crate::cli::no_cuda_feature()), w, link, ready),
    }
}

/// The half of [`load_and_run`] after the load.
fn run_loaded<B: Compute>(rank: Result<Rank<B>>, w: usize, link: Option<Leader>, ready: Ready) -> Result<()> {
    let rank = match (rank, ready) {
        (Ok(r), ready) => {
            if let Some(tx) = ready {
                let _ = tx.send((w, Ok(())));
            }
            r
        }
        (Err(e), Some(tx)) => {
            let _ = tx.send((w, Err(e)));
            return Ok(());
        }
        (Err(e), None) => return Err(e),
    };
    rank_main(rank, w, link).map_err(EngineError::Config)
}

/// Where a replica's ranks compute and how they communicate (`serve --backend`, `--device`, as in
/// tp_llama): host collectives and CPU compute (the default); NCCL with CPU compute (each collective
/// staged through the GPU); or the CUDA engine, one GPU per rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankEngine {
    /// The communicators.
    pub backend: Backend,
    /// The compute backend.
    pub device: Device,
}

impl Default for RankEngine {
    fn default() -> Self {
        RankEngine {
            backend: Backend::Host,
            device: Device::Cpu,
        }
    }
}

impl RankEngine {
    /// Refuses the combinations no rank can run: the GPU engine without NCCL, and NCCL in a build without
    /// the `cuda` feature.
    pub fn check(&self) -> Result<()> {
        if self.device == Device::Cuda && self.backend != Backend::Nccl {
            return Err(EngineError::Config(
                "--device cuda needs --backend nccl (the GPU engine's collectives are NCCL calls on its stream)".into(),
            ));
        }
        #[cfg(not(feature = "cuda"))]
        if self.backend == Backend::Nccl {
            return Err(crate::cli::no_cuda_feature());
        }
        Ok(())
    }
}

/// A rank thread's communicators: given, or made on the thread by NCCL.
enum RankCommsOf {
    Given(RankComms),
    #[cfg(feature = "cuda")]
    Nccl(Arc<crate::launch::NcclThreads>),
}

impl RankCommsOf {
    fn take(self, w: usize) -> Result<RankComms> {
        let _ = w;
        match self {
            RankCommsOf::Given(c) => Ok(c),
            #[cfg(feature = "cuda")]
            RankCommsOf::Nccl(nt) => nt.rank(w),
        }
    }
}

/// Replica `replica`'s rank threads on NCCL: world rank `w` on device `(replica × world + w) % devices`, so
/// replicas take different GPUs while there are enough; the GPU engine needs one GPU per rank of every
/// replica.
#[cfg(feature = "cuda")]
fn nccl_threads(layout: Layout, engine: RankEngine, replica: usize) -> Result<Vec<(usize, RankCommsOf)>> {
    let first = replica * layout.world();
    if engine.device == Device::Cuda {
        crate::cuda_engine::device_for_rank(first, first + layout.world(), nccl::cuda_device_count())?;
    }
    let nt = Arc::new(crate::launch::NcclThreads::new_from(layout, first)?);
    Ok((0..layout.world())
        .map(|w| (w, RankCommsOf::Nccl(nt.clone())))
        .collect())
}

#[cfg(not(feature = "cuda"))]
fn nccl_threads(_layout: Layout, _engine: RankEngine, _replica: usize) -> Result<Vec<(usize, RankCommsOf)>> {
    Err(crate::cli::no_cuda_feature())
}

/// The ranks of one replica as the leader drives them: the channel to world rank 0 (a thread of this
/// process, whatever the others are).
pub(crate) struct RankSet {
    plans: Option<mpsc::Sender<Plan>>,
    replies: mpsc::Receiver<Reply>,
    rank0: Option<JoinHandle<()>>,
    /// Plans run since the replica was built.
    pub steps: u64,
    /// When the last plan was run.
    pub last_run: Instant,
}

impl RankSet {
    /// No ranks (a replica that is not rebuilt).
    pub fn none() -> RankSet {
        RankSet {
            plans: None,
            replies: mpsc::channel().1,
            rank0: None,
            steps: 0,
            last_run: Instant::now(),
        }
    }

    /// True for [`RankSet::none`].
    pub fn is_none(&self) -> bool {
        self.plans.is_none()
    }

    /// Loads a replica on fresh communicators. `comms` is this process's rank 0 when the other ranks are
    /// processes (they run [`serve_rank`]); `None` starts every rank as a thread of this process.
    pub fn build(
        src: &Arc<dyn WeightSource>,
        layout: Layout,
        threads: usize,
        path: DecodePath,
        engine: RankEngine,
        replica: usize,
        comms: Option<RankComms>,
    ) -> Result<RankSet> {
        engine.check()?;
        // Each rank thread's communicators: given (host threads, or this process's rank 0), or made by
        // NCCL on the rank's own thread (every rank of the replica at once).
        let local: Vec<(usize, RankCommsOf)> = match (comms, engine.backend) {
            (Some(c), _) => vec![(c.world_rank, RankCommsOf::Given(c))],
            (None, Backend::Host) => crate::launch::host_threads(layout)?
                .into_iter()
                .map(|c| (c.world_rank, RankCommsOf::Given(c)))
                .collect(),
            (None, Backend::Nccl) => nccl_threads(layout, engine, replica)?,
        };
        let (plan_tx, plan_rx) = mpsc::channel::<Plan>();
        let (reply_tx, replies) = mpsc::channel::<Reply>();
        let (ready_tx, ready_rx) = mpsc::channel::<(usize, Result<()>)>();
        let mut leader = Some(Leader {
            plans: plan_rx,
            replies: reply_tx,
        });
        let mut rank0 = None;
        let n = local.len();
        for (w, c) in local {
            let link = if w == 0 { leader.take() } else { None };
            let (src, ready_tx) = (src.clone(), ready_tx.clone());
            let h = std::thread::Builder::new()
                .name(format!("replica{replica}-rank{w}"))
                .spawn(move || {
                    let comms = match c.take(w) {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send((w, Err(e)));
                            return;
                        }
                    };
                    let _ = load_and_run(&*src, layout, threads, path, engine, comms, link, Some(ready_tx));
                })
                .map_err(|e| EngineError::Config(format!("spawning a rank thread: {e}")))?;
            if w == 0 {
                rank0 = Some(h);
            }
        }
        drop(ready_tx);
        if leader.is_some() {
            return Err(EngineError::Config(
                "world rank 0 is not among this process's ranks".into(),
            ));
        }
        for _ in 0..n {
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
        let mut set = RankSet {
            plans: Some(plan_tx),
            replies,
            rank0,
            steps: 0,
            last_run: Instant::now(),
        };
        // Every rank (threads or processes) is loaded and answering once an empty plan went round.
        set.run(Plan::default(), Duration::from_secs(600))
            .map_err(|e| EngineError::Config(format!("replica {replica}: {e}")))?;
        set.steps = 0;
        Ok(set)
    }

    /// Runs one plan on every rank; rank 0's answer (the logits of each segment), or what failed. A plan
    /// not answered within `timeout` counts as failed.
    pub fn run(&mut self, plan: Plan, timeout: Duration) -> std::result::Result<Vec<Vec<f32>>, String> {
        self.steps += 1;
        self.last_run = Instant::now();
        let segs = plan.segs.len();
        self.plans
            .as_ref()
            .ok_or("the replica has no ranks")?
            .send(plan)
            .map_err(|_| "rank 0 has exited".to_string())?;
        let logits = match self.replies.recv_timeout(timeout) {
            Ok(r) => r?,
            Err(_) => {
                return Err(format!(
                    "rank 0 did not finish its step within {:.1} s",
                    timeout.as_secs_f64()
                ))
            }
        };
        if logits.len() != segs {
            return Err(format!("rank 0 returned {} logits for {segs} segments", logits.len()));
        }
        Ok(logits)
    }

    /// Stops every rank (rank 0 sends them a stop plan) and waits for rank 0's thread.
    pub fn stop(mut self) {
        self.plans = None;
        if let Some(h) = self.rank0.take() {
            let _ = h.join();
        }
    }
}

/// A rank process other than rank 0 (`serve --nprocs N`, torchrun, mpirun): loads its shard (on the
/// compute backend `engine` names), then runs the plans rank 0 sends until it sends a stop plan (`Ok`) or
/// the replica fails (`Err`).
pub fn serve_rank(
    src: &dyn WeightSource,
    layout: Layout,
    threads: usize,
    path: DecodePath,
    engine: RankEngine,
    comms: RankComms,
) -> Result<()> {
    let w = comms.world_rank;
    if w == 0 {
        return Err(EngineError::Config("serve_rank runs the ranks other than 0".into()));
    }
    engine.check()?;
    load_and_run(src, layout, threads, path, engine, comms, None, None)
}

#[cfg(test)]
mod tests {
    use super::Plan;

    #[test]
    fn plans_round_trip_and_bad_words_are_errors() {
        let p = Plan {
            alloc: vec![(1, 40), (u64::MAX, 7)],
            free: vec![3, 1 << 40],
            segs: vec![(1, vec![5, 6, 7]), (9, vec![u32::MAX])],
            panic_rank: Some(2),
            stop: false,
        };
        let w = p.encode();
        assert_eq!(Plan::decode(&w).unwrap(), p);
        assert_eq!(Plan::decode(&Plan::default().encode()).unwrap(), Plan::default());
        for cut in 0..w.len() {
            assert!(Plan::decode(&w[..cut]).is_err(), "a plan cut at {cut} words decodes");
        }
        let mut long = w.clone();
        long.push(0);
        assert!(Plan::decode(&long).is_err());
        // A count far past the words left is refused before anything is allocated.
        let mut huge = Plan::default().encode();
        huge[3] = u32::MAX;
        huge[4] = u32::MAX;
        assert!(Plan::decode(&huge).is_err());
        let mut flag = Plan::default().encode();
        flag[0] = 7;
        assert!(Plan::decode(&flag).is_err());
    }
}
