//! The single-sequence decode step on CPU, fused: one token through every
//! layer on f32 activations in host buffers, with the `gemv` kernel for the
//! projections, paged attention over the sequence's blocks of the KV pool
//! (the same pool and kernel the batched forward uses), and plain
//! loops for RMSNorm, rotary embedding, SiLU-and-multiply and residuals.
//! libtorch's per-op dispatch (~45 small ops a layer) would otherwise cost
//! as much as the weight reads on small models. Its kernels live in
//! `llmos_kernels::cpu`.

use llmos_kernels::cpu::elementwise::{rms_norm, rope_in_place, silu_mul};
use llmos_kernels::cpu::paged_attention::{paged_attention, QueryRow};
use tch::{Device, Kind};

use super::llama::Llama;
use super::{ModelError, Result};
use crate::kv::{slot, KvPool};

/// One sequence of a paged pool: its block table and cached length.
pub struct PagedSeq<'a> {
    pub pool: &'a mut KvPool,
    pub blocks: &'a [u32],
    pub position: usize,
}

impl PagedSeq<'_> {
    /// Checks that one more position fits in the sequence's blocks.
    fn reserve_one(&self) -> Result<()> {
        let cap = self.blocks.len() * self.pool.shape().block_size;
        if self.position >= cap {
            return Err(ModelError::Invalid(format!(
                "position {} is beyond the sequence's {} blocks",
                self.position,
                self.blocks.len()
            )));
        }
        Ok(())
    }

    /// Writes the token's keys and values (f32 `[kv_heads * head_dim]`).
    fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let s = slot(self.blocks, self.pool.shape().block_size, pos);
        self.pool.write_slot(layer, s, k, v)
    }

    /// Attention of `q` (`[heads * head_dim]`) over positions `0..len`.
    fn attend(
        &self,
        layer: usize,
        q: &[f32],
        heads: usize,
        len: usize,
        scale: f64,
        out: &mut [f32],
    ) {
        let (k, v) = self.pool.layer(layer);
        let rows = [QueryRow {
            row: 0,
            blocks: self.blocks,
            len,
        }];
        let bs = self.pool.shape().block_size;
        paged_attention(q, heads, k, v, bs, &rows, scale as f32, out)
    }
}

impl Llama {
    /// Whether `decode_step` can run this model (whole model, CPU, f32 or
    /// bf16 weights the `gemv` kernel reads).
    pub fn fused_decode_supported(&self) -> bool {
        self.shard.embed && self.fused_layers_supported()
    }

    /// Whether `decode_hidden` can run this shard (CPU, f32 or bf16 weights
    /// the `gemv` kernel reads, the head too if it holds one).
    pub fn fused_layers_supported(&self) -> bool {
        self.device == Device::Cpu
            && matches!(self.kind, Kind::Float | Kind::BFloat16)
            && (!self.shard.head || self.head.as_ref().is_some_and(|h| h.has_gemv()))
            && self
                .blocks
                .iter()
                .all(|b| b.attn.qkv.linear.has_gemv() && b.attn.o.linear.has_gemv())
    }

    /// One token of one sequence at position `cache.position`: appends to
    /// the cache and returns the float32 logits.
    pub fn decode_step(&self, token: u32, cache: &mut PagedSeq<'_>) -> Result<Vec<f32>> {
        if !self.shard.head {
            return Err(ModelError::Invalid("this shard holds no LM head".into()));
        }
        let x = self.embed_row(token)?;
        self.decode_hidden(x, cache)
    }

