//! Groups: several operations (on one or several communicators) issued as one (`ncclGroupStart` /
//! `ncclGroupEnd`).
//!
//! [`group`] runs a closure that issues operations through a [`Group`], then always calls `ncclGroupEnd`, even
//! when the closure fails or panics, and returns the first error. Two things make it sound where a plain
//! start/end pair is not:
//! - NCCL only launches grouped work at `ncclGroupEnd`, so the cudarc events that keep buffers alive are
//!   recorded after it (recording them at each call, as cudarc did before its #578, lets a buffer be freed
//!   before the GPU used it). On non-blocking communicators they are recorded once NCCL finished launching.
//!   Buffers are therefore borrowed for the group's lifetime `'g`, which outlives the closure.
//! - Every communicator used in the group stays locked until `ncclGroupEnd` returns, so an
//!   [`AbortHandle`](crate::AbortHandle) cannot free it while NCCL still holds grouped work for it.
//!
//! Rules (NCCL's): one thread issues every operation of a group; never synchronize inside a group; creating
//! communicators cannot share a group with collectives. One thread driving several GPUs must group the
//! operations on all of them. Groups do not nest here, and the communicators' non-group methods
//! (`comm.all_reduce(..)`) refuse to run inside a group: use the [`Group`]'s methods.

use crate::comm::{Communicator, Shared, State};
use crate::error::{Error, Result};
use crate::result::{self, ffi, IN_PROGRESS};
use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::MutexGuard;

thread_local! {
    /// While a group runs on this thread: the addresses of the communicators it has locked.
    static ACTIVE: RefCell<Option<Vec<usize>>> = const { RefCell::new(None) };
}

/// True when a group on this thread holds `shared`'s lock.
pub(crate) fn held_by_this_thread(shared: &Shared) -> bool {
    let addr = shared as *const Shared as usize;
    ACTIVE.with(|a| a.borrow().as_ref().is_some_and(|v| v.contains(&addr)))
}

/// True while [`group`] runs on this thread.
pub fn in_group() -> bool {
    ACTIVE.with(|a| a.borrow().is_some())
}

/// [`Error::InvalidArgument`] for typed non-group calls made inside a group: their buffer events would be
/// recorded before the group launches the work.
#[cfg(feature = "cuda")]
pub(crate) fn not_in_group(op: &'static str) -> Result<()> {
    if in_group() {
        Err(Error::invalid(
            op,
            "called inside nccl::group: use the Group's method, so buffer events are recorded after ncclGroupEnd",
        ))
    } else {
        Ok(())
    }
}

fn group_call(op: &'static str) -> Result<i32> {
    // SAFETY: ncclGroupStart/End take no arguments; their thread-local group state is ours.
    let code = unsafe {
        match op {
            "ncclGroupStart" => ffi!(op, ncclGroupStart()),
            _ => ffi!(op, ncclGroupEnd()),
        }
    };
    Ok(code)
}

/// The operations issued inside one [`group`]. All buffers and operators passed in are borrowed for `'g`,
/// until after `ncclGroupEnd`.
pub struct Group<'g> {
    locks: RefCell<Vec<(&'g Shared, MutexGuard<'g, State>)>>,
    #[cfg(feature = "cuda")]
    guards: RefCell<Vec<cudarc::driver::SyncOnDrop<'g>>>,
    #[cfg(feature = "cuda")]
    ops: RefCell<Vec<crate::premul::OpHandle>>,
    /// Not Send: NCCL's group state belongs to the thread that started it.
    _thread: PhantomData<*const ()>,
}

impl std::fmt::Debug for Group<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("communicators", &self.locks.borrow().len())
            .finish()
    }
}

impl<'g> Group<'g> {
    /// Locks `comm` for the rest of the group (once per communicator).
    fn lock(&self, comm: &'g Communicator, op: &'static str) -> Result<()> {
        let shared: &'g Shared = &comm.shared;
        if held_by_this_thread(shared) {
            return Ok(());
        }
        let guard = shared.lock();
        if *guard != State::Live {
            return Err(Error::Aborted { op });
        }
        self.locks.borrow_mut().push((shared, guard));
        ACTIVE.with(|a| {
            if let Some(v) = a.borrow_mut().as_mut() {
                v.push(shared as *const Shared as usize);
            }
        });
        Ok(())
    }

