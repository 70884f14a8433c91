//! Formats: config.json variants, GGUF metadata and tensors (written by the test with llama.cpp's Q/K row
//! interleaving), safetensors checkpoints (single file and sharded), RoPE frequencies, the tiny model, and the
//! reference forward agreeing across all of them.

use std::collections::HashMap;
use std::path::Path;

use nccl_llm::model::gguf::{GgufFile, GgufSource, GgufWriter, MetaValue};
use nccl_llm::model::{
    self, random_source, reference, rope_inv_freq, tiny_random, LlamaConfig, MemorySource, ModelError, RopeScaling,
    Tensor, WeightSource,
};
use serde_json::json;

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("model_formats_{tag}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn smol_like() -> LlamaConfig {
    // SmolLM2's head layout (9 query heads, 3 KV heads) at toy size, untied head.
    LlamaConfig {
        vocab_size: 97,
        hidden_size: 36,
        intermediate_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 100000.0,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

// ---------------------------------------------------------------------------------------------- config.json

#[test]
fn config_json_transformers_4() {
    let v = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": true,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16"
    });
    let c = LlamaConfig::from_hf_json(&v).unwrap();
    assert_eq!(
        (c.vocab_size, c.hidden_size, c.num_key_value_heads, c.head_dim),
        (128256, 2048, 8, 64)
    );
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(
        c.rope_scaling,
        Some(RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        })
    );
    assert!(c.tie_word_embeddings);
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids),
        (Some(128000), vec![128001, 128008, 128009])
    );
}

#[test]
fn config_json_transformers_5_rope_parameters_and_defaults() {
    // SmolLM2-135M as transformers 5 writes it: rope_parameters, no head_dim, eos as an int.
    let v = json!({
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}, "max_position_embeddings": 8192,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2, "head_dim": null, "dtype": "bfloat16"
    });
    let c = LlamaConfig::from_hf_json(&v).unwrap();
    assert_eq!((c.head_dim, c.rope_theta, c.rope_scaling.clone()), (64, 100000.0, None));
    assert_eq!(c.eos_token_ids, vec![2]);
    // Linear scaling under rope_parameters, and the old `type` key under rope_scaling.
    let mut v2 = v.clone();
    v2["rope_parameters"] = json!({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0});
    assert_eq!(
        LlamaConfig::from_hf_json(&v2).unwrap().rope_scaling,
        Some(RopeScaling::Linear { factor: 4.0 })
    );
    let mut v3 = v.clone();
    v3.as_object_mut().unwrap().remove("rope_parameters");
    v3["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
    let c3 = LlamaConfig::from_hf_json(&v3).unwrap();
    assert_eq!(
        (c3.rope_theta, c3.rope_scaling),
        (10000.0, Some(RopeScaling::Linear { factor: 2.0 }))
    );
    // Defaults: no num_key_value_heads -> MHA; no tie -> false (transformers' LlamaConfig default).
    let mut v4 = v.clone();
    v4.as_object_mut().unwrap().remove("num_key_value_heads");
    v4.as_object_mut().unwrap().remove("tie_word_embeddings");
    let c4 = LlamaConfig::from_hf_json(&v4).unwrap();
    assert_eq!((c4.num_key_value_heads, c4.tie_word_embeddings), (9, false));
}

fn config_err(v: serde_json::Value) -> String {
    LlamaConfig::from_hf_json(&v).unwrap_err().to_string()
}

#[test]
fn config_json_errors_name_the_field() {
    let base = json!({
        "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2
    });
    assert!(LlamaConfig::from_hf_json(&base).is_ok());
    let with = |k: &str, val: serde_json::Value| {
        let mut v = base.clone();
        v[k] = val;
        v
    };
    let mut missing = base.clone();
    missing.as_object_mut().unwrap().remove("hidden_size");
    assert!(config_err(missing).contains("hidden_size"));
    assert!(config_err(with("vocab_size", json!("many"))).contains("vocab_size"));
    assert!(config_err(with("vocab_size", json!(-3))).contains("vocab_size"));
    assert!(config_err(with("num_key_value_heads", json!(3))).contains("num_key_value_heads"));
    assert!(config_err(with("num_hidden_layers", json!(0))).contains("num_hidden_layers"));
    assert!(config_err(with("rms_norm_eps", json!(-1.0))).contains("rms_norm_eps"));
    assert!(config_err(with("eos_token_id", json!([1, "x"]))).contains("eos_token_id"));
    assert!(config_err(with("eos_token_id", json!(100))).contains("eos_token_id"));
    assert!(config_err(with("model_type", json!("gpt2"))).contains("gpt2"));
    assert!(config_err(with("attention_bias", json!(true))).contains("attention_bias"));
    assert!(config_err(with("rope_scaling", json!({"rope_type": "yarn", "factor": 4.0}))).contains("yarn"));
    let e = config_err(with("rope_scaling", json!({"rope_type": "llama3", "factor": 8.0})));
    assert!(e.contains("rope_scaling.") && e.contains("missing"), "{e}");
    assert!(config_err(with("hidden_size", json!(1u64 << 40))).contains("hidden_size"));
    assert!(config_err(json!([1, 2])).contains("config.json"));
}

