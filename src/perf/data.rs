//! Predictable inputs and exact expected results (nccl-tests' idea, our own recipe).
//!
//! Every input element is a small integer that depends on the rank that owns it, its index and a seed, so a
//! misplaced, missing or stale element shows up as a wrong value. The ranges are chosen per data type, reduction
//! and rank count so that every partial result is an integer the type represents exactly: sums, products, maxima
//! and minima are then exact whatever order a backend reduces in, and the check compares bit for bit. Only `avg`
//! has a tolerance (2 ULP of the result), because NCCL scales each input by `1/nranks` in floating point.

use nccl::{DataType, Elem, ReduceOp};

/// The largest magnitude up to which every integer is exactly representable (capped at 2^20, plenty here).
pub const fn exact_limit(dt: DataType) -> i64 {
    match dt {
        DataType::Int8 => 127,
        DataType::Uint8 => 255,
        DataType::Float8e5m2 => 8,
        DataType::Float8e4m3 => 16,
        DataType::Bfloat16 => 256,
        DataType::Float16 => 2048,
        _ => 1 << 20,
    }
}

const fn is_unsigned(dt: DataType) -> bool {
    matches!(dt, DataType::Uint8 | DataType::Uint32 | DataType::Uint64)
}

/// Significand bits (without the implicit one) and the minimum normal exponent of a float type.
const fn float_layout(dt: DataType) -> Option<(i32, i32)> {
    match dt {
        DataType::Float16 => Some((10, -14)),
        DataType::Bfloat16 => Some((7, -126)),
        DataType::Float32 => Some((23, -126)),
        DataType::Float64 => Some((52, -1022)),
        DataType::Float8e4m3 => Some((3, -6)),
        DataType::Float8e5m2 => Some((2, -14)),
        _ => None,
    }
}

/// One unit in the last place of `x` in type `dt` (1 for integer types).
pub fn ulp(dt: DataType, x: f64) -> f64 {
    match float_layout(dt) {
        None => 1.0,
        Some((mant, emin)) => {
            let e = if x == 0.0 {
                emin
            } else {
                (x.abs().log2().floor() as i32).max(emin)
            };
            (2.0f64).powi(e - mant)
        }
    }
}

/// How input values are drawn for one (type, reduction, rank count) combination.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Recipe {
    dt: DataType,
    op: Option<ReduceOp>,
    nranks: usize,
    /// Values lie in `[lo, hi]` on ranks below `active`.
    lo: i64,
    hi: i64,
    /// Ranks at or above this hold only neutral values (0 for sums, ±1 for products).
    active: usize,
}

impl Recipe {
    /// The recipe for a data-movement operation (`op == None`) or a reduction.
    pub fn new(dt: DataType, op: Option<ReduceOp>, nranks: usize) -> Recipe {
        let n = nranks.max(1) as i64;
        let limit = exact_limit(dt);
        let unsigned = is_unsigned(dt);
        let span = |m: i64| if unsigned { (0, m) } else { (-m, m) };
        let (lo, hi, active) = match op {
            None | Some(ReduceOp::Max) | Some(ReduceOp::Min) => {
                let (lo, hi) = span(limit.min(1000));
                (lo, hi, nranks)
            }
            Some(ReduceOp::Sum) | Some(ReduceOp::Avg) | Some(ReduceOp::PreMulSum(_)) => {
                let budget = match op {
                    Some(ReduceOp::PreMulSum(s)) => (limit as f64 / s.abs().max(1.0)) as i64,
                    _ => limit,
                };
                let active = n.min(budget.max(1));
                let (lo, hi) = span((budget / active).clamp(1, 1000));
                (lo, hi, active as usize)
            }
            // Products: values in {1, 2} (and -1 when signed) on at most log2(limit) ranks, ±1 elsewhere.
            Some(ReduceOp::Prod) | Some(_) => {
                let twos = (63 - limit.leading_zeros() as i64).max(0);
                (if unsigned { 1 } else { -1 }, 2, twos.min(n) as usize)
            }
        };
        Recipe {
            dt,
            op,
            nranks,
            lo,
            hi,
            active,
        }
    }

    /// The input value of element `idx` owned by `rank`, for check repetition `seed`.
    #[inline]
    pub fn value(&self, rank: usize, idx: usize, seed: u64) -> f64 {
        let h = mix(seed, rank as u64, idx as u64);
        if rank >= self.active {
            return match self.op {
                Some(ReduceOp::Prod) if self.lo < 0 && h & 1 == 1 => -1.0,
                Some(ReduceOp::Prod) => 1.0,
                _ => 0.0,
            };
        }
        if matches!(self.op, Some(ReduceOp::Prod)) {
            // {1, 2} or {1, 2, -1}
            let choices: &[f64] = if self.lo < 0 { &[1.0, 2.0, -1.0] } else { &[1.0, 2.0] };
            return choices[(h % choices.len() as u64) as usize];
        }
        let range = (self.hi - self.lo + 1) as u64;
        (self.lo + (h % range) as i64) as f64
    }

