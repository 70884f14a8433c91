//! Builds a `tokenizers::Tokenizer` from the vocabulary and merges embedded in a GGUF file.
//!
//! Only byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`) are supported. The pre-tokenizer follows
//! `tokenizer.ggml.pre`, mirroring what llama.cpp does for the same value (and what the original
//! `tokenizer.json` of those models contains).

use serde_json::{json, Map, Value};

use super::gguf::{GgufFile, MetaValue};
use super::ModelError;

/// Llama 3's split regex (`tokenizer.json` of Llama 3 uses it in a `Split` before a regex-less `ByteLevel`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn pre_tokenizer(pre: Option<&str>) -> Result<Value, ModelError> {
    Ok(match pre {
        None | Some("default" | "gpt2" | "mpt" | "olmo" | "jais") => byte_level(true),
        // llama.cpp: these split every digit apart first, then apply GPT-2's regex.
        Some("smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva") => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]
        }),
        Some("llama-bpe" | "llama3" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe") => json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
                byte_level(false)
            ]
        }),
        Some(other) => {
            return Err(ModelError::Unsupported(format!(
                "tokenizer.ggml.pre `{other}` (pre-tokenizer not known)"
            )))
        }
    })
}

fn str_array<'a>(f: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>, ModelError> {
    match f.meta(key) {
        None => Ok(None),
        Some(v) => {
            let a = v.as_array().ok_or_else(|| ModelError::config(key, "not an array"))?;
            a.iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_str()
                        .ok_or_else(|| ModelError::config(key, format!("element {i} is not a string")))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        }
    }
}

/// The tokenizer embedded in `f`, `Ok(None)` if the file carries none.
pub(crate) fn from_gguf(f: &GgufFile) -> Result<Option<tokenizers::Tokenizer>, ModelError> {
    let model = match f.meta("tokenizer.ggml.model") {
        None => return Ok(None),
        Some(v) => v
            .as_str()
            .ok_or_else(|| ModelError::config("tokenizer.ggml.model", "not a string"))?,
    };
    if model != "gpt2" {
        return Err(ModelError::Unsupported(format!(
            "tokenizer.ggml.model `{model}` (only byte-level BPE, `gpt2`, is supported; run with --prompt-ids)"
        )));
    }
    let tokens =
        str_array(f, "tokenizer.ggml.tokens")?.ok_or_else(|| ModelError::config("tokenizer.ggml.tokens", "missing"))?;
    let merges = str_array(f, "tokenizer.ggml.merges")?.unwrap_or_default();
    let types: Vec<i64> = match f.meta("tokenizer.ggml.token_type") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .ok_or_else(|| ModelError::config("tokenizer.ggml.token_type", "not an array"))?
            .iter()
            .map(|x| {
                x.as_i64()
                    .ok_or_else(|| ModelError::config("tokenizer.ggml.token_type", "not integers"))
            })
            .collect::<Result<_, _>>()?,
    };
    if !types.is_empty() && types.len() != tokens.len() {
        return Err(ModelError::config(
            "tokenizer.ggml.token_type",
            format!("{} entries for {} tokens", types.len(), tokens.len()),
        ));
    }
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        if !vocab.contains_key(*tok) {
            vocab.insert(tok.to_string(), json!(id));
        }
        // 3 = control (special), 4 = user-defined (added, not special).
        match types.get(id) {
            Some(3) | Some(4) => added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": types[id] == 3
            })),
            _ => {}
        }
    }
    let merges: Vec<Value> = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| ModelError::config("tokenizer.ggml.merges", format!("entry {i} `{m}` has no space")))?;
            Ok(json!([a, b]))
        })
        .collect::<Result<_, ModelError>>()?;
    let pre = match f.meta("tokenizer.ggml.pre") {
        None => None,
        Some(v) => Some(
            v.as_str()
                .ok_or_else(|| ModelError::config("tokenizer.ggml.pre", "not a string"))?,
        ),
    };
    let add_bos = f
        .meta("tokenizer.ggml.add_bos_token")
        .and_then(MetaValue::as_bool)
        .unwrap_or(false);
    let post = match (
        add_bos,
        f.meta("tokenizer.ggml.bos_token_id").and_then(MetaValue::as_u64),
    ) {
        (true, Some(bos)) => {
            let bos_tok = tokens
                .get(bos as usize)
                .ok_or_else(|| ModelError::config("tokenizer.ggml.bos_token_id", format!("{bos} is not a token")))?;
            json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos_tok, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos_tok.to_string(): {"id": bos_tok, "ids": [bos], "tokens": [bos_tok]}}
            })
        }
        _ => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true}),
    };
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(pre)?,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    });
    let text = doc.to_string();
    text.parse::<tokenizers::Tokenizer>()
        .map(Some)
        .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", f.path().display())))
}
