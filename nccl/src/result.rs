//! The checked layer between `nccl-sys` and the safe types: loading the library, turning `ncclResult_t` codes
//! into [`Error`]s with NCCL's own explanation, and version gates.
//!
//! Nothing here is public API except [`check_code`], [`require`] and [`load_error`], which are exposed so
//! programs (and tests) can reason about codes and versions without a GPU. Versions themselves are
//! [`Version`] and the gates [`since`](crate::version::since); result codes come from `nccl_sys`.

use crate::error::{Error, Result};
use crate::version::Version;
use nccl_sys::{Library, LoadError};
use std::ffi::CStr;

/// `ncclSuccess` (from the bindings, as every result code this crate compares with).
pub const SUCCESS: i32 = nccl_sys::ncclSuccess as i32;
/// `ncclInProgress`: a non-blocking communicator is still working on the call.
pub const IN_PROGRESS: i32 = nccl_sys::ncclInProgress as i32;

/// The loaded library, or [`Error::Library`] naming the operation that needed it.
pub(crate) fn library(op: &'static str) -> Result<&'static Library> {
    nccl_sys::library().map_err(|e| load_error(op, e))
}

/// Maps a loader error to this crate's error: a symbol missing from an older library becomes
/// [`Error::Unsupported`] (naming the version that introduced it), anything else [`Error::Library`].
pub fn load_error(op: &'static str, e: LoadError) -> Error {
    match e {
        // Every `needs` is a literal of the generated table, checked to parse by a test below; a malformed
        // one would show as 0.0.
        LoadError::MissingSymbol { needs, loaded, .. } => Error::Unsupported {
            op,
            needs: Version::parse(needs).unwrap_or(Version::new(0, 0, 0)),
            loaded: Version::from_code(loaded),
        },
        other => Error::Library { op, source: other },
    }
}

/// Calls an NCCL function through the loaded library: `ffi!(op, ncclX(args...))` evaluates to the raw
/// `ncclResult_t` as `i32`, or returns early with the load error. Must be used inside an `unsafe` block whose
/// `SAFETY` comment argues the call's preconditions.
macro_rules! ffi {
    ($op:expr, $name:ident ( $($arg:expr),* $(,)? )) => {{
        let f = $crate::result::library($op)?.$name().map_err(|e| $crate::result::load_error($op, e))?;
        #[allow(clippy::unnecessary_cast)]
        let code = f($($arg),*) as i32;
        code
    }};
}
pub(crate) use ffi;

/// Turns a result code into `Ok(())` for `ncclSuccess` and [`Error::Nccl`] otherwise, keeping the raw code
/// (including codes this crate does not know and `ncclInProgress`) and `last_error`, NCCL's explanation.
///
/// ```
/// let err = nccl::result::check_code("ncclAllReduce", 4, Some("invalid count".into())).unwrap_err();
/// assert_eq!(err.nccl_code(), Some(4));
/// assert!(err.to_string().contains("invalid count"));
/// ```
pub fn check_code(op: &'static str, code: i32, last_error: Option<String>) -> Result<()> {
    if code == SUCCESS {
        Ok(())
    } else {
        Err(Error::Nccl { op, code, last_error })
    }
}

/// `ncclGetLastError(comm)` as an owned string; `None` when the text is empty or the library is unavailable.
///
/// # Safety
/// `comm` must be null or a live communicator not in use by another thread.
pub(crate) unsafe fn last_error(comm: nccl_sys::ncclComm_t) -> Option<String> {
    let lib = nccl_sys::library().ok()?;
    let f = lib.ncclGetLastError().ok()?;
    // SAFETY: the caller guarantees `comm` is null or live (NCCL ignores it: the text is not per
    // communicator). ncclGetLastError returns a pointer into one process-global buffer that NCCL owns for the
    // life of the process (never freed) and fills with a size-bounded formatted write, so it always holds a
    // NUL within its size and reading up to the NUL stays inside it. That buffer is NOT thread-local: another
    // thread's failing NCCL call may rewrite it while we copy it (a race NCCL's API gives no way to avoid), so
    // the copy can be torn or describe another thread's failure (NCCL's docs: "could be unrelated to the
    // current call"). We copy it at once, lossily, and use it only as explanatory text, never parse it.
    let text = unsafe {
        let p = f(comm);
        if p.is_null() {
            return None;
        }
        CStr::from_ptr(p).to_string_lossy().into_owned()
    };
    let text = text.trim().to_string();
    (!text.is_empty()).then_some(text)
}

/// [`check_code`] with the last-error text fetched from NCCL for `comm` (null for calls without one).
///
/// # Safety
/// As [`last_error`].
pub(crate) unsafe fn check(op: &'static str, code: i32, comm: nccl_sys::ncclComm_t) -> Result<()> {
    if code == SUCCESS {
        return Ok(());
    }
    // SAFETY: forwarded from the caller.
    check_code(op, code, unsafe { last_error(comm) })
}

/// The version gate: `Ok` when a library of version `loaded` has an API that first appeared in `needs` (one
/// of the [`since`](crate::version::since) constants), [`Error::Unsupported`] otherwise.
///
/// ```
/// use nccl::{result::require, version::since, Version};
/// assert!(require("shrink", since::SHRINK, Version::new(2, 27, 3)).is_ok());
/// let err = require("shrink", since::SHRINK, Version::new(2, 18, 0)).unwrap_err();
/// assert_eq!(err.to_string(), "shrink needs NCCL 2.27 or newer, but the loaded library is NCCL 2.18.0");
/// ```
pub fn require(op: &'static str, needs: Version, loaded: Version) -> Result<()> {
    if loaded.at_least(needs) {
        Ok(())
    } else {
        Err(Error::Unsupported { op, needs, loaded })
    }
}

/// The version of the loaded library, or the load error for `op`.
pub(crate) fn loaded_version(op: &'static str) -> Result<Version> {
    Ok(Version::from_code(library(op)?.version_code()))
}

/// [`require`] against the loaded library.
pub(crate) fn require_loaded(op: &'static str, needs: Version) -> Result<()> {
    require(op, needs, loaded_version(op)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_symbol_version_of_the_bindings_parses() {
        for (name, since) in nccl_sys::FUNCTIONS {
            let v = Version::parse(since).unwrap_or_else(|| panic!("{name}: {since:?}"));
            assert!(v >= Version::new(1, 0, 0), "{name}: {since:?}");
        }
    }
}
