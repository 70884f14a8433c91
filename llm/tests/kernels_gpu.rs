//! Every engine kernel on a GPU against its CPU twin (`nccl_llm::kernels`), on random inputs, within the
//! per-dtype bounds of `kernels::Tolerance` (stated at each comparison). Needs one GPU with CUDA 12 or 13
//! user-space libraries matching the build (`--features cuda` is CUDA 12.9; scripts/gpu-check.sh builds for
//! CUDA 13.0):
//!
//! cargo test -p nccl-llm --features cuda --test kernels_gpu -- --ignored
#![cfg(feature = "cuda")]

use half::bf16;
use nccl_llm::cuda::{CudaError, CudaKernels};
use nccl_llm::kernels::{self, *};
use nccl_llm::math::{self, Matrix, Rope};
use nccl_llm::model::{rope_inv_freq, LlamaConfig, RopeScaling};

/// Deterministic values in [-1, 1).
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn wide<T: Elem>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

fn gpu() -> CudaKernels {
    CudaKernels::new(0).unwrap_or_else(|e| panic!("CUDA device 0: {e}"))
}

fn close(what: &str, tol: Tolerance, gpu: &[f32], cpu: &[f32]) {
    if let Some((i, g, c)) = tol.first_violation(gpu, cpu) {
        panic!("{what}: element {i} is {g} on the GPU, {c} on the CPU (bound {tol:?})");
    }
    eprintln!("{what}: {} elements within {tol:?}", cpu.len());
}

