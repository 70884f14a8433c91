//! The host (CPU) backend: NCCL's collectives over host memory, ranks as threads or processes.
//!
//! [`HostComm`] implements [`Collectives`] with `Buf<T> = [T]`, with NCCL's count and in-place rules
//! (checked by [`crate::counts`], so bad input gets the same errors as on the NCCL backend) and every
//! [`Elem`] type. Create one per rank with [`HostComm::threads`] (ranks are threads of this process) or
//! [`HostComm::from_rendezvous`] (ranks are processes on this host, sharing a `/dev/shm` segment).
//!
//! # How data moves
//! - **Staged** (messages under 16 KiB; every message between processes that cannot attach to each
//!   other's memory): each rank copies its part into its slot of the shared region, one barrier, then
//!   every rank reads what it needs from the slots. Slots alternate between two buffers by barrier phase, so one barrier per round suffices. Large
//!   messages are pipelined in rounds of one slot.
//! - **Direct** (messages of at least [`HostOptions::direct_min_bytes`]; between processes through the
//!   kernel's cross-memory attach, `process_vm_readv`/`writev`, probed at creation): ranks publish pointers
//!   to their buffers, pass a barrier, and each rank works on its share of the output reading the other
//!   ranks' buffers in place (all-reduce: rank `r` reduces chunk `r` of every input and writes it to every
//!   output, the minimum of 4 bytes of memory traffic per byte reduced for 2 ranks); a closing barrier
//!   keeps every buffer alive until nobody reads it any more (see `direct.rs`).
//! - **Send/recv**: a two-buffer channel per ordered pair of ranks.
//!
//! # Accumulation
//! Integers wrap (as on the GPU); `f32`/`f64` round after every step; `f16`, `bf16` and fp8 compute each
//! step in `f32` and round back to the type (NCCL rounds per hop too); `PreMulSum(s)` converts `s` to the
//! element type and multiplies each rank's input by its own rank's scalar; `avg` is the sum divided by the
//! number of ranks (integers: truncating, as NCCL's `SumPostDiv`; floats: NCCL pre-multiplies by `1/n` in
//! the element type, which can differ from ours by a couple of ULP). The order of the reduction over ranks
//! is rank 0, 1, 2, ..., so results are bitwise reproducible for a given world size.
//!
//! # Failures
//! A rank that is dropped (returns early, panics) or whose process dies breaks the communicator: every
//! rank's current and future calls fail with [`Error::PeerFailed`] naming it, promptly. A call that waits
//! longer than [`HostOptions::timeout`] gives up with [`Error::Timeout`] naming the ranks that never
//! arrived, and breaks the communicator for everyone. [`HostComm::abort`] breaks it with
//! [`Error::Aborted`]. A broken communicator stays broken (as NCCL's after an error); make a new one.
//!
//! Calls that do not match across ranks (op, type, count, root, reduction, or a barrier against a
//! collective) fail on every rank with [`Error::InvalidArgument`] naming both calls, before any data moves:
//! every barrier phase is stamped by every rank with the call, the phase number and the step, and all stamps
//! of a phase are checked after it. Every collective or barrier either succeeds on every rank or fails on
//! every rank that makes it; no wait outlasts the timeout by more than one block of a peer's work
//! (`direct.rs`, step 4).

mod cma;
mod copy;
mod direct;
mod p2p;
mod reduce;
mod region;
mod shm;
mod slot;
mod sync;

use std::cell::Cell;
use std::sync::atomic::Ordering::Release;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::Collectives;
use crate::counts::{self, Lens, Op};
use crate::error::{Error, Result};
use crate::types::{Elem, ReduceOp};
use region::{rec, Geometry, Region};
use sync::{Ctl, Kind};

/// Environment variable that overrides the default [`HostOptions::timeout`] (milliseconds).
pub const TIMEOUT_ENV: &str = "NCCL_RS_HOST_TIMEOUT_MS";

