//! The integer decode paths: activations quantized per block of [`QBLOCK`] values with an f32 scale, to `i8`
//! ([`Q8Vec`], as llama.cpp's `q8` activations) or to `i16` ([`Q16Vec`]), then integer dot products against
//! the `Q4_0` / `Q4_1` / `Q8_0` blocks of a [`QMatrix`].
//!
//! Each block's integer dot product is exact (at most `32 · 128 · 32767` in magnitude), so every instruction
//! set gives the same integers; the f32 combination of the blocks is one fixed sequence of IEEE operations
//! (no fused multiply-add) in eight lanes (`block % 8`), summed in a fixed order. The SIMD variants
//! ([`Isa::Avx512Vnni`], [`Isa::Avx2`]) therefore give bit for bit what the portable [`Isa::Scalar`] gives;
//! the unit tests check it.
//!
//! For `Q4` weights the int8 activations are stored paired ([`Q8Vec::quantize_paired`], chosen by
//! [`Q8Vec::quantize_for`]): two weight blocks' 32 bytes of nibbles make one vector of low nibbles and one
//! of high nibbles, each multiplied against one load of activations, and a pair's partial sums share one
//! `vpmaddwd` and half the horizontal sums. The integer block sums are the same, so the bits are too.
//!
//! The result differs from the exact f32 path by the activation rounding (at most half a step, `amax / 254`
//! for int8 and `amax / 65534` for int16, per value); `llm/tests/decode_int8.rs` bounds it on SmolLM2
//! (logits rel-L2 vs the f64 reference: int16 ≤ 1e-2, measured 6.7e-4; int8 measured up to 0.108).

use super::{QKind, QMatrix, QBLOCK};

/// How decode's matrix-vector products compute on block-quantized weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DecodePath {
    /// f32 activations times the dequantized blocks, in f32 (the path the equivalence tests check).
    #[default]
    Exact,
    /// Activations quantized to int8 per block, integer dot products ([`Isa::detect`] picks the kernel).
    Int8,
    /// Activations quantized to int16 per block ([`Q16Vec`]), integer dot products (AVX2 `vpmaddwd` when
    /// the CPU has it, else portable code): 256 times finer activations than [`DecodePath::Int8`].
    Int16,
}

impl DecodePath {
    /// The path the command-line flags `--int8` / `--int16` ask for (exact f32 when neither is given).
    pub fn from_flags(int8: bool, int16: bool) -> DecodePath {
        if int8 {
            DecodePath::Int8
        } else if int16 {
            DecodePath::Int16
        } else {
            DecodePath::Exact
        }
    }

    /// A short name for output: `exact`, or `int8-` and the kernel's instruction set.
    pub fn describe(self) -> String {
        match self {
            DecodePath::Exact => "exact".to_string(),
            DecodePath::Int8 => format!("int8-{}", Isa::detect().name()),
            DecodePath::Int16 => format!("int16-{}", Isa::detect_int16().name()),
        }
    }
}

/// The instruction set of an int8 kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust.
    Scalar,
    /// AVX2 (`vpmaddubsw` + `vpmaddwd`).
    Avx2,
    /// AVX-512 VNNI on 256-bit vectors (`vpdpbusd`; needs `avx512vnni` and `avx512vl`).
    Avx512Vnni,
}

impl Isa {
    /// The best kernel this CPU runs (detected at run time).
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if Isa::Avx512Vnni.supported() {
                return Isa::Avx512Vnni;
            }
            if Isa::Avx2.supported() {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// The best int16 kernel this CPU runs: [`Isa::Avx2`] or [`Isa::Scalar`] (VNNI's `vpdpwssd` would only
    /// fuse the add that follows `vpmaddwd`).
    pub fn detect_int16() -> Isa {
        if Isa::Avx2.supported() {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }

    /// Whether this CPU runs this kernel.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// `scalar`, `avx2` or `avx512vnni`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
        }
    }
}

/// An integer type activations are quantized to: `i8` ([`Q8Vec`]) or `i16` ([`Q16Vec`]).
pub trait QInt: Copy + Default + Into<i32> + Into<f32> + std::fmt::Debug + Send + Sync + 'static {
    /// The symmetric range used: values are quantized to `±MAX`.
    const MAX: f32;
    /// `r`, already rounded and clamped to `±MAX`.
    fn from_clamped(r: i32) -> Self;
}

impl QInt for i8 {
    const MAX: f32 = 127.0;
    fn from_clamped(r: i32) -> Self {
        r as i8
    }
}

impl QInt for i16 {
    const MAX: f32 = 32767.0;
    fn from_clamped(r: i32) -> Self {
        r as i16
    }
}

/// A vector quantized per block of [`QBLOCK`] values to integers `T`: `x ≈ d_b · q` with
/// `d_b = max|x| / T::MAX`.
#[derive(Clone, Debug)]
pub struct QVec<T> {
    /// The quantized values (`cols` of them).
    qs: Vec<T>,
    /// Per-block scale.
    d: Vec<f32>,
    /// Per-block sum of the quantized values (exact in f32), for the `Q4` minimum term.
    s: Vec<f32>,
    /// The paired layout ([`Q8Vec::quantize_paired`]): within each pair of blocks `2p, 2p + 1` (all but a
    /// last odd block) the values are `2p`'s first 16, `2p + 1`'s first 16, `2p`'s last 16, `2p + 1`'s last
    /// 16 (natural: each block's 32 in order), so that the AVX2 `Q4` kernel takes two weight blocks'
    /// low nibbles in one vector, their high nibbles in another, against one load of the matching values
    /// each.
    paired: bool,
}

/// Activations quantized to int8 (`d_b = max|x| / 127`), for the `--int8` path.
pub type Q8Vec = QVec<i8>;
/// Activations quantized to int16 (`d_b = max|x| / 32767`), for the `--int16` path.
pub type Q16Vec = QVec<i16>;

impl<T: QInt> QVec<T> {
    /// Quantizes `x` (round to nearest, ties to even); `None` unless its length is a whole number of blocks.
    /// Non-finite values do not panic: a block with an infinite or NaN value gets a non-finite scale, which
    /// propagates to the result.
    pub fn quantize(x: &[f32]) -> Option<QVec<T>> {
        if x.len() % QBLOCK != 0 {
            return None;
        }
        let nb = x.len() / QBLOCK;
        let mut v = QVec {
            qs: vec![T::default(); x.len()],
            d: vec![0.0; nb],
            s: vec![0.0; nb],
            paired: false,
        };
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, the only requirement of `quantize_avx2` (safe code inside).
            unsafe { v.quantize_avx2(x) };
            return Some(v);
        }
        v.quantize_into(x);
        Some(v)
    }

    /// [`QVec::quantize_into`] compiled for AVX2 (the same IEEE operations, so the same result).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn quantize_avx2(&mut self, x: &[f32]) {
        self.quantize_into(x)
    }

    /// Fills `self` (already sized for `x`) with the quantization of `x`.
    #[inline(always)]
    fn quantize_into(&mut self, x: &[f32]) {
        quantize_blocks(x, T::MAX, &mut self.d, &mut self.s, |i, q| {
            self.qs[i] = T::from_clamped(q)
        });
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.qs.len()
    }

    /// Whether the values are in the paired layout.
    pub fn is_paired(&self) -> bool {
        self.paired
    }

    /// Where block `b`'s first 16 values start, and its last 16.
    #[inline(always)]
    fn halves(&self, b: usize) -> (usize, usize) {
        if self.paired && b < self.d.len() / 2 * 2 {
            let lo = 64 * (b / 2) + 16 * (b % 2);
            (lo, lo + 32)
        } else {
            (b * QBLOCK, b * QBLOCK + 16)
        }
    }

    /// Swaps the middle quarters of every pair of blocks: natural ↔ paired.
    fn swap_pairs(&mut self) {
        for pair in self.qs.chunks_exact_mut(2 * QBLOCK) {
            let (a, b) = pair[16..48].split_at_mut(16);
            a.swap_with_slice(b);
        }
        self.paired = !self.paired;
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.qs.is_empty()
    }

    /// The dequantized values (`d_b · q`), in natural order.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut natural = self.clone();
        if natural.paired {
            natural.swap_pairs();
        }
        natural
            .qs
            .chunks_exact(QBLOCK)
            .zip(&self.d)
            .flat_map(|(q, &d)| q.iter().map(move |&v| d * Into::<f32>::into(v)))
            .collect()
    }
}

