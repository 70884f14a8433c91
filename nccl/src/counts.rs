//! NCCL's count rules as pure functions, shared by every backend.
//!
//! Each collective takes one `count` argument in C, but what it means differs per operation (see
//! `DESIGN.md` §2 and NCCL's documentation):
//!
//! | op | count is | send holds | recv holds |
//! |---|---|---|---|
//! | all_reduce | elements per rank | `count` | `count` |
//! | broadcast | elements | `count` (root only) | `count` |
//! | reduce | elements | `count` | `count` (root only) |
//! | all_gather | elements sent per rank | `count` | `nranks * count` |
//! | reduce_scatter | elements received per rank | `nranks * count` | `count` |
//! | all_to_all | elements per peer | `nranks * count` | `nranks * count` |
//! | gather | elements sent per rank | `count` | `nranks * count` (root only) |
//! | scatter | elements received per rank | `nranks * count` (root only) | `count` |
//! | send / recv | elements | `count` | `count` |
//!
//! In place, a single buffer serves both sides: all_gather's buffer holds `nranks * count` with this rank's
//! contribution at `rank * count`; reduce_scatter's holds `nranks * count` and the result lands at
//! `rank * count`.
//!
//! These functions check lengths (exact equality: a larger buffer is almost always a bug, and a slice or
//! view of the right length is one call away) and ranks before any C call, and return the `count` to pass.

use crate::error::{Error, Result};

/// The collectives whose counts are checked here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// `ncclAllReduce`.
    AllReduce,
    /// `ncclBroadcast`.
    Broadcast,
    /// `ncclReduce`.
    Reduce,
    /// `ncclAllGather`.
    AllGather,
    /// `ncclReduceScatter`.
    ReduceScatter,
    /// `ncclAlltoAll`.
    AllToAll,
    /// `ncclGather`.
    Gather,
    /// `ncclScatter`.
    Scatter,
    /// `ncclSend`.
    Send,
    /// `ncclRecv`.
    Recv,
}

impl Op {
    /// The snake_case name used in errors, `nccl-perf` and the API (`"all_reduce"`).
    pub const fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::Broadcast => "broadcast",
            Op::Reduce => "reduce",
            Op::AllGather => "all_gather",
            Op::ReduceScatter => "reduce_scatter",
            Op::AllToAll => "all_to_all",
            Op::Gather => "gather",
            Op::Scatter => "scatter",
            Op::Send => "send",
            Op::Recv => "recv",
        }
    }

    /// True when the operation has a root rank.
    pub const fn has_root(self) -> bool {
        matches!(self, Op::Broadcast | Op::Reduce | Op::Gather | Op::Scatter)
    }
}

/// Checks that `value` names a rank of a communicator of `size` ranks.
pub fn check_rank(op: &'static str, what: &'static str, value: usize, size: usize) -> Result<()> {
    if value < size {
        Ok(())
    } else {
        Err(Error::InvalidRank { op, what, value, size })
    }
}

fn expect_len(op: &'static str, what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            op,
            what,
            expected,
            actual,
        })
    }
}

/// `count * nranks`, or an error instead of an overflow (which would wrap in release builds and accept a
/// too-short buffer).
fn times(op: &'static str, count: usize, nranks: usize) -> Result<usize> {
    count.checked_mul(nranks).ok_or_else(|| {
        Error::invalid(
            op,
            format!("{count} elements per rank times {nranks} ranks overflows usize"),
        )
    })
}

fn divisible(op: &'static str, what: &'static str, len: usize, nranks: usize) -> Result<usize> {
    if len % nranks == 0 {
        Ok(len / nranks)
    } else {
        Err(Error::LengthMismatch {
            op,
            what,
            expected: (len / nranks).saturating_add(1).saturating_mul(nranks),
            actual: len,
        })
    }
}

/// The lengths of one rank's buffers for an out-of-place call.
///
/// `send` / `recv` are `None` where the rank passes no buffer (a non-root rank's recv in reduce and gather,
/// a non-root rank's send in broadcast and scatter, recv of `send`, send of `recv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lens {
    /// Elements in the send buffer, if one is given.
    pub send: Option<usize>,
    /// Elements in the receive buffer, if one is given.
    pub recv: Option<usize>,
}

