//! [`PerfComm`] for NCCL communicators over cudarc buffers, and the NCCL launch (feature `cuda`).
//!
//! Run on GPUs (not verified on this CPU-only machine):
//! `cargo run --release --features cuda --bin nccl-perf -- all_reduce -b 8 -e 8G -f 2 -g 8`
//! (one process, 8 GPUs, one thread per GPU) or `torchrun --nproc-per-node 8 target/release/nccl-perf all_reduce
//! -b 8 -e 8G -f 2` (one GPU per process).

use std::borrow::Cow;
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError};
use nccl::bootstrap::RankInfo;
use nccl::{Communicator, DataType, Elem, Error, Result, UniqueId};

use super::cli::Cli;
use super::device::{DeviceInfo, PerfComm};

/// The number of visible CUDA devices (0 when the driver is missing; never panics).
pub fn device_count() -> usize {
    nccl::cuda_device_count()
}

fn cuda(op: &'static str) -> impl Fn(DriverError) -> Error {
    Error::cuda(op)
}

fn attr(ctx: &CudaContext, a: sys::CUdevice_attribute) -> u32 {
    ctx.attribute(a).map_or(0, |v| v.max(0) as u32)
}

impl PerfComm for Communicator {
    type Mem<T: Elem> = CudaSlice<T>;

    fn alloc<T: Elem>(&self, len: usize) -> Result<CudaSlice<T>> {
        const OP: &str = "nccl-perf alloc";
        let stream: &Arc<CudaStream> = self.stream()?;
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| Error::invalid(OP, format!("{len} elements overflow usize bytes")))?;
        // cudarc allocates only `DeviceRepr` types; every `Elem` is plain bits, so allocate bytes and retype.
        let raw = stream.alloc_zeros::<u8>(bytes.max(1)).map_err(cuda(OP))?;
        let ptr = raw.leak();
        // SAFETY: `ptr` is a live allocation of at least `len * size_of::<T>()` zeroed bytes on `stream`'s
        // context, no longer owned by anything else (leaked above); the new slice takes ownership and frees it.
        // Zero bits are a valid `T` (Elem's contract: every bit pattern is valid).
        Ok(unsafe { stream.upgrade_device_ptr::<T>(ptr, len) })
    }

    fn fill<T: Elem, F: Fn(usize) -> T>(&self, mem: &mut CudaSlice<T>, f: F) -> Result<()> {
        const OP: &str = "nccl-perf fill";
        let stream = self.stream()?.clone();
        let host: Vec<T> = (0..mem.len()).map(f).collect();
        {
            let (dst, _guard) = mem.device_ptr_mut(&stream);
            // SAFETY: `dst` points at `mem.len()` elements of `T` on this stream's device and `host` holds as
            // many; the copy is ordered on `stream` and waited for below, before `host` is dropped.
            unsafe { cudarc::driver::result::memcpy_htod_async(dst, &host, stream.cu_stream()) }.map_err(cuda(OP))?;
        }
        stream.synchronize().map_err(cuda(OP))
    }

    fn read<'a, T: Elem>(&self, mem: &'a CudaSlice<T>) -> Result<Cow<'a, [T]>> {
        const OP: &str = "nccl-perf read";
        let stream = self.stream()?.clone();
        let mut host = vec![T::default(); mem.len()];
        {
            let (src, _guard) = mem.device_ptr(&stream);
            // SAFETY: `src` holds `mem.len()` elements of `T` and `host` as many; the copy is ordered after the
            // collectives on `stream` and completes before `host` is read (synchronize below).
            unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut host, src, stream.cu_stream()) }
                .map_err(cuda(OP))?;
        }
        stream.synchronize().map_err(cuda(OP))?;
        Ok(Cow::Owned(host))
    }

    fn buf<T: Elem>(mem: &CudaSlice<T>) -> &CudaSlice<T> {
        mem
    }

    fn buf_mut<T: Elem>(mem: &mut CudaSlice<T>) -> &mut CudaSlice<T> {
        mem
    }

    /// A CUDA graph captured on the communicator's stream.
    type Graph = nccl::graph::Graph;

    fn capture(&self, issue: &mut dyn FnMut() -> Result<()>) -> Result<nccl::graph::Graph> {
        nccl::graph::require_nccl_capture()?;
        let stream = self.stream()?;
        // Thread-local mode, as nccl-tests' timed loop: every rank is a thread of its own, and NCCL may make
        // calls that are unsafe under a global capture (cudaMalloc when it first connects peers).
        // SAFETY: nccl-perf runs one rank per GPU (`run_nccl` gives each local rank its own device) and each
        // rank's context is used only by that rank's thread, with every buffer on the communicator's stream,
        // so nothing else on this context depends on cudarc's event tracking while the capture is open; no
        // buffer is allocated during it.
        let capture = unsafe { nccl::graph::Capture::begin(stream, nccl::graph::CaptureMode::ThreadLocal) }?;
        // An error while issuing drops `capture`, which ends it: the stream never stays in capture mode.
        issue()?;
        capture.end()
    }

    unsafe fn launch(&self, graph: &nccl::graph::Graph) -> Result<()> {
        // SAFETY: forwarded (this method's contract is the graph's).
        unsafe { graph.launch() }
    }

    fn device_info(&self) -> DeviceInfo {
        let index = self.device();
        match self.stream() {
            Ok(s) => {
                let ctx = s.context();
                DeviceInfo {
                    index,
                    pci: (
                        attr(ctx, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID),
                        attr(ctx, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID),
                        attr(ctx, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID),
                    ),
                    name: ctx.name().unwrap_or_else(|_| "CUDA device".into()),
                }
            }
            Err(_) => DeviceInfo {
                index,
                pci: (0, 0, 0),
                name: "CUDA device".into(),
            },
        }
    }

    fn library_version(&self) -> String {
        nccl::version().map_or_else(|e| format!("unknown ({e})"), |v| format!("NCCL {v}"))
    }

    fn supports(&self, dt: DataType) -> bool {
        if !nccl::version().is_ok_and(|v| v.at_least(dt.min_version())) {
            return false;
        }
        if matches!(dt, DataType::Float8e4m3 | DataType::Float8e5m2) {
            // nccl-tests filters fp8 out below compute capability 9.0 (Hopper).
            let major = self
                .stream()
                .map(|s| {
                    attr(
                        s.context(),
                        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                    )
                })
                .unwrap_or(0);
            return major >= 9;
        }
        true
    }
}

