//! The engine's CUDA kernels seen from the host, with no device needed: their source
//! (`llm/kernels/engine.cu`), their names, the launch configuration each one expects, the shape checks done
//! before any launch, and a CPU twin of every kernel with the same semantics.
//!
//! The twins are the reference the GPU tests compare the kernels with (`llm/tests/kernels_gpu.rs`, on random
//! inputs, within the per-dtype bounds of [`Tolerance`]); they reuse the CPU engine's own operations
//! ([`math::rms_norm`], [`Rope`], [`math::silu_mul`], [`math::dot`], [`math::softmax`], [`sample::argmax`])
//! wherever those are exactly the kernel's semantics, and CI tests them against those operations.
//! The CUDA side that loads and launches the kernels is [`crate::cuda`] (feature `cuda`).
//!
//! Shapes are checked here, once, for both: a twin and a launch refuse the same bad shape with the same
//! [`ShapeError`].

use half::bf16;

use crate::math::{self, Rope};
use crate::sample;

/// The CUDA C++ source of every kernel (no `#include`: it compiles the same with nvcc and NVRTC).
pub const SOURCE: &str = include_str!("../kernels/engine.cu");

/// Threads per block of every kernel but attention (`ENGINE_BLOCK` in the source).
pub const BLOCK: u32 = 256;
/// Threads per block of attention (`ATTN_WARPS * 32` in the source).
pub const ATTN_THREADS: u32 = 128;
/// The largest `head_dim` attention supports (`MAX_HEAD_DIM` in the source).
pub const MAX_HEAD_DIM: usize = 256;
/// The largest grid y (and z) dimension CUDA allows; rows of a batch are laid along y.
pub const MAX_GRID_Y: u32 = 65_535;

/// One kernel of [`SOURCE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Embedding gather, f32 table.
    EmbedF32,
    /// Embedding gather, bf16 table.
    EmbedBf16,
    /// RMSNorm, f32 weight and output.
    RmsNormF32,
    /// RMSNorm, bf16 weight and output.
    RmsNormBf16,
    /// Rotary embedding in place (f32).
    RopeF32,
    /// KV-cache append, f32 cache.
    KvAppendF32,
    /// KV-cache append, bf16 cache.
    KvAppendBf16,
    /// Attention over an f32 KV cache.
    AttentionF32,
    /// Attention over a bf16 KV cache.
    AttentionBf16,
    /// SiLU-mul, f32 output.
    SiluMulF32,
    /// SiLU-mul, bf16 output.
    SiluMulBf16,
    /// Residual add of an f32 delta.
    ResidualAddF32,
    /// Residual add of a bf16 delta.
    ResidualAddBf16,
    /// f32 to bf16.
    CastF32Bf16,
    /// Greedy argmax of each row.
    ArgmaxF32,
}

impl Kernel {
    /// Every kernel of [`SOURCE`].
    pub const ALL: [Kernel; 15] = [
        Kernel::EmbedF32,
        Kernel::EmbedBf16,
        Kernel::RmsNormF32,
        Kernel::RmsNormBf16,
        Kernel::RopeF32,
        Kernel::KvAppendF32,
        Kernel::KvAppendBf16,
        Kernel::AttentionF32,
        Kernel::AttentionBf16,
        Kernel::SiluMulF32,
        Kernel::SiluMulBf16,
        Kernel::ResidualAddF32,
        Kernel::ResidualAddBf16,
        Kernel::CastF32Bf16,
        Kernel::ArgmaxF32,
    ];

    /// The `extern "C"` name of the kernel in [`SOURCE`].
    pub fn name(self) -> &'static str {
        match self {
            Kernel::EmbedF32 => "embed_f32",
            Kernel::EmbedBf16 => "embed_bf16",
            Kernel::RmsNormF32 => "rms_norm_f32",
            Kernel::RmsNormBf16 => "rms_norm_bf16",
            Kernel::RopeF32 => "rope_f32",
            Kernel::KvAppendF32 => "kv_append_f32",
            Kernel::KvAppendBf16 => "kv_append_bf16",
            Kernel::AttentionF32 => "attention_f32",
            Kernel::AttentionBf16 => "attention_bf16",
            Kernel::SiluMulF32 => "silu_mul_f32",
            Kernel::SiluMulBf16 => "silu_mul_bf16",
            Kernel::ResidualAddF32 => "residual_add_f32",
            Kernel::ResidualAddBf16 => "residual_add_bf16",
            Kernel::CastF32Bf16 => "cast_f32_bf16",
            Kernel::ArgmaxF32 => "argmax_f32",
        }
    }
}

/// A kernel launch configuration: blocks in the grid, threads per block, dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Blocks along x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads along x, y, z.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block, in bytes (every kernel here uses static shared memory only).
    pub shared_bytes: u32,
}

/// A shape a kernel (and its twin) refuses, found before anything is launched.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShapeError {
    /// A size is past what the kernels' 32-bit indices or the grid can address.
    #[error("{kernel}: {what} = {value} is more than the kernel can address ({limit} at most)")]
    TooLarge {
        /// The kernel.
        kernel: &'static str,
        /// Which size.
        what: &'static str,
        /// Its value.
        value: usize,
        /// The largest value allowed.
        limit: usize,
    },
    /// A size that must be non-zero is zero.
    #[error("{kernel}: {what} must be non-zero")]
    Zero {
        /// The kernel.
        kernel: &'static str,
        /// Which size.
        what: &'static str,
    },
    /// A buffer does not hold the number of elements the shape implies.
    #[error("{kernel}: {what} holds {actual} elements, the shape needs {expected}")]
    Len {
        /// The kernel.
        kernel: &'static str,
        /// Which buffer.
        what: &'static str,
        /// Elements the shape implies.
        expected: usize,
        /// Elements given.
        actual: usize,
    },
    /// The sizes contradict each other.
    #[error("{kernel}: {detail}")]
    Inconsistent {
        /// The kernel.
        kernel: &'static str,
        /// What does not fit.
        detail: String,
    },
    /// A row's position is outside the cache or the rotary tables.
    #[error("{kernel}: row {row} is at position {pos}, but only {limit} positions exist")]
    Position {
        /// The kernel.
        kernel: &'static str,
        /// The row.
        row: usize,
        /// Its position.
        pos: u32,
        /// Positions available.
        limit: usize,
    },
}

/// `Result` with [`ShapeError`].
pub type ShapeResult<T> = Result<T, ShapeError>;

const I32_MAX: usize = i32::MAX as usize;

fn nonzero(kernel: &'static str, what: &'static str, v: usize) -> ShapeResult<()> {
    if v == 0 {
        return Err(ShapeError::Zero { kernel, what });
    }
    Ok(())
}

