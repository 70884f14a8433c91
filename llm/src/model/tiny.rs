//! Deterministic random weights (the built-in tiny model) and an in-memory [`WeightSource`].

use std::collections::HashMap;
use std::ops::Range;

use super::{expected_shape, LlamaConfig, ModelError, Tensor, WeightSource};

/// An in-memory checkpoint: the built-in tiny model, or weights a test made.
#[derive(Debug, Clone)]
pub struct MemorySource {
    config: LlamaConfig,
    tensors: HashMap<String, Tensor>,
    description: String,
}

impl MemorySource {
    /// Wraps `tensors` (by canonical name); checks the config and that every tensor the config implies is
    /// present with the right shape.
    pub fn new(
        config: LlamaConfig,
        tensors: HashMap<String, Tensor>,
        description: impl Into<String>,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let names = super::tensor_names(&config);
        let src = MemorySource {
            config,
            tensors,
            description: description.into(),
        };
        for n in names {
            let t = src.tensors.get(&n).ok_or_else(|| ModelError::MissingTensor {
                name: n.clone(),
                source_desc: src.description.clone(),
            })?;
            let want = expected_shape(&src.config, &n).unwrap_or_default();
            if t.shape != want || t.data.len() != want.iter().product::<usize>() {
                return Err(ModelError::tensor(
                    &n,
                    format!("shape {:?} with {} values, expected {want:?}", t.shape, t.data.len()),
                ));
            }
        }
        Ok(src)
    }

    /// Consumes the source, returning its tensors.
    pub fn into_tensors(self) -> HashMap<String, Tensor> {
        self.tensors
    }
}

pub(super) const LAYER_TENSORS: [&str; 9] = [
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];

impl WeightSource for MemorySource {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn tensor(&self, name: &str) -> Result<Tensor, ModelError> {
        let stored = if name == "lm_head.weight" && self.config.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            name
        };
        self.tensors
            .get(stored)
            .cloned()
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.into(),
                source_desc: self.description.clone(),
            })
    }

    fn tensor_rows(&self, name: &str, rows: Range<usize>) -> Result<Tensor, ModelError> {
        let stored = if name == "lm_head.weight" && self.config.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            name
        };
        let t = self.tensors.get(stored).ok_or_else(|| ModelError::MissingTensor {
            name: name.into(),
            source_desc: self.description.clone(),
        })?;
        let n = t.shape[0];
        if rows.start > rows.end || rows.end > n {
            return Err(ModelError::InvalidInput(format!(
                "tensor `{name}`: rows {rows:?} out of 0..{n}"
            )));
        }
        let row_len: usize = t.shape[1..].iter().product();
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

/// splitmix64: a tiny, well-mixed deterministic generator, uniform in [-1, 1).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// Deterministic random weights for any (valid) configuration: matrices uniform with standard deviation
/// `1/sqrt(fan_in)`, embeddings uniform in [-1, 1), norm weights in [0.8, 1.2). Same `(config, seed)`, same bits.
pub fn random_source(config: LlamaConfig, seed: u64) -> Result<MemorySource, ModelError> {
    config.validate()?;
    let mut rng = SplitMix(seed ^ 0x05EE_D0F1_1A4A);
    let mut tensors = HashMap::new();
    let mut names = vec!["model.embed_tokens.weight".to_string()];
    for l in 0..config.num_hidden_layers {
        for s in LAYER_TENSORS {
            names.push(format!("model.layers.{l}.{s}"));
        }
    }
    names.push("model.norm.weight".into());
    if !config.tie_word_embeddings {
        names.push("lm_head.weight".into());
    }
    for name in names {
        let shape = expected_shape(&config, &name).unwrap_or_default();
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if shape.len() == 1 {
            (0..n).map(|_| (1.0 + 0.2 * rng.next()) as f32).collect()
        } else if name == "model.embed_tokens.weight" {
            (0..n).map(|_| rng.next() as f32).collect()
        } else {
            let scale = 3f64.sqrt() / (shape[1] as f64).sqrt();
            (0..n).map(|_| (scale * rng.next()) as f32).collect()
        };
        tensors.insert(name, Tensor { shape, data });
    }
    let description = format!("random weights (seed {seed}, {} layers)", config.num_hidden_layers);
    MemorySource::new(config, tensors, description)
}

/// The built-in tiny model: [`LlamaConfig::tiny`] with deterministic random weights; no tokenizer.
pub fn tiny_random(seed: u64) -> Box<dyn WeightSource> {
    let mut src = random_source(LlamaConfig::tiny(), seed).expect("LlamaConfig::tiny() is valid");
    src.description = format!("built-in tiny random model (seed {seed}, 4 layers)");
    Box::new(src)
}