    /// The input element of `rank` at `idx` in the buffer's type.
    #[inline]
    pub fn input<T: Elem>(&self, rank: usize, idx: usize, seed: u64) -> T {
        T::from_f64(self.value(rank, idx, seed))
    }

    /// The exact reduction over all ranks of their element `idx` (before rounding to the type for `avg`).
    pub fn reduced(&self, idx: usize, seed: u64) -> f64 {
        let vals = (0..self.nranks).map(|r| self.value(r, idx, seed));
        match self.op {
            Some(ReduceOp::Prod) => vals.product(),
            Some(ReduceOp::Max) => vals.fold(f64::NEG_INFINITY, f64::max),
            Some(ReduceOp::Min) => vals.fold(f64::INFINITY, f64::min),
            Some(ReduceOp::Avg) => vals.sum::<f64>() / self.nranks as f64,
            Some(ReduceOp::PreMulSum(s)) => vals.map(|v| v * s).sum(),
            _ => vals.sum(),
        }
    }

    /// True when `got` is an acceptable result for the exact value `want`.
    #[inline]
    pub fn accepts<T: Elem>(&self, got: T, want: f64) -> bool {
        let g = got.to_f64();
        if matches!(self.op, Some(ReduceOp::Avg)) {
            (g - want).abs() <= 2.0 * ulp(self.dt, want)
        } else {
            g == want
        }
    }
}

/// A 64-bit mix of (seed, rank, index); cheap, and every input bit affects the low bits used above.
#[inline]
pub fn mix(seed: u64, rank: u64, idx: u64) -> u64 {
    let mut x = idx.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ rank.wrapping_add(1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ seed.wrapping_add(0x1656_67B1).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 32)
}

/// Counts elements of `got` that `want(i)` does not accept under `recipe`.
pub fn count_wrong<T: Elem>(recipe: &Recipe, got: &[T], want: impl Fn(usize) -> f64) -> u64 {
    got.iter()
        .enumerate()
        .filter(|(i, g)| !recipe.accepts(**g, want(*i)))
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every partial sum of every rank order stays exact: check the worst case (all values at the bound).
    #[test]
    fn sums_stay_exact() {
        for dt in DataType::ALL {
            for n in [1usize, 2, 3, 8, 64, 300] {
                let r = Recipe::new(dt, Some(ReduceOp::Sum), n);
                let worst = r.hi.max(-r.lo) * r.active as i64;
                assert!(worst <= exact_limit(dt), "{dt:?} n={n}: {worst}");
                assert!(r.hi > 0, "{dt:?} n={n}: all-zero inputs would hide missing data");
            }
        }
    }

    #[test]
    fn products_stay_exact() {
        for dt in DataType::ALL {
            let r = Recipe::new(dt, Some(ReduceOp::Prod), 64);
            assert!((1i64 << r.active) <= exact_limit(dt), "{dt:?}");
        }
    }

    #[test]
    fn values_are_representable() {
        for dt in [
            DataType::Float8e5m2,
            DataType::Float8e4m3,
            DataType::Int8,
            DataType::Bfloat16,
        ] {
            for op in [None, Some(ReduceOp::Sum), Some(ReduceOp::Prod), Some(ReduceOp::Avg)] {
                let r = Recipe::new(dt, op, 3);
                for i in 0..1000 {
                    let v = r.value(i % 3, i, 7);
                    let back = match dt {
                        DataType::Float8e5m2 => float8::F8E5M2::from_f64(v).to_f64(),
                        DataType::Float8e4m3 => float8::F8E4M3::from_f64(v).to_f64(),
                        DataType::Int8 => i8::from_f64(v).to_f64(),
                        _ => half::bf16::from_f64(v).to_f64(),
                    };
                    assert_eq!(back, v, "{dt:?} {op:?}");
                }
            }
        }
    }

    #[test]
    fn inputs_depend_on_rank_index_and_seed() {
        let r = Recipe::new(DataType::Float32, None, 4);
        let a: Vec<f64> = (0..64).map(|i| r.value(0, i, 1)).collect();
        let b: Vec<f64> = (0..64).map(|i| r.value(1, i, 1)).collect();
        let c: Vec<f64> = (0..64).map(|i| r.value(0, i, 2)).collect();
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert!(a.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn avg_tolerance_is_two_ulp() {
        let r = Recipe::new(DataType::Float32, Some(ReduceOp::Avg), 3);
        let want = 0.375; // exact in f32: a mean of 3 ranks summing to 1.125
        assert!(r.accepts(want as f32, want));
        assert!(r.accepts(f32::from_bits((want as f32).to_bits() + 2), want));
        assert!(!r.accepts(f32::from_bits((want as f32).to_bits() + 3), want));
        let s = Recipe::new(DataType::Float32, Some(ReduceOp::Sum), 3);
        assert!(!s.accepts(f32::from_bits(1.0f32.to_bits() + 1), 1.0));
    }
}
