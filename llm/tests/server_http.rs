//! The HTTP API with real clients (curl, and the `openai` Python package from `.deps/pyclient`, installed by
//! scripts/setup.sh) against a server started in the test on 127.0.0.1 (an ephemeral port), serving the
//! tiny built-in model (prompts as token ids). Every loop is bounded.
//!
//! With `CI` set, a missing curl or openai package fails the test, naming what is missing; elsewhere the
//! test says it skipped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nccl_llm::model::{self, WeightSource};
use nccl_llm::server::{App, Pool, PoolConfig};
use nccl_llm::shard::Layout;
use serde_json::{json, Value};

struct Server {
    addr: SocketAddr,
    pool: Arc<Pool>,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    fn start(cfg: PoolConfig, max_body: usize) -> Server {
        let src: Arc<dyn WeightSource> = Arc::from(model::tiny_random(0));
        let pool = Pool::start(src, cfg).expect("pool");
        let app = App::new(pool.clone(), "tiny".into(), max_body);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = rt.spawn(nccl_llm::server::serve(
            listener,
            app,
            async {
                let _ = rx.await;
            },
            Duration::from_secs(20),
        ));
        Server {
            addr,
            pool,
            rt,
            stop: Some(tx),
            done: Some(done),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let done = self.done.take().unwrap();
        self.rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), done).await })
            .expect("server stopped within 30 s")
            .unwrap()
            .unwrap();
        self.pool.shutdown();
    }
}

fn have(tool: &str, probe: &[&str]) -> bool {
    let ok = Command::new(tool)
        .args(probe)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but `{tool}` is missing (install it)"
        );
        eprintln!("SKIPPED: `{tool}` is not installed");
    }
    ok
}

/// Status, headers (lower-case names) and body of one curl call.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

fn curl(args: &[&str]) -> Reply {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "60"])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP reply: {text} {:?}", out));
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

fn post(s: &Server, path: &str, body: &str) -> Reply {
    curl(&[
        "-H",
        "content-type: application/json",
        "--data-binary",
        body,
        &s.url(path),
    ])
}

fn error_of(r: &Reply) -> Value {
    let v = r.json();
    assert!(
        v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.body
    );
    assert!(v["error"]["type"].is_string(), "{}", r.body);
    v["error"].clone()
}

fn sse_chunks(body: &str) -> (Vec<Value>, bool) {
    let mut chunks = Vec::new();
    let mut done = false;
    for line in body.lines() {
        if let Some(d) = line.strip_prefix("data: ") {
            if d == "[DONE]" {
                done = true;
            } else {
                chunks.push(serde_json::from_str(d).unwrap_or_else(|e| panic!("bad chunk {d}: {e}")));
            }
        }
    }
    (chunks, done)
}

fn metric(s: &Server, name: &str) -> f64 {
    let r = curl(&[&s.url("/metrics")]);
    assert_eq!(r.status, 200);
    r.body
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing:\n{}", r.body))
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn completions_streaming_and_not_models_health_metrics_with_curl() {
    if !have("curl", &["--version"]) {
        return;
    }
    let s = Server::start(
        PoolConfig {
            dp: 2,
            ..PoolConfig::default()
        },
        1 << 20,
    );
    let m = curl(&[&s.url("/v1/models")]);
    assert_eq!(m.status, 200);
    assert_eq!(m.json()["data"][0]["id"], "tiny");

    let body = json!({"model": "tiny", "prompt": [1, 10, 20], "max_tokens": 9, "temperature": 0,
                      "ignore_eos": true})
    .to_string();
    let r = post(&s, "/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["completion_tokens"], 9);
    assert_eq!(v["usage"]["total_tokens"], 12);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let ids: Vec<u64> = v["choices"][0]["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 9);
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let want: String = ids.iter().map(|i| format!(" {i}")).collect();
    assert_eq!(text, want, "a model without a tokenizer shows ids as text");

    // Streaming: the same text in chunks, a finish reason, a usage chunk, then [DONE].
    let sbody = json!({"model": "tiny", "prompt": [1, 10, 20], "max_tokens": 9, "temperature": 0,
                       "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}})
    .to_string();
    let r = post(&s, "/v1/completions", &sbody);
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let (chunks, done) = sse_chunks(&r.body);
    assert!(done, "no [DONE]: {}", r.body);
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).and_then(|ch| ch["text"].as_str()))
        .collect();
    assert_eq!(streamed, text);
    assert!(chunks.len() >= 9, "one chunk per token at least: {}", chunks.len());
    let finish: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).map(|ch| &ch["finish_reason"]))
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&json!("length")]);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 9);

    // Stop strings: the text ends before the first match, finish_reason "stop".
    let stop = format!(" {}", ids[3]);
    let r = post(
        &s,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": [1, 10, 20], "max_tokens": 9, "temperature": 0, "ignore_eos": true,
                "stop": [stop]})
        .to_string(),
    );
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let cut = text.find(&stop).unwrap();
    assert_eq!(v["choices"][0]["text"], text[..cut]);

    // Seeded sampling repeats.
    let sampled = json!({"model": "tiny", "prompt": [5, 6], "max_tokens": 8, "temperature": 1.0, "seed": 11,
                         "ignore_eos": true})
    .to_string();
    let a = post(&s, "/v1/completions", &sampled).json()["choices"][0]["text"].clone();
    let b = post(&s, "/v1/completions", &sampled).json()["choices"][0]["text"].clone();
    assert_eq!(a, b);

    let h = curl(&[&s.url("/health")]);
    assert_eq!(h.status, 200);
    let hv = h.json();
    assert_eq!(hv["status"], "ok");
    assert_eq!(hv["replicas"].as_array().unwrap().len(), 2);
    assert!(metric(&s, "nccl_llm_generated_tokens_total") >= 9.0 + 9.0 + 16.0);
    assert!(metric(&s, "nccl_llm_time_to_first_token_seconds_count") >= 5.0);
    assert!(metric(&s, "nccl_llm_inter_token_latency_seconds_count") >= 8.0);
    assert!(metric(&s, "nccl_llm_requests_total{outcome=\"ok\"}") >= 5.0);
    s.stop();
}

