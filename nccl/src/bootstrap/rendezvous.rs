//! The TCP rendezvous: rank 0 listens, the other ranks connect; then broadcast, all-gather and barrier of small
//! byte blobs through rank 0 (a star; fine for ids, hashes and host names, not for bulk data).
//!
//! Robustness, in short: connecting ranks retry with back-off until the deadline; every read and write has a
//! deadline; frames are bounded and checked before allocation (the [`wire`] module); each incoming
//! connection is handshaken on its own thread with its own short timeout, at most
//! [`RendezvousOptions::max_pending_handshakes`] at a time, so junk connections cannot stall the accept loop;
//! an optional shared token is checked by an HMAC-SHA256 challenge-response (the token never crosses the wire);
//! duplicate and out-of-range ranks are turned away with a [`Reject`](super::wire::Kind::Reject) frame; and
//! when anything fails, rank 0 tells every other rank which rank failed before closing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::env::{Launcher, RankInfo};
use super::error::{BootstrapError, Peer, RejectReason};
use super::store::{self, StoreClient};
use super::wire::{self, Ctx, Kind, Reader, HANDSHAKE_MAX, MAC_LEN, NONCE_LEN};

/// The variable holding the shared token ([`RendezvousOptions::token`]).
pub const TOKEN_VAR: &str = "NCCL_RS_BOOTSTRAP_TOKEN";
/// The variable holding the rendezvous timeout in seconds ([`RendezvousOptions::timeout`]).
pub const TIMEOUT_VAR: &str = "NCCL_RS_BOOTSTRAP_TIMEOUT";
/// The variable holding the per-operation timeout in seconds ([`RendezvousOptions::op_timeout`]).
pub const OP_TIMEOUT_VAR: &str = "NCCL_RS_BOOTSTRAP_OP_TIMEOUT";
/// Set to `True` by torchrun when its agent serves a c10d `TCPStore` on `MASTER_ADDR:MASTER_PORT`.
pub const AGENT_STORE_VAR: &str = "TORCHELASTIC_USE_AGENT_STORE";
/// torchrun's restart counter, part of the store keys of one attempt.
pub const RESTART_COUNT_VAR: &str = "TORCHELASTIC_RESTART_COUNT";

/// Breaks a [`Rendezvous::new`] that is still waiting, from another thread: for a program that started
/// the other ranks itself and sees one of them exit before joining (it will never arrive), or that is
/// shutting down. Clones share one flag.
///
/// Rank 0 checks it between accepts (every few milliseconds), aborts the ranks that had joined (they fail
/// at once with [`BootstrapError::Aborted`]) and returns [`BootstrapError::Cancelled`]; another rank checks
/// it between connection attempts, and a rank waiting on a torchrun agent store between polls. Once the
/// rendezvous has returned, cancelling does nothing.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    /// Cancels every rendezvous that holds a clone of this token.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

fn cancelled(opts: &RendezvousOptions) -> bool {
    opts.cancel.as_ref().is_some_and(CancelToken::is_cancelled)
}

/// Knobs of the rendezvous.
///
/// Programs should take them from [`from_env`](Self::from_env) (or call [`Rendezvous::from_env`], which does),
/// so that every binary honours the same variables: `NCCL_RS_BOOTSTRAP_TOKEN`, `NCCL_RS_BOOTSTRAP_TIMEOUT`,
/// `NCCL_RS_BOOTSTRAP_OP_TIMEOUT` and torchrun's agent store. [`Default`] is the built-in values alone and
/// reads no variable (for tests and embedders that decide everything themselves).
#[derive(Clone)]
pub struct RendezvousOptions {
    /// How long [`Rendezvous::new`] may take: rank 0 waiting for everyone, the others retrying to connect.
    /// Default 300 s (ranks of a large job may start minutes apart). While waiting, a `tracing` warning every
    /// 10 s says who is still missing.
    pub timeout: Duration,
    /// How long one [`broadcast`](Rendezvous::broadcast), [`all_gather`](Rendezvous::all_gather) or
    /// [`barrier`](Rendezvous::barrier) may wait for the slowest rank. Default 600 s (ranks may be loading a
    /// model between two calls). A rank that dies is noticed at once, not after this.
    pub op_timeout: Duration,
    /// How long one incoming connection may take to complete its hello. Default 5 s.
    pub handshake_timeout: Duration,
    /// At most this many connections are handshaken at once by rank 0; more are closed at once (a real rank
    /// retries). Default 64.
    pub max_pending_handshakes: usize,
    /// Largest frame accepted, in bytes (the limit for one broadcast, or for all ranks' blobs together in an
    /// all-gather). Default 64 MiB; at most `u32::MAX`.
    pub max_frame: usize,
    /// A shared secret every rank must have (all or none). Checked by HMAC-SHA256 challenge-response with
    /// fresh nonces on both sides: the token is never sent, and both sides prove they know it. This is how to
    /// keep other users of a cluster out of a job's rendezvous port. (Not used with
    /// [`torch_store`](Self::torch_store): torchrun's store has no authentication of its own.)
    pub token: Option<Vec<u8>>,
    /// Rendezvous through the c10d `TCPStore` at `MASTER_ADDR:MASTER_PORT` (torchrun's agent serves one there)
    /// under this key prefix, instead of rank 0 listening itself. Set by [`from_env`](Self::from_env) when
    /// `TORCHELASTIC_USE_AGENT_STORE=True` (see [`store`]).
    pub torch_store: Option<String>,
    /// Breaks the rendezvous while it waits (see [`CancelToken`]). Default none.
    pub cancel: Option<CancelToken>,
}

impl std::fmt::Debug for RendezvousOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RendezvousOptions")
            .field("timeout", &self.timeout)
            .field("op_timeout", &self.op_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_pending_handshakes", &self.max_pending_handshakes)
            .field("max_frame", &self.max_frame)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("torch_store", &self.torch_store)
            .field("cancel", &self.cancel)
            .finish()
    }
}

impl Default for RendezvousOptions {
    fn default() -> Self {
        RendezvousOptions {
            timeout: Duration::from_secs(300),
            op_timeout: Duration::from_secs(600),
            handshake_timeout: Duration::from_secs(5),
            max_pending_handshakes: 64,
            max_frame: 64 << 20,
            token: None,
            torch_store: None,
            cancel: None,
        }
    }
}

fn token_from_env() -> Option<Vec<u8>> {
    let v = std::env::var_os(TOKEN_VAR)?;
    #[cfg(unix)]
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(v.as_os_str()).to_vec();
    #[cfg(not(unix))]
    let bytes = v.to_string_lossy().into_owned().into_bytes();
    (!bytes.is_empty()).then_some(bytes)
}

