//! The integer decode paths (`DecodePath::Int16` and `DecodePath::Int8`: activations quantized per block of
//! 32, integer dot products with the Q4_1 / Q8_0 blocks) on the real SmolLM2-135M-Instruct Q4_1 GGUF, against
//! the exact f32 path and the independent f64 reference forward: the same 12 greedy tokens on the test
//! prompts, and logits within a stated relative L2 error of the reference (int16: 1e-2) at every position of
//! a prompt run token by token (so every matrix product, LM head included, takes the fast path). Fails under CI without the model
//! (tests/support/prereq.rs), skips loudly elsewhere.

#[path = "../../tests/support/prereq.rs"]
mod prereq;

use nccl_llm::comm::SingleComm;
use nccl_llm::engine::{GenerateParams, Rank, RankModel, RankPlace};
use nccl_llm::math::DecodePath;
use nccl_llm::model::{self, reference, WeightSource};
use nccl_llm::sample::SamplingParams;

const PLACE: RankPlace = RankPlace::single(2);

fn load(src: &dyn WeightSource, path: DecodePath) -> RankModel {
    let mut m = RankModel::load_with(src, PLACE, false, &mut |_, _| {}).expect("load SmolLM2");
    m.set_decode_path(path);
    assert_eq!(m.decode_path(), path);
    m
}

fn greedy(model: RankModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let rank = Rank::new(model, Box::new(SingleComm), Box::new(SingleComm)).unwrap();
    let params = GenerateParams {
        max_new_tokens: n,
        sampling: SamplingParams::default(),
        ignore_eos: true,
        micro_batches: 0,
    };
    rank.generate(prompt, &params, &mut |_| {}).unwrap().generated
}

/// `‖a − b‖₂ / ‖b‖₂`.
fn rel_l2(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// Logits at every position, feeding the prompt one token at a time (decode steps only).
fn stepwise_logits(m: &RankModel, prompt: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = m.new_cache(prompt.len());
    prompt
        .iter()
        .map(|&t| {
            let mut x = m.embed(&[t], &SingleComm).unwrap();
            m.forward_layers(&mut x, 1, &mut cache, &SingleComm).unwrap();
            m.logits(&x, &SingleComm).unwrap()
        })
        .collect()
}

/// Bounds on the logits' relative L2 error vs the f64 reference, per path. int16 activations: issue 16's
/// 1e-2. int8 activations measured up to 0.108 on these prompts (SmolLM2's down_proj inputs have outliers that
/// take a block's whole int8 range), above 1e-2: their bound only guards against a regression.
const BOUNDS: [(DecodePath, f64); 2] = [(DecodePath::Int16, 1e-2), (DecodePath::Int8, 0.15)];

#[test]
fn smollm2_fast_decode_matches_exact_tokens_and_reference_logits() {
    let Some(path) = prereq::deps_file("models/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let src = model::open(&path).expect("open SmolLM2");
    let tok = src.tokenizer().unwrap().expect("the GGUF embeds a tokenizer");
    let exact = load(&*src, DecodePath::Exact);
    let mut worst_exact = 0f64;
    let prompts = [
        "The capital of France is",
        "Once upon a time, there was a little",
        "def fibonacci(n):",
    ];
    let mut refs = Vec::new();
    for text in prompts {
        let prompt = tok.encode(text, true).unwrap().get_ids().to_vec();
        let reference = reference::forward_f64(&*src, &prompt).unwrap();
        let le = stepwise_logits(&exact, &prompt);
        for (l, r) in le.iter().zip(&reference) {
            worst_exact = worst_exact.max(rel_l2(l, r));
        }
        let tokens = greedy(load(&*src, DecodePath::Exact), &prompt, 12);
        println!("{text:?}: exact tokens {tokens:?}");
        refs.push((text, prompt, reference, le, tokens));
    }
    println!("exact path: worst logits rel-L2 vs f64 reference {worst_exact:.2e}");
    assert!(worst_exact < 1e-4, "exact path rel-L2 {worst_exact:.3e}");
    for (path, bound) in BOUNDS {
        let fast = load(&*src, path);
        let mut worst = 0f64;
        for (text, prompt, reference, le, tokens) in &refs {
            let lf = stepwise_logits(&fast, prompt);
            let errs: Vec<f64> = reference.iter().zip(&lf).map(|(r, l)| rel_l2(l, r)).collect();
            let shown: Vec<String> = errs.iter().map(|e| format!("{e:.2e}")).collect();
            println!("{path:?} {text:?}: logits rel-L2 per position {}", shown.join(" "));
            for (p, &e) in errs.iter().enumerate() {
                worst = worst.max(e);
                assert!(
                    e <= bound,
                    "{path:?} {text:?} position {p}: logits rel-L2 {e:.3e} > {bound:e}"
                );
            }
            // The fast logits are not the exact ones (the test would pass vacuously if the path were ignored).
            assert_ne!(
                lf.last(),
                le.last(),
                "{path:?} {text:?}: logits identical to the exact path's"
            );
            let got = greedy(load(&*src, path), prompt, 12);
            assert_eq!(
                &got, tokens,
                "{path:?} {text:?}: greedy tokens differ from the exact path"
            );
        }
        println!("{path:?}: worst logits rel-L2 vs f64 reference {worst:.2e} (bound {bound:e})");
    }
}
