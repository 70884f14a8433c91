//! The rendezvous wire protocol: framing, deadlines and the token proof.
//!
//! Every frame is a 12-byte header followed by `len` payload bytes:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | magic `b"NCRS"` |
//! | 4..6 | protocol [`VERSION`], little-endian `u16` |
//! | 6 | [`Kind`] |
//! | 7 | reserved, 0 |
//! | 8..12 | payload length, little-endian `u32` |
//!
//! The length is checked against a limit *before* anything is allocated, and the payload is read
//! incrementally, so a header claiming 4 GiB costs nothing. All integers are little-endian; ranks and sizes
//! are `u64`.
//!
//! Handshake (rank 0 = server): on accept, rank 0 sends `Challenge { nonce_s[32], auth u8, world_size u64 }`;
//! the connecting rank answers `Hello { rank u64, world_size u64, nonce_c[32], has_mac u8, mac[32] }` where
//! `mac = HMAC-SHA256(token, "hello" ‖ nonce_s ‖ rank ‖ world_size ‖ nonce_c)`; once every rank has arrived,
//! rank 0 sends each `Welcome { has_mac u8, mac[32] }` with `mac = HMAC-SHA256(token, "welcome" ‖ nonce_c ‖
//! nonce_s)`, proving that it knows the token too; or `Reject { reason u8, message utf8 }` at any time. The
//! token itself never crosses the wire, and a recorded exchange cannot be replayed (fresh nonces on both sides).
//! Afterwards: `Data { seq u64, op u8, payload }` frames, and `Abort { failed_rank u64 (u64::MAX: none),
//! reason utf8 }` from rank 0 when the rendezvous fails.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::error::{BootstrapError, Peer};

/// The frame magic.
pub const MAGIC: [u8; 4] = *b"NCRS";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// The header length in bytes.
pub const HEADER_LEN: usize = 12;
/// The largest handshake frame accepted (hellos are tiny; junk cannot make rank 0 allocate).
pub const HANDSHAKE_MAX: usize = 1024;
/// Nonce length.
pub const NONCE_LEN: usize = 32;
/// MAC length (HMAC-SHA256).
pub const MAC_LEN: usize = 32;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Rank 0's greeting, with its nonce.
    Challenge = 1,
    /// A rank introducing itself.
    Hello = 2,
    /// Rank 0 accepts a rank (sent once all ranks have arrived).
    Welcome = 3,
    /// Rank 0 turns a rank away.
    Reject = 4,
    /// A collective's payload.
    Data = 5,
    /// Rank 0 reports that the rendezvous failed.
    Abort = 6,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Challenge,
            2 => Kind::Hello,
            3 => Kind::Welcome,
            4 => Kind::Reject,
            5 => Kind::Data,
            6 => Kind::Abort,
            _ => return None,
        })
    }
}

/// Encodes a frame header.
pub fn header(kind: Kind, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[6] = kind as u8;
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h
}

/// Checks a received header: magic, version, kind and length (against `max`), before any allocation.
pub fn parse_header(h: &[u8; HEADER_LEN], peer: Peer, max: usize) -> Result<(Kind, usize), BootstrapError> {
    let mut magic = [0u8; 4];
    magic.copy_from_slice(&h[..4]);
    if magic != MAGIC {
        return Err(BootstrapError::BadMagic { peer, found: magic });
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(BootstrapError::VersionMismatch {
            peer,
            theirs: version,
            ours: VERSION,
        });
    }
    let kind = Kind::from_u8(h[6]).ok_or_else(|| BootstrapError::Protocol {
        peer,
        problem: format!("unknown frame kind {}", h[6]),
    })?;
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if len as usize > max {
        return Err(BootstrapError::FrameTooLarge {
            peer,
            len: u64::from(len),
            max,
        });
    }
    Ok((kind, len as usize))
}

/// What a blocking socket call is part of, for deadlines and error messages.
#[derive(Debug, Clone)]
pub(crate) struct Ctx<'a> {
    /// This rank.
    pub rank: usize,
    /// The other end.
    pub peer: Peer,
    /// E.g. `"handshake"`, `"all_gather #3"`.
    pub during: &'a str,
    /// When the operation started (for the reported elapsed time).
    pub start: Instant,
    /// When to give up.
    pub deadline: Instant,
}

