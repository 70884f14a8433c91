//! Counters, gauges and histograms of the server, rendered in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A histogram with fixed upper bounds (cumulative buckets, as Prometheus expects them).
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    /// A histogram over these increasing bounds (`+Inf` is implied).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            inner: Mutex::new((vec![0; bounds.len()], 0.0, 0)),
        }
    }

    /// Records one value.
    pub fn observe(&self, v: f64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (b, c) in self.bounds.iter().zip(g.0.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        g.1 += v;
        g.2 += 1;
    }

    /// Values recorded so far.
    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).2
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&g.0) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", g.2);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", g.1, g.2);
    }
}

const LATENCY: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const BATCH: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Everything `/metrics` shows.
pub struct Metrics {
    /// Requests answered, by outcome.
    pub requests_ok: AtomicU64,
    /// Requests refused for bad input (4xx other than 429).
    pub requests_invalid: AtomicU64,
    /// Requests refused for overload or unavailability (429, 503).
    pub requests_rejected: AtomicU64,
    /// Requests that failed while running (5xx after admission) or were cancelled by the client.
    pub requests_failed: AtomicU64,
    /// Requests whose client went away before the end.
    pub requests_cancelled: AtomicU64,
    /// Requests retried on another replica after a replica failure.
    pub requests_retried: AtomicU64,
    /// Prompt tokens admitted.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Replica failures seen.
    pub replica_failures: AtomicU64,
    /// Rebuild attempts of failed replicas that failed in turn.
    pub rebuild_failures: AtomicU64,
    /// Seconds from arrival to the first token.
    pub ttft: Histogram,
    /// Seconds between consecutive tokens of a sequence.
    pub itl: Histogram,
    /// Sequences per decode step.
    pub batch_size: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests_ok: AtomicU64::new(0),
            requests_invalid: AtomicU64::new(0),
            requests_rejected: AtomicU64::new(0),
            requests_failed: AtomicU64::new(0),
            requests_cancelled: AtomicU64::new(0),
            requests_retried: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            replica_failures: AtomicU64::new(0),
            rebuild_failures: AtomicU64::new(0),
            ttft: Histogram::new(LATENCY),
            itl: Histogram::new(LATENCY),
            batch_size: Histogram::new(BATCH),
        }
    }
}

/// A gauge per replica, for [`Metrics::render`].
pub struct ReplicaGauges {
    /// Replica index.
    pub index: usize,
    /// 1 when in rotation.
    pub healthy: bool,
    /// Requests waiting in its queue.
    pub queued: usize,
    /// Sequences in its running batch.
    pub running: usize,
    /// KV positions reserved.
    pub kv_used: usize,
    /// Times it was rebuilt.
    pub restarts: u64,
    /// Rebuild attempts that failed since it last worked (0 while healthy).
    pub rebuild_failures: u64,
    /// The last failed rebuild attempt's error, while the replica is still down.
    pub last_rebuild_error: Option<String>,
    /// How long until the next rebuild attempt, while one is waiting.
    pub next_rebuild_in: Option<std::time::Duration>,
}

fn counter(out: &mut String, name: &str, help: &str, label: &str, v: &AtomicU64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    let _ = writeln!(out, "{name}{label} {}", v.load(Ordering::Relaxed));
}

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self, replicas: &[ReplicaGauges]) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP nccl_llm_requests_total Requests by outcome.\n# TYPE nccl_llm_requests_total counter"
        );
        for (what, c) in [
            ("ok", &self.requests_ok),
            ("invalid", &self.requests_invalid),
            ("rejected", &self.requests_rejected),
            ("failed", &self.requests_failed),
            ("cancelled", &self.requests_cancelled),
        ] {
            let _ = writeln!(
                o,
                "nccl_llm_requests_total{{outcome=\"{what}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        counter(
            &mut o,
            "nccl_llm_requests_retried_total",
            "Requests moved to another replica after a failure.",
            "",
            &self.requests_retried,
        );
        counter(
            &mut o,
            "nccl_llm_prompt_tokens_total",
            "Prompt tokens admitted.",
            "",
            &self.prompt_tokens,
        );
        counter(
            &mut o,
            "nccl_llm_generated_tokens_total",
            "Tokens generated.",
            "",
            &self.generated_tokens,
        );
        counter(
            &mut o,
            "nccl_llm_replica_failures_total",
            "Replica failures (a rank died or timed out).",
            "",
            &self.replica_failures,
        );
        counter(
            &mut o,
            "nccl_llm_rebuild_failures_total",
            "Rebuild attempts of failed replicas that failed in turn.",
            "",
            &self.rebuild_failures,
        );
        let gauge = |o: &mut String, name: &str, help: &str, f: &dyn Fn(&ReplicaGauges) -> f64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
            for r in replicas {
                let _ = writeln!(o, "{name}{{replica=\"{}\"}} {}", r.index, f(r));
            }
        };
        gauge(
            &mut o,
            "nccl_llm_replica_healthy",
            "1 while the replica is in rotation.",
            &|r| f64::from(u8::from(r.healthy)),
        );
        gauge(
            &mut o,
            "nccl_llm_queue_depth",
            "Requests waiting for admission.",
            &|r| r.queued as f64,
        );
        gauge(
            &mut o,
            "nccl_llm_running_sequences",
            "Sequences in the running batch.",
            &|r| r.running as f64,
        );
        gauge(
            &mut o,
            "nccl_llm_kv_positions_used",
            "KV cache positions reserved per rank.",
            &|r| r.kv_used as f64,
        );
        gauge(
            &mut o,
            "nccl_llm_replica_restarts",
            "Times the replica was rebuilt.",
            &|r| r.restarts as f64,
        );
        gauge(
            &mut o,
            "nccl_llm_replica_rebuild_failures",
            "Rebuild attempts that failed since the replica last worked.",
            &|r| r.rebuild_failures as f64,
        );
        self.ttft.render(
            &mut o,
            "nccl_llm_time_to_first_token_seconds",
            "Arrival to first token.",
        );
        self.itl.render(
            &mut o,
            "nccl_llm_inter_token_latency_seconds",
            "Time between tokens of a sequence.",
        );
        self.batch_size
            .render(&mut o, "nccl_llm_batch_size", "Sequences per decode step.");
        o
    }
}
