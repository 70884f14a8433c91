//! Writes the seed corpora of the fuzz targets into `fuzz/seeds/<target>/` (or the directory given as the
//! first argument). Every seed is small (a few KiB at most) and made here from code, so the checked-in corpus
//! can be regenerated: `cargo run --manifest-path fuzz/Cargo.toml -p nccl-fuzz-seedgen`.
//!
//! The layouts of the structured targets are documented in `fuzz/src/lib.rs`.

use std::path::{Path, PathBuf};

use nccl::bootstrap::wire::{header, Kind, NONCE_LEN};
use nccl_llm::model::dequant::GgmlType;
use nccl_llm::model::gguf::{GgufWriter, MetaValue};
use serde_json::json;

/// A deterministic byte stream (xorshift), so seeds do not change between runs.
struct Bytes(u64);

impl Bytes {
    fn next(&mut self) -> u8 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 32) as u8
    }
    fn take(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next()).collect()
    }
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| f32::from(self.next()) / 128.0 - 1.0).collect()
    }
}

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("create the seed directory");
    std::fs::write(d.join(name), bytes).expect("write a seed");
}

/// A small Llama: `hidden` wide, `heads` query heads of width `hidden / heads`, one KV head per two.
struct Shape {
    vocab: usize,
    hidden: usize,
    heads: usize,
    ffn: usize,
    layers: usize,
}

impl Shape {
    fn kv(&self) -> usize {
        (self.heads / 2).max(1)
    }
    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
    /// (GGUF name, HF name, [rows, cols] outermost first) of every tensor.
    fn tensors(&self) -> Vec<(String, String, Vec<usize>)> {
        let (h, kvd) = (self.hidden, self.kv() * self.head_dim());
        let mut v = vec![
            (
                "token_embd.weight".to_string(),
                "model.embed_tokens.weight".to_string(),
                vec![self.vocab, h],
            ),
            ("output_norm.weight".into(), "model.norm.weight".into(), vec![h]),
        ];
        for l in 0..self.layers {
            for (g, hf, shape) in [
                ("attn_norm", "input_layernorm", vec![h]),
                ("ffn_norm", "post_attention_layernorm", vec![h]),
                ("attn_q", "self_attn.q_proj", vec![h, h]),
                ("attn_k", "self_attn.k_proj", vec![kvd, h]),
                ("attn_v", "self_attn.v_proj", vec![kvd, h]),
                ("attn_output", "self_attn.o_proj", vec![h, h]),
                ("ffn_gate", "mlp.gate_proj", vec![self.ffn, h]),
                ("ffn_up", "mlp.up_proj", vec![self.ffn, h]),
                ("ffn_down", "mlp.down_proj", vec![h, self.ffn]),
            ] {
                v.push((
                    format!("blk.{l}.{g}.weight"),
                    format!("model.layers.{l}.{hf}.weight"),
                    shape,
                ));
            }
        }
        v
    }
    fn gguf(&self) -> GgufWriter {
        let u = |v: usize| MetaValue::U32(v as u32);
        GgufWriter::new()
            .meta("general.architecture", MetaValue::Str("llama".into()))
            .meta("llama.block_count", u(self.layers))
            .meta("llama.context_length", u(64))
            .meta("llama.embedding_length", u(self.hidden))
            .meta("llama.feed_forward_length", u(self.ffn))
            .meta("llama.attention.head_count", u(self.heads))
            .meta("llama.attention.head_count_kv", u(self.kv()))
            .meta("llama.rope.freq_base", MetaValue::F32(10000.0))
            .meta("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5))
            .meta("llama.vocab_size", u(self.vocab))
            .meta("tokenizer.ggml.bos_token_id", u(1))
            .meta("tokenizer.ggml.eos_token_id", u(2))
    }
    fn config_json(&self) -> serde_json::Value {
        json!({
            "model_type": "llama", "vocab_size": self.vocab, "hidden_size": self.hidden,
            "intermediate_size": self.ffn, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv(),
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
            "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2
        })
    }
}

/// GPT-2's byte-to-character table: the 256 single-byte tokens of a byte-level BPE vocabulary.
fn byte_tokens() -> Vec<String> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("a char").to_string()
            } else {
                extra += 1;
                char::from_u32(255 + extra).expect("a char").to_string()
            }
        })
        .collect()
}

const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const LLAMA3_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role') }}{% endif %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

