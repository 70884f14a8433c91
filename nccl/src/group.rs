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
//! - On non-blocking communicators `ncclGroupEnd` may return `ncclInProgress` while NCCL's thread still
//!   launches the work: every communicator of the group is polled until it is done before the buffers' events
//!   are recorded and the buffers released, also when the closure panicked. Each wait is bounded by the
//!   communicator's [`Config::wait`](crate::Config::wait) (default 10 minutes; 60 s at most after a panic):
//!   past it the communicator is aborted and the group returns [`Error::Timeout`]. A communicator whose wait
//!   fails is aborted, so nothing it queued can run on a released buffer.
//!
//! Rules (NCCL's): one thread issues every operation of a group; never synchronize inside a group; creating
//! communicators cannot share a group with collectives. One thread driving several GPUs must group the
//! operations on all of them. Groups do not nest here, and the communicators' non-group methods
//! (`comm.all_reduce(..)`) refuse to run inside a group: use the [`Group`]'s methods. Calls NCCL would defer
//! to the group's end and whose results it would write after they returned (creation, split, shrink, window
//! registration, finalize, abort, destroy) return [`Error::InsideGroup`]:
//!
//! ```
//! # fn main() -> nccl::Result<()> {
//! # if !nccl::nccl_available() { return Ok(()); }
//! let id = nccl::UniqueId::new()?;
//! let err = nccl::group(|_| nccl::Communicator::init_rank(&id, 0, 1).map(drop)).unwrap_err();
//! assert!(matches!(err, nccl::Error::InsideGroup { op: "ncclCommInitRank" }));
//! # Ok(()) }
//! ```

use crate::comm::{wait_until, Communicator, Pollable, Shared, State};
use crate::error::{Error, Result};
use crate::result::{self, ffi, IN_PROGRESS};
use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

thread_local! {
    /// While a group runs on this thread: the addresses of the communicators it has locked.
    static ACTIVE: RefCell<Option<Vec<usize>>> = const { RefCell::new(None) };
    /// Communicators dropped inside the running group, released once it ended (rank and size for logs).
    static DEFERRED: RefCell<Vec<(Arc<Shared>, usize, usize)>> = const { RefCell::new(Vec::new()) };
}

/// How long a group whose closure panicked waits for NCCL to finish launching on a non-blocking
/// communicator before aborting it.
const UNWIND_WAIT: Duration = Duration::from_secs(60);

/// True when a group on this thread holds `shared`'s lock. False during thread-local teardown (no group can
/// run then), so it is safe from `Drop`.
pub(crate) fn held_by_this_thread(shared: &Shared) -> bool {
    let addr = shared as *const Shared as usize;
    ACTIVE
        .try_with(|a| a.borrow().as_ref().is_some_and(|v| v.contains(&addr)))
        .unwrap_or(false)
}

/// True while [`group`] runs on this thread (false during thread-local teardown, when none can run).
pub fn in_group() -> bool {
    ACTIVE.try_with(|a| a.borrow().is_some()).unwrap_or(false)
}

/// [`Error::InsideGroup`] for `op` while a group runs on this thread.
pub(crate) fn refuse_in_group(op: &'static str) -> Result<()> {
    if in_group() {
        Err(Error::InsideGroup { op })
    } else {
        Ok(())
    }
}

/// Keeps a communicator dropped inside a group for release after the group ended.
pub(crate) fn defer_release(shared: Arc<Shared>, rank: usize, size: usize) {
    let kept = DEFERRED.try_with(|d| d.borrow_mut().push((shared, rank, size)));
    if kept.is_err() {
        tracing::warn!("nccl: a communicator dropped during thread teardown inside a group was leaked");
    }
}

/// How many dropped communicators wait for the running group's end (for tests).
#[cfg(test)]
pub(crate) fn deferred_len() -> usize {
    DEFERRED.with(|d| d.borrow().len())
}

/// Releases the communicators dropped inside the group that just ended.
fn release_deferred() {
    let list = DEFERRED
        .try_with(|d| std::mem::take(&mut *d.borrow_mut()))
        .unwrap_or_default();
    for (shared, rank, size) in list {
        if let Err(e) = crate::comm::release(&shared, std::thread::panicking()) {
            tracing::warn!("nccl: releasing communicator (rank {rank} of {size}) after the group failed: {e}");
        }
    }
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

    /// Queues a prepared typed call in the group (the `Group` methods of `typed_ops!` in collective.rs).
    #[cfg(feature = "cuda")]
    pub(crate) fn push(
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

// The typed methods (`Group::all_reduce` and the rest) are generated with the communicator's from one table:
// `typed_ops!` in collective.rs.

/// Ends the group if the closure unwinds, so NCCL's thread-local group state is not left open and no buffer
/// is released while NCCL may still launch work on it.
struct EndOnUnwind<'a, 'g> {
    group: &'a Group<'g>,
    armed: bool,
}

impl Drop for EndOnUnwind<'_, '_> {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = end_group(self.group, Some(UNWIND_WAIT)) {
                tracing::warn!("nccl: ending a group after a panic failed: {e}");
            }
        }
    }
}

