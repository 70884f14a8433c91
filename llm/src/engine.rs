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
use crate::compute::{
    self, AttnDims, ColumnParallel, Compute, Cpu, GraphInputs, RowParallel, StepRows, VocabParallelEmbedding,
    VocabParallelHead,
};
use crate::error::{EngineError, Result};
use crate::math::{DecodePath, Matrix, QMatrix, Rope, Weight};
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

impl RankPlace {
    /// The only rank of a TP 1 × PP 1 layout, with `threads` compute threads.
    pub const fn single(threads: usize) -> RankPlace {
        RankPlace {
            tp: 1,
            tp_rank: 0,
            pp: 1,
            stage: 0,
            threads,
        }
    }
}

pub use crate::compute::KvCache;

struct Layer<B: Compute> {
    attn_norm: B::Norm,
    mlp_norm: B::Norm,
    /// Rows: local q heads, then local k heads, then local v heads (`head_dim` rows each).
    qkv: ColumnParallel<B>,
    /// `[hidden, local q heads * head_dim]`.
    o: RowParallel<B>,
    /// Rows: local gate rows, then the same up rows.
    gate_up: ColumnParallel<B>,
    /// `[hidden, local intermediate]`.
    down: RowParallel<B>,
}

/// The working state of one pass over the layers for a set of rows (a step, or one micro-batch of
/// [`RankModel::forward_micro`]): their positions, the backend's step and the scratch buffers. A pass is
/// a sequence of halves (attention, MLP) per layer; each half ends with a row-parallel all-reduce into
/// `proj`, which the next half adds to the residual stream first (`pending`).
struct LayerState<B: Compute> {
    n: usize,
    decode: usize,
    rows: StepRows,
    step: B::Step,
    normed: B::ActBuf,
    qkv: B::ActBuf,
    attn: B::ActBuf,
    proj: B::ActBuf,
    gu: B::ActBuf,
    act: B::ActBuf,
    pending: bool,
}

/// The weights one rank owns, as compute backend `B`'s types (host [`Weight`]s for the default [`Cpu`]).
pub struct RankModel<B: Compute = Cpu> {
    backend: B,
    cfg: LlamaConfig,
    place: RankPlace,
    heads: HeadShard,
    ffn_local: usize,
    layers_range: Range<usize>,
    layers: Vec<Layer<B>>,
    vocab_rows: Range<usize>,
    vocab_per: usize,
    embed: Option<VocabParallelEmbedding<B>>,
    final_norm: Option<B::Norm>,
    /// `None` with a tied head on a single-stage layout: the embedding shard is the head.
    lm_head: Option<B::Weight>,
    rope: Rope,
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

/// Columns `cols` of a `[rows, full_cols]` tensor (kept quantized when the columns are whole blocks). Only the
/// columns are read ([`WeightSource::tensor_cols`]): a row-parallel shard never holds the whole matrix.
fn load_cols(
    src: &dyn WeightSource,
    name: &str,
    rows: usize,
    full_cols: usize,
    cols: Range<usize>,
    f32_weights: bool,
) -> Result<Weight> {
    crate::model::check_cols(name, &cols, full_cols)?;
    if !f32_weights {
        if let Some(q) = src.tensor_cols_quantized(name, cols.clone())? {
            if q.rows != rows || q.cols != cols.len() || q.data.len() != q.rows * q.row_bytes {
                return Err(EngineError::Shape {
                    name: name.to_string(),
                    expected: vec![rows, cols.len()],
                    actual: vec![q.rows, q.cols],
                });
            }
            if let Some(m) = QMatrix::from_ggml(q.ty, q.rows, q.cols, &q.data) {
                return Ok(Weight::Quant(m));
            }
        }
    }
    let t = src.tensor_cols(name, cols.clone())?;
    expect_shape(name, &t, &[rows, cols.len()])?;
    Ok(Weight::F32(Matrix::new(rows, cols.len(), t.data)))
}

/// One part of a stacked (fused) matrix: rows `rows` of the `[full_rows, cols]` tensor `name`.
struct Part {
    name: String,
    rows: Range<usize>,
    full_rows: usize,
}

/// The parts' rows one after the other (fused QKV, gate-up): quantized when all parts are quantized of one
/// kind, f32 otherwise. On the f32 path each part is converted straight into the fused matrix and dropped,
/// so loading holds the fused matrix plus one part, never every part twice.
fn load_stacked(src: &dyn WeightSource, parts: &[Part], cols: usize, f32_weights: bool) -> Result<Weight> {
    let total_rows: usize = parts.iter().map(|p| p.rows.len()).sum();
    let mut quant: Vec<Weight> = Vec::new();
    let mut fused: Option<Vec<f32>> = None;
    for p in parts {
        let w = load_rows(src, &p.name, p.rows.clone(), p.full_rows, cols, f32_weights)?;
        match (fused.as_mut(), w) {
            (Some(data), w) => data.extend_from_slice(&w.into_f32().data),
            (None, Weight::F32(m)) if quant.is_empty() => {
                let mut data = Vec::with_capacity(total_rows * cols);
                data.extend_from_slice(&m.data);
                fused = Some(data);
            }
            // Quantized parts, or an f32 part after quantized ones: `stack` decides the kind.
            (None, w) => quant.push(w),
        }
    }
    Ok(match fused {
        Some(data) => Weight::F32(Matrix::new(total_rows, cols, data)),
        None => stack(quant),
    })
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
            Some(VocabParallelEmbedding {
                table: m,
                rows: vocab_rows.clone(),
            })
        } else {
            None
        };

