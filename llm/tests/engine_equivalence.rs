//! Every parallel layout gives the same greedy tokens and logits as one rank, and one rank's logits match
//! the independent f64 reference forward (`model::reference::forward_f64`).
//!
//! Runs on the built-in tiny random model always, and on SmolLM2-135M (Q4_1 GGUF) when
//! `.deps/models/SmolLM2-135M-Instruct.Q4_1.gguf` exists (scripts/setup.sh fetches it; without it the test fails under CI and skips loudly elsewhere).

#[path = "../../tests/support/prereq.rs"]
mod prereq;

use std::path::PathBuf;

use nccl_llm::engine::{GenerateOutput, GenerateParams};
use nccl_llm::launch::generate_in_threads;
use nccl_llm::model::{self, WeightSource};
use nccl_llm::sample::SamplingParams;
use nccl_llm::shard::Layout;

/// `max |a - b| / max |b|`.
fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "logit counts differ");
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max) / scale
}

fn greedy(n: usize) -> GenerateParams {
    GenerateParams {
        max_new_tokens: n,
        sampling: SamplingParams::default(),
        ignore_eos: true,
        micro_batches: 0,
    }
}

fn run(src: &dyn WeightSource, layout: Layout, prompt: &[u32], n: usize) -> GenerateOutput {
    let outs = generate_in_threads(src, layout, 1, prompt, &greedy(n))
        .unwrap_or_else(|e| panic!("tp {} × pp {}: {e}", layout.tp, layout.pp));
    // Every rank knows the generated tokens; the last stage's ranks have the logits.
    for o in &outs {
        assert_eq!(o.generated, outs[0].generated, "ranks disagree on the tokens");
        assert_eq!(o.generated.len(), n);
    }
    let reporter = (layout.pp - 1) * layout.tp;
    for (w, o) in outs.iter().enumerate() {
        assert_eq!(o.prompt_logits.is_some(), w >= reporter, "rank {w} logits presence");
    }
    outs.into_iter().nth(reporter).unwrap()
}

fn check_all_layouts(src: &dyn WeightSource, prompt: &[u32], n: usize, layouts: &[(usize, usize)]) {
    let cfg = src.config();
    let reference = model::reference::forward_f64(src, prompt).expect("reference forward");
    let ref_last = reference.last().unwrap();
    assert_eq!(ref_last.len(), cfg.vocab_size);

    let base = run(src, Layout { tp: 1, pp: 1 }, prompt, n);
    let base_logits = base.prompt_logits.clone().unwrap();
    let e = rel_err(&base_logits, ref_last);
    println!(
        "tp 1 × pp 1 vs f64 reference: relative error {e:.2e}; tokens {:?}",
        base.generated
    );
    assert!(e < 1e-4, "single rank vs f64 reference: relative error {e:.3e}");

    // The first generated token is the reference's arg max (unless the top two are closer than the error).
    let mut sorted: Vec<(usize, f64)> = ref_last.iter().copied().enumerate().collect();
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
    if sorted[0].1 - sorted[1].1 > 1e-3 * sorted[0].1.abs().max(1.0) {
        assert_eq!(
            base.generated[0] as usize, sorted[0].0,
            "first token vs reference arg max"
        );
    }

    for &(tp, pp) in layouts {
        let out = run(src, Layout { tp, pp }, prompt, n);
        let logits = out.prompt_logits.unwrap();
        let vs_ref = rel_err(&logits, ref_last);
        let vs_base = rel_err(&logits, &base_logits.iter().map(|&v| v as f64).collect::<Vec<_>>());
        println!(
            "tp {tp} × pp {pp}: vs reference {vs_ref:.2e}, vs tp 1 {vs_base:.2e}; tokens {:?}",
            out.generated
        );
        assert!(
            vs_ref < 1e-4,
            "tp {tp} × pp {pp} vs f64 reference: relative error {vs_ref:.3e}"
        );
        assert!(
            vs_base < 1e-4,
            "tp {tp} × pp {pp} vs tp 1: relative error {vs_base:.3e}"
        );
        assert_eq!(
            out.generated, base.generated,
            "tp {tp} × pp {pp}: greedy tokens differ from tp 1"
        );
    }
}

#[test]
fn tiny_model_all_layouts_agree() {
    let src = model::tiny_random(7);
    let cfg = src.config().clone();
    // 8 query heads over 2 KV heads: tp 3 and 4 replicate KV heads, tp 3 splits unevenly; vocab 256 and
    // intermediate 160 split unevenly by 3.
    assert!(cfg.num_attention_heads >= 4);
    let prompt: Vec<u32> = (0..11).map(|i| (i * 37 + 5) % cfg.vocab_size as u32).collect();
    let layouts = [(2, 1), (3, 1), (4, 1), (1, 2), (1, 3), (2, 2), (3, 2)];
    check_all_layouts(&*src, &prompt, 8, &layouts);
}

