//! CUDA graphs over cudarc 0.19 streams (feature `cuda`): capture the work a stream is given (NCCL
//! collectives included) into a graph once, then launch that graph as often as wanted.
//!
//! ```no_run
//! # fn main() -> nccl::Result<()> {
//! use nccl::graph::{Capture, CaptureMode};
//! use nccl::{Communicator, ReduceOp, UniqueId};
//! let stream = nccl::cudarc::driver::CudaContext::new(0).unwrap().new_stream().unwrap();
//! let comm = Communicator::init_rank_on(stream.clone(), &UniqueId::new()?, 0, 1)?;
//! let mut buf = stream.alloc_zeros::<f32>(1024).unwrap();
//! nccl::graph::require_nccl_capture()?;
//! // SAFETY: nothing else uses this device's context while the capture is open.
//! let capture = unsafe { Capture::begin(&stream, CaptureMode::ThreadLocal)? };
//! comm.all_reduce_in_place(&mut buf, ReduceOp::Sum)?; // recorded, not run
//! let graph = capture.end()?;
//! for _ in 0..3 {
//!     // SAFETY: `buf`, the only buffer the captured all-reduce uses, is alive and used by nothing else.
//!     unsafe { graph.launch()? }; // runs the all-reduce
//! }
//! stream.synchronize().unwrap();
//! # Ok(()) }
//! ```
//!
//! What NCCL requires (NCCL user guide, "Using NCCL with CUDA Graphs",
//! <https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/usage/cudagraph.html>):
//! - NCCL 2.9 or newer and CUDA 11.3 or newer ([`require_nccl_capture`] checks the NCCL half);
//! - whether an operation is captured is a collective property: every rank of the communicator captures the
//!   same operations (both peers for send/recv), and launching a graph that holds NCCL operations is itself
//!   collective: every rank of the capture launches its own graph from that capture, the same number of times;
//! - with one thread per GPU (how this crate's callers run ranks), capture in
//!   [`CaptureMode::ThreadLocal`]: in global mode another thread's unsafe call (NCCL's own `cudaMalloc` for a
//!   first-time peer connection, for instance) invalidates the capture;
//! - NCCL advises one GPU per process for graphs: with several GPUs driven from one thread, a
//!   `cudaGraphLaunch` may block and deadlock the launch across GPUs. Several graphs of different
//!   communicators launched from one thread have been seen to deadlock CUDA (`NCCL_GRAPH_MIXING_SUPPORT`).
//!
//! And what the capture itself requires (CUDA's stream-capture rules): nothing synchronizes or queries the
//! capturing stream (no `synchronize`, no host reads of its buffers), the capture ends on the thread that began
//! it ([`Capture`] is not `Send`), and nothing on the stream is ordered with work outside the capture through
//! events. cudarc orders each buffer's uses across streams with events it records and waits for on every
//! access; while a capture is open, those would be captured into the graph (and the buffers' events would
//! then belong to the graph) or would wait on events recorded outside it, which the capture refuses. So
//! [`Capture::begin`] turns cudarc's event tracking off on the stream's context for the capture's lifetime and
//! back on afterwards: that is why it is `unsafe` (see its contract).
//!
//! This module is compiled and unit-tested without a device here; the GPU tests that exercise it
//! (`nccl/tests/nccl_gpu.rs`, `graph_*`) have not run on a GPU in this repository.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{result as cu, sys, CudaStream};

use crate::error::{Error, Result};
use crate::version::since;

/// How strict a capture is about CUDA calls that are unsafe during capture (`cudaMalloc`, synchronous
/// copies, ...), made while it is open: `CUstreamCaptureMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CaptureMode {
    /// Such calls from any thread fail while this capture is open (`CU_STREAM_CAPTURE_MODE_GLOBAL`, CUDA's
    /// default). Not for several ranks on threads of one process: one rank's capture breaks the others.
    Global,
    /// Such calls from this thread fail (`CU_STREAM_CAPTURE_MODE_THREAD_LOCAL`); other threads are free. What
    /// nccl-tests uses for its timed loop and what NCCL recommends with one thread per GPU. The default.
    #[default]
    ThreadLocal,
    /// No such checks (`CU_STREAM_CAPTURE_MODE_RELAXED`).
    Relaxed,
}

impl CaptureMode {
    /// The driver's value.
    pub fn raw(self) -> sys::CUstreamCaptureMode {
        match self {
            CaptureMode::Global => sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL,
            CaptureMode::ThreadLocal => sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            CaptureMode::Relaxed => sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
        }
    }
}

/// Refuses ([`Error::Unsupported`]) when the loaded NCCL cannot be captured into CUDA graphs (before 2.9).
pub fn require_nccl_capture() -> Result<()> {
    crate::result::require_loaded("CUDA graph capture of NCCL operations", since::GRAPH_CAPTURE)
}

