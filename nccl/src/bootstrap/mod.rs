//! Rank discovery and rendezvous: getting one `UniqueId` (and small blobs) to every rank.
//!
//! NCCL needs every rank to receive the same 128-byte unique id out of band before `ncclCommInitRank`. This
//! module provides, from the bottom up:
//!
//! - [`RankInfo::from_env`]: who am I, how many are we, where is rank 0 — from the variables of torchrun,
//!   OpenMPI's `mpirun`, Slurm's `srun`, explicit `NCCL_RS_*` variables, or a single process when nothing is
//!   set ([`mod@env`] lists every variable).
//! - [`Rendezvous`]: a TCP rendezvous (rank 0 listens, the others connect) with broadcast, all-gather and
//!   barrier of small byte blobs; deadlines on everything, bounded frames, an optional shared token, typed
//!   errors naming the failing rank ([`rendezvous`], [`wire`]).
//! - [`launch::spawn_local_if_requested`]: `--nprocs N` without any launcher.
//! - [`launch::LocalLaunch`]: local workers started by a program, waited for ([`launch::LocalLaunch::run`]) or
//!   watched and restarted by it ([`launch::LocalLaunch::start`], e.g. for the ranks `1..N` of a rank 0 that
//!   outlives them).
//! - [`run_threads`]: N ranks as N threads of one process.
//! - [`Communicator::from_env`](crate::Communicator::from_env) and [`share_unique_id`]: all of the above
//!   plus `ncclCommInitRank` in one call.
//!
//! ```no_run
//! use nccl::bootstrap::{RankInfo, Rendezvous, RendezvousOptions};
//! # fn main() -> Result<(), nccl::bootstrap::BootstrapError> {
//! let info = RankInfo::from_env()?;
//! let rv = Rendezvous::new(&info, RendezvousOptions::from_env()?)?;
//! let id = rv.broadcast(b"128 bytes from rank 0")?; // the same bytes on every rank
//! let hosts = rv.all_gather(info.master_addr.as_bytes())?; // one blob per rank, in rank order
//! rv.barrier()?;
//! # let _ = (id, hosts); Ok(()) }
//! ```

mod comm;
pub mod env;
mod error;
pub mod launch;
pub mod rendezvous;
pub mod store;
mod threads;
pub mod wire;

pub use comm::share_unique_id;
pub use env::{Launcher, RankInfo};
pub use error::{BootstrapError, Peer, RejectReason};
pub use rendezvous::{CancelToken, Rendezvous, RendezvousListener, RendezvousOptions};
pub use threads::run_threads;
