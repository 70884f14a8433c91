//! The compute backends the engine's forward pass is written against.
//!
//! [`crate::engine::RankModel`] holds its weights, norms and KV caches as a backend's types and runs the
//! Llama forward pass once, generically, through the operations of [`Compute`]: embedding gather, RMSNorm,
//! linear products, rotary embedding with the KV-cache append, attention over the cache, SiLU-mul, residual
//! add, and the tensor-parallel collectives on that backend's buffers. Two backends implement it:
//!
//! * [`Cpu`]: host `f32` activations, weights as [`Weight`] (f32 or block-quantized), the math of
//!   [`crate::math`] and a host communicator ([`Comm`]). Each operation is the code the CPU engine always ran,
//!   so its results are bit for bit those of before the engine became generic.
//! * `crate::cuda_engine::Cuda` (feature `cuda`): activations, bf16 weights and the KV cache on one device,
//!   the kernels of `crate::cuda::CudaKernels` and cuBLAS on one stream, and the TP collectives as NCCL
//!   calls on that same stream.

use std::borrow::{Borrow, BorrowMut};
use std::ops::Range;

use crate::comm::Comm;
use crate::error::{EngineError, Result};
use crate::math::{self, DecodePath, Rope, Weight};

/// The attention geometry of one rank (its query and KV heads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    /// This rank's query heads.
    pub q_heads: usize,
    /// This rank's KV heads.
    pub kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Query heads per KV head in the whole model.
    pub group: usize,
    /// This rank's first query head (global index).
    pub q_start: usize,
    /// This rank's first KV head (global index).
    pub kv_start: usize,
}

impl AttnDims {
    /// Width of one row of the fused qkv activations.
    pub fn qkv_width(&self) -> usize {
        (self.q_heads + 2 * self.kv_heads) * self.head_dim
    }
}

/// The rows of one forward step: row `r` belongs to segment `seg_of[r]`, at position `pos_of[r]` of that
/// segment's sequence.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepRows {
    /// The segment of each row.
    pub seg_of: Vec<usize>,
    /// The position of each row in its sequence.
    pub pos_of: Vec<usize>,
}

/// A compute backend: where activations, weights and KV caches live and how the forward pass's operations
/// run on them. Every operation is enqueued in call order; a backend may run them asynchronously as long as
/// results read back on the host ([`Compute::with_host`], point-to-point sends) are complete.
pub trait Compute {
    /// Borrowed activations: rows of `f32` values.
    type Act: ?Sized;
    /// Owned activations.
    type ActBuf: BorrowMut<Self::Act>;
    /// A weight matrix `[rows, cols]`.
    type Weight;
    /// A norm's weight vector.
    type Norm;
    /// The KV cache of one sequence (this rank's KV heads, this stage's layers).
    type Cache;
    /// What a step prepares once for all its layers (e.g. rotary angles of its positions).
    type Step;
    /// The tensor-parallel communicator whose collectives run on this backend's buffers.
    type Tp: Comm + ?Sized;
    /// A recorded decode step that can be launched again on new inputs ([`Compute::graph_record`]); backends
    /// without one use [`NoGraph`].
    type Graph;

    /// How decode products compute on block-quantized weights ([`DecodePath::Exact`] unless the backend has
    /// integer paths).
    fn decode_path(&self) -> DecodePath {
        DecodePath::Exact
    }
    /// Elements of `x`.
    fn act_len(x: &Self::Act) -> usize;
    /// Zeroed activations of `len` elements.
    fn alloc(&self, len: usize) -> Result<Self::ActBuf>;

    /// An empty KV cache for `layers` layers of `kv_heads` heads of `head_dim`, `max_seq` positions.
    fn new_cache(&self, layers: usize, kv_heads: usize, head_dim: usize, max_seq: usize) -> Result<Self::Cache>;
    /// Positions filled so far.
    fn cache_len(c: &Self::Cache) -> usize;
    /// Positions the cache holds.
    fn cache_capacity(c: &Self::Cache) -> usize;
    /// Marks `n` more positions as filled.
    fn cache_advance(c: &mut Self::Cache, n: usize);

