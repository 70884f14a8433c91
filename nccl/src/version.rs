//! What the loaded libraries are: NCCL's version, and whether a CUDA driver is present at all.

use crate::error::Result;
use crate::result;
use std::fmt;

/// An NCCL version. Ordered as versions are (major, then minor, then patch).
///
/// Every version gate of the crate compares against one of the [`since`] constants, and
/// [`Error::Unsupported`](crate::Error::Unsupported) carries two of these.
///
/// ```
/// use nccl::Version;
/// assert_eq!(Version::from_code(23203), Version::new(2, 32, 3));
/// assert_eq!(Version::new(2, 8, 4).code(), 2804); // the old encoding before 2.9
/// assert!(Version::new(2, 10, 0) > Version::new(2, 9, 6));
/// assert_eq!(Version::new(2, 27, 0).to_string(), "2.27.0");
/// assert_eq!(Version::parse("2.30.5"), Some(Version::new(2, 30, 5)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Major version (2 for 2.32.3).
    pub major: u32,
    /// Minor version (32 for 2.32.3).
    pub minor: u32,
    /// Patch level (3 for 2.32.3).
    pub patch: u32,
}

impl Version {
    /// `major.minor.patch`.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Version { major, minor, patch }
    }

    /// The version with this `NCCL_VERSION_CODE` (`X*1000 + Y*100 + Z` before 2.9, `X*10000 + Y*100 + Z`
    /// since). Negative codes give 0.0.0.
    pub const fn from_code(code: i32) -> Self {
        let c = if code < 0 { 0 } else { code as u32 };
        if c >= 10000 {
            Version::new(c / 10000, (c % 10000) / 100, c % 100)
        } else {
            Version::new(c / 1000, (c % 1000) / 100, c % 100)
        }
    }

    /// The `NCCL_VERSION(major, minor, patch)` code, as `ncclGetVersion` reports it.
    pub const fn code(self) -> i32 {
        let code = if self.major <= 2 && self.minor <= 8 {
            self.major * 1000 + self.minor * 100 + self.patch
        } else {
            self.major * 10000 + self.minor * 100 + self.patch
        };
        code as i32
    }

    /// True when this version is at least `other`.
    pub const fn at_least(self, other: Version) -> bool {
        self.major > other.major
            || (self.major == other.major
                && (self.minor > other.minor || (self.minor == other.minor && self.patch >= other.patch)))
    }

    /// Parses `"2.27"` or `"2.30.5"` (patch 0 when absent); `None` if malformed.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split('.').map(|p| p.parse::<u32>().ok());
        let major = parts.next()??;
        let minor = parts.next()??;
        let patch = match parts.next() {
            Some(p) => p?,
            None => 0,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Version::new(major, minor, patch))
    }

    /// `"2.27"` when the patch level is 0, else `"2.30.5"` (how requirements are written).
    pub fn short(&self) -> String {
        if self.patch == 0 {
            format!("{}.{}", self.major, self.minor)
        } else {
            self.to_string()
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The first NCCL version of each API and type this crate gates on: the one place these facts live.
///
/// Sources: NCCL's release notes and the history of `nccl.h`. `ncclBfloat16` (value 9 of
/// `ncclDataType_t`) and `ncclAvg` arrived in 2.10.3 ("Added support for bfloat16 type", "Added ncclAvg
/// operation"); the fp8 types (`ncclFloat8e4m3`, `ncclFloat8e5m2`, values 10 and 11) in 2.24.
pub mod since {
    use super::Version;

    /// Capturing NCCL operations into CUDA graphs (with CUDA 11.3 or newer).
    pub const GRAPH_CAPTURE: Version = Version::new(2, 9, 0);
    /// `ncclBfloat16`.
    pub const BF16: Version = Version::new(2, 10, 0);
    /// `ncclAvg`.
    pub const AVG: Version = Version::new(2, 10, 0);
    /// `ncclRedOpCreatePreMulSum` / `ncclRedOpDestroy`.
    pub const PREMULSUM: Version = Version::new(2, 11, 0);
    /// `ncclCommInitRankConfig`, `ncclCommFinalize`, non-blocking communicators.
    pub const CONFIG: Version = Version::new(2, 14, 0);
    /// `ncclCommSplit`.
    pub const SPLIT: Version = Version::new(2, 18, 0);
    /// `ncclCommRegister`, `ncclMemAlloc`.
    pub const REGISTER: Version = Version::new(2, 19, 0);
    /// `ncclFloat8e4m3`, `ncclFloat8e5m2`.
    pub const FP8: Version = Version::new(2, 24, 0);
    /// `ncclCommShrink`.
    pub const SHRINK: Version = Version::new(2, 27, 0);
    /// `ncclCommWindowRegister`.
    pub const WINDOW: Version = Version::new(2, 27, 0);
    /// `ncclAlltoAll`, `ncclGather`, `ncclScatter` (emulated with send/recv before).
    pub const ALLTOALL: Version = Version::new(2, 28, 0);
}

/// The version of the NCCL library this process loaded (`ncclGetVersion`). Loads the library on first use.
///
/// ```no_run
/// let v = nccl::version()?;
/// println!("NCCL {v}");
/// # Ok::<(), nccl::Error>(())
/// ```
#[doc(alias = "ncclGetVersion")]
pub fn version() -> Result<Version> {
    Ok(Version::from_code(result::library("ncclGetVersion")?.version_code()))
}

/// The version of NCCL whose header the bindings were generated from (`NCCL_VERSION_CODE` of `nccl.h`).
pub fn header_version() -> Version {
    Version::from_code(nccl_sys::NCCL_VERSION_CODE as i32)
}

/// True when the NCCL library can be loaded (does not touch CUDA).
pub fn nccl_available() -> bool {
    nccl_sys::library().is_ok()
}

/// True when a CUDA driver (`libcuda`) can be loaded, so cudarc's `CudaContext::new` will not panic.
///
/// cudarc 0.19 panics instead of returning an error when the driver library is absent; call this first on
/// machines that may have no GPU. It only loads the library; it does not count devices.
#[cfg(feature = "cuda")]
pub fn cuda_available() -> bool {
    // SAFETY: `is_culib_present` only tries to `dlopen` the driver library under its usual names and closes
    // it again; it runs no CUDA code and has no preconditions.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// True when at least one CUDA device is usable: the driver loads and reports a non-zero device count.
#[cfg(feature = "cuda")]
pub fn cuda_device_count() -> usize {
    if !cuda_available() {
        return 0;
    }
    cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}
