//! The checked layer between `nccl-sys` and the safe types: loading the library, turning `ncclResult_t` codes
//! into [`Error`]s with NCCL's own explanation, and version gates.
//!
//! Nothing here is public API except [`check_code`], [`require`] and the version helpers, which are exposed so
//! programs (and tests) can reason about codes and versions without a GPU.

use crate::error::{Error, Result};
use nccl_sys::{Library, LoadError};
use std::ffi::CStr;

/// `ncclSuccess`.
pub const SUCCESS: i32 = 0;
/// `ncclInProgress`: a non-blocking communicator is still working on the call.
pub const IN_PROGRESS: i32 = 7;

/// The loaded library, or [`Error::Library`] naming the operation that needed it.
pub(crate) fn library(op: &'static str) -> Result<&'static Library> {
    nccl_sys::library().map_err(|e| load_error(op, e))
}

/// Maps a loader error to this crate's error: a symbol missing from an older library becomes
/// [`Error::Unsupported`] (naming the version that introduced it), anything else [`Error::Library`].
pub fn load_error(op: &'static str, e: LoadError) -> Error {
    match e {
        LoadError::MissingSymbol { needs, loaded, .. } => Error::Unsupported {
            op,
            needs,
            loaded: version_string(loaded),
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
    // SAFETY: the caller guarantees `comm` is null or live; ncclGetLastError returns a pointer to a
    // NUL-terminated string owned by NCCL (static or thread-local), which we copy before any other NCCL call.
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

/// Splits an `NCCL_VERSION_CODE` into `(major, minor, patch)`. Codes below 2.9 use the old
/// `X*1000 + Y*100 + Z` encoding, later ones `X*10000 + Y*100 + Z`.
pub const fn version_parts(code: i32) -> (i32, i32, i32) {
    if code >= 10000 {
        (code / 10000, (code % 10000) / 100, code % 100)
    } else {
        (code / 1000, (code % 1000) / 100, code % 100)
    }
}

/// The `NCCL_VERSION(major, minor, patch)` code.
pub const fn version_code(major: i32, minor: i32, patch: i32) -> i32 {
    if major <= 2 && minor <= 8 {
        major * 1000 + minor * 100 + patch
    } else {
        major * 10000 + minor * 100 + patch
    }
}

/// `"2.32.3"` for 23203.
pub fn version_string(code: i32) -> String {
    let (a, b, c) = version_parts(code);
    format!("{a}.{b}.{c}")
}

/// Parses `"2.27"` or `"2.30.5"` into a version code (patch 0 when absent); `None` if malformed.
pub fn parse_version(text: &str) -> Option<i32> {
    let mut parts = text.split('.').map(|p| p.parse::<i32>().ok());
    let major = parts.next()??;
    let minor = parts.next()??;
    let patch = match parts.next() {
        Some(p) => p?,
        None => 0,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(version_code(major, minor, patch))
}

/// The version gate: `Ok` when a library of version `loaded` (an `NCCL_VERSION_CODE`) has an API that first
/// appeared in `needs` (`"2.27"`), [`Error::Unsupported`] otherwise.
///
/// ```
/// use nccl::result::require;
/// assert!(require("shrink", "2.27", 22703).is_ok());
/// let err = require("shrink", "2.27", 21800).unwrap_err();
/// assert_eq!(err.to_string(), "shrink needs NCCL 2.27 or newer, but the loaded library is NCCL 2.18.0");
/// ```
pub fn require(op: &'static str, needs: &'static str, loaded: i32) -> Result<()> {
    let need = parse_version(needs).ok_or_else(|| Error::invalid(op, format!("bad version requirement {needs:?}")))?;
    if loaded >= need {
        Ok(())
    } else {
        Err(Error::Unsupported {
            op,
            needs,
            loaded: version_string(loaded),
        })
    }
}

/// [`require`] against the loaded library.
pub(crate) fn require_loaded(op: &'static str, needs: &'static str) -> Result<()> {
    require(op, needs, library(op)?.version_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_encoding_round_trips() {
        for &(a, b, c) in &[(2, 8, 4), (2, 9, 6), (2, 18, 5), (2, 32, 3), (3, 0, 1)] {
            let code = version_code(a, b, c);
            assert_eq!(version_parts(code), (a, b, c), "{code}");
        }
        assert_eq!(version_code(2, 32, 3), 23203);
        assert_eq!(version_code(2, 8, 4), 2804);
        assert_eq!(parse_version("2.30.5"), Some(23005));
        assert_eq!(parse_version("2.x"), None);
        assert_eq!(parse_version("2"), None);
        assert_eq!(parse_version("2.1.2.3"), None);
    }
}
