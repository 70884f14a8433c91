//! The shared region every rank of a host communicator works in: control words, per-rank records, data
//! slots for staged collectives and point-to-point channels.
//!
//! The same layout lives on the heap (ranks as threads, one `Arc<Region>`) or in a shared-memory mapping
//! (ranks as processes). Everything other ranks touch concurrently is either an atomic or a data area whose
//! accesses are ordered by the barrier / channel protocol (see `sync.rs`, `slot.rs`, `p2p.rs`).

use std::sync::atomic::{AtomicU32, AtomicU64};

/// Bytes per cache line; every shared word sits on its own line unless noted.
pub(crate) const LINE: usize = 64;
/// Identifies a region made by this version of the layout.
pub(crate) const MAGIC: u64 = 0x6e63_636c_2d72_7332; // "nccl-rs2" (2: six-word stamps, descriptor moved)

const HEADER: usize = 8 * LINE;
const RANK_REC: usize = 4 * LINE;
const CHAN_HDR: usize = 4 * LINE;
/// Bytes of the failure message kept in the header.
pub(crate) const MSG_CAP: usize = 4 * LINE;

/// Where the region's memory came from.
pub(crate) enum Backing {
    /// `std::alloc` (threads).
    Heap(std::alloc::Layout),
    /// `mmap` of a shared-memory object (processes).
    Mmap,
}

/// Sizes that fix the layout; rank 0's values are written into the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub nranks: usize,
    /// Bytes of one rank's staging slot (there are two per rank, used by alternating barrier phases).
    pub slot_bytes: usize,
    /// Bytes of one of the two buffers of a point-to-point channel.
    pub chan_bytes: usize,
}

fn round_down(x: usize, to: usize) -> usize {
    x / to * to
}

impl Geometry {
    /// Chooses slot sizes for `nranks` ranks: large slots for few ranks (pipelined staging of big
    /// messages), smaller ones as the world grows so the region stays modest.
    pub fn for_ranks(nranks: usize, slot_bytes: Option<usize>) -> Geometry {
        let n = nranks.max(1);
        let min_slot = (n * 8 * 16).next_multiple_of(LINE).max(4 * 1024);
        let slot = match slot_bytes {
            Some(s) => s.next_multiple_of(LINE).max(n * 8).next_multiple_of(LINE),
            None => round_down((8usize << 20) / n, 4096).clamp(min_slot, 1 << 20),
        };
        let chan = round_down((4usize << 20) / (n * n), 4096).clamp(4096, 256 * 1024);
        Geometry {
            nranks: n,
            slot_bytes: slot,
            chan_bytes: chan,
        }
    }

    fn rank_base(&self) -> usize {
        HEADER
    }
    fn slot_base(&self) -> usize {
        HEADER + self.nranks * RANK_REC
    }
    fn chan_base(&self) -> usize {
        self.slot_base() + self.nranks * 2 * self.slot_bytes
    }
    fn chan_size(&self) -> usize {
        CHAN_HDR + 2 * self.chan_bytes
    }
    /// Total bytes of the region.
    pub fn total(&self) -> usize {
        (self.chan_base() + self.nranks * self.nranks * self.chan_size()).next_multiple_of(4096)
    }
}

/// The shared memory of one communicator.
pub(crate) struct Region {
    base: *mut u8,
    len: usize,
    backing: Backing,
    pub geo: Geometry,
}

// SAFETY: the region is plain memory; every concurrent access goes through atomics or is ordered by the
// protocols documented at each use. The raw pointer is owned (freed once in Drop).
unsafe impl Send for Region {}
// SAFETY: as above: shared access from several threads only through atomics and protocol-ordered copies.
unsafe impl Sync for Region {}

