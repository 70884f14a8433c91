//! Raw FFI bindings to NCCL (placeholder until the loader lands).

/// Why the library or one of its symbols could not be loaded.
#[derive(Debug)]
#[non_exhaustive]
pub enum LoadError {
    /// Placeholder.
    NotFound(String),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::NotFound(s) => write!(f, "libnccl not found: {s}"),
        }
    }
}

impl std::error::Error for LoadError {}
