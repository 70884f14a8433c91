//! Point-to-point channels: one single-producer single-consumer queue per ordered pair of ranks, two
//! buffers deep, in the shared region.
//!
//! Protocol for channel `src -> dst`: `head` counts chunks published by the sender, `tail` chunks consumed by
//! the receiver; both only grow and each has one writer. The sender may fill buffer `head % 2` when
//! `head - tail < 2` (observed with Acquire, so the receiver's reads of that buffer happened before), writes
//! data and metadata, then publishes with a Release store of `head + 1`. The receiver consumes buffer
//! `tail % 2` when `head > tail` (Acquire, so the data is visible), then releases it with `tail + 1`.
//! Every message is at least one chunk (a zero-length message is one empty chunk) and every chunk carries
//! the message's total size and type, so the receiver detects a mismatched send/recv pair.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use super::region::{chan, Region, LINE};
use super::sync::{notify, Backoff, Ctl, Kind};
use crate::error::{Error, Result};
use crate::types::DataType;

/// One side of a transfer in progress.
pub(crate) struct SendSide {
    pub peer: usize,
    pub data: *const u8,
    pub bytes: usize,
    pub dtype: DataType,
    pub done: usize,
    pub started: bool,
}

/// The receiving side of a transfer in progress.
pub(crate) struct RecvSide {
    pub peer: usize,
    pub data: *mut u8,
    pub bytes: usize,
    pub dtype: DataType,
    pub done: usize,
    pub started: bool,
}

impl SendSide {
    fn finished(&self) -> bool {
        self.started && self.done == self.bytes
    }

    /// True when a chunk could be published now.
    fn can_progress(&self, region: &Region, me: usize) -> bool {
        let c = region.chan(me, self.peer);
        !self.finished() && region.word(c + chan::HEAD).load(Relaxed) - region.word(c + chan::TAIL).load(Acquire) < 2
    }

    /// Publishes as many chunks as there is room for; true if any was published.
    fn progress(&mut self, region: &Region, me: usize) -> bool {
        let c = region.chan(me, self.peer);
        let head_w = region.word(c + chan::HEAD);
        let tail_w = region.word(c + chan::TAIL);
        let mut any = false;
        while !self.finished() {
            let head = head_w.load(Relaxed);
            if head - tail_w.load(Acquire) >= 2 {
                break;
            }
            let i = (head % 2) as usize;
            let n = (self.bytes - self.done).min(region.geo.chan_bytes);
            // SAFETY: buffer `i` is free: the receiver released it (tail acquired above) and only this rank
            // (the channel's single producer) writes it until it publishes `head + 1`. `data` is valid for
            // `bytes` bytes (the caller's send slice, borrowed for the whole transfer).
            unsafe { std::ptr::copy_nonoverlapping(self.data.add(self.done), region.chan_buf(c, i), n) };
            let meta = c + chan::META + i * LINE;
            region.word(meta).store(self.bytes as u64, Relaxed);
            region.word(meta + 8).store(self.dtype.raw() as u64, Relaxed);
            region.word(meta + 16).store(n as u64, Relaxed);
            head_w.store(head + 1, Release);
            notify(region);
            self.done += n;
            self.started = true;
            any = true;
        }
        any
    }
}

impl RecvSide {
    fn finished(&self) -> bool {
        self.started && self.done == self.bytes
    }

    /// True when a chunk is waiting.
    fn can_progress(&self, region: &Region, me: usize) -> bool {
        let c = region.chan(self.peer, me);
        !self.finished() && region.word(c + chan::HEAD).load(Acquire) > region.word(c + chan::TAIL).load(Relaxed)
    }

