//! Element types and reduction operations, shared by the NCCL and host backends.

use std::fmt::Debug;

/// NCCL's `ncclDataType_t`, as a Rust enum for matching. The raw value is [`DataType::raw`].
///
/// The C enum can grow (fp8 arrived in 2.24); values this crate does not know never come *from* NCCL, only go
/// to it, so a Rust enum is safe here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DataType {
    /// `ncclInt8` (also `ncclChar`).
    Int8,
    /// `ncclUint8`.
    Uint8,
    /// `ncclInt32`.
    Int32,
    /// `ncclUint32`.
    Uint32,
    /// `ncclInt64`.
    Int64,
    /// `ncclUint64`.
    Uint64,
    /// `ncclFloat16` (IEEE half).
    Float16,
    /// `ncclFloat32`.
    Float32,
    /// `ncclFloat64`.
    Float64,
    /// `ncclBfloat16`.
    Bfloat16,
    /// `ncclFloat8e4m3` (NCCL 2.24+).
    Float8e4m3,
    /// `ncclFloat8e5m2` (NCCL 2.24+).
    Float8e5m2,
}

impl DataType {
    /// Every data type, in `ncclDataType_t` order.
    pub const ALL: [DataType; 12] = [
        DataType::Int8,
        DataType::Uint8,
        DataType::Int32,
        DataType::Uint32,
        DataType::Int64,
        DataType::Uint64,
        DataType::Float16,
        DataType::Float32,
        DataType::Float64,
        DataType::Bfloat16,
        DataType::Float8e4m3,
        DataType::Float8e5m2,
    ];

    /// The `ncclDataType_t` value.
    pub const fn raw(self) -> i32 {
        match self {
            DataType::Int8 => 0,
            DataType::Uint8 => 1,
            DataType::Int32 => 2,
            DataType::Uint32 => 3,
            DataType::Int64 => 4,
            DataType::Uint64 => 5,
            DataType::Float16 => 6,
            DataType::Float32 => 7,
            DataType::Float64 => 8,
            DataType::Bfloat16 => 9,
            DataType::Float8e4m3 => 10,
            DataType::Float8e5m2 => 11,
        }
    }

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DataType::Int8 | DataType::Uint8 | DataType::Float8e4m3 | DataType::Float8e5m2 => 1,
            DataType::Float16 | DataType::Bfloat16 => 2,
            DataType::Int32 | DataType::Uint32 | DataType::Float32 => 4,
            DataType::Int64 | DataType::Uint64 | DataType::Float64 => 8,
        }
    }

    /// The name nccl-tests uses (`-d` flag and the `type` column): `int8`, `float`, `bfloat16`, `f8e4m3`, ...
    pub const fn nccl_tests_name(self) -> &'static str {
        match self {
            DataType::Int8 => "int8",
            DataType::Uint8 => "uint8",
            DataType::Int32 => "int32",
            DataType::Uint32 => "uint32",
            DataType::Int64 => "int64",
            DataType::Uint64 => "uint64",
            DataType::Float16 => "half",
            DataType::Float32 => "float",
            DataType::Float64 => "double",
            DataType::Bfloat16 => "bfloat16",
            DataType::Float8e4m3 => "f8e4m3",
            DataType::Float8e5m2 => "f8e5m2",
        }
    }

    /// True for floating-point types.
    pub const fn is_float(self) -> bool {
        matches!(
            self,
            DataType::Float16
                | DataType::Float32
                | DataType::Float64
                | DataType::Bfloat16
                | DataType::Float8e4m3
                | DataType::Float8e5m2
        )
    }

    /// The first NCCL version that has this type ([`since::FP8`](crate::version::since::FP8),
    /// [`since::BF16`](crate::version::since::BF16)); 1.0 for the types NCCL always had.
    pub const fn min_version(self) -> crate::Version {
        use crate::version::since;
        match self {
            DataType::Float8e4m3 | DataType::Float8e5m2 => since::FP8,
            DataType::Bfloat16 => since::BF16,
            _ => crate::Version::new(1, 0, 0),
        }
    }
}

