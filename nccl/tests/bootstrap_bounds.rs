//! Resource bounds of rank 0's listener, measured with a counting global allocator: peers whose frame headers
//! claim 4 GiB (or exactly the handshake limit) cost rank 0 at most a few KiB each, and the real ranks are
//! still served.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use nccl::bootstrap::wire::{header, Kind, HANDSHAKE_MAX};
use nccl::bootstrap::{Launcher, RankInfo, Rendezvous, RendezvousListener, RendezvousOptions};

#[path = "../../tests/support/counting_alloc.rs"]
mod counting_alloc;

fn info(rank: usize, port: u16) -> RankInfo {
    RankInfo {
        rank,
        world_size: 2,
        local_rank: rank,
        local_world_size: Some(2),
        master_addr: "127.0.0.1".into(),
        master_port: port,
        launcher: Launcher::Explicit,
    }
}

/// Sends `bytes`, half-closes, and reads what rank 0 answers until it closes (3 s at most).
fn junk_peer(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to rank 0");
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    reply
}

#[test]
fn lying_frame_lengths_cost_rank_0_at_most_the_handshake_limit() {
    let mut o = RendezvousOptions::default()
        .with_timeout(Duration::from_secs(20))
        .with_token(None::<Vec<u8>>);
    o.handshake_timeout = Duration::from_secs(3);
    let l = RendezvousListener::bind(&info(0, 0), o.clone()).expect("bind rank 0");
    let port = l.local_addr().unwrap().port();
    let peers = 8;
    std::thread::scope(|s| {
        let root = s.spawn(move || l.accept_ranks());
        std::thread::sleep(Duration::from_millis(100));
        let base = counting_alloc::start();
        for i in 0..peers {
            let mut frame = if i % 2 == 0 {
                header(Kind::Hello, u32::MAX).to_vec()
            } else {
                // Exactly at the limit, with all its bytes: allowed, and costs that much while it is read.
                let mut f = header(Kind::Hello, HANDSHAKE_MAX as u32).to_vec();
                f.resize(f.len() + HANDSHAKE_MAX, 0xAB);
                f
            };
            frame.extend_from_slice(b"trailing");
            let reply = junk_peer(port, &frame);
            // The challenge, then a reject: rank 0 answered and closed.
            assert!(reply.len() > 24, "peer {i}: {reply:?}");
            assert_eq!(reply[6], Kind::Challenge as u8, "peer {i}");
        }
        let peak = counting_alloc::peak_above(base);
        eprintln!("{peers} lying peers cost rank 0 (and the clients) at most {peak} bytes at once");
        assert!(peak < peers * (HANDSHAKE_MAX + (64 << 10)), "{peak} bytes");
        let leaf = s.spawn(move || Rendezvous::new(&info(1, port), o));
        let rv0 = root.join().unwrap().expect("rank 0 still serves the real rank");
        leaf.join().unwrap().expect("rank 1 joins");
        assert!(
            rv0.rejected_connections().len() >= peers,
            "{:?}",
            rv0.rejected_connections()
        );
    });
}