        let q_rows = heads.q_heads.start * hd..heads.q_heads.end * hd;
        let kv_rows = heads.kv_heads.start * hd..heads.kv_heads.end * hd;
        let (q_all, kv_all) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let mut layers = Vec::with_capacity(layers_range.len());
        for i in layers_range.clone() {
            let p = format!("model.layers.{i}");
            let part = |suffix: &str, rows: &Range<usize>, full_rows: usize| Part {
                name: format!("{p}.{suffix}.weight"),
                rows: rows.clone(),
                full_rows,
            };
            let qkv = load_stacked(
                src,
                &[
                    part("self_attn.q_proj", &q_rows, q_all),
                    part("self_attn.k_proj", &kv_rows, kv_all),
                    part("self_attn.v_proj", &kv_rows, kv_all),
                ],
                h,
                f32_weights,
            )?;
            let gate_up = load_stacked(
                src,
                &[part("mlp.gate_proj", &ffn, inter), part("mlp.up_proj", &ffn, inter)],
                h,
                f32_weights,
            )?;
            layers.push(Layer {
                attn_norm: load_vector(src, &format!("{p}.input_layernorm.weight"), h)?,
                mlp_norm: load_vector(src, &format!("{p}.post_attention_layernorm.weight"), h)?,
                qkv: ColumnParallel { w: qkv },
                o: RowParallel {
                    w: load_cols(
                        src,
                        &format!("{p}.self_attn.o_proj.weight"),
                        h,
                        q_all,
                        q_rows.clone(),
                        f32_weights,
                    )?,
                },
                gate_up: ColumnParallel { w: gate_up },
                down: RowParallel {
                    w: load_cols(
                        src,
                        &format!("{p}.mlp.down_proj.weight"),
                        h,
                        inter,
                        ffn.clone(),
                        f32_weights,
                    )?,
                },
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
            backend: Cpu {
                threads: place.threads,
                decode_path: DecodePath::Exact,
            },
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
        })
    }

    /// Chooses how decode steps (one row per sequence) compute their matrix-vector products on
    /// block-quantized weights: [`DecodePath::Exact`] (the default after loading), [`DecodePath::Int8`] or
    /// [`DecodePath::Int16`]. Prefill always uses the exact blocked product. Returns the path in effect: a
    /// rank holding no block-quantized matrix (f32 weights: a Hugging Face checkpoint, the tiny model) has
    /// nothing for an integer path to compute on and stays [`DecodePath::Exact`], so that what is printed is
    /// what runs.
    pub fn set_decode_path(&mut self, path: DecodePath) -> DecodePath {
        self.backend.decode_path = if self.has_quantized_weights() {
            path
        } else {
            DecodePath::Exact
        };
        self.backend.decode_path
    }

    /// Whether any matrix of this rank is kept block-quantized.
    pub fn has_quantized_weights(&self) -> bool {
        let quant = |w: &Weight| matches!(w, Weight::Quant(_));
        self.layers
            .iter()
            .any(|l| quant(&l.qkv.w) || quant(&l.o.w) || quant(&l.gate_up.w) || quant(&l.down.w))
            || self.embed.as_ref().is_some_and(|e| quant(&e.table))
            || self.lm_head.as_ref().is_some_and(quant)
    }

