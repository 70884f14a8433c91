//! The operation set every backend offers, so programs (the examples, `nccl-perf`) are written once.
//!
//! Implemented by the NCCL [`Communicator`](crate::Communicator) over cudarc device buffers (feature `cuda`)
//! and by the [host backend](crate::host) over host slices. Both follow NCCL's count and in-place rules
//! ([`counts`](crate::counts)) and return the same errors for the same bad input.
//!
//! Completion: on the host backend a call returns when this rank's result is complete. On NCCL a call
//! returns once the work is enqueued on the communicator's stream; call [`Collectives::synchronize`] before
//! reading results on the host.

use crate::error::Result;
use crate::types::{Elem, ReduceOp};

/// NCCL's collectives and point-to-point operations over some kind of buffer.
pub trait Collectives {
    /// The buffer of `T` this backend works on: `[T]` for the host backend, `CudaSlice<T>` for NCCL.
    type Buf<T: Elem>: ?Sized;

    /// This rank, in `0..size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// A short name of the backend (`"host"`, `"nccl"`).
    fn backend_name(&self) -> &'static str;
    /// The number of elements in a buffer.
    fn buf_len<T: Elem>(buf: &Self::Buf<T>) -> usize;

    /// Reduces `send` over all ranks into every rank's `recv` (same length).
    fn all_reduce<T: Elem>(&self, send: &Self::Buf<T>, recv: &mut Self::Buf<T>, op: ReduceOp) -> Result<()>;
    /// [`all_reduce`](Self::all_reduce) in place.
    fn all_reduce_in_place<T: Elem>(&self, buf: &mut Self::Buf<T>, op: ReduceOp) -> Result<()>;
    /// Copies the root's `send` into every rank's `recv`. `send` is required on the root only.
    fn broadcast<T: Elem>(&self, send: Option<&Self::Buf<T>>, recv: &mut Self::Buf<T>, root: usize) -> Result<()>;
    /// [`broadcast`](Self::broadcast) in place: the root's `buf` is sent, every other rank's is overwritten.
    fn broadcast_in_place<T: Elem>(&self, buf: &mut Self::Buf<T>, root: usize) -> Result<()>;
    /// Reduces `send` over all ranks into the root's `recv` (required on the root only).
    fn reduce<T: Elem>(
        &self,
        send: &Self::Buf<T>,
        recv: Option<&mut Self::Buf<T>>,
        op: ReduceOp,
        root: usize,
    ) -> Result<()>;
    /// [`reduce`](Self::reduce) in place: the root's `buf` receives the result.
    fn reduce_in_place<T: Elem>(&self, buf: &mut Self::Buf<T>, op: ReduceOp, root: usize) -> Result<()>;
    /// Concatenates every rank's `send` (`count` elements) in rank order into `recv` (`size * count`).
    fn all_gather<T: Elem>(&self, send: &Self::Buf<T>, recv: &mut Self::Buf<T>) -> Result<()>;
    /// [`all_gather`](Self::all_gather) in place: `buf` holds `size * count`, this rank's part at
    /// `rank * count`.
    fn all_gather_in_place<T: Elem>(&self, buf: &mut Self::Buf<T>) -> Result<()>;
    /// Reduces `send` (`size * count`) over ranks; rank `r` receives block `r` in `recv` (`count`).
    fn reduce_scatter<T: Elem>(&self, send: &Self::Buf<T>, recv: &mut Self::Buf<T>, op: ReduceOp) -> Result<()>;
    /// [`reduce_scatter`](Self::reduce_scatter) in place: the result lands at `rank * count` in `buf`.
    fn reduce_scatter_in_place<T: Elem>(&self, buf: &mut Self::Buf<T>, op: ReduceOp) -> Result<()>;
    /// Block `j` of this rank's `send` goes to rank `j`, arriving as block `rank` of its `recv`.
    fn all_to_all<T: Elem>(&self, send: &Self::Buf<T>, recv: &mut Self::Buf<T>) -> Result<()>;
    /// Concatenates every rank's `send` in rank order into the root's `recv` (required on the root only).
    fn gather<T: Elem>(&self, send: &Self::Buf<T>, recv: Option<&mut Self::Buf<T>>, root: usize) -> Result<()>;
    /// Block `r` of the root's `send` (required on the root only) goes to rank `r`'s `recv`.
    fn scatter<T: Elem>(&self, send: Option<&Self::Buf<T>>, recv: &mut Self::Buf<T>, root: usize) -> Result<()>;
    /// Sends `buf` to `peer`, which must post a matching [`recv`](Self::recv) of the same length and type.
    fn send<T: Elem>(&self, buf: &Self::Buf<T>, peer: usize) -> Result<()>;
    /// Receives into `buf` from `peer`.
    fn recv<T: Elem>(&self, buf: &mut Self::Buf<T>, peer: usize) -> Result<()>;
    /// Sends `send` to `dst` and receives `recv` from `src` as one grouped operation (no deadlock in rings).
    fn send_recv<T: Elem>(&self, send: &Self::Buf<T>, dst: usize, recv: &mut Self::Buf<T>, src: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Waits until every operation this rank issued has completed (a stream synchronize on NCCL; nothing to
    /// wait for on the host backend).
    fn synchronize(&self) -> Result<()>;
}