    /// Issues raw calls inside the group: `f` gets the communicator, locked for the group.
    ///
    /// ```no_run
    /// # fn f(comm: &nccl::Communicator, s: *const std::ffi::c_void, r: *mut std::ffi::c_void,
    /// #      stream: nccl_sys::cudaStream_t) -> nccl::Result<()> {
    /// nccl::group(|g| {
    ///     g.raw(comm, |c| unsafe {
    ///         // SAFETY: s and r hold 1024 f32 on the communicator's device until the stream finishes.
    ///         c.send_raw(s, 1024, nccl::DataType::Float32, 1, stream)?;
    ///         c.recv_raw(r, 1024, nccl::DataType::Float32, 1, stream)
    ///     })
    /// })
    /// # }
    /// ```
    pub fn raw<R>(&self, comm: &'g Communicator, f: impl FnOnce(&'g Communicator) -> Result<R>) -> Result<R> {
        self.lock(comm, "group")?;
        f(comm)
    }

    #[cfg(feature = "cuda")]
    fn push(
        &self,
        comm: &'g Communicator,
        op: &'static str,
        prep: Result<crate::collective::Prepared<'g>>,
    ) -> Result<()> {
        let p = prep?;
        self.lock(comm, op)?;
        // SAFETY: `prep` checked lengths and devices against the count rules; the buffers are borrowed for
        // 'g, which ends after ncclGroupEnd, and their guards are kept until then.
        let res = unsafe { comm.submit(p.call, p.stream.cu_stream() as _) };
        self.guards.borrow_mut().extend(p.guards);
        self.ops.borrow_mut().extend(p.op);
        res
    }
}

#[cfg(feature = "cuda")]
mod typed {
    use super::*;
    use crate::premul::Reduction;
    use crate::types::Elem;
    use cudarc::driver::{DevicePtr, DevicePtrMut};