impl Ctx<'_> {
    fn remaining(&self) -> Option<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        // A zero timeout means "block forever" to the socket API; use a tiny one instead.
        (!left.is_zero()).then_some(left.max(Duration::from_millis(1)))
    }

    fn timeout(&self) -> BootstrapError {
        BootstrapError::Timeout {
            rank: self.rank,
            peer: self.peer,
            during: self.during.to_string(),
            elapsed: self.start.elapsed(),
        }
    }

    fn closed(&self, detail: &str) -> BootstrapError {
        BootstrapError::PeerFailed {
            peer: self.peer,
            during: self.during.to_string(),
            reason: format!("connection closed ({detail}); the process probably exited or crashed"),
        }
    }

    fn io(&self, op: &'static str, e: io::Error) -> BootstrapError {
        match e.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe => {
                self.closed(&e.to_string())
            }
            _ => BootstrapError::Io {
                op,
                peer: self.peer,
                source: e,
            },
        }
    }
}

/// `TcpStream::connect_timeout`, refusing a TCP self-connection. On Linux a connect to a loopback port that
/// nothing listens on can succeed against itself (simultaneous open) when the kernel picks that same port as the
/// source port; the "peer" then echoes our own bytes. Such a connection is reported as refused so that callers
/// retry as if nothing were listening (which is the truth).
pub(crate) fn connect(addr: &std::net::SocketAddr, timeout: std::time::Duration) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(addr, timeout)?;
    if s.local_addr().ok() == Some(*addr) {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("{addr}: TCP self-connection (nothing listens there)"),
        ));
    }
    Ok(s)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// Reads exactly `buf.len()` bytes before the deadline. `Ok(n < len)` means end of stream after `n` bytes.
fn read_full(stream: &TcpStream, buf: &mut [u8], ctx: &Ctx<'_>) -> Result<usize, BootstrapError> {
    let mut got = 0;
    while got < buf.len() {
        let left = ctx.remaining().ok_or_else(|| ctx.timeout())?;
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| ctx.io("set_read_timeout", e))?;
        match (&*stream).read(&mut buf[got..]) {
            Ok(0) => return Ok(got),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                if Instant::now() >= ctx.deadline {
                    return Err(ctx.timeout());
                }
            }
            Err(e) => return Err(ctx.io("read", e)),
        }
    }
    Ok(got)
}

/// Reads one frame of at most `max` payload bytes before the deadline.
pub(crate) fn read_frame(stream: &TcpStream, max: usize, ctx: &Ctx<'_>) -> Result<(Kind, Vec<u8>), BootstrapError> {
    decode_frame(|buf| read_full(stream, buf, ctx), ctx.peer, max)?.ok_or_else(|| ctx.closed("end of stream"))
}

/// The frame decoder behind [`read_frame`], over any source: `fill(buf)` reads exactly `buf.len()` bytes or
/// returns fewer at the end of the stream. `Ok(None)`: the stream ended before the first byte.
fn decode_frame(
    mut fill: impl FnMut(&mut [u8]) -> Result<usize, BootstrapError>,
    peer: Peer,
    max: usize,
) -> Result<Option<(Kind, Vec<u8>)>, BootstrapError> {
    let mut h = [0u8; HEADER_LEN];
    let got = fill(&mut h)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        // Check what we have: junk is reported as junk, not as a short read.
        if got >= 4 && h[..4] != MAGIC {
            return Err(BootstrapError::BadMagic {
                peer,
                found: [h[0], h[1], h[2], h[3]],
            });
        }
        return Err(BootstrapError::Truncated {
            peer,
            part: "header",
            got,
            expected: HEADER_LEN,
        });
    }
    let (kind, len) = parse_header(&h, peer, max)?;
    // Grow the buffer as bytes arrive rather than trusting the header with one big allocation.
    let mut payload = Vec::with_capacity(len.min(1 << 16));
    let mut chunk = [0u8; 1 << 14];
    while payload.len() < len {
        let want = (len - payload.len()).min(chunk.len());
        let n = fill(&mut chunk[..want])?;
        payload.extend_from_slice(&chunk[..n]);
        if n < want {
            return Err(BootstrapError::Truncated {
                peer,
                part: "payload",
                got: payload.len(),
                expected: len,
            });
        }
    }
    Ok(Some((kind, payload)))
}

