//! Staged collectives: through the per-rank slots of the shared region (every message between processes,
//! small messages between threads).
//!
//! One round = each rank stamps the phase (call, phase number, round) and writes its slot (parity = barrier
//! phase % 2), one barrier, every rank checks all stamps of the phase, then reads the slots it needs. Soundness of the slot accesses, for every round below:
//! - a rank writes only its own slot, and only before arriving at the round's barrier;
//! - it reads other slots only after the barrier completed (the barrier orders the writes before the reads,
//!   see `sync.rs`) and before it arrives at its next barrier;
//! - the slot of parity `p % 2` is next written in phase `p + 2`, which a rank enters only after phase
//!   `p + 1` completed, i.e. after every rank arrived there and so finished reading phase `p`'s slots
//!   (a rank for which `p + 1` failed finds the communicator broken and writes nothing: `HostComm::enter`).
//!
//! The caller's buffers (`Io`) come from slices borrowed for the whole call: `send` valid for reads and
//! `recv` for writes of the lengths [`crate::counts`] checked; they alias only in the in-place forms, where
//! each round reads a part of `send` before (program order) it writes the overlapping part of `recv`.

use super::copy::{self, copy_out, STREAM_MIN_BYTES};
use super::reduce::{self, Plan};
use super::sync::Wait;
use super::{direct, HostComm, Sig, Step};
use crate::counts::Op;
use crate::error::Result;
use crate::types::{Elem, ReduceOp};

/// A rank's buffers for one call (null where the rank passes none).
pub(crate) struct Io<T> {
    pub send: *const T,
    pub recv: *mut T,
}

impl<T> Clone for Io<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Io<T> {}

/// `len` elements at `p` as a shared slice.
///
/// # Safety
/// `p` must be valid for reads of `len` elements, not written by anyone while the slice lives.
#[inline]
pub(crate) unsafe fn rd<'a, T>(p: *const T, len: usize) -> &'a [T] {
    if len == 0 {
        return &[];
    }
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts(p, len) }
}

/// `len` elements at `p` as an exclusive slice.
///
/// # Safety
/// `p` must be valid for writes of `len` elements, not accessed by anyone else while the slice lives.
#[inline]
pub(crate) unsafe fn wr<'a, T>(p: *mut T, len: usize) -> &'a mut [T] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts_mut(p, len) }
}

fn rounds(count: usize, per_round: usize) -> usize {
    count.div_ceil(per_round).max(1)
}

impl HostComm {
    fn slot_of<T>(&self, rank: usize, phase: u64) -> *mut T {
        self.region.slot(rank, (phase % 2) as usize).cast()
    }

    /// Elements of `T` per slot, divided into `parts` equal parts.
    fn per_slot<T>(&self, parts: usize) -> usize {
        (self.region.geo.slot_bytes / std::mem::size_of::<T>() / parts).max(1)
    }

    /// Starts round `k`: phase, stamp (every round is stamped with its phase and round, so a rank never
    /// reads slots of a phase a peer passed in another call), writes, barrier, stamp check.
    fn round(&self, s: &Sig, k: usize, write: impl FnOnce(u64)) -> Result<u64> {
        let phase = self.enter(s.op.name())?;
        self.put_stamp(phase, &s.stamp(phase, Step::Round(k as u64)));
        write(phase);
        self.ctl().barrier(phase, Wait::Breakable, s.op.name())?;
        self.check_stamps(phase, s.op.name())?;
        Ok(phase)
    }

