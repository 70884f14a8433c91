//! The bodies of the fuzz targets (one `fuzz_targets/<name>.rs` per function below, each a one-line libFuzzer
//! entry point). Every function takes arbitrary bytes and must return without panicking, hanging or
//! allocating without bound; where a property of the output is known, it is asserted (a failed assertion is a
//! crash to libFuzzer). Input layouts of the structured targets are documented on each function; `seedgen`
//! writes seeds in the same layouts.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use nccl::bootstrap::wire::{self, Kind, HANDSHAKE_MAX, HEADER_LEN};
use nccl::bootstrap::{BootstrapError, Launcher, RankInfo, Rendezvous, RendezvousListener, RendezvousOptions};
use nccl_llm::chat::{self, Message};
use nccl_llm::model::gguf::{GgufFile, GgufSource, GgufWriter, MetaValue};
use nccl_llm::model::{self, LlamaConfig, WeightSource};

/// Canonical tensor names of layer 0 and the last layer, plus the embedding, final norm and head.
fn names(cfg: &LlamaConfig) -> Vec<String> {
    let mut v = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
        "lm_head.weight".to_string(),
    ];
    let mut layers = vec![0];
    if cfg.num_hidden_layers > 1 {
        layers.push(cfg.num_hidden_layers - 1);
    }
    for l in layers {
        for s in [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ] {
            v.push(format!("model.layers.{l}.{s}"));
        }
    }
    v
}

/// Asks a loaded source for everything the engine asks for, checking what it hands out.
fn exercise(src: &dyn WeightSource) {
    let cfg = src.config().clone();
    assert!(cfg.validate().is_ok(), "a source handed out an invalid config: {cfg:?}");
    for n in names(&cfg) {
        let want = model::expected_shape(&cfg, &n).expect("a canonical name");
        let rows = want[0].min(2);
        if let Ok(t) = src.tensor_rows(&n, 0..rows) {
            let mut shape = want.clone();
            shape[0] = rows;
            assert_eq!(t.shape, shape, "{n}");
            assert_eq!(t.data.len(), shape.iter().product::<usize>(), "{n}");
        }
        if let Ok(Some(q)) = src.tensor_rows_quantized(&n, 0..rows) {
            assert_eq!((q.rows, q.data.len()), (rows, rows * q.row_bytes), "{n}");
        }
        // Out-of-range rows are an error, never a panic.
        assert!(src.tensor_rows(&n, want[0]..want[0] + 1).is_err(), "{n}");
        // Whole small tensors (bounded by the input size, since the data must be present).
        if want.iter().product::<usize>() <= 1 << 16 {
            if let Ok(t) = src.tensor(&n) {
                assert_eq!(t.shape, want, "{n}");
            }
        }
    }
    if let Ok(Some(tok)) = src.tokenizer() {
        if let Ok(enc) = tok.encode("Hello, world! 123", true) {
            let _ = tok.decode(enc.get_ids(), true);
        }
    }
    let _ = src.chat_template();
    let _ = src.describe();
}

/// Target `gguf`: the bytes are a GGUF file.
pub fn gguf(data: &[u8]) {
    let Ok(f) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    for t in f.tensors() {
        if let Ok(b) = f.tensor_bytes(&t.name) {
            if let Some(n) = t.n_bytes {
                assert_eq!(b.len(), n, "{}", t.name);
            }
        }
        if t.n_elements <= 1 << 16 {
            if let Ok(d) = f.dequantize(&t.name) {
                assert_eq!(d.data.len(), t.n_elements, "{}", t.name);
            }
        }
    }
    if let Ok(src) = GgufSource::from_file(f) {
        exercise(&src);
    }
}

/// Target `config_json`: the bytes are a `config.json`.
pub fn config_json(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(cfg) = LlamaConfig::from_hf_json(&v) {
        assert!(
            cfg.validate().is_ok(),
            "from_hf_json returned an invalid config: {cfg:?}"
        );
        let f = model::rope_inv_freq(&cfg);
        assert_eq!(f.len(), cfg.head_dim / 2);
    }
}

