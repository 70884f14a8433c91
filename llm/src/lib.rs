//! Llama-family inference engine (tensor and pipeline parallel) used by the examples.
#![deny(clippy::undocumented_unsafe_blocks)]
pub mod chat;
pub mod cli;
pub mod comm;
pub mod compute;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cuda_engine;
pub mod engine;
pub mod error;
pub mod kernels;
pub mod launch;
pub mod math;
pub mod model;
pub mod par;
pub mod sample;
pub mod server;
pub mod shard;
