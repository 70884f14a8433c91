//! CPU kernels of the engine: matrix products (the `gemm` crate for prefill, a row-parallel dot-product
//! kernel for decode), RMSNorm, rotary embeddings, SiLU, softmax.

use crate::par;

pub mod int8;

pub use int8::{DecodePath, Isa, Q16Vec, Q8Vec};

/// A dense row-major f32 matrix stored as `[rows, cols]` (a linear layer's `[out, in]`).
#[derive(Clone, Debug, Default)]
pub struct Matrix {
    /// Number of rows (output features).
    pub rows: usize,
    /// Number of columns (input features).
    pub cols: usize,
    /// `rows * cols` values, row-major.
    pub data: Vec<f32>,
}

impl Matrix {
    /// A matrix from its parts; `data.len()` must be `rows * cols`.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data length");
        Matrix { rows, cols, data }
    }

    /// Bytes of weights this matrix holds.
    pub fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<f32>()
    }
}

/// `y[t, :] = W · x[t, :]` for `n` rows of `x` (`n * w.cols` values); `y` holds `n * w.rows` values.
///
/// `threads` is how many threads this rank may use (1 = the calling thread only).
pub fn linear(x: &[f32], n: usize, w: &Matrix, y: &mut [f32], threads: usize) {
    assert_eq!(x.len(), n * w.cols, "linear: input length");
    assert_eq!(y.len(), n * w.rows, "linear: output length");
    if w.rows == 0 || n == 0 {
        return;
    }
    if w.cols == 0 {
        y.fill(0.0);
        return;
    }
    if n <= 2 {
        for t in 0..n {
            matvec(
                &x[t * w.cols..(t + 1) * w.cols],
                w,
                &mut y[t * w.rows..(t + 1) * w.rows],
                threads,
            );
        }
        return;
    }
    prefill_product(Rows::Dense(&w.data), x, n, w.rows, w.cols, y, threads);
}

/// Rows per parallel task in [`matvec`]: small, so that the last claims of a product balance its threads
/// ([`par`] hands tasks out in shrinking runs, each run one kernel call, so small tasks cost neither a
/// claim nor a call each). Every row is computed alone, so the value changes no result bit.
const MATVEC_CHUNK: usize = 16;

/// Rows per block of a batched product ([`batch_rows`]): each block is one kernel call that reads its
/// weights once for every vector, so it keeps the 64 rows it had before [`MATVEC_CHUNK`] became 16 (the
/// smaller tasks were measured for single-vector decode only).
const BATCH_CHUNK: usize = 64;

/// Fewest rows of a product split over threads (fewer: the hand-off costs more than it saves).
const PAR_MIN_ROWS: usize = 128;

/// Runs `kernel((block, out))` over runs of consecutive blocks of [`MATVEC_CHUNK`] rows of `y` that cover
/// it once (`out` = the run's rows, starting at row `block · MATVEC_CHUNK`), over `threads` compute threads
/// ([`par::for_each_span`]) when there are at least [`PAR_MIN_ROWS`] rows; one call for all rows on one
/// thread.
fn row_blocks(threads: usize, y: &mut [f32], kernel: impl Fn((usize, &mut [f32])) + Sync) {
    let threads = if y.len() >= PAR_MIN_ROWS { threads } else { 1 };
    par::for_each_span(threads, y, MATVEC_CHUNK, |c, out| kernel((c, out)));
}

/// `y = W · x` for one vector.
pub fn matvec(x: &[f32], w: &Matrix, y: &mut [f32], threads: usize) {
    debug_assert_eq!(x.len(), w.cols);
    debug_assert_eq!(y.len(), w.rows);
    let cols = w.cols;
    let kernel = |(chunk, out): (usize, &mut [f32])| {
        let base = chunk * MATVEC_CHUNK;
        for (i, o) in out.iter_mut().enumerate() {
            let row = &w.data[(base + i) * cols..(base + i + 1) * cols];
            *o = dot(row, x);
        }
    };
    row_blocks(threads, y, kernel);
}

/// `y[t, :] = W · x[t, :]` for `n` independent vectors in one pass over the weights (a batched decode
/// step): each block of 64 rows is read once and applied to every vector while it is in cache.
/// Every output is computed exactly as [`matvec`] computes it (same kernel, same order), so a sequence's
/// results do not depend on what else is in the batch.
pub fn matvec_batch(x: &[f32], n: usize, w: &Matrix, y: &mut [f32], threads: usize) {
    assert_eq!(x.len(), n * w.cols, "matvec_batch: input length");
    assert_eq!(y.len(), n * w.rows, "matvec_batch: output length");
    if n == 1 {
        return matvec(x, w, y, threads);
    }
    let cols = w.cols;
    batch_rows(n, w.rows, y, threads, |base, out| {
        let rlen = out.len() / n;
        for (t, o) in out.chunks_exact_mut(rlen).enumerate() {
            let xt = &x[t * cols..(t + 1) * cols];
            for (i, v) in o.iter_mut().enumerate() {
                *v = dot(&w.data[(base + i) * cols..(base + i + 1) * cols], xt);
            }
        }
    });
}

/// Runs `kernel(first_row, out)` for every block of [`BATCH_CHUNK`] rows, `out` being `[n][rlen]` (the
/// block's rows for each of the `n` vectors; blocks in parallel when `threads > 1`, so a block's weights
/// are read from memory once for all vectors), then scatters the block-major results into `y` (`[n, rows]`).
fn batch_rows(n: usize, rows: usize, y: &mut [f32], threads: usize, kernel: impl Fn(usize, &mut [f32]) + Sync) {
    let mut tmp = vec![0.0f32; n * rows];
    let threads = if rows >= PAR_MIN_ROWS { threads } else { 1 };
    par::for_each_chunk(threads, &mut tmp, BATCH_CHUNK * n, |c, out| {
        kernel(c * BATCH_CHUNK, out)
    });
    for (c, blk) in tmp.chunks(BATCH_CHUNK * n).enumerate() {
        let rlen = blk.len() / n;
        let base = c * BATCH_CHUNK;
        for (t, vals) in blk.chunks_exact(rlen).enumerate() {
            y[t * rows + base..t * rows + base + rlen].copy_from_slice(vals);
        }
    }
}

/// Dot product with 16 independent accumulators (vectorizes to SIMD lanes without reassociation flags).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    const L: usize = 16;
    let mut acc = [0.0f32; L];
    let ca = a.chunks_exact(L);
    let cb = b.chunks_exact(L);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    let mut s = 0.0f32;
    for v in acc {
        s += v;
    }
    s + tail
}

