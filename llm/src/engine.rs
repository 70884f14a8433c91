//! The tensor- and pipeline-parallel forward pass, KV cache and generation loop of one rank.
//!
//! A rank is `(stage, tp_rank)` in a `tp × pp` layout. Its [`RankModel`] holds only its shard:
//!
//! * stage 0: its vocabulary rows of the embedding (vocab-parallel; the partial embeddings are summed with
//!   one all-reduce over the TP group);
//! * each layer of its stage: the rows of q/k/v (its query heads and the KV heads they read) fused into one
//!   column-parallel matrix, the matching columns of `o_proj` (row-parallel, then one all-reduce), its rows
//!   of gate/up (fused) and the matching columns of `down_proj` (row-parallel, then one all-reduce);
//! * the last stage: the final norm and its vocabulary rows of the LM head (logits gathered with one
//!   all-gather over the TP group).
//!
//! Activations move between stages with send/recv over the pipeline communicator; the prompt is split into
//! micro-batches so stage `s` works on chunk `c + 1` while stage `s + 1` works on chunk `c`.

use std::ops::Range;
use std::time::Instant;

use crate::comm::Comm;
use crate::error::{EngineError, Result};
use crate::math::{self, DecodePath, Matrix, QMatrix, Rope, Weight};
use crate::model::{self, LlamaConfig, WeightSource};
use crate::sample::{Sampler, SamplingParams};
use crate::shard::{self, HeadShard};

/// Where a rank sits and how much it may compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankPlace {
    /// Tensor-parallel degree.
    pub tp: usize,
    /// This rank in its TP group.
    pub tp_rank: usize,
    /// Pipeline-parallel degree.
    pub pp: usize,
    /// This rank's stage.
    pub stage: usize,
    /// Threads this rank may use for its matrix products.
    pub threads: usize,
}

struct Layer {
    attn_norm: Vec<f32>,
    mlp_norm: Vec<f32>,
    /// Rows: local q heads, then local k heads, then local v heads (`head_dim` rows each).
    qkv: Weight,
    /// `[hidden, local q heads * head_dim]`.
    o: Weight,
    /// Rows: local gate rows, then the same up rows.
    gate_up: Weight,
    /// `[hidden, local intermediate]`.
    down: Weight,
}

/// The weights one rank owns.
pub struct RankModel {
    cfg: LlamaConfig,
    place: RankPlace,
    heads: HeadShard,
    ffn_local: usize,
    layers_range: Range<usize>,
    layers: Vec<Layer>,
    vocab_rows: Range<usize>,
    vocab_per: usize,
    embed: Option<Weight>,
    final_norm: Option<Vec<f32>>,
    /// `None` with a tied head on a single-stage layout: the embedding shard is the head.
    lm_head: Option<Weight>,
    rope: Rope,
    decode_path: DecodePath,
}

fn expect_shape(name: &str, t: &model::Tensor, expected: &[usize]) -> Result<()> {
    if t.shape != expected {
        return Err(EngineError::Shape {
            name: name.to_string(),
            expected: expected.to_vec(),
            actual: t.shape.clone(),
        });
    }
    Ok(())
}

/// Rows `rows` of matrix `name` as the source stores them, if it keeps them block-quantized in a layout the
/// kernels support (and `f32_weights` is off).
fn load_quant(
    src: &dyn WeightSource,
    name: &str,
    rows: Range<usize>,
    cols: usize,
    f32_weights: bool,
) -> Result<Option<QMatrix>> {
    if f32_weights {
        return Ok(None);
    }
    let Some(q) = src.tensor_rows_quantized(name, rows.clone())? else {
        return Ok(None);
    };
    if q.rows != rows.len() || q.cols != cols || q.data.len() != q.rows * q.row_bytes {
        return Err(EngineError::Shape {
            name: name.to_string(),
            expected: vec![rows.len(), cols],
            actual: vec![q.rows, q.cols],
        });
    }
    Ok(QMatrix::from_ggml(q.ty, q.rows, q.cols, &q.data))
}