/// Options of a host communicator.
#[derive(Clone, Debug)]
pub struct HostOptions {
    /// How long a call waits for other ranks before it gives up with [`Error::Timeout`]. Default 60 s, or
    /// `NCCL_RS_HOST_TIMEOUT_MS` milliseconds when that variable is set.
    pub timeout: Duration,
    /// Bytes of each rank's staging slot (two per rank). `None` picks a size from the world size (1 MiB for
    /// 2 ranks, smaller for larger worlds). Small values force many pipelined rounds (useful in tests).
    /// In processes mode rank 0's value is used by everyone.
    pub slot_bytes: Option<usize>,
    /// Messages of at least this many bytes (per rank's largest buffer) are moved by direct access
    /// between ranks' buffers instead of being staged: between threads by loads and stores, between
    /// processes by cross-memory attach when it works (see [`HostComm::uses_cross_memory_attach`]). `0` =
    /// always direct, `usize::MAX` = never. Default 16 KiB (below that, one barrier of the staged path beats
    /// the two of the direct path). In processes mode rank 0's value is used by everyone.
    pub direct_min_bytes: usize,
    /// Processes mode: messages of more than this many bytes are staged even when cross-memory attach
    /// works. Default 8 MiB: on the 2-core VM this was tuned on (`bench/host/run.sh`), the kernel's copy
    /// beat staging from 256 KiB to 4 MiB and lost from 16 MiB (staging streams its stores, the kernel does
    /// not). `usize::MAX` = no limit. Rank 0's value is used by everyone. Threads ignore it.
    pub cma_max_bytes: usize,
}

impl Default for HostOptions {
    fn default() -> Self {
        let timeout = std::env::var(TIMEOUT_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(60));
        HostOptions {
            timeout,
            slot_bytes: None,
            direct_min_bytes: 16 * 1024,
            cma_max_bytes: 8 << 20,
        }
    }
}

/// One rank of a host communicator. Send, not Sync: one thread drives a rank at a time, as with NCCL.
///
/// Dropping it marks the rank failed for the others (see the [module docs](self)).
pub struct HostComm {
    region: Arc<Region>,
    rank: usize,
    n: usize,
    opts: HostOptions,
    procs: bool,
    /// Processes mode: every rank can reach every other's memory by cross-memory attach (probed at
    /// creation), so direct collectives are used between processes too.
    cma: bool,
    /// Barrier phases this rank has entered (see `sync.rs`).
    phase: Cell<u64>,
}

/// Aborts a host communicator from any thread (e.g. a watchdog). Cloneable, Send and Sync.
#[derive(Clone)]
pub struct AbortHandle {
    region: Arc<Region>,
    rank: usize,
    n: usize,
    procs: bool,
}

impl AbortHandle {
    /// Breaks the communicator: every rank's current and future calls fail with [`Error::Aborted`].
    #[doc(alias = "ncclCommAbort")]
    pub fn abort(&self) {
        let ctl = Ctl {
            region: &self.region,
            rank: self.rank,
            n: self.n,
            timeout: Duration::ZERO,
            procs: self.procs,
        };
        ctl.break_comm(Kind::Aborted, self.rank, "aborted");
    }
}

impl std::fmt::Debug for HostComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostComm")
            .field("rank", &self.rank)
            .field("size", &self.n)
            .field("processes", &self.procs)
            .finish_non_exhaustive()
    }
}

impl HostComm {
    /// Creates a communicator of `nranks` ranks living in this process: returns one `HostComm` per rank,
    /// in rank order; move each into its own thread.
    #[doc(alias = "ncclCommInitAll")]
    pub fn threads(nranks: usize, opts: HostOptions) -> Result<Vec<HostComm>> {
        if nranks == 0 {
            return Err(Error::invalid(
                "HostComm::threads",
                "a communicator needs at least one rank",
            ));
        }
        if nranks > u32::MAX as usize / 2 {
            return Err(Error::invalid(
                "HostComm::threads",
                format!("{nranks} ranks is too many"),
            ));
        }
        let geo = Geometry::for_ranks(nranks, opts.slot_bytes);
        let region = Arc::new(Region::heap(geo).map_err(|e| Error::io("HostComm::threads", e))?);
        for r in 0..nranks {
            region.rank_word(r, rec::ALIVE).store(1, Release);
        }
        Ok((0..nranks)
            .map(|rank| HostComm {
                region: region.clone(),
                rank,
                n: nranks,
                opts: opts.clone(),
                procs: false,
                cma: false,
                phase: Cell::new(0),
            })
            .collect())
    }

