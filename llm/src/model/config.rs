//! Llama architecture hyper-parameters, parsed from `config.json` (transformers 4.x and 5.x) or GGUF metadata,
//! and the one function that computes RoPE frequencies.

use serde_json::Value;

use super::ModelError;

/// Largest accepted width (hidden size, MLP size); guards against absurd values in a lying header.
const MAX_WIDTH: usize = 1 << 20;
/// Largest accepted vocabulary.
const MAX_VOCAB: usize = 1 << 24;
/// Largest accepted number of layers or heads.
const MAX_COUNT: usize = 1 << 12;

/// How RoPE frequencies are rescaled for long contexts (`rope_scaling` / `rope_parameters` in `config.json`,
/// `rope.scaling.*` keys or the `rope_freqs.weight` tensor in GGUF).
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
        /// Wavelengths longer than `original_max_position_embeddings / low_freq_factor` are fully scaled.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: usize,
    },
    /// One divisor per frequency (`head_dim / 2` values), as llama.cpp stores Llama 3 scaling in the
    /// `rope_freqs.weight` tensor of a GGUF file.
    FreqFactors {
        /// Divisor of each inverse frequency.
        factors: Vec<f64>,
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
    /// Number of key/value heads (grouped-query attention); divides `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Width of one attention head (even).
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
    /// A small built-in configuration for tests and the no-`--model` demo: vocabulary 256, width 64,
    /// 4 layers, 8 query heads of width 8 sharing 2 KV heads, MLP width 160, tied embeddings.
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

    /// Width of the concatenated query heads (`num_attention_heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads (`num_key_value_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Checks that the configuration is internally consistent and of sane size; the error names the field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let pos = |field: &str, v: usize, max: usize| {
            if v == 0 || v > max {
                Err(ModelError::config(field, format!("{v} is not in 1..={max}")))
            } else {
                Ok(())
            }
        };
        pos("vocab_size", self.vocab_size, MAX_VOCAB)?;
        pos("hidden_size", self.hidden_size, MAX_WIDTH)?;
        pos("intermediate_size", self.intermediate_size, MAX_WIDTH)?;
        pos("num_hidden_layers", self.num_hidden_layers, MAX_COUNT)?;
        pos("num_attention_heads", self.num_attention_heads, MAX_COUNT)?;
        pos("num_key_value_heads", self.num_key_value_heads, MAX_COUNT)?;
        pos("head_dim", self.head_dim, MAX_COUNT)?;
        pos("max_position_embeddings", self.max_position_embeddings, usize::MAX)?;
        if self.head_dim % 2 != 0 {
            return Err(ModelError::config(
                "head_dim",
                format!("{} is odd; RoPE needs pairs", self.head_dim),
            ));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(ModelError::config(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads = {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if self.q_dim() > MAX_WIDTH {
            return Err(ModelError::config(
                "head_dim",
                format!("heads x head_dim = {} is too large", self.q_dim()),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return Err(ModelError::config(
                "rms_norm_eps",
                format!("{} is not in (0, 1)", self.rms_norm_eps),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(ModelError::config(
                "rope_theta",
                format!("{} is not a finite value > 1", self.rope_theta),
            ));
        }
        let check_factor = |field: &str, f: f64| {
            if f.is_finite() && f > 0.0 {
                Ok(())
            } else {
                Err(ModelError::config(
                    field,
                    format!("{f} is not a finite positive factor"),
                ))
            }
        };
        match &self.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => check_factor("rope_scaling.factor", *factor)?,
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                check_factor("rope_scaling.factor", *factor)?;
                check_factor("rope_scaling.low_freq_factor", *low_freq_factor)?;
                check_factor("rope_scaling.high_freq_factor", *high_freq_factor)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(ModelError::config(
                        "rope_scaling.high_freq_factor",
                        format!("{high_freq_factor} must exceed low_freq_factor = {low_freq_factor}"),
                    ));
                }
                pos(
                    "rope_scaling.original_max_position_embeddings",
                    *original_max_position_embeddings,
                    usize::MAX,
                )?;
            }
            Some(RopeScaling::FreqFactors { factors }) => {
                if factors.len() != self.head_dim / 2 {
                    return Err(ModelError::config(
                        "rope_freqs",
                        format!(
                            "{} factors for head_dim / 2 = {} frequencies",
                            factors.len(),
                            self.head_dim / 2
                        ),
                    ));
                }
                for f in factors {
                    check_factor("rope_freqs", *f)?;
                }
            }
        }
        for &id in self.eos_token_ids.iter().chain(self.bos_token_id.iter()) {
            if id as usize >= self.vocab_size {
                return Err(ModelError::config(
                    if Some(id) == self.bos_token_id {
                        "bos_token_id"
                    } else {
                        "eos_token_id"
                    },
                    format!("token {id} is outside the vocabulary of {}", self.vocab_size),
                ));
            }
        }
        Ok(())
    }

    /// Parses a Hugging Face `config.json` (as written by transformers 4.x or 5.x) for a Llama model.
    pub fn from_hf_json(v: &Value) -> Result<Self, ModelError> {
        let obj = v
            .as_object()
            .ok_or_else(|| ModelError::config("config.json", "not a JSON object"))?;
        if let Some(mt) = obj.get("model_type") {
            let mt = mt
                .as_str()
                .ok_or_else(|| ModelError::config("model_type", "not a string"))?;
            if mt != "llama" {
                return Err(ModelError::Unsupported(format!(
                    "model_type `{mt}` (only `llama` is supported)"
                )));
            }
        }
        if let Some(act) = obj.get("hidden_act").filter(|a| !a.is_null()) {
            if act.as_str() != Some("silu") {
                return Err(ModelError::Unsupported(format!("hidden_act {act} (only `silu`)")));
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if obj.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(ModelError::Unsupported(format!(
                    "`{key}: true` (biases are not supported)"
                )));
            }
        }
        let num_attention_heads = req_usize(obj, "num_attention_heads")?;
        let hidden_size = req_usize(obj, "hidden_size")?;
        let head_dim = match opt_usize(obj, "head_dim")? {
            Some(h) => h,
            None => {
                if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
                    return Err(ModelError::config(
                        "head_dim",
                        format!(
                            "absent, and hidden_size {hidden_size} is not a multiple of {num_attention_heads} heads"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        // transformers 5.x: `rope_parameters` holds rope_theta and the scaling; 4.x: `rope_theta` + `rope_scaling`.
        let (rope_theta, rope_scaling) = match obj.get("rope_parameters").filter(|p| !p.is_null()) {
            Some(p) => {
                let p = p
                    .as_object()
                    .ok_or_else(|| ModelError::config("rope_parameters", "not an object"))?;
                let theta = match p.get("rope_theta") {
                    Some(t) => t
                        .as_f64()
                        .ok_or_else(|| ModelError::config("rope_parameters.rope_theta", "not a number"))?,
                    None => opt_f64(obj, "rope_theta")?.unwrap_or(10000.0),
                };
                (theta, parse_rope_scaling(p, "rope_parameters")?)
            }
            None => {
                let theta = opt_f64(obj, "rope_theta")?.unwrap_or(10000.0);
                let scaling = match obj.get("rope_scaling").filter(|s| !s.is_null()) {
                    Some(s) => parse_rope_scaling(
                        s.as_object()
                            .ok_or_else(|| ModelError::config("rope_scaling", "not an object"))?,
                        "rope_scaling",
                    )?,
                    None => None,
                };
                (theta, scaling)
            }
        };
        let eos_token_ids = match obj.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| as_u32(x, "eos_token_id"))
                .collect::<Result<Vec<_>, _>>()?,
            Some(x) => vec![as_u32(x, "eos_token_id")?],
        };
        let bos_token_id = match obj.get("bos_token_id") {
            None | Some(Value::Null) => None,
            Some(x) => Some(as_u32(x, "bos_token_id")?),
        };
        let cfg = LlamaConfig {
            vocab_size: req_usize(obj, "vocab_size")?,
            hidden_size,
            intermediate_size: req_usize(obj, "intermediate_size")?,
            num_hidden_layers: req_usize(obj, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: opt_usize(obj, "num_key_value_heads")?.unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: opt_f64(obj, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_usize(obj, "max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: match obj.get("tie_word_embeddings") {
                None | Some(Value::Null) => false,
                Some(b) => b
                    .as_bool()
                    .ok_or_else(|| ModelError::config("tie_word_embeddings", "not a boolean"))?,
            },
            bos_token_id,
            eos_token_ids,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

fn parse_rope_scaling(p: &serde_json::Map<String, Value>, prefix: &str) -> Result<Option<RopeScaling>, ModelError> {
    let ty = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .map(|t| {
            t.as_str()
                .ok_or_else(|| ModelError::config(format!("{prefix}.rope_type"), "not a string"))
        })
        .transpose()?
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64, ModelError> {
        p.get(k)
            .ok_or_else(|| ModelError::config(format!("{prefix}.{k}"), "missing"))?
            .as_f64()
            .ok_or_else(|| ModelError::config(format!("{prefix}.{k}"), "not a number"))
    };
    match ty {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear { factor: num("factor")? })),
        "llama3" => {
            let orig = num("original_max_position_embeddings")?;
            if !(orig >= 1.0 && orig.fract() == 0.0 && orig < 1e15) {
                return Err(ModelError::config(
                    format!("{prefix}.original_max_position_embeddings"),
                    format!("{orig} is not a positive integer"),
                ));
            }
            Ok(Some(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: orig as usize,
            }))
        }
        other => Err(ModelError::Unsupported(format!(
            "{prefix}.rope_type `{other}` (supported: default, linear, llama3)"
        ))),
    }
}

fn as_u32(v: &Value, field: &str) -> Result<u32, ModelError> {
    v.as_u64()
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| ModelError::config(field, format!("{v} is not a token id")))
}

fn opt_usize(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<usize>, ModelError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| ModelError::config(key, format!("{v} is not a non-negative integer"))),
    }
}

fn req_usize(obj: &serde_json::Map<String, Value>, key: &str) -> Result<usize, ModelError> {
    opt_usize(obj, key)?.ok_or_else(|| ModelError::config(key, "missing"))
}

fn opt_f64(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<f64>, ModelError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| ModelError::config(key, format!("{v} is not a number"))),
    }
}

/// Inverse RoPE frequencies, one per rotated pair of a head (`head_dim / 2` values), scaling applied.
///
/// Pair `i` of a head rotates by angle `position * inv_freq[i]`; in the rotate-half (Hugging Face) convention
/// pair `i` is made of elements `i` and `i + head_dim / 2`.
pub fn rope_inv_freq(cfg: &LlamaConfig) -> Vec<f64> {
    let d = cfg.head_dim as f64;
    let base: Vec<f64> = (0..cfg.head_dim / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / d))
        .collect();
    match &cfg.rope_scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
        Some(RopeScaling::FreqFactors { factors }) => base
            .iter()
            .zip(factors.iter().chain(std::iter::repeat(&1.0)))
            .map(|(f, s)| f / s)
            .collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let orig = *original_max_position_embeddings as f64;
            let low_wavelen = orig / low_freq_factor;
            let high_wavelen = orig / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (orig / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}
