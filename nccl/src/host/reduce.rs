//! Element-wise reduction kernels for every [`Elem`] type.
//!
//! Accumulation (documented in the module docs of [`crate::host`]):
//! - integers: wrapping arithmetic in the element type (what NCCL's kernels do; overflow is not an error);
//!   `avg` is the wrapped sum divided by the number of ranks (truncating), as NCCL's `SumPostDiv`.
//! - `f32`/`f64`: IEEE arithmetic in the element type, rounded after every step.
//! - `f16`/`bf16`/fp8: each binary step is computed in `f32` and rounded back to the element type (NCCL
//!   rounds at every hop too: `__hadd`, bf16 and fp8 math on the GPU), so a result is always representable.
//! - `PreMulSum(s)`: `s` is converted to the element type first (NCCL takes the scalar *as* the data type),
//!   each input is multiplied by its own rank's scalar (rounded to the type), then summed.
//! - `avg` on float types: the sum divided by `n` (NCCL multiplies each input by `1/n` in the element type
//!   first); ours is at least as accurate and differs from NCCL's by at most a couple of ULP.

use crate::types::{DataType, Elem, ReduceOp};

/// The binary operation applied between ranks' (pre-scaled) inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Red {
    Sum,
    Prod,
    Max,
    Min,
}

/// A [`ReduceOp`] resolved into a binary operation, an optional per-rank input scale and a final divisor.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub red: Red,
    /// This rank's pre-multiplier (`PreMulSum`), applied to its own input.
    pub scale: Option<f64>,
    /// Divide the result by this (`Avg`); 0 = no division. A plain number rather than an `Option`: LLVM
    /// hoists the loop-invariant `n as f32` of `div_n` out of the reduction loops, which on x86-64 branches
    /// on the sign of `n`; with `None`, that is a branch on an uninitialised payload (harmless, the value is
    /// unused, but it is what valgrind's memcheck reported on every staged and direct reduction).
    pub div: usize,
}

impl Plan {
    pub fn new(op: ReduceOp, nranks: usize) -> Plan {
        match op {
            ReduceOp::Sum => Plan {
                red: Red::Sum,
                scale: None,
                div: 0,
            },
            ReduceOp::Prod => Plan {
                red: Red::Prod,
                scale: None,
                div: 0,
            },
            ReduceOp::Max => Plan {
                red: Red::Max,
                scale: None,
                div: 0,
            },
            ReduceOp::Min => Plan {
                red: Red::Min,
                scale: None,
                div: 0,
            },
            ReduceOp::Avg => Plan {
                red: Red::Sum,
                scale: None,
                div: nranks,
            },
            ReduceOp::PreMulSum(s) => Plan {
                red: Red::Sum,
                scale: Some(s),
                div: 0,
            },
            // `ReduceOp` is non_exhaustive only towards other crates; this crate names every variant.
        }
    }

    /// A small code for signatures: every rank must use the same kind of op (scalars may differ per rank).
    pub fn code(op: ReduceOp) -> u64 {
        match op {
            ReduceOp::Sum => 1,
            ReduceOp::Prod => 2,
            ReduceOp::Max => 3,
            ReduceOp::Min => 4,
            ReduceOp::Avg => 5,
            ReduceOp::PreMulSum(_) => 6,
        }
    }
}

/// Arithmetic of one concrete element type.
trait Arith: Copy + 'static {
    fn add(a: Self, b: Self) -> Self;
    fn mul(a: Self, b: Self) -> Self;
    fn max(a: Self, b: Self) -> Self;
    fn min(a: Self, b: Self) -> Self;
    fn div_n(a: Self, n: usize) -> Self;
    fn scalar(s: f64) -> Self;
}

