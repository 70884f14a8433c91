//! The communicator: creation (blocking, non-blocking with a deadline, several GPUs at once, split, shrink),
//! queries, teardown, and the [`AbortHandle`] a watchdog thread uses to kill a hung communicator.
//!
//! # Shared state and abort soundness
//! The `ncclComm_t` lives in a [`Mutex`] shared (through an `Arc`) by the [`Communicator`] and its
//! [`AbortHandle`]s. Every NCCL call on the communicator runs while holding that lock, and an abort takes the
//! lock, calls `ncclCommAbort` and marks the state `Aborted`. So NCCL is never called on a freed communicator:
//! after an abort every call returns [`Error::Aborted`], and the `Drop` of the communicator and of its children
//! (registrations, reduction ops) skips the C call because the abort already released everything.
//!
//! A call that blocks *inside* NCCL keeps the lock, so a watchdog's abort waits for it. NCCL itself recommends
//! non-blocking communicators (`Config::blocking(false)`) for fault tolerance: then every call returns at
//! once, this crate polls `ncclCommGetAsyncError` *releasing the lock between polls*, and an abort gets in
//! between two polls. With the default blocking mode, the watchdog can still abort GPU-side hangs (a kernel
//! waiting for a peer while the host waits in a stream synchronize), which is the common case.
//!
//! # Teardown
//! Releasing a communicator (drop, or the end of [`finalize`](Communicator::finalize)) follows one plan
//! (`release_plan`): a communicator with an asynchronous error, or released while the thread panics, is
//! aborted; a non-blocking one still `ncclInProgress` is first waited for (bounded by [`DROP_WAIT`], then
//! aborted); a blocking one reporting `ncclInProgress` is aborted. `ncclCommDestroy` marks the state closed
//! only when it succeeded; when it fails the communicator is aborted, so it never leaks.
//!
//! # Groups
//! NCCL defers communicator creation, split, shrink, window registration, finalize, abort and destroy issued
//! inside `ncclGroupStart`/`ncclGroupEnd` to the group's end and writes their results then. Inside
//! [`group`](crate::group()) these calls return [`Error::InsideGroup`]; a communicator dropped inside a
//! group is released after the group ended.

use crate::config::{Config, DEFAULT_WAIT};
use crate::error::{Error, Result};
use crate::id::UniqueId;
use crate::result::{self, ffi, IN_PROGRESS, SUCCESS};
use crate::version::since;
use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A raw communicator handle that may move between threads: NCCL allows a communicator to be used from any
/// thread as long as calls on it do not overlap, which the mutex in [`Shared`] guarantees.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawComm(pub(crate) nccl_sys::ncclComm_t);
// SAFETY: see the type's documentation: the handle is only passed to NCCL while holding `Shared::state`.
unsafe impl Send for RawComm {}
// SAFETY: sharing the address is harmless: every use of it (a call into NCCL) happens while holding
// `Shared::state`, directly or through a group on the same thread, so uses never overlap.
unsafe impl Sync for RawComm {}

/// The lifecycle of an `ncclComm_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Usable.
    Live,
    /// `ncclCommAbort` was called (by `abort`, an [`AbortHandle`], a timeout, or a failed teardown).
    Aborted,
    /// `ncclCommDestroy` was called after a successful finalize or drop.
    Closed,
}

/// What a communicator and its abort handles share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The handle; only passed to NCCL while `state` is `Live` and locked (by this call or by a
    /// [`group`](crate::group()) on this thread).
    pub(crate) raw: RawComm,
    state: Mutex<State>,
    /// False for communicators created with `Config::blocking(false)`.
    pub(crate) blocking: bool,
    /// The configuration NCCL may keep pointers into (`commName`), alive until the last owner drops.
    pub(crate) config: Option<Config>,
    /// The bound on waits for non-blocking calls ([`Config::wait`], [`DEFAULT_WAIT`] without a config).
    pub(crate) wait: Duration,
}

/// How long to sleep between polls of a non-blocking call, growing from 10 µs to 1 ms.
fn backoff(step: &mut u32) {
    let us = (10u64 << (*step).min(7)).min(1000);
    *step += 1;
    std::thread::sleep(Duration::from_micros(us));
}

impl Shared {
    fn new(raw: nccl_sys::ncclComm_t, blocking: bool, config: Option<Config>) -> Arc<Self> {
        Arc::new(Shared {
            raw: RawComm(raw),
            state: Mutex::new(State::Live),
            blocking,
            wait: config.as_ref().map_or(DEFAULT_WAIT, Config::wait),
            config,
        })
    }

    /// The state, locked. A poisoned lock is taken over: the state is a plain enum, always consistent.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` with the live handle while holding the lock; [`Error::Aborted`] if the communicator is gone.
    /// Inside a [`group`](crate::group()) that already holds this lock on this thread, runs `f` directly (the
    /// group checked the state when it took the lock, and nothing can change it while the lock is held).
    pub(crate) fn with<R>(&self, op: &'static str, f: impl FnOnce(nccl_sys::ncclComm_t) -> Result<R>) -> Result<R> {
        if crate::group::held_by_this_thread(self) {
            return f(self.raw.0);
        }
        let guard = self.lock();
        match *guard {
            State::Live => f(self.raw.0),
            _ => Err(Error::Aborted { op }),
        }
    }

    /// Issues one NCCL call (`f` returns its raw result) and completes it: on `ncclInProgress` from a
    /// non-blocking communicator, polls until the call finished, for at most [`Shared::wait`] (then the
    /// communicator is aborted and [`Error::Timeout`] returned). Errors carry NCCL's last-error text.
    pub(crate) fn call(&self, op: &'static str, f: impl FnOnce(nccl_sys::ncclComm_t) -> Result<i32>) -> Result<()> {
        let code = self.with(op, |raw| {
            let code = f(raw)?;
            if code == IN_PROGRESS && !self.blocking {
                return Ok(code);
            }
            // SAFETY: `raw` is live and we hold the lock.
            unsafe { result::check(op, code, raw) }?;
            Ok(code)
        })?;
        if code == IN_PROGRESS {
            self.wait_ready(op, self.wait)?;
        }
        Ok(())
    }

    /// `ncclCommGetAsyncError` once.
    pub(crate) fn async_status(&self, op: &'static str) -> Result<i32> {
        self.with(op, |raw| {
            let mut status: nccl_sys::ncclResult_t = SUCCESS as _;
            // SAFETY: `raw` is live and we hold the lock; `status` is a valid out-pointer.
            unsafe {
                let code = ffi!(op, ncclCommGetAsyncError(raw, &mut status));
                result::check("ncclCommGetAsyncError", code, raw)?;
            }
            #[allow(clippy::unnecessary_cast)]
            Ok(status as i32)
        })
    }

    /// Polls `ncclCommGetAsyncError` until the communicator is no longer `ncclInProgress`, releasing the lock
    /// between polls, for at most `limit` ([`wait_until`]: on expiry the communicator is aborted and
    /// [`Error::Timeout`] returned).
    pub(crate) fn wait_ready(&self, op: &'static str, limit: Duration) -> Result<()> {
        wait_until(self, op, Instant::now(), limit)
    }

