//! Barriers, failure recording and waiting (spin, then yield, then sleep) for the host backend.
//!
//! # The barrier word
//! One `AtomicU64` in the region: bit 63 = broken, bits 32..63 = phase (mod 2^31), bits 0..32 = ranks that
//! arrived in this phase. Every barrier a rank passes is one phase; all ranks pass the same phases in the
//! same order (NCCL's rule that every rank issues the same collectives in the same order).
//!
//! - Arriving is a CAS that increments the count. The last arriver's CAS instead advances the phase and
//!   resets the count, keeping the broken bit. Waiters wait for the phase to change.
//! - In a *breakable* phase, arriving refuses a broken word, so once the broken bit is set with
//!   `count < n`, the phase can never complete; and once it completed, setting the bit does not undo that.
//!   Completion and failure of a phase are therefore mutually exclusive, decided by one atomic word. A
//!   rank that gives up (timeout, peer failure) sets the bit with a CAS on the exact word it saw
//!   incomplete; if the CAS fails because the phase completed, it proceeds as if it had not given up.
//! - A *draining* phase (the closing barrier of a direct-access collective between threads) ignores the
//!   bit: it must complete, since no rank may return while a peer still accesses its buffers. It is still
//!   bounded by the timeout: the waiter breaks the communicator, which makes every peer's data phase stop
//!   at its next block and arrive (`Wait::Drain`, `direct.rs`).
//!
//! Acquire/release: the arriving CAS is `AcqRel` and the waiters' load `Acquire`, and the RMWs of one phase
//! form a release sequence, so everything any rank wrote before arriving happens-before everything every
//! rank does after the phase completes.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{fence, AtomicU32};
use std::time::{Duration, Instant};

use super::region::{off, rec, Region, MSG_CAP};
use crate::error::Error;

pub(crate) const BROKEN: u64 = 1 << 63;
const PHASE_MASK: u64 = (1 << 31) - 1;
const COUNT_MASK: u64 = 0xffff_ffff;
const WRITING: u64 = u64::MAX;

/// Why a communicator broke (stored in the region's reason word, high half).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Aborted = 1,
    /// Dropped, panicked or exited.
    Gone = 2,
    Timeout = 3,
    Mismatch = 4,
}

impl Kind {
    fn from_u64(v: u64) -> Option<Kind> {
        Some(match v {
            1 => Kind::Aborted,
            2 => Kind::Gone,
            3 => Kind::Timeout,
            4 => Kind::Mismatch,
            _ => return None,
        })
    }
}

fn phase_of(w: u64) -> u64 {
    (w >> 32) & PHASE_MASK
}

/// Spin briefly, then park on the region's futex word until someone makes progress (or 1 ms passes, for
/// deadline and liveness checks).
///
/// Parking protocol (no lost wake-ups): a waiter increments `SLEEPERS`, issues a SeqCst fence, reads `WAKE`,
/// re-checks its condition and only then sleeps while `WAKE` is unchanged. A rank that makes progress
/// (completes a barrier phase, publishes or consumes a chunk, breaks the communicator) issues a SeqCst fence
/// after its store and, if `SLEEPERS` is non-zero, bumps `WAKE` and wakes everyone. With the two fences,
/// either the waiter sees the progress when it re-checks, or the notifier sees the sleeper and changes
/// `WAKE` (so the futex wait returns at once or is woken).
pub(crate) struct Backoff {
    pub start: Instant,
    iter: u32,
    spinning: bool,
    spin_for: Duration,
    next_yield: u128,
}

impl Backoff {
    pub fn new(nranks: usize) -> Backoff {
        let spin_for = spin_budget(nranks);
        Backoff {
            start: Instant::now(),
            iter: 0,
            spinning: !spin_for.is_zero(),
            spin_for,
            next_yield: 2,
        }
    }

