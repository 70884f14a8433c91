//! Llama-family inference engine (tensor and pipeline parallel) used by the examples.
pub mod model;
pub mod comm;
pub mod engine;
pub mod error;
pub mod math;
pub mod sample;
pub mod shard;
pub mod launch;
pub mod chat;
pub mod cli;