    /// all_reduce (`all`) and reduce.
    pub(crate) fn reduce_like<T: Elem>(&self, s: Sig, io: Io<T>, op: ReduceOp, all: bool) -> Result<()> {
        let plan = Plan::new(op, self.n);
        if self.direct_ok(super::bytes::<T>(s.count)) {
            return direct::reduce(self, &s, io, plan, all);
        }
        let c = self.per_slot::<T>(1);
        let me = all || self.rank == s.root;
        let stream = super::bytes::<T>(s.count) >= STREAM_MIN_BYTES;
        let mut acc = vec![
            T::default();
            if stream {
                (8192 / std::mem::size_of::<T>()).max(1)
            } else {
                0
            }
        ];
        for k in 0..rounds(s.count, c) {
            let lo = k * c;
            let len = c.min(s.count - lo);
            let phase = self.round(&s, k, |phase| {
                // SAFETY: own slot (see module docs), `len <= c` elements fit; `send[lo..lo+len]` is inside
                // the caller's send slice.
                unsafe {
                    reduce::load(
                        wr(self.slot_of::<T>(self.rank, phase), len),
                        rd(io.send.add(lo), len),
                        plan.scale,
                    )
                }
            })?;
            if me && stream {
                // Large: reduce through a small cached buffer and stream it out (no read-for-ownership).
                let mut at = 0;
                while at < len {
                    let l = acc.len().min(len - at);
                    let a = &mut acc[..l];
                    // SAFETY: slots readable in this phase (module docs), `at + l <= len <= c` elements;
                    // `recv[lo+at..lo+at+l]` is inside the caller's recv slice (root or all_reduce), its
                    // in-place overlap with `send` was staged above.
                    unsafe {
                        a.copy_from_slice(rd(self.slot_of::<T>(0, phase).add(at), l));
                        for j in 1..self.n {
                            reduce::combine(a, rd(self.slot_of::<T>(j, phase).add(at), l), plan.red, None);
                        }
                        reduce::finish(a, plan.div);
                        copy_out(io.recv.add(lo + at), a.as_ptr(), l, true);
                    }
                    at += l;
                }
            } else if me {
                // SAFETY: `recv[lo..lo+len]` is inside the caller's recv slice (this rank is the root or the op
                // is all_reduce, so `recv` is non-null and checked); its in-place overlap with `send` was read
                // above; the slots are readable in this phase (module docs).
                unsafe {
                    let out = wr(io.recv.add(lo), len);
                    out.copy_from_slice(rd(self.slot_of::<T>(0, phase), len));
                    for j in 1..self.n {
                        reduce::combine(out, rd(self.slot_of::<T>(j, phase), len), plan.red, None);
                    }
                    reduce::finish(out, plan.div);
                }
            }
        }
        copy::fence();
        Ok(())
    }

    pub(crate) fn bcast<T: Elem>(&self, s: Sig, io: Io<T>) -> Result<()> {
        if self.direct_ok(super::bytes::<T>(s.count)) {
            return direct::broadcast(self, &s, io);
        }
        let c = self.per_slot::<T>(1);
        let root = self.rank == s.root;
        for k in 0..rounds(s.count, c) {
            let lo = k * c;
            let len = c.min(s.count - lo);
            let phase = self.round(&s, k, |phase| {
                if root && self.n > 1 {
                    // SAFETY: own slot; the root's send slice holds `count` elements.
                    unsafe { wr(self.slot_of::<T>(self.rank, phase), len).copy_from_slice(rd(io.send.add(lo), len)) }
                }
            })?;
            if !root {
                // SAFETY: the root's slot is readable in this phase; `recv` holds `count` elements.
                unsafe { wr(io.recv.add(lo), len).copy_from_slice(rd(self.slot_of::<T>(s.root, phase), len)) }
            } else if !std::ptr::eq(io.send, io.recv) {
                // SAFETY: out of place on the root: distinct caller slices of `count` elements.
                unsafe { wr(io.recv.add(lo), len).copy_from_slice(rd(io.send.add(lo), len)) }
            }
        }
        Ok(())
    }

    /// all_gather (root unused) and gather.
    pub(crate) fn gather_like<T: Elem>(&self, s: Sig, io: Io<T>, in_place: bool) -> Result<()> {
        let all = s.op == Op::AllGather;
        if self.direct_ok(super::bytes::<T>(s.count.saturating_mul(self.n))) {
            return direct::gather(self, &s, io, in_place);
        }
        let c = self.per_slot::<T>(1);
        let me = all || self.rank == s.root;
        let stream = super::bytes::<T>(s.count.saturating_mul(self.n)) >= STREAM_MIN_BYTES;
        for k in 0..rounds(s.count, c) {
            let lo = k * c;
            let len = c.min(s.count - lo);
            let phase = self.round(&s, k, |phase| {
                // SAFETY: own slot; `send` holds `count` elements.
                unsafe { wr(self.slot_of::<T>(self.rank, phase), len).copy_from_slice(rd(io.send.add(lo), len)) }
            })?;
            if !me {
                continue;
            }
            for j in 0..self.n {
                // SAFETY: `recv` holds `n * count` elements (checked), block `j` at `j * count`. In place,
                // block `rank` is this rank's own input and is skipped; the other blocks do not overlap it.
                unsafe {
                    let dst = wr(io.recv.add(j * s.count + lo), len);
                    if j == self.rank {
                        if !in_place {
                            dst.copy_from_slice(rd(io.send.add(lo), len));
                        }
                    } else if stream {
                        copy_out(dst.as_mut_ptr(), self.slot_of::<T>(j, phase), len, true);
                    } else {
                        dst.copy_from_slice(rd(self.slot_of::<T>(j, phase), len));
                    }
                }
            }
        }
        copy::fence();
        Ok(())
    }

