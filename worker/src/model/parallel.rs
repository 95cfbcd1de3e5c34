//! Tensor-parallel linears (Megatron's split, as mistral.rs and vLLM name
//! it). Each owns its slice of the full weight and the communication its
//! output needs:
//!
//! - [`ColumnParallel`]: this rank holds a range of the output features
//!   (query/KV heads of the fused q/k/v projection, MLP columns of the
//!   fused gate/up one). Its output is this rank's share; nothing to sum.
//! - [`RowParallel`]: this rank holds the matching range of the input
//!   features (the o and down projections). Its output is a partial sum:
//!   local product, then an all-reduce over the group. (The Llama family's
//!   o and down projections have no bias; one would be added after the
//!   sum.)
//!
//! Unsplit (one rank), both are plain linears and the reduction is a no-op.

use std::ops::Range;
use std::sync::Arc;

use llmos_meta::{Slice, WeightKey};
use tch::Tensor;

use super::linear::{Linear, Quantization};
use super::weights::{LoadedBlocks, Loader};
use super::{ModelError, Result};
use crate::comm::Collective;

/// A fused projection split by output features.
pub(super) struct ColumnParallel {
    pub(super) linear: Linear,
}

impl ColumnParallel {
    /// Loads `parts` (weights fused in this order, each with the range of
    /// its output rows this rank holds, `None` for all) and their biases
    /// where `bias` names them.
    pub(super) fn load(
        ld: &mut Loader<'_>,
        parts: &[(WeightKey, Option<Range<usize>>)],
        bias: Option<&[WeightKey]>,
        quant: Quantization,
    ) -> Result<Self> {
        let rows = |r: &Option<Range<usize>>, dim| {
            r.clone().map(|r| Slice {
                dim,
                start: r.start,
                len: r.len(),
            })
        };
        let slices: Vec<_> = parts.iter().map(|(k, r)| (*k, rows(r, 0))).collect();
        let kept = kept_blocks(ld, &slices, quant)?;
        let weights = match kept {
            Some(_) => Vec::new(),
            None => slices
                .iter()
                .map(|(k, s)| ld.get_part(*k, *s))
                .collect::<Result<Vec<_>>>()?,
        };
        let bias = match bias {
            Some(keys) => {
                if keys.len() != parts.len() {
                    return Err(ModelError::Invalid(format!(
                        "{} biases for {} fused weights",
                        keys.len(),
                        parts.len()
                    )));
                }
                // Biases are 1-D: their rows are their elements.
                let b = keys
                    .iter()
                    .zip(parts)
                    .map(|(k, (_, r))| ld.get_part(*k, rows(r, 0)))
                    .collect::<Result<Vec<_>>>()?;
                Some(Tensor::cat(&b, 0))
            }
            None => None,
        };
        let linear = match kept {
            Some(b) => Linear::from_blocks(b.parts, b.data, b.cols, bias)?,
            None => Linear::with(Tensor::cat(&weights, 0), bias, quant)?,
        };
        Ok(ColumnParallel { linear })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        self.linear.forward(x)
    }
}

/// `parts` (fused in this order) as the file's blocks, when `quant` keeps
/// them all as stored (rows of the same length, each part in its own block
/// type); `None` to load them dense (quantized at load where `quant`
/// asks).
pub(super) fn kept_blocks(
    ld: &mut Loader<'_>,
    parts: &[(WeightKey, Option<Slice>)],
    quant: Quantization,
) -> Result<Option<LoadedBlocks>> {
    if !matches!(quant, Quantization::Blocks(_) | Quantization::File) {
        return Ok(None);
    }
    let mut got = Vec::with_capacity(parts.len());
    for (k, s) in parts {
        match ld.blocks(*k, *s)? {
            Some(b) if b.kept_by(quant) => got.push(b),
            _ => return Ok(None),
        }
    }
    let cols = got[0].cols;
    if got.iter().any(|b| b.cols != cols) {
        return Ok(None);
    }
    ld.count(got.len());
    // Parts of different types (a K-quant file's `attn_v` beside its
    // `attn_q`) stay each in its own blocks, one after another.
    let data = Tensor::cat(
        &got.iter().map(|b| b.data.view([-1])).collect::<Vec<_>>(),
        0,
    );
    let parts = got.into_iter().flat_map(|b| b.parts).collect();
    Ok(Some(LoadedBlocks { parts, data, cols }))
}

/// Where a row-parallel output's partial sums are completed.
enum Reduction {
    /// Not split: the output is whole.
    Whole,
    /// Split `size` ways; the group is not set yet.
    Unlinked {
        rank: usize,
        size: usize,
    },
    Group(Arc<dyn Collective>),
}

/// A projection split by input features: local product, then an
/// all-reduce over the group.
pub(super) struct RowParallel {
    pub(super) linear: Linear,
    reduction: Reduction,
}

impl RowParallel {
    /// Loads `key` with the columns `cols` this rank holds (`None`: all,
    /// and the layer is not split; `split` gives the rank and group size
    /// when it is).
    pub(super) fn load(
        ld: &mut Loader<'_>,
        key: WeightKey,
        cols: Option<Range<usize>>,
        split: Option<(usize, usize)>,
        quant: Quantization,
    ) -> Result<Self> {
        let part = cols.map(|r| Slice {
            dim: 1,
            start: r.start,
            len: r.len(),
        });
        let linear = match kept_blocks(ld, &[(key, part)], quant)? {
            Some(b) => Linear::from_blocks(b.parts, b.data, b.cols, None)?,
            None => Linear::with(ld.get_part(key, part)?, None, quant)?,
        };
        Ok(RowParallel {
            linear,
            reduction: match split {
                Some((rank, size)) if size > 1 => Reduction::Unlinked { rank, size },
                _ => Reduction::Whole,
            },
        })
    }

    /// The group the partial sums are completed over; its size must be the
    /// split's.
    pub(super) fn set_group(&mut self, group: Arc<dyn Collective>) -> Result<()> {
        let size = match &self.reduction {
            Reduction::Whole => 1,
            Reduction::Unlinked { size, .. } => *size,
            Reduction::Group(g) => g.world_size(),
        };
        if group.world_size() != size {
            return Err(ModelError::Invalid(format!(
                "the layer is split {size} ways but its group has {} ranks",
                group.world_size()
            )));
        }
        if size > 1 {
            self.reduction = Reduction::Group(group);
        }
        Ok(())
    }

    fn group(&self) -> Result<Option<&dyn Collective>> {
        match &self.reduction {
            Reduction::Whole => Ok(None),
            Reduction::Group(g) => Ok(Some(g.as_ref())),
            Reduction::Unlinked { rank, size } => Err(ModelError::Invalid(format!(
                "rank {rank} of a {size}-way split has no group"
            ))),
        }
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = self.linear.forward(x);
        if let Some(g) = self.group()? {
            g.all_reduce_sum(&mut y)?;
        }
        Ok(y)
    }

    /// The fused CPU step's product of one f32 row, completed over the
    /// group.
    pub(super) fn forward_host(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.linear.gemv_into(x, y);
        if let Some(g) = self.group()? {
            g.all_reduce_host(y)?;
        }
        Ok(())
    }
}
