//! The batched step over a paged KV cache: the tokens of many sequences
//! (decode tokens and prompt chunks alike) packed into one `[tokens, hidden]`
//! tensor, so every projection is one matrix product for the whole batch.
//! Each token's rotary angle comes from its own position; keys and values
//! go to the slots its sequence's block table names. Attention is the only
//! per-sequence part: on CPU every row (decode tokens and prompt chunks
//! alike, each row seeing the positions up to its own) reads the pool in
//! place through `paged_attention`, on the decode pool's threads; elsewhere
//! libtorch's attention runs over each sequence's gathered context (causal
//! within the chunk).

use llmos_kernels::cpu::paged_attention::{paged_attention, QueryRow};
use tch::{Device, Kind, Tensor};

use super::llama::Llama;
use super::{ModelError, Result};
use crate::kv::{BatchLayout, KvPool};

impl Llama {
    /// The pool shape this shard needs for `num_blocks` blocks of
    /// `block_size` positions.
    pub fn pool_shape(&self, num_blocks: usize, block_size: usize) -> crate::kv::PoolShape {
        crate::kv::PoolShape {
            layers: self.blocks.len(),
            num_blocks,
            block_size,
            kv_heads: self.local_kv_heads(),
            head_dim: self.cfg.head_dim,
        }
    }

    /// A paged KV pool for this shard's layers.
    pub fn new_pool(&self, num_blocks: usize, block_size: usize) -> Result<KvPool> {
        Ok(KvPool::new(
            self.pool_shape(num_blocks, block_size),
            self.kv_kind,
            self.device,
        )?)
    }

    /// Runs this shard's layers over the packed `x` (`[tokens, hidden]`),
    /// writing each token's keys and values into `pool` and attending as
    /// `layout` says; applies the final norm if this shard holds the head.
    pub fn forward_batch(
        &self,
        x: &Tensor,
        layout: &BatchLayout,
        pool: &mut KvPool,
    ) -> Result<Tensor> {
        layout.validate(&pool.shape(), self.cfg.max_position)?;
        let t = layout.total_tokens() as i64;
        if x.size() != [t, self.cfg.hidden_size as i64] {
            return Err(ModelError::Invalid(format!(
                "the step packs {t} tokens of width {}, the input is {:?}",
                self.cfg.hidden_size,
                x.size()
            )));
        }
        if pool.shape().layers != self.blocks.len() {
            return Err(ModelError::Invalid(format!(
                "the KV pool has {} layers, the shard {}",
                pool.shape().layers,
                self.blocks.len()
            )));
        }
        let dev = self.device;
        let positions = Tensor::from_slice(&layout.positions()).to_device(dev);
        let slots = Tensor::from_slice(&layout.slots()).to_device(dev);
        let cos = self.rope.cos.index_select(0, &positions);
        let sin = self.rope.sin.index_select(0, &positions);
        let mut x = x.to_kind(self.kind).to_device(dev);
        for (i, blk) in self.blocks.iter().enumerate() {
            let a = &blk.attn;
            let (h, hkv, d) = (a.heads, a.kv_heads, a.head_dim);
            let qkv = a
                .qkv
                .forward(&blk.attn_norm.forward(&x))
                .view([t, h + 2 * hkv, d]);
            let qk = qkv.narrow(1, 0, h + hkv);
            let qk = (&qk * &cos).addcmul(&qk.roll([d / 2], [-1]), &sin);
            let (q, k) = (qk.narrow(1, 0, h), qk.narrow(1, h, hkv));
            let v = qkv.narrow(1, h + hkv, hkv);
            pool.write(i, &slots, &k, &v);
            let y = self.attend_batch(i, &q, &k, &v, layout, pool);
            x = &x + a.o.forward(&y.reshape([t, h * d]))?;
            x = &x + blk.mlp.forward(&blk.mlp_norm.forward(&x))?;
        }
        Ok(match &self.final_norm {
            Some(n) => n.forward(&x),
            None => x,
        })
    }