fn load_rows(
    src: &dyn WeightSource,
    name: &str,
    rows: Range<usize>,
    full_rows: usize,
    cols: usize,
    f32_weights: bool,
) -> Result<Weight> {
    if rows.end > full_rows {
        return Err(EngineError::Config(format!("{name}: rows {rows:?} exceed {full_rows}")));
    }
    if let Some(q) = load_quant(src, name, rows.clone(), cols, f32_weights)? {
        return Ok(Weight::Quant(q));
    }
    let t = src.tensor_rows(name, rows.clone())?;
    expect_shape(name, &t, &[rows.len(), cols])?;
    Ok(Weight::F32(Matrix::new(rows.len(), cols, t.data)))
}

/// Columns `cols` of a `[rows, full_cols]` tensor (kept quantized when the columns are whole blocks).
fn load_cols(
    src: &dyn WeightSource,
    name: &str,
    rows: usize,
    full_cols: usize,
    cols: Range<usize>,
    f32_weights: bool,
) -> Result<Weight> {
    if let Some(q) = load_quant(src, name, 0..rows, full_cols, f32_weights)? {
        if let Some(part) = q.columns(cols.clone()) {
            return Ok(Weight::Quant(part));
        }
    }
    let t = src.tensor(name)?;
    expect_shape(name, &t, &[rows, full_cols])?;
    let mut data = Vec::with_capacity(rows * cols.len());
    for r in 0..rows {
        data.extend_from_slice(&t.data[r * full_cols + cols.start..r * full_cols + cols.end]);
    }
    Ok(Weight::F32(Matrix::new(rows, cols.len(), data)))
}

fn load_vector(src: &dyn WeightSource, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = src.tensor(name)?;
    if t.data.len() != len || t.shape.iter().product::<usize>() != len {
        return Err(EngineError::Shape {
            name: name.to_string(),
            expected: vec![len],
            actual: t.shape.clone(),
        });
    }
    Ok(t.data)
}

/// The rows of `parts` one after the other: quantized when all parts are of the same quantized kind, f32
/// otherwise.
fn stack(parts: Vec<Weight>) -> Weight {
    let same_kind = match parts.first() {
        Some(Weight::Quant(first)) => parts
            .iter()
            .all(|p| matches!(p, Weight::Quant(q) if q.kind() == first.kind() && q.cols == first.cols)),
        _ => false,
    };
    if same_kind {
        let q: Vec<QMatrix> = parts
            .into_iter()
            .filter_map(|p| match p {
                Weight::Quant(q) => Some(q),
                Weight::F32(_) => None,
            })
            .collect();
        return Weight::Quant(QMatrix::stack(q).expect("parts of one kind and width"));
    }
    let parts: Vec<Matrix> = parts.into_iter().map(Weight::into_f32).collect();
    let cols = parts.first().map_or(0, |m| m.cols);
    let rows = parts.iter().map(|m| m.rows).sum();
    let mut data = Vec::with_capacity(rows * cols);
    for p in parts {
        debug_assert_eq!(p.cols, cols);
        data.extend(p.data);
    }
    Weight::F32(Matrix::new(rows, cols, data))
}

/// Environment variable that makes [`RankModel::load`] dequantize every weight to f32 (e.g. to compare the
/// speed of both paths): `NCCL_LLM_F32_WEIGHTS=1`.
pub const F32_WEIGHTS_ENV: &str = "NCCL_LLM_F32_WEIGHTS";

/// Checks that `cfg` can be split as `tp × pp`.
pub fn check_layout(cfg: &LlamaConfig, tp: usize, pp: usize) -> Result<()> {
    shard::check_tp(cfg.num_attention_heads, cfg.num_key_value_heads, tp).map_err(EngineError::Config)?;
    if pp == 0 || pp > cfg.num_hidden_layers {
        return Err(EngineError::Config(format!(
            "--pp {pp}: the pipeline degree must be between 1 and the number of layers ({})",
            cfg.num_hidden_layers
        )));
    }
    if cfg.head_dim == 0 || cfg.head_dim % 2 != 0 {
        return Err(EngineError::Config(format!(
            "head_dim {} must be even and non-zero",
            cfg.head_dim
        )));
    }
    if cfg.hidden_size == 0 || cfg.vocab_size == 0 {
        return Err(EngineError::Config(
            "hidden_size and vocab_size must be non-zero".into(),
        ));
    }
    Ok(())
}

