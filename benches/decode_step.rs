//! The engine's decode step: one token through every layer and the LM head (TP=1, this thread), on the real
//! SmolLM2 that scripts/setup.sh fetched (else the built-in tiny model), with the weights kept as the file
//! stores them and with the f32 path (`NCCL_LLM_F32_WEIGHTS=1` at load). The reference measured in the same
//! run is one pass of reading the f32 weights' bytes (`weight_bytes`), i.e. the memory-bandwidth floor of the
//! f32 path. The int8 decode path (`DecodePath::Int8`) runs on the same quantized weights; a second group
//! times one matrix-vector product of Q4_1 matrices (256 × 576, and SmolLM2's fused gate/up 3072 × 576) on both paths, in this
//! thread's CPU time (so that load from other processes on a shared machine counts less).
//! A third group, `decode_batch`, times one batched step of the server (`Rank::step`: 1, 4 and 16 sequences
//! of one token each, layers and LM head) on each decode path, in tokens per second.
//! `cargo bench --bench decode_step`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nccl_llm::comm::SingleComm;
use nccl_llm::engine::{KvCache, Rank, RankModel, RankPlace};
use nccl_llm::math::{DecodePath, QMatrix};
use nccl_llm::model::{self, WeightSource};

const CONTEXT: usize = 256;

fn source() -> Arc<dyn WeightSource> {
    match nccl_llm::cli::default_model() {
        Some(p) => Arc::from(model::open(&p).expect("open the fetched model")),
        None => {
            eprintln!("decode_step: no fetched model (run scripts/setup.sh); benchmarking the built-in tiny model");
            Arc::from(model::tiny_random(0))
        }
    }
}

fn load(src: &dyn WeightSource, f32_weights: bool) -> RankModel {
    // The engine reads the switch when it loads (it decides how matrices are kept).
    if f32_weights {
        std::env::set_var("NCCL_LLM_F32_WEIGHTS", "1");
    } else {
        std::env::remove_var("NCCL_LLM_F32_WEIGHTS");
    }
    let place = RankPlace::single(1);
    RankModel::load(src, place, &mut |_, _| {}).expect("load the model")
}

/// `iters` decode steps at positions 8.., refilling the cache (untimed) when it is full.
fn decode(m: &RankModel, iters: u64) -> Duration {
    let comm = SingleComm;
    let mut cache = m.new_cache(CONTEXT);
    let prompt = [1u32, 2, 3, 4, 5, 6, 7, 8];
    let mut total = Duration::ZERO;
    let prefill = |cache: &mut nccl_llm::engine::KvCache| {
        cache.clear();
        let mut x = m.embed(&prompt, &comm).unwrap();
        m.forward_layers(&mut x, prompt.len(), cache, &comm).unwrap();
    };
    prefill(&mut cache);
    for i in 0..iters {
        if cache.len() == CONTEXT {
            prefill(&mut cache);
        }
        let t = Instant::now();
        let mut x = m.embed(&[(i % 100) as u32 + 10], &comm).unwrap();
        m.forward_layers(&mut x, 1, &mut cache, &comm).unwrap();
        let logits = m.logits(&x, &comm).unwrap();
        std::hint::black_box(logits);
        total += t.elapsed();
    }
    total
}

/// `iters` batched decode steps of `caches.len()` sequences (one token each, through the layers and the LM
/// head, as the server's step loop runs them). The caches persist between calls (criterion calls this many
/// times with few iterations); they are refilled with a short prompt (untimed) when empty or full.
fn decode_batch(rank: &Rank, caches: &mut [KvCache], iters: u64) -> Duration {
    let prompt = [1u32, 2, 3, 4, 5, 6, 7, 8];
    let mut total = Duration::ZERO;
    for i in 0..iters {
        if caches[0].is_empty() || caches[0].len() == CONTEXT {
            for c in caches.iter_mut() {
                c.clear();
                rank.step(&mut [(&prompt[..], c)]).unwrap();
            }
        }
        let tokens: Vec<[u32; 1]> = (0..caches.len())
            .map(|s| [((i as usize + s) % 100) as u32 + 10])
            .collect();
        let mut segs: Vec<(&[u32], &mut KvCache)> = tokens.iter().map(|t| &t[..]).zip(caches.iter_mut()).collect();
        let t = Instant::now();
        std::hint::black_box(rank.step(&mut segs).unwrap());
        total += t.elapsed();
    }
    total
}

