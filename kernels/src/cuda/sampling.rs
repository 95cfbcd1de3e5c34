//! Token selection on the device (`cuda/sampling.cu`): greedy, temperature,
//! top-k, top-p, so the logits never leave the GPU; one copy of the chosen
//! ids (and their log-probabilities) per step. The rule and the uniform
//! draw (`crate::cpu::sampling::uniform(seed, index)`, made on the host)
//! are the CPU sampler's, which is the reference the kernel is tested
//! against: a seed gives the same tokens on either.

use tch::{Device, Kind, Tensor};

use crate::cuda::check::{self, ptr};
use crate::cuda::runtime::{Arg, Kernels, Launch};
use crate::cuda::Module;
use crate::{KernelError, Result};

pub use crate::cpu::sampling::SampleParams;

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
        if p.min_p > 0.0 {
            // The kernel has no min-p cut: refused, never ignored (the
            // worker samples on the host, where the CPU sampler has it).
            return Err(KernelError::Invalid {
                op: "sample",
                arg: "params",
                problem: format!(
                    "row {i}: min_p {} is not supported by the device sampler",
                    p.min_p
                ),
            });
        }
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

/// CPU reference: the CPU sampler (`crate::cpu::sampling`), over rows.
pub mod reference {
    use super::*;
    pub use crate::cpu::sampling::{candidates, order_key, sample};

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

    #[test]
    fn parameters_and_plans_are_checked() {
        // The rows' parameters are checked as the CPU sampler checks them
        // (its tests cover each one).
        let logits = Tensor::zeros([1, 10], (Kind::Float, Device::Cpu));
        let bad = SampleParams {
            top_p: 0.0,
            ..SampleParams::greedy()
        };
        let err = reference::sample_rows(&logits, &[bad])
            .unwrap_err()
            .to_string();
        assert!(err.contains("top_p 0") && err.contains("row 0"), "{err}");
        assert!(columns(&[bad]).is_err());
        let min_p = SampleParams {
            temperature: 1.0,
            min_p: 0.1,
            ..SampleParams::greedy()
        };
        let err = columns(&[min_p]).unwrap_err().to_string();
        assert!(err.contains("min_p 0.1"), "{err}");
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
