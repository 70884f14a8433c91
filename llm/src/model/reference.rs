//! A straightforward f64 forward pass of a Hugging Face Llama, written independently of the engine and used
//! only to check it. No KV cache, no sharding, no optimisation: every position attends to every earlier one.

use super::{rope_inv_freq, ModelError, Tensor, WeightSource};

fn matvec_rows(w: &Tensor, x: &[f64]) -> Vec<f64> {
    // y[o] = sum_i w[o, i] * x[i]  (w is [out, in], row-major)
    let cols = x.len();
    w.data
        .chunks_exact(cols)
        .map(|row| row.iter().zip(x).map(|(&a, &b)| a as f64 * b).sum())
        .collect()
}

fn rms_norm(x: &[f64], w: &Tensor, eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(&w.data).map(|(&v, &g)| v * inv * g as f64).collect()
}

fn check_shape(name: &str, t: &Tensor, shape: &[usize]) -> Result<(), ModelError> {
    if t.shape != shape || t.data.len() != shape.iter().product::<usize>() {
        return Err(ModelError::tensor(
            name,
            format!("shape {:?}, expected {shape:?}", t.shape),
        ));
    }
    Ok(())
}

/// Rotates each head of `v` (`n_heads * head_dim` values) in the rotate-half convention: element `i` pairs with
/// element `i + head_dim / 2`.
fn rope(v: &mut [f64], head_dim: usize, pos: usize, inv_freq: &[f64]) {
    let half = head_dim / 2;
    for head in v.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (s, c) = (pos as f64 * inv_freq[i]).sin_cos();
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * c - b * s;
            head[i + half] = b * c + a * s;
        }
    }
}

/// Logits (`vocab_size` values) at every position of `tokens`.
pub fn forward_f64(src: &dyn WeightSource, tokens: &[u32]) -> Result<Vec<Vec<f64>>, ModelError> {
    let cfg = src.config().clone();
    cfg.validate()?;
    let (h, hd, nh, nkv) = (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    );
    let (qd, kvd, ff) = (nh * hd, nkv * hd, cfg.intermediate_size);
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        return Err(ModelError::InvalidInput(format!(
            "token {bad} is outside the vocabulary of {}",
            cfg.vocab_size
        )));
    }
    let inv_freq = rope_inv_freq(&cfg);
    let get = |name: String, shape: &[usize]| -> Result<Tensor, ModelError> {
        let t = src.tensor(&name)?;
        check_shape(&name, &t, shape)?;
        Ok(t)
    };

    let embed = get("model.embed_tokens.weight".into(), &[cfg.vocab_size, h])?;
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| {
            embed.data[t as usize * h..(t as usize + 1) * h]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect();
    drop(embed);

    let group = nh / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let ln1 = get(format!("{p}.input_layernorm.weight"), &[h])?;
        let wq = get(format!("{p}.self_attn.q_proj.weight"), &[qd, h])?;
        let wk = get(format!("{p}.self_attn.k_proj.weight"), &[kvd, h])?;
        let wv = get(format!("{p}.self_attn.v_proj.weight"), &[kvd, h])?;
        let wo = get(format!("{p}.self_attn.o_proj.weight"), &[h, qd])?;
        let mut qs = Vec::with_capacity(xs.len());
        let mut ks = Vec::with_capacity(xs.len());
        let mut vs = Vec::with_capacity(xs.len());
        for (pos, x) in xs.iter().enumerate() {
            let n = rms_norm(x, &ln1, cfg.rms_norm_eps);
            let mut q = matvec_rows(&wq, &n);
            let mut k = matvec_rows(&wk, &n);
            rope(&mut q, hd, pos, &inv_freq);
            rope(&mut k, hd, pos, &inv_freq);
            qs.push(q);
            ks.push(k);
            vs.push(matvec_rows(&wv, &n));
        }
        for (pos, x) in xs.iter_mut().enumerate() {
            let mut attn = vec![0f64; qd];
            for head in 0..nh {
                let kvh = head / group;
                let q = &qs[pos][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=pos)
                    .map(|t| {
                        q.iter()
                            .zip(&ks[t][kvh * hd..(kvh + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                let out = &mut attn[head * hd..(head + 1) * hd];
                for (t, w) in e.iter().enumerate() {
                    for (o, v) in out.iter_mut().zip(&vs[t][kvh * hd..(kvh + 1) * hd]) {
                        *o += w / z * v;
                    }
                }
            }
            for (xi, oi) in x.iter_mut().zip(matvec_rows(&wo, &attn)) {
                *xi += oi;
            }
        }
        drop((wq, wk, wv, wo));
        let ln2 = get(format!("{p}.post_attention_layernorm.weight"), &[h])?;
        let wg = get(format!("{p}.mlp.gate_proj.weight"), &[ff, h])?;
        let wu = get(format!("{p}.mlp.up_proj.weight"), &[ff, h])?;
        let wd = get(format!("{p}.mlp.down_proj.weight"), &[h, ff])?;
        for x in xs.iter_mut() {
            let n = rms_norm(x, &ln2, cfg.rms_norm_eps);
            let g = matvec_rows(&wg, &n);
            let u = matvec_rows(&wu, &n);
            let act: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
            for (xi, di) in x.iter_mut().zip(matvec_rows(&wd, &act)) {
                *xi += di;
            }
        }
    }
    let norm = get("model.norm.weight".into(), &[h])?;
    let head = get("lm_head.weight".into(), &[cfg.vocab_size, h])?;
    Ok(xs
        .iter()
        .map(|x| matvec_rows(&head, &rms_norm(x, &norm, cfg.rms_norm_eps)))
        .collect())
}