#[test]
fn every_bad_input_gets_an_openai_error_with_the_right_status() {
    if !have("curl", &["--version"]) {
        return;
    }
    let s = Server::start(
        PoolConfig {
            kv_budget_bytes: 2 << 20, // tiny model: 512 B per position per rank → 4096 positions
            ..PoolConfig::default()
        },
        4096,
    );
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        (
            "/v1/completions",
            "{\"model\": \"tiny\", \"prompt\": [1,".into(),
            400,
            None,
        ),
        ("/v1/completions", "[1, 2]".into(), 400, None),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": [1], "max_tokens": "ten"}).to_string(),
            422,
            None,
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": {"a": 1}}).to_string(),
            422,
            None,
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": [1], "temperature": "hot"}).to_string(),
            422,
            None,
        ),
        ("/v1/completions", json!({"model": "tiny"}).to_string(), 422, None),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": [1], "max_tokens": 0}).to_string(),
            400,
            None,
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": [1], "max_tokens": -3}).to_string(),
            400,
            None,
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": [1], "max_tokens": 1_000_000_000u64}).to_string(),
            400,
            Some("context_length_exceeded"),
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": vec![1; 510], "max_tokens": 5}).to_string(),
            400,
            Some("context_length_exceeded"),
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": [1], "temperature": 9}).to_string(),
            400,
            None,
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": [1], "n": 3}).to_string(),
            400,
            None,
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": [999]}).to_string(),
            400,
            None,
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": []}).to_string(),
            400,
            None,
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "text needs a tokenizer"}).to_string(),
            400,
            None,
        ),
        (
            "/v1/completions",
            json!({"model": "gpt-9", "prompt": [1]}).to_string(),
            404,
            Some("model_not_found"),
        ),
        ("/v1/completions", json!({"prompt": [1]}).to_string(), 400, None),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": vec![100; 1500]}).to_string(), // > 4096-byte body limit
            413,
            None,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).to_string(),
            400,
            None,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": "hi"}).to_string(),
            422,
            None,
        ),
        ("/v1/nothing", "{}".into(), 404, None),
    ];
    for (path, body, status, code) in cases {
        let r = post(&s, path, &body);
        assert_eq!(r.status, status, "{path} {body}: {}", r.body);
        let e = error_of(&r);
        if let Some(c) = code {
            assert_eq!(e["code"], c, "{body}");
        }
    }
    // A reservation beyond the KV budget is refused (413), never admitted to run out of memory later.
    let small = Server::start(
        PoolConfig {
            kv_budget_bytes: 512 * 50, // 50 positions
            ..PoolConfig::default()
        },
        1 << 20,
    );
    let r = post(
        &small,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": [1, 2], "max_tokens": 200}).to_string(),
    );
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(error_of(&r)["message"].as_str().unwrap().contains("KV"), "{}", r.body);
    small.stop();
    s.stop();
}

