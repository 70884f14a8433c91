//! Rank discovery and rendezvous: getting one `UniqueId` (and small blobs) to every rank.

/// A bootstrap failure (placeholder until the bootstrap module lands).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootstrapError {
    /// Something went wrong.
    #[error("{0}")]
    Other(String),
}