impl RankModel {
    /// Loads this rank's shard. `progress(done, total)` is called after each tensor.
    ///
    /// Matrices the source stores as `Q4_0`, `Q4_1` or `Q8_0` blocks stay quantized (decode computes on the
    /// blocks) unless the environment variable [`F32_WEIGHTS_ENV`] is set to anything but `0` or empty, which
    /// dequantizes every weight to f32 as [`RankModel::load_with`] does with `f32_weights = true`.
    pub fn load(src: &dyn WeightSource, place: RankPlace, progress: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        let f32_weights = std::env::var(F32_WEIGHTS_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
        Self::load_with(src, place, f32_weights, progress)
    }

    /// [`RankModel::load`] with an explicit choice: `f32_weights = true` dequantizes every weight to f32,
    /// `false` keeps block-quantized matrices quantized.
    pub fn load_with(
        src: &dyn WeightSource,
        place: RankPlace,
        f32_weights: bool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let cfg = src.config().clone();
        check_layout(&cfg, place.tp, place.pp)?;
        let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let heads = shard::head_shard(
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            place.tp,
            place.tp_rank,
        );
        let ffn = shard::even_range(inter, place.tp, place.tp_rank);
        let layers_range = shard::stage_layers(cfg.num_hidden_layers, place.pp, place.stage);
        let (vocab_rows, vocab_per) = shard::vocab_shard(cfg.vocab_size, place.tp, place.tp_rank);
        let first = place.stage == 0;
        let last = place.stage + 1 == place.pp;
        let total = layers_range.len() + usize::from(first) + usize::from(last);
        let mut done = 0;

        let embed = if first {
            let m = load_rows(
                src,
                "model.embed_tokens.weight",
                vocab_rows.clone(),
                cfg.vocab_size,
                h,
                f32_weights,
            )?;
            done += 1;
            progress(done, total);
            Some(m)
        } else {
            None
        };

        let q_rows = heads.q_heads.start * hd..heads.q_heads.end * hd;
        let kv_rows = heads.kv_heads.start * hd..heads.kv_heads.end * hd;
        let (q_all, kv_all) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let mut layers = Vec::with_capacity(layers_range.len());
        for i in layers_range.clone() {
            let p = format!("model.layers.{i}");
            let qkv = stack(vec![
                load_rows(
                    src,
                    &format!("{p}.self_attn.q_proj.weight"),
                    q_rows.clone(),
                    q_all,
                    h,
                    f32_weights,
                )?,
                load_rows(
                    src,
                    &format!("{p}.self_attn.k_proj.weight"),
                    kv_rows.clone(),
                    kv_all,
                    h,
                    f32_weights,
                )?,
                load_rows(
                    src,
                    &format!("{p}.self_attn.v_proj.weight"),
                    kv_rows.clone(),
                    kv_all,
                    h,
                    f32_weights,
                )?,
            ]);
            let gate_up = stack(vec![
                load_rows(
                    src,
                    &format!("{p}.mlp.gate_proj.weight"),
                    ffn.clone(),
                    inter,
                    h,
                    f32_weights,
                )?,
                load_rows(
                    src,
                    &format!("{p}.mlp.up_proj.weight"),
                    ffn.clone(),
                    inter,
                    h,
                    f32_weights,
                )?,
            ]);
            layers.push(Layer {
                attn_norm: load_vector(src, &format!("{p}.input_layernorm.weight"), h)?,
                mlp_norm: load_vector(src, &format!("{p}.post_attention_layernorm.weight"), h)?,
                qkv,
                o: load_cols(
                    src,
                    &format!("{p}.self_attn.o_proj.weight"),
                    h,
                    q_all,
                    q_rows.clone(),
                    f32_weights,
                )?,
                gate_up,
                down: load_cols(
                    src,
                    &format!("{p}.mlp.down_proj.weight"),
                    h,
                    inter,
                    ffn.clone(),
                    f32_weights,
                )?,
            });
            done += 1;
            progress(done, total);
        }

        let (final_norm, lm_head) = if last {
            let norm = load_vector(src, "model.norm.weight", h)?;
            let head = if cfg.tie_word_embeddings && first {
                None
            } else {
                Some(load_rows(
                    src,
                    "lm_head.weight",
                    vocab_rows.clone(),
                    cfg.vocab_size,
                    h,
                    f32_weights,
                )?)
            };
            done += 1;
            progress(done, total);
            (Some(norm), head)
        } else {
            (None, None)
        };

        let rope = Rope::new(model::rope_inv_freq(&cfg));
        Ok(RankModel {
            ffn_local: ffn.len(),
            cfg,
            place,
            heads,
            layers_range,
            layers,
            vocab_rows,
            vocab_per,
            embed,
            final_norm,
            lm_head,
            rope,
            decode_path: DecodePath::Exact,
        })
    }

    /// Chooses how decode steps (one row per sequence) compute their matrix-vector products on
    /// block-quantized weights: [`DecodePath::Exact`] (the default after loading), [`DecodePath::Int8`] or
    /// [`DecodePath::Int16`]. Prefill always uses the exact blocked product. Returns the path in effect: a
    /// rank holding no block-quantized matrix (f32 weights: a Hugging Face checkpoint, the tiny model) has
    /// nothing for an integer path to compute on and stays [`DecodePath::Exact`], so that what is printed is
    /// what runs.
    pub fn set_decode_path(&mut self, path: DecodePath) -> DecodePath {
        self.decode_path = if self.has_quantized_weights() {
            path
        } else {
            DecodePath::Exact
        };
        self.decode_path
    }

    /// Whether any matrix of this rank is kept block-quantized.
    pub fn has_quantized_weights(&self) -> bool {
        let quant = |w: &Weight| matches!(w, Weight::Quant(_));
        self.layers
            .iter()
            .any(|l| quant(&l.qkv) || quant(&l.o) || quant(&l.gate_up) || quant(&l.down))
            || self.embed.as_ref().is_some_and(quant)
            || self.lm_head.as_ref().is_some_and(quant)
    }

    /// The decode path in use (see [`RankModel::set_decode_path`]).
    pub fn decode_path(&self) -> DecodePath {
        self.decode_path
    }

    /// The model configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// This rank's place.
    pub fn place(&self) -> RankPlace {
        self.place
    }

    /// The global layers this rank runs.
    pub fn layers(&self) -> Range<usize> {
        self.layers_range.clone()
    }

    /// Bytes of weights this rank reads per decoded token (all its matrices and norms).
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes() + 8 * l.attn_norm.len())
            .sum();
        let head = self.lm_head.as_ref().or(if self.final_norm.is_some() {
            self.embed.as_ref()
        } else {
            None
        });
        layers + head.map_or(0, |m| m.bytes())
    }

    fn is_first(&self) -> bool {
        self.place.stage == 0
    }

    fn is_last(&self) -> bool {
        self.place.stage + 1 == self.place.pp
    }

    /// Bytes of KV cache this rank allocates per position of a sequence (keys and values of its KV heads,
    /// every layer of its stage).
    pub fn kv_bytes_per_position(&self) -> usize {
        2 * self.layers.len() * self.heads.kv_heads.len() * self.cfg.head_dim * std::mem::size_of::<f32>()
    }

    /// An empty KV cache for up to `max_seq` positions.
    pub fn new_cache(&self, max_seq: usize) -> KvCache {
        let per = self.heads.kv_heads.len() * max_seq * self.cfg.head_dim;
        KvCache {
            k: (0..self.layers.len()).map(|_| vec![0.0; per]).collect(),
            v: (0..self.layers.len()).map(|_| vec![0.0; per]).collect(),
            max_seq,
            len: 0,
        }
    }

    /// Embeds `tokens` into `x` (`tokens.len() * hidden`): each rank writes its vocabulary rows, then one
    /// all-reduce over the TP group completes every row.
    pub fn embed(&self, tokens: &[u32], tp: &dyn Comm) -> Result<Vec<f32>> {
        let embed = self
            .embed
            .as_ref()
            .ok_or_else(|| EngineError::Config("embed called on a later stage".into()))?;
        let h = self.cfg.hidden_size;
        let mut x = vec![0.0f32; tokens.len() * h];
        for (t, &tok) in tokens.iter().enumerate() {
            let tok = tok as usize;
            if tok >= self.cfg.vocab_size {
                return Err(EngineError::Config(format!(
                    "token id {tok} is out of range for a vocabulary of {}",
                    self.cfg.vocab_size
                )));
            }
            if self.vocab_rows.contains(&tok) {
                let r = tok - self.vocab_rows.start;
                embed.row_into(r, &mut x[t * h..(t + 1) * h]);
            }
        }
        tp.all_reduce_sum(&mut x)?;
        Ok(x)
    }

    /// Runs this stage's layers on `n` rows of activations `x` at positions `pos0..pos0 + n`, appending their
    /// keys and values to `cache`.
    pub fn forward_layers(&self, x: &mut [f32], n: usize, cache: &mut KvCache, tp: &dyn Comm) -> Result<()> {
        self.forward_batch(x, &mut [(n, cache)], tp)
    }

    /// Runs this stage's layers on several sequences at once (continuous batching): segment `s` is
    /// `segs[s].0` consecutive rows of `x` (after those of the earlier segments) that continue the sequence
    /// whose cache is `segs[s].1`, at its next positions. The matrix products run over all rows together, so
    /// the weights are read once per step; attention reads each sequence's own cache.
    ///
    /// When every segment is one row (a decode step) the products use [`Weight::matvec_batch`], whose
    /// result for each row is bit for bit what a step of that sequence alone computes: batching changes no
    /// token. Segments of several rows (prefill) go through the blocked product of [`Weight::linear`].
    /// Nothing is written to any cache when one of them would overflow.
    pub fn forward_batch(&self, x: &mut [f32], segs: &mut [(usize, &mut KvCache)], tp: &dyn Comm) -> Result<()> {
        let cfg = &self.cfg;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let n: usize = segs.iter().map(|s| s.0).sum();
        if x.len() != n * h {
            return Err(EngineError::Config(format!(
                "forward: {} activations for {n} rows of width {h}",
                x.len()
            )));
        }
        for (len, cache) in segs.iter() {
            if cache.len + len > cache.max_seq {
                return Err(EngineError::Config(format!(
                    "sequence of {} tokens exceeds the KV cache ({} positions)",
                    cache.len + len,
                    cache.max_seq
                )));
            }
        }
        let decode = segs.len() > 1 && segs.iter().all(|s| s.0 == 1);
        let path = self.decode_path;
        let lin = |w: &Weight, input: &[f32], out: &mut [f32]| {
            if decode {
                w.matvec_batch_path(input, n, out, self.place.threads, path)
            } else {
                w.linear_path(input, n, out, self.place.threads, path)
            }
        };
        let eps = cfg.rms_norm_eps as f32;
        let nq = self.heads.q_heads.len();
        let nkv = self.heads.kv_heads.len();
        let group = cfg.num_attention_heads / cfg.num_key_value_heads;
        let qkv_w = (nq + 2 * nkv) * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        // Row r belongs to segment seg_of[r] at position pos_of[r].
        let mut seg_of = Vec::with_capacity(n);
        let mut pos_of = Vec::with_capacity(n);
        for (si, (len, cache)) in segs.iter().enumerate() {
            for t in 0..*len {
                seg_of.push(si);
                pos_of.push(cache.len + t);
            }
        }
        let angles: Vec<(Vec<f32>, Vec<f32>)> = pos_of.iter().map(|&p| self.rope.angles(p)).collect();
        let max_ctx = pos_of.iter().copied().max().map_or(0, |p| p + 1);

        let mut normed = vec![0.0f32; n * h];
        let mut qkv = vec![0.0f32; n * qkv_w];
        let mut attn = vec![0.0f32; n * nq * hd];
        let mut proj = vec![0.0f32; n * h];
        let mut gu = vec![0.0f32; n * 2 * self.ffn_local];
        let mut act = vec![0.0f32; n * self.ffn_local];
        let mut scores = vec![0.0f32; max_ctx];

        for (li, layer) in self.layers.iter().enumerate() {
            // Attention.
            math::rms_norm(x, &layer.attn_norm, eps, &mut normed);
            lin(&layer.qkv, &normed, &mut qkv);
            for t in 0..n {
                let cache = &mut *segs[seg_of[t]].1;
                let max_seq = cache.max_seq;
                let (kc, vc) = (&mut cache.k[li], &mut cache.v[li]);
                let row = &mut qkv[t * qkv_w..(t + 1) * qkv_w];
                let (cos, sin) = &angles[t];
                self.rope.apply(&mut row[..(nq + nkv) * hd], cos, sin);
                let pos = pos_of[t];
                for j in 0..nkv {
                    let dst = (j * max_seq + pos) * hd;
                    kc[dst..dst + hd].copy_from_slice(&row[(nq + j) * hd..(nq + j + 1) * hd]);
                    vc[dst..dst + hd].copy_from_slice(&row[(nq + nkv + j) * hd..(nq + nkv + j + 1) * hd]);
                }
            }
            for t in 0..n {
                let cache = &*segs[seg_of[t]].1;
                let max_seq = cache.max_seq;
                let (kc, vc) = (&cache.k[li], &cache.v[li]);
                let ctx = pos_of[t] + 1;
                for i in 0..nq {
                    let gq = self.heads.q_heads.start + i;
                    let j = gq / group - self.heads.kv_heads.start;
                    let q = &qkv[t * qkv_w + i * hd..t * qkv_w + (i + 1) * hd];
                    let kbase = j * max_seq * hd;
                    let s = &mut scores[..ctx];
                    for (p, sc) in s.iter_mut().enumerate() {
                        *sc = math::dot(q, &kc[kbase + p * hd..kbase + (p + 1) * hd]) * scale;
                    }
                    math::softmax(s);
                    let out = &mut attn[(t * nq + i) * hd..(t * nq + i + 1) * hd];
                    out.fill(0.0);
                    for (p, &w) in s.iter().enumerate() {
                        let v = &vc[kbase + p * hd..kbase + (p + 1) * hd];
                        for (o, &vv) in out.iter_mut().zip(v) {
                            *o += w * vv;
                        }
                    }
                }
            }
            lin(&layer.o, &attn, &mut proj);
            tp.all_reduce_sum(&mut proj)?;
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }

            // MLP.
            math::rms_norm(x, &layer.mlp_norm, eps, &mut normed);
            lin(&layer.gate_up, &normed, &mut gu);
            let f = self.ffn_local;
            for t in 0..n {
                let row = &gu[t * 2 * f..(t + 1) * 2 * f];
                let a = &mut act[t * f..(t + 1) * f];
                a.copy_from_slice(&row[..f]);
                math::silu_mul(a, &row[f..]);
            }
            lin(&layer.down, &act, &mut proj);
            tp.all_reduce_sum(&mut proj)?;
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }
        }
        for (len, cache) in segs.iter_mut() {
            cache.len += *len;
        }
        Ok(())
    }

    /// Logits of the last row of `x` (last stage only): final norm, this rank's vocabulary rows, then one
    /// all-gather over the TP group. Returns all `vocab_size` logits on every TP rank.
    pub fn logits(&self, x: &[f32], tp: &dyn Comm) -> Result<Vec<f32>> {
        let h = self.cfg.hidden_size;
        if x.len() < h {
            return Err(EngineError::Config("logits of an empty batch".into()));
        }
        let rows = [x.len() / h - 1];
        Ok(self.logits_rows(x, &rows, tp)?.pop().expect("one row"))
    }

    /// Logits of rows `rows` of `x` (last stage only), one vector of `vocab_size` per row, with one pass
    /// over the LM head and one all-gather for all of them. Each row's logits are bit for bit those that
    /// [`RankModel::logits`] gives for that row alone.
    pub fn logits_rows(&self, x: &[f32], rows: &[usize], tp: &dyn Comm) -> Result<Vec<Vec<f32>>> {
        let h = self.cfg.hidden_size;
        let norm = self
            .final_norm
            .as_ref()
            .ok_or_else(|| EngineError::Config("logits called on an earlier stage".into()))?;
        let head = self
            .lm_head
            .as_ref()
            .or(self.embed.as_ref())
            .expect("the last stage holds a head");
        let m = rows.len();
        let mut normed = vec![0.0f32; m * h];
        for (i, &r) in rows.iter().enumerate() {
            let row = x
                .get(r * h..(r + 1) * h)
                .ok_or_else(|| EngineError::Config(format!("logits: row {r} is past the batch")))?;
            math::rms_norm(row, norm, self.cfg.rms_norm_eps as f32, &mut normed[i * h..(i + 1) * h]);
        }
        let (vp, mine) = (self.vocab_per, self.vocab_rows.len());
        let mut local = vec![0.0f32; m * vp];
        if m == 1 {
            head.matvec_path(&normed, &mut local[..mine], self.place.threads, self.decode_path);
        } else {
            let mut packed = vec![0.0f32; m * mine];
            head.matvec_batch_path(&normed, m, &mut packed, self.place.threads, self.decode_path);
            for i in 0..m {
                local[i * vp..i * vp + mine].copy_from_slice(&packed[i * mine..(i + 1) * mine]);
            }
        }
        let tpn = self.place.tp;
        let mut all = vec![0.0f32; m * vp * tpn];
        tp.all_gather(&local, &mut all)?;
        Ok((0..m)
            .map(|i| {
                let mut v = Vec::with_capacity(vp * tpn);
                for r in 0..tpn {
                    let base = r * m * vp + i * vp;
                    v.extend_from_slice(&all[base..base + vp]);
                }
                v.truncate(self.cfg.vocab_size);
                v
            })
            .collect())
    }
}

