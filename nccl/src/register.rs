//! Memory NCCL knows about: buffers registered with a communicator (`ncclCommRegister`, zero-copy paths),
//! symmetric windows (`ncclCommWindowRegister`), and memory from NCCL's own allocator (`ncclMemAlloc`).
//!
//! Registrations and windows own the buffer they cover and borrow the communicator (`'c`), so neither can be
//! freed while registered; dropping deregisters first. `ncclMemAlloc` takes no communicator, so its memory
//! ([`NcclMemory`], and `DeviceMemory` with feature `cuda`) is not tied to one: the same buffer can be registered with a parent
//! communicator and its split children.

use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::result::{self, ffi};
use std::ffi::c_void;

/// `NCCL_WIN_*` flags for [`Communicator::register_window_raw`].
pub mod window_flags {
    /// `NCCL_WIN_DEFAULT`.
    pub const DEFAULT: i32 = 0x00;
    /// `NCCL_WIN_COLL_SYMMETRIC`: every rank registers a buffer at the same offset (symmetric kernels).
    pub const COLL_SYMMETRIC: i32 = 0x01;
    /// `NCCL_WIN_STRICT_ORDERING`.
    pub const STRICT_ORDERING: i32 = 0x02;
}

/// Alignment NCCL requires of window buffers (`NCCL_WIN_REQUIRED_ALIGNMENT`).
pub const WINDOW_ALIGNMENT: usize = 4096;

fn deregister(comm: &Communicator, handle: *mut c_void, window: bool) {
    let op = if window {
        "ncclCommWindowDeregister"
    } else {
        "ncclCommDeregister"
    };
    let res = comm.shared.with(op, |raw| {
        // SAFETY: `handle` came from the matching register call on this live communicator (held under its
        // lock) and is deregistered exactly once.
        unsafe {
            let code = if window {
                ffi!(op, ncclCommWindowDeregister(raw, handle.cast()))
            } else {
                ffi!(op, ncclCommDeregister(raw, handle))
            };
            result::check(op, code, raw)
        }
    });
    match res {
        Ok(()) | Err(Error::Aborted { .. }) => {} // an abort released every registration
        Err(e) => tracing::warn!("nccl: {op} failed: {e}"),
    }
}

/// A raw registration from [`Communicator::register_raw`]; deregistered (`ncclCommDeregister`) on drop.
#[derive(Debug)]
#[doc(alias = "ncclCommRegister")]
pub struct RawRegistration<'c> {
    comm: &'c Communicator,
    handle: *mut c_void,
}

impl Drop for RawRegistration<'_> {
    fn drop(&mut self) {
        deregister(self.comm, self.handle, false);
    }
}

/// A raw window from [`Communicator::register_window_raw`]; deregistered (`ncclCommWindowDeregister`) on drop.
#[derive(Debug)]
#[doc(alias = "ncclCommWindowRegister")]
pub struct RawWindow<'c> {
    comm: &'c Communicator,
    win: nccl_sys::ncclWindow_t,
}

impl RawWindow<'_> {
    /// The `ncclWindow_t`, for device-side APIs.
    pub fn as_raw(&self) -> nccl_sys::ncclWindow_t {
        self.win
    }
}

impl Drop for RawWindow<'_> {
    fn drop(&mut self) {
        deregister(self.comm, self.win.cast(), true);
    }
}