/// An open stream capture: work enqueued on the stream is recorded into a graph instead of running.
///
/// [`end`](Capture::end) turns the recording into a launchable [`Graph`]. Dropped without `end` (an error
/// returned with `?` while capturing, a panic), the capture is ended and its graph thrown away, so the stream
/// never stays in capture mode. Either way cudarc's event tracking is restored.
///
/// Not `Send`: CUDA requires a non-relaxed capture to end on the thread that began it.
#[must_use = "dropping a capture discards what it recorded; call end() to get the graph"]
pub struct Capture<'s> {
    stream: &'s Arc<CudaStream>,
    /// Whether event tracking was on at `begin` (and is to be turned back on).
    restore_tracking: bool,
    open: bool,
    _not_send: PhantomData<*const ()>,
}

impl<'s> Capture<'s> {
    /// Begins capturing `stream` in `mode` (`cuStreamBeginCapture`), with cudarc's event tracking turned off
    /// on its context until the capture ends (see the [module](self) documentation for why).
    ///
    /// # Safety
    ///
    /// While the capture is open, cudarc does not order buffers between streams of the stream's context (its
    /// event tracking is off for the whole context, every thread). The caller guarantees that during the
    /// capture no other thread or stream of that context relies on it: no cudarc buffer of the context is
    /// allocated, freed or used on another stream concurrently (the usual case: one thread per GPU, every
    /// buffer on the one stream). Buffers allocated during the capture are never event-tracked afterwards.
    ///
    /// The graph's work is ordered only by the stream it is launched on: a buffer it uses that was last
    /// written on another stream must be ordered before the launch by the caller (e.g. `stream.join(&other)`).
    pub unsafe fn begin(stream: &'s Arc<CudaStream>, mode: CaptureMode) -> Result<Capture<'s>> {
        let ctx = stream.context();
        let restore_tracking = ctx.is_event_tracking();
        if restore_tracking {
            // SAFETY: the caller guarantees nothing else on this context depends on event tracking while the
            // capture is open (this function's contract); it is turned back on when the capture ends.
            unsafe { ctx.disable_event_tracking() };
        }
        let mut capture = Capture {
            stream,
            restore_tracking,
            open: false,
            _not_send: PhantomData,
        };
        // On failure `capture` drops with `open == false`: it only restores the tracking.
        stream
            .begin_capture(mode.raw())
            .map_err(Error::cuda("cuStreamBeginCapture"))?;
        capture.open = true;
        Ok(capture)
    }

    /// The stream being captured.
    pub fn stream(&self) -> &'s Arc<CudaStream> {
        self.stream
    }

    /// Ends the capture (`cuStreamEndCapture`) and instantiates its graph (`cuGraphInstantiateWithFlags`).
    ///
    /// An error here usually names an earlier call that broke the capture (CUDA reports an invalidated capture
    /// only when it ends); the stream is out of capture mode either way.
    pub fn end(mut self) -> Result<Graph> {
        self.open = false;
        let stream = self.stream.clone();
        let ended = end_capture(&stream);
        self.restore();
        let graph = ended.map_err(Error::cuda("cuStreamEndCapture"))?;
        if graph.is_null() {
            return Err(Error::Cuda {
                op: "cuStreamEndCapture",
                message: "the capture produced no graph".into(),
            });
        }
        // SAFETY: `graph` is the valid graph the capture just produced; this call does not take ownership.
        match unsafe { cu::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) } {
            Ok(exec) => Ok(Graph {
                graph,
                exec,
                stream,
                _not_send: PhantomData,
            }),
            Err(e) => {
                // SAFETY: `graph` is valid, owned here and used by nothing else.
                stream.context().record_err(unsafe { cu::graph::destroy(graph) });
                Err(Error::cuda("cuGraphInstantiateWithFlags")(e))
            }
        }
    }

    fn restore(&mut self) {
        if std::mem::take(&mut self.restore_tracking) {
            // SAFETY: tracking was on before `begin`; turning it back on restores the caller's setting. Buffers
            // allocated during the capture stay untracked, as `begin`'s contract says.
            unsafe { self.stream.context().enable_event_tracking() };
        }
    }
}

/// Makes `stream`'s context current on this thread without cudarc's `bind_to_thread`, which first returns
/// (and clears) any error an earlier drop recorded in the context: ending a capture or destroying a graph must
/// not be skipped because of an unrelated earlier error, and that error stays recorded for the caller's next
/// cudarc call.
fn make_current(stream: &CudaStream) -> std::result::Result<(), cudarc::driver::DriverError> {
    // SAFETY: the context is live (the stream holds an Arc to it); making it current has no other effect.
    unsafe { cu::ctx::set_current(stream.context().cu_ctx()) }
}