/// Header words (byte offsets).
pub(crate) mod off {
    use super::LINE;
    pub const MAGIC: usize = 0;
    pub const NRANKS: usize = 8;
    pub const SLOT: usize = 16;
    pub const CHAN: usize = 24;
    pub const TOTAL: usize = 32;
    /// Processes mode: rank 0's `HostOptions::direct_min_bytes`, which every rank uses.
    pub const DIRECT: usize = 40;
    /// Processes mode: rank 0's `HostOptions::cma_max_bytes`.
    pub const CMA_MAX: usize = 56;
    /// The barrier word: broken bit, phase, count.
    pub const BAR: usize = LINE;
    /// First failure: kind and rank.
    pub const REASON: usize = 2 * LINE;
    /// Length of the failure message.
    pub const MSG_LEN: usize = 2 * LINE + 8;
    /// The failure message bytes.
    pub const MSG: usize = 3 * LINE;
    /// Number of ranks parked in `futex_wait` (32-bit).
    pub const SLEEPERS: usize = 48;
    /// The futex word parked ranks wait on (32-bit); bumped by whoever makes progress while someone sleeps.
    pub const WAKE: usize = 7 * LINE;
}

/// Words of a rank record (byte offsets inside it).
pub(crate) mod rec {
    use super::LINE;
    /// Last barrier phase this rank arrived at, plus one (0 = none yet).
    pub const ARRIVED: usize = 0;
    /// 0 = not joined, 1 = alive, [`DROPPED`], [`PANICKED`].
    pub const ALIVE: usize = 8;
    /// `ALIVE` value of a rank whose communicator was dropped.
    pub const DROPPED: u64 = 2;
    /// `ALIVE` value of a rank whose communicator was dropped while its thread panicked.
    pub const PANICKED: u64 = 3;
    pub const PID: usize = 16;
    pub const START: usize = 24;
    /// Two phase stamps of 6 words each (one line apiece), indexed by phase parity (see `Stamp`).
    pub const SIG: usize = LINE;
    /// Direct-mode descriptor: send ptr, recv ptr, scale bits, has-scale.
    pub const DESC: usize = 3 * LINE;
    /// Processes mode: where this rank mapped the region (its address space), for the attach probe.
    pub const BASE: usize = 3 * LINE + 32;
    /// Processes mode: this rank's verdict on cross-memory attach to every peer (1 = works, 2 = not).
    pub const CMA: usize = 3 * LINE + 40;
}