/// `v` fits the kernels' `int` indices (every element index of a buffer is below `i32::MAX` as well, so
/// the products below are checked too).
fn fits_i32(kernel: &'static str, what: &'static str, v: usize) -> ShapeResult<()> {
    if v > I32_MAX {
        return Err(ShapeError::TooLarge {
            kernel,
            what,
            value: v,
            limit: I32_MAX,
        });
    }
    Ok(())
}

/// `a * b`, refused when it passes `i32::MAX`.
fn product(kernel: &'static str, what: &'static str, a: usize, b: usize) -> ShapeResult<usize> {
    let p = a.saturating_mul(b);
    fits_i32(kernel, what, p)?;
    Ok(p)
}

fn len(kernel: &'static str, what: &'static str, expected: usize, actual: usize) -> ShapeResult<()> {
    if expected != actual {
        return Err(ShapeError::Len {
            kernel,
            what,
            expected,
            actual,
        });
    }
    Ok(())
}

/// Rows laid along the grid's y dimension: at most [`MAX_GRID_Y`].
fn grid_rows(kernel: &'static str, rows: usize) -> ShapeResult<u32> {
    if rows > MAX_GRID_Y as usize {
        return Err(ShapeError::TooLarge {
            kernel,
            what: "rows in one launch",
            value: rows,
            limit: MAX_GRID_Y as usize,
        });
    }
    Ok(rows as u32)
}

/// Blocks of [`BLOCK`] threads covering `n` elements (`n` already checked to fit `i32`).
fn blocks_for(n: usize) -> u32 {
    (n as u32).div_ceil(BLOCK)
}

fn one_d(n: usize, rows: u32) -> Launch {
    Launch {
        grid: (blocks_for(n), rows, 1),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    }
}

/// Positions must index the cache (or the rotary tables): `pos < limit` for every row.
pub fn check_positions(kernel: &'static str, positions: &[u32], limit: usize) -> ShapeResult<()> {
    for (row, &pos) in positions.iter().enumerate() {
        if pos as usize >= limit {
            return Err(ShapeError::Position {
                kernel,
                row,
                pos,
                limit,
            });
        }
    }
    Ok(())
}

/// A storage element type of the kernels: f32 or bf16 (bf16 → f32 is exact, f32 → bf16 rounds to nearest
/// even, as the kernels' `store`).
pub trait Elem: Copy + Default + Send + Sync + 'static {
    /// The value as f32.
    fn to_f32(self) -> f32;
    /// `v` rounded to this type.
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

// ---------------------------------------------------------------------------------------------------------

/// Embedding gather (vocab-parallel): this rank holds rows `row_start..row_start + rows` of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbedShape {
    /// Tokens to embed.
    pub tokens: usize,
    /// Hidden size.
    pub hidden: usize,
    /// First vocabulary row of this rank's shard.
    pub row_start: usize,
    /// Rows of the shard.
    pub rows: usize,
}

impl EmbedShape {
    const NAME: &'static str = "embed";

    /// The launch configuration: one thread per output element, rows of tokens along y.
    pub fn launch(&self) -> ShapeResult<Launch> {
        let k = Self::NAME;
        nonzero(k, "tokens", self.tokens)?;
        nonzero(k, "hidden", self.hidden)?;
        product(k, "table elements", self.rows, self.hidden)?;
        product(k, "output elements", self.tokens, self.hidden)?;
        fits_i32(k, "row_start", self.row_start)?;
        Ok(one_d(self.hidden, grid_rows(k, self.tokens)?))
    }

    /// Checks the shape and the buffers' lengths.
    pub fn check(&self, table: usize, tokens: usize, out: usize) -> ShapeResult<Launch> {
        let l = self.launch()?;
        len(Self::NAME, "table", self.rows * self.hidden, table)?;
        len(Self::NAME, "tokens", self.tokens, tokens)?;
        len(Self::NAME, "out", self.tokens * self.hidden, out)?;
        Ok(l)
    }
}

/// CPU twin of `embed_f32` / `embed_bf16`: `out[t] = table[tokens[t] - row_start]` when this shard holds
/// that row, zeros otherwise (the engine's `RankModel::embed` before its all-reduce).
pub fn embed<T: Elem>(s: &EmbedShape, table: &[T], tokens: &[u32], out: &mut [f32]) -> ShapeResult<()> {
    s.check(table.len(), tokens.len(), out.len())?;
    let h = s.hidden;
    for (t, &tok) in tokens.iter().enumerate() {
        let o = &mut out[t * h..(t + 1) * h];
        let tok = tok as usize;
        if tok >= s.row_start && tok - s.row_start < s.rows {
            let r = tok - s.row_start;
            for (o, &v) in o.iter_mut().zip(&table[r * h..(r + 1) * h]) {
                *o = v.to_f32();
            }
        } else {
            o.fill(0.0);
        }
    }
    Ok(())
}

/// RMSNorm of `rows` rows of width `dim`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmsNormShape {
    /// Rows.
    pub rows: usize,
    /// Row width (hidden size).
    pub dim: usize,
    /// The epsilon under the square root.
    pub eps: f32,
}

impl RmsNormShape {
    const NAME: &'static str = "rms_norm";

    /// One block per row (rows along x, so any number of rows fits).
    pub fn launch(&self) -> ShapeResult<Launch> {
        let k = Self::NAME;
        nonzero(k, "rows", self.rows)?;
        nonzero(k, "dim", self.dim)?;
        product(k, "elements", self.rows, self.dim)?;
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(ShapeError::Inconsistent {
                kernel: k,
                detail: format!("eps {} must be finite and ≥ 0", self.eps),
            });
        }
        Ok(Launch {
            grid: (self.rows as u32, 1, 1),
            block: (BLOCK, 1, 1),
            shared_bytes: 0,
        })
    }

    /// Checks the shape and the buffers' lengths.
    pub fn check(&self, x: usize, weight: usize, out: usize) -> ShapeResult<Launch> {
        let l = self.launch()?;
        len(Self::NAME, "x", self.rows * self.dim, x)?;
        len(Self::NAME, "weight", self.dim, weight)?;
        len(Self::NAME, "out", self.rows * self.dim, out)?;
        Ok(l)
    }
}

/// CPU twin of `rms_norm_f32` / `rms_norm_bf16`: [`math::rms_norm`] with the weight widened to f32 (exact)
/// and the result rounded to `O`.
pub fn rms_norm<W: Elem, O: Elem>(s: &RmsNormShape, x: &[f32], weight: &[W], out: &mut [O]) -> ShapeResult<()> {
    s.check(x.len(), weight.len(), out.len())?;
    let w: Vec<f32> = weight.iter().map(|v| v.to_f32()).collect();
    let mut tmp = vec![0.0f32; x.len()];
    math::rms_norm(x, &w, s.eps, &mut tmp);
    for (o, v) in out.iter_mut().zip(tmp) {
        *o = O::from_f32(v);
    }
    Ok(())
}

