//! Writes a Llama-shaped Hugging Face checkpoint (`config.json` + sharded bf16 `*.safetensors` with a
//! `model.safetensors.index.json`) with deterministic generated weights, for measuring how loading scales to
//! models far larger than SmolLM2 (no model hub is reachable here).
//!
//! ```text
//! cargo run --release -p nccl-llm --example gen_checkpoint -- --shape llama3-8b --layers 4 --out /tmp/l8b
//! ```
//!
//! Shapes: `smollm2` (SmolLM2-135M: hidden 576, MLP 1536, 9 query / 3 KV heads of 64, 30 layers, vocabulary
//! 49152, tied embeddings), `llama3-8b` (hidden 4096, MLP 14336, 32 query / 8 KV heads of 128, vocabulary 128256, untied) and
//! `llama3-70b` (8192, 28672, 64 / 8 heads); `--layers` overrides the layer count (the full models have 32 and
//! 80). Each weight is a function of the seed, its tensor's name and its index (a SplitMix64 hash), uniform in
//! ±√(3/fan_in) for matrices (unit-variance outputs), ±1 for the embedding and 1 ± 0.1 for norms, so a forward
//! pass stays finite. Tensors are generated one at a time while the file is written; the generator holds at
//! most one tensor's bytes.

use std::borrow::Cow;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use nccl_llm::model::{expected_shape, tensor_names, LlamaConfig};
use safetensors::tensor::View;
use safetensors::Dtype;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Shape {
    /// SmolLM2-135M's architecture (the real model ships as a GGUF too large to carry to a GPU machine).
    #[value(name = "smollm2")]
    Smollm2,
    #[value(name = "llama3-8b")]
    Llama3_8b,
    #[value(name = "llama3-70b")]
    Llama3_70b,
}

#[derive(Parser, Debug)]
#[command(about = "Writes a Llama-shaped bf16 safetensors checkpoint with deterministic generated weights")]
struct Args {
    /// The architecture's shape.
    #[arg(long, value_enum, default_value = "llama3-8b")]
    shape: Shape,
    /// Number of layers (default: the full model's).
    #[arg(long)]
    layers: Option<usize>,
    /// Output directory (created; existing checkpoint files in it are overwritten).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the generated weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest shard file in bytes (as transformers' `max_shard_size`).
    #[arg(long, default_value_t = 2 << 30)]
    shard_bytes: usize,
}

fn config(shape: Shape, layers: Option<usize>) -> LlamaConfig {
    if let Shape::Smollm2 = shape {
        return LlamaConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: layers.unwrap_or(30),
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            rope_scaling: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        };
    }
    let (hidden, inter, heads, full_layers) = if let Shape::Llama3_70b = shape {
        (8192, 28672, 64, 80)
    } else {
        (4096, 14336, 32, 32)
    };
    LlamaConfig {
        vocab_size: 128256,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers.unwrap_or(full_layers),
        num_attention_heads: heads,
        num_key_value_heads: 8,
        head_dim: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 500000.0,
        rope_scaling: None,
        max_position_embeddings: 8192,
        tie_word_embeddings: false,
        bos_token_id: Some(128000),
        eos_token_ids: vec![128001],
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A tensor generated when the writer asks for its bytes.
struct Generated {
    name: String,
    shape: Vec<usize>,
    seed: u64,
}

impl Generated {
    fn values(&self) -> impl Iterator<Item = f32> + '_ {
        let key = self.name.bytes().fold(self.seed, |h, b| splitmix(h ^ u64::from(b)));
        let (center, half) = if self.shape.len() == 1 {
            (1.0, 0.1)
        } else if self.name.contains("embed_tokens") {
            (0.0, 1.0)
        } else {
            (0.0, (3.0 / self.shape[1] as f32).sqrt())
        };
        let n: usize = self.shape.iter().product();
        (0..n as u64).map(move |i| {
            let u = (splitmix(key ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93)) >> 40) as f32 / (1u64 << 24) as f32;
            center + half * (2.0 * u - 1.0)
        })
    }
}

impl View for &Generated {
    fn dtype(&self) -> Dtype {
        Dtype::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let mut out = Vec::with_capacity(self.data_len());
        for v in self.values() {
            out.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
        }
        Cow::Owned(out)
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 2
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let cfg = config(args.shape, args.layers);
    cfg.validate()?;
    std::fs::create_dir_all(&args.out)?;
    let names = tensor_names(&cfg);
    let tensors: Vec<Generated> = names
        .into_iter()
        .map(|name| {
            let shape = expected_shape(&cfg, &name).expect("a tensor of the model");
            Generated {
                name,
                shape,
                seed: args.seed,
            }
        })
        .collect();
    // Shards in file order, each at most `shard_bytes` (a larger tensor gets a shard of its own).
    let mut shards: Vec<Vec<&Generated>> = vec![Vec::new()];
    let mut size = 0;
    for t in &tensors {
        let n = (&t).data_len();
        if size > 0 && size + n > args.shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        shards.last_mut().expect("one shard at least").push(t);
    }
    let total: usize = tensors.iter().map(|t| (&t).data_len()).sum();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len());
        let views = shard.iter().map(|t| (t.name.clone(), *t));
        safetensors::serialize_to_file(views, None, &args.out.join(&file))?;
        for t in shard {
            weight_map.insert(t.name.clone(), file.clone().into());
        }
        eprintln!("gen_checkpoint: wrote {file} ({} tensors)", shard.len());
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(args.out.join("model.safetensors.index.json"), index.to_string())?;
    let c = &cfg;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_ids,
        "torch_dtype": "bfloat16"
    });
    std::fs::write(args.out.join("config.json"), config.to_string())?;
    println!(
        "{}: {} layers, {} tensors, {:.2} GB bf16 in {} shards",
        args.out.display(),
        c.num_hidden_layers,
        tensors.len(),
        total as f64 / 1e9,
        shards.len()
    );
    Ok(())
}