/// `cuStreamEndCapture` on `stream`, returning the raw graph (null when none). Ends the capture even when the
/// context cannot be made current (the driver then reports whatever is wrong).
fn end_capture(stream: &CudaStream) -> std::result::Result<sys::CUgraph, cudarc::driver::DriverError> {
    // Ignored on purpose: if the context cannot be made current, cuStreamEndCapture says what is wrong, and a
    // graph it does return is not leaked.
    let _ = make_current(stream);
    // SAFETY: `stream` is a live stream (borrowed for this call) of that context.
    unsafe { cu::stream::end_capture(stream.cu_stream()) }
}

impl Drop for Capture<'_> {
    fn drop(&mut self) {
        if std::mem::take(&mut self.open) {
            // Abandoned (an error or a panic while capturing): end it so the stream leaves capture mode, and
            // throw the graph away. Failing here is expected when the capture was invalidated: the call that
            // invalidated it already returned its error, so this one is only logged.
            match end_capture(self.stream) {
                Ok(graph) if !graph.is_null() => {
                    // SAFETY: the graph the capture produced, owned here and used by nothing else.
                    if let Err(e) = unsafe { cu::graph::destroy(graph) } {
                        tracing::debug!("cuGraphDestroy of an abandoned capture failed: {e}");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!("cuStreamEndCapture of an abandoned capture: {e}"),
            }
        }
        self.restore();
    }
}

/// An instantiated CUDA graph (`CUgraph` plus `CUgraphExec`), launched on the stream it was captured from.
/// Both are destroyed on drop.
///
/// Not `Send` (CUDA graphs are not internally synchronized; keep one on the thread that captured it).
pub struct Graph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    stream: Arc<CudaStream>,
    _not_send: PhantomData<*const ()>,
}

impl Graph {
    /// Launches the graph on its stream (`cuGraphLaunch`): the captured work runs once, after what the
    /// stream already holds. Returns once it is enqueued; synchronize the stream before reading results.
    ///
    /// A graph holding NCCL operations is a collective: every rank launches its graph of the same capture.
    ///
    /// # Safety
    ///
    /// The graph runs the captured kernels and collectives on the device addresses they had at capture
    /// time; nothing here holds those buffers. Every device buffer the captured work reads or writes must
    /// still be allocated (not dropped since the capture) and not accessed by anything else until the
    /// launched work is done (synchronize its stream, or order other streams after it).
    pub unsafe fn launch(&self) -> Result<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(Error::cuda("cuGraphLaunch"))?;
        // SAFETY: `exec` is the live executable graph this value owns and `stream` the live stream it was
        // captured from (kept alive by the Arc).
        unsafe { cu::graph::launch(self.exec, self.stream.cu_stream()) }.map_err(Error::cuda("cuGraphLaunch"))
    }

    /// Uploads the graph to the device ahead of the first launch (`cuGraphUpload`), so that launch does not
    /// pay for it (optional).
    pub fn upload(&self) -> Result<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(Error::cuda("cuGraphUpload"))?;
        // SAFETY: as in `launch`.
        unsafe { cu::graph::upload(self.exec, self.stream.cu_stream()) }.map_err(Error::cuda("cuGraphUpload"))
    }

    /// The stream the graph launches on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        let ctx = self.stream.context();
        // As cudarc does for its own graphs, errors are kept in the context (the next cudarc call returns them).
        ctx.record_err(make_current(&self.stream));
        // SAFETY: `exec` and `graph` are owned by this value, valid, and destroyed once (here). CUDA defers the
        // destruction of an executable graph that is still running.
        ctx.record_err(unsafe { cu::graph::exec_destroy(self.exec) });
        // SAFETY: as above.
        ctx.record_err(unsafe { cu::graph::destroy(self.graph) });
    }
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph")
            .field("exec", &self.exec)
            .field("device", &self.stream.context().ordinal())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_map_to_the_driver_values() {
        use sys::CUstreamCaptureMode as M;
        assert_eq!(CaptureMode::default(), CaptureMode::ThreadLocal);
        assert_eq!(CaptureMode::Global.raw(), M::CU_STREAM_CAPTURE_MODE_GLOBAL);
        assert_eq!(CaptureMode::ThreadLocal.raw(), M::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
        assert_eq!(CaptureMode::Relaxed.raw(), M::CU_STREAM_CAPTURE_MODE_RELAXED);
    }

    #[test]
    fn nccl_capture_needs_2_9() {
        assert_eq!(since::GRAPH_CAPTURE, crate::Version::new(2, 9, 0));
        let e = crate::result::require(
            "CUDA graph capture of NCCL operations",
            since::GRAPH_CAPTURE,
            crate::Version::new(2, 8, 4),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e:?}");
        assert!(e.to_string().contains("needs NCCL 2.9 or newer"), "{e}");
        assert!(crate::result::require("x", since::GRAPH_CAPTURE, crate::Version::new(2, 9, 6)).is_ok());
    }
}