/// Decodes the frames of a byte stream with the same code as the socket path, stopping at the first error
/// (for the fuzz target `bootstrap_frames` and the bad-input tests; not a stable API).
#[doc(hidden)]
pub fn decode_frames(bytes: &[u8], max: usize) -> Result<Vec<(Kind, Vec<u8>)>, BootstrapError> {
    let mut rest = bytes;
    let mut frames = Vec::new();
    let peer = Peer::Unidentified { addr: None };
    loop {
        let fill = |buf: &mut [u8]| {
            let n = buf.len().min(rest.len());
            buf[..n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            Ok(n)
        };
        match decode_frame(fill, peer, max)? {
            Some(f) => frames.push(f),
            None => return Ok(frames),
        }
    }
}

/// Writes one frame before the deadline.
pub(crate) fn write_frame(stream: &TcpStream, kind: Kind, payload: &[u8], ctx: &Ctx<'_>) -> Result<(), BootstrapError> {
    write_frame_parts(stream, kind, &[payload], ctx)
}

/// Writes one frame whose payload is the concatenation of `parts` (no copy) before the deadline.
pub(crate) fn write_frame_parts(
    stream: &TcpStream,
    kind: Kind,
    parts: &[&[u8]],
    ctx: &Ctx<'_>,
) -> Result<(), BootstrapError> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(total).map_err(|_| BootstrapError::MessageTooLarge {
        op: "write_frame",
        len: total,
        max: u32::MAX as usize,
    })?;
    if total <= 1 << 16 {
        // Small frames go out in one write (one packet with TCP_NODELAY).
        let mut buf = Vec::with_capacity(HEADER_LEN + total);
        buf.extend_from_slice(&header(kind, len));
        parts.iter().for_each(|p| buf.extend_from_slice(p));
        return write_all(stream, &buf, ctx);
    }
    write_all(stream, &header(kind, len), ctx)?;
    for p in parts {
        write_all(stream, p, ctx)?;
    }
    Ok(())
}

fn write_all(stream: &TcpStream, mut buf: &[u8], ctx: &Ctx<'_>) -> Result<(), BootstrapError> {
    while !buf.is_empty() {
        let left = ctx.remaining().ok_or_else(|| ctx.timeout())?;
        stream
            .set_write_timeout(Some(left))
            .map_err(|e| ctx.io("set_write_timeout", e))?;
        match (&*stream).write(buf) {
            Ok(0) => return Err(ctx.closed("write returned 0")),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                if Instant::now() >= ctx.deadline {
                    return Err(ctx.timeout());
                }
            }
            Err(e) => return Err(ctx.io("write", e)),
        }
    }
    Ok(())
}

/// A cursor over a received payload that reports short or malformed payloads as protocol errors.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    peer: Peer,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], peer: Peer, what: &'static str) -> Self {
        Reader { buf, peer, what }
    }

    fn short(&self, need: usize) -> BootstrapError {
        BootstrapError::Protocol {
            peer: self.peer,
            problem: format!(
                "{} payload too short: {} bytes left, {need} needed",
                self.what,
                self.buf.len()
            ),
        }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], BootstrapError> {
        if self.buf.len() < n {
            return Err(self.short(n));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], BootstrapError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, BootstrapError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u64(&mut self) -> Result<u64, BootstrapError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn finish(&self) -> Result<(), BootstrapError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(BootstrapError::Protocol {
                peer: self.peer,
                problem: format!("{} payload has {} unexpected trailing bytes", self.what, self.buf.len()),
            })
        }
    }
}

