//! One sequence driven straight through the forward the server runs: a
//! paged KV pool holding just its blocks (block table `0..n`), prompts in
//! chunks of the serving default's step size. The parity tests compare its
//! logits with Hugging Face transformers'; generation goes through the
//! engine (`generate.rs`).

use llmos_meta::serving::{DEFAULT_BLOCK_SIZE, DEFAULT_MAX_BATCH_TOKENS};
use tch::Tensor;

use super::{Llama, Result};
use crate::kv::{BatchLayout, KvPool, SeqSlice};

pub struct LocalSequence {
    pool: KvPool,
    blocks: Vec<u32>,
    /// Positions cached so far.
    position: usize,
}

impl LocalSequence {
    /// Room for `positions` positions in blocks of the serving default's
    /// size.
    pub fn new(model: &Llama, positions: usize) -> Result<Self> {
        let bs = DEFAULT_BLOCK_SIZE as usize;
        let n = positions.max(1).div_ceil(bs);
        Ok(LocalSequence {
            pool: model.new_pool(n, bs)?,
            blocks: (0..n as u32).collect(),
            position: 0,
        })
    }

    fn layout(&self, tokens: usize) -> BatchLayout {
        BatchLayout {
            seqs: vec![SeqSlice {
                position: self.position,
                tokens,
                blocks: self.blocks.clone(),
            }],
            block_size: self.pool.shape().block_size,
        }
    }

    /// Runs `ids` through the model after what is cached, in chunks of at
    /// most the serving default's step size; returns float32 logits `[ids,
    /// vocab]` of every position when `all` is set, else of the last one.
    pub fn forward(&mut self, model: &Llama, ids: &[u32], all: bool) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        let chunk = DEFAULT_MAX_BATCH_TOKENS as usize;
        let mut out = Vec::new();
        for (i, part) in ids.chunks(chunk).enumerate() {
            let last = (i + 1) * chunk >= ids.len();
            let x: Vec<i64> = part.iter().map(|&t| t as i64).collect();
            let layout = self.layout(part.len());
            let hidden = model.forward_batch(
                &model.embed_packed(&Tensor::from_slice(&x))?,
                &layout,
                &mut self.pool,
            )?;
            self.position += part.len();
            if all {
                out.push(model.logits(&hidden)?);
            } else if last {
                out.push(model.logits_rows(&hidden, &[part.len() as i64 - 1])?);
            }
        }
        Ok(Tensor::cat(&out, 0))
    }
}