/// Values per quantization block (`Q4_0`, `Q4_1`, `Q8_0`).
pub const QBLOCK: usize = 32;

/// The storage of a [`QMatrix`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QKind {
    /// 4-bit: `w = d * q + m` with `q` in `0..16` (GGUF `Q4_1`; `Q4_0` is stored with `m = -8 d`).
    Q4,
    /// 8-bit: `w = d * q` with `q` an `i8` (GGUF `Q8_0`).
    Q8,
}

/// A block-quantized row-major matrix (`[rows, cols]`, `cols` a multiple of [`QBLOCK`]), repacked from GGUF
/// blocks into separate arrays: per-block scales `d` (and minimums `m` for [`QKind::Q4`]) as f32, and the
/// quants (`Q4`: 16 bytes per block in GGUF nibble order, value `j` in the low nibble of byte `j`, value
/// `j + 16` in its high nibble; `Q8`: 32 `i8` per block).
#[derive(Clone, Debug)]
pub struct QMatrix {
    /// Number of rows (output features).
    pub rows: usize,
    /// Number of columns (input features), a multiple of [`QBLOCK`].
    pub cols: usize,
    kind: QKind,
    d: Vec<f32>,
    m: Vec<f32>,
    qs: Vec<u8>,
}

fn f16_le(b: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

impl QMatrix {
    /// Repacks `rows` rows of `cols` values of GGUF type `ty` (`data`: `rows` rows of whole blocks). `None`
    /// for other types, a `cols` that is not a whole number of blocks, or a `data` of the wrong length.
    pub fn from_ggml(ty: crate::model::dequant::GgmlType, rows: usize, cols: usize, data: &[u8]) -> Option<Self> {
        use crate::model::dequant::GgmlType;
        if cols % QBLOCK != 0 {
            return None;
        }
        let (kind, block_bytes) = match ty {
            GgmlType::Q4_0 => (QKind::Q4, 18),
            GgmlType::Q4_1 => (QKind::Q4, 20),
            GgmlType::Q8_0 => (QKind::Q8, 34),
            _ => return None,
        };
        let nb = rows.checked_mul(cols / QBLOCK)?;
        if data.len() != nb.checked_mul(block_bytes)? {
            return None;
        }
        let qlen = if kind == QKind::Q4 { 16 } else { 32 };
        let mut q = QMatrix {
            rows,
            cols,
            kind,
            d: Vec::with_capacity(nb),
            m: Vec::with_capacity(if kind == QKind::Q4 { nb } else { 0 }),
            qs: Vec::with_capacity(nb * qlen),
        };
        for b in data.chunks_exact(block_bytes) {
            let d = f16_le(&b[0..2]);
            q.d.push(d);
            match ty {
                GgmlType::Q4_0 => {
                    q.m.push(-8.0 * d);
                    q.qs.extend_from_slice(&b[2..18]);
                }
                GgmlType::Q4_1 => {
                    q.m.push(f16_le(&b[2..4]));
                    q.qs.extend_from_slice(&b[4..20]);
                }
                _ => q.qs.extend_from_slice(&b[2..34]),
            }
        }
        Some(q)
    }

    /// The storage kind.
    pub fn kind(&self) -> QKind {
        self.kind
    }

    fn qlen(&self) -> usize {
        match self.kind {
            QKind::Q4 => 16,
            QKind::Q8 => 32,
        }
    }

    /// Bytes of weights this matrix holds (scales, minimums and quants).
    pub fn bytes(&self) -> usize {
        (self.d.len() + self.m.len()) * std::mem::size_of::<f32>() + self.qs.len()
    }

    /// Dequantizes row `r` into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        self.dequantize_row_inline(r, out)
    }

    #[inline(always)]
    fn dequantize_row_inline(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols, "dequantize_row: output length");
        let nb = self.cols / QBLOCK;
        let ql = self.qlen();
        for (b, o) in out.chunks_exact_mut(QBLOCK).enumerate() {
            let bi = r * nb + b;
            let d = self.d[bi];
            let q = &self.qs[bi * ql..(bi + 1) * ql];
            match self.kind {
                QKind::Q4 => {
                    let m = self.m[bi];
                    for j in 0..16 {
                        o[j] = d * f32::from(q[j] & 15) + m;
                        o[j + 16] = d * f32::from(q[j] >> 4) + m;
                    }
                }
                QKind::Q8 => {
                    for j in 0..32 {
                        o[j] = d * f32::from(q[j] as i8);
                    }
                }
            }
        }
    }

    /// [`QMatrix::dequantize_row`] compiled for AVX2 + FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dequantize_row_avx2(&self, r: usize, out: &mut [f32]) {
        self.dequantize_row_inline(r, out)
    }

    fn dequantize_row_dispatch(&self, r: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above), the only requirement of
            // `dequantize_row_avx2`; the function itself is safe code.
            unsafe { self.dequantize_row_avx2(r, out) };
            return;
        }
        self.dequantize_row_inline(r, out)
    }

    /// The whole matrix dequantized.
    pub fn to_f32(&self) -> Matrix {
        let mut data = vec![0.0f32; self.rows * self.cols];
        if self.cols > 0 {
            for (r, o) in data.chunks_exact_mut(self.cols).enumerate() {
                self.dequantize_row(r, o);
            }
        }
        Matrix::new(self.rows, self.cols, data)
    }

    /// The rows of `parts` one after the other; `None` unless all have the same kind and width.
    pub fn stack(parts: Vec<QMatrix>) -> Option<QMatrix> {
        let first = parts.first()?;
        let (kind, cols) = (first.kind, first.cols);
        if parts.iter().any(|p| p.kind != kind || p.cols != cols) {
            return None;
        }
        let mut out = QMatrix {
            rows: 0,
            cols,
            kind,
            d: Vec::new(),
            m: Vec::new(),
            qs: Vec::new(),
        };
        for p in parts {
            out.rows += p.rows;
            out.d.extend(p.d);
            out.m.extend(p.m);
            out.qs.extend(p.qs);
        }
        Some(out)
    }

    /// Columns `cols` of every row; `None` unless both ends are whole blocks within the matrix.
    pub fn columns(&self, cols: std::ops::Range<usize>) -> Option<QMatrix> {
        if cols.start % QBLOCK != 0 || cols.end % QBLOCK != 0 || cols.start > cols.end || cols.end > self.cols {
            return None;
        }
        let (nb, b0, b1, ql) = (self.cols / QBLOCK, cols.start / QBLOCK, cols.end / QBLOCK, self.qlen());
        let mut out = QMatrix {
            rows: self.rows,
            cols: cols.len(),
            kind: self.kind,
            d: Vec::with_capacity(self.rows * (b1 - b0)),
            m: Vec::new(),
            qs: Vec::with_capacity(self.rows * (b1 - b0) * ql),
        };
        for r in 0..self.rows {
            out.d.extend_from_slice(&self.d[r * nb + b0..r * nb + b1]);
            if self.kind == QKind::Q4 {
                out.m.extend_from_slice(&self.m[r * nb + b0..r * nb + b1]);
            }
            out.qs
                .extend_from_slice(&self.qs[(r * nb + b0) * ql..(r * nb + b1) * ql]);
        }
        Some(out)
    }

    /// `y[r] = row r · x` for the rows `r0..r0 + y.len()`; `xsum` holds the sum of each block of `x`.
    #[inline(always)]
    fn rows_dot(&self, x: &[f32], xsum: &[f32], r0: usize, y: &mut [f32]) {
        let nb = self.cols / QBLOCK;
        for (i, o) in y.iter_mut().enumerate() {
            let r = r0 + i;
            let d = &self.d[r * nb..(r + 1) * nb];
            match self.kind {
                QKind::Q4 => {
                    let m = &self.m[r * nb..(r + 1) * nb];
                    let qs = &self.qs[r * nb * 16..(r + 1) * nb * 16];
                    let mut acc = [0.0f32; 16];
                    let mut macc = 0.0f32;
                    for b in 0..nb {
                        let q: &[u8; 16] = qs[b * 16..b * 16 + 16].try_into().expect("16 bytes");
                        let xb: &[f32; 32] = x[b * 32..b * 32 + 32].try_into().expect("32 values");
                        let db = d[b];
                        for j in 0..16 {
                            let lo = f32::from(q[j] & 15) * xb[j];
                            let hi = f32::from(q[j] >> 4) * xb[j + 16];
                            acc[j] += db * (lo + hi);
                        }
                        macc += m[b] * xsum[b];
                    }
                    *o = acc.iter().sum::<f32>() + macc;
                }
                QKind::Q8 => {
                    let qs = &self.qs[r * nb * 32..(r + 1) * nb * 32];
                    let mut acc = [0.0f32; 16];
                    for b in 0..nb {
                        let q: &[u8; 32] = qs[b * 32..b * 32 + 32].try_into().expect("32 bytes");
                        let xb: &[f32; 32] = x[b * 32..b * 32 + 32].try_into().expect("32 values");
                        let db = d[b];
                        for j in 0..16 {
                            let s = f32::from(q[j] as i8) * xb[j] + f32::from(q[j + 16] as i8) * xb[j + 16];
                            acc[j] += db * s;
                        }
                    }
                    *o = acc.iter().sum::<f32>();
                }
            }
        }
    }

    /// [`QMatrix::rows_dot`] compiled for AVX2 + FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_dot_avx2(&self, x: &[f32], xsum: &[f32], r0: usize, y: &mut [f32]) {
        self.rows_dot(x, xsum, r0, y)
    }

    fn rows_dot_dispatch(&self, x: &[f32], xsum: &[f32], r0: usize, y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above), the only requirement of
            // `rows_dot_avx2`; the function itself is safe code.
            unsafe { self.rows_dot_avx2(x, xsum, r0, y) };
            return;
        }
        self.rows_dot(x, xsum, r0, y)
    }

    /// `y = W · x` for one vector, on the quantized blocks (exact f32 arithmetic on f32 `x`: for `Q4`,
    /// `Σ_b d_b Σ_j q_j x_j + m_b Σ_j x_j`).
    pub fn matvec(&self, x: &[f32], y: &mut [f32], threads: usize) {
        assert_eq!(x.len(), self.cols, "matvec: input length");
        assert_eq!(y.len(), self.rows, "matvec: output length");
        let xsum: Vec<f32> = if self.kind == QKind::Q4 {
            x.chunks_exact(QBLOCK).map(|c| c.iter().sum()).collect()
        } else {
            Vec::new()
        };
        let kernel = |(chunk, out): (usize, &mut [f32])| self.rows_dot_dispatch(x, &xsum, chunk * MATVEC_CHUNK, out);
        row_blocks(threads, y, kernel);
    }
}

