//! The one error type of the crate.
//!
//! Every failure names the operation that failed. NCCL failures keep the raw `ncclResult_t` code (codes this
//! crate does not know are kept as they are, never mistaken for success) and the text of
//! `ncclGetLastError`, which is where NCCL explains what actually went wrong.

use std::time::Duration;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An NCCL call returned a result other than `ncclSuccess`.
    #[error("{op} failed: {} (ncclResult_t {code}){}", result_name(*.code), last_error_suffix(.last_error))]
    Nccl {
        /// The C function that failed, e.g. `"ncclAllReduce"`.
        op: &'static str,
        /// The raw `ncclResult_t` value, kept even when this crate does not know it.
        code: i32,
        /// What `ncclGetLastError` said right after the failure (empty text is stored as `None`).
        last_error: Option<String>,
    },
    /// The NCCL library could not be loaded, or a symbol is missing from it.
    #[error("{op}: {source}")]
    Library {
        /// The operation that needed the library.
        op: &'static str,
        /// What the loader said.
        #[source]
        source: nccl_sys::LoadError,
    },
    /// The loaded NCCL is too old for the requested API.
    #[error("{op} needs NCCL {needs} or newer, but the loaded library is NCCL {loaded}")]
    Unsupported {
        /// The operation that was asked for.
        op: &'static str,
        /// The first NCCL version that has it, e.g. `"2.27"`.
        needs: &'static str,
        /// The version of the loaded library, e.g. `"2.18.5"`.
        loaded: String,
    },
    /// A buffer does not have the number of elements NCCL's count rules require.
    #[error("{op}: {what} holds {actual} elements, but {expected} are required")]
    LengthMismatch {
        /// The operation, e.g. `"all_gather"`.
        op: &'static str,
        /// Which buffer, e.g. `"recv buffer"`.
        what: &'static str,
        /// The number of elements required.
        expected: usize,
        /// The number of elements given.
        actual: usize,
    },
    /// A rank, root or peer outside `0..size`.
    #[error("{op}: {what} {value} is out of range for a communicator of {size} ranks")]
    InvalidRank {
        /// The operation.
        op: &'static str,
        /// `"rank"`, `"root"` or `"peer"`.
        what: &'static str,
        /// The value given.
        value: usize,
        /// The communicator's size.
        size: usize,
    },
    /// Any other invalid argument, with a message saying what was wrong.
    #[error("{op}: {message}")]
    InvalidArgument {
        /// The operation.
        op: &'static str,
        /// What was wrong.
        message: String,
    },
    /// An operation did not complete before its deadline.
    #[error("{op} timed out after {elapsed:?}{}", detail_suffix(.detail))]
    Timeout {
        /// The operation.
        op: &'static str,
        /// How long it waited.
        elapsed: Duration,
        /// What it was waiting for, when known (e.g. "rank 3 never arrived").
        detail: Option<String>,
    },
    /// Another rank failed (panicked, exited, was dropped or aborted) while this one waited for it.
    #[error("{op}: rank {rank} failed: {reason}")]
    PeerFailed {
        /// The operation this rank was in.
        op: &'static str,
        /// The rank that failed.
        rank: usize,
        /// What is known about the failure.
        reason: String,
    },
    /// The communicator was aborted (by [`abort`](crate::Communicator::abort), an abort handle or a peer).
    #[error("{op}: the communicator was aborted")]
    Aborted {
        /// The operation.
        op: &'static str,
    },
    /// An operating-system error (sockets, shared memory, processes).
    #[error("{op}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A CUDA driver or runtime error reported through cudarc.
    #[error("{op}: CUDA error: {message}")]
    Cuda {
        /// The operation.
        op: &'static str,
        /// What CUDA said.
        message: String,
    },
    /// The bootstrap (rank discovery or rendezvous) failed.
    #[error("bootstrap: {0}")]
    Bootstrap(#[from] crate::bootstrap::BootstrapError),
}

impl Error {
    /// The raw `ncclResult_t` behind this error, if it came from NCCL.
    pub fn nccl_code(&self) -> Option<i32> {
        match self {
            Error::Nccl { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Wraps an I/O error with the operation that saw it.
    pub fn io(op: &'static str, source: std::io::Error) -> Self {
        Error::Io { op, source }
    }

    /// An [`Error::InvalidArgument`] with a message.
    pub fn invalid(op: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            message: message.into(),
        }
    }
}

/// The name NCCL uses for a result code, or `"unknown result"` for codes newer than this crate.
pub fn result_name(code: i32) -> &'static str {
    match code {
        0 => "ncclSuccess",
        1 => "ncclUnhandledCudaError",
        2 => "ncclSystemError",
        3 => "ncclInternalError",
        4 => "ncclInvalidArgument",
        5 => "ncclInvalidUsage",
        6 => "ncclRemoteError",
        7 => "ncclInProgress",
        8 => "ncclTimeout",
        _ => "unknown result",
    }
}

fn last_error_suffix(last: &Option<String>) -> String {
    match last {
        Some(text) => format!(": {text}"),
        None => String::new(),
    }
}

fn detail_suffix(detail: &Option<String>) -> String {
    match detail {
        Some(text) => format!(" ({text})"),
        None => String::new(),
    }
}
