//! Continuous batching changes nothing a client sees, and a replica that loses a rank recovers.
//!
//! * A batched decode step ([`Rank::step`] over several sequences) gives each sequence bit for bit the
//!   logits it gets alone.
//! * Through the pool (router + replicas + scheduler), greedy outputs with 1, 8 and 32 concurrent requests
//!   equal the engine's solo run ([`Rank::generate`] through `generate_in_threads`), for TP 1, TP 2 and
//!   PP 2 on the tiny model, and on SmolLM2 when the model file is there (required under `CI`).
//! * A rank that panics takes its replica out of rotation; with a second replica its requests are retried
//!   there and still give the solo tokens; with one replica they end with a 503; either way the replica is
//!   rebuilt and serves again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nccl_llm::comm::SingleComm;
use nccl_llm::engine::{GenerateParams, Rank, RankModel, RankPlace};
use nccl_llm::launch::generate_in_threads;
use nccl_llm::model::{self, WeightSource};
use nccl_llm::sample::SamplingParams;
use nccl_llm::server::{generate_distributed, Event, Fault, GenRequest, Pool, PoolConfig};
use nccl_llm::shard::Layout;

fn smollm2() -> Option<Box<dyn WeightSource>> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.deps/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !p.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but {} is missing (run scripts/setup.sh)",
            p.display()
        );
        eprintln!(
            "SKIPPED the SmolLM2 part: {} is missing (run scripts/setup.sh)",
            p.display()
        );
        return None;
    }
    Some(model::open(&p).expect("open SmolLM2"))
}

fn prompts(vocab: u32, n: usize) -> Vec<Vec<u32>> {
    // Different lengths (1..=9 tokens) and contents, so sequences sit at different positions in a batch.
    (0..n)
        .map(|i| (0..1 + i % 9).map(|j| ((i * 31 + j * 7 + 3) as u32) % vocab).collect())
        .collect()
}

fn solo(src: &dyn WeightSource, layout: Layout, prompt: &[u32], n: usize) -> Vec<u32> {
    let params = GenerateParams {
        max_new_tokens: n,
        sampling: SamplingParams::default(),
        ignore_eos: true,
        micro_batches: 1,
    };
    let outs = generate_in_threads(src, layout, 1, prompt, &params).expect("solo run");
    outs[0].generated.clone()
}

fn greedy(prompt: Vec<u32>, n: usize) -> GenRequest {
    GenRequest {
        prompt,
        max_tokens: n,
        sampling: SamplingParams::default(),
        stop: Vec::new(),
        ignore_eos: true,
    }
}

#[test]
#[allow(clippy::needless_range_loop)] // `step` indexes every sequence's solo logits
fn batched_step_logits_equal_solo_bit_for_bit() {
    let src = model::tiny_random(3);
    let place = RankPlace::single(1);
    let model = RankModel::load(&*src, place, &mut |_, _| {}).unwrap();
    let rank = Rank::new(model, Box::new(SingleComm), Box::new(SingleComm)).unwrap();
    let ps = prompts(256, 5);
    // Solo: prefill, then 6 decode steps of each sequence alone.
    let mut want = Vec::new();
    for p in &ps {
        let mut c = rank.model().new_cache(64);
        let mut l = rank.step(&mut [(p.as_slice(), &mut c)]).unwrap().unwrap().remove(0);
        let mut seq = vec![l.clone()];
        for _ in 0..6 {
            let t = [nccl_llm::sample::argmax(&l)];
            l = rank.step(&mut [(&t[..], &mut c)]).unwrap().unwrap().remove(0);
            seq.push(l.clone());
        }
        want.push(seq);
    }
    // Batched: prefill each alone, then decode all five together.
    let mut caches: Vec<_> = ps.iter().map(|_| rank.model().new_cache(64)).collect();
    let mut last: Vec<Vec<f32>> = Vec::new();
    for (p, c) in ps.iter().zip(caches.iter_mut()) {
        last.push(rank.step(&mut [(p.as_slice(), c)]).unwrap().unwrap().remove(0));
    }
    for step in 1..=6 {
        let toks: Vec<[u32; 1]> = last.iter().map(|l| [nccl_llm::sample::argmax(l)]).collect();
        let mut segs: Vec<(&[u32], &mut _)> = toks.iter().map(|t| &t[..]).zip(caches.iter_mut()).collect();
        last = rank.step(&mut segs).unwrap().unwrap();
        for (i, l) in last.iter().enumerate() {
            let a: Vec<u32> = l.iter().map(|v| v.to_bits()).collect();
            let b: Vec<u32> = want[i][step].iter().map(|v| v.to_bits()).collect();
            assert!(a == b, "sequence {i} step {step}: batched logits differ from solo");
        }
    }
    // A cache that would overflow is refused before anything is written.
    let mut small = rank.model().new_cache(2);
    assert!(rank.step(&mut [(&[1, 2, 3][..], &mut small)]).is_err());
    assert!(small.is_empty());
}