impl QMatrix {
    /// `y = W · x` for one vector on the int8 path: `x` quantized to int8 per block ([`Q8Vec`]), integer
    /// dot products with the blocks (kernel [`Isa::detect`]).
    pub fn matvec_int8(&self, x: &[f32], y: &mut [f32], threads: usize) {
        assert_eq!(x.len(), self.cols, "matvec: input length");
        assert_eq!(y.len(), self.rows, "matvec: output length");
        if self.cols == 0 {
            y.fill(0.0);
            return;
        }
        let xq = Q8Vec::quantize_for(self.kind, x).expect("a QMatrix has whole blocks of columns");
        let isa = Isa::detect();
        let kernel = |(chunk, out): (usize, &mut [f32])| int8::rows_int8(self, &xq, chunk * MATVEC_CHUNK, out, isa);
        row_blocks(threads, y, kernel);
    }

    /// [`QMatrix::matvec_int8`] for `n` vectors in one pass over the blocks; each output equals what
    /// `matvec_int8` gives for its vector alone (same kernel per row).
    pub fn matvec_batch_int8(&self, x: &[f32], n: usize, y: &mut [f32], threads: usize) {
        assert_eq!(x.len(), n * self.cols, "matvec_batch: input length");
        assert_eq!(y.len(), n * self.rows, "matvec_batch: output length");
        if self.cols == 0 {
            y.fill(0.0);
            return;
        }
        if n == 1 {
            return self.matvec_int8(x, y, threads);
        }
        let xq: Vec<Q8Vec> = x
            .chunks_exact(self.cols.max(1))
            .map(|v| Q8Vec::quantize_for(self.kind, v).expect("a QMatrix has whole blocks of columns"))
            .collect();
        let isa = Isa::detect();
        batch_rows(n, self.rows, y, threads, |base, out| {
            int8::rows_int8_multi(self, &xq, base, out, isa)
        });
    }
}

impl QMatrix {
    /// `y = W · x` for one vector on the int16 path ([`Q16Vec`] activations, kernel
    /// [`Isa::detect_int16`]).
    pub fn matvec_int16(&self, x: &[f32], y: &mut [f32], threads: usize) {
        self.matvec_batch_int16(x, 1, y, threads)
    }