    /// Vocabulary-parallel gather: row `t` is this shard's row for `tokens[t]` (a shard holding vocabulary
    /// rows `rows`), zeros when another rank holds it. Tokens are already checked to be in the vocabulary.
    fn embed(&self, table: &Self::Weight, tokens: &[u32], rows: Range<usize>, hidden: usize) -> Result<Self::ActBuf>;
    /// RMSNorm of every row of `x` into `out`.
    fn rms_norm(&self, x: &Self::Act, w: &Self::Norm, eps: f32, out: &mut Self::Act) -> Result<()>;
    /// RMSNorm of rows `rows` of `x` (width `hidden`; checked to be inside `x`) into consecutive rows of
    /// `out`.
    fn rms_norm_rows(
        &self,
        x: &Self::Act,
        rows: &[usize],
        w: &Self::Norm,
        eps: f32,
        hidden: usize,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// `out[t, :] = W · x[t, :]` for `n` rows. The first `decode_rows` rows are the one token each of
    /// that many distinct sequences (a decode step, batched): each of their results must be what that
    /// sequence's row alone gives, whatever else shares the step. The other rows are prefill (several
    /// consecutive positions of a sequence). A step can mix both: decodes first, then prefill chunks.
    fn linear(&self, w: &Self::Weight, x: &Self::Act, n: usize, out: &mut Self::Act, decode_rows: usize) -> Result<()>;
    /// Prepares a step over `rows`.
    fn begin_step(&self, rope: &Rope, rows: &StepRows) -> Result<Self::Step>;
    /// Rotates the q and k heads of every row of `qkv` and writes each row's keys and values at its position
    /// of layer `layer` of its segment's cache.
    #[allow(clippy::too_many_arguments)]
    fn rope_kv_append(
        &self,
        rope: &Rope,
        step: &Self::Step,
        rows: &StepRows,
        d: &AttnDims,
        layer: usize,
        qkv: &mut Self::Act,
        segs: &mut [(usize, &mut Self::Cache)],
    ) -> Result<()>;
    /// Causal attention of every row's query heads over its sequence's cache (positions up to its own) into
    /// `out` (`[row][q head][head_dim]`).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        step: &mut Self::Step,
        rows: &StepRows,
        d: &AttnDims,
        layer: usize,
        qkv: &Self::Act,
        segs: &[(usize, &mut Self::Cache)],
        out: &mut Self::Act,
    ) -> Result<()>;
    /// `out[t] = silu(gate[t]) * up[t]` for `rows` fused `[gate (ffn), up (ffn)]` rows.
    fn silu_mul(&self, gate_up: &Self::Act, rows: usize, ffn: usize, out: &mut Self::Act) -> Result<()>;
    /// `x += delta`.
    fn residual_add(&self, x: &mut Self::Act, delta: &Self::Act) -> Result<()>;
    /// This shard's logits of `m` normed rows: `mine` vocabulary rows of `w`, written in rows of stride
    /// `stride` of `out` (`m * stride`, the padding left zero).
    fn head(
        &self,
        w: &Self::Weight,
        normed: &Self::Act,
        m: usize,
        mine: usize,
        stride: usize,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// Sums `buf` over the TP group, in place.
    fn all_reduce_sum(&self, tp: &Self::Tp, buf: &mut Self::Act) -> Result<()>;
    /// Concatenates every TP rank's `send` into `recv`, in rank order.
    fn all_gather(&self, tp: &Self::Tp, send: &Self::Act, recv: &mut Self::Act) -> Result<()>;
    /// Calls `f` with `x` on the host (a copy back from a device, after the work that writes it).
    fn with_host<R>(&self, x: &Self::Act, f: impl FnOnce(&[f32]) -> R) -> Result<R>;
    /// Sends `x` to stage `peer` of the pipeline communicator.
    fn send(&self, pp: &dyn Comm, x: &Self::Act, peer: usize) -> Result<()>;
    /// Receives `len` activations from stage `peer` of the pipeline communicator.
    fn recv(&self, pp: &dyn Comm, len: usize, peer: usize) -> Result<Self::ActBuf>;

    /// Whether [`Compute::graph_record`] can record (false unless the backend overrides it).
    fn records_graphs(&self) -> bool {
        false
    }

    /// Records, without running it, the work `f` enqueues for one step whose rows are `inputs` (the tokens
    /// [`Compute::embed`] is called with and the positions of [`Compute::begin_step`]), over `cache` and
    /// writing `out` (both made before the recording). The recording can then be launched with
    /// [`Compute::graph_replay`] on new inputs of the same shape. Backends without graphs refuse
    /// ([`EngineError::Config`]), which is the default.
    fn graph_record(
        &self,
        inputs: &GraphInputs,
        cache: &mut Self::Cache,
        out: &mut Self::ActBuf,
        f: impl FnOnce(&mut Self::Cache, &mut Self::ActBuf) -> Result<()>,
    ) -> Result<Self::Graph> {
        let _ = (inputs, cache, out, f);
        Err(EngineError::Config(
            "graph-captured decode (--cuda-graph) needs the CUDA backend (--device cuda)".into(),
        ))
    }

    /// Launches a recorded step on `inputs` (same numbers of tokens and positions as recorded), over the
    /// cache and into the output it was recorded with (checked). Returns once the work is enqueued. The
    /// cache's filled length is not changed: the caller advances it.
    ///
    /// # Safety
    ///
    /// Every buffer the recorded work reads or writes and that `graph_record` was not given (the weights,
    /// norms and tables of the model that recorded it) must still be alive and unchanged in size.
    unsafe fn graph_replay(
        &self,
        g: &mut Self::Graph,
        inputs: &GraphInputs,
        cache: &mut Self::Cache,
        out: &mut Self::ActBuf,
    ) -> Result<()> {
        let _ = (g, inputs, cache, out);
        Err(EngineError::Config(
            "graph-captured decode (--cuda-graph) needs the CUDA backend (--device cuda)".into(),
        ))
    }
}

/// The inputs of a recorded step: the token of each row (empty on a stage that receives its activations)
/// and the position of each row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GraphInputs {
    /// Token ids, one per row, as [`Compute::embed`] gets them.
    pub tokens: Vec<u32>,
    /// Positions, one per row, as [`Compute::begin_step`] gets them.
    pub positions: Vec<usize>,
}

