//! Weight-only int8 quantization with per-output-channel scales, and the
//! decode-step product over such weights (`cuda/int8_linear.cu`).
//!
//! `quantize_per_channel` is the one quantizer (the worker quantizes its
//! linear weights with it at load): each output row `n` gets
//! `scale[n] = max|w[n, :]| / 127` and `q = round(w / scale)` in [-127,
//! 127], so `|w - q * scale| <= scale / 2` element-wise. The kernel computes
//! `y = (x q^T) * scale` for up to [`MAX_ROWS`] input rows, reading each int8
//! weight row once (half the bytes of bf16: decode is bound by them).

use tch::{Kind, Tensor};

use crate::cuda::check::{self, ptr, FLOATS};
use crate::cuda::runtime::{Arg, Kernels, Launch};
use crate::cuda::Module;
use crate::{KernelError, Result};

/// Input rows the kernel takes (decode batches; larger ones go through a
/// dequantized matrix product).
pub const MAX_ROWS: i64 = 8;

/// `(q, scales)`: int8 `[n, k]` and f32 `[n]`, on `w`'s device. An all-zero
/// row gets scale 1 (and zeros).
pub fn quantize_per_channel(w: &Tensor) -> Result<(Tensor, Tensor)> {
    let w = w.f_to_kind(Kind::Float)?;
    if w.dim() != 2 {
        return Err(KernelError::Invalid {
            op: "quantize_per_channel",
            arg: "w",
            problem: format!("has shape {:?}, expected [out, in]", w.size()),
        });
    }
    let amax = w.abs().amax([1i64].as_slice(), false);
    let scales = amax.where_scalarother(&amax.gt(0.0), 127.0) / 127.0;
    let q = (&w / scales.unsqueeze(1))
        .round()
        .clamp(-127.0, 127.0)
        .to_kind(Kind::Int8);
    Ok((q, scales))
}

/// `q * scale` back in `kind`.
pub fn dequantize(q: &Tensor, scales: &Tensor, kind: Kind) -> Tensor {
    (q.to_kind(Kind::Float) * scales.unsqueeze(1)).to_kind(kind)
}

pub fn plan_int8_linear(y: &Tensor, x: &Tensor, q: &Tensor, scales: &Tensor) -> Result<Launch> {
    const OP: &str = "int8_linear";
    let kind = check::kind(OP, "x", x, &FLOATS)?;
    let xs = check::dims(OP, "x", x, 2)?;
    check::contiguous(OP, "x", x)?;
    let (m, k) = (xs[0], xs[1]);
    if !(1..=MAX_ROWS).contains(&m) {
        return Err(KernelError::Invalid {
            op: OP,
            arg: "x",
            problem: format!("has {m} rows: the kernel takes 1 to {MAX_ROWS}"),
        });
    }
    check::kind(OP, "weight", q, &[Kind::Int8])?;
    let ws = check::dims(OP, "weight", q, 2)?;
    check::contiguous(OP, "weight", q)?;
    let n = ws[0];
    if ws[1] != k || k % 4 != 0 {
        return Err(KernelError::Invalid {
            op: OP,
            arg: "weight",
            problem: format!("has shape {ws:?}: expected [out, {k}] with {k} a multiple of 4"),
        });
    }
    check::kind(OP, "scales", scales, &[Kind::Float])?;
    check::shape(OP, "scales", scales, &[n])?;
    check::contiguous(OP, "scales", scales)?;
    check::same_kind(OP, "y", y, kind)?;
    check::shape(OP, "y", y, &[m, n])?;
    check::contiguous(OP, "y", y)?;
    check::fits(OP, "out features", n, i32::MAX as i64)?;
    check::fits(OP, "in features", k, i32::MAX as i64)?;
    const WARPS: i64 = 8;
    Ok(Launch {
        op: OP,
        module: Module::Int8Linear,
        function: format!("int8_linear_{}", check::suffix(kind)),
        grid: (((n + WARPS - 1) / WARPS) as u32, 1, 1),
        block: ((WARPS * 32) as u32, 1, 1),
        args: vec![
            ptr(y),
            ptr(x),
            ptr(q),
            ptr(scales),
            Arg::I32(m as i32),
            Arg::I32(n as i32),
            Arg::I32(k as i32),
        ],
        tensors: vec![
            ("y", y.device()),
            ("x", x.device()),
            ("weight", q.device()),
            ("scales", scales.device()),
        ],
    })
}

impl Kernels {
    /// `x [m, k] @ (q * scales)^T` for `m <= MAX_ROWS`.
    pub fn int8_linear(&self, x: &Tensor, q: &Tensor, scales: &Tensor) -> Result<Tensor> {
        let y = Tensor::f_empty([x.size()[0], q.size()[0]], (x.kind(), x.device()))?;
        self.launch(&plan_int8_linear(&y, x, q, scales)?)?;
        Ok(y)
    }
}

