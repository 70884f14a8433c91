//! Cross-memory attach: one rank process reading or writing another's memory with a single kernel copy
//! (`process_vm_readv` / `process_vm_writev`, Linux 3.2+), as OpenMPI's and MPICH's shared-memory transports
//! do for large messages. The direct path (`direct.rs`) uses it between processes instead of staging every
//! byte through the shared segment twice.
//!
//! The kernel checks each access: the target must be a process this one may ptrace (same user, and no
//! Yama `ptrace_scope` restriction or a capability), and every remote byte must be mapped in it, else the
//! call fails (`EPERM`, `EFAULT`, `ESRCH` once it exited). Whether it works is probed once, when a
//! communicator is created ([`probe`]); every rank must succeed with every other, else nobody uses it.

use std::io;

/// Which direction a transfer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    /// Remote to local (`process_vm_readv`).
    Read,
    /// Local to remote (`process_vm_writev`).
    Write,
}

impl Dir {
    pub fn name(self) -> &'static str {
        match self {
            Dir::Read => "process_vm_readv",
            Dir::Write => "process_vm_writev",
        }
    }
}

/// Moves `len` bytes between `local` (in this process) and address `remote` of process `pid`.
///
/// # Safety
/// `local` must be valid for writes (`Read`) or reads (`Write`) of `len` bytes, with no other access to it
/// during the call when written. The remote side is checked by the kernel; writing it is sound for this
/// process whatever it holds (another address space), so the caller's duty there is the protocol's: write
/// only what the peer handed over for writing.
pub(crate) unsafe fn transfer(dir: Dir, pid: i32, local: *mut u8, remote: usize, len: usize) -> io::Result<()> {
    let mut done = 0usize;
    while done < len {
        let l = libc::iovec {
            // SAFETY: `done < len`: inside the caller's buffer.
            iov_base: unsafe { local.add(done) }.cast(),
            iov_len: len - done,
        };
        let r = libc::iovec {
            iov_base: remote.wrapping_add(done) as *mut libc::c_void,
            iov_len: len - done,
        };
        // SAFETY: one iovec each side, describing the caller's buffer (valid per the contract) and the remote
        // range (checked by the kernel).
        let n = unsafe {
            match dir {
                Dir::Read => libc::process_vm_readv(pid, &l, 1, &r, 1, 0),
                Dir::Write => libc::process_vm_writev(pid, &l, 1, &r, 1, 0),
            }
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} moved 0 of {} bytes", dir.name(), len - done),
                ))
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Whether this process can read `expect` (8 bytes) at address `remote` of process `pid`.
pub(crate) fn probe(pid: i32, remote: usize, expect: u64) -> io::Result<()> {
    let mut v = [0u8; 8];
    // SAFETY: `v` is a local 8-byte buffer written only here.
    unsafe { transfer(Dir::Read, pid, v.as_mut_ptr(), remote, 8)? };
    let got = u64::from_ne_bytes(v);
    if got != expect {
        return Err(io::Error::other(format!(
            "read {got:#x} at {remote:#x} of process {pid}, expected {expect:#x}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_this_process_and_names_bad_addresses() {
        let pid = std::process::id() as i32;
        let src: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        // SAFETY: `dst` is ours and not otherwise accessed; reading our own `src` through the kernel.
        unsafe { transfer(Dir::Read, pid, dst.as_mut_ptr(), src.as_ptr() as usize, src.len()).unwrap() };
        assert_eq!(dst, src);
        let mut back = vec![0u8; 1000];
        let mut from = vec![7u8; 1000];
        // SAFETY: writing `back` (ours, not otherwise accessed) from `from`.
        unsafe { transfer(Dir::Write, pid, from.as_mut_ptr(), back.as_mut_ptr() as usize, 1000).unwrap() };
        assert_eq!(back, from);
        let word = 0x1234_5678_9abc_def0u64;
        probe(pid, &word as *const u64 as usize, word).unwrap();
        let e = probe(pid, &word as *const u64 as usize, 1).unwrap_err();
        assert!(e.to_string().contains("expected 0x1"), "{e}");
        // Address 8 is never mapped: the kernel refuses instead of faulting.
        let e = probe(pid, 8, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{e}");
    }
}
