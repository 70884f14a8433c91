//! Model formats and data: configuration, weights (GGUF and Hugging Face safetensors), tokenizer, and an
//! independent f64 reference forward pass.
//!
//! Everything the engine needs from a checkpoint goes through [`WeightSource`]: tensors are handed out
//! dequantized to f32, row-major, under their canonical Hugging Face Llama names, with Q and K in the
//! rotate-half (NeoX) RoPE convention whatever the file format.
//!
//! Canonical names and shapes (outermost first): `model.embed_tokens.weight` `[vocab, hidden]`; per layer `i`,
//! `model.layers.{i}.input_layernorm.weight` `[hidden]`, `.self_attn.{q,k,v,o}_proj.weight` (`[out, in]`),
//! `.post_attention_layernorm.weight` `[hidden]`, `.mlp.{gate,up,down}_proj.weight`; `model.norm.weight`
//! `[hidden]`; `lm_head.weight` `[vocab, hidden]` (the embedding when the model ties them).
//!
//! GGUF tensors are dequantized when asked for through [`WeightSource::tensor`]; matrices stored as `Q4_0`, `Q4_1`
//! or `Q8_0` can also be handed out as their raw blocks ([`WeightSource::tensor_rows_quantized`]), which the
//! engine keeps and computes on directly (~100 MB instead of ~540 MB f32 for a 135M-parameter Q4_1 model).

use std::ops::Range;
use std::path::Path;

mod config;
pub mod dequant;
mod error;
pub mod gguf;
pub mod hf;
pub mod reference;
mod tiny;
mod tokenizer;

pub use config::{rope_inv_freq, LlamaConfig, RopeScaling};
pub use error::ModelError;
pub use tiny::{random_source, tiny_random, MemorySource};

/// A dequantized tensor: row-major f32 data with its shape (outermost dimension first).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Dimensions, outermost first (`[rows, cols]` for a matrix).
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major.
    pub data: Vec<f32>,
}

/// Rows of a block-quantized matrix, as stored in the file: `rows` rows of `cols` values, each row
/// `row_bytes` bytes of consecutive `ty` blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantRows {
    /// Element type (`Q4_0`, `Q4_1` or `Q8_0`).
    pub ty: dequant::GgmlType,
    /// Number of rows.
    pub rows: usize,
    /// Values per row (a whole number of blocks).
    pub cols: usize,
    /// Bytes per row.
    pub row_bytes: usize,
    /// `rows * row_bytes` bytes, row-major.
    pub data: Vec<u8>,
}

impl QuantRows {
    /// Columns `cols` of every row, or `None` when `cols` does not start and end on block boundaries (or lies
    /// outside the row).
    pub fn columns(&self, cols: Range<usize>) -> Option<QuantRows> {
        if cols.start > cols.end || cols.end > self.cols {
            return None;
        }
        let Range { start: b0, end: b1 } = block_bytes_of(self.ty, &cols)?;
        let mut data = Vec::with_capacity(self.rows * (b1 - b0));
        for row in self.data.chunks_exact(self.row_bytes).take(self.rows) {
            data.extend_from_slice(row.get(b0..b1)?);
        }
        Some(QuantRows {
            ty: self.ty,
            rows: self.rows,
            cols: cols.len(),
            row_bytes: b1 - b0,
            data,
        })
    }
}

/// The bytes within a row of `ty` values that hold columns `cols`, or `None` when `cols` does not start and end
/// on `ty`'s block boundaries (or its layout is unknown).
pub(crate) fn block_bytes_of(ty: dequant::GgmlType, cols: &Range<usize>) -> Option<Range<usize>> {
    let (block_len, block_bytes) = ty.block()?;
    if cols.start % block_len != 0 || cols.end % block_len != 0 {
        return None;
    }
    Some(cols.start / block_len * block_bytes..cols.end / block_len * block_bytes)
}

/// Columns `cols` of every row of the matrix `t` (the whole tensor `name`).
pub(crate) fn columns_of(name: &str, t: &Tensor, cols: Range<usize>) -> Result<Tensor, ModelError> {
    let [rows, full] = t.shape[..] else {
        return Err(ModelError::InvalidInput(format!(
            "tensor `{name}`: columns of a {}-D tensor",
            t.shape.len()
        )));
    };
    check_cols(name, &cols, full)?;
    let mut data = Vec::with_capacity(rows * cols.len());
    for r in 0..rows {
        data.extend_from_slice(&t.data[r * full + cols.start..r * full + cols.end]);
    }
    Ok(Tensor {
        shape: vec![rows, cols.len()],
        data,
    })
}

