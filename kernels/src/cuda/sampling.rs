//! Token selection on the device (`cuda/sampling.cu`): greedy, temperature,
//! top-k, top-p, with the uniform draw made on the host from the request's
//! seed, so the logits never leave the GPU; one copy of the chosen ids (and
//! their log-probabilities) per step.
//!
//! Semantics (shared by kernel and reference): temperature <= 0 or top_k ==
//! 1 is greedy (first index of the largest logit). Otherwise the candidates
//! are the logits at or above the k-th largest (all ties kept; top_k 0 = all),
//! then the smallest set of the largest of those whose probability mass (at
//! the temperature) reaches top_p (ties at the cut kept), and the token is
//! drawn by inverse CDF over the candidates in vocabulary order with u.

use tch::{Device, Kind, Tensor};

use crate::cuda::check::{self, ptr};
use crate::cuda::runtime::{Arg, Kernels, Launch};
use crate::cuda::Module;
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
}

impl SampleParams {
    pub fn greedy() -> Self {
        SampleParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            uniform: 0.0,
        }
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
        if !(0.0..1.0).contains(&self.uniform) {
            return Err(bad(format!(
                "row {row}: uniform {} is not in [0, 1)",
                self.uniform
            )));
        }
        Ok(())
    }
}

/// Threads per row (a block per row).
const THREADS: u32 = 256;

#[allow(clippy::too_many_arguments)]
pub fn plan_sample(
    ids: &Tensor,
    logprobs: &Tensor,
    logits: &Tensor,
    temperature: &Tensor,
    top_k: &Tensor,
    top_p: &Tensor,
    uniform: &Tensor,
) -> Result<Launch> {
    const OP: &str = "sample";
    check::kind(OP, "logits", logits, &[Kind::Float])?;
    let size = check::dims(OP, "logits", logits, 2)?;
    let stride = check::rows(OP, "logits", logits)?;
    let (rows, vocab) = (size[0], size[1]);
    if vocab == 0 {
        return Err(KernelError::Invalid {
            op: OP,
            arg: "logits",
            problem: "has no columns".into(),
        });
    }
    for (arg, t, kind) in [
        ("ids", ids, Kind::Int64),
        ("logprobs", logprobs, Kind::Float),
        ("temperature", temperature, Kind::Float),
        ("top_k", top_k, Kind::Int),
        ("top_p", top_p, Kind::Float),
        ("uniform", uniform, Kind::Float),
    ] {
        check::kind(OP, arg, t, &[kind])?;
        check::shape(OP, arg, t, &[rows])?;
        check::contiguous(OP, arg, t)?;
    }
    check::fits(OP, "rows", rows, i32::MAX as i64)?;
    check::fits(OP, "vocabulary", vocab, i32::MAX as i64)?;
    Ok(Launch {
        op: OP,
        module: Module::Sampling,
        function: "sample_f32".into(),
        grid: (rows as u32, 1, 1),
        block: (THREADS, 1, 1),
        args: vec![
            ptr(ids),
            ptr(logprobs),
            ptr(logits),
            Arg::I64(stride[0]),
            Arg::I32(vocab as i32),
            ptr(temperature),
            ptr(top_k),
            ptr(top_p),
            ptr(uniform),
        ],
        tensors: vec![
            ("ids", ids.device()),
            ("logprobs", logprobs.device()),
            ("logits", logits.device()),
            ("temperature", temperature.device()),
            ("top_k", top_k.device()),
            ("top_p", top_p.device()),
            ("uniform", uniform.device()),
        ],
    })
}

/// The parameter columns as CPU tensors.
fn columns(params: &[SampleParams]) -> Result<[Tensor; 4]> {
    for (i, p) in params.iter().enumerate() {
        p.validate(i)?;
    }
    Ok([
        Tensor::from_slice(&params.iter().map(|p| p.temperature).collect::<Vec<_>>()),
        Tensor::from_slice(&params.iter().map(|p| p.top_k).collect::<Vec<_>>()),
        Tensor::from_slice(&params.iter().map(|p| p.top_p).collect::<Vec<_>>()),
        Tensor::from_slice(&params.iter().map(|p| p.uniform).collect::<Vec<_>>()),
    ])
}

