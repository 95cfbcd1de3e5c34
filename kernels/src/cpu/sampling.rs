//! Token selection from a row of logits: the one implementation of the
//! sampling rule, which the worker runs on the host and the CUDA kernel
//! (`cuda/sampling.cu`) is tested against, and the one random-number
//! scheme both use, so a seed gives the same tokens on either.
//!
//! The rule: temperature <= 0 or top_k == 1 is greedy (the first index of
//! the largest logit, as `torch.argmax`). Otherwise the candidates are the
//! logits at or above the k-th largest (all ties kept; top_k 0 = all),
//! then the smallest set of the largest of those whose probability mass at
//! the temperature reaches top_p (ties at the cut kept), and the token is
//! drawn by inverse CDF over the candidates in vocabulary order with a
//! uniform `u` in [0, 1). `min_p` > 0 also drops every logit whose
//! probability at the temperature is below `min_p` times the top one's
//! (before top-p's mass is counted, as vLLM orders them). The
//! log-probability reported is the model's (temperature 1, whole
//! vocabulary, before [`adjust`]).
//!
//! [`adjust`] applies a sequence's penalties and logit bias to its row
//! before the rule above: repetition (Hugging Face's and vLLM's rule, over
//! prompt and generated tokens: a positive logit is divided by the
//! penalty, a negative one multiplied), then frequency and presence
//! (OpenAI's, over generated tokens: `count * frequency + (count > 0) *
//! presence` subtracted), then the bias added.
//!
//! The draw of a sequence's `n`-th token is [`uniform`]`(seed, n)`: it
//! depends on the seed and the index alone, so a stage that samples keeps
//! no per-sequence state, and a sequence preempted and recomputed (or
//! batched with others, or sampled on another device) draws what it would
//! have alone.

use crate::cpu::vecmath;
use crate::{KernelError, Result};

/// One row's sampling parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    pub temperature: f32,
    /// 0: no top-k.
    pub top_k: i32,
    /// 1: no top-p.
    pub top_p: f32,
    /// The draw, in [0, 1).
    pub uniform: f32,
    /// 0: no min-p.
    pub min_p: f32,
}

impl SampleParams {
    pub fn greedy() -> Self {
        SampleParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            uniform: 0.0,
            min_p: 0.0,
        }
    }

    fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    pub fn validate(&self, row: usize) -> Result<()> {
        let bad = |problem: String| KernelError::Invalid {
            op: "sample",
            arg: "params",
            problem,
        };
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(bad(format!(
                "row {row}: temperature {} is not a finite number >= 0",
                self.temperature
            )));
        }
        if self.top_k < 0 {
            return Err(bad(format!("row {row}: top_k {} is negative", self.top_k)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad(format!(
                "row {row}: top_p {} is not in (0, 1]",
                self.top_p
            )));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(bad(format!(
                "row {row}: min_p {} is not in [0, 1]",
                self.min_p
            )));
        }
        if !(0.0..1.0).contains(&self.uniform) {
            return Err(bad(format!(
                "row {row}: uniform {} is not in [0, 1)",
                self.uniform
            )));
        }
        Ok(())
    }
}

