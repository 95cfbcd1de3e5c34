//! SiLU-and-multiply of the fused gate/up projection
//! (`cuda/activation.cu`): `[rows, 2 * inter]` → `[rows, inter]`, replacing
//! libtorch's narrow, silu, narrow, mul chain (two full-size temporaries).

use tch::Tensor;

use crate::cuda::check::{self, ptr, FLOATS};
use crate::cuda::runtime::{Arg, Kernels, Launch};
use crate::cuda::Module;
use crate::{KernelError, Result};

pub fn plan_silu_and_mul(out: &Tensor, input: &Tensor) -> Result<Launch> {
    const OP: &str = "silu_and_mul";
    let kind = check::kind(OP, "input", input, &FLOATS)?;
    let size = check::dims(OP, "input", input, 2)?;
    let stride = check::rows(OP, "input", input)?;
    if size[1] % 2 != 0 {
        return Err(KernelError::Invalid {
            op: OP,
            arg: "input",
            problem: format!(
                "has {} columns: expected [gate | up], an even number",
                size[1]
            ),
        });
    }
    let inter = size[1] / 2;
    check::same_kind(OP, "out", out, kind)?;
    check::shape(OP, "out", out, &[size[0], inter])?;
    check::contiguous(OP, "out", out)?;
    check::fits(OP, "rows", size[0], 65535)?;
    check::fits(OP, "inter", inter, i32::MAX as i64)?;
    Ok(Launch {
        op: OP,
        module: Module::Activation,
        function: format!("silu_and_mul_{}", check::suffix(kind)),
        grid: (
            (inter as u64).div_ceil(256).clamp(1, 1024) as u32,
            size[0] as u32,
            1,
        ),
        block: (256, 1, 1),
        args: vec![
            ptr(out),
            ptr(input),
            Arg::I64(stride[0]),
            Arg::I32(inter as i32),
        ],
        tensors: vec![("out", out.device()), ("input", input.device())],
    })
}

impl Kernels {
    pub fn silu_and_mul(&self, input: &Tensor) -> Result<Tensor> {
        let size = input.size();
        let out = Tensor::f_empty(
            [size[0], size.get(1).copied().unwrap_or(0) / 2],
            (input.kind(), input.device()),
        )?;
        self.launch(&plan_silu_and_mul(&out, input)?)?;
        Ok(out)
    }
}

/// The CPU kernel (`cpu::vecmath::silu_mul`) over tensors: f32
/// arithmetic; the activation rounded to the dtype before the product, as
/// Hugging Face's `act(gate) * up` (one step in f32).
pub mod reference {
    use super::*;
    use crate::cpu::vecmath::silu_mul;
    use crate::cuda::check::{round, tensor, values};

    pub fn silu_and_mul(input: &Tensor) -> Tensor {
        let kind = input.kind();
        let (rows, cols) = (input.size()[0], input.size()[1]);
        let inter = (cols / 2) as usize;
        let v = values(input);
        let mut act = vec![0f32; v.len() / 2];
        let mut up = Vec::with_capacity(v.len() / 2);
        // silu(gate) * 1, rounded, then times up: exactly `silu_mul` in f32.
        let ones = vec![1f32; inter];
        for (row, a) in v
            .chunks_exact(cols as usize)
            .zip(act.chunks_exact_mut(inter))
        {
            silu_mul(&row[..inter], &ones, a);
            up.extend_from_slice(&row[inter..]);
        }
        let out: Vec<f32> = round(kind, &act)
            .iter()
            .zip(&up)
            .map(|(a, u)| a * u)
            .collect();
        tensor(&round(kind, &out), &[rows, inter as i64], kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn reference_matches_the_libtorch_chain() {
        tch::manual_seed(3);
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let x = (Tensor::randn([7, 2 * 80], (Kind::Float, Device::Cpu)) * 4).to_kind(kind);
            let chain = x.narrow(1, 0, 80).silu() * x.narrow(1, 80, 80);
            let got = reference::silu_and_mul(&x);
            assert_eq!(got.kind(), kind);
            let diff = (got.to_kind(Kind::Float) - chain.to_kind(Kind::Float))
                .abs()
                .max()
                .double_value(&[]);
            let tol = if kind == Kind::Float { 1e-5 } else { 5e-2 };
            assert!(diff < tol, "{kind:?}: {diff}");
        }
    }

    #[test]
    fn plans_check_shapes() {
        let x = Tensor::zeros([3, 10], (Kind::Half, Device::Cpu));
        let out = Tensor::zeros([3, 5], (Kind::Half, Device::Cpu));
        let p = plan_silu_and_mul(&out, &x).unwrap();
        assert_eq!(
            (p.function.as_str(), p.grid),
            ("silu_and_mul_f16", (1, 3, 1))
        );
        let err = |r: Result<Launch>| r.expect_err("refused").to_string();
        assert!(err(plan_silu_and_mul(&out, &x.narrow(1, 0, 9))).contains("9 columns"));
        assert!(err(plan_silu_and_mul(&out.narrow(1, 0, 4), &x))
            .contains("out has shape [3, 4], expected [3, 5]"));
        assert!(
            err(plan_silu_and_mul(&out.to_kind(Kind::Float), &x)).contains("out has dtype Float")
        );
        let many = Tensor::zeros([70000, 2], (Kind::Half, Device::Cpu));
        assert!(err(plan_silu_and_mul(
            &Tensor::zeros([70000, 1], (Kind::Half, Device::Cpu)),
            &many
        ))
        .contains("rows is 70000, the kernel takes at most 65535"));
    }
}
