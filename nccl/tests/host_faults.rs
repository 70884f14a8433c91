//! Failures of the threads mode: a rank that panics, returns early, is dropped while others wait, never
//! arrives (timeout), or is aborted; mismatched calls; bad input; a fresh communicator after a failure; and
//! 64 ranks on this machine's few cores.

mod host_common;

use std::time::{Duration, Instant};

use host_common::*;
use nccl::counts::{self, Lens, Op};
use nccl::host::{HostComm, HostOptions};
use nccl::{Collectives, Error, ReduceOp};

fn short(timeout_ms: u64) -> HostOptions {
    HostOptions {
        timeout: Duration::from_millis(timeout_ms),
        ..HostOptions::default()
    }
}

/// Runs `f` per rank; a panicking rank yields `None`.
fn run_catch<R: Send>(n: usize, o: HostOptions, f: impl Fn(HostComm) -> R + Sync) -> Vec<Option<R>> {
    let comms = HostComm::threads(n, o).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = comms.into_iter().map(|c| s.spawn(|| f(c))).collect();
        hs.into_iter().map(|h| h.join().ok()).collect()
    })
}

fn assert_peer_failed(e: &Error, who: usize) {
    match e {
        Error::PeerFailed { rank, .. } => assert_eq!(*rank, who, "{e}"),
        other => panic!("expected PeerFailed naming rank {who}, got {other}"),
    }
}

#[test]
fn panicking_rank_fails_the_others_promptly() {
    // Long timeout: the failure must come from the panic, not from the deadline.
    for direct in [usize::MAX, 0] {
        let o = HostOptions {
            direct_min_bytes: direct,
            ..short(30_000)
        };
        let res = run_catch(3, o, |c| {
            let mut buf = vec![1f32; 1000];
            c.all_reduce_in_place(&mut buf, ReduceOp::Sum).unwrap();
            if c.rank() == 1 {
                panic!("rank 1 fails on purpose");
            }
            let t = Instant::now();
            let e = c.all_reduce_in_place(&mut buf, ReduceOp::Sum).unwrap_err();
            assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
            // Later calls fail too (the communicator stays broken).
            let e2 = c.barrier().unwrap_err();
            (e, e2)
        });
        assert!(res[1].is_none());
        for r in [0, 2] {
            let (e, e2) = res[r].as_ref().unwrap();
            assert_peer_failed(e, 1);
            assert_peer_failed(e2, 1);
            assert!(e.to_string().contains("panicked"), "{e}");
        }
    }
}

#[test]
fn rank_returning_early_fails_the_others() {
    let res = run_catch(4, short(30_000), |c| {
        if c.rank() == 3 {
            return None; // drops its communicator without calling
        }
        let mut out = vec![0i32; 4 * 5];
        Some(c.all_gather(&[1, 2, 3, 4, 5], &mut out).unwrap_err())
    });
    for r in &res[..3] {
        let e = r.as_ref().unwrap().as_ref().unwrap();
        assert_peer_failed(e, 3);
        assert!(e.to_string().contains("dropped"), "{e}");
    }
}

#[test]
fn rank_dropped_during_a_large_send_fails_the_receiver() {
    let res = run_catch(2, short(30_000), |c| {
        if c.rank() == 0 {
            // Larger than the two channel buffers: rank 0 needs rank 1 to drain it.
            let big = vec![7u8; 4 << 20];
            c.send(&big, 1).map_err(|e| e.to_string())
        } else {
            // Rank 0 has filled the channel and waits; rank 1 leaves without receiving.
            std::thread::sleep(Duration::from_millis(50));
            drop(c);
            Ok(())
        }
    });
    let e = res[0].as_ref().unwrap().as_ref().unwrap_err();
    assert!(e.contains("rank 1 failed"), "{e}");
}

#[test]
fn timeout_names_the_missing_rank() {
    let res = run_catch(3, short(300), |c| {
        if c.rank() == 2 {
            // Alive but late: sleeps past everyone's deadline, then finds the communicator broken.
            std::thread::sleep(Duration::from_millis(1500));
            return c.barrier().unwrap_err();
        }
        let t = Instant::now();
        let e = c.barrier().unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(250) && t.elapsed() < Duration::from_secs(5));
        e
    });
    for (r, e) in res.iter().enumerate() {
        let e = e.as_ref().unwrap();
        match e {
            Error::Timeout { detail: Some(d), .. } => assert!(d.contains("rank 2 never arrived"), "rank {r}: {e}"),
            other => panic!("rank {r}: expected a timeout, got {other}"),
        }
    }
}