impl Kernels {
    /// Samples one token per row of `logits` (`[rows, vocab]` f32 on this
    /// device); returns the ids (i64) and log-probabilities (f32), on the
    /// device.
    pub fn sample(&self, logits: &Tensor, params: &[SampleParams]) -> Result<(Tensor, Tensor)> {
        let dev = logits.device();
        let rows = params.len() as i64;
        let cols = columns(params)?.map(|t| t.to_device(dev));
        let ids = Tensor::f_empty([rows], (Kind::Int64, dev))?;
        let logprobs = Tensor::f_empty([rows], (Kind::Float, dev))?;
        self.launch(&plan_sample(
            &ids, &logprobs, logits, &cols[0], &cols[1], &cols[2], &cols[3],
        )?)?;
        Ok((ids, logprobs))
    }
}

/// CPU reference: the same thresholds, found by sorting, masses in f64.
pub mod reference {
    use super::*;

    /// The order-preserving integer key of a logit (the kernel's).
    pub fn order_key(v: f32) -> u32 {
        let u = v.to_bits();
        if u & 0x8000_0000 != 0 {
            !u
        } else {
            u | 0x8000_0000
        }
    }

    /// The candidates' mask for one row (before the draw).
    pub fn candidates(logits: &[f32], p: &SampleParams) -> Vec<bool> {
        let inv_t = 1.0 / p.temperature as f64;
        let top = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut keys: Vec<u32> = logits.iter().map(|&l| order_key(l)).collect();
        keys.sort_unstable_by(|a, b| b.cmp(a));
        let tk = if p.top_k > 0 && (p.top_k as usize) < logits.len() {
            keys[p.top_k as usize - 1]
        } else {
            0
        };
        let mut tau = tk;
        if p.top_p < 1.0 {
            let w = |l: f32| ((l - top) as f64 * inv_t).exp();
            let total: f64 = logits
                .iter()
                .filter(|&&l| order_key(l) >= tk)
                .map(|&l| w(l))
                .sum();
            // Walk distinct keys from the top until the mass reaches p.
            let mut sorted: Vec<(u32, f32)> = logits
                .iter()
                .map(|&l| (order_key(l), l))
                .filter(|e| e.0 >= tk)
                .collect();
            sorted.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
            let mut cum = 0.0;
            let mut i = 0;
            while i < sorted.len() {
                let key = sorted[i].0;
                while i < sorted.len() && sorted[i].0 == key {
                    cum += w(sorted[i].1);
                    i += 1;
                }
                if cum >= p.top_p as f64 * total {
                    tau = tau.max(key);
                    break;
                }
            }
        }
        logits.iter().map(|&l| order_key(l) >= tau).collect()
    }

