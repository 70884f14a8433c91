//! [`BootstrapError`]: everything that can go wrong while ranks find each other.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use super::env::Launcher;

/// Who is on the other end of a bootstrap connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Peer {
    /// A rank whose number is known (e.g. rank 0 seen from a worker, or a worker after its hello).
    Rank {
        /// The rank.
        rank: usize,
        /// Its socket address, when known.
        addr: Option<SocketAddr>,
    },
    /// A connection that has not (validly) said which rank it is.
    Unidentified {
        /// Its socket address, when known.
        addr: Option<SocketAddr>,
    },
}

impl Peer {
    /// The rank of the peer, if it is known.
    pub fn rank(&self) -> Option<usize> {
        match self {
            Peer::Rank { rank, .. } => Some(*rank),
            Peer::Unidentified { .. } => None,
        }
    }

    /// The socket address of the peer, if it is known.
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            Peer::Rank { addr, .. } | Peer::Unidentified { addr } => *addr,
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Rank { rank, addr: Some(a) } => write!(f, "rank {rank} ({a})"),
            Peer::Rank { rank, addr: None } => write!(f, "rank {rank}"),
            Peer::Unidentified { addr: Some(a) } => write!(f, "connection from {a}"),
            Peer::Unidentified { addr: None } => write!(f, "unidentified connection"),
        }
    }
}

/// Why rank 0 turned a connecting rank away (sent on the wire as one byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectReason {
    /// The shared token did not match (or only one side had one).
    Token,
    /// Another connection already claimed this rank.
    DuplicateRank,
    /// The claimed rank is not below the world size.
    RankOutOfRange,
    /// The connecting rank believes in a different world size.
    WorldSizeMismatch,
    /// The peer speaks another protocol version.
    Version,
    /// The peer sent something that is not a valid hello.
    Malformed,
    /// Rank 0 has too many handshakes in progress; retry later.
    Busy,
    /// A reason code this version does not know.
    Other(u8),
}

impl RejectReason {
    pub(crate) fn code(self) -> u8 {
        match self {
            RejectReason::Token => 1,
            RejectReason::DuplicateRank => 2,
            RejectReason::RankOutOfRange => 3,
            RejectReason::WorldSizeMismatch => 4,
            RejectReason::Version => 5,
            RejectReason::Malformed => 6,
            RejectReason::Busy => 7,
            RejectReason::Other(c) => c,
        }
    }

    pub(crate) fn from_code(code: u8) -> Self {
        match code {
            1 => RejectReason::Token,
            2 => RejectReason::DuplicateRank,
            3 => RejectReason::RankOutOfRange,
            4 => RejectReason::WorldSizeMismatch,
            5 => RejectReason::Version,
            6 => RejectReason::Malformed,
            7 => RejectReason::Busy,
            c => RejectReason::Other(c),
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::Token => f.write_str("token mismatch"),
            RejectReason::DuplicateRank => f.write_str("duplicate rank"),
            RejectReason::RankOutOfRange => f.write_str("rank out of range"),
            RejectReason::WorldSizeMismatch => f.write_str("world size mismatch"),
            RejectReason::Version => f.write_str("protocol version mismatch"),
            RejectReason::Malformed => f.write_str("malformed hello"),
            RejectReason::Busy => f.write_str("rank 0 is busy"),
            RejectReason::Other(c) => write!(f, "reason code {c}"),
        }
    }
}