#[test]
fn abort_from_a_watchdog_unblocks_everyone() {
    let comms = HostComm::threads(2, short(30_000)).unwrap();
    let handle = comms[0].abort_handle();
    let res = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    if c.rank() == 1 {
                        std::thread::sleep(Duration::from_millis(500)); // never calls
                        return c.barrier().unwrap_err();
                    }
                    c.barrier().unwrap_err()
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        handle.abort();
        hs.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    for e in res {
        assert!(matches!(e, Error::Aborted { .. }), "{e}");
    }
}

#[test]
fn abort_on_the_rank_itself() {
    let mut cs = HostComm::threads(1, short(1000)).unwrap();
    let c = cs.pop().unwrap();
    c.barrier().unwrap();
    c.abort();
    assert!(matches!(
        c.all_reduce_in_place(&mut [1u8], ReduceOp::Sum),
        Err(Error::Aborted { .. })
    ));
}

#[test]
fn a_new_communicator_after_a_failure_is_clean() {
    let res = run_catch(2, short(30_000), |c| {
        if c.rank() == 1 {
            panic!("boom");
        }
        c.barrier().unwrap_err()
    });
    assert_peer_failed(res[0].as_ref().unwrap(), 1);
    // Nothing of the broken communicator leaks into a new one.
    let sums = run(2, short(5_000), |c| {
        let mut b = [c.rank() as u32 + 1; 3];
        c.all_reduce_in_place(&mut b, ReduceOp::Sum).unwrap();
        b
    });
    assert_eq!(sums, vec![[3, 3, 3], [3, 3, 3]]);
}

#[test]
fn mismatched_collectives_are_reported_on_every_rank() {
    for direct in [usize::MAX, 0] {
        let o = HostOptions {
            direct_min_bytes: direct,
            ..short(30_000)
        };
        let res = run(2, o, |c| {
            let len = 10 + 2 * c.rank();
            let mut b = vec![1f32; len];
            c.all_reduce_in_place(&mut b, ReduceOp::Sum).unwrap_err()
        });
        for e in res {
            match &e {
                Error::InvalidArgument { message, .. } => {
                    assert!(
                        message.contains("count 10") && message.contains("count 12"),
                        "{message}"
                    )
                }
                other => panic!("expected a mismatch error, got {other}"),
            }
        }
    }
    // Different types.
    let res = run(2, short(30_000), |c| {
        if c.rank() == 0 {
            c.all_reduce_in_place(&mut [1f32; 4], ReduceOp::Sum).unwrap_err()
        } else {
            c.all_reduce_in_place(&mut [1i32; 4], ReduceOp::Sum).unwrap_err()
        }
    });
    for e in res {
        assert!(
            e.to_string().contains("float") && e.to_string().contains("int32"),
            "{e}"
        );
    }
}

#[test]
fn mismatched_send_recv_is_reported() {
    let res = run(2, short(30_000), |c| {
        if c.rank() == 0 {
            c.send(&[1f32; 10], 1).map_err(|e| e.to_string())
        } else {
            let mut b = [0f32; 12];
            c.recv(&mut b, 0).map_err(|e| e.to_string())
        }
    });
    let e = res[1].as_ref().unwrap_err();
    assert!(e.contains("40 bytes") && e.contains("48 bytes"), "{e}");
}