/// Keys and values of this rank's KV heads for this stage's layers.
pub struct KvCache {
    /// Per layer: `[kv head][position][head_dim]`.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    max_seq: usize,
    len: usize,
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

/// What one generation asks for.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Prompt micro-batches in pipeline-parallel prefill (0 = one per stage).
    pub micro_batches: usize,
}

/// What one generation produced, seen from one rank.
#[derive(Clone, Debug, Default)]
pub struct GenerateOutput {
    /// The generated tokens (every rank knows them).
    pub generated: Vec<u32>,
    /// Logits at the last prompt position (ranks of the last stage only).
    pub prompt_logits: Option<Vec<f32>>,
    /// Seconds from start to the first sampled token.
    pub prefill_secs: f64,
    /// Seconds spent decoding the following tokens.
    pub decode_secs: f64,
    /// The decode path this rank used ([`RankModel::set_decode_path`]).
    pub decode_path: DecodePath,
}

/// One rank: its shard, its communicators and its KV cache.
pub struct Rank {
    model: RankModel,
    tp: Box<dyn Comm>,
    pp: Box<dyn Comm>,
}

impl Rank {
    /// A rank from its shard, its TP-group communicator and its pipeline-group communicator (whose rank is
    /// the stage).
    pub fn new(model: RankModel, tp: Box<dyn Comm>, pp: Box<dyn Comm>) -> Result<Self> {
        let place = model.place;
        if tp.size() != place.tp || tp.rank() != place.tp_rank || pp.size() != place.pp || pp.rank() != place.stage {
            return Err(EngineError::Config(format!(
                "communicators (tp {}/{}, pp {}/{}) do not match the rank's place {place:?}",
                tp.rank(),
                tp.size(),
                pp.rank(),
                pp.size()
            )));
        }
        Ok(Rank { model, tp, pp })
    }

