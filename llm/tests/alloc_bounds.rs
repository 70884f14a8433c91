//! Resource bounds of the model loaders, measured with a counting global allocator: a file whose header lies
//! (counts and lengths larger than the data that follows) is refused having allocated at most the file's size
//! plus a small constant, whatever the lie. Each test runs alone under `MEASURE` (the counter is
//! process-wide), so tests in this binary do not disturb each other's figures.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nccl_llm::model::gguf::GgufFile;
use nccl_llm::model::{self, ModelError};

#[path = "../../tests/support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::peak_of;

static MEASURE: Mutex<()> = Mutex::new(());

/// Taken for the whole of each test: the counters see every thread's allocations.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    MEASURE.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a refused file may cost beyond its own size: error messages, paths, a few small vectors.
const SLACK: usize = 64 << 10;

/// A scratch directory, removed when dropped (also when the test fails).
struct TmpDir(PathBuf);

impl std::ops::Deref for TmpDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmp(tag: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("alloc_bounds_{tag}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

fn gguf_head(tensors: u64, kvs: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(tensors.to_le_bytes());
    b.extend(kvs.to_le_bytes());
    b
}

/// Pads `b` to `len` bytes with `fill`.
fn padded(mut b: Vec<u8>, len: usize, fill: u8) -> Vec<u8> {
    b.resize(len, fill);
    b
}

const LEN: usize = 1 << 20;

/// GGUF files of 1 MiB whose counts claim as many items as could fit in the rest of the file, followed by
/// data that fails at the first or second item. Rejected, and never more than the file size + `SLACK`.
fn lying_ggufs() -> Vec<(&'static str, Vec<u8>)> {
    let mut cases = Vec::new();
    // Metadata count at its plausible maximum (13 bytes per entry); all-zero entries are valid until the
    // second empty key repeats the first.
    cases.push(("metadata count", padded(gguf_head(0, (LEN as u64 - 24) / 13), LEN, 0)));
    // Tensor count at its plausible maximum (36 bytes per entry); the first tensor has 0 dimensions.
    cases.push(("tensor count", padded(gguf_head((LEN as u64 - 24) / 36, 0), LEN, 0)));
    // A boolean array claiming one element per remaining byte; the elements are 2 (not a boolean).
    let arr = |ety: u32, n: u64| {
        let mut v = gguf_head(0, 1);
        v.extend(1u64.to_le_bytes());
        v.push(b'a');
        v.extend(9u32.to_le_bytes());
        v.extend(ety.to_le_bytes());
        v.extend(n.to_le_bytes());
        v
    };
    let head = arr(7, 0).len() as u64;
    cases.push(("bool array length", padded(arr(7, LEN as u64 - head), LEN, 2)));
    // A string array claiming one 8-byte length per 8 bytes; each string claims 2^40 bytes.
    cases.push((
        "string array length",
        padded(arr(8, (LEN as u64 - head) / 8), LEN, 0xFF),
    ));
    // Nested arrays: an array of arrays (12 bytes minimum each) whose first element is a boolean array
    // claiming the rest of the file, filled with bytes that are not booleans.
    let mut nested = arr(9, (LEN as u64 - head) / 12);
    nested.extend(7u32.to_le_bytes());
    nested.extend((LEN as u64 - head - 12).to_le_bytes());
    cases.push(("nested array length", padded(nested, LEN, 0xEE)));
    // A key whose length claims the whole rest of the file, then the file ends one byte early.
    let mut key = gguf_head(0, 1);
    key.extend((LEN as u64 - 32).to_le_bytes());
    cases.push(("key length", padded(key, LEN - 1, b'k')));
    cases
}

#[test]
fn lying_gguf_headers_cost_at_most_the_file_size() {
    let _serial = serial();
    let dir = tmp("gguf");
    for (what, bytes) in lying_ggufs() {
        let len = bytes.len();
        // In memory: the image itself is already allocated; parsing may add at most its size again.
        let (r, peak) = peak_of(|| GgufFile::from_bytes("lying.gguf", bytes.clone()).map(|_| ()));
        let e = r.expect_err(what);
        assert!(matches!(e, ModelError::Malformed { .. }), "{what}: {e}");
        assert!(
            peak <= 2 * len + SLACK,
            "{what}: parsing a {len}-byte image allocated {peak} bytes ({e})"
        );
        // From a file (memory-mapped): at most the file's size plus the slack, through the public entry point.
        let p = dir.join("lying.gguf");
        std::fs::write(&p, &bytes).unwrap();
        let (r, peak) = peak_of(|| model::open(&p).map(|_| ()));
        eprintln!("GGUF {what}: {peak} bytes allocated opening a {len}-byte file");
        let e = r.expect_err(what);
        assert!(matches!(e, ModelError::Malformed { .. }), "{what}: {e}");
        assert!(
            peak <= len + SLACK,
            "{what}: opening a {len}-byte file allocated {peak} bytes ({e})"
        );
    }
}

/// Honest metadata costs memory in proportion to what the file holds: at most 32 bytes per value plus the
/// string bytes (documented in docs/bad-inputs.md); a 1 MiB array of one-byte values is the worst case.
#[test]
fn honest_gguf_metadata_costs_at_most_32_bytes_per_value() {
    let _serial = serial();
    assert_eq!(std::mem::size_of::<nccl_llm::model::gguf::MetaValue>(), 32);
    let mut v = gguf_head(0, 1);
    v.extend(1u64.to_le_bytes());
    v.push(b'a');
    v.extend(9u32.to_le_bytes());
    v.extend(0u32.to_le_bytes()); // u8 elements
    let n = LEN - v.len() - 8;
    v.extend((n as u64).to_le_bytes());
    let bytes = padded(v, LEN, 7);
    let (r, peak) = peak_of(|| GgufFile::from_bytes("u8s.gguf", bytes.clone()).map(|f| f.metadata().len()));
    assert_eq!(r.unwrap(), 1);
    assert!(peak <= 2 * LEN + 32 * n + SLACK, "{peak}");
}

fn write_checkpoint(dir: &Path, config: &str, st: &[u8]) {
    std::fs::write(dir.join("config.json"), config).unwrap();
    std::fs::write(dir.join("model.safetensors"), st).unwrap();
}

const CONFIG: &str = r#"{"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}"#;

/// A safetensors file: `header` as its JSON header, then `data_len` bytes.
fn safetensors(header: &str, data_len: usize) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend(header.as_bytes());
    v.resize(v.len() + data_len, 0);
    v
}

#[test]
fn lying_safetensors_and_config_cost_at_most_the_file_size() {
    let _serial = serial();
    let dir = tmp("st");
    let big_header = {
        let mut v = safetensors("{}", 0);
        v[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        v.resize(LEN, b' ');
        v
    };
    let past_end = {
        let mut v = safetensors("{}", 0);
        v[..8].copy_from_slice(&(LEN as u64 * 4).to_le_bytes());
        v.resize(LEN, b' ');
        v
    };
    let huge_shape = safetensors(
        r#"{"model.norm.weight": {"dtype": "F32", "shape": [1099511627776, 1099511627776], "data_offsets": [0, 32]}}"#,
        LEN,
    );
    let offsets_past_end = safetensors(
        r#"{"model.norm.weight": {"dtype": "F32", "shape": [8], "data_offsets": [0, 1099511627776]}}"#,
        LEN,
    );
    for (what, config, st) in [
        ("header length 2^60", CONFIG.to_string(), big_header),
        ("header length past the end", CONFIG.to_string(), past_end),
        ("shape overflowing", CONFIG.to_string(), huge_shape),
        (
            "data offsets past the end",
            CONFIG.to_string(),
            offsets_past_end.clone(),
        ),
        (
            "config claiming 2^40 hidden units",
            CONFIG.replace(r#""hidden_size": 8"#, r#""hidden_size": 1099511627776"#),
            offsets_past_end,
        ),
    ] {
        write_checkpoint(&dir, &config, &st);
        let len = st.len() + config.len();
        let (r, peak) = peak_of(|| model::open(&dir).map(|_| ()));
        eprintln!("checkpoint {what}: {peak} bytes allocated opening {len} bytes of files");
        let e = r.expect_err(what);
        assert!(
            matches!(e, ModelError::Malformed { .. } | ModelError::Config { .. }),
            "{what}: {e}"
        );
        assert!(
            peak <= len + SLACK,
            "{what}: a {len}-byte checkpoint allocated {peak} bytes ({e})"
        );
    }
}

/// Writes `src` as a one-file f32 safetensors checkpoint with its `config.json`.
fn write_f32_checkpoint(dir: &Path, src: &dyn model::WeightSource) {
    let c = src.config();
    let names = model::tensor_names(c);
    let tensors: Vec<(String, model::Tensor)> = names
        .into_iter()
        .map(|n| (n.clone(), src.tensor(&n).unwrap()))
        .collect();
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, t)| t.data.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, t), b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), b).unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let cfg = serde_json::json!({
        "model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": false
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

/// Loading one rank's tensor-parallel shard holds, at its peak, the shard plus one part of one tensor: the
/// row-parallel matrices (`o_proj`, `down_proj`) are read column by column from the file rather than whole,
/// and the fused QKV and gate-up matrices are filled part by part rather than stacked from copies. The model
/// is shaped so that its MLP matrices dominate (as in Llama). Before these reads a rank of TP 2 peaked at
/// 2.17 MB for a 1.66 MB shard with 0.26 MB parts: its shard plus a whole `down_proj` and copies of gate and up.
#[test]
fn a_rank_loads_its_shard_without_holding_whole_tensors() {
    let _g = serial();
    let cfg = model::LlamaConfig {
        vocab_size: 64,
        hidden_size: 64,
        intermediate_size: 2048,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 4,
        head_dim: 16,
        tie_word_embeddings: false,
        ..model::LlamaConfig::tiny()
    };
    let mem = model::random_source(cfg.clone(), 5).unwrap();
    let dir = tmp("shard_peak");
    write_f32_checkpoint(&dir, &mem);
    let src = model::open(&dir).unwrap();
    for tp in [1, 2, 4] {
        let place = nccl_llm::engine::RankPlace {
            tp,
            tp_rank: tp - 1,
            pp: 1,
            stage: 0,
            threads: 1,
        };
        let base = counting_alloc::start();
        let m = nccl_llm::engine::RankModel::load_with(src.as_ref(), place, true, &mut |_, _| {}).unwrap();
        let peak = counting_alloc::peak_above(base);
        let held = counting_alloc::start() - base;
        // The largest single part a rank reads: one rank's rows of gate (or up), or its columns of down.
        let part = cfg.intermediate_size / tp * cfg.hidden_size * 4;
        assert!(
            held >= m.weight_bytes(),
            "tp {tp}: {held} bytes held for {} of weights",
            m.weight_bytes()
        );
        assert!(
            peak <= held + part + SLACK,
            "tp {tp}: loading peaked at {peak} bytes for a {held}-byte shard (one part is {part} bytes)"
        );
        drop(m);
    }
}