    /// `ncclCommAbort` unless the communicator is already gone. Idempotent.
    pub(crate) fn abort(&self) -> Result<()> {
        crate::group::refuse_in_group("ncclCommAbort")?;
        let mut guard = self.lock();
        Self::abort_locked(&mut guard, self.raw)
    }

    /// `ncclCommAbort` with the lock held (`guard` is this communicator's), unless already gone.
    fn abort_locked(guard: &mut MutexGuard<'_, State>, raw: RawComm) -> Result<()> {
        if **guard != State::Live {
            return Ok(());
        }
        **guard = State::Aborted;
        // SAFETY: `raw` was live and is marked aborted before the lock is released, so no call can use it
        // again; ncclCommAbort frees it (also when operations are in flight, which it kills). We are not
        // inside a group (checked by every caller), so NCCL runs it now instead of deferring it.
        let code = unsafe { ffi!("ncclCommAbort", ncclCommAbort(raw.0)) };
        // NCCL's last error is global after the comm is gone.
        // SAFETY: a null communicator asks for the global last error.
        unsafe { result::check("ncclCommAbort", code, std::ptr::null_mut()) }
    }

    /// True once aborted.
    pub(crate) fn is_aborted(&self) -> bool {
        matches!(*self.lock(), State::Aborted)
    }

    /// `ncclCommDestroy` (after a finalize, or from drop; a non-blocking communicator must have been waited
    /// for first). The state becomes `Closed` only when NCCL accepted the destroy (`ncclSuccess`, or
    /// `ncclInProgress`: NCCL then completes the teardown itself and the handle is no longer ours). On any
    /// other code the communicator is aborted under the same lock, so it does not leak, and the destroy's
    /// error is returned.
    fn destroy(&self) -> Result<()> {
        const OP: &str = "ncclCommDestroy";
        crate::group::refuse_in_group(OP)?;
        let mut guard = self.lock();
        if *guard != State::Live {
            return Ok(());
        }
        // SAFETY: `raw` is live and we hold the lock, so no other call uses it meanwhile; we are not inside a
        // group (checked above), so NCCL destroys it now.
        let code = unsafe { ffi!(OP, ncclCommDestroy(self.raw.0)) };
        if destroy_accepted(code) {
            *guard = State::Closed;
            return Ok(());
        }
        // SAFETY: a null communicator asks for the global last error.
        let err = unsafe { result::check(OP, code, std::ptr::null_mut()) };
        // NCCL refuses a destroy before it starts reclaiming (it first checks the handle and waits until the
        // communicator is ready), so after a failed destroy the communicator is still NCCL's live object:
        // abort it rather than leak it.
        if let Err(e) = Self::abort_locked(&mut guard, self.raw) {
            tracing::warn!("nccl: aborting after {OP} failed: {e}");
        }
        err
    }
}