/// The rotary tables the `rope_f32` kernel reads: `cos` and `sin` of every position `0..max_pos`, `[max_pos][half]`,
/// computed by [`Rope::angles`] (f64 angles rounded to f32), so the kernel and the CPU engine rotate by the
/// same numbers, rope scaling included.
pub fn rope_tables(rope: &Rope, max_pos: usize) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    for p in 0..max_pos {
        let (c, s) = rope.angles(p);
        cos.extend(c);
        sin.extend(s);
    }
    (cos, sin)
}

/// Rotary embedding of the first `heads` heads (width `2 * half`) of each of `rows` rows of stride
/// `row_stride`; positions index tables of `max_pos` positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeShape {
    /// Rows.
    pub rows: usize,
    /// Elements between the starts of two rows.
    pub row_stride: usize,
    /// Heads rotated in each row (q heads then k heads).
    pub heads: usize,
    /// `head_dim / 2`.
    pub half: usize,
    /// Positions in the tables.
    pub max_pos: usize,
}

impl RopeShape {
    const NAME: &'static str = "rope";

    /// One thread per rotated pair, rows along y.
    pub fn launch(&self) -> ShapeResult<Launch> {
        let k = Self::NAME;
        nonzero(k, "rows", self.rows)?;
        nonzero(k, "heads", self.heads)?;
        nonzero(k, "half", self.half)?;
        nonzero(k, "max_pos", self.max_pos)?;
        let pairs = product(k, "pairs per row", self.heads, self.half)?;
        if 2 * pairs > self.row_stride {
            return Err(ShapeError::Inconsistent {
                kernel: k,
                detail: format!(
                    "{} heads of {} do not fit a row of {}",
                    self.heads,
                    2 * self.half,
                    self.row_stride
                ),
            });
        }
        product(k, "elements", self.rows, self.row_stride)?;
        product(k, "table elements", self.max_pos, self.half)?;
        Ok(one_d(pairs, grid_rows(k, self.rows)?))
    }

    /// Checks the shape, the buffers' lengths and every position.
    pub fn check(&self, x: usize, cos: usize, sin: usize, positions: &[u32]) -> ShapeResult<Launch> {
        let l = self.launch()?;
        len(Self::NAME, "x", self.rows * self.row_stride, x)?;
        len(Self::NAME, "cos table", self.max_pos * self.half, cos)?;
        len(Self::NAME, "sin table", self.max_pos * self.half, sin)?;
        len(Self::NAME, "positions", self.rows, positions.len())?;
        check_positions(Self::NAME, positions, self.max_pos)?;
        Ok(l)
    }
}

/// CPU twin of `rope_f32`: the engine's [`Rope::angles`] and [`Rope::apply`] on each row. `rope` must have
/// `half` frequencies.
pub fn rope(s: &RopeShape, rope: &Rope, x: &mut [f32], positions: &[u32]) -> ShapeResult<()> {
    s.check(x.len(), s.max_pos * s.half, s.max_pos * s.half, positions)?;
    let (cos0, _) = rope.angles(0);
    if cos0.len() != s.half {
        return Err(ShapeError::Inconsistent {
            kernel: RopeShape::NAME,
            detail: format!(
                "the rotary embedding has {} frequencies, the shape {}",
                cos0.len(),
                s.half
            ),
        });
    }
    let w = 2 * s.heads * s.half;
    for (t, &p) in positions.iter().enumerate() {
        let (c, sn) = rope.angles(p as usize);
        rope.apply(&mut x[t * s.row_stride..t * s.row_stride + w], &c, &sn);
    }
    Ok(())
}

/// Attention of `rows` rows of a fused qkv buffer (q heads, then k heads, then v heads; `head_dim` each)
/// over one layer's KV cache `[kv_heads][max_seq][head_dim]`. Also the shape of the KV-cache append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Rows (tokens of the batch).
    pub rows: usize,
    /// Elements between two rows of the qkv buffer (at least `(q_heads + 2 kv_heads) head_dim`).
    pub row_stride: usize,
    /// This rank's query heads.
    pub q_heads: usize,
    /// This rank's KV heads.
    pub kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Positions the cache holds.
    pub max_seq: usize,
    /// Query heads per KV head in the whole model (`num_attention_heads / num_key_value_heads`).
    pub group: usize,
    /// This rank's first query head (global index).
    pub q_start: usize,
    /// This rank's first KV head (global index).
    pub kv_start: usize,
}

impl AttentionShape {
    const NAME: &'static str = "attention";

    /// Column of the first key of a row.
    pub fn k_offset(&self) -> usize {
        self.q_heads * self.head_dim
    }

    /// Column of the first value of a row.
    pub fn v_offset(&self) -> usize {
        (self.q_heads + self.kv_heads) * self.head_dim
    }

    /// Elements of one layer's K (or V) cache.
    pub fn cache_len(&self) -> usize {
        self.kv_heads * self.max_seq * self.head_dim
    }

    /// The scores' scale, `1 / sqrt(head_dim)` (as the CPU engine).
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// The local KV head that local query head `i` reads.
    pub fn kv_head_of(&self, i: usize) -> usize {
        (self.q_start + i) / self.group - self.kv_start
    }

    fn validate(&self) -> ShapeResult<()> {
        let k = Self::NAME;
        nonzero(k, "rows", self.rows)?;
        nonzero(k, "q_heads", self.q_heads)?;
        nonzero(k, "kv_heads", self.kv_heads)?;
        nonzero(k, "head_dim", self.head_dim)?;
        nonzero(k, "max_seq", self.max_seq)?;
        nonzero(k, "group", self.group)?;
        if self.head_dim > MAX_HEAD_DIM {
            return Err(ShapeError::TooLarge {
                kernel: k,
                what: "head_dim",
                value: self.head_dim,
                limit: MAX_HEAD_DIM,
            });
        }
        let width = product(k, "qkv row width", self.q_heads + 2 * self.kv_heads, self.head_dim)?;
        if width > self.row_stride {
            return Err(ShapeError::Inconsistent {
                kernel: k,
                detail: format!(
                    "q, k and v heads ({width} values) do not fit a row of {}",
                    self.row_stride
                ),
            });
        }
        product(k, "qkv elements", self.rows, self.row_stride)?;
        product(k, "cache elements", self.kv_heads * self.max_seq, self.head_dim)?;
        product(k, "output elements", self.rows * self.q_heads, self.head_dim)?;
        fits_i32(k, "q_start", self.q_start + self.q_heads)?;
        // Every local query head must read one of the local KV heads.
        for i in [0, self.q_heads - 1] {
            let g = (self.q_start + i) / self.group;
            if g < self.kv_start || g - self.kv_start >= self.kv_heads {
                return Err(ShapeError::Inconsistent {
                    kernel: k,
                    detail: format!(
                        "query head {} reads KV head {g}, outside this rank's KV heads {}..{}",
                        self.q_start + i,
                        self.kv_start,
                        self.kv_start + self.kv_heads
                    ),
                });
            }
        }
        Ok(())
    }

