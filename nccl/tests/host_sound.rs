//! Soundness of the host backend when ranks do not call the same collectives (issue 12, items 3 and 7):
//! mismatched lengths on both sides of the direct-path threshold, barriers interleaved with collectives,
//! and interleavings where a rank could take a peer's signature of an earlier call for the current one.
//! Each ends in an error on every rank within the timeout, and no buffer of a returned call is written
//! (the oracle of `host_common::script`).

mod host_common;

use std::time::Duration;

use host_common::script::*;
use nccl::host::{HostComm, HostOptions};
use nccl::{Collectives, Error, ReduceOp};

const TIMEOUT: Duration = Duration::from_secs(5);
/// A world that has not returned after this long hangs (the bug this file exists for).
const LIMIT: Duration = Duration::from_secs(40);

fn o() -> HostOptions {
    HostOptions {
        timeout: TIMEOUT,
        ..HostOptions::default()
    }
}

fn plan(calls: &[Call]) -> Plan {
    Plan {
        calls: calls.to_vec(),
        leave: None,
    }
}

/// Runs one plan per rank (threads) and checks the oracle.
fn check(plans: &[Plan], opts: HostOptions) -> Vec<Vec<Record>> {
    let recs = run_threads(plans, opts, LIMIT);
    assert_oracle(plans, &recs, TIMEOUT);
    recs
}

fn ar(count: usize) -> Call {
    Call::AllReduce { count, int: false }
}

/// The default threshold is 16 KiB: 4096 f32 go direct, 4095 are staged.
#[test]
fn mismatched_lengths_across_the_direct_threshold() {
    let b = Call::Barrier;
    let cases: Vec<Vec<Call>> = vec![
        vec![ar(4096), ar(4095)],
        vec![ar(4095), ar(4096)],
        vec![ar(4096), ar(4097)],
        vec![ar(4000), ar(8192)],
        vec![ar(16384), ar(4095)],
        vec![ar(4096), ar(4096), ar(4095)],
        vec![ar(4095), ar(4096), ar(4096)],
        vec![ar(4096), ar(4095), ar(4096), ar(4095)],
        vec![
            Call::Broadcast { count: 4096, root: 0 },
            Call::Broadcast { count: 4095, root: 0 },
        ],
        vec![
            Call::Reduce { count: 4095, root: 1 },
            Call::Reduce { count: 4096, root: 1 },
        ],
        // Per-rank counts whose totals (count * ranks) straddle 16 KiB.
        vec![Call::AllGather { count: 2048 }, Call::AllGather { count: 2047 }],
        vec![Call::ReduceScatter { count: 2047 }, Call::ReduceScatter { count: 2048 }],
        vec![Call::AllToAll { count: 2048 }, Call::AllToAll { count: 2047 }],
    ];
    for calls in cases {
        // A warm-up call that matches, the mismatch, then a barrier that must fail too (still broken).
        let plans: Vec<Plan> = calls.iter().map(|&c| plan(&[ar(8), c, b])).collect();
        let recs = check(&plans, o());
        let (c0, c1) = (calls[0], *calls.iter().find(|&&c| c != calls[0]).unwrap());
        let count = |c: Call| match c {
            Call::AllReduce { count, .. }
            | Call::Broadcast { count, .. }
            | Call::Reduce { count, .. }
            | Call::AllGather { count }
            | Call::ReduceScatter { count }
            | Call::AllToAll { count } => count,
            Call::Barrier => 0,
        };
        for rs in &recs {
            let Outcome::Err { text, .. } = &rs[1].outcome else {
                unreachable!()
            };
            assert!(
                text.contains(&format!("count {}", count(c0))) && text.contains(&format!("count {}", count(c1))),
                "{calls:?}: the error must name both calls: {text}"
            );
        }
    }
}

/// The reproduction: rank 0's barrier must not be taken for rank 1's second all-reduce.
#[test]
fn barrier_interleaved_with_large_collectives() {
    let b = Call::Barrier;
    for (count, slot) in [(1 << 20, None), (1000, None), (100_000, Some(4096)), (5000, Some(1024))] {
        let opts = HostOptions {
            slot_bytes: slot,
            ..o()
        };
        for swap in [false, true] {
            let mut plans = vec![plan(&[ar(count), b, b]), plan(&[ar(count), ar(count), b])];
            if swap {
                plans.reverse();
            }
            check(&plans, opts.clone());
        }
        // Three ranks, one of them out of step.
        let plans = vec![
            plan(&[ar(count), ar(count), b]),
            plan(&[ar(count), b, ar(count)]),
            plan(&[ar(count), ar(count), b]),
        ];
        check(&plans, opts.clone());
    }
}