/// Validates an out-of-place call and returns the `count` argument NCCL takes.
///
/// `root` is the root for rooted ops and the peer for send/recv; it is ignored otherwise. Buffers that the
/// rank must pass are required (`InvalidArgument` when missing); buffers NCCL ignores on this rank may be
/// passed or not and are then not checked.
pub fn check(op: Op, nranks: usize, rank: usize, root: usize, lens: Lens) -> Result<usize> {
    let name = op.name();
    if nranks == 0 {
        return Err(Error::invalid(name, "communicator has no ranks"));
    }
    check_rank(name, "rank", rank, nranks)?;
    match op {
        Op::Broadcast | Op::Reduce | Op::Gather | Op::Scatter => check_rank(name, "root", root, nranks)?,
        Op::Send | Op::Recv => check_rank(name, "peer", root, nranks)?,
        _ => {}
    }
    let need = |b: Option<usize>, what: &'static str| {
        b.ok_or_else(|| Error::invalid(name, format!("{what} is required on this rank")))
    };
    let is_root = rank == root;
    match op {
        Op::AllReduce => {
            let s = need(lens.send, "send buffer")?;
            expect_len(name, "recv buffer", s, need(lens.recv, "recv buffer")?)?;
            Ok(s)
        }
        Op::Broadcast => {
            let r = need(lens.recv, "recv buffer")?;
            if is_root {
                expect_len(name, "send buffer (root)", r, need(lens.send, "send buffer")?)?;
            }
            Ok(r)
        }
        Op::Reduce => {
            let s = need(lens.send, "send buffer")?;
            if is_root {
                expect_len(name, "recv buffer (root)", s, need(lens.recv, "recv buffer")?)?;
            }
            Ok(s)
        }
        Op::AllGather => {
            let s = need(lens.send, "send buffer")?;
            expect_len(
                name,
                "recv buffer",
                times(name, s, nranks)?,
                need(lens.recv, "recv buffer")?,
            )?;
            Ok(s)
        }
        Op::ReduceScatter => {
            let r = need(lens.recv, "recv buffer")?;
            expect_len(
                name,
                "send buffer",
                times(name, r, nranks)?,
                need(lens.send, "send buffer")?,
            )?;
            Ok(r)
        }
        Op::AllToAll => {
            let s = need(lens.send, "send buffer")?;
            let count = divisible(name, "send buffer", s, nranks)?;
            expect_len(name, "recv buffer", s, need(lens.recv, "recv buffer")?)?;
            Ok(count)
        }
        Op::Gather => {
            let s = need(lens.send, "send buffer")?;
            if is_root {
                expect_len(
                    name,
                    "recv buffer (root)",
                    times(name, s, nranks)?,
                    need(lens.recv, "recv buffer")?,
                )?;
            }
            Ok(s)
        }
        Op::Scatter => {
            let r = need(lens.recv, "recv buffer")?;
            if is_root {
                expect_len(
                    name,
                    "send buffer (root)",
                    times(name, r, nranks)?,
                    need(lens.send, "send buffer")?,
                )?;
            }
            Ok(r)
        }
        Op::Send => need(lens.send, "send buffer"),
        Op::Recv => need(lens.recv, "recv buffer"),
    }
}

/// Validates an in-place call on one buffer of `len` elements and returns the `count` argument NCCL takes.
///
/// In place, all_gather and reduce_scatter need `len` divisible by `nranks` (count = `len / nranks`);
/// all_to_all, gather, scatter, send and recv have no in-place form here and are rejected.
pub fn check_in_place(op: Op, nranks: usize, rank: usize, root: usize, len: usize) -> Result<usize> {
    let name = op.name();
    if nranks == 0 {
        return Err(Error::invalid(name, "communicator has no ranks"));
    }
    check_rank(name, "rank", rank, nranks)?;
    if op.has_root() {
        check_rank(name, "root", root, nranks)?;
    }
    match op {
        Op::AllReduce | Op::Broadcast | Op::Reduce => Ok(len),
        Op::AllGather | Op::ReduceScatter => divisible(name, "buffer", len, nranks),
        _ => Err(Error::invalid(name, "has no in-place form")),
    }
}

/// The element offset of this rank's own part inside an in-place all_gather / reduce_scatter buffer
/// (`rank * count`), the pointer relation NCCL uses to detect in-place calls.
pub const fn in_place_offset(rank: usize, count: usize) -> usize {
    rank * count
}
