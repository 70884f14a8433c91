//! CPU kernels of the engine: matrix products (the `gemm` crate for prefill, a row-parallel dot-product
//! kernel for decode), RMSNorm, rotary embeddings, SiLU, softmax.

use rayon::prelude::*;

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
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // y (n × rows, row-major) = x (n × cols, row-major) · Wᵀ (cols × rows; W is rows × cols row-major, so
    // Wᵀ has column stride cols and row stride 1).
    // SAFETY: every pointer covers the matrix described by its dimensions and strides: `y` holds n·rows
    // values addressed as y[i·rows + j] (i < n, j < rows); `x` holds n·cols values addressed as x[i·cols + k];
    // `w.data` holds rows·cols values addressed as w[j·cols + k]. The lengths were checked above, `y` is
    // borrowed mutably (no aliasing with the inputs) and `read_dst = false` means `y`'s old values are not
    // read.
    unsafe {
        gemm::gemm(
            n,
            w.rows,
            w.cols,
            y.as_mut_ptr(),
            1,
            w.rows as isize,
            false,
            x.as_ptr(),
            1,
            w.cols as isize,
            w.data.as_ptr(),
            w.cols as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Rows per parallel task in [`matvec`].
const MATVEC_CHUNK: usize = 64;

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
    if threads > 1 && w.rows >= 2 * MATVEC_CHUNK {
        y.par_chunks_mut(MATVEC_CHUNK).enumerate().for_each(kernel);
    } else {
        y.chunks_mut(MATVEC_CHUNK).enumerate().for_each(kernel);
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
