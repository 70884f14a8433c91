//! Every collective × every element type × world sizes 1, 2, 3, 4, 7, 8 × out of place / in place, on the
//! three data paths of the threads mode (staged in one round, staged in many small rounds, direct), checked
//! exactly against an independent sequential reference (`avg` within 2 ULP).

mod host_common;

use host_common::*;
use nccl::host::{HostComm, HostOptions};
use nccl::{Collectives, ReduceOp};

const WORLDS: [usize; 6] = [1, 2, 3, 4, 7, 8];

/// The data paths: (name, options, count per rank).
fn paths() -> Vec<(&'static str, HostOptions, usize)> {
    vec![
        (
            "staged",
            HostOptions {
                direct_min_bytes: usize::MAX,
                ..opts()
            },
            37,
        ),
        // Tiny slots: many pipelined rounds, and a last partial round.
        (
            "staged-rounds",
            HostOptions {
                direct_min_bytes: usize::MAX,
                slot_bytes: Some(64),
                ..opts()
            },
            83,
        ),
        (
            "direct",
            HostOptions {
                direct_min_bytes: 0,
                ..opts()
            },
            101,
        ),
    ]
}

fn check_eq<T: TestElem>(what: &str, op: ReduceOp, got: &[T], want: impl Fn(usize) -> T) {
    for (i, g) in got.iter().enumerate() {
        let w = want(i);
        assert!(
            same(op, *g, w),
            "{what}: element {i}: got {g:?}, want {w:?} ({:?})",
            T::DATA_TYPE
        );
    }
}

/// All checks of one rank.
fn rank_body<T: TestElem>(c: HostComm, count: usize, path: &str) {
    let (r, n) = (c.rank(), c.size());
    let ctx = |what: &str| format!("{path} n={n} rank={r} {what}");

    for op in ALL_OPS {
        let (x, op_r) = op_input::<T>(op, n, r, count);
        // all_reduce, out of place and in place.
        let mut out = vec![T::default(); count];
        c.all_reduce(&x, &mut out, op_r).unwrap();
        check_eq(&ctx(&format!("all_reduce {op:?}")), op, &out, |i| {
            reduced::<T>(op, n, i)
        });
        let mut buf = x.clone();
        c.all_reduce_in_place(&mut buf, op_r).unwrap();
        check_eq(&ctx(&format!("all_reduce_in_place {op:?}")), op, &buf, |i| {
            reduced::<T>(op, n, i)
        });

        // reduce to the last rank, out of place and in place.
        let root = n - 1;
        let mut out = vec![T::default(); count];
        c.reduce(&x, (r == root).then_some(&mut out[..]), op_r, root).unwrap();
        if r == root {
            check_eq(&ctx(&format!("reduce {op:?}")), op, &out, |i| reduced::<T>(op, n, i));
        }
        let mut buf = x.clone();
        c.reduce_in_place(&mut buf, op_r, 0).unwrap();
        if r == 0 {
            check_eq(&ctx(&format!("reduce_in_place {op:?}")), op, &buf, |i| {
                reduced::<T>(op, n, i)
            });
        } else {
            assert_eq!(buf, x, "{}", ctx("reduce_in_place must not change non-root buffers"));
        }

        // reduce_scatter: send holds n*count, elements at block b offset i of rank r: value index b*count+i.
        let (xs, op_r) = op_input::<T>(op, n, r, n * count);
        let mut out = vec![T::default(); count];
        c.reduce_scatter(&xs, &mut out, op_r).unwrap();
        check_eq(&ctx(&format!("reduce_scatter {op:?}")), op, &out, |i| {
            reduced::<T>(op, n, r * count + i)
        });
        let mut buf = xs.clone();
        c.reduce_scatter_in_place(&mut buf, op_r).unwrap();
        check_eq(
            &ctx(&format!("reduce_scatter_in_place {op:?}")),
            op,
            &buf[r * count..(r + 1) * count],
            |i| reduced::<T>(op, n, r * count + i),
        );
    }

    let mine: Vec<T> = (0..count).map(|i| tag::<T>(r, i)).collect();
    let sum = ReduceOp::Sum;

    // broadcast from every root, out of place and in place.
    for root in 0..n {
        let mut out = vec![T::default(); count];
        c.broadcast((r == root).then_some(&mine[..]), &mut out, root).unwrap();
        check_eq(&ctx("broadcast"), sum, &out, |i| tag::<T>(root, i));
        let mut buf = if r == root {
            mine.clone()
        } else {
            vec![T::default(); count]
        };
        c.broadcast_in_place(&mut buf, root).unwrap();
        check_eq(&ctx("broadcast_in_place"), sum, &buf, |i| tag::<T>(root, i));
    }

    // all_gather.
    let mut out = vec![T::default(); n * count];
    c.all_gather(&mine, &mut out).unwrap();
    check_eq(&ctx("all_gather"), sum, &out, |k| {
        tag::<T>(k / count.max(1), k % count.max(1))
    });
    let mut buf = vec![T::default(); n * count];
    buf[r * count..(r + 1) * count].copy_from_slice(&mine);
    c.all_gather_in_place(&mut buf).unwrap();
    check_eq(&ctx("all_gather_in_place"), sum, &buf, |k| {
        tag::<T>(k / count.max(1), k % count.max(1))
    });

    // gather / scatter to and from the middle rank.
    let root = n / 2;
    let mut out = vec![T::default(); n * count];
    c.gather(&mine, (r == root).then_some(&mut out[..]), root).unwrap();
    if r == root {
        check_eq(&ctx("gather"), sum, &out, |k| {
            tag::<T>(k / count.max(1), k % count.max(1))
        });
    }
    let all: Vec<T> = (0..n * count).map(|k| tag::<T>(r + 100, k)).collect();
    let mut out = vec![T::default(); count];
    c.scatter((r == root).then_some(&all[..]), &mut out, root).unwrap();
    check_eq(&ctx("scatter"), sum, &out, |i| tag::<T>(root + 100, r * count + i));

    // all_to_all: block j of rank r's send is tag(r, j*count+i); rank r receives block r of every rank.
    let send: Vec<T> = (0..n * count).map(|k| tag::<T>(r, k)).collect();
    let mut out = vec![T::default(); n * count];
    c.all_to_all(&send, &mut out).unwrap();
    check_eq(&ctx("all_to_all"), sum, &out, |k| {
        let (j, i) = (k / count.max(1), k % count.max(1));
        tag::<T>(j, r * count + i)
    });

    // send/recv in a ring (grouped), then a plain pair exchange, then send_recv to self.
    let (dst, src) = ((r + 1) % n, (r + n - 1) % n);
    let mut out = vec![T::default(); count];
    c.send_recv(&mine, dst, &mut out, src).unwrap();
    check_eq(&ctx("send_recv ring"), sum, &out, |i| tag::<T>(src, i));
    if n > 1 && r < n / 2 * 2 {
        let peer = r ^ 1;
        let mut out = vec![T::default(); count];
        if r % 2 == 0 {
            c.send(&mine, peer).unwrap();
            c.recv(&mut out, peer).unwrap();
        } else {
            c.recv(&mut out, peer).unwrap();
            c.send(&mine, peer).unwrap();
        }
        check_eq(&ctx("send/recv pair"), sum, &out, |i| tag::<T>(peer, i));
    }
    c.barrier().unwrap();
}

