//! The engine's CUDA backend, host side (feature `cuda`): loads the kernels of [`kernels::SOURCE`] through
//! NVRTC for the device's architecture, launches them on one stream with the configurations and shape checks
//! of [`crate::kernels`], and runs linear layers through cuBLAS.
//!
//! Everything goes through cudarc's dynamic loading: a build for CUDA 12 (`--features cuda`) looks for
//! `libcuda.so`, `libnvrtc.so.12`, `libcublas.so.12`; the CUDA 13 build that `scripts/gpu-check.sh` makes
//! (cudarc feature `cuda-13000`) looks for the `.so.13` names. A missing library is a [`CudaError::Library`]
//! here, never cudarc's panic.
//!
//! The engine's CUDA compute backend (`crate::cuda_engine::Cuda`) runs the forward pass on these.
//! Shapes are validated before every launch; a wrong shape is a [`CudaError::Shape`], never a launch.

use std::sync::Arc;

use cudarc::cublas::result::CublasError;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    DeviceRepr, DriverError, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::{CompileError, CompileOptions};
use half::bf16;

use crate::kernels::{
    self, ArgmaxShape, AttentionShape, ElementwiseShape, EmbedShape, Kernel, Launch, LinearShape, RmsNormShape,
    RopeShape, ShapeError, SiluMulShape,
};

/// What can go wrong on the CUDA side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// A CUDA library could not be loaded (no driver, or not on the library path).
    #[error("the {library} library could not be loaded (searched for {names}); set LD_LIBRARY_PATH to where it is")]
    Library {
        /// `CUDA driver`, `NVRTC` or `cuBLAS`.
        library: &'static str,
        /// The file names cudarc looks for.
        names: String,
    },
    /// The device does not exist.
    #[error("CUDA device {ordinal} asked for, but {count} device(s) are visible")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// Devices the driver sees.
        count: usize,
    },
    /// The device is too old for the kernels.
    #[error("CUDA device {ordinal} has compute capability {major}.{minor}; the engine's kernels need 8.0 or later")]
    Arch {
        /// The device.
        ordinal: usize,
        /// Compute capability, major.
        major: i32,
        /// Compute capability, minor.
        minor: i32,
    },
    /// A driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    /// NVRTC refused the kernels' source.
    #[error("NVRTC could not compile the engine's kernels for {arch}: {source}")]
    Compile {
        /// The virtual architecture.
        arch: &'static str,
        /// NVRTC's error (with its log).
        #[source]
        source: CompileError,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0}")]
    Blas(#[from] CublasError),
    /// A shape or buffer a kernel refuses.
    #[error(transparent)]
    Shape(#[from] ShapeError),
}

/// `Result` with [`CudaError`].
pub type Result<T, E = CudaError> = std::result::Result<T, E>;

fn library(present: bool, library: &'static str, lib: &str) -> Result<()> {
    if present {
        return Ok(());
    }
    Err(CudaError::Library {
        library,
        names: cudarc::get_lib_name_candidates(lib).join(", "),
    })
}

/// Whether the CUDA driver, NVRTC and cuBLAS can be loaded ([`CudaError::Library`] naming the first that
/// cannot).
fn check_libraries() -> Result<()> {
    // SAFETY: these only try to load the libraries (dlopen by name) and report whether that worked.
    let (driver, nvrtc, cublas) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
        )
    };
    library(driver, "CUDA driver", "cuda")?;
    library(nvrtc, "NVRTC", "nvrtc")?;
    library(cublas, "cuBLAS", "cublas")
}

/// A storage type of the kernels on the device: f32, or bf16 (`half::bf16`, the same 16 bits as the
/// kernels' `bf16`).
pub trait DeviceElem: kernels::Elem + DeviceRepr + ValidAsZeroBits {
    /// True for bf16.
    const IS_BF16: bool;
}

impl DeviceElem for f32 {
    const IS_BF16: bool = false;
}

impl DeviceElem for bf16 {
    const IS_BF16: bool = true;
}

