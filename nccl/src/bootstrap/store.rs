//! A client of PyTorch's c10d `TCPStore`, and the rendezvous built on it.
//!
//! Under `torchrun` the elastic agent already serves a `TCPStore` on `MASTER_ADDR:MASTER_PORT` and tells its
//! workers so with `TORCHELASTIC_USE_AGENT_STORE=True`: PyTorch's own ranks then connect to it as clients
//! instead of starting a server of their own, and so do ours. The same holds for `--rdzv-backend c10d`
//! across hosts: `MASTER_ADDR` then names the host whose agent serves the store.
//!
//! The wire protocol (as the store's server speaks it; integers little-endian, as on every host PyTorch
//! supports): a query is one byte (`QueryType`), then its arguments; a string or byte vector is a `u64`
//! length and the bytes. A connection starts with `VALIDATE` and the magic number `0x3C85F7CE`. Used here:
//!
//! | query | code | arguments | answer |
//! | --- | --- | --- | --- |
//! | `VALIDATE` | 0 | `u32` magic | none |
//! | `SET` | 1 | key, value | none |
//! | `ADD` | 4 | key, `i64` | `i64` new value |
//! | `CHECK` | 5 | `u64` n, n keys | `u8`: 0 all present, 1 not yet |
//! | `MULTI_GET` | 10 | `u64` n, n keys (all present) | n values |
//! | `PING` | 13 | `u32` nonce | `u32` the same nonce |
//!
//! Keys are the ones a PyTorch worker's `PrefixStore("/worker/attempt_<restart count>", store)` would use
//! (the store itself puts `/` in front of every key), followed by `nccl_rs/`: so our ranks and PyTorch ranks
//! can share one job's store without treading on each other, and a Python rank can read what ours publish.
//!
//! The rendezvous on top keeps [`Rendezvous`](super::Rendezvous)'s semantics: every operation is an
//! all-gather of `[op byte, payload]` under the key `<prefix>/op/<seq>/<rank>`, so every rank sees every
//! other's operation and reports a mismatch by name; waiting polls `CHECK` with back-off until the operation's
//! deadline. The store cannot tell a dead rank from a slow one: a rank that dies is noticed when the deadline
//! passes (torchrun itself stops the other workers when one fails), or at once when it managed to publish its
//! failure under `<prefix>/abort`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::error::{BootstrapError, Peer};

/// The magic number a c10d `TCPStore` server expects in a client's first query.
pub const VALIDATION_MAGIC: u32 = 0x3C85_F7CE;

/// `QueryType` codes of the c10d `TCPStore` protocol (the ones this client sends).
mod query {
    pub const VALIDATE: u8 = 0;
    pub const SET: u8 = 1;
    pub const ADD: u8 = 4;
    pub const CHECK: u8 = 5;
    pub const MULTI_GET: u8 = 10;
    pub const PING: u8 = 13;
}

/// `CheckResponseType::READY`.
const READY: u8 = 0;
/// `CheckResponseType::NOT_READY`.
const NOT_READY: u8 = 1;

/// A connection to a c10d `TCPStore`. Every call has a deadline; answers are bounded by `max_value` bytes
/// before anything is allocated.
#[derive(Debug)]
pub struct StoreClient {
    stream: TcpStream,
    addr: SocketAddr,
    rank: usize,
    max_value: usize,
    /// When the current call started (for the `elapsed` of a timeout).
    call_start: Instant,
}

/// Whether an I/O error means the other side dropped the connection (so a retry may meet a live store).
fn cut_short(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | ConnectionRefused
    )
}

