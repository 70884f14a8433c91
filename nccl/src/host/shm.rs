//! Processes mode: the region in a POSIX shared-memory object, created by rank 0 and mapped by everyone.
//!
//! The name lives in `/dev/shm` only between creation and the bootstrap barrier that follows every rank's
//! mapping; then it is unlinked (by every rank, so a crash of rank 0 after the barrier cannot leak it, and
//! by rank 0 on every error path). The memory itself is freed by the kernel when the last mapping goes.

use std::ffi::CString;
use std::sync::atomic::Ordering::{Acquire, Release};

use super::region::{off, rec, Geometry, Region};
use super::sync::process_start_time;
use super::HostOptions;
use crate::error::{Error, Result};

const OP: &str = "HostComm::from_rendezvous";

fn os_err(what: &str) -> Error {
    let e = std::io::Error::last_os_error();
    Error::io(OP, std::io::Error::new(e.kind(), format!("{what}: {e}")))
}

/// Unlinks the name when dropped, unless [`disarm`](Unlink::disarm)ed.
struct Unlink(Option<CString>);

impl Unlink {
    fn new(name: CString) -> Self {
        Unlink(Some(name))
    }
    /// Gives the name back without unlinking it. (It used to be cloned and the guard `mem::forget`-ed, which
    /// leaked the original name once per segment: AddressSanitizer's leak check found it.)
    fn disarm(mut self) -> CString {
        self.0.take().expect("armed until disarmed")
    }
}

impl Drop for Unlink {
    fn drop(&mut self) {
        if let Some(name) = &self.0 {
            // SAFETY: a valid NUL-terminated name; unlinking a name that is already gone only returns ENOENT.
            unsafe {
                libc::shm_unlink(name.as_ptr());
            }
        }
    }
}

fn map(fd: libc::c_int, len: usize) -> Result<*mut u8> {
    // SAFETY: plain mmap of a shared file mapping; the result is checked before use.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(os_err("mmap of the shared segment"));
    }
    Ok(p.cast())
}

/// Creates or joins the region. `bcast` sends rank 0's bytes to everyone; `barrier` waits for all ranks.
pub(crate) fn join_with(
    rank: usize,
    size: usize,
    opts: &HostOptions,
    bcast: &mut dyn FnMut(&[u8]) -> Result<Vec<u8>>,
    barrier: &mut dyn FnMut() -> Result<()>,
) -> Result<Joined> {
    if size == 0 || rank >= size {
        return Err(Error::InvalidRank {
            op: OP,
            what: "rank",
            value: rank,
            size,
        });
    }
    let region = if rank == 0 {
        let made = create(size, opts);
        let msg = match &made {
            Ok((_, name)) => name.as_bytes().to_vec(),
            Err(e) => format!("!{e}").into_bytes(),
        };
        let sent = bcast(&msg);
        let (region, name) = made?;
        let unlink = Unlink::new(name); // unlinked on every path from here on
        sent?;
        register(&region, rank);
        barrier()?;
        drop(unlink);
        region
    } else {
        let msg = bcast(&[])?;
        if msg.first() == Some(&b'!') {
            return Err(Error::invalid(
                OP,
                format!(
                    "rank 0 could not create the segment: {}",
                    String::from_utf8_lossy(&msg[1..])
                ),
            ));
        }
        let name = CString::new(msg).map_err(|_| Error::invalid(OP, "bad segment name from rank 0"))?;
        let region = open(&name, size)?;
        register(&region, rank);
        let r = barrier();
        drop(Unlink::new(name));
        r?;
        region
    };
    // Every rank is registered (pid, mapping address): try attaching to each peer, publish the verdict,
    // and use cross-memory attach only if every rank could reach every other (all decide alike).
    let ok = (0..size).filter(|&j| j != rank).all(|j| {
        let pid = region.rank_word(j, rec::PID).load(Acquire);
        let base = region.rank_word(j, rec::BASE).load(Acquire) as usize;
        let at = base.wrapping_add(region.rank_word_offset(j, rec::PID));
        super::cma::probe(pid as i32, at, pid).is_ok()
    });
    region.rank_word(rank, rec::CMA).store(if ok { 1 } else { 2 }, Release);
    barrier()?;
    let cma = (0..size).all(|j| region.rank_word(j, rec::CMA).load(Acquire) == 1);
    Ok(Joined { region, cma })
}

