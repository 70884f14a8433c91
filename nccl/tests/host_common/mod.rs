//! Shared helpers of the host-backend tests: integer-valued inputs per type and an independent sequential
//! reference (computed in `f64`/`i128`, exact for the values used).
#![allow(dead_code)]

pub mod procs;
pub mod script;

use nccl::host::{HostComm, HostOptions};
use nccl::{Collectives, Elem, ReduceOp};

/// Test knowledge about an element type.
pub trait TestElem: Elem {
    /// The largest integer such that every integer in `0..=BUDGET` is exactly representable.
    const BUDGET: u32;
    /// Significand bits (with the implicit one) for floats; 0 for integers.
    const MANT: i32;
    const SIGNED: bool;
    const BITS: u32;
}

macro_rules! te {
    ($($t:ty => $b:expr, $m:expr, $s:expr;)*) => {$(
        impl TestElem for $t {
            const BUDGET: u32 = $b;
            const MANT: i32 = $m;
            const SIGNED: bool = $s;
            const BITS: u32 = 8 * std::mem::size_of::<$t>() as u32;
        }
    )*};
}
te! {
    i8 => 127, 0, true;
    u8 => 255, 0, false;
    i32 => 100_000, 0, true;
    u32 => 100_000, 0, false;
    i64 => 100_000, 0, true;
    u64 => 100_000, 0, false;
    f32 => 100_000, 24, true;
    f64 => 100_000, 53, true;
    half::f16 => 2048, 11, true;
    half::bf16 => 256, 8, true;
    float8::F8E4M3 => 16, 4, true;
    float8::F8E5M2 => 8, 3, true;
}

/// Which values to generate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Gen {
    /// Non-negative; sums over `n` ranks stay within the budget.
    Sum,
    /// 1 or 2 (products are powers of two).
    Prod,
    /// Mixed signs (for signed and float types).
    MaxMin,
    /// Like `Sum`, but leaving room for the per-rank scalar.
    Pre,
}

pub fn scalar_for<T: TestElem>(n: usize, r: usize) -> f64 {
    if T::BUDGET as usize / (2 * n) >= 1 {
        1.0 + (r % 2) as f64
    } else {
        1.0
    }
}

/// Value of element `i` on rank `r` in a world of `n`.
pub fn val<T: TestElem>(g: Gen, n: usize, r: usize, i: usize) -> f64 {
    let b = T::BUDGET as usize;
    match g {
        Gen::Sum => ((r * 7 + i * 3 + 1) % ((b / n).clamp(1, 1000) + 1)) as f64,
        Gen::Pre => {
            let smax = if b / (2 * n) >= 1 { 2 } else { 1 };
            ((r * 5 + i * 3 + 2) % ((b / (n * smax)).clamp(1, 1000) + 1)) as f64
        }
        Gen::Prod => (1 + (r + i) % 2) as f64,
        Gen::MaxMin => {
            let range = b.min(100);
            let v = ((r * 5 + i * 11 + 3) % range) as f64;
            if T::SIGNED {
                v - (range / 2) as f64
            } else {
                v
            }
        }
    }
}

pub fn input<T: TestElem>(g: Gen, n: usize, r: usize, len: usize) -> Vec<T> {
    (0..len).map(|i| T::from_f64(val::<T>(g, n, r, i))).collect()
}

/// Distinct recognisable values for data-movement ops (no reduction): rank `r`, element `i`.
pub fn tag<T: TestElem>(r: usize, i: usize) -> T {
    let b = T::BUDGET as usize;
    T::from_f64(((r * 13 + i * 7 + 1) % b.min(1000)) as f64)
}

/// Wraps an exact integer into the range of `T` (two's complement), as the element type's arithmetic does.
pub fn to_t<T: TestElem>(x: f64) -> T {
    if T::MANT == 0 {
        let m = 1i128 << T::BITS;
        let mut v = (x as i128).rem_euclid(m);
        if T::SIGNED && v >= m / 2 {
            v -= m;
        }
        T::from_f64(v as f64)
    } else {
        T::from_f64(x)
    }
}

pub fn gen_for(op: ReduceOp) -> Gen {
    match op {
        ReduceOp::Prod => Gen::Prod,
        ReduceOp::Max | ReduceOp::Min => Gen::MaxMin,
        ReduceOp::PreMulSum(_) => Gen::Pre,
        _ => Gen::Sum,
    }
}