#[test]
fn rope_frequencies() {
    let mut c = LlamaConfig::tiny();
    c.head_dim = 8;
    c.rope_theta = 10000.0;
    let f = rope_inv_freq(&c);
    assert_eq!(f.len(), 4);
    for (i, v) in f.iter().enumerate() {
        assert!((v - 10000f64.powf(-(2.0 * i as f64) / 8.0)).abs() < 1e-15);
    }
    c.rope_scaling = Some(RopeScaling::Linear { factor: 4.0 });
    assert!(rope_inv_freq(&c)
        .iter()
        .zip(&f)
        .all(|(s, v)| (s - v / 4.0).abs() < 1e-15));
    // Llama 3: wavelengths below orig/high_freq_factor are kept, above orig/low_freq_factor divided by factor.
    c.head_dim = 128;
    c.rope_theta = 500000.0;
    c.rope_scaling = None;
    let base = rope_inv_freq(&c);
    c.rope_scaling = Some(RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    });
    let scaled = rope_inv_freq(&c);
    let (mut kept, mut divided, mut between) = (0, 0, 0);
    for (b, s) in base.iter().zip(&scaled) {
        let wavelen = 2.0 * std::f64::consts::PI / b;
        if wavelen < 8192.0 / 4.0 {
            assert_eq!(s, b);
            kept += 1;
        } else if wavelen > 8192.0 {
            assert!((s - b / 8.0).abs() < 1e-18);
            divided += 1;
        } else {
            assert!(*s < *b && *s > b / 8.0);
            between += 1;
        }
    }
    assert!(kept > 0 && divided > 0 && between > 0, "{kept} {divided} {between}");
    c.rope_scaling = Some(RopeScaling::FreqFactors { factors: vec![2.0; 64] });
    assert!(rope_inv_freq(&c)
        .iter()
        .zip(&base)
        .all(|(s, b)| (s - b / 2.0).abs() < 1e-18));
}

// ---------------------------------------------------------------------------------------------- GGUF

/// llama.cpp's converter (`LlamaModel.permute`): rows of each head reordered so that the two halves interleave.
fn llama_cpp_permute(t: &Tensor, n_head: usize) -> Tensor {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let hd = rows / n_head;
    let mut out = vec![0f32; t.data.len()];
    for h in 0..n_head {
        for s in 0..2 {
            for j in 0..hd / 2 {
                let src = h * hd + s * hd / 2 + j;
                let dst = h * hd + 2 * j + s;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&t.data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Tensor {
        shape: t.shape.clone(),
        data: out,
    }
}

fn gguf_of(src: &dyn WeightSource) -> GgufWriter {
    let c = src.config();
    let u = |v: usize| MetaValue::U32(v as u32);
    let mut w = GgufWriter::new()
        .meta("general.architecture", MetaValue::Str("llama".into()))
        .meta("llama.block_count", u(c.num_hidden_layers))
        .meta("llama.context_length", u(c.max_position_embeddings))
        .meta("llama.embedding_length", u(c.hidden_size))
        .meta("llama.feed_forward_length", u(c.intermediate_size))
        .meta("llama.attention.head_count", u(c.num_attention_heads))
        .meta("llama.attention.head_count_kv", u(c.num_key_value_heads))
        .meta("llama.rope.freq_base", MetaValue::F32(c.rope_theta as f32))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F64(c.rms_norm_eps), // F64 so the config compares equal; real files use F32
        )
        .meta("llama.vocab_size", u(c.vocab_size))
        .meta("tokenizer.ggml.bos_token_id", u(c.bos_token_id.unwrap() as usize))
        .meta("tokenizer.ggml.eos_token_id", u(c.eos_token_ids[0] as usize));
    let t = |n: &str| src.tensor(n).unwrap();
    w = w.tensor_f32(
        "token_embd.weight",
        &[c.vocab_size, c.hidden_size],
        &t("model.embed_tokens.weight").data,
    );
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let b = format!("blk.{l}");
        let q = llama_cpp_permute(&t(&format!("{p}.self_attn.q_proj.weight")), c.num_attention_heads);
        let k = llama_cpp_permute(&t(&format!("{p}.self_attn.k_proj.weight")), c.num_key_value_heads);
        for (g, tensor) in [
            ("attn_norm", t(&format!("{p}.input_layernorm.weight"))),
            ("ffn_norm", t(&format!("{p}.post_attention_layernorm.weight"))),
            ("attn_q", q),
            ("attn_k", k),
            ("attn_v", t(&format!("{p}.self_attn.v_proj.weight"))),
            ("attn_output", t(&format!("{p}.self_attn.o_proj.weight"))),
            ("ffn_gate", t(&format!("{p}.mlp.gate_proj.weight"))),
            ("ffn_up", t(&format!("{p}.mlp.up_proj.weight"))),
            ("ffn_down", t(&format!("{p}.mlp.down_proj.weight"))),
        ] {
            w = w.tensor_f32(&format!("{b}.{g}.weight"), &tensor.shape, &tensor.data);
        }
    }
    w = w.tensor_f32("output_norm.weight", &[c.hidden_size], &t("model.norm.weight").data);
    if !c.tie_word_embeddings {
        w = w.tensor_f32(
            "output.weight",
            &[c.vocab_size, c.hidden_size],
            &t("lm_head.weight").data,
        );
    }
    w
}

fn all_names(c: &LlamaConfig) -> Vec<String> {
    let mut v = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".into(),
        "lm_head.weight".into(),
    ];
    for l in 0..c.num_hidden_layers {
        for s in [
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            v.push(format!("model.layers.{l}.{s}.weight"));
        }
    }
    v
}

