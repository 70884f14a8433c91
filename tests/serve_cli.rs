//! The `serve` example as a user runs it: a process on 127.0.0.1 (port 0, the chosen port read from its
//! output), driven by curl and the `openai` Python package (`.deps/pyclient`, from scripts/setup.sh).
//! `cargo test` builds the examples next to this test binary (`--test serve_cli` alone does not: build them
//! first with `cargo build -p nccl-stack --examples`).
//!
//! With `CI` set, a missing example binary, curl, openai package or model file fails the test naming it;
//! elsewhere the test says it skipped. Every wait is bounded; the child is killed if a test fails.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[path = "support/prereq.rs"]
mod prereq;

fn missing(what: String) {
    prereq::missing(&what, "see scripts/setup.sh");
}

fn example() -> Option<PathBuf> {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("examples").join("serve");
    if !p.exists() {
        missing(format!(
            "{} is not built: run `cargo test` (it builds the examples) or `cargo build --examples`",
            p.display()
        ));
        return None;
    }
    Some(p)
}

fn tool(name: &str) -> bool {
    let ok = Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        missing(format!("`{name}` is not installed"));
    }
    ok
}

fn smollm2() -> Option<PathBuf> {
    let p = root().join(".deps/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !p.exists() {
        missing(format!("{} is missing (run scripts/setup.sh)", p.display()));
        return None;
    }
    Some(p)
}

/// A running server process; killed on drop.
struct Proc {
    child: Child,
    url: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(exe: &PathBuf, args: &[&str]) -> Proc {
    let mut child = Command::new(exe)
        .args(["--port", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the serve example");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix("listening on ") {
                    let url = rest.split_whitespace().next().unwrap().to_string();
                    return Proc { child, url };
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the server did not print its address within 180 s (exit: {:?})",
                    child.try_wait()
                );
            }
        }
    }
}

fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "120", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn post(p: &Proc, path: &str, body: &Value) -> (u16, String) {
    curl(&[
        "-H",
        "content-type: application/json",
        "--data-binary",
        &body.to_string(),
        &format!("{}{path}", p.url),
    ])
}

fn sse_text(body: &str, field: &dyn Fn(&Value) -> Option<String>) -> (String, bool) {
    let mut text = String::new();
    let mut done = false;
    for line in body.lines() {
        if let Some(d) = line.strip_prefix("data: ") {
            if d == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(d).unwrap_or_else(|e| panic!("bad chunk {d}: {e}"));
            if let Some(t) = field(&v) {
                text += &t;
            }
        }
    }
    (text, done)
}

#[test]
fn smollm2_chat_with_curl_and_the_openai_client_streaming_and_not() {
    let (Some(exe), Some(model)) = (example(), smollm2()) else {
        return;
    };
    if !tool("curl") {
        return;
    }
    let pyclient = root().join(".deps/pyclient");
    if !pyclient.join("openai").is_dir() {
        missing(format!(
            "the openai package is not in {} (run scripts/setup.sh)",
            pyclient.display()
        ));
        return;
    }
    let p = spawn(&exe, &["--model", model.to_str().unwrap(), "--tp", "2", "--dp", "1"]);
    let ask = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "temperature": 0, "max_tokens": 12,
                     "messages": [{"role": "user", "content": "What is the capital of France?"}]});
    let (code, body) = post(&p, "/v1/chat/completions", &ask);
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!answer.trim().is_empty(), "{body}");
    assert!(answer.contains("Paris"), "greedy SmolLM2 answers Paris: {answer:?}");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    let mut s = ask.clone();
    s["stream"] = json!(true);
    let (code, body) = post(&p, "/v1/chat/completions", &s);
    assert_eq!(code, 200);
    let (streamed, done) = sse_text(&body, &|v| {
        v["choices"][0]["delta"]["content"].as_str().map(String::from)
    });
    assert!(done);
    assert_eq!(streamed, answer, "streamed and whole answers differ");

    let script = r#"
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="none", max_retries=0, timeout=120)
msgs = [{"role": "user", "content": "What is the capital of France?"}]
r = c.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=msgs, temperature=0, max_tokens=12)
whole = r.choices[0].message.content
parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
    model="SmolLM2-135M-Instruct.Q4_1", messages=msgs, temperature=0, max_tokens=12, stream=True) if ch.choices]