/// Bad input gets exactly the errors of `nccl::counts` (shared with the NCCL backend), before any waiting.
#[test]
fn bad_input_gets_typed_errors() {
    let o = short(30_000);
    let res = run(3, o, |c| {
        let (r, n) = (c.rank(), c.size());
        let mut errs = vec![];
        let same = |got: Error, want: Error| assert_eq!(format!("{got:?}"), format!("{want:?}"));
        // Length mismatches.
        let mut out = vec![0f32; 5];
        let got = c.all_reduce(&[1f32; 4], &mut out, ReduceOp::Sum).unwrap_err();
        same(
            got,
            counts::check(
                Op::AllReduce,
                n,
                r,
                0,
                Lens {
                    send: Some(4),
                    recv: Some(5),
                },
            )
            .unwrap_err(),
        );
        let mut out = vec![0f32; 10];
        let got = c.all_gather(&[1f32; 4], &mut out).unwrap_err();
        assert!(
            matches!(
                got,
                Error::LengthMismatch {
                    expected: 12,
                    actual: 10,
                    ..
                }
            ),
            "{got}"
        );
        let got = c.reduce_scatter_in_place(&mut [1f32; 7], ReduceOp::Sum).unwrap_err();
        same(got, counts::check_in_place(Op::ReduceScatter, n, r, 0, 7).unwrap_err());
        let got = c.all_to_all(&[1f32; 7], &mut [0f32; 7]).unwrap_err();
        assert!(matches!(got, Error::LengthMismatch { .. }), "{got}");
        // Root / peer out of range.
        let got = c.broadcast_in_place(&mut [1f32; 3], 3).unwrap_err();
        assert!(
            matches!(
                got,
                Error::InvalidRank {
                    what: "root",
                    value: 3,
                    size: 3,
                    ..
                }
            ),
            "{got}"
        );
        let got = c.send(&[1f32; 3], 9).unwrap_err();
        assert!(
            matches!(
                got,
                Error::InvalidRank {
                    what: "peer",
                    value: 9,
                    ..
                }
            ),
            "{got}"
        );
        let got = c.recv(&mut [1f32; 3], 3).unwrap_err();
        assert!(matches!(got, Error::InvalidRank { what: "peer", .. }), "{got}");
        // A root without its buffer.
        if r == 0 {
            let got = c.gather(&[1f32; 2], None, 0).unwrap_err();
            assert!(matches!(got, Error::InvalidArgument { .. }), "{got}");
            let got = c.broadcast::<f32>(None, &mut [0f32; 2], 0).unwrap_err();
            assert!(matches!(got, Error::InvalidArgument { .. }), "{got}");
        }
        // Send to self without a recv (would deadlock in NCCL).
        errs.push(c.send(&[1f32; 3], r).unwrap_err());
        errs.push(c.recv(&mut [1f32; 3], r).unwrap_err());
        errs.push(c.send_recv(&[1f32; 3], r, &mut [0f32; 3], (r + 1) % n).unwrap_err());
        for e in &errs {
            assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
        }
        // send_recv with itself is a local copy.
        let mut out = [0u8; 3];
        c.send_recv(&[4u8, 5, 6], r, &mut out, r).unwrap();
        assert_eq!(out, [4, 5, 6]);
        // None of that broke the communicator: a correct call still works.
        let mut b = [1u64; 4];
        c.all_reduce_in_place(&mut b, ReduceOp::Sum).unwrap();
        assert_eq!(b, [3; 4]);
    });
    assert_eq!(res.len(), 3);
    assert!(matches!(
        HostComm::threads(0, HostOptions::default()),
        Err(Error::InvalidArgument { .. })
    ));
}

/// 64 ranks on a machine with a couple of cores: slow but correct, no livelock.
#[test]
fn sixty_four_ranks() {
    let res = run(64, short(60_000), |c| {
        let (r, n) = (c.rank(), c.size());
        let mut b = vec![r as i64; 5];
        c.all_reduce_in_place(&mut b, ReduceOp::Sum).unwrap();
        let mut g = vec![0u16 as i32; 64 * 2];
        c.all_gather(&[r as i32, -(r as i32)], &mut g).unwrap();
        assert!((0..64).all(|j| g[2 * j] == j as i32 && g[2 * j + 1] == -(j as i32)));
        let mut got = [0u8; 4];
        c.send_recv(&[r as u8; 4], (r + 1) % n, &mut got, (r + n - 1) % n)
            .unwrap();
        assert_eq!(got, [((r + n - 1) % n) as u8; 4]);
        for _ in 0..5 {
            c.barrier().unwrap();
        }
        b[0]
    });
    assert!(res.iter().all(|&s| s == 63 * 64 / 2));
}

#[test]
fn send_but_not_sync() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<HostComm>();
    send_sync::<nccl::host::AbortHandle>();
}