    impl<'g> Group<'g> {
        /// [`Communicator::all_reduce`] inside the group.
        #[doc(alias = "ncclAllReduce")]
        pub fn all_reduce<T: Elem>(
            &self,
            comm: &'g Communicator,
            send: &'g (impl DevicePtr<T> + ?Sized),
            recv: &'g mut (impl DevicePtrMut<T> + ?Sized),
            op: impl Reduction + 'g,
        ) -> Result<()> {
            self.push(comm, "all_reduce", comm.prep_all_reduce(send, recv, &op))
        }
        /// [`Communicator::all_reduce_in_place`] inside the group.
        #[doc(alias = "ncclAllReduce")]
        pub fn all_reduce_in_place<T: Elem>(
            &self,
            comm: &'g Communicator,
            buf: &'g mut (impl DevicePtrMut<T> + ?Sized),
            op: impl Reduction + 'g,
        ) -> Result<()> {
            self.push(comm, "all_reduce_in_place", comm.prep_all_reduce_in_place(buf, &op))
        }
        /// [`Communicator::broadcast`] inside the group.
        #[doc(alias = "ncclBroadcast")]
        pub fn broadcast<T: Elem>(
            &self,
            comm: &'g Communicator,
            send: Option<&'g dyn DevicePtr<T>>,
            recv: &'g mut (impl DevicePtrMut<T> + ?Sized),
            root: usize,
        ) -> Result<()> {
            self.push(comm, "broadcast", comm.prep_broadcast(send, recv, root))
        }
        /// [`Communicator::broadcast_in_place`] inside the group.
        #[doc(alias = "ncclBroadcast")]
        pub fn broadcast_in_place<T: Elem>(
            &self,
            comm: &'g Communicator,
            buf: &'g mut (impl DevicePtrMut<T> + ?Sized),
            root: usize,
        ) -> Result<()> {
            self.push(comm, "broadcast_in_place", comm.prep_broadcast_in_place(buf, root))
        }
        /// [`Communicator::reduce`] inside the group.
        #[doc(alias = "ncclReduce")]
        pub fn reduce<T: Elem>(
            &self,
            comm: &'g Communicator,
            send: &'g (impl DevicePtr<T> + ?Sized),
            recv: Option<&'g mut dyn DevicePtrMut<T>>,
            op: impl Reduction + 'g,
            root: usize,
        ) -> Result<()> {
            self.push(comm, "reduce", comm.prep_reduce(send, recv, &op, root))
        }
        /// [`Communicator::reduce_in_place`] inside the group.
        #[doc(alias = "ncclReduce")]
        pub fn reduce_in_place<T: Elem>(
            &self,
            comm: &'g Communicator,
            buf: &'g mut (impl DevicePtrMut<T> + ?Sized),
            op: impl Reduction + 'g,
            root: usize,
        ) -> Result<()> {
            self.push(comm, "reduce_in_place", comm.prep_reduce_in_place(buf, &op, root))
        }
        /// [`Communicator::all_gather`] inside the group.
        #[doc(alias = "ncclAllGather")]
        pub fn all_gather<T: Elem>(
            &self,
            comm: &'g Communicator,
            send: &'g (impl DevicePtr<T> + ?Sized),
            recv: &'g mut (impl DevicePtrMut<T> + ?Sized),
        ) -> Result<()> {
            self.push(comm, "all_gather", comm.prep_all_gather(send, recv))
        }
        /// [`Communicator::all_gather_in_place`] inside the group.
        #[doc(alias = "ncclAllGather")]
        pub fn all_gather_in_place<T: Elem>(
            &self,
            comm: &'g Communicator,
            buf: &'g mut (impl DevicePtrMut<T> + ?Sized),
        ) -> Result<()> {
            self.push(comm, "all_gather_in_place", comm.prep_all_gather_in_place(buf))
        }
        /// [`Communicator::reduce_scatter`] inside the group.
        #[doc(alias = "ncclReduceScatter")]
        pub fn reduce_scatter<T: Elem>(
            &self,
            comm: &'g Communicator,
            send: &'g (impl DevicePtr<T> + ?Sized),
            recv: &'g mut (impl DevicePtrMut<T> + ?Sized),
            op: impl Reduction + 'g,
        ) -> Result<()> {
            self.push(comm, "reduce_scatter", comm.prep_reduce_scatter(send, recv, &op))
        }
        /// [`Communicator::reduce_scatter_in_place`] inside the group.
        #[doc(alias = "ncclReduceScatter")]
        pub fn reduce_scatter_in_place<T: Elem>(
            &self,
            comm: &'g Communicator,
            buf: &'g mut (impl DevicePtrMut<T> + ?Sized),
            op: impl Reduction + 'g,
        ) -> Result<()> {
            self.push(
                comm,
                "reduce_scatter_in_place",
                comm.prep_reduce_scatter_in_place(buf, &op),
            )
        }
        /// [`Communicator::all_to_all`] inside the group.
        #[doc(alias = "ncclAlltoAll")]
        pub fn all_to_all<T: Elem>(
            &self,
            comm: &'g Communicator,
            send: &'g (impl DevicePtr<T> + ?Sized),
            recv: &'g mut (impl DevicePtrMut<T> + ?Sized),
        ) -> Result<()> {
            self.push(comm, "all_to_all", comm.prep_all_to_all(send, recv))
        }
        /// [`Communicator::gather`] inside the group.
        #[doc(alias = "ncclGather")]
        pub fn gather<T: Elem>(
            &self,
            comm: &'g Communicator,
            send: &'g (impl DevicePtr<T> + ?Sized),
            recv: Option<&'g mut dyn DevicePtrMut<T>>,
            root: usize,
        ) -> Result<()> {
            self.push(comm, "gather", comm.prep_gather(send, recv, root))
        }
        /// [`Communicator::scatter`] inside the group.
        #[doc(alias = "ncclScatter")]
        pub fn scatter<T: Elem>(
            &self,
            comm: &'g Communicator,
            send: Option<&'g dyn DevicePtr<T>>,
            recv: &'g mut (impl DevicePtrMut<T> + ?Sized),
            root: usize,
        ) -> Result<()> {
            self.push(comm, "scatter", comm.prep_scatter(send, recv, root))
        }
        /// [`Communicator::send`] inside the group.
        #[doc(alias = "ncclSend")]
        pub fn send<T: Elem>(
            &self,
            comm: &'g Communicator,
            buf: &'g (impl DevicePtr<T> + ?Sized),
            peer: usize,
        ) -> Result<()> {
            self.push(comm, "send", comm.prep_send(buf, peer))
        }
        /// [`Communicator::recv`] inside the group.
        #[doc(alias = "ncclRecv")]
        pub fn recv<T: Elem>(
            &self,
            comm: &'g Communicator,
            buf: &'g mut (impl DevicePtrMut<T> + ?Sized),
            peer: usize,
        ) -> Result<()> {
            self.push(comm, "recv", comm.prep_recv(buf, peer))
        }
    }
}