impl StoreClient {
    /// Connects to the store at `addrs` (tried in order), retrying until `deadline`, then validates the
    /// connection and checks it with a ping.
    pub fn connect(
        addrs: &[SocketAddr],
        rank: usize,
        max_value: usize,
        deadline: Instant,
    ) -> Result<StoreClient, BootstrapError> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        let mut attempts = 0u32;
        let mut next_note = start + Duration::from_secs(10);
        loop {
            let mut last = None;
            for addr in addrs {
                attempts += 1;
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                match super::wire::connect(addr, left.min(Duration::from_secs(5))) {
                    Ok(stream) => {
                        let _ = stream.set_nodelay(true);
                        let mut c = StoreClient {
                            stream,
                            addr: *addr,
                            rank,
                            max_value,
                            call_start: Instant::now(),
                        };
                        match c.handshake(deadline) {
                            Ok(()) => return Ok(c),
                            // A store that cuts the connection before answering the ping is not up (yet): the
                            // agent restarting, or a listener shutting down. Retry until the deadline.
                            Err(BootstrapError::PeerFailed { reason, .. }) => {
                                last = Some(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, reason))
                            }
                            Err(BootstrapError::Io { source, .. }) if cut_short(&source) => last = Some(source),
                            // The deadline ran out inside the handshake: reported below as unreachable.
                            Err(BootstrapError::Timeout { .. }) => {
                                last = Some(std::io::Error::new(
                                    std::io::ErrorKind::TimedOut,
                                    format!("{addr} accepted the connection but did not answer the ping in time"),
                                ))
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    Err(e) => last = Some(e),
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(BootstrapError::RootUnreachable {
                    rank,
                    addr: format!(
                        "the TCPStore at {}",
                        addrs.first().map_or(String::new(), |a| a.to_string())
                    ),
                    elapsed: start.elapsed(),
                    attempts,
                    last_error: last,
                });
            }
            if now >= next_note {
                next_note += Duration::from_secs(10);
                tracing::warn!(rank, store = ?addrs, waited = ?start.elapsed(),
                    "bootstrap: the torchrun agent's TCPStore is not reachable yet; retrying");
            }
            std::thread::sleep(backoff.min(deadline - now));
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    fn handshake(&mut self, deadline: Instant) -> Result<(), BootstrapError> {
        let mut q = vec![query::VALIDATE];
        q.extend_from_slice(&VALIDATION_MAGIC.to_le_bytes());
        self.send(&q, deadline, "validating the TCPStore connection")?;
        let nonce = std::process::id() ^ 0x5eed_0001;
        let mut q = vec![query::PING];
        q.extend_from_slice(&nonce.to_le_bytes());
        self.send(&q, deadline, "pinging the TCPStore")?;
        let back = self.read_u32(deadline, "pinging the TCPStore")?;
        if back != nonce {
            return Err(self.protocol(format!("the ping answer {back:#x} is not our nonce {nonce:#x}")));
        }
        Ok(())
    }

    fn peer(&self) -> Peer {
        Peer::Unidentified { addr: Some(self.addr) }
    }

    fn protocol(&self, problem: String) -> BootstrapError {
        BootstrapError::Protocol {
            peer: self.peer(),
            problem: format!("TCPStore: {problem}"),
        }
    }

    fn io(&self, op: &'static str, source: std::io::Error, during: &str, deadline: Instant) -> BootstrapError {
        if matches!(
            source.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) || Instant::now() >= deadline
        {
            return BootstrapError::Timeout {
                rank: self.rank,
                peer: self.peer(),
                during: during.to_string(),
                elapsed: self.call_start.elapsed(),
            };
        }
        BootstrapError::Io {
            op,
            peer: self.peer(),
            source,
        }
    }

    fn arm(&mut self, deadline: Instant, during: &str) -> Result<(), BootstrapError> {
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() {
            return Err(BootstrapError::Timeout {
                rank: self.rank,
                peer: self.peer(),
                during: during.to_string(),
                elapsed: now.saturating_duration_since(self.call_start),
            });
        }
        self.call_start = now;
        let _ = self.stream.set_read_timeout(Some(left));
        let _ = self.stream.set_write_timeout(Some(left));
        Ok(())
    }

    fn send(&mut self, bytes: &[u8], deadline: Instant, during: &str) -> Result<(), BootstrapError> {
        self.arm(deadline, during)?;
        let r = self.stream.write_all(bytes).and_then(|_| self.stream.flush());
        r.map_err(|e| self.io("write", e, during, deadline))
    }

    fn read_exact(&mut self, buf: &mut [u8], deadline: Instant, during: &str) -> Result<(), BootstrapError> {
        self.arm(deadline, during)?;
        let r = self.stream.read_exact(buf);
        r.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                BootstrapError::PeerFailed {
                    peer: self.peer(),
                    during: during.to_string(),
                    reason: "the TCPStore closed the connection (the torchrun agent ended?)".into(),
                }
            } else {
                self.io("read", e, during, deadline)
            }
        })
    }

    fn read_u32(&mut self, deadline: Instant, during: &str) -> Result<u32, BootstrapError> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b, deadline, during)?;
        Ok(u32::from_le_bytes(b))
    }

    fn read_u64(&mut self, deadline: Instant, during: &str) -> Result<u64, BootstrapError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b, deadline, during)?;
        Ok(u64::from_le_bytes(b))
    }

    /// `SET key value`.
    pub fn set(&mut self, key: &str, value: &[u8], deadline: Instant) -> Result<(), BootstrapError> {
        let mut q = Vec::with_capacity(1 + 16 + key.len() + value.len());
        q.push(query::SET);
        put_bytes(&mut q, key.as_bytes());
        put_bytes(&mut q, value);
        self.send(&q, deadline, "TCPStore set")
    }

    /// `ADD key delta`: the counter's new value.
    pub fn add(&mut self, key: &str, delta: i64, deadline: Instant) -> Result<i64, BootstrapError> {
        let mut q = vec![query::ADD];
        put_bytes(&mut q, key.as_bytes());
        q.extend_from_slice(&delta.to_le_bytes());
        self.send(&q, deadline, "TCPStore add")?;
        Ok(self.read_u64(deadline, "TCPStore add")? as i64)
    }

    /// `CHECK keys`: whether every key is present.
    pub fn check(&mut self, keys: &[String], deadline: Instant) -> Result<bool, BootstrapError> {
        let q = keys_query(query::CHECK, keys);
        self.send(&q, deadline, "TCPStore check")?;
        let mut b = [0u8; 1];
        self.read_exact(&mut b, deadline, "TCPStore check")?;
        match b[0] {
            READY => Ok(true),
            NOT_READY => Ok(false),
            other => Err(self.protocol(format!("CHECK answered {other}, expected 0 or 1"))),
        }
    }

    /// `MULTI_GET keys` (every key must be present: check first). At most `max_value` bytes in all.
    pub fn multi_get(&mut self, keys: &[String], deadline: Instant) -> Result<Vec<Vec<u8>>, BootstrapError> {
        let q = keys_query(query::MULTI_GET, keys);
        self.send(&q, deadline, "TCPStore multi_get")?;
        let mut total = 0usize;
        let mut out = Vec::with_capacity(keys.len());
        for _ in keys {
            let len = self.read_u64(deadline, "TCPStore multi_get")?;
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            total = total.saturating_add(len);
            if total > self.max_value {
                return Err(BootstrapError::FrameTooLarge {
                    peer: self.peer(),
                    len: total as u64,
                    max: self.max_value,
                });
            }
            let mut v = vec![0u8; len];
            self.read_exact(&mut v, deadline, "TCPStore multi_get")?;
            out.push(v);
        }
        Ok(out)
    }

    /// Polls `CHECK keys` until all are present or `deadline` passes; between polls, also checks `abort_key`
    /// and returns its value if some rank published a failure there (unless every key is there by then).
    pub fn wait(
        &mut self,
        keys: &[String],
        abort_key: &str,
        deadline: Instant,
        during: &str,
        missing: impl FnMut(&mut StoreClient) -> String,
    ) -> Result<(), BootstrapError> {
        self.wait_or_cancel(keys, abort_key, deadline, during, None, missing)
    }

    /// [`wait`](Self::wait) that also ends, with [`BootstrapError::Cancelled`], once `cancel` is cancelled
    /// (checked between polls).
    pub fn wait_or_cancel(
        &mut self,
        keys: &[String],
        abort_key: &str,
        deadline: Instant,
        during: &str,
        cancel: Option<&super::rendezvous::CancelToken>,
        mut missing: impl FnMut(&mut StoreClient) -> String,
    ) -> Result<(), BootstrapError> {
        let start = Instant::now();
        let mut pause = Duration::from_micros(200);
        let mut next_note = start + Duration::from_secs(10);
        let abort = [abort_key.to_string()];
        loop {
            if self.check(keys, deadline)? {
                return Ok(());
            }
            if self.check(&abort, deadline)? {
                // The abort may have come after the last key (a peer that saw every rank's operation and
                // failed on it, e.g. a mismatch): then this rank can see the same, and its own error says
                // more than the peer's abort. CI met that window between the two checks.
                if self.check(keys, deadline)? {
                    return Ok(());
                }
                let why = self.multi_get(&abort, deadline)?.pop().unwrap_or_default();
                return Err(BootstrapError::Aborted {
                    during: during.to_string(),
                    reason: String::from_utf8_lossy(&why).into_owned(),
                });
            }
            if cancel.is_some_and(|c| c.is_cancelled()) {
                return Err(BootstrapError::Cancelled {
                    rank: self.rank,
                    elapsed: start.elapsed(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                let who = missing(self);
                return Err(BootstrapError::Timeout {
                    rank: self.rank,
                    peer: self.peer(),
                    during: format!("{during}; still missing: {who}"),
                    elapsed: start.elapsed(),
                });
            }
            if now >= next_note {
                next_note += Duration::from_secs(10);
                let who = missing(self);
                tracing::warn!(rank = self.rank, waited = ?start.elapsed(), "bootstrap: {during}: still waiting for {who}");
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

fn put_bytes(q: &mut Vec<u8>, b: &[u8]) {
    q.extend_from_slice(&(b.len() as u64).to_le_bytes());
    q.extend_from_slice(b);
}

fn keys_query(code: u8, keys: &[String]) -> Vec<u8> {
    let mut q = vec![code];
    q.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    for k in keys {
        put_bytes(&mut q, k.as_bytes());
    }
    q
}

/// The key prefix of one torchrun attempt: what `PrefixStore("/worker/attempt_<n>")` over a `TCPStore` (which
/// adds a leading `/`) would use, then our own namespace.
pub fn torchrun_prefix(restart_count: &str) -> String {
    format!("//worker/attempt_{restart_count}/nccl_rs")
}