    /// Joins a communicator whose ranks are processes on this host, set up through the bootstrap's
    /// rendezvous: rank 0 creates a shared-memory segment, every rank maps it, and the name is unlinked as
    /// soon as everyone has it (nothing is left in `/dev/shm`, even after a crash).
    pub fn from_rendezvous(rv: &crate::bootstrap::Rendezvous, opts: HostOptions) -> Result<HostComm> {
        let (joined, rank, n) = shm::join(rv, &opts)?;
        let mut opts = opts;
        let word = |o| joined.region.word(o).load(std::sync::atomic::Ordering::Acquire) as usize;
        opts.direct_min_bytes = word(region::off::DIRECT);
        opts.cma_max_bytes = word(region::off::CMA_MAX);
        Ok(HostComm {
            region: Arc::new(joined.region),
            rank,
            n,
            opts,
            procs: true,
            cma: joined.cma,
            phase: Cell::new(0),
        })
    }

    /// Breaks the communicator: every rank's current and future calls fail ([`Error::Aborted`]); nobody
    /// hangs. Calls already moving data between threads finish their (bounded) copy first.
    #[doc(alias = "ncclCommAbort")]
    pub fn abort(&self) {
        self.abort_handle().abort();
    }

    /// A handle that can abort this communicator from another thread.
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle {
            region: self.region.clone(),
            rank: self.rank,
            n: self.n,
            procs: self.procs,
        }
    }

    /// True when ranks are processes (shared memory), false when they are threads.
    pub fn is_multi_process(&self) -> bool {
        self.procs
    }

    /// True when the ranks are processes that move large messages by cross-memory attach
    /// (`process_vm_readv`/`process_vm_writev`: one copy, no staging); false for threads, and for processes
    /// when some rank could not attach to another at creation (another user, a ptrace restriction, a
    /// seccomp filter), which then stage everything through the shared segment.
    pub fn uses_cross_memory_attach(&self) -> bool {
        self.cma
    }

    /// The options this rank was created with (processes mode: with rank 0's `direct_min_bytes`).
    pub fn options(&self) -> &HostOptions {
        &self.opts
    }

    fn ctl(&self) -> Ctl<'_> {
        Ctl {
            region: &self.region,
            rank: self.rank,
            n: self.n,
            timeout: self.opts.timeout,
            procs: self.procs,
        }
    }

    fn next_phase(&self) -> u64 {
        let p = self.phase.get();
        self.phase.set(p + 1);
        p
    }

    /// The next phase, for a rank about to write its stamp, slot or descriptor for it; refused once the
    /// communicator is broken. Why this matters: the slot of phase `p` is safe to rewrite in phase `p + 2`
    /// only because phase `p + 1` completed (everybody finished reading `p`). A rank reaches `p + 2` without
    /// `p + 1` completing only when `p + 1` failed for it, and every failure of a phase sets the broken bit
    /// before the rank returns, so this check (program-ordered after that) stops it from overwriting what a
    /// slower peer may still be reading.
    fn enter(&self, op: &'static str) -> Result<u64> {
        let ctl = self.ctl();
        if ctl.is_broken() {
            return Err(ctl.failure(op, Duration::ZERO));
        }
        Ok(self.next_phase())
    }

    fn direct_ok(&self, bytes: usize) -> bool {
        let procs_ok = self.cma && bytes <= self.opts.cma_max_bytes;
        (!self.procs || procs_ok) && self.n > 1 && bytes >= self.opts.direct_min_bytes
    }
}

impl Drop for HostComm {
    /// Marks this rank gone (not the whole communicator broken: ranks still finishing point-to-point
    /// transfers with others are unaffected). Whoever waits for this rank, now or later, sees it and fails
    /// with [`Error::PeerFailed`]; parked waiters are woken to look.
    fn drop(&mut self) {
        let state = if std::thread::panicking() {
            rec::PANICKED
        } else {
            rec::DROPPED
        };
        self.region.rank_word(self.rank, rec::ALIVE).store(state, Release);
        sync::notify(&self.region);
    }
}

/// What every rank must agree on for one collective (compared after every barrier phase of the call).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sig {
    pub op: Op,
    pub dtype: crate::types::DataType,
    pub count: usize,
    pub root: usize,
    pub redop: u64,
}

/// Which barrier phase of a call a stamp is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Round `k` of a staged collective.
    Round(u64),
    /// The opening phase of a direct collective.
    Open,
    /// The closing phase of a direct collective; `true` when this rank finished its part of the data phase.
    Close(bool),
}