fn assert_same_weights(a: &dyn WeightSource, b: &dyn WeightSource) {
    assert_eq!(a.config(), b.config());
    for n in all_names(a.config()) {
        let (x, y) = (a.tensor(&n).unwrap(), b.tensor(&n).unwrap());
        assert_eq!(x, y, "{n}");
        let rows = x.shape[0];
        let r = rows / 3..rows - rows / 4;
        let part = b.tensor_rows(&n, r.clone()).unwrap();
        let rl: usize = x.shape[1..].iter().product();
        assert_eq!(part.shape[0], r.len(), "{n}");
        assert_eq!(part.data, x.data[r.start * rl..r.end * rl], "{n} rows {r:?}");
        if let [rows, cols] = x.shape[..] {
            // A row-parallel shard: only some columns of every row (both the source's own reader and the
            // trait's default, which slices the whole tensor).
            let c = cols / 4..cols - cols / 3;
            let want: Vec<f32> = (0..rows)
                .flat_map(|i| x.data[i * cols + c.start..i * cols + c.end].to_vec())
                .collect();
            let got = b.tensor_cols(&n, c.clone()).unwrap();
            assert_eq!(
                (got.shape.clone(), &got.data),
                (vec![rows, c.len()], &want),
                "{n} cols {c:?}"
            );
            assert_eq!(
                a.tensor_cols(&n, c.clone()).unwrap().data,
                want,
                "{n} default cols {c:?}"
            );
            assert!(b.tensor_cols(&n, 0..cols + 1).is_err(), "{n}: columns past the row");
        }
    }
}

fn max_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn gguf_round_trip_undoes_the_qk_interleaving() {
    for cfg in [LlamaConfig::tiny(), smol_like()] {
        let mem = random_source(cfg.clone(), 7).unwrap();
        let dir = tmpdir("gguf_rt");
        let path = dir.join("toy.gguf");
        gguf_of(&mem).write(&path).unwrap();
        let g = model::open(&path).unwrap();
        assert_same_weights(&mem, g.as_ref());
        assert_eq!(
            g.describe(),
            format!("GGUF toy (F32, {} layers)", cfg.num_hidden_layers)
        );
        let toks = [1u32, 5, 9, 3, 7, 2];
        let a = reference::forward_f64(&mem, &toks).unwrap();
        let b = reference::forward_f64(g.as_ref(), &toks).unwrap();
        assert_eq!(max_diff(&a, &b), 0.0);
        assert!(g.tokenizer().unwrap().is_none());
    }
}

