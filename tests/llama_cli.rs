//! The `tp_llama` / `pp_llama` example binaries end to end: ranks as processes (`--nprocs`) give the same
//! tokens and logits as ranks as threads; `--json` and `--logits-out` write what they promise; bad
//! arguments are clear errors. `cargo test` builds the examples next to this test binary.

use std::path::PathBuf;
use std::process::{Command, Output};

fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target profile dir");
    let p = dir.join("examples").join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo test` (it builds the examples) or `cargo build --examples`",
        p.display()
    );
    p
}

fn run(name: &str, args: &[&str]) -> Output {
    let out = Command::new(example(name))
        .args(args)
        .env("NCCL_RS_HOST_TIMEOUT_MS", "60000")
        .output()
        .expect("run example");
    out
}

fn json_of(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line on stdout");
    serde_json::from_str(line).expect("valid JSON")
}

fn logits(path: &PathBuf) -> Vec<f32> {
    serde_json::from_str(&std::fs::read_to_string(path).expect("logits file")).expect("a JSON array of floats")
}

#[test]
fn processes_match_threads_on_the_tiny_model() {
    let dir = std::env::temp_dir().join(format!("llama_cli_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (lt, lp) = (dir.join("threads.json"), dir.join("procs.json"));
    let common = [
        "--prompt-ids",
        "1,5,9,42,7",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
        "--json",
        "--tp",
        "2",
    ];
    let threads = run(
        "tp_llama",
        &[&common[..], &["--logits-out", lt.to_str().unwrap()]].concat(),
    );
    let procs = run(
        "tp_llama",
        &[&common[..], &["--nprocs", "2", "--logits-out", lp.to_str().unwrap()]].concat(),
    );
    let (jt, jp) = (json_of(&threads), json_of(&procs));
    for key in ["prompt_ids", "generated_ids", "tp", "pp", "backend"] {
        assert_eq!(jt[key], jp[key], "{key}");
    }
    assert_eq!(jt["prompt_ids"], serde_json::json!([1, 5, 9, 42, 7]));
    assert_eq!(jt["generated_ids"].as_array().unwrap().len(), 6);
    assert_eq!(jp["processes"], serde_json::json!(true));
    assert!(jt["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(jt["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    let (a, b) = (logits(&lt), logits(&lp));
    assert_eq!(a.len(), 256, "tiny model vocabulary");
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(
        diff <= 1e-4 * scale,
        "threads vs processes logits differ by {diff} (scale {scale})"
    );
    // The same run split as a pipeline over processes.
    let pp = run(
        "pp_llama",
        &[
            "--prompt-ids",
            "1,5,9,42,7",
            "--max-new-tokens",
            "6",
            "--ignore-eos",
            "--json",
            "--nprocs",
            "2",
        ],
    );
    let jpp = json_of(&pp);
    assert_eq!(jpp["pp"], serde_json::json!(2));
    assert_eq!(jpp["generated_ids"], jt["generated_ids"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_arguments_are_clear_errors() {
    let cases: [(&[&str], &str); 5] = [
        (&["--tp", "9"], "--tp 9"),
        (&["--pp", "99"], "--pp 99"),
        (&["--prompt", "hello"], "--prompt-ids"),
        (&["--backend", "nccl"], "nccl"),
        (&["--nprocs", "3", "--tp", "2"], "--nprocs 3"),
    ];
    for (args, needle) in cases {
        let out = run("tp_llama", args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert_eq!(out.status.code(), Some(1), "{args:?}: exit code ({err})");
        assert!(err.contains("error:") && err.contains(needle), "{args:?}: {err}");
    }
}
