//! Support code for `nccl-perf` and the cross-crate tests (not published).
#![deny(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod perf;

/// Installs the `tracing` subscriber every binary of this package uses: to stderr, filtered by `RUST_LOG`
/// (e.g. `RUST_LOG=nccl=debug`), warnings and errors by default. So the library's warnings (a rank still
/// missing at the rendezvous, a teardown error that `Drop` cannot return) reach the user. A second call, or
/// a subscriber installed already, is left alone.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