    /// [`QMatrix::matvec_int16`] for `n` vectors in one pass over the blocks, each weight block widened once
    /// for all of them ([`int8::rows_int16_multi`]); each output equals what `matvec_int16` gives for its
    /// vector alone.
    pub fn matvec_batch_int16(&self, x: &[f32], n: usize, y: &mut [f32], threads: usize) {
        assert_eq!(x.len(), n * self.cols, "matvec_batch: input length");
        assert_eq!(y.len(), n * self.rows, "matvec_batch: output length");
        if self.cols == 0 {
            y.fill(0.0);
            return;
        }
        let xq: Vec<Q16Vec> = x
            .chunks_exact(self.cols)
            .map(|v| Q16Vec::quantize(v).expect("a QMatrix has whole blocks of columns"))
            .collect();
        let isa = Isa::detect_int16();
        if n == 1 {
            let kernel =
                |(chunk, out): (usize, &mut [f32])| int8::rows_int16(self, &xq[0], chunk * MATVEC_CHUNK, out, isa);
            row_blocks(threads, y, kernel);
            return;
        }
        batch_rows(n, self.rows, y, threads, |base, out| {
            int8::rows_int16_multi(self, &xq, base, out, isa)
        });
    }
}

impl QMatrix {
    /// [`QMatrix::matvec`] for `n` vectors in one pass over the blocks (see [`matvec_batch`]); each output
    /// equals what `matvec` gives for its vector alone.
    pub fn matvec_batch(&self, x: &[f32], n: usize, y: &mut [f32], threads: usize) {
        assert_eq!(x.len(), n * self.cols, "matvec_batch: input length");
        assert_eq!(y.len(), n * self.rows, "matvec_batch: output length");
        if n == 1 {
            return self.matvec(x, y, threads);
        }
        let xsum: Vec<f32> = if self.kind == QKind::Q4 {
            x.chunks_exact(QBLOCK).map(|c| c.iter().sum()).collect()
        } else {
            Vec::new()
        };
        batch_rows(n, self.rows, y, threads, |base, out| {
            self.rows_dot_multi_dispatch(x, &xsum, n, base, out)
        });
    }

    /// Row `r`'s quants as f32 (exact: small integers) in block order (for `Q4` each block's low nibbles,
    /// then its high ones), into `qf` (`cols` values).
    #[inline(always)]
    fn unpack_row_quants(&self, r: usize, qf: &mut [f32]) {
        let nb = self.cols / QBLOCK;
        let ql = self.qlen();
        let qs = &self.qs[r * nb * ql..(r + 1) * nb * ql];
        match self.kind {
            QKind::Q4 => {
                for (qb, q) in qf.chunks_exact_mut(32).zip(qs.chunks_exact(16)) {
                    let qb: &mut [f32; 32] = qb.try_into().expect("32 values");
                    let q: &[u8; 16] = q.try_into().expect("16 bytes");
                    for j in 0..16 {
                        qb[j] = f32::from(q[j] & 15);
                        qb[j + 16] = f32::from(q[j] >> 4);
                    }
                }
            }
            QKind::Q8 => {
                for (v, &q) in qf.iter_mut().zip(qs) {
                    *v = f32::from(q as i8);
                }
            }
        }
    }

    /// [`QMatrix::rows_dot`] for `n` vectors (`x`: `[n][cols]`, `xsum`: `[n][blocks]` for `Q4`) into `out`
    /// (`[n][rlen]`, rows `r0..r0 + rlen`). Each row's quants are unpacked to f32 once (exactly: they are
    /// small integers) and then every vector runs the very arithmetic of `rows_dot`, in the same order, so
    /// each output is bit for bit what `rows_dot` gives.
    #[inline(always)]
    fn rows_dot_multi(&self, x: &[f32], xsum: &[f32], n: usize, r0: usize, out: &mut [f32]) {
        let nb = self.cols / QBLOCK;
        let cols = self.cols;
        let rlen = out.len() / n;
        let mut qf = vec![0.0f32; cols];
        for i in 0..rlen {
            let r = r0 + i;
            let d = &self.d[r * nb..(r + 1) * nb];
            self.unpack_row_quants(r, &mut qf);
            match self.kind {
                QKind::Q4 => {
                    let m = &self.m[r * nb..(r + 1) * nb];
                    for t in 0..n {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let xs = &xsum[t * nb..(t + 1) * nb];
                        let mut acc = [0.0f32; 16];
                        let mut macc = 0.0f32;
                        for b in 0..nb {
                            let q: &[f32; 32] = qf[b * 32..b * 32 + 32].try_into().expect("32 values");
                            let xb: &[f32; 32] = xt[b * 32..b * 32 + 32].try_into().expect("32 values");
                            let db = d[b];
                            for j in 0..16 {
                                let lo = q[j] * xb[j];
                                let hi = q[j + 16] * xb[j + 16];
                                acc[j] += db * (lo + hi);
                            }
                            macc += m[b] * xs[b];
                        }
                        out[t * rlen + i] = acc.iter().sum::<f32>() + macc;
                    }
                }
                QKind::Q8 => {
                    for t in 0..n {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let mut acc = [0.0f32; 16];
                        for b in 0..nb {
                            let q: &[f32; 32] = qf[b * 32..b * 32 + 32].try_into().expect("32 values");
                            let xb: &[f32; 32] = xt[b * 32..b * 32 + 32].try_into().expect("32 values");
                            let db = d[b];
                            for j in 0..16 {
                                let s = q[j] * xb[j] + q[j + 16] * xb[j + 16];
                                acc[j] += db * s;
                            }
                        }
                        out[t * rlen + i] = acc.iter().sum::<f32>();
                    }
                }
            }
        }
    }

