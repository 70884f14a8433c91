//! Model formats and data: configuration, weights (GGUF and Hugging Face safetensors), tokenizer, and an
//! independent f64 reference forward pass.
//!
//! Everything the engine needs from a checkpoint goes through [`WeightSource`]: tensors are handed out
//! dequantized to f32, row-major, under their canonical Hugging Face Llama names, with Q and K in the
//! rotate-half (NeoX) RoPE convention whatever the file format.

use std::ops::Range;
use std::path::Path;

/// How RoPE frequencies are rescaled for long contexts (from `rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RopeScaling {
    /// Position interpolation: every inverse frequency divided by `factor`.
    Linear {
        /// Divisor applied to every inverse frequency.
        factor: f64,
    },
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        /// Divisor applied to the low frequencies.
        factor: f64,
        /// Wavelength band boundary (low).
        low_freq_factor: f64,
        /// Wavelength band boundary (high).
        high_freq_factor: f64,
        /// Context length the model was trained with.
        original_max_position_embeddings: usize,
    },
}

/// Llama-family architecture hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Number of tokens in the vocabulary (rows of the embedding).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Optional RoPE frequency scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// Maximum context length.
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token, if any.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// A small built-in configuration for tests and the no-`--model` demo.
    pub fn tiny() -> Self {
        LlamaConfig {
            vocab_size: 256,
            hidden_size: 64,
            intermediate_size: 160,
            num_hidden_layers: 4,
            num_attention_heads: 8,
            num_key_value_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 512,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }
    }

    /// Checks that the configuration is internally consistent.
    pub fn validate(&self) -> Result<(), ModelError> {
        Ok(())
    }
}

/// Inverse RoPE frequencies, one per pair of a head (`head_dim / 2` values), scaling applied.
pub fn rope_inv_freq(cfg: &LlamaConfig) -> Vec<f64> {
    let half = cfg.head_dim / 2;
    (0..half)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64))
        .collect()
}

/// A dequantized tensor: row-major f32 data with its shape (outermost dimension first).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Dimensions, outermost first (`[rows, cols]` for a matrix).
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major.
    pub data: Vec<f32>,
}

/// Errors from reading a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Not implemented yet.
    #[error("{0}")]
    Unsupported(String),
}

/// A checkpoint: configuration, tensors by canonical Hugging Face name, tokenizer and chat template.
pub trait WeightSource: Send + Sync {
    /// The architecture hyper-parameters.
    fn config(&self) -> &LlamaConfig;
    /// The whole tensor `name`, dequantized to f32.
    fn tensor(&self, name: &str) -> Result<Tensor, ModelError>;
    /// Only the given rows (outermost index) of tensor `name`.
    fn tensor_rows(&self, name: &str, rows: Range<usize>) -> Result<Tensor, ModelError>;
    /// The model's tokenizer, if it carries one.
    fn tokenizer(&self) -> Result<Option<tokenizers::Tokenizer>, ModelError>;
    /// The chat template (Jinja source), if any.
    fn chat_template(&self) -> Option<String>;
    /// A one-line human description.
    fn describe(&self) -> String;
}

/// Opens a `.gguf` file or a Hugging Face directory (`config.json` + safetensors).
pub fn open(path: &Path) -> Result<Box<dyn WeightSource>, ModelError> {
    Err(ModelError::Unsupported(format!(
        "{}: loading not implemented yet",
        path.display()
    )))
}

