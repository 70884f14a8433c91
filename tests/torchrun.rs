//! The real `torchrun` (PyTorch's PyPI wheel, installed by scripts/setup.sh into `.deps/torch`; CPU is enough)
//! launching `nccl-perf` and `tp_llama`: the ranks rendezvous through the agent's c10d `TCPStore`, as PyTorch's
//! own ranks do, with the default (static) rendezvous and with `--rdzv-backend c10d` across two agents (two
//! "nodes" on loopback). `cargo test` builds the examples next to this test binary.
//!
//! Without the wheel these tests fail under CI (naming it) and skip loudly elsewhere.

#[path = "support/prereq.rs"]
mod prereq;

use std::path::PathBuf;
use std::process::{Command, Output};

/// `(torchrun script, PYTHONPATH)` or `None` after reporting them missing.
fn torchrun() -> Option<(PathBuf, PathBuf)> {
    let script = prereq::deps_file("torch/bin/torchrun")?;
    Some((script, prereq::deps_dir().join("torch")))
}

fn torchrun_cmd(script: &PathBuf, pythonpath: &PathBuf, launch: &[&str], program: &PathBuf, args: &[&str]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .args(launch)
        .arg("--no-python")
        .arg(program)
        .args(args)
        .env("PYTHONPATH", pythonpath)
        .env("PYTHONWARNINGS", "ignore")
        .env("NCCL_RS_BOOTSTRAP_TIMEOUT", "60")
        .env("NCCL_RS_HOST_TIMEOUT_MS", "60000");
    cmd
}

fn ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn torchrun_launches_nccl_perf_through_the_agent_store() {
    let Some((script, pp)) = torchrun() else { return };
    let perf = PathBuf::from(env!("CARGO_BIN_EXE_nccl-perf"));
    let out = torchrun_cmd(
        &script,
        &pp,
        &["--nproc-per-node", "2"],
        &perf,
        &["all_reduce", "--backend", "host", "-b", "8", "-e", "64K", "-f", "8"],
    )
    .output()
    .expect("run torchrun");
    let stdout = ok(&out, "torchrun nccl-perf");
    assert!(stdout.contains("# Out of bounds values : 0 OK"), "{stdout}");
    assert!(stdout.contains("ranks: 2"), "{stdout}");
    let rows = stdout
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count();
    assert_eq!(rows, 5, "8 B .. 64 KiB by 8: 5 rows\n{stdout}");
}

#[test]
fn two_torchrun_agents_with_the_c10d_rendezvous_backend() {
    let Some((script, pp)) = torchrun() else { return };
    let perf = PathBuf::from(env!("CARGO_BIN_EXE_nccl-perf"));
    let port = nccl::bootstrap::launch::free_port("127.0.0.1".parse().unwrap()).unwrap();
    let endpoint = format!("127.0.0.1:{port}");
    let agents: Vec<_> = (0..2)
        .map(|_| {
            torchrun_cmd(
                &script,
                &pp,
                &[
                    "--nnodes",
                    "2",
                    "--nproc-per-node",
                    "1",
                    "--rdzv-backend",
                    "c10d",
                    "--rdzv-endpoint",
                    &endpoint,
                    "--rdzv-id",
                    "nccl-rs-test",
                ],
                &perf,
                &["all_gather", "--backend", "host", "-b", "1K", "-e", "1K"],
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start torchrun")
        })
        .collect();
    let outs: Vec<Output> = agents.into_iter().map(|a| a.wait_with_output().unwrap()).collect();
    let stdout: String = outs
        .iter()
        .enumerate()
        .map(|(i, o)| ok(o, &format!("agent {i}")))
        .collect();
    assert!(stdout.contains("# Out of bounds values : 0 OK"), "{stdout}");
    assert!(stdout.contains("all_gather_perf"), "{stdout}");
}

#[test]
fn torchrun_launches_tp_llama_and_it_equals_the_thread_run() {
    let Some((script, pp)) = torchrun() else { return };
    let tp = prereq::built_example("tp_llama");
    let args = [
        "--tiny",
        "--prompt-ids",
        "1,5,9,2",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
        "--json",
        "--tp",
        "2",
    ];
    let threads = Command::new(&tp).args(args).output().expect("run tp_llama");
    let threads = ok(&threads, "tp_llama as threads");
    let launched = torchrun_cmd(&script, &pp, &["--nproc-per-node", "2"], &tp, &args)
        .output()
        .expect("run torchrun");
    let launched = ok(&launched, "torchrun tp_llama");
    let ids = |s: &str| -> serde_json::Value {
        let line = s.lines().rev().find(|l| l.starts_with('{')).expect("a JSON line");
        serde_json::from_str::<serde_json::Value>(line).unwrap()["generated_ids"].clone()
    };
    assert_eq!(
        ids(&launched),
        ids(&threads),
        "torchrun:\n{launched}\nthreads:\n{threads}"
    );
    assert_eq!(ids(&threads).as_array().map(Vec::len), Some(6));
}

#[test]
fn torchrun_launches_the_serve_batch_mode_and_it_equals_the_thread_run() {
    let Some((script, pp)) = torchrun() else { return };
    let serve = prereq::built_example("serve");
    let dir = std::env::temp_dir().join(format!("torchrun_serve_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let inp = dir.join("prompts.jsonl");
    std::fs::write(
        &inp,
        "{\"prompt\": [1, 5, 9, 2]}\n{\"prompt\": [4], \"max_tokens\": 3}\n\
         {\"prompt\": [7, 7], \"temperature\": 0.8, \"seed\": 5}\n",
    )
    .unwrap();
    let run = |out: &PathBuf, launched: bool| -> String {
        let (i, o) = (inp.to_str().unwrap(), out.to_str().unwrap());
        let args = ["--tp", "2", "--max-tokens", "6", "--prompts-file", i, "--out", o];
        let r = if launched {
            torchrun_cmd(&script, &pp, &["--nproc-per-node", "2"], &serve, &args).output()
        } else {
            Command::new(&serve).args(args).output()
        };
        ok(
            &r.expect("run serve"),
            if launched { "torchrun serve" } else { "serve as threads" },
        );
        std::fs::read_to_string(out).expect("results written")
    };
    let threads = run(&dir.join("threads.jsonl"), false);
    // Under torchrun rank 0 writes the results; rank 1 runs the engine and gets every step from it.
    let launched = run(&dir.join("launched.jsonl"), true);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(launched, threads);
    assert_eq!(threads.lines().count(), 3, "{threads}");
}