/// A joined region and whether the ranks use cross-memory attach.
pub(crate) struct Joined {
    pub region: Region,
    pub cma: bool,
}

fn create(size: usize, opts: &HostOptions) -> Result<(Region, CString)> {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!(
        "/nccl-rs-{}-{:x}-{}",
        std::process::id(),
        nanos,
        SEQ.fetch_add(1, Relaxed)
    );
    let name = CString::new(name).expect("no NUL in a formatted name");
    let geo = Geometry::for_ranks(size, opts.slot_bytes);
    // SAFETY: valid NUL-terminated name; O_EXCL makes sure we own a fresh object.
    let fd = unsafe { libc::shm_open(name.as_ptr(), libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o600) };
    if fd < 0 {
        return Err(os_err("shm_open (create)"));
    }
    let unlink = Unlink::new(name);
    let len = geo.total();
    // SAFETY: `fd` is our open descriptor.
    let res = if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
        Err(os_err("ftruncate of the shared segment"))
    } else {
        map(fd, len)
    };
    // SAFETY: closing our descriptor; the mapping (if any) stays valid.
    unsafe { libc::close(fd) };
    let base = res?;
    // SAFETY: a fresh shared mapping of `len` bytes (zero-filled by the kernel), owned by the region.
    let region = unsafe { Region::from_mmap(base, len, geo) };
    region.init_header();
    region.word(off::DIRECT).store(opts.direct_min_bytes as u64, Release);
    region.word(off::CMA_MAX).store(opts.cma_max_bytes as u64, Release);
    Ok((region, unlink.disarm()))
}

fn open(name: &CString, size: usize) -> Result<Region> {
    // SAFETY: valid NUL-terminated name.
    let fd = unsafe { libc::shm_open(name.as_ptr(), libc::O_RDWR, 0) };
    if fd < 0 {
        return Err(os_err("shm_open (join)"));
    }
    // SAFETY: `stat` is plain data, filled by fstat on our descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and out-pointer.
    let res = if unsafe { libc::fstat(fd, &mut st) } != 0 {
        Err(os_err("fstat of the shared segment"))
    } else {
        map(fd, st.st_size as usize)
    };
    // SAFETY: closing our descriptor; the mapping stays valid.
    unsafe { libc::close(fd) };
    let base = res?;
    let len = st.st_size as usize;
    // SAFETY: a shared mapping of `len` bytes, initialised by rank 0 before it broadcast the name; owned by
    // the region from here on. The geometry is replaced by the header's below before any use.
    let mut region = unsafe {
        Region::from_mmap(
            base,
            len,
            Geometry {
                nranks: 0,
                slot_bytes: 0,
                chan_bytes: 0,
            },
        )
    };
    let geo = region
        .read_geometry()
        .ok_or_else(|| Error::invalid(OP, "the shared segment has no valid header"))?;
    if geo.nranks != size || geo.total() != len {
        return Err(Error::invalid(
            OP,
            format!(
                "the shared segment is for {} ranks ({} bytes), this world has {size} ({len} bytes)",
                geo.nranks,
                geo.total()
            ),
        ));
    }
    region.geo = geo;
    Ok(region)
}

fn register(region: &Region, rank: usize) {
    let pid = std::process::id();
    let start = process_start_time(pid as i32).unwrap_or(0);
    region.rank_word(rank, rec::START).store(start, Release);
    region.rank_word(rank, rec::PID).store(pid as u64, Release);
    region
        .rank_word(rank, rec::BASE)
        .store(region.base_addr() as u64, Release);
    region.rank_word(rank, rec::ALIVE).store(1, Release);
}

/// Creates or joins the region through the bootstrap's rendezvous; returns it with (rank, size).
pub(crate) fn join(rv: &crate::bootstrap::Rendezvous, opts: &HostOptions) -> Result<(Joined, usize, usize)> {
    let (rank, size) = (rv.rank(), rv.size());
    let joined = join_with(rank, size, opts, &mut |d| Ok(rv.broadcast(d)?), &mut || {
        Ok(rv.barrier()?)
    })?;
    Ok((joined, rank, size))
}
