//! Support code for `nccl-perf` and the cross-crate tests (not published).