/// What a non-blocking wait needs from a communicator: its asynchronous status, NCCL's explanation of a failed
/// one, and a way to give up. [`Shared`] is the real one; tests drive [`wait_until`] with fakes.
pub(crate) trait Pollable {
    /// `ncclCommGetAsyncError` once, taking and releasing the communicator's lock.
    fn status(&self, op: &'static str) -> Result<i32>;
    /// `ncclGetLastError` for the communicator, after `status` reported a failure.
    fn last_error(&self, op: &'static str) -> Result<Option<String>>;
    /// `ncclCommAbort`, a no-op when already gone.
    fn abort(&self) -> Result<()>;
}

impl Pollable for Shared {
    fn status(&self, op: &'static str) -> Result<i32> {
        self.async_status(op)
    }
    fn last_error(&self, op: &'static str) -> Result<Option<String>> {
        // SAFETY: `raw` is live (checked by `with`) and we hold the lock.
        self.with(op, |raw| Ok(unsafe { result::last_error(raw) }))
    }
    fn abort(&self) -> Result<()> {
        Shared::abort(self)
    }
}

/// The wait for a non-blocking call, begun at `start`: polls `comm`'s status (backing off from 10 µs to
/// 1 ms, the lock released between polls so an [`AbortHandle`] gets in) until it is no longer
/// `ncclInProgress`. `ncclSuccess` → `Ok`; a failure code → [`Error::Nccl`] with NCCL's text; a failed
/// query (e.g. [`Error::Aborted`] after a watchdog's abort) → that error. The status is read at least once,
/// so a call that already finished succeeds even with a zero `limit`; once `limit` has passed since `start`
/// with the call still in progress, `comm` is aborted (so NCCL's background work stops and nothing it would
/// still write is waited for) and [`Error::Timeout`] returned.
pub(crate) fn wait_until(comm: &impl Pollable, op: &'static str, start: Instant, limit: Duration) -> Result<()> {
    let mut step = 0;
    loop {
        let status = comm.status(op)?;
        if status == SUCCESS {
            return Ok(());
        }
        if status != IN_PROGRESS {
            return Err(Error::Nccl {
                op,
                code: status,
                last_error: comm.last_error(op)?,
            });
        }
        if start.elapsed() >= limit {
            if let Err(e) = comm.abort() {
                tracing::warn!("nccl: aborting the communicator after {op} timed out failed: {e}");
            }
            return Err(Error::Timeout {
                op,
                elapsed: start.elapsed(),
                detail: Some(format!(
                    "the communicator was still ncclInProgress after the {limit:?} bound (Config::wait_timeout) \
                     and has been aborted"
                )),
            });
        }
        backoff(&mut step);
    }
}

/// True when `ncclCommDestroy`'s code means the communicator is no longer ours (closed).
pub(crate) fn destroy_accepted(code: i32) -> bool {
    code == SUCCESS || code == IN_PROGRESS
}

/// How long releasing a non-blocking communicator waits for NCCL to finish pending work before aborting it
/// (or the communicator's [`Config::wait`], when shorter).
pub const DROP_WAIT: Duration = Duration::from_secs(60);

/// What releasing a communicator must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Release {
    /// Already aborted or destroyed.
    Nothing,
    /// Healthy and idle: `ncclCommDestroy`.
    Destroy,
    /// Non-blocking and still `ncclInProgress`: wait (bounded by [`DROP_WAIT`]), then destroy.
    WaitThenDestroy,
    /// Failed, unknown, or released while panicking: `ncclCommAbort`.
    Abort,
}

/// The teardown state machine: what to do with a communicator in `state` (`blocking` or not), released while
/// the thread is `panicking` or not, whose `ncclCommGetAsyncError` returned `status` (`None`: the query
/// failed).
pub(crate) fn release_plan(state: State, blocking: bool, panicking: bool, status: Option<i32>) -> Release {
    if state != State::Live {
        return Release::Nothing;
    }
    if panicking {
        return Release::Abort;
    }
    match status {
        Some(SUCCESS) => Release::Destroy,
        // A blocking communicator never reports work in progress after its calls returned: something is
        // wrong, and a destroy could block on it.
        Some(IN_PROGRESS) if !blocking => Release::WaitThenDestroy,
        _ => Release::Abort,
    }
}

/// Releases a communicator by [`release_plan`] (the `Drop` of [`Communicator`], also after a group).
pub(crate) fn release(shared: &Shared, panicking: bool) -> Result<()> {
    let state = *shared.lock();
    let status = if state == State::Live && !panicking {
        shared.async_status("ncclCommGetAsyncError").ok()
    } else {
        None
    };
    match release_plan(state, shared.blocking, panicking, status) {
        Release::Nothing => Ok(()),
        Release::Destroy => shared.destroy(),
        Release::Abort => shared.abort(),
        Release::WaitThenDestroy => match shared.wait_ready("drop", DROP_WAIT.min(shared.wait)) {
            Ok(()) => shared.destroy(),
            Err(e) => {
                // A timeout already aborted it; any other failure leaves it to abort here.
                if let Err(e2) = shared.abort() {
                    tracing::warn!("nccl: aborting after a failed wait in drop: {e2}");
                }
                Err(e)
            }
        },
    }
}

/// The `*newcomm` out-slot (and the config) of a split or shrink, on the heap. When the call returns
/// `ncclInProgress`, NCCL fills `*newcomm` later from its own thread, so the slot must outlive the call's
/// frame; it is read (and freed) by [`ChildSlot::take`] only once the parent reports the work done. A slot
/// that is never taken (the wait failed, so NCCL may still write it) is deliberately leaked: a few bytes
/// instead of a write into freed memory. No `Drop`, on purpose.
struct ChildSlot(*mut (nccl_sys::ncclComm_t, nccl_sys::ncclConfig_t));

impl ChildSlot {
    fn new(config: nccl_sys::ncclConfig_t) -> Self {
        ChildSlot(Box::into_raw(Box::new((std::ptr::null_mut(), config))))
    }
    fn comm_ptr(&self) -> *mut nccl_sys::ncclComm_t {
        // SAFETY: the pointer came from Box::into_raw and is freed only by `take`, which consumes `self`;
        // `addr_of_mut!` makes a raw pointer to the field without creating a reference.
        unsafe { std::ptr::addr_of_mut!((*self.0).0) }
    }
    fn config_ptr(&self) -> *mut nccl_sys::ncclConfig_t {
        // SAFETY: as in `comm_ptr`.
        unsafe { std::ptr::addr_of_mut!((*self.0).1) }
    }
    /// The handle NCCL wrote, freeing the slot. Call only when NCCL no longer holds it: the call completed,
    /// or never happened.
    fn take(self) -> nccl_sys::ncclComm_t {
        // SAFETY: the pointer came from Box::into_raw and is taken back once (this consumes `self`); the
        // caller guarantees NCCL finished writing it.
        unsafe { Box::from_raw(self.0) }.0
    }
}

/// An NCCL communicator (`ncclComm_t`): one rank of a group of GPUs that run collectives together.
///
/// Created on every rank with the same [`UniqueId`]; see [`init_rank`](Self::init_rank). Collectives (feature
/// `cuda`) run on the CUDA stream bound with `with_stream` or `init_rank_on`; the `*_raw` variants take any
/// stream.
///
/// Teardown: [`finalize`](Self::finalize) (collective, flushes outstanding work, then destroys) or
/// [`abort`](Self::abort) (local, kills outstanding work). Dropping calls `ncclCommDestroy`, or
/// `ncclCommAbort` when the communicator has an asynchronous error or the thread is panicking; it never
/// panics. Prefer the explicit calls: teardown driven by drop order can desynchronize ranks.
///
/// ```no_run
/// # #[cfg(feature = "cuda")] fn main() -> nccl::Result<()> {
/// use cudarc::driver::CudaContext;
/// use nccl::{Communicator, ReduceOp, UniqueId};
///
/// let stream = CudaContext::new(0).unwrap().default_stream();
/// let id = UniqueId::new()?; // on rank 0; send id.as_bytes() to the others
/// let comm = Communicator::init_rank_on(stream.clone(), &id, 0, 1)?;
/// let send = stream.clone_htod(&[1.0f32, 2.0, 3.0]).unwrap();
/// let mut recv = stream.alloc_zeros::<f32>(3).unwrap();
/// comm.all_reduce(&send, &mut recv, ReduceOp::Sum)?;
/// assert_eq!(stream.clone_dtoh(&recv).unwrap(), [1.0, 2.0, 3.0]);
/// comm.finalize()?;
/// # Ok(()) }
/// # #[cfg(not(feature = "cuda"))] fn main() {}
/// ```
///
/// `Send` but not `Sync` (the reason is next to the `_not_sync` field): sharing `&Communicator` between threads
/// does not compile.
///
/// ```compile_fail
/// fn shared<T: Sync>() {}
/// shared::<nccl::Communicator>();
/// ```
#[derive(Debug)]
#[doc(alias = "ncclComm_t")]
pub struct Communicator {
    pub(crate) shared: Arc<Shared>,
    rank: usize,
    size: usize,
    device: i32,
    #[cfg(feature = "cuda")]
    pub(crate) stream: Option<Arc<cudarc::driver::CudaStream>>,
    #[cfg(feature = "cuda")]
    pub(crate) scratch: std::cell::RefCell<Option<cudarc::driver::CudaSlice<i32>>>,
    /// Send but not Sync: NCCL requires the operations on one communicator to be issued by one thread at a
    /// time and in the same order on every rank. `&Communicator` shared between threads would let two
    /// threads interleave collectives nondeterministically, which deadlocks or mismatches them across ranks
    /// (and NCCL's group state is per thread). Moving the communicator to another thread is fine.
    _not_sync: PhantomData<Cell<()>>,
}

fn check_world(op: &'static str, rank: usize, nranks: usize) -> Result<(i32, i32)> {
    if nranks == 0 || nranks > i32::MAX as usize {
        return Err(Error::invalid(
            op,
            format!("nranks must be in 1..={}, got {nranks}", i32::MAX),
        ));
    }
    crate::counts::check_rank(op, "rank", rank, nranks)?;
    Ok((rank as i32, nranks as i32))
}

/// How [`Communicator::shrink`] treats operations still running on the parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ShrinkMode {
    /// `NCCL_SHRINK_DEFAULT`: the parent must be healthy and idle.
    #[default]
    Default,
    /// `NCCL_SHRINK_ABORT`: first terminate the parent's outstanding operations (after a peer failed).
    AbortParentOps,
}

impl Communicator {
    /// Wraps a freshly created handle. The rank, size and device are given (non-blocking communicators must
    /// not be queried before they are ready) or, with `None`, asked from NCCL.
    fn wrap(shared: Arc<Shared>, rank: usize, size: usize) -> Result<Self> {
        let device = shared.with("ncclCommCuDevice", |raw| {
            let mut dev = 0i32;
            // SAFETY: `raw` is live (and ready) and the lock is held; `dev` is a valid out-pointer.
            unsafe {
                let code = ffi!("ncclCommCuDevice", ncclCommCuDevice(raw, &mut dev));
                result::check("ncclCommCuDevice", code, raw)?;
            }
            Ok(dev)
        })?;
        Ok(Communicator {
            shared,
            rank,
            size,
            device,
            #[cfg(feature = "cuda")]
            stream: None,
            #[cfg(feature = "cuda")]
            scratch: std::cell::RefCell::new(None),
            _not_sync: PhantomData,
        })
    }

