//! Exhaustive check of `nccl::counts` for world sizes 1..=8: every op, every rank and root (including one out
//! of range), every combination of present/absent buffers and lengths up to `3 * nranks + 1`. The expected
//! outcome comes from an independent model written from NCCL's documentation (DESIGN.md §2), not from the
//! implementation.

use nccl::counts::{check, check_in_place, in_place_offset, Lens, Op};
use nccl::Error;

const OPS: [Op; 10] = [
    Op::AllReduce,
    Op::Broadcast,
    Op::Reduce,
    Op::AllGather,
    Op::ReduceScatter,
    Op::AllToAll,
    Op::Gather,
    Op::Scatter,
    Op::Send,
    Op::Recv,
];

/// What a correct validator must answer.
#[derive(Debug, PartialEq)]
enum Expect {
    Count(usize),
    BadRank(&'static str),
    /// Some buffer problem: `missing` when a required buffer is absent, `wrong` lists (expected, actual) of
    /// length mismatches (either may be reported when both kinds are present).
    Bad {
        missing: bool,
        wrong: Vec<(usize, usize)>,
    },
}

/// Per op: (send needed on this rank, recv needed on this rank, send len as a function of count, recv len).
/// Derived from the NCCL documentation: per-rank counts, rooted buffers only on the root.
fn model(op: Op, n: usize, rank: usize, root: usize, send: Option<usize>, recv: Option<usize>) -> Expect {
    if rank >= n {
        return Expect::BadRank("rank");
    }
    let rooted = matches!(op, Op::Broadcast | Op::Reduce | Op::Gather | Op::Scatter);
    if rooted && root >= n {
        return Expect::BadRank("root");
    }
    if matches!(op, Op::Send | Op::Recv) && root >= n {
        return Expect::BadRank("peer");
    }
    let is_root = rank == root;
    // (send required, recv required, the "count" is derived from which buffer, factor of send, factor of recv)
    let (need_s, need_r) = match op {
        Op::AllReduce | Op::AllGather | Op::ReduceScatter | Op::AllToAll => (true, true),
        Op::Broadcast | Op::Scatter => (is_root, true),
        Op::Reduce | Op::Gather => (true, is_root),
        Op::Send => (true, false),
        Op::Recv => (false, true),
        other => panic!("the model does not know {other:?}: extend it"),
    };
    let missing = (need_s && send.is_none()) || (need_r && recv.is_none());
    // The count NCCL takes, from the buffer that defines it.
    let count = match op {
        Op::AllReduce | Op::Reduce | Op::AllGather | Op::Gather | Op::Send => send,
        Op::Broadcast | Op::ReduceScatter | Op::Scatter | Op::Recv => recv,
        Op::AllToAll => send.map(|s| s / n),
        other => panic!("the model does not know {other:?}: extend it"),
    };
    let mut wrong = Vec::new();
    if op == Op::AllToAll {
        if let Some(s) = send {
            if s % n != 0 {
                wrong.push(((s / n + 1) * n, s));
            }
        }
    }
    if let Some(c) = count {
        let want_send = match op {
            Op::ReduceScatter | Op::Scatter | Op::AllToAll => c * n,
            _ => c,
        };
        let want_recv = match op {
            Op::AllGather | Op::Gather | Op::AllToAll => c * n,
            _ => c,
        };
        if need_s {
            if let Some(s) = send {
                if s != want_send {
                    wrong.push((want_send, s));
                }
            }
        }
        if need_r {
            if let Some(r) = recv {
                if r != want_recv {
                    wrong.push((want_recv, r));
                }
            }
        }
    }
    if missing || !wrong.is_empty() {
        return Expect::Bad { missing, wrong };
    }
    Expect::Count(count.expect("the defining buffer is required and present"))
}

fn assert_matches(got: nccl::Result<usize>, want: &Expect, ctx: &dyn Fn() -> String) {
    match (got, want) {
        (Ok(c), Expect::Count(w)) => assert_eq!(c, *w, "{}", ctx()),
        (Err(Error::InvalidRank { what, .. }), Expect::BadRank(w)) => assert_eq!(what, *w, "{}", ctx()),
        (Err(Error::InvalidArgument { .. }), Expect::Bad { missing: true, .. }) => {}
        (Err(Error::LengthMismatch { expected, actual, .. }), Expect::Bad { wrong, .. }) => {
            assert!(
                wrong.contains(&(expected, actual)),
                "{}: reported ({expected}, {actual}), model {wrong:?}",
                ctx()
            )
        }
        (got, want) => panic!("{}: got {got:?}, model says {want:?}", ctx()),
    }
}

#[test]
fn out_of_place_exhaustive_world_sizes_1_to_8() {
    let mut checked = 0usize;
    let mut ok = 0usize;
    for n in 1..=8usize {
        let lens: Vec<Option<usize>> = std::iter::once(None).chain((0..=3 * n + 1).map(Some)).collect();
        for op in OPS {
            for rank in 0..=n {
                for root in 0..=n {
                    for &send in &lens {
                        for &recv in &lens {
                            let want = model(op, n, rank, root, send, recv);
                            let got = check(op, n, rank, root, Lens { send, recv });
                            if got.is_ok() {
                                ok += 1;
                            }
                            assert_matches(got, &want, &|| {
                                format!("{op:?} n={n} rank={rank} root={root} send={send:?} recv={recv:?}")
                            });
                            checked += 1;
                        }
                    }
                }
            }
        }
    }
    // Sanity of the sweep itself: both outcomes occur in quantity.
    assert!(checked > 100_000 && ok > 1_000, "checked {checked}, ok {ok}");
}

#[test]
fn in_place_exhaustive_world_sizes_1_to_8() {
    for n in 1..=8usize {
        for op in OPS {
            for rank in 0..=n {
                for root in 0..=n {
                    for len in 0..=3 * n + 1 {
                        let got = check_in_place(op, n, rank, root, len);
                        let ctx = || format!("{op:?} n={n} rank={rank} root={root} len={len}");
                        let rooted = matches!(op, Op::Broadcast | Op::Reduce | Op::Gather | Op::Scatter);
                        if rank >= n {
                            assert!(matches!(got, Err(Error::InvalidRank { what: "rank", .. })), "{}", ctx());
                            continue;
                        }
                        if rooted && root >= n {
                            assert!(matches!(got, Err(Error::InvalidRank { what: "root", .. })), "{}", ctx());
                            continue;
                        }
                        match op {
                            Op::AllReduce | Op::Broadcast | Op::Reduce => assert_eq!(got.unwrap(), len, "{}", ctx()),
                            Op::AllGather | Op::ReduceScatter if len % n == 0 => {
                                assert_eq!(got.unwrap(), len / n, "{}", ctx())
                            }
                            Op::AllGather | Op::ReduceScatter => match got {
                                Err(Error::LengthMismatch { expected, actual, .. }) => {
                                    assert_eq!(actual, len, "{}", ctx());
                                    assert!(expected % n == 0 && expected > len, "{}", ctx());
                                }
                                other => panic!("{}: {other:?}", ctx()),
                            },
                            _ => assert!(matches!(got, Err(Error::InvalidArgument { .. })), "{}: {got:?}", ctx()),
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn zero_ranks_is_an_error_not_a_division_by_zero() {
    for op in OPS {
        assert!(check(
            op,
            0,
            0,
            0,
            Lens {
                send: Some(4),
                recv: Some(4)
            }
        )
        .is_err());
        assert!(check_in_place(op, 0, 0, 0, 4).is_err());
    }
}

#[test]
fn errors_name_the_buffer_and_both_lengths() {
    let err = check(
        Op::AllGather,
        4,
        1,
        0,
        Lens {
            send: Some(3),
            recv: Some(11),
        },
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("all_gather") && text.contains("recv buffer"), "{text}");
    assert!(text.contains("11") && text.contains("12"), "{text}");
    let err = check(
        Op::Gather,
        4,
        2,
        2,
        Lens {
            send: Some(3),
            recv: None,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("recv buffer is required"), "{err}");
}

#[test]
fn in_place_offsets_follow_nccl() {
    // all_gather in place: this rank's block at rank * count; reduce_scatter result at the same place.
    for rank in 0..8 {
        for count in [0usize, 1, 7, 1024] {
            assert_eq!(in_place_offset(rank, count), rank * count);
        }
    }
}

#[test]
fn huge_lengths_are_refused_not_wrapped() {
    // usize::MAX / 2 + 1 elements times 2 ranks wraps to 0 in release builds; it must not match an empty buffer.
    let s = usize::MAX / 2 + 1;
    for op in [Op::AllGather, Op::Gather] {
        let got = check(
            op,
            2,
            0,
            0,
            Lens {
                send: Some(s),
                recv: Some(0),
            },
        );
        assert!(matches!(got, Err(Error::InvalidArgument { .. })), "{op:?}: {got:?}");
    }
    for op in [Op::ReduceScatter, Op::Scatter] {
        let got = check(
            op,
            2,
            0,
            0,
            Lens {
                send: Some(0),
                recv: Some(s),
            },
        );
        assert!(matches!(got, Err(Error::InvalidArgument { .. })), "{op:?}: {got:?}");
    }
    // A non-divisible all_to_all length near usize::MAX reports a saturated "expected" instead of overflowing.
    let got = check(
        Op::AllToAll,
        2,
        0,
        0,
        Lens {
            send: Some(usize::MAX),
            recv: Some(usize::MAX),
        },
    );
    assert!(
        matches!(got, Err(Error::LengthMismatch { actual: usize::MAX, .. })),
        "{got:?}"
    );
}