    /// Consumes available chunks; true if any was consumed. A mismatched message breaks the communicator.
    fn progress(&mut self, ctl: &Ctl<'_>, op: &'static str) -> Result<bool> {
        let region = ctl.region;
        let c = region.chan(self.peer, ctl.rank);
        let head_w = region.word(c + chan::HEAD);
        let tail_w = region.word(c + chan::TAIL);
        let mut any = false;
        while !self.finished() {
            let tail = tail_w.load(Relaxed);
            if head_w.load(Acquire) <= tail {
                break;
            }
            let i = (tail % 2) as usize;
            let meta = c + chan::META + i * LINE;
            let total = region.word(meta).load(Relaxed) as usize;
            let dtype = region.word(meta + 8).load(Relaxed) as i32;
            let n = region.word(meta + 16).load(Relaxed) as usize;
            if total != self.bytes || dtype != self.dtype.raw() || n > self.bytes - self.done {
                let sent = DataType::ALL
                    .iter()
                    .find(|d| d.raw() == dtype)
                    .map_or("?", |d| d.nccl_tests_name());
                let msg = format!(
                    "rank {} sent {} bytes of {} to rank {}, which posted a recv of {} bytes of {}",
                    self.peer,
                    total,
                    sent,
                    ctl.rank,
                    self.bytes,
                    self.dtype.nccl_tests_name()
                );
                ctl.break_comm(Kind::Mismatch, ctl.rank, &msg);
                return Err(Error::invalid(op, msg));
            }
            // SAFETY: the chunk was published with a Release store of head that we acquired; the producer
            // will not touch buffer `i` until we release it below. `data` is valid for `bytes` bytes (the
            // caller's recv slice, exclusively borrowed for the whole transfer) and `done + n <= bytes`.
            unsafe { std::ptr::copy_nonoverlapping(region.chan_buf(c, i), self.data.add(self.done), n) };
            tail_w.store(tail + 1, Release);
            notify(region);
            self.done += n;
            self.started = true;
            any = true;
        }
        Ok(any)
    }
}

/// Drives a send and/or a receive to completion (both at once for `send_recv`, so rings cannot deadlock).
pub(crate) fn run(
    ctl: &Ctl<'_>,
    op: &'static str,
    mut send: Option<SendSide>,
    mut recv: Option<RecvSide>,
) -> Result<()> {
    let mut b = Backoff::new(ctl.n);
    loop {
        let mut progressed = false;
        if let Some(s) = send.as_mut() {
            progressed |= s.progress(ctl.region, ctl.rank);
        }
        if let Some(r) = recv.as_mut() {
            progressed |= r.progress(ctl, op)?;
        }
        let s_done = send.as_ref().is_none_or(|s| s.finished());
        let r_done = recv.as_ref().is_none_or(|r| r.finished());
        if s_done && r_done {
            return Ok(());
        }
        if progressed {
            b = Backoff::new(ctl.n);
            continue;
        }
        if ctl.is_broken() {
            return Err(ctl.failure(op, b.elapsed()));
        }
        let ready = || {
            ctl.is_broken()
                || send.as_ref().is_some_and(|s| s.can_progress(ctl.region, ctl.rank))
                || recv.as_ref().is_some_and(|r| r.can_progress(ctl.region, ctl.rank))
        };
        if b.snooze(ctl.region, ready) {
            let peers = [
                send.as_ref().filter(|s| !s.finished()).map(|s| s.peer),
                recv.as_ref().filter(|r| !r.finished()).map(|r| r.peer),
            ];
            for p in peers.into_iter().flatten() {
                if let Some(reason) = ctl.gone(p) {
                    // Everything the peer published before leaving is visible now (its gone-mark was
                    // acquired after): one more attempt, then fail this call only. The communicator stays
                    // usable for transfers between the remaining ranks; collectives see the gone rank.
                    if let Some(s) = send.as_mut() {
                        s.progress(ctl.region, ctl.rank);
                    }
                    if let Some(r) = recv.as_mut() {
                        r.progress(ctl, op)?;
                    }
                    let stuck = send.as_ref().is_some_and(|s| s.peer == p && !s.finished())
                        || recv.as_ref().is_some_and(|r| r.peer == p && !r.finished());
                    if stuck {
                        return Err(Error::PeerFailed { op, rank: p, reason });
                    }
                }
            }
            let elapsed = b.elapsed();
            if elapsed >= ctl.timeout && !ctl.is_broken() {
                let msg = match (peers[0], peers[1]) {
                    (Some(d), None) => format!("rank {d} did not receive (no matching recv)"),
                    (None, Some(s)) => format!("rank {s} did not send (no matching send)"),
                    (Some(d), Some(s)) => format!("rank {d} did not receive and rank {s} did not send"),
                    (None, None) => "no progress".to_string(),
                };
                ctl.break_comm(Kind::Timeout, ctl.rank, &msg);
                return Err(Error::Timeout {
                    op,
                    elapsed,
                    detail: Some(msg),
                });
            }
        }
    }
}