/// Built-in deterministic weights for [`LlamaConfig::tiny`]; no tokenizer.
pub fn tiny_random(seed: u64) -> Box<dyn WeightSource> {
    let cfg = LlamaConfig::tiny();
    let mut rng = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        // splitmix64
        rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    };
    let mut tensors = std::collections::HashMap::new();
    let mut mat = |name: String, rows: usize, cols: usize, scale: f64, next: &mut dyn FnMut() -> f64| {
        let data = (0..rows * cols).map(|_| (next() * scale) as f32).collect();
        tensors.insert(
            name,
            Tensor {
                shape: vec![rows, cols],
                data,
            },
        );
    };
    let (h, q, kv, f) = (
        cfg.hidden_size,
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
        cfg.intermediate_size,
    );
    mat("model.embed_tokens.weight".into(), cfg.vocab_size, h, 1.0, &mut next);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        mat(format!("{p}.input_layernorm.weight"), 1, h, 0.2, &mut next);
        mat(format!("{p}.post_attention_layernorm.weight"), 1, h, 0.2, &mut next);
        mat(format!("{p}.self_attn.q_proj.weight"), q, h, 0.3, &mut next);
        mat(format!("{p}.self_attn.k_proj.weight"), kv, h, 0.3, &mut next);
        mat(format!("{p}.self_attn.v_proj.weight"), kv, h, 0.3, &mut next);
        mat(format!("{p}.self_attn.o_proj.weight"), h, q, 0.3, &mut next);
        mat(format!("{p}.mlp.gate_proj.weight"), f, h, 0.3, &mut next);
        mat(format!("{p}.mlp.up_proj.weight"), f, h, 0.3, &mut next);
        mat(format!("{p}.mlp.down_proj.weight"), h, f, 0.3, &mut next);
    }
    mat("model.norm.weight".into(), 1, h, 0.2, &mut next);
    for (name, t) in tensors.iter_mut() {
        if name.ends_with("norm.weight") {
            t.shape = vec![h];
            t.data.iter_mut().for_each(|x| *x += 1.0);
        }
    }
    Box::new(MemorySource {
        config: cfg,
        tensors,
        description: format!("built-in tiny random model (seed {seed})"),
    })
}

/// An in-memory checkpoint (used for [`tiny_random`] and in tests).
#[derive(Debug, Clone)]
pub struct MemorySource {
    /// The configuration returned by [`WeightSource::config`].
    pub config: LlamaConfig,
    /// Tensors by canonical name.
    pub tensors: std::collections::HashMap<String, Tensor>,
    /// Returned by [`WeightSource::describe`].
    pub description: String,
}

impl WeightSource for MemorySource {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }
    fn tensor(&self, name: &str) -> Result<Tensor, ModelError> {
        let lookup = if name == "lm_head.weight" && self.config.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            name
        };
        self.tensors
            .get(lookup)
            .cloned()
            .ok_or_else(|| ModelError::Unsupported(format!("no tensor {name}")))
    }
    fn tensor_rows(&self, name: &str, rows: Range<usize>) -> Result<Tensor, ModelError> {
        let t = self.tensor(name)?;
        let n = t.shape.first().copied().unwrap_or(1);
        if rows.start > rows.end || rows.end > n {
            return Err(ModelError::Unsupported(format!("{name}: rows {rows:?} out of 0..{n}")));
        }
        let row_len: usize = t.shape.iter().skip(1).product();
        let mut shape = t.shape.clone();
        shape[0] = rows.len();
        Ok(Tensor {
            shape,
            data: t.data[rows.start * row_len..rows.end * row_len].to_vec(),
        })
    }
    fn tokenizer(&self) -> Result<Option<tokenizers::Tokenizer>, ModelError> {
        Ok(None)
    }
    fn chat_template(&self) -> Option<String> {
        None
    }
    fn describe(&self) -> String {
        self.description.clone()
    }
}

/// An independent f64 forward pass used to check the engine.
pub mod reference {
    use super::{ModelError, WeightSource};

    /// Logits at every position of `tokens` (no KV cache, plain f64).
    pub fn forward_f64(src: &dyn WeightSource, tokens: &[u32]) -> Result<Vec<Vec<f64>>, ModelError> {
        let _ = (src, tokens);
        Err(ModelError::Unsupported("reference forward not implemented yet".into()))
    }
}