#[test]
fn micro_batches_do_not_change_results() {
    let src = model::tiny_random(3);
    let prompt: Vec<u32> = (1..14).collect();
    let base = run(&*src, Layout { tp: 1, pp: 1 }, &prompt, 4);
    // Pipelines (chunks flow through the stages), and one stage (chunks interleaved, `forward_micro`).
    for layout in [
        Layout { tp: 1, pp: 3 },
        Layout { tp: 2, pp: 1 },
        Layout { tp: 1, pp: 1 },
    ] {
        for mb in [1, 2, 5, 13] {
            let mut p = greedy(4);
            p.micro_batches = mb;
            let outs = generate_in_threads(&*src, layout, 1, &prompt, &p).unwrap();
            let last = outs.last().unwrap().prompt_logits.as_ref().unwrap();
            let b: Vec<f64> = base.prompt_logits.as_ref().unwrap().iter().map(|&v| v as f64).collect();
            let what = format!("tp {} × pp {}, micro-batches {mb}", layout.tp, layout.pp);
            assert!(rel_err(last, &b) < 1e-5, "{what}");
            assert_eq!(outs[0].generated, base.generated, "{what}");
        }
    }
}

#[test]
fn bad_layouts_and_inputs_are_clear_errors() {
    let src = model::tiny_random(1);
    let heads = src.config().num_attention_heads;
    let layers = src.config().num_hidden_layers;
    let e = generate_in_threads(&*src, Layout { tp: heads + 1, pp: 1 }, 1, &[1, 2], &greedy(2)).unwrap_err();
    assert!(e.to_string().contains("--tp"), "{e}");
    let e = generate_in_threads(&*src, Layout { tp: 1, pp: layers + 1 }, 1, &[1, 2], &greedy(2)).unwrap_err();
    assert!(e.to_string().contains("--pp"), "{e}");
    let vocab = src.config().vocab_size as u32;
    let e = generate_in_threads(&*src, Layout { tp: 2, pp: 1 }, 1, &[1, vocab], &greedy(2)).unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    let e = generate_in_threads(&*src, Layout { tp: 1, pp: 1 }, 1, &[], &greedy(2)).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    let ctx = src.config().max_position_embeddings;
    let e = generate_in_threads(&*src, Layout { tp: 1, pp: 1 }, 1, &[1], &greedy(ctx)).unwrap_err();
    assert!(e.to_string().contains("context"), "{e}");
}