    /// The attention launch: one block of [`ATTN_THREADS`] per (query head, row).
    pub fn attention_launch(&self) -> ShapeResult<Launch> {
        self.validate()?;
        Ok(Launch {
            grid: (self.q_heads as u32, grid_rows(Self::NAME, self.rows)?, 1),
            block: (ATTN_THREADS, 1, 1),
            shared_bytes: 0,
        })
    }

    /// The KV-cache append launch: one thread per appended key (and value) element, rows along y.
    pub fn kv_append_launch(&self) -> ShapeResult<Launch> {
        self.validate()?;
        Ok(one_d(self.kv_heads * self.head_dim, grid_rows(Self::NAME, self.rows)?))
    }

    /// Checks the buffers' lengths and every position against the cache.
    pub fn check_buffers(&self, qkv: usize, k: usize, v: usize, positions: &[u32]) -> ShapeResult<()> {
        self.validate()?;
        len(Self::NAME, "qkv", self.rows * self.row_stride, qkv)?;
        len(Self::NAME, "k cache", self.cache_len(), k)?;
        len(Self::NAME, "v cache", self.cache_len(), v)?;
        len(Self::NAME, "positions", self.rows, positions.len())?;
        check_positions(Self::NAME, positions, self.max_seq)
    }
}

/// CPU twin of `kv_append_f32` / `kv_append_bf16`: row `t`'s keys and values go to position `positions[t]`
/// (the copy in the engine's `forward_batch`, rounded to `T`).
pub fn kv_append<T: Elem>(
    s: &AttentionShape,
    qkv: &[f32],
    k_cache: &mut [T],
    v_cache: &mut [T],
    positions: &[u32],
) -> ShapeResult<()> {
    s.check_buffers(qkv.len(), k_cache.len(), v_cache.len(), positions)?;
    let hd = s.head_dim;
    for (t, &pos) in positions.iter().enumerate() {
        let row = &qkv[t * s.row_stride..];
        for j in 0..s.kv_heads {
            let dst = (j * s.max_seq + pos as usize) * hd;
            for d in 0..hd {
                k_cache[dst + d] = T::from_f32(row[s.k_offset() + j * hd + d]);
                v_cache[dst + d] = T::from_f32(row[s.v_offset() + j * hd + d]);
            }
        }
    }
    Ok(())
}

/// CPU twin of `attention_f32` / `attention_bf16`, the engine's attention loop: for row `t` at position `p`
/// and local query head `i`, scores `math::dot(q, k[p']) * scale` for `p' ≤ p`, [`math::softmax`], then the
/// weighted sum of the values. `out` is `[rows][q_heads][head_dim]`.
pub fn attention<T: Elem>(
    s: &AttentionShape,
    qkv: &[f32],
    k_cache: &[T],
    v_cache: &[T],
    positions: &[u32],
    out: &mut [f32],
) -> ShapeResult<()> {
    s.check_buffers(qkv.len(), k_cache.len(), v_cache.len(), positions)?;
    len(AttentionShape::NAME, "out", s.rows * s.q_heads * s.head_dim, out.len())?;
    let hd = s.head_dim;
    let keys: Vec<f32> = k_cache.iter().map(|v| v.to_f32()).collect();
    let values: Vec<f32> = v_cache.iter().map(|v| v.to_f32()).collect();
    let scale = s.scale();
    for (t, &pos) in positions.iter().enumerate() {
        let ctx = pos as usize + 1;
        let mut scores = vec![0.0f32; ctx];
        for i in 0..s.q_heads {
            let q = &qkv[t * s.row_stride + i * hd..t * s.row_stride + (i + 1) * hd];
            let base = s.kv_head_of(i) * s.max_seq * hd;
            for (p, sc) in scores.iter_mut().enumerate() {
                *sc = math::dot(q, &keys[base + p * hd..base + (p + 1) * hd]) * scale;
            }
            math::softmax(&mut scores);
            let o = &mut out[(t * s.q_heads + i) * hd..(t * s.q_heads + i + 1) * hd];
            o.fill(0.0);
            for (p, &w) in scores.iter().enumerate() {
                for (o, &v) in o.iter_mut().zip(&values[base + p * hd..base + (p + 1) * hd]) {
                    *o += w * v;
                }
            }
        }
    }
    Ok(())
}

/// SiLU-mul of `rows` fused gate/up rows (`[gate (ffn), up (ffn)]` each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiluMulShape {
    /// Rows.
    pub rows: usize,
    /// Width of the gate (and of the up) half of a row.
    pub ffn: usize,
}

impl SiluMulShape {
    const NAME: &'static str = "silu_mul";

    /// One thread per output element, rows along y.
    pub fn launch(&self) -> ShapeResult<Launch> {
        let k = Self::NAME;
        nonzero(k, "rows", self.rows)?;
        nonzero(k, "ffn", self.ffn)?;
        product(k, "gate/up elements", self.rows, 2 * self.ffn)?;
        Ok(one_d(self.ffn, grid_rows(k, self.rows)?))
    }

    /// Checks the shape and the buffers' lengths.
    pub fn check(&self, gate_up: usize, out: usize) -> ShapeResult<Launch> {
        let l = self.launch()?;
        len(Self::NAME, "gate_up", self.rows * 2 * self.ffn, gate_up)?;
        len(Self::NAME, "out", self.rows * self.ffn, out)?;
        Ok(l)
    }
}

/// CPU twin of `silu_mul_f32` / `silu_mul_bf16`: the engine's per-row copy of the gate and
/// [`math::silu_mul`] with the up half, rounded to `O`.
pub fn silu_mul<O: Elem>(s: &SiluMulShape, gate_up: &[f32], out: &mut [O]) -> ShapeResult<()> {
    s.check(gate_up.len(), out.len())?;
    let f = s.ffn;
    let mut a = vec![0.0f32; f];
    for t in 0..s.rows {
        let row = &gate_up[t * 2 * f..(t + 1) * 2 * f];
        a.copy_from_slice(&row[..f]);
        math::silu_mul(&mut a, &row[f..]);
        for (o, &v) in out[t * f..(t + 1) * f].iter_mut().zip(&a) {
            *o = O::from_f32(v);
        }
    }
    Ok(())
}

/// An element-wise operation over `n` elements (residual add, cast).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElementwiseShape {
    /// Elements.
    pub n: usize,
}

impl ElementwiseShape {
    const NAME: &'static str = "elementwise";

    /// One thread per element.
    pub fn launch(&self) -> ShapeResult<Launch> {
        nonzero(Self::NAME, "n", self.n)?;
        fits_i32(Self::NAME, "n", self.n)?;
        Ok(one_d(self.n, 1))
    }

    /// Checks the shape and both buffers' lengths.
    pub fn check(&self, a: usize, b: usize) -> ShapeResult<Launch> {
        let l = self.launch()?;
        len(Self::NAME, "first buffer", self.n, a)?;
        len(Self::NAME, "second buffer", self.n, b)?;
        Ok(l)
    }
}