    /// Waits a little; returns true when the caller should check deadlines and liveness.
    #[inline]
    pub fn snooze(&mut self, region: &Region, ready: impl Fn() -> bool) -> bool {
        self.iter = self.iter.wrapping_add(1);
        if self.spinning {
            std::hint::spin_loop();
            if self.iter % 64 != 0 {
                return false;
            }
            let el = self.start.elapsed();
            self.spinning = el < self.spin_for;
            // After 2 us, and every 8 us after that, give the core away if something else is runnable
            // (often the peer we wait for: the scheduler likes to put communicating ranks on one core);
            // costs one syscall when nothing is.
            if el.as_micros() >= self.next_yield {
                self.next_yield = el.as_micros() + 8;
                std::thread::yield_now();
            }
            return self.iter % 1024 == 0;
        }
        let sleepers = region.word32(off::SLEEPERS);
        let wake = region.word32(off::WAKE);
        sleepers.fetch_add(1, SeqCst);
        fence(SeqCst);
        let seen = wake.load(SeqCst);
        if !ready() {
            futex_wait(wake, seen, Duration::from_millis(1));
        }
        sleepers.fetch_sub(1, SeqCst);
        true
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Wakes parked ranks, if any (call after publishing progress).
#[inline]
pub(crate) fn notify(region: &Region) {
    fence(SeqCst);
    if region.word32(off::SLEEPERS).load(SeqCst) != 0 {
        let wake = region.word32(off::WAKE);
        wake.fetch_add(1, SeqCst);
        futex_wake(wake);
    }
}

#[cfg(target_os = "linux")]
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    // SAFETY: FUTEX_WAIT on a live, aligned 32-bit word (shared between processes: no PRIVATE flag); the
    // kernel only reads the word and the timespec. Spurious returns (EAGAIN, EINTR, timeout) are fine: every
    // caller re-checks its condition in a loop.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            0usize,
            0u32,
        );
    }
}

#[cfg(target_os = "linux")]
fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a live, aligned 32-bit word; wakes every waiter, touches no memory.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            0usize,
            0usize,
            0u32,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn futex_wait(word: &AtomicU32, expected: u32, _timeout: Duration) {
    if word.load(SeqCst) == expected {
        std::thread::sleep(Duration::from_micros(50));
    }
}

#[cfg(not(target_os = "linux"))]
fn futex_wake(_word: &AtomicU32) {}

fn spin_budget(nranks: usize) -> Duration {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    if nranks <= cores {
        // Longer than a futex wake-up takes (tens of microseconds in a VM): if both sides parked, every
        // later call would pay a wake-up (a convoy); a running peer arrives well within this.
        Duration::from_micros(1000)
    } else {
        // Oversubscribed: the peer we wait for probably needs our core; park at once.
        Duration::ZERO
    }
}

/// How a barrier phase waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Fails (and breaks the communicator) on a timeout, a gone rank, or a broken communicator.
    Breakable,
    /// The closing phase of a direct collective, entered only by ranks that are all in the same data
    /// phase: it completes once every rank finished (or cut short) its part, ignoring the broken bit,
    /// because returning earlier would let the caller free buffers a peer still accesses. It is bounded
    /// all the same: on the timeout or a gone rank it breaks the communicator, and ranks in a data phase
    /// check the broken bit between blocks, stop, and arrive. The caller learns the verdict from the stamps.
    /// The one early exit: every rank still missing is a process that exited (it accesses nothing any
    /// more and will never arrive); then the wait fails with [`Error::PeerFailed`] naming it.
    Drain,
}

/// The shared-state view of one rank: barrier, failure reason, liveness.
pub(crate) struct Ctl<'a> {
    pub region: &'a Region,
    pub rank: usize,
    pub n: usize,
    pub timeout: Duration,
    /// Ranks are processes (liveness by pid), not threads.
    pub procs: bool,
}

