//! Direct collectives between threads: every rank reads and writes the other ranks' buffers in place.
//!
//! # Protocol and soundness
//! 1. Each rank publishes pointers to its buffers (and its `PreMulSum` scalar) in its record and its
//!    *stamp* for the opening phase (op, type, count, root, reduction, phase number, "direct open"), then
//!    arrives at an *opening* barrier (breakable: it may fail by timeout, abort or a dropped peer).
//! 2. If the opening barrier completed, every rank compares all stamps of that phase. Completion and
//!    failure of a barrier phase are decided by a single atomic word (`sync.rs`), and every rank stamps
//!    every phase it passes (collective rounds, barriers, both phases here), so after the phase all ranks
//!    read the same stamps, written for this very phase, and reach the same verdict. On a mismatch every
//!    rank returns the error at once: nobody enters the data phase, nobody touches another rank's memory,
//!    and nobody waits for a closing phase (a peer on the staged path, or in a barrier, would never come).
//!    Only when every rank stamped the same direct call does every rank enter the *data phase*.
//! 3. In the data phase each rank reads other ranks' `send` buffers and writes a part of other ranks'
//!    `recv` buffers chosen so that, across all ranks, **every element written is written by exactly one
//!    rank and read by no other rank** during the phase (stated per operation below). Reads of shared
//!    inputs by several ranks are fine. No rank waits on anything during the phase; between blocks it
//!    checks whether the communicator broke (abort, timeout, panic) and, if so, stops early.
//! 4. Every rank then stamps the *closing* phase (with whether it finished its part) and arrives at it. The
//!    closing wait ([`Wait::Drain`]) ignores the broken bit and returns only after every rank arrived, i.e.
//!    after every rank finished or stopped its data phase, so no rank returns (and frees or reuses its
//!    buffers) while another might still access them. It is bounded: every rank in the data phase arrives
//!    after finite work (a dropped rank cannot be inside a call; a panicking one arrives from its guard's
//!    `Drop`; threads cannot die individually), and on the timeout the waiter breaks the communicator, so
//!    the others stop at their next block. The call succeeds on every rank iff every closing stamp says
//!    "finished"; otherwise it fails on every rank with the failure that stopped someone.
//!
//! The buffers themselves: each rank's slices are borrowed for the whole call (both barriers included),
//! so they stay allocated; Rust's borrow rules guarantee that different ranks' buffers do not overlap
//! (a `&mut` recv of one thread cannot alias any live borrow of another), and a rank's own send/recv
//! alias only in the in-place forms, handled below. Pointers travel through the region as integers with
//! exposed provenance.

use std::sync::atomic::Ordering::{Acquire, Release};

use super::copy::{self, copy_out, STREAM_MIN_BYTES};
use super::reduce::{self, Plan};
use super::region::rec;
use super::slot::{rd, Io};
use super::sync::{Kind, Wait};
use super::{HostComm, Sig, Step};
use crate::error::Result;
use crate::types::Elem;

/// Bytes of the per-rank accumulation buffer (stays in L1 while inputs stream through).
const BLOCK_BYTES: usize = 8 * 1024;
/// Bytes copied between two checks of the broken bit in the data phase.
const PIECE_BYTES: usize = 256 * 1024;

/// The other ranks' published buffers.
struct Peers<'a> {
    comm: &'a HostComm,
}

impl Peers<'_> {
    fn send<T>(&self, j: usize) -> *const T {
        std::ptr::with_exposed_provenance(self.comm.region.rank_word(j, rec::DESC).load(Acquire) as usize)
    }
    fn recv<T>(&self, j: usize) -> *mut T {
        std::ptr::with_exposed_provenance_mut(self.comm.region.rank_word(j, rec::DESC + 8).load(Acquire) as usize)
    }
    fn scale(&self, j: usize) -> Option<f64> {
        let has = self.comm.region.rank_word(j, rec::DESC + 24).load(Acquire);
        (has != 0).then(|| f64::from_bits(self.comm.region.rank_word(j, rec::DESC + 16).load(Acquire)))
    }
    /// True when the communicator broke: the data phase stops at the next block (module docs, step 3).
    fn stop(&self) -> bool {
        self.comm.ctl().is_broken()
    }

    /// Copies `len` elements from `src` to `dst` in pieces, checking [`Peers::stop`] before each; false if
    /// it stopped early.
    ///
    /// # Safety
    /// As [`copy_out`].
    unsafe fn copy<T>(&self, dst: *mut T, src: *const T, len: usize, stream: bool) -> bool {
        let piece = (PIECE_BYTES / std::mem::size_of::<T>().max(1)).max(1);
        let mut at = 0;
        while at < len {
            if self.stop() {
                return false;
            }
            let l = piece.min(len - at);
            // SAFETY: `at + l <= len`: inside both ranges of the caller's contract.
            unsafe { copy_out(dst.add(at), src.add(at), l, stream) };
            at += l;
        }
        true
    }
}

