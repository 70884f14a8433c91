//! Support code for `nccl-perf` and the cross-crate tests (not published).
#![deny(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod perf;