/// The graph of a backend that records none (it cannot be made).
#[derive(Debug)]
pub enum NoGraph {}

/// `buf` as borrowed activations.
pub fn view<B: Compute>(buf: &B::ActBuf) -> &B::Act {
    buf.borrow()
}

/// `buf` as mutable borrowed activations.
pub fn view_mut<B: Compute>(buf: &mut B::ActBuf) -> &mut B::Act {
    buf.borrow_mut()
}

/// Keys and values of this rank's KV heads for this stage's layers (the [`Cpu`] backend's cache).
pub struct KvCache {
    /// Per layer: `[kv head][position][head_dim]`.
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
    pub(crate) max_seq: usize,
    pub(crate) len: usize,
}

impl KvCache {
    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when nothing was cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Forgets every position (the buffers are kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }
    /// Positions this cache can hold.
    pub fn capacity(&self) -> usize {
        self.max_seq
    }
}

/// Attention work (context positions × heads × head size, summed over the step's rows) from which the CPU
/// backend splits the heads over its threads: below it (a short decode context), sharing them costs more
/// than it saves.
const ATTENTION_PAR_WORK: usize = 1 << 14;

thread_local! {
    /// Each compute thread's buffer for one head's attention scores (kept between calls).
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The CPU backend: host `f32` activations, [`Weight`] matrices, the math of [`crate::math`] on `threads`
/// threads, decode products on `decode_path`, collectives through a host [`Comm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpu {
    /// Threads for the matrix products.
    pub threads: usize,
    /// How decode steps compute on block-quantized weights.
    pub decode_path: DecodePath,
}