#[test]
#[ignore = "needs 1 GPU"]
fn embed_rms_norm_residual_cast_match_their_twins() {
    let k = gpu();
    let st = k.stream();
    eprintln!("kernels compiled by NVRTC for {}", k.arch());
    // Embedding: this rank holds rows 100..356 of the vocabulary; some tokens are another rank's.
    let (hidden, rows) = (576, 256);
    let table = random(rows * hidden, 1);
    let tokens: Vec<u32> = vec![100, 355, 7, 200, 356, 150, 100];
    let s = EmbedShape {
        tokens: tokens.len(),
        hidden,
        row_start: 100,
        rows,
    };
    let d_tokens = st.clone_htod(&tokens).unwrap();
    for bf in [false, true] {
        let mut cpu = vec![0.0f32; tokens.len() * hidden];
        let mut d_out = st.alloc_zeros::<f32>(cpu.len()).unwrap();
        if bf {
            let t = to_bf16(&table);
            kernels::embed(&s, &t, &tokens, &mut cpu).unwrap();
            k.embed(&s, &st.clone_htod(&t).unwrap(), &d_tokens, &mut d_out).unwrap();
        } else {
            kernels::embed(&s, &table, &tokens, &mut cpu).unwrap();
            k.embed(&s, &st.clone_htod(&table).unwrap(), &d_tokens, &mut d_out)
                .unwrap();
        }
        close(
            &format!("embed (bf16 table: {bf})"),
            Tolerance::EXACT,
            &st.clone_dtoh(&d_out).unwrap(),
            &cpu,
        );
    }

    // RMSNorm over rows of several widths (one block of 256 threads per row, widths below and above it).
    for dim in [64, 576, 1000, 4096] {
        let n = 5;
        let x = random(n * dim, dim as u64);
        let w = random(dim, 3);
        let s = RmsNormShape {
            rows: n,
            dim,
            eps: 1e-5,
        };
        let d_x = st.clone_htod(&x).unwrap();
        let mut cpu = vec![0.0f32; n * dim];
        kernels::rms_norm(&s, &x, &w, &mut cpu).unwrap();
        let mut d_out = st.alloc_zeros::<f32>(n * dim).unwrap();
        k.rms_norm(&s, &d_x, &st.clone_htod(&w).unwrap(), &mut d_out).unwrap();
        close(
            &format!("rms_norm f32 dim {dim}"),
            Tolerance::F32,
            &st.clone_dtoh(&d_out).unwrap(),
            &cpu,
        );
        let wb = to_bf16(&w);
        let mut cpu_b = vec![bf16::ZERO; n * dim];
        kernels::rms_norm(&s, &x, &wb, &mut cpu_b).unwrap();
        let mut d_out_b = st.alloc_zeros::<bf16>(n * dim).unwrap();
        k.rms_norm(&s, &d_x, &st.clone_htod(&wb).unwrap(), &mut d_out_b)
            .unwrap();
        close(
            &format!("rms_norm bf16 dim {dim}"),
            Tolerance::BF16,
            &wide(&st.clone_dtoh(&d_out_b).unwrap()),
            &wide(&cpu_b),
        );
    }

    // Residual add (f32 and bf16 deltas) and the cast: one rounding or one IEEE addition, bit for bit.
    let n = 10_000;
    let x = random(n, 5);
    let delta = random(n, 6);
    let db = to_bf16(&delta);
    let mut cpu = x.clone();
    kernels::residual_add(&mut cpu, &delta).unwrap();
    let mut d_x = st.clone_htod(&x).unwrap();
    k.residual_add(&mut d_x, &st.clone_htod(&delta).unwrap()).unwrap();
    close(
        "residual_add f32",
        Tolerance::EXACT,
        &st.clone_dtoh(&d_x).unwrap(),
        &cpu,
    );
    let mut cpu = x.clone();
    kernels::residual_add(&mut cpu, &db).unwrap();
    let mut d_x = st.clone_htod(&x).unwrap();
    k.residual_add(&mut d_x, &st.clone_htod(&db).unwrap()).unwrap();
    close(
        "residual_add bf16",
        Tolerance::EXACT,
        &st.clone_dtoh(&d_x).unwrap(),
        &cpu,
    );
    let mut special = random(n, 7);
    special[..6].copy_from_slice(&[f32::NAN, f32::INFINITY, -0.0, 1.0 + 1.0 / 256.0, 3.0e38, 1.0e-40]);
    let mut cpu = vec![bf16::ZERO; n];
    kernels::cast_bf16(&special, &mut cpu).unwrap();
    let mut d_out = st.alloc_zeros::<bf16>(n).unwrap();
    k.cast_bf16(&st.clone_htod(&special).unwrap(), &mut d_out).unwrap();
    let got = st.clone_dtoh(&d_out).unwrap();
    let bits = |v: &[bf16]| v.iter().map(|b| b.to_bits()).collect::<Vec<u16>>();
    assert_eq!(
        bits(&got),
        bits(&cpu),
        "cast_f32_bf16: bit for bit, NaN and ties included"
    );

    // A bad shape is a typed error before any launch.
    let mut short = st.alloc_zeros::<f32>(3).unwrap();
    assert!(matches!(
        k.residual_add(&mut short, &st.clone_htod(&delta).unwrap()),
        Err(CudaError::Shape(ShapeError::Len { .. }))
    ));
}