fn pick<T: DeviceElem>(f32_kernel: Kernel, bf16_kernel: Kernel) -> Kernel {
    if T::IS_BF16 {
        bf16_kernel
    } else {
        f32_kernel
    }
}

fn config(l: Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: l.grid,
        block_dim: l.block,
        shared_mem_bytes: l.shared_bytes,
    }
}

/// The GEMM of [`CudaKernels::linear_bf16_f32`], its buffers' lengths checked: [`LinearShape::check`] with
/// output rows `y_stride` apart.
pub fn linear_strided(
    n: usize,
    rows: usize,
    cols: usize,
    x: usize,
    w: usize,
    y: usize,
    y_stride: usize,
) -> Result<kernels::Gemm, ShapeError> {
    let shape = LinearShape { n, rows, cols };
    let dense = n.checked_mul(rows).ok_or_else(|| ShapeError::Inconsistent {
        kernel: "linear",
        detail: format!("{n} × {rows} outputs overflow"),
    })?;
    let mut g = shape.check(x, w, dense)?;
    if y_stride < rows || i32::try_from(y_stride).is_err() {
        return Err(ShapeError::Inconsistent {
            kernel: "linear",
            detail: format!("output stride {y_stride} for rows of {rows}"),
        });
    }
    let want = n.checked_mul(y_stride).ok_or_else(|| ShapeError::Inconsistent {
        kernel: "linear",
        detail: format!("{n} rows of stride {y_stride} overflow"),
    })?;
    if y != want {
        return Err(ShapeError::Len {
            kernel: "linear",
            what: "y",
            expected: want,
            actual: y,
        });
    }
    g.ldc = y_stride as i32;
    Ok(g)
}

/// `v` as the kernels' `int` (the shape checks have already bounded every size by `i32::MAX`).
fn int(v: usize) -> i32 {
    i32::try_from(v).expect("sizes are checked to fit i32 before any launch")
}

/// A step's positions on the device ([`CudaKernels::upload_positions`]) with their host copy, which the
/// kernels' shape checks read (every position below the cache or table it indexes) before a launch.
pub struct PositionsBuf {
    host: Vec<u32>,
    device: CudaSlice<u32>,
}

impl PositionsBuf {
    /// Every position.
    pub fn all(&self) -> Positions<'_> {
        Positions {
            host: &self.host,
            device: self.device.as_view(),
        }
    }

    /// Positions `rows` (the rows of one sequence in a step of several); `None` when out of range.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Option<Positions<'_>> {
        let host = self.host.get(rows.clone())?;
        Some(Positions {
            host,
            device: self.device.slice(rows),
        })
    }

    /// Overwrites the positions with `positions` (as many as it holds): the host copy at once, the device
    /// copy in stream order (a recorded step's input, rewritten before each launch).
    pub fn rewrite(&mut self, stream: &Arc<CudaStream>, positions: &[u32]) -> Result<()> {
        if positions.len() != self.host.len() {
            return Err(ShapeError::Len {
                kernel: "positions",
                what: "positions",
                expected: self.host.len(),
                actual: positions.len(),
            }
            .into());
        }
        stream.memcpy_htod(positions, &mut self.device)?;
        self.host.copy_from_slice(positions);
        Ok(())
    }
}

/// Positions of some rows, on the device and on the host (see [`PositionsBuf`]).
pub struct Positions<'a> {
    host: &'a [u32],
    device: CudaView<'a, u32>,
}

/// The engine's kernels loaded on one device, with a stream and a cuBLAS handle on it.
pub struct CudaKernels {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    funcs: Vec<CudaFunction>,
    blas: CudaBlas,
    /// cuBLAS's workspace, set once ([`BLAS_WORKSPACE_BYTES`]); declared after `blas` so that the handle is
    /// destroyed before the memory it uses is freed.
    _blas_workspace: CudaSlice<u8>,
    arch: &'static str,
}