#[test]
fn gguf_metadata_to_config() {
    let mem = random_source(smol_like(), 1).unwrap();
    let w = gguf_of(&mem)
        .meta("llama.rope.scaling.type", MetaValue::Str("linear".into()))
        .meta("llama.rope.scaling.factor", MetaValue::F32(2.0));
    let f = GgufFile::from_bytes("mem.gguf", w.to_bytes()).unwrap();
    let s = GgufSource::from_file(f).unwrap();
    let c = s.config();
    assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (9, 3, 4));
    assert!(!c.tie_word_embeddings);
    // Llama 3 GGUFs carry their scaling as a rope_freqs tensor.
    let w = gguf_of(&mem).tensor_f32("rope_freqs.weight", &[2], &[1.0, 4.0]);
    let s = GgufSource::from_file(GgufFile::from_bytes("m.gguf", w.to_bytes()).unwrap()).unwrap();
    assert_eq!(
        s.config().rope_scaling,
        Some(RopeScaling::FreqFactors {
            factors: vec![1.0, 4.0]
        })
    );
    // Missing and wrong-typed keys are named.
    let drop_key = |key: &str| {
        let mut w = GgufWriter::new();
        let f = GgufFile::from_bytes("x.gguf", gguf_of(&mem).to_bytes()).unwrap();
        for (k, v) in f.metadata() {
            if k != key {
                w = w.meta(k, v.clone());
            }
        }
        GgufSource::from_file(GgufFile::from_bytes("x.gguf", w.to_bytes()).unwrap())
            .unwrap_err()
            .to_string()
    };
    assert!(drop_key("llama.embedding_length").contains("llama.embedding_length"));
    assert!(drop_key("general.architecture").contains("general.architecture"));
    let w = gguf_of(&mem).meta("llama.attention.key_length", MetaValue::Str("x".into()));
    let e = GgufSource::from_file(GgufFile::from_bytes("x.gguf", w.to_bytes()).unwrap()).unwrap_err();
    assert!(e.to_string().contains("llama.attention.key_length"), "{e}");
    // A tensor whose shape disagrees with the config is named when asked for.
    let w = gguf_of(&random_source(LlamaConfig::tiny(), 1).unwrap());
    let mut bytes = w.to_bytes();
    let f = GgufFile::from_bytes("x.gguf", bytes.clone()).unwrap();
    assert!(f.tensor_info("blk.0.ffn_up.weight").is_some());
    // Claim a larger MLP in the metadata: every MLP tensor is then the wrong shape.
    let needle = b"llama.feed_forward_length";
    let pos = bytes.windows(needle.len()).position(|w| w == needle).unwrap() + needle.len() + 4;
    bytes[pos..pos + 4].copy_from_slice(&320u32.to_le_bytes());
    let s = GgufSource::from_file(GgufFile::from_bytes("x.gguf", bytes).unwrap()).unwrap();
    let e = s.tensor("model.layers.0.mlp.up_proj.weight").unwrap_err();
    assert!(
        matches!(e, ModelError::Tensor { ref name, .. } if name == "blk.0.ffn_up.weight"),
        "{e}"
    );
    assert!(matches!(
        s.tensor("model.layers.9.mlp.up_proj.weight"),
        Err(ModelError::MissingTensor { .. })
    ));
    assert!(matches!(
        s.tensor_rows("model.norm.weight", 3..70),
        Err(ModelError::InvalidInput(_))
    ));
}

fn malformed(bytes: Vec<u8>) -> String {
    match GgufFile::from_bytes("bad.gguf", bytes) {
        Err(e @ ModelError::Malformed { .. }) => e.to_string(),
        Err(e) => panic!("expected Malformed, got {e}"),
        Ok(_) => panic!("expected an error"),
    }
}