#[test]
#[ignore = "needs 1 GPU"]
fn rope_kv_append_and_attention_match_their_twins_for_decode_and_prefill() {
    let k = gpu();
    let st = k.stream();
    // Llama-3-style rope scaling (a SmolLM2-like head layout: 9 q heads over 3 KV heads, head_dim 64), and
    // head_dim 128 / 256 without scaling.
    for (hd, nq_all, nkv_all, scaling) in [(64, 9, 3, true), (128, 8, 2, false), (256, 4, 4, false)] {
        let mut cfg = LlamaConfig::tiny();
        cfg.head_dim = hd;
        cfg.num_attention_heads = nq_all;
        cfg.num_key_value_heads = nkv_all;
        cfg.rope_theta = 500_000.0;
        if scaling {
            cfg.rope_scaling = Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            });
        }
        let rope = Rope::new(rope_inv_freq(&cfg));
        let max_seq = 300;
        let (cos, sin) = rope_tables(&rope, max_seq);
        let (d_cos, d_sin) = (st.clone_htod(&cos).unwrap(), st.clone_htod(&sin).unwrap());
        // The whole model on one rank (TP 1): all heads local.
        let base = AttentionShape {
            rows: 1,
            row_stride: (nq_all + 2 * nkv_all) * hd,
            q_heads: nq_all,
            kv_heads: nkv_all,
            head_dim: hd,
            max_seq,
            group: nq_all / nkv_all,
            q_start: 0,
            kv_start: 0,
        };
        for bf in [false, true] {
            let mut cpu_k = vec![0.0f32; base.cache_len()];
            let mut cpu_v = vec![0.0f32; base.cache_len()];
            let mut cpu_kb = vec![bf16::ZERO; base.cache_len()];
            let mut cpu_vb = vec![bf16::ZERO; base.cache_len()];
            let mut d_k = st.alloc_zeros::<f32>(base.cache_len()).unwrap();
            let mut d_v = st.alloc_zeros::<f32>(base.cache_len()).unwrap();
            let mut d_kb = st.alloc_zeros::<bf16>(base.cache_len()).unwrap();
            let mut d_vb = st.alloc_zeros::<bf16>(base.cache_len()).unwrap();
            // A prefill of 257 rows (causal), then 3 decode steps; positions up to 259.
            let mut pos0 = 0usize;
            for (step, n) in [257usize, 1, 1, 1].into_iter().enumerate() {
                let s = AttentionShape { rows: n, ..base };
                let positions: Vec<u32> = (pos0..pos0 + n).map(|p| p as u32).collect();
                let d_pos = k.upload_positions(&positions).unwrap();
                let mut qkv = random(n * s.row_stride, (hd * 10 + step) as u64);
                let rs = RopeShape {
                    rows: n,
                    row_stride: s.row_stride,
                    heads: nq_all + nkv_all,
                    half: hd / 2,
                    max_pos: max_seq,
                };
                let mut d_qkv = st.clone_htod(&qkv).unwrap();
                kernels::rope(&rs, &rope, &mut qkv, &positions).unwrap();
                k.rope(&rs, &mut d_qkv, &d_cos, &d_sin, &d_pos.all()).unwrap();
                let gpu_qkv = st.clone_dtoh(&d_qkv).unwrap();
                close(&format!("rope hd {hd} step {step}"), Tolerance::F32, &gpu_qkv, &qkv);
                // From here both sides continue from the same (CPU) rotated rows.
                let d_qkv = st.clone_htod(&qkv).unwrap();
                let mut cpu_out = vec![0.0f32; n * nq_all * hd];
                let mut d_out = st.alloc_zeros::<f32>(cpu_out.len()).unwrap();
                let what = format!("hd {hd} bf16 cache {bf} step {step} ({n} rows)");
                if bf {
                    kernels::kv_append(&s, &qkv, &mut cpu_kb, &mut cpu_vb, &positions).unwrap();
                    k.kv_append(&s, &d_qkv.as_view(), &mut d_kb, &mut d_vb, &d_pos.all())
                        .unwrap();
                    close(
                        &format!("kv_append k {what}"),
                        Tolerance::EXACT,
                        &wide(&st.clone_dtoh(&d_kb).unwrap()),
                        &wide(&cpu_kb),
                    );
                    close(
                        &format!("kv_append v {what}"),
                        Tolerance::EXACT,
                        &wide(&st.clone_dtoh(&d_vb).unwrap()),
                        &wide(&cpu_vb),
                    );
                    kernels::attention(&s, &qkv, &cpu_kb, &cpu_vb, &positions, &mut cpu_out).unwrap();
                    k.attention(
                        &s,
                        &d_qkv.as_view(),
                        &d_kb,
                        &d_vb,
                        &d_pos.all(),
                        &mut d_out.as_view_mut(),
                    )
                    .unwrap();
                } else {
                    kernels::kv_append(&s, &qkv, &mut cpu_k, &mut cpu_v, &positions).unwrap();
                    k.kv_append(&s, &d_qkv.as_view(), &mut d_k, &mut d_v, &d_pos.all())
                        .unwrap();
                    close(
                        &format!("kv_append k {what}"),
                        Tolerance::EXACT,
                        &st.clone_dtoh(&d_k).unwrap(),
                        &cpu_k,
                    );
                    close(
                        &format!("kv_append v {what}"),
                        Tolerance::EXACT,
                        &st.clone_dtoh(&d_v).unwrap(),
                        &cpu_v,
                    );
                    kernels::attention(&s, &qkv, &cpu_k, &cpu_v, &positions, &mut cpu_out).unwrap();
                    k.attention(&s, &d_qkv.as_view(), &d_k, &d_v, &d_pos.all(), &mut d_out.as_view_mut())
                        .unwrap();
                }
                close(
                    &format!("attention {what}"),
                    Tolerance::ATTENTION_F32,
                    &st.clone_dtoh(&d_out).unwrap(),
                    &cpu_out,
                );
                pos0 += n;
            }
        }
    }
    // A tensor-parallel rank's slice (rank 1 of TP 3 in a 9 q / 3 KV model: q heads 3..6, KV head 1).
    let s = AttentionShape {
        rows: 4,
        row_stride: (3 + 2) * 64,
        q_heads: 3,
        kv_heads: 1,
        head_dim: 64,
        max_seq: 8,
        group: 3,
        q_start: 3,
        kv_start: 1,
    };
    let qkv = random(4 * s.row_stride, 99);
    let positions = [0u32, 1, 2, 3];
    let d_pos = k.upload_positions(&positions).unwrap();
    let (mut ck, mut cv) = (vec![0.0f32; s.cache_len()], vec![0.0f32; s.cache_len()]);
    kernels::kv_append(&s, &qkv, &mut ck, &mut cv, &positions).unwrap();
    let mut cpu = vec![0.0f32; 4 * 3 * 64];
    kernels::attention(&s, &qkv, &ck, &cv, &positions, &mut cpu).unwrap();
    let d_qkv = st.clone_htod(&qkv).unwrap();
    let (mut dk, mut dv) = (
        st.alloc_zeros::<f32>(s.cache_len()).unwrap(),
        st.alloc_zeros::<f32>(s.cache_len()).unwrap(),
    );
    k.kv_append(&s, &d_qkv.as_view(), &mut dk, &mut dv, &d_pos.all())
        .unwrap();
    let mut d_out = st.alloc_zeros::<f32>(cpu.len()).unwrap();
    k.attention(&s, &d_qkv.as_view(), &dk, &dv, &d_pos.all(), &mut d_out.as_view_mut())
        .unwrap();
    close(
        "attention TP rank 1 of 3",
        Tolerance::ATTENTION_F32,
        &st.clone_dtoh(&d_out).unwrap(),
        &cpu,
    );
    // A position past the cache is refused before any launch.
    assert!(matches!(
        k.attention(
            &s,
            &d_qkv.as_view(),
            &dk,
            &dv,
            &k.upload_positions(&[0, 1, 2, 8]).unwrap().all(),
            &mut d_out.as_view_mut()
        ),
        Err(CudaError::Shape(ShapeError::Position { row: 3, pos: 8, .. }))
    ));
}