impl Region {
    /// A zeroed heap region (ranks as threads).
    pub fn heap(geo: Geometry) -> std::io::Result<Region> {
        let len = geo.total();
        let layout = std::alloc::Layout::from_size_align(len, 4096)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        // SAFETY: `layout` has a non-zero size (the header alone is 512 bytes).
        let base = unsafe { std::alloc::alloc_zeroed(layout) };
        if base.is_null() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                "host communicator region",
            ));
        }
        let r = Region {
            base,
            len,
            backing: Backing::Heap(layout),
            geo,
        };
        r.init_header();
        Ok(r)
    }

    /// Wraps a mapping made by `shm.rs`.
    ///
    /// # Safety
    /// `base` must be a shared, zero-initialised (or already initialised by rank 0) mapping of `len` bytes,
    /// page aligned, owned by the returned region (unmapped in Drop).
    pub unsafe fn from_mmap(base: *mut u8, len: usize, geo: Geometry) -> Region {
        Region {
            base,
            len,
            backing: Backing::Mmap,
            geo,
        }
    }

    /// Writes the layout words (creator only, before anyone else sees the region).
    pub fn init_header(&self) {
        let g = self.geo;
        for (o, v) in [
            (off::NRANKS, g.nranks as u64),
            (off::SLOT, g.slot_bytes as u64),
            (off::CHAN, g.chan_bytes as u64),
            (off::TOTAL, self.len as u64),
            (off::MAGIC, MAGIC),
        ] {
            self.word(o).store(v, std::sync::atomic::Ordering::Release);
        }
    }

    /// The geometry stored in a header (used by joining processes).
    pub fn read_geometry(&self) -> Option<Geometry> {
        use std::sync::atomic::Ordering::Acquire;
        if self.word(off::MAGIC).load(Acquire) != MAGIC {
            return None;
        }
        Some(Geometry {
            nranks: self.word(off::NRANKS).load(Acquire) as usize,
            slot_bytes: self.word(off::SLOT).load(Acquire) as usize,
            chan_bytes: self.word(off::CHAN).load(Acquire) as usize,
        })
    }

    /// The atomic word at byte offset `o`.
    pub fn word(&self, o: usize) -> &AtomicU64 {
        assert!(o % 8 == 0 && o + 8 <= self.len, "region word {o} out of bounds");
        // SAFETY: in bounds and 8-aligned (checked; base is page aligned); the memory is zero-initialised or
        // written only through atomics, so it is a valid `AtomicU64`, and lives as long as `self`.
        unsafe { &*(self.base.add(o) as *const AtomicU64) }
    }

    /// The 32-bit atomic at byte offset `o` (futex words).
    pub fn word32(&self, o: usize) -> &AtomicU32 {
        assert!(o % 4 == 0 && o + 4 <= self.len, "region word {o} out of bounds");
        // SAFETY: as for `word`, with 4-byte alignment and size.
        unsafe { &*(self.base.add(o) as *const AtomicU32) }
    }

    /// This process's address of the mapping.
    pub fn base_addr(&self) -> usize {
        self.base as usize
    }

    /// Byte offset of a word of rank `r`'s record from the start of the region.
    pub fn rank_word_offset(&self, r: usize, field: usize) -> usize {
        self.geo.rank_base() + r * RANK_REC + field
    }

    /// A word of rank `r`'s record.
    pub fn rank_word(&self, r: usize, field: usize) -> &AtomicU64 {
        debug_assert!(r < self.geo.nranks);
        self.word(self.rank_word_offset(r, field))
    }

    /// Pointer to rank `r`'s staging slot for phase parity `par`.
    pub fn slot(&self, r: usize, par: usize) -> *mut u8 {
        assert!(r < self.geo.nranks && par < 2);
        let o = self.geo.slot_base() + (r * 2 + par) * self.geo.slot_bytes;
        debug_assert!(o + self.geo.slot_bytes <= self.len);
        // SAFETY: the offset is inside the region (the layout reserves 2 slots per rank).
        unsafe { self.base.add(o) }
    }

    /// Offset of channel `src -> dst`'s header.
    pub fn chan(&self, src: usize, dst: usize) -> usize {
        assert!(src < self.geo.nranks && dst < self.geo.nranks);
        self.geo.chan_base() + (src * self.geo.nranks + dst) * self.geo.chan_size()
    }

    /// Pointer to buffer `i` (0 or 1) of the channel whose header is at `chan`.
    pub fn chan_buf(&self, chan: usize, i: usize) -> *mut u8 {
        assert!(i < 2);
        let o = chan + CHAN_HDR + i * self.geo.chan_bytes;
        assert!(o + self.geo.chan_bytes <= self.len);
        // SAFETY: in bounds (checked).
        unsafe { self.base.add(o) }
    }

    /// Pointer to the failure message bytes.
    pub fn msg_ptr(&self) -> *mut u8 {
        // SAFETY: the header reserves MSG_CAP bytes at `off::MSG`.
        unsafe { self.base.add(off::MSG) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        match self.backing {
            // SAFETY: allocated in `heap` with this layout, freed once.
            Backing::Heap(layout) => unsafe { std::alloc::dealloc(self.base, layout) },
            Backing::Mmap => {
                // SAFETY: the mapping of `len` bytes at `base` is owned by this region (`from_mmap`).
                unsafe {
                    libc::munmap(self.base.cast(), self.len);
                }
            }
        }
    }
}

/// Channel header words (offsets from the channel header).
pub(crate) mod chan {
    use super::LINE;
    /// Chunks published by the sender.
    pub const HEAD: usize = 0;
    /// Chunks consumed by the receiver.
    pub const TAIL: usize = LINE;
    /// Per-buffer metadata (2 lines): message bytes, dtype, chunk bytes.
    pub const META: usize = 2 * LINE;
}
