//! Llama-family inference engine (tensor and pipeline parallel) used by the examples.
pub mod model;
