//! `nccl-perf`: an nccl-tests compatible benchmark for the NCCL (GPU) and host (CPU) backends.
//!
//! The same flags, table and JSON as nccl-tests (`DESIGN.md` §3), one binary for the nine operations. The
//! benchmark loop ([`driver`]) is written once over [`nccl::Collectives`] plus a small buffer adapter
//! ([`device::PerfComm`]); [`host`] implements the adapter for the host backend and, with the `cuda` feature,
//! [`gpu`] for NCCL communicators over cudarc buffers.
//!
//! Differences from nccl-tests, on purpose:
//! - Every rank is driven by its own thread: `-g N -t T` gives `N × T` ranks per process either way (nccl-tests
//!   drives the `-g` GPUs of a thread inside one NCCL group).
//! - Operations without an in-place form in [`nccl::Collectives`] (alltoall, gather, scatter, sendrecv) print
//!   `N/A` in the in-place columns; the average bus bandwidth is taken over the measured columns.
//! - `-m` issues the operations one after another (nccl-tests groups them on NCCL).
//! - Buffers are allocated per size instead of rotating offsets inside one maximum-size buffer.
//! - `-T` is a watchdog: when one operation (or one timed loop) exceeds it, the process prints
//!   `Test timeout` and exits with code 124.
//! - `-G` (CUDA graphs) is rejected on the host backend: it has no graphs. On NCCL it follows nccl-tests: the
//!   timed loop's `-n × -m` operations are captured once per column into a CUDA graph (`nccl::graph`,
//!   thread-local capture) and launched `-G` times, time per operation over all of them
//!   ([`driver::Timed`]); every check iteration runs from a graph launched once; `-C 1` is the launches' host
//!   time over `-n × -m`, as nccl-tests reports it. `-G` needs `-z 0` (the others wait on a capturing
//!   stream; nccl-tests fails there mid-capture, nccl-perf refuses them up front). Compiled and unit-tested
//!   on the host (accounting and arithmetic); never run on a GPU in this repository.
//! - Exit codes: 0 success, 1 wrong values, 2 usage error, 3 runtime error, 124 timeout.

pub mod cli;
pub mod data;
pub mod device;
pub mod driver;
pub mod format;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod host;
pub mod json;
pub mod ops;
pub mod run;

pub use cli::{BackendKind, Cli};
pub use device::{DeviceInfo, PerfComm};
pub use driver::{run_rank, Measure, Plan, Row, Summary, Timed};
pub use ops::{CollOp, Counts};
