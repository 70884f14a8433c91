//! Direct collectives: every rank reads and writes the other ranks' buffers in place: between threads by
//! plain loads and stores, between processes through the kernel's cross-memory attach (`cma.rs`: one copy
//! per byte moved, where staging through the shared segment costs two), when every rank could attach to
//! every other at creation.
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
//!    the others stop at their next block. A rank *process* can die inside the phase (`kill -9`): the wait
//!    then ends, with that failure, once every rank missing is a process that exited (a process that exited
//!    accesses nothing any more; a stopped one is still waited for). The call succeeds on every rank iff every closing stamp says
//!    "finished"; otherwise it fails on every rank with the failure that stopped someone.
//!
//! The buffers themselves: each rank's slices are borrowed for the whole call (both barriers included),
//! so they stay allocated; Rust's borrow rules guarantee that different ranks' buffers do not overlap
//! (a `&mut` recv of one thread cannot alias any live borrow of another), and a rank's own send/recv
//! alias only in the in-place forms, handled below. Pointers travel through the region as integers with
//! exposed provenance. Between processes an address of another rank is never dereferenced: the kernel
//! checks and performs every access to it (an error there breaks the communicator, naming the rank), and
//! only this rank's own buffers are touched directly, so each copy has this process on at least one side.

use std::sync::atomic::Ordering::{Acquire, Release};

use super::cma;
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
/// Bytes of a reduction block between processes: one kernel transfer per block and peer, so larger (the
/// system call costs about as much as copying a few KiB), still inside L2.
const CMA_BLOCK_BYTES: usize = 64 * 1024;
/// Bytes copied between two checks of the broken bit in the data phase.
const PIECE_BYTES: usize = 256 * 1024;

/// Where a rank's buffer lives: rank `rank`'s address `addr` (in that rank's address space).
#[derive(Clone, Copy)]
struct At {
    rank: usize,
    addr: usize,
}

impl At {
    /// `n` elements of `T` further (integer arithmetic: the address may belong to another process).
    fn add<T>(self, n: usize) -> At {
        At {
            rank: self.rank,
            addr: self.addr.wrapping_add(n.wrapping_mul(std::mem::size_of::<T>())),
        }
    }
}

/// The ranks' published buffers, and how to move data between them: plain memory accesses between
/// threads and for a rank's own buffers; the kernel's cross-memory attach ([`cma`]) for another process's.
struct Peers<'a> {
    comm: &'a HostComm,
}

