//! Collectives and point-to-point operations.
//!
//! Two layers:
//! - typed methods over cudarc 0.19 buffers (feature `cuda`): `all_reduce(&send, &mut recv, op)` and friends.
//!   Every length is checked against NCCL's count rules ([`counts`](crate::counts)) and every buffer must live
//!   on the communicator's device, before any C call. The buffers are passed through cudarc's
//!   `device_ptr(&stream)` / `device_ptr_mut(&stream)`, so the communicator's stream first waits for earlier
//!   work on them, and cudarc records events after the call is enqueued: dropping or reusing a buffer then
//!   waits for NCCL to finish with it.
//! - `unsafe` `*_raw` methods over raw device pointers and a raw `cudaStream_t`, available without the `cuda`
//!   feature, for other ecosystems (candle storage, custom allocators, fp8 buffers from other crates).
//!
//! Completion: a call returns once the work is enqueued on the stream (on a non-blocking communicator, once
//! NCCL accepted it: this crate polls `ncclCommGetAsyncError` while it is `ncclInProgress`). Synchronize the
//! stream before reading results on the host.
//!
//! Every rank must issue the same collectives, in the same order, with the same counts and types; a send must
//! be matched by a recv of the same count and type on the peer. Issued from one thread, point-to-point
//! exchanges that depend on each other (a ring) must be grouped ([`group`](crate::group())).

use crate::comm::Communicator;
use crate::error::Result;
use crate::premul::Reduction;
use crate::result::{self, ffi};
use crate::types::DataType;
use std::ffi::c_void;

/// Refuses data types the loaded library does not have ([`DataType::min_version`]).
pub(crate) fn check_dtype(op: &'static str, dt: DataType) -> Result<()> {
    result::require_loaded(op, dt.min_version())
}

fn rank_arg(op: &'static str, what: &'static str, value: usize, size: usize) -> Result<i32> {
    crate::counts::check_rank(op, what, value, size)?;
    Ok(value as i32)
}

static EMULATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes AlltoAll, Gather and Scatter run as grouped sends and receives, as they do on NCCL older than 2.28,
/// even on a newer library. For tests of that path; process-wide; off by default.
pub fn force_p2p_emulation(on: bool) {
    EMULATE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The table of NCCL operations: one row per [`Call`] variant, its fields, and the C call it makes with them
/// (`$comm` and `$stream` name the communicator and stream). The enum, [`Call::name`] (the C function's
/// name), `Call::dtype` and `Call::issue` are generated from it, so adding an operation here is one row
/// (plus its raw and typed front ends, whose argument checks differ per operation). Every row must have a
/// `dt: DataType` field.
macro_rules! calls {
    (
        ($comm:ident, $stream:ident);
        $( $variant:ident { $($field:ident : $fty:ty),* $(,)? } => $cfn:ident($($arg:expr),* $(,)?); )*
    ) => {
        /// One NCCL call with its arguments, issued directly or inside a group.
        #[derive(Clone, Copy, Debug)]
        pub(crate) enum Call {
            $(
                #[doc = concat!("`", stringify!($cfn), "`.")]
                $variant { $($field: $fty),* },
            )*
        }

        impl Call {
            /// The C function.
            pub(crate) fn name(&self) -> &'static str {
                match self {
                    $( Call::$variant { .. } => stringify!($cfn), )*
                }
            }

            fn dtype(&self) -> DataType {
                match *self {
                    $( Call::$variant { dt, .. } => dt, )*
                }
            }

            /// Calls the C function; returns the raw result.
            ///
            /// # Safety
            /// `comm` is live and not used concurrently; the pointers satisfy the call's count rules for
            /// `count` elements of `dt` on the communicator's device; `stream` is a valid stream of that device.
            unsafe fn issue(self, $comm: nccl_sys::ncclComm_t, $stream: nccl_sys::cudaStream_t) -> Result<i32> {
                let n = self.name();
                match self {
                    $(
                        // SAFETY: forwarded from the caller; each row passes the fields in the C function's
                        // argument order (checked by the compiler against nccl-sys's signature).
                        Call::$variant { $($field),* } => Ok(unsafe { ffi!(n, $cfn($($arg),*)) }),
                    )*
                }
            }
        }
    };
}

calls! {
    (comm, stream);
    AllReduce { send: *const c_void, recv: *mut c_void, count: usize, dt: DataType, op: i32 }
        => ncclAllReduce(send, recv, count, dt.raw() as _, op as _, comm, stream);
    Broadcast { send: *const c_void, recv: *mut c_void, count: usize, dt: DataType, root: i32 }
        => ncclBroadcast(send, recv, count, dt.raw() as _, root, comm, stream);
    Reduce { send: *const c_void, recv: *mut c_void, count: usize, dt: DataType, op: i32, root: i32 }
        => ncclReduce(send, recv, count, dt.raw() as _, op as _, root, comm, stream);
    AllGather { send: *const c_void, recv: *mut c_void, count: usize, dt: DataType }
        => ncclAllGather(send, recv, count, dt.raw() as _, comm, stream);
    ReduceScatter { send: *const c_void, recv: *mut c_void, count: usize, dt: DataType, op: i32 }
        => ncclReduceScatter(send, recv, count, dt.raw() as _, op as _, comm, stream);
    AllToAll { send: *const c_void, recv: *mut c_void, count: usize, dt: DataType }
        => ncclAlltoAll(send, recv, count, dt.raw() as _, comm, stream);
    Gather { send: *const c_void, recv: *mut c_void, count: usize, dt: DataType, root: i32 }
        => ncclGather(send, recv, count, dt.raw() as _, root, comm, stream);
    Scatter { send: *const c_void, recv: *mut c_void, count: usize, dt: DataType, root: i32 }
        => ncclScatter(send, recv, count, dt.raw() as _, root, comm, stream);
    Send { buf: *const c_void, count: usize, dt: DataType, peer: i32 }
        => ncclSend(buf, count, dt.raw() as _, peer, comm, stream);
    Recv { buf: *mut c_void, count: usize, dt: DataType, peer: i32 }
        => ncclRecv(buf, count, dt.raw() as _, peer, comm, stream);
}

impl Call {
    /// True for AlltoAll, Gather and Scatter when they must be emulated: the loaded library predates 2.28 (or
    /// [`force_p2p_emulation`] is on).
    fn needs_emulation(&self) -> Result<bool> {
        if !matches!(self, Call::AllToAll { .. } | Call::Gather { .. } | Call::Scatter { .. }) {
            return Ok(false);
        }
        if EMULATE.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(true);
        }
        Ok(!result::loaded_version(self.name())?.at_least(crate::version::since::ALLTOALL))
    }

    /// AlltoAll, Gather and Scatter as the grouped sends and receives NCCL documented for them before 2.28
    /// (block `j` at element offset `j * count`).
    fn as_send_recv(&self, nranks: usize, rank: usize) -> Vec<Call> {
        let at = |p: *const c_void, dt: DataType, count: usize, j: usize| -> *mut c_void {
            (p as usize + j * count * dt.size()) as *mut c_void
        };
        let mut parts = Vec::new();
        match *self {
            Call::AllToAll { send, recv, count, dt } => {
                for j in 0..nranks {
                    let peer = j as i32;
                    parts.push(Call::Send {
                        buf: at(send, dt, count, j),
                        count,
                        dt,
                        peer,
                    });
                    parts.push(Call::Recv {
                        buf: at(recv, dt, count, j),
                        count,
                        dt,
                        peer,
                    });
                }
            }
            Call::Gather {
                send,
                recv,
                count,
                dt,
                root,
            } => {
                parts.push(Call::Send {
                    buf: send,
                    count,
                    dt,
                    peer: root,
                });
                if rank == root as usize {
                    for j in 0..nranks {
                        parts.push(Call::Recv {
                            buf: at(recv, dt, count, j),
                            count,
                            dt,
                            peer: j as i32,
                        });
                    }
                }
            }
            Call::Scatter {
                send,
                recv,
                count,
                dt,
                root,
            } => {
                if rank == root as usize {
                    for j in 0..nranks {
                        parts.push(Call::Send {
                            buf: at(send, dt, count, j),
                            count,
                            dt,
                            peer: j as i32,
                        });
                    }
                }
                parts.push(Call::Recv {
                    buf: recv,
                    count,
                    dt,
                    peer: root,
                });
            }
            other => parts.push(other),
        }
        parts
    }
}