    /// Attention of the packed queries `q` (`[tokens, heads, d]`; `k`, `v`
    /// are this step's own keys and values) for layer `layer`, as
    /// `[tokens, heads, d]` in the model's dtype.
    fn attend_batch(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layout: &BatchLayout,
        pool: &KvPool,
    ) -> Tensor {
        let (t, h, d) = q.size3().expect("q is [t, h, d]");
        let scale = 1.0 / (d as f64).sqrt();
        let offsets = layout.offsets();
        let (kp, vp) = pool.layer(layer);
        let kernel = self.device == Device::Cpu
            && matches!(kp.kind(), Kind::Float | Kind::BFloat16 | Kind::Half);
        // Every row is written below (by the kernel or by the fallback).
        let out = Tensor::empty([t, h, d], (Kind::Float, self.device));
        // On CPU every query row, a prompt's as a decode step's, attends
        // in place over the pool (this step's keys and values are already
        // written there): row `off + j` of a sequence sees its first
        // `position + j + 1` positions, which is the causal mask. The rows
        // are the tasks of the decode pool, so a prompt's attention runs on
        // every thread (libtorch's kernel ran it on one where the block
        // products keep libtorch to a single thread: 30% of a 512-token
        // prompt's time, measured).
        let rows: Vec<QueryRow> = layout
            .seqs
            .iter()
            .zip(&offsets)
            .filter(|_| kernel)
            .flat_map(|(s, &off)| {
                (0..s.tokens).map(move |j| QueryRow {
                    row: off + j,
                    blocks: &s.blocks,
                    len: s.position + j + 1,
                })
            })
            .collect();
        if !rows.is_empty() {
            let qf = q.to_kind(Kind::Float).contiguous();
            let n = (t * h * d) as usize;
            // SAFETY: `qf` and `out` are contiguous f32 CPU tensors of `n`
            // elements; `out` is not aliased while the slices live.
            let (qs, os) = unsafe {
                (
                    std::slice::from_raw_parts(qf.data_ptr() as *const f32, n),
                    std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n),
                )
            };
            paged_attention(
                qs,
                h as usize,
                kp,
                vp,
                layout.block_size,
                &rows,
                scale as f32,
                os,
            );
            return out.to_kind(self.kind);
        }
        for (i, (s, &off)) in layout.seqs.iter().zip(&offsets).enumerate() {
            let n = s.tokens as i64;
            let heads_first = |x: &Tensor| x.permute([1, 0, 2]).unsqueeze(0);
            let qi = heads_first(&q.narrow(0, off as i64, n));
            let y = if s.position == 0 {
                // A fresh prompt: its own keys and values, plainly causal.
                Tensor::scaled_dot_product_attention::<Tensor>(
                    &qi,
                    &heads_first(&k.narrow(0, off as i64, n)).contiguous(),
                    &heads_first(&v.narrow(0, off as i64, n)).contiguous(),
                    None,
                    0.0,
                    true,
                    Some(scale),
                    true,
                )
            } else {
                // A chunk after cached positions sees all of them plus its
                // own causal part.
                let len = s.len_after() as i64;
                let ctx = Tensor::from_slice(&layout.context_slots(i, s.len_after()))
                    .to_device(self.device);
                let (kc, vc) = pool.gather(layer, &ctx);
                let (kc, vc) = (kc.to_kind(q.kind()), vc.to_kind(q.kind()));
                let q_pos =
                    Tensor::arange_start(s.position as i64, len, (Kind::Int64, self.device))
                        .unsqueeze(1);
                let k_pos = Tensor::arange(len, (Kind::Int64, self.device)).unsqueeze(0);
                Tensor::scaled_dot_product_attention(
                    &qi,
                    &heads_first(&kc),
                    &heads_first(&vc),
                    Some(k_pos.le_tensor(&q_pos)),
                    0.0,
                    false,
                    Some(scale),
                    true,
                )
            };
            out.narrow(0, off as i64, n)
                .copy_(&y.squeeze_dim(0).permute([1, 0, 2]));
        }
        out.to_kind(self.kind)
    }

    /// Embeddings of packed token ids (`[tokens]` int64) as `[tokens, hidden]`.
    pub fn embed_packed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed(&ids.unsqueeze(0)).map(|x| x.squeeze_dim(0))
    }

    /// Float32 logits `[rows, vocab]` of the given rows of `hidden`.
    pub fn logits_rows(&self, hidden: &Tensor, rows: &[i64]) -> Result<Tensor> {
        let idx = Tensor::from_slice(rows).to_device(hidden.device());
        self.logits(&hidden.index_select(0, &idx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::SeqSlice;
    use crate::model::llama::LoadOptions;
    use crate::model::ShardSpec;
    use llmos_meta::ModelConfig;

    fn tiny(kind: Kind) -> Llama {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let opts = LoadOptions {
            kind,
            device: Device::Cpu,
            seed: 3,
            ..Default::default()
        };
        Llama::load(None, &cfg, ShardSpec::full(&cfg), &opts, &mut |_, _| {}).unwrap()
    }

    /// A ragged batch (a fresh prompt, a prompt chunk after cached
    /// positions, decode tokens) on scattered blocks gives, row for row, the
    /// logits of each sequence run alone, whole, in a pool of its own.
    #[test]
    fn ragged_batch_matches_sequences_alone() {
        for (kind, tol) in [(Kind::Float, 2e-4), (Kind::BFloat16, 0.15)] {
            let m = tiny(kind);
            let _g = tch::no_grad_guard();
            let bs = 4;
            let mut pool = m.new_pool(64, bs).unwrap();
            let prompts: [Vec<i64>; 3] = [
                vec![5, 17, 99, 3, 8, 200, 41],
                vec![9, 1, 2, 77, 300],
                vec![12, 13],
            ];
            let tables: [Vec<u32>; 3] = [vec![40, 3, 17, 9], vec![0, 63, 22], vec![31, 8]];
            // Step 1: whole prompts of sequences 0 and 2; the first 3
            // tokens of sequence 1.
            let layout = BatchLayout {
                seqs: vec![
                    SeqSlice {
                        position: 0,
                        tokens: 7,
                        blocks: tables[0].clone(),
                    },
                    SeqSlice {
                        position: 0,
                        tokens: 3,
                        blocks: tables[1].clone(),
                    },
                    SeqSlice {
                        position: 0,
                        tokens: 2,
                        blocks: tables[2].clone(),
                    },
                ],
                block_size: bs,
            };
            let ids: Vec<i64> = [&prompts[0][..], &prompts[1][..3], &prompts[2][..]].concat();
            let x = m.embed_packed(&Tensor::from_slice(&ids)).unwrap();
            let _ = m.forward_batch(&x, &layout, &mut pool).unwrap();
            // Step 2: the rest of sequence 1's prompt (a chunk after cached
            // positions) beside one decode token each for 0 and 2.
            let layout = BatchLayout {
                seqs: vec![
                    SeqSlice {
                        position: 7,
                        tokens: 1,
                        blocks: tables[0].clone(),
                    },
                    SeqSlice {
                        position: 3,
                        tokens: 2,
                        blocks: tables[1].clone(),
                    },
                    SeqSlice {
                        position: 2,
                        tokens: 1,
                        blocks: tables[2].clone(),
                    },
                ],
                block_size: bs,
            };
            let next = [42i64, 0, 7];
            let ids = vec![next[0], prompts[1][3], prompts[1][4], next[2]];
            let x = m.embed_packed(&Tensor::from_slice(&ids)).unwrap();
            let hid = m.forward_batch(&x, &layout, &mut pool).unwrap();
            let got = m.logits_rows(&hid, &layout.last_rows()).unwrap();
            // Alone: each sequence's tokens in one step of its own, in a
            // pool of its own on contiguous blocks.
            let alone = [
                [&prompts[0][..], &[next[0]]].concat(),
                prompts[1].clone(),
                [&prompts[2][..], &[next[2]]].concat(),
            ];
            for (i, toks) in alone.iter().enumerate() {
                let mut own = m.new_pool(4, bs).unwrap();
                let layout = BatchLayout {
                    seqs: vec![SeqSlice {
                        position: 0,
                        tokens: toks.len(),
                        blocks: vec![0, 1, 2, 3],
                    }],
                    block_size: bs,
                };
                let x = m.embed_packed(&Tensor::from_slice(toks)).unwrap();
                let h = m.forward_batch(&x, &layout, &mut own).unwrap();
                let want = m
                    .logits_rows(&h, &[toks.len() as i64 - 1])
                    .unwrap()
                    .view([-1]);
                let diff = (got.get(i as i64) - want).abs().max().double_value(&[]);
                assert!(diff < tol, "{kind:?} sequence {i}: {diff}");
            }
        }
    }

    /// The fused one-token step over a paged sequence equals the batched
    /// path's logits for that token, in f32 (tight) and bf16 (bf16
    /// activations there), with and without q/k/v biases, and on an f32
    /// model with a bf16 or f16 KV cache (the fused step rounds what it
    /// writes as libtorch's conversion does: tight).
    #[test]
    fn fused_step_on_pages_matches_batched_path() {
        for (kind, kv_kind, bias, tol) in [
            (Kind::Float, None, false, 1e-4),
            (Kind::Float, None, true, 1e-4),
            (Kind::BFloat16, None, true, 0.1),
            (Kind::Float, Some(Kind::BFloat16), false, 1e-4),
            (Kind::Float, Some(Kind::Half), true, 1e-4),
        ] {
            fused_step_matches_batched(kind, kv_kind, bias, tol);
        }
    }

    fn fused_step_matches_batched(kind: Kind, kv_kind: Option<Kind>, bias: bool, tol: f32) {
        let mut cfg = ModelConfig::preset("tiny").unwrap();
        cfg.qkv_bias = bias;
        let opts = LoadOptions {
            kind,
            kv_kind,
            device: Device::Cpu,
            seed: 7,
            ..Default::default()
        };
        let m = Llama::load(None, &cfg, ShardSpec::full(&cfg), &opts, &mut |_, _| {}).unwrap();
        let _g = tch::no_grad_guard();
        let bs = 4;
        let (mut p1, mut p2) = (m.new_pool(16, bs).unwrap(), m.new_pool(16, bs).unwrap());
        assert_eq!(p1.layer(0).0.kind(), kv_kind.unwrap_or(kind));
        let blocks = vec![6u32, 1, 12];
        let prompt = [5i64, 17, 99, 3, 8];
        let layout = |position, tokens| BatchLayout {
            seqs: vec![SeqSlice {
                position,
                tokens,
                blocks: blocks.clone(),
            }],
            block_size: bs,
        };
        for pool in [&mut p1, &mut p2] {
            let x = m.embed_packed(&Tensor::from_slice(&prompt)).unwrap();
            let _ = m.forward_batch(&x, &layout(0, 5), pool).unwrap();
        }
        for (i, tok) in [42u32, 7, 300, 511].into_iter().enumerate() {
            let pos = 5 + i;
            let fused = m
                .decode_step(
                    tok,
                    &mut crate::model::cpu_decode::PagedSeq {
                        pool: &mut p1,
                        blocks: &blocks,
                        position: pos,
                    },
                )
                .unwrap();
            let x = m.embed_packed(&Tensor::from_slice(&[tok as i64])).unwrap();
            let h = m.forward_batch(&x, &layout(pos, 1), &mut p2).unwrap();
            let want: Vec<f32> =
                Vec::try_from(m.logits_rows(&h, &[0]).unwrap().view([-1])).unwrap();
            let diff = fused
                .iter()
                .zip(&want)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(
                diff < tol,
                "{kind:?} KV {kv_kind:?} bias {bias} token {tok}: {diff}"
            );
        }
    }
}
