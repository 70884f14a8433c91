//! Reduction operators: built-in ones and NCCL's `PreMulSum` (sum of `scalar * x`), which is created per
//! communicator and data type and must be destroyed.

use crate::comm::{Communicator, Shared};
use crate::error::{Error, Result};
use crate::result::{self, ffi};
use crate::types::{DataType, Elem, ReduceOp};
use std::marker::PhantomData;
use std::sync::Arc;

/// `ncclScalarHostImmediate`: NCCL reads the scalar from host memory before the create call returns.
const SCALAR_HOST_IMMEDIATE: i32 = 1;

/// A resolved `ncclRedOp_t` for one call, destroying a temporary PreMulSum when dropped.
#[derive(Debug)]
pub struct OpHandle {
    pub(crate) raw: i32,
    owner: Option<Arc<Shared>>,
}

impl Drop for OpHandle {
    fn drop(&mut self) {
        if let Some(shared) = self.owner.take() {
            destroy(&shared, self.raw);
        }
    }
}

fn destroy(shared: &Shared, op: i32) {
    const OP: &str = "ncclRedOpDestroy";
    let res = shared.with(OP, |raw| {
        // SAFETY: `op` was created on this live communicator (held under its lock) and is not used again; NCCL
        // allows destroying an op as soon as the last call using it returned.
        unsafe {
            let code = ffi!(OP, ncclRedOpDestroy(op as _, raw));
            result::check(OP, code, raw)
        }
    });
    match res {
        Ok(()) | Err(Error::Aborted { .. }) => {} // an abort already freed every op of the communicator
        Err(e) => tracing::warn!("nccl: destroying a PreMulSum op failed: {e}"),
    }
}

/// The bytes of `x` converted to `dtype`'s Rust type, in native byte order (NCCL reads `dtype`'s size).
fn scalar_bytes(dtype: DataType, x: f64) -> [u8; 8] {
    fn put<T: Elem + bytemuck::Pod>(x: f64) -> [u8; 8] {
        let mut out = [0u8; 8];
        let v = T::from_f64(x);
        let b = bytemuck::bytes_of(&v);
        out[..b.len()].copy_from_slice(b);
        out
    }
    match dtype {
        DataType::Int8 => put::<i8>(x),
        DataType::Uint8 => put::<u8>(x),
        DataType::Int32 => put::<i32>(x),
        DataType::Uint32 => put::<u32>(x),
        DataType::Int64 => put::<i64>(x),
        DataType::Uint64 => put::<u64>(x),
        DataType::Float16 => put::<half::f16>(x),
        DataType::Float32 => put::<f32>(x),
        DataType::Float64 => put::<f64>(x),
        DataType::Bfloat16 => put::<half::bf16>(x),
        DataType::Float8e4m3 => put::<float8::F8E4M3>(x),
        DataType::Float8e5m2 => put::<float8::F8E5M2>(x),
    }
}

fn create(comm: &Communicator, dtype: DataType, scalar: &mut [u8; 8]) -> Result<i32> {
    const OP: &str = "ncclRedOpCreatePreMulSum";
    result::require_loaded(OP, crate::version::since::PREMULSUM)?;
    comm.shared.with(OP, |raw| {
        let mut op: nccl_sys::ncclRedOp_t = 0 as _;
        // SAFETY: `raw` is live under the lock; `scalar` holds a value of `dtype` (at most 8 bytes) that NCCL
        // reads before returning (host-immediate residence); `op` is a valid out-pointer.
        unsafe {
            let code = ffi!(
                OP,
                ncclRedOpCreatePreMulSum(
                    &mut op,
                    scalar.as_mut_ptr().cast(),
                    dtype.raw() as _,
                    SCALAR_HOST_IMMEDIATE as _,
                    raw
                )
            );
            result::check(OP, code, raw)?;
        }
        #[allow(clippy::unnecessary_cast)]
        Ok(op as i32)
    })
}

mod private {
    pub trait Sealed {}
    impl Sealed for crate::types::ReduceOp {}
    impl<T: crate::types::Elem> Sealed for &crate::premul::PreMulSum<'_, T> {}
}