/// Runs the benchmark on NCCL: `local` GPUs per process (one thread each), ranks numbered as nccl-tests does.
pub fn run_nccl(cli: &Cli, args: &[String], info: &RankInfo, local: usize) -> Result<i32> {
    let nranks = info.world_size * local;
    let id = if info.world_size > 1 {
        let rv = nccl::bootstrap::Rendezvous::for_rank(info)?;
        nccl::bootstrap::share_unique_id(&rv)?
    } else {
        UniqueId::new()?
    };
    let first_dev = info.local_rank * local;
    let have = device_count();
    if first_dev + local > have {
        return Err(Error::invalid(
            "nccl-perf",
            format!(
                "invalid number of GPUs: {} requested but only {have} were found; check the number of \
                 processes and -t/-g",
                first_dev + local
            ),
        ));
    }
    // ncclCommInitRank blocks until every rank joined: initialize the local ranks concurrently.
    let comms: Vec<Result<Communicator>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..local)
            .map(|i| {
                let id = &id;
                s.spawn(move || -> Result<Communicator> {
                    let ctx = CudaContext::new(first_dev + i).map_err(cuda("CudaContext::new"))?;
                    let stream = ctx.new_stream().map_err(cuda("new_stream"))?;
                    Communicator::init_rank_on(stream, id, info.rank * local + i, nranks)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::invalid("nccl-perf", "communicator init panicked")))
            })
            .collect()
    });
    let comms = comms.into_iter().collect::<Result<Vec<_>>>()?;
    super::run::run_ranks(cli, args, "nccl", comms, nranks)
}
