//! The one error type of the model loaders.

use std::path::PathBuf;

/// Why a model could not be read or used. Every variant names the file, tensor or field that was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// An I/O error on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a well-formed file of its format (bad magic, truncated header, lying length, ...).
    #[error("{}: malformed file: {msg}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What was wrong, and where.
        msg: String,
    },
    /// A configuration field is missing, has the wrong type, or an inconsistent value.
    #[error("config field `{field}`: {msg}")]
    Config {
        /// The field (a GGUF metadata key or a `config.json` key).
        field: String,
        /// What was wrong.
        msg: String,
    },
    /// A tensor is missing from the checkpoint.
    #[error("tensor `{name}` not found in {source_desc}")]
    MissingTensor {
        /// The canonical (Hugging Face) name that was asked for.
        name: String,
        /// The checkpoint that was searched.
        source_desc: String,
    },
    /// A tensor is present but unusable (wrong shape, unsupported element type, out-of-file data, ...).
    #[error("tensor `{name}`: {msg}")]
    Tensor {
        /// The tensor name as stored in the file.
        name: String,
        /// What was wrong.
        msg: String,
    },
    /// The tokenizer could not be built or loaded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A feature of the checkpoint that this crate does not support (architecture, quantization, RoPE type...).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A bad argument (token id out of range, row range out of bounds, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn malformed(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        ModelError::Malformed {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub(crate) fn config(field: impl Into<String>, msg: impl Into<String>) -> Self {
        ModelError::Config {
            field: field.into(),
            msg: msg.into(),
        }
    }
    pub(crate) fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        ModelError::Tensor {
            name: name.into(),
            msg: msg.into(),
        }
    }
}