/// Bytes of the workspace every cuBLAS handle here gets (`cublasSetWorkspace`): 32 MiB, what NVIDIA advises
/// for Hopper. With a workspace of its own, a GEMM recorded into a CUDA graph uses this buffer, which lives as
/// long as the handle, rather than memory cuBLAS manages itself.
pub const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

impl std::fmt::Debug for CudaKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKernels")
            .field("ordinal", &self.ctx.ordinal())
            .field("arch", &self.arch)
            .finish_non_exhaustive()
    }
}

impl CudaKernels {
    /// Compiles [`kernels::SOURCE`] with NVRTC for device `ordinal`'s architecture, loads every kernel and
    /// creates a stream and a cuBLAS handle. Clear errors when a library, the device or NVRTC fails.
    pub fn new(ordinal: usize) -> Result<Self> {
        check_libraries()?;
        let count = CudaContext::device_count()?.max(0) as usize;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.new_stream()?;
        Self::build(ctx, stream)
    }

    /// [`CudaKernels::new`] on an existing stream (e.g. the one an NCCL communicator is bound to, so that
    /// kernels, cuBLAS and collectives run in one stream order).
    pub fn on_stream(stream: Arc<CudaStream>) -> Result<Self> {
        check_libraries()?;
        let ctx = stream.context().clone();
        Self::build(ctx, stream)
    }