impl Communicator {
    /// Registers `bytes` of device memory at `ptr` with this communicator (`ncclCommRegister`, NCCL 2.19+), so
    /// collectives on it can skip staging copies. Deregistered when the returned value drops.
    ///
    /// # Safety
    /// `ptr..ptr + bytes` is device memory of this communicator's device that stays allocated, and is not
    /// in use by a collective when the registration drops, for the registration's whole life. A call queued
    /// inside a [`group`](crate::group()) is in use until the group has ended: do not drop the registration
    /// inside a group that queued work on its memory (NCCL deregisters at once, see the docs of `Registered`
    /// with feature `cuda`).
    #[doc(alias = "ncclCommRegister")]
    pub unsafe fn register_raw(&self, ptr: *mut c_void, bytes: usize) -> Result<RawRegistration<'_>> {
        const OP: &str = "ncclCommRegister";
        result::require_loaded(OP, crate::version::since::REGISTER)?;
        let mut handle: *mut c_void = std::ptr::null_mut();
        self.shared.call(OP, |raw| {
            // SAFETY: `raw` is live under its lock; the memory range is the caller's promise; `handle` is a
            // valid out-pointer that NCCL fills before the call (or its non-blocking completion) returns.
            Ok(unsafe { ffi!(OP, ncclCommRegister(raw, ptr, bytes, &mut handle)) })
        })?;
        Ok(RawRegistration { comm: self, handle })
    }

    /// Registers a window (`ncclCommWindowRegister`, NCCL 2.27+; collective: every rank calls it) over `bytes`
    /// at `ptr` with [`window_flags`]. Symmetric windows need memory from `ncclMemAlloc` ([`NcclMemory`]),
    /// aligned to [`WINDOW_ALIGNMENT`].
    ///
    /// # Safety
    /// As [`register_raw`](Self::register_raw).
    #[doc(alias = "ncclCommWindowRegister")]
    pub unsafe fn register_window_raw(&self, ptr: *mut c_void, bytes: usize, flags: i32) -> Result<RawWindow<'_>> {
        const OP: &str = "ncclCommWindowRegister";
        // Collective: inside a group NCCL would fill `win` at the group's end, after this frame is gone.
        crate::group::refuse_in_group(OP)?;
        result::require_loaded(OP, crate::version::since::WINDOW)?;
        if flags & window_flags::COLL_SYMMETRIC != 0 && (ptr as usize) % WINDOW_ALIGNMENT != 0 {
            return Err(Error::invalid(
                OP,
                format!("a symmetric window must be {WINDOW_ALIGNMENT}-byte aligned"),
            ));
        }
        let mut win: nccl_sys::ncclWindow_t = std::ptr::null_mut();
        self.shared.call(OP, |raw| {
            // SAFETY: `raw` is live under its lock; the memory range is the caller's promise; `win` is a valid
            // out-pointer that NCCL fills before the call (or its non-blocking completion) returns.
            Ok(unsafe { ffi!(OP, ncclCommWindowRegister(raw, ptr, bytes, &mut win, flags)) })
        })?;
        Ok(RawWindow { comm: self, win })
    }
}

/// Device memory from NCCL's allocator (`ncclMemAlloc`, NCCL 2.19+), suitable for buffer registration, NVLS
/// and symmetric windows. Freed (`ncclMemFree`) on drop.
///
/// This raw form does not track GPU work: dropping it while a kernel still uses it is the user's bug, which
/// is why only `unsafe` calls can hand its pointer to NCCL. With feature `cuda`, `DeviceMemory` tracks work
/// with events like a `CudaSlice`.
#[derive(Debug)]
#[doc(alias = "ncclMemAlloc")]
#[doc(alias = "ncclMemFree")]
pub struct NcclMemory {
    ptr: *mut c_void,
    bytes: usize,
}

// SAFETY: the allocation is plain device memory, not tied to the allocating thread; `ncclMemFree` may be called
// from any thread (with the right device current, which it sets from the pointer itself).
unsafe impl Send for NcclMemory {}
// SAFETY: `&NcclMemory` only exposes the address and size.
unsafe impl Sync for NcclMemory {}