impl Ctl<'_> {
    fn bar(&self) -> &std::sync::atomic::AtomicU64 {
        self.region.word(off::BAR)
    }

    /// True once the communicator is broken.
    pub fn is_broken(&self) -> bool {
        self.bar().load(Acquire) & BROKEN != 0
    }

    /// Records the first failure (later ones are ignored) and sets the broken bit.
    pub fn break_comm(&self, kind: Kind, rank: usize, msg: &str) {
        self.set_reason(kind, rank, msg);
        self.bar().fetch_or(BROKEN, AcqRel);
        notify(self.region);
    }

    fn set_reason(&self, kind: Kind, rank: usize, msg: &str) {
        let reason = self.region.word(off::REASON);
        if reason.compare_exchange(0, WRITING, AcqRel, Acquire).is_ok() {
            let bytes = msg.as_bytes();
            let len = bytes.len().min(MSG_CAP);
            // SAFETY: the region reserves MSG_CAP bytes at msg_ptr; only the winner of the CAS above writes
            // them, once, and readers read them only after the Release store below publishes them.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.region.msg_ptr(), len) };
            self.region.word(off::MSG_LEN).store(len as u64, Relaxed);
            reason.store(((kind as u64) << 32) | rank as u64, Release);
        }
    }

    /// The recorded failure as this rank's error for `op`.
    pub fn failure(&self, op: &'static str, elapsed: Duration) -> Error {
        let reason = self.region.word(off::REASON);
        let t = Instant::now();
        let mut v = reason.load(Acquire);
        // The breaker sets the bit first and the reason right after (timeouts); wait for it briefly.
        while (v == 0 || v == WRITING) && t.elapsed() < Duration::from_millis(200) {
            std::thread::yield_now();
            v = reason.load(Acquire);
        }
        let (kind, rank, msg) = if v == 0 || v == WRITING {
            (None, 0, String::from("unknown failure"))
        } else {
            let len = (self.region.word(off::MSG_LEN).load(Relaxed) as usize).min(MSG_CAP);
            let mut buf = vec![0u8; len];
            // SAFETY: written before the Release store of `reason` we acquired; never written again.
            unsafe { std::ptr::copy_nonoverlapping(self.region.msg_ptr(), buf.as_mut_ptr(), len) };
            (
                Kind::from_u64(v >> 32),
                (v & COUNT_MASK) as usize,
                String::from_utf8_lossy(&buf).into_owned(),
            )
        };
        match kind {
            Some(Kind::Aborted) => Error::Aborted { op },
            Some(Kind::Gone) => Error::PeerFailed { op, rank, reason: msg },
            Some(Kind::Timeout) if rank == self.rank => Error::Timeout {
                op,
                elapsed,
                detail: Some(msg),
            },
            Some(Kind::Timeout) => Error::Timeout {
                op,
                elapsed,
                detail: Some(format!("rank {rank} gave up: {msg}")),
            },
            Some(Kind::Mismatch) => Error::invalid(op, msg),
            None => Error::PeerFailed { op, rank, reason: msg },
        }
    }

    /// Passes one barrier phase. `phase` is this rank's phase counter (incremented by the caller).
    ///
    /// [`Wait::Breakable`]: fails on a broken communicator, a rank that is gone, or the timeout (then it
    /// breaks the communicator). [`Wait::Drain`]: completes and returns `Ok`, unless the ranks missing are
    /// processes that exited (see its docs).
    pub fn barrier(&self, phase: u64, wait: Wait, op: &'static str) -> Result<(), Error> {
        let breakable = wait == Wait::Breakable;
        let pm = phase & PHASE_MASK;
        self.region.rank_word(self.rank, rec::ARRIVED).store(phase + 1, Release);
        let bar = self.bar();
        let mut w = bar.load(Acquire);
        loop {
            if breakable && w & BROKEN != 0 {
                return Err(self.failure(op, Duration::ZERO));
            }
            debug_assert_eq!(phase_of(w), pm, "rank {} out of phase", self.rank);
            let cnt = (w & COUNT_MASK) + 1;
            let last = cnt as usize == self.n;
            let new = if last {
                (w & BROKEN) | (((pm + 1) & PHASE_MASK) << 32)
            } else {
                w + 1
            };
            match bar.compare_exchange_weak(w, new, AcqRel, Acquire) {
                Ok(_) if last => {
                    notify(self.region);
                    return Ok(());
                }
                Ok(_) => break,
                Err(x) => w = x,
            }
        }
        let mut b = Backoff::new(self.n);
        // Drain: the communicator was broken by this wait (or found broken), so the peers stop early.
        let mut broke = false;
        loop {
            let w = bar.load(Acquire);
            if phase_of(w) != pm {
                return Ok(());
            }
            if breakable && w & BROKEN != 0 {
                return Err(self.failure(op, b.elapsed()));
            }
            let ready = || {
                let w = bar.load(Acquire);
                phase_of(w) != pm || (breakable && w & BROKEN != 0)
            };
            if !b.snooze(self.region, ready) {
                continue;
            }
            let missing = || -> Vec<usize> { (0..self.n).filter(|&j| self.arrived(j) <= phase).collect() };
            if !breakable {
                if self.procs {
                    // `Some` only when every missing rank is gone (stops at the first one alive).
                    let all_gone: Option<Vec<(usize, String)>> = missing()
                        .into_iter()
                        .map(|j| self.gone(j).map(|why| (j, why)))
                        .collect();
                    if let Some((dead, why)) = all_gone.and_then(|g| g.into_iter().next()) {
                        self.break_comm(Kind::Gone, dead, &why);
                        return Err(self.failure(op, b.elapsed()));
                    }
                }
                if broke || w & BROKEN != 0 {
                    broke = true;
                    continue;
                }
                if let Some((dead, why)) = self.find_gone(|j| self.arrived(j) <= phase) {
                    self.break_comm(Kind::Gone, dead, &why);
                    broke = true;
                } else if b.elapsed() >= self.timeout {
                    let msg = format!(
                        "ranks {:?} did not finish their part of {op} within {:?}",
                        missing(),
                        self.timeout
                    );
                    self.break_comm(Kind::Timeout, self.rank, &msg);
                    broke = true;
                }
                continue;
            }
            if let Some((dead, why)) = self.find_gone(|j| self.arrived(j) <= phase) {
                self.break_comm(Kind::Gone, dead, &why);
                continue;
            }
            let elapsed = b.elapsed();
            if elapsed >= self.timeout {
                let msg = match missing().as_slice() {
                    [one] => format!("rank {one} never arrived"),
                    many => format!("ranks {many:?} never arrived"),
                };
                // Give up only if the phase is still incomplete (see the module docs).
                if bar.compare_exchange(w, w | BROKEN, AcqRel, Acquire).is_ok() {
                    self.set_reason(Kind::Timeout, self.rank, &msg);
                    notify(self.region);
                    return Err(Error::Timeout {
                        op,
                        elapsed,
                        detail: Some(msg),
                    });
                }
            }
        }
    }

    fn arrived(&self, j: usize) -> u64 {
        self.region.rank_word(j, rec::ARRIVED).load(Acquire)
    }

    /// A rank among those `pred` selects that is gone (dropped, or its process died), with why.
    pub fn find_gone(&self, pred: impl Fn(usize) -> bool) -> Option<(usize, String)> {
        // Liveness first, then `pred` (e.g. "has not arrived"), read after the gone-mark was acquired: a rank
        // that arrived and then left is not a culprit.
        (0..self.n)
            .filter(|&j| j != self.rank)
            .find_map(|j| self.gone(j).filter(|_| pred(j)).map(|why| (j, why)))
    }

    /// Why rank `j` is gone, if it is.
    pub fn gone(&self, j: usize) -> Option<String> {
        match self.region.rank_word(j, rec::ALIVE).load(Acquire) {
            rec::DROPPED => return Some("the rank was dropped (returned or left early)".into()),
            rec::PANICKED => return Some("the rank panicked".into()),
            _ => {}
        }
        if !self.procs {
            return None;
        }
        let pid = self.region.rank_word(j, rec::PID).load(Acquire);
        let start = self.region.rank_word(j, rec::START).load(Acquire);
        if pid == 0 {
            return None;
        }
        match process_start_time(pid as i32) {
            // `start == 0`: /proc was unreadable at registration; the pid alone must do.
            Some(s) if s == start || start == 0 => None,
            _ => Some(format!("process {pid} exited")),
        }
    }
}

/// The start time (clock ticks since boot) of a live, non-zombie process, or `None`.
pub(crate) fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" || state == "x" {
        return None;
    }
    // After the state (field 3), starttime is field 22: 18 fields further.
    fields.nth(18)?.parse().ok()
}