/// Checks a column range against a row of `full` values.
pub(crate) fn check_cols(name: &str, cols: &Range<usize>, full: usize) -> Result<(), ModelError> {
    if cols.start > cols.end || cols.end > full {
        return Err(ModelError::InvalidInput(format!(
            "tensor `{name}`: columns {cols:?} out of 0..{full}"
        )));
    }
    Ok(())
}

/// A checkpoint: configuration, tensors by canonical Hugging Face name, tokenizer and chat template.
pub trait WeightSource: Send + Sync {
    /// The architecture hyper-parameters (already validated).
    fn config(&self) -> &LlamaConfig;
    /// The whole tensor `name` (canonical Hugging Face name), dequantized to f32. Asking for `lm_head.weight`
    /// of a model with tied embeddings returns the embedding.
    fn tensor(&self, name: &str) -> Result<Tensor, ModelError>;
    /// Only rows `rows` (outermost index) of tensor `name`, e.g. one tensor-parallel shard.
    fn tensor_rows(&self, name: &str, rows: Range<usize>) -> Result<Tensor, ModelError>;
    /// Rows `rows` of matrix `name` as the raw quantized blocks they are stored in (same canonical row order as
    /// [`WeightSource::tensor_rows`]), or `None` when the source does not keep this matrix block-quantized (f32
    /// sources, or element types other than `Q4_0`, `Q4_1` and `Q8_0`). The default is `None`.
    fn tensor_rows_quantized(&self, name: &str, rows: Range<usize>) -> Result<Option<QuantRows>, ModelError> {
        let _ = (name, rows);
        Ok(None)
    }
    /// Columns `cols` (innermost index) of every row of matrix `name`: one row-parallel shard (`o_proj`,
    /// `down_proj`). The default reads the whole tensor through [`WeightSource::tensor`] and keeps the columns;
    /// the file sources read only those columns' bytes, so a rank never holds the whole matrix.
    fn tensor_cols(&self, name: &str, cols: Range<usize>) -> Result<Tensor, ModelError> {
        columns_of(name, &self.tensor(name)?, cols)
    }
    /// Columns `cols` of every row of matrix `name` as raw quantized blocks, or `None` when the source does not
    /// keep the matrix block-quantized or `cols` does not start and end on block boundaries. The default takes
    /// all rows from [`WeightSource::tensor_rows_quantized`] and keeps the columns' blocks.
    fn tensor_cols_quantized(&self, name: &str, cols: Range<usize>) -> Result<Option<QuantRows>, ModelError> {
        let rows = match expected_shape(self.config(), name).as_deref() {
            Some(&[rows, _]) => rows,
            _ => return Ok(None),
        };
        match self.tensor_rows_quantized(name, 0..rows)? {
            Some(q) => {
                check_cols(name, &cols, q.cols)?;
                Ok(q.columns(cols))
            }
            None => Ok(None),
        }
    }
    /// The model's tokenizer (`tokenizer.json`, or built from a GGUF vocabulary), `None` if it carries none.
    fn tokenizer(&self) -> Result<Option<tokenizers::Tokenizer>, ModelError>;
    /// The chat template (Jinja source), if any.
    fn chat_template(&self) -> Option<String>;
    /// A one-line human description, e.g. `GGUF SmolLM2-135M-Instruct (Q4_1, 30 layers)`.
    fn describe(&self) -> String;
}

