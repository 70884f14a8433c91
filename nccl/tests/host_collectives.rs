//! Every collective × every element type × world sizes 1, 2, 3, 4, 7, 8 × out of place / in place, on the
//! three data paths of the threads mode (staged in one round, staged in many small rounds, direct), checked
//! exactly against an independent sequential reference (`avg` within 2 ULP).

mod host_common;

use host_common::*;
use nccl::host::HostOptions;
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

fn every_world<T: TestElem>() {
    for (path, o, count) in paths() {
        for n in WORLDS {
            run(n, o.clone(), |c| rank_body::<T>(&c, count, path));
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
            run(n, o.clone(), |c| rank_body::<f32>(&c, 0, path));
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