/// HMAC-SHA256 over the concatenation of `parts`, keyed with the shared token.
pub fn mac(token: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(token).expect("HMAC accepts keys of any length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Checks a MAC in constant time.
pub fn verify_mac(token: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(token).expect("HMAC accepts keys of any length");
    for p in parts {
        m.update(p);
    }
    m.verify_slice(tag).is_ok()
}

/// A fresh random nonce from the operating system.
pub(crate) fn nonce() -> Result<[u8; NONCE_LEN], BootstrapError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| BootstrapError::Io {
        op: "getrandom",
        peer: Peer::Unidentified { addr: None },
        source: io::Error::other(e.to_string()),
    })?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Peer = Peer::Unidentified { addr: None };

    #[test]
    fn header_round_trip_and_rejections() {
        let h = header(Kind::Data, 77);
        assert_eq!(parse_header(&h, P, 100).unwrap(), (Kind::Data, 77));
        match parse_header(&header(Kind::Data, u32::MAX), P, 64 << 20).unwrap_err() {
            BootstrapError::FrameTooLarge { len, max, .. } => assert_eq!((len, max), (u64::from(u32::MAX), 64 << 20)),
            e => panic!("{e:?}"),
        }
        let mut bad = h;
        bad[0] = b'G';
        assert!(matches!(parse_header(&bad, P, 100), Err(BootstrapError::BadMagic { found, .. }) if found == *b"GCRS"));
        let mut v2 = h;
        v2[4] = 9;
        assert!(matches!(
            parse_header(&v2, P, 100),
            Err(BootstrapError::VersionMismatch { theirs: 9, .. })
        ));
        let mut k = h;
        k[6] = 42;
        assert!(matches!(parse_header(&k, P, 100), Err(BootstrapError::Protocol { .. })));
    }

    #[test]
    fn slice_decoder_matches_the_socket_rules() {
        let mut two = header(Kind::Data, 3).to_vec();
        two.extend([7, 8, 9]);
        two.extend(header(Kind::Abort, 0));
        let f = decode_frames(&two, 16).unwrap();
        assert_eq!(f, [(Kind::Data, vec![7, 8, 9]), (Kind::Abort, vec![])]);
        assert!(decode_frames(&[], 16).unwrap().is_empty());
        assert!(matches!(
            decode_frames(b"GET / HTTP/1.1", 16),
            Err(BootstrapError::BadMagic { found, .. }) if found == *b"GET "
        ));
        assert!(matches!(
            decode_frames(&two[..HEADER_LEN + 1], 16),
            Err(BootstrapError::Truncated {
                part: "payload",
                got: 1,
                expected: 3,
                ..
            })
        ));
        assert!(matches!(
            decode_frames(&two[..5], 16),
            Err(BootstrapError::Truncated {
                part: "header",
                got: 5,
                ..
            })
        ));
        assert!(matches!(
            decode_frames(&header(Kind::Hello, u32::MAX), HANDSHAKE_MAX),
            Err(BootstrapError::FrameTooLarge {
                len: 0xFFFF_FFFF,
                max: HANDSHAKE_MAX,
                ..
            })
        ));
    }

    #[test]
    fn macs_depend_on_token_and_message() {
        let a = mac(b"secret", &[b"hello", &[1, 2]]);
        assert!(verify_mac(b"secret", &[b"hello", &[1, 2]], &a));
        assert!(!verify_mac(b"secreT", &[b"hello", &[1, 2]], &a));
        assert!(!verify_mac(b"secret", &[b"hello", &[1, 3]], &a));
        assert!(!verify_mac(b"secret", &[b"hello", &[1, 2]], &a[..31]));
    }

    #[test]
    fn reader_reports_short_payloads() {
        let mut r = Reader::new(&[1, 0, 0, 0, 0, 0, 0, 0, 9], P, "hello");
        assert_eq!(r.u64().unwrap(), 1);
        assert!(r.finish().is_err());
        assert_eq!(r.u8().unwrap(), 9);
        assert!(matches!(r.u64(), Err(BootstrapError::Protocol { .. })));
        r.finish().unwrap();
    }
}
