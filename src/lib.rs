//! Support code for `nccl-perf` and the cross-crate tests (not published).
#![deny(missing_docs)]

pub mod perf;
