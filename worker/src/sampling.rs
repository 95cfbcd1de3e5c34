//! Token selection from logits: greedy, or temperature + top-k + top-p with a
//! seeded ChaCha generator, so a seed reproduces a generation exactly. The
//! draw for the `n`-th token of a sequence uses ChaCha stream `n` of the
//! seed: it depends on the seed and the index alone, so a stage that samples
//! keeps no per-sequence state, and a sequence preempted and recomputed (or
//! batched with others) draws exactly what it would have alone.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use llmos_meta::request::SamplingParams;

pub struct Sampler {
    params: SamplingParams,
    /// Index of the next token.
    index: u64,
    scratch: Vec<(f32, u32)>,
}

/// log-softmax of `logits` at `id`.
pub fn logprob(logits: &[f32], id: u32) -> f32 {
    let max = llmos_kernels::cpu::vecmath::max(logits);
    // f32 exponentials (16 lanes at a time over a 49k vocabulary, once per
    // token), summed in f64.
    let sum = llmos_kernels::cpu::vecmath::sum_exp(logits, max);
    (logits[id as usize] - max) - sum.ln() as f32
}

/// Index of the largest logit (the first one on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            params,
            index: 0,
            scratch: Vec::new(),
        }
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
    pub fn sample_at(&mut self, logits: &[f32], index: u64) -> (u32, f32) {
        let id = if self.params.temperature <= 0.0 {
            argmax(logits)
        } else {
            let mut rng = ChaCha8Rng::seed_from_u64(self.params.seed);
            rng.set_stream(index);
            self.sample_random(logits, &mut rng)
        };
        (id, logprob(logits, id))
    }

    fn sample_random(&mut self, logits: &[f32], rng: &mut ChaCha8Rng) -> u32 {
        let inv_t = 1.0 / self.params.temperature;
        let c = &mut self.scratch;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (l * inv_t, i as u32)),
        );
        let desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if self.params.top_k > 0 && self.params.top_k < c.len() {
            c.select_nth_unstable_by(self.params.top_k - 1, desc);
            c.truncate(self.params.top_k);
        }
        c.sort_unstable_by(desc);
        let max = c[0].0;
        let mut total = 0f64;
        for e in c.iter_mut() {
            e.0 = (e.0 - max).exp();
            total += e.0 as f64;
        }
        if self.params.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p.
            let mut cum = 0f64;
            let mut keep = c.len();
            for (i, e) in c.iter().enumerate() {
                cum += e.0 as f64 / total;
                if cum >= self.params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
            total = c.iter().map(|e| e.0 as f64).sum();
        }
        let mut r = rng.gen::<f64>() * total;
        for e in c.iter() {
            r -= e.0 as f64;
            if r <= 0.0 {
                return e.1;
            }
        }
        c.last().expect("at least one candidate").1
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
        let mut s = Sampler::new(p(0, 7));
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