/// A reduction a collective can use: a [`ReduceOp`] (for [`ReduceOp::PreMulSum`] a temporary operator is
/// created before the call and destroyed after it) or a [`PreMulSum`] created once on the communicator.
pub trait Reduction: private::Sealed {
    /// The `ncclRedOp_t` for a call on `comm` with elements of `dtype`.
    #[doc(hidden)]
    fn resolve(&self, comm: &Communicator, dtype: DataType) -> Result<OpHandle>;
}

impl Reduction for ReduceOp {
    fn resolve(&self, comm: &Communicator, dtype: DataType) -> Result<OpHandle> {
        if let Some(raw) = self.builtin_raw() {
            if *self == ReduceOp::Avg {
                result::require_loaded("ncclAvg", crate::version::since::AVG)?;
            }
            return Ok(OpHandle { raw, owner: None });
        }
        let ReduceOp::PreMulSum(x) = *self else {
            return Err(Error::invalid(
                "reduce op",
                format!("{self:?} is not supported by NCCL"),
            ));
        };
        let mut bytes = scalar_bytes(dtype, x);
        let raw = create(comm, dtype, &mut bytes)?;
        Ok(OpHandle {
            raw,
            owner: Some(comm.shared.clone()),
        })
    }
}

impl<T: Elem> Reduction for &PreMulSum<'_, T> {
    fn resolve(&self, comm: &Communicator, dtype: DataType) -> Result<OpHandle> {
        if !Arc::ptr_eq(&self.comm.shared, &comm.shared) {
            return Err(Error::invalid(
                "PreMulSum",
                "the operator was created on another communicator",
            ));
        }
        if dtype != T::DATA_TYPE {
            return Err(Error::invalid(
                "PreMulSum",
                format!(
                    "the operator is for {:?} elements, the call moves {dtype:?}",
                    T::DATA_TYPE
                ),
            ));
        }
        Ok(OpHandle {
            raw: self.op,
            owner: None,
        })
    }
}

/// A PreMulSum reduction operator (`ncclRedOpCreatePreMulSum`, NCCL 2.11+): every rank's input is multiplied
/// by `scalar` before summing, e.g. `1/n` for an average of integers or a gradient scale. Valid only for
/// collectives on the communicator it was created on, with elements of type `T` (checked at each call).
/// Destroyed (`ncclRedOpDestroy`) on drop; the borrow keeps the communicator alive until then.
///
/// ```no_run
/// # #[cfg(feature = "cuda")] fn f(comm: &nccl::Communicator, buf: &mut cudarc::driver::CudaSlice<f32>)
/// # -> nccl::Result<()> {
/// let scale = comm.pre_mul_sum(0.5f32)?;
/// comm.all_reduce_in_place(buf, &scale)?; // buf = sum over ranks of 0.5 * buf
/// # Ok(()) }
/// ```
#[doc(alias = "ncclRedOpCreatePreMulSum")]
#[doc(alias = "ncclRedOpDestroy")]
#[derive(Debug)]
pub struct PreMulSum<'c, T: Elem> {
    comm: &'c Communicator,
    op: i32,
    scalar: T,
    _t: PhantomData<T>,
}

impl<T: Elem> PreMulSum<'_, T> {
    /// The scalar inputs are multiplied by.
    pub fn scalar(&self) -> T {
        self.scalar
    }
    /// The raw `ncclRedOp_t`, for the `*_raw` calls.
    pub fn raw(&self) -> i32 {
        self.op
    }
}

impl<T: Elem> Drop for PreMulSum<'_, T> {
    fn drop(&mut self) {
        destroy(&self.comm.shared, self.op);
    }
}

impl Communicator {
    /// Creates a [`PreMulSum`] operator multiplying inputs of type `T` by `scalar`
    /// (`ncclRedOpCreatePreMulSum` with `ncclScalarHostImmediate`).
    #[doc(alias = "ncclRedOpCreatePreMulSum")]
    pub fn pre_mul_sum<T: Elem + bytemuck::Pod>(&self, scalar: T) -> Result<PreMulSum<'_, T>> {
        crate::collective::check_dtype("ncclRedOpCreatePreMulSum", T::DATA_TYPE)?;
        let mut bytes = [0u8; 8];
        let b = bytemuck::bytes_of(&scalar);
        bytes[..b.len()].copy_from_slice(b);
        let op = create(self, T::DATA_TYPE, &mut bytes)?;
        Ok(PreMulSum {
            comm: self,
            op,
            scalar,
            _t: PhantomData,
        })
    }
}
