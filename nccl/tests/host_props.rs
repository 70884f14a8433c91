//! Property tests: random world sizes, counts (including 0, 1 and non-multiples of the world size), data
//! paths and operations, against the sequential reference.

mod host_common;

use host_common::*;
use nccl::host::HostOptions;
use nccl::{Collectives, ReduceOp};
use proptest::prelude::*;

fn options(path: u8) -> HostOptions {
    match path {
        0 => HostOptions {
            direct_min_bytes: usize::MAX,
            ..opts()
        },
        1 => HostOptions {
            direct_min_bytes: usize::MAX,
            slot_bytes: Some(128),
            ..opts()
        },
        _ => HostOptions {
            direct_min_bytes: 0,
            ..opts()
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn all_reduce_and_reduce_scatter(n in 1usize..6, count in prop_oneof![Just(0usize), Just(1), 0usize..300],
                                     op in 0usize..6, path in 0u8..3) {
        let op = ALL_OPS[op];
        run(n, options(path), |c| {
            let r = c.rank();
            let (x, op_r) = op_input::<i32>(op, n, r, count);
            let mut out = vec![0i32; count];
            c.all_reduce(&x, &mut out, op_r).unwrap();
            check_eq("all_reduce", op, &out, |i| reduced::<i32>(op, n, i));
            let (xs, op_r) = op_input::<f32>(op, n, r, n * count);
            let mut out = vec![0f32; count];
            c.reduce_scatter(&xs, &mut out, op_r).unwrap();
            check_eq("reduce_scatter", op, &out, |i| reduced::<f32>(op, n, r * count + i));
        });
    }

    #[test]
    fn gathers_and_all_to_all(n in 1usize..6, count in prop_oneof![Just(0usize), Just(1), 0usize..300], path in 0u8..3) {
        run(n, options(path), |c| {
            let r = c.rank();
            let mine: Vec<u32> = (0..count).map(|i| (r * 1000 + i) as u32).collect();
            let mut buf = vec![0u32; n * count];
            buf[r * count..(r + 1) * count].copy_from_slice(&mine);
            c.all_gather_in_place(&mut buf).unwrap();
            for (k, v) in buf.iter().enumerate() {
                assert_eq!(*v as usize, (k / count) * 1000 + k % count);
            }
            let send: Vec<u32> = (0..n * count).map(|k| (r * 1000 + k) as u32).collect();
            let mut out = vec![0u32; n * count];
            c.all_to_all(&send, &mut out).unwrap();
            for (k, v) in out.iter().enumerate() {
                assert_eq!(*v as usize, (k / count) * 1000 + r * count + k % count);
            }
        });
    }
}

#[test]
fn sum_is_exact_for_every_small_count() {
    for n in [2, 3] {
        for count in 0..20 {
            run(n, options(2), |c| {
                let mut b = vec![1u64; count];
                c.all_reduce_in_place(&mut b, ReduceOp::Sum).unwrap();
                assert!(b.iter().all(|&v| v == n as u64));
            });
        }
    }
}
