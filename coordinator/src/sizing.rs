//! What a deployment asks of the planner: one rank's share of the model
//! (weights in their stored or quantized form, its KV cache, a first
//! stage's boundary rows) and the operator's requested shape. Used by the
//! reconciler to place, and by `DeployModel` to check what fits before
//! anything is written.

use llmos_meta::ModelConfig;

use crate::error::CoordError;
use crate::placement::{ModelShape, PlacementRequest};
use crate::state::{ParallelShape, Serving};

/// One rank's share of a model with `tp` ranks per stage, with its KV
/// cache: what the planner places. Refuses (with the numbers) a
/// tensor-parallel size the model's heads do not split by.
pub(crate) fn rank_shape(
    c: &ModelConfig,
    dtype: &str,
    quantization: &str,
    serving: &Serving,
    tp: u32,
) -> Result<ModelShape, CoordError> {
    let dtype_bytes = if dtype == "f32" { 4 } else { 2 };
    let mut shape = ModelShape::from_config(c, dtype_bytes);
    match quantization {
        "int8" => shape = shape.with_int8_layers(c, dtype_bytes),
        // GGUF blocks: bytes per 32 weights. `file` is sized as Q8_0, the
        // largest block type kept (its weights' own types are not known
        // before a worker reads the file).
        "q4_0" => shape = shape.with_block_layers(c, dtype_bytes, 18),
        "q4_1" => shape = shape.with_block_layers(c, dtype_bytes, 20),
        "q8_0" | "file" => shape = shape.with_block_layers(c, dtype_bytes, 34),
        _ => {}
    }
    let tp = tp.max(1);
    let split = c.tp_split(0, tp as usize).map_err(CoordError::Invalid)?;
    // A rank holds a tp-th of each layer's weights, and `kv_blocks` blocks
    // of its own KV heads for each of its layers.
    shape.layer_bytes = shape.layer_bytes.div_ceil(tp as u64)
        + serving.kv_blocks as u64
            * serving.block_size as u64
            * 2
            * (split.kv_heads * c.head_dim) as u64
            * serving.kv_element_bytes(dtype_bytes);
    // As the worker's own memory check counts it.
    shape.boundary_bytes =
        c.boundary_bytes(serving.kv_blocks as usize * serving.block_size as usize);
    Ok(shape)
}

/// What the operator's shape asks of the planner.
pub(crate) fn placement_request(shape: &ParallelShape) -> PlacementRequest {
    PlacementRequest {
        stages: (shape.stages > 0).then_some(shape.stages),
        split: (!shape.layer_split.is_empty()).then(|| shape.layer_split.clone()),
        reserve_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 16-bit KV cache for an f32 model halves the cache the planner
    /// counts per layer, and nothing else; for a bf16 model "auto" is
    /// already 16-bit.
    #[test]
    fn a_16_bit_kv_cache_halves_the_cache_the_planner_counts() {
        let c = ModelConfig::preset("smollm2-135m").unwrap();
        let with = |dtype: &str, kv: &str| {
            let serving = Serving {
                kv_cache_dtype: kv.into(),
                ..Default::default()
            };
            rank_shape(&c, dtype, "none", &serving, 1).unwrap()
        };
        let d = Serving::default();
        let cache = |bytes: u64| {
            d.kv_blocks as u64
                * d.block_size as u64
                * 2
                * (c.num_kv_heads * c.head_dim) as u64
                * bytes
        };
        let (f32_cache, f16_cache) = (with("f32", "auto"), with("f32", "f16"));
        assert_eq!(
            f32_cache.layer_bytes - f16_cache.layer_bytes,
            cache(4) - cache(2)
        );
        assert_eq!(f32_cache.layer_bytes, with("f32", "f32").layer_bytes);
        assert_eq!(f16_cache.layer_bytes, with("f32", "bf16").layer_bytes);
        assert_eq!(
            with("bf16", "auto").layer_bytes,
            with("bf16", "f16").layer_bytes
        );
        assert_eq!(
            with("bf16", "f32").layer_bytes - with("bf16", "auto").layer_bytes,
            cache(4) - cache(2)
        );
        assert_eq!(f32_cache.boundary_bytes, f16_cache.boundary_bytes);
    }
}
