//! [`PerfComm`] for the host backend: buffers are `Vec<T>`, the device is the host CPU.

use std::borrow::Cow;

use nccl::host::HostComm;
use nccl::{Elem, Error, Result};

use super::device::{host_cpu_name, DeviceInfo, PerfComm};

impl PerfComm for HostComm {
    type Mem<T: Elem> = Vec<T>;

    fn alloc<T: Elem>(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::default(); len])
    }

    fn fill<T: Elem, F: Fn(usize) -> T>(&self, mem: &mut Vec<T>, f: F) -> Result<()> {
        mem.iter_mut().enumerate().for_each(|(i, x)| *x = f(i));
        Ok(())
    }

    fn read<'a, T: Elem>(&self, mem: &'a Vec<T>) -> Result<Cow<'a, [T]>> {
        Ok(Cow::Borrowed(mem.as_slice()))
    }

    fn buf<T: Elem>(mem: &Vec<T>) -> &[T] {
        mem
    }

    fn buf_mut<T: Elem>(mem: &mut Vec<T>) -> &mut [T] {
        mem
    }

    /// No graphs on the host: `-G` is refused before a run starts; this is the backstop.
    type Graph = std::convert::Infallible;

    fn capture(&self, _issue: &mut dyn FnMut() -> Result<()>) -> Result<Self::Graph> {
        Err(Error::invalid(
            "nccl-perf",
            "-G (CUDA graph launches) needs the nccl backend; the host backend has no graphs",
        ))
    }

    unsafe fn launch(&self, graph: &Self::Graph) -> Result<()> {
        match *graph {}
    }

    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            index: nccl::Collectives::rank(self),
            pci: (0, 0, 0),
            name: host_cpu_name(),
        }
    }

    fn library_version(&self) -> String {
        format!("nccl-rs {} host backend", env!("CARGO_PKG_VERSION"))
    }
}