fn scratch_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("nccl-fuzz-st-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}

/// Target `safetensors_dir`: `[config length: u16 LE][config.json][model.safetensors]`, written into a
/// scratch directory and opened as a Hugging Face checkpoint.
pub fn safetensors_dir(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let n = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
    let (config, st) = data[2..].split_at(n);
    let dir = scratch_dir();
    if std::fs::write(dir.join("config.json"), config).is_err()
        || std::fs::write(dir.join("model.safetensors"), st).is_err()
    {
        return;
    }
    if let Ok(src) = model::open(&dir) {
        exercise(src.as_ref());
    }
}

/// The GGUF metadata of a small valid Llama configuration (vocabulary `vocab`), without tensors: enough for
/// `GgufSource::from_file`, which reads only metadata.
pub fn tiny_config_gguf(vocab: usize) -> GgufWriter {
    let u = |v: usize| MetaValue::U32(v as u32);
    GgufWriter::new()
        .meta("general.architecture", MetaValue::Str("llama".into()))
        .meta("llama.block_count", u(1))
        .meta("llama.context_length", u(64))
        .meta("llama.embedding_length", u(8))
        .meta("llama.feed_forward_length", u(8))
        .meta("llama.attention.head_count", u(2))
        .meta("llama.attention.head_count_kv", u(1))
        .meta("llama.vocab_size", u(vocab.max(1)))
}

/// Pre-tokenizer names tried by `gguf_tokenizer` (index = low 3 bits of the flags byte; 0 = absent).
pub const PRE: [Option<&str>; 8] = [
    None,
    Some("gpt2"),
    Some("smollm"),
    Some("llama-bpe"),
    Some("default"),
    Some("starcoder"),
    Some("qwen2"),
    Some(""),
];

/// Target `gguf_tokenizer`: `[flags][bos id]` then four sections separated by `0xFF`: tokens (one per line),
/// merges (one per line), token types (one byte each, taken mod 6), and a text to encode. Flags: bits 0-2 the
/// pre-tokenizer ([`PRE`]), bit 3 `add_bos_token`, bit 4 write the token types, bit 5 model `llama` instead
/// of `gpt2`.
pub fn gguf_tokenizer(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let (flags, bos) = (data[0], data[1]);
    let mut parts = data[2..].splitn(4, |&b| b == 0xFF);
    let mut next = || parts.next().unwrap_or(&[]);
    let (tokens, merges, types, text) = (next(), next(), next(), next());
    let lines = |b: &[u8]| -> Vec<MetaValue> {
        if b.is_empty() {
            return Vec::new();
        }
        b.split(|&c| c == b'\n')
            .map(|l| MetaValue::Str(String::from_utf8_lossy(l).into_owned()))
            .collect()
    };
    let tokens = lines(tokens);
    let mut w = tiny_config_gguf(tokens.len())
        .meta(
            "tokenizer.ggml.model",
            MetaValue::Str(if flags & 32 != 0 { "llama" } else { "gpt2" }.into()),
        )
        .meta("tokenizer.ggml.tokens", MetaValue::Array(tokens))
        .meta("tokenizer.ggml.merges", MetaValue::Array(lines(merges)))
        .meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(flags & 8 != 0))
        .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(u32::from(bos)));
    if flags & 16 != 0 {
        let t = types.iter().map(|&b| MetaValue::I32(i32::from(b % 6))).collect();
        w = w.meta("tokenizer.ggml.token_type", MetaValue::Array(t));
    }
    if let Some(p) = PRE[usize::from(flags & 7)] {
        w = w.meta("tokenizer.ggml.pre", MetaValue::Str(p.into()));
    }
    let Ok(f) = GgufFile::from_bytes("tok.gguf", w.to_bytes()) else {
        return;
    };
    let Ok(src) = GgufSource::from_file(f) else {
        return;
    };
    let Ok(Some(tok)) = src.tokenizer() else {
        return;
    };
    let text = String::from_utf8_lossy(text);
    for special in [false, true] {
        if let Ok(enc) = tok.encode(text.as_ref(), special) {
            let _ = tok.decode(enc.get_ids(), true);
            let _ = tok.decode(enc.get_ids(), false);
        }
    }
}

/// Target `chat_template`: a template, then `0x00`-separated role and content strings of the messages.
pub fn chat_template(data: &[u8]) {
    let mut parts = data.split(|&b| b == 0);
    let template = String::from_utf8_lossy(parts.next().unwrap_or(&[])).into_owned();
    let rest: Vec<String> = parts.map(|p| String::from_utf8_lossy(p).into_owned()).collect();
    let mut msgs: Vec<Message> = rest
        .chunks(2)
        .map(|c| Message {
            role: c[0].clone(),
            content: c.get(1).cloned().unwrap_or_default(),
        })
        .collect();
    if msgs.is_empty() {
        msgs.push(Message {
            role: "user".into(),
            content: "Hi".into(),
        });
    }
    let _ = chat::render(&template, &msgs, "<s>", "</s>");
}