/// Op code of [`HostComm::barrier`] in a stamp (collectives use `Op as u64 + 1`).
const BARRIER: u64 = 64;
/// Words of a stamp.
const STAMP: usize = 6;
/// Step codes in stamp word 5 (bits 0..8), the round above them.
const ROUND: u64 = 1;
const OPEN: u64 = 2;
const CLOSE: u64 = 3;
const BAR: u64 = 4;
/// Stamp word 5: the rank finished its part of a direct data phase.
const COMPLETE: u64 = 1 << 8;

/// What a rank publishes for one barrier phase before it arrives: the call (op, type, count, root, reduction),
/// the phase number and the step of the call. Every phase is stamped, so after phase `p` completed, the slot
/// `p % 2` of every rank holds that rank's stamp *for phase `p`* (a rank writes it again only in phase
/// `p + 2`, after everybody arrived at `p + 1`, i.e. after everybody read it); the phase number makes a
/// stale stamp detectable even so.
pub(crate) type Stamp = [u64; STAMP];

impl Sig {
    pub(crate) fn stamp(&self, phase: u64, step: Step) -> Stamp {
        let step = match step {
            Step::Round(k) => ROUND | (k << 16),
            Step::Open => OPEN,
            Step::Close(done) => CLOSE | if done { COMPLETE } else { 0 },
        };
        [
            self.op as u64 + 1,
            self.dtype.raw() as u64 + 1,
            self.count as u64,
            (self.root as u64) | (self.redop << 32),
            phase + 1,
            step,
        ]
    }

    fn barrier_stamp(phase: u64) -> Stamp {
        [BARRIER, 0, 0, 0, phase + 1, BAR]
    }

    fn describe(w: &Stamp) -> String {
        if w[0] == BARRIER {
            return "barrier".to_string();
        }
        if w[0] == 0 {
            return "nothing (no stamp)".to_string();
        }
        let dtype = crate::types::DataType::ALL
            .iter()
            .find(|d| d.raw() as u64 + 1 == w[1])
            .map_or("?", |d| d.nccl_tests_name());
        let op = OPS.get((w[0] as usize).wrapping_sub(1)).map_or("?", |o| o.name());
        let step = match w[5] & 0xff {
            ROUND => format!("staged, round {}", w[5] >> 16),
            OPEN => "direct".to_string(),
            CLOSE => "direct, closing".to_string(),
            _ => "?".to_string(),
        };
        format!(
            "{op}(count {}, {dtype}, root {}, redop {}; {step})",
            w[2],
            w[3] & 0xffff_ffff,
            w[3] >> 32
        )
    }
}

const OPS: [Op; 10] = [
    Op::AllReduce,
    Op::Broadcast,
    Op::Reduce,
    Op::AllGather,
    Op::ReduceScatter,
    Op::AllToAll,
    Op::Gather,
    Op::Scatter,
    Op::Send,
    Op::Recv,
];

impl HostComm {
    fn stamp_base(phase: u64) -> usize {
        rec::SIG + (phase % 2) as usize * region::LINE
    }

    /// Publishes this rank's stamp for barrier phase `phase` (before arriving).
    fn put_stamp(&self, phase: u64, stamp: &Stamp) {
        let base = Self::stamp_base(phase);
        for (i, w) in stamp.iter().enumerate() {
            self.region.rank_word(self.rank, base + i * 8).store(*w, Release);
        }
    }

    fn read_stamp(&self, r: usize, phase: u64) -> Stamp {
        use std::sync::atomic::Ordering::Acquire;
        let base = Self::stamp_base(phase);
        std::array::from_fn(|i| self.region.rank_word(r, base + i * 8).load(Acquire))
    }