impl Q8Vec {
    /// [`QVec::quantize`] in the paired layout, which the SIMD kernels expect for `Q4` weights (for other
    /// weights they take the natural one; the portable kernel takes either).
    pub fn quantize_paired(x: &[f32]) -> Option<Q8Vec> {
        let mut v = Q8Vec::quantize(x)?;
        v.swap_pairs();
        Some(v)
    }

    /// [`Q8Vec::quantize_paired`] for `Q4` weights, [`QVec::quantize`] otherwise.
    pub fn quantize_for(kind: QKind, x: &[f32]) -> Option<Q8Vec> {
        match kind {
            QKind::Q4 => Q8Vec::quantize_paired(x),
            QKind::Q8 => Q8Vec::quantize(x),
        }
    }
}

/// Quantizes `x` per block to integers in `±max` (round to nearest, ties to even): `store(i, q_i)`, the
/// block scales into `d` and the blocks' sums of `q` into `s`.
#[inline(always)]
fn quantize_blocks(x: &[f32], max: f32, d: &mut [f32], s: &mut [f32], mut store: impl FnMut(usize, i32)) {
    // Adding and subtracting 1.5·2²³ rounds an f32 of magnitude < 2²² to the nearest integer (ties to
    // even) in plain IEEE arithmetic, which vectorizes (unlike `f32::round`, a library call).
    const MAGIC: f32 = 12_582_912.0;
    for (b, xb) in x.chunks_exact(QBLOCK).enumerate() {
        let (mut amax, mut nan) = (0.0f32, false);
        for &val in xb {
            let a = val.abs();
            // Written as a comparison (not f32::max) so that it vectorizes; NaNs are flagged apart.
            amax = if a > amax { a } else { amax };
            nan |= a.is_nan();
        }
        // A NaN makes the block's scale NaN, so that it shows in the result.
        let scale = if nan { f32::NAN } else { amax / max };
        let id = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (j, &val) in xb.iter().enumerate() {
            // Clamped to ±max (also catches an infinity); `as` maps NaN to 0.
            let r = ((val * id + MAGIC) - MAGIC).clamp(-max, max) as i32;
            sum += r;
            store(b * QBLOCK + j, r);
        }
        d[b] = scale;
        s[b] = sum as f32;
    }
}

/// Lanes of the f32 combination (block `b` goes to lane `b % LANES`).
const LANES: usize = 8;

/// The f32 contribution of block `b` with integer dot product `i` (the one formula every kernel uses).
#[inline(always)]
fn block_term<T: QInt>(kind: QKind, w: &QMatrix, wb: usize, x: &QVec<T>, b: usize, i: i32) -> f32 {
    let fi = i as f32;
    match kind {
        QKind::Q4 => x.d[b] * (w.d[wb] * fi + w.m[wb] * x.s[b]),
        QKind::Q8 => (x.d[b] * w.d[wb]) * fi,
    }
}

/// The fixed final sum of the lanes.
#[inline(always)]
fn lanes_sum(a: &[f32; LANES]) -> f32 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// Exact integer dot product of weight block `wb` with activation block `b` (portable; int8 or int16).
#[inline(always)]
fn block_dot_scalar<T: QInt>(kind: QKind, w: &QMatrix, wb: usize, x: &QVec<T>, b: usize) -> i32 {
    let (lo, hi) = x.halves(b);
    let (xl, xh) = (&x.qs[lo..lo + 16], &x.qs[hi..hi + 16]);
    match kind {
        QKind::Q4 => {
            let q = &w.qs[wb * 16..wb * 16 + 16];
            let mut s = 0i32;
            for j in 0..16 {
                s += i32::from(q[j] & 15) * Into::<i32>::into(xl[j]) + i32::from(q[j] >> 4) * Into::<i32>::into(xh[j]);
            }
            s
        }
        QKind::Q8 => {
            let q = &w.qs[wb * 32..wb * 32 + 32];
            let mut s = 0i32;
            for j in 0..16 {
                s += i32::from(q[j] as i8) * Into::<i32>::into(xl[j])
                    + i32::from(q[j + 16] as i8) * Into::<i32>::into(xh[j]);
            }
            s
        }
    }
}