    /// [`QMatrix::rows_dot_multi`] in AVX2, bit for bit: the same unpack, then the vectors two at a time.
    /// Each vector's 16 lane sums are a chain of one dependent add per block; compiled from the portable
    /// code, one vector at a time waited on that latency (4 sequences took 6× the time of one). Two
    /// interleaved vectors overlap their chains. The lane arithmetic is `rows_dot`'s, unfused, in its
    /// order: `acc_j + d_b·(q_j·x_j + q_{j+16}·x_{j+16})`.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn rows_dot_multi_avx2(&self, x: &[f32], xsum: &[f32], n: usize, r0: usize, out: &mut [f32]) {
        let nb = self.cols / QBLOCK;
        let cols = self.cols;
        let rlen = out.len() / n;
        assert!(
            x.len() == n * cols && out.len() == n * rlen && r0 + rlen <= self.rows,
            "rows_dot_multi_avx2: shapes"
        );
        assert!(
            self.kind != QKind::Q4 || xsum.len() == n * nb,
            "rows_dot_multi_avx2: block sums"
        );
        let mut qf = vec![0.0f32; cols];
        for i in 0..rlen {
            let r = r0 + i;
            // SAFETY: the row exists and `qf` holds its cols values (asserted above); the caller guarantees
            // AVX2.
            unsafe { self.unpack_row_quants_avx2(r, &mut qf) };
            let mut t = 0;
            while t < n {
                let pair = t + 1 < n;
                // SAFETY: vectors t and t + 1 (when `pair`) exist, `qf` holds the row's cols values, and the
                // row exists (asserted above); the caller guarantees AVX2.
                let (a, b) = unsafe {
                    if pair {
                        self.dot2_avx2::<true>(&qf, r, x.as_ptr().add(t * cols), x.as_ptr().add((t + 1) * cols))
                    } else {
                        let xa = x.as_ptr().add(t * cols);
                        self.dot2_avx2::<false>(&qf, r, xa, xa)
                    }
                };
                let (ma, mb) = if self.kind == QKind::Q4 {
                    let m = &self.m[r * nb..(r + 1) * nb];
                    let sa = &xsum[t * nb..(t + 1) * nb];
                    let sb = if pair { &xsum[(t + 1) * nb..(t + 2) * nb] } else { sa };
                    let (mut ma, mut mb) = (0.0f32, 0.0f32);
                    for k in 0..nb {
                        ma += m[k] * sa[k];
                        mb += m[k] * sb[k];
                    }
                    (ma, mb)
                } else {
                    (0.0, 0.0)
                };
                let fin = |acc: [f32; 16], macc: f32| match self.kind {
                    QKind::Q4 => acc.iter().sum::<f32>() + macc,
                    QKind::Q8 => acc.iter().sum::<f32>(),
                };
                out[t * rlen + i] = fin(a, ma);
                if pair {
                    out[(t + 1) * rlen + i] = fin(b, mb);
                }
                t += if pair { 2 } else { 1 };
            }
        }
    }

    /// [`QMatrix::unpack_row_quants`] in AVX2 (the same exact values; the portable loop compiles to one
    /// scalar conversion per weight, which cost more than the products of four vectors).
    ///
    /// # Safety
    /// `r < rows` and `qf.len() == cols`; the CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unpack_row_quants_avx2(&self, r: usize, qf: &mut [f32]) {
        use std::arch::x86_64::*;
        let nb = self.cols / QBLOCK;
        let ql = self.qlen();
        assert!(r < self.rows && qf.len() == self.cols, "unpack_row_quants_avx2: shapes");
        // Row r's quants are bytes r·nb·ql .. (r + 1)·nb·ql; block k's 32 outputs are qf[32k .. 32k + 32].
        let qs = self.qs.as_ptr().add(r * nb * ql);
        let out = qf.as_mut_ptr();
        // The low 8 bytes of `v` as 8 floats, unsigned or signed.
        #[inline(always)]
        unsafe fn widen(v: __m128i, signed: bool) -> __m256 {
            if signed {
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
            } else {
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
            }
        }
        for k in 0..nb {
            let o = out.add(k * QBLOCK);
            match self.kind {
                QKind::Q4 => {
                    let v = _mm_loadu_si128(qs.add(k * 16) as *const __m128i);
                    let m4 = _mm_set1_epi8(0x0F);
                    let lo = _mm_and_si128(v, m4);
                    let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
                    _mm256_storeu_ps(o, widen(lo, false));
                    _mm256_storeu_ps(o.add(8), widen(_mm_srli_si128(lo, 8), false));
                    _mm256_storeu_ps(o.add(16), widen(hi, false));
                    _mm256_storeu_ps(o.add(24), widen(_mm_srli_si128(hi, 8), false));
                }
                QKind::Q8 => {
                    let p = qs.add(k * 32);
                    for h in 0..4 {
                        let v = _mm_loadl_epi64(p.add(8 * h) as *const __m128i);
                        _mm256_storeu_ps(o.add(8 * h), widen(v, true));
                    }
                }
            }
        }
    }

    /// Row `r`'s 16 lane sums for vectors `xa` and (when `PAIR`) `xb`, `qf` its unpacked quants.
    ///
    /// # Safety
    /// `qf` holds `cols` values, `xa` and `xb` point to `cols` readable values, `r < rows`; the CPU must
    /// support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dot2_avx2<const PAIR: bool>(
        &self,
        qf: &[f32],
        r: usize,
        xa: *const f32,
        xb: *const f32,
    ) -> ([f32; 16], [f32; 16]) {
        use std::arch::x86_64::*;
        let nb = self.cols / QBLOCK;
        let d = &self.d[r * nb..(r + 1) * nb];
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut b0, mut b1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        // Lanes 0..8 and 8..16 of a block's sum: q[j]·x[j] + q[j+16]·x[j+16], scaled, then accumulated.
        #[inline(always)]
        unsafe fn block(q: *const f32, x: *const f32, dv: __m256, acc: (__m256, __m256)) -> (__m256, __m256) {
            let s0 = _mm256_add_ps(
                _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(x)),
                _mm256_mul_ps(_mm256_loadu_ps(q.add(16)), _mm256_loadu_ps(x.add(16))),
            );
            let s1 = _mm256_add_ps(
                _mm256_mul_ps(_mm256_loadu_ps(q.add(8)), _mm256_loadu_ps(x.add(8))),
                _mm256_mul_ps(_mm256_loadu_ps(q.add(24)), _mm256_loadu_ps(x.add(24))),
            );
            (
                _mm256_add_ps(acc.0, _mm256_mul_ps(dv, s0)),
                _mm256_add_ps(acc.1, _mm256_mul_ps(dv, s1)),
            )
        }
        for (k, &db) in d.iter().enumerate() {
            let q = qf.as_ptr().add(k * QBLOCK);
            let dv = _mm256_set1_ps(db);
            (a0, a1) = block(q, xa.add(k * QBLOCK), dv, (a0, a1));
            if PAIR {
                (b0, b1) = block(q, xb.add(k * QBLOCK), dv, (b0, b1));
            }
        }
        let mut a = [0.0f32; 16];
        let mut b = [0.0f32; 16];
        _mm256_storeu_ps(a.as_mut_ptr(), a0);
        _mm256_storeu_ps(a.as_mut_ptr().add(8), a1);
        _mm256_storeu_ps(b.as_mut_ptr(), b0);
        _mm256_storeu_ps(b.as_mut_ptr().add(8), b1);
        (a, b)
    }

    fn rows_dot_multi_dispatch(&self, x: &[f32], xsum: &[f32], n: usize, r0: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above), the caller-side requirement of
            // `rows_dot_multi_avx2`, which asserts the shapes its pointers rely on.
            unsafe { self.rows_dot_multi_avx2(x, xsum, n, r0, out) };
            return;
        }
        self.rows_dot_multi(x, xsum, n, r0, out)
    }
}