/// SplitMix64's finalizer: a bijection of u64 that mixes every bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The uniform draw in [0, 1) for token `index` (0 = first generated) of
/// a sequence seeded `seed`: counter-based (a hash of the pair), so any
/// token's draw is computed alone, on the host or on a device. 24 bits, so
/// every value is exact in f32.
pub fn uniform(seed: u64, index: u64) -> f32 {
    let z =
        mix(mix(seed ^ 0x9e37_79b9_7f4a_7c15)
            .wrapping_add(index.wrapping_mul(0xd1b5_4a32_d192_ed03)));
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// The order-preserving integer key of a logit (the kernel's).
pub fn order_key(v: f32) -> u32 {
    let u = v.to_bits();
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
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

/// log-softmax of `logits` at `id`: f32 exponentials (16 lanes at a time
/// where the CPU has them), summed in f64.
pub fn logprob(logits: &[f32], id: u32) -> f32 {
    let max = vecmath::max(logits);
    let sum = vecmath::sum_exp(logits, max);
    (logits[id as usize] - max) - sum.ln() as f32
}

/// The smallest key of the candidates (every logit whose key is at least
/// this is one), with `top` the largest logit.
fn threshold(logits: &[f32], p: &SampleParams, top: f32) -> u32 {
    let n = logits.len();
    let tk = if p.top_k > 0 && (p.top_k as usize) < n {
        let mut keys: Vec<u32> = logits.iter().map(|&l| order_key(l)).collect();
        let k = p.top_k as usize - 1;
        *keys.select_nth_unstable_by(k, |a, b| b.cmp(a)).1
    } else {
        0
    };
    // min-p: p / p_top >= min_p <=> l >= top + T ln(min_p).
    let tk = if p.min_p > 0.0 {
        tk.max(order_key(top + p.temperature * p.min_p.ln()))
    } else {
        tk
    };
    if p.top_p >= 1.0 {
        return tk;
    }
    let inv_t = 1.0 / p.temperature as f64;
    let w = |l: f32| ((l - top) as f64 * inv_t).exp();
    let cand: Vec<(u32, f64)> = logits
        .iter()
        .filter(|&&l| order_key(l) >= tk)
        .map(|&l| (order_key(l), w(l)))
        .collect();
    let total: f64 = cand.iter().map(|e| e.1).sum();
    let goal = p.top_p as f64 * total;
    // The walk from the top stops at the first key where the mass reaches
    // top_p. Logits lighter than (1 - top_p) * total / n weigh less than
    // (1 - top_p) * total together, so the heavier ones alone reach top_p:
    // the walk never gets past them and only they need sorting (all of
    // them again if rounding says otherwise).
    let light = (1.0 - p.top_p as f64) * total / cand.len() as f64;
    let heavy: Vec<(u32, f64)> = cand.iter().copied().filter(|e| e.1 >= light).collect();
    walk(heavy, goal)
        .or_else(|| walk(cand, goal))
        .map_or(tk, |key| tk.max(key))
}

/// Walks distinct keys from the top until the mass reaches `goal`;
/// returns the key where it does.
fn walk(mut cand: Vec<(u32, f64)>, goal: f64) -> Option<u32> {
    cand.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
    let mut cum = 0.0;
    let mut i = 0;
    while i < cand.len() {
        let key = cand[i].0;
        while i < cand.len() && cand[i].0 == key {
            cum += cand[i].1;
            i += 1;
        }
        if cum >= goal {
            return Some(key);
        }
    }
    None
}

/// A sequence's penalties and logit bias: what [`adjust`] applies.
#[derive(Debug, Clone, Copy)]
pub struct Adjust<'a> {
    /// 1: none.
    pub repetition: f32,
    /// 0: none.
    pub frequency: f32,
    /// 0: none.
    pub presence: f32,
    /// Added to the logits of these tokens.
    pub bias: &'a [(u32, f32)],
    /// The sequence's tokens so far (prompt, then generated).
    pub tokens: &'a [u32],
    /// Where the generated tokens start in `tokens`.
    pub generated_from: usize,
}

/// Applies a sequence's penalties and bias to its row of logits (see the
/// module's text for the rule). Token ids outside the row are ignored
/// (the request's checks refuse them before a step is made).
pub fn adjust(logits: &mut [f32], a: &Adjust) {
    let n = logits.len();
    if a.repetition != 1.0 {
        let mut seen = vec![false; n];
        for &t in a.tokens {
            let t = t as usize;
            if t < n && !std::mem::replace(&mut seen[t], true) {
                let l = &mut logits[t];
                *l = if *l > 0.0 {
                    *l / a.repetition
                } else {
                    *l * a.repetition
                };
            }
        }
    }
    if a.frequency != 0.0 || a.presence != 0.0 {
        let mut counts: std::collections::HashMap<u32, u32> = Default::default();
        for &t in a.tokens.get(a.generated_from..).unwrap_or(&[]) {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= c as f32 * a.frequency + a.presence;
            }
        }
    }
    for &(t, b) in a.bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += b;
        }
    }
}