    /// Waits until every rank of this rank's TP group and pipeline has called it.
    pub fn barrier(&self) -> Result<()> {
        self.tp.barrier()?;
        self.pp.barrier()?;
        Ok(())
    }

    /// The shard.
    pub fn model(&self) -> &RankModel {
        &self.model
    }

    /// The TP-group communicator (its rank is `tp_rank`).
    pub fn tp_comm(&self) -> &dyn Comm {
        &*self.tp
    }

    /// The pipeline communicator (its rank is the stage).
    pub fn pp_comm(&self) -> &dyn Comm {
        &*self.pp
    }

    /// Runs the stage on one chunk: embed or receive, layers, then send or (last stage) nothing.
    fn run_chunk(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let n = tokens.len();
        let h = self.model.cfg.hidden_size;
        let stage = self.model.place.stage;
        let mut x = if self.model.is_first() {
            self.model.embed(tokens, &*self.tp)?
        } else {
            let mut x = vec![0.0f32; n * h];
            self.pp.recv(&mut x, stage - 1)?;
            x
        };
        self.model.forward_layers(&mut x, n, cache, &*self.tp)?;
        if !self.model.is_last() {
            self.pp.send(&x, stage + 1)?;
        }
        Ok(x)
    }

    /// One step of continuous batching, called with the same segments on every rank of the layout: segment
    /// `(tokens, cache)` feeds `tokens` to the sequence of `cache` (a prefill chunk, or the one token a
    /// decode step adds). Stage 0 embeds them, every stage runs its layers over all rows in one pass (see
    /// [`RankModel::forward_batch`]) and passes them on. Returns, on the last stage's ranks, the logits at the
    /// last row of each segment (`None` on the other stages).
    pub fn step(&self, segs: &mut [(&[u32], &mut KvCache)]) -> Result<Option<Vec<Vec<f32>>>> {
        let h = self.model.cfg.hidden_size;
        let stage = self.model.place.stage;
        let n: usize = segs.iter().map(|s| s.0.len()).sum();
        if segs.iter().any(|s| s.0.is_empty()) {
            return Err(EngineError::Config("step: a segment has no tokens".into()));
        }
        let mut x = if self.model.is_first() {
            let tokens: Vec<u32> = segs.iter().flat_map(|s| s.0.iter().copied()).collect();
            self.model.embed(&tokens, &*self.tp)?
        } else {
            let mut x = vec![0.0f32; n * h];
            self.pp.recv(&mut x, stage - 1)?;
            x
        };
        let mut rows: Vec<(usize, &mut KvCache)> = segs.iter_mut().map(|(t, c)| (t.len(), &mut **c)).collect();
        self.model.forward_batch(&mut x, &mut rows, &*self.tp)?;
        if !self.model.is_last() {
            self.pp.send(&x, stage + 1)?;
            return Ok(None);
        }
        let mut last = Vec::with_capacity(segs.len());
        let mut end = 0;
        for s in segs.iter() {
            end += s.0.len();
            last.push(end - 1);
        }
        Ok(Some(self.model.logits_rows(&x, &last, &*self.tp)?))
    }