/// The CPU kernel (`cpu::gemv::gemv_batch` over int8 rows, as the worker's
/// int8 decode rows run) over tensors: f32 accumulation, the row's scale
/// applied after, rounded once.
pub mod reference {
    use super::*;
    use crate::cpu::gemv::{gemv_batch, pool};
    use crate::cuda::check::{round, tensor, values};

    pub fn int8_linear(x: &Tensor, q: &Tensor, scales: &Tensor) -> Tensor {
        let kind = x.kind();
        let (m, k) = (x.size()[0] as usize, x.size()[1] as usize);
        let n = q.size()[0] as usize;
        let xv = values(x);
        let qv = Vec::<i8>::try_from(q.to_device(tch::Device::Cpu).contiguous().view([-1]))
            .expect("int8");
        let sv = values(scales);
        let mut y = vec![0f32; m * n];
        gemv_batch(pool(), &qv, k, &xv, &mut y);
        for row in y.chunks_exact_mut(n) {
            row.iter_mut().zip(&sv).for_each(|(y, s)| *y *= s);
        }
        tensor(&round(kind, &y), &[m as i64, n as i64], kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn quantization_error_is_at_most_half_a_step() {
        tch::manual_seed(8);
        let w = Tensor::randn([64, 96], (Kind::Float, Device::Cpu));
        let _ = w.get(3).fill_(0.0);
        let (q, s) = quantize_per_channel(&w).unwrap();
        assert_eq!((q.kind(), s.kind()), (Kind::Int8, Kind::Float));
        let back = dequantize(&q, &s, Kind::Float);
        let err = (&back - &w).abs();
        let bound = s.unsqueeze(1) * 0.5 + 1e-6;
        assert!(bool::try_from(err.le_tensor(&bound).all()).unwrap());
        // Each row's largest magnitude maps to +-127 exactly.
        let qmax = q.to_kind(Kind::Float).abs().amax([1i64].as_slice(), false);
        let zero_row = Tensor::from_slice(&[3i64]);
        assert_eq!(qmax.index_select(0, &zero_row).double_value(&[0]), 0.0);
        assert_eq!(s.double_value(&[3]), 1.0, "an all-zero row gets scale 1");
        assert_eq!(qmax.narrow(0, 0, 3).min().double_value(&[]), 127.0);
    }

    #[test]
    fn reference_matches_the_dequantized_product() {
        tch::manual_seed(9);
        let w = Tensor::randn([40, 64], (Kind::Float, Device::Cpu));
        let (q, s) = quantize_per_channel(&w).unwrap();
        // Relative to the largest output (bf16 keeps 8 bits of mantissa).
        for (kind, tol) in [(Kind::Float, 1e-6), (Kind::BFloat16, 8e-3)] {
            let x = Tensor::randn([3, 64], (Kind::Float, Device::Cpu)).to_kind(kind);
            let got = reference::int8_linear(&x, &q, &s);
            let want = x
                .to_kind(Kind::Float)
                .matmul(&dequantize(&q, &s, Kind::Float).tr());
            let diff = (got.to_kind(Kind::Float) - &want)
                .abs()
                .max()
                .double_value(&[])
                / want.abs().max().double_value(&[]);
            assert!(diff < tol, "{kind:?}: {diff}");
        }
    }

    #[test]
    fn plans_check_shapes() {
        let x = Tensor::zeros([2, 64], (Kind::BFloat16, Device::Cpu));
        let q = Tensor::zeros([10, 64], (Kind::Int8, Device::Cpu));
        let s = Tensor::ones([10], (Kind::Float, Device::Cpu));
        let y = Tensor::zeros([2, 10], (Kind::BFloat16, Device::Cpu));
        let p = plan_int8_linear(&y, &x, &q, &s).unwrap();
        assert_eq!((p.function.as_str(), p.grid.0), ("int8_linear_bf16", 2));
        let err = |r: Result<Launch>| r.expect_err("refused").to_string();
        let x9 = Tensor::zeros([9, 64], (Kind::BFloat16, Device::Cpu));
        assert!(err(plan_int8_linear(&y, &x9, &q, &s)).contains("9 rows: the kernel takes 1 to 8"));
        assert!(
            err(plan_int8_linear(&y, &x, &q.to_kind(Kind::BFloat16), &s))
                .contains("weight has dtype BFloat16")
        );
        let q62 = Tensor::zeros([10, 62], (Kind::Int8, Device::Cpu));
        assert!(err(plan_int8_linear(
            &y,
            &x.narrow(1, 0, 62).contiguous(),
            &q62,
            &s
        ))
        .contains("62 a multiple of 4"));
        assert!(err(plan_int8_linear(&y, &x, &q, &s.narrow(0, 0, 9)))
            .contains("scales has shape [9], expected [10]"));
        assert!(err(plan_int8_linear(&y.to_kind(Kind::Float), &x, &q, &s))
            .contains("y has dtype Float"));
    }
}