/// The `n` most likely tokens under the model (log-softmax of the row,
/// temperature 1), most likely first (the lower id first on ties).
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 || logits.is_empty() {
        return Vec::new();
    }
    let max = vecmath::max(logits);
    let log_sum = vecmath::sum_exp(logits, max).ln() as f32;
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(ids.len());
    let by = |a: &u32, b: &u32| {
        order_key(logits[*b as usize])
            .cmp(&order_key(logits[*a as usize]))
            .then(a.cmp(b))
    };
    if n < ids.len() {
        ids.select_nth_unstable_by(n - 1, by);
        ids.truncate(n);
    }
    ids.sort_unstable_by(by);
    ids.into_iter()
        .map(|i| (i, (logits[i as usize] - max) - log_sum))
        .collect()
}

/// The candidates' mask for one row (before the draw).
pub fn candidates(logits: &[f32], p: &SampleParams) -> Vec<bool> {
    let top = vecmath::max(logits);
    let tau = threshold(logits, p, top);
    logits.iter().map(|&l| order_key(l) >= tau).collect()
}

/// Picks one row's token; returns it with its log-probability under the
/// model (temperature 1, whole vocabulary).
pub fn sample(logits: &[f32], p: &SampleParams) -> (u32, f32) {
    let id = if p.is_greedy() {
        argmax(logits)
    } else {
        let top = vecmath::max(logits);
        let first_top = logits.iter().position(|&l| l == top).unwrap_or(0);
        let tau = threshold(logits, p, top);
        let inv_t = 1.0 / p.temperature as f64;
        // Each candidate's weight, once (the draw's two passes read it).
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| {
                if order_key(l) >= tau {
                    ((l - top) as f64 * inv_t).exp()
                } else {
                    0.0
                }
            })
            .collect();
        let mut rest = p.uniform as f64 * w.iter().sum::<f64>();
        let mut last = first_top;
        let mut pick = None;
        for (i, &wi) in w.iter().enumerate() {
            if wi <= 0.0 {
                continue;
            }
            last = i;
            if rest < wi {
                pick = Some(i);
                break;
            }
            rest -= wi;
        }
        pick.unwrap_or(last) as u32
    };
    (id, logprob(logits, id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    fn row(seed: i64, vocab: i64) -> Vec<f32> {
        tch::manual_seed(seed);
        Vec::<f32>::try_from(Tensor::randn([vocab], (Kind::Float, Device::Cpu)) * 3.0).unwrap()
    }

    /// The candidate set equals libtorch's sort + top-k + cumsum recipe,
    /// and evenly spaced draws hit each candidate in proportion to its
    /// renormalized probability.
    #[test]
    fn draws_the_truncated_distribution() {
        let logits = row(6, 500);
        let t = Tensor::from_slice(&logits);
        for (temperature, top_k, top_p) in [
            (1.0f32, 0i32, 1.0f32),
            (0.7, 40, 1.0),
            (1.3, 0, 0.8),
            (0.9, 100, 0.5),
            (1.0, 0, 0.999),
        ] {
            let p = SampleParams {
                temperature,
                top_k,
                top_p,
                uniform: 0.0,
                min_p: 0.0,
            };
            let keep = candidates(&logits, &p);
            // libtorch: sort descending, keep top-k, then the prefix whose
            // cumulative probability first reaches top_p.
            let (sorted, idx) = (&t / temperature as f64).sort(0, true);
            let k = if top_k > 0 { top_k as i64 } else { 500 };
            let (sorted, idx) = (sorted.narrow(0, 0, k), idx.narrow(0, 0, k));
            let cum = sorted.softmax(0, Kind::Double).cumsum(0, Kind::Double);
            let cum = Vec::<f64>::try_from(cum).unwrap();
            let n = if top_p < 1.0 {
                cum.iter().position(|&c| c >= top_p as f64).unwrap() + 1
            } else {
                k as usize
            };
            let mut want = vec![false; 500];
            for i in Vec::<i64>::try_from(idx.narrow(0, 0, n as i64)).unwrap() {
                want[i as usize] = true;
            }
            assert_eq!(keep, want, "T={temperature} k={top_k} p={top_p}");

            let probs = {
                let masked: Vec<f64> = logits
                    .iter()
                    .zip(&keep)
                    .map(|(&l, &k)| {
                        if k {
                            (l as f64 / temperature as f64).exp()
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let s: f64 = masked.iter().sum();
                masked.into_iter().map(|m| m / s).collect::<Vec<_>>()
            };
            let draws = 4000;
            let mut counts = vec![0usize; 500];
            for i in 0..draws {
                let u = (i as f32 + 0.5) / draws as f32;
                let (id, _) = sample(&logits, &SampleParams { uniform: u, ..p });
                assert!(keep[id as usize], "drew a token outside the candidates");
                counts[id as usize] += 1;
            }
            for (i, (&c, &pr)) in counts.iter().zip(&probs).enumerate() {
                assert!(
                    (c as f64 - pr * draws as f64).abs() <= 1.5,
                    "token {i}: {c} draws for p={pr}"
                );
            }
        }
    }

    /// min-p keeps the tokens whose probability at the temperature is at
    /// least min_p times the top one's (libtorch's softmax as the
    /// reference), and top-p then counts mass over those alone.
    #[test]
    fn min_p_keeps_what_is_likely_enough() {
        let logits = row(9, 400);
        let t = Tensor::from_slice(&logits);
        for (temperature, min_p, top_p) in
            [(1.0f32, 0.05f32, 1.0f32), (0.6, 0.2, 1.0), (1.5, 0.1, 0.7)]
        {
            let p = SampleParams {
                temperature,
                top_k: 0,
                top_p,
                uniform: 0.0,
                min_p,
            };
            let keep = candidates(&logits, &p);
            let probs =
                Vec::<f64>::try_from((&t / temperature as f64).softmax(0, Kind::Double)).unwrap();
            let top = probs.iter().cloned().fold(0.0, f64::max);
            let after_min_p: Vec<bool> = probs
                .iter()
                .map(|&q| q >= min_p as f64 * top * (1.0 - 1e-6))
                .collect();
            if top_p >= 1.0 {
                assert_eq!(keep, after_min_p, "T={temperature} min_p={min_p}");
            } else {
                // A subset of min-p's, holding at least top_p of its mass.
                let mass =
                    |m: &[bool]| -> f64 { probs.iter().zip(m).filter(|e| *e.1).map(|e| e.0).sum() };
                assert!(keep.iter().zip(&after_min_p).all(|(k, a)| !k || *a));
                assert!(mass(&keep) >= top_p as f64 * mass(&after_min_p) - 1e-9);
                assert!(
                    keep.iter().filter(|k| **k).count()
                        < after_min_p.iter().filter(|k| **k).count()
                );
            }
        }
    }

    /// Penalties and bias as their owners state them: OpenAI's
    /// `mu - c * frequency - (c > 0) * presence` over generated tokens,
    /// Hugging Face's repetition rule over prompt and generated tokens.
    #[test]
    fn penalties_and_bias_follow_their_definitions() {
        let base = [2.0f32, -1.0, 0.5, 3.0, -2.0, 1.0];
        // Prompt [0, 1], generated [3, 3, 4].
        let tokens = [0u32, 1, 3, 3, 4];
        let mut l = base;
        adjust(
            &mut l,
            &Adjust {
                repetition: 1.0,
                frequency: 0.5,
                presence: 0.25,
                bias: &[(5, -100.0), (2, 1.5)],
                tokens: &tokens,
                generated_from: 2,
            },
        );
        assert_eq!(
            l,
            [2.0, -1.0, 2.0, 3.0 - 1.0 - 0.25, -2.0 - 0.5 - 0.25, -99.0]
        );
        let mut l = base;
        adjust(
            &mut l,
            &Adjust {
                repetition: 2.0,
                frequency: 0.0,
                presence: 0.0,
                bias: &[],
                tokens: &tokens,
                generated_from: 2,
            },
        );
        assert_eq!(l, [1.0, -2.0, 0.5, 1.5, -4.0, 1.0]);
        // Greedy on the adjusted row: the bias decides.
        let mut l = base;
        adjust(
            &mut l,
            &Adjust {
                repetition: 1.0,
                frequency: 0.0,
                presence: 0.0,
                bias: &[(4, 10.0)],
                tokens: &[],
                generated_from: 0,
            },
        );
        assert_eq!(sample(&l, &SampleParams::greedy()).0, 4);
    }

    #[test]
    fn top_logprobs_are_libtorchs_largest() {
        let mut logits = row(10, 1000);
        logits[5] = logits[900];
        let lsm = Tensor::from_slice(&logits).log_softmax(0, Kind::Float);
        let (vals, idx) = lsm.topk(20, 0, true, true);
        let vals = Vec::<f32>::try_from(vals).unwrap();
        let idx = Vec::<i64>::try_from(idx).unwrap();
        let ours = top_logprobs(&logits, 20);
        assert_eq!(ours.len(), 20);
        for (k, &(id, lp)) in ours.iter().enumerate() {
            assert!((lp - vals[k]).abs() < 1e-5, "{k}: {lp} vs {}", vals[k]);
            assert_eq!(logits[id as usize], logits[idx[k] as usize], "{k}");
        }
        assert!(ours.windows(2).all(|w| w[0].1 >= w[1].1));
        assert_eq!(top_logprobs(&logits, 0), vec![]);
        assert_eq!(top_logprobs(&[1.0, 2.0], 5).len(), 2);
    }

    #[test]
    fn greedy_and_log_probabilities() {
        let mut logits = row(7, 300);
        logits[17] = 50.0;
        logits[201] = 50.0;
        let greedy = sample(&logits, &SampleParams::greedy());
        assert_eq!(greedy.0, 17, "first index on ties, as torch.argmax");
        let top1 = sample(
            &logits,
            &SampleParams {
                temperature: 2.0,
                top_k: 1,
                top_p: 1.0,
                uniform: 0.99,
                min_p: 0.0,
            },
        );
        assert_eq!(top1.0, 17);
        let lsm =
            Vec::<f32>::try_from(Tensor::from_slice(&logits).log_softmax(0, Kind::Float)).unwrap();
        assert!((greedy.1 - lsm[17]).abs() < 1e-5);
        let drawn = sample(
            &logits,
            &SampleParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                uniform: 0.7,
                min_p: 0.0,
            },
        );
        assert!((drawn.1 - lsm[drawn.0 as usize]).abs() < 1e-5);
    }

    /// The draws are uniform (a chi-square over 16 bins), in [0, 1), and
    /// differ between seeds and between indices.
    #[test]
    fn the_draws_are_uniform_and_depend_on_seed_and_index() {
        let n = 64_000;
        let mut bins = [0usize; 16];
        for i in 0..n {
            let u = uniform(7, i);
            assert!((0.0..1.0).contains(&u), "{u}");
            bins[(u * 16.0) as usize] += 1;
        }
        let e = n as f64 / 16.0;
        let chi2: f64 = bins.iter().map(|&b| (b as f64 - e).powi(2) / e).sum();
        // 15 degrees of freedom: 37.7 is the 0.1% tail.
        assert!(chi2 < 37.7, "chi-square {chi2}: {bins:?}");
        assert_ne!(uniform(7, 0), uniform(8, 0));
        assert_ne!(uniform(7, 0), uniform(7, 1));
        assert_eq!(uniform(7, 3), uniform(7, 3));
    }

    #[test]
    fn parameters_are_checked() {
        for (p, want) in [
            (
                SampleParams {
                    temperature: f32::NAN,
                    ..SampleParams::greedy()
                },
                "temperature NaN",
            ),
            (
                SampleParams {
                    top_k: -1,
                    ..SampleParams::greedy()
                },
                "top_k -1",
            ),
            (
                SampleParams {
                    top_p: 0.0,
                    ..SampleParams::greedy()
                },
                "top_p 0",
            ),
            (
                SampleParams {
                    uniform: 1.0,
                    ..SampleParams::greedy()
                },
                "uniform 1",
            ),
            (
                SampleParams {
                    min_p: 1.5,
                    ..SampleParams::greedy()
                },
                "min_p 1.5",
            ),
        ] {
            let err = p.validate(0).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("row 0"), "{err}");
        }
    }
}