    /// The last stage tells every other stage which token was chosen.
    fn share_token(&self, token: Option<u32>) -> Result<u32> {
        let pp = self.model.place.pp;
        let stage = self.model.place.stage;
        if self.model.is_last() {
            let t = token.expect("the last stage samples");
            for s in 0..pp - 1 {
                self.pp.send(&[t as f32], s)?;
            }
            Ok(t)
        } else {
            let mut b = [0.0f32];
            self.pp.recv(&mut b, pp - 1)?;
            let _ = stage;
            Ok(b[0] as u32)
        }
    }

    /// Generates up to `params.max_new_tokens` tokens after `prompt`, calling `on_token` with each new token
    /// as soon as it is known. Every rank of the layout calls this with the same arguments.
    ///
    /// Sampling settings out of range ([`SamplingParams::validate`]) are refused with
    /// [`EngineError::Sampling`] before anything is computed, on every rank alike.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<GenerateOutput> {
        let cfg = &self.model.cfg;
        params.sampling.validate()?;
        if prompt.is_empty() {
            return Err(EngineError::Config("the prompt is empty".into()));
        }
        let max_seq = prompt.len() + params.max_new_tokens;
        if max_seq > cfg.max_position_embeddings {
            return Err(EngineError::Config(format!(
                "prompt ({}) + max new tokens ({}) exceeds the model's context of {} positions",
                prompt.len(),
                params.max_new_tokens,
                cfg.max_position_embeddings
            )));
        }
        let mut out = GenerateOutput {
            decode_path: self.model.decode_path(),
            ..GenerateOutput::default()
        };
        if params.max_new_tokens == 0 {
            return Ok(out);
        }
        let mut cache = self.model.new_cache(max_seq);
        let mut sampler = Sampler::new(params.sampling.clone());
        let start = Instant::now();

