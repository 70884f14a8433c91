//! Safe Rust bindings to NVIDIA NCCL, with a bootstrap for multi-process launches and a host (CPU) backend
//! with the same collective semantics.
#![deny(unsafe_op_in_unsafe_fn, missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod bootstrap;
pub mod counts;
pub mod error;
pub mod host;
pub mod types;

pub use backend::Collectives;
pub use error::{Error, Result};
pub use types::{DataType, Elem, ReduceOp};