/// CPU twin of `residual_add_f32` / `residual_add_bf16`: `x[i] += delta[i]` (the engine's residual add).
pub fn residual_add<T: Elem>(x: &mut [f32], delta: &[T]) -> ShapeResult<()> {
    ElementwiseShape { n: x.len() }.check(x.len(), delta.len())?;
    for (a, b) in x.iter_mut().zip(delta) {
        *a += b.to_f32();
    }
    Ok(())
}

/// CPU twin of `cast_f32_bf16`: [`bf16::from_f32`] of each element.
pub fn cast_bf16(x: &[f32], out: &mut [bf16]) -> ShapeResult<()> {
    ElementwiseShape { n: x.len() }.check(x.len(), out.len())?;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = bf16::from_f32(v);
    }
    Ok(())
}

/// Greedy argmax of `rows` rows of `vocab` logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgmaxShape {
    /// Rows.
    pub rows: usize,
    /// Logits per row.
    pub vocab: usize,
}

impl ArgmaxShape {
    const NAME: &'static str = "argmax";

    /// One block per row.
    pub fn launch(&self) -> ShapeResult<Launch> {
        let k = Self::NAME;
        nonzero(k, "rows", self.rows)?;
        nonzero(k, "vocab", self.vocab)?;
        product(k, "logits", self.rows, self.vocab)?;
        Ok(Launch {
            grid: (self.rows as u32, 1, 1),
            block: (BLOCK, 1, 1),
            shared_bytes: 0,
        })
    }

    /// Checks the shape and the buffers' lengths.
    pub fn check(&self, logits: usize, out: usize) -> ShapeResult<Launch> {
        let l = self.launch()?;
        len(Self::NAME, "logits", self.rows * self.vocab, logits)?;
        len(Self::NAME, "out", self.rows, out)?;
        Ok(l)
    }
}

/// CPU twin of `argmax_f32`: [`sample::argmax`] of each row (first maximum; NaN never wins).
pub fn argmax(s: &ArgmaxShape, logits: &[f32], out: &mut [u32]) -> ShapeResult<()> {
    s.check(logits.len(), out.len())?;
    for (o, row) in out.iter_mut().zip(logits.chunks_exact(s.vocab)) {
        *o = sample::argmax(row);
    }
    Ok(())
}

/// A linear layer `y[n, rows] = x[n, cols] · Wᵀ` (all row-major, `W` is `[rows, cols]`) as the cuBLAS call
/// that computes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearShape {
    /// Rows of x (tokens).
    pub n: usize,
    /// Output features (rows of W).
    pub rows: usize,
    /// Input features (columns of W).
    pub cols: usize,
}

/// The column-major GEMM `C (m × n) = op(A) · B` cuBLAS runs, `A` being W's memory and `B` x's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gemm {
    /// `op(A) = Aᵀ`.
    pub transpose_a: bool,
    /// Rows of C.
    pub m: i32,
    /// Columns of C.
    pub n: i32,
    /// The inner dimension.
    pub k: i32,
    /// Leading dimension of A.
    pub lda: i32,
    /// Leading dimension of B.
    pub ldb: i32,
    /// Leading dimension of C.
    pub ldc: i32,
}

impl LinearShape {
    const NAME: &'static str = "linear";

    /// Checks the shape and the buffers' lengths and gives the GEMM: y's memory read column-major is
    /// `yᵀ (rows × n) = W · xᵀ`; W's memory read column-major is `Wᵀ` (cols × rows, lda = cols), hence
    /// `op(A) = Aᵀ`; x's memory read column-major is `xᵀ` (cols × n, ldb = cols); ldc = rows.
    pub fn check(&self, x: usize, w: usize, y: usize) -> ShapeResult<Gemm> {
        let k = Self::NAME;
        nonzero(k, "n", self.n)?;
        nonzero(k, "rows", self.rows)?;
        nonzero(k, "cols", self.cols)?;
        len(k, "x", product(k, "x elements", self.n, self.cols)?, x)?;
        len(k, "weight", product(k, "weight elements", self.rows, self.cols)?, w)?;
        len(k, "y", product(k, "y elements", self.n, self.rows)?, y)?;
        Ok(Gemm {
            transpose_a: true,
            m: self.rows as i32,
            n: self.n as i32,
            k: self.cols as i32,
            lda: self.cols as i32,
            ldb: self.cols as i32,
            ldc: self.rows as i32,
        })
    }
}

/// Column-major `C = op(A) · B` computed naively (the meaning of a [`Gemm`], for tests).
pub fn gemm_reference(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
    let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
    for j in 0..n {
        for i in 0..m {
            let mut acc = 0.0f32;
            for p in 0..k {
                let av = if g.transpose_a { a[i * lda + p] } else { a[p * lda + i] };
                acc += av * b[j * ldb + p];
            }
            c[j * ldc + i] = acc;
        }
    }
}

/// The virtual architecture NVRTC compiles [`SOURCE`] for on a device of compute capability
/// `major.minor`: the newest one this list knows that the device runs (PTX is compiled further by the
/// driver, so a newer device runs PTX of an older architecture). `None` below 8.0: the kernels are meant
/// for sm_80 and later (CI compiles them for sm_80 and sm_90), and CUDA 13 dropped the older ones.
pub fn nvrtc_arch(major: i32, minor: i32) -> Option<&'static str> {
    const KNOWN: [((i32, i32), &str); 7] = [
        ((12, 0), "compute_120"),
        ((10, 0), "compute_100"),
        ((9, 0), "compute_90"),
        ((8, 9), "compute_89"),
        ((8, 7), "compute_87"),
        ((8, 6), "compute_86"),
        ((8, 0), "compute_80"),
    ];
    KNOWN.iter().find(|(cc, _)| *cc <= (major, minor)).map(|(_, a)| *a)
}

/// How far a kernel's result may be from its twin's: `|gpu - cpu| ≤ abs + rel · |cpu|` element-wise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// Absolute part.
    pub abs: f32,
    /// Relative part.
    pub rel: f32,
}

impl Tolerance {
    /// Bit-for-bit equal: copies, gathers, one IEEE addition, one rounding.
    pub const EXACT: Tolerance = Tolerance { abs: 0.0, rel: 0.0 };
    /// f32 results of a different summation order or of a fused multiply-add (reductions over a row,
    /// rotary pairs, the GPU's `expf`): a few ulp of the inputs' magnitude (inputs of the tests are in
    /// [-1, 1]).
    pub const F32: Tolerance = Tolerance { abs: 1e-6, rel: 1e-5 };
    /// Attention in f32: online softmax in a different order than the CPU's two passes.
    pub const ATTENTION_F32: Tolerance = Tolerance { abs: 1e-5, rel: 1e-4 };
    /// A bf16 result rounded from f32 values that agree within [`Tolerance::F32`]: at most one bf16 ulp
    /// apart (2⁻⁷ relative, bf16 has 8 significant bits).
    pub const BF16: Tolerance = Tolerance {
        abs: 1e-6,
        rel: 1.0 / 128.0,
    };