/// What a CPU step computes once: the rotary angles of each row's position.
pub struct CpuStep {
    angles: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Compute for Cpu {
    type Act = [f32];
    type ActBuf = Vec<f32>;
    type Weight = Weight;
    type Norm = Vec<f32>;
    type Cache = KvCache;
    type Step = CpuStep;
    type Tp = dyn Comm;
    type Graph = NoGraph;

    fn decode_path(&self) -> DecodePath {
        self.decode_path
    }

    fn act_len(x: &[f32]) -> usize {
        x.len()
    }

    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0f32; len])
    }

    fn new_cache(&self, layers: usize, kv_heads: usize, head_dim: usize, max_seq: usize) -> Result<KvCache> {
        let per = kv_heads * max_seq * head_dim;
        Ok(KvCache {
            k: (0..layers).map(|_| vec![0.0; per]).collect(),
            v: (0..layers).map(|_| vec![0.0; per]).collect(),
            max_seq,
            len: 0,
        })
    }

    fn cache_len(c: &KvCache) -> usize {
        c.len
    }

    fn cache_capacity(c: &KvCache) -> usize {
        c.max_seq
    }

    fn cache_advance(c: &mut KvCache, n: usize) {
        c.len += n;
    }

    fn embed(&self, table: &Weight, tokens: &[u32], rows: Range<usize>, hidden: usize) -> Result<Vec<f32>> {
        let h = hidden;
        let mut x = vec![0.0f32; tokens.len() * h];
        for (t, &tok) in tokens.iter().enumerate() {
            let tok = tok as usize;
            if rows.contains(&tok) {
                table.row_into(tok - rows.start, &mut x[t * h..(t + 1) * h]);
            }
        }
        Ok(x)
    }

    fn rms_norm(&self, x: &[f32], w: &Vec<f32>, eps: f32, out: &mut [f32]) -> Result<()> {
        math::rms_norm(x, w, eps, out);
        Ok(())
    }

    fn rms_norm_rows(
        &self,
        x: &[f32],
        rows: &[usize],
        w: &Vec<f32>,
        eps: f32,
        h: usize,
        out: &mut [f32],
    ) -> Result<()> {
        for (i, &r) in rows.iter().enumerate() {
            math::rms_norm(&x[r * h..(r + 1) * h], w, eps, &mut out[i * h..(i + 1) * h]);
        }
        Ok(())
    }

    fn linear(&self, w: &Weight, x: &[f32], n: usize, out: &mut [f32], decode_rows: usize) -> Result<()> {
        let (k, m) = (w.cols(), w.rows());
        if x.len() != n * k || out.len() != n * m || decode_rows > n {
            return Err(EngineError::Config(format!(
                "linear: {} inputs and {} outputs for {n} rows ({decode_rows} decode) of a {m}×{k} weight",
                x.len(),
                out.len()
            )));
        }
        // The decode rows go through the batched product (each row bit for bit its solo product), the
        // prefill rows after them through the blocked one: two passes over the weights in a mixed step,
        // the second mostly from cache.
        let (xd, xp) = x.split_at(decode_rows * k);
        let (yd, yp) = out.split_at_mut(decode_rows * m);
        if decode_rows > 0 {
            w.matvec_batch_path(xd, decode_rows, yd, self.threads, self.decode_path);
        }
        if n > decode_rows {
            w.linear_path(xp, n - decode_rows, yp, self.threads, self.decode_path);
        }
        Ok(())
    }

    fn begin_step(&self, rope: &Rope, rows: &StepRows) -> Result<CpuStep> {
        Ok(CpuStep {
            angles: rows.pos_of.iter().map(|&p| rope.angles(p)).collect(),
        })
    }

    fn rope_kv_append(
        &self,
        rope: &Rope,
        step: &CpuStep,
        rows: &StepRows,
        d: &AttnDims,
        li: usize,
        qkv: &mut [f32],
        segs: &mut [(usize, &mut KvCache)],
    ) -> Result<()> {
        let (nq, nkv, hd, qkv_w) = (d.q_heads, d.kv_heads, d.head_dim, d.qkv_width());
        for t in 0..rows.seg_of.len() {
            let cache = &mut *segs[rows.seg_of[t]].1;
            let max_seq = cache.max_seq;
            let (kc, vc) = (&mut cache.k[li], &mut cache.v[li]);
            let row = &mut qkv[t * qkv_w..(t + 1) * qkv_w];
            let (cos, sin) = &step.angles[t];
            rope.apply(&mut row[..(nq + nkv) * hd], cos, sin);
            let pos = rows.pos_of[t];
            for j in 0..nkv {
                let dst = (j * max_seq + pos) * hd;
                kc[dst..dst + hd].copy_from_slice(&row[(nq + j) * hd..(nq + j + 1) * hd]);
                vc[dst..dst + hd].copy_from_slice(&row[(nq + nkv + j) * hd..(nq + nkv + j + 1) * hd]);
            }
        }
        Ok(())
    }

    fn attention(
        &self,
        _step: &mut CpuStep,
        rows: &StepRows,
        d: &AttnDims,
        li: usize,
        qkv: &[f32],
        segs: &[(usize, &mut KvCache)],
        attn: &mut [f32],
    ) -> Result<()> {
        let (nq, hd, qkv_w) = (d.q_heads, d.head_dim, d.qkv_width());
        let scale = 1.0 / (hd as f32).sqrt();
        let n = rows.seg_of.len();
        // Query head i of row t into out (hd values), its scores in `scores` (at least ctx long).
        let head = |t: usize, i: usize, scores: &mut [f32], out: &mut [f32]| {
            let cache = &*segs[rows.seg_of[t]].1;
            let max_seq = cache.max_seq;
            let (kc, vc) = (&cache.k[li], &cache.v[li]);
            let ctx = rows.pos_of[t] + 1;
            let gq = d.q_start + i;
            let j = gq / d.group - d.kv_start;
            let q = &qkv[t * qkv_w + i * hd..t * qkv_w + (i + 1) * hd];
            let kbase = j * max_seq * hd;
            let s = &mut scores[..ctx];
            for (p, sc) in s.iter_mut().enumerate() {
                *sc = math::dot(q, &kc[kbase + p * hd..kbase + (p + 1) * hd]) * scale;
            }
            math::softmax(s);
            out.fill(0.0);
            for (p, &w) in s.iter().enumerate() {
                let v = &vc[kbase + p * hd..kbase + (p + 1) * hd];
                for (o, &vv) in out.iter_mut().zip(v) {
                    *o += w * vv;
                }
            }
        };
        // Heads in parallel once there is enough work to share (each is computed the same either way).
        let work: usize = rows.pos_of.iter().map(|&p| (p + 1) * nq * hd).sum();
        let threads = if work >= ATTENTION_PAR_WORK { self.threads } else { 1 };
        let max_ctx = rows.pos_of.iter().max().map_or(0, |&p| p + 1);
        crate::par::for_each_chunk(threads, &mut attn[..n * nq * hd], hd, |ti, out| {
            SCORES.with_borrow_mut(|s| {
                if s.len() < max_ctx {
                    s.resize(max_ctx, 0.0);
                }
                head(ti / nq, ti % nq, s, out)
            })
        });
        Ok(())
    }

    fn silu_mul(&self, gu: &[f32], n: usize, f: usize, act: &mut [f32]) -> Result<()> {
        for t in 0..n {
            let row = &gu[t * 2 * f..(t + 1) * 2 * f];
            let a = &mut act[t * f..(t + 1) * f];
            a.copy_from_slice(&row[..f]);
            math::silu_mul(a, &row[f..]);
        }
        Ok(())
    }

    fn residual_add(&self, x: &mut [f32], delta: &[f32]) -> Result<()> {
        for (a, b) in x.iter_mut().zip(delta) {
            *a += b;
        }
        Ok(())
    }

    fn head(&self, w: &Weight, normed: &[f32], m: usize, mine: usize, vp: usize, local: &mut [f32]) -> Result<()> {
        if m == 1 {
            w.matvec_path(normed, &mut local[..mine], self.threads, self.decode_path);
        } else {
            let mut packed = vec![0.0f32; m * mine];
            w.matvec_batch_path(normed, m, &mut packed, self.threads, self.decode_path);
            for i in 0..m {
                local[i * vp..i * vp + mine].copy_from_slice(&packed[i * mine..(i + 1) * mine]);
            }
        }
        Ok(())
    }

    fn all_reduce_sum(&self, tp: &dyn Comm, buf: &mut [f32]) -> Result<()> {
        Ok(tp.all_reduce_sum(buf)?)
    }

    fn all_gather(&self, tp: &dyn Comm, send: &[f32], recv: &mut [f32]) -> Result<()> {
        Ok(tp.all_gather(send, recv)?)
    }

    fn with_host<R>(&self, x: &[f32], f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        Ok(f(x))
    }

    fn send(&self, pp: &dyn Comm, x: &[f32], peer: usize) -> Result<()> {
        Ok(pp.send(x, peer)?)
    }

    fn recv(&self, pp: &dyn Comm, len: usize, peer: usize) -> Result<Vec<f32>> {
        let mut x = vec![0.0f32; len];
        pp.recv(&mut x, peer)?;
        Ok(x)
    }
}