/// Weight rows per tile of [`prefill_product`]: one `gemm` call each (and, for quantized weights, one
/// dequantized tile). The same on any number of threads: `gemm` picks its blocking from the shape, so a
/// tile of another width may sum in another order, and the threads would change the result's last bits.
/// Small enough to share a 576-row product out over 2 threads, large enough to keep `gemm` efficient.
const PREFILL_TILE: usize = 128;

/// A linear layer's weights: dense f32, or kept block-quantized.
#[derive(Clone, Debug)]
pub enum Weight {
    /// Dense f32.
    F32(Matrix),
    /// Block-quantized (decode computes on the blocks; prefill dequantizes tiles of rows).
    Quant(QMatrix),
}

impl Weight {
    /// Number of rows (output features).
    pub fn rows(&self) -> usize {
        match self {
            Weight::F32(m) => m.rows,
            Weight::Quant(q) => q.rows,
        }
    }

    /// Number of columns (input features).
    pub fn cols(&self) -> usize {
        match self {
            Weight::F32(m) => m.cols,
            Weight::Quant(q) => q.cols,
        }
    }

    /// Bytes of weights held (read once per decoded token).
    pub fn bytes(&self) -> usize {
        match self {
            Weight::F32(m) => m.bytes(),
            Weight::Quant(q) => q.bytes(),
        }
    }

    /// Row `r` as f32 into `out` (`cols` values).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        match self {
            Weight::F32(m) => out.copy_from_slice(&m.data[r * m.cols..(r + 1) * m.cols]),
            Weight::Quant(q) => q.dequantize_row(r, out),
        }
    }

    /// The dense f32 form (a copy for quantized weights).
    pub fn into_f32(self) -> Matrix {
        match self {
            Weight::F32(m) => m,
            Weight::Quant(q) => q.to_f32(),
        }
    }

    /// `y = W · x` for one vector.
    pub fn matvec(&self, x: &[f32], y: &mut [f32], threads: usize) {
        self.matvec_path(x, y, threads, DecodePath::Exact)
    }

    /// [`Weight::matvec`] on decode path `path` ([`DecodePath::Int8`] and [`DecodePath::Int16`] apply to
    /// quantized weights; f32 weights always compute exactly).
    pub fn matvec_path(&self, x: &[f32], y: &mut [f32], threads: usize, path: DecodePath) {
        match (self, path) {
            (Weight::F32(m), _) => matvec(x, m, y, threads),
            (Weight::Quant(q), DecodePath::Exact) => q.matvec(x, y, threads),
            (Weight::Quant(q), DecodePath::Int8) => q.matvec_int8(x, y, threads),
            (Weight::Quant(q), DecodePath::Int16) => q.matvec_int16(x, y, threads),
        }
    }

    /// `n` independent vectors in one pass over the weights, each output equal to [`Weight::matvec`] of its
    /// vector (the batched decode step).
    pub fn matvec_batch(&self, x: &[f32], n: usize, y: &mut [f32], threads: usize) {
        self.matvec_batch_path(x, n, y, threads, DecodePath::Exact)
    }

    /// [`Weight::matvec_batch`] on decode path `path` (each output equals [`Weight::matvec_path`] of its
    /// vector).
    pub fn matvec_batch_path(&self, x: &[f32], n: usize, y: &mut [f32], threads: usize, path: DecodePath) {
        match (self, path) {
            (Weight::F32(m), _) => matvec_batch(x, n, m, y, threads),
            (Weight::Quant(q), DecodePath::Exact) => q.matvec_batch(x, n, y, threads),
            (Weight::Quant(q), DecodePath::Int8) => q.matvec_batch_int8(x, n, y, threads),
            (Weight::Quant(q), DecodePath::Int16) => q.matvec_batch_int16(x, n, y, threads),
        }
    }

    /// `y[t, :] = W · x[t, :]` for `n` rows of `x`, as [`linear`].
    pub fn linear(&self, x: &[f32], n: usize, y: &mut [f32], threads: usize) {
        self.linear_path(x, n, y, threads, DecodePath::Exact)
    }

    /// [`Weight::linear`] where the one- and two-row products (decode) take path `path`; longer inputs
    /// (prefill) always use the exact blocked product.
    pub fn linear_path(&self, x: &[f32], n: usize, y: &mut [f32], threads: usize, path: DecodePath) {
        let q = match self {
            Weight::F32(m) => return linear(x, n, m, y, threads),
            Weight::Quant(q) => q,
        };
        assert_eq!(x.len(), n * q.cols, "linear: input length");
        assert_eq!(y.len(), n * q.rows, "linear: output length");
        if q.rows == 0 || n == 0 {
            return;
        }
        if q.cols == 0 {
            y.fill(0.0);
            return;
        }
        if n <= 2 {
            for t in 0..n {
                self.matvec_path(
                    &x[t * q.cols..(t + 1) * q.cols],
                    &mut y[t * q.rows..(t + 1) * q.rows],
                    threads,
                    path,
                );
            }
            return;
        }
        prefill_product(Rows::Quant(q), x, n, q.rows, q.cols, y, threads);
    }
}