impl std::fmt::Debug for dyn WeightSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The shape the configuration implies for canonical tensor `name`, or `None` if `name` is not a tensor of the
/// model (including layer indices past the last layer).
pub fn expected_shape(cfg: &LlamaConfig, name: &str) -> Option<Vec<usize>> {
    let (h, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    match name {
        "model.embed_tokens.weight" | "lm_head.weight" => return Some(vec![v, h]),
        "model.norm.weight" => return Some(vec![h]),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if layer >= cfg.num_hidden_layers {
        return None;
    }
    Some(match suffix {
        "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![h],
        "self_attn.q_proj.weight" => vec![cfg.q_dim(), h],
        "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![cfg.kv_dim(), h],
        "self_attn.o_proj.weight" => vec![h, cfg.q_dim()],
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![f, h],
        "mlp.down_proj.weight" => vec![h, f],
        _ => return None,
    })
}

/// Bytes of a mapped file read between two releases of its pages (safetensors and GGUF): small enough that the
/// mapped pages of the tensor being read add little to the shard (a Llama-3 `lm_head` is 1 GB of bf16), large
/// enough that the `madvise` calls cost nothing next to the conversion.
pub(crate) const RELEASE_CHUNK: usize = 16 << 20;

/// Releases the mapped pages of one tensor while a loop copies or converts it: the loop reports each byte
/// range of the tensor it is done with, and once the ranges reported since the last release span
/// [`RELEASE_CHUNK`] bytes, their span is released. Rows read in a permuted order (the
/// Q/K heads' row interleave) may make the span cover a few rows not read yet; those are faulted in again
/// from the page cache when read, with the same bytes. Does nothing for an in-memory image (no map). Used by
/// the GGUF and safetensors sources.
pub(crate) struct Releaser<'a> {
    map: Option<&'a memmap2::Mmap>,
    /// Where the tensor's bytes start in the map.
    base: usize,
    lo: usize,
    hi: usize,
}

impl<'a> Releaser<'a> {
    /// A releaser for the tensor whose bytes start at `base` in `map`.
    pub(crate) fn new(map: Option<&'a memmap2::Mmap>, base: usize) -> Self {
        Releaser {
            map,
            base,
            lo: usize::MAX,
            hi: 0,
        }
    }

    /// Bytes `r` of the tensor are copied out.
    pub(crate) fn touched(&mut self, r: Range<usize>) {
        self.lo = self.lo.min(r.start);
        self.hi = self.hi.max(r.end);
        if self.hi - self.lo >= RELEASE_CHUNK {
            self.release();
        }
    }

    /// Releases what was reported since the last release (the end of a tensor).
    pub(crate) fn finish(mut self) {
        if self.hi > self.lo {
            self.release();
        }
    }

    fn release(&mut self) {
        if let Some(map) = self.map {
            if let Some(start) = self.base.checked_add(self.lo) {
                if start.checked_add(self.hi - self.lo).is_some_and(|end| end <= map.len()) {
                    release_map_range(map, start, self.hi - self.lo);
                }
            }
        }
        (self.lo, self.hi) = (usize::MAX, 0);
    }
}

/// `madvise(MADV_DONTNEED)` on `len` bytes of `map` from `offset` (in bounds): the process drops its page table
/// entries for them. Failure only means the pages stay resident, so it is ignored.
pub(crate) fn release_map_range(map: &memmap2::Mmap, offset: usize, len: usize) {
    #[cfg(unix)]
    {
        // SAFETY: `map` is a read-only private file mapping (`Mmap::map`) that nothing ever writes, so it holds
        // no private copy-on-write pages that MADV_DONTNEED could discard: the next access to a released page
        // faults it in again from the file, with the same bytes (under the requirement, stated where the file is
        // mapped, that nobody rewrites an open checkpoint). No reference into the range is invalidated: the
        // memory stays mapped and readable at the same address throughout.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
    }
    #[cfg(not(unix))]
    let _ = (map, offset, len);
}

/// The canonical names of every tensor a checkpoint of `cfg` stores, in file order: the embedding, each layer's
/// norms and matrices, the final norm, and `lm_head.weight` unless the embeddings are tied.
pub fn tensor_names(cfg: &LlamaConfig) -> Vec<String> {
    let mut names = vec!["model.embed_tokens.weight".to_string()];
    for l in 0..cfg.num_hidden_layers {
        for s in tiny::LAYER_TENSORS {
            names.push(format!("model.layers.{l}.{s}"));
        }
    }
    names.push("model.norm.weight".into());
    if !cfg.tie_word_embeddings {
        names.push("lm_head.weight".into());
    }
    names
}

/// Opens a model: a `.gguf` file, or a Hugging Face directory (`config.json` + `*.safetensors`, or
/// `model.safetensors.index.json`); a path to a file inside such a directory opens the directory.
pub fn open(path: &Path) -> Result<Box<dyn WeightSource>, ModelError> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if meta.is_dir() {
        return Ok(Box::new(hf::HfSource::open(path)?));
    }
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        let n = f.read(&mut magic).map_err(|e| ModelError::io(path, e))?;
        if n == 4 && &magic == b"GGUF" {
            return Ok(Box::new(gguf::GgufSource::open(path)?));
        }
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name == "config.json" || name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json") {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        return Ok(Box::new(hf::HfSource::open(dir)?));
    }
    Err(ModelError::malformed(
        path,
        "neither a GGUF file nor a Hugging Face checkpoint directory",
    ))
}