impl RendezvousOptions {
    /// The defaults, with the token from `NCCL_RS_BOOTSTRAP_TOKEN`, `timeout` from `NCCL_RS_BOOTSTRAP_TIMEOUT`
    /// and `op_timeout` from `NCCL_RS_BOOTSTRAP_OP_TIMEOUT` (seconds, e.g. `30` or `2.5`) when set, and
    /// [`torch_store`](Self::torch_store) when torchrun's agent serves a store. A value that does not parse is
    /// an error naming the variable.
    pub fn from_env() -> Result<Self, BootstrapError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`from_env`](Self::from_env) over any variable source (the token still comes from the process
    /// environment, where it may not be UTF-8).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, BootstrapError> {
        let mut o = RendezvousOptions {
            token: token_from_env(),
            ..RendezvousOptions::default()
        };
        if let Some(v) = get(TIMEOUT_VAR) {
            o.timeout = parse_seconds(TIMEOUT_VAR, &v)?;
        }
        if let Some(v) = get(OP_TIMEOUT_VAR) {
            o.op_timeout = parse_seconds(OP_TIMEOUT_VAR, &v)?;
        }
        if let Some(v) = get(AGENT_STORE_VAR) {
            let on = match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" | "" => false,
                _ => {
                    return Err(BootstrapError::InvalidVar {
                        var: AGENT_STORE_VAR,
                        value: v,
                        reason: "expected True or False".into(),
                    })
                }
            };
            if on {
                let attempt = get(RESTART_COUNT_VAR).unwrap_or_else(|| "0".into());
                if attempt.trim().parse::<u64>().is_err() {
                    return Err(BootstrapError::InvalidVar {
                        var: RESTART_COUNT_VAR,
                        value: attempt,
                        reason: "expected a non-negative integer".into(),
                    });
                }
                o.torch_store = Some(store::torchrun_prefix(attempt.trim()));
            }
        }
        Ok(o)
    }

    /// Sets [`timeout`](Self::timeout).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`op_timeout`](Self::op_timeout).
    pub fn with_op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// Sets [`cancel`](Self::cancel).
    pub fn with_cancel(mut self, cancel: CancelToken) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// Sets [`token`](Self::token).
    pub fn with_token(mut self, token: Option<impl Into<Vec<u8>>>) -> Self {
        self.token = token.map(Into::into);
        self
    }

    fn check(&self) -> Result<(), BootstrapError> {
        let bad = |what, reason: &str| {
            Err(BootstrapError::InvalidArgument {
                what,
                reason: reason.to_string(),
            })
        };
        if self.timeout.is_zero() {
            return bad("RendezvousOptions::timeout", "must be positive");
        }
        if self.op_timeout.is_zero() {
            return bad("RendezvousOptions::op_timeout", "must be positive");
        }
        if self.handshake_timeout.is_zero() {
            return bad("RendezvousOptions::handshake_timeout", "must be positive");
        }
        if self.max_pending_handshakes == 0 {
            return bad("RendezvousOptions::max_pending_handshakes", "must be at least 1");
        }
        if self.max_frame < 1024 || self.max_frame > u32::MAX as usize {
            return bad("RendezvousOptions::max_frame", "must be in 1024..=u32::MAX");
        }
        if self.token.as_ref().is_some_and(|t| t.is_empty()) {
            return bad("RendezvousOptions::token", "an empty token is not a secret; use None");
        }
        if self.torch_store.as_ref().is_some_and(|p| p.is_empty()) {
            return bad("RendezvousOptions::torch_store", "the key prefix must not be empty");
        }
        Ok(())
    }
}

fn parse_seconds(var: &'static str, value: &str) -> Result<Duration, BootstrapError> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| BootstrapError::InvalidVar {
            var,
            value: value.to_string(),
            reason: "expected a positive number of seconds".into(),
        })
}

/// The collective a data frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Barrier = 1,
    Broadcast = 2,
    AllGather = 3,
}

impl Op {
    fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Barrier,
            2 => Op::Broadcast,
            3 => Op::AllGather,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Op::Barrier => "barrier",
            Op::Broadcast => "broadcast",
            Op::AllGather => "all_gather",
        }
    }
}

fn op_label(op: Op, seq: u64) -> String {
    if seq == 0 {
        "the rendezvous's closing barrier".to_string()
    } else {
        format!("{} #{seq}", op.name())
    }
}

#[derive(Debug)]
struct Conn {
    rank: usize,
    addr: SocketAddr,
    stream: TcpStream,
}

impl Conn {
    fn peer(&self) -> Peer {
        Peer::Rank {
            rank: self.rank,
            addr: Some(self.addr),
        }
    }
}

#[derive(Debug)]
enum Role {
    Single,
    /// Rank 0: connections to ranks 1.. in rank order.
    Root(Vec<Conn>),
    /// Any other rank: the connection to rank 0.
    Leaf(Conn),
    /// Every rank: a client of a c10d `TCPStore` (torchrun's agent store), with the key prefix.
    Store(StoreClient, String),
}

#[derive(Debug)]
struct State {
    role: Role,
    next_seq: u64,
    poisoned: Option<String>,
}

/// A completed rendezvous: every rank is connected (through rank 0) and can exchange small blobs.
///
/// Every rank must call the same operations in the same order; a mismatch is detected and reported as
/// [`BootstrapError::OpMismatch`]. After any error the rendezvous is poisoned: later calls fail at once with
/// [`BootstrapError::Poisoned`], and the other ranks are told which rank failed.
///
/// `Send` and `Sync`; calls from several threads are serialized (but every rank must still issue them in the
/// same order).
#[derive(Debug)]
pub struct Rendezvous {
    rank: usize,
    size: usize,
    op_timeout: Duration,
    max_frame: usize,
    rejected: Vec<BootstrapError>,
    info: RankInfo,
    state: Mutex<State>,
}

/// How often a waiting rank says so (`tracing` warning).
const NOTE_EVERY: Duration = Duration::from_secs(10);

/// At most this many rejected connections are kept for diagnostics.
const KEEP_REJECTED: usize = 16;

impl Rendezvous {
    /// A joined rendezvous in `role`, for `info`'s rank and world size (every way of joining ends here).
    fn assemble(
        info: RankInfo,
        opts: &RendezvousOptions,
        role: Role,
        next_seq: u64,
        rejected: Vec<BootstrapError>,
    ) -> Rendezvous {
        Rendezvous {
            rank: info.rank,
            size: info.world_size,
            op_timeout: opts.op_timeout,
            max_frame: opts.max_frame,
            rejected,
            info,
            state: Mutex::new(State {
                role,
                next_seq,
                poisoned: None,
            }),
        }
    }

    /// Runs the rendezvous: rank 0 listens on `master_addr:master_port` and waits for every other rank; the
    /// others connect, retrying with back-off until `opts.timeout`. Returns once all ranks have joined and
    /// answered a closing barrier, so a rank that died during the handshake is reported here, by rank.
    ///
    /// A world of one needs no sockets at all.
    ///
    /// With [`RendezvousOptions::torch_store`] set, every rank is instead a client of the c10d `TCPStore` at
    /// `master_addr:master_port` (see [`store`]).
    pub fn new(info: &RankInfo, opts: RendezvousOptions) -> Result<Rendezvous, BootstrapError> {
        info.validate()?;
        if info.world_size == 1 {
            opts.check()?;
            return Ok(Rendezvous::assemble(info.clone(), &opts, Role::Single, 1, Vec::new()));
        }
        if let Some(prefix) = opts.torch_store.clone() {
            return store_join(info, opts, prefix);
        }
        if info.rank == 0 {
            RendezvousListener::bind(info, opts)?.accept_ranks()
        } else {
            connect(info, opts)
        }
    }

    /// The one call for programs: [`RankInfo::from_env`], [`RendezvousOptions::from_env`], then
    /// [`new`](Self::new). Works unchanged under torchrun (through its agent's store), `mpirun`, `srun`,
    /// `--nprocs` workers, explicit `NCCL_RS_*` variables, and as a single process.
    pub fn from_env() -> Result<Rendezvous, BootstrapError> {
        Rendezvous::for_rank(&RankInfo::from_env()?)
    }

