//! The nine benchmarked operations: their names, buffer sizes and bandwidth formulas, as in nccl-tests.

use std::fmt;

/// An operation `nccl-perf` can benchmark (one nccl-tests binary each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CollOp {
    /// `all_reduce_perf`.
    AllReduce,
    /// `all_gather_perf`.
    AllGather,
    /// `broadcast_perf`.
    Broadcast,
    /// `reduce_perf`.
    Reduce,
    /// `reduce_scatter_perf`.
    ReduceScatter,
    /// `alltoall_perf`.
    AllToAll,
    /// `gather_perf`.
    Gather,
    /// `scatter_perf`.
    Scatter,
    /// `sendrecv_perf`: every rank sends to `rank + 1` and receives from `rank - 1` (a ring).
    SendRecv,
}

impl CollOp {
    /// Every operation, in the order of the usage text.
    pub const ALL: [CollOp; 9] = [
        CollOp::AllReduce,
        CollOp::AllGather,
        CollOp::Broadcast,
        CollOp::Reduce,
        CollOp::ReduceScatter,
        CollOp::AllToAll,
        CollOp::Gather,
        CollOp::Scatter,
        CollOp::SendRecv,
    ];

    /// The short name accepted on the command line (`all_reduce`).
    pub const fn name(self) -> &'static str {
        match self {
            CollOp::AllReduce => "all_reduce",
            CollOp::AllGather => "all_gather",
            CollOp::Broadcast => "broadcast",
            CollOp::Reduce => "reduce",
            CollOp::ReduceScatter => "reduce_scatter",
            CollOp::AllToAll => "alltoall",
            CollOp::Gather => "gather",
            CollOp::Scatter => "scatter",
            CollOp::SendRecv => "sendrecv",
        }
    }

    /// The nccl-tests binary name (`all_reduce_perf`), printed in the `Collective test starting` line.
    pub fn program_name(self) -> String {
        format!("{}_perf", self.name())
    }

    /// Parses `all_reduce`, `all_reduce_perf`, `allreduce` (any case; `-` and `_` alike).
    pub fn parse(text: &str) -> Option<CollOp> {
        let t = text.trim().to_ascii_lowercase().replace('-', "_");
        let t = t.strip_suffix("_perf").unwrap_or(&t);
        let squashed = t.replace('_', "");
        CollOp::ALL
            .into_iter()
            .find(|op| op.name().replace('_', "") == squashed)
    }

    /// True for reductions (the `-o` flag applies); other operations print redop `none`.
    pub const fn is_reduction(self) -> bool {
        matches!(self, CollOp::AllReduce | CollOp::Reduce | CollOp::ReduceScatter)
    }

    /// True when the operation has a root (the `-r` flag applies); other operations print root `-1`.
    pub const fn has_root(self) -> bool {
        matches!(
            self,
            CollOp::Broadcast | CollOp::Reduce | CollOp::Gather | CollOp::Scatter
        )
    }

    /// True when the [`Collectives`](nccl::Collectives) trait has an in-place form, so the in-place columns
    /// are measured; for the others they print `N/A`.
    pub const fn has_in_place(self) -> bool {
        matches!(
            self,
            CollOp::AllReduce | CollOp::AllGather | CollOp::Broadcast | CollOp::Reduce | CollOp::ReduceScatter
        )
    }

    /// Element counts of one call for a requested size of `count` elements of `elt_size` bytes on `nranks`
    /// ranks, following nccl-tests' `*GetCollByteCount`: per-rank blocks are rounded down to a multiple of
    /// 16 bytes.
    pub fn counts(self, count: usize, elt_size: usize, nranks: usize) -> Counts {
        let mask = !(16 / elt_size.clamp(1, 16) - 1);
        let per_rank = (count / nranks.max(1)) & mask;
        match self {
            CollOp::AllReduce | CollOp::Broadcast | CollOp::Reduce | CollOp::SendRecv => Counts {
                send: count,
                recv: count,
                param: count,
            },
            CollOp::AllGather | CollOp::Gather => Counts {
                send: per_rank,
                recv: per_rank * nranks,
                param: per_rank,
            },
            CollOp::ReduceScatter | CollOp::Scatter => Counts {
                send: per_rank * nranks,
                recv: per_rank,
                param: per_rank,
            },
            CollOp::AllToAll => Counts {
                send: per_rank * nranks,
                recv: per_rank * nranks,
                param: per_rank,
            },
        }
    }

    /// The bus-bandwidth factor for `nranks` ranks: busbw = algbw × factor.
    pub fn bus_factor(self, nranks: usize) -> f64 {
        let n = nranks as f64;
        match self {
            CollOp::AllReduce => 2.0 * (n - 1.0) / n,
            CollOp::AllGather | CollOp::ReduceScatter | CollOp::AllToAll | CollOp::Gather | CollOp::Scatter => {
                (n - 1.0) / n
            }
            CollOp::Broadcast | CollOp::Reduce | CollOp::SendRecv => 1.0,
        }
    }

    /// Algorithm and bus bandwidth in GB/s (10^9 bytes per second) for a call with `param` count (the
    /// `count` column) of `elt_size`-byte elements taking `sec` seconds.
    pub fn bandwidth(self, param: usize, elt_size: usize, sec: f64, nranks: usize) -> (f64, f64) {
        let bytes = match self {
            CollOp::AllReduce | CollOp::Broadcast | CollOp::Reduce | CollOp::SendRecv => param * elt_size,
            _ => param * elt_size * nranks,
        };
        let alg = bytes as f64 / 1.0e9 / sec;
        (alg, alg * self.bus_factor(nranks))
    }
}

impl fmt::Display for CollOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The element counts of one call (see [`CollOp::counts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    /// Elements in each rank's send buffer.
    pub send: usize,
    /// Elements in each rank's receive buffer.
    pub recv: usize,
    /// The `count` argument of the call (per rank for the gathering and scattering operations).
    pub param: usize,
}

impl Counts {
    /// The `size` column: the larger of the send and receive buffers, in bytes.
    pub fn size_bytes(&self, elt_size: usize) -> usize {
        self.send.max(self.recv) * elt_size
    }
}