    /// The embedding of one token as f32 (a CPU f32 or bf16 embedding).
    pub fn embed_row(&self, token: u32) -> Result<Vec<f32>> {
        let h = self.cfg.hidden_size;
        if let Some(head) = self.embedding_in_head() {
            self.check_token(token as i64)?;
            let mut x = vec![0f32; h];
            head.dequantize_row(token as usize, &mut x);
            return Ok(x);
        }
        let embed = self
            .embed
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("this shard holds no embedding".into()))?;
        self.check_token(token as i64)?;
        if embed.device() != Device::Cpu || !matches!(embed.kind(), Kind::Float | Kind::BFloat16) {
            return Err(ModelError::Invalid(format!(
                "the fused step reads CPU f32/bf16 embeddings, not {:?} on {:?}",
                embed.kind(),
                embed.device()
            )));
        }
        let mut x = vec![0f32; h];
        // SAFETY: the embedding is a contiguous [vocab, h] CPU tensor of the
        // matched element type, and `token < vocab`.
        unsafe {
            let off = token as usize * h;
            match embed.kind() {
                Kind::Float => x.copy_from_slice(std::slice::from_raw_parts(
                    (embed.data_ptr() as *const f32).add(off),
                    h,
                )),
                _ => {
                    let row =
                        std::slice::from_raw_parts((embed.data_ptr() as *const u16).add(off), h);
                    x.iter_mut()
                        .zip(row)
                        .for_each(|(x, b)| *x = f32::from_bits((*b as u32) << 16));
                }
            }
        }
        Ok(x)
    }

    /// One token's hidden state `x` through this shard's layers at position
    /// `cache.position`: the float32 logits if the shard holds the head,
    /// else the hidden state after its last layer. On a tensor-parallel
    /// rank the attention and MLP outputs are summed over the group.
    pub fn decode_hidden(&self, mut x: Vec<f32>, cache: &mut PagedSeq<'_>) -> Result<Vec<f32>> {
        cache.reserve_one()?;
        let cfg = &self.cfg;
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        if x.len() != h {
            return Err(ModelError::Invalid(format!(
                "a hidden state of {} values, the model's width is {h}",
                x.len()
            )));
        }
        let heads = self.tp.map_or(cfg.num_heads, |t| t.heads);
        let (nq, nkv) = (heads * d, self.local_kv_heads() * d);
        let pos = cache.position;
        let eps = cfg.rms_norm_eps as f32;
        let angles: Vec<f32> = self.rope.inv_freq.iter().map(|f| pos as f32 * f).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let scale = 1.0 / (d as f64).sqrt();

        let mut normed = vec![0f32; h];
        let mut qkv = vec![0f32; nq + 2 * nkv];
        let mut attn = vec![0f32; nq];
        let mut proj = vec![0f32; h];
        let inter = self.tp.map_or(cfg.intermediate_size, |t| t.intermediate);
        let mut gate_up = vec![0f32; 2 * inter];
        let mut act = vec![0f32; inter];
        for (layer, blk) in self.blocks.iter().enumerate() {
            rms_norm(&x, &blk.attn_norm.w32, eps, &mut normed);
            blk.attn.qkv.linear.gemv_into(&normed, &mut qkv);
            let (q, kv) = qkv.split_at_mut(nq);
            let (k, v) = kv.split_at_mut(nkv);
            rope_in_place(q, d, &cos, &sin);
            rope_in_place(k, d, &cos, &sin);
            cache.write(layer, pos, k, v);
            cache.attend(layer, q, heads, pos + 1, scale, &mut attn);
            blk.attn.o.forward_host(&attn, &mut proj)?;
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);

            rms_norm(&x, &blk.mlp_norm.w32, eps, &mut normed);
            blk.mlp.gate_up.linear.gemv_into(&normed, &mut gate_up);
            silu_mul(&gate_up, &mut act);
            blk.mlp.down.forward_host(&act, &mut proj)?;
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
        }
        cache.position += 1;
        let (Some(norm), Some(head)) = (self.final_norm.as_ref(), self.head.as_ref()) else {
            return Ok(x);
        };
        rms_norm(&x, &norm.w32, eps, &mut normed);
        let mut logits = vec![0f32; head.out_features()];
        head.gemv_into(&normed, &mut logits);
        Ok(logits)
    }
}