    /// Bytes of weights this rank reads per decoded token (all its matrices and norms).
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.qkv.w.bytes() + l.o.w.bytes() + l.gate_up.w.bytes() + l.down.w.bytes() + 8 * l.attn_norm.len())
            .sum();
        let head = self.lm_head.as_ref().or(if self.final_norm.is_some() {
            self.embed.as_ref().map(|e| &e.table)
        } else {
            None
        });
        layers + head.map_or(0, |m| m.bytes())
    }

    /// An empty KV cache for up to `max_seq` positions.
    pub fn new_cache(&self, max_seq: usize) -> KvCache {
        self.try_new_cache(max_seq).expect("host allocation")
    }

    /// This shard on another compute backend: `weight` converts each matrix (by its canonical role, e.g.
    /// `layers.3.qkv`) and `norm` each norm vector. The layout, the rotary embedding and the vocabulary
    /// split are kept; nothing is re-sharded.
    pub fn to_backend<C: Compute>(
        self,
        backend: C,
        mut weight: impl FnMut(&C, &str, Weight) -> Result<C::Weight>,
        mut norm: impl FnMut(&C, Vec<f32>) -> Result<C::Norm>,
    ) -> Result<RankModel<C>> {
        let first = self.layers_range.start;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, l) in self.layers.into_iter().enumerate() {
            let p = format!("layers.{}", first + i);
            layers.push(Layer {
                attn_norm: norm(&backend, l.attn_norm)?,
                mlp_norm: norm(&backend, l.mlp_norm)?,
                qkv: ColumnParallel {
                    w: weight(&backend, &format!("{p}.qkv"), l.qkv.w)?,
                },
                o: RowParallel {
                    w: weight(&backend, &format!("{p}.o"), l.o.w)?,
                },
                gate_up: ColumnParallel {
                    w: weight(&backend, &format!("{p}.gate_up"), l.gate_up.w)?,
                },
                down: RowParallel {
                    w: weight(&backend, &format!("{p}.down"), l.down.w)?,
                },
            });
        }
        let embed = match self.embed {
            Some(e) => Some(VocabParallelEmbedding {
                table: weight(&backend, "embed", e.table)?,
                rows: e.rows,
            }),
            None => None,
        };
        let final_norm = match self.final_norm {
            Some(n) => Some(norm(&backend, n)?),
            None => None,
        };
        let lm_head = match self.lm_head {
            Some(w) => Some(weight(&backend, "lm_head", w)?),
            None => None,
        };
        Ok(RankModel {
            backend,
            cfg: self.cfg,
            place: self.place,
            heads: self.heads,
            ffn_local: self.ffn_local,
            layers_range: self.layers_range,
            layers,
            vocab_rows: self.vocab_rows,
            vocab_per: self.vocab_per,
            embed,
            final_norm,
            lm_head,
            rope: self.rope,
        })
    }
}

