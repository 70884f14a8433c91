//! The few communication operations the engine needs, over host `f32` slices.
//!
//! The engine is written once against [`Comm`]; a backend plugs in by implementing it. Implemented here for
//! any [`nccl::Collectives`] backend whose buffers are host slices (the host backend, through
//! [`HostCollComm`]), for a single rank ([`SingleComm`]) and, with the `cuda` feature, for an NCCL
//! communicator by staging the host slices through device memory (`cuda::StagedNcclComm`, what the CPU engine
//! uses with `--backend nccl`; the CUDA engine runs its TP collectives on device buffers through
//! `Comm::nccl_communicator` instead).
//!
//! For 2-D parallelism (TP × PP) each rank holds two communicators: one over its tensor-parallel group and
//! one over its pipeline group. Ranks passed to [`Comm::send`] / [`Comm::recv`] are ranks *of that
//! communicator*.

use nccl::{Collectives, ReduceOp};

/// Communication a rank of the engine needs. All ranks of the communicator call the collectives in the same
/// order with the same lengths.
pub trait Comm: Send {
    /// This rank, in `0..size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// The backend's name (`"host"`, `"nccl"`, `"single"`).
    fn backend_name(&self) -> &'static str;
    /// Sums `buf` over all ranks, in place, on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> nccl::Result<()>;
    /// Concatenates every rank's `send` (same length everywhere) in rank order into `recv`
    /// (`size() * send.len()` elements).
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> nccl::Result<()>;
    /// Sends `buf` to `peer`, which posts a matching [`recv`](Comm::recv).
    fn send(&self, buf: &[f32], peer: usize) -> nccl::Result<()>;
    /// Receives exactly `buf.len()` elements from `peer`.
    fn recv(&self, buf: &mut [f32], peer: usize) -> nccl::Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> nccl::Result<()>;
    /// The NCCL communicator behind this one, if any (the CUDA engine runs its collectives on it, on device
    /// buffers).
    #[cfg(feature = "cuda")]
    fn nccl_communicator(&self) -> Option<&nccl::Communicator> {
        None
    }
}

/// The communicator of a group of one rank: collectives are identities, point-to-point is an error.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleComm;

impl Comm for SingleComm {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn backend_name(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> nccl::Result<()> {
        Ok(())
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> nccl::Result<()> {
        if recv.len() != send.len() {
            return Err(nccl::Error::LengthMismatch {
                op: "all_gather",
                what: "recv buffer",
                expected: send.len(),
                actual: recv.len(),
            });
        }
        recv.copy_from_slice(send);
        Ok(())
    }
    fn send(&self, _buf: &[f32], peer: usize) -> nccl::Result<()> {
        Err(nccl::Error::InvalidRank {
            op: "send",
            what: "peer",
            value: peer,
            size: 1,
        })
    }
    fn recv(&self, _buf: &mut [f32], peer: usize) -> nccl::Result<()> {
        Err(nccl::Error::InvalidRank {
            op: "recv",
            what: "peer",
            value: peer,
            size: 1,
        })
    }
    fn barrier(&self) -> nccl::Result<()> {
        Ok(())
    }
}

/// Adapts any [`Collectives`] backend over host slices (the host backend's `HostComm`) to [`Comm`].
#[derive(Debug)]
pub struct HostCollComm<C>(pub C);

impl<C> Comm for HostCollComm<C>
where
    C: Collectives<Buf<f32> = [f32]> + Send,
{
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn size(&self) -> usize {
        self.0.size()
    }
    fn backend_name(&self) -> &'static str {
        self.0.backend_name()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> nccl::Result<()> {
        if self.0.size() == 1 {
            return Ok(());
        }
        self.0.all_reduce_in_place::<f32>(buf, ReduceOp::Sum)
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> nccl::Result<()> {
        self.0.all_gather::<f32>(send, recv)
    }
    fn send(&self, buf: &[f32], peer: usize) -> nccl::Result<()> {
        self.0.send::<f32>(buf, peer)
    }
    fn recv(&self, buf: &mut [f32], peer: usize) -> nccl::Result<()> {
        self.0.recv::<f32>(buf, peer)
    }
    fn barrier(&self) -> nccl::Result<()> {
        self.0.barrier()
    }
}

/// [`Comm`] over an NCCL communicator, staging host slices through device buffers on its stream.
#[cfg(feature = "cuda")]
pub mod cuda {
    use super::Comm;
    // CUDA failures keep cudarc's error as their source (`nccl::Error::CudaDriver`).
    use nccl::{Collectives, Communicator, Error, ReduceOp};

    /// An NCCL communicator (with a bound stream) used by the CPU engine: each call copies the host data to
    /// the device, runs the NCCL operation, copies the result back and waits for the stream, at most the
    /// communicator's `wait_timeout` (`Communicator::synchronize_within`: past it, or when NCCL reports a
    /// failed peer, the communicator is aborted and the call fails instead of waiting forever).
    pub struct StagedNcclComm(pub Communicator);

    impl StagedNcclComm {
        /// Copies `d` (the NCCL operation's result) into `host` once the operation is done, waiting for it
        /// at most the communicator's `wait_timeout` first: a copy into pageable memory would otherwise
        /// block, unbounded, until the NCCL work ahead of it is done.
        fn read_back(
            &self,
            op: &'static str,
            d: &nccl::cudarc::driver::CudaSlice<f32>,
            host: &mut [f32],
        ) -> nccl::Result<()> {
            self.0.synchronize_within(self.0.wait_timeout())?;
            let s = self.0.stream()?;
            s.memcpy_dtoh(d, host).map_err(Error::cuda(op))?;
            s.synchronize().map_err(Error::cuda(op))
        }
    }

    impl Comm for StagedNcclComm {
        fn rank(&self) -> usize {
            Collectives::rank(&self.0)
        }
        fn size(&self) -> usize {
            Collectives::size(&self.0)
        }
        fn backend_name(&self) -> &'static str {
            "nccl"
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) -> nccl::Result<()> {
            let s = self.0.stream()?.clone();
            let mut d = s.clone_htod(buf).map_err(Error::cuda("all_reduce_sum"))?;
            self.0.all_reduce_in_place::<f32>(&mut d, ReduceOp::Sum)?;
            self.read_back("all_reduce_sum", &d, buf)
        }
        fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> nccl::Result<()> {
            let s = self.0.stream()?.clone();
            let d_send = s.clone_htod(send).map_err(Error::cuda("all_gather"))?;
            let mut d_recv = s.alloc_zeros::<f32>(recv.len()).map_err(Error::cuda("all_gather"))?;
            self.0.all_gather::<f32>(&d_send, &mut d_recv)?;
            self.read_back("all_gather", &d_recv, recv)
        }
        fn send(&self, buf: &[f32], peer: usize) -> nccl::Result<()> {
            let s = self.0.stream()?.clone();
            let d = s.clone_htod(buf).map_err(Error::cuda("send"))?;
            self.0.send::<f32>(&d, peer)?;
            self.0.synchronize_within(self.0.wait_timeout())
        }
        fn recv(&self, buf: &mut [f32], peer: usize) -> nccl::Result<()> {
            let s = self.0.stream()?.clone();
            let mut d = s.alloc_zeros::<f32>(buf.len()).map_err(Error::cuda("recv"))?;
            self.0.recv::<f32>(&mut d, peer)?;
            self.read_back("recv", &d, buf)
        }
        fn barrier(&self) -> nccl::Result<()> {
            Collectives::barrier(&self.0)
        }
        fn nccl_communicator(&self) -> Option<&Communicator> {
            Some(&self.0)
        }
    }
}