/// Ends the group if the closure unwinds, so NCCL's thread-local group state is not left open.
struct EndOnUnwind {
    armed: bool,
}

impl Drop for EndOnUnwind {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = group_call("ncclGroupEnd") {
                tracing::warn!("nccl: ending a group after a panic failed: {e}");
            }
            ACTIVE.with(|a| *a.borrow_mut() = None);
        }
    }
}

/// Runs `f` inside `ncclGroupStart` / `ncclGroupEnd` and returns its result, or the first error.
///
/// `ncclGroupEnd` is always called (also when `f` returns an error or panics); the work `f` issued is
/// launched there. Buffer events are recorded and temporary reduction operators destroyed only after that
/// (on non-blocking communicators, after NCCL finished launching). Buffers must outlive the group, so bind
/// them outside the closure:
///
/// ```no_run
/// # #[cfg(feature = "cuda")]
/// # fn f(comm: &nccl::Communicator, send: &cudarc::driver::CudaSlice<f32>,
/// #      recv: &mut cudarc::driver::CudaSlice<f32>) -> nccl::Result<()> {
/// // A ring exchange: send to the next rank, receive from the previous one, without deadlock.
/// let (next, prev) = ((comm.rank() + 1) % comm.size(), (comm.rank() + comm.size() - 1) % comm.size());
/// nccl::group(|g| {
///     g.send(comm, send, next)?;
///     g.recv(comm, recv, prev)
/// })?;
/// # Ok(()) }
/// ```
#[doc(alias = "ncclGroupStart")]
#[doc(alias = "ncclGroupEnd")]
pub fn group<'g, R>(f: impl FnOnce(&Group<'g>) -> Result<R>) -> Result<R> {
    if in_group() {
        return Err(Error::invalid(
            "ncclGroupStart",
            "groups do not nest: issue everything in one group",
        ));
    }
    let code = group_call("ncclGroupStart")?;
    // SAFETY: a null communicator asks for the global last error.
    unsafe { result::check("ncclGroupStart", code, std::ptr::null_mut()) }?;
    ACTIVE.with(|a| *a.borrow_mut() = Some(Vec::new()));
    let g = Group {
        locks: RefCell::new(Vec::new()),
        #[cfg(feature = "cuda")]
        guards: RefCell::new(Vec::new()),
        #[cfg(feature = "cuda")]
        ops: RefCell::new(Vec::new()),
        _thread: PhantomData,
    };
    let mut unwind = EndOnUnwind { armed: true };
    let out = f(&g);
    unwind.armed = false;
    let end = group_call("ncclGroupEnd");
    ACTIVE.with(|a| *a.borrow_mut() = None);
    // Release the locks, then (non-blocking communicators) wait until NCCL launched the work.
    let shareds: Vec<&Shared> = g
        .locks
        .borrow_mut()
        .drain(..)
        .map(|(s, guard)| {
            drop(guard);
            s
        })
        .collect();
    let end = end.and_then(|code| {
        if code == IN_PROGRESS {
            for s in &shareds {
                if !s.blocking {
                    s.wait_ready("ncclGroupEnd", None)?;
                }
            }
            Ok(())
        } else {
            // SAFETY: a null communicator asks for the global last error.
            unsafe { result::check("ncclGroupEnd", code, std::ptr::null_mut()) }
        }
    });
    // Dropping `g` records the buffers' events (work is enqueued now) and destroys temporary operators.
    drop(g);
    match (out, end) {
        (Ok(v), Ok(())) => Ok(v),
        (Err(e), end) => {
            if let Err(e2) = end {
                tracing::warn!("nccl: ncclGroupEnd also failed after the group's closure failed: {e2}");
            }
            Err(e)
        }
        (Ok(_), Err(e)) => Err(e),
    }
}