    /// After phase `phase` completed: checks that every rank stamped it as rank 0 did (and so as this rank,
    /// whose stamp is among them). All ranks read the same stamps, so all reach the same verdict; on a
    /// mismatch the communicator is broken (every later call fails too). Closing stamps that differ only
    /// in the completion bit (or all lack it) mean a data phase was cut short by a failure (abort, timeout,
    /// a panicking rank): the error is that failure.
    fn check_stamps(&self, phase: u64, op: &'static str) -> Result<()> {
        let first = self.read_stamp(0, phase);
        let closing = first[5] & 0xff == CLOSE;
        let mut cut_short = closing && first[5] & COMPLETE == 0;
        for r in 1..self.n {
            let w = self.read_stamp(r, phase);
            if w == first {
                continue;
            }
            if closing && w[..5] == first[..5] && (w[5] ^ first[5]) == COMPLETE {
                cut_short = true;
                continue;
            }
            let msg = if w[..4] == first[..4] && w[5] == first[5] {
                format!(
                    "ranks are out of step: rank 0 is at barrier phase {} but rank {r} at {} (in {})",
                    first[4].wrapping_sub(1),
                    w[4].wrapping_sub(1),
                    Sig::describe(&first)
                )
            } else {
                format!(
                    "ranks disagree on the collective: rank 0 called {} but rank {r} called {}",
                    Sig::describe(&first),
                    Sig::describe(&w)
                )
            };
            self.ctl().break_comm(Kind::Mismatch, r, &msg);
            return Err(Error::invalid(op, msg));
        }
        if cut_short {
            return Err(self.ctl().failure(op, std::time::Duration::ZERO));
        }
        Ok(())
    }
}

fn sig<T: Elem>(op: Op, count: usize, root: usize, redop: Option<ReduceOp>) -> Sig {
    Sig {
        op,
        dtype: T::DATA_TYPE,
        count,
        root,
        redop: redop.map_or(0, reduce::Plan::code),
    }
}

fn bytes<T>(count: usize) -> usize {
    count.saturating_mul(std::mem::size_of::<T>())
}