/// The closing phase (module docs, step 4): [`Closing::close`] on the normal path, its `Drop` when the data
/// phase unwinds from a panic (then it breaks the communicator first, so the peers stop early).
struct Closing<'a> {
    comm: &'a HostComm,
    sig: &'a Sig,
    phase: u64,
    armed: bool,
}

impl Closing<'_> {
    fn arrive(&mut self, finished: bool) -> Result<()> {
        self.armed = false;
        // Streaming stores of the data phase become visible before the barrier publishes them.
        copy::fence();
        let op = self.sig.op.name();
        self.comm
            .put_stamp(self.phase, &self.sig.stamp(self.phase, Step::Close(finished)));
        // A draining wait always completes (`Wait::Drain`); the verdict is in the stamps.
        let _ = self.comm.ctl().barrier(self.phase, Wait::Drain, op);
        self.comm.check_stamps(self.phase, op)
    }

    fn close(mut self, finished: bool) -> Result<()> {
        self.arrive(finished)
    }
}

impl Drop for Closing<'_> {
    fn drop(&mut self) {
        if self.armed {
            let c = self.comm;
            c.ctl()
                .break_comm(Kind::Gone, c.rank, "the rank panicked during a collective");
            let _ = self.arrive(false);
        }
    }
}

/// Runs steps 1-4 around `work`, which returns false when it stopped early.
fn run<T: Elem>(
    comm: &HostComm,
    s: &Sig,
    io: Io<T>,
    scale: Option<f64>,
    work: impl FnOnce(&Peers<'_>) -> bool,
) -> Result<()> {
    let open = comm.enter(s.op.name())?;
    let r = &comm.region;
    r.rank_word(comm.rank, rec::DESC)
        .store(io.send.expose_provenance() as u64, Release);
    r.rank_word(comm.rank, rec::DESC + 8)
        .store(io.recv.expose_provenance() as u64, Release);
    r.rank_word(comm.rank, rec::DESC + 16)
        .store(scale.unwrap_or(0.0).to_bits(), Release);
    r.rank_word(comm.rank, rec::DESC + 24)
        .store(scale.is_some() as u64, Release);
    comm.put_stamp(open, &s.stamp(open, Step::Open));
    comm.ctl().barrier(open, Wait::Breakable, s.op.name())?;
    // Same stamps on every rank, same verdict: on a mismatch all return here, before any data access and
    // without a closing phase (step 2).
    comm.check_stamps(open, s.op.name())?;
    let guard = Closing {
        comm,
        sig: s,
        phase: comm.next_phase(),
        armed: true,
    };
    let finished = work(&Peers { comm });
    guard.close(finished)
}

/// Start of part `i` of `n` of `count` elements, aligned to 64 bytes so ranks do not share cache lines.
fn split<T>(count: usize, n: usize, i: usize) -> usize {
    if i >= n {
        return count;
    }
    let unit = (64 / std::mem::size_of::<T>()).max(1) as u128;
    let at = (count as u128 * i as u128 / n as u128) / unit * unit;
    at as usize
}

fn block<T>() -> usize {
    (BLOCK_BYTES / std::mem::size_of::<T>()).max(1)
}

/// all_reduce (`all`) / reduce: rank `r` reduces elements `split(r)..split(r+1)` of every input and writes
/// them to every output (reduce: the root's only). Exclusive writer of that range in every output; in place,
/// the range of each buffer is read by rank `r` only (into `acc`, before it writes it back).
pub(super) fn reduce<T: Elem>(comm: &HostComm, s: &Sig, io: Io<T>, plan: Plan, all: bool) -> Result<()> {
    let (n, count) = (comm.n, s.count);
    run(comm, s, io, plan.scale, |p| {
        let (lo, hi) = (split::<T>(count, n, comm.rank), split::<T>(count, n, comm.rank + 1));
        let mut acc = vec![T::default(); block::<T>().min(hi - lo)];
        let outs = if all { n } else { 1 };
        let stream = outs * count * std::mem::size_of::<T>() >= STREAM_MIN_BYTES;
        let mut at = lo;
        while at < hi {
            if p.stop() {
                return false;
            }
            let len = acc.len().min(hi - at);
            let a = &mut acc[..len];
            // SAFETY: every rank's send holds `count` elements and `at + len <= count`; the range is read
            // here only by this rank and written by nobody but (in place) this rank below.
            unsafe {
                reduce::load(a, rd(p.send::<T>(0).add(at), len), p.scale(0));
                for j in 1..n {
                    reduce::combine(a, rd(p.send::<T>(j).add(at), len), plan.red, p.scale(j));
                }
            }
            reduce::finish(a, plan.div);
            for j in 0..n {
                if all || j == s.root {
                    // SAFETY: rank j's recv holds `count` elements; this rank is the only one touching this
                    // range of it during the phase (partition by `split`).
                    unsafe { copy_out(p.recv::<T>(j).add(at), a.as_ptr(), len, stream) };
                }
            }
            at += len;
        }
        true
    })
}

/// broadcast: rank `r` copies part `r` of the root's input to every output, skipping the root's output in
/// place (it is the input). Exclusive writer of part `r` of each output; the input is only read.
pub(super) fn broadcast<T: Elem>(comm: &HostComm, s: &Sig, io: Io<T>) -> Result<()> {
    let (n, count) = (comm.n, s.count);
    run(comm, s, io, None, |p| {
        let (lo, hi) = (split::<T>(count, n, comm.rank), split::<T>(count, n, comm.rank + 1));
        let src = p.send::<T>(s.root);
        let stream = n * count * std::mem::size_of::<T>() >= STREAM_MIN_BYTES;
        for j in 0..n {
            let dst = p.recv::<T>(j);
            if std::ptr::eq(dst, src) {
                continue;
            }
            // SAFETY: root's send and every recv hold `count` elements; part `lo..hi` of `dst` is written
            // only by this rank; `dst` does not overlap the root's send (distinct borrows, see module docs).
            if !unsafe { p.copy(dst.add(lo), src.add(lo), hi - lo, stream) } {
                return false;
            }
        }
        true
    })
}

/// all_gather / gather: rank `r` copies its own input to block `r` of every output (gather: the root's).
/// Exclusive writer of block `r` everywhere; in place, block `r` of rank `r`'s buffer is its input and is
/// skipped, and block `r` of other buffers is not anyone's input.
pub(super) fn gather<T: Elem>(comm: &HostComm, s: &Sig, io: Io<T>, in_place: bool) -> Result<()> {
    let (n, count) = (comm.n, s.count);
    let all = s.op == crate::counts::Op::AllGather;
    let stream = n * n * count * std::mem::size_of::<T>() >= STREAM_MIN_BYTES;
    run(comm, s, io, None, |p| {
        for j in 0..n {
            if !(all || j == s.root) || (in_place && j == comm.rank) {
                continue;
            }
            // SAFETY: rank j's recv holds `n * count` elements; block `rank` is written only by this rank;
            // this rank's send (count elements) is read-only during the phase.
            if !unsafe { p.copy(p.recv::<T>(j).add(comm.rank * count), io.send, count, stream) } {
                return false;
            }
        }
        true
    })
}

/// reduce_scatter: rank `r` reduces block `r` of every input into its own output. It is the only writer
/// of its output; in place, its output is block `r` of its own input, which only rank `r` reads.
pub(super) fn reduce_scatter<T: Elem>(comm: &HostComm, s: &Sig, io: Io<T>, plan: Plan) -> Result<()> {
    let (n, count) = (comm.n, s.count);
    run(comm, s, io, plan.scale, |p| {
        let base = comm.rank * count;
        let mut acc = vec![T::default(); block::<T>().min(count)];
        let mut at = 0;
        while at < count {
            if p.stop() {
                return false;
            }
            let len = acc.len().min(count - at);
            let a = &mut acc[..len];
            // SAFETY: every send holds `n * count` elements; block `rank` is read by this rank only.
            unsafe {
                reduce::load(a, rd(p.send::<T>(0).add(base + at), len), p.scale(0));
                for j in 1..n {
                    reduce::combine(a, rd(p.send::<T>(j).add(base + at), len), plan.red, p.scale(j));
                }
            }
            reduce::finish(a, plan.div);
            // SAFETY: own recv (count elements), written only by this rank; `a` is a separate buffer.
            unsafe { copy_out(io.recv.add(at), a.as_ptr(), len, false) };
            at += len;
        }
        true
    })
}

/// all_to_all: rank `r` copies block `r` of every input into block `j` of its own output (out of place).
pub(super) fn all_to_all<T: Elem>(comm: &HostComm, s: &Sig, io: Io<T>) -> Result<()> {
    let (n, count) = (comm.n, s.count);
    run(comm, s, io, None, |p| {
        for j in 0..n {
            // SAFETY: sends and recvs hold `n * count` elements; this rank's recv is written only by itself
            // and is not anyone's send (out of place, distinct borrows).
            if !unsafe {
                p.copy(
                    io.recv.add(j * count),
                    p.send::<T>(j).add(comm.rank * count),
                    count,
                    false,
                )
            } {
                return false;
            }
        }
        true
    })
}

/// scatter: rank `r` copies block `r` of the root's input into its own output.
pub(super) fn scatter<T: Elem>(comm: &HostComm, s: &Sig, io: Io<T>) -> Result<()> {
    let count = s.count;
    run(comm, s, io, None, |p| {
        // SAFETY: the root's send holds `n * count` elements (read only); own recv written only by itself.
        unsafe { p.copy(io.recv, p.send::<T>(s.root).add(comm.rank * count), count, false) }
    })
}