    /// Handles the outcome of a creating call: `raw` is what NCCL wrote to `*newcomm`. On failure a non-null
    /// half-built communicator is aborted, so it does not leak.
    fn finish_create(
        op: &'static str,
        code: i32,
        raw: nccl_sys::ncclComm_t,
        config: Option<Config>,
        rank: usize,
        size: usize,
        timeout: Option<Duration>,
    ) -> Result<Self> {
        let blocking = !config.as_ref().is_some_and(Config::is_non_blocking);
        let accepted = code == SUCCESS || (code == IN_PROGRESS && !blocking);
        if !accepted {
            // SAFETY: the creating call failed; `raw` is either null or a communicator that only we know of.
            let err = unsafe { result::check(op, code, raw) }.unwrap_err();
            if !raw.is_null() {
                let shared = Shared::new(raw, true, None);
                if let Err(e) = shared.abort() {
                    tracing::warn!("releasing the communicator after {op} failed: {e}");
                }
            }
            return Err(err);
        }
        if raw.is_null() {
            return Err(Error::invalid(op, "NCCL returned no communicator"));
        }
        // Moved, not cloned: NCCL keeps pointers into this config's heap strings (`commName`).
        let shared = Shared::new(raw, blocking, config);
        let ready = if blocking {
            Ok(())
        } else {
            shared.wait_ready(op, timeout.unwrap_or(shared.wait))
        };
        match ready.and_then(|()| Self::wrap(shared.clone(), rank, size)) {
            Ok(comm) => Ok(comm),
            Err(e) => {
                // Nothing else owns the half-built communicator: release it (a no-op after a timeout, which
                // already aborted it).
                if let Err(e2) = shared.abort() {
                    tracing::warn!("releasing the communicator after {op} failed: {e2}");
                }
                Err(e)
            }
        }
    }

    /// Creates rank `rank` of a communicator of `nranks` ranks on the current CUDA device
    /// (`ncclCommInitRank`). Blocks until every rank has called it with the same `id`.
    ///
    /// Fails with [`Error::InvalidRank`] when `rank >= nranks`, [`Error::Nccl`] (with NCCL's message) when NCCL
    /// fails, e.g. code 1 "CUDA driver version is insufficient" on a machine without a GPU.
    #[doc(alias = "ncclCommInitRank")]
    pub fn init_rank(id: &UniqueId, rank: usize, nranks: usize) -> Result<Self> {
        const OP: &str = "ncclCommInitRank";
        crate::group::refuse_in_group(OP)?;
        let (r, n) = check_world(OP, rank, nranks)?;
        let mut raw: nccl_sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; the id is passed by value.
        let code = unsafe { ffi!(OP, ncclCommInitRank(&mut raw, n, id.to_raw(), r)) };
        Self::finish_create(OP, code, raw, None, rank, nranks, None)
    }

    /// [`init_rank`](Self::init_rank) with a [`Config`] (`ncclCommInitRankConfig`, NCCL 2.14+). Config fields
    /// newer than the loaded library give [`Error::Unsupported`]. With `blocking(false)` this waits until the
    /// communicator is ready, for at most [`Config::wait`] (default [`DEFAULT_WAIT`], 10 minutes): then the
    /// half-built communicator is aborted and [`Error::Timeout`] returned. Blocking creation waits inside NCCL,
    /// unbounded; [`init_rank_timeout`](Self::init_rank_timeout) is the non-blocking form with its own bound.
    #[doc(alias = "ncclCommInitRankConfig")]
    pub fn init_rank_config(id: &UniqueId, rank: usize, nranks: usize, config: &Config) -> Result<Self> {
        Self::init_config(id, rank, nranks, config, None)
    }

    /// Non-blocking creation with a deadline: sets `blocking = 0`, calls `ncclCommInitRankConfig`, and polls
    /// `ncclCommGetAsyncError` while it reports `ncclInProgress`. If `timeout` passes first (a rank never
    /// arrived), the half-built communicator is aborted and [`Error::Timeout`] returned.
    ///
    /// The communicator stays non-blocking: later calls return once NCCL accepted them, and this crate
    /// completes each one by polling, so an [`AbortHandle`] can interrupt any of them.
    #[doc(alias = "ncclCommInitRankConfig")]
    #[doc(alias = "ncclCommGetAsyncError")]
    pub fn init_rank_timeout(
        id: &UniqueId,
        rank: usize,
        nranks: usize,
        config: &Config,
        timeout: Duration,
    ) -> Result<Self> {
        let config = config.clone().blocking(false);
        Self::init_config(id, rank, nranks, &config, Some(timeout))
    }

    fn init_config(
        id: &UniqueId,
        rank: usize,
        nranks: usize,
        config: &Config,
        timeout: Option<Duration>,
    ) -> Result<Self> {
        const OP: &str = "ncclCommInitRankConfig";
        crate::group::refuse_in_group(OP)?;
        let (r, n) = check_world(OP, rank, nranks)?;
        let loaded = result::loaded_version(OP)?;
        result::require(OP, since::CONFIG, loaded)?;
        config.validate(loaded)?;
        let config = config.clone();
        let mut c = config.to_raw();
        let mut raw: nccl_sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `raw` and `c` are valid pointers for the call; the strings `c` points to live in `config`,
        // which the communicator keeps (NCCL keeps the `commName` pointer).
        let code = unsafe { ffi!(OP, ncclCommInitRankConfig(&mut raw, n, id.to_raw(), r, &mut c)) };
        Self::finish_create(OP, code, raw, Some(config), rank, nranks, timeout)
    }

