//! Turning host tensors from a `WeightSource` into libtorch tensors of the
//! requested dtype on the requested device, with shape checks; or seeded
//! random weights when a model is synthetic.

use llmos_meta::{HostDType, LayerPart, ModelConfig, Slice, WeightKey, WeightSource};
use tch::{Device, Kind, Tensor};

use super::Result;

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
    seed: u64,
}

impl<'a> Loader<'a> {
    /// `src = None` draws seeded synthetic weights (see `synthetic`).
    pub fn new(
        src: Option<&'a dyn WeightSource>,
        cfg: &'a ModelConfig,
        kind: Kind,
        device: Device,
        seed: u64,
        total: usize,
        progress: Progress<'a>,
    ) -> Self {
        Loader {
            seed,
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
        self.get_part(key, None)
    }

    /// Loads `part` of a weight (a tensor-parallel rank's slice; the whole
    /// weight for `None`), reading only that part where the format allows.
    pub fn get_part(&mut self, key: WeightKey, part: Option<Slice>) -> Result<Tensor> {
        let mut expected = key.expected_shape(self.cfg);
        let full: Vec<i64> = expected.iter().map(|&d| d as i64).collect();
        if let Some(s) = part {
            expected[s.dim] = s.len;
        }
        let shape: Vec<i64> = expected.iter().map(|&d| d as i64).collect();
        let t = match self.src {
            Some(src) => {
                let host = match part {
                    Some(s) => {
                        // The whole weight's shape first (a clear error for
                        // a wrong file), then the part.
                        if let Some(info) = src.load_shape(key)? {
                            if info != key.expected_shape(self.cfg) {
                                return Err(llmos_meta::MetaError::ShapeMismatch {
                                    path: src.origin().to_path_buf(),
                                    tensor: format!("{key:?}"),
                                    expected: key.expected_shape(self.cfg),
                                    found: info,
                                }
                                .into());
                            }
                        }
                        src.load_slice(key, s)?
                    }
                    None => src.load(key)?,
                };
                host.check_shape(&expected)?;
                let kind = match host.dtype {
                    HostDType::F32 => Kind::Float,
                    HostDType::F16 => Kind::Half,
                    HostDType::BF16 => Kind::BFloat16,
                };
                Tensor::f_from_data_size(&host.bytes, &shape, kind)?
            }
            None => synthetic(key, &full, part, self.seed),
        };
        self.done += 1;
        (self.progress)(self.done, self.total);
        Ok(t.to_kind(self.kind).to_device(self.device))
    }
}

/// A weight as the file's blocks: `data` is `[rows, row bytes]` uint8.
pub struct LoadedBlocks {
    /// (block type, rows) of each part, one after another in `data`.
    pub parts: Vec<(llmos_meta::quant::GgmlType, usize)>,
    pub data: Tensor,
    pub cols: usize,
}

impl LoadedBlocks {
    /// Whether `quant` keeps every part as the file stores it.
    pub fn kept_by(&self, quant: super::linear::Quantization) -> bool {
        self.parts.iter().all(|&(ty, _)| quant.keeps(ty))
    }
}

impl Loader<'_> {
    /// `part` of a weight in the file's own block quantization, uncounted
    /// (`count` it once used); `None` for synthetic weights, weights not
    /// stored in blocks the kernels read, and loads onto a GPU (the block
    /// kernels run on the CPU; `file` loads dense there, `q4_1` etc. are
    /// refused by `Linear`).
    pub fn blocks(&mut self, key: WeightKey, part: Option<Slice>) -> Result<Option<LoadedBlocks>> {
        let Some(src) = self.src.filter(|_| self.device == Device::Cpu) else {
            return Ok(None);
        };
        let Some(b) = src.load_blocks(key, part)? else {
            return Ok(None);
        };
        if !llmos_kernels::cpu::quant::is_block_type(b.ty) {
            return Ok(None);
        }
        let mut expected = key.expected_shape(self.cfg);
        if let Some(s) = part {
            expected[s.dim] = s.len;
        }
        if expected != [b.rows, b.cols] {
            return Err(llmos_meta::MetaError::ShapeMismatch {
                path: src.origin().to_path_buf(),
                tensor: format!("{key:?}"),
                expected,
                found: vec![b.rows, b.cols],
            }
            .into());
        }
        let data = Tensor::from_slice(&b.bytes[..]).view([b.rows as i64, -1]);
        Ok(Some(LoadedBlocks {
            parts: vec![(b.ty, b.rows)],
            data,
            cols: b.cols,
        }))
    }

    /// Counts `n` weights loaded through `blocks`.
    pub fn count(&mut self, n: usize) {
        self.done += n;
        (self.progress)(self.done, self.total);
    }
}

/// A synthetic weight: norms are ones; everything else uniform with standard
/// deviation 0.02, each element a hash of (seed, weight name, index). So a
/// weight is the same whichever shard loads it, in whatever order, however
/// many loads run at once (libtorch's global generator would give none of
/// that).
fn synthetic(key: WeightKey, full: &[i64], part: Option<Slice>, seed: u64) -> Tensor {
    let mut shape = full.to_vec();
    if let Some(s) = part {
        shape[s.dim] = s.len as i64;
    }
    let norm = matches!(
        key,
        WeightKey::FinalNorm | WeightKey::Layer(_, LayerPart::AttnNorm | LayerPart::MlpNorm)
    );
    if norm {
        return Tensor::ones(shape.as_slice(), (Kind::Float, Device::Cpu));
    }
    let stream = format!("{key:?}")
        .bytes()
        .fold(seed ^ 0x9e3779b97f4a7c15, |h, b| splitmix(h ^ b as u64));
    let n: i64 = shape.iter().product();
    // Element j of the part is element `index(j)` of the whole weight, so a
    // rank's slice holds exactly the values the whole weight has there.
    let cols = full.get(1).copied().unwrap_or(1) as u64;
    let part_cols = shape.get(1).copied().unwrap_or(1) as u64;
    let index = |j: u64| -> u64 {
        match part {
            None => j,
            Some(s) => {
                let (r, c) = (j / part_cols, j % part_cols);
                if s.dim == 0 {
                    (r + s.start as u64) * cols + c
                } else {
                    r * cols + c + s.start as u64
                }
            }
        }
    };
    let half_width = 0.02f32 * 3f32.sqrt();
    let values: Vec<f32> = (0..n as u64)
        .map(index)
        .map(|i| {
            let bits = splitmix(stream.wrapping_add(i.wrapping_mul(0x9e3779b97f4a7c15)));
            let unit = (bits >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            (2.0 * unit - 1.0) * half_width
        })
        .collect();
    Tensor::from_slice(&values).view(shape.as_slice())
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}