impl Peers<'_> {
    fn send(&self, j: usize) -> At {
        At {
            rank: j,
            addr: self.comm.region.rank_word(j, rec::DESC).load(Acquire) as usize,
        }
    }
    fn recv(&self, j: usize) -> At {
        At {
            rank: j,
            addr: self.comm.region.rank_word(j, rec::DESC + 8).load(Acquire) as usize,
        }
    }
    fn scale(&self, j: usize) -> Option<f64> {
        let has = self.comm.region.rank_word(j, rec::DESC + 24).load(Acquire);
        (has != 0).then(|| f64::from_bits(self.comm.region.rank_word(j, rec::DESC + 16).load(Acquire)))
    }
    /// True when the communicator broke: the data phase stops at the next block (module docs, step 3).
    fn stop(&self) -> bool {
        self.comm.ctl().is_broken()
    }
    /// True when `at` is in another process: reached through the kernel, never dereferenced.
    fn remote(&self, at: At) -> bool {
        self.comm.procs && at.rank != self.comm.rank
    }
    /// Elements per reduction block: in L1 between threads, larger between processes (one system call
    /// per block and peer).
    fn block<T>(&self) -> usize {
        let bytes = if self.comm.procs { CMA_BLOCK_BYTES } else { BLOCK_BYTES };
        (bytes / std::mem::size_of::<T>().max(1)).max(1)
    }

    /// One kernel transfer with rank `at.rank`'s process; on failure it breaks the communicator (naming the
    /// peer and the error) and returns false.
    ///
    /// # Safety
    /// As [`cma::transfer`].
    unsafe fn cma(&self, dir: cma::Dir, at: At, local: *mut u8, bytes: usize) -> bool {
        let pid = self.comm.region.rank_word(at.rank, rec::PID).load(Acquire) as i32;
        // SAFETY: forwarded.
        match unsafe { cma::transfer(dir, pid, local, at.addr, bytes) } {
            Ok(()) => true,
            Err(e) => {
                let msg = format!("{} with rank {} (process {pid}) failed: {e}", dir.name(), at.rank);
                self.comm.ctl().break_comm(Kind::Gone, at.rank, &msg);
                false
            }
        }
    }

    /// `len` elements of `src` as a slice: in place when it is this process's memory, else read into `tmp`
    /// (at least `len` long). `None` when the read failed (the communicator is then broken).
    ///
    /// # Safety
    /// `src` holds `len` readable elements that nobody writes during the phase.
    unsafe fn view<'t, T: Elem>(&self, src: At, len: usize, tmp: &'t mut [T]) -> Option<&'t [T]> {
        if !self.remote(src) {
            // SAFETY: the caller's contract; the address is in this process.
            return Some(unsafe { rd(std::ptr::with_exposed_provenance::<T>(src.addr), len) });
        }
        let t = &mut tmp[..len];
        // SAFETY: `t` is a local buffer of `len` elements, written only here; any bytes are a valid `T`
        // (`Elem` types are plain numbers).
        unsafe { self.cma(cma::Dir::Read, src, t.as_mut_ptr().cast(), std::mem::size_of_val(t)) }.then_some(t)
    }

    /// Writes `src` to `dst`; false if it failed (the communicator is then broken).
    ///
    /// # Safety
    /// `dst` holds `src.len()` writable elements that nobody else accesses during the phase.
    unsafe fn put<T>(&self, dst: At, src: &[T], stream: bool) -> bool {
        if self.remote(dst) {
            // SAFETY: `src` is only read (the kernel reads the local side of a write).
            return unsafe {
                self.cma(
                    cma::Dir::Write,
                    dst,
                    src.as_ptr() as *mut u8,
                    std::mem::size_of_val(src),
                )
            };
        }
        // SAFETY: the caller's contract; the address is in this process.
        unsafe {
            copy_out(
                std::ptr::with_exposed_provenance_mut::<T>(dst.addr),
                src.as_ptr(),
                src.len(),
                stream,
            )
        };
        true
    }

    /// Copies `len` elements from `src` to `dst` in pieces, checking [`Peers::stop`] before each; false if
    /// it stopped early. At least one side is this rank's between processes (the plans below see to it).
    ///
    /// # Safety
    /// `src` holds `len` readable elements nobody writes during the phase, `dst` `len` writable ones nobody
    /// else accesses, not overlapping.
    unsafe fn copy<T>(&self, dst: At, src: At, len: usize, stream: bool) -> bool {
        debug_assert!(
            !(self.remote(dst) && self.remote(src)),
            "a copy between two other processes"
        );
        let piece = (PIECE_BYTES / std::mem::size_of::<T>().max(1)).max(1);
        let mut at = 0;
        while at < len {
            if self.stop() {
                return false;
            }
            let l = piece.min(len - at);
            let (d, s) = (dst.add::<T>(at), src.add::<T>(at));
            let bytes = l * std::mem::size_of::<T>();
            // SAFETY: `at + l <= len`: inside both ranges of the caller's contract; local addresses are this
            // process's, remote ones go through the kernel.
            let ok = unsafe {
                if self.remote(s) {
                    self.cma(
                        cma::Dir::Read,
                        s,
                        std::ptr::with_exposed_provenance_mut::<u8>(d.addr),
                        bytes,
                    )
                } else if self.remote(d) {
                    self.cma(
                        cma::Dir::Write,
                        d,
                        std::ptr::with_exposed_provenance_mut::<u8>(s.addr),
                        bytes,
                    )
                } else {
                    copy_out(
                        std::ptr::with_exposed_provenance_mut::<T>(d.addr),
                        std::ptr::with_exposed_provenance::<T>(s.addr),
                        l,
                        stream,
                    );
                    true
                }
            };
            if !ok {
                return false;
            }
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
        // A draining wait completes once every rank arrived (the verdict is then in the stamps), or fails
        // when the ranks missing are processes that died (they access nothing any more).
        self.comm.ctl().barrier(self.phase, Wait::Drain, op)?;
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

/// all_reduce (`all`) / reduce: rank `r` reduces elements `split(r)..split(r+1)` of every input and writes
/// them to every output (reduce: the root's only). Exclusive writer of that range in every output; in place,
/// the range of each buffer is read by rank `r` only (into `acc`, before it writes it back). Between
/// processes the other ranks' parts are read into `tmp` and the result written into their outputs by the
/// kernel, one transfer per block and peer.
pub(super) fn reduce<T: Elem>(comm: &HostComm, s: &Sig, io: Io<T>, plan: Plan, all: bool) -> Result<()> {
    let (n, count) = (comm.n, s.count);
    run(comm, s, io, plan.scale, |p| {
        let (lo, hi) = (split::<T>(count, n, comm.rank), split::<T>(count, n, comm.rank + 1));
        let blk = p.block::<T>().min(hi - lo);
        let mut acc = vec![T::default(); blk];
        let mut tmp = vec![T::default(); if comm.procs { blk } else { 0 }];
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
                let Some(x) = p.view(p.send(0).add::<T>(at), len, &mut tmp) else {
                    return false;
                };
                reduce::load(a, x, p.scale(0));
                for j in 1..n {
                    let Some(x) = p.view(p.send(j).add::<T>(at), len, &mut tmp) else {
                        return false;
                    };
                    reduce::combine(a, x, plan.red, p.scale(j));
                }
            }
            reduce::finish(a, plan.div);
            for j in 0..n {
                // SAFETY: rank j's recv holds `count` elements; this rank is the only one touching this
                // range of it during the phase (partition by `split`).
                if (all || j == s.root) && !unsafe { p.put(p.recv(j).add::<T>(at), a, stream) } {
                    return false;
                }
            }
            at += len;
        }
        true
    })
}