impl Collectives for HostComm {
    type Buf<T: Elem> = [T];

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.n
    }

    fn backend_name(&self) -> &'static str {
        "host"
    }

    fn buf_len<T: Elem>(buf: &[T]) -> usize {
        buf.len()
    }

    #[doc(alias = "ncclAllReduce")]
    fn all_reduce<T: Elem>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        let lens = Lens {
            send: Some(send.len()),
            recv: Some(recv.len()),
        };
        let count = counts::check(Op::AllReduce, self.n, self.rank, 0, lens)?;
        let s = sig::<T>(Op::AllReduce, count, 0, Some(op));
        let io = slot::Io {
            send: send.as_ptr(),
            recv: recv.as_mut_ptr(),
        };
        self.reduce_like(s, io, op, true)
    }

    #[doc(alias = "ncclAllReduce")]
    fn all_reduce_in_place<T: Elem>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let count = counts::check_in_place(Op::AllReduce, self.n, self.rank, 0, buf.len())?;
        let s = sig::<T>(Op::AllReduce, count, 0, Some(op));
        let p = buf.as_mut_ptr();
        self.reduce_like(s, slot::Io { send: p, recv: p }, op, true)
    }

    #[doc(alias = "ncclBroadcast")]
    fn broadcast<T: Elem>(&self, send: Option<&[T]>, recv: &mut [T], root: usize) -> Result<()> {
        let lens = Lens {
            send: send.map(<[T]>::len),
            recv: Some(recv.len()),
        };
        let count = counts::check(Op::Broadcast, self.n, self.rank, root, lens)?;
        let s = sig::<T>(Op::Broadcast, count, root, None);
        let send = if self.rank == root {
            send.map_or(std::ptr::null(), <[T]>::as_ptr)
        } else {
            std::ptr::null()
        };
        self.bcast(
            s,
            slot::Io {
                send,
                recv: recv.as_mut_ptr(),
            },
        )
    }

    #[doc(alias = "ncclBroadcast")]
    fn broadcast_in_place<T: Elem>(&self, buf: &mut [T], root: usize) -> Result<()> {
        let count = counts::check_in_place(Op::Broadcast, self.n, self.rank, root, buf.len())?;
        let s = sig::<T>(Op::Broadcast, count, root, None);
        let p = buf.as_mut_ptr();
        let send = if self.rank == root {
            p as *const T
        } else {
            std::ptr::null()
        };
        self.bcast(s, slot::Io { send, recv: p })
    }

    #[doc(alias = "ncclReduce")]
    fn reduce<T: Elem>(&self, send: &[T], recv: Option<&mut [T]>, op: ReduceOp, root: usize) -> Result<()> {
        let lens = Lens {
            send: Some(send.len()),
            recv: recv.as_ref().map(|r| r.len()),
        };
        let count = counts::check(Op::Reduce, self.n, self.rank, root, lens)?;
        let s = sig::<T>(Op::Reduce, count, root, Some(op));
        let recv = if self.rank == root {
            recv.map_or(std::ptr::null_mut(), <[T]>::as_mut_ptr)
        } else {
            std::ptr::null_mut()
        };
        self.reduce_like(
            s,
            slot::Io {
                send: send.as_ptr(),
                recv,
            },
            op,
            false,
        )
    }

    #[doc(alias = "ncclReduce")]
    fn reduce_in_place<T: Elem>(&self, buf: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        let count = counts::check_in_place(Op::Reduce, self.n, self.rank, root, buf.len())?;
        let s = sig::<T>(Op::Reduce, count, root, Some(op));
        let p = buf.as_mut_ptr();
        let recv = if self.rank == root { p } else { std::ptr::null_mut() };
        self.reduce_like(s, slot::Io { send: p, recv }, op, false)
    }

    #[doc(alias = "ncclAllGather")]
    fn all_gather<T: Elem>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let lens = Lens {
            send: Some(send.len()),
            recv: Some(recv.len()),
        };
        let count = counts::check(Op::AllGather, self.n, self.rank, 0, lens)?;
        let s = sig::<T>(Op::AllGather, count, 0, None);
        self.gather_like(
            s,
            slot::Io {
                send: send.as_ptr(),
                recv: recv.as_mut_ptr(),
            },
            false,
        )
    }

    #[doc(alias = "ncclAllGather")]
    fn all_gather_in_place<T: Elem>(&self, buf: &mut [T]) -> Result<()> {
        let count = counts::check_in_place(Op::AllGather, self.n, self.rank, 0, buf.len())?;
        let s = sig::<T>(Op::AllGather, count, 0, None);
        let p = buf.as_mut_ptr();
        // SAFETY: `rank * count <= len` because `len == n * count` and `rank < n`.
        let send = unsafe { p.add(counts::in_place_offset(self.rank, count)) };
        self.gather_like(s, slot::Io { send, recv: p }, true)
    }

    #[doc(alias = "ncclReduceScatter")]
    fn reduce_scatter<T: Elem>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        let lens = Lens {
            send: Some(send.len()),
            recv: Some(recv.len()),
        };
        let count = counts::check(Op::ReduceScatter, self.n, self.rank, 0, lens)?;
        let s = sig::<T>(Op::ReduceScatter, count, 0, Some(op));
        self.reduce_scatter_impl(
            s,
            slot::Io {
                send: send.as_ptr(),
                recv: recv.as_mut_ptr(),
            },
            op,
        )
    }

    #[doc(alias = "ncclReduceScatter")]
    fn reduce_scatter_in_place<T: Elem>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let count = counts::check_in_place(Op::ReduceScatter, self.n, self.rank, 0, buf.len())?;
        let s = sig::<T>(Op::ReduceScatter, count, 0, Some(op));
        let p = buf.as_mut_ptr();
        // SAFETY: `rank * count <= len` because `len == n * count` and `rank < n`.
        let recv = unsafe { p.add(counts::in_place_offset(self.rank, count)) };
        self.reduce_scatter_impl(s, slot::Io { send: p, recv }, op)
    }

    #[doc(alias = "ncclAlltoAll")]
    fn all_to_all<T: Elem>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let lens = Lens {
            send: Some(send.len()),
            recv: Some(recv.len()),
        };
        let count = counts::check(Op::AllToAll, self.n, self.rank, 0, lens)?;
        let s = sig::<T>(Op::AllToAll, count, 0, None);
        self.all_to_all_impl(
            s,
            slot::Io {
                send: send.as_ptr(),
                recv: recv.as_mut_ptr(),
            },
        )
    }

    #[doc(alias = "ncclGather")]
    fn gather<T: Elem>(&self, send: &[T], recv: Option<&mut [T]>, root: usize) -> Result<()> {
        let lens = Lens {
            send: Some(send.len()),
            recv: recv.as_ref().map(|r| r.len()),
        };
        let count = counts::check(Op::Gather, self.n, self.rank, root, lens)?;
        let s = sig::<T>(Op::Gather, count, root, None);
        let recv = if self.rank == root {
            recv.map_or(std::ptr::null_mut(), <[T]>::as_mut_ptr)
        } else {
            std::ptr::null_mut()
        };
        self.gather_like(
            s,
            slot::Io {
                send: send.as_ptr(),
                recv,
            },
            false,
        )
    }

    #[doc(alias = "ncclScatter")]
    fn scatter<T: Elem>(&self, send: Option<&[T]>, recv: &mut [T], root: usize) -> Result<()> {
        let lens = Lens {
            send: send.map(<[T]>::len),
            recv: Some(recv.len()),
        };
        let count = counts::check(Op::Scatter, self.n, self.rank, root, lens)?;
        let s = sig::<T>(Op::Scatter, count, root, None);
        let send = if self.rank == root {
            send.map_or(std::ptr::null(), <[T]>::as_ptr)
        } else {
            std::ptr::null()
        };
        self.scatter_impl(
            s,
            slot::Io {
                send,
                recv: recv.as_mut_ptr(),
            },
        )
    }

    #[doc(alias = "ncclSend")]
    fn send<T: Elem>(&self, buf: &[T], peer: usize) -> Result<()> {
        counts::check(
            Op::Send,
            self.n,
            self.rank,
            peer,
            Lens {
                send: Some(buf.len()),
                recv: None,
            },
        )?;
        if peer == self.rank {
            return Err(Error::invalid(
                "send",
                "send to self needs a matching recv in the same call: use send_recv",
            ));
        }
        let s = p2p::SendSide {
            peer,
            data: buf.as_ptr().cast(),
            bytes: bytes::<T>(buf.len()),
            dtype: T::DATA_TYPE,
            done: 0,
            started: false,
        };
        p2p::run(&self.ctl(), "send", Some(s), None)
    }

    #[doc(alias = "ncclRecv")]
    fn recv<T: Elem>(&self, buf: &mut [T], peer: usize) -> Result<()> {
        counts::check(
            Op::Recv,
            self.n,
            self.rank,
            peer,
            Lens {
                send: None,
                recv: Some(buf.len()),
            },
        )?;
        if peer == self.rank {
            return Err(Error::invalid(
                "recv",
                "recv from self needs a matching send in the same call: use send_recv",
            ));
        }
        let r = p2p::RecvSide {
            peer,
            data: buf.as_mut_ptr().cast(),
            bytes: bytes::<T>(buf.len()),
            dtype: T::DATA_TYPE,
            done: 0,
            started: false,
        };
        p2p::run(&self.ctl(), "recv", None, Some(r))
    }

    #[doc(alias = "ncclGroupStart")]
    fn send_recv<T: Elem>(&self, send: &[T], dst: usize, recv: &mut [T], src: usize) -> Result<()> {
        counts::check(
            Op::Send,
            self.n,
            self.rank,
            dst,
            Lens {
                send: Some(send.len()),
                recv: None,
            },
        )?;
        counts::check(
            Op::Recv,
            self.n,
            self.rank,
            src,
            Lens {
                send: None,
                recv: Some(recv.len()),
            },
        )?;
        match (dst == self.rank, src == self.rank) {
            (true, true) => {
                if send.len() != recv.len() {
                    return Err(Error::LengthMismatch {
                        op: "send_recv",
                        what: "recv buffer",
                        expected: send.len(),
                        actual: recv.len(),
                    });
                }
                if self.ctl().is_broken() {
                    return Err(self.ctl().failure("send_recv", Duration::ZERO));
                }
                recv.copy_from_slice(send);
                return Ok(());
            }
            (true, false) => {
                return Err(Error::invalid(
                    "send_recv",
                    "send to self needs the recv from self in the same call",
                ))
            }
            (false, true) => {
                return Err(Error::invalid(
                    "send_recv",
                    "recv from self needs the send to self in the same call",
                ))
            }
            (false, false) => {}
        }
        let s = p2p::SendSide {
            peer: dst,
            data: send.as_ptr().cast(),
            bytes: bytes::<T>(send.len()),
            dtype: T::DATA_TYPE,
            done: 0,
            started: false,
        };
        let r = p2p::RecvSide {
            peer: src,
            data: recv.as_mut_ptr().cast(),
            bytes: bytes::<T>(recv.len()),
            dtype: T::DATA_TYPE,
            done: 0,
            started: false,
        };
        p2p::run(&self.ctl(), "send_recv", Some(s), Some(r))
    }

    fn barrier(&self) -> Result<()> {
        let phase = self.enter("barrier")?;
        let stamp = Sig::barrier_stamp(phase);
        self.put_stamp(phase, &stamp);
        self.ctl().barrier(phase, sync::Wait::Breakable, "barrier")?;
        self.check_stamps(phase, "barrier")
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