/// `ncclGroupEnd`, then the locks released, then, when NCCL returned `ncclInProgress`, every communicator of
/// the group polled until NCCL finished launching ([`wait_all`]), each for at most its own
/// [`Config::wait`](crate::Config::wait), or `cap` when that is shorter. Communicators dropped inside the
/// group are released last. Returns the first error.
fn end_group(g: &Group<'_>, cap: Option<Duration>) -> Result<()> {
    let end = group_call("ncclGroupEnd");
    let start = Instant::now();
    let _ = ACTIVE.try_with(|a| *a.borrow_mut() = None);
    let shareds: Vec<&Shared> = g
        .locks
        .borrow_mut()
        .drain(..)
        .map(|(s, guard)| {
            drop(guard);
            s
        })
        .collect();
    let res = end.and_then(|code| {
        if code != IN_PROGRESS {
            // SAFETY: a null communicator asks for the global last error.
            return unsafe { result::check("ncclGroupEnd", code, std::ptr::null_mut()) };
        }
        let comms: Vec<(&Shared, Duration)> = shareds
            .iter()
            .map(|s| (*s, cap.map_or(s.wait, |c| c.min(s.wait))))
            .collect();
        wait_all(&comms, start)
    });
    release_deferred();
    res
}

/// After `ncclGroupEnd` returned `ncclInProgress` at `start`: waits for every communicator of the group
/// ([`wait_until`], each for at most its bound, counted from `start`). A communicator whose wait failed is
/// aborted (a timeout already aborted it), so nothing it queued can run on a buffer released after this; the
/// others are still waited for. Returns the first error.
fn wait_all<P: Pollable>(comms: &[(&P, Duration)], start: Instant) -> Result<()> {
    let mut first = Ok(());
    for (comm, limit) in comms {
        if let Err(e) = wait_until(*comm, "ncclGroupEnd", start, *limit) {
            if let Err(e2) = comm.abort() {
                tracing::warn!("nccl: aborting after a failed group wait: {e2}");
            }
            if first.is_ok() {
                first = Err(e);
            }
        }
    }
    first
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
    let mut unwind = EndOnUnwind { group: &g, armed: true };
    let out = f(&g);
    unwind.armed = false;
    drop(unwind);
    let end = end_group(&g, None);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::fake::FakeComm;
    use crate::result::SUCCESS;

    /// The end of a non-blocking group: one communicator finishes, one fails in the background, one never
    /// leaves `ncclInProgress`. The group returns the first error; the failed and the hung ones are aborted
    /// (nothing they queued may run on the buffers the group then releases), the healthy one is not, and the
    /// hung one costs its bound, not forever (before the bound, this wait only ended by an AbortHandle).
    #[test]
    fn group_end_waits_every_communicator_within_its_bound() {
        let ok = FakeComm::new(&[IN_PROGRESS, IN_PROGRESS], SUCCESS);
        let failed = FakeComm::new(&[IN_PROGRESS], nccl_sys::ncclRemoteError as i32);
        let hung = FakeComm::hung();
        let limit = Duration::from_millis(50);
        let start = Instant::now();
        let e = wait_all(
            &[(&ok, Duration::from_secs(5)), (&failed, limit), (&hung, limit)],
            start,
        )
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
        assert!(
            matches!(e, Error::Nccl { op: "ncclGroupEnd", code, .. } if code == nccl_sys::ncclRemoteError as i32),
            "{e:?}"
        );
        assert_eq!(ok.aborts.get(), 0);
        assert_eq!(failed.aborts.get(), 1);
        assert!(hung.aborts.get() >= 1, "the hung communicator was aborted");
        assert!(hung.polls.get() >= 2);

        // Only the hung one: its timeout is the group's error.
        let hung = FakeComm::hung();
        let e = wait_all(&[(&hung, limit)], Instant::now()).unwrap_err();
        assert!(matches!(e, Error::Timeout { op: "ncclGroupEnd", .. }), "{e:?}");
        assert_eq!(e.kind(), crate::error::ErrorKind::Timeout);

        // All healthy: Ok, nothing aborted.
        let (a, b) = (FakeComm::new(&[IN_PROGRESS], SUCCESS), FakeComm::new(&[], SUCCESS));
        wait_all(&[(&a, limit), (&b, limit)], Instant::now()).unwrap();
        assert_eq!((a.aborts.get(), b.aborts.get()), (0, 0));
    }
}