#[test]
fn lying_gguf_headers_are_errors_without_huge_allocations() {
    let good = gguf_of(&random_source(LlamaConfig::tiny(), 3).unwrap()).to_bytes();
    assert!(GgufFile::from_bytes("ok.gguf", good.clone()).is_ok());
    let head = |tensors: u64, kvs: u64| {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(tensors.to_le_bytes());
        b.extend(kvs.to_le_bytes());
        b
    };
    assert!(malformed(b"GGML....".to_vec()).contains("magic"));
    assert!(malformed(b"GG".to_vec()).contains("magic"));
    let mut v = head(0, 0);
    v[4..8].copy_from_slice(&7u32.to_le_bytes());
    assert!(malformed(v).contains("version 7"));
    assert!(malformed(head(u64::MAX, 0)).contains("tensor count"));
    assert!(malformed(head(0, 1 << 60)).contains("metadata count"));
    // A key whose length exceeds the file.
    let mut v = head(0, 1);
    v.extend(u64::MAX.to_le_bytes());
    v.extend([0u8; 64]);
    assert!(malformed(v).contains("metadata key #0"));
    // An array claiming 2^61 strings.
    let mut v = head(0, 1);
    v.extend(3u64.to_le_bytes());
    v.extend(b"arr");
    v.extend(9u32.to_le_bytes());
    v.extend(8u32.to_le_bytes());
    v.extend((1u64 << 61).to_le_bytes());
    v.extend([0u8; 64]);
    assert!(malformed(v).contains("`arr` array length"));
    // A tensor with overflowing dimensions, and one whose data lies past the end of the file.
    let tensor = |dims: &[u64], ty: u32, offset: u64| {
        let mut v = head(1, 0);
        v.extend(1u64.to_le_bytes());
        v.push(b't');
        v.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            v.extend(d.to_le_bytes());
        }
        v.extend(ty.to_le_bytes());
        v.extend(offset.to_le_bytes());
        v.resize(v.len().div_ceil(32) * 32 + 64, 0);
        v
    };
    assert!(malformed(tensor(&[1 << 40, 1 << 40], 0, 0)).contains("overflow"));
    assert!(malformed(tensor(&[8, 8], 0, 0)).contains("outside"));
    assert!(malformed(tensor(&[4], 0, 3)).contains("alignment"));
    assert!(malformed(tensor(&[33], 8, 0)).contains("block"));
    assert!(malformed(tensor(&[4, 4, 4, 4, 4], 0, 0)).contains("dimensions"));
    // Truncations anywhere give an error, not a panic.
    for cut in (0..good.len()).step_by(97) {
        assert!(
            GgufFile::from_bytes("cut.gguf", good[..cut].to_vec()).is_err(),
            "cut at {cut}"
        );
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

    /// Random byte corruptions of a small valid GGUF never panic: the file is rejected, or it loads and every
    /// tensor request returns a value or an error.
    #[test]
    fn corrupted_gguf_never_panics(flips in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 1..8)) {
        let mut bytes = gguf_of(&random_source(LlamaConfig::tiny(), 3).unwrap()).to_bytes();
        let header_len = bytes.len().min(4096);
        for (at, val) in flips {
            let i = at % header_len;
            bytes[i] = val;
        }
        if let Ok(f) = GgufFile::from_bytes("fuzz.gguf", bytes) {
            if let Ok(s) = GgufSource::from_file(f) {
                for n in all_names(s.config()).iter().take(12) {
                    let _ = s.tensor(n);
                    let _ = s.tensor_rows(n, 0..1);
                }
                let _ = s.tokenizer();
                let _ = reference::forward_f64(&s, &[0, 1]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------- safetensors

fn write_safetensors(dir: &Path, mem: &MemorySource, dtype: safetensors::Dtype, shards: usize) {
    let c = mem.config().clone();
    let mut names = all_names(&c);
    if c.tie_word_embeddings {
        names.retain(|n| n != "lm_head.weight");
    }
    let to_bytes = |t: &Tensor| -> Vec<u8> {
        match dtype {
            safetensors::Dtype::F32 => t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            safetensors::Dtype::BF16 => t
                .data
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
                .collect(),
            safetensors::Dtype::F16 => t
                .data
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
                .collect(),
            _ => unreachable!(),
        }
    };
    let mut weight_map = serde_json::Map::new();
    let per = names.len().div_ceil(shards);
    for (s, chunk) in names.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", s + 1)
        };
        let tensors: Vec<(String, Tensor)> = chunk.iter().map(|n| (n.clone(), mem.tensor(n).unwrap())).collect();
        let data: Vec<Vec<u8>> = tensors.iter().map(|(_, t)| to_bytes(t)).collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .zip(&data)
            .map(|((n, t), d)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(dtype, t.shape.clone(), d).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for n in chunk {
            weight_map.insert(n.clone(), json!(file));
        }
    }
    if shards > 1 {
        let idx = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), idx.to_string()).unwrap();
    }
    let cfg = json!({
        "model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_ids
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

#[test]
fn safetensors_round_trip_single_and_sharded() {
    for (cfg, shards) in [(LlamaConfig::tiny(), 1), (smol_like(), 3)] {
        let mem = random_source(cfg, 11).unwrap();
        let dir = tmpdir(&format!("st{shards}"));
        write_safetensors(&dir, &mem, safetensors::Dtype::F32, shards);
        let hf = model::open(&dir).unwrap();
        assert_same_weights(&mem, hf.as_ref());
        let toks = [3u32, 1, 4, 1, 5, 9, 2, 6];
        let a = reference::forward_f64(&mem, &toks).unwrap();
        let b = reference::forward_f64(hf.as_ref(), &toks).unwrap();
        assert_eq!(max_diff(&a, &b), 0.0);
        // Opening a file inside the directory opens the directory.
        let via_config = model::open(&dir.join("config.json")).unwrap();
        assert_eq!(via_config.config(), mem.config());
        assert!(hf.tokenizer().unwrap().is_none());
        assert!(hf.chat_template().is_none());
    }
}

#[test]
fn safetensors_bf16_and_f16_convert() {
    for dtype in [safetensors::Dtype::BF16, safetensors::Dtype::F16] {
        let mem = random_source(LlamaConfig::tiny(), 5).unwrap();
        let dir = tmpdir(&format!("{dtype:?}"));
        write_safetensors(&dir, &mem, dtype, 1);
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"chat_template": "{{ messages }}"}"#,
        )
        .unwrap();
        let hf = model::open(&dir).unwrap();
        let t = hf.tensor("model.layers.1.mlp.down_proj.weight").unwrap();
        let o = mem.tensor("model.layers.1.mlp.down_proj.weight").unwrap();
        for (a, b) in t.data.iter().zip(&o.data) {
            let want = if dtype == safetensors::Dtype::BF16 {
                half::bf16::from_f32(*b).to_f32()
            } else {
                half::f16::from_f32(*b).to_f32()
            };
            assert_eq!(*a, want);
        }
        assert_eq!(hf.chat_template().as_deref(), Some("{{ messages }}"));
        assert!(hf.describe().contains(&format!("{dtype:?}")), "{}", hf.describe());
    }
}

#[test]
fn broken_checkpoints_are_named_errors() {
    let mem = random_source(LlamaConfig::tiny(), 5).unwrap();
    let dir = tmpdir("broken");
    write_safetensors(&dir, &mem, safetensors::Dtype::F32, 1);
    // Truncated safetensors file.
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 10]).unwrap();
    let e = model::open(&dir).unwrap_err();
    assert!(
        matches!(e, ModelError::Malformed { ref path, .. } if path.ends_with("model.safetensors")),
        "{e}"
    );
    // A header claiming 2^60 bytes.
    let mut lying = bytes.clone();
    lying[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(&f, &lying).unwrap();
    assert!(matches!(model::open(&dir), Err(ModelError::Malformed { .. })));
    std::fs::write(&f, &bytes).unwrap();
    // Index naming a file outside the directory.
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"weight_map": {"x": "../etc/passwd"}}"#,
    )
    .unwrap();
    let e = model::open(&dir).unwrap_err().to_string();
    assert!(e.contains("../etc/passwd"), "{e}");
    std::fs::remove_file(dir.join("model.safetensors.index.json")).unwrap();
    // config.json that is not JSON.
    std::fs::write(dir.join("config.json"), "{ nope").unwrap();
    assert!(model::open(&dir).unwrap_err().to_string().contains("config.json"));
    // Neither a file nor a directory of the right kind.
    assert!(matches!(
        model::open(&dir.join("absent.gguf")),
        Err(ModelError::Io { .. })
    ));
    std::fs::write(dir.join("x.bin"), b"hello").unwrap();
    assert!(matches!(
        model::open(&dir.join("x.bin")),
        Err(ModelError::Malformed { .. })
    ));
}