impl NcclMemory {
    /// Allocates `bytes` on the current CUDA device (`ncclMemAlloc`); the granularity may round it up.
    #[doc(alias = "ncclMemAlloc")]
    pub fn alloc(bytes: usize) -> Result<Self> {
        const OP: &str = "ncclMemAlloc";
        result::require_loaded(OP, crate::version::since::REGISTER)?;
        if bytes == 0 {
            return Err(Error::invalid(OP, "cannot allocate 0 bytes"));
        }
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ptr` is a valid out-pointer; NCCL allocates on the current device.
        unsafe {
            let code = ffi!(OP, ncclMemAlloc(&mut ptr, bytes));
            result::check(OP, code, std::ptr::null_mut())?;
        }
        Ok(NcclMemory { ptr, bytes })
    }

    /// The device address.
    pub fn as_ptr(&self) -> *mut c_void {
        self.ptr
    }

    /// The size asked for, in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for NcclMemory {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from ncclMemAlloc and is freed once; tracked wrappers wait for GPU work first.
        let res: Result<()> = (|| unsafe {
            let code = ffi!("ncclMemFree", ncclMemFree(self.ptr));
            result::check("ncclMemFree", code, std::ptr::null_mut())
        })();
        if let Err(e) = res {
            tracing::warn!("nccl: ncclMemFree failed: {e}");
        }
    }
}

#[cfg(feature = "cuda")]
pub use typed::{DeviceMemory, Registered, Window};

#[cfg(feature = "cuda")]
mod typed {
    use super::*;
    use crate::types::Elem;
    use cudarc::driver::{CudaEvent, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
    use std::marker::PhantomData;
    use std::sync::Arc;

    fn cuda(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
        Error::cuda(op)
    }

    /// `len` elements of `T` from NCCL's allocator on `stream`'s device, tracked like a `CudaSlice`: the
    /// collectives wait for earlier writes and record events, and drop waits for those events before
    /// `ncclMemFree`. Use it wherever a `DevicePtr`/`DevicePtrMut` is taken.
    #[derive(Debug)]
    #[doc(alias = "ncclMemAlloc")]
    pub struct DeviceMemory<T> {
        mem: NcclMemory,
        len: usize,
        stream: Arc<CudaStream>,
        read: Option<CudaEvent>,
        write: Option<CudaEvent>,
        _t: PhantomData<T>,
    }

    impl<T: Elem> DeviceMemory<T> {
        /// Allocates `len` elements with `ncclMemAlloc` on `stream`'s device and zeroes them (on `stream`).
        pub fn alloc_zeros(stream: &Arc<CudaStream>, len: usize) -> Result<Self> {
            const OP: &str = "DeviceMemory::alloc_zeros";
            let bytes = len
                .checked_mul(std::mem::size_of::<T>())
                .ok_or_else(|| Error::invalid(OP, format!("{len} elements overflow usize bytes")))?;
            let ctx = stream.context();
            ctx.bind_to_thread().map_err(cuda(OP))?;
            let mem = NcclMemory::alloc(bytes.max(1))?;
            let read = Some(ctx.new_event(None).map_err(cuda(OP))?);
            let write = Some(ctx.new_event(None).map_err(cuda(OP))?);
            let this = DeviceMemory {
                mem,
                len,
                stream: stream.clone(),
                read,
                write,
                _t: PhantomData,
            };
            // SAFETY: the allocation holds at least `bytes` bytes; the memset is ordered on `stream` and the
            // write event recorded after it, so later users wait for it.
            unsafe {
                cudarc::driver::result::memset_d8_async(this.mem.as_ptr() as u64, 0, bytes, stream.cu_stream())
                    .map_err(cuda(OP))?;
            }
            if let Some(w) = &this.write {
                w.record(stream).map_err(cuda(OP))?;
            }
            Ok(this)
        }
    }

    impl<T> DeviceSlice<T> for DeviceMemory<T> {
        fn len(&self) -> usize {
            self.len
        }
        fn stream(&self) -> &Arc<CudaStream> {
            &self.stream
        }
    }

    impl<T> DevicePtr<T> for DeviceMemory<T> {
        fn device_ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
            if let Some(w) = &self.write {
                stream.context().record_err(stream.wait(w));
            }
            (self.mem.as_ptr() as u64, SyncOnDrop::record_event(&self.read, stream))
        }
    }

    impl<T> DevicePtrMut<T> for DeviceMemory<T> {
        fn device_ptr_mut<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
            for e in [&self.read, &self.write].into_iter().flatten() {
                stream.context().record_err(stream.wait(e));
            }
            (self.mem.as_ptr() as u64, SyncOnDrop::record_event(&self.write, stream))
        }
    }

    impl<T> Drop for DeviceMemory<T> {
        fn drop(&mut self) {
            // Wait for every use before `NcclMemory`'s drop frees the memory, with the device current for it.
            let ctx = self.stream.context();
            if let Err(err) = ctx.bind_to_thread() {
                tracing::warn!("nccl: binding the device before ncclMemFree failed: {err}");
            }
            // cudarc records the events a `SyncOnDrop` carries only while the context manages stream
            // synchronization (cudarc 0.19.10, driver/safe/core.rs, `impl Drop for SyncOnDrop`: `if
            // stream.ctx.is_managing_stream_synchronization()`), i.e. once a second stream exists and event
            // tracking is on. Otherwise the events say nothing about the queued work, so wait for everything
            // queued in the context instead: the free is then ordered after every use, on any stream.
            let waited = if ctx.is_managing_stream_synchronization() {
                [&self.read, &self.write]
                    .into_iter()
                    .flatten()
                    .try_for_each(|e| e.synchronize())
            } else {
                ctx.synchronize()
            };
            if let Err(err) = waited {
                tracing::warn!("nccl: waiting for DeviceMemory's last use failed: {err}");
            }
        }
    }

    /// A buffer registered with a communicator (`ncclCommRegister`): owns the buffer (so it cannot be freed
    /// while registered) and can be passed to collectives like the buffer itself. Dropping waits for every
    /// use of the buffer, deregisters, then drops the buffer; [`into_inner`](Self::into_inner) gives it back.
    ///
    /// Inside a [`group`](crate::group()): NCCL runs both deregistrations at once, never at the group's end
    /// (NVIDIA/nccl `src/register/register.cc` `ncclCommDeregister`, `src/dev_runtime.cc`
    /// `ncclCommWindowDeregister`: neither joins the group), so nothing is written after they returned. What
    /// must not happen is deregistering while a call queued in the group still uses the registration: NCCL
    /// launches that call at `ncclGroupEnd`, and for a window it keeps the window's pointer from the call
    /// (`src/enqueue.cc`, `taskAppend` → `ceCollTaskAppend`: `t->sendWin = sendWin`). The group borrows
    /// every buffer it was given until it has ended, so that does not compile:
    ///
    /// ```compile_fail,E0505
    /// # fn f(comm: &nccl::Communicator, buf: cudarc::driver::CudaSlice<f32>) -> nccl::Result<()> {
    /// let mut win = comm.register_window(buf, nccl::register::window_flags::DEFAULT)?;
    /// nccl::group(|g| {
    ///     g.all_reduce_in_place(comm, &mut win, nccl::ReduceOp::Sum)?;
    ///     drop(win); // error[E0505]: the group borrows `win` until it has ended
    ///     Ok(())
    /// })
    /// # }
    /// ```
    ///
    /// Deregistering after the group is fine:
    ///
    /// ```no_run
    /// # fn f(comm: &nccl::Communicator, buf: cudarc::driver::CudaSlice<f32>) -> nccl::Result<()> {
    /// let mut win = comm.register_window(buf, nccl::register::window_flags::DEFAULT)?;
    /// nccl::group(|g| g.all_reduce_in_place(comm, &mut win, nccl::ReduceOp::Sum))?;
    /// let buf = win.into_inner(); // synchronizes the stream, then ncclCommWindowDeregister
    /// # Ok(()) }
    /// ```
    #[derive(Debug)]
    #[doc(alias = "ncclCommRegister")]
    #[doc(alias = "ncclCommDeregister")]
    pub struct Registered<'c, T, B: DevicePtrMut<T>> {
        comm: &'c Communicator,
        handle: *mut c_void,
        window: bool,
        buf: Option<B>,
        _t: PhantomData<T>,
    }

    /// A window (`ncclCommWindowRegister`) owning its buffer; see [`Registered`].
    pub type Window<'c, T, B> = Registered<'c, T, B>;

    impl<'c, T, B: DevicePtrMut<T>> Registered<'c, T, B> {
        /// The buffer.
        pub fn get(&self) -> &B {
            self.buf.as_ref().expect("present until drop")
        }
        /// Deregisters and returns the buffer.
        pub fn into_inner(mut self) -> B {
            self.release();
            self.buf.take().expect("present until drop")
        }
        fn release(&mut self) {
            if self.handle.is_null() {
                return;
            }
            // Wait for every use of the buffer (on any stream, through its cudarc events) before NCCL forgets
            // the registration: make the communicator's stream wait for them, then synchronize it.
            if let (Ok(s), Some(buf)) = (self.comm.stream(), self.buf.as_mut()) {
                let (_, guard) = buf.device_ptr_mut(s);
                drop(guard);
                if let Err(e) = s.synchronize() {
                    tracing::warn!("nccl: synchronize before deregistering failed: {e}");
                }
            }
            deregister(self.comm, self.handle, self.window);
            self.handle = std::ptr::null_mut();
        }
    }

    impl<T, B: DevicePtrMut<T>> Drop for Registered<'_, T, B> {
        fn drop(&mut self) {
            self.release();
        }
    }

    impl<T, B: DevicePtrMut<T>> DeviceSlice<T> for Registered<'_, T, B> {
        fn len(&self) -> usize {
            self.get().len()
        }
        fn stream(&self) -> &Arc<CudaStream> {
            self.get().stream()
        }
    }

    impl<T, B: DevicePtrMut<T> + DevicePtr<T>> DevicePtr<T> for Registered<'_, T, B> {
        fn device_ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
            self.get().device_ptr(stream)
        }
    }

    impl<T, B: DevicePtrMut<T>> DevicePtrMut<T> for Registered<'_, T, B> {
        fn device_ptr_mut<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
            self.buf.as_mut().expect("present until drop").device_ptr_mut(stream)
        }
    }

    impl Communicator {
        fn address<T, B: DevicePtrMut<T>>(&self, op: &'static str, buf: &mut B) -> Result<(*mut c_void, usize)> {
            self.check_context(op, "buffer", buf.stream().context())?;
            let stream = self.stream()?.clone();
            let bytes = buf.num_bytes();
            let (p, guard) = buf.device_ptr_mut(&stream);
            drop(guard);
            Ok((p as usize as *mut c_void, bytes))
        }

        /// Registers `buf` with this communicator (`ncclCommRegister`, NCCL 2.19+) and takes ownership of it
        /// until the registration is dropped or [`into_inner`](Registered::into_inner) is called.
        #[doc(alias = "ncclCommRegister")]
        pub fn register<T, B: DevicePtrMut<T>>(&self, mut buf: B) -> Result<Registered<'_, T, B>> {
            let (ptr, bytes) = self.address("ncclCommRegister", &mut buf)?;
            // SAFETY: the range is exactly `buf`'s memory on this device, which the returned value owns (so it
            // stays allocated) and whose drop synchronizes the stream before deregistering.
            let raw = unsafe { self.register_raw(ptr, bytes)? };
            let handle = raw.handle;
            std::mem::forget(raw);
            Ok(Registered {
                comm: self,
                handle,
                window: false,
                buf: Some(buf),
                _t: PhantomData,
            })
        }

        /// Registers `buf` as a window (`ncclCommWindowRegister`, NCCL 2.27+, collective) with
        /// [`window_flags`]; symmetric windows need [`DeviceMemory`] (`ncclMemAlloc`) buffers.
        #[doc(alias = "ncclCommWindowRegister")]
        pub fn register_window<T, B: DevicePtrMut<T>>(&self, mut buf: B, flags: i32) -> Result<Window<'_, T, B>> {
            let (ptr, bytes) = self.address("ncclCommWindowRegister", &mut buf)?;
            // SAFETY: as in `register`.
            let raw = unsafe { self.register_window_raw(ptr, bytes, flags)? };
            let handle = raw.win.cast();
            std::mem::forget(raw);
            Ok(Registered {
                comm: self,
                handle,
                window: true,
                buf: Some(buf),
                _t: PhantomData,
            })
        }
    }
}