/// A column-parallel linear layer: this rank holds some output rows of `W`, its output is its slice of the
/// features, no collective.
pub struct ColumnParallel<B: Compute> {
    /// This rank's rows.
    pub w: B::Weight,
}

impl<B: Compute> ColumnParallel<B> {
    /// `out = W_local · x` for `n` rows.
    pub fn forward(&self, b: &B, x: &B::Act, n: usize, out: &mut B::Act, decode_rows: usize) -> Result<()> {
        b.linear(&self.w, x, n, out, decode_rows)
    }
}

/// A row-parallel linear layer: this rank holds some input columns of `W` and multiplies its slice of the
/// features; the partial outputs are summed with one all-reduce over the TP group.
pub struct RowParallel<B: Compute> {
    /// This rank's columns.
    pub w: B::Weight,
}

impl<B: Compute> RowParallel<B> {
    /// `out = Σ_ranks W_local · x_local` for `n` rows.
    pub fn forward(&self, b: &B, x: &B::Act, n: usize, out: &mut B::Act, decode_rows: usize, tp: &B::Tp) -> Result<()> {
        b.linear(&self.w, x, n, out, decode_rows)?;
        b.all_reduce_sum(tp, out)
    }
}

/// Refuses a token id outside a vocabulary of `vocab`.
pub fn check_tokens(tokens: &[u32], vocab: usize) -> Result<()> {
    match tokens.iter().find(|&&t| t as usize >= vocab) {
        Some(&tok) => Err(EngineError::Config(format!(
            "token id {tok} is out of range for a vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}

/// A vocabulary-parallel embedding: this rank holds vocabulary rows `rows`; rows of the other ranks' tokens
/// are zeros, and one all-reduce over the TP group completes every row.
pub struct VocabParallelEmbedding<B: Compute> {
    /// This rank's rows of the table.
    pub table: B::Weight,
    /// The vocabulary rows this rank holds.
    pub rows: Range<usize>,
}

impl<B: Compute> VocabParallelEmbedding<B> {
    /// Embeds `tokens` (every id below `vocab`).
    pub fn forward(&self, b: &B, tokens: &[u32], vocab: usize, hidden: usize, tp: &B::Tp) -> Result<B::ActBuf> {
        check_tokens(tokens, vocab)?;
        let mut x = b.embed(&self.table, tokens, self.rows.clone(), hidden)?;
        b.all_reduce_sum(tp, view_mut::<B>(&mut x))?;
        Ok(x)
    }
}

/// The vocabulary-parallel LM head: this rank's `mine` vocabulary rows (every rank's shard padded to
/// `per` rows), logits gathered with one all-gather over the TP group.
pub struct VocabParallelHead {
    /// Rows of every rank's shard (the last one may hold fewer).
    pub per: usize,
    /// This rank's rows.
    pub mine: usize,
    /// The vocabulary.
    pub vocab: usize,
}

impl VocabParallelHead {
    /// Elements of the gathered (padded) logits of `m` rows over a TP group of `tp_size`.
    pub fn gathered_len(&self, m: usize, tp_size: usize) -> usize {
        m * self.per * tp_size
    }

    /// Logits of `m` normed rows through `w` (this rank's head rows): one vector of `vocab` per row.
    pub fn forward<B: Compute>(
        &self,
        b: &B,
        w: &B::Weight,
        normed: &B::Act,
        m: usize,
        tp: &B::Tp,
    ) -> Result<Vec<Vec<f32>>> {
        let mut all = b.alloc(self.gathered_len(m, tp.size()))?;
        self.gather(b, w, normed, m, tp, view_mut::<B>(&mut all))?;
        self.unpad(b, view::<B>(&all), m, tp.size())
    }

    /// The backend half of [`VocabParallelHead::forward`]: every rank's padded logits of the `m` rows,
    /// gathered into `all` ([`VocabParallelHead::gathered_len`] elements), rank by rank.
    pub fn gather<B: Compute>(
        &self,
        b: &B,
        w: &B::Weight,
        normed: &B::Act,
        m: usize,
        tp: &B::Tp,
        all: &mut B::Act,
    ) -> Result<()> {
        let vp = self.per;
        let mut local = b.alloc(m * vp)?;
        b.head(w, normed, m, self.mine, vp, view_mut::<B>(&mut local))?;
        b.all_gather(tp, view::<B>(&local), all)
    }

    /// The host half: the gathered logits `all` of `m` rows read back, one vector of `vocab` per row.
    pub fn unpad<B: Compute>(&self, b: &B, all: &B::Act, m: usize, tp_size: usize) -> Result<Vec<Vec<f32>>> {
        let (vp, tpn) = (self.per, tp_size);
        if B::act_len(all) != self.gathered_len(m, tpn) {
            return Err(EngineError::Config(format!(
                "gathered logits: {} values for {m} row(s) of {vp} on {tpn} rank(s)",
                B::act_len(all)
            )));
        }
        b.with_host(all, |all| {
            (0..m)
                .map(|i| {
                    let mut v = Vec::with_capacity(vp * tpn);
                    for r in 0..tpn {
                        let base = r * m * vp + i * vp;
                        v.extend_from_slice(&all[base..base + vp]);
                    }
                    v.truncate(self.vocab);
                    v
                })
                .collect()
        })
    }
}
