//! Token selection for a sequence: its `SamplingParams` (the wire's, from
//! `llmos_meta::request`) over the one sampler of `llmos_kernels::cpu::
//! sampling`, whose draw for the `n`-th token is `uniform(seed, n)`. The
//! draw depends on the seed and the index alone, so a stage that samples
//! keeps no per-sequence state, and a sequence preempted and recomputed
//! (or batched with others, or sampled by the CUDA kernel) draws exactly
//! what it would have alone.

use llmos_kernels::cpu::sampling::{self as kernel, SampleParams};

pub use kernel::{argmax, logprob};
pub use llmos_meta::request::SamplingParams;

/// The kernel's parameters of a sequence's token `index`.
pub fn params_at(p: &SamplingParams, index: u64) -> SampleParams {
    SampleParams {
        temperature: p.temperature,
        top_k: p.top_k.min(i32::MAX as usize) as i32,
        top_p: p.top_p,
        uniform: kernel::uniform(p.seed, index),
    }
}

pub struct Sampler {
    params: SamplingParams,
    /// Index of the next token.
    index: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler { params, index: 0 }
    }

    /// Picks the next token; returns it with its log-probability under the
    /// model's distribution (before temperature and truncation).
    pub fn sample(&mut self, logits: &[f32]) -> (u32, f32) {
        let r = self.sample_at(logits, self.index);
        self.index += 1;
        r
    }

    /// Picks token number `index` of the sequence (0 for the first
    /// generated token), independent of what was drawn before.
    pub fn sample_at(&self, logits: &[f32], index: u64) -> (u32, f32) {
        kernel::sample(logits, &params_at(&self.params, index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_argmax_and_reports_logprob() {
        let mut s = Sampler::new(SamplingParams::default());
        let (id, lp) = s.sample(&[0.0, 2.0, 1.0]);
        assert_eq!(id, 1);
        let expected = 2.0 - (1f32 + 2f32.exp() + 1f32.exp()).ln();
        assert!((lp - expected).abs() < 1e-6);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_reproduces() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 7919) % 97) as f32 / 10.0).collect();
        let p = |top_k, seed| SamplingParams {
            temperature: 1.0,
            top_k,
            top_p: 1.0,
            seed,
        };
        let mut s = Sampler::new(p(1, 3));
        assert_eq!(s.sample(&logits).0, argmax(&logits));
        let run = |seed| {
            let mut s = Sampler::new(p(0, seed));
            (0..20).map(|_| s.sample(&logits).0).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // Draw n depends on (seed, n) alone: out of order gives the same.
        let s = Sampler::new(p(0, 7));
        let backwards: Vec<u32> = (0..20).rev().map(|i| s.sample_at(&logits, i).0).collect();
        assert_eq!(backwards.into_iter().rev().collect::<Vec<_>>(), run(7));
    }

    #[test]
    fn top_p_restricts_to_the_nucleus() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps two tokens.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.7,
            seed: 1,
        });
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[s.sample(&logits).0 as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        // Roughly 0.64 / 0.88 of draws are token 0.
        let frac = seen[0] as f64 / 2000.0;
        assert!((frac - 0.731).abs() < 0.05, "{frac}");
    }

    #[test]
    fn invalid_params_are_named() {
        let p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("top_p"));
        let p = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature"));
    }
}
