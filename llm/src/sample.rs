//! Choosing the next token from logits: greedy, or temperature with nucleus (top-p) sampling.
//!
//! Every rank that samples uses the same seed and sees the same logits, so all of them choose the same token
//! without communicating.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (arg max); otherwise logits are divided by it before the softmax.
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probability reaches this (1 = all).
    pub top_p: f32,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// A seeded sampler.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// Index of the largest value (the first one on ties; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

impl SamplingParams {
    /// Checks the settings: `temperature` must be a finite number ≥ 0 (0 = greedy) and `top_p` a number in
    /// (0, 1]. Out-of-range values are refused rather than quietly treated as greedy or as 1.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        Ok(())
    }
}

/// Sampling settings that [`SamplingParams::validate`] refuses.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SamplingError {
    /// Negative, NaN or infinite temperature.
    #[error("temperature {0} is not a finite number ≥ 0 (0 = greedy)")]
    Temperature(f32),
    /// `top_p` outside (0, 1], or NaN.
    #[error("top-p {0} is not in (0, 1] (1 = keep every token)")]
    TopP(f32),
}

impl Sampler {
    /// A sampler with these settings.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    /// Chooses one token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 || !p.temperature.is_finite() {
            return argmax(logits);
        }
        let max = logits
            .iter()
            .copied()
            .filter(|v| !v.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                (
                    i as u32,
                    if l.is_nan() {
                        0.0
                    } else {
                        ((l - max) / p.temperature).exp()
                    },
                )
            })
            .collect();
        let total: f32 = probs.iter().map(|x| x.1).sum();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let top_p = if p.top_p > 0.0 && p.top_p < 1.0 { p.top_p } else { 1.0 };
        let mut keep = probs.len();
        let mut acc = 0.0;
        for (i, x) in probs.iter().enumerate() {
            acc += x.1 / total;
            if acc >= top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep.max(1));
        let kept: f32 = probs.iter().map(|x| x.1).sum();
        let mut r = self.rng.random::<f32>() * kept;
        for &(i, w) in &probs {
            if r < w {
                return i;
            }
            r -= w;
        }
        probs.last().map_or(0, |x| x.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_settings_are_refused() {
        let p = |temperature, top_p| SamplingParams {
            temperature,
            top_p,
            seed: 0,
        };
        for t in [-1.0, -f32::MIN_POSITIVE, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(
                matches!(p(t, 1.0).validate(), Err(SamplingError::Temperature(_))),
                "{t}"
            );
        }
        for tp in [2.0, 1.0 + f32::EPSILON, 0.0, -0.5, f32::NAN, f32::INFINITY] {
            assert!(matches!(p(1.0, tp).validate(), Err(SamplingError::TopP(_))), "{tp}");
        }
        for (t, tp) in [(0.0, 1.0), (0.7, 0.9), (100.0, f32::MIN_POSITIVE), (f32::MAX, 1.0)] {
            assert_eq!(p(t, tp).validate(), Ok(()), "{t} {tp}");
        }
        assert!(p(-1.0, 1.0)
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature -1"));
        assert!(p(0.0, 2.0).validate().unwrap_err().to_string().contains("top-p 2"));
    }

    #[test]
    fn greedy_takes_the_max() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0]), 1);
    }

    #[test]
    fn tiny_top_p_is_greedy_and_seeds_repeat() {
        let logits = [0.5, 2.0, 1.0, 1.9];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.01,
            seed: 3,
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits), 1);
        }
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
                seed,
            });
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let d = draw(7);
        // With temperature 1 over these logits every token has probability > 5%: all appear in 200 draws
        // with overwhelming likelihood, and the most likely one most often.
        for t in 0..4 {
            assert!(d.contains(&t), "{d:?}");
        }
    }
}