assert "".join(parts) == whole, (parts, whole)
t = c.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt="The capital of France is", max_tokens=4,
                         temperature=0)
assert t.usage.prompt_tokens > 0 and t.choices[0].text
print(whole)
"#;
    let out = Command::new("python3")
        .env("PYTHONPATH", &pyclient)
        .args(["-c", script, &p.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), answer.trim_end());
}

#[test]
fn sigterm_drains_the_in_flight_request_then_exits() {
    sigterm_drain(&[]);
}

/// The same with the ranks as processes (TP 2): the drain finishes the request, then the server and both
/// rank processes exit.
#[test]
fn sigterm_drains_then_exits_with_ranks_as_processes() {
    sigterm_drain(&["--tp", "2", "--nprocs", "2"]);
}

/// The processes `pid` started (`/proc/<pid>/task/*/children`).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(c.split_whitespace().filter_map(|v| v.parse::<u32>().ok()));
            }
        }
    }
    out
}

fn sigterm_drain(extra: &[&str]) {
    let Some(exe) = example() else { return };
    if !tool("curl") {
        return;
    }
    let mut args = vec!["--step-delay-ms", "10"];
    args.extend_from_slice(extra);
    let mut p = spawn(&exe, &args);
    let ranks = children_of(p.child.id());
    if extra.contains(&"--nprocs") {
        assert!(!ranks.is_empty(), "no rank process found under the server");
    }
    let url = format!("{}/v1/completions", p.url);
    let body = json!({"model": "tiny-random", "prompt": [1, 2, 3], "max_tokens": 80, "temperature": 0,
                      "ignore_eos": true, "stream": true})
    .to_string();
    let bg = std::thread::spawn(move || {
        curl(&[
            "-N",
            "-H",
            "content-type: application/json",
            "--data-binary",
            &body,
            &url,
        ])
    });
    // Wait until it runs (80 steps of ≥ 10 ms: it is still running when the signal comes).
    let health = format!("{}/health", p.url);
    let t0 = Instant::now();
    loop {
        let (_, h) = curl(&[&health]);
        if h.contains("\"running\":1") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the request never ran: {h}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill(2) on our own child's pid, which is alive (it has not been waited for).
    let rc = unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let (code, out) = bg.join().unwrap();
    assert_eq!(code, 200);
    let (text, done) = sse_text(&out, &|v| v["choices"][0]["text"].as_str().map(String::from));
    assert!(done, "the stream was cut: {out}");
    assert_eq!(text.split_whitespace().count(), 80, "every token arrived: {text}");
    let status = wait_exit(&mut p, Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}");
    let (code, _) = curl(&[&health]);
    assert_eq!(code, 0, "nothing listens after the exit");
    wait_for_within(
        "every rank process to exit with the server",
        Duration::from_secs(10),
        || !ranks.iter().any(|&r| running(r as i32)),
    );
}

#[test]
fn prompts_file_results_come_back_in_input_order_equal_to_solo_runs() {
    let Some(exe) = example() else { return };
    let dir = std::env::temp_dir().join(format!("serve_cli_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (inp, out) = (dir.join("prompts.jsonl"), dir.join("results.jsonl"));
    let prompts: Vec<Vec<u32>> = (0..10u32)
        .map(|i| (0..1 + i % 5).map(|j| (i * 13 + j * 5 + 3) % 256).collect())
        .collect();
    let lines: Vec<String> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"prompt": p, "max_tokens": 3 + i % 4}).to_string())
        .collect();
    std::fs::write(&inp, lines.join("\n") + "\n").unwrap();
    let st = Command::new(&exe)
        .args([
            "--dp",
            "2",
            "--prompts-file",
            inp.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let got: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), prompts.len());
    let src = nccl_llm::model::tiny_random(0);
    for (i, (g, p)) in got.iter().zip(&prompts).enumerate() {
        assert_eq!(g["index"], i);
        let params = nccl_llm::engine::GenerateParams {
            max_new_tokens: 3 + i % 4,
            sampling: Default::default(),
            ignore_eos: false,
            micro_batches: 0,
        };
        let solo =
            nccl_llm::launch::generate_in_threads(&*src, nccl_llm::shard::Layout { tp: 1, pp: 1 }, 1, p, &params)
                .unwrap();
        let ids: Vec<u32> = g["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, solo[0].generated, "prompt {i}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A bad line of a prompts file (here an unknown field, which would otherwise be ignored) is an error naming
/// the file and line before any model is loaded, and no results file is written.
#[test]
fn a_bad_prompts_file_line_fails_before_the_model_loads() {
    let Some(exe) = example() else { return };
    let dir = std::env::temp_dir().join(format!("serve_cli_bad_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (inp, out) = (dir.join("prompts.jsonl"), dir.join("results.jsonl"));
    std::fs::write(
        &inp,
        "{\"prompt\": [1, 2], \"top_p\": 0.5, \"stop\": [\"x\"]}\n{\"prompt\": [3], \"top_k\": 4}\n",
    )
    .unwrap();
    let o = Command::new(&exe)
        .args(["--prompts-file", inp.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("prompts.jsonl:2") && err.contains("unknown field `top_k`"),
        "{err}"
    );
    assert!(!err.contains("loaded in"), "the model was loaded first:\n{err}");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unusable_durations_are_refused_naming_the_flag() {
    let Some(exe) = example() else { return };
    for (flag, v) in [
        ("--rebuild-backoff-secs", "0"),
        ("--rebuild-backoff-max-secs", "nan"),
        ("--step-timeout-secs", "-1"),
        ("--drain-timeout-secs", "inf"),
    ] {
        let o = Command::new(&exe)
            .args(["--port", "0", &format!("{flag}={v}")])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{flag} {v}: {err}");
        assert!(
            err.contains(&format!("{flag} must be a positive number of seconds")),
            "{flag} {v}: {err}"
        );
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("listening on"),
            "{flag} {v}"
        );
    }
    // Both positive, but the first wait longer than the longest.
    let o = Command::new(&exe)
        .args([
            "--port",
            "0",
            "--rebuild-backoff-secs",
            "5",
            "--rebuild-backoff-max-secs",
            "1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("at most --rebuild-backoff-max-secs"),
        "{err}"
    );
}

/// [`spawn`] that also collects the server's standard error (echoed to ours), line by line.
fn spawn_capturing(exe: &PathBuf, args: &[&str]) -> (Proc, mpsc::Receiver<String>) {
    spawn_capturing_env(exe, args, &[])
}

/// [`spawn_capturing`] with extra environment variables.
fn spawn_capturing_env(exe: &PathBuf, args: &[&str], env: &[(String, String)]) -> (Proc, mpsc::Receiver<String>) {
    let mut cmd = Command::new(exe);
    cmd.args(["--port", "0"]).args(args).envs(env.iter().cloned());
    spawn_command(cmd)
}

/// Starts `cmd` (a server, or a launcher of one), its stdout and stderr piped, and waits for the server's
/// address; stderr lines come on the receiver.
fn spawn_command(mut cmd: Command) -> (Proc, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the serve example");
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let (tx, rx) = mpsc::channel();
    let (etx, erx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("[server] {line}");
            let _ = etx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix("listening on ") {
                    let url = rest.split_whitespace().next().unwrap().to_string();
                    return (Proc { child, url }, erx);
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the server did not print its address within 180 s");
            }
        }
    }
}

fn wait_exit(p: &mut Proc, limit: Duration) -> std::process::ExitStatus {
    let mut status = None;
    wait_for_within("the server to exit", limit, || {
        status = p.child.try_wait().unwrap();
        status.is_some()
    });
    status.expect("it exited")
}

/// Whether process `pid` still runs (exists and is not a zombie).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| !st.contains(") Z "))
}

#[test]
fn ranks_as_processes_generate_what_rank_threads_generate() {
    let Some(exe) = example() else { return };
    if !tool("curl") {
        return;
    }
    let body = json!({"model": "tiny-random", "prompt": [5, 9, 2, 7], "max_tokens": 24, "temperature": 0,
                      "ignore_eos": true});
    let seeded = json!({"model": "tiny-random", "prompt": [3, 1], "max_tokens": 16, "temperature": 0.8,
                        "seed": 11, "ignore_eos": true});
    for (tp, pp) in [(2, 1), (1, 2), (2, 2)] {
        let (tp_s, pp_s, n) = (tp.to_string(), pp.to_string(), (tp * pp).to_string());
        let mut outs = Vec::new();
        for procs in [false, true] {
            let mut args = vec!["--tp", tp_s.as_str(), "--pp", pp_s.as_str()];
            if procs {
                args.extend(["--nprocs", n.as_str()]);
            }
            let (p, _err) = spawn_capturing(&exe, &args);
            let mut got = Vec::new();
            for b in [&body, &seeded] {
                let (code, out) = post(&p, "/v1/completions", b);
                assert_eq!(code, 200, "tp {tp} pp {pp} processes {procs}: {out}");
                let v: Value = serde_json::from_str(&out).unwrap();
                got.push(v["choices"][0]["token_ids"].clone());
            }
            let (code, h) = curl(&[&format!("{}/health", p.url)]);
            assert_eq!(code, 200, "{h}");
            outs.push(got);
        }
        assert_eq!(outs[0], outs[1], "tp {tp} pp {pp}: processes differ from threads");
        assert_eq!(outs[0][0].as_array().unwrap().len(), 24);
    }
}

/// The pid rank `rank` printed on the server's stderr (the next such line).
fn rank_pid(err: &mpsc::Receiver<String>, rank: usize) -> i32 {
    let t0 = Instant::now();
    let tag = format!("rank {rank} of ");
    loop {
        let line = err
            .recv_timeout(Duration::from_secs(60).saturating_sub(t0.elapsed()))
            .unwrap_or_else(|_| panic!("rank {rank} prints its pid"));
        if let Some(rest) = line.strip_prefix(&tag) {
            let pid = rest.split_once(": pid ").unwrap().1;
            return pid.split(',').next().unwrap().parse().unwrap();
        }
    }
}

/// Starts a plain and a streamed 300-token request on `p`, SIGKILLs process `pid` while both generate, and
/// checks that both end with a 503 within 30 s of the kill (the stream with an error event after its 200).
fn kill_mid_generation(p: &Proc, pid: i32) {
    let url = format!("{}/v1/completions", p.url);
    let spawn_req = |stream: bool| {
        let body = json!({"model": "tiny-random", "prompt": [1, 2, 3], "max_tokens": 300, "temperature": 0,
                          "ignore_eos": true, "stream": stream})
        .to_string();
        let url = url.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = curl(&[
                "-N",
                "-H",
                "content-type: application/json",
                "--data-binary",
                &body,
                &url,
            ]);
            (r, t.elapsed())
        })
    };
    let (plain, streamed) = (spawn_req(false), spawn_req(true));
    let health = format!("{}/health", p.url);
    let t0 = Instant::now();
    loop {
        let (_, h) = curl(&[&health]);
        if h.contains("\"running\":2") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the requests never ran: {h}");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: kill(2) with a pid the server printed for its rank 1 process, alive (the server is still
    // answering, and it waits for its ranks).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let killed = Instant::now();

    let ((code, out), took) = plain.join().unwrap();
    assert_eq!(code, 503, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    assert_eq!(v["error"]["type"], "service_unavailable", "{out}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("rank 1") && msg.contains("failed"), "{msg}");
    assert!(took < Duration::from_secs(60), "the request took {took:?}");
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "the error came {:?} after the kill",
        killed.elapsed()
    );

    let ((code, out), _) = streamed.join().unwrap();
    assert_eq!(code, 200, "a stream that started keeps its status: {out}");
    let last_error = out
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .next_back()
        .expect("some events");
    assert_eq!(last_error["error"]["type"], "service_unavailable", "{out}");
    assert!(out.trim_end().ends_with("data: [DONE]"), "{out}");
    let (partial, _) = sse_text(&out, &|v| v["choices"][0]["text"].as_str().map(String::from));
    assert!(
        partial.split_whitespace().count() < 300,
        "the stream ended early, not complete"
    );
}

/// 12 greedy tokens of the tiny model after a 3-token prompt, `ignore_eos`.
fn tiny_greedy() -> Value {
    json!({"model": "tiny-random", "prompt": [4, 8, 1], "max_tokens": 12, "temperature": 0, "ignore_eos": true})
}

/// The token ids of the one choice of a completion request that must succeed.
fn greedy_ids(p: &Proc, body: &Value) -> Value {
    let (code, out) = post(p, "/v1/completions", body);
    assert_eq!(code, 200, "{out}");
    serde_json::from_str::<Value>(&out).unwrap()["choices"][0]["token_ids"].clone()
}

/// Waits (60 s at most) until `/health` shows the one replica healthy after `restarts` rebuilds.
fn wait_rebuilt(p: &Proc, restarts: u64) {
    let health = format!("{}/health", p.url);
    wait_for(&format!("the replica back after {restarts} restart(s)"), || {
        let (code, h) = curl(&[&health]);
        let v: Value = serde_json::from_str(&h).unwrap_or(Value::Null);
        let r = &v["replicas"][0];
        code == 200 && r["healthy"] == true && r["restarts"] == restarts
    });
}

fn wait_for(what: &str, f: impl FnMut() -> bool) {
    wait_for_within(what, Duration::from_secs(60), f)
}

fn wait_for_within(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `serve --nprocs` starts its rank processes itself, so it starts them again: a rank killed mid-generation
/// ends the requests it held with a 503 (there is no other replica), then the replica is rebuilt on a new
/// rank process and serves the same tokens as before; a rank killed while the replica is idle is found by
/// the heartbeat and replaced too. The server never stops listening, and SIGTERM still ends it and every
/// rank process.
#[test]
fn a_rank_process_killed_mid_generation_ends_its_requests_with_503_and_the_replica_is_rebuilt() {
    let Some(exe) = example() else { return };
    if !tool("curl") {
        return;
    }
    // 300 steps of ≥ 20 ms each: both requests are still generating when the rank dies.
    let (mut p, err) = spawn_capturing(&exe, &["--tp", "2", "--nprocs", "2", "--step-delay-ms", "20"]);
    let first = rank_pid(&err, 1);
    let ids = |p: &Proc| greedy_ids(p, &tiny_greedy());
    let before = ids(&p);

    kill_mid_generation(&p, first);
    wait_rebuilt(&p, 1);
    let second = rank_pid(&err, 1);
    assert_ne!(second, first, "a new rank 1 process");
    assert_eq!(ids(&p), before, "the rebuilt replica generates what the first one did");

    // Idle: the heartbeat's empty plan finds the dead rank.
    // SAFETY: kill(2) with the pid the server printed for its new rank 1 process, alive (it just served).
    assert_eq!(unsafe { libc::kill(second, libc::SIGKILL) }, 0);
    wait_rebuilt(&p, 2);
    let third = rank_pid(&err, 1);
    assert_eq!(ids(&p), before);
    wait_for("word of the rebuild on stderr", || {
        err.try_iter().any(|l| l.contains("rebuilt and back in rotation"))
    });

    // SAFETY: kill(2) on our own child's pid, which is alive (it has not been waited for).
    assert_eq!(unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_exit(&mut p, Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}");
    wait_for("the last rank process to exit", || !running(third));
}

/// Ranks started by an outside launcher (here torchrun-style variables, as torchrun sets them) cannot be
/// started again by the server: a rank killed mid-generation ends the requests with a 503, the server says
/// its engine died and exits with an error, for the launcher or a supervisor to restart.
#[test]
fn a_launched_rank_process_killed_mid_generation_ends_its_requests_with_503_and_the_server_exits() {
    let Some(exe) = example() else { return };
    if !tool("curl") {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let env = |rank: &'static str| {
        [
            ("RANK", rank),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", rank),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", port.as_str()),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
    };
    let args = ["--tp", "2", "--step-delay-ms", "20"];
    let rank1 = Command::new(&exe)
        .args(["--port", "0"])
        .args(args)
        .envs(env("1"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rank 1");
    let rank1 = Proc {
        child: rank1,
        url: String::new(),
    };
    let (mut p, err) = spawn_capturing_env(&exe, &args, &env("0"));
    kill_mid_generation(&p, rank1.child.id() as i32);

    // Dead, not serving: /health is 503 "dead" while the server still answers, then nothing listens.
    let health = format!("{}/health", p.url);
    let (code, h) = curl(&[&health]);
    assert!(
        code == 0 || (code == 503 && h.contains("\"dead\"")),
        "/health after the kill: {code} {h}"
    );
    let status = wait_exit(&mut p, Duration::from_secs(30));
    assert!(!status.success(), "the server exits with an error: {status:?}");
    let said: Vec<String> = err.try_iter().collect();
    assert!(
        said.iter().any(|l| l.contains("the engine died")),
        "no clear message on stderr: {said:?}"
    );
    let (code, _) = curl(&[&health]);
    assert_eq!(code, 0, "nothing listens after the exit");
}

/// The back-off of a failed replica whose ranks cannot start, on a pipeline layout (`--pp 2`, rank 1 the
/// last stage): the model file is moved away, so every new rank process fails while loading. `/health`
/// shows the replica down with its failed attempts and their error, requests get 503, and the attempts
/// are spaced by the doubling, capped back-off. Once the file is back the replica is rebuilt and serves
/// the same tokens as before.
#[test]
fn a_pipeline_replica_whose_rank_cannot_start_backs_off_then_rejoins_when_it_can() {
    let Some(exe) = example() else { return };
    let Some(model) = smollm2() else { return };
    if !tool("curl") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("serve-backoff-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("smol.gguf");
    std::os::unix::fs::symlink(&model, &link).unwrap();
    let link_s = link.to_str().unwrap();
    let (mut p, err) = spawn_capturing(
        &exe,
        &[
            "--model",
            link_s,
            "--pp",
            "2",
            "--nprocs",
            "2",
            "--rebuild-backoff-secs",
            "0.2",
            "--rebuild-backoff-max-secs",
            "0.8",
        ],
    );
    let first = rank_pid(&err, 1);
    let greedy = json!({"model": "smol", "prompt": "The capital of France is", "max_tokens": 8,
                        "temperature": 0});
    let ids = |p: &Proc| greedy_ids(p, &greedy);
    let before = ids(&p);

    std::fs::remove_file(&link).unwrap();
    // SAFETY: kill(2) with the pid the server printed for its rank 1 process, alive (it just served).
    assert_eq!(unsafe { libc::kill(first, libc::SIGKILL) }, 0);
    let health = format!("{}/health", p.url);
    let mut down = Value::Null;
    wait_for("four failed rebuild attempts in /health", || {
        let (code, h) = curl(&[&health]);
        down = serde_json::from_str(&h).unwrap_or(Value::Null);
        code == 503 && down["replicas"][0]["rebuild_failures"].as_u64().unwrap_or(0) >= 4
    });
    assert_eq!(down["status"], "unavailable", "{down}");
    assert_eq!(down["replicas"][0]["healthy"], false, "{down}");
    let why = down["replicas"][0]["last_rebuild_error"].as_str().unwrap_or_default();
    assert!(why.contains("rank 1's process exited with code 1"), "{down}");
    assert!(
        down["replicas"][0]["next_rebuild_in_secs"]
            .as_f64()
            .is_some_and(|s| s <= 0.8),
        "{down}"
    );
    let (code, out) = post(&p, "/v1/completions", &greedy);
    assert_eq!(code, 503, "a request while no replica is up: {out}");

    // The attempts' waits, as the server reports them: doubling from 0.2 s, capped at 0.8 s.
    let mut waits = Vec::new();
    wait_for("four rebuild attempts on stderr", || {
        for l in err.try_iter() {
            if let Some(w) = l.split("retrying in ").nth(1) {
                waits.push(w.trim_end_matches(" s").to_string());
            }
        }
        waits.len() >= 4
    });
    assert_eq!(waits[..4], ["0.200", "0.400", "0.800", "0.800"], "{waits:?}");

    std::os::unix::fs::symlink(&model, &link).unwrap();
    wait_rebuilt(&p, 1);
    assert_eq!(ids(&p), before, "the rebuilt pipeline generates what the first one did");
    let (_, h) = curl(&[&health]);
    let v: Value = serde_json::from_str(&h).unwrap();
    assert_eq!(v["replicas"][0]["rebuild_failures"], 0, "{h}");
    assert!(v["replicas"][0].get("last_rebuild_error").is_none(), "{h}");

    // SAFETY: kill(2) on our own child's pid, which is alive (it has not been waited for).
    assert_eq!(unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_exit(&mut p, Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A 2-D replica (`--tp 2 --pp 2`, four rank processes): a rank of the second stage's TP group killed
/// while idle is found by the heartbeat; the replica is rebuilt on four fresh processes and generates
/// what it did before.
#[test]
fn a_two_dimensional_replica_is_rebuilt_after_a_rank_process_dies() {
    let Some(exe) = example() else { return };
    if !tool("curl") {
        return;
    }
    let (mut p, err) = spawn_capturing(&exe, &["--tp", "2", "--pp", "2", "--nprocs", "4"]);
    let rank3 = rank_pid(&err, 3);
    let ids = |p: &Proc| greedy_ids(p, &tiny_greedy());
    let before = ids(&p);
    // SAFETY: kill(2) with the pid the server printed for its rank 3 process, alive (it just served).
    assert_eq!(unsafe { libc::kill(rank3, libc::SIGKILL) }, 0);
    wait_rebuilt(&p, 1);
    assert_ne!(rank_pid(&err, 3), rank3, "a new rank 3 process");
    assert_eq!(ids(&p), before);
    // SAFETY: kill(2) on our own child's pid, which is alive (it has not been waited for).
    assert_eq!(unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_exit(&mut p, Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}");
}

/// The server under the real OpenMPI `mpirun` (two ranks, `--tp 2`): rank 0 serves HTTP, rank discovery
/// comes from `OMPI_COMM_WORLD_*` alone, the tokens equal those of rank threads, and SIGTERM to `mpirun`
/// (which forwards it to every rank) drains the server and ends every rank process.
#[test]
fn the_server_runs_under_mpirun_and_stops_on_sigterm() {
    let Some(exe) = example() else { return };
    if !tool("curl") {
        return;
    }
    let Some(mpirun) = prereq::program("mpirun", "install Debian's openmpi-bin (scripts/setup.sh does)") else {
        return;
    };
    let ids = |p: &Proc| greedy_ids(p, &tiny_greedy());
    let threads = {
        let (p, _err) = spawn_capturing(&exe, &["--tp", "2"]);
        ids(&p)
    };
    let mut cmd = Command::new(mpirun);
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
        .arg(&exe)
        .args(["--tp", "2", "--port", "0"])
        .stdin(Stdio::null());
    for v in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ] {
        cmd.env_remove(v);
    }
    let (mut p, err) = spawn_command(cmd);
    let rank1 = rank_pid(&err, 1);
    assert_eq!(ids(&p), threads, "mpirun ranks generate what rank threads generate");
    let (code, h) = curl(&[&format!("{}/health", p.url)]);
    assert_eq!(code, 200, "{h}");
    // SAFETY: kill(2) on our own child's pid (mpirun), which is alive (it has not been waited for).
    assert_eq!(unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) }, 0);
    // mpirun's own status after a forwarded signal is its business (OpenMPI 4 exits 1); the server's drain
    // and the end of every rank are ours.
    wait_exit(&mut p, Duration::from_secs(30));
    let mut said = Vec::new();
    wait_for("the server's word that it stopped", || {
        said.extend(err.try_iter());
        said.iter().any(|l| l == "stopped")
    });
    wait_for("rank 1's process to exit", || !running(rank1));
}

/// The server's two ranks as `srun --ntasks 2` starts them (only Slurm's variables, rank 0's port from
/// `MASTER_PORT` as a batch script would export it): the same tokens as rank threads, and SIGTERM to rank 0
/// (srun forwards it to every task; rank 1 ignores it) drains and ends both.
#[test]
fn slurm_style_ranks_serve_what_threads_serve() {
    let Some(exe) = example() else { return };
    if !tool("curl") {
        return;
    }
    let ids = |p: &Proc| greedy_ids(p, &tiny_greedy());
    let threads = {
        let (p, _err) = spawn_capturing(&exe, &["--tp", "2"]);
        ids(&p)
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let slurm = |rank: &str| {
        let mut cmd = Command::new(&exe);
        cmd.args(["--tp", "2", "--port", "0"])
            .env("SLURM_PROCID", rank)
            .env("SLURM_LOCALID", rank)
            .env("SLURM_NODEID", "0")
            .env("SLURM_NTASKS", "2")
            .env("SLURM_STEP_TASKS_PER_NODE", "2")
            .env("SLURM_JOB_NODELIST", "localhost")
            .env("SLURM_JOB_ID", "4242")
            .env("SLURM_STEP_ID", "0")
            .env("MASTER_PORT", &port);
        for v in [
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
            "OMPI_COMM_WORLD_RANK",
        ] {
            cmd.env_remove(v);
        }
        cmd
    };
    // A Proc, so that a failing test kills it too.
    let mut rank1 = Proc {
        child: slurm("1").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap(),
        url: String::new(),
    };
    let (mut p, _err) = spawn_command(slurm("0"));
    assert_eq!(
        ids(&p),
        threads,
        "Slurm-style ranks generate what rank threads generate"
    );
    // SAFETY: kill(2) on our own child's pid (rank 0), which is alive (it has not been waited for).
    assert_eq!(unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_exit(&mut p, Duration::from_secs(30));
    assert!(status.success(), "rank 0: {status:?}");
    let mut done = None;
    wait_for_within(
        "rank 1 to exit after rank 0's stop plan",
        Duration::from_secs(30),
        || {
            done = rank1.child.try_wait().unwrap();
            done.is_some()
        },
    );
    assert!(done.unwrap().success(), "rank 1: {done:?}");
}

/// `--backend nccl` / `--device cuda` in the build the tests use (no `cuda` feature): refused at once, naming
/// the feature, and `--device cuda` without NCCL naming that; nothing listens. (The GPU-engine replica
/// itself: `engine_gpu::the_server_on_the_gpu_engine_serves_what_the_engine_generates`, needs 1 GPU.)
#[test]
fn gpu_engines_are_refused_in_a_build_without_cuda() {
    let Some(exe) = example() else { return };
    for (args, needle) in [
        (&["--backend", "nccl"][..], "rebuild with --features cuda"),
        (
            &["--backend", "nccl", "--device", "cuda", "--tp", "2"][..],
            "rebuild with --features cuda",
        ),
        (&["--device", "cuda"][..], "--device cuda needs --backend nccl"),
    ] {
        let o = Command::new(&exe).args(["--port", "0"]).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        // (A `cuda` build on a host without a GPU says that instead.)
        assert!(
            err.contains(needle) || err.contains("no CUDA device"),
            "{args:?}: {err}"
        );
        assert!(!String::from_utf8_lossy(&o.stdout).contains("listening on"), "{args:?}");
    }
}
