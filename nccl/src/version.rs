//! What the loaded libraries are: NCCL's version, and whether a CUDA driver is present at all.

use crate::error::Result;
use crate::result;
use std::fmt;

/// An NCCL version, as `ncclGetVersion` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// `NCCL_VERSION_CODE`, e.g. 23203 for 2.32.3. Ordering versions compares this.
    pub code: i32,
}

impl Version {
    /// The version with this `NCCL_VERSION_CODE`.
    pub const fn from_code(code: i32) -> Self {
        Version { code }
    }
    /// Major version (2 for 2.32.3).
    pub const fn major(self) -> i32 {
        result::version_parts(self.code).0
    }
    /// Minor version (32 for 2.32.3).
    pub const fn minor(self) -> i32 {
        result::version_parts(self.code).1
    }
    /// Patch level (3 for 2.32.3).
    pub const fn patch(self) -> i32 {
        result::version_parts(self.code).2
    }
    /// True when this version is at least `major.minor`.
    pub const fn at_least(self, major: i32, minor: i32) -> bool {
        self.code >= result::version_code(major, minor, 0)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major(), self.minor(), self.patch())
    }
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