    fn build(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<Self> {
        let ordinal = ctx.ordinal();
        let (major, minor) = ctx.compute_capability()?;
        let arch = kernels::nvrtc_arch(major, minor).ok_or(CudaError::Arch { ordinal, major, minor })?;
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(
            kernels::SOURCE,
            CompileOptions {
                arch: Some(arch),
                name: Some("engine.cu".into()),
                ..Default::default()
            },
        )
        .map_err(|source| CudaError::Compile { arch, source })?;
        let module = ctx.load_module(ptx)?;
        let funcs = Kernel::ALL
            .iter()
            .map(|k| module.load_function(k.name()))
            .collect::<Result<Vec<_>, _>>()?;
        let blas = CudaBlas::new(stream.clone())?;
        let workspace = stream.alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES)?;
        {
            let (ptr, _sync) = workspace.device_ptr(&stream);
            // SAFETY: `blas` is a live handle on `stream`; `workspace` is a device buffer of exactly that many
            // bytes, kept in the returned value for as long as the handle (and freed after it is destroyed).
            unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ptr as *mut std::ffi::c_void,
                    BLAS_WORKSPACE_BYTES,
                )
            }
            .result()?;
        }
        Ok(CudaKernels {
            ctx,
            stream,
            _module: module,
            funcs,
            blas,
            _blas_workspace: workspace,
            arch,
        })
    }

    /// The stream every launch goes on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The NVRTC architecture the kernels were compiled for.
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    fn func(&self, k: Kernel) -> &CudaFunction {
        let i = Kernel::ALL
            .iter()
            .position(|&x| x == k)
            .expect("every kernel is in ALL");
        &self.funcs[i]
    }

    /// Positions go to the device in a small buffer (checked against `limit` first).
    /// Copies a step's positions to the device once, for every kernel of the step to read (a copy per
    /// kernel launch would be three small host-to-device copies per layer and token).
    pub fn upload_positions(&self, positions: &[u32]) -> Result<PositionsBuf> {
        Ok(PositionsBuf {
            device: self.stream.clone_htod(positions)?,
            host: positions.to_vec(),
        })
    }

    /// `embed_f32` / `embed_bf16` (twin: [`kernels::embed`]). Token ids are read on the device; an id
    /// outside this shard gives a row of zeros.
    pub fn embed<T: DeviceElem>(
        &self,
        s: &EmbedShape,
        table: &CudaSlice<T>,
        tokens: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let l = s.check(table.len(), tokens.len(), out.len())?;
        let (hidden, row_start, rows) = (int(s.hidden), int(s.row_start), int(s.rows));
        let k = pick::<T>(Kernel::EmbedF32, Kernel::EmbedBf16);
        let mut b = self.stream.launch_builder(self.func(k));
        b.arg(table)
            .arg(tokens)
            .arg(out)
            .arg(&hidden)
            .arg(&row_start)
            .arg(&rows);
        // SAFETY: the kernel's parameters are (const T*, const unsigned*, float*, int, int, int), pushed in
        // that order with those types; `check` verified that the buffers hold the elements the grid reads and
        // writes (tokens.len() rows of `hidden`, a table of `rows * hidden`).
        unsafe { b.launch(config(l)) }?;
        Ok(())
    }

    /// `rms_norm_f32` (f32 weight and output) or `rms_norm_bf16` (bf16 weight and output); twin:
    /// [`kernels::rms_norm`].
    pub fn rms_norm<T: DeviceElem>(
        &self,
        s: &RmsNormShape,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        let l = s.check(x.len(), weight.len(), out.len())?;
        let (dim, eps) = (int(s.dim), s.eps);
        let k = pick::<T>(Kernel::RmsNormF32, Kernel::RmsNormBf16);
        let mut b = self.stream.launch_builder(self.func(k));
        b.arg(x).arg(weight).arg(out).arg(&dim).arg(&eps);
        // SAFETY: parameters (const float*, const W*, O*, int, float) with W = O = T, in order; `check`
        // verified rows * dim elements of x and out and dim of the weight, one block per row.
        unsafe { b.launch(config(l)) }?;
        Ok(())
    }

    /// `rope_f32` in place on `x` (twin: [`kernels::rope`]); `cos`/`sin` are [`kernels::rope_tables`]
    /// uploaded once.
    pub fn rope(
        &self,
        s: &RopeShape,
        x: &mut CudaSlice<f32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        positions: &Positions<'_>,
    ) -> Result<()> {
        let l = s.check(x.len(), cos.len(), sin.len(), positions.host)?;
        let pos = &positions.device;
        let (stride, heads, half) = (int(s.row_stride), int(s.heads), int(s.half));
        let mut b = self.stream.launch_builder(self.func(Kernel::RopeF32));
        b.arg(x).arg(cos).arg(sin).arg(pos).arg(&stride).arg(&heads).arg(&half);
        // SAFETY: parameters (float*, const float*, const float*, const unsigned*, int, int, int) in order;
        // `check` verified the row buffer, both tables of max_pos * half and that every position is below
        // max_pos.
        unsafe { b.launch(config(l)) }?;
        Ok(())
    }

    /// `kv_append_f32` / `kv_append_bf16` (twin: [`kernels::kv_append`]): row `t`'s keys and values into
    /// position `positions[t]` of one layer's cache.
    pub fn kv_append<T: DeviceElem>(
        &self,
        s: &AttentionShape,
        qkv: &CudaView<'_, f32>,
        k_cache: &mut CudaSlice<T>,
        v_cache: &mut CudaSlice<T>,
        positions: &Positions<'_>,
    ) -> Result<()> {
        s.check_buffers(qkv.len(), k_cache.len(), v_cache.len(), positions.host)?;
        let l = s.kv_append_launch()?;
        let pos = &positions.device;
        let (stride, ko, vo) = (int(s.row_stride), int(s.k_offset()), int(s.v_offset()));
        let (kv, hd, max_seq) = (int(s.kv_heads), int(s.head_dim), int(s.max_seq));
        let k = pick::<T>(Kernel::KvAppendF32, Kernel::KvAppendBf16);
        let mut b = self.stream.launch_builder(self.func(k));
        b.arg(qkv).arg(k_cache).arg(v_cache).arg(pos);
        b.arg(&stride).arg(&ko).arg(&vo).arg(&kv).arg(&hd).arg(&max_seq);
        // SAFETY: parameters (const float*, T*, T*, const unsigned*, int × 6) in order; `check_buffers`
        // verified the qkv rows, both caches of kv_heads * max_seq * head_dim and every position < max_seq.
        unsafe { b.launch(config(l)) }?;
        Ok(())
    }

    /// `attention_f32` / `attention_bf16` (twin: [`kernels::attention`]): decode or causal prefill over
    /// the cache, `out` is `[rows][q_heads][head_dim]`.
    pub fn attention<T: DeviceElem>(
        &self,
        s: &AttentionShape,
        qkv: &CudaView<'_, f32>,
        k_cache: &CudaSlice<T>,
        v_cache: &CudaSlice<T>,
        positions: &Positions<'_>,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        s.check_buffers(qkv.len(), k_cache.len(), v_cache.len(), positions.host)?;
        let want = s.rows * s.q_heads * s.head_dim;
        if out.len() != want {
            return Err(ShapeError::Len {
                kernel: "attention",
                what: "out",
                expected: want,
                actual: out.len(),
            }
            .into());
        }
        let l = s.attention_launch()?;
        let pos = &positions.device;
        let (stride, nq, hd, max_seq) = (int(s.row_stride), int(s.q_heads), int(s.head_dim), int(s.max_seq));
        let (group, q_start, kv_start, scale) = (int(s.group), int(s.q_start), int(s.kv_start), s.scale());
        let k = pick::<T>(Kernel::AttentionF32, Kernel::AttentionBf16);
        let mut b = self.stream.launch_builder(self.func(k));
        b.arg(qkv).arg(k_cache).arg(v_cache).arg(out).arg(pos);
        b.arg(&stride)
            .arg(&nq)
            .arg(&hd)
            .arg(&max_seq)
            .arg(&group)
            .arg(&q_start)
            .arg(&kv_start)
            .arg(&scale);
        // SAFETY: parameters (const float*, const T*, const T*, float*, const unsigned*, int × 7, float) in
        // order; `check_buffers` verified the qkv rows, both caches, every position < max_seq, head_dim ≤
        // MAX_HEAD_DIM and that every query head maps to a local KV head; `out` was checked just above.
        unsafe { b.launch(config(l)) }?;
        Ok(())
    }

    /// `silu_mul_f32` / `silu_mul_bf16` (twin: [`kernels::silu_mul`]).
    pub fn silu_mul<T: DeviceElem>(
        &self,
        s: &SiluMulShape,
        gate_up: &CudaSlice<f32>,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        let l = s.check(gate_up.len(), out.len())?;
        let ffn = int(s.ffn);
        let k = pick::<T>(Kernel::SiluMulF32, Kernel::SiluMulBf16);
        let mut b = self.stream.launch_builder(self.func(k));
        b.arg(gate_up).arg(out).arg(&ffn);
        // SAFETY: parameters (const float*, O*, int) with O = T; `check` verified rows * 2 ffn inputs and
        // rows * ffn outputs.
        unsafe { b.launch(config(l)) }?;
        Ok(())
    }

    /// `residual_add_f32` / `residual_add_bf16` (twin: [`kernels::residual_add`]): `x += delta`.
    pub fn residual_add<T: DeviceElem>(&self, x: &mut CudaSlice<f32>, delta: &CudaSlice<T>) -> Result<()> {
        let s = ElementwiseShape { n: x.len() };
        let l = s.check(x.len(), delta.len())?;
        let n = int(s.n);
        let k = pick::<T>(Kernel::ResidualAddF32, Kernel::ResidualAddBf16);
        let mut b = self.stream.launch_builder(self.func(k));
        b.arg(x).arg(delta).arg(&n);
        // SAFETY: parameters (float*, const T*, int); both buffers hold n elements (checked).
        unsafe { b.launch(config(l)) }?;
        Ok(())
    }

    /// `cast_f32_bf16` (twin: [`kernels::cast_bf16`]).
    pub fn cast_bf16(&self, x: &CudaSlice<f32>, out: &mut CudaSlice<bf16>) -> Result<()> {
        let s = ElementwiseShape { n: x.len() };
        let l = s.check(x.len(), out.len())?;
        let n = int(s.n);
        let mut b = self.stream.launch_builder(self.func(Kernel::CastF32Bf16));
        b.arg(x).arg(out).arg(&n);
        // SAFETY: parameters (const float*, bf16*, int); both buffers hold n elements (checked), and
        // half::bf16 has the layout of the kernel's 16-bit bf16.
        unsafe { b.launch(config(l)) }?;
        Ok(())
    }

    /// `argmax_f32` (twin: [`kernels::argmax`]): the greedy token of each row of logits.
    pub fn argmax(&self, s: &ArgmaxShape, logits: &CudaSlice<f32>, out: &mut CudaSlice<u32>) -> Result<()> {
        let l = s.check(logits.len(), out.len())?;
        let vocab = int(s.vocab);
        let mut b = self.stream.launch_builder(self.func(Kernel::ArgmaxF32));
        b.arg(logits).arg(out).arg(&vocab);
        // SAFETY: parameters (const float*, unsigned*, int); rows * vocab logits and rows outputs (checked),
        // one block per row.
        unsafe { b.launch(config(l)) }?;
        Ok(())
    }

    /// A linear layer through cuBLAS with bf16 inputs and weights, f32 accumulation and f32 output:
    /// `y[t, 0..rows] = W · x[t, :]` for `n` rows, output row `t` starting at `t * y_stride` (`y_stride ≥
    /// rows`; the elements past `rows` are left as they are). `y` holds `n * y_stride` elements.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_bf16_f32(
        &self,
        x: &CudaSlice<bf16>,
        n: usize,
        w: &CudaSlice<bf16>,
        rows: usize,
        cols: usize,
        y: &mut CudaSlice<f32>,
        y_stride: usize,
    ) -> Result<()> {
        let g = linear_strided(n, rows, cols, x.len(), w.len(), y.len(), y_stride)?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (a, _ra) = w.device_ptr(&self.stream);
        let (b, _rb) = x.device_ptr(&self.stream);
        let (c, _rc) = y.device_ptr_mut(&self.stream);
        // SAFETY: `linear_strided` checked that w holds rows * cols, x n * cols and y n * y_stride elements,
        // which is what this column-major product (C = Wᵀ' · X, m = rows, n = n, k = cols, lda = ldb = cols,
        // ldc = y_stride ≥ rows) reads and writes; the pointers come from live buffers whose stream records
        // are held until the call is enqueued; alpha and beta are host f32s, as CUBLAS_COMPUTE_32F needs.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                g.m,
                g.n,
                g.k,
                (&alpha) as *const f32 as *const _,
                a as *const _,
                cudaDataType_t::CUDA_R_16BF,
                g.lda,
                b as *const _,
                cudaDataType_t::CUDA_R_16BF,
                g.ldb,
                (&beta) as *const f32 as *const _,
                c as *mut _,
                cudaDataType_t::CUDA_R_32F,
                g.ldc,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        Ok(())
    }

    /// A linear layer through cuBLAS: `y[t, :] = W · x[t, :]` for `n` rows, `W` row-major `[rows, cols]`
    /// (twin: [`crate::math::linear`]). For bf16, inputs, weights and outputs are bf16 and cuBLAS
    /// accumulates in f32.
    pub fn linear<T: DeviceElem>(
        &self,
        x: &CudaSlice<T>,
        n: usize,
        w: &CudaSlice<T>,
        rows: usize,
        cols: usize,
        y: &mut CudaSlice<T>,
    ) -> Result<()>
    where
        CudaBlas: Gemm<T>,
    {
        let g = LinearShape { n, rows, cols }.check(x.len(), w.len(), y.len())?;
        let cfg = GemmConfig {
            transa: if g.transpose_a {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            },
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: g.m,
            n: g.n,
            k: g.k,
            alpha: T::from_f32(1.0),
            lda: g.lda,
            ldb: g.ldb,
            beta: T::from_f32(0.0),
            ldc: g.ldc,
        };
        // SAFETY: `LinearShape::check` checked that x holds n * cols, w rows * cols and y n * rows elements,
        // which is what this column-major product reads and writes with these leading dimensions.
        unsafe { self.blas.gemm(cfg, w, x, y) }?;
        Ok(())
    }
}