// ---------------------------------------------------------------------------------------------- tiny model

#[test]
fn tiny_model_is_deterministic_and_sane() {
    let a = tiny_random(42);
    let b = tiny_random(42);
    let c = tiny_random(43);
    assert_eq!(a.config(), &LlamaConfig::tiny());
    let e = "model.layers.2.self_attn.q_proj.weight";
    assert_eq!(a.tensor(e).unwrap(), b.tensor(e).unwrap());
    assert_ne!(a.tensor(e).unwrap(), c.tensor(e).unwrap());
    assert_eq!(
        a.tensor("lm_head.weight").unwrap(),
        a.tensor("model.embed_tokens.weight").unwrap()
    );
    let logits = reference::forward_f64(a.as_ref(), &[1, 2, 3, 4]).unwrap();
    assert_eq!((logits.len(), logits[0].len()), (4, 256));
    assert!(logits.iter().flatten().all(|v| v.is_finite()));
    // Causality: the logits at a position do not depend on later tokens.
    let longer = reference::forward_f64(a.as_ref(), &[1, 2, 3, 4, 200, 17]).unwrap();
    assert!(max_diff(&logits, &longer[..4]) < 1e-12);
    assert_ne!(logits[3], longer[5]);
    // Out-of-vocabulary tokens are an error, not a panic.
    assert!(matches!(
        reference::forward_f64(a.as_ref(), &[256]),
        Err(ModelError::InvalidInput(_))
    ));
    // MemorySource checks what it is given.
    let mut t = random_source(LlamaConfig::tiny(), 1).unwrap().into_tensors();
    t.remove("model.norm.weight");
    assert!(matches!(
        MemorySource::new(LlamaConfig::tiny(), t, "x"),
        Err(ModelError::MissingTensor { ref name, .. }) if name == "model.norm.weight"
    ));
    let _unused: HashMap<String, Tensor> = HashMap::new();
}