/// This thread's CPU time for `n` calls of `f` (not wall time: on a machine shared with other work, time
/// spent descheduled is not counted).
fn cpu_time(n: u64, mut f: impl FnMut()) -> Duration {
    let now = || {
        let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `t` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID is supported on Linux.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
    };
    let t0 = now();
    for _ in 0..n {
        f();
    }
    now() - t0
}

fn bench(c: &mut Criterion) {
    let src = source();
    let mut g = c.benchmark_group("decode_step");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    let quantized = load(&*src, false);
    let f32_model = load(&*src, true);
    std::env::remove_var("NCCL_LLM_F32_WEIGHTS");
    let bytes = f32_model.weight_bytes();
    let weights: Vec<f32> = vec![1.0; bytes / 4];
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("read f32 weight bytes once (reference)", |b| {
        b.iter(|| std::hint::black_box(weights.iter().sum::<f32>()))
    });
    g.bench_function("quantized weights (as stored)", |b| {
        b.iter_custom(|n| decode(&quantized, n))
    });
    g.bench_function("f32 weights", |b| b.iter_custom(|n| decode(&f32_model, n)));
    let mut int8 = quantized;
    int8.set_decode_path(DecodePath::Int8);
    g.bench_function(format!("quantized weights, {}", DecodePath::Int8.describe()), |b| {
        b.iter_custom(|n| decode(&int8, n))
    });
    g.finish();

    // Batched decode (the server's step): n sequences, one token each, one pass over the weights per step;
    // throughput in tokens, so 16 sequences at 16x the tokens/s of 1 would mean batching costs nothing.
    let mut g = c.benchmark_group("decode_batch");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    let mut rank = Rank::new(int8, Box::new(SingleComm), Box::new(SingleComm)).expect("a TP 1 x PP 1 rank");
    for path in [DecodePath::Exact, DecodePath::Int16, DecodePath::Int8] {
        rank.set_decode_path(path);
        for n in [1usize, 4, 16] {
            g.throughput(Throughput::Elements(n as u64));
            let mut caches: Vec<KvCache> = (0..n).map(|_| rank.model().new_cache(CONTEXT)).collect();
            g.bench_function(format!("{n} sequences, {}", path.describe()), |b| {
                b.iter_custom(|iters| decode_batch(&rank, &mut caches, iters))
            });
        }
    }
    g.finish();

    // One product of Q4_1 matrices of 576 columns (bytes from a fixed pseudo-random sequence, scales ~0.01):
    // 256 rows (180 KB, stays in L2) and SmolLM2's fused gate/up, 3072 rows (1.7 MB).
    let mut g = c.benchmark_group("matvec_q4_1");
    for rows in [256usize, 3072] {
        let cols = 576usize;
        let mut s = 0x1234_5678u32;
        let mut raw: Vec<u8> = (0..rows * cols / 32 * 20)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                s as u8
            })
            .collect();
        for b in raw.chunks_exact_mut(20) {
            b[0..2].copy_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
            b[2..4].copy_from_slice(&half::f16::from_f32(-0.08).to_bits().to_le_bytes());
        }
        let w = QMatrix::from_ggml(model::dequant::GgmlType::Q4_1, rows, cols, &raw).expect("blocks");
        let x: Vec<f32> = (0..cols).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        let mut y = vec![0.0f32; rows];
        g.throughput(Throughput::Bytes(w.bytes() as u64));
        g.bench_function(format!("{rows}x{cols} exact f32"), |b| {
            b.iter_custom(|n| cpu_time(n, || w.matvec(std::hint::black_box(&x), &mut y, 1)))
        });
        g.bench_function(format!("{rows}x{cols} {}", DecodePath::Int8.describe()), |b| {
            b.iter_custom(|n| cpu_time(n, || w.matvec_int8(std::hint::black_box(&x), &mut y, 1)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