fn every_world<T: TestElem>() {
    for (path, o, count) in paths() {
        for n in WORLDS {
            run(n, o.clone(), |c| rank_body::<T>(c, count, path));
        }
    }
}

#[test]
fn all_i8() {
    every_world::<i8>();
}
#[test]
fn all_u8() {
    every_world::<u8>();
}
#[test]
fn all_i32() {
    every_world::<i32>();
}
#[test]
fn all_u32() {
    every_world::<u32>();
}
#[test]
fn all_i64() {
    every_world::<i64>();
}
#[test]
fn all_u64() {
    every_world::<u64>();
}
#[test]
fn all_f16() {
    every_world::<half::f16>();
}
#[test]
fn all_bf16() {
    every_world::<half::bf16>();
}
#[test]
fn all_f32() {
    every_world::<f32>();
}
#[test]
fn all_f64() {
    every_world::<f64>();
}
#[test]
fn all_f8e4m3() {
    every_world::<float8::F8E4M3>();
}
#[test]
fn all_f8e5m2() {
    every_world::<float8::F8E5M2>();
}

/// Zero-length buffers are valid everywhere and move nothing.
#[test]
fn zero_counts() {
    for (path, o, _) in paths() {
        for n in [1, 3] {
            run(n, o.clone(), |c| rank_body::<f32>(c, 0, path));
        }
    }
}

/// Messages larger than a slot, on the default geometry: staged pipelining and the direct path agree.
#[test]
fn large_messages_both_paths() {
    let count = (3 << 20) / 4 + 13; // 3 MiB of f32 plus a tail: several 1 MiB slot rounds
    for direct in [usize::MAX, 0] {
        let o = HostOptions {
            direct_min_bytes: direct,
            ..opts()
        };
        run(2, o, |c| {
            let r = c.rank();
            let x: Vec<f32> = (0..count).map(|i| ((i * 7 + r * 3) % 1000) as f32).collect();
            let mut out = vec![0f32; count];
            c.all_reduce(&x, &mut out, ReduceOp::Sum).unwrap();
            for (i, v) in out.iter().enumerate() {
                let want = ((i * 7) % 1000 + (i * 7 + 3) % 1000) as f32;
                assert_eq!(*v, want, "element {i}");
            }
            let mut g = vec![0f32; 2 * count];
            c.all_gather(&x, &mut g).unwrap();
            for (k, v) in g.iter().enumerate() {
                let (j, i) = (k / count, k % count);
                assert_eq!(*v, ((i * 7 + j * 3) % 1000) as f32);
            }
        });
    }
}