impl Communicator {
    /// Issues `call` on `stream` and completes it (polling on a non-blocking communicator).
    ///
    /// # Safety
    /// As [`Call::issue`], except that the communicator's liveness is checked here.
    ///
    /// AlltoAll, Gather and Scatter on a library older than 2.28 (which lacks them) run as one group of
    /// `ncclSend`/`ncclRecv` calls with the same semantics (NCCL's documented recipe; groups nest).
    pub(crate) unsafe fn submit(&self, call: Call, stream: nccl_sys::cudaStream_t) -> Result<()> {
        check_dtype(call.name(), call.dtype())?;
        if call.needs_emulation()? {
            let parts = call.as_send_recv(self.size(), self.rank());
            return self.shared.call(call.name(), |raw| {
                // SAFETY: `raw` is live under the lock. Each part addresses one `count`-element block inside
                // the buffers the caller vouched for (offsets `j * count` for `j < nranks`), on `stream`.
                unsafe {
                    let code = ffi!("ncclGroupStart", ncclGroupStart());
                    result::check("ncclGroupStart", code, raw)?;
                    let mut first_err = None;
                    let mut load_err = None;
                    for part in parts {
                        match part.issue(raw, stream) {
                            Ok(code) if code != result::SUCCESS && first_err.is_none() => first_err = Some(code),
                            Ok(_) => {}
                            Err(e) => {
                                load_err.get_or_insert(e);
                            }
                        }
                    }
                    // Always close the group, even after a failed part.
                    let end = ffi!("ncclGroupEnd", ncclGroupEnd());
                    match load_err {
                        Some(e) => Err(e),
                        None => Ok(first_err.unwrap_or(end)),
                    }
                }
            });
        }
        // SAFETY: `with` (inside `call`) passes a live communicator under its lock; the rest is the caller's.
        self.shared.call(call.name(), |raw| unsafe { call.issue(raw, stream) })
    }

    fn rank_checked(&self, op: &'static str, what: &'static str, value: usize) -> Result<i32> {
        rank_arg(op, what, value, self.size())
    }

    /// `ncclAllReduce` on raw device pointers: reduces `count` elements of `send` over all ranks into every
    /// rank's `recv`. In place when `send == recv`.
    ///
    /// # Safety
    /// `send` and `recv` point to at least `count` elements of `dtype` in device memory of this
    /// communicator's device (or are the same pointer), stay valid until the work on `stream` completes, and
    /// are not written by other work meanwhile (`recv` not read either); `stream` is a valid CUDA stream of
    /// that device. Inside a [`group`](crate::group()) the same holds until the group ends.
    #[doc(alias = "ncclAllReduce")]
    pub unsafe fn all_reduce_raw(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: DataType,
        op: impl Reduction,
        stream: nccl_sys::cudaStream_t,
    ) -> Result<()> {
        let op = op.resolve(self, dtype)?;
        let call = Call::AllReduce {
            send,
            recv,
            count,
            dt: dtype,
            op: op.raw,
        };
        // SAFETY: the caller's contract is this call's.
        unsafe { self.submit(call, stream) }
    }

    /// `ncclBroadcast` on raw pointers: copies `count` elements from the root's `send` into every rank's
    /// `recv`. `send` is only read on the root (null elsewhere is fine). In place when `send == recv`.
    ///
    /// # Safety
    /// As [`all_reduce_raw`](Self::all_reduce_raw): `recv` (every rank) and `send` (root) hold `count`
    /// elements of `dtype`.
    #[doc(alias = "ncclBroadcast")]
    #[doc(alias = "ncclBcast")]
    pub unsafe fn broadcast_raw(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: DataType,
        root: usize,
        stream: nccl_sys::cudaStream_t,
    ) -> Result<()> {
        let root = self.rank_checked("broadcast", "root", root)?;
        // SAFETY: the caller's contract is this call's.
        unsafe {
            self.submit(
                Call::Broadcast {
                    send,
                    recv,
                    count,
                    dt: dtype,
                    root,
                },
                stream,
            )
        }
    }

    /// `ncclReduce` on raw pointers: reduces `count` elements of every rank's `send` into the root's `recv`
    /// (only written on the root; null elsewhere is fine). In place when `send == recv`.
    ///
    /// # Safety
    /// As [`all_reduce_raw`](Self::all_reduce_raw): `send` (every rank) and `recv` (root) hold `count`
    /// elements of `dtype`.
    #[doc(alias = "ncclReduce")]
    #[allow(clippy::too_many_arguments)] // NCCL's own argument list, plus the reduction's owner
    pub unsafe fn reduce_raw(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: DataType,
        op: impl Reduction,
        root: usize,
        stream: nccl_sys::cudaStream_t,
    ) -> Result<()> {
        let root = self.rank_checked("reduce", "root", root)?;
        let op = op.resolve(self, dtype)?;
        // SAFETY: the caller's contract is this call's.
        unsafe {
            self.submit(
                Call::Reduce {
                    send,
                    recv,
                    count,
                    dt: dtype,
                    op: op.raw,
                    root,
                },
                stream,
            )
        }
    }

    /// `ncclAllGather` on raw pointers: `send` holds `send_count` elements, `recv` receives
    /// `size() * send_count`, rank `r`'s block at `r * send_count`. In place when
    /// `send == recv + rank() * send_count` (elements).
    ///
    /// # Safety
    /// As [`all_reduce_raw`](Self::all_reduce_raw), with `send` holding `send_count` and `recv`
    /// `size() * send_count` elements.
    #[doc(alias = "ncclAllGather")]
    pub unsafe fn all_gather_raw(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        send_count: usize,
        dtype: DataType,
        stream: nccl_sys::cudaStream_t,
    ) -> Result<()> {
        // SAFETY: the caller's contract is this call's.
        unsafe {
            self.submit(
                Call::AllGather {
                    send,
                    recv,
                    count: send_count,
                    dt: dtype,
                },
                stream,
            )
        }
    }

    /// `ncclReduceScatter` on raw pointers: `send` holds `size() * recv_count` elements; rank `r` receives the
    /// reduction of block `r` in `recv` (`recv_count`). In place when `recv == send + rank() * recv_count`.
    ///
    /// # Safety
    /// As [`all_reduce_raw`](Self::all_reduce_raw), with `send` holding `size() * recv_count` and `recv`
    /// `recv_count` elements.
    #[doc(alias = "ncclReduceScatter")]
    pub unsafe fn reduce_scatter_raw(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        recv_count: usize,
        dtype: DataType,
        op: impl Reduction,
        stream: nccl_sys::cudaStream_t,
    ) -> Result<()> {
        let op = op.resolve(self, dtype)?;
        let call = Call::ReduceScatter {
            send,
            recv,
            count: recv_count,
            dt: dtype,
            op: op.raw,
        };
        // SAFETY: the caller's contract is this call's.
        unsafe { self.submit(call, stream) }
    }

