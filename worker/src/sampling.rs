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
        min_p: p.min_p,
    }
}

/// A sequence's tokens so far, which its penalties count: the prompt, then
/// what it generated (from `generated_from` on; a sequence resumed
/// elsewhere generated the tail of its prompt).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct History {
    pub tokens: Vec<u32>,
    pub generated_from: usize,
}

/// A chosen token: its id, its log-probability under the model (before
/// penalties, bias, temperature and truncation) and, when asked for, the
/// most likely alternatives (same measure), most likely first.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Choice {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Picks token number `index` of a sequence sampled with `p` from its
/// row of logits; `history` is needed when `p` has penalties (none given:
/// they count nothing).
pub fn choose(p: &SamplingParams, logits: &[f32], index: u64, history: Option<&History>) -> Choice {
    let top = kernel::top_logprobs(logits, p.top_logprobs as usize);
    let at = params_at(p, index);
    let id = if p.adjusts_logits() {
        let mut row = logits.to_vec();
        let (tokens, generated_from) =
            history.map_or((&[][..], 0), |h| (&h.tokens[..], h.generated_from));
        kernel::adjust(
            &mut row,
            &kernel::Adjust {
                repetition: p.repetition_penalty,
                frequency: p.frequency_penalty,
                presence: p.presence_penalty,
                bias: &p.logit_bias,
                tokens,
                generated_from,
            },
        );
        kernel::sample(&row, &at).0
    } else {
        kernel::sample(logits, &at).0
    };
    Choice {
        id,
        logprob: logprob(logits, id),
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sequence's draws in order, through [`choose`] (no history).
    struct Sampler {
        params: SamplingParams,
        index: u64,
    }

    impl Sampler {
        fn new(params: SamplingParams) -> Self {
            Sampler { params, index: 0 }
        }

        fn sample(&mut self, logits: &[f32]) -> (u32, f32) {
            let r = self.sample_at(logits, self.index);
            self.index += 1;
            r
        }

        fn sample_at(&self, logits: &[f32], index: u64) -> (u32, f32) {
            let c = choose(&self.params, logits, index, None);
            (c.id, c.logprob)
        }
    }

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
            ..Default::default()
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
            ..Default::default()
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

    /// Penalties steer the draw (a token repeated in the history loses to
    /// the next best under greedy) while the reported log-probabilities
    /// stay the model's.
    #[test]
    fn penalties_steer_the_draw_not_the_reported_logprobs() {
        let logits = [1.0f32, 3.0, 2.9, 0.0];
        let plain = SamplingParams::default();
        assert_eq!(choose(&plain, &logits, 0, None).id, 1);
        let history = History {
            tokens: vec![3, 1, 1],
            generated_from: 1,
        };
        let p = SamplingParams {
            frequency_penalty: 0.1,
            top_logprobs: 2,
            ..Default::default()
        };
        let c = choose(&p, &logits, 0, Some(&history));
        assert_eq!(c.id, 2, "3.0 - 2 * 0.1 < 2.9");
        assert!((c.logprob - logprob(&logits, 2)).abs() < 1e-6);
        assert_eq!(c.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        // Prompt tokens do not count for frequency: token 3 is only in the
        // prompt, and with a competitive logit greedy still takes it.
        let close = [1.0f32, 2.0, 0.0, 2.05];
        let prompt_only = History {
            tokens: vec![3],
            generated_from: 1,
        };
        let f = SamplingParams {
            frequency_penalty: 2.0,
            ..Default::default()
        };
        assert_eq!(choose(&f, &close, 0, Some(&prompt_only)).id, 3);
        // Repetition counts the prompt: the same history now steers away.
        let r = SamplingParams {
            repetition_penalty: 1.5,
            ..Default::default()
        };
        assert_eq!(choose(&r, &close, 0, Some(&prompt_only)).id, 1);
        let bias = SamplingParams {
            logit_bias: vec![(0, 2.5)],
            ..Default::default()
        };
        assert_eq!(choose(&bias, &logits, 0, None).id, 0);
        let rep = SamplingParams {
            repetition_penalty: 1.5,
            ..Default::default()
        };
        // 3.0 / 1.5 = 2.0 < 2.9.
        assert_eq!(choose(&rep, &logits, 0, Some(&history)).id, 2);
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
