//! Turning host tensors from a `WeightSource` into libtorch tensors of the
//! requested dtype on the requested device, with shape checks; or seeded
//! random weights when a model is synthetic.

use llmos_meta::{HostDType, LayerPart, ModelConfig, WeightKey, WeightSource};
use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// Progress of a load: tensors done and total.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

pub struct Loader<'a> {
    src: Option<&'a dyn WeightSource>,
    cfg: &'a ModelConfig,
    kind: Kind,
    device: Device,
    progress: Progress<'a>,
    done: usize,
    total: usize,
}

impl<'a> Loader<'a> {
    /// `src = None` draws weights from libtorch's generator seeded with `seed`.
    pub fn new(
        src: Option<&'a dyn WeightSource>,
        cfg: &'a ModelConfig,
        kind: Kind,
        device: Device,
        seed: u64,
        total: usize,
        progress: Progress<'a>,
    ) -> Self {
        if src.is_none() {
            tch::manual_seed(seed as i64);
        }
        Loader {
            src,
            cfg,
            kind,
            device,
            progress,
            done: 0,
            total,
        }
    }

    pub fn has(&self, key: WeightKey) -> bool {
        match self.src {
            Some(s) => s.contains(key),
            None => !matches!(key, WeightKey::LmHead) || !self.cfg.tie_embeddings,
        }
    }

    /// Loads one weight as `kind` on `device`, checking its shape.
    pub fn get(&mut self, key: WeightKey) -> Result<Tensor> {
        let expected = key.expected_shape(self.cfg);
        let shape: Vec<i64> = expected.iter().map(|&d| d as i64).collect();
        let t = match self.src {
            Some(src) => {
                let host = src.load(key)?;
                host.check_shape(&expected)?;
                let kind = match host.dtype {
                    HostDType::F32 => Kind::Float,
                    HostDType::F16 => Kind::Half,
                    HostDType::BF16 => Kind::BFloat16,
                };
                Tensor::f_from_data_size(&host.bytes, &shape, kind)?
            }
            None => synthetic(key, &shape),
        };
        self.done += 1;
        (self.progress)(self.done, self.total);
        Ok(t.to_kind(self.kind).to_device(self.device))
    }
}

fn synthetic(key: WeightKey, shape: &[i64]) -> Tensor {
    let norm = matches!(
        key,
        WeightKey::FinalNorm | WeightKey::Layer(_, LayerPart::AttnNorm | LayerPart::MlpNorm)
    );
    if norm {
        Tensor::ones(shape, (Kind::Float, Device::Cpu))
    } else {
        Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 0.02
    }
}