#[test]
#[ignore = "needs 1 GPU"]
fn silu_mul_argmax_and_linear_match_their_twins() {
    let k = gpu();
    let st = k.stream();
    let s = SiluMulShape { rows: 7, ffn: 1536 };
    // Gate values over a wider range than [-1, 1], where exp matters.
    let gu: Vec<f32> = random(7 * 2 * 1536, 21).into_iter().map(|v| v * 8.0).collect();
    let d_gu = st.clone_htod(&gu).unwrap();
    let mut cpu = vec![0.0f32; 7 * 1536];
    kernels::silu_mul(&s, &gu, &mut cpu).unwrap();
    let mut d_out = st.alloc_zeros::<f32>(cpu.len()).unwrap();
    k.silu_mul(&s, &d_gu, &mut d_out).unwrap();
    close("silu_mul f32", Tolerance::F32, &st.clone_dtoh(&d_out).unwrap(), &cpu);
    let mut cpu_b = vec![bf16::ZERO; 7 * 1536];
    kernels::silu_mul(&s, &gu, &mut cpu_b).unwrap();
    let mut d_out_b = st.alloc_zeros::<bf16>(cpu_b.len()).unwrap();
    k.silu_mul(&s, &d_gu, &mut d_out_b).unwrap();
    close(
        "silu_mul bf16",
        Tolerance::BF16,
        &wide(&st.clone_dtoh(&d_out_b).unwrap()),
        &wide(&cpu_b),
    );

    // Argmax: random rows, plus ties, NaN and all -inf rows.
    let vocab = 49_152;
    let mut logits = random(6 * vocab, 22);
    logits[vocab + 10] = 5.0;
    logits[vocab + 40_000] = 5.0; // a tie: the first wins
    logits[2 * vocab + 3] = f32::NAN;
    logits[2 * vocab + 4] = 9.0;
    logits[3 * vocab..4 * vocab].fill(f32::NEG_INFINITY);
    logits[4 * vocab..5 * vocab].fill(f32::NAN);
    logits[6 * vocab - 1] = 2.0; // the very last element
    let s = ArgmaxShape { rows: 6, vocab };
    let mut cpu = vec![0u32; 6];
    kernels::argmax(&s, &logits, &mut cpu).unwrap();
    assert_eq!(&cpu[1..6], &[10, 4, 0, 0, vocab as u32 - 1]);
    let mut d_out = st.alloc_zeros::<u32>(6).unwrap();
    k.argmax(&s, &st.clone_htod(&logits).unwrap(), &mut d_out).unwrap();
    assert_eq!(st.clone_dtoh(&d_out).unwrap(), cpu, "argmax_f32");

    // Linear through cuBLAS: f32 (no TF32: cuBLAS's default math mode) and bf16 with f32 accumulation.
    for (n, rows, cols) in [(1, 960, 576), (13, 1536, 576), (4, 576, 1536)] {
        let x = random(n * cols, 31);
        let w = Matrix::new(rows, cols, random(rows * cols, 32));
        let mut cpu = vec![0.0f32; n * rows];
        math::linear(&x, n, &w, &mut cpu, 1);
        let mut d_y = st.alloc_zeros::<f32>(n * rows).unwrap();
        k.linear(
            &st.clone_htod(&x).unwrap(),
            n,
            &st.clone_htod(&w.data).unwrap(),
            rows,
            cols,
            &mut d_y,
        )
        .unwrap();
        // Sums of `cols` products of values in [-1, 1] in another order.
        let tol = Tolerance { abs: 1e-4, rel: 1e-4 };
        close(
            &format!("linear f32 {n}x{cols} -> {rows}"),
            tol,
            &st.clone_dtoh(&d_y).unwrap(),
            &cpu,
        );
        let (xb, wb) = (to_bf16(&x), to_bf16(&w.data));
        let mut cpu = vec![0.0f32; n * rows];
        math::linear(&wide(&xb), n, &Matrix::new(rows, cols, wide(&wb)), &mut cpu, 1);
        let mut d_y = st.alloc_zeros::<bf16>(n * rows).unwrap();
        k.linear(
            &st.clone_htod(&xb).unwrap(),
            n,
            &st.clone_htod(&wb).unwrap(),
            rows,
            cols,
            &mut d_y,
        )
        .unwrap();
        // The f32 sum (same inputs) rounded once to bf16, plus the order of the f32 accumulation.
        let tol = Tolerance {
            abs: 1e-3,
            rel: 1.0 / 128.0,
        };
        close(
            &format!("linear bf16 {n}x{cols} -> {rows}"),
            tol,
            &wide(&st.clone_dtoh(&d_y).unwrap()),
            &cpu,
        );
    }
}