/// Where [`prefill_product`] takes the weights' rows from.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// Row-major f32 `[rows, cols]`, used in place.
    Dense(&'a [f32]),
    /// Block-quantized, dequantized one tile of rows at a time.
    Quant(&'a QMatrix),
}

thread_local! {
    /// Each compute thread's tile of dequantized weights for [`prefill_product`] (kept between calls).
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `y[t, :] = W · x[t, :]` for `n > 2` rows (prefill) with the `gemm` crate, in tiles of weight rows
/// ([`PREFILL_TILE`]) shared out over `threads` compute threads ([`par`]), each tile one single-threaded
/// product into its own columns of `y`. `x` is `n·cols`, `y` is `n·rows` (checked by the callers).
fn prefill_product(w: Rows, x: &[f32], n: usize, rows: usize, cols: usize, y: &mut [f32], threads: usize) {
    debug_assert!(x.len() == n * cols && y.len() == n * rows);
    let tile = PREFILL_TILE;
    let yp = par::SendPtr::new(y.as_mut_ptr());
    par::for_each_index(threads, rows.div_ceil(tile), |i| {
        let r0 = i * tile;
        let tr = tile.min(rows - r0);
        TILE.with_borrow_mut(|buf| {
            let t: &[f32] = match w {
                Rows::Dense(d) => &d[r0 * cols..(r0 + tr) * cols],
                Rows::Quant(q) => {
                    buf.resize(tr * cols, 0.0);
                    for (j, o) in buf[..tr * cols].chunks_exact_mut(cols).enumerate() {
                        q.dequantize_row_dispatch(r0 + j, o);
                    }
                    &buf[..tr * cols]
                }
            };
            // SAFETY: `y` holds n·rows values; this tile's destination starts at column r0 and is addressed
            // as y[r0 + i·rows + j] for i < n, j < tr with r0 + tr ≤ rows, so it stays inside `y`, and the
            // tiles' column ranges are disjoint, so no two tasks write one value (`y` is borrowed mutably for
            // the whole call). `x` holds n·cols values addressed as x[i·cols + k]; `t` holds tr·cols values
            // addressed as t[j·cols + k]. `read_dst = false`: `y`'s old values are not read.
            unsafe {
                gemm::gemm(
                    n,
                    tr,
                    cols,
                    yp.at(r0),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    cols as isize,
                    t.as_ptr(),
                    cols as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        })
    });
}

/// RMSNorm of each `weight.len()`-wide row of `x` into `out`: `x / sqrt(mean(x²) + eps) * weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let scale = 1.0 / (ss + eps).sqrt();
        for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * scale * w;
        }
    }
}

/// Rotary embedding tables: `cos`/`sin` of `pos * inv_freq[i]` for each position, `head_dim / 2` each.
#[derive(Clone, Debug)]
pub struct Rope {
    half: usize,
    inv_freq: Vec<f64>,
}

impl Rope {
    /// Tables for these inverse frequencies (`head_dim / 2` of them).
    pub fn new(inv_freq: Vec<f64>) -> Self {
        Rope {
            half: inv_freq.len(),
            inv_freq,
        }
    }

    /// `(cos, sin)` for one position.
    pub fn angles(&self, pos: usize) -> (Vec<f32>, Vec<f32>) {
        let mut c = Vec::with_capacity(self.half);
        let mut s = Vec::with_capacity(self.half);
        for f in &self.inv_freq {
            let a = pos as f64 * f;
            c.push(a.cos() as f32);
            s.push(a.sin() as f32);
        }
        (c, s)
    }

    /// Rotates every `2 * half`-wide head in `x` (Hugging Face "rotate half" pairing: `i` with `i + half`).
    pub fn apply(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let h = self.half;
        for head in x.chunks_exact_mut(2 * h) {
            let (a, b) = head.split_at_mut(h);
            for i in 0..h {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * cos[i] - x1 * sin[i];
                b[i] = x1 * cos[i] + x0 * sin[i];
            }
        }
    }
}

/// `gate[i] = silu(gate[i]) * up[i]`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let v = *g;
        *g = v / (1.0 + (-v).exp()) * u;
    }
}

