//! libtorch tensors to and from the wire: raw little-endian bytes with dtype
//! and shape (`llmos.worker.v1.Tensor`), checked on the way in.

use llmos_proto::worker::v1 as pb;
use tch::{Device, Kind, Tensor};

use crate::error::{Result, WorkerError};

fn kind_of(d: pb::DType) -> Option<Kind> {
    Some(match d {
        pb::DType::F32 => Kind::Float,
        pb::DType::Bf16 => Kind::BFloat16,
        pb::DType::F16 => Kind::Half,
        pb::DType::I64 => Kind::Int64,
        pb::DType::Unspecified => return None,
    })
}

pub fn dtype_of(k: Kind) -> pb::DType {
    match k {
        Kind::Float => pb::DType::F32,
        Kind::BFloat16 => pb::DType::Bf16,
        Kind::Half => pb::DType::F16,
        Kind::Int64 => pb::DType::I64,
        other => panic!("no wire dtype for {other:?}"),
    }
}

/// Copies `t` (any device) to the wire format.
pub fn to_wire(t: &Tensor) -> pb::Tensor {
    let t = t.to_device(Device::Cpu).contiguous();
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut data = vec![0u8; n];
    t.copy_data_u8(&mut data, t.numel());
    pb::Tensor {
        dtype: dtype_of(t.kind()) as i32,
        shape: t.size(),
        data,
    }
}

/// Checks dtype, shape and byte length, then builds a CPU tensor.
pub fn from_wire(w: &pb::Tensor, what: &str) -> Result<Tensor> {
    let dtype = pb::DType::try_from(w.dtype).unwrap_or(pb::DType::Unspecified);
    let kind = kind_of(dtype).ok_or_else(|| {
        WorkerError::InvalidRequest(format!("{what}: dtype {} is not supported", w.dtype))
    })?;
    if w.shape.iter().any(|&d| d < 0) || w.shape.is_empty() {
        return Err(WorkerError::InvalidRequest(format!(
            "{what}: bad shape {:?}",
            w.shape
        )));
    }
    let numel = w
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d as usize));
    let want = numel.and_then(|n| n.checked_mul(kind.elt_size_in_bytes()));
    if want != Some(w.data.len()) {
        return Err(WorkerError::InvalidRequest(format!(
            "{what}: {} bytes do not hold a {:?} tensor of shape {:?}",
            w.data.len(),
            dtype,
            w.shape
        )));
    }
    Ok(Tensor::f_from_data_size(&w.data, &w.shape, kind)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_mismatched_bytes() {
        for kind in [Kind::Float, Kind::BFloat16, Kind::Int64] {
            let t = Tensor::arange(24, (Kind::Float, Device::Cpu))
                .view([2, 3, 4])
                .to_kind(kind);
            let back = from_wire(&to_wire(&t), "t").unwrap();
            assert_eq!(back.size(), vec![2, 3, 4]);
            assert!(back.equal(&t));
        }
        let mut w = to_wire(&Tensor::ones([2, 2], (Kind::Float, Device::Cpu)));
        w.data.pop();
        let e = from_wire(&w, "hidden").unwrap_err().to_string();
        assert!(e.contains("hidden") && e.contains("15 bytes"), "{e}");
    }
}