/// Target `bootstrap_frames`: a byte stream as rank 0 receives it, through the frame decoder with the
/// handshake limit and with a 64 KiB limit. Every frame returned respects the limit.
pub fn bootstrap_frames(data: &[u8]) {
    for max in [HANDSHAKE_MAX, 64 << 10] {
        if let Ok(frames) = wire::decode_frames(data, max) {
            let total: usize = frames.iter().map(|f| HEADER_LEN + f.1.len()).sum();
            assert_eq!(total, data.len());
            assert!(frames.iter().all(|f| f.1.len() <= max));
        }
    }
}

struct Server {
    port: u16,
    handle: JoinHandle<Result<Rendezvous, BootstrapError>>,
}

static SERVER: Mutex<Option<Server>> = Mutex::new(None);

fn server_port() -> u16 {
    let mut g = SERVER.lock().unwrap_or_else(|p| p.into_inner());
    if g.as_ref().is_none_or(|s| s.handle.is_finished()) {
        if let Some(s) = g.take() {
            // A completed rendezvous (the input was a valid hello for every missing rank): start over.
            let _ = s.handle.join();
        }
        let info = RankInfo {
            rank: 0,
            world_size: 3,
            local_rank: 0,
            local_world_size: Some(3),
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            launcher: Launcher::Explicit,
        };
        let mut o = RendezvousOptions::default()
            .with_timeout(Duration::from_secs(3600))
            .with_token(None::<Vec<u8>>);
        o.handshake_timeout = Duration::from_millis(300);
        let l = RendezvousListener::bind(&info, o).expect("bind the fuzzed rank 0 on loopback");
        let port = l.local_addr().expect("listener address").port();
        let handle = std::thread::spawn(move || l.accept_ranks());
        *g = Some(Server { port, handle });
    }
    g.as_ref().map(|s| s.port).expect("server started")
}

/// Target `bootstrap_handshake`: the bytes a connecting peer sends to a real rank 0 (world size 3, no token)
/// on loopback after reading its challenge. Rank 0 must answer with well-formed frames only, and must keep
/// serving (the next input connects to the same listener unless the input completed the rendezvous).
pub fn bootstrap_handshake(data: &[u8]) {
    let mut port = server_port();
    let mut s = TcpStream::connect(("127.0.0.1", port));
    if s.is_err() {
        // The previous input may have completed the rendezvous: rank 0 closes its listener before it sends
        // the welcomes and returns. Give it a moment to finish; refusing while still running is a bug.
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_secs(5) && s.is_err() {
            std::thread::sleep(Duration::from_millis(5));
            port = server_port();
            s = TcpStream::connect(("127.0.0.1", port));
        }
    }
    let Ok(mut s) = s else {
        panic!("rank 0 stopped accepting connections on port {port}");
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
    let mut reply = Vec::new();
    let mut h = [0u8; HEADER_LEN];
    if s.read_exact(&mut h).is_err() {
        return; // closed at once: every handshake slot busy
    }
    reply.extend_from_slice(&h);
    let _ = s.write_all(data);
    let _ = s.shutdown(Shutdown::Write);
    let mut buf = [0u8; 4096];
    while reply.len() < 1 << 20 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
        }
    }
    // What arrived is a sequence of whole frames, possibly cut by our read timeout at the end.
    match wire::decode_frames(&reply, 64 << 10) {
        Ok(frames) => assert_eq!(frames[0].0, Kind::Challenge),
        Err(BootstrapError::Truncated { .. }) => {}
        Err(e) => panic!("rank 0 sent a malformed frame: {e}"),
    }
}

/// Target `perf_flags`: `nccl-perf`'s command line, arguments separated by `0x00`. Accepted flags give a
/// size table that starts at `-b`, grows, and stays within `-e`.
pub fn perf_flags(data: &[u8]) {
    let mut args = vec!["nccl-perf".to_string()];
    if !data.is_empty() {
        args.extend(data.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()));
    }
    let Ok(cli) = nccl_stack::perf::Cli::parse_and_check(&args) else {
        return;
    };
    let sizes = cli.sizes();
    assert_eq!(sizes.first(), Some(&cli.min_bytes), "{args:?}");
    assert!(sizes.windows(2).all(|w| w[0] < w[1]), "{args:?}");
    assert!(sizes.iter().all(|&s| s <= cli.max_bytes), "{args:?}");
    let _ = nccl_stack::perf::cli::warmup_sizes(cli.min_bytes, cli.max_bytes);
    let _ = std::io::sink().write_all(format!("{cli:?}").as_bytes());
}