    /// The first element outside the bound, as `(index, gpu, cpu)`; also refuses different lengths
    /// (index = the shorter length) and NaN in one but not the other.
    pub fn first_violation(&self, gpu: &[f32], cpu: &[f32]) -> Option<(usize, f32, f32)> {
        if gpu.len() != cpu.len() {
            let i = gpu.len().min(cpu.len());
            return Some((i, f32::NAN, f32::NAN));
        }
        gpu.iter().zip(cpu).enumerate().find_map(|(i, (&g, &c))| {
            let ok = if g.is_nan() || c.is_nan() {
                g.is_nan() && c.is_nan()
            } else if g == c {
                true
            } else {
                (g - c).abs() <= self.abs + self.rel * c.abs()
            };
            (!ok).then_some((i, g, c))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn every_kernel_is_in_the_source_once() {
        for k in Kernel::ALL {
            let decl = format!("{}(", k.name());
            let entries = SOURCE
                .match_indices(&decl)
                .filter(|(i, _)| SOURCE[..*i].ends_with(' ') || SOURCE[..*i].ends_with('\n'))
                .count();
            assert!(
                SOURCE.contains(&format!("void __launch_bounds__(ENGINE_BLOCK)\n    {decl}"))
                    || SOURCE.contains(&format!("void __launch_bounds__(ATTN_THREADS)\n    {decl}"))
                    || SOURCE.contains(&format!("void __launch_bounds__(ENGINE_BLOCK) {decl}")),
                "{} is not declared as a kernel with launch bounds",
                k.name()
            );
            assert_eq!(entries, 1, "{} declared {entries} times", k.name());
        }
        // The constants the host uses are the source's.
        assert!(SOURCE.contains(&format!("#define ENGINE_BLOCK {BLOCK}")));
        assert!(SOURCE.contains("#define ATTN_THREADS (ATTN_WARPS * 32)"));
        assert!(SOURCE.contains(&format!("#define ATTN_WARPS {}", ATTN_THREADS / 32)));
        assert!(SOURCE.contains(&format!("#define MAX_HEAD_DIM {MAX_HEAD_DIM}")));
        assert!(
            !SOURCE.contains("#include"),
            "the source must compile with NVRTC's empty include path"
        );
    }

    #[test]
    fn launch_grids_cover_every_element() {
        let l = EmbedShape {
            tokens: 3,
            hidden: 257,
            row_start: 0,
            rows: 10,
        }
        .launch()
        .unwrap();
        assert_eq!(l.grid, (2, 3, 1));
        assert_eq!(l.block, (BLOCK, 1, 1));
        let l = RmsNormShape {
            rows: 70_000,
            dim: 576,
            eps: 1e-5,
        }
        .launch()
        .unwrap();
        assert_eq!(l.grid, (70_000, 1, 1), "rows along x: no 65535 limit");
        let l = RopeShape {
            rows: 5,
            row_stride: 960,
            heads: 12,
            half: 32,
            max_pos: 100,
        }
        .launch()
        .unwrap();
        assert_eq!(l.grid, (2, 5, 1), "12 * 32 = 384 pairs: two blocks of 256");
        let a = AttentionShape {
            rows: 7,
            row_stride: (9 + 2 * 3) * 64,
            q_heads: 9,
            kv_heads: 3,
            head_dim: 64,
            max_seq: 32,
            group: 3,
            q_start: 0,
            kv_start: 0,
        };
        assert_eq!(a.attention_launch().unwrap().grid, (9, 7, 1));
        assert_eq!(a.attention_launch().unwrap().block, (ATTN_THREADS, 1, 1));
        assert_eq!(a.kv_append_launch().unwrap().grid, (1, 7, 1));
        assert_eq!(SiluMulShape { rows: 2, ffn: 1536 }.launch().unwrap().grid, (6, 2, 1));
        assert_eq!(ElementwiseShape { n: 513 }.launch().unwrap().grid, (3, 1, 1));
        assert_eq!(ArgmaxShape { rows: 4, vocab: 49152 }.launch().unwrap().grid, (4, 1, 1));
        for n in [1usize, 255, 256, 257, 100_000] {
            let g = ElementwiseShape { n }.launch().unwrap().grid.0 as usize;
            assert!(
                g * BLOCK as usize >= n && (g - 1) * (BLOCK as usize) < n,
                "n = {n}: {g} blocks"
            );
        }
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        let e = EmbedShape {
            tokens: 0,
            hidden: 8,
            row_start: 0,
            rows: 1,
        };
        assert!(matches!(e.launch(), Err(ShapeError::Zero { what: "tokens", .. })));
        let e = EmbedShape {
            tokens: 70_000,
            hidden: 8,
            row_start: 0,
            rows: 1,
        };
        assert!(matches!(e.launch(), Err(ShapeError::TooLarge { limit: 65_535, .. })));
        let e = ElementwiseShape { n: 1 << 31 };
        assert!(matches!(e.launch(), Err(ShapeError::TooLarge { .. })));
        let r = RmsNormShape {
            rows: 1 << 20,
            dim: 1 << 12,
            eps: 1e-5,
        };
        assert!(matches!(r.launch(), Err(ShapeError::TooLarge { what: "elements", .. })));
        let r = RmsNormShape {
            rows: 1,
            dim: 4,
            eps: f32::NAN,
        };
        assert!(matches!(r.launch(), Err(ShapeError::Inconsistent { .. })));
        assert!(matches!(
            RmsNormShape {
                rows: 2,
                dim: 4,
                eps: 1e-5
            }
            .check(8, 3, 8),
            Err(ShapeError::Len {
                what: "weight",
                expected: 4,
                actual: 3,
                ..
            })
        ));
        let rope = RopeShape {
            rows: 1,
            row_stride: 64,
            heads: 2,
            half: 32,
            max_pos: 4,
        };
        assert!(
            matches!(rope.launch(), Err(ShapeError::Inconsistent { .. })),
            "2 heads of 64 in 64"
        );
        let rope = RopeShape { heads: 1, ..rope };
        assert!(matches!(
            rope.check(64, 128, 128, &[4]),
            Err(ShapeError::Position {
                row: 0,
                pos: 4,
                limit: 4,
                ..
            })
        ));
        let a = AttentionShape {
            rows: 1,
            row_stride: 4 * 512,
            q_heads: 2,
            kv_heads: 1,
            head_dim: 512,
            max_seq: 8,
            group: 2,
            q_start: 0,
            kv_start: 0,
        };
        assert!(matches!(
            a.attention_launch(),
            Err(ShapeError::TooLarge { what: "head_dim", .. })
        ));
        // Rank 1 of TP 2 with 4 query heads over 2 KV heads: query heads 2..4 read KV head 1 only.
        let a = AttentionShape {
            rows: 1,
            row_stride: 4 * 64,
            q_heads: 2,
            kv_heads: 1,
            head_dim: 64,
            max_seq: 8,
            group: 2,
            q_start: 2,
            kv_start: 1,
        };
        assert!(a.attention_launch().is_ok());
        let wrong = AttentionShape { kv_start: 0, ..a };
        assert!(matches!(wrong.attention_launch(), Err(ShapeError::Inconsistent { .. })));
        assert!(matches!(
            a.check_buffers(4 * 64, 8 * 64, 8 * 64, &[8]),
            Err(ShapeError::Position { .. })
        ));
        assert!(a.check_buffers(4 * 64, 8 * 64, 8 * 64, &[7]).is_ok());
        // A twin refuses what the launch refuses, before touching anything.
        let mut out = [0u32; 1];
        assert!(matches!(
            argmax(&ArgmaxShape { rows: 1, vocab: 3 }, &[1.0, 2.0], &mut out),
            Err(ShapeError::Len { what: "logits", .. })
        ));
    }

    #[test]
    fn rms_norm_twin_is_the_engines() {
        let (rows, dim) = (3, 96);
        let x = pseudo(rows * dim, 1);
        let w = pseudo(dim, 2);
        let s = RmsNormShape { rows, dim, eps: 1e-5 };
        let mut twin = vec![0.0f32; rows * dim];
        rms_norm(&s, &x, &w, &mut twin).unwrap();
        let mut engine = vec![0.0f32; rows * dim];
        math::rms_norm(&x, &w, 1e-5, &mut engine);
        assert_eq!(twin, engine);
        // bf16: the weight widened exactly, the result the f32 result rounded once.
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut tb = vec![bf16::ZERO; rows * dim];
        rms_norm(&s, &x, &wb, &mut tb).unwrap();
        let wide: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        math::rms_norm(&x, &wide, 1e-5, &mut engine);
        let expect: Vec<bf16> = engine.iter().map(|&v| bf16::from_f32(v)).collect();
        assert_eq!(tb, expect);
    }

    #[test]
    fn rope_twin_is_the_engines_and_the_tables_are_its_angles() {
        let cfg = crate::model::LlamaConfig::tiny();
        let r = Rope::new(crate::model::rope_inv_freq(&cfg));
        let half = cfg.head_dim / 2;
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let stride = (nq + 2 * nkv) * cfg.head_dim;
        let s = RopeShape {
            rows: 3,
            row_stride: stride,
            heads: nq + nkv,
            half,
            max_pos: 16,
        };
        let positions = [0u32, 5, 15];
        let x0 = pseudo(3 * stride, 4);
        let mut twin = x0.clone();
        rope(&s, &r, &mut twin, &positions).unwrap();
        let (cos, sin) = rope_tables(&r, 16);
        for (t, &p) in positions.iter().enumerate() {
            let (c, sn) = r.angles(p as usize);
            assert_eq!(&cos[p as usize * half..(p as usize + 1) * half], &c[..]);
            assert_eq!(&sin[p as usize * half..(p as usize + 1) * half], &sn[..]);
            let mut row = x0[t * stride..(t + 1) * stride].to_vec();
            r.apply(&mut row[..(nq + nkv) * cfg.head_dim], &c, &sn);
            assert_eq!(&twin[t * stride..(t + 1) * stride], &row[..], "row {t}");
            // The v heads are not rotated.
            assert_eq!(
                &twin[t * stride + (nq + nkv) * cfg.head_dim..(t + 1) * stride],
                &x0[t * stride + (nq + nkv) * cfg.head_dim..(t + 1) * stride]
            );
        }
        let wrong = RopeShape { half: half + 1, ..s };
        let mut x = vec![0.0; 3 * stride];
        assert!(rope(&wrong, &r, &mut x, &positions).is_err());
    }

    /// Attention by its definition, in f64: softmax(q·k / sqrt(d)) · v.
    fn naive_attention(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>]) -> Vec<f64> {
        let scale = 1.0 / (q.len() as f64).sqrt();
        let s: Vec<f64> = keys
            .iter()
            .map(|k| q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale)
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..q.len())
            .map(|d| e.iter().zip(values).map(|(w, v)| w / z * v[d] as f64).sum())
            .collect()
    }

    #[test]
    fn kv_append_then_attention_twins_follow_the_definition_with_gqa() {
        // 4 query heads of rank 1 (TP 2) over 2 of its KV heads, group 2 in a model of 8 q / 4 kv heads.
        let (hd, max_seq) = (16, 12);
        let s = AttentionShape {
            rows: 5,
            row_stride: (4 + 2 * 2) * hd + 3, // padding at the end of each row
            q_heads: 4,
            kv_heads: 2,
            head_dim: hd,
            max_seq,
            group: 2,
            q_start: 4,
            kv_start: 2,
        };
        // A prefill of 5 rows at positions 2..7 after 2 earlier positions (appended first).
        let mut kc = vec![0.0f32; s.cache_len()];
        let mut vc = vec![0.0f32; s.cache_len()];
        let early = AttentionShape { rows: 2, ..s };
        let q_early = pseudo(2 * s.row_stride, 9);
        kv_append(&early, &q_early, &mut kc, &mut vc, &[0, 1]).unwrap();
        let qkv = pseudo(5 * s.row_stride, 10);
        let positions = [2u32, 3, 4, 5, 6];
        kv_append(&s, &qkv, &mut kc, &mut vc, &positions).unwrap();
        let mut out = vec![0.0f32; 5 * 4 * hd];
        attention(&s, &qkv, &kc, &vc, &positions, &mut out).unwrap();
        let row_of = |t: usize| -> &[f32] {
            if t < 2 {
                &q_early[t * s.row_stride..]
            } else {
                &qkv[(t - 2) * s.row_stride..]
            }
        };
        for (t, &p) in positions.iter().enumerate() {
            for i in 0..4 {
                let j = (4 + i) / 2 - 2;
                let q = &qkv[t * s.row_stride + i * hd..t * s.row_stride + (i + 1) * hd];
                let keys: Vec<Vec<f32>> = (0..=p as usize)
                    .map(|pp| row_of(pp)[s.k_offset() + j * hd..s.k_offset() + (j + 1) * hd].to_vec())
                    .collect();
                let values: Vec<Vec<f32>> = (0..=p as usize)
                    .map(|pp| row_of(pp)[s.v_offset() + j * hd..s.v_offset() + (j + 1) * hd].to_vec())
                    .collect();
                let want = naive_attention(q, &keys, &values);
                let got = &out[(t * 4 + i) * hd..(t * 4 + i + 1) * hd];
                for d in 0..hd {
                    assert!(
                        (got[d] as f64 - want[d]).abs() < 1e-5,
                        "t {t} head {i} d {d}: {} vs {}",
                        got[d],
                        want[d]
                    );
                }
            }
        }
        // bf16 cache: the same values rounded once.
        let mut kb = vec![bf16::ZERO; s.cache_len()];
        let mut vb = vec![bf16::ZERO; s.cache_len()];
        kv_append(&s, &qkv, &mut kb, &mut vb, &positions).unwrap();
        for p in &positions {
            let at = (max_seq + *p as usize) * hd; // kv head 1
            assert_eq!(kb[at], bf16::from_f32(kc[at]));
            assert_eq!(vb[at + 3], bf16::from_f32(vc[at + 3]));
        }
        // Positions past the cache are refused, nothing written.
        let before = kc.clone();
        let one = AttentionShape { rows: 1, ..s };
        assert!(kv_append(&one, &qkv[..s.row_stride], &mut kc, &mut vc, &[max_seq as u32]).is_err());
        assert_eq!(kc, before);
    }

    #[test]
    fn silu_mul_embed_residual_cast_argmax_twins() {
        let s = SiluMulShape { rows: 2, ffn: 40 };
        let gu = pseudo(2 * 80, 5);
        let mut out = vec![0.0f32; 80];
        silu_mul(&s, &gu, &mut out).unwrap();
        for t in 0..2 {
            let mut a = gu[t * 80..t * 80 + 40].to_vec();
            math::silu_mul(&mut a, &gu[t * 80 + 40..(t + 1) * 80]);
            assert_eq!(&out[t * 40..(t + 1) * 40], &a[..]);
        }
        let mut ob = vec![bf16::ZERO; 80];
        silu_mul(&s, &gu, &mut ob).unwrap();
        assert!(ob.iter().zip(&out).all(|(b, &f)| *b == bf16::from_f32(f)));

        // Embedding: rows 10..14 of a 20-token vocabulary live here.
        let e = EmbedShape {
            tokens: 3,
            hidden: 6,
            row_start: 10,
            rows: 4,
        };
        let table: Vec<bf16> = pseudo(24, 6).into_iter().map(bf16::from_f32).collect();
        let mut x = vec![7.0f32; 18];
        embed(&e, &table, &[11, 3, 13], &mut x).unwrap();
        assert_eq!(
            &x[..6],
            &table[6..12].iter().map(|v| v.to_f32()).collect::<Vec<_>>()[..]
        );
        assert!(x[6..12].iter().all(|&v| v == 0.0), "token 3 is another rank's row");
        assert_eq!(x[12], table[18].to_f32());

        let mut r = vec![1.0f32, 2.0, 3.0];
        residual_add(
            &mut r,
            &[bf16::from_f32(0.5), bf16::from_f32(-2.0), bf16::from_f32(1.0)],
        )
        .unwrap();
        assert_eq!(r, [1.5, 0.0, 4.0]);
        assert!(residual_add(&mut r, &[1.0f32]).is_err());

        let src = [1.0f32, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, f32::NAN, -0.0];
        let mut c = vec![bf16::ZERO; 5];
        cast_bf16(&src, &mut c).unwrap();
        assert_eq!(c[0].to_f32(), 1.0);
        assert_eq!(c[1].to_f32(), 1.0, "a tie rounds to even");
        assert_eq!(c[2].to_f32(), 1.015625, "a tie rounds to even (up)");
        assert!(c[3].is_nan());

        let s = ArgmaxShape { rows: 3, vocab: 4 };
        let logits = [
            1.0,
            3.0,
            3.0,
            -1.0,
            f32::NAN,
            f32::NEG_INFINITY,
            -5.0,
            f32::NAN,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::NEG_INFINITY,
        ];
        let mut am = [9u32; 3];
        argmax(&s, &logits, &mut am).unwrap();
        assert_eq!(am, [1, 2, 0], "first maximum; NaN never wins; nothing finite gives 0");
    }

    #[test]
    fn linear_shape_is_the_engines_row_major_product() {
        let s = LinearShape { n: 3, rows: 5, cols: 7 };
        let g = s.check(21, 35, 15).unwrap();
        assert_eq!(
            (g.m, g.n, g.k, g.lda, g.ldb, g.ldc, g.transpose_a),
            (5, 3, 7, 7, 7, 5, true)
        );
        let x = pseudo(21, 11);
        let w = math::Matrix::new(5, 7, pseudo(35, 12));
        let mut want = vec![0.0f32; 15];
        math::linear(&x, 3, &w, &mut want, 1);
        let mut got = vec![0.0f32; 15];
        gemm_reference(&g, &w.data, &x, &mut got);
        assert_eq!(Tolerance::F32.first_violation(&got, &want), None);
        assert!(matches!(
            s.check(21, 34, 15),
            Err(ShapeError::Len { what: "weight", .. })
        ));
        assert!(matches!(
            LinearShape { n: 0, ..s }.check(0, 35, 0),
            Err(ShapeError::Zero { what: "n", .. })
        ));
        assert!(matches!(
            LinearShape {
                n: 1 << 20,
                rows: 1 << 12,
                cols: 1
            }
            .check(1 << 20, 1 << 12, 1 << 32),
            Err(ShapeError::TooLarge { .. })
        ));
    }

    #[test]
    fn nvrtc_arch_is_the_newest_the_device_runs() {
        assert_eq!(nvrtc_arch(9, 0), Some("compute_90"));
        assert_eq!(nvrtc_arch(8, 0), Some("compute_80"));
        assert_eq!(nvrtc_arch(8, 6), Some("compute_86"));
        assert_eq!(nvrtc_arch(8, 8), Some("compute_87"));
        assert_eq!(nvrtc_arch(10, 3), Some("compute_100"));
        assert_eq!(nvrtc_arch(13, 0), Some("compute_120"));
        assert_eq!(nvrtc_arch(7, 5), None);
    }

    #[test]
    fn tolerance_bounds() {
        assert_eq!(Tolerance::EXACT.first_violation(&[1.0, 2.0], &[1.0, 2.0]), None);
        assert_eq!(
            Tolerance::EXACT
                .first_violation(&[1.0, 2.0], &[1.0, 2.0000002])
                .map(|v| v.0),
            Some(1)
        );
        assert_eq!(Tolerance::F32.first_violation(&[1.000_001], &[1.0]), None);
        assert!(Tolerance::F32.first_violation(&[1.001], &[1.0]).is_some());
        assert!(Tolerance::F32.first_violation(&[f32::NAN], &[1.0]).is_some());
        assert_eq!(Tolerance::F32.first_violation(&[f32::NAN], &[f32::NAN]), None);
        assert!(Tolerance::F32.first_violation(&[1.0], &[1.0, 2.0]).is_some());
        // One bf16 ulp at 1.0 is 2^-7.
        assert_eq!(Tolerance::BF16.first_violation(&[1.0078125], &[1.0]), None);
        assert!(Tolerance::BF16.first_violation(&[1.015625], &[1.0]).is_some());
    }
}