    /// [`new`](Self::new) for `info` with [`RendezvousOptions::from_env`]: for programs that have read (and
    /// checked) their [`RankInfo`] already. torchrun's agent store is used only for a torchrun launch.
    pub fn for_rank(info: &RankInfo) -> Result<Rendezvous, BootstrapError> {
        let mut opts = RendezvousOptions::from_env()?;
        if info.launcher != Launcher::Torchrun {
            // Only torchrun's own workers are served by its agent's store.
            opts.torch_store = None;
        }
        Rendezvous::new(info, opts)
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Where this rank sits (as given to [`new`](Self::new); on rank 0 with the port actually bound).
    pub fn info(&self) -> &RankInfo {
        &self.info
    }

    /// On rank 0: connections turned away while waiting for the ranks (junk, wrong token, duplicates…), at
    /// most 16. Empty on other ranks.
    pub fn rejected_connections(&self) -> &[BootstrapError] {
        &self.rejected
    }

    /// Sends rank 0's `data` to every rank; returns it on every rank (other ranks' `data` is ignored).
    pub fn broadcast(&self, data: &[u8]) -> Result<Vec<u8>, BootstrapError> {
        self.collective(Op::Broadcast, data).map(|mut v| v.swap_remove(0))
    }

    /// Gathers every rank's `data`, in rank order, on every rank. The blobs may differ in length; together
    /// they must fit [`RendezvousOptions::max_frame`].
    pub fn all_gather(&self, data: &[u8]) -> Result<Vec<Vec<u8>>, BootstrapError> {
        self.collective(Op::AllGather, data)
    }

    /// Returns once every rank has called `barrier`.
    pub fn barrier(&self) -> Result<(), BootstrapError> {
        self.collective(Op::Barrier, &[]).map(|_| ())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent across a panic (it is only replaced whole), so a poisoned lock is fine.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn collective(&self, op: Op, data: &[u8]) -> Result<Vec<Vec<u8>>, BootstrapError> {
        let mut st = self.lock();
        if let Some(why) = &st.poisoned {
            return Err(BootstrapError::Poisoned(why.clone()));
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let limit = self.max_frame - DATA_PREFIX;
        let too_large = match op {
            Op::Broadcast if self.rank == 0 => data.len() > limit,
            Op::AllGather => data.len() > limit.saturating_sub(8 + 8 * self.size),
            _ => false,
        };
        if too_large {
            let e = BootstrapError::MessageTooLarge {
                op: op.name(),
                len: data.len(),
                max: limit,
            };
            poison(&mut st, self.rank, &e);
            return Err(e);
        }
        let deadline = Instant::now() + self.op_timeout;
        let (rank, size) = (self.rank, self.size);
        let result = match &mut st.role {
            Role::Single => Ok(vec![data.to_vec()]),
            Role::Root(peers) => root_collective(peers, op, seq, data, deadline, self.max_frame),
            Role::Leaf(conn) => leaf_collective(conn, rank, size, op, seq, data, deadline, self.max_frame),
            Role::Store(client, prefix) => store_collective(client, prefix, rank, size, op, seq, data, deadline),
        };
        if let Err(e) = &result {
            poison(&mut st, self.rank, e);
        }
        result
    }
}

/// Marks the rendezvous failed; rank 0 tells every other rank who failed. All connections are closed.
fn poison(st: &mut State, rank: usize, e: &BootstrapError) {
    st.poisoned = Some(e.to_string());
    match &mut st.role {
        Role::Single => {}
        Role::Root(peers) => abort_peers(peers, e),
        Role::Leaf(conn) => {
            let _ = conn.stream.shutdown(Shutdown::Both);
        }
        Role::Store(client, prefix) => {
            // Tell the other ranks at once rather than at their deadline (best effort).
            let why = format!("rank {rank} failed: {e}");
            let _ = client.set(
                &abort_key(prefix),
                why.as_bytes(),
                Instant::now() + Duration::from_secs(2),
            );
        }
    }
    tracing::debug!(rank, error = %e, "bootstrap rendezvous failed");
}

/// Best effort: sends an Abort frame naming the failed rank to every peer (except the failed one), then closes.
fn abort_peers(peers: &[Conn], e: &BootstrapError) {
    let failed = e.blamed_rank();
    let reason = e.to_string();
    let mut payload = failed.map_or(u64::MAX, |r| r as u64).to_le_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    let budget = Instant::now() + Duration::from_secs(2);
    for c in peers {
        // The blamed rank is told too: it may be alive (e.g. it called another operation).
        {
            let now = Instant::now();
            let ctx = Ctx {
                rank: 0,
                peer: c.peer(),
                during: "abort",
                start: now,
                deadline: (now + Duration::from_millis(200)).min(budget),
            };
            let _ = wire::write_frame(&c.stream, Kind::Abort, &payload, &ctx);
        }
        let _ = c.stream.shutdown(Shutdown::Both);
    }
}

/// Data frames start with `seq u64, op u8`.
const DATA_PREFIX: usize = 9;

fn data_prefix(seq: u64, op: Op) -> [u8; DATA_PREFIX] {
    let mut p = [0u8; DATA_PREFIX];
    p[..8].copy_from_slice(&seq.to_le_bytes());
    p[8] = op as u8;
    p
}

/// Reads a data frame and checks that it belongs to the same operation (`seq`, `op`) as ours.
fn read_data(conn: &Conn, rank: usize, op: Op, seq: u64, ctx: &Ctx<'_>, max: usize) -> Result<Vec<u8>, BootstrapError> {
    let (kind, payload) = wire::read_frame(&conn.stream, max, ctx)?;
    match kind {
        Kind::Data => {}
        Kind::Abort => return Err(abort_error(&payload, conn.peer(), ctx.during)),
        other => {
            return Err(BootstrapError::Protocol {
                peer: conn.peer(),
                problem: format!("expected a data frame during {}, got {other:?}", ctx.during),
            })
        }
    }
    let mut r = Reader::new(&payload, conn.peer(), "data");
    let their_seq = r.u64()?;
    let their_op = r.u8()?;
    if their_seq != seq || their_op != op as u8 {
        let theirs = match Op::from_u8(their_op) {
            Some(o) => op_label(o, their_seq),
            None => format!("unknown operation {their_op} #{their_seq}"),
        };
        return Err(BootstrapError::OpMismatch {
            rank,
            peer: conn.peer(),
            theirs,
            ours: op_label(op, seq),
        });
    }
    let mut payload = payload;
    payload.drain(..DATA_PREFIX);
    Ok(payload)
}

fn abort_error(payload: &[u8], from: Peer, during: &str) -> BootstrapError {
    let mut r = Reader::new(payload, from, "abort");
    let failed = r.u64().unwrap_or(u64::MAX);
    let reason = String::from_utf8_lossy(r.rest()).into_owned();
    match usize::try_from(failed) {
        Ok(rank) if failed != u64::MAX => BootstrapError::PeerFailed {
            peer: Peer::Rank { rank, addr: None },
            during: during.to_string(),
            reason: format!("reported by rank 0: {reason}"),
        },
        _ => BootstrapError::Aborted {
            during: during.to_string(),
            reason,
        },
    }
}

fn encode_blobs(blobs: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + blobs.iter().map(|b| b.len() + 8).sum::<usize>());
    out.extend_from_slice(&(blobs.len() as u64).to_le_bytes());
    for b in blobs {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
    }
    out
}

fn decode_blobs(buf: &[u8], expect: usize, from: Peer) -> Result<Vec<Vec<u8>>, BootstrapError> {
    let mut r = Reader::new(buf, from, "all_gather result");
    let n = r.u64()?;
    if n != expect as u64 {
        return Err(BootstrapError::Protocol {
            peer: from,
            problem: format!("all_gather result holds {n} blobs, expected {expect}"),
        });
    }
    let mut out = Vec::with_capacity(expect);
    for _ in 0..expect {
        let len = usize::try_from(r.u64()?).unwrap_or(usize::MAX);
        out.push(r.bytes(len)?.to_vec());
    }
    r.finish()?;
    Ok(out)
}

fn root_collective(
    peers: &[Conn],
    op: Op,
    seq: u64,
    data: &[u8],
    deadline: Instant,
    max: usize,
) -> Result<Vec<Vec<u8>>, BootstrapError> {
    let during = op_label(op, seq);
    let start = Instant::now();
    let ctx_for = |c: &Conn| Ctx {
        rank: 0,
        peer: c.peer(),
        during: &during,
        start,
        deadline,
    };
    let prefix = data_prefix(seq, op);
    if op == Op::Broadcast {
        for c in peers {
            wire::write_frame_parts(&c.stream, Kind::Data, &[&prefix, data], &ctx_for(c))?;
        }
        return Ok(vec![data.to_vec()]);
    }
    // Read every rank concurrently, so the first rank to fail is reported at once, whatever its number.
    let mut blobs: Vec<Vec<u8>> = vec![Vec::new(); peers.len() + 1];
    blobs[0] = data.to_vec();
    let first_error = std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        for c in peers {
            let tx = tx.clone();
            let ctx = ctx_for(c);
            s.spawn(move || {
                let _ = tx.send((c.rank, read_data(c, 0, op, seq, &ctx, max)));
            });
        }
        drop(tx);
        let mut first_error = None;
        for (rank, result) in rx {
            match result {
                Ok(blob) => blobs[rank] = blob,
                Err(e) if first_error.is_none() => {
                    // Wake the other readers: their ranks will be told about the failure.
                    for c in peers {
                        let _ = c.stream.shutdown(Shutdown::Read);
                    }
                    first_error = Some(e);
                }
                Err(_) => {}
            }
        }
        first_error
    });
    if let Some(e) = first_error {
        return Err(e);
    }
    let reply = if op == Op::AllGather {
        encode_blobs(&blobs)
    } else {
        Vec::new()
    };
    if reply.len() + DATA_PREFIX > max {
        return Err(BootstrapError::MessageTooLarge {
            op: op.name(),
            len: reply.len(),
            max: max - DATA_PREFIX,
        });
    }
    for c in peers {
        wire::write_frame_parts(&c.stream, Kind::Data, &[&prefix, &reply], &ctx_for(c))?;
    }
    Ok(blobs)
}