/// Row `r` of `w` times `x` (portable kernel).
fn row_dot_scalar<T: QInt>(w: &QMatrix, x: &QVec<T>, r: usize) -> f32 {
    let nb = w.cols / QBLOCK;
    let mut acc = [0.0f32; LANES];
    for b in 0..nb {
        let wb = r * nb + b;
        let i = block_dot_scalar(w.kind, w, wb, x, b);
        acc[b % LANES] += block_term(w.kind, w, wb, x, b, i);
    }
    lanes_sum(&acc)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// The 8 lane sums of each of `v[0..8]`, as one vector (`out[k] = Σ v[k]`).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn hsum8(v: [__m256i; 8]) -> __m256i {
        let a01 = _mm256_hadd_epi32(v[0], v[1]);
        let a23 = _mm256_hadd_epi32(v[2], v[3]);
        let a45 = _mm256_hadd_epi32(v[4], v[5]);
        let a67 = _mm256_hadd_epi32(v[6], v[7]);
        let b03 = _mm256_hadd_epi32(a01, a23);
        let b47 = _mm256_hadd_epi32(a45, a67);
        let lo = _mm256_permute2x128_si256(b03, b47, 0x20);
        let hi = _mm256_permute2x128_si256(b03, b47, 0x31);
        _mm256_add_epi32(lo, hi)
    }

    /// Blocks `k, k + 1` of a paired dot product ([`Q8Vec::quantize_paired`]): out of the 8 lanes, 0..4
    /// hold block `k`'s partial integer sums, 4..8 block `k + 1`'s. The 8 block sums of four such vectors
    /// (blocks `b0..b0 + 8`), in block order.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn hsum_pairs(w: [__m256i; 4]) -> __m256i {
        // Per 128-bit half: [k, k, k + 2, k + 2] partial sums, then [b0, b0 + 2, b0 + 4, b0 + 6] | [b0 + 1, ...].
        let a = _mm256_hadd_epi32(w[0], w[1]);
        let b = _mm256_hadd_epi32(w[2], w[3]);
        let c = _mm256_hadd_epi32(a, b);
        _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }

    /// The `Q4` blocks `k, k + 1` at `q` (32 bytes of nibbles): both blocks' low nibbles (weights `0..16`),
    /// then both blocks' high ones (`16..32`), block `k` in the lower 128 bits of each.
    ///
    /// # Safety
    /// `q` must point to 32 readable bytes; the CPU must support AVX2.
    #[inline(always)]
    unsafe fn q4_pair(q: *const u8) -> (__m256i, __m256i) {
        let v = _mm256_loadu_si256(q as *const __m256i);
        let m4 = _mm256_set1_epi8(0x0F);
        (_mm256_and_si256(v, m4), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4))
    }

    /// A lone block's 8 lanes of partial sums ([`Kernel::dot`]) as a pair vector whose second block is
    /// empty (for [`hsum_pairs`]).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[inline(always)]
    unsafe fn lone_pair(t: __m256i) -> __m256i {
        let h = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        _mm256_inserti128_si256(_mm256_setzero_si256(), h, 0)
    }

    /// The 32 weights of the `Q4` block at `q` (16 bytes of nibbles) as 32 bytes in natural order.
    ///
    /// # Safety
    /// `q` must point to 16 readable bytes; the CPU must support AVX2.
    #[inline(always)]
    unsafe fn q4_bytes(q: *const u8) -> __m256i {
        let v = _mm_loadu_si128(q as *const __m128i);
        let m4 = _mm256_set1_epi8(0x0F);
        _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), m4)
    }

    /// The weight block at `wq` ready for [`dot_lanes`]: the unsigned operand of its products (`Q4`: the
    /// nibbles; `Q8`: |w|, where |-128| = 128 fits in u8) and, for `Q8`, the raw weights whose signs go onto x.
    ///
    /// # Safety
    /// `wq` must point to one block of quants of `kind` (16 or 32 bytes); the CPU must support AVX2.
    #[inline(always)]
    unsafe fn unpack(kind: QKind, wq: *const u8) -> (__m256i, __m256i) {
        match kind {
            QKind::Q4 => (q4_bytes(wq), _mm256_setzero_si256()),
            QKind::Q8 => {
                let wv = _mm256_loadu_si256(wq as *const __m256i);
                (_mm256_sign_epi8(wv, wv), wv)
            }
        }
    }

    /// Eight lanes of partial integer sums of an [`unpack`]ed weight block times the activation block at `xq`
    /// (their total is the exact dot product).
    ///
    /// # Safety
    /// `xq` must point to 32 readable bytes; the CPU must support AVX2, and AVX-512 VNNI + VL when `VNNI`.
    #[inline(always)]
    unsafe fn dot_lanes<const VNNI: bool>(kind: QKind, (u, raw): (__m256i, __m256i), xq: *const u8) -> __m256i {
        let xv = _mm256_loadu_si256(xq as *const __m256i);
        let s = match kind {
            QKind::Q4 => xv,
            QKind::Q8 => _mm256_sign_epi8(xv, raw),
        };
        if VNNI {
            vnni(u, s)
        } else {
            // Pairs of u8·i8 products are at most 2·128·127 < 2¹⁵: no saturation, the result is exact.
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
    }

    /// The float term that eight blocks' exact integer sums `fi` add to a row's lanes: for `Q4`,
    /// `xd·(wd·fi + wm·xs)`; for `Q8`, `xd·wd·fi`. The one definition of that arithmetic for every kernel
    /// here, so that they all round alike.
    ///
    /// # Safety
    /// `wd` and `xd` (and for `Q4` also `wm` and `xs`) must point to 8 readable values; the CPU must support
    /// AVX2.
    #[inline(always)]
    unsafe fn group_term(
        kind: QKind,
        fi: __m256,
        (wd, wm): (*const f32, *const f32),
        (xd, xs): (*const f32, *const f32),
    ) -> __m256 {
        let (xdv, wdv) = (_mm256_loadu_ps(xd), _mm256_loadu_ps(wd));
        match kind {
            QKind::Q4 => group_term_v(kind, fi, (wdv, _mm256_loadu_ps(wm)), (xdv, _mm256_loadu_ps(xs))),
            QKind::Q8 => group_term_v(kind, fi, (wdv, wdv), (xdv, xdv)),
        }
    }

    /// [`group_term`] on loaded scales (`wm` and `xs` unused for `Q8`).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[inline(always)]
    unsafe fn group_term_v(kind: QKind, fi: __m256, (wd, wm): (__m256, __m256), (xd, xs): (__m256, __m256)) -> __m256 {
        match kind {
            QKind::Q4 => _mm256_mul_ps(xd, _mm256_add_ps(_mm256_mul_ps(wd, fi), _mm256_mul_ps(wm, xs))),
            QKind::Q8 => _mm256_mul_ps(_mm256_mul_ps(xd, wd), fi),
        }
    }

    /// Row `r`'s result from its SIMD lanes `av` (the whole groups of eight blocks): the tail blocks (fewer
    /// than eight; SmolLM2's 576 columns leave two of 18) as one more, partial group, then the lanes' fixed
    /// sum ([`lanes_sum`]). The tail's exact integer sums by kernel `K` fill the first lanes of one
    /// [`hsum8`]; its scales come in by masked loads (nothing past the row or the vector is read); its float
    /// terms are [`group_term`]'s, so each lane gets the IEEE operations the portable [`block_term`] gives
    /// it, and only the tail's lanes are updated (a blend, not an added zero, which could turn a `-0.0`
    /// lane into `+0.0`). So this is bit for bit the portable kernel. Before, each tail block took its own
    /// horizontal sum and scalar float term, and the lanes went through memory to be summed: per 576-column
    /// row about as many instructions as the eight-block groups before them.
    ///
    /// # Safety
    /// `r < w.rows`, `x.len() == w.cols`; the CPU must run `K`.
    #[inline(always)]
    unsafe fn finish_row<K: Kernel>(w: &QMatrix, x: &QVec<K::X>, r: usize, av: __m256) -> f32 {
        let nb = w.cols / QBLOCK;
        let b0 = nb / LANES * LANES;
        let tail = nb - b0;
        let mut av = av;
        if tail > 0 {
            let kind = w.kind;
            let ql = w.qlen();
            let wb0 = r * nb + b0;
            // Blocks wb0.. of the quants and b0.. of x exist (r < rows, b0 + tail = nb).
            let (wq, xq) = (w.qs.as_ptr(), x.qs.as_ptr());
            let sums = if K::PAIRS && kind == QKind::Q4 && x.paired {
                // Whole pairs, then a last odd block (natural layout) alone.
                let mut v = [_mm256_setzero_si256(); 4];
                for (i, vi) in v.iter_mut().enumerate().take(tail / 2) {
                    let k = 2 * i;
                    *vi = K::dot_pair(q4_pair(wq.add((wb0 + k) * ql)), xq.add((b0 + k) * QBLOCK));
                }
                if tail % 2 == 1 {
                    let k = tail - 1;
                    let t = K::dot(kind, K::unpack(kind, wq.add((wb0 + k) * ql)), xq.add((b0 + k) * QBLOCK));
                    v[tail / 2] = lone_pair(t);
                }
                hsum_pairs(v)
            } else {
                let mut v = [_mm256_setzero_si256(); 8];
                for (k, vk) in v.iter_mut().enumerate().take(tail) {
                    *vk = K::dot(kind, K::unpack(kind, wq.add((wb0 + k) * ql)), xq.add((b0 + k) * QBLOCK));
                }
                hsum8(v)
            };
            let fi = _mm256_cvtepi32_ps(sums);
            // Lanes 0..tail: blocks b0.. of row r and of x, which exist; the other lanes are not read.
            let mask = _mm256_cmpgt_epi32(
                _mm256_set1_epi32(tail as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            );
            let ld = |p: *const f32| _mm256_maskload_ps(p, mask);
            let wd = ld(w.d.as_ptr().add(wb0));
            let xd = ld(x.d.as_ptr().add(b0));
            let term = match kind {
                QKind::Q4 => group_term_v(
                    kind,
                    fi,
                    (wd, ld(w.m.as_ptr().add(wb0))),
                    (xd, ld(x.s.as_ptr().add(b0))),
                ),
                QKind::Q8 => group_term_v(kind, fi, (wd, wd), (xd, xd)),
            };
            av = _mm256_blendv_ps(av, _mm256_add_ps(av, term), _mm256_castsi256_ps(mask));
        }
        // `lanes_sum`'s order: ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)).
        let p = _mm256_hadd_ps(av, av);
        let q = _mm256_hadd_ps(p, p);
        _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1)))
    }

    /// `vpdpbusd` from zero: the eight sums of four `u8 · i8` products. Inline assembly, not the intrinsic
    /// (stable only since Rust 1.89; the workspace's MSRV is 1.85) and not `#[target_feature]` for it.
    ///
    /// # Safety
    /// The CPU must support AVX-512 VNNI and AVX-512 VL (and AVX2).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn vnni(u: __m256i, s: __m256i) -> __m256i {
        let mut acc = _mm256_setzero_si256();
        std::arch::asm!(
            "vpdpbusd {acc}, {u}, {s}",
            acc = inout(ymm_reg) acc,
            u = in(ymm_reg) u,
            s = in(ymm_reg) s,
            options(pure, nomem, nostack, preserves_flags),
        );
        acc
    }

    /// `acc` plus `vpdpbusd`'s eight sums of four `u8 · i8` products.
    ///
    /// # Safety
    /// The CPU must support AVX-512 VNNI and AVX-512 VL (and AVX2).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn vnni_acc(mut acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        std::arch::asm!(
            "vpdpbusd {acc}, {u}, {s}",
            acc = inout(ymm_reg) acc,
            u = in(ymm_reg) u,
            s = in(ymm_reg) s,
            options(pure, nomem, nostack, preserves_flags),
        );
        acc
    }

    /// One kernel's block product in two halves: what a weight block unpacks to (done once per block for
    /// all the vectors of a batched step), and its eight lanes of exact integer partial sums with one
    /// activation block (their total is the block's dot product).
    trait Kernel {
        /// The activations' integer type.
        type X: QInt;
        /// # Safety
        /// `wq` must point to one block of quants of `kind`; the CPU must run the kernel.
        unsafe fn unpack(kind: QKind, wq: *const u8) -> (__m256i, __m256i);
        /// # Safety
        /// `xq` must point to one block of activations (32 values); the CPU must run the kernel.
        unsafe fn dot(kind: QKind, w: (__m256i, __m256i), xq: *const Self::X) -> __m256i;
        /// Whether [`Kernel::dot_pair`] exists (paired activations: int8 only).
        const PAIRS: bool;
        /// The pair vector of `Q4` blocks `k, k + 1` ([`q4_pair`]) with their paired activations at `xq`
        /// (64 values): lanes 0..4 block `k`'s partial sums, 4..8 block `k + 1`'s.
        ///
        /// # Safety
        /// `xq` must point to 64 values; the CPU must run the kernel; only called when `PAIRS`.
        unsafe fn dot_pair(w: (__m256i, __m256i), xq: *const Self::X) -> __m256i;
    }

    /// int8 activations: AVX2 `vpmaddubsw`, or AVX-512 VNNI `vpdpbusd` when `VNNI`.
    struct Int8<const VNNI: bool>;

    impl<const VNNI: bool> Kernel for Int8<VNNI> {
        type X = i8;
        #[inline(always)]
        unsafe fn unpack(kind: QKind, wq: *const u8) -> (__m256i, __m256i) {
            unpack(kind, wq)
        }
        #[inline(always)]
        unsafe fn dot(kind: QKind, w: (__m256i, __m256i), xq: *const i8) -> __m256i {
            dot_lanes::<VNNI>(kind, w, xq as *const u8)
        }
        const PAIRS: bool = true;
        #[inline(always)]
        unsafe fn dot_pair((lo, hi): (__m256i, __m256i), xq: *const i8) -> __m256i {
            let xl = _mm256_loadu_si256(xq as *const __m256i);
            let xh = _mm256_loadu_si256(xq.add(32) as *const __m256i);
            if VNNI {
                vnni_acc(vnni(lo, xl), hi, xh)
            } else {
                // A u4·i8 pair is at most 2·15·127 = 3810 in magnitude, two of them 7620 < 2¹⁵: exact in i16.
                let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
                _mm256_madd_epi16(p, _mm256_set1_epi16(1))
            }
        }
    }

    /// int16 activations: AVX2 `vpmaddwd` on the weights widened to i16.
    struct Int16;

    impl Kernel for Int16 {
        type X = i16;
        #[inline(always)]
        unsafe fn unpack(kind: QKind, wq: *const u8) -> (__m256i, __m256i) {
            match kind {
                QKind::Q4 => {
                    let v = _mm_loadu_si128(wq as *const __m128i);
                    let m4 = _mm_set1_epi8(0x0F);
                    (
                        _mm256_cvtepu8_epi16(_mm_and_si128(v, m4)),
                        _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), m4)),
                    )
                }
                QKind::Q8 => (
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(wq as *const __m128i)),
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(wq.add(16) as *const __m128i)),
                ),
            }
        }
        #[inline(always)]
        unsafe fn dot(_kind: QKind, (w0, w1): (__m256i, __m256i), xq: *const i16) -> __m256i {
            let x0 = _mm256_loadu_si256(xq as *const __m256i);
            let x1 = _mm256_loadu_si256(xq.add(16) as *const __m256i);
            // Pairs of i16 products are at most 2·128·32767 < 2³¹ and a block's sum 32·128·32767 < 2³¹:
            // exact.
            _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1))
        }
        const PAIRS: bool = false;
        unsafe fn dot_pair(_w: (__m256i, __m256i), _xq: *const i16) -> __m256i {
            unreachable!("int16 activations are never paired")
        }
    }

    /// Row `r` of `w` times `x` with kernel `K`, bit for bit [`row_dot_scalar`].
    ///
    /// # Safety
    /// `r < w.rows`, `x.len() == w.cols`; the CPU must run `K`.
    #[inline(always)]
    unsafe fn row_dot<K: Kernel>(w: &QMatrix, x: &QVec<K::X>, r: usize) -> f32 {
        let kind = w.kind;
        let nb = w.cols / QBLOCK;
        let ql = w.qlen();
        // Row r's blocks are r·nb .. (r + 1)·nb of the scale arrays and r·nb·ql .. of the quants; `x` has nb
        // blocks. Every pointer below stays inside those ranges (block indices b < groups·8 ≤ nb).
        let wq = w.qs.as_ptr().add(r * nb * ql);
        let wd = w.d.as_ptr().add(r * nb);
        let wm = if kind == QKind::Q4 {
            w.m.as_ptr().add(r * nb)
        } else {
            wd
        };
        let xq = x.qs.as_ptr();
        let (xd, xs) = (x.d.as_ptr(), x.s.as_ptr());
        let paired = K::PAIRS && kind == QKind::Q4 && x.paired;
        let mut av = _mm256_setzero_ps();
        for g in 0..nb / LANES {
            let b0 = g * LANES;
            let sums = if paired {
                // Blocks b0 + 2i, b0 + 2i + 1 are a whole pair (b0 is even, b0 + 8 ≤ nb): 32 bytes of quants
                // and 64 activations.
                let mut v = [_mm256_setzero_si256(); 4];
                for (i, vi) in v.iter_mut().enumerate() {
                    let k = b0 + 2 * i;
                    *vi = K::dot_pair(q4_pair(wq.add(k * ql)), xq.add(k * QBLOCK));
                }
                hsum_pairs(v)
            } else {
                let mut v = [_mm256_setzero_si256(); 8];
                for (k, vk) in v.iter_mut().enumerate() {
                    *vk = K::dot(kind, K::unpack(kind, wq.add((b0 + k) * ql)), xq.add((b0 + k) * QBLOCK));
                }
                hsum8(v)
            };
            let fi = _mm256_cvtepi32_ps(sums);
            av = _mm256_add_ps(
                av,
                group_term(kind, fi, (wd.add(b0), wm.add(b0)), (xd.add(b0), xs.add(b0))),
            );
        }
        finish_row::<K>(w, x, r, av)
    }

    /// Rows `r0..r0 + rlen` of `w` times each of `xs` into `out` (`[xs.len()][rlen]`) with kernel `K`, every
    /// output bit for bit what [`row_dot`] gives for its vector alone: a group of eight weight blocks is
    /// loaded and unpacked once and then dotted with every vector (the batched decode step), where
    /// [`row_dot`] unpacks it again for each vector. The integer block sums are exact, and each vector's
    /// float arithmetic is `row_dot`'s, in the same order.
    ///
    /// # Safety
    /// `r0 + rlen <= w.rows` with `rlen = out.len() / xs.len()`, every `x.len() == w.cols`; the CPU must run
    /// `K`.
    #[inline(always)]
    unsafe fn rows_multi<K: Kernel>(w: &QMatrix, xs: &[QVec<K::X>], r0: usize, out: &mut [f32]) {
        let n = xs.len();
        let rlen = out.len() / n;
        let kind = w.kind;
        let nb = w.cols / QBLOCK;
        let ql = w.qlen();
        // Every vector has the same layout (the dispatch checks it).
        let paired = K::PAIRS && kind == QKind::Q4 && xs[0].paired;
        let mut av = vec![_mm256_setzero_ps(); n];
        for i in 0..rlen {
            let r = r0 + i;
            // As in `row_dot`: every pointer stays inside row r's blocks and each x's nb blocks.
            let wq = w.qs.as_ptr().add(r * nb * ql);
            let wd = w.d.as_ptr().add(r * nb);
            let wm = if kind == QKind::Q4 {
                w.m.as_ptr().add(r * nb)
            } else {
                wd
            };
            av.fill(_mm256_setzero_ps());
            for g in 0..nb / LANES {
                let b0 = g * LANES;
                // Paired: wu[i] holds blocks b0 + 2i, b0 + 2i + 1 (`q4_pair`); else wu[k] block b0 + k.
                let mut wu = [(_mm256_setzero_si256(), _mm256_setzero_si256()); 8];
                if paired {
                    for (i, u) in wu.iter_mut().enumerate().take(4) {
                        *u = q4_pair(wq.add((b0 + 2 * i) * ql));
                    }
                } else {
                    for (k, u) in wu.iter_mut().enumerate() {
                        *u = K::unpack(kind, wq.add((b0 + k) * ql));
                    }
                }
                for (x, a) in xs.iter().zip(av.iter_mut()) {
                    let xq = x.qs.as_ptr();
                    let sums = if paired {
                        let mut v = [_mm256_setzero_si256(); 4];
                        for (i, vi) in v.iter_mut().enumerate() {
                            *vi = K::dot_pair(wu[i], xq.add((b0 + 2 * i) * QBLOCK));
                        }
                        hsum_pairs(v)
                    } else {
                        let mut v = [_mm256_setzero_si256(); 8];
                        for (k, vk) in v.iter_mut().enumerate() {
                            *vk = K::dot(kind, wu[k], xq.add((b0 + k) * QBLOCK));
                        }
                        hsum8(v)
                    };
                    let fi = _mm256_cvtepi32_ps(sums);
                    let (xd, xsum) = (x.d.as_ptr().add(b0), x.s.as_ptr().add(b0));
                    *a = _mm256_add_ps(*a, group_term(kind, fi, (wd.add(b0), wm.add(b0)), (xd, xsum)));
                }
            }
            for (t, (x, &a)) in xs.iter().zip(&av).enumerate() {
                out[t * rlen + i] = finish_row::<K>(w, x, r, a);
            }
        }
    }

    /// [`rows_multi`] with the AVX2 kernel.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn rows_multi_avx2(w: &QMatrix, xs: &[Q8Vec], r0: usize, out: &mut [f32]) {
        check_multi(w, xs, r0, out);
        // SAFETY: shapes checked just above; the caller guarantees AVX2.
        unsafe { rows_multi::<Int8<false>>(w, xs, r0, out) }
    }

    /// [`rows_multi`] with the AVX-512 VNNI kernel.
    ///
    /// # Safety
    /// The CPU must support AVX2, AVX-512 VNNI and AVX-512 VL.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn rows_multi_vnni(w: &QMatrix, xs: &[Q8Vec], r0: usize, out: &mut [f32]) {
        check_multi(w, xs, r0, out);
        // SAFETY: shapes checked just above; the caller guarantees the CPU features.
        unsafe { rows_multi::<Int8<true>>(w, xs, r0, out) }
    }

    /// Rows `r0..r0 + y.len()` of `w` times int16 `x` with the AVX2 kernel.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn rows16_avx2(w: &QMatrix, x: &Q16Vec, r0: usize, y: &mut [f32]) {
        assert!(x.len() == w.cols && r0 + y.len() <= w.rows, "rows16_avx2: shapes");
        for (i, o) in y.iter_mut().enumerate() {
            // SAFETY: the row exists and `x` has `w.cols` values (asserted above); the caller guarantees AVX2.
            *o = unsafe { row_dot::<Int16>(w, x, r0 + i) };
        }
    }

    /// [`rows_multi`] with the int16 AVX2 kernel.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn rows16_multi_avx2(w: &QMatrix, xs: &[Q16Vec], r0: usize, out: &mut [f32]) {
        check_multi(w, xs, r0, out);
        // SAFETY: shapes checked just above; the caller guarantees AVX2.
        unsafe { rows_multi::<Int16>(w, xs, r0, out) }
    }

    /// Rows `r0..r0 + y.len()` with the AVX2 kernel.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn rows_avx2(w: &QMatrix, x: &Q8Vec, r0: usize, y: &mut [f32]) {
        assert!(x.len() == w.cols && r0 + y.len() <= w.rows, "rows_avx2: shapes");
        for (i, o) in y.iter_mut().enumerate() {
            // SAFETY: the row exists and `x` has `w.cols` values (asserted above); the caller guarantees AVX2.
            *o = unsafe { row_dot::<Int8<false>>(w, x, r0 + i) };
        }
    }

    /// Rows `r0..r0 + y.len()` with the AVX-512 VNNI kernel.
    ///
    /// # Safety
    /// The CPU must support AVX2, AVX-512 VNNI and AVX-512 VL.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn rows_vnni(w: &QMatrix, x: &Q8Vec, r0: usize, y: &mut [f32]) {
        assert!(x.len() == w.cols && r0 + y.len() <= w.rows, "rows_vnni: shapes");
        for (i, o) in y.iter_mut().enumerate() {
            // SAFETY: the row exists and `x` has `w.cols` values (asserted above); the caller guarantees the
            // CPU features.
            *o = unsafe { row_dot::<Int8<true>>(w, x, r0 + i) };
        }
    }
}