        // Prefill, in micro-batches so pipeline stages overlap.
        let pp = self.model.place.pp;
        let chunks = if params.micro_batches == 0 {
            pp
        } else {
            params.micro_batches
        }
        .clamp(1, prompt.len());
        let mut last_x = Vec::new();
        for c in 0..chunks {
            let r = shard::even_range(prompt.len(), chunks, c);
            last_x = self.run_chunk(&prompt[r], &mut cache)?;
        }
        let mut token = None;
        if self.model.is_last() {
            let logits = self.model.logits(&last_x, &*self.tp)?;
            token = Some(sampler.sample(&logits));
            out.prompt_logits = Some(logits);
        }
        let mut t = self.share_token(token)?;
        out.prefill_secs = start.elapsed().as_secs_f64();
        out.generated.push(t);
        on_token(t);

        let decode_start = Instant::now();
        while out.generated.len() < params.max_new_tokens && (params.ignore_eos || !cfg.eos_token_ids.contains(&t)) {
            let x = self.run_chunk(&[t], &mut cache)?;
            let mut token = None;
            if self.model.is_last() {
                let logits = self.model.logits(&x, &*self.tp)?;
                token = Some(sampler.sample(&logits));
            }
            t = self.share_token(token)?;
            out.generated.push(t);
            on_token(t);
        }
        out.decode_secs = decode_start.elapsed().as_secs_f64();
        // A rank that drops its communicators breaks them for everyone: nobody leaves before all are done.
        self.barrier()?;
        Ok(out)
    }
}