fn gguf_seeds(dir: &Path, r: &mut Bytes) {
    // f32 everywhere, with a tokenizer and a chat template.
    let s = Shape {
        vocab: 16,
        hidden: 8,
        heads: 2,
        ffn: 8,
        layers: 1,
    };
    let mut tokens = vec!["<|endoftext|>".to_string()];
    tokens.extend(byte_tokens().into_iter().take(s.vocab - 1));
    let mut w = s
        .gguf()
        .meta("tokenizer.ggml.model", MetaValue::Str("gpt2".into()))
        .meta("tokenizer.ggml.pre", MetaValue::Str("smollm".into()))
        .meta(
            "tokenizer.ggml.tokens",
            MetaValue::Array(tokens.into_iter().map(MetaValue::Str).collect()),
        )
        .meta(
            "tokenizer.ggml.merges",
            MetaValue::Array(vec![MetaValue::Str("\" #".into())]),
        )
        .meta("tokenizer.chat_template", MetaValue::Str(SMOLLM2_TEMPLATE.into()));
    for (g, _, shape) in s.tensors() {
        let n = shape.iter().product();
        w = w.tensor_f32(&g, &shape, &r.f32s(n));
    }
    write(dir, "gguf", "f32-tokenizer-template.gguf", &w.to_bytes());
    // Block-quantized matrices (rows of 32), untied head, two layers.
    let s = Shape {
        vocab: 4,
        hidden: 32,
        heads: 4,
        ffn: 32,
        layers: 2,
    };
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        let mut w = s.gguf();
        let mut all = s.tensors();
        all.push(("output.weight".into(), "lm_head.weight".into(), vec![s.vocab, s.hidden]));
        for (g, _, shape) in all {
            let n: usize = shape.iter().product();
            if shape.len() == 2 {
                let bytes = ty.bytes_for(n).expect("whole blocks");
                w = w.tensor(&g, &shape, ty, r.take(bytes));
            } else {
                w = w.tensor_f32(&g, &shape, &r.f32s(n));
            }
        }
        write(dir, "gguf", &format!("{ty}.gguf"), &w.to_bytes());
    }
    // Metadata of every value type, an f16 tensor, an alignment key.
    let w = GgufWriter::new()
        .meta("general.alignment", MetaValue::U32(64))
        .meta("u8", MetaValue::U8(1))
        .meta("i8", MetaValue::I8(-1))
        .meta("u16", MetaValue::U16(2))
        .meta("i16", MetaValue::I16(-2))
        .meta("i32", MetaValue::I32(-3))
        .meta("u64", MetaValue::U64(4))
        .meta("i64", MetaValue::I64(-4))
        .meta("f64", MetaValue::F64(0.5))
        .meta("b", MetaValue::Bool(true))
        .meta(
            "nested",
            MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::U8(7)])]),
        )
        .tensor("h", &[4, 2], GgmlType::F16, r.take(16));
    write(dir, "gguf", "all-value-types.gguf", &w.to_bytes());
}

fn safetensors_file(s: &Shape, r: &mut Bytes, dtype: safetensors::Dtype) -> Vec<u8> {
    let width = if dtype == safetensors::Dtype::F32 { 4 } else { 2 };
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = s
        .tensors()
        .into_iter()
        .map(|(_, hf, shape)| {
            let n: usize = shape.iter().product();
            (hf, shape, r.take(n * width))
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, shape, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, shape.clone(), b).expect("a consistent view"),
            )
        })
        .collect();
    safetensors::serialize(views, None).expect("serialize")
}

fn safetensors_seeds(dir: &Path, r: &mut Bytes) {
    let s = Shape {
        vocab: 8,
        hidden: 8,
        heads: 2,
        ffn: 8,
        layers: 1,
    };
    for (name, dtype) in [
        ("f32", safetensors::Dtype::F32),
        ("bf16", safetensors::Dtype::BF16),
        ("f16", safetensors::Dtype::F16),
    ] {
        let cfg = s.config_json().to_string().into_bytes();
        let mut seed = (cfg.len() as u16).to_le_bytes().to_vec();
        seed.extend(&cfg);
        seed.extend(safetensors_file(&s, r, dtype));
        write(dir, "safetensors_dir", &format!("{name}.bin"), &seed);
    }
}

fn config_seeds(dir: &Path) {
    let base = json!({
        "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2
    });
    let mut seeds = vec![("minimal", base.clone())];
    let mut t4 = base.clone();
    t4["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    t4["eos_token_id"] = json!([2, 3]);
    t4["torch_dtype"] = json!("bfloat16");
    seeds.push(("transformers4-llama3-rope", t4));
    let mut t5 = base.clone();
    t5["rope_parameters"] = json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0});
    t5["head_dim"] = json!(16);
    t5["tie_word_embeddings"] = json!(false);
    seeds.push(("transformers5-linear-rope", t5));
    let mut smol = Shape {
        vocab: 49152,
        hidden: 576,
        heads: 9,
        ffn: 1536,
        layers: 30,
    }
    .config_json();
    smol["num_key_value_heads"] = json!(3);
    smol["rope_theta"] = json!(100000);
    seeds.push(("smollm2-135m", smol));
    for (name, v) in seeds {
        write(dir, "config_json", &format!("{name}.json"), v.to_string().as_bytes());
    }
}