// ---------------------------------------------------------------------------------------------- GGUF tokenizer

/// GPT-2's byte-to-character table (printable bytes stand for themselves, the rest map to U+0100 onwards).
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}

fn toy_vocab_gguf(pre: Option<&str>, model: &str, add_bos: bool) -> GgufSource {
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into()];
    tokens.extend(byte_chars().iter().map(|c| c.to_string()));
    let merges = ["h e", "l l", "he ll", "Ġ w", "1 2"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let mut types = vec![MetaValue::I32(3)];
    types.extend(std::iter::repeat_n(MetaValue::I32(1), tokens.len() - 1));
    let mem = random_source(
        LlamaConfig {
            vocab_size: tokens.len(),
            ..LlamaConfig::tiny()
        },
        1,
    )
    .unwrap();
    let mut w = gguf_of(&mem)
        .meta("tokenizer.ggml.model", MetaValue::Str(model.into()))
        .meta(
            "tokenizer.ggml.tokens",
            MetaValue::Array(tokens.into_iter().map(MetaValue::Str).collect()),
        )
        .meta("tokenizer.ggml.token_type", MetaValue::Array(types))
        .meta(
            "tokenizer.ggml.merges",
            MetaValue::Array(merges.iter().map(|m| MetaValue::Str(m.to_string())).collect()),
        )
        .meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(add_bos));
    if let Some(p) = pre {
        w = w.meta("tokenizer.ggml.pre", MetaValue::Str(p.into()));
    }
    GgufSource::from_file(GgufFile::from_bytes("tok.gguf", w.to_bytes()).unwrap()).unwrap()
}

#[test]
fn gguf_tokenizer_follows_the_pre_tokenizer_and_specials() {
    let ids_of = |src: &GgufSource, text: &str, special: bool| -> Vec<String> {
        let tok = src.tokenizer().unwrap().unwrap();
        let enc = tok.encode(text, special).unwrap();
        enc.get_tokens().to_vec()
    };
    let gpt2 = toy_vocab_gguf(None, "gpt2", false);
    assert_eq!(
        ids_of(&gpt2, "hello world", false),
        ["hell", "o", "Ġw", "o", "r", "l", "d"]
    );
    assert_eq!(ids_of(&gpt2, "x12", false), ["x", "12"]);
    // SmolLM's pre-tokenizer splits digits apart before BPE, so "12" never merges.
    let smol = toy_vocab_gguf(Some("smollm"), "gpt2", false);
    assert_eq!(ids_of(&smol, "x12", false), ["x", "1", "2"]);
    let tok = smol.tokenizer().unwrap().unwrap();
    let enc = tok.encode("he<|endoftext|>ll", false).unwrap();
    // ids: 1 + 256 byte tokens, then the merges in order ("he" = 257, "ll" = 258).
    assert_eq!(enc.get_ids(), [257, 0, 258]);
    assert_eq!(enc.get_tokens(), ["he", "<|endoftext|>", "ll"]);
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), "he<|endoftext|>ll");
    assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "hell");
    // Llama 3's split regex compiles and keeps numbers in groups of up to three.
    let l3 = toy_vocab_gguf(Some("llama-bpe"), "gpt2", true);
    // add_bos_token prepends tokenizer.ggml.bos_token_id (1 here: the byte-0 token "Ā").
    assert_eq!(ids_of(&l3, "12", true), ["Ā", "12"]);
    assert_eq!(ids_of(&l3, "12", false), ["12"]);
    // Vocabularies this crate cannot build say so, naming the field.
    let e = toy_vocab_gguf(Some("qwen2"), "gpt2", false)
        .tokenizer()
        .unwrap_err()
        .to_string();
    assert!(e.contains("tokenizer.ggml.pre"), "{e}");
    let e = toy_vocab_gguf(None, "llama", false)
        .tokenizer()
        .unwrap_err()
        .to_string();
    assert!(e.contains("tokenizer.ggml.model"), "{e}");
}

#[path = "../../tests/support/prereq.rs"]
mod prereq;

/// `examples/gen_checkpoint` (built by `cargo test -p nccl-llm`), if it is there.
fn gen_checkpoint() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent()?.parent()?.join("examples/gen_checkpoint");
    if !p.exists() {
        prereq::missing(
            &format!("{} is not built", p.display()),
            "run `cargo test -p nccl-llm` (it builds the examples) or `cargo build -p nccl-llm --examples`",
        );
        return None;
    }
    Some(p)
}