macro_rules! arith_int {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[inline(always)] fn add(a: Self, b: Self) -> Self { a.wrapping_add(b) }
            #[inline(always)] fn mul(a: Self, b: Self) -> Self { a.wrapping_mul(b) }
            #[inline(always)] fn max(a: Self, b: Self) -> Self { if b > a { b } else { a } }
            #[inline(always)] fn min(a: Self, b: Self) -> Self { if b < a { b } else { a } }
            #[inline(always)] fn div_n(a: Self, n: usize) -> Self { (a as i128 / n as i128) as $t }
            #[inline(always)] fn scalar(s: f64) -> Self { s as $t }
        }
    )*};
}
arith_int!(i8, u8, i32, u32, i64, u64);

macro_rules! arith_float {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[inline(always)] fn add(a: Self, b: Self) -> Self { a + b }
            #[inline(always)] fn mul(a: Self, b: Self) -> Self { a * b }
            #[inline(always)] fn max(a: Self, b: Self) -> Self { if b > a { b } else { a } }
            #[inline(always)] fn min(a: Self, b: Self) -> Self { if b < a { b } else { a } }
            #[inline(always)] fn div_n(a: Self, n: usize) -> Self { a / n as $t }
            #[inline(always)] fn scalar(s: f64) -> Self { s as $t }
        }
    )*};
}
arith_float!(f32, f64);

macro_rules! arith_small_float {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[inline(always)] fn add(a: Self, b: Self) -> Self { <$t>::from_f32(a.to_f32() + b.to_f32()) }
            #[inline(always)] fn mul(a: Self, b: Self) -> Self { <$t>::from_f32(a.to_f32() * b.to_f32()) }
            #[inline(always)] fn max(a: Self, b: Self) -> Self { if b.to_f32() > a.to_f32() { b } else { a } }
            #[inline(always)] fn min(a: Self, b: Self) -> Self { if b.to_f32() < a.to_f32() { b } else { a } }
            #[inline(always)] fn div_n(a: Self, n: usize) -> Self { <$t>::from_f32(a.to_f32() / n as f32) }
            #[inline(always)] fn scalar(s: f64) -> Self { <$t>::from_f64(s) }
        }
    )*};
}
arith_small_float!(half::f16, half::bf16, float8::F8E4M3, float8::F8E5M2);

#[inline(always)]
fn load_a<A: Arith>(dst: &mut [A], src: &[A], scale: Option<f64>) {
    match scale {
        None => dst.copy_from_slice(src),
        Some(s) => {
            let s = A::scalar(s);
            for (d, x) in dst.iter_mut().zip(src) {
                *d = A::mul(*x, s);
            }
        }
    }
}

#[inline(always)]
fn combine_a<A: Arith>(acc: &mut [A], src: &[A], red: Red, scale: Option<f64>) {
    macro_rules! lp {
        ($f:path) => {
            match scale {
                None => {
                    for (a, x) in acc.iter_mut().zip(src) {
                        *a = $f(*a, *x);
                    }
                }
                Some(s) => {
                    let s = A::scalar(s);
                    for (a, x) in acc.iter_mut().zip(src) {
                        *a = $f(*a, A::mul(*x, s));
                    }
                }
            }
        };
    }
    match red {
        Red::Sum => lp!(A::add),
        Red::Prod => lp!(A::mul),
        Red::Max => lp!(A::max),
        Red::Min => lp!(A::min),
    }
}

#[inline(always)]
fn finish_a<A: Arith>(acc: &mut [A], n: usize) {
    for a in acc.iter_mut() {
        *a = A::div_n(*a, n);
    }
}

/// Calls `$body` with `$A` bound to the concrete type of `$T::DATA_TYPE`, and the listed slices re-typed.
macro_rules! dispatch {
    ($T:ty, |$A:ident| $body:expr) => {{
        match <$T as Elem>::DATA_TYPE {
            DataType::Int8 => {
                type $A = i8;
                $body
            }
            DataType::Uint8 => {
                type $A = u8;
                $body
            }
            DataType::Int32 => {
                type $A = i32;
                $body
            }
            DataType::Uint32 => {
                type $A = u32;
                $body
            }
            DataType::Int64 => {
                type $A = i64;
                $body
            }
            DataType::Uint64 => {
                type $A = u64;
                $body
            }
            DataType::Float16 => {
                type $A = half::f16;
                $body
            }
            DataType::Bfloat16 => {
                type $A = half::bf16;
                $body
            }
            DataType::Float32 => {
                type $A = f32;
                $body
            }
            DataType::Float64 => {
                type $A = f64;
                $body
            }
            DataType::Float8e4m3 => {
                type $A = float8::F8E4M3;
                $body
            }
            DataType::Float8e5m2 => {
                type $A = float8::F8E5M2;
                $body
            }
        }
    }};
}