/// `y[i] = row (r0 + i) of w · x` with kernel `isa`, falling back to the portable kernel when this CPU does
/// not run `isa`. `x` must have `w.cols` values and the rows must exist.
pub fn rows_int8(w: &QMatrix, x: &Q8Vec, r0: usize, y: &mut [f32], isa: Isa) {
    assert_eq!(x.len(), w.cols, "rows_int8: input length");
    assert!(r0 + y.len() <= w.rows, "rows_int8: rows past the matrix");
    // The SIMD kernels take paired activations for `Q4` weights only (and either layout for `Q4`).
    #[cfg(target_arch = "x86_64")]
    match isa {
        _ if x.paired && w.kind != QKind::Q4 => {}
        // SAFETY: `supported()` checked the features each kernel requires.
        Isa::Avx512Vnni if isa.supported() => return unsafe { x86::rows_vnni(w, x, r0, y) },
        // SAFETY: as above.
        Isa::Avx2 if isa.supported() => return unsafe { x86::rows_avx2(w, x, r0, y) },
        _ => {}
    }
    let _ = isa;
    for (i, o) in y.iter_mut().enumerate() {
        *o = row_dot_scalar(w, x, r0 + i);
    }
}

/// The shapes [`rows_int8_multi`]'s and [`rows_int16_multi`]'s kernels rely on (asserted: a wrong call panics, never reads out of
/// bounds).
fn check_multi<T: QInt>(w: &QMatrix, xs: &[QVec<T>], r0: usize, out: &[f32]) {
    assert!(
        !xs.is_empty() && out.len() % xs.len() == 0,
        "rows_int*_multi: output is not [n][rows]"
    );
    assert!(xs.iter().all(|x| x.len() == w.cols), "rows_int*_multi: input length");
    assert!(
        r0 + out.len() / xs.len() <= w.rows,
        "rows_int*_multi: rows past the matrix"
    );
}

