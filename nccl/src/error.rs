//! The one error type of the crate.
//!
//! Every failure names the operation that failed. NCCL failures keep the raw `ncclResult_t` code (codes this
//! crate does not know are kept as they are, never mistaken for success) next to a typed [`NcclCode`], and
//! the text of `ncclGetLastError`, which is where NCCL explains what actually went wrong.
//!
//! [`Error::kind`] sorts every error into an [`ErrorKind`], the same for NCCL, the bootstrap and the host
//! backend, so a caller matches "timed out", "a peer failed" or "aborted" once:
//!
//! ```
//! use nccl::error::{Error, ErrorKind};
//! let e = nccl::result::check_code("ncclAllReduce", nccl::sys::ncclRemoteError as i32, None).unwrap_err();
//! assert_eq!(e.kind(), ErrorKind::PeerFailed);
//! let e = Error::PeerFailed { op: "all_reduce", rank: 1, reason: "exited".into() };
//! assert_eq!(e.kind(), ErrorKind::PeerFailed);
//! ```

use crate::version::Version;
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
    #[error("{op} needs NCCL {} or newer, but the loaded library is NCCL {loaded}", .needs.short())]
    Unsupported {
        /// The operation that was asked for.
        op: &'static str,
        /// The first NCCL version that has it (one of the [`since`](crate::version::since) constants).
        needs: Version,
        /// The version of the loaded library.
        loaded: Version,
    },
    /// A call that NCCL would defer to the end of the group (communicator creation, split, shrink, window
    /// registration, finalize, abort, destroy) was made inside [`group`](crate::group()); NCCL would write
    /// its results after this call returned. Issue it outside the group.
    #[error("{op} cannot be called inside nccl::group: call it before or after the group")]
    InsideGroup {
        /// The operation that was refused.
        op: &'static str,
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
    /// A CUDA failure described in words (no device, the driver is missing, ...). Failures of a CUDA driver
    /// call are [`Error::CudaDriver`], which keeps cudarc's error.
    #[error("{op}: CUDA error: {message}")]
    Cuda {
        /// The operation.
        op: &'static str,
        /// What went wrong.
        message: String,
    },
    /// A CUDA driver call failed; cudarc's error is the [`source`](std::error::Error::source).
    #[cfg(feature = "cuda")]
    #[error("{op}: CUDA error: {source}")]
    CudaDriver {
        /// The operation.
        op: &'static str,
        /// What the driver returned.
        #[source]
        source: cudarc::driver::DriverError,
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

    /// The typed `ncclResult_t` behind this error, if it came from NCCL.
    pub fn code(&self) -> Option<NcclCode> {
        self.nccl_code().map(NcclCode::from_raw)
    }

    /// What kind of failure this is, the same for NCCL, bootstrap and host-backend errors.
    pub fn kind(&self) -> ErrorKind {
        use crate::bootstrap::BootstrapError as B;
        match self {
            Error::Nccl { code, .. } => NcclCode::from_raw(*code).kind(),
            Error::Library { .. } => ErrorKind::Library,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::InsideGroup { .. } => ErrorKind::InvalidUsage,
            Error::LengthMismatch { .. } | Error::InvalidRank { .. } | Error::InvalidArgument { .. } => {
                ErrorKind::InvalidArgument
            }
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::PeerFailed { .. } => ErrorKind::PeerFailed,
            Error::Aborted { .. } => ErrorKind::Aborted,
            Error::Io { .. } => ErrorKind::Io,
            Error::Cuda { .. } => ErrorKind::Cuda,
            #[cfg(feature = "cuda")]
            Error::CudaDriver { .. } => ErrorKind::Cuda,
            Error::Bootstrap(b) => match b {
                B::Timeout { .. } | B::RanksMissing { .. } | B::RootUnreachable { .. } => ErrorKind::Timeout,
                B::PeerFailed { .. } | B::RankPanicked { .. } => ErrorKind::PeerFailed,
                B::Aborted { .. } | B::Poisoned(_) | B::Cancelled { .. } => ErrorKind::Aborted,
                B::MissingVar { .. } | B::InvalidVar { .. } | B::InvalidArgument { .. } | B::MessageTooLarge { .. } => {
                    ErrorKind::InvalidArgument
                }
                B::Resolve { .. } | B::PortInUse { .. } | B::Bind { .. } | B::Io { .. } | B::Spawn { .. } => {
                    ErrorKind::Io
                }
                _ => ErrorKind::Protocol,
            },
        }
    }

    /// The [`Error::CudaDriver`] maker for `op`, for `map_err` on cudarc results.
    #[cfg(feature = "cuda")]
    pub fn cuda(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
        move |source| Error::CudaDriver { op, source }
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

/// What kind of failure an [`Error`] is ([`Error::kind`]). New kinds may be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A deadline passed (`ncclTimeout`, a host-backend or bootstrap timeout, a non-blocking wait).
    Timeout,
    /// Another rank failed, exited or disconnected (`ncclRemoteError`, host `PeerFailed`, bootstrap peers).
    PeerFailed,
    /// The communicator (or rendezvous) was aborted.
    Aborted,
    /// An argument was wrong: lengths, ranks, values (`ncclInvalidArgument` too).
    InvalidArgument,
    /// A call was made where it is not allowed (`ncclInvalidUsage`, a creation inside a group).
    InvalidUsage,
    /// The loaded NCCL is too old for the call.
    Unsupported,
    /// libnccl could not be loaded.
    Library,
    /// A CUDA failure (`ncclUnhandledCudaError` too).
    Cuda,
    /// An operating-system failure (`ncclSystemError`, sockets, shared memory, processes).
    Io,
    /// Bytes from a peer that do not follow the protocol (bootstrap).
    Protocol,
    /// NCCL's own bug or state (`ncclInternalError`), `ncclInProgress` where it was not expected, or a code
    /// newer than this crate.
    Internal,
}

/// A typed `ncclResult_t` (other than `ncclSuccess`), from the `nccl_sys` constants. Codes newer than this
/// crate are kept in [`NcclCode::Unknown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NcclCode {
    /// `ncclSuccess` (only seen when a caller converts a raw success code).
    Success,
    /// `ncclUnhandledCudaError`.
    UnhandledCudaError,
    /// `ncclSystemError`.
    SystemError,
    /// `ncclInternalError`.
    InternalError,
    /// `ncclInvalidArgument`.
    InvalidArgument,
    /// `ncclInvalidUsage`.
    InvalidUsage,
    /// `ncclRemoteError`.
    RemoteError,
    /// `ncclInProgress`.
    InProgress,
    /// `ncclTimeout` (NCCL 2.30+).
    Timeout,
    /// A code this crate does not know.
    Unknown(i32),
}

impl NcclCode {
    /// The typed form of a raw `ncclResult_t`.
    pub const fn from_raw(code: i32) -> Self {
        use nccl_sys as s;
        match code {
            c if c == s::ncclSuccess as i32 => NcclCode::Success,
            c if c == s::ncclUnhandledCudaError as i32 => NcclCode::UnhandledCudaError,
            c if c == s::ncclSystemError as i32 => NcclCode::SystemError,
            c if c == s::ncclInternalError as i32 => NcclCode::InternalError,
            c if c == s::ncclInvalidArgument as i32 => NcclCode::InvalidArgument,
            c if c == s::ncclInvalidUsage as i32 => NcclCode::InvalidUsage,
            c if c == s::ncclRemoteError as i32 => NcclCode::RemoteError,
            c if c == s::ncclInProgress as i32 => NcclCode::InProgress,
            c if c == s::ncclTimeout as i32 => NcclCode::Timeout,
            other => NcclCode::Unknown(other),
        }
    }

    /// The raw `ncclResult_t`.
    pub const fn raw(self) -> i32 {
        use nccl_sys as s;
        match self {
            NcclCode::Success => s::ncclSuccess as i32,
            NcclCode::UnhandledCudaError => s::ncclUnhandledCudaError as i32,
            NcclCode::SystemError => s::ncclSystemError as i32,
            NcclCode::InternalError => s::ncclInternalError as i32,
            NcclCode::InvalidArgument => s::ncclInvalidArgument as i32,
            NcclCode::InvalidUsage => s::ncclInvalidUsage as i32,
            NcclCode::RemoteError => s::ncclRemoteError as i32,
            NcclCode::InProgress => s::ncclInProgress as i32,
            NcclCode::Timeout => s::ncclTimeout as i32,
            NcclCode::Unknown(c) => c,
        }
    }

    /// The name `nccl.h` gives the code, or `"unknown result"`.
    pub const fn name(self) -> &'static str {
        match self {
            NcclCode::Success => "ncclSuccess",
            NcclCode::UnhandledCudaError => "ncclUnhandledCudaError",
            NcclCode::SystemError => "ncclSystemError",
            NcclCode::InternalError => "ncclInternalError",
            NcclCode::InvalidArgument => "ncclInvalidArgument",
            NcclCode::InvalidUsage => "ncclInvalidUsage",
            NcclCode::RemoteError => "ncclRemoteError",
            NcclCode::InProgress => "ncclInProgress",
            NcclCode::Timeout => "ncclTimeout",
            NcclCode::Unknown(_) => "unknown result",
        }
    }

    /// The [`ErrorKind`] of an error with this code.
    pub const fn kind(self) -> ErrorKind {
        match self {
            NcclCode::UnhandledCudaError => ErrorKind::Cuda,
            NcclCode::SystemError => ErrorKind::Io,
            NcclCode::InvalidArgument => ErrorKind::InvalidArgument,
            NcclCode::InvalidUsage => ErrorKind::InvalidUsage,
            NcclCode::RemoteError => ErrorKind::PeerFailed,
            NcclCode::Timeout => ErrorKind::Timeout,
            NcclCode::Success | NcclCode::InternalError | NcclCode::InProgress | NcclCode::Unknown(_) => {
                ErrorKind::Internal
            }
        }
    }
}

/// The name NCCL uses for a result code, or `"unknown result"` for codes newer than this crate.
pub fn result_name(code: i32) -> &'static str {
    NcclCode::from_raw(code).name()
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