#[test]
fn overload_gets_429_with_retry_after_and_draining_gets_503() {
    if !have("curl", &["--version"]) {
        return;
    }
    let s = Server::start(
        PoolConfig {
            max_batch: 1,
            max_queue: 1,
            step_delay: Duration::from_millis(2),
            ..PoolConfig::default()
        },
        1 << 20,
    );
    // One running (max_batch 1), one waiting (max_queue 1): the next is refused until they finish.
    let long =
        json!({"model": "tiny", "prompt": [1, 2], "max_tokens": 400, "temperature": 0, "ignore_eos": true}).to_string();
    let url = s.url("/v1/completions");
    let mut bg = Vec::new();
    for (running, queued) in [(1, 0), (1, 1)] {
        let (long, url) = (long.clone(), url.clone());
        bg.push(std::thread::spawn(move || {
            curl(&["-H", "content-type: application/json", "--data-binary", &long, &url])
        }));
        wait_until("the request running or queued", Duration::from_secs(30), || {
            let g = s.pool.gauges();
            g[0].running == running && g[0].queued == queued
        });
    }
    let r = post(&s, "/v1/completions", &long);
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    error_of(&r);
    for h in bg {
        assert_eq!(h.join().unwrap().status, 200);
    }
    s.pool.drain();
    let r = post(&s, "/v1/completions", &long);
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.header("retry-after").is_some());
    assert_eq!(curl(&[&s.url("/health")]).status, 503);
    s.stop();
}

#[test]
fn a_client_that_disconnects_cancels_its_sequence() {
    if !have("curl", &["--version"]) {
        return;
    }
    let s = Server::start(
        PoolConfig {
            step_delay: Duration::from_millis(5),
            ..PoolConfig::default()
        },
        1 << 20,
    );
    for stream in [true, false] {
        let before = metric(&s, "nccl_llm_requests_total{outcome=\"cancelled\"}");
        let body = json!({"model": "tiny", "prompt": [1, 2], "max_tokens": 500, "temperature": 0,
                          "ignore_eos": true, "stream": stream})
        .to_string();
        // curl gives up after 0.5 s, long before 500 tokens.
        let _ = Command::new("curl")
            .args([
                "-sS",
                "-N",
                "--max-time",
                "0.5",
                "-H",
                "content-type: application/json",
                "--data-binary",
            ])
            .args([&body, &s.url("/v1/completions")])
            .output()
            .unwrap();
        wait_until("the sequence cancelled", Duration::from_secs(30), || {
            metric(&s, "nccl_llm_requests_total{outcome=\"cancelled\"}") > before && s.pool.gauges()[0].running == 0
        });
        let done = metric(&s, "nccl_llm_generated_tokens_total");
        assert!(
            done < 500.0 * 2.0,
            "stream {stream}: the sequence kept running ({done} tokens)"
        );
    }
    s.stop();
}

fn pyclient() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.deps/pyclient");
    let ok = p.join("openai").is_dir();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but the openai Python package is missing from {} (run scripts/setup.sh)",
            p.display()
        );
        eprintln!(
            "SKIPPED: the openai package is not in {} (run scripts/setup.sh)",
            p.display()
        );
        return None;
    }
    Some(p)
}

#[test]
fn the_openai_python_client_works_streaming_and_not_and_sees_errors() {
    let Some(pypath) = pyclient() else { return };
    if !have("python3", &["--version"]) {
        return;
    }
    let s = Server::start(
        PoolConfig {
            dp: 2,
            ..PoolConfig::default()
        },
        1 << 20,
    );
    let script = r#"
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="none", max_retries=0, timeout=60)
assert [m.id for m in c.models.list().data] == ["tiny"]
r = c.completions.create(model="tiny", prompt=[1, 10, 20], max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
assert r.usage.completion_tokens == 7 and r.usage.prompt_tokens == 3, r.usage
assert r.choices[0].finish_reason == "length"
text = r.choices[0].text
parts = [ch.choices[0].text for ch in c.completions.create(model="tiny", prompt=[1, 10, 20], max_tokens=7,
         temperature=0, stream=True, extra_body={"ignore_eos": True}) if ch.choices]
assert "".join(parts) == text, (parts, text)
try:
    c.completions.create(model="nope", prompt=[1], max_tokens=2)
    raise SystemExit("no error for an unknown model")
except openai.NotFoundError as e:
    assert e.status_code == 404
try:
    c.completions.create(model="tiny", prompt=[1], max_tokens=0)
    raise SystemExit("no error for max_tokens 0")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "max_tokens" in str(e)
print("ok", text)
"#;
    let out = Command::new("python3")
        .env("PYTHONPATH", &pypath)
        .args(["-c", script, &format!("http://{}", s.addr)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok "));
    s.stop();
}

#[test]
fn layouts_tp2_and_pp2_serve() {
    if !have("curl", &["--version"]) {
        return;
    }
    for layout in [Layout { tp: 2, pp: 1 }, Layout { tp: 1, pp: 2 }] {
        let s = Server::start(
            PoolConfig {
                layout,
                ..PoolConfig::default()
            },
            1 << 20,
        );
        let r = post(
            &s,
            "/v1/completions",
            &json!({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "ignore_eos": true})
                .to_string(),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["usage"]["completion_tokens"], 4);
        s.stop();
    }
}