fn tokenizer_seeds(dir: &Path) {
    let mut tokens = vec!["<|endoftext|>".to_string()];
    tokens.extend(byte_tokens());
    let merges = ["h e", "l l", "he ll", "Ġ w", "1 2"];
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    let n = tokens.len();
    for (name, flags, text) in [
        ("gpt2-bos", 8u8 | 16 | 1, "hello world 12"),
        ("smollm-specials", 16 | 2, "he<|endoftext|>ll"),
        ("llama3-split", 3, "x 123456 ÿ\r\n"),
        ("no-pre", 0, "Hello"),
    ] {
        let mut seed = vec![flags, 1];
        seed.extend(tokens.join("\n").bytes());
        seed.push(0xFF);
        seed.extend(merges.join("\n").bytes());
        seed.push(0xFF);
        let mut types = vec![3u8];
        types.extend(std::iter::repeat_n(1u8, n - 1));
        seed.extend(types);
        seed.push(0xFF);
        seed.extend(text.bytes());
        write(dir, "gguf_tokenizer", &format!("{name}.bin"), &seed);
    }
}

fn chat_seeds(dir: &Path) {
    for (name, t, msgs) in [
        ("smollm2", SMOLLM2_TEMPLATE, vec!["user", "What is the capital of France?"]),
        (
            "llama3",
            LLAMA3_TEMPLATE,
            vec!["system", "Be brief.", "user", "Hi", "assistant", "Hello", "user", "Bye"],
        ),
        ("raise", "{{ raise_exception('no') }}", vec![]),
        (
            "loops",
            "{% for m in messages %}{% for c in m.content %}{{ loop.index }}{{ c | upper }}{% endfor %}{% endfor %}{{ eos_token }}",
            vec!["user", "abc"],
        ),
    ] {
        let mut seed = t.as_bytes().to_vec();
        for m in msgs {
            seed.push(0);
            seed.extend(m.bytes());
        }
        write(dir, "chat_template", &format!("{name}.bin"), &seed);
    }
}

/// A hello payload: rank, world size, the client nonce, no MAC.
fn hello(rank: u64, world: u64) -> Vec<u8> {
    let mut p = rank.to_le_bytes().to_vec();
    p.extend(world.to_le_bytes());
    p.extend([0x5Au8; NONCE_LEN]);
    p.push(0);
    p.extend([0u8; 32]);
    let mut f = header(Kind::Hello, p.len() as u32).to_vec();
    f.extend(p);
    f
}

fn bootstrap_seeds(dir: &Path) {
    let mut data = header(Kind::Data, 9).to_vec();
    data.extend(7u64.to_le_bytes());
    data.push(1);
    let mut abort = header(Kind::Abort, 12).to_vec();
    abort.extend(u64::MAX.to_le_bytes());
    abort.extend(b"oops");
    let mut reject = header(Kind::Reject, 4).to_vec();
    reject.extend([2, b'd', b'u', b'p']);
    let mut two = hello(1, 3);
    two.extend(&data);
    for (name, bytes) in [
        ("hello", hello(1, 3)),
        ("data", data.clone()),
        ("abort", abort),
        ("reject", reject),
        ("welcome", {
            let mut w = header(Kind::Welcome, 33).to_vec();
            w.extend([1u8; 33]);
            w
        }),
        ("two-frames", two),
        ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
    ] {
        write(dir, "bootstrap_frames", &format!("{name}.bin"), &bytes);
    }
    for (name, bytes) in [
        ("hello-rank1", hello(1, 3)),
        ("hello-rank2", hello(2, 3)),
        ("hello-wrong-world", hello(1, 5)),
        ("hello-out-of-range", hello(9, 3)),
        ("too-large", header(Kind::Hello, u32::MAX).to_vec()),
        ("data-before-hello", data),
    ] {
        write(dir, "bootstrap_handshake", &format!("{name}.bin"), &bytes);
    }
}

fn perf_seeds(dir: &Path) {
    for (name, args) in [
        ("default", vec!["all_reduce"]),
        (
            "sweep",
            vec!["all_reduce", "-b", "8", "-e", "64M", "-f", "2", "-g", "2"],
        ),
        (
            "step",
            vec![
                "all_gather_perf",
                "-b",
                "1K",
                "-e",
                "16K",
                "-i",
                "1K",
                "-d",
                "half",
                "-o",
                "max",
            ],
        ),
        (
            "all",
            vec![
                "reduce", "-d", "all", "-o", "all", "-r", "all", "-n", "3", "-w", "0", "-c", "0",
            ],
        ),
        (
            "json",
            vec![
                "sendrecv",
                "--backend",
                "host",
                "--nprocs",
                "2",
                "-J",
                "out.json",
                "-a",
                "3",
                "-T",
                "5",
            ],
        ),
        (
            "fractions",
            vec!["broadcast", "-b", "0.5K", "-e", "1.5M", "-f", "3", "-z", "1", "-C", "1"],
        ),
    ] {
        write(dir, "perf_flags", &format!("{name}.bin"), args.join("\0").as_bytes());
    }
}

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("seeds"));
    let mut r = Bytes(0x9E37_79B9_7F4A_7C15);
    gguf_seeds(&dir, &mut r);
    safetensors_seeds(&dir, &mut r);
    config_seeds(&dir);
    tokenizer_seeds(&dir);
    chat_seeds(&dir);
    bootstrap_seeds(&dir);
    perf_seeds(&dir);
    println!("seeds written to {}", dir.display());
}