/// A bootstrap failure: rank discovery from the environment, the TCP rendezvous, local launching or
/// in-process rank threads. Every variant names the variable, rank or peer that was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootstrapError {
    /// A variable the detected launcher must set is missing.
    #[error("{var} is not set ({launcher} launch: {context})")]
    MissingVar {
        /// The variable, e.g. `"WORLD_SIZE"`.
        var: &'static str,
        /// The launcher whose variables were found.
        launcher: Launcher,
        /// Why it is needed, e.g. `"RANK is set"`.
        context: String,
    },
    /// A variable has a value that cannot be used.
    #[error("{var}={value:?} is invalid: {reason}")]
    InvalidVar {
        /// The variable, e.g. `"MASTER_PORT"`.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The address of rank 0 could not be resolved.
    #[error("cannot resolve the address of rank 0 {addr:?} (port {port}): {source}")]
    Resolve {
        /// The host name or address.
        addr: String,
        /// The port.
        port: u16,
        /// What the resolver said.
        #[source]
        source: std::io::Error,
    },
    /// Rank 0 cannot listen because the port is taken.
    #[error(
        "rank 0 cannot listen on {addr}: the port is already in use (another job or a previous run?); \
             choose another MASTER_PORT"
    )]
    PortInUse {
        /// The address rank 0 tried to bind.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Rank 0 cannot listen for another reason.
    #[error("rank 0 cannot listen on {addr}: {source}")]
    Bind {
        /// The address rank 0 tried to bind.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// This rank could not reach rank 0 before the deadline.
    #[error("rank {rank} could not reach rank 0 at {addr} within {elapsed:?} ({attempts} attempts){}",
            last_error.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default())]
    RootUnreachable {
        /// This rank.
        rank: usize,
        /// Where rank 0 was expected (`host:port`).
        addr: String,
        /// How long this rank tried.
        elapsed: Duration,
        /// How many connection attempts were made.
        attempts: u32,
        /// The error of the last attempt.
        last_error: Option<std::io::Error>,
    },
    /// Rank 0 gave up waiting for some ranks.
    #[error("ranks {missing:?} of {world_size} never arrived within {elapsed:?}{}", rejected_suffix(.rejected))]
    RanksMissing {
        /// The ranks that did not complete their handshake.
        missing: Vec<usize>,
        /// The world size.
        world_size: usize,
        /// How long rank 0 waited.
        elapsed: Duration,
        /// Connections rank 0 turned away meanwhile (at most a few are kept), which often explain why.
        rejected: Vec<BootstrapError>,
    },
    /// Waiting for a peer took longer than the deadline.
    #[error("rank {rank} timed out after {elapsed:?} waiting for {peer} ({during})")]
    Timeout {
        /// This rank.
        rank: usize,
        /// The peer that did not answer.
        peer: Peer,
        /// What was going on, e.g. `"all_gather #3"`.
        during: String,
        /// How long this rank waited.
        elapsed: Duration,
    },
    /// A peer failed (closed its connection, crashed, or was reported failed by rank 0).
    #[error("{peer} failed during {during}: {reason}")]
    PeerFailed {
        /// The rank that failed.
        peer: Peer,
        /// What was going on, e.g. `"barrier #2"`.
        during: String,
        /// What is known about the failure.
        reason: String,
    },
    /// Rank 0 aborted the rendezvous for a reason not tied to one rank.
    #[error("rank 0 aborted the rendezvous during {during}: {reason}")]
    Aborted {
        /// What was going on.
        during: String,
        /// The reason rank 0 gave.
        reason: String,
    },
    /// Rank 0 turned this rank away.
    #[error("rank 0 rejected rank {rank}: {reason}: {message}")]
    Rejected {
        /// This rank.
        rank: usize,
        /// The reason code.
        reason: RejectReason,
        /// Rank 0's explanation.
        message: String,
    },
    /// The shared token did not match, or only one side has one.
    #[error("{peer}: token mismatch: {detail}")]
    TokenMismatch {
        /// The peer that failed to authenticate.
        peer: Peer,
        /// Which side lacked the token or failed to prove it.
        detail: String,
    },
    /// Two connections claimed the same rank.
    #[error("rank {rank} claimed twice: first by {first}, again by {second}")]
    DuplicateRank {
        /// The rank claimed twice.
        rank: usize,
        /// The connection that claimed it first (and keeps it).
        first: Peer,
        /// The connection that was turned away.
        second: Peer,
    },
    /// A connection claimed a rank not below the world size.
    #[error("{peer} claimed rank {rank}, but the world size is {world_size}")]
    RankOutOfRange {
        /// The connection.
        peer: Peer,
        /// The rank it claimed.
        rank: u64,
        /// The world size.
        world_size: usize,
    },
    /// A connecting rank believes in a different world size than rank 0.
    #[error("{peer} has world size {theirs}, but rank 0 has {ours}")]
    WorldSizeMismatch {
        /// The connection.
        peer: Peer,
        /// Its world size.
        theirs: u64,
        /// Rank 0's world size.
        ours: usize,
    },
    /// The bytes received do not start with the protocol's magic (not an nccl-rs bootstrap peer).
    #[error("{peer} sent bytes that are not an nccl-rs bootstrap frame (magic {found:02x?})")]
    BadMagic {
        /// The peer.
        peer: Peer,
        /// The first four bytes received.
        found: [u8; 4],
    },
    /// The peer speaks another protocol version.
    #[error("{peer} speaks bootstrap protocol version {theirs}, this build speaks {ours}")]
    VersionMismatch {
        /// The peer.
        peer: Peer,
        /// Its version.
        theirs: u16,
        /// Ours.
        ours: u16,
    },
    /// A frame header claims more bytes than allowed; rejected before allocating.
    #[error("{peer} sent a frame of {len} bytes, above the limit of {max} bytes")]
    FrameTooLarge {
        /// The peer.
        peer: Peer,
        /// The length claimed by the frame header.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The connection closed in the middle of a frame.
    #[error("{peer} closed the connection in the middle of a frame ({got} of {expected} bytes of the {part})")]
    Truncated {
        /// The peer.
        peer: Peer,
        /// `"header"` or `"payload"`.
        part: &'static str,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// A well-formed frame arrived where another kind was expected, or its contents are inconsistent.
    #[error("protocol error from {peer}: {problem}")]
    Protocol {
        /// The peer.
        peer: Peer,
        /// What was wrong.
        problem: String,
    },
    /// Ranks called different bootstrap operations at the same point (every rank must call the same ones in the
    /// same order).
    #[error("{peer} called {theirs}, but rank {rank} called {ours}")]
    OpMismatch {
        /// This rank.
        rank: usize,
        /// The peer.
        peer: Peer,
        /// The peer's operation, e.g. `"barrier #4"`.
        theirs: String,
        /// This rank's operation.
        ours: String,
    },
    /// A message is larger than the frame limit allows.
    #[error("{op}: {len} bytes exceed the bootstrap frame limit of {max} bytes")]
    MessageTooLarge {
        /// The operation.
        op: &'static str,
        /// The message size.
        len: usize,
        /// The limit ([`RendezvousOptions::max_frame`](super::RendezvousOptions::max_frame)).
        max: usize,
    },
    /// A socket operation failed.
    #[error("{op} with {peer}: {source}")]
    Io {
        /// The operation, e.g. `"write"`.
        op: &'static str,
        /// The peer.
        peer: Peer,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The rendezvous already failed; it cannot be used again.
    #[error("the rendezvous failed earlier and cannot be used: {0}")]
    Poisoned(String),
    /// A rank thread of [`run_threads`](super::run_threads) panicked.
    #[error("rank {rank} panicked: {message}")]
    RankPanicked {
        /// The rank whose thread panicked.
        rank: usize,
        /// The panic message.
        message: String,
    },
    /// A local worker process could not be started or waited for.
    #[error("local worker rank {rank}: {what}: {source}")]
    Spawn {
        /// The worker's rank.
        rank: usize,
        /// What failed, e.g. `"spawning the worker process"`.
        what: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The rendezvous was broken through its [`CancelToken`](super::rendezvous::CancelToken) before every
    /// rank had joined.
    #[error("rank {rank}: the rendezvous was cancelled after {elapsed:?}, before every rank had joined")]
    Cancelled {
        /// The rank whose rendezvous was cancelled.
        rank: usize,
        /// How long it had waited.
        elapsed: Duration,
    },
    /// An argument passed to a bootstrap function is unusable.
    #[error("{what}: {reason}")]
    InvalidArgument {
        /// The argument, e.g. `"nprocs"`.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn rejected_suffix(rejected: &[BootstrapError]) -> String {
    match rejected.first() {
        None => String::new(),
        Some(first) if rejected.len() == 1 => format!("; 1 connection was rejected: {first}"),
        Some(first) => format!("; {} connections were rejected, the first: {first}", rejected.len()),
    }
}

impl BootstrapError {
    /// The rank this error blames, if any (the peer that failed, was missing, duplicated or out of range).
    pub fn blamed_rank(&self) -> Option<usize> {
        match self {
            BootstrapError::PeerFailed { peer, .. }
            | BootstrapError::Timeout { peer, .. }
            | BootstrapError::OpMismatch { peer, .. }
            | BootstrapError::TokenMismatch { peer, .. }
            | BootstrapError::BadMagic { peer, .. }
            | BootstrapError::VersionMismatch { peer, .. }
            | BootstrapError::FrameTooLarge { peer, .. }
            | BootstrapError::Truncated { peer, .. }
            | BootstrapError::Protocol { peer, .. }
            | BootstrapError::Io { peer, .. } => peer.rank(),
            BootstrapError::RanksMissing { missing, .. } => missing.first().copied(),
            BootstrapError::DuplicateRank { rank, .. } | BootstrapError::RankPanicked { rank, .. } => Some(*rank),
            BootstrapError::RankOutOfRange { rank, .. } => usize::try_from(*rank).ok(),
            BootstrapError::RootUnreachable { .. } => Some(0),
            _ => None,
        }
    }
}