/// Softmax in place (numerically stable).
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], n: usize, w: &Matrix) -> Vec<f32> {
        let mut y = vec![0.0; n * w.rows];
        for t in 0..n {
            for j in 0..w.rows {
                let mut s = 0.0f64;
                for k in 0..w.cols {
                    s += x[t * w.cols + k] as f64 * w.data[j * w.cols + k] as f64;
                }
                y[t * w.rows + j] = s as f32;
            }
        }
        y
    }

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn linear_matches_naive_for_all_shapes() {
        for &(n, rows, cols) in &[(1, 5, 3), (2, 130, 17), (3, 7, 33), (7, 200, 65), (16, 1, 1), (4, 0, 3)] {
            let w = Matrix::new(rows, cols, pseudo(rows * cols, 1));
            let x = pseudo(n * cols, 2);
            for threads in [1, 2] {
                let mut y = vec![f32::NAN; n * rows];
                linear(&x, n, &w, &mut y, threads);
                let r = naive(&x, n, &w);
                for (a, b) in y.iter().zip(&r) {
                    assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{n}x{rows}x{cols}: {a} vs {b}");
                }
            }
        }
    }

    /// A `rows × cols` weight of each kind: f32, then the quantized ones of [`q_blocks`].
    fn every_kind(rows: usize, cols: usize) -> Vec<Weight> {
        let mut weights = vec![Weight::F32(Matrix::new(rows, cols, pseudo(rows * cols, 4)))];
        for kind in 0..3 {
            let (ty, raw) = q_blocks(kind, rows, cols / QBLOCK, 5 + kind as u32);
            weights.push(Weight::Quant(QMatrix::from_ggml(ty, rows, cols, &raw).unwrap()));
        }
        weights
    }

    /// Sharing a product over compute threads ([`crate::par`]) changes no bit of it: decode (one and two
    /// rows, every path), batched decode and prefill (tiles of rows, one `gemm` each), at row counts that
    /// split unevenly.
    #[test]
    fn products_on_more_threads_equal_one_thread_bit_for_bit() {
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
        for &(rows, cols) in &[(1000, 64), (577, 96), (130, 32)] {
            let weights = every_kind(rows, cols);
            for w in &weights {
                for path in [DecodePath::Exact, DecodePath::Int8, DecodePath::Int16] {
                    for n in [1, 2, 3, 9, 64] {
                        let x = pseudo(n * cols, 3 + n as u32);
                        let run = |threads: usize, batch: bool| {
                            let mut y = vec![f32::NAN; n * rows];
                            if batch {
                                w.matvec_batch_path(&x, n, &mut y, threads, path);
                            } else {
                                w.linear_path(&x, n, &mut y, threads, path);
                            }
                            bits(&y)
                        };
                        for batch in [false, true] {
                            let one = run(1, batch);
                            for threads in [2, 3] {
                                assert!(
                                    one == run(threads, batch),
                                    "rows {rows} cols {cols} n {n} {path:?} batch {batch}: {threads} threads differ"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The batched decode kernel gives every vector exactly (bit for bit) what `matvec` gives it alone, for
    /// f32 and quantized weights, row counts that are not a multiple of the block, serial and parallel.
    #[test]
    fn matvec_batch_equals_matvec_bit_for_bit() {
        for &(n, rows, cols) in &[
            (2, 5, 64),
            (3, 64, 96),
            (5, 130, 64),
            (8, 257, 288),
            (32, 129, 64),
            (1, 7, 96),
        ] {
            let x = pseudo(n * cols, 3);
            let weights = every_kind(rows, cols);
            for w in &weights {
                for threads in [1, 2] {
                    let mut y = vec![f32::NAN; n * rows];
                    w.matvec_batch(&x, n, &mut y, threads);
                    for t in 0..n {
                        let mut one = vec![f32::NAN; rows];
                        w.matvec(&x[t * cols..(t + 1) * cols], &mut one, threads);
                        let got: Vec<u32> = y[t * rows..(t + 1) * rows].iter().map(|v| v.to_bits()).collect();
                        let want: Vec<u32> = one.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(got, want, "n {n} rows {rows} vector {t} threads {threads}");
                    }
                }
                // The portable multi-vector kernel, which the SIMD one replaces on this CPU, agrees too.
                if let Weight::Quant(q) = w {
                    let xsum: Vec<f32> = if q.kind == QKind::Q4 {
                        x.chunks_exact(QBLOCK).map(|c| c.iter().sum()).collect()
                    } else {
                        Vec::new()
                    };
                    let (r0, rlen) = (rows / 3, rows - rows / 3);
                    let mut portable = vec![f32::NAN; n * rlen];
                    q.rows_dot_multi(&x, &xsum, n, r0, &mut portable);
                    let mut dispatched = vec![f32::NAN; n * rlen];
                    q.rows_dot_multi_dispatch(&x, &xsum, n, r0, &mut dispatched);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
                    assert_eq!(
                        bits(&portable),
                        bits(&dispatched),
                        "n {n} rows {rows} cols {cols}: portable"
                    );
                }
            }
        }
    }

    fn q_blocks(kind: u8, rows: usize, nb: usize, seed: u32) -> (crate::model::dequant::GgmlType, Vec<u8>) {
        use crate::model::dequant::GgmlType;
        let bytes = pseudo(rows * nb * 40, seed);
        let mut raw: Vec<u8> = bytes.iter().map(|v| ((v + 1.0) * 127.0) as u8).collect();
        let (ty, bb) = match kind {
            0 => (GgmlType::Q4_0, 18),
            1 => (GgmlType::Q4_1, 20),
            _ => (GgmlType::Q8_0, 34),
        };
        raw.truncate(rows * nb * bb);
        // Finite, moderate scales: f16 0x2000..0x3000 (about 0.0078..0.125), minimum negative.
        for (i, b) in raw.chunks_exact_mut(bb).enumerate() {
            b[0..2].copy_from_slice(&(0x2000 + (i * 37 % 0x1000) as u16).to_le_bytes());
            if kind == 1 {
                b[2..4].copy_from_slice(&(0xA000 + (i * 91 % 0x1000) as u16).to_le_bytes());
            }
        }
        (ty, raw)
    }

    #[test]
    fn quantized_rows_dequantize_like_the_model_loader() {
        for kind in 0..3 {
            let (rows, nb) = (5, 3);
            let (ty, raw) = q_blocks(kind, rows, nb, 7);
            let q = QMatrix::from_ggml(ty, rows, nb * QBLOCK, &raw).unwrap();
            let mut want = vec![0.0f32; rows * nb * QBLOCK];
            crate::model::dequant::dequantize(ty, &raw, &mut want).unwrap();
            for (a, b) in q.to_f32().data.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{ty}: {a} vs {b}");
            }
        }
        assert!(QMatrix::from_ggml(crate::model::dequant::GgmlType::Q4_1, 2, 32, &[0; 39]).is_none());
        assert!(QMatrix::from_ggml(crate::model::dequant::GgmlType::F32, 1, 32, &[0; 128]).is_none());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        #[test]
        fn quantized_linear_matches_dequantized(
            kind in 0u8..3, rows in 1usize..300, nb in 1usize..6, n in 1usize..5, seed in 0u32..1000,
            threads in 1usize..3, col_lo in 0usize..3,
        ) {
            let (ty, raw) = q_blocks(kind, rows, nb, seed);
            let cols = nb * QBLOCK;
            let q = QMatrix::from_ggml(ty, rows, cols, &raw).unwrap();
            let dense = q.to_f32();
            let x = pseudo(n * cols, seed + 1);
            let mut y = vec![f32::NAN; n * rows];
            Weight::Quant(q.clone()).linear(&x, n, &mut y, threads);
            let r = naive(&x, n, &dense);
            for (a, b) in y.iter().zip(&r) {
                proptest::prop_assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{ty} {n}x{rows}x{cols}: {a} vs {b}");
            }
            // Column slices and stacking agree with the same operations on the dense matrix.
            let lo = col_lo.min(nb - 1) * QBLOCK;
            let part = q.columns(lo..cols).unwrap();
            let pd = part.to_f32();
            for r in 0..rows {
                proptest::prop_assert_eq!(&pd.data[r * (cols - lo)..(r + 1) * (cols - lo)], &dense.data[r * cols + lo..(r + 1) * cols]);
            }
            let st = QMatrix::stack(vec![q.clone(), q.clone()]).unwrap().to_f32();
            proptest::prop_assert_eq!(&st.data[..rows * cols], &dense.data[..]);
            proptest::prop_assert_eq!(&st.data[rows * cols..], &dense.data[..]);
        }
    }

    #[test]
    fn rms_norm_and_softmax() {
        let x = [3.0, 4.0, 0.0, 0.0];
        let mut o = [0.0; 4];
        rms_norm(&x, &[1.0, 2.0], 0.0, &mut o);
        let s = (12.5f32).sqrt();
        assert!((o[0] - 3.0 / s).abs() < 1e-6 && (o[1] - 8.0 / s).abs() < 1e-6);
        let mut p = [1.0, 2.0, 3.0];
        softmax(&mut p);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[2] > p[1] && p[1] > p[0]);
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        let rope = Rope::new(vec![1.0, 0.5]);
        let (c, s) = rope.angles(1);
        let mut x = [1.0, 0.0, 0.0, 1.0];
        rope.apply(&mut x, &c, &s);
        // pair (x0, x2) = (1, 0) rotated by 1 rad; pair (x1, x3) = (0, 1) rotated by 0.5 rad.
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[2] - 1f32.sin()).abs() < 1e-6);
        assert!((x[1] + 0.5f32.sin()).abs() < 1e-6 && (x[3] - 0.5f32.cos()).abs() < 1e-6);
    }
}
