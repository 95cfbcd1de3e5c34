//! The single-sequence decode step on CPU, fused: one token through every
//! layer on f32 activations in host buffers, with the `gemv` kernel for the
//! projections, paged attention over the sequence's blocks of the KV pool
//! (the same pool and kernel the batched forward uses), and plain
//! loops for RMSNorm, rotary embedding, SiLU-and-multiply and residuals.
//! libtorch's per-op dispatch (~45 small ops a layer) would otherwise cost
//! as much as the weight reads on small models. The free functions here are
//! also the CPU references of the CUDA kernels of the same names.

use tch::{Device, Kind};

use super::llama::Llama;
use crate::error::{Result, WorkerError};
use crate::paged::{paged_attention, slot, KvPool, QueryRow};

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
            return Err(WorkerError::InvalidRequest(format!(
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

/// `out = x / rms(x) * w` (float32 statistics, as Hugging Face).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * w;
    }
}

/// Rotates each `d`-wide head of `v` in place (rotate-half convention) by
/// angles `pos * inv_freq`.
pub fn rope_in_place(v: &mut [f32], d: usize, cos: &[f32], sin: &[f32]) {
    let half = d / 2;
    for head in v.chunks_exact_mut(d) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

/// `out = silu(gate) * up` where `gate_up = [gate; up]`.
pub fn silu_mul(gate_up: &[f32], out: &mut [f32]) {
    let (g, u) = gate_up.split_at(out.len());
    crate::vecmath::silu_mul(g, u, out)
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
                .all(|b| b.attn.qkv.has_gemv() && b.attn.o.has_gemv())
    }

    /// One token of one sequence at position `cache.position`: appends to
    /// the cache and returns the float32 logits.
    pub fn decode_step(&self, token: u32, cache: &mut PagedSeq<'_>) -> Result<Vec<f32>> {
        if !self.shard.head {
            return Err(WorkerError::InvalidRequest(
                "this shard holds no LM head".into(),
            ));
        }
        let x = self.embed_row(token)?;
        self.decode_hidden(x, cache)
    }

    /// The embedding of one token as f32 (a CPU f32 or bf16 embedding).
    pub fn embed_row(&self, token: u32) -> Result<Vec<f32>> {
        let h = self.cfg.hidden_size;
        let embed = self
            .embed
            .as_ref()
            .ok_or_else(|| WorkerError::InvalidRequest("this shard holds no embedding".into()))?;
        if token as usize >= self.cfg.vocab_size {
            return Err(WorkerError::InvalidRequest(format!(
                "token id {token} is outside the vocabulary of {} tokens",
                self.cfg.vocab_size
            )));
        }
        if embed.device() != Device::Cpu || !matches!(embed.kind(), Kind::Float | Kind::BFloat16) {
            return Err(WorkerError::InvalidRequest(format!(
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
            return Err(WorkerError::InvalidRequest(format!(
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
            blk.attn.qkv.gemv_into(&normed, &mut qkv);
            let (q, kv) = qkv.split_at_mut(nq);
            let (k, v) = kv.split_at_mut(nkv);
            rope_in_place(q, d, &cos, &sin);
            rope_in_place(k, d, &cos, &sin);
            cache.write(layer, pos, k, v);
            cache.attend(layer, q, heads, pos + 1, scale, &mut attn);
            blk.attn.o.gemv_into(&attn, &mut proj);
            self.reduce_host(&mut proj)?;
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);

            rms_norm(&x, &blk.mlp_norm.w32, eps, &mut normed);
            blk.mlp.gate_up.gemv_into(&normed, &mut gate_up);
            silu_mul(&gate_up, &mut act);
            blk.mlp.down.gemv_into(&act, &mut proj);
            self.reduce_host(&mut proj)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    #[test]
    fn elementwise_kernels_match_libtorch() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..64).map(|i| 1.0 + i as f32 / 64.0).collect();
        let mut out = vec![0f32; 64];
        rms_norm(&x, &w, 1e-5, &mut out);
        let t = Tensor::from_slice(&x).rms_norm([64], Some(&Tensor::from_slice(&w)), 1e-5);
        let want: Vec<f32> = Vec::try_from(t).unwrap();
        assert!(out.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5));

        let mut out = vec![0f32; 32];
        silu_mul(&x, &mut out);
        let g = Tensor::from_slice(&x[..32]);
        let want: Vec<f32> = Vec::try_from(g.silu() * Tensor::from_slice(&x[32..])).unwrap();
        assert!(out.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6));
    }
}