/// A Rust type that NCCL can move and reduce.
///
/// # Safety
/// An implementer promises that the type has exactly the size, alignment and bit layout of
/// [`Elem::DATA_TYPE`] and that every bit pattern of that size is a valid value (NCCL and peer ranks write
/// arbitrary bytes into these buffers). Never implement it for `bool` or `char`.
pub unsafe trait Elem: Copy + Send + Sync + PartialEq + Debug + Default + 'static {
    /// The NCCL data type with this layout.
    const DATA_TYPE: DataType;
    /// Converts to `f64` (exact for every integer up to 2^53 and every float type here).
    fn to_f64(self) -> f64;
    /// Converts from `f64`, rounding as `as` casts (integers) or the format's round-to-nearest (floats) do.
    fn from_f64(v: f64) -> Self;
}

macro_rules! elem_primitive {
    ($($t:ty => $dt:ident),* $(,)?) => {$(
        // SAFETY: a Rust primitive has the C layout of the NCCL type of the same width and signedness, and
        // every bit pattern is a valid value.
        unsafe impl Elem for $t {
            const DATA_TYPE: DataType = DataType::$dt;
            #[inline]
            fn to_f64(self) -> f64 { self as f64 }
            #[inline]
            fn from_f64(v: f64) -> Self { v as $t }
        }
    )*};
}
elem_primitive!(i8 => Int8, u8 => Uint8, i32 => Int32, u32 => Uint32, i64 => Int64, u64 => Uint64,
    f32 => Float32, f64 => Float64);

macro_rules! elem_wrapped_float {
    ($($t:ty => $dt:ident),* $(,)?) => {$(
        // SAFETY: these types are `#[repr(transparent)]` wrappers of the bit pattern of the named IEEE/OCP
        // format (16 or 8 bits), so any byte pattern is a valid value, matching NCCL's type of that name.
        unsafe impl Elem for $t {
            const DATA_TYPE: DataType = DataType::$dt;
            #[inline]
            fn to_f64(self) -> f64 {
                // Through a reference so the inherent method (by value in `half`, by reference in
                // `float8`) is found before this trait method.
                let v = &self;
                v.to_f64()
            }
            #[inline]
            fn from_f64(v: f64) -> Self { <$t>::from_f64(v) }
        }
    )*};
}
elem_wrapped_float!(half::f16 => Float16, half::bf16 => Bfloat16, float8::F8E4M3 => Float8e4m3,
    float8::F8E5M2 => Float8e5m2);

/// A reduction operation.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum ReduceOp {
    /// `ncclSum`.
    Sum,
    /// `ncclProd`.
    Prod,
    /// `ncclMax`.
    Max,
    /// `ncclMin`.
    Min,
    /// `ncclAvg`: the sum divided by the number of ranks.
    Avg,
    /// Sum of `scalar * x` over ranks (NCCL's `ncclRedOpCreatePreMulSum` with a host scalar; nccl-tests'
    /// `mulsum`). The NCCL backend creates and destroys the op around the call; for repeated use prefer
    /// [`PreMulSum`](crate::PreMulSum) on a communicator.
    PreMulSum(f64),
}

impl ReduceOp {
    /// The built-in `ncclRedOp_t` value, or `None` for [`ReduceOp::PreMulSum`] (created per communicator).
    pub const fn builtin_raw(self) -> Option<i32> {
        match self {
            ReduceOp::Sum => Some(0),
            ReduceOp::Prod => Some(1),
            ReduceOp::Max => Some(2),
            ReduceOp::Min => Some(3),
            ReduceOp::Avg => Some(4),
            ReduceOp::PreMulSum(_) => None,
        }
    }

    /// The name nccl-tests prints in its `redop` column.
    pub const fn nccl_tests_name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Prod => "prod",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
            ReduceOp::Avg => "avg",
            ReduceOp::PreMulSum(_) => "mulsum",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: Elem>() {
        assert_eq!(std::mem::size_of::<T>(), T::DATA_TYPE.size(), "{:?}", T::DATA_TYPE);
        assert!(std::mem::align_of::<T>() <= T::DATA_TYPE.size());
        assert_eq!(T::from_f64(3.0).to_f64(), 3.0, "{:?}", T::DATA_TYPE);
    }

    #[test]
    fn sizes_match_nccl() {
        check::<i8>();
        check::<u8>();
        check::<i32>();
        check::<u32>();
        check::<i64>();
        check::<u64>();
        check::<f32>();
        check::<f64>();
        check::<half::f16>();
        check::<half::bf16>();
        check::<float8::F8E4M3>();
        check::<float8::F8E5M2>();
    }

    #[test]
    fn raw_values_follow_nccl_h() {
        for (i, dt) in DataType::ALL.iter().enumerate() {
            assert_eq!(dt.raw(), i as i32);
        }
    }
}
