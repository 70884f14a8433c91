//! The engine's error type.

use crate::model::ModelError;

/// Everything that can go wrong while loading, sharding or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// Reading the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A collective or point-to-point operation failed.
    #[error("communication: {0}")]
    Comm(#[from] nccl::Error),
    /// Sampling settings out of range (temperature, top-p): refused before any work starts.
    #[error("sampling: {0}")]
    Sampling(#[from] crate::sample::SamplingError),
    /// Setting up a CUDA device failed (a context, a stream). The source is the
    /// `nccl::Error::CudaDriver` (feature `cuda`) naming the call, whose own source is cudarc's `DriverError`.
    #[error("device {device}: {source}")]
    Device {
        /// The CUDA device ordinal.
        device: usize,
        /// The failed call.
        #[source]
        source: nccl::Error,
    },
    /// The CUDA compute backend failed (a missing library or device, NVRTC, cuBLAS, a kernel's shape check).
    #[cfg(feature = "cuda")]
    #[error("CUDA engine: {0}")]
    Cuda(#[from] crate::cuda::CudaError),
    /// The model cannot be run with the requested layout or arguments.
    #[error("{0}")]
    Config(String),
    /// A tensor does not have the shape the configuration implies.
    #[error("tensor {name}: shape {actual:?}, expected {expected:?}")]
    Shape {
        /// The canonical tensor name.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape found.
        actual: Vec<usize>,
    },
    /// Tokenizing or detokenizing failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Rendering the chat template failed.
    #[error("chat template: {0}")]
    Template(String),
    /// Writing an output file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A rank failed; the error is the one it reported.
    #[error("rank {rank}: {source}")]
    Rank {
        /// The world rank.
        rank: usize,
        /// What went wrong there.
        #[source]
        source: Box<EngineError>,
    },
}

/// `Result` with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
