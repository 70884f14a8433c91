//! Direct collectives between threads: every rank reads and writes the other ranks' buffers in place.
//!
//! # Protocol and soundness
//! 1. Each rank publishes pointers to its buffers (and its `PreMulSum` scalar) in its record, then arrives
//!    at an *opening* barrier (breakable: it may fail by timeout, abort or a dropped peer).
//! 2. If, and only if, the opening barrier completed, every rank enters the *data phase*. Completion and
//!    failure of a barrier phase are decided by a single atomic word (`sync.rs`), so either no rank enters
//!    the data phase (everyone returns an error, nobody touched another rank's memory) or all ranks do.
//! 3. In the data phase each rank reads other ranks' `send` buffers and writes a part of other ranks'
//!    `recv` buffers chosen so that, across all ranks, **every element written is written by exactly one
//!    rank and read by no other rank** during the phase (stated per operation below). Reads of shared
//!    inputs by several ranks are fine. No rank waits on anything during the phase, so it ends in bounded
//!    time.
//! 4. Every rank then arrives at a *closing* barrier that is **not breakable and has no deadline**, and
//!    only returns after it completed, i.e. after every rank finished its data phase. The arrival is made
//!    by a guard's `Drop`, so it also happens when the data phase unwinds from a panic. Hence no rank
//!    returns (and frees or reuses its buffers) while another might still access them. Waiting without a
//!    deadline is bounded because every rank that entered the data phase reaches the closing barrier
//!    after finite work (a dropped rank cannot be inside a call; a panicking one arrives from its guard;
//!    threads cannot die individually).
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
use super::slot::{rd, wr, Io};
use super::{HostComm, Sig};
use crate::error::Result;
use crate::types::Elem;

/// Bytes of the per-rank accumulation buffer (stays in L1 while inputs stream through).
const BLOCK_BYTES: usize = 8 * 1024;

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
}

/// Arrives at the closing barrier when dropped (also during unwinding).
struct Closing<'a> {
    comm: &'a HostComm,
    phase: u64,
}

impl Drop for Closing<'_> {
    fn drop(&mut self) {
        // Streaming stores of the data phase become visible before the barrier publishes them.
        copy::fence();
        // A non-breakable barrier never fails and never gives up (module docs, step 4).
        let _ = self.comm.ctl().barrier(self.phase, false, "close");
    }
}

/// Runs steps 1-4 around `work`.
fn run<T: Elem>(comm: &HostComm, s: &Sig, io: Io<T>, scale: Option<f64>, work: impl FnOnce(&Peers<'_>)) -> Result<()> {
    let open = comm.next_phase();
    let close = comm.next_phase();
    let r = &comm.region;
    r.rank_word(comm.rank, rec::DESC)
        .store(io.send.expose_provenance() as u64, Release);
    r.rank_word(comm.rank, rec::DESC + 8)
        .store(io.recv.expose_provenance() as u64, Release);
    r.rank_word(comm.rank, rec::DESC + 16)
        .store(scale.unwrap_or(0.0).to_bits(), Release);
    r.rank_word(comm.rank, rec::DESC + 24)
        .store(scale.is_some() as u64, Release);
    comm.put_sig(open, s);
    comm.ctl().barrier(open, true, s.op.name())?;
    let guard = Closing { comm, phase: close };
    // All ranks read the same signatures, so all skip the data phase together on a mismatch.
    let verdict = comm.check_sigs(open, s.op.name());
    if verdict.is_ok() {
        work(&Peers { comm });
    }
    drop(guard);
    verdict
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
            unsafe { copy_out(dst.add(lo), src.add(lo), hi - lo, stream) };
        }
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
            unsafe {
                copy_out(p.recv::<T>(j).add(comm.rank * count), io.send, count, stream);
            }
        }
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
            // SAFETY: own recv (count elements), written only by this rank.
            unsafe { wr(io.recv.add(at), len).copy_from_slice(a) };
            at += len;
        }
    })
}

/// all_to_all: rank `r` copies block `r` of every input into block `j` of its own output (out of place).
pub(super) fn all_to_all<T: Elem>(comm: &HostComm, s: &Sig, io: Io<T>) -> Result<()> {
    let (n, count) = (comm.n, s.count);
    run(comm, s, io, None, |p| {
        for j in 0..n {
            // SAFETY: sends and recvs hold `n * count` elements; this rank's recv is written only by itself
            // and is not anyone's send (out of place, distinct borrows).
            unsafe {
                wr(io.recv.add(j * count), count).copy_from_slice(rd(p.send::<T>(j).add(comm.rank * count), count))
            };
        }
    })
}

/// scatter: rank `r` copies block `r` of the root's input into its own output.
pub(super) fn scatter<T: Elem>(comm: &HostComm, s: &Sig, io: Io<T>) -> Result<()> {
    let count = s.count;
    run(comm, s, io, None, |p| {
        // SAFETY: the root's send holds `n * count` elements (read only); own recv written only by itself.
        unsafe { wr(io.recv, count).copy_from_slice(rd(p.send::<T>(s.root).add(comm.rank * count), count)) };
    })
}
