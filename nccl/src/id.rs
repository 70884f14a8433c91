//! The 128-byte id every rank of a new communicator must share.

use crate::error::{Error, Result};
use crate::result::{self, ffi};
use std::fmt;

/// Number of bytes in a [`UniqueId`] (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// `ncclUniqueId`: created once (usually by rank 0) with [`UniqueId::new`], sent to every other rank out of
/// band ([`as_bytes`](Self::as_bytes) / [`from_bytes`](Self::from_bytes), or the [`bootstrap`](crate::bootstrap)),
/// and passed to [`Communicator::init_rank`](crate::Communicator::init_rank) on every rank.
///
/// The bytes are kept as `u8`, so the id is the same on platforms where C's `char` is signed (x86-64) or
/// unsigned (aarch64). An id is meant for one communicator: create a fresh one for each.
///
/// `Debug` shows a short hash, not the bytes: the id contains the root's socket address and a secret-ish
/// magic, and is long enough to flood logs.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[doc(alias = "ncclUniqueId")]
pub struct UniqueId {
    bytes: [u8; UNIQUE_ID_BYTES],
}

impl UniqueId {
    /// A new id from `ncclGetUniqueId`. This starts NCCL's bootstrap listener in this process (the id holds its
    /// address), so call it on the rank that will take part in the communicator, typically rank 0.
    #[doc(alias = "ncclGetUniqueId")]
    pub fn new() -> Result<Self> {
        let mut raw = nccl_sys::ncclUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        // SAFETY: `raw` is a valid, writable `ncclUniqueId`; NCCL fills its 128 bytes and keeps no pointer.
        let code = unsafe { ffi!("ncclGetUniqueId", ncclGetUniqueId(&mut raw)) };
        // SAFETY: a null communicator asks for the global last error.
        unsafe { result::check("ncclGetUniqueId", code, std::ptr::null_mut())? };
        Ok(Self::from_raw(&raw))
    }

    /// The id from bytes received from another rank.
    pub const fn from_bytes(bytes: [u8; UNIQUE_ID_BYTES]) -> Self {
        UniqueId { bytes }
    }

    /// The id from a slice, which must be exactly [`UNIQUE_ID_BYTES`] long.
    pub fn try_from_slice(bytes: &[u8]) -> Result<Self> {
        let bytes: [u8; UNIQUE_ID_BYTES] = bytes.try_into().map_err(|_| Error::LengthMismatch {
            op: "UniqueId::try_from_slice",
            what: "id bytes",
            expected: UNIQUE_ID_BYTES,
            actual: bytes.len(),
        })?;
        Ok(Self::from_bytes(bytes))
    }

    /// The 128 bytes to send to other ranks.
    pub const fn as_bytes(&self) -> &[u8; UNIQUE_ID_BYTES] {
        &self.bytes
    }

    /// The C struct, for calls into `nccl-sys`.
    pub fn to_raw(&self) -> nccl_sys::ncclUniqueId {
        // `c_char` is i8 or u8 depending on the platform; `as` keeps the bit pattern either way.
        nccl_sys::ncclUniqueId {
            internal: self.bytes.map(|b| b as std::ffi::c_char),
        }
    }

    /// The id from the C struct.
    pub fn from_raw(raw: &nccl_sys::ncclUniqueId) -> Self {
        UniqueId {
            bytes: raw.internal.map(|c| c as u8),
        }
    }

    /// A 64-bit FNV-1a hash of the bytes, what `Debug` prints; equal ids have equal hashes on every rank, so it
    /// is handy for checking that all ranks received the same id.
    pub fn short_hash(&self) -> u64 {
        self.bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        })
    }
}

impl fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UniqueId({:016x})", self.short_hash())
    }
}

impl From<[u8; UNIQUE_ID_BYTES]> for UniqueId {
    fn from(bytes: [u8; UNIQUE_ID_BYTES]) -> Self {
        Self::from_bytes(bytes)
    }
}

impl AsRef<[u8]> for UniqueId {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}