/// `out[t][i] = row (r0 + i) of w · xs[t]` (`out` is `[xs.len()][rows]`) with kernel `isa`, each output bit
/// for bit what [`rows_int8`] gives for its vector alone; the SIMD kernels load and unpack each weight block
/// once for all the vectors.
pub fn rows_int8_multi(w: &QMatrix, xs: &[Q8Vec], r0: usize, out: &mut [f32], isa: Isa) {
    check_multi(w, xs, r0, out);
    // The SIMD kernels take the vectors in one layout, paired for `Q4` weights only.
    #[cfg(target_arch = "x86_64")]
    match isa {
        _ if xs.iter().any(|x| x.paired != xs[0].paired) || (xs[0].paired && w.kind != QKind::Q4) => {}
        // SAFETY: `supported()` checked the features each kernel requires.
        Isa::Avx512Vnni if isa.supported() => return unsafe { x86::rows_multi_vnni(w, xs, r0, out) },
        // SAFETY: as above.
        Isa::Avx2 if isa.supported() => return unsafe { x86::rows_multi_avx2(w, xs, r0, out) },
        _ => {}
    }
    let rlen = out.len() / xs.len();
    for (x, o) in xs.iter().zip(out.chunks_exact_mut(rlen)) {
        rows_int8(w, x, r0, o, isa);
    }
}

