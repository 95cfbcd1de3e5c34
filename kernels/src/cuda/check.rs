//! Argument checks shared by the wrappers. Each names the kernel, the
//! argument and the numbers, so a caller's mistake reads as one.

use tch::{Kind, Tensor};

use crate::cuda::runtime::Arg;
use crate::{KernelError, Result};

fn invalid(op: &'static str, arg: &'static str, problem: String) -> KernelError {
    KernelError::Invalid { op, arg, problem }
}

/// `t` has one of `kinds`.
pub fn kind(op: &'static str, arg: &'static str, t: &Tensor, kinds: &[Kind]) -> Result<Kind> {
    let k = t.kind();
    if kinds.contains(&k) {
        Ok(k)
    } else {
        Err(invalid(
            op,
            arg,
            format!("has dtype {k:?}, expected one of {kinds:?}"),
        ))
    }
}

/// `t` has `n` dimensions; returns its sizes.
pub fn dims(op: &'static str, arg: &'static str, t: &Tensor, n: usize) -> Result<Vec<i64>> {
    let size = t.size();
    if size.len() == n {
        Ok(size)
    } else {
        Err(invalid(
            op,
            arg,
            format!("has shape {size:?}, expected {n} dimensions"),
        ))
    }
}

/// `t`'s shape is exactly `want`.
pub fn shape(op: &'static str, arg: &'static str, t: &Tensor, want: &[i64]) -> Result<()> {
    let size = t.size();
    if size == want {
        Ok(())
    } else {
        Err(invalid(
            op,
            arg,
            format!("has shape {size:?}, expected {want:?}"),
        ))
    }
}

/// `t` is dense row-major.
pub fn contiguous(op: &'static str, arg: &'static str, t: &Tensor) -> Result<()> {
    if t.is_contiguous() {
        Ok(())
    } else {
        Err(invalid(
            op,
            arg,
            format!(
                "has strides {:?} for shape {:?}: it must be contiguous",
                t.stride(),
                t.size()
            ),
        ))
    }
}

/// `t`'s last dimension has stride 1 (rows may be strided); returns the
/// strides.
pub fn rows(op: &'static str, arg: &'static str, t: &Tensor) -> Result<Vec<i64>> {
    let stride = t.stride();
    if stride.last() == Some(&1) || t.size().last() == Some(&1) {
        Ok(stride)
    } else {
        Err(invalid(
            op,
            arg,
            format!("has strides {stride:?}: its last dimension must be contiguous (stride 1)"),
        ))
    }
}

/// `t` has the same dtype as the argument it must match.
pub fn same_kind(op: &'static str, arg: &'static str, t: &Tensor, want: Kind) -> Result<()> {
    if t.kind() == want {
        Ok(())
    } else {
        Err(invalid(
            op,
            arg,
            format!("has dtype {:?}, expected {want:?} like the input", t.kind()),
        ))
    }
}

/// `value` fits the `i32` a kernel parameter or grid dimension takes.
pub fn fits(op: &'static str, arg: &'static str, value: i64, max: i64) -> Result<()> {
    if (0..=max).contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            op,
            arg,
            format!("is {value}, the kernel takes at most {max}"),
        ))
    }
}

/// The kernel name suffix for a storage dtype.
pub fn suffix(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "f32",
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        other => unreachable!("no kernel variant for {other:?}"),
    }
}

/// The storage dtypes the elementwise kernels take.
pub const FLOATS: [Kind; 3] = [Kind::Float, Kind::BFloat16, Kind::Half];

/// A tensor's data pointer as a kernel argument.
pub fn ptr(t: &Tensor) -> Arg {
    Arg::Ptr(t.data_ptr() as u64)
}

/// Threads per block for `work` items a row: a multiple of 32, at most
/// `max`.
pub fn threads(work: i64, max: u32) -> u32 {
    (work.max(1) as u64)
        .div_ceil(32)
        .saturating_mul(32)
        .min(max as u64) as u32
}

/// A tensor's values as f32, row-major (CPU references).
pub(crate) fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(
        t.to_device(tch::Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous()
            .view([-1]),
    )
    .expect("f32 values")
}

/// `v` rounded to `kind` and back (what storing in that dtype keeps).
pub(crate) fn round(kind: Kind, v: &[f32]) -> Vec<f32> {
    if kind == Kind::Float {
        return v.to_vec();
    }
    values(&Tensor::from_slice(v).to_kind(kind))
}

/// `v` as a CPU tensor of `kind` and `shape`.
pub(crate) fn tensor(v: &[f32], shape: &[i64], kind: Kind) -> Tensor {
    Tensor::from_slice(v).view(shape).to_kind(kind)
}