fn smollm2_path() -> Option<PathBuf> {
    prereq::deps_file("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
fn smollm2_all_layouts_agree() {
    let Some(path) = smollm2_path() else { return };
    let src = model::open(&path).expect("open SmolLM2");
    let tok = src
        .tokenizer()
        .expect("tokenizer")
        .expect("the GGUF embeds a tokenizer");
    let prompt = tok
        .encode("The capital of France is", true)
        .expect("encode")
        .get_ids()
        .to_vec();
    let layouts = [(2, 1), (3, 1), (1, 2), (1, 3), (2, 2)];
    check_all_layouts(&*src, &prompt, 6, &layouts);
}

/// A rank's compute threads (`nccl_llm::par`: products split by rows, prefill by tiles of rows, attention by
/// heads) change no bit of the result: the same prompt logits and tokens on 1, 2 and 3 threads per rank. On
/// SmolLM2, whose products are large enough to be split (the tiny model's mostly are not), with a prompt long
/// enough that decode attention is split by heads too.
#[test]
fn smollm2_compute_threads_change_no_bit() {
    let Some(path) = smollm2_path() else { return };
    let src = model::open(&path).expect("open SmolLM2");
    let prompt: Vec<u32> = (0..40).map(|i| 1000 + 37 * i % 40000).collect();
    for layout in [Layout { tp: 1, pp: 1 }, Layout { tp: 2, pp: 1 }] {
        let go = |threads: usize| {
            let outs = generate_in_threads(&*src, layout, threads, &prompt, &greedy(4)).expect("generate");
            let o = outs.into_iter().next().unwrap();
            let bits: Vec<u32> = o.prompt_logits.unwrap().iter().map(|v| v.to_bits()).collect();
            (bits, o.generated)
        };
        let one = go(1);
        for threads in [2, 3] {
            let (bits, tokens) = go(threads);
            assert!(
                bits == one.0,
                "tp {}: prompt logits differ on {threads} threads",
                layout.tp
            );
            assert_eq!(tokens, one.1, "tp {}: tokens differ on {threads} threads", layout.tp);
        }
    }
}

/// Graph-captured decode is a CUDA-backend setting: the CPU engine refuses it before anything is computed,
/// and so does a pipeline layout (on every backend: stages hand activations on through the host).
#[test]
fn graph_decode_is_refused_where_it_cannot_record() {
    use nccl_llm::comm::SingleComm;
    use nccl_llm::engine::{GraphStep, Rank, RankModel, RankPlace};
    let src = model::tiny_random(1);
    let m = RankModel::load_with(&*src, RankPlace::single(1), false, &mut |_, _| {}).unwrap();
    let mut rank = Rank::new(m, Box::new(SingleComm), Box::new(SingleComm)).unwrap();
    let e = rank.set_graph_decode(true).unwrap_err().to_string();
    assert!(e.contains("needs the CUDA backend (--device cuda)"), "{e}");
    assert!(!rank.graph_decode());
    rank.set_graph_decode(false).unwrap();
    // The eager warm-up, the recording, then replays.
    let steps: Vec<GraphStep> = (0..4).map(GraphStep::of).collect();
    assert_eq!(
        steps,
        [
            GraphStep::Eager,
            GraphStep::Record,
            GraphStep::Replay,
            GraphStep::Replay
        ]
    );
}

/// One stage's micro-batched prefill runs the chunks through the layers interleaved
/// (`RankModel::forward_micro`: each layer's attention half of every chunk, then its MLP half of every
/// chunk), so that a chunk's all-reduce can overlap the next chunk's work. It computes bit for bit what the
/// chunks one after another compute: the same activations and the same KV cache (checked through one decode
/// step after the prompt), at TP 1 and on the host backend at TP 2 and 3.
#[test]
fn interleaved_micro_batches_equal_chunks_one_after_another() {
    use nccl_llm::engine::{RankModel, RankPlace};
    use nccl_llm::launch::host_threads;
    use nccl_llm::shard::even_range;
    let src = model::tiny_random(5);
    let prompt: Vec<u32> = (3..20).collect();
    for tp in [1, 2, 3] {
        let comms = host_threads(Layout { tp, pp: 1 }).unwrap();
        let src = &*src;
        let prompt = &prompt;
        std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let place = RankPlace {
                            tp,
                            tp_rank: c.tp.rank(),
                            pp: 1,
                            stage: 0,
                            threads: 1,
                        };
                        let m = RankModel::load_with(src, place, false, &mut |_, _| {}).unwrap();
                        let tpc = &*c.tp;
                        for chunks in [2, 3, 17] {
                            let ranges: Vec<_> = (0..chunks).map(|k| even_range(prompt.len(), chunks, k)).collect();
                            // One after another.
                            let mut seq_cache = m.try_new_cache(prompt.len() + 1).unwrap();
                            let mut seq = Vec::new();
                            for r in &ranges {
                                let mut x = m.embed(&prompt[r.clone()], tpc).unwrap();
                                m.forward_layers(&mut x, r.len(), &mut seq_cache, tpc).unwrap();
                                seq.push(x);
                            }
                            // Interleaved.
                            let mut int_cache = m.try_new_cache(prompt.len() + 1).unwrap();
                            let mut xs: Vec<Vec<f32>> = ranges
                                .iter()
                                .map(|r| m.embed(&prompt[r.clone()], tpc).unwrap())
                                .collect();
                            let mut views: Vec<&mut [f32]> = xs.iter_mut().map(|x| x.as_mut_slice()).collect();
                            m.forward_micro(&mut views, &mut int_cache, tpc).unwrap();
                            for (k, (a, b)) in xs.iter().zip(&seq).enumerate() {
                                let same = a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
                                assert!(same, "tp {tp}, {chunks} chunks: chunk {k}'s activations differ");
                            }
                            // The caches: one decode step on each gives the same logits, bit for bit.
                            let step = |cache: &mut _| {
                                let mut x = m.embed(&[7], tpc).unwrap();
                                m.forward_layers(&mut x, 1, cache, tpc).unwrap();
                                m.logits(&x, tpc).unwrap()
                            };
                            let (a, b) = (step(&mut int_cache), step(&mut seq_cache));
                            let same = a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits());
                            assert!(
                                same,
                                "tp {tp}, {chunks} chunks: the decode step after the prompt differs"
                            );
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
        });
    }
}

/// A micro-batched prompt that does not fit the cache, or an empty micro-batch, is refused before anything
/// is written.
#[test]
fn interleaved_micro_batches_refuse_what_does_not_fit() {
    use nccl_llm::comm::SingleComm;
    use nccl_llm::engine::{RankModel, RankPlace};
    let src = model::tiny_random(2);
    let m = RankModel::load_with(&*src, RankPlace::single(1), false, &mut |_, _| {}).unwrap();
    let h = src.config().hidden_size;
    let mut cache = m.try_new_cache(4).unwrap();
    let (mut a, mut b) = (
        m.embed(&[1, 2, 3], &SingleComm).unwrap(),
        m.embed(&[4, 5], &SingleComm).unwrap(),
    );
    let e = m
        .forward_micro(&mut [&mut a, &mut b], &mut cache, &SingleComm)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sequence of 5 tokens exceeds the KV cache (4 positions)"),
        "{e}"
    );
    let mut empty: Vec<f32> = Vec::new();
    let e = m
        .forward_micro(&mut [&mut a, &mut empty], &mut cache, &SingleComm)
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty micro-batch"), "{e}");
    let mut odd = vec![0.0f32; h + 1];
    let e = m
        .forward_micro(&mut [&mut odd], &mut cache, &SingleComm)
        .unwrap_err()
        .to_string();
    assert!(e.contains("activations for 1 rows"), "{e}");
    // Nothing was written: the whole cache is still free.
    let mut x = m.embed(&[1, 2, 3, 4], &SingleComm).unwrap();
    m.forward_layers(&mut x, 4, &mut cache, &SingleComm).unwrap();
}