/// A server step that decodes some sequences and prefills others in the same pass (decodes first, then
/// prompt chunks): every decoding sequence gets bit for bit its solo logits, and a prefill chunk gets what
/// it gets in a step of its own; the caches advance as in separate steps, so later steps agree too.
#[test]
fn a_step_mixing_decodes_and_prefill_chunks_equals_separate_steps_bit_for_bit() {
    let src = model::tiny_random(5);
    let model = RankModel::load(&*src, RankPlace::single(1), &mut |_, _| {}).unwrap();
    let rank = Rank::new(model, Box::new(SingleComm), Box::new(SingleComm)).unwrap();
    let ps = prompts(256, 6);
    let bits = |l: &[f32]| l.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    // Reference: sequences 0..3 prefilled then decoded alone; sequence 4's prompt in two chunks alone;
    // sequence 5 prefilled alone.
    let decode_refs: Vec<(Vec<f32>, Vec<f32>)> = ps[..4]
        .iter()
        .map(|p| {
            let mut c = rank.model().new_cache(64);
            let l0 = rank.step(&mut [(p.as_slice(), &mut c)]).unwrap().unwrap().remove(0);
            let t = [nccl_llm::sample::argmax(&l0)];
            let l1 = rank.step(&mut [(&t[..], &mut c)]).unwrap().unwrap().remove(0);
            (l0, l1)
        })
        .collect();
    let long: Vec<u32> = (0..12).map(|j| (j * 13 + 5) % 256).collect();
    let (head, tail) = long.split_at(5);
    let mut c4 = rank.model().new_cache(64);
    rank.step(&mut [(head, &mut c4)]).unwrap();
    let want_tail = rank.step(&mut [(tail, &mut c4)]).unwrap().unwrap().remove(0);
    let mut c5 = rank.model().new_cache(64);
    let want_p5 = rank
        .step(&mut [(ps[5].as_slice(), &mut c5)])
        .unwrap()
        .unwrap()
        .remove(0);

    // Mixed: prefill 0..3 and the head of the long prompt, then one step with the four decodes, the long
    // prompt's second chunk and sequence 5's whole prompt.
    let mut caches: Vec<_> = (0..4).map(|_| rank.model().new_cache(64)).collect();
    let mut toks = Vec::new();
    for (p, c) in ps[..4].iter().zip(caches.iter_mut()) {
        let l = rank.step(&mut [(p.as_slice(), c)]).unwrap().unwrap().remove(0);
        toks.push([nccl_llm::sample::argmax(&l)]);
    }
    let mut m4 = rank.model().new_cache(64);
    rank.step(&mut [(head, &mut m4)]).unwrap();
    let mut m5 = rank.model().new_cache(64);
    let mut segs: Vec<(&[u32], &mut _)> = toks.iter().map(|t| &t[..]).zip(caches.iter_mut()).collect();
    segs.push((tail, &mut m4));
    segs.push((ps[5].as_slice(), &mut m5));
    let got = rank.step(&mut segs).unwrap().unwrap();
    assert_eq!(got.len(), 6);
    for (i, (_, want)) in decode_refs.iter().enumerate() {
        assert!(
            bits(&got[i]) == bits(want),
            "decoding sequence {i}: mixed-step logits differ from solo"
        );
    }
    assert!(
        bits(&got[4]) == bits(&want_tail),
        "prefill chunk: mixed-step logits differ from its own step"
    );
    assert!(
        bits(&got[5]) == bits(&want_p5),
        "whole prompt: mixed-step logits differ from its own step"
    );
    // The caches moved on as in separate steps: the next decode of the long prompt agrees too.
    let t = [nccl_llm::sample::argmax(&want_tail)];
    let a = rank.step(&mut [(&t[..], &mut c4)]).unwrap().unwrap().remove(0);
    let b = rank.step(&mut [(&t[..], &mut m4)]).unwrap().unwrap().remove(0);
    assert!(bits(&a) == bits(&b), "the cache after a mixed step differs");
}