/// broadcast. Threads: rank `r` copies part `r` of the root's input to every output, skipping the root's
/// output in place (it is the input); exclusive writer of part `r` of each output. Processes: every rank
/// copies the whole of the root's input into its own output (each side of a copy is then this process),
/// the only writer of it. The input is only read.
pub(super) fn broadcast<T: Elem>(comm: &HostComm, s: &Sig, io: Io<T>) -> Result<()> {
    let (n, count) = (comm.n, s.count);
    run(comm, s, io, None, |p| {
        let src = p.send(s.root);
        let stream = n * count * std::mem::size_of::<T>() >= STREAM_MIN_BYTES;
        if comm.procs {
            let dst = p.recv(comm.rank);
            // SAFETY: root's send and this rank's recv hold `count` elements; own recv written only here,
            // and it is the input only at the root in place (skipped).
            return dst.addr == src.addr && comm.rank == s.root || unsafe { p.copy::<T>(dst, src, count, stream) };
        }
        let (lo, hi) = (split::<T>(count, n, comm.rank), split::<T>(count, n, comm.rank + 1));
        for j in 0..n {
            let dst = p.recv(j);
            if dst.addr == src.addr {
                continue;
            }
            // SAFETY: root's send and every recv hold `count` elements; part `lo..hi` of `dst` is written
            // only by this rank; `dst` does not overlap the root's send (distinct borrows, see module docs).
            if !unsafe { p.copy::<T>(dst.add::<T>(lo), src.add::<T>(lo), hi - lo, stream) } {
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
        let own = p.send(comm.rank);
        for j in 0..n {
            if !(all || j == s.root) || (in_place && j == comm.rank) {
                continue;
            }
            // SAFETY: rank j's recv holds `n * count` elements; block `rank` is written only by this rank;
            // this rank's send (count elements) is read-only during the phase.
            if !unsafe { p.copy::<T>(p.recv(j).add::<T>(comm.rank * count), own, count, stream) } {
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
        let blk = p.block::<T>().min(count);
        let mut acc = vec![T::default(); blk];
        let mut tmp = vec![T::default(); if comm.procs { blk } else { 0 }];
        let mut at = 0;
        while at < count {
            if p.stop() {
                return false;
            }
            let len = acc.len().min(count - at);
            let a = &mut acc[..len];
            // SAFETY: every send holds `n * count` elements; block `rank` is read by this rank only.
            unsafe {
                let Some(x) = p.view(p.send(0).add::<T>(base + at), len, &mut tmp) else {
                    return false;
                };
                reduce::load(a, x, p.scale(0));
                for j in 1..n {
                    let Some(x) = p.view(p.send(j).add::<T>(base + at), len, &mut tmp) else {
                        return false;
                    };
                    reduce::combine(a, x, plan.red, p.scale(j));
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
        let own = p.recv(comm.rank);
        for j in 0..n {
            // SAFETY: sends and recvs hold `n * count` elements; this rank's recv is written only by itself
            // and is not anyone's send (out of place, distinct borrows).
            if !unsafe {
                p.copy::<T>(
                    own.add::<T>(j * count),
                    p.send(j).add::<T>(comm.rank * count),
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
        unsafe {
            p.copy::<T>(
                p.recv(comm.rank),
                p.send(s.root).add::<T>(comm.rank * count),
                count,
                false,
            )
        }
    })
}