    /// Returns the token and its log-probability (temperature 1, whole
    /// vocabulary).
    pub fn sample(logits: &[f32], p: &SampleParams) -> (u32, f32) {
        let top = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let first_top = logits.iter().position(|&l| l == top).unwrap_or(0);
        let z: f64 = logits.iter().map(|&l| ((l - top) as f64).exp()).sum();
        let id = if p.temperature <= 0.0 || p.top_k == 1 {
            first_top
        } else {
            let inv_t = 1.0 / p.temperature as f64;
            let keep = candidates(logits, p);
            let w: Vec<f64> = logits
                .iter()
                .zip(&keep)
                .map(|(&l, &k)| {
                    if k {
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
            pick.unwrap_or(last)
        };
        (id as u32, logits[id] - top - z.ln() as f32)
    }

    /// Every row of `logits` (`[rows, vocab]`).
    pub fn sample_rows(logits: &Tensor, params: &[SampleParams]) -> Result<(Vec<i64>, Vec<f32>)> {
        for (i, p) in params.iter().enumerate() {
            p.validate(i)?;
        }
        let vocab = logits.size()[1] as usize;
        let v = Vec::<f32>::try_from(
            logits
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
                .contiguous()
                .view([-1]),
        )?;
        Ok(v.chunks_exact(vocab)
            .zip(params)
            .map(|(row, p)| {
                let (id, lp) = sample(row, p);
                (id as i64, lp)
            })
            .unzip())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seed: i64, vocab: i64) -> Vec<f32> {
        tch::manual_seed(seed);
        Vec::<f32>::try_from(Tensor::randn([vocab], (Kind::Float, Device::Cpu)) * 3.0).unwrap()
    }

    /// The candidate set equals libtorch's sort + top-k + cumsum recipe,
    /// and evenly spaced draws hit each candidate in proportion to its
    /// renormalized probability.
    #[test]
    fn reference_draws_the_truncated_distribution() {
        let logits = row(6, 500);
        let t = Tensor::from_slice(&logits);
        for (temperature, top_k, top_p) in [
            (1.0f32, 0i32, 1.0f32),
            (0.7, 40, 1.0),
            (1.3, 0, 0.8),
            (0.9, 100, 0.5),
        ] {
            let p = SampleParams {
                temperature,
                top_k,
                top_p,
                uniform: 0.0,
            };
            let keep = reference::candidates(&logits, &p);
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
                let (id, _) = reference::sample(&logits, &SampleParams { uniform: u, ..p });
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

    #[test]
    fn greedy_and_log_probabilities() {
        let mut logits = row(7, 300);
        logits[17] = 50.0;
        logits[201] = 50.0;
        let greedy = reference::sample(&logits, &SampleParams::greedy());
        assert_eq!(greedy.0, 17, "first index on ties, as torch.argmax");
        let top1 = reference::sample(
            &logits,
            &SampleParams {
                temperature: 2.0,
                top_k: 1,
                top_p: 1.0,
                uniform: 0.99,
            },
        );
        assert_eq!(top1.0, 17);
        let lsm =
            Vec::<f32>::try_from(Tensor::from_slice(&logits).log_softmax(0, Kind::Float)).unwrap();
        assert!((greedy.1 - lsm[17]).abs() < 1e-5);
        let drawn = reference::sample(
            &logits,
            &SampleParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                uniform: 0.7,
            },
        );
        assert!((drawn.1 - lsm[drawn.0 as usize]).abs() < 1e-5);
    }

    #[test]
    fn parameters_and_plans_are_checked() {
        let bad = [
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
        ];
        let logits = Tensor::zeros([1, 10], (Kind::Float, Device::Cpu));
        for (p, want) in bad {
            let err = reference::sample_rows(&logits, &[p])
                .unwrap_err()
                .to_string();
            assert!(err.contains(want) && err.contains("row 0"), "{err}");
        }
        let cols = columns(&[SampleParams::greedy(); 2]).unwrap();
        let ids = Tensor::zeros([2], (Kind::Int64, Device::Cpu));
        let lp = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let l2 = Tensor::zeros([2, 10], (Kind::Float, Device::Cpu));
        assert!(plan_sample(&ids, &lp, &l2, &cols[0], &cols[1], &cols[2], &cols[3]).is_ok());
        let err = plan_sample(
            &ids,
            &lp,
            &l2.to_kind(Kind::BFloat16),
            &cols[0],
            &cols[1],
            &cols[2],
            &cols[3],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("logits has dtype BFloat16"),
            "{err}"
        );
        let err = plan_sample(
            &ids,
            &lp,
            &l2,
            &cols[0],
            &cols[1].to_kind(Kind::Int64),
            &cols[2],
            &cols[3],
        )
        .unwrap_err();
        assert!(err.to_string().contains("top_k has dtype Int64"), "{err}");
        let err = plan_sample(
            &ids.narrow(0, 0, 1),
            &lp,
            &l2,
            &cols[0],
            &cols[1],
            &cols[2],
            &cols[3],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("ids has shape [1], expected [2]"),
            "{err}"
        );
    }
}
