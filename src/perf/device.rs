//! The small per-backend adapter the generic driver needs besides [`Collectives`]: owned buffers that can be
//! allocated, filled from the host and read back, plus a description of the device for the header.

use std::borrow::Cow;

use nccl::{Collectives, Elem, Result};

/// What the `# Using devices` line says about one rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device index on its host (CUDA ordinal; the local rank on the host backend).
    pub index: usize,
    /// PCI domain, bus and device (zeros on the host backend).
    pub pci: (u32, u32, u32),
    /// A human-readable name (`NVIDIA H100 80GB HBM3`, `host CPU ...`).
    pub name: String,
}

/// A communicator `nccl-perf` can drive: [`Collectives`] plus buffer management.
pub trait PerfComm: Collectives {
    /// An owned buffer of `T` (`Vec<T>` on the host, `CudaSlice<T>` on NCCL).
    type Mem<T: Elem>: Send;

    /// Allocates `len` zeroed elements.
    fn alloc<T: Elem>(&self, len: usize) -> Result<Self::Mem<T>>;
    /// Sets element `i` of `mem` to `f(i)` for every `i` (on a GPU: through a host staging copy).
    fn fill<T: Elem, F: Fn(usize) -> T>(&self, mem: &mut Self::Mem<T>, f: F) -> Result<()>;
    /// The contents of `mem` on the host (borrowed when already there). Call after [`Collectives::synchronize`].
    fn read<'a, T: Elem>(&self, mem: &'a Self::Mem<T>) -> Result<Cow<'a, [T]>>;
    /// The buffer as the backend's collectives take it.
    fn buf<T: Elem>(mem: &Self::Mem<T>) -> &Self::Buf<T>;
    /// The buffer as the backend's collectives take it, mutably.
    fn buf_mut<T: Elem>(mem: &mut Self::Mem<T>) -> &mut Self::Buf<T>;
    /// The device this rank runs on.
    fn device_info(&self) -> DeviceInfo;
    /// The library version printed in the header and the JSON file (crate version on the host backend, the
    /// loaded libnccl version on NCCL).
    fn library_version(&self) -> String;
    /// A recorded sequence of operations that can be launched again (`-G`): a CUDA graph on NCCL.
    type Graph;
    /// Records the operations `issue` enqueues into a [`PerfComm::Graph`] instead of running them (NCCL: a
    /// CUDA graph captured on the communicator's stream). Every rank must capture the same operations. The
    /// host backend has no graphs and returns an error.
    fn capture(&self, issue: &mut dyn FnMut() -> Result<()>) -> Result<Self::Graph>;
    /// Runs `graph` once, enqueued after the work already issued (a collective when it holds collectives:
    /// every rank launches its graph as many times).
    ///
    /// # Safety
    ///
    /// As [`nccl::graph::Graph::launch`]: every buffer the captured operations use is still allocated and
    /// used by nothing else until the launched work is done.
    unsafe fn launch(&self, graph: &Self::Graph) -> Result<()>;
    /// Whether the backend supports `dt` (for `-d all`; e.g. fp8 needs NCCL 2.24 and a Hopper GPU).
    fn supports(&self, dt: nccl::DataType) -> bool {
        let _ = dt;
        true
    }
}

/// The host CPU's model name from `/proc/cpuinfo` (or `"host CPU"`).
pub fn host_cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .map(|m| format!("host CPU ({m})"))
        .unwrap_or_else(|| "host CPU".to_string())
}