/// Re-types a slice of `T` as the concrete type `A` with the same `DataType`.
///
/// # Safety
/// `A` must be the concrete type for `T::DATA_TYPE` (guaranteed by `dispatch!`).
#[inline(always)]
unsafe fn cast<T: Elem, A>(s: &[T]) -> &[A] {
    debug_assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<A>());
    // SAFETY: `Elem`'s contract says `T` has exactly the size, alignment and bit layout of its `DATA_TYPE`,
    // which is `A`'s layout, and every bit pattern is valid for both; length and lifetime are unchanged.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<A>(), s.len()) }
}

/// # Safety
/// As [`cast`].
#[inline(always)]
unsafe fn cast_mut<T: Elem, A>(s: &mut [T]) -> &mut [A] {
    // SAFETY: as in `cast`; the exclusive borrow is carried over.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<A>(), s.len()) }
}

/// `dst = src` (times this rank's `scale` when given). `dst.len() == src.len()`.
pub(crate) fn load<T: Elem>(dst: &mut [T], src: &[T], scale: Option<f64>) {
    debug_assert_eq!(dst.len(), src.len());
    if scale.is_none() {
        dst.copy_from_slice(src);
        return;
    }
    // SAFETY: `dispatch!` binds `A` to the concrete type of `T::DATA_TYPE`.
    dispatch!(T, |A| unsafe {
        load_a::<A>(cast_mut::<T, A>(dst), cast::<T, A>(src), scale)
    })
}

/// `acc = acc red (src * scale)`, element-wise.
pub(crate) fn combine<T: Elem>(acc: &mut [T], src: &[T], red: Red, scale: Option<f64>) {
    debug_assert_eq!(acc.len(), src.len());
    // SAFETY: `dispatch!` binds `A` to the concrete type of `T::DATA_TYPE`.
    dispatch!(T, |A| unsafe {
        combine_a::<A>(cast_mut::<T, A>(acc), cast::<T, A>(src), red, scale)
    })
}

/// `acc = acc / div` (the `avg` epilogue); nothing when `div` is 0.
pub(crate) fn finish<T: Elem>(acc: &mut [T], div: usize) {
    if let n @ 1.. = div {
        // SAFETY: `dispatch!` binds `A` to the concrete type of `T::DATA_TYPE`.
        dispatch!(T, |A| unsafe { finish_a::<A>(cast_mut::<T, A>(acc), n) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints_wrap_and_avg_truncates() {
        let mut a = [250u8, 3];
        combine(&mut a, &[10u8, 4], Red::Sum, None);
        assert_eq!(a, [4, 7]);
        let mut a = [7i32, -7];
        finish(&mut a, 2);
        assert_eq!(a, [3, -3]);
    }

    #[test]
    fn half_rounds_each_step() {
        let mut a = [half::f16::from_f32(2048.0)];
        combine(&mut a, &[half::f16::from_f32(1.0)], Red::Sum, None);
        // 2049 is not representable in f16: round to even gives 2048.
        assert_eq!(a[0].to_f32(), 2048.0);
    }

    #[test]
    fn premul_uses_scalar_in_type() {
        let mut a = [0i32; 2];
        load(&mut a, &[3, 4], Some(2.7));
        assert_eq!(a, [6, 8]);
        let mut f = [1.0f32];
        combine(&mut f, &[2.0], Red::Sum, Some(0.5));
        assert_eq!(f, [2.0]);
    }
}