#[allow(clippy::too_many_arguments)]
fn leaf_collective(
    conn: &Conn,
    rank: usize,
    size: usize,
    op: Op,
    seq: u64,
    data: &[u8],
    deadline: Instant,
    max: usize,
) -> Result<Vec<Vec<u8>>, BootstrapError> {
    let during = op_label(op, seq);
    let ctx = Ctx {
        rank,
        peer: conn.peer(),
        during: &during,
        start: Instant::now(),
        deadline,
    };
    let prefix = data_prefix(seq, op);
    match op {
        Op::Broadcast => Ok(vec![read_data(conn, rank, op, seq, &ctx, max)?]),
        Op::Barrier => {
            wire::write_frame_parts(&conn.stream, Kind::Data, &[&prefix], &ctx)?;
            read_data(conn, rank, op, seq, &ctx, max)?;
            Ok(Vec::new())
        }
        Op::AllGather => {
            wire::write_frame_parts(&conn.stream, Kind::Data, &[&prefix, data], &ctx)?;
            let reply = read_data(conn, rank, op, seq, &ctx, max)?;
            decode_blobs(&reply, size, conn.peer())
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Rank 0: listening and handshakes.

/// Rank 0's listening socket, bound but not yet accepting: lets a caller learn the port (e.g. after binding
/// port 0) before waiting for the other ranks. [`Rendezvous::new`] is `bind` + `accept_ranks`.
#[derive(Debug)]
pub struct RendezvousListener {
    listener: TcpListener,
    info: RankInfo,
    world_size: usize,
    opts: RendezvousOptions,
    start: Instant,
}

/// Strips the brackets of `[v6]` and resolves `addr:port`.
pub fn resolve(addr: &str, port: u16) -> Result<Vec<SocketAddr>, BootstrapError> {
    let host = addr.trim();
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let resolved: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|source| BootstrapError::Resolve {
            addr: addr.to_string(),
            port,
            source,
        })?
        .collect();
    if resolved.is_empty() {
        return Err(BootstrapError::Resolve {
            addr: addr.to_string(),
            port,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
        });
    }
    Ok(resolved)
}

/// Where rank 0 tries to listen, in order: where the launch says (`addrs`, `master_addr` resolved). A job on
/// one host listens exactly there, loopback included, so it stays private. A job across hosts listens on the
/// resolved addresses that are not loopback, then on every interface of their family (a host name may resolve
/// here to an address this host does not have); when the name resolves only to loopback here (Debian maps the
/// host's own name to 127.0.1.1) but the ranks span hosts, on every interface, since loopback cannot be reached
/// from the others.
pub fn listen_candidates(addrs: &[SocketAddr], one_host: bool) -> Vec<SocketAddr> {
    if one_host {
        return addrs.to_vec();
    }
    let mut out: Vec<SocketAddr> = addrs.iter().filter(|a| !a.ip().is_loopback()).copied().collect();
    if let Some(first) = addrs.first() {
        let any: IpAddr = match out.first().unwrap_or(first) {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        out.push(SocketAddr::new(any, first.port()));
    }
    out
}

impl RendezvousListener {
    /// Binds rank 0's socket where the launch says (see [`listen_candidates`]): a one-host job listens exactly
    /// on `master_addr` (loopback stays private); a job across hosts on `master_addr`'s address, or every
    /// interface where that address is not this host's. Listening beyond loopback without a
    /// [`token`](RendezvousOptions::token) logs a warning. Port 0 picks a free port (see
    /// [`local_addr`](Self::local_addr)).
    pub fn bind(info: &RankInfo, opts: RendezvousOptions) -> Result<RendezvousListener, BootstrapError> {
        opts.check()?;
        let mut check = info.clone();
        check.master_port = check.master_port.max(1);
        check.validate()?;
        if info.rank != 0 {
            return Err(BootstrapError::InvalidArgument {
                what: "RendezvousListener::bind",
                reason: format!("only rank 0 listens, this is rank {}", info.rank),
            });
        }
        let addrs = resolve(&info.master_addr, info.master_port)?;
        let one_host = info.local_world_size == Some(info.world_size);
        let mut last = None;
        for addr in listen_candidates(&addrs, one_host) {
            match TcpListener::bind(addr) {
                Ok(listener) => {
                    if !addr.ip().is_loopback() && opts.token.is_none() {
                        tracing::warn!(
                            "bootstrap: rank 0 listens on {addr} without {TOKEN_VAR}: anyone who can reach it \
                             can join or disturb this job's rendezvous; set the same {TOKEN_VAR} on every rank"
                        );
                    }
                    let mut info = info.clone();
                    if let Ok(a) = listener.local_addr() {
                        info.master_port = a.port();
                    }
                    return Ok(RendezvousListener {
                        listener,
                        world_size: info.world_size,
                        info,
                        opts,
                        start: Instant::now(),
                    });
                }
                Err(source) if source.kind() == std::io::ErrorKind::AddrInUse => {
                    return Err(BootstrapError::PortInUse { addr, source })
                }
                // A host name that resolves here to an address this host does not have: try the next one.
                Err(source) if source.kind() == std::io::ErrorKind::AddrNotAvailable => {
                    last = Some(BootstrapError::Bind { addr, source })
                }
                Err(source) => last = Some(BootstrapError::Bind { addr, source }),
            }
        }
        Err(last.expect("resolve returns at least one address"))
    }

    /// The address rank 0 listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, BootstrapError> {
        self.listener.local_addr().map_err(|source| BootstrapError::Io {
            op: "local_addr",
            peer: Peer::Rank { rank: 0, addr: None },
            source,
        })
    }

    /// Waits (until the deadline counted from [`bind`](Self::bind)) for every other rank to join, welcomes
    /// them, and runs a closing barrier.
    pub fn accept_ranks(self) -> Result<Rendezvous, BootstrapError> {
        let RendezvousListener {
            listener,
            info,
            world_size,
            opts,
            start,
        } = self;
        let local = listener.local_addr().ok();
        let io_err = |op, source| BootstrapError::Io {
            op,
            peer: Peer::Rank { rank: 0, addr: local },
            source,
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| io_err("set_nonblocking", e))?;
        let deadline = start + opts.timeout;
        let token: Option<Arc<[u8]>> = opts.token.as_deref().map(Arc::from);
        let pending = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel::<Result<Joined, BootstrapError>>();
        let reporter = Reporter {
            tx,
            closed: Arc::new(Mutex::new(false)),
        };
        let mut joined: Vec<Option<Joined>> = (0..world_size).map(|_| None).collect();
        let mut arrived = 1; // rank 0 itself
        let mut rejected: Vec<BootstrapError> = Vec::new();
        let mut busy_drops = 0usize;
        let reject = |e: BootstrapError, rejected: &mut Vec<BootstrapError>| {
            tracing::warn!(error = %e, "bootstrap: rank 0 turned a connection away");
            if rejected.len() < KEEP_REJECTED {
                rejected.push(e);
            }
        };
        let mut next_note = Instant::now() + NOTE_EVERY;
        while arrived < world_size {
            let mut idle = true;
            if Instant::now() >= next_note {
                next_note += NOTE_EVERY;
                let missing: Vec<usize> = (1..world_size).filter(|r| joined[*r].is_none()).collect();
                tracing::warn!(
                    waited = ?start.elapsed(),
                    deadline = ?opts.timeout,
                    ?missing,
                    rejected = rejected.len(),
                    "bootstrap: rank 0 is still waiting for ranks"
                );
            }
            match listener.accept() {
                Ok((stream, addr)) => {
                    idle = false;
                    if pending.load(Ordering::SeqCst) >= opts.max_pending_handshakes {
                        // Closing is enough: a real rank sees the close before any challenge and retries.
                        busy_drops += 1;
                        drop(stream);
                    } else {
                        pending.fetch_add(1, Ordering::SeqCst);
                        let guard = PendingGuard(pending.clone());
                        let reporter = reporter.clone();
                        let token = token.clone();
                        let hs_deadline = (Instant::now() + opts.handshake_timeout).min(deadline);
                        let spawned = std::thread::Builder::new()
                            .name("nccl-rs-handshake".into())
                            .spawn(move || {
                                let _guard = guard;
                                handshake(stream, addr, world_size, token.as_deref(), hs_deadline, &reporter);
                            });
                        if spawned.is_err() {
                            busy_drops += 1;
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => idle = false,
                // Per-connection failures (ECONNABORTED) and transient resource limits (EMFILE): keep serving.
                Err(e) => tracing::warn!(error = %e, "bootstrap: accept failed"),
            }
            while let Ok(result) = rx.try_recv() {
                idle = false;
                match result {
                    Ok(j) => match &joined[j.rank] {
                        Some(first) if is_closed(&first.stream) => {
                            // The first claimant has gone (e.g. it gave up and was restarted): take the new one.
                            tracing::warn!(rank = j.rank, old = %first.addr, new = %j.addr,
                                "bootstrap: rank reconnected; its earlier connection is closed");
                            let r = j.rank;
                            joined[r] = Some(j);
                        }
                        Some(first) => {
                            let e = BootstrapError::DuplicateRank {
                                rank: j.rank,
                                first: Peer::Rank {
                                    rank: first.rank,
                                    addr: Some(first.addr),
                                },
                                second: Peer::Unidentified { addr: Some(j.addr) },
                            };
                            let message = e.to_string();
                            // On its own thread: rejecting drains the connection briefly.
                            std::thread::spawn(move || {
                                send_reject(&j.stream, j.addr, RejectReason::DuplicateRank, &message)
                            });
                            reject(e, &mut rejected);
                        }
                        None => {
                            tracing::debug!(rank = j.rank, addr = %j.addr, "bootstrap: rank joined");
                            arrived += 1;
                            let r = j.rank;
                            joined[r] = Some(j);
                        }
                    },
                    Err(e) => reject(e, &mut rejected),
                }
            }
            if arrived == world_size {
                break;
            }
            // Giving up, cancelled or at the deadline: the ranks that joined are told why.
            let gave_up = if cancelled(&opts) {
                Some(BootstrapError::Cancelled {
                    rank: 0,
                    elapsed: start.elapsed(),
                })
            } else if Instant::now() >= deadline {
                let missing: Vec<usize> = (1..world_size).filter(|r| joined[*r].is_none()).collect();
                if busy_drops > 0 {
                    tracing::warn!(
                        busy_drops,
                        "bootstrap: connections closed because too many handshakes were pending"
                    );
                }
                Some(BootstrapError::RanksMissing {
                    missing,
                    world_size,
                    elapsed: start.elapsed(),
                    rejected: std::mem::take(&mut rejected),
                })
            } else {
                None
            };
            if let Some(e) = gave_up {
                let conns: Vec<Conn> = joined.into_iter().flatten().map(|j| j.into_conn()).collect();
                abort_peers(&conns, &e);
                return Err(e);
            }
            if idle {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        drop(listener);
        // Close the door: handshakes finishing from now on reject themselves; those already reported are
        // late duplicates (every rank is here) and are rejected here.
        *reporter.closed.lock().unwrap_or_else(|p| p.into_inner()) = true;
        for result in rx.try_iter() {
            match result {
                Ok(j) => {
                    let e = late_duplicate(&j, &joined);
                    let message = e.to_string();
                    std::thread::spawn(move || send_reject(&j.stream, j.addr, RejectReason::DuplicateRank, &message));
                    reject(e, &mut rejected);
                }
                Err(e) => reject(e, &mut rejected),
            }
        }
        // Everyone is here: welcome them (proving the token on the way), then a closing barrier, so that a
        // rank that died after its hello is reported now, by rank, to everyone.
        let welcome_deadline = Instant::now()
            + opts
                .handshake_timeout
                .max(deadline.saturating_duration_since(Instant::now()));
        let mut conns = Vec::with_capacity(world_size - 1);
        let mut welcome_error = None;
        for j in joined.into_iter().flatten() {
            if welcome_error.is_none() {
                let mut payload = Vec::with_capacity(1 + MAC_LEN);
                match &token {
                    Some(t) => {
                        payload.push(1);
                        payload.extend_from_slice(&wire::mac(t, &[b"welcome", &j.nonce_c, &j.nonce_s]));
                    }
                    None => payload.push(0),
                }
                let ctx = Ctx {
                    rank: 0,
                    peer: Peer::Rank {
                        rank: j.rank,
                        addr: Some(j.addr),
                    },
                    during: "welcome",
                    start,
                    deadline: welcome_deadline,
                };
                if let Err(e) = wire::write_frame(&j.stream, Kind::Welcome, &payload, &ctx) {
                    welcome_error = Some(e);
                }
            }
            conns.push(j.into_conn());
        }
        let rv = Rendezvous::assemble(info, &opts, Role::Root(conns), 0, rejected);
        if let Some(e) = welcome_error {
            poison(&mut rv.lock(), 0, &e);
            return Err(e);
        }
        closing_barrier(rv, welcome_deadline)
    }
}

/// The barrier (`seq` 0) that ends [`Rendezvous::new`] on every rank, with the rendezvous deadline.
fn closing_barrier(rv: Rendezvous, deadline: Instant) -> Result<Rendezvous, BootstrapError> {
    let op_timeout = rv.op_timeout;
    let mut rv = rv;
    rv.op_timeout = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(500));
    rv.barrier()?;
    rv.op_timeout = op_timeout;
    Ok(rv)
}

/// True when the peer has closed (or reset) a connection that is waiting for its welcome. Such a connection
/// has nothing to read, so a non-blocking peek sees either "would block" (alive) or end of stream (closed).
fn is_closed(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut b = [0u8; 1];
    let closed = match stream.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ),
    };
    closed || stream.set_nonblocking(false).is_err()
}

struct PendingGuard(Arc<AtomicUsize>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection that completed a valid hello.
struct Joined {
    rank: usize,
    addr: SocketAddr,
    stream: TcpStream,
    nonce_c: [u8; NONCE_LEN],
    nonce_s: [u8; NONCE_LEN],
}

impl Joined {
    fn into_conn(self) -> Conn {
        Conn {
            rank: self.rank,
            addr: self.addr,
            stream: self.stream,
        }
    }
}

fn send_reject(stream: &TcpStream, addr: SocketAddr, reason: RejectReason, message: &str) {
    let now = Instant::now();
    let ctx = Ctx {
        rank: 0,
        peer: Peer::Unidentified { addr: Some(addr) },
        during: "reject",
        start: now,
        deadline: now + Duration::from_millis(200),
    };
    let mut payload = vec![reason.code()];
    payload.extend_from_slice(&message.as_bytes()[..message.len().min(HANDSHAKE_MAX - 1)]);
    let _ = wire::write_frame(stream, Kind::Reject, &payload, &ctx);
    // Closing a socket with unread input makes the kernel send a reset, which can destroy the reject frame
    // before the peer reads it: finish sending, then drain briefly (bounded in time and bytes).
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        match std::io::Read::read(&mut &*stream, &mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

/// Rank 0's side of one connection's hello, on its own thread with its own deadline.
///
/// Reports to rank 0's accept loop *before* answering the peer, so that whoever sees the reject can rely on
/// rank 0 having recorded it.
fn handshake(
    stream: TcpStream,
    addr: SocketAddr,
    world_size: usize,
    token: Option<&[u8]>,
    deadline: Instant,
    reporter: &Reporter,
) {
    match hello(&stream, addr, world_size, token, deadline) {
        Ok((rank, nonce_c, nonce_s)) => {
            let j = Joined {
                rank,
                addr,
                stream,
                nonce_c,
                nonce_s,
            };
            if let Some(j) = reporter.report(Ok(j)) {
                // Every rank has arrived already, so this rank is taken.
                let message = format!("rank {} claimed again by {addr} after every rank had arrived", j.rank);
                send_reject(&j.stream, addr, RejectReason::DuplicateRank, &message);
            }
        }
        Err(Refusal { error, reject }) => {
            let message = error.to_string();
            reporter.report(Err(error));
            if let Some(reason) = reject {
                send_reject(&stream, addr, reason, &message);
            }
        }
    }
}

/// Hands handshake results to the accept loop, until it closes.
#[derive(Clone)]
struct Reporter {
    tx: mpsc::Sender<Result<Joined, BootstrapError>>,
    closed: Arc<Mutex<bool>>,
}

impl Reporter {
    /// Sends `r` to the accept loop; gives a joined connection back if the loop has closed.
    fn report(&self, r: Result<Joined, BootstrapError>) -> Option<Joined> {
        let closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        if *closed {
            return r.ok();
        }
        let _ = self.tx.send(r);
        None
    }
}

fn late_duplicate(j: &Joined, joined: &[Option<Joined>]) -> BootstrapError {
    BootstrapError::DuplicateRank {
        rank: j.rank,
        first: Peer::Rank {
            rank: j.rank,
            addr: joined[j.rank].as_ref().map(|f| f.addr),
        },
        second: Peer::Unidentified { addr: Some(j.addr) },
    }
}

/// A failed hello, and the reject to send (none when the peer is gone or never spoke the protocol's framing).
struct Refusal {
    error: BootstrapError,
    reject: Option<RejectReason>,
}

impl From<BootstrapError> for Refusal {
    fn from(error: BootstrapError) -> Self {
        Refusal { error, reject: None }
    }
}

type HelloOk = (usize, [u8; NONCE_LEN], [u8; NONCE_LEN]);

fn hello(
    stream: &TcpStream,
    addr: SocketAddr,
    world_size: usize,
    token: Option<&[u8]>,
    deadline: Instant,
) -> Result<HelloOk, Refusal> {
    let peer = Peer::Unidentified { addr: Some(addr) };
    let fail = |reason: RejectReason, error: BootstrapError| {
        Err(Refusal {
            error,
            reject: Some(reason),
        })
    };
    let io_err = |op, source| BootstrapError::Io { op, peer, source };
    stream
        .set_nonblocking(false)
        .map_err(|e| io_err("set_nonblocking", e))?;
    stream.set_nodelay(true).map_err(|e| io_err("set_nodelay", e))?;
    let ctx = Ctx {
        rank: 0,
        peer,
        during: "handshake",
        start: Instant::now(),
        deadline,
    };
    let nonce_s = wire::nonce()?;
    let mut challenge = Vec::with_capacity(NONCE_LEN + 9);
    challenge.extend_from_slice(&nonce_s);
    challenge.push(u8::from(token.is_some()));
    challenge.extend_from_slice(&(world_size as u64).to_le_bytes());
    wire::write_frame(stream, Kind::Challenge, &challenge, &ctx)?;
    let (kind, payload) = match wire::read_frame(stream, HANDSHAKE_MAX, &ctx) {
        Ok(f) => f,
        Err(e @ BootstrapError::VersionMismatch { .. }) => return fail(RejectReason::Version, e),
        Err(e @ (BootstrapError::BadMagic { .. } | BootstrapError::FrameTooLarge { .. })) => {
            return fail(RejectReason::Malformed, e)
        }
        Err(e) => return Err(e.into()),
    };
    if kind != Kind::Hello {
        let e = BootstrapError::Protocol {
            peer,
            problem: format!("expected a hello, got {kind:?}"),
        };
        return fail(RejectReason::Malformed, e);
    }
    let mut r = Reader::new(&payload, peer, "hello");
    let parsed = (|| {
        let rank = r.u64()?;
        let world = r.u64()?;
        let nonce_c: [u8; NONCE_LEN] = r.array()?;
        let has_mac = r.u8()?;
        let mac: [u8; MAC_LEN] = r.array()?;
        r.finish()?;
        Ok::<_, BootstrapError>((rank, world, nonce_c, has_mac, mac))
    })();
    let (rank, world, nonce_c, has_mac, mac) = match parsed {
        Ok(v) => v,
        Err(e) => return fail(RejectReason::Malformed, e),
    };
    if world != world_size as u64 {
        let e = BootstrapError::WorldSizeMismatch {
            peer,
            theirs: world,
            ours: world_size,
        };
        return fail(RejectReason::WorldSizeMismatch, e);
    }
    if rank == 0 {
        let e = BootstrapError::DuplicateRank {
            rank: 0,
            first: Peer::Rank { rank: 0, addr: None },
            second: peer,
        };
        return fail(RejectReason::DuplicateRank, e);
    }
    if rank >= world_size as u64 {
        let e = BootstrapError::RankOutOfRange { peer, rank, world_size };
        return fail(RejectReason::RankOutOfRange, e);
    }
    let rank = rank as usize;
    let claimed = Peer::Rank { rank, addr: Some(addr) };
    match (token, has_mac) {
        (None, 0) => {}
        (Some(t), 1) => {
            if !wire::verify_mac(
                t,
                &[
                    b"hello",
                    &nonce_s,
                    &(rank as u64).to_le_bytes(),
                    &world.to_le_bytes(),
                    &nonce_c,
                ],
                &mac,
            ) {
                let e = BootstrapError::TokenMismatch {
                    peer: claimed,
                    detail: format!("its {TOKEN_VAR} differs from rank 0's"),
                };
                return fail(RejectReason::Token, e);
            }
        }
        (Some(_), _) => {
            let e = BootstrapError::TokenMismatch {
                peer: claimed,
                detail: format!("rank 0 requires a token ({TOKEN_VAR}) but this connection has none"),
            };
            return fail(RejectReason::Token, e);
        }
        (None, _) => {
            let e = BootstrapError::TokenMismatch {
                peer: claimed,
                detail: format!("it has a token ({TOKEN_VAR}) but rank 0 has none"),
            };
            return fail(RejectReason::Token, e);
        }
    }
    Ok((rank, nonce_c, nonce_s))
}

// ---------------------------------------------------------------------------------------------------------
// Other ranks: connecting.

/// Why one connection attempt failed: retry (rank 0 not up yet, or busy) or give up.
enum Attempt {
    Retry(std::io::Error),
    Fatal(BootstrapError),
}

fn connect(info: &RankInfo, opts: RendezvousOptions) -> Result<Rendezvous, BootstrapError> {
    opts.check()?;
    let start = Instant::now();
    let deadline = start + opts.timeout;
    // Rank 0 reports failures (e.g. missing ranks) at its own deadline; listen a little longer to hear them.
    let grace = (opts.timeout / 10).clamp(Duration::from_millis(500), Duration::from_secs(5));
    let target = format!("{}:{}", info.master_addr, info.master_port);
    let mut attempts = 0u32;
    let mut backoff = Duration::from_millis(10);
    let mut last_error: Option<std::io::Error>;
    let mut next_note = start + NOTE_EVERY;
    loop {
        if cancelled(&opts) {
            return Err(BootstrapError::Cancelled {
                rank: info.rank,
                elapsed: start.elapsed(),
            });
        }
        attempts += 1;
        match try_join(info, &opts, start, deadline, grace) {
            Ok(rv) => return Ok(rv),
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retry(e)) => {
                if Instant::now() >= next_note {
                    next_note += NOTE_EVERY;
                    tracing::warn!(rank = info.rank, target = %target, waited = ?start.elapsed(), error = %e,
                        "bootstrap: rank 0 is not reachable yet; retrying");
                }
                last_error = Some(e);
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(BootstrapError::RootUnreachable {
                rank: info.rank,
                addr: target,
                elapsed: start.elapsed(),
                attempts,
                last_error,
            });
        }
        std::thread::sleep(backoff.min(deadline - now));
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

fn try_join(
    info: &RankInfo,
    opts: &RendezvousOptions,
    start: Instant,
    deadline: Instant,
    grace: Duration,
) -> Result<Rendezvous, Attempt> {
    let addrs = resolve(&info.master_addr, info.master_port).map_err(|e| match e {
        BootstrapError::Resolve { source, .. } => Attempt::Retry(source),
        other => Attempt::Fatal(other),
    })?;
    let mut last = None;
    let mut found = None;
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match wire::connect(&addr, left.min(Duration::from_secs(2))) {
            Ok(s) => {
                found = Some((s, addr));
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let (stream, addr) = found.ok_or_else(|| {
        Attempt::Retry(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline reached")))
    })?;
    let root = Peer::Rank {
        rank: 0,
        addr: Some(addr),
    };
    let fatal_io = |op, source| Attempt::Fatal(BootstrapError::Io { op, peer: root, source });
    stream.set_nodelay(true).map_err(|e| fatal_io("set_nodelay", e))?;
    let ctx = Ctx {
        rank: info.rank,
        peer: root,
        during: "handshake",
        start,
        deadline: (Instant::now() + opts.handshake_timeout).min(deadline),
    };
    // Until the challenge arrives, a closed connection means rank 0 was busy (or is a previous run's listener
    // shutting down): retry.
    let (kind, payload) = match wire::read_frame(&stream, HANDSHAKE_MAX, &ctx) {
        Ok(f) => f,
        Err(BootstrapError::PeerFailed { reason, .. }) => {
            return Err(Attempt::Retry(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                reason,
            )))
        }
        Err(BootstrapError::Timeout { .. }) => {
            return Err(Attempt::Retry(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{addr} accepted the connection but sent no challenge"),
            )))
        }
        Err(e) => return Err(Attempt::Fatal(e)),
    };
    let protocol = |problem: String| Attempt::Fatal(BootstrapError::Protocol { peer: root, problem });
    let nonce_s: [u8; NONCE_LEN] = match kind {
        Kind::Challenge => {
            let mut r = Reader::new(&payload, root, "challenge");
            let parsed = (|| {
                let n: [u8; NONCE_LEN] = r.array()?;
                let auth = r.u8()?;
                let world = r.u64()?;
                r.finish()?;
                Ok::<_, BootstrapError>((n, auth, world))
            })();
            let (n, auth, _world) = parsed.map_err(Attempt::Fatal)?;
            if auth != 0 && opts.token.is_none() {
                // Still send the hello: rank 0 records the rejection, which helps whoever reads its error.
                tracing::debug!("bootstrap: rank 0 requires a token, this rank has none");
            }
            n
        }
        Kind::Reject => return Err(reject_error(info.rank, &payload, root)),
        other => return Err(protocol(format!("expected a challenge, got {other:?}"))),
    };
    let nonce_c = wire::nonce().map_err(Attempt::Fatal)?;
    let rank = (info.rank as u64).to_le_bytes();
    let world = (info.world_size as u64).to_le_bytes();
    let mut hello = Vec::with_capacity(16 + NONCE_LEN + 1 + MAC_LEN);
    hello.extend_from_slice(&rank);
    hello.extend_from_slice(&world);
    hello.extend_from_slice(&nonce_c);
    match &opts.token {
        Some(t) => {
            hello.push(1);
            hello.extend_from_slice(&wire::mac(t, &[b"hello", &nonce_s, &rank, &world, &nonce_c]));
        }
        None => {
            hello.push(0);
            hello.extend_from_slice(&[0u8; MAC_LEN]);
        }
    }
    wire::write_frame(&stream, Kind::Hello, &hello, &ctx).map_err(Attempt::Fatal)?;
    // Wait for everyone: the welcome comes when the last rank has joined.
    let wait = Ctx {
        deadline: deadline + grace,
        during: "waiting for all ranks to join",
        ..ctx
    };
    let (kind, payload) = wire::read_frame(&stream, HANDSHAKE_MAX.max(64 << 10), &wait).map_err(Attempt::Fatal)?;
    match kind {
        Kind::Welcome => {
            let mut r = Reader::new(&payload, root, "welcome");
            let has_mac = r.u8().map_err(Attempt::Fatal)?;
            match (&opts.token, has_mac) {
                (None, 0) => {}
                (Some(t), 1) => {
                    let mac = r.bytes(MAC_LEN).map_err(Attempt::Fatal)?;
                    if !wire::verify_mac(t, &[b"welcome", &nonce_c, &nonce_s], mac) {
                        return Err(Attempt::Fatal(BootstrapError::TokenMismatch {
                            peer: root,
                            detail: "rank 0 could not prove it knows the token".into(),
                        }));
                    }
                }
                (Some(_), _) => {
                    return Err(Attempt::Fatal(BootstrapError::TokenMismatch {
                        peer: root,
                        detail: format!("this rank has a token ({TOKEN_VAR}) but rank 0 has none"),
                    }))
                }
                (None, _) => {
                    return Err(Attempt::Fatal(BootstrapError::TokenMismatch {
                        peer: root,
                        detail: format!("rank 0 has a token ({TOKEN_VAR}) but this rank has none"),
                    }))
                }
            }
        }
        Kind::Reject => return Err(reject_error(info.rank, &payload, root)),
        Kind::Abort => return Err(Attempt::Fatal(abort_error(&payload, root, "the rendezvous"))),
        other => return Err(protocol(format!("expected a welcome, got {other:?}"))),
    }
    let rv = Rendezvous::assemble(
        info.clone(),
        opts,
        Role::Leaf(Conn { rank: 0, addr, stream }),
        0,
        Vec::new(),
    );
    let barrier_deadline = Instant::now()
        + opts
            .handshake_timeout
            .max(deadline.saturating_duration_since(Instant::now()))
        + grace;
    closing_barrier(rv, barrier_deadline).map_err(Attempt::Fatal)
}

fn reject_error(rank: usize, payload: &[u8], root: Peer) -> Attempt {
    let reason = RejectReason::from_code(payload.first().copied().unwrap_or(0));
    let message = String::from_utf8_lossy(payload.get(1..).unwrap_or_default()).into_owned();
    if reason == RejectReason::Busy {
        return Attempt::Retry(std::io::Error::other(format!("{root} is busy: {message}")));
    }
    Attempt::Fatal(BootstrapError::Rejected { rank, reason, message })
}

// ---------------------------------------------------------------------------------------------------------
// Through a c10d TCPStore (torchrun's agent store).

fn abort_key(prefix: &str) -> String {
    format!("{prefix}/abort")
}

fn store_op_key(prefix: &str, seq: u64, rank: usize) -> String {
    format!("{prefix}/op/{seq}/{rank}")
}

/// The ranks among `keys` (key `r` belongs to rank `r`) that are not in the store yet.
fn missing_ranks(client: &mut StoreClient, keys: &[String]) -> Vec<usize> {
    let deadline = Instant::now() + Duration::from_secs(2);
    (0..keys.len())
        .filter(|&r| !matches!(client.check(std::slice::from_ref(&keys[r]), deadline), Ok(true)))
        .collect()
}

fn store_join(info: &RankInfo, opts: RendezvousOptions, prefix: String) -> Result<Rendezvous, BootstrapError> {
    opts.check()?;
    let start = Instant::now();
    let deadline = start + opts.timeout;
    let addrs = resolve(&info.master_addr, info.master_port)?;
    let mut client = StoreClient::connect(&addrs, info.rank, opts.max_frame, deadline)?;
    let claims = client.add(&format!("{prefix}/join/{}/claims", info.rank), 1, deadline)?;
    if claims > 1 {
        return Err(BootstrapError::DuplicateRank {
            rank: info.rank,
            first: Peer::Rank {
                rank: info.rank,
                addr: None,
            },
            second: Peer::Rank {
                rank: info.rank,
                addr: None,
            },
        });
    }
    let keys: Vec<String> = (0..info.world_size).map(|r| format!("{prefix}/join/{r}")).collect();
    client.set(&keys[info.rank], &(info.world_size as u64).to_le_bytes(), deadline)?;
    let waited = client.wait_or_cancel(
        &keys,
        &abort_key(&prefix),
        deadline,
        "the rendezvous",
        opts.cancel.as_ref(),
        |c| format!("ranks {:?}", missing_ranks(c, &keys)),
    );
    if let Err(e) = waited {
        if let BootstrapError::Cancelled { .. } = &e {
            // The others would wait out their timeout for this rank: tell them (best effort).
            let why = format!("rank {} failed: {e}", info.rank);
            let _ = client.set(
                &abort_key(&prefix),
                why.as_bytes(),
                Instant::now() + Duration::from_secs(2),
            );
        }
        return Err(match e {
            BootstrapError::Timeout { .. } => BootstrapError::RanksMissing {
                missing: missing_ranks(&mut client, &keys),
                world_size: info.world_size,
                elapsed: start.elapsed(),
                rejected: Vec::new(),
            },
            other => other,
        });
    }
    for (r, v) in client.multi_get(&keys, deadline)?.into_iter().enumerate() {
        let theirs = <[u8; 8]>::try_from(v.as_slice()).map_or(u64::MAX, u64::from_le_bytes);
        if theirs != info.world_size as u64 {
            return Err(BootstrapError::WorldSizeMismatch {
                peer: Peer::Rank { rank: r, addr: None },
                theirs,
                ours: info.world_size,
            });
        }
    }
    Ok(Rendezvous::assemble(
        info.clone(),
        &opts,
        Role::Store(client, prefix),
        1,
        Vec::new(),
    ))
}

/// Every operation is an all-gather of `[op, payload]` (the payload only where it is needed), so each rank
/// sees the others' operations.
#[allow(clippy::too_many_arguments)]
fn store_collective(
    client: &mut StoreClient,
    prefix: &str,
    rank: usize,
    size: usize,
    op: Op,
    seq: u64,
    data: &[u8],
    deadline: Instant,
) -> Result<Vec<Vec<u8>>, BootstrapError> {
    let during = op_label(op, seq);
    let mut mine = vec![op as u8];
    if op == Op::AllGather || (op == Op::Broadcast && rank == 0) {
        mine.extend_from_slice(data);
    }
    let keys: Vec<String> = (0..size).map(|r| store_op_key(prefix, seq, r)).collect();
    client.set(&keys[rank], &mine, deadline)?;
    client.wait(&keys, &abort_key(prefix), deadline, &during, |c| {
        format!("ranks {:?}", missing_ranks(c, &keys))
    })?;
    let mut values = client.multi_get(&keys, deadline)?;
    for (r, v) in values.iter().enumerate() {
        let theirs = v.first().copied().unwrap_or(0);
        if theirs != op as u8 {
            return Err(BootstrapError::OpMismatch {
                rank,
                peer: Peer::Rank { rank: r, addr: None },
                theirs: match Op::from_u8(theirs) {
                    Some(o) => op_label(o, seq),
                    None => format!("unknown operation {theirs} #{seq}"),
                },
                ours: during,
            });
        }
    }
    Ok(match op {
        Op::Barrier => Vec::new(),
        Op::Broadcast => vec![values.swap_remove(0).split_off(1)],
        Op::AllGather => values.into_iter().map(|mut v| v.split_off(1)).collect(),
    })
}
