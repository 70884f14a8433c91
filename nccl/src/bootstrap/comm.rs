//! One line for users: discover the ranks, rendezvous, share a fresh [`UniqueId`], create the communicator.

use super::env::RankInfo;
use super::error::{BootstrapError, Peer};
use super::rendezvous::Rendezvous;
use crate::error::{Error, Result};
use crate::{Communicator, UniqueId, UNIQUE_ID_BYTES};

/// Rank 0 creates a fresh [`UniqueId`] (`ncclGetUniqueId`) and sends it to every rank through `rv`; returns it
/// on every rank. If rank 0 cannot create one (e.g. libnccl is missing), every rank fails with an error saying
/// so, instead of waiting for an id that never comes.
///
/// An id serves one communicator: call this again (every rank) for each new communicator.
#[doc(alias = "ncclGetUniqueId")]
pub fn share_unique_id(rv: &Rendezvous) -> Result<UniqueId> {
    // The payload is a status byte, then the id (0) or rank 0's error text (1).
    let (mine, local) = if rv.rank() == 0 {
        match UniqueId::new() {
            Ok(id) => {
                let mut p = vec![0u8];
                p.extend_from_slice(id.as_bytes());
                (p, Ok(id))
            }
            Err(e) => {
                let mut p = vec![1u8];
                p.extend_from_slice(e.to_string().as_bytes());
                (p, Err(e))
            }
        }
    } else {
        (Vec::new(), Err(Error::invalid("share_unique_id", "not rank 0")))
    };
    let got = rv.broadcast(&mine)?;
    if rv.rank() == 0 {
        return local;
    }
    let root = Peer::Rank { rank: 0, addr: None };
    match got.split_first() {
        Some((0, id)) if id.len() == UNIQUE_ID_BYTES => UniqueId::try_from_slice(id),
        Some((1, text)) => Err(BootstrapError::PeerFailed {
            peer: root,
            during: "sharing the unique id".into(),
            reason: format!("rank 0 could not create it: {}", String::from_utf8_lossy(text)),
        }
        .into()),
        _ => Err(BootstrapError::Protocol {
            peer: root,
            problem: format!("a unique-id message of {} bytes is malformed", got.len()),
        }
        .into()),
    }
}

impl Communicator {
    /// Creates this process's communicator from its launcher's environment: [`RankInfo::from_env`],
    /// [`Rendezvous::for_rank`] (options from the environment), [`share_unique_id`], then
    /// `ncclCommInitRank`. With the `cuda` feature, the device is `LOCAL_RANK` (an error names it when the
    /// host has fewer devices) and collectives are bound to a new stream on it.
    ///
    /// Returns the rendezvous too, for exchanging small blobs (config hashes, host names) or creating more
    /// communicators ([`Communicator::from_rendezvous`]). Works unchanged under `torchrun`, `mpirun`, `srun`,
    /// [`--nprocs`](crate::bootstrap::launch::spawn_local_if_requested) and as a single process.
    ///
    /// ```no_run
    /// # fn main() -> nccl::Result<()> {
    /// let (comm, rv) = nccl::Communicator::from_env()?;
    /// println!("rank {} of {}", comm.rank(), comm.size());
    /// rv.barrier()?;
    /// # Ok(()) }
    /// ```
    #[doc(alias = "ncclCommInitRank")]
    pub fn from_env() -> Result<(Communicator, Rendezvous)> {
        let info = RankInfo::from_env()?;
        let rv = Rendezvous::for_rank(&info)?;
        #[cfg(feature = "cuda")]
        {
            let stream = local_device_stream(&info)?;
            let comm = Communicator::from_rendezvous_on(&rv, stream)?;
            Ok((comm, rv))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let comm = Communicator::from_rendezvous(&rv)?;
            Ok((comm, rv))
        }
    }

    /// A new communicator over the ranks of `rv`, on the current device: a fresh id from rank 0, then
    /// `ncclCommInitRank`. Every rank must call it.
    #[doc(alias = "ncclCommInitRank")]
    pub fn from_rendezvous(rv: &Rendezvous) -> Result<Communicator> {
        let id = share_unique_id(rv)?;
        Communicator::init_rank(&id, rv.rank(), rv.size())
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use cudarc::driver::{CudaContext, CudaStream};

    use super::*;

    impl Communicator {
        /// [`from_env`](Communicator::from_env) on a stream of your choosing (its device is used, not
        /// `LOCAL_RANK`).
        #[doc(alias = "ncclCommInitRank")]
        pub fn from_env_on(stream: Arc<CudaStream>) -> Result<(Communicator, Rendezvous)> {
            let rv = Rendezvous::from_env()?;
            let comm = Communicator::from_rendezvous_on(&rv, stream)?;
            Ok((comm, rv))
        }

        /// [`from_rendezvous`](Communicator::from_rendezvous) on `stream`'s device, bound to `stream`.
        #[doc(alias = "ncclCommInitRank")]
        pub fn from_rendezvous_on(rv: &Rendezvous, stream: Arc<CudaStream>) -> Result<Communicator> {
            let id = share_unique_id(rv)?;
            Communicator::init_rank_on(stream, &id, rv.rank(), rv.size())
        }
    }

    /// A new stream on device `LOCAL_RANK`, checked against the number of visible devices first (creating a
    /// context without a driver would panic inside cudarc).
    pub(super) fn local_device_stream(info: &RankInfo) -> Result<Arc<CudaStream>> {
        let count = crate::cuda_device_count();
        if info.local_rank >= count {
            return Err(Error::invalid(
                "Communicator::from_env",
                format!(
                    "local rank {} ({} launch) needs CUDA device {}, but {count} device(s) are visible",
                    info.local_rank, info.launcher, info.local_rank
                ),
            ));
        }
        let ctx = CudaContext::new(info.local_rank).map_err(Error::cuda("CudaContext::new"))?;
        ctx.new_stream().map_err(Error::cuda("CudaContext::new_stream"))
    }
}

#[cfg(feature = "cuda")]
use cuda::local_device_stream;