/// Every rank's input for `op` (element `i` of rank `r`), and this rank's scalar for PreMulSum.
pub fn op_input<T: TestElem>(op: ReduceOp, n: usize, r: usize, len: usize) -> (Vec<T>, ReduceOp) {
    let op = match op {
        ReduceOp::PreMulSum(_) => ReduceOp::PreMulSum(scalar_for::<T>(n, r)),
        o => o,
    };
    (input::<T>(gen_for(op), n, r, len), op)
}

/// The reference reduction of element `i` (of inputs generated with `op_input` of length `len`) over `n`
/// ranks, element offset `at` into each rank's input.
pub fn reduced<T: TestElem>(op: ReduceOp, n: usize, at: usize) -> T {
    let g = gen_for(op);
    let xs: Vec<f64> = (0..n).map(|r| val::<T>(g, n, r, at)).collect();
    // Inputs as the element type sees them (integers: exact; floats: the values are representable).
    let xs: Vec<f64> = xs.iter().map(|&x| T::from_f64(x).to_f64()).collect();
    match op {
        ReduceOp::Sum => to_t(xs.iter().sum()),
        ReduceOp::Prod => to_t(xs.iter().product()),
        ReduceOp::Max => T::from_f64(xs.iter().cloned().fold(f64::MIN, f64::max)),
        ReduceOp::Min => T::from_f64(xs.iter().cloned().fold(f64::MAX, f64::min)),
        ReduceOp::Avg => {
            let s: f64 = xs.iter().sum();
            if T::MANT == 0 {
                to_t(((s as i128) / n as i128) as f64)
            } else {
                T::from_f64(s / n as f64)
            }
        }
        ReduceOp::PreMulSum(_) => {
            let s: f64 = xs
                .iter()
                .enumerate()
                .map(|(r, x)| {
                    let sc = T::from_f64(scalar_for::<T>(n, r)).to_f64();
                    x * sc
                })
                .sum();
            to_t(s)
        }
        _ => unreachable!(),
    }
}

/// `got == want`, or within 2 ULP of `want` for `avg` on floats.
pub fn same<T: TestElem>(op: ReduceOp, got: T, want: T) -> bool {
    if got == want {
        return true;
    }
    if op != ReduceOp::Avg || T::MANT == 0 {
        return false;
    }
    let (g, w) = (got.to_f64(), want.to_f64());
    let e = if w == 0.0 { -126 } else { w.abs().log2().floor() as i32 };
    let ulp = 2f64.powi(e - (T::MANT - 1));
    (g - w).abs() <= 2.0 * ulp
}

pub const ALL_OPS: [ReduceOp; 6] = [
    ReduceOp::Sum,
    ReduceOp::Prod,
    ReduceOp::Max,
    ReduceOp::Min,
    ReduceOp::Avg,
    ReduceOp::PreMulSum(0.0),
];

/// Runs `f` on every rank of a fresh threads communicator, one thread per rank; returns the results in
/// rank order. A panic on any rank is re-raised.
pub fn run<R: Send>(n: usize, opts: HostOptions, f: impl Fn(HostComm) -> R + Sync) -> Vec<R> {
    let comms = HostComm::threads(n, opts).expect("create communicator");
    std::thread::scope(|s| {
        let hs: Vec<_> = comms.into_iter().map(|c| s.spawn(|| f(c))).collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Options with a short timeout for tests.
pub fn opts() -> HostOptions {
    HostOptions {
        timeout: std::time::Duration::from_secs(20),
        ..HostOptions::default()
    }
}

pub fn assert_rank<C: Collectives>(c: &C) -> (usize, usize) {
    (c.rank(), c.size())
}

pub fn check_eq<T: TestElem>(what: &str, op: ReduceOp, got: &[T], want: impl Fn(usize) -> T) {
    for (i, g) in got.iter().enumerate() {
        let w = want(i);
        assert!(
            same(op, *g, w),
            "{what}: element {i}: got {g:?}, want {w:?} ({:?})",
            T::DATA_TYPE
        );
    }
}

/// All checks of one rank: every collective, every op, out of place and in place.
pub fn rank_body<T: TestElem>(c: &HostComm, count: usize, path: &str) {
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