    /// `ncclAlltoAll` on raw pointers (NCCL 2.28+; grouped send/recv before): block `j` (`count` elements at `j * count`) of `send` goes
    /// to rank `j`, arriving as block `rank()` of its `recv`. Both hold `size() * count` elements; not in place.
    ///
    /// # Safety
    /// As [`all_reduce_raw`](Self::all_reduce_raw), both buffers holding `size() * count` elements and not
    /// overlapping.
    #[doc(alias = "ncclAlltoAll")]
    pub unsafe fn all_to_all_raw(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: DataType,
        stream: nccl_sys::cudaStream_t,
    ) -> Result<()> {
        // SAFETY: the caller's contract is this call's.
        unsafe {
            self.submit(
                Call::AllToAll {
                    send,
                    recv,
                    count,
                    dt: dtype,
                },
                stream,
            )
        }
    }

    /// `ncclGather` on raw pointers (NCCL 2.28+; grouped send/recv before): every rank's `count` elements land at `r * count` in the root's
    /// `recv` (`size() * count`, written on the root only). In place when `send == recv + root * count`.
    ///
    /// # Safety
    /// As [`all_reduce_raw`](Self::all_reduce_raw), `send` holding `count` elements (every rank) and `recv`
    /// `size() * count` (root).
    #[doc(alias = "ncclGather")]
    pub unsafe fn gather_raw(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: DataType,
        root: usize,
        stream: nccl_sys::cudaStream_t,
    ) -> Result<()> {
        let root = self.rank_checked("gather", "root", root)?;
        // SAFETY: the caller's contract is this call's.
        unsafe {
            self.submit(
                Call::Gather {
                    send,
                    recv,
                    count,
                    dt: dtype,
                    root,
                },
                stream,
            )
        }
    }

    /// `ncclScatter` on raw pointers (NCCL 2.28+; grouped send/recv before): block `r` (`count` elements at `r * count`) of the root's
    /// `send` (`size() * count`, read on the root only) goes to rank `r`'s `recv`. In place when
    /// `recv == send + root * count`.
    ///
    /// # Safety
    /// As [`all_reduce_raw`](Self::all_reduce_raw), `send` holding `size() * count` elements (root) and `recv`
    /// `count` (every rank).
    #[doc(alias = "ncclScatter")]
    pub unsafe fn scatter_raw(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: DataType,
        root: usize,
        stream: nccl_sys::cudaStream_t,
    ) -> Result<()> {
        let root = self.rank_checked("scatter", "root", root)?;
        // SAFETY: the caller's contract is this call's.
        unsafe {
            self.submit(
                Call::Scatter {
                    send,
                    recv,
                    count,
                    dt: dtype,
                    root,
                },
                stream,
            )
        }
    }

    /// `ncclSend` on a raw pointer: sends `count` elements to `peer`, which must post a matching
    /// [`recv_raw`](Self::recv_raw).
    ///
    /// # Safety
    /// As [`all_reduce_raw`](Self::all_reduce_raw) for a `count`-element buffer that is only read.
    #[doc(alias = "ncclSend")]
    pub unsafe fn send_raw(
        &self,
        buf: *const c_void,
        count: usize,
        dtype: DataType,
        peer: usize,
        stream: nccl_sys::cudaStream_t,
    ) -> Result<()> {
        let peer = self.rank_checked("send", "peer", peer)?;
        // SAFETY: the caller's contract is this call's.
        unsafe {
            self.submit(
                Call::Send {
                    buf,
                    count,
                    dt: dtype,
                    peer,
                },
                stream,
            )
        }
    }

    /// `ncclRecv` on a raw pointer: receives `count` elements from `peer`.
    ///
    /// # Safety
    /// As [`all_reduce_raw`](Self::all_reduce_raw) for a `count`-element buffer that is written.
    #[doc(alias = "ncclRecv")]
    pub unsafe fn recv_raw(
        &self,
        buf: *mut c_void,
        count: usize,
        dtype: DataType,
        peer: usize,
        stream: nccl_sys::cudaStream_t,
    ) -> Result<()> {
        let peer = self.rank_checked("recv", "peer", peer)?;
        // SAFETY: the caller's contract is this call's.
        unsafe {
            self.submit(
                Call::Recv {
                    buf,
                    count,
                    dt: dtype,
                    peer,
                },
                stream,
            )
        }
    }
}

#[cfg(feature = "cuda")]
pub(crate) use typed::Prepared;

#[cfg(feature = "cuda")]
mod typed {
    use super::*;
    use crate::counts::{self, Lens, Op};
    use crate::error::Error;
    use crate::premul::OpHandle;
    use crate::types::{Elem, ReduceOp};
    use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
    use std::sync::Arc;

    /// Creates the reduction operator of a call, once the arguments are checked.
    type OpMaker<'x> = &'x dyn Fn(&Communicator) -> Result<OpHandle>;