/// A burst of short prompts is prefilled in one step (up to `prefill_chunk` prompt tokens over all of
/// them), not one prompt per step: 8 requests (prompts of 1 to 8 tokens, 6 tokens generated each) need at
/// most 6 decode steps (the first step may hold only the one request that woke the leader; the step delay
/// gives the other seven time to queue). Prefilling one prompt per step took 12, each new arrival's
/// prefill step followed by one more decode step.
#[test]
fn a_burst_of_prompts_is_prefilled_together() {
    let src: Arc<dyn WeightSource> = Arc::from(model::tiny_random(0));
    let n_tokens = 6;
    let ps = prompts(256, 8);
    let want: Vec<Vec<u32>> = ps
        .iter()
        .map(|p| solo(&*src, Layout { tp: 1, pp: 1 }, p, n_tokens))
        .collect();
    let pool = Pool::start(
        src,
        PoolConfig {
            prefill_chunk: 64,
            step_delay: Duration::from_millis(50),
            ..PoolConfig::default()
        },
    )
    .unwrap();
    let reqs: Vec<GenRequest> = ps.iter().map(|p| greedy(p.clone(), n_tokens)).collect();
    let got = generate_distributed(&pool, reqs, Duration::from_secs(60));
    for (i, g) in got.into_iter().enumerate() {
        assert_eq!(g.unwrap().token_ids, want[i], "request {i}");
    }
    let steps = pool.metrics.batch_size.count();
    assert!(
        steps <= n_tokens as u64,
        "{steps} decode steps for 8 requests of {n_tokens} tokens: the prompts were not prefilled together"
    );
    pool.shutdown();
}

/// Request `i` of `c` concurrent ones uses prompt `i % distinct` (solo runs load the model each time, so the
/// real model uses fewer distinct prompts).
fn check_concurrency(
    src: Arc<dyn WeightSource>,
    layout: Layout,
    dp: usize,
    vocab: u32,
    n_tokens: usize,
    counts: &[usize],
    distinct: usize,
) {
    let max = *counts.iter().max().unwrap();
    let uniq = prompts(vocab, distinct);
    let solo_of: Vec<Vec<u32>> = uniq.iter().map(|p| solo(&*src, layout, p, n_tokens)).collect();
    let ps: Vec<Vec<u32>> = (0..max).map(|i| uniq[i % distinct].clone()).collect();
    let want: Vec<Vec<u32>> = (0..max).map(|i| solo_of[i % distinct].clone()).collect();
    let pool = Pool::start(
        src,
        PoolConfig {
            layout,
            dp,
            max_batch: 32,
            // Small chunks: prompts longer than 4 tokens are prefilled in several steps.
            prefill_chunk: 4,
            ..PoolConfig::default()
        },
    )
    .unwrap();
    for &c in counts {
        let reqs: Vec<GenRequest> = ps[..c].iter().map(|p| greedy(p.clone(), n_tokens)).collect();
        let got = generate_distributed(&pool, reqs, Duration::from_secs(300));
        for (i, g) in got.into_iter().enumerate() {
            let g = g.unwrap_or_else(|e| panic!("{c} concurrent, request {i}: {e}"));
            assert_eq!(
                g.token_ids, want[i],
                "tp {} pp {} dp {dp}: {c} concurrent, request {i}",
                layout.tp, layout.pp
            );
        }
    }
    let peak = pool.metrics.batch_size.count();
    assert!(peak > 0, "no decode step was recorded");
    pool.shutdown();
}

