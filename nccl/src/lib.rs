//! Safe Rust bindings to NVIDIA NCCL, with a bootstrap for multi-process launches and a host (CPU) backend
//! with the same collective semantics.
#![deny(unsafe_op_in_unsafe_fn, missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod bootstrap;
pub mod collective;
pub mod comm;
pub mod config;
pub mod counts;
pub mod error;
#[cfg(feature = "cuda")]
pub mod graph;
pub mod group;
pub mod host;
pub mod id;
pub mod premul;
pub mod register;
pub mod report;
pub mod result;
pub mod types;
pub mod version;

pub use backend::Collectives;
pub use error::{Error, Result};
pub use types::{DataType, Elem, ReduceOp};

pub use comm::{AbortHandle, Communicator, ShrinkMode};
pub use config::Config;
/// The cudarc this crate's buffer types come from (use it to avoid version mismatches).
#[cfg(feature = "cuda")]
pub use cudarc;
pub use group::{group, Group};
pub use id::{UniqueId, UNIQUE_ID_BYTES};
/// The raw bindings this crate is built on.
pub use nccl_sys as sys;
pub use premul::{PreMulSum, Reduction};
#[cfg(feature = "cuda")]
pub use register::{DeviceMemory, Registered, Window};
pub use register::{NcclMemory, RawRegistration, RawWindow};
#[cfg(feature = "cuda")]
pub use version::{cuda_available, cuda_device_count};
pub use version::{header_version, nccl_available, version, Version};