    /// A checked call with the cudarc guards that record the buffers' events when dropped (after the call
    /// was issued, or after the group ended) and the reduction operator to destroy afterwards.
    pub(crate) struct Prepared<'a> {
        pub(crate) call: Call,
        pub(crate) stream: &'a CudaStream,
        pub(crate) guards: Vec<SyncOnDrop<'a>>,
        pub(crate) op: Option<OpHandle>,
    }

    /// Makes `stream`'s context current on this thread, so NCCL (which uses the current device) picks it.
    /// Refuses a non-primary context before any communicator is created on it (see `bind_stream`).
    fn bind(stream: &CudaStream) -> Result<()> {
        if !stream.context().is_primary() {
            return Err(Error::invalid(
                "bind_to_thread",
                "the stream belongs to a non-primary CUDA context; NCCL runs in the device's primary context \
                 (create it with CudaContext::new)",
            ));
        }
        stream.context().bind_to_thread().map_err(Error::cuda("bind_to_thread"))
    }

    fn ptr(p: u64) -> *mut c_void {
        p as usize as *mut c_void
    }

    fn offset<T>(p: u64, elems: usize) -> *mut c_void {
        (p as usize + elems * std::mem::size_of::<T>()) as *mut c_void
    }

    impl Communicator {
        /// The stream collectives run on; [`Error::InvalidArgument`] if none is bound.
        pub fn stream(&self) -> Result<&Arc<CudaStream>> {
            self.stream.as_ref().ok_or_else(|| {
                Error::invalid(
                    "stream",
                    "no CUDA stream is bound to this communicator (use init_rank_on or with_stream)",
                )
            })
        }

        /// Binds the stream collectives run on. It must belong to this communicator's device.
        pub fn with_stream(mut self, stream: Arc<CudaStream>) -> Result<Self> {
            self.bind_stream(stream)?;
            Ok(self)
        }

        /// Binds (or replaces) the stream collectives run on. It must belong to this communicator's device.
        ///
        /// The stream's context must be the device's *primary* context (`CudaContext::new`): NCCL works in
        /// the primary context (its init and proxy threads select the device with the runtime API), and a
        /// buffer or stream of another context on the same device is memory NCCL cannot use.
        pub fn bind_stream(&mut self, stream: Arc<CudaStream>) -> Result<()> {
            let ctx = stream.context();
            if !ctx.is_primary() {
                return Err(Error::invalid(
                    "bind_stream",
                    "the stream belongs to a non-primary CUDA context; NCCL runs in the device's primary \
                     context (create it with CudaContext::new)",
                ));
            }
            let ordinal = ctx.ordinal();
            if ordinal != self.device() {
                return Err(Error::invalid(
                    "bind_stream",
                    format!(
                        "the stream is on device {ordinal}, the communicator on device {}",
                        self.device()
                    ),
                ));
            }
            self.stream = Some(stream);
            Ok(())
        }

        /// Refuses `ctx` unless it is the context of the bound stream (which [`bind_stream`](Self::bind_stream)
        /// made sure is the device's primary context): comparing ordinals alone would let a buffer of another
        /// context on the same device through.
        pub(crate) fn check_context(
            &self,
            op: &'static str,
            what: &'static str,
            ctx: &cudarc::driver::CudaContext,
        ) -> Result<()> {
            let ours = self.stream()?.context();
            if ctx.cu_ctx() == ours.cu_ctx() {
                return Ok(());
            }
            let ordinal = ctx.ordinal();
            let message = if ordinal != self.device() {
                format!(
                    "the {what} is on device {ordinal}, the communicator on device {}",
                    self.device()
                )
            } else {
                format!(
                    "the {what} belongs to another CUDA context on device {ordinal} than the communicator's \
                     (primary) one"
                )
            };
            Err(Error::invalid(op, message))
        }

        /// [`init_rank`](Self::init_rank) on `stream`'s device, with collectives bound to `stream`. Makes the
        /// stream's context current on this thread first (NCCL uses the current device).
        #[doc(alias = "ncclCommInitRank")]
        pub fn init_rank_on(stream: Arc<CudaStream>, id: &crate::UniqueId, rank: usize, nranks: usize) -> Result<Self> {
            bind(&stream)?;
            Self::init_rank(id, rank, nranks)?.with_stream(stream)
        }

        /// [`init_rank_config`](Self::init_rank_config) on `stream`'s device, bound to `stream`.
        #[doc(alias = "ncclCommInitRankConfig")]
        pub fn init_rank_config_on(
            stream: Arc<CudaStream>,
            id: &crate::UniqueId,
            rank: usize,
            nranks: usize,
            config: &crate::Config,
        ) -> Result<Self> {
            bind(&stream)?;
            Self::init_rank_config(id, rank, nranks, config)?.with_stream(stream)
        }

        /// [`init_rank_timeout`](Self::init_rank_timeout) on `stream`'s device, bound to `stream`.
        #[doc(alias = "ncclCommInitRankConfig")]
        pub fn init_rank_timeout_on(
            stream: Arc<CudaStream>,
            id: &crate::UniqueId,
            rank: usize,
            nranks: usize,
            config: &crate::Config,
            timeout: std::time::Duration,
        ) -> Result<Self> {
            bind(&stream)?;
            Self::init_rank_timeout(id, rank, nranks, config, timeout)?.with_stream(stream)
        }

        /// [`init_all`](Self::init_all) for the devices of `streams` (distinct devices), each communicator
        /// bound to its stream. Rank `i` uses `streams[i]`.
        #[doc(alias = "ncclCommInitAll")]
        pub fn init_all_on(streams: Vec<Arc<CudaStream>>) -> Result<Vec<Self>> {
            // Refuse non-primary contexts before NCCL creates anything (`bind_stream` would refuse them after).
            if streams.iter().any(|s| !s.context().is_primary()) {
                return Err(Error::invalid(
                    "ncclCommInitAll",
                    "a stream belongs to a non-primary CUDA context; NCCL runs in each device's primary context",
                ));
            }
            let devices: Vec<usize> = streams.iter().map(|s| s.context().ordinal()).collect();
            let comms = Self::init_all(&devices)?;
            comms.into_iter().zip(streams).map(|(c, s)| c.with_stream(s)).collect()
        }

        fn on_device<T>(
            &self,
            op: &'static str,
            what: &'static str,
            buf: &(impl DeviceSlice<T> + ?Sized),
        ) -> Result<()> {
            self.check_context(op, what, buf.stream().context())
        }

        fn begin<T: Elem>(&self, op: &'static str) -> Result<&CudaStream> {
            check_dtype(op, T::DATA_TYPE)?;
            Ok(self.stream()?.as_ref())
        }

        pub(crate) fn prep_all_reduce<'a, T: Elem>(
            &'a self,
            send: &'a (impl DevicePtr<T> + ?Sized),
            recv: &'a mut (impl DevicePtrMut<T> + ?Sized),
            op: &impl Reduction,
        ) -> Result<Prepared<'a>> {
            const OP: &str = "all_reduce";
            let stream = self.begin::<T>(OP)?;
            self.on_device(OP, "send buffer", send)?;
            self.on_device(OP, "recv buffer", recv)?;
            let lens = Lens {
                send: Some(send.len()),
                recv: Some(recv.len()),
            };
            let count = counts::check(Op::AllReduce, self.size(), self.rank(), 0, lens)?;
            let op = op.resolve(self, T::DATA_TYPE)?;
            let (s, gs) = send.device_ptr(stream);
            let (r, gr) = recv.device_ptr_mut(stream);
            let call = Call::AllReduce {
                send: ptr(s),
                recv: ptr(r),
                count,
                dt: T::DATA_TYPE,
                op: op.raw,
            };
            Ok(Prepared {
                call,
                stream,
                guards: vec![gs, gr],
                op: Some(op),
            })
        }

        pub(crate) fn prep_all_reduce_in_place<'a, T: Elem>(
            &'a self,
            buf: &'a mut (impl DevicePtrMut<T> + ?Sized),
            op: &impl Reduction,
        ) -> Result<Prepared<'a>> {
            const OP: &str = "all_reduce_in_place";
            let stream = self.begin::<T>(OP)?;
            self.on_device(OP, "buffer", buf)?;
            let count = counts::check_in_place(Op::AllReduce, self.size(), self.rank(), 0, buf.len())?;
            let op = op.resolve(self, T::DATA_TYPE)?;
            let (b, g) = buf.device_ptr_mut(stream);
            let call = Call::AllReduce {
                send: ptr(b),
                recv: ptr(b),
                count,
                dt: T::DATA_TYPE,
                op: op.raw,
            };
            Ok(Prepared {
                call,
                stream,
                guards: vec![g],
                op: Some(op),
            })
        }

        pub(crate) fn prep_broadcast<'a, T: Elem>(
            &'a self,
            send: Option<&'a dyn DevicePtr<T>>,
            recv: &'a mut (impl DevicePtrMut<T> + ?Sized),
            root: usize,
        ) -> Result<Prepared<'a>> {
            self.prep_root_sends(Op::Broadcast, send, recv, root)
        }

        pub(crate) fn prep_broadcast_in_place<'a, T: Elem>(
            &'a self,
            buf: &'a mut (impl DevicePtrMut<T> + ?Sized),
            root: usize,
        ) -> Result<Prepared<'a>> {
            const OP: &str = "broadcast_in_place";
            let stream = self.begin::<T>(OP)?;
            self.on_device(OP, "buffer", buf)?;
            let count = counts::check_in_place(Op::Broadcast, self.size(), self.rank(), root, buf.len())?;
            let (b, g) = buf.device_ptr_mut(stream);
            let call = Call::Broadcast {
                send: ptr(b),
                recv: ptr(b),
                count,
                dt: T::DATA_TYPE,
                root: root as i32,
            };
            Ok(Prepared {
                call,
                stream,
                guards: vec![g],
                op: None,
            })
        }

        pub(crate) fn prep_reduce<'a, 'b, T: Elem>(
            &'a self,
            send: &'a (impl DevicePtr<T> + ?Sized),
            recv: Option<&'a mut (dyn DevicePtrMut<T> + 'b)>,
            op: &impl Reduction,
            root: usize,
        ) -> Result<Prepared<'a>> {
            self.prep_root_receives(
                Op::Reduce,
                send,
                recv,
                root,
                Some(&|c: &Self| op.resolve(c, T::DATA_TYPE)),
            )
        }

        pub(crate) fn prep_reduce_in_place<'a, T: Elem>(
            &'a self,
            buf: &'a mut (impl DevicePtrMut<T> + ?Sized),
            op: &impl Reduction,
            root: usize,
        ) -> Result<Prepared<'a>> {
            const OP: &str = "reduce_in_place";
            let stream = self.begin::<T>(OP)?;
            self.on_device(OP, "buffer", buf)?;
            let count = counts::check_in_place(Op::Reduce, self.size(), self.rank(), root, buf.len())?;
            let op = op.resolve(self, T::DATA_TYPE)?;
            let (b, g) = buf.device_ptr_mut(stream);
            let call = Call::Reduce {
                send: ptr(b),
                recv: ptr(b),
                count,
                dt: T::DATA_TYPE,
                op: op.raw,
                root: root as i32,
            };
            Ok(Prepared {
                call,
                stream,
                guards: vec![g],
                op: Some(op),
            })
        }

        /// all_gather, reduce_scatter and all_to_all share the shape "send, recv, no root".
        fn prep_pair<'a, T: Elem>(
            &'a self,
            which: Op,
            send: &'a (impl DevicePtr<T> + ?Sized),
            recv: &'a mut (impl DevicePtrMut<T> + ?Sized),
            op: Option<OpMaker<'_>>,
        ) -> Result<Prepared<'a>> {
            let name = which.name();
            let stream = self.begin::<T>(name)?;
            self.on_device(name, "send buffer", send)?;
            self.on_device(name, "recv buffer", recv)?;
            let lens = Lens {
                send: Some(send.len()),
                recv: Some(recv.len()),
            };
            let count = counts::check(which, self.size(), self.rank(), 0, lens)?;
            let op = op.map(|f| f(self)).transpose()?;
            let (s, gs) = send.device_ptr(stream);
            let (r, gr) = recv.device_ptr_mut(stream);
            let (s, r, dt) = (ptr(s), ptr(r), T::DATA_TYPE);
            let call = match which {
                Op::AllGather => Call::AllGather {
                    send: s,
                    recv: r,
                    count,
                    dt,
                },
                Op::ReduceScatter => Call::ReduceScatter {
                    send: s,
                    recv: r,
                    count,
                    dt,
                    op: op.as_ref().map_or(0, |o| o.raw),
                },
                _ => Call::AllToAll {
                    send: s,
                    recv: r,
                    count,
                    dt,
                },
            };
            Ok(Prepared {
                call,
                stream,
                guards: vec![gs, gr],
                op,
            })
        }

        pub(crate) fn prep_all_gather<'a, T: Elem>(
            &'a self,
            send: &'a (impl DevicePtr<T> + ?Sized),
            recv: &'a mut (impl DevicePtrMut<T> + ?Sized),
        ) -> Result<Prepared<'a>> {
            self.prep_pair(Op::AllGather, send, recv, None)
        }

        pub(crate) fn prep_reduce_scatter<'a, T: Elem>(
            &'a self,
            send: &'a (impl DevicePtr<T> + ?Sized),
            recv: &'a mut (impl DevicePtrMut<T> + ?Sized),
            op: &impl Reduction,
        ) -> Result<Prepared<'a>> {
            self.prep_pair(
                Op::ReduceScatter,
                send,
                recv,
                Some(&|c: &Self| op.resolve(c, T::DATA_TYPE)),
            )
        }

        pub(crate) fn prep_all_to_all<'a, T: Elem>(
            &'a self,
            send: &'a (impl DevicePtr<T> + ?Sized),
            recv: &'a mut (impl DevicePtrMut<T> + ?Sized),
        ) -> Result<Prepared<'a>> {
            self.prep_pair(Op::AllToAll, send, recv, None)
        }

        /// In-place all_gather / reduce_scatter: one buffer of `size() * count`, this rank's part at
        /// `rank() * count`.
        fn prep_block_in_place<'a, T: Elem>(
            &'a self,
            which: Op,
            buf: &'a mut (impl DevicePtrMut<T> + ?Sized),
            op: Option<OpMaker<'_>>,
        ) -> Result<Prepared<'a>> {
            let name = which.name();
            let stream = self.begin::<T>(name)?;
            self.on_device(name, "buffer", buf)?;
            let count = counts::check_in_place(which, self.size(), self.rank(), 0, buf.len())?;
            let op = op.map(|f| f(self)).transpose()?;
            let (b, g) = buf.device_ptr_mut(stream);
            let mine = offset::<T>(b, counts::in_place_offset(self.rank(), count));
            let dt = T::DATA_TYPE;
            let call = match which {
                Op::AllGather => Call::AllGather {
                    send: mine,
                    recv: ptr(b),
                    count,
                    dt,
                },
                _ => Call::ReduceScatter {
                    send: ptr(b),
                    recv: mine,
                    count,
                    dt,
                    op: op.as_ref().map_or(0, |o| o.raw),
                },
            };
            Ok(Prepared {
                call,
                stream,
                guards: vec![g],
                op,
            })
        }

        pub(crate) fn prep_all_gather_in_place<'a, T: Elem>(
            &'a self,
            buf: &'a mut (impl DevicePtrMut<T> + ?Sized),
        ) -> Result<Prepared<'a>> {
            self.prep_block_in_place(Op::AllGather, buf, None)
        }

        pub(crate) fn prep_reduce_scatter_in_place<'a, T: Elem>(
            &'a self,
            buf: &'a mut (impl DevicePtrMut<T> + ?Sized),
            op: &impl Reduction,
        ) -> Result<Prepared<'a>> {
            self.prep_block_in_place(Op::ReduceScatter, buf, Some(&|c: &Self| op.resolve(c, T::DATA_TYPE)))
        }

        pub(crate) fn prep_gather<'a, 'b, T: Elem>(
            &'a self,
            send: &'a (impl DevicePtr<T> + ?Sized),
            recv: Option<&'a mut (dyn DevicePtrMut<T> + 'b)>,
            root: usize,
        ) -> Result<Prepared<'a>> {
            self.prep_root_receives(Op::Gather, send, recv, root, None)
        }

        /// Reduce (with its operation) and gather: only the root's recv buffer is written; elsewhere it is
        /// ignored and NULL is passed.
        fn prep_root_receives<'a, 'b, T: Elem>(
            &'a self,
            which: Op,
            send: &'a (impl DevicePtr<T> + ?Sized),
            recv: Option<&'a mut (dyn DevicePtrMut<T> + 'b)>,
            root: usize,
            op: Option<OpMaker<'_>>,
        ) -> Result<Prepared<'a>> {
            let name = which.name();
            let stream = self.begin::<T>(name)?;
            self.on_device(name, "send buffer", send)?;
            if let Some(r) = &recv {
                self.on_device(name, "recv buffer", &**r)?;
            }
            let lens = Lens {
                send: Some(send.len()),
                recv: recv.as_ref().map(|r| r.len()),
            };
            let count = counts::check(which, self.size(), self.rank(), root, lens)?;
            let op = op.map(|f| f(self)).transpose()?;
            let (s, gs) = send.device_ptr(stream);
            let mut guards = vec![gs];
            let r = match recv.filter(|_| self.rank() == root) {
                Some(r) => {
                    let (p, g) = r.device_ptr_mut(stream);
                    guards.push(g);
                    ptr(p)
                }
                None => std::ptr::null_mut(),
            };
            let (send, dt, root) = (ptr(s), T::DATA_TYPE, root as i32);
            let call = match which {
                Op::Reduce => Call::Reduce {
                    send,
                    recv: r,
                    count,
                    dt,
                    op: op.as_ref().map_or(0, |o| o.raw),
                    root,
                },
                _ => Call::Gather {
                    send,
                    recv: r,
                    count,
                    dt,
                    root,
                },
            };
            Ok(Prepared {
                call,
                stream,
                guards,
                op,
            })
        }

        pub(crate) fn prep_scatter<'a, T: Elem>(
            &'a self,
            send: Option<&'a dyn DevicePtr<T>>,
            recv: &'a mut (impl DevicePtrMut<T> + ?Sized),
            root: usize,
        ) -> Result<Prepared<'a>> {
            self.prep_root_sends(Op::Scatter, send, recv, root)
        }

        /// Broadcast and scatter: only the root's send buffer is read; elsewhere it is ignored (not even
        /// synchronized on) and NULL is passed.
        fn prep_root_sends<'a, T: Elem>(
            &'a self,
            which: Op,
            send: Option<&'a dyn DevicePtr<T>>,
            recv: &'a mut (impl DevicePtrMut<T> + ?Sized),
            root: usize,
        ) -> Result<Prepared<'a>> {
            let name = which.name();
            let stream = self.begin::<T>(name)?;
            if let Some(s) = send {
                self.on_device(name, "send buffer", s)?;
            }
            self.on_device(name, "recv buffer", recv)?;
            let lens = Lens {
                send: send.map(|s| s.len()),
                recv: Some(recv.len()),
            };
            let count = counts::check(which, self.size(), self.rank(), root, lens)?;
            let mut guards = Vec::with_capacity(2);
            let s = match send.filter(|_| self.rank() == root) {
                Some(s) => {
                    let (p, g) = s.device_ptr(stream);
                    guards.push(g);
                    ptr(p)
                }
                None => std::ptr::null_mut(),
            };
            let (r, gr) = recv.device_ptr_mut(stream);
            guards.push(gr);
            let (recv, dt, root) = (ptr(r), T::DATA_TYPE, root as i32);
            let call = match which {
                Op::Broadcast => Call::Broadcast {
                    send: s,
                    recv,
                    count,
                    dt,
                    root,
                },
                _ => Call::Scatter {
                    send: s,
                    recv,
                    count,
                    dt,
                    root,
                },
            };
            Ok(Prepared {
                call,
                stream,
                guards,
                op: None,
            })
        }

        pub(crate) fn prep_send<'a, T: Elem>(
            &'a self,
            buf: &'a (impl DevicePtr<T> + ?Sized),
            peer: usize,
        ) -> Result<Prepared<'a>> {
            const OP: &str = "send";
            let stream = self.begin::<T>(OP)?;
            self.on_device(OP, "send buffer", buf)?;
            let lens = Lens {
                send: Some(buf.len()),
                recv: None,
            };
            let count = counts::check(Op::Send, self.size(), self.rank(), peer, lens)?;
            let (p, g) = buf.device_ptr(stream);
            let call = Call::Send {
                buf: ptr(p),
                count,
                dt: T::DATA_TYPE,
                peer: peer as i32,
            };
            Ok(Prepared {
                call,
                stream,
                guards: vec![g],
                op: None,
            })
        }

        pub(crate) fn prep_recv<'a, T: Elem>(
            &'a self,
            buf: &'a mut (impl DevicePtrMut<T> + ?Sized),
            peer: usize,
        ) -> Result<Prepared<'a>> {
            const OP: &str = "recv";
            let stream = self.begin::<T>(OP)?;
            self.on_device(OP, "recv buffer", buf)?;
            let lens = Lens {
                send: None,
                recv: Some(buf.len()),
            };
            let count = counts::check(Op::Recv, self.size(), self.rank(), peer, lens)?;
            let (p, g) = buf.device_ptr_mut(stream);
            let call = Call::Recv {
                buf: ptr(p),
                count,
                dt: T::DATA_TYPE,
                peer: peer as i32,
            };
            Ok(Prepared {
                call,
                stream,
                guards: vec![g],
                op: None,
            })
        }

        /// Issues a prepared call outside any group. The guards drop after the call returned (and, on a
        /// non-blocking communicator, after NCCL finished enqueueing it), recording the buffers' events.
        fn run(&self, p: Prepared<'_>) -> Result<()> {
            // SAFETY: `prep` checked every length against the count rules and every buffer's device, the
            // pointers come from live cudarc buffers borrowed for the guards' lifetime, and the stream is the
            // communicator's (same device). The guards record events after the call is enqueued.
            let res = unsafe { self.submit(p.call, p.stream.cu_stream() as _) };
            drop(p.guards);
            drop(p.op);
            res
        }
    }

    /// The table of typed operations. Each row is one operation: its documentation and NCCL aliases, its
    /// arguments (`'b` is the buffers' borrow), and the `prep_*` function that checks them and builds the
    /// [`Call`]. It generates both front ends, which used to be written out twice per operation:
    /// - `Communicator::$name(args)`: refused inside a group (its buffer events would be recorded before the
    ///   group launches the work), otherwise issued at once ([`Communicator::run`]);
    /// - `Group::$name(comm, args)`: the same call queued in the group, the buffers borrowed (`'b: 'g`) until
    ///   after `ncclGroupEnd`.
    macro_rules! typed_ops {
        ($(
            $(#[doc = $doc:literal])*
            aliases[$($alias:literal),+]
            fn $name:ident<$b:lifetime>($($arg:ident: $ty:ty),* $(,)?) => $prep:ident($($parg:expr),* $(,)?);
        )*) => {
            impl Communicator {
                $(
                    $(#[doc = $doc])*
                    $(#[doc(alias = $alias)])+
                    pub fn $name<$b, T: Elem>(&self, $($arg: $ty),*) -> Result<()> {
                        crate::group::not_in_group(stringify!($name))?;
                        self.run(self.$prep($($parg),*)?)
                    }
                )*
            }

            impl<'g> crate::group::Group<'g> {
                $(
                    #[doc = concat!("[`Communicator::", stringify!($name), "`] inside the group: the buffers stay \
                        borrowed until the group has ended.")]
                    $(#[doc(alias = $alias)])+
                    pub fn $name<$b: 'g, T: Elem>(&self, comm: &'g Communicator, $($arg: $ty),*) -> Result<()> {
                        self.push(comm, stringify!($name), comm.$prep($($parg),*))
                    }
                )*
            }
        };
    }

    typed_ops! {
        /// Reduces `send` over all ranks into every rank's `recv` (`ncclAllReduce`). Both hold the same number
        /// of elements, on this communicator's device. `op` is a [`ReduceOp`] or a
        /// [`&PreMulSum`](crate::PreMulSum).
        ///
        /// ```no_run
        /// # fn f(comm: &nccl::Communicator, stream: &std::sync::Arc<cudarc::driver::CudaStream>) -> nccl::Result<()> {
        /// let send = stream.clone_htod(&[1i32, 2, 3]).unwrap();
        /// let mut recv = stream.alloc_zeros::<i32>(3).unwrap();
        /// comm.all_reduce(&send, &mut recv, nccl::ReduceOp::Sum)?;
        /// # Ok(()) }
        /// ```
        aliases["ncclAllReduce"]
        fn all_reduce<'b>(
            send: &'b (impl DevicePtr<T> + ?Sized),
            recv: &'b mut (impl DevicePtrMut<T> + ?Sized),
            op: impl Reduction + 'b,
        ) => prep_all_reduce(send, recv, &op);

        /// [`all_reduce`](Self::all_reduce) in place: `buf` is both input and result.
        aliases["ncclAllReduce"]
        fn all_reduce_in_place<'b>(buf: &'b mut (impl DevicePtrMut<T> + ?Sized), op: impl Reduction + 'b)
            => prep_all_reduce_in_place(buf, &op);

        /// Copies the root's `send` into every rank's `recv` (`ncclBroadcast`). `send` is required on the root
        /// (same length as `recv`) and ignored elsewhere (pass `None`).
        aliases["ncclBroadcast"]
        fn broadcast<'b>(send: Option<&'b dyn DevicePtr<T>>, recv: &'b mut (impl DevicePtrMut<T> + ?Sized), root: usize)
            => prep_broadcast(send, recv, root);

        /// [`broadcast`](Self::broadcast) in place: the root's `buf` is sent, every other rank's overwritten.
        aliases["ncclBroadcast", "ncclBcast"]
        fn broadcast_in_place<'b>(buf: &'b mut (impl DevicePtrMut<T> + ?Sized), root: usize)
            => prep_broadcast_in_place(buf, root);

        /// Reduces every rank's `send` into the root's `recv` (`ncclReduce`). `recv` is required on the root
        /// (same length as `send`) and ignored elsewhere (pass `None`).
        aliases["ncclReduce"]
        fn reduce<'b>(
            send: &'b (impl DevicePtr<T> + ?Sized),
            recv: Option<&'b mut dyn DevicePtrMut<T>>,
            op: impl Reduction + 'b,
            root: usize,
        ) => prep_reduce(send, recv, &op, root);

        /// [`reduce`](Self::reduce) in place: the root's `buf` receives the result; other ranks' `buf` is only
        /// read.
        aliases["ncclReduce"]
        fn reduce_in_place<'b>(buf: &'b mut (impl DevicePtrMut<T> + ?Sized), op: impl Reduction + 'b, root: usize)
            => prep_reduce_in_place(buf, &op, root);

        /// Concatenates every rank's `send` (`count` elements) in rank order into `recv` (`size() * count`)
        /// (`ncclAllGather`, count = `send.len()`).
        aliases["ncclAllGather"]
        fn all_gather<'b>(send: &'b (impl DevicePtr<T> + ?Sized), recv: &'b mut (impl DevicePtrMut<T> + ?Sized))
            => prep_all_gather(send, recv);

        /// [`all_gather`](Self::all_gather) in place: `buf` holds `size() * count` elements, this rank's
        /// contribution already at `rank() * count`; `buf.len()` must be divisible by `size()`.
        aliases["ncclAllGather"]
        fn all_gather_in_place<'b>(buf: &'b mut (impl DevicePtrMut<T> + ?Sized)) => prep_all_gather_in_place(buf);

        /// Reduces `send` (`size() * count`) over ranks; rank `r` receives block `r` in `recv` (`count`)
        /// (`ncclReduceScatter`, count = `recv.len()`).
        aliases["ncclReduceScatter"]
        fn reduce_scatter<'b>(
            send: &'b (impl DevicePtr<T> + ?Sized),
            recv: &'b mut (impl DevicePtrMut<T> + ?Sized),
            op: impl Reduction + 'b,
        ) => prep_reduce_scatter(send, recv, &op);

        /// [`reduce_scatter`](Self::reduce_scatter) in place: `buf` holds `size() * count` elements and the
        /// result lands at `rank() * count`; `buf.len()` must be divisible by `size()`.
        aliases["ncclReduceScatter"]
        fn reduce_scatter_in_place<'b>(buf: &'b mut (impl DevicePtrMut<T> + ?Sized), op: impl Reduction + 'b)
            => prep_reduce_scatter_in_place(buf, &op);

        /// Block `j` of `send` goes to rank `j`, arriving as block `rank()` of its `recv` (`ncclAlltoAll`,
        /// NCCL 2.28+, emulated with send/recv before). Both hold `size() * count` elements; no in-place form.
        aliases["ncclAlltoAll"]
        fn all_to_all<'b>(send: &'b (impl DevicePtr<T> + ?Sized), recv: &'b mut (impl DevicePtrMut<T> + ?Sized))
            => prep_all_to_all(send, recv);

        /// Every rank's `send` (`count`) lands at `r * count` in the root's `recv` (`size() * count`, required on
        /// the root only) (`ncclGather`, NCCL 2.28+; grouped send/recv before).
        aliases["ncclGather"]
        fn gather<'b>(send: &'b (impl DevicePtr<T> + ?Sized), recv: Option<&'b mut dyn DevicePtrMut<T>>, root: usize)
            => prep_gather(send, recv, root);

        /// Block `r` of the root's `send` (`size() * count`, required on the root only) goes to rank `r`'s
        /// `recv` (`count`) (`ncclScatter`, NCCL 2.28+; grouped send/recv before).
        aliases["ncclScatter"]
        fn scatter<'b>(send: Option<&'b dyn DevicePtr<T>>, recv: &'b mut (impl DevicePtrMut<T> + ?Sized), root: usize)
            => prep_scatter(send, recv, root);

        /// Sends `buf` to `peer` (`ncclSend`), which must post a matching [`recv`](Self::recv) (same count and
        /// type). Exchanges that depend on each other must be grouped ([`group`](crate::group())).
        aliases["ncclSend"]
        fn send<'b>(buf: &'b (impl DevicePtr<T> + ?Sized), peer: usize) => prep_send(buf, peer);

        /// Receives `buf.len()` elements from `peer` into `buf` (`ncclRecv`).
        aliases["ncclRecv"]
        fn recv<'b>(buf: &'b mut (impl DevicePtrMut<T> + ?Sized), peer: usize) => prep_recv(buf, peer);
    }

    impl Communicator {
        /// Sends `send` to `dst` and receives `recv` from `src` in one group (no deadlock in a ring).
        #[doc(alias = "ncclSend")]
        #[doc(alias = "ncclRecv")]
        pub fn send_recv<T: Elem>(
            &self,
            send: &(impl DevicePtr<T> + ?Sized),
            dst: usize,
            recv: &mut (impl DevicePtrMut<T> + ?Sized),
            src: usize,
        ) -> Result<()> {
            crate::group(|g| {
                g.send(self, send, dst)?;
                g.recv(self, recv, src)
            })
        }

        /// Waits until all work on the communicator's stream has completed. Unbounded: a collective whose
        /// peer never joins waits forever; [`synchronize_within`](Self::synchronize_within) is the bounded
        /// wait.
        pub fn synchronize(&self) -> Result<()> {
            self.stream()?.synchronize().map_err(Error::cuda("synchronize"))
        }

        /// Waits until the work enqueued so far on the communicator's stream has completed, at most `limit`
        /// ([`AbortHandle::synchronize_within`](crate::AbortHandle::synchronize_within) on its stream): past
        /// it, or when NCCL reports a failed peer, the communicator is aborted and the call fails.
        pub fn synchronize_within(&self, limit: std::time::Duration) -> Result<()> {
            self.abort_handle().synchronize_within(self.stream()?, limit)
        }

        /// Returns once every rank has called it: an all_reduce of one element, then a wait for it bounded by
        /// the communicator's [`wait_timeout`](Self::wait_timeout) ([`synchronize_within`](Self::synchronize_within)).
        pub fn barrier(&self) -> Result<()> {
            let taken = self.scratch.borrow_mut().take();
            let mut buf = match taken {
                Some(b) => b,
                None => self.stream()?.alloc_zeros::<i32>(1).map_err(Error::cuda("barrier"))?,
            };
            let res = self.all_reduce_in_place(&mut buf, ReduceOp::Sum);
            *self.scratch.borrow_mut() = Some(buf);
            res?;
            self.synchronize_within(self.wait_timeout())
        }
    }

    impl crate::Collectives for Communicator {
        type Buf<T: Elem> = CudaSlice<T>;

        fn rank(&self) -> usize {
            Communicator::rank(self)
        }
        fn size(&self) -> usize {
            Communicator::size(self)
        }
        fn backend_name(&self) -> &'static str {
            "nccl"
        }
        fn buf_len<T: Elem>(buf: &CudaSlice<T>) -> usize {
            buf.len()
        }
        fn all_reduce<T: Elem>(&self, send: &CudaSlice<T>, recv: &mut CudaSlice<T>, op: ReduceOp) -> Result<()> {
            Communicator::all_reduce(self, send, recv, op)
        }
        fn all_reduce_in_place<T: Elem>(&self, buf: &mut CudaSlice<T>, op: ReduceOp) -> Result<()> {
            Communicator::all_reduce_in_place(self, buf, op)
        }
        fn broadcast<T: Elem>(&self, send: Option<&CudaSlice<T>>, recv: &mut CudaSlice<T>, root: usize) -> Result<()> {
            Communicator::broadcast(self, send.map(|s| s as &dyn DevicePtr<T>), recv, root)
        }
        fn broadcast_in_place<T: Elem>(&self, buf: &mut CudaSlice<T>, root: usize) -> Result<()> {
            Communicator::broadcast_in_place(self, buf, root)
        }
        fn reduce<T: Elem>(
            &self,
            send: &CudaSlice<T>,
            recv: Option<&mut CudaSlice<T>>,
            op: ReduceOp,
            root: usize,
        ) -> Result<()> {
            Communicator::reduce(self, send, recv.map(|r| r as &mut dyn DevicePtrMut<T>), op, root)
        }
        fn reduce_in_place<T: Elem>(&self, buf: &mut CudaSlice<T>, op: ReduceOp, root: usize) -> Result<()> {
            Communicator::reduce_in_place(self, buf, op, root)
        }
        fn all_gather<T: Elem>(&self, send: &CudaSlice<T>, recv: &mut CudaSlice<T>) -> Result<()> {
            Communicator::all_gather(self, send, recv)
        }
        fn all_gather_in_place<T: Elem>(&self, buf: &mut CudaSlice<T>) -> Result<()> {
            Communicator::all_gather_in_place(self, buf)
        }
        fn reduce_scatter<T: Elem>(&self, send: &CudaSlice<T>, recv: &mut CudaSlice<T>, op: ReduceOp) -> Result<()> {
            Communicator::reduce_scatter(self, send, recv, op)
        }
        fn reduce_scatter_in_place<T: Elem>(&self, buf: &mut CudaSlice<T>, op: ReduceOp) -> Result<()> {
            Communicator::reduce_scatter_in_place(self, buf, op)
        }
        fn all_to_all<T: Elem>(&self, send: &CudaSlice<T>, recv: &mut CudaSlice<T>) -> Result<()> {
            Communicator::all_to_all(self, send, recv)
        }
        fn gather<T: Elem>(&self, send: &CudaSlice<T>, recv: Option<&mut CudaSlice<T>>, root: usize) -> Result<()> {
            Communicator::gather(self, send, recv.map(|r| r as &mut dyn DevicePtrMut<T>), root)
        }
        fn scatter<T: Elem>(&self, send: Option<&CudaSlice<T>>, recv: &mut CudaSlice<T>, root: usize) -> Result<()> {
            Communicator::scatter(self, send.map(|s| s as &dyn DevicePtr<T>), recv, root)
        }
        fn send<T: Elem>(&self, buf: &CudaSlice<T>, peer: usize) -> Result<()> {
            Communicator::send(self, buf, peer)
        }
        fn recv<T: Elem>(&self, buf: &mut CudaSlice<T>, peer: usize) -> Result<()> {
            Communicator::recv(self, buf, peer)
        }
        fn send_recv<T: Elem>(
            &self,
            send: &CudaSlice<T>,
            dst: usize,
            recv: &mut CudaSlice<T>,
            src: usize,
        ) -> Result<()> {
            Communicator::send_recv(self, send, dst, recv, src)
        }
        fn barrier(&self) -> Result<()> {
            Communicator::barrier(self)
        }
        fn synchronize(&self) -> Result<()> {
            Communicator::synchronize(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: *const c_void) -> usize {
        p as usize
    }

    #[test]
    fn all_to_all_emulation_pairs_every_block_with_its_peer() {
        let (send, recv) = (0x1000 as *const c_void, 0x9000 as *mut c_void);
        let call = Call::AllToAll {
            send,
            recv,
            count: 4,
            dt: DataType::Float32,
        };
        let parts = call.as_send_recv(3, 1);
        assert_eq!(parts.len(), 6);
        for j in 0..3 {
            match (parts[2 * j], parts[2 * j + 1]) {
                (
                    Call::Send {
                        buf, count: 4, peer, ..
                    },
                    Call::Recv {
                        buf: rbuf,
                        count: 4,
                        peer: rpeer,
                        ..
                    },
                ) => {
                    assert_eq!((peer, rpeer), (j as i32, j as i32));
                    assert_eq!(addr(buf), 0x1000 + j * 16);
                    assert_eq!(addr(rbuf), 0x9000 + j * 16);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn gather_and_scatter_emulation_only_the_root_touches_every_block() {
        let (send, recv) = (0x1000 as *const c_void, 0x9000 as *mut c_void);
        let gather = Call::Gather {
            send,
            recv,
            count: 2,
            dt: DataType::Float64,
            root: 2,
        };
        let leaf = gather.as_send_recv(4, 0);
        assert!(matches!(leaf[..], [Call::Send { peer: 2, count: 2, .. }]));
        let root = gather.as_send_recv(4, 2);
        assert_eq!(root.len(), 5);
        let recvs: Vec<(i32, usize)> = root[1..]
            .iter()
            .map(|c| match *c {
                Call::Recv { buf, peer, .. } => (peer, addr(buf)),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(recvs, (0..4).map(|j| (j as i32, 0x9000 + j * 16)).collect::<Vec<_>>());
        let scatter = Call::Scatter {
            send,
            recv,
            count: 3,
            dt: DataType::Int8,
            root: 0,
        };
        let leaf = scatter.as_send_recv(4, 3);
        assert!(matches!(leaf[..], [Call::Recv { peer: 0, count: 3, .. }]));
        let root = scatter.as_send_recv(4, 0);
        assert_eq!(root.len(), 5);
        for (j, c) in root[..4].iter().enumerate() {
            assert!(matches!(*c, Call::Send { peer, buf, .. } if peer == j as i32 && addr(buf) == 0x1000 + j * 3));
        }
        // Other calls pass through unchanged.
        let ar = Call::Send {
            buf: send,
            count: 1,
            dt: DataType::Uint8,
            peer: 1,
        };
        assert_eq!(ar.as_send_recv(2, 0).len(), 1);
    }
}
