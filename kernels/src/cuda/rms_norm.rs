//! RMSNorm and fused residual-add + RMSNorm (`cuda/rms_norm.cu`).
//!
//! In a Llama block every norm but the first follows a residual add; the
//! fused kernel reads both operands once, writes the sum back into the
//! residual and the normalized row into `x`, replacing libtorch's add,
//! pow, mean, rsqrt, mul, mul chain.

use tch::{Kind, Tensor};

use crate::cuda::check::{self, ptr, FLOATS};
use crate::cuda::runtime::{Arg, Kernels, Launch};
use crate::cuda::Module;
use crate::Result;

fn rows_and_hidden(op: &'static str, x: &Tensor, weight: &Tensor) -> Result<(Kind, i64, i64, i64)> {
    let kind = check::kind(op, "x", x, &FLOATS)?;
    let size = check::dims(op, "x", x, 2)?;
    let stride = check::rows(op, "x", x)?;
    check::same_kind(op, "weight", weight, kind)?;
    check::shape(op, "weight", weight, &[size[1]])?;
    check::contiguous(op, "weight", weight)?;
    check::fits(op, "rows", size[0], i32::MAX as i64)?;
    check::fits(op, "hidden size", size[1], i32::MAX as i64)?;
    Ok((kind, size[0], size[1], stride[0]))
}

/// `out = rms_norm(x) * weight`; `x` `[rows, hidden]` (rows may be strided),
/// `out` contiguous.
pub fn plan_rms_norm(out: &Tensor, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Launch> {
    const OP: &str = "rms_norm";
    let (kind, rows, h, sx) = rows_and_hidden(OP, x, weight)?;
    check::same_kind(OP, "out", out, kind)?;
    check::shape(OP, "out", out, &[rows, h])?;
    check::contiguous(OP, "out", out)?;
    Ok(Launch {
        op: OP,
        module: Module::RmsNorm,
        function: format!("rms_norm_{}", check::suffix(kind)),
        grid: (rows as u32, 1, 1),
        block: (check::threads(h, 256), 1, 1),
        args: vec![
            ptr(out),
            ptr(x),
            Arg::I64(sx),
            ptr(weight),
            Arg::I32(h as i32),
            Arg::F32(eps as f32),
        ],
        tensors: vec![
            ("out", out.device()),
            ("x", x.device()),
            ("weight", weight.device()),
        ],
    })
}

/// `residual = x + residual; x = rms_norm(residual) * weight`, in place.
pub fn plan_fused_add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<Launch> {
    const OP: &str = "fused_add_rms_norm";
    let (kind, rows, h, sx) = rows_and_hidden(OP, x, weight)?;
    check::same_kind(OP, "residual", residual, kind)?;
    check::shape(OP, "residual", residual, &[rows, h])?;
    let sr = check::rows(OP, "residual", residual)?[0];
    Ok(Launch {
        op: OP,
        module: Module::RmsNorm,
        function: format!("fused_add_rms_norm_{}", check::suffix(kind)),
        grid: (rows as u32, 1, 1),
        block: (check::threads(h, 256), 1, 1),
        args: vec![
            ptr(x),
            Arg::I64(sx),
            ptr(residual),
            Arg::I64(sr),
            ptr(weight),
            Arg::I32(h as i32),
            Arg::F32(eps as f32),
        ],
        tensors: vec![
            ("x", x.device()),
            ("residual", residual.device()),
            ("weight", weight.device()),
        ],
    })
}

impl Kernels {
    pub fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let out = Tensor::f_empty(x.size(), (x.kind(), x.device()))?;
        self.launch(&plan_rms_norm(&out, x, weight, eps)?)?;
        Ok(out)
    }

    pub fn fused_add_rms_norm(
        &self,
        x: &mut Tensor,
        residual: &mut Tensor,
        weight: &Tensor,
        eps: f64,
    ) -> Result<()> {
        self.launch(&plan_fused_add_rms_norm(x, residual, weight, eps)?)
    }
}

/// The CPU kernel's arithmetic (`cpu::elementwise`: its `inv_rms`, then
/// row times inverse times weight) over tensors, rounding to the storage
/// dtype where the CUDA kernels round (the normalized row before the
/// weight, as Hugging Face); in f32 it is `cpu::elementwise::rms_norm`.
pub mod reference {
    use super::*;
    use crate::cpu::elementwise::inv_rms;
    use crate::cuda::check::{round, tensor, values};

    fn norm_rows(kind: Kind, r: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
        let h = w.len();
        let mut out = Vec::with_capacity(r.len());
        // In f32 the rounding is the identity: `cpu::elementwise::rms_norm`.
        for row in r.chunks_exact(h) {
            let inv = inv_rms(row, eps as f32);
            let normed = round(kind, &row.iter().map(|v| v * inv).collect::<Vec<_>>());
            out.extend(normed.iter().zip(w).map(|(n, w)| n * w));
        }
        round(kind, &out)
    }

    pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
        let kind = x.kind();
        tensor(
            &norm_rows(kind, &values(x), &values(weight), eps),
            &x.size(),
            kind,
        )
    }

    /// Returns `(x, residual)` after the fused step.
    pub fn fused_add_rms_norm(
        x: &Tensor,
        residual: &Tensor,
        weight: &Tensor,
        eps: f64,
    ) -> (Tensor, Tensor) {
        let kind = x.kind();
        let sum: Vec<f32> = values(x)
            .iter()
            .zip(values(residual))
            .map(|(a, b)| a + b)
            .collect();
        let sum = round(kind, &sum);
        let normed = norm_rows(kind, &sum, &values(weight), eps);
        (
            tensor(&normed, &x.size(), kind),
            tensor(&sum, &x.size(), kind),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[])
    }

    /// The reference equals libtorch's chain (Hugging Face's LlamaRMSNorm:
    /// f32 statistics, normalized row rounded to the dtype, times weight).
    #[test]
    fn reference_matches_the_libtorch_chain() {
        tch::manual_seed(1);
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let x = Tensor::randn([5, 96], (Kind::Float, Device::Cpu)).to_kind(kind);
            let r = Tensor::randn([5, 96], (Kind::Float, Device::Cpu)).to_kind(kind);
            let w = (Tensor::rand([96], (Kind::Float, Device::Cpu)) + 0.5).to_kind(kind);
            let hf = |h: &Tensor| {
                let h32 = h.to_kind(Kind::Float);
                let var = h32
                    .pow_tensor_scalar(2)
                    .mean_dim([-1i64].as_slice(), true, Kind::Float);
                &w * (h32 * (var + 1e-5).rsqrt()).to_kind(kind)
            };
            let tol = if kind == Kind::Float { 1e-5 } else { 1e-2 };
            let got = reference::rms_norm(&x, &w, 1e-5);
            assert_eq!(got.kind(), kind);
            assert!(max_diff(&got, &hf(&x)) < tol * 4.0, "{kind:?}");
            let (nx, nr) = reference::fused_add_rms_norm(&x, &r, &w, 1e-5);
            let sum = &x + &r;
            assert_eq!(
                max_diff(&nr, &sum),
                0.0,
                "{kind:?}: residual is the rounded sum"
            );
            assert!(max_diff(&nx, &hf(&sum)) < tol * 4.0, "{kind:?}");
            if kind == Kind::Float {
                let lt = x.rms_norm([96], Some(&w), 1e-5);
                assert!(max_diff(&got, &lt) < 1e-5);
            }
        }
    }

    #[test]
    fn plans_check_dtype_shape_and_strides() {
        let (x, w) = (
            Tensor::zeros([4, 64], (Kind::BFloat16, Device::Cpu)),
            Tensor::ones([64], (Kind::BFloat16, Device::Cpu)),
        );
        let out = x.empty_like();
        let ok = plan_rms_norm(&out, &x, &w, 1e-5).unwrap();
        assert_eq!(ok.function, "rms_norm_bf16");
        assert_eq!((ok.grid.0, ok.block.0), (4, 64));
        // A strided row view is accepted (row stride passed), a transposed one is not.
        let wide = Tensor::zeros([4, 128], (Kind::BFloat16, Device::Cpu));
        let view = wide.narrow(1, 0, 64);
        let p = plan_fused_add_rms_norm(&view, &x, &w, 1e-5).unwrap();
        assert_eq!(p.args[1], Arg::I64(128));
        let cases: Vec<(Result<Launch>, &str)> = vec![
            (
                plan_rms_norm(&out, &x.to_kind(Kind::Int64), &w, 1e-5),
                "rms_norm: x has dtype Int64",
            ),
            (
                plan_rms_norm(
                    &out,
                    &x,
                    &Tensor::ones([65], (Kind::BFloat16, Device::Cpu)),
                    1e-5,
                ),
                "rms_norm: weight has shape [65], expected [64]",
            ),
            (
                plan_rms_norm(&out, &x, &w.to_kind(Kind::Float), 1e-5),
                "rms_norm: weight has dtype Float, expected BFloat16",
            ),
            (
                plan_rms_norm(
                    &out,
                    &Tensor::zeros([64, 4], (Kind::BFloat16, Device::Cpu)).t_(),
                    &w,
                    1e-5,
                ),
                "rms_norm: x has strides [1, 4]",
            ),
            (
                plan_fused_add_rms_norm(&x, &x.narrow(0, 0, 3), &w, 1e-5),
                "fused_add_rms_norm: residual has shape [3, 64], expected [4, 64]",
            ),
            (
                plan_rms_norm(&out, &x.view([4, 8, 8]), &w, 1e-5),
                "rms_norm: x has shape [4, 8, 8], expected 2 dimensions",
            ),
        ];
        for (got, want) in cases {
            let err = got
                .err()
                .unwrap_or_else(|| panic!("accepted: {want}"))
                .to_string();
            assert!(err.starts_with(want), "{err:?} vs {want:?}");
        }
    }
}