impl<B: Compute> RankModel<B> {
    /// The compute backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The rotary embedding.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// The decode path in use (see [`RankModel::set_decode_path`]; [`DecodePath::Exact`] off the CPU).
    pub fn decode_path(&self) -> DecodePath {
        self.backend.decode_path()
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

    /// An empty KV cache of this backend for up to `max_seq` positions.
    pub fn try_new_cache(&self, max_seq: usize) -> Result<B::Cache> {
        self.backend
            .new_cache(self.layers.len(), self.heads.kv_heads.len(), self.cfg.head_dim, max_seq)
    }

    /// Embeds `tokens` into `tokens.len() * hidden` activations (vocabulary-parallel: each rank writes its
    /// vocabulary rows, then one all-reduce over the TP group completes every row).
    pub fn embed(&self, tokens: &[u32], tp: &B::Tp) -> Result<B::ActBuf> {
        let embed = self
            .embed
            .as_ref()
            .ok_or_else(|| EngineError::Config("embed called on a later stage".into()))?;
        embed.forward(&self.backend, tokens, self.cfg.vocab_size, self.cfg.hidden_size, tp)
    }

    /// Runs this stage's layers on `n` rows of activations `x` at positions `pos0..pos0 + n`, appending their
    /// keys and values to `cache`.
    pub fn forward_layers(&self, x: &mut B::Act, n: usize, cache: &mut B::Cache, tp: &B::Tp) -> Result<()> {
        self.forward_batch(x, &mut [(n, cache)], tp)
    }

    /// Runs this stage's layers on several sequences at once (continuous batching): segment `s` is
    /// `segs[s].0` consecutive rows of `x` (after those of the earlier segments) that continue the sequence
    /// whose cache is `segs[s].1`, at its next positions. The matrix products run over all rows together, so
    /// the weights are read once per step; attention reads each sequence's own cache.
    ///
    /// The one-row segments at the front of `segs` (the decode tokens of a step) go through
    /// [`Weight::matvec_batch`] (on the CPU backend), whose result for each row is bit for bit what a step of
    /// that sequence alone computes: batching changes no token. The segments after them (prefill chunks)
    /// go through the blocked product of [`Weight::linear`], in the same step: a server step that decodes
    /// some sequences and prefills others is one call, and each sequence's rows compute as they would
    /// without the others. A lone one-row segment takes the solo decode product. Nothing is written to any
    /// cache when one of them would overflow.
    ///
    /// This is the model, written once for every [`Compute`] backend: the tensor-parallel layers
    /// ([`ColumnParallel`], [`RowParallel`]) run their own collectives.
    pub fn forward_batch(&self, x: &mut B::Act, segs: &mut [(usize, &mut B::Cache)], tp: &B::Tp) -> Result<()> {
        let n: usize = segs.iter().map(|s| s.0).sum();
        self.check_rows(x, n)?;
        for (len, cache) in segs.iter() {
            Self::check_room(cache, *len)?;
        }
        let lead = segs.iter().take_while(|s| s.0 == 1).count();
        let decode = if segs.len() == 1 { 0 } else { lead };
        let mut rows = StepRows {
            seg_of: Vec::with_capacity(n),
            pos_of: Vec::with_capacity(n),
        };
        for (si, (len, cache)) in segs.iter().enumerate() {
            let filled = B::cache_len(cache);
            for t in 0..*len {
                rows.seg_of.push(si);
                rows.pos_of.push(filled + t);
            }
        }
        let mut st = self.layer_state(rows, decode)?;
        for li in 0..self.layers.len() {
            self.attention_half(li, x, &mut st, segs, tp)?;
            self.mlp_half(li, x, &mut st, tp)?;
        }
        self.take_pending(x, &mut st)?; // the last half's residual add
        for (len, cache) in segs.iter_mut() {
            B::cache_advance(cache, *len);
        }
        Ok(())
    }

    /// Runs this stage's layers on consecutive chunks of one sequence (micro-batches of a prompt), chunk
    /// `k` being `xs[k]`, at the cache's next positions, in an interleaved order: at each layer, the
    /// attention half of every chunk, then the MLP half of every chunk. Each chunk computes exactly what
    /// [`RankModel::forward_layers`] on the chunks one after another computes (the same operations on the
    /// same values, bit for bit: a chunk's attention at a layer reads the keys the earlier chunks appended
    /// at that layer, as it would), but the row-parallel all-reduce that ends a half of chunk `k` is
    /// followed by chunk `k + 1`'s computation, not by the operation that needs its result. On a backend
    /// whose collectives run on their own stream (the CUDA engine with `--overlap-comm`), chunk `k`'s
    /// all-reduce then runs while chunk `k + 1` computes.
    pub fn forward_micro(&self, xs: &mut [&mut B::Act], cache: &mut B::Cache, tp: &B::Tp) -> Result<()> {
        let h = self.cfg.hidden_size;
        let lens: Vec<usize> = xs.iter().map(|x| B::act_len(x) / h.max(1)).collect();
        for (x, &n) in xs.iter().zip(&lens) {
            self.check_rows(x, n)?;
            if n == 0 {
                return Err(EngineError::Config("forward: an empty micro-batch".into()));
            }
        }
        let total: usize = lens.iter().sum();
        Self::check_room(cache, total)?;
        let mut next = B::cache_len(cache);
        let mut states = Vec::with_capacity(xs.len());
        for &n in &lens {
            let rows = StepRows {
                seg_of: vec![0; n],
                pos_of: (next..next + n).collect(),
            };
            next += n;
            states.push(self.layer_state(rows, 0)?);
        }
        for li in 0..self.layers.len() {
            for (x, st) in xs.iter_mut().zip(states.iter_mut()) {
                self.attention_half(li, x, st, &mut [(st.n, &mut *cache)], tp)?;
            }
            for (x, st) in xs.iter_mut().zip(states.iter_mut()) {
                self.mlp_half(li, x, st, tp)?;
            }
        }
        for (x, st) in xs.iter_mut().zip(states.iter_mut()) {
            self.take_pending(x, st)?;
        }
        B::cache_advance(cache, total);
        Ok(())
    }

    fn check_rows(&self, x: &B::Act, n: usize) -> Result<()> {
        let h = self.cfg.hidden_size;
        if B::act_len(x) != n * h {
            return Err(EngineError::Config(format!(
                "forward: {} activations for {n} rows of width {h}",
                B::act_len(x)
            )));
        }
        Ok(())
    }

    /// Refuses `len` more positions in `cache` when they do not fit (before anything is written).
    fn check_room(cache: &B::Cache, len: usize) -> Result<()> {
        let (filled, cap) = (B::cache_len(cache), B::cache_capacity(cache));
        if filled + len > cap {
            return Err(EngineError::Config(format!(
                "sequence of {} tokens exceeds the KV cache ({cap} positions)",
                filled + len,
            )));
        }
        Ok(())
    }

    fn attn_dims(&self) -> AttnDims {
        let cfg = &self.cfg;
        AttnDims {
            q_heads: self.heads.q_heads.len(),
            kv_heads: self.heads.kv_heads.len(),
            head_dim: cfg.head_dim,
            group: cfg.num_attention_heads / cfg.num_key_value_heads,
            q_start: self.heads.q_heads.start,
            kv_start: self.heads.kv_heads.start,
        }
    }

    /// The working buffers of a pass over the layers for the rows `rows`.
    fn layer_state(&self, rows: StepRows, decode: usize) -> Result<LayerState<B>> {
        let b = &self.backend;
        let n = rows.pos_of.len();
        let (h, f, d) = (self.cfg.hidden_size, self.ffn_local, self.attn_dims());
        Ok(LayerState {
            n,
            decode,
            step: b.begin_step(&self.rope, &rows)?,
            rows,
            normed: b.alloc(n * h)?,
            qkv: b.alloc(n * d.qkv_width())?,
            attn: b.alloc(n * d.q_heads * d.head_dim)?,
            proj: b.alloc(n * h)?,
            gu: b.alloc(n * 2 * f)?,
            act: b.alloc(n * f)?,
            pending: false,
        })
    }

    /// Adds the row-parallel output of the previous half to the residual stream, once its collective is done.
    fn take_pending(&self, x: &mut B::Act, st: &mut LayerState<B>) -> Result<()> {
        if std::mem::take(&mut st.pending) {
            self.backend.residual_add(x, compute::view::<B>(&st.proj))?;
        }
        Ok(())
    }

    /// Layer `li`'s attention up to its all-reduced output projection (left in `st.proj`).
    fn attention_half(
        &self,
        li: usize,
        x: &mut B::Act,
        st: &mut LayerState<B>,
        segs: &mut [(usize, &mut B::Cache)],
        tp: &B::Tp,
    ) -> Result<()> {
        self.take_pending(x, st)?;
        let (b, layer, d, n) = (&self.backend, &self.layers[li], self.attn_dims(), st.n);
        let (normed, qkv, attn, proj) = (
            compute::view_mut::<B>(&mut st.normed),
            compute::view_mut::<B>(&mut st.qkv),
            compute::view_mut::<B>(&mut st.attn),
            compute::view_mut::<B>(&mut st.proj),
        );
        b.rms_norm(x, &layer.attn_norm, self.cfg.rms_norm_eps as f32, normed)?;
        layer.qkv.forward(b, normed, n, qkv, st.decode)?;
        b.rope_kv_append(&self.rope, &st.step, &st.rows, &d, li, qkv, segs)?;
        b.attention(&mut st.step, &st.rows, &d, li, qkv, segs, attn)?;
        layer.o.forward(b, attn, n, proj, st.decode, tp)?;
        st.pending = true;
        Ok(())
    }

    /// Layer `li`'s MLP, after the attention half's residual add, up to its all-reduced down projection.
    fn mlp_half(&self, li: usize, x: &mut B::Act, st: &mut LayerState<B>, tp: &B::Tp) -> Result<()> {
        self.take_pending(x, st)?;
        let (b, layer, n, f) = (&self.backend, &self.layers[li], st.n, self.ffn_local);
        let (normed, gu, act, proj) = (
            compute::view_mut::<B>(&mut st.normed),
            compute::view_mut::<B>(&mut st.gu),
            compute::view_mut::<B>(&mut st.act),
            compute::view_mut::<B>(&mut st.proj),
        );
        b.rms_norm(x, &layer.mlp_norm, self.cfg.rms_norm_eps as f32, normed)?;
        layer.gate_up.forward(b, normed, n, gu, st.decode)?;
        b.silu_mul(gu, n, f, act)?;
        layer.down.forward(b, act, n, proj, st.decode, tp)?;
        st.pending = true;
        Ok(())
    }

    /// Logits of the last row of `x` (last stage only): final norm, this rank's vocabulary rows, then one
    /// all-gather over the TP group. Returns all `vocab_size` logits on every TP rank.
    pub fn logits(&self, x: &B::Act, tp: &B::Tp) -> Result<Vec<f32>> {
        let h = self.cfg.hidden_size;
        let len = B::act_len(x);
        if len < h {
            return Err(EngineError::Config("logits of an empty batch".into()));
        }
        let rows = [len / h - 1];
        Ok(self.logits_rows(x, &rows, tp)?.pop().expect("one row"))
    }

    /// Logits of rows `rows` of `x` (last stage only), one vector of `vocab_size` per row, with one pass
    /// over the LM head and one all-gather for all of them. Each row's logits are bit for bit those that
    /// [`RankModel::logits`] gives for that row alone.
    pub fn logits_rows(&self, x: &B::Act, rows: &[usize], tp: &B::Tp) -> Result<Vec<Vec<f32>>> {
        let shard = self.head_shard();
        let mut all = self.backend.alloc(shard.gathered_len(rows.len(), tp.size()))?;
        self.gathered_logits(x, rows, tp, compute::view_mut::<B>(&mut all))?;
        shard.unpad(&self.backend, compute::view::<B>(&all), rows.len(), tp.size())
    }

    /// How the LM head is split over the TP group.
    fn head_shard(&self) -> VocabParallelHead {
        VocabParallelHead {
            per: self.vocab_per,
            mine: self.vocab_rows.len(),
            vocab: self.cfg.vocab_size,
        }
    }

    /// The backend half of [`RankModel::logits_rows`]: every TP rank's padded logits of rows `rows`,
    /// gathered into `all`, nothing read back.
    fn gathered_logits(&self, x: &B::Act, rows: &[usize], tp: &B::Tp, all: &mut B::Act) -> Result<()> {
        let b = &self.backend;
        let h = self.cfg.hidden_size;
        let norm = self
            .final_norm
            .as_ref()
            .ok_or_else(|| EngineError::Config("logits called on an earlier stage".into()))?;
        let head = self
            .lm_head
            .as_ref()
            .or(self.embed.as_ref().map(|e| &e.table))
            .expect("the last stage holds a head");
        if let Some(&r) = rows.iter().find(|&&r| (r + 1) * h > B::act_len(x)) {
            return Err(EngineError::Config(format!("logits: row {r} is past the batch")));
        }
        let m = rows.len();
        let mut normed = b.alloc(m * h)?;
        let normed = compute::view_mut::<B>(&mut normed);
        b.rms_norm_rows(x, rows, norm, self.cfg.rms_norm_eps as f32, h, normed)?;
        self.head_shard().gather(b, head, normed, m, tp, all)
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
    /// Prompt micro-batches in prefill (0 = one per pipeline stage): pipeline stages work on different
    /// chunks at once; on one stage the chunks go through the layers interleaved
    /// ([`RankModel::forward_micro`]).
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

/// One rank: its shard on compute backend `B`, its communicators and its KV cache.
pub struct Rank<B: Compute = Cpu> {
    model: RankModel<B>,
    tp: Box<B::Tp>,
    pp: Box<dyn Comm>,
    /// Decode through a recorded graph ([`Rank::set_graph_decode`]).
    graph_decode: bool,
}

/// How the decode step with index `i` (0 = the token after the first) runs when graph-captured decode is on
/// ([`Rank::set_graph_decode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphStep {
    /// Step 0 runs as without graphs: it makes, outside any recording, what a recording must not allocate
    /// (the linear layers' bf16 scratch of the decode shapes, cuBLAS's choices for them, NCCL's connections).
    Eager,
    /// Step 1 is recorded, then launched once.
    Record,
    /// Every later step launches the recording on its token and position.
    Replay,
}

impl GraphStep {
    /// The way decode step `i` runs.
    pub fn of(i: usize) -> GraphStep {
        match i {
            0 => GraphStep::Eager,
            1 => GraphStep::Record,
            _ => GraphStep::Replay,
        }
    }
}

impl Rank {
    /// [`RankModel::set_decode_path`] on this rank's shard (every rank of a layout must choose the same).
    pub fn set_decode_path(&mut self, path: DecodePath) -> DecodePath {
        self.model.set_decode_path(path)
    }
}

impl<B: Compute> Rank<B> {
    /// A rank from its shard, its TP-group communicator (on the backend's buffers) and its pipeline-group
    /// communicator (whose rank is the stage).
    pub fn new(model: RankModel<B>, tp: Box<B::Tp>, pp: Box<dyn Comm>) -> Result<Self> {
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
        Ok(Rank {
            model,
            tp,
            pp,
            graph_decode: false,
        })
    }

    /// Turns graph-captured decode on or off (off by default; `--cuda-graph`). With it on, the decode steps of
    /// [`Rank::generate`] after the second one launch a recording of one decode step (a CUDA graph: every
    /// kernel, GEMM and TP collective of the step) instead of enqueueing each operation: the same work, the
    /// same results, much less host time per token. Every rank of the layout must choose the same.
    ///
    /// Refused ([`EngineError::Config`]) on a backend that records no graphs (the CPU) and on a pipeline
    /// layout: stages hand their activations on through the host, which a recording cannot hold.
    pub fn set_graph_decode(&mut self, on: bool) -> Result<()> {
        if on && !self.model.backend.records_graphs() {
            return Err(EngineError::Config(
                "graph-captured decode (--cuda-graph) needs the CUDA backend (--device cuda)".into(),
            ));
        }
        if on && self.model.place.pp != 1 {
            return Err(EngineError::Config(format!(
                "graph-captured decode (--cuda-graph) needs one pipeline stage, not {}: stages hand their \
                 activations on through the host, which a CUDA graph cannot record",
                self.model.place.pp
            )));
        }
        self.graph_decode = on;
        Ok(())
    }

    /// Whether graph-captured decode is on.
    pub fn graph_decode(&self) -> bool {
        self.graph_decode
    }

    /// Waits until every rank of this rank's TP group and pipeline has called it.
    pub fn barrier(&self) -> Result<()> {
        self.tp.barrier()?;
        self.pp.barrier()?;
        Ok(())
    }

    /// The shard.
    pub fn model(&self) -> &RankModel<B> {
        &self.model
    }

    /// The TP-group communicator (its rank is `tp_rank`).
    pub fn tp_comm(&self) -> &B::Tp {
        &self.tp
    }

    /// The pipeline communicator (its rank is the stage).
    pub fn pp_comm(&self) -> &dyn Comm {
        &*self.pp
    }

    /// Runs the stage on one chunk: embed or receive, layers, then send or (last stage) nothing.
    fn run_chunk(&self, tokens: &[u32], cache: &mut B::Cache) -> Result<B::ActBuf> {
        let n = tokens.len();
        let h = self.model.cfg.hidden_size;
        let stage = self.model.place.stage;
        let b = &self.model.backend;
        let mut x = if self.model.is_first() {
            self.model.embed(tokens, &self.tp)?
        } else {
            b.recv(&*self.pp, n * h, stage - 1)?
        };
        self.model
            .forward_layers(compute::view_mut::<B>(&mut x), n, cache, &self.tp)?;
        if !self.model.is_last() {
            b.send(&*self.pp, compute::view::<B>(&x), stage + 1)?;
        }
        Ok(x)
    }

    /// One step of continuous batching, called with the same segments on every rank of the layout: segment
    /// `(tokens, cache)` feeds `tokens` to the sequence of `cache` (a prefill chunk, or the one token a
    /// decode step adds). Stage 0 embeds them, every stage runs its layers over all rows in one pass (see
    /// [`RankModel::forward_batch`]) and passes them on. Returns, on the last stage's ranks, the logits at the
    /// last row of each segment (`None` on the other stages).
    pub fn step(&self, segs: &mut [(&[u32], &mut B::Cache)]) -> Result<Option<Vec<Vec<f32>>>> {
        let h = self.model.cfg.hidden_size;
        let stage = self.model.place.stage;
        let n: usize = segs.iter().map(|s| s.0.len()).sum();
        if segs.iter().any(|s| s.0.is_empty()) {
            return Err(EngineError::Config("step: a segment has no tokens".into()));
        }
        let b = &self.model.backend;
        let mut x = if self.model.is_first() {
            let tokens: Vec<u32> = segs.iter().flat_map(|s| s.0.iter().copied()).collect();
            self.model.embed(&tokens, &self.tp)?
        } else {
            b.recv(&*self.pp, n * h, stage - 1)?
        };
        let mut rows: Vec<(usize, &mut B::Cache)> = segs.iter_mut().map(|(t, c)| (t.len(), &mut **c)).collect();
        self.model
            .forward_batch(compute::view_mut::<B>(&mut x), &mut rows, &self.tp)?;
        if !self.model.is_last() {
            b.send(&*self.pp, compute::view::<B>(&x), stage + 1)?;
            return Ok(None);
        }
        let mut last = Vec::with_capacity(segs.len());
        let mut end = 0;
        for s in segs.iter() {
            end += s.0.len();
            last.push(end - 1);
        }
        Ok(Some(self.model.logits_rows(compute::view::<B>(&x), &last, &self.tp)?))
    }

    /// One decode step of a single-stage layout on device buffers: embed `t`, run the layers, gather the
    /// padded logits into `all`. Nothing is read back, so it can be recorded.
    fn decode_into(&self, t: u32, cache: &mut B::Cache, all: &mut B::Act) -> Result<()> {
        let mut x = self.model.embed(&[t], &self.tp)?;
        self.model
            .forward_layers(compute::view_mut::<B>(&mut x), 1, cache, &self.tp)?;
        self.model.gathered_logits(compute::view::<B>(&x), &[0], &self.tp, all)
    }

    /// Decode step `step` of a graph-captured decode ([`GraphStep`]) of token `t`: the logits of its row.
    /// `recorded` holds the recording and its output buffer from the `Record` step on.
    fn decode_graphed(
        &self,
        t: u32,
        cache: &mut B::Cache,
        recorded: &mut Option<(B::Graph, B::ActBuf)>,
        step: GraphStep,
    ) -> Result<Vec<f32>> {
        let b = &self.model.backend;
        let shard = self.model.head_shard();
        let tpn = self.tp.size();
        match step {
            GraphStep::Eager => {
                let x = self.run_chunk(&[t], cache)?;
                return self.model.logits(compute::view::<B>(&x), &self.tp);
            }
            GraphStep::Record => {
                let inputs = GraphInputs {
                    tokens: vec![t],
                    positions: vec![B::cache_len(cache)],
                };
                let mut all = b.alloc(shard.gathered_len(1, tpn))?;
                // Recording runs nothing but advances the cache's length, as the step will once launched.
                let mut graph = b.graph_record(&inputs, cache, &mut all, |cache, all| {
                    self.decode_into(t, cache, compute::view_mut::<B>(all))
                })?;
                // SAFETY: the recording reads this rank's weights, norms and tables, which `self` holds for
                // longer than `recorded` (a local of `generate`) lives.
                unsafe { b.graph_replay(&mut graph, &inputs, cache, &mut all)? };
                *recorded = Some((graph, all));
            }
            GraphStep::Replay => {
                let (graph, all) = recorded
                    .as_mut()
                    .ok_or_else(|| EngineError::Config("a graph replay before the step was recorded".into()))?;
                // What the recorded embedding and layers would have refused, checked before the launch.
                RankModel::<B>::check_room(cache, 1)?;
                compute::check_tokens(&[t], self.model.cfg.vocab_size)?;
                let inputs = GraphInputs {
                    tokens: vec![t],
                    positions: vec![B::cache_len(cache)],
                };
                // SAFETY: as for the first launch above: `self` outlives the recording.
                unsafe { b.graph_replay(graph, &inputs, cache, all)? };
                B::cache_advance(cache, 1);
            }
        }
        let (_, all) = recorded.as_ref().expect("recorded above or before");
        Ok(shard.unpad(b, compute::view::<B>(all), 1, tpn)?.pop().expect("one row"))
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
        let mut cache = self.model.try_new_cache(max_seq)?;
        let mut sampler = Sampler::new(params.sampling.clone());
        let start = Instant::now();

        // Prefill, in micro-batches so pipeline stages overlap (or, on one stage, so that collectives can
        // overlap computation).
        let pp = self.model.place.pp;
        let chunks = if params.micro_batches == 0 {
            pp
        } else {
            params.micro_batches
        }
        .clamp(1, prompt.len());
        let mut last_x = None;
        if pp == 1 && chunks > 1 {
            // One stage: the chunks go through the layers interleaved, so that each chunk's all-reduces are
            // followed by the next chunk's work ([`RankModel::forward_micro`]).
            let mut xs = (0..chunks)
                .map(|c| {
                    self.model
                        .embed(&prompt[shard::even_range(prompt.len(), chunks, c)], &self.tp)
                })
                .collect::<Result<Vec<_>>>()?;
            let mut views: Vec<&mut B::Act> = xs.iter_mut().map(|x| compute::view_mut::<B>(x)).collect();
            self.model.forward_micro(&mut views, &mut cache, &self.tp)?;
            last_x = xs.pop();
        } else {
            for c in 0..chunks {
                let r = shard::even_range(prompt.len(), chunks, c);
                last_x = Some(self.run_chunk(&prompt[r], &mut cache)?);
            }
        }
        let last_x = last_x.expect("at least one prefill chunk");
        let mut token = None;
        if self.model.is_last() {
            let logits = self.model.logits(compute::view::<B>(&last_x), &self.tp)?;
            token = Some(sampler.sample(&logits));
            out.prompt_logits = Some(logits);
        }
        let mut t = self.share_token(token)?;
        out.prefill_secs = start.elapsed().as_secs_f64();
        out.generated.push(t);
        on_token(t);

        let decode_start = Instant::now();
        let mut recorded = None;
        while out.generated.len() < params.max_new_tokens && (params.ignore_eos || !cfg.eos_token_ids.contains(&t)) {
            let mut token = None;
            if self.graph_decode {
                let step = GraphStep::of(out.generated.len() - 1);
                let logits = self.decode_graphed(t, &mut cache, &mut recorded, step)?;
                token = Some(sampler.sample(&logits));
            } else {
                let x = self.run_chunk(&[t], &mut cache)?;
                if self.model.is_last() {
                    let logits = self.model.logits(compute::view::<B>(&x), &self.tp)?;
                    token = Some(sampler.sample(&logits));
                }
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