    /// Creates one communicator per device in `devices` (CUDA ordinals) in this process (`ncclCommInitAll`):
    /// element `i` is rank `i` on `devices[i]`. Operations on them from one thread must be grouped
    /// ([`group`](crate::group())). Devices must be distinct.
    #[doc(alias = "ncclCommInitAll")]
    pub fn init_all(devices: &[usize]) -> Result<Vec<Self>> {
        const OP: &str = "ncclCommInitAll";
        crate::group::refuse_in_group(OP)?;
        if devices.is_empty() || devices.len() > i32::MAX as usize {
            return Err(Error::invalid(OP, "needs at least one device"));
        }
        let mut seen = std::collections::HashSet::new();
        let mut list = Vec::with_capacity(devices.len());
        for &d in devices {
            if !seen.insert(d) {
                return Err(Error::invalid(
                    OP,
                    format!("device {d} is listed twice (NCCL would hang)"),
                ));
            }
            list.push(i32::try_from(d).map_err(|_| Error::invalid(OP, format!("device {d} out of range")))?);
        }
        let mut raws: Vec<nccl_sys::ncclComm_t> = vec![std::ptr::null_mut(); devices.len()];
        // SAFETY: `raws` has room for `devices.len()` handles and `list` holds that many device ordinals.
        let code = unsafe { ffi!(OP, ncclCommInitAll(raws.as_mut_ptr(), list.len() as i32, list.as_ptr())) };
        if code != SUCCESS {
            // SAFETY: a null communicator asks for the global last error.
            let err = unsafe { result::check(OP, code, std::ptr::null_mut()) }.unwrap_err();
            for raw in raws.into_iter().filter(|r| !r.is_null()) {
                let _ = Shared::new(raw, true, None).abort();
            }
            return Err(err);
        }
        let n = raws.len();
        let shareds: Vec<_> = raws.into_iter().map(|raw| Shared::new(raw, true, None)).collect();
        let mut out = Vec::with_capacity(n);
        for (rank, shared) in shareds.iter().enumerate() {
            match Self::wrap(shared.clone(), rank, n) {
                Ok(comm) => out.push(comm),
                Err(e) => {
                    // A partial set is useless (its ranks wait for each other): abort every one, the wrapped
                    // ones included, so none leaks and none is destroyed as if healthy.
                    for s in &shareds {
                        if let Err(e2) = s.abort() {
                            tracing::warn!("nccl: aborting after {OP} failed: {e2}");
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Splits this communicator (`ncclCommSplit`, NCCL 2.18+): ranks passing the same `color` form a new
    /// communicator, ordered by `key` (ties by parent rank). `color: None` (`NCCL_SPLIT_NOCOLOR`) takes part
    /// without joining one, and returns `Ok(None)`. Collective: every rank of this communicator must call it.
    /// `config: None` reuses this communicator's configuration. The child is bound to the same stream.
    #[doc(alias = "ncclCommSplit")]
    pub fn split(&self, color: Option<u32>, key: i32, config: Option<&Config>) -> Result<Option<Self>> {
        const OP: &str = "ncclCommSplit";
        crate::group::refuse_in_group(OP)?;
        let loaded = result::loaded_version(OP)?;
        result::require(OP, since::SPLIT, loaded)?;
        let color = match color {
            Some(c) => i32::try_from(c).map_err(|_| Error::invalid(OP, format!("color {c} exceeds i32::MAX")))?,
            None => nccl_sys::NCCL_SPLIT_NOCOLOR,
        };
        if let Some(c) = config {
            c.validate(loaded)?;
        }
        let inherited = self.child_config(config);
        let slot = ChildSlot::new(inherited.to_raw());
        let code = self.shared.with(OP, |raw| {
            // SAFETY: `raw` is live under the lock; the out-slot and the config live on the heap until NCCL
            // is done with them (see `ChildSlot`), and the strings the config points to live in `inherited`,
            // which the child keeps.
            Ok(unsafe { ffi!(OP, ncclCommSplit(raw, color, key, slot.comm_ptr(), slot.config_ptr())) })
        });
        let (code, child) = self.child_from_slot(OP, code, slot)?;
        if color == nccl_sys::NCCL_SPLIT_NOCOLOR {
            // SAFETY: a null communicator asks for the global last error.
            unsafe { result::check(OP, code, std::ptr::null_mut()) }?;
            return Ok(None);
        }
        let mut comm = Self::finish_create(OP, code, child, Some(inherited), 0, 0, None)?;
        comm.fill_rank_size()?;
        #[cfg(feature = "cuda")]
        {
            comm.stream = self.stream.clone();
        }
        Ok(Some(comm))
    }

    /// After a split or shrink call returned `code`: when it is `ncclInProgress` (a non-blocking parent or
    /// child), polls the parent until NCCL finished the call, which is when it has written the child's slot,
    /// for at most the parent's [`Config::wait`] (then the parent is aborted and [`Error::Timeout`] returned).
    /// Returns the code to judge the child by (`ncclSuccess` after a completed wait). When the wait fails,
    /// NCCL may still hold the slot: the caller must not take it (it is leaked).
    /// The end of a split or shrink: `code` is what issuing the call gave. An error before the call (aborted,
    /// or the symbol is missing) means NCCL never saw `slot`, which is freed. Otherwise waits for the child
    /// ([`Self::complete_child_call`]); on an error there `slot` is not freed (NCCL may still write it: it goes
    /// out of scope without being freed, `ChildSlot` has no Drop), else the child's handle is taken out of it.
    fn child_from_slot(
        &self,
        op: &'static str,
        code: Result<i32>,
        slot: ChildSlot,
    ) -> Result<(i32, nccl_sys::ncclComm_t)> {
        let code = match code {
            Ok(code) => code,
            Err(e) => {
                slot.take(); // frees it
                return Err(e);
            }
        };
        let code = self.complete_child_call(op, code)?;
        Ok((code, slot.take()))
    }

    fn complete_child_call(&self, op: &'static str, code: i32) -> Result<i32> {
        if code != IN_PROGRESS {
            return Ok(code);
        }
        self.shared.wait_ready(op, self.shared.wait).map(|()| SUCCESS)
    }

    /// Creates a communicator without the ranks in `exclude` (`ncclCommShrink`, NCCL 2.27+), e.g. after they
    /// failed. Every rank not excluded calls it with the same list; excluded ranks do not call it. Ranks are
    /// renumbered in order. With [`ShrinkMode::AbortParentOps`], outstanding operations on this communicator
    /// are terminated first.
    #[doc(alias = "ncclCommShrink")]
    pub fn shrink(&self, exclude: &[usize], config: Option<&Config>, mode: ShrinkMode) -> Result<Self> {
        const OP: &str = "ncclCommShrink";
        crate::group::refuse_in_group(OP)?;
        let loaded = result::loaded_version(OP)?;
        result::require(OP, since::SHRINK, loaded)?;
        let mut list = Vec::with_capacity(exclude.len());
        for &r in exclude {
            crate::counts::check_rank(OP, "excluded rank", r, self.size)?;
            if r == self.rank {
                return Err(Error::invalid(
                    OP,
                    format!("this rank ({r}) is in the exclude list; it must not call shrink"),
                ));
            }
            if list.contains(&(r as i32)) {
                return Err(Error::invalid(OP, format!("rank {r} is excluded twice")));
            }
            list.push(r as i32);
        }
        if list.len() >= self.size {
            return Err(Error::invalid(OP, "every rank would be excluded"));
        }
        if let Some(c) = config {
            c.validate(loaded)?;
        }
        let inherited = self.child_config(config);
        let flags = match mode {
            ShrinkMode::Default => nccl_sys::NCCL_SHRINK_DEFAULT as i32,
            ShrinkMode::AbortParentOps => nccl_sys::NCCL_SHRINK_ABORT as i32,
        };
        let slot = ChildSlot::new(inherited.to_raw());
        let code = self.shared.with(OP, |raw| {
            // SAFETY: `raw` is live under the lock; `list` holds `list.len()` ranks and is only read during
            // the call; the out-slot and config live on the heap until NCCL is done with them (`ChildSlot`).
            Ok(unsafe {
                ffi!(
                    OP,
                    ncclCommShrink(
                        raw,
                        list.as_mut_ptr(),
                        list.len() as i32,
                        slot.comm_ptr(),
                        slot.config_ptr(),
                        flags
                    )
                )
            })
        });
        let (code, child) = self.child_from_slot(OP, code, slot)?;
        let mut comm = Self::finish_create(OP, code, child, Some(inherited), 0, 0, None)?;
        comm.fill_rank_size()?;
        #[cfg(feature = "cuda")]
        {
            comm.stream = self.stream.clone();
        }
        Ok(comm)
    }

    /// The configuration of a split/shrink child: the one given, else this communicator's own. Always passed
    /// explicitly (never NULL): with NULL, NCCL copies the parent's `commName` *pointer*, which would dangle
    /// once the parent is dropped; an explicit copy lives as long as the child.
    fn child_config(&self, config: Option<&Config>) -> Config {
        match (config, &self.shared.config) {
            (Some(c), _) => c.clone(),
            (None, Some(parent)) => parent.clone(),
            (None, None) if self.shared.blocking => Config::new(),
            (None, None) => Config::new().blocking(false),
        }
    }

    fn fill_rank_size(&mut self) -> Result<()> {
        let (rank, size) = self.shared.with("ncclCommUserRank", |raw| {
            let (mut r, mut n) = (0i32, 0i32);
            // SAFETY: `raw` is live and ready under the lock; out-pointers are valid.
            unsafe {
                let code = ffi!("ncclCommUserRank", ncclCommUserRank(raw, &mut r));
                result::check("ncclCommUserRank", code, raw)?;
                let code = ffi!("ncclCommCount", ncclCommCount(raw, &mut n));
                result::check("ncclCommCount", code, raw)?;
            }
            Ok((r, n))
        })?;
        self.rank = usize::try_from(rank).map_err(|_| Error::invalid("ncclCommUserRank", "negative rank"))?;
        self.size = usize::try_from(size).map_err(|_| Error::invalid("ncclCommCount", "negative size"))?;
        Ok(())
    }

    /// This rank, in `0..size()` (`ncclCommUserRank`, cached).
    #[doc(alias = "ncclCommUserRank")]
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks (`ncclCommCount`, cached).
    #[doc(alias = "ncclCommCount")]
    pub fn size(&self) -> usize {
        self.size
    }

    /// The CUDA device ordinal this rank runs on (`ncclCommCuDevice`, cached).
    #[doc(alias = "ncclCommCuDevice")]
    pub fn device(&self) -> usize {
        self.device.max(0) as usize
    }

    /// True for a communicator created with `Config::blocking(false)`.
    pub fn is_non_blocking(&self) -> bool {
        !self.shared.blocking
    }

    /// The bound on this communicator's waits: its `Config::wait_timeout`, or
    /// [`DEFAULT_WAIT`] when it was created without a config.
    pub fn wait_timeout(&self) -> Duration {
        self.shared.wait
    }

    /// Asks NCCL for an asynchronous error (`ncclCommGetAsyncError`): `Ok(None)` while healthy (or still
    /// `ncclInProgress`), `Ok(Some(error))` once the communicator failed (e.g. a peer disconnected; abort it),
    /// `Err` when the query itself failed or the communicator was aborted.
    #[doc(alias = "ncclCommGetAsyncError")]
    pub fn async_error(&self) -> Result<Option<Error>> {
        const OP: &str = "ncclCommGetAsyncError";
        let status = self.shared.async_status(OP)?;
        if status == SUCCESS || status == IN_PROGRESS {
            return Ok(None);
        }
        // SAFETY: `raw` is live under the lock.
        let last = self.shared.with(OP, |raw| Ok(unsafe { result::last_error(raw) }))?;
        Ok(Some(Error::Nccl {
            op: OP,
            code: status,
            last_error: last,
        }))
    }

    /// True when NCCL has finished all pending non-blocking work on this communicator (`ncclCommGetAsyncError`
    /// is not `ncclInProgress`). Always true for blocking communicators once created.
    pub fn is_ready(&self) -> Result<bool> {
        Ok(self.shared.async_status("ncclCommGetAsyncError")? != IN_PROGRESS)
    }

    /// A handle that can abort this communicator from another thread (a watchdog). See the
    /// [module docs](self) for what it can interrupt.
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle {
            shared: self.shared.clone(),
        }
    }

    /// True once aborted (by [`AbortHandle::abort`] or a timeout).
    pub fn is_aborted(&self) -> bool {
        self.shared.is_aborted()
    }

    /// Runs `f` with the raw `ncclComm_t`, holding the communicator's lock so an abort cannot free it
    /// meanwhile. [`Error::Aborted`] if it was aborted. For calls this crate does not wrap; using the pointer
    /// is `unsafe` and must not outlive `f` or destroy the communicator.
    pub fn with_raw<R>(&self, f: impl FnOnce(nccl_sys::ncclComm_t) -> R) -> Result<R> {
        self.shared.with("with_raw", |raw| Ok(f(raw)))
    }

    /// Flushes outstanding operations (`ncclCommFinalize`, NCCL 2.14+, collective: every rank calls it), then
    /// frees the communicator (`ncclCommDestroy`). On a non-blocking communicator waits for the finalize by
    /// polling. If either step fails, the communicator is aborted (so nothing leaks) and the error returned.
    #[doc(alias = "ncclCommFinalize")]
    #[doc(alias = "ncclCommDestroy")]
    pub fn finalize(self) -> Result<()> {
        const OP: &str = "ncclCommFinalize";
        // Inside a group NCCL would defer the finalize to the group's end; refused, and the communicator is
        // released (as by a drop) once the group ended.
        crate::group::refuse_in_group(OP)?;
        let res = result::require_loaded(OP, since::CONFIG)
            .and_then(|()| {
                self.shared.call(OP, |raw| {
                    // SAFETY: `raw` is live under the lock.
                    Ok(unsafe { ffi!(OP, ncclCommFinalize(raw)) })
                })
            })
            .and_then(|()| self.shared.destroy());
        if let Err(e) = &res {
            if !matches!(e, Error::Aborted { .. }) {
                if let Err(e2) = self.shared.abort() {
                    tracing::warn!("aborting after a failed finalize: {e2}");
                }
            }
        }
        res
    }

    /// Kills outstanding operations and frees the communicator (`ncclCommAbort`). Local: other ranks see
    /// their operations on this communicator fail or hang until they abort too. Returns `Ok` when it was
    /// already aborted.
    #[doc(alias = "ncclCommAbort")]
    pub fn abort(self) -> Result<()> {
        self.shared.abort()
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if crate::group::in_group() {
            // NCCL would defer the destroy to the group's end: release it after the group instead. (Checked
            // before taking the lock, which a group on this thread may hold.)
            crate::group::defer_release(self.shared.clone(), self.rank, self.size);
            return;
        }
        if *self.shared.lock() != State::Live {
            return;
        }
        if let Err(e) = release(&self.shared, std::thread::panicking()) {
            tracing::warn!(
                "nccl: releasing communicator (rank {} of {}) failed: {e}",
                self.rank,
                self.size
            );
        }
    }
}

/// Aborts a [`Communicator`] from another thread, e.g. a watchdog that gives up on a hung collective.
///
/// Send + Sync and cloneable. After [`abort`](Self::abort), every call on the communicator returns
/// [`Error::Aborted`]; the communicator itself is still dropped normally. See the [module docs](self) for the
/// locking that makes this sound and for what it can interrupt.
///
/// With a blocking communicator (the default), a call that blocks inside NCCL's *host* code (init, finalize,
/// a grouped launch waiting for a peer's connection) holds the communicator's lock, and `abort` waits for it
/// to return: the watchdog cannot break that hang. Create communicators that a watchdog must always be able
/// to abort as non-blocking ([`Config::blocking(false)`](crate::Config::blocking), or
/// [`init_rank_timeout`](Communicator::init_rank_timeout)): every call then returns at once and this crate
/// polls with the lock released between polls, so `abort` gets in. GPU-side hangs (a kernel waiting for a
/// peer) can be aborted in both modes.
///
/// ```no_run
/// # fn main() -> nccl::Result<()> {
/// use std::time::Duration;
/// let id = nccl::UniqueId::new()?;
/// // Non-blocking, so the watchdog's abort is never stuck behind a blocking host call.
/// let comm = nccl::Communicator::init_rank_timeout(&id, 0, 2, &nccl::Config::new(), Duration::from_secs(300))?;
/// let handle = comm.abort_handle();
/// std::thread::spawn(move || {
///     std::thread::sleep(Duration::from_secs(600));
///     let _ = handle.abort(); // nobody finished in ten minutes: kill it
/// });
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct AbortHandle {
    shared: Arc<Shared>,
}

impl AbortHandle {
    /// `ncclCommAbort` on the communicator unless it is already gone (aborted or destroyed): then `Ok(())`.
    #[doc(alias = "ncclCommAbort")]
    pub fn abort(&self) -> Result<()> {
        self.shared.abort()
    }

    /// True once the communicator was aborted.
    pub fn is_aborted(&self) -> bool {
        self.shared.is_aborted()
    }

    /// True while the communicator is usable (neither aborted nor destroyed).
    pub fn is_live(&self) -> bool {
        *self.shared.lock() == State::Live
    }

    /// Waits until the work enqueued so far on `stream` has completed, at most `limit`: polls an event
    /// recorded on `stream` (spinning for the first 50 µs, then sleeping 10 µs growing to 1 ms) and, between
    /// polls, the communicator's asynchronous error. When the communicator reports an error (a peer failed)
    /// it is aborted and the error returned; past `limit` it is aborted, which ends its kernels still in
    /// flight (and so the work behind them on `stream`), and the call returns [`Error::Timeout`]. Either way
    /// the communicator is unusable afterwards (every later call fails with `Error::Aborted`). `stream` is
    /// the communicator's own, or one whose work waits for it (a compute stream).
    #[cfg(feature = "cuda")]
    pub fn synchronize_within(&self, stream: &cudarc::driver::CudaStream, limit: Duration) -> Result<()> {
        const OP: &str = "synchronize_within";
        let done = stream
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(Error::cuda(OP))?;
        let start = std::time::Instant::now();
        let mut step = 0;
        loop {
            if done.try_is_complete().map_err(Error::cuda(OP))? {
                return Ok(());
            }
            let failed = match self.shared.async_status(OP) {
                Ok(status) if status == SUCCESS || status == IN_PROGRESS => None,
                Ok(code) => Some(Error::Nccl {
                    op: OP,
                    code,
                    // SAFETY: `raw` is live under the lock (`with` checks the state).
                    last_error: self
                        .shared
                        .with(OP, |raw| Ok(unsafe { result::last_error(raw) }))
                        .unwrap_or_default(),
                }),
                Err(e) => Some(e),
            };
            if failed.is_some() || start.elapsed() >= limit {
                if let Err(e) = self.abort() {
                    tracing::warn!("nccl: aborting the communicator after {OP} failed: {e}");
                }
                return Err(failed.unwrap_or(Error::Timeout {
                    op: OP,
                    elapsed: start.elapsed(),
                    detail: Some(format!(
                        "the stream's work (a collective or transfer whose peers did not all join?) was not done \
                         within {limit:?}; the communicator has been aborted"
                    )),
                }));
            }
            if start.elapsed() < Duration::from_micros(50) {
                std::hint::spin_loop();
            } else {
                backoff(&mut step);
            }
        }
    }
}

/// A scripted [`Pollable`] for tests of the waits: the statuses it reports, in order, then `then` forever.
/// Counts polls and aborts; once aborted, reports [`Error::Aborted`] like a real communicator.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::VecDeque;

    pub(crate) struct FakeComm {
        script: RefCell<VecDeque<i32>>,
        then: i32,
        pub(crate) polls: Cell<usize>,
        pub(crate) aborts: Cell<usize>,
    }

    impl FakeComm {
        pub(crate) fn new(script: &[i32], then: i32) -> Self {
            FakeComm {
                script: RefCell::new(script.iter().copied().collect()),
                then,
                polls: Cell::new(0),
                aborts: Cell::new(0),
            }
        }
        /// Never leaves `ncclInProgress`: a peer that never arrives.
        pub(crate) fn hung() -> Self {
            Self::new(&[], IN_PROGRESS)
        }
    }

    impl Pollable for FakeComm {
        fn status(&self, op: &'static str) -> Result<i32> {
            if self.aborts.get() > 0 {
                return Err(Error::Aborted { op });
            }
            self.polls.set(self.polls.get() + 1);
            Ok(self.script.borrow_mut().pop_front().unwrap_or(self.then))
        }
        fn last_error(&self, _op: &'static str) -> Result<Option<String>> {
            Ok(Some("fake: peer 1 went away".into()))
        }
        fn abort(&self) -> Result<()> {
            self.aborts.set(self.aborts.get() + 1);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NCCL keeps the `commName` pointer it was given: the communicator must own that very allocation, not a
    /// copy of the string.
    #[test]
    fn shared_state_keeps_the_strings_nccl_points_to() {
        let cfg = Config::new().comm_name("tp-0").unwrap();
        let given = cfg.to_raw().commName;
        let shared = Shared::new(std::ptr::null_mut(), false, Some(cfg));
        assert_eq!(shared.config.as_ref().unwrap().to_raw().commName, given);
        assert!(!shared.blocking);
        assert_eq!(*shared.lock(), State::Live);
    }

    use fake::FakeComm;
    const REMOTE: i32 = nccl_sys::ncclRemoteError as i32;

    /// A call that leaves `ncclInProgress` after a few polls completes, untouched.
    #[test]
    fn wait_completes_when_nccl_finishes() {
        let c = FakeComm::new(&[IN_PROGRESS; 5], SUCCESS);
        wait_until(&c, "ncclGroupEnd", Instant::now(), Duration::from_secs(5)).unwrap();
        assert_eq!((c.polls.get(), c.aborts.get()), (6, 0));
        // Already done: succeeds even with no time left (the status is read before the deadline).
        let c = FakeComm::new(&[], SUCCESS);
        wait_until(&c, "ncclCommSplit", Instant::now(), Duration::ZERO).unwrap();
        assert_eq!((c.polls.get(), c.aborts.get()), (1, 0));
    }

    /// A call that fails in the background gives NCCL's code and text; the wait itself does not abort (the
    /// caller decides: a group aborts, see `group::tests`).
    #[test]
    fn wait_reports_a_background_failure_with_nccl_text() {
        let c = FakeComm::new(&[IN_PROGRESS, IN_PROGRESS, REMOTE], SUCCESS);
        let e = wait_until(&c, "ncclCommShrink", Instant::now(), Duration::from_secs(5)).unwrap_err();
        match &e {
            Error::Nccl { op, code, last_error } => {
                assert_eq!((*op, *code), ("ncclCommShrink", REMOTE));
                assert_eq!(last_error.as_deref(), Some("fake: peer 1 went away"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.kind(), crate::error::ErrorKind::PeerFailed);
        assert_eq!((c.polls.get(), c.aborts.get()), (3, 0));
    }

    /// The deadline: a call NCCL never finishes (split/shrink or ncclGroupEnd waiting for a rank that never
    /// comes) returns a typed timeout within the bound, having aborted the communicator exactly once. Before
    /// this bound the same wait polled forever and only an AbortHandle could end it.
    #[test]
    fn wait_times_out_aborts_and_says_so() {
        let c = FakeComm::hung();
        let limit = Duration::from_millis(40);
        let start = Instant::now();
        let e = wait_until(&c, "ncclCommSplit", start, limit).unwrap_err();
        let took = start.elapsed();
        assert!(took >= limit && took < Duration::from_secs(5), "{took:?}");
        match &e {
            Error::Timeout { op, elapsed, detail } => {
                assert_eq!(*op, "ncclCommSplit");
                assert!(*elapsed >= limit);
                assert!(detail.as_deref().unwrap().contains("aborted"), "{detail:?}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.kind(), crate::error::ErrorKind::Timeout);
        assert_eq!(c.aborts.get(), 1);
        assert!(c.polls.get() >= 2, "polled until the deadline, not once");
        // The deadline counts from `start` (a group's end), not from this communicator's turn.
        let c = FakeComm::hung();
        let e = wait_until(&c, "ncclGroupEnd", Instant::now() - limit, limit).unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        assert_eq!((c.polls.get(), c.aborts.get()), (1, 1));
    }

    /// A watchdog's abort during the wait ends it at the next poll with `Aborted`.
    #[test]
    fn an_abort_during_the_wait_ends_it() {
        let c = FakeComm::hung();
        c.aborts.set(1); // what AbortHandle::abort leaves behind between two polls
        let e = wait_until(&c, "ncclAllReduce", Instant::now(), Duration::from_secs(60)).unwrap_err();
        assert!(matches!(e, Error::Aborted { op: "ncclAllReduce" }), "{e:?}");
        assert_eq!(c.polls.get(), 0);
    }

    /// Every way a communicator gets its bound: its config's, or the default without one.
    #[test]
    fn the_wait_bound_comes_from_the_config() {
        let s = Shared::new(std::ptr::null_mut(), true, None);
        assert_eq!(s.wait, DEFAULT_WAIT);
        assert_eq!(DEFAULT_WAIT, Duration::from_secs(600));
        let cfg = Config::new().blocking(false).wait_timeout(Duration::from_millis(250));
        let s = Shared::new(std::ptr::null_mut(), false, Some(cfg));
        assert_eq!(s.wait, Duration::from_millis(250));
        assert_eq!(
            s.config.as_ref().unwrap().to_raw(),
            Config::new().blocking(false).to_raw(),
            "NCCL never sees the bound"
        );
    }

    fn fake(blocking: bool) -> Communicator {
        Communicator {
            shared: Shared::new(std::ptr::null_mut(), blocking, None),
            rank: 0,
            size: 2,
            device: 0,
            #[cfg(feature = "cuda")]
            stream: None,
            #[cfg(feature = "cuda")]
            scratch: std::cell::RefCell::new(None),
            _not_sync: PhantomData,
        }
    }

    /// The teardown state machine, every case. Before it, `Drop` took `ncclInProgress` for healthy and
    /// destroyed a non-blocking communicator NCCL was still working on.
    #[test]
    fn release_plan_covers_every_state() {
        use Release::*;
        for blocking in [true, false] {
            for status in [
                None,
                Some(SUCCESS),
                Some(IN_PROGRESS),
                Some(nccl_sys::ncclRemoteError as i32),
            ] {
                for panicking in [true, false] {
                    for state in [State::Aborted, State::Closed] {
                        assert_eq!(release_plan(state, blocking, panicking, status), Nothing);
                    }
                    if panicking {
                        assert_eq!(release_plan(State::Live, blocking, true, status), Abort);
                    }
                }
            }
            assert_eq!(release_plan(State::Live, blocking, false, Some(SUCCESS)), Destroy);
            assert_eq!(release_plan(State::Live, blocking, false, None), Abort);
            let failed = Some(nccl_sys::ncclRemoteError as i32);
            assert_eq!(release_plan(State::Live, blocking, false, failed), Abort);
            assert_eq!(
                release_plan(State::Live, blocking, false, Some(99)),
                Abort,
                "unknown codes"
            );
        }
        assert_eq!(
            release_plan(State::Live, false, false, Some(IN_PROGRESS)),
            WaitThenDestroy
        );
        assert_eq!(release_plan(State::Live, true, false, Some(IN_PROGRESS)), Abort);
    }

    /// A destroy counts as done only when NCCL accepted it; any failure leads to an abort.
    #[test]
    fn destroy_is_closed_only_when_nccl_accepted_it() {
        assert!(destroy_accepted(SUCCESS));
        assert!(destroy_accepted(IN_PROGRESS));
        for code in 1..=8 {
            if code != IN_PROGRESS {
                assert!(!destroy_accepted(code), "{code}");
            }
        }
        assert!(!destroy_accepted(-1));
    }

    /// Inside a group, split, shrink, window registration, finalize, abort and destroy are refused before
    /// NCCL is called (the fake communicator's null handle would make any call fail differently), and a
    /// communicator dropped inside the group is released after it. With creation (nccl_cpu.rs) these are all
    /// the calls of this crate that NCCL joins to the group (`ncclGroupStartInternal` in NVIDIA/nccl
    /// src/init.cc and src/dev_runtime.cc); deregistration does not join it (see `Registered`).
    #[test]
    fn teardown_and_children_are_refused_inside_a_group() {
        if !crate::nccl_available() {
            // ncclGroupStart needs the library; outside CI there may be none.
            assert!(
                std::env::var_os("CI").is_none(),
                "CI: libnccl is missing (run scripts/setup.sh)"
            );
            eprintln!("SKIPPED: libnccl not loadable");
            return;
        }
        let comm = fake(false);
        let handle = comm.abort_handle();
        let kept = comm.shared.clone();
        crate::group(|_| {
            let inside = |e: Error, want: &str| {
                assert!(matches!(&e, Error::InsideGroup { op } if *op == want), "{want}: {e:?}");
            };
            inside(comm.split(Some(0), 0, None).unwrap_err(), "ncclCommSplit");
            inside(
                comm.shrink(&[1], None, ShrinkMode::Default).unwrap_err(),
                "ncclCommShrink",
            );
            // SAFETY: refused before NCCL sees the (null) pointer.
            let win = unsafe { comm.register_window_raw(std::ptr::null_mut(), 4096, 0) };
            inside(win.unwrap_err(), "ncclCommWindowRegister");
            inside(handle.abort().unwrap_err(), "ncclCommAbort");
            inside(comm.shared.destroy().unwrap_err(), "ncclCommDestroy");
            assert!(handle.is_live(), "nothing was torn down");
            // Make the deferred release a no-op on the fake handle, then finalize (refused) and drop it.
            *comm.shared.lock() = State::Aborted;
            let taken = comm;
            inside(taken.finalize().unwrap_err(), "ncclCommFinalize");
            assert_eq!(
                crate::group::deferred_len(),
                1,
                "the dropped communicator waits for the group's end"
            );
            Ok(())
        })
        .unwrap();
        assert_eq!(crate::group::deferred_len(), 0, "released after the group");
        assert_eq!(
            Arc::strong_count(&kept),
            2,
            "only the test and the handle still hold it"
        );
    }
}