/// `y[i] = row (r0 + i) of w · x` for int16 activations with kernel `isa` ([`Isa::Avx2`] or the portable
/// one; others fall back to the portable kernel).
pub fn rows_int16(w: &QMatrix, x: &Q16Vec, r0: usize, y: &mut [f32], isa: Isa) {
    assert_eq!(x.len(), w.cols, "rows_int16: input length");
    assert!(r0 + y.len() <= w.rows, "rows_int16: rows past the matrix");
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 && isa.supported() {
        // SAFETY: `supported()` checked AVX2, the kernel's only requirement.
        return unsafe { x86::rows16_avx2(w, x, r0, y) };
    }
    let _ = isa;
    for (i, o) in y.iter_mut().enumerate() {
        *o = row_dot_scalar(w, x, r0 + i);
    }
}

/// `out[t][i] = row (r0 + i) of w · xs[t]` (`out` is `[xs.len()][rows]`) for int16 activations with kernel
/// `isa`, each output bit for bit what [`rows_int16`] gives for its vector alone; the AVX2 kernel widens
/// each weight block to i16 once for all the vectors.
pub fn rows_int16_multi(w: &QMatrix, xs: &[Q16Vec], r0: usize, out: &mut [f32], isa: Isa) {
    check_multi(w, xs, r0, out);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 && isa.supported() {
        // SAFETY: `supported()` checked AVX2, the kernel's only requirement.
        return unsafe { x86::rows16_multi_avx2(w, xs, r0, out) };
    }
    let rlen = out.len() / xs.len();
    for (x, o) in xs.iter().zip(out.chunks_exact_mut(rlen)) {
        rows_int16(w, x, r0, o, isa);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dequant::GgmlType;

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    /// Random GGUF blocks of `ty` (every byte random, scales finite f16 of either sign).
    fn random_matrix(ty: GgmlType, rows: usize, nb: usize, seed: u64) -> QMatrix {
        let bb = match ty {
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            _ => 34,
        };
        let mut next = rng(seed);
        let mut raw: Vec<u8> = (0..rows * nb * bb).map(|_| next() as u8).collect();
        for b in raw.chunks_exact_mut(bb) {
            // f16 with exponent 0x08..0x0F (about 2⁻⁷..1) and a random sign.
            let scale = |r: u64| (((r & 0x8000) | (0x2000 + (r & 0x1FFF))) as u16).to_le_bytes();
            b[0..2].copy_from_slice(&scale(next()));
            if ty == GgmlType::Q4_1 {
                b[2..4].copy_from_slice(&scale(next()));
            }
        }
        QMatrix::from_ggml(ty, rows, nb * QBLOCK, &raw).expect("valid blocks")
    }

    fn random_x(len: usize, seed: u64) -> Vec<f32> {
        let mut next = rng(seed);
        (0..len)
            .map(|i| {
                let v = (next() % 20001) as f32 / 10000.0 - 1.0;
                // Some blocks large, some tiny, some all zero: scales of very different sizes.
                match (i / QBLOCK) % 5 {
                    0 => v * 30.0,
                    1 => v * 1e-3,
                    2 => 0.0,
                    _ => v,
                }
            })
            .collect()
    }

    /// `x` in the paired layout (checked against `quantize_paired` and the natural values).
    fn pair(x: Q8Vec) -> Q8Vec {
        let mut p = x.clone();
        p.swap_pairs();
        assert!(p.is_paired() && !x.is_paired());
        assert_eq!(p.to_f32(), x.to_f32());
        let nb = x.d.len();
        for b in 0..nb {
            let ((nl, nh), (pl, ph)) = (x.halves(b), p.halves(b));
            assert_eq!(x.qs[nl..nl + 16], p.qs[pl..pl + 16], "block {b} of {nb}");
            assert_eq!(x.qs[nh..nh + 16], p.qs[ph..ph + 16], "block {b} of {nb}");
        }
        p
    }

    /// `quantize_paired` is `quantize` with the pairs' middle quarters swapped; `quantize_for` picks it for
    /// `Q4` weights.
    #[test]
    fn paired_quantization_is_the_natural_one_rearranged() {
        for nb in [1, 2, 3, 18, 19] {
            let xf = random_x(nb * QBLOCK, nb as u64 + 5);
            let (n, p) = (Q8Vec::quantize(&xf).unwrap(), Q8Vec::quantize_paired(&xf).unwrap());
            assert_eq!(pair(n.clone()).qs, p.qs);
            assert!(Q8Vec::quantize_for(QKind::Q4, &xf).unwrap().is_paired());
            assert!(!Q8Vec::quantize_for(QKind::Q8, &xf).unwrap().is_paired());
            if nb % 2 == 1 {
                // The last odd block keeps its natural place.
                assert_eq!(n.qs[(nb - 1) * QBLOCK..], p.qs[(nb - 1) * QBLOCK..]);
            }
        }
        assert!(Q8Vec::quantize_paired(&[0.0; 31]).is_none());
    }

    fn run(isa: Isa, w: &QMatrix, x: &Q8Vec) -> Vec<u32> {
        let mut y = vec![f32::NAN; w.rows];
        rows_int8(w, x, 0, &mut y, isa);
        y.iter().map(|v| v.to_bits()).collect()
    }

    const TYPES: [GgmlType; 3] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0];

    /// The multi-vector kernels, int8 and int16 (weights unpacked once for every vector), give, for each
    /// vector, bit for bit the portable single-vector kernel's result: every type, block counts with and without
    /// tails, batches of 1-5 vectors, a row offset.
    #[test]
    fn multi_vector_kernels_equal_the_single_vector_kernel_bit_for_bit() {
        let isas: Vec<Isa> = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni]
            .into_iter()
            .filter(|i| i.supported())
            .collect();
        #[cfg(target_arch = "x86_64")]
        assert!(
            isas.len() > 1 || !std::arch::is_x86_feature_detected!("avx2"),
            "no SIMD kernel ran"
        );
        for (k, ty) in TYPES.into_iter().enumerate() {
            for nb in [1, 7, 8, 9, 18, 49] {
                let w = random_matrix(ty, 23, nb, nb as u64 * 17 + k as u64);
                for n in 1..=5usize {
                    let xs: Vec<Q8Vec> = (0..n)
                        .map(|t| Q8Vec::quantize(&random_x(nb * QBLOCK, (nb * 10 + t) as u64)).unwrap())
                        .collect();
                    let (r0, rlen) = (3, 19);
                    let want: Vec<u32> = xs
                        .iter()
                        .flat_map(|x| run(Isa::Scalar, &w, x)[r0..r0 + rlen].to_vec())
                        .collect();
                    // The same vectors in the paired layout, and the two layouts mixed (the portable kernel).
                    let paired: Vec<Q8Vec> = xs.iter().cloned().map(pair).collect();
                    let mixed: Vec<Q8Vec> = xs
                        .iter()
                        .zip(&paired)
                        .enumerate()
                        .map(|(t, (a, b))| if t % 2 == 0 { a.clone() } else { b.clone() })
                        .collect();
                    for &isa in &isas {
                        for (layout, xs) in [("natural", &xs), ("paired", &paired), ("mixed", &mixed)] {
                            let mut out = vec![f32::NAN; n * rlen];
                            rows_int8_multi(&w, xs, r0, &mut out, isa);
                            let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                            assert_eq!(got, want, "{ty} nb {nb} n {n} {isa:?} {layout}");
                        }
                    }
                    // The int16 path: its multi-vector kernel against the portable single-vector one.
                    let xs16: Vec<Q16Vec> = (0..n)
                        .map(|t| Q16Vec::quantize(&random_x(nb * QBLOCK, (nb * 10 + t) as u64)).unwrap())
                        .collect();
                    let want16: Vec<u32> = xs16
                        .iter()
                        .flat_map(|x| run16(Isa::Scalar, &w, x)[r0..r0 + rlen].to_vec())
                        .collect();
                    for isa in [Isa::Scalar, Isa::Avx2].into_iter().filter(|i| i.supported()) {
                        let mut out = vec![f32::NAN; n * rlen];
                        rows_int16_multi(&w, &xs16, r0, &mut out, isa);
                        let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(got, want16, "int16 {ty} nb {nb} n {n} {isa:?}");
                    }
                }
            }
        }
    }

    /// Every SIMD kernel this CPU runs gives bit for bit the portable kernel's result, for block counts
    /// below, at and around the 8-block group (tails), every weight type, rows of random bytes.
    #[test]
    fn simd_kernels_equal_scalar_bit_for_bit() {
        let isas: Vec<Isa> = [Isa::Avx2, Isa::Avx512Vnni]
            .into_iter()
            .filter(|i| i.supported())
            .collect();
        #[cfg(target_arch = "x86_64")]
        assert!(
            !isas.is_empty() || !std::arch::is_x86_feature_detected!("avx2"),
            "no SIMD kernel ran"
        );
        for (k, ty) in TYPES.into_iter().enumerate() {
            for nb in [1, 2, 7, 8, 9, 15, 16, 17, 18, 48, 49] {
                let w = random_matrix(ty, 37, nb, nb as u64 * 31 + k as u64);
                let x = Q8Vec::quantize(&random_x(nb * QBLOCK, nb as u64)).unwrap();
                let want = run(Isa::Scalar, &w, &x);
                let xp = pair(x.clone());
                assert_eq!(run(Isa::Scalar, &w, &xp), want, "{ty} nb {nb} scalar, paired");
                for &isa in &isas {
                    assert_eq!(run(isa, &w, &x), want, "{ty} nb {nb} {isa:?}");
                    assert_eq!(run(isa, &w, &xp), want, "{ty} nb {nb} {isa:?}, paired");
                }
            }
        }
    }

    fn run16(isa: Isa, w: &QMatrix, x: &Q16Vec) -> Vec<u32> {
        let mut y = vec![f32::NAN; w.rows];
        rows_int16(w, x, 0, &mut y, isa);
        y.iter().map(|v| v.to_bits()).collect()
    }

    /// The int16 path: AVX2 = portable bit for bit (tails included), and the portable kernel is the product
    /// of the dequantized operands.
    #[test]
    fn int16_kernels_equal_scalar_and_the_dequantized_product() {
        for (k, ty) in TYPES.into_iter().enumerate() {
            for nb in [1, 7, 8, 9, 17, 18, 48, 49] {
                let w = random_matrix(ty, 23, nb, nb as u64 * 13 + k as u64);
                let x = Q16Vec::quantize(&random_x(nb * QBLOCK, nb as u64 + 99)).unwrap();
                let want = run16(Isa::Scalar, &w, &x);
                if Isa::Avx2.supported() {
                    assert_eq!(run16(Isa::Avx2, &w, &x), want, "{ty} nb {nb}");
                }
                let (wd, xd) = (w.to_f32(), x.to_f32());
                for (r, &bits) in want.iter().enumerate() {
                    let got = f32::from_bits(bits);
                    let row = &wd.data[r * w.cols..(r + 1) * w.cols];
                    let exact: f64 = row.iter().zip(&xd).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                    let mag: f64 = row
                        .iter()
                        .zip(&xd)
                        .map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs())
                        .sum();
                    assert!(
                        (f64::from(got) - exact).abs() <= 1e-5 * (1.0 + mag),
                        "{ty} row {r}: {got} vs {exact}"
                    );
                }
            }
        }
        // Finer than int8: the quantized activations are within amax / 65534 of the input.
        let xf = random_x(4 * QBLOCK, 3);
        for (xb, qb) in xf
            .chunks_exact(QBLOCK)
            .zip(Q16Vec::quantize(&xf).unwrap().to_f32().chunks_exact(QBLOCK))
        {
            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            for (a, r) in xb.iter().zip(qb) {
                assert!((a - r).abs() <= amax / 65534.0 * 1.001 + 1e-30, "{a} vs {r}");
            }
        }
        assert!(Q16Vec::quantize(&[0.0; 31]).is_none());
    }

    /// The portable kernel is the exact product of the dequantized weights with the dequantized int8
    /// activations (up to f32 rounding): the integer arithmetic and the scale formula are right.
    #[test]
    fn scalar_kernel_is_the_product_of_the_dequantized_operands() {
        for ty in TYPES {
            let nb = 11;
            let w = random_matrix(ty, 9, nb, 5);
            let x = Q8Vec::quantize(&random_x(nb * QBLOCK, 6)).unwrap();
            let (wd, xd) = (w.to_f32(), x.to_f32());
            let mut y = vec![0.0; w.rows];
            rows_int8(&w, &x, 0, &mut y, Isa::Scalar);
            for (r, &got) in y.iter().enumerate() {
                let row = &wd.data[r * w.cols..(r + 1) * w.cols];
                let want: f64 = row.iter().zip(&xd).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                let mag: f64 = row
                    .iter()
                    .zip(&xd)
                    .map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs())
                    .sum();
                assert!(
                    (f64::from(got) - want).abs() <= 1e-5 * (1.0 + mag),
                    "{ty} row {r}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn quantize_bounds_and_errors() {
        let x = random_x(4 * QBLOCK, 9);
        let q = Q8Vec::quantize(&x).unwrap();
        assert!(q.qs.iter().all(|&v| v != i8::MIN));
        for (b, (xb, qb)) in x.chunks_exact(QBLOCK).zip(q.to_f32().chunks_exact(QBLOCK)).enumerate() {
            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            for (a, r) in xb.iter().zip(qb) {
                // Round to nearest: at most half a step (amax / 254) off, plus f32 rounding.
                assert!((a - r).abs() <= amax / 254.0 * 1.0001 + 1e-30, "block {b}: {a} vs {r}");
            }
        }
        assert!(Q8Vec::quantize(&[1.0; 33]).is_none());
        // Non-finite values give a non-finite result, not a panic.
        let w = random_matrix(GgmlType::Q4_1, 1, 1, 3);
        for bad_value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut bad = vec![1.0f32; QBLOCK];
            bad[3] = bad_value;
            let q = Q8Vec::quantize(&bad).unwrap();
            for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni] {
                let mut y = [0.0f32];
                rows_int8(&w, &q, 0, &mut y, isa);
                assert!(!y[0].is_finite(), "{bad_value} {isa:?}: {}", y[0]);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Random shapes, weights and activations (including values of any size): SIMD = scalar, bit for
        /// bit, and `matvec_int8` (chunked, threaded) equals the kernel row by row.
        #[test]
        fn simd_equals_scalar_on_random_inputs(
            kind in 0usize..3, rows in 1usize..140, nb in 1usize..40, seed in 0u64..u64::MAX, threads in 1usize..3,
            scale in -20i32..20,
        ) {
            let ty = TYPES[kind];
            let w = random_matrix(ty, rows, nb, seed);
            let xf: Vec<f32> = random_x(nb * QBLOCK, seed ^ 0xABCD).iter().map(|v| v * 2f32.powi(scale)).collect();
            let x = Q8Vec::quantize(&xf).unwrap();
            let want = run(Isa::Scalar, &w, &x);
            for isa in [Isa::Avx2, Isa::Avx512Vnni] {
                if isa.supported() {
                    proptest::prop_assert_eq!(&run(isa, &w, &x), &want, "{} {:?}", ty, isa);
                }
            }
            let mut y = vec![f32::NAN; rows];
            w.matvec_int8(&xf, &mut y, threads);
            let got: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
            proptest::prop_assert_eq!(&got, &run(Isa::detect(), &w, &x));
            // The batched form gives each vector what the single form gives it.
            let xx: Vec<f32> = xf.iter().chain(xf.iter().rev()).copied().collect();
            let mut yy = vec![f32::NAN; 2 * rows];
            w.matvec_batch_int8(&xx, 2, &mut yy, threads);
            let got: Vec<u32> = yy[..rows].iter().map(|v| v.to_bits()).collect();
            proptest::prop_assert_eq!(&got, &want);
            // The same for the int16 path.
            let x16 = Q16Vec::quantize(&xf).unwrap();
            let want16 = run16(Isa::Scalar, &w, &x16);
            if Isa::Avx2.supported() {
                proptest::prop_assert_eq!(&run16(Isa::Avx2, &w, &x16), &want16, "{} int16", ty);
            }
            w.matvec_batch_int16(&xx, 2, &mut yy, threads);
            let got: Vec<u32> = yy[..rows].iter().map(|v| v.to_bits()).collect();
            proptest::prop_assert_eq!(&got, &want16);
            w.matvec_int16(&xf, &mut y, threads);
            let got: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
            proptest::prop_assert_eq!(&got, &want16);
        }
    }
}