    pub(crate) fn reduce_scatter_impl<T: Elem>(&self, s: Sig, io: Io<T>, op: ReduceOp) -> Result<()> {
        let plan = Plan::new(op, self.n);
        if self.direct_ok(super::bytes::<T>(s.count.saturating_mul(self.n))) {
            return direct::reduce_scatter(self, &s, io, plan);
        }
        let c = self.per_slot::<T>(self.n);
        for k in 0..rounds(s.count, c) {
            let lo = k * c;
            let len = c.min(s.count - lo);
            let phase = self.round(&s, k, |phase| {
                let slot = self.slot_of::<T>(self.rank, phase);
                for b in 0..self.n {
                    // SAFETY: own slot holds `n * c` elements; `send` holds `n * count`.
                    unsafe {
                        reduce::load(
                            wr(slot.add(b * c), len),
                            rd(io.send.add(b * s.count + lo), len),
                            plan.scale,
                        )
                    }
                }
            })?;
            // SAFETY: `recv` holds `count` elements (in place: block `rank` of `send`, whose part
            // `lo..lo+len` was staged above); slots readable in this phase.
            unsafe {
                let out = wr(io.recv.add(lo), len);
                out.copy_from_slice(rd(self.slot_of::<T>(0, phase).add(self.rank * c), len));
                for j in 1..self.n {
                    reduce::combine(
                        out,
                        rd(self.slot_of::<T>(j, phase).add(self.rank * c), len),
                        plan.red,
                        None,
                    );
                }
                reduce::finish(out, plan.div);
            }
        }
        Ok(())
    }

    pub(crate) fn all_to_all_impl<T: Elem>(&self, s: Sig, io: Io<T>) -> Result<()> {
        if self.direct_ok(super::bytes::<T>(s.count.saturating_mul(self.n))) {
            return direct::all_to_all(self, &s, io);
        }
        let c = self.per_slot::<T>(self.n);
        for k in 0..rounds(s.count, c) {
            let lo = k * c;
            let len = c.min(s.count - lo);
            let phase = self.round(&s, k, |phase| {
                let slot = self.slot_of::<T>(self.rank, phase);
                for b in 0..self.n {
                    // SAFETY: own slot holds `n * c` elements; `send` holds `n * count`.
                    unsafe { wr(slot.add(b * c), len).copy_from_slice(rd(io.send.add(b * s.count + lo), len)) }
                }
            })?;
            for j in 0..self.n {
                // SAFETY: `recv` holds `n * count` elements (distinct from `send`); slots readable.
                unsafe {
                    wr(io.recv.add(j * s.count + lo), len)
                        .copy_from_slice(rd(self.slot_of::<T>(j, phase).add(self.rank * c), len))
                }
            }
        }
        Ok(())
    }

    pub(crate) fn scatter_impl<T: Elem>(&self, s: Sig, io: Io<T>) -> Result<()> {
        if self.direct_ok(super::bytes::<T>(s.count.saturating_mul(self.n))) {
            return direct::scatter(self, &s, io);
        }
        let c = self.per_slot::<T>(self.n);
        let root = self.rank == s.root;
        for k in 0..rounds(s.count, c) {
            let lo = k * c;
            let len = c.min(s.count - lo);
            let phase = self.round(&s, k, |phase| {
                if root {
                    let slot = self.slot_of::<T>(self.rank, phase);
                    for b in 0..self.n {
                        // SAFETY: own slot holds `n * c` elements; the root's `send` holds `n * count`.
                        unsafe { wr(slot.add(b * c), len).copy_from_slice(rd(io.send.add(b * s.count + lo), len)) }
                    }
                }
            })?;
            // SAFETY: `recv` holds `count` elements; the root's slot is readable in this phase.
            unsafe {
                wr(io.recv.add(lo), len).copy_from_slice(rd(self.slot_of::<T>(s.root, phase).add(self.rank * c), len))
            }
        }
        Ok(())
    }
}