#[test]
fn generated_checkpoints_have_the_shape_asked_for_and_the_same_bytes_every_time() {
    let Some(exe) = gen_checkpoint() else { return };
    let d = tmpdir("gen");
    let run = |out: &Path, extra: &[&str]| {
        let st = std::process::Command::new(&exe)
            .args(["--shape", "smollm2", "--layers", "2", "--out"])
            .arg(out)
            .args(extra)
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    };
    let (a, b) = (d.join("a"), d.join("b"));
    // Two shards (the ~27 MB checkpoint cut at 16 MB) against one: the same tensors either way.
    run(&a, &["--shard-bytes", "16000000"]);
    run(&b, &[]);
    let sa = model::open(&a).unwrap();
    let sb = model::open(&b).unwrap();
    let c = sa.config();
    assert_eq!(
        (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (49152, 576, 1536, 2)
    );
    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (9, 3, 64));
    assert!(c.tie_word_embeddings, "SmolLM2 ties its head to the embedding");
    assert_eq!(sb.config(), c);
    let shards = std::fs::read_dir(&a)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".safetensors")
        })
        .count();
    assert_eq!(shards, 2);
    for name in model::tensor_names(c) {
        let (ta, tb) = (sa.tensor(&name).unwrap(), sb.tensor(&name).unwrap());
        assert_eq!(ta.shape, model::expected_shape(c, &name).unwrap(), "{name}");
        assert_eq!(ta.data, tb.data, "{name}: the same seed gives the same weights");
        let bound = if name.ends_with("norm.weight") {
            (1.1f32, 0.9f32)
        } else if name.contains("embed_tokens") {
            (1.0, -1.0)
        } else {
            let fan_in = ta.shape[1] as f32;
            ((3.0 / fan_in).sqrt(), -(3.0 / fan_in).sqrt())
        };
        let (hi, lo) = ta
            .data
            .iter()
            .fold((f32::MIN, f32::MAX), |(h, l), &v| (h.max(v), l.min(v)));
        // bf16 rounding moves a bound by at most 2^-8 of it.
        let slack = |x: f32| x.abs() * 0.004 + 1e-6;
        assert!(
            hi <= bound.0 + slack(bound.0) && lo >= bound.1 - slack(bound.1),
            "{name}: [{lo}, {hi}] vs {bound:?}"
        );
        assert!(hi > lo, "{name} is constant");
    }
    // Another seed, other weights.
    let c2 = d.join("c");
    run(&c2, &["--seed", "1"]);
    let sc = model::open(&c2).unwrap();
    let n = "model.layers.1.mlp.down_proj.weight";
    assert_ne!(sc.tensor(n).unwrap().data, sa.tensor(n).unwrap().data);
    let _ = std::fs::remove_dir_all(&d);
}

#[cfg(target_os = "linux")]
#[path = "../../tests/support/smaps.rs"]
mod smaps;

/// A large f16 tensor of a GGUF file is released from the map in chunks while it is converted, not only at
/// the end: the map's resident size, sampled all along the conversion, stays near the 16 MiB release chunk
/// (without the chunked release it grows to the tensor's 64 MiB before anything is released).
#[cfg(target_os = "linux")]
#[test]
fn a_large_gguf_tensor_is_released_from_the_map_while_it_is_converted() {
    use nccl_llm::model::dequant::GgmlType;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let (rows, cols) = (4096usize, 8192usize);
    let value = |i: usize| half::f16::from_f32(((i % 251) as f32 - 125.0) / 64.0);
    let mut bytes = Vec::with_capacity(rows * cols * 2);
    for i in 0..rows * cols {
        bytes.extend_from_slice(&value(i).to_bits().to_le_bytes());
    }
    let d = tmpdir("gguf_release");
    let path = d.join("big.gguf");
    GgufWriter::new()
        .meta("general.architecture", MetaValue::Str("llama".into()))
        .tensor("big", &[rows, cols], GgmlType::F16, bytes)
        .write(&path)
        .unwrap();
    let f = GgufFile::open(&path).unwrap();
    let at = f.tensor_bytes("big").unwrap().as_ptr() as usize;
    let (done, peak) = (AtomicBool::new(false), AtomicUsize::new(0));
    let t = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(smaps::mapping_rss(at), Ordering::SeqCst);
            }
        });
        let t = f.dequantize("big").unwrap();
        done.store(true, Ordering::SeqCst);
        t
    });
    assert_eq!(t.shape, [rows, cols]);
    assert!(
        t.data.iter().enumerate().all(|(i, &v)| v == value(i).to_f32()),
        "values survive"
    );
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        peak <= (33 << 20),
        "the map held {peak} bytes of a {}-byte tensor at once",
        rows * cols * 2
    );
    let _ = std::fs::remove_dir_all(&d);
}