/// Prompts longer than the prefill chunk give the same tokens as one whole prefill only up to float
/// rounding of the blocked product, so the chunked prompts here stay at the tiny model, where the test
/// checks them exactly too (ties are improbable at this size).
#[test]
fn greedy_outputs_with_1_8_32_concurrent_equal_solo_tiny() {
    let src: Arc<dyn WeightSource> = Arc::from(model::tiny_random(0));
    for (tp, pp, dp) in [(1, 1, 1), (2, 1, 2), (1, 2, 1)] {
        check_concurrency(src.clone(), Layout { tp, pp }, dp, 256, 12, &[1, 8, 32], 32);
    }
}

#[test]
fn greedy_outputs_with_1_8_32_concurrent_equal_solo_smollm2() {
    let Some(src) = smollm2() else { return };
    let src: Arc<dyn WeightSource> = Arc::from(src);
    check_concurrency(src, Layout { tp: 2, pp: 1 }, 1, 49152, 6, &[1, 8, 32], 4);
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_panicking_rank_fails_over_to_the_other_replica_and_the_replica_comes_back() {
    let src: Arc<dyn WeightSource> = Arc::from(model::tiny_random(0));
    let layout = Layout { tp: 2, pp: 1 };
    let ps = prompts(256, 8);
    let want: Vec<Vec<u32>> = ps.iter().map(|p| solo(&*src, layout, p, 16)).collect();
    let pool = Pool::start(
        src,
        PoolConfig {
            layout,
            dp: 2,
            fault: Some(Fault {
                replica: 0,
                rank: 1,
                step: 5,
            }),
            ..PoolConfig::default()
        },
    )
    .unwrap();
    let reqs: Vec<GenRequest> = ps.iter().map(|p| greedy(p.clone(), 16)).collect();
    let got = generate_distributed(&pool, reqs, Duration::from_secs(120));
    for (i, g) in got.into_iter().enumerate() {
        assert_eq!(
            g.expect("retried on the healthy replica").token_ids,
            want[i],
            "request {i}"
        );
    }
    assert_eq!(
        pool.metrics.replica_failures.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(pool.metrics.requests_retried.load(std::sync::atomic::Ordering::Relaxed) > 0);
    wait_until("replica 0 rebuilt", Duration::from_secs(60), || {
        let g = pool.gauges();
        g[0].healthy && g[0].restarts == 1
    });
    // Both replicas serve again.
    let again = generate_distributed(
        &pool,
        ps.iter().map(|p| greedy(p.clone(), 16)).collect(),
        Duration::from_secs(120),
    );
    for (i, g) in again.into_iter().enumerate() {
        assert_eq!(g.unwrap().token_ids, want[i]);
    }
    pool.shutdown();
}

#[test]
fn with_one_replica_a_failure_ends_in_flight_requests_with_503_then_it_serves_again() {
    let src: Arc<dyn WeightSource> = Arc::from(model::tiny_random(0));
    let pool = Pool::start(
        src,
        PoolConfig {
            layout: Layout { tp: 2, pp: 1 },
            dp: 1,
            fault: Some(Fault {
                replica: 0,
                rank: 0,
                step: 3,
            }),
            ..PoolConfig::default()
        },
    )
    .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    pool.submit(greedy(vec![1, 2, 3], 50), tx).unwrap();
    let t0 = Instant::now();
    let last = loop {
        match rx.try_recv() {
            Ok(ev @ (Event::Done { .. } | Event::Failed { .. })) => break ev,
            Ok(_) => {}
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "no end event: the request hangs"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("channel closed without an end event: {e:?}"),
        }
    };
    match last {
        Event::Failed { status, message } => {
            assert_eq!(status, 503);
            assert!(message.contains("failed"), "{message}");
        }
        other => panic!("expected a 503, got {other:?}"),
    }
    wait_until("the replica rebuilt", Duration::from_secs(60), || {
        pool.gauges()[0].healthy
    });
    let r = generate_distributed(&pool, vec![greedy(vec![1, 2, 3], 5)], Duration::from_secs(60));
    assert_eq!(r[0].as_ref().unwrap().token_ids.len(), 5);
    pool.shutdown();
}

#[test]
fn out_of_range_sampling_is_a_typed_error_in_the_engine_and_the_pool() {
    let src = model::tiny_random(0);
    let bad = [
        SamplingParams {
            temperature: -0.5,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: f32::NAN,
            ..SamplingParams::default()
        },
        SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        },
        SamplingParams {
            top_p: 1.5,
            ..SamplingParams::default()
        },
    ];
    for sampling in &bad {
        // The engine itself refuses them (every rank, before computing), not only the HTTP layer.
        let params = GenerateParams {
            max_new_tokens: 4,
            sampling: sampling.clone(),
            ignore_eos: true,
            micro_batches: 0,
        };
        let e = generate_in_threads(&*src, Layout { tp: 2, pp: 1 }, 1, &[1, 2, 3], &params)
            .expect_err("bad sampling settings must be refused");
        let text = e.to_string();
        assert!(
            matches!(&e, nccl_llm::error::EngineError::Rank { source, .. }
                if matches!(**source, nccl_llm::error::EngineError::Sampling(_))),
            "{e:?}"
        );
        assert!(text.contains("temperature") || text.contains("top-p"), "{text}");
    }
    let pool = Pool::start(Arc::from(model::tiny_random(0)), PoolConfig::default()).unwrap();
    for sampling in bad {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let req = GenRequest {
            sampling,
            ..greedy(vec![1, 2, 3], 4)
        };
        match pool.submit(req, tx) {
            Err(nccl_llm::server::Reject::Invalid(m)) => {
                assert!(m.contains("temperature") || m.contains("top-p"), "{m}")
            }
            other => panic!("expected Reject::Invalid, got {other:?}"),
        }
    }
    pool.shutdown();
}

/// The pool on the int16 decode path (`serve --int16`) on SmolLM2: 1 and 8 concurrent greedy requests give
/// exactly what one sequence alone gives on that path (its batched and single kernels are bit-identical), and
/// the rank really runs it (the solo model reports the path in effect).
#[test]
fn int16_decode_path_through_the_pool_equals_its_solo_run_smollm2() {
    use nccl_llm::math::DecodePath;
    let Some(src) = smollm2() else { return };
    let src: Arc<dyn WeightSource> = Arc::from(src);
    let place = RankPlace::single(1);
    let mut model = RankModel::load(&*src, place, &mut |_, _| {}).unwrap();
    assert_eq!(model.set_decode_path(DecodePath::Int16), DecodePath::Int16);
    let rank = Rank::new(model, Box::new(SingleComm), Box::new(SingleComm)).unwrap();
    let params = GenerateParams {
        max_new_tokens: 6,
        sampling: SamplingParams::default(),
        ignore_eos: true,
        micro_batches: 1,
    };
    let uniq = prompts(49152, 4);
    let want: Vec<Vec<u32>> = uniq
        .iter()
        .map(|p| rank.generate(p, &params, &mut |_| {}).unwrap().generated)
        .collect();
    let pool = Pool::start(
        src,
        PoolConfig {
            decode_path: DecodePath::Int16,
            max_batch: 8,
            ..PoolConfig::default()
        },
    )
    .unwrap();
    for c in [1, 8] {
        let reqs: Vec<GenRequest> = (0..c).map(|i| greedy(uniq[i % 4].clone(), 6)).collect();
        for (i, g) in generate_distributed(&pool, reqs, Duration::from_secs(300))
            .into_iter()
            .enumerate()
        {
            assert_eq!(g.unwrap().token_ids, want[i % 4], "{c} concurrent, request {i}");
        }
    }
    pool.shutdown();
}

#[test]
fn unusable_rebuild_back_off_settings_are_refused_before_anything_loads() {
    let start = |first: Duration, max: Duration| {
        let cfg = PoolConfig {
            rebuild_backoff: first,
            rebuild_backoff_max: max,
            ..PoolConfig::default()
        };
        Pool::start(Arc::from(model::tiny_random(0)), cfg).map(|_| ())
    };
    for (first, max) in [
        (Duration::ZERO, Duration::from_secs(1)),
        (Duration::from_secs(2), Duration::from_secs(1)),
    ] {
        let e = start(first, max).unwrap_err().to_string();
        assert!(
            e.contains("--rebuild-backoff-secs") && e.contains("--rebuild-backoff-max-secs"),
            "{first:?}/{max:?}: {e}"
        );
    }
    start(Duration::from_millis(1), Duration::from_millis(1)).unwrap();
}