/// Interleavings where the slot a rank reads still holds a peer's signature of an earlier, identical call:
/// the peer passed the phase in a barrier (or a later round) without signing it. Taking the stale signature
/// would read the peer's old input (staged: from its slot; direct: through the pointers of a returned
/// call) and, on the direct path, write into a buffer of that returned call.
#[test]
fn stale_signature_interleavings() {
    let b = Call::Barrier;
    // Staged: 16 elements in one round, phase 2 of rank 1 reads rank 0's slot of phase 0.
    let staged = vec![plan(&[ar(16), b, b]), plan(&[ar(16), b, ar(16)])];
    check(&staged, o());
    // Direct: rank 1's second call opens at phase 2, where rank 0 is in a barrier after closing phase 1.
    let direct = vec![plan(&[ar(8192), b, b]), plan(&[ar(8192), ar(8192), b])];
    check(&direct, o());
    // Staged in several rounds (16 elements a round): a two-round call against a barrier.
    let o64 = HostOptions {
        slot_bytes: Some(64),
        ..o()
    };
    let rounds = vec![plan(&[ar(16), ar(32), b]), plan(&[ar(16), b, ar(16)])];
    check(&rounds, o64.clone());
    // Other collectives on the direct path.
    for c in [
        Call::AllGather { count: 4096 },
        Call::ReduceScatter { count: 4096 },
        Call::Broadcast { count: 8192, root: 1 },
        Call::AllToAll { count: 4096 },
    ] {
        check(&[plan(&[c, b, b]), plan(&[c, c, b])], o());
        check(&[plan(&[c, b, b]), plan(&[c, c, b])], o64.clone());
    }
}

#[test]
fn barrier_against_a_collective_fails_on_every_rank() {
    let b = Call::Barrier;
    for (count, slot) in [(10, None), (100_000, Some(4096)), (8192, None), (1 << 20, None)] {
        let opts = HostOptions {
            slot_bytes: slot,
            ..o()
        };
        check(&[plan(&[b, ar(count)]), plan(&[ar(count), b])], opts.clone());
        check(&[plan(&[ar(count), b]), plan(&[b, ar(count)])], opts.clone());
        check(&[plan(&[b, b]), plan(&[b, ar(count)]), plan(&[b, b])], opts.clone());
    }
}

/// The same scripts with every rank in step succeed exactly (the oracle's other half).
#[test]
fn matching_scripts_succeed() {
    let b = Call::Barrier;
    let calls = [
        ar(4095),
        ar(4096),
        b,
        ar(1 << 20),
        b,
        b,
        Call::AllGather { count: 2048 },
        Call::ReduceScatter { count: 2047 },
        Call::Broadcast { count: 8192, root: 1 },
        Call::Reduce { count: 5000, root: 0 },
        Call::AllToAll { count: 4096 },
        Call::AllReduce { count: 4096, int: true },
    ];
    for n in [2, 3] {
        for slot in [None, Some(1024)] {
            let opts = HostOptions {
                slot_bytes: slot,
                ..o()
            };
            let recs = check(&vec![plan(&calls); n], opts);
            assert!(recs.iter().flatten().all(|x| x.outcome == Outcome::Ok));
        }
    }
}

/// A watchdog aborts while ranks run large direct all-reduces: whatever the timing, every rank sees the
/// same number of successful calls, then `Aborted`, and nobody waits past the timeout.
#[test]
fn abort_during_direct_collectives_is_consistent() {
    for delay_ms in [0u64, 3, 20] {
        let comms = HostComm::threads(3, o()).unwrap();
        let handle = comms[0].abort_handle();
        let res = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let mut buf = vec![c.rank() as f32; 1 << 20];
                        let mut oks = 0;
                        let t = std::time::Instant::now();
                        for _ in 0..40 {
                            match c.all_reduce_in_place(&mut buf, ReduceOp::Sum) {
                                Ok(()) => oks += 1,
                                Err(e) => {
                                    assert!(matches!(e, Error::Aborted { .. }), "{e}");
                                    // Later calls fail too.
                                    assert!(c.barrier().is_err());
                                    break;
                                }
                            }
                        }
                        assert!(t.elapsed() < TIMEOUT + Duration::from_secs(20), "{:?}", t.elapsed());
                        oks
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(delay_ms));
            handle.abort();
            hs.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        });
        assert!(
            res.iter().all(|&k| k == res[0]),
            "ranks disagree on what succeeded: {res:?}"
        );
    }
}
