//! Llama-family inference engine (tensor and pipeline parallel) used by the examples.
#![deny(clippy::undocumented_unsafe_blocks)]
/// `eprintln!` in one `write(2)`: the rank processes of one job share the terminal's (or the server's)
/// stderr, and `eprintln!` writes a line in pieces, so lines of two processes could interleave mid-line.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!("{}\n", format_args!($($arg)*));
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }};
}

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
