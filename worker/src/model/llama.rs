//! The Llama family (Llama 2/3/3.1/3.2, SmolLM2, Mistral, Qwen2): RMSNorm,
//! rotary embeddings (default, linear, llama3 scaling), grouped-query
//! attention with optional q/k/v bias, SiLU-gated MLP, tied or untied head.
//!
//! A `Llama` may hold only a contiguous range of layers (`ShardSpec`), with or
//! without the embedding and the final norm + head, so pipeline stages load
//! just their part of the weights. Weights are immutable; the paged KV pool
//! is passed in. The forward itself (`batch.rs`: prompts, prompt chunks and
//! decode rows of many sequences in one step) and its fused one-token CPU
//! fast path (`cpu_decode.rs`) run over that one pool.

use std::sync::Arc;

use llmos_meta::{LayerPart, ModelConfig, TpSplit, WeightKey, WeightSource};
use tch::{Device, Kind, Tensor};

use super::arena::WeightArena;
use super::linear::{Linear, Quantization};
use super::parallel::{ColumnParallel, RowParallel};
use super::weights::{Loader, Progress};
use super::{ModelError, Result};
use crate::comm::Collective;

/// Which part of the model a process holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    pub layers: std::ops::Range<usize>,
    pub embed: bool,
    pub head: bool,
}

impl ShardSpec {
    pub fn full(cfg: &ModelConfig) -> Self {
        ShardSpec {
            layers: 0..cfg.num_layers,
            embed: true,
            head: true,
        }
    }
}

pub(super) struct RmsNorm {
    pub(super) weight: Tensor,
    /// The weight as f32, for the fused CPU decode step.
    pub(super) w32: Vec<f32>,
    pub(super) eps: f64,
}

impl RmsNorm {
    fn new(weight: Tensor, eps: f64) -> Self {
        let w32 =
            Vec::<f32>::try_from(weight.to_kind(Kind::Float).view([-1])).expect("norm weight");
        RmsNorm { weight, w32, eps }
    }
}

impl RmsNorm {
    /// libtorch's fused RMSNorm (float32 statistics, as Hugging Face).
    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.weight.size()[0];
        x.rms_norm([h], Some(&self.weight), self.eps)
    }
}

pub(super) struct Attention {
    /// Fused `[q; k; v]` projection, `[(heads + 2 kv_heads) * head_dim,
    /// hidden]` (this rank's heads).
    pub(super) qkv: ColumnParallel,
    pub(super) o: RowParallel,
    pub(super) heads: i64,
    pub(super) kv_heads: i64,
    pub(super) head_dim: i64,
}

pub(super) struct Mlp {
    /// Fused `[gate; up]`, `[2 * intermediate, hidden]` (this rank's
    /// columns).
    pub(super) gate_up: ColumnParallel,
    pub(super) down: RowParallel,
    pub(super) intermediate: i64,
}

pub(super) struct Block {
    pub(super) attn_norm: RmsNorm,
    pub(super) attn: Attention,
    pub(super) mlp_norm: RmsNorm,
    pub(super) mlp: Mlp,
}

/// Rotary tables `[max_position, 1, head_dim]` in the model's dtype: `cos`,
/// and `sin` with its first half negated, so that rotating `x` is
/// `x * cos + roll(x, head_dim / 2) * sin`.
pub(super) struct Rope {
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    /// Inverse frequencies in f32, for the fused CPU decode step.
    pub(super) inv_freq: Vec<f32>,
}

impl Rope {
    fn new(cfg: &ModelConfig, kind: Kind, device: Device) -> Self {
        let inv: Vec<f32> = cfg.rope_inv_freq().iter().map(|&f| f as f32).collect();
        let inv = Tensor::from_slice(&inv);
        let t = Tensor::arange(cfg.max_position as i64, (Kind::Float, Device::Cpu));
        let freqs = t.outer(&inv);
        let cos = Tensor::cat(&[freqs.cos(), freqs.cos()], -1);
        let sin = Tensor::cat(&[-freqs.sin(), freqs.sin()], -1);
        let table = |x: Tensor| x.unsqueeze(1).to_kind(kind).to_device(device);
        Rope {
            cos: table(cos),
            sin: table(sin),
            inv_freq: Vec::<f32>::try_from(&inv).expect("inv_freq"),
        }
    }
}

impl Mlp {
    /// The MLP's output, summed over the tensor-parallel group.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up.forward(x);
        let g = gu.narrow(-1, 0, self.intermediate);
        let u = gu.narrow(-1, self.intermediate, self.intermediate);
        self.down.forward(&(g.silu() * u))
    }
}

pub struct Llama {
    pub(super) cfg: ModelConfig,
    pub(super) shard: ShardSpec,
    pub(super) embed: Option<Tensor>,
    pub(super) blocks: Vec<Block>,
    pub(super) final_norm: Option<RmsNorm>,
    pub(super) head: Option<Linear>,
    pub(super) rope: Rope,
    pub(super) kind: Kind,
    /// The KV pool's dtype.
    pub(super) kv_kind: Kind,
    pub(super) device: Device,
    /// This rank's part when the layers are split over a tensor-parallel
    /// group (each layer's row-parallel projections sum over the group).
    pub(super) tp: Option<TpSplit>,
    /// Where the linear weights live on CPU: held, never read, because the
    /// weight tensors point into it (declared last: dropped after them).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) weight_arena: Option<Arc<WeightArena>>,
}

/// Moves the layers' linear weights and the head, in the order a decode
/// step reads them, into one `WeightArena`. Where the mapping cannot be
/// made the weights stay where they are (logged).
fn place_weights(blocks: &mut [Block], head: Option<&mut Linear>) -> Option<Arc<WeightArena>> {
    let mut tensors: Vec<&mut Tensor> = blocks
        .iter_mut()
        .flat_map(|b| {
            [
                &mut b.attn.qkv.linear,
                &mut b.attn.o.linear,
                &mut b.mlp.gate_up.linear,
                &mut b.mlp.down.linear,
            ]
        })
        .map(Linear::stored_weight_mut)
        .collect();
    tensors.extend(head.map(Linear::stored_weight_mut));
    WeightArena::place(tensors)
        .inspect_err(|e| {
            tracing::warn!(error = %e, "no mapping for the weight arena: weights stay where loading put them")
        })
        .ok()
}

/// Options for loading a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub kind: Kind,
    pub device: Device,
    /// Seed of synthetic weights.
    pub seed: u64,
    /// How the layers' linear weights are stored.
    pub quantization: Quantization,
    /// The KV cache's dtype (`None`: the model's). bf16 for an f32 model
    /// halves the bytes attention reads; keys and values are rounded when
    /// written (a fresh prompt attends to its own unrounded ones).
    pub kv_kind: Option<Kind>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            kind: Kind::Float,
            device: Device::Cpu,
            seed: 0,
            quantization: Quantization::None,
            kv_kind: None,
        }
    }
}

impl Llama {
    /// Loads the part of the model named by `shard` from `src`, or draws
    /// seeded random weights when `src` is `None`.
    pub fn load(
        src: Option<&dyn WeightSource>,
        cfg: &ModelConfig,
        shard: ShardSpec,
        opts: &LoadOptions,
        progress: Progress<'_>,
    ) -> Result<Self> {
        Self::load_tp(src, cfg, shard, opts, None, progress)
    }

    /// Like `load`, holding only tensor-parallel rank `tp`'s part of each
    /// layer: its query heads, KV heads and MLP columns (column-parallel
    /// q/k/v/gate/up rows, row-parallel o/down columns), read from the
    /// source slice by slice. Norms are replicated; the embedding and head
    /// are loaded as `shard` says (the coordinator gives them to the
    /// group's leader only).
    pub fn load_tp(
        src: Option<&dyn WeightSource>,
        cfg: &ModelConfig,
        shard: ShardSpec,
        opts: &LoadOptions,
        tp: Option<TpSplit>,
        progress: Progress<'_>,
    ) -> Result<Self> {
        if let Some(t) = tp {
            let check = cfg.tp_split(t.rank, t.size).map_err(ModelError::Invalid)?;
            debug_assert_eq!(check, t);
        }
        let split = tp.filter(|t| t.size > 1);
        let d = cfg.head_dim;
        let (heads, kv_heads, inter) = match split {
            Some(t) => (t.heads, t.kv_heads, t.intermediate),
            None => (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size),
        };
        // This rank's query heads, KV heads and MLP columns (all: `None`).
        let part = |start: usize, len: usize| split.map(|_| start..start + len);
        let (q_part, kv_part, inter_part) = match split {
            Some(t) => (
                part(t.head_start * d, heads * d),
                part(t.kv_head_start * d, kv_heads * d),
                part(t.inter_start, inter),
            ),
            None => (None, None, None),
        };
        let ranks = split.map(|t| (t.rank, t.size));
        if shard.layers.end > cfg.num_layers || shard.layers.start > shard.layers.end {
            return Err(ModelError::Invalid(format!(
                "layer range {:?} is outside the model's {} layers",
                shard.layers, cfg.num_layers
            )));
        }
        let per_layer = 9 + if cfg.qkv_bias { 3 } else { 0 };
        let tied = cfg.tie_embeddings;
        let need_embed = shard.embed || (shard.head && tied);
        let total = shard.layers.len() * per_layer
            + need_embed as usize
            + if shard.head { 1 + !tied as usize } else { 0 };
        let mut ld = Loader::new(src, cfg, opts.kind, opts.device, opts.seed, total, progress);
        // `file` keeps the head in the file's blocks too; a tied embedding
        // is then looked up in those blocks (no dense copy).
        let head_blocks = match opts.quantization {
            Quantization::File if shard.head && opts.device == Device::Cpu => {
                let key = if tied {
                    WeightKey::Embed
                } else {
                    WeightKey::LmHead
                };
                ld.blocks(key, None)?
                    .filter(|b| b.kept_by(opts.quantization))
            }
            _ => None,
        };
        let embed_in_head = tied && head_blocks.is_some();
        let embed = if need_embed && embed_in_head {
            ld.count(1);
            None
        } else if need_embed {
            Some(ld.get(WeightKey::Embed)?)
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(shard.layers.len());
        for i in shard.layers.clone() {
            let key = |p| WeightKey::Layer(i, p);
            let q = opts.quantization;
            let attn_norm = ld.get(key(LayerPart::AttnNorm))?;
            let qkv = ColumnParallel::load(
                &mut ld,
                &[
                    (key(LayerPart::Q), q_part.clone()),
                    (key(LayerPart::K), kv_part.clone()),
                    (key(LayerPart::V), kv_part.clone()),
                ],
                cfg.qkv_bias.then_some(&[
                    key(LayerPart::QBias),
                    key(LayerPart::KBias),
                    key(LayerPart::VBias),
                ]),
                q,
            )?;
            let o = RowParallel::load(&mut ld, key(LayerPart::O), q_part.clone(), ranks, q)?;
            let mlp_norm = ld.get(key(LayerPart::MlpNorm))?;
            let gate_up = ColumnParallel::load(
                &mut ld,
                &[
                    (key(LayerPart::Gate), inter_part.clone()),
                    (key(LayerPart::Up), inter_part.clone()),
                ],
                None,
                q,
            )?;
            let down =
                RowParallel::load(&mut ld, key(LayerPart::Down), inter_part.clone(), ranks, q)?;
            let norm = |weight| RmsNorm::new(weight, cfg.rms_norm_eps);
            blocks.push(Block {
                attn_norm: norm(attn_norm),
                attn: Attention {
                    qkv,
                    o,
                    heads: heads as i64,
                    kv_heads: kv_heads as i64,
                    head_dim: cfg.head_dim as i64,
                },
                mlp_norm: norm(mlp_norm),
                mlp: Mlp {
                    gate_up,
                    down,
                    intermediate: inter as i64,
                },
            });
        }
        let (final_norm, head) = if shard.head {
            let norm = RmsNorm::new(ld.get(WeightKey::FinalNorm)?, cfg.rms_norm_eps);
            let head = if let Some(b) = head_blocks {
                if !tied {
                    ld.count(1);
                }
                Linear::from_blocks(b.parts, b.data, b.cols, None)?
            } else if tied {
                Linear::new(
                    embed
                        .as_ref()
                        .expect("loaded for the tied head")
                        .shallow_clone(),
                    None,
                )
            } else {
                Linear::new(ld.get(WeightKey::LmHead)?, None)
            };
            (Some(norm), Some(head))
        } else {
            (None, None)
        };
        let mut embed = if shard.embed { embed } else { None };
        let (mut blocks, mut head) = (blocks, head);
        let weight_arena = if opts.device == Device::Cpu {
            // A tied head is the embedding: let go of the embedding's handle
            // so the original is released as soon as it is copied, then
            // read the embedding from the head's copy.
            let shared = tied
                && embed.is_some()
                && head.as_ref().is_some_and(|h| h.dense_weight().is_some());
            if shared {
                embed = None;
            }
            let arena = place_weights(&mut blocks, head.as_mut());
            if let (true, Some(h)) = (shared, &head) {
                embed = Some(
                    h.dense_weight()
                        .expect("a tied head is dense")
                        .shallow_clone(),
                );
            }
            arena
        } else {
            None
        };
        Ok(Llama {
            rope: Rope::new(cfg, opts.kind, opts.device),
            cfg: cfg.clone(),
            embed,
            shard,
            blocks,
            final_norm,
            head,
            kind: opts.kind,
            kv_kind: opts.kv_kind.unwrap_or(opts.kind),
            device: opts.device,
            tp: split,
            weight_arena,
        })
    }

    /// The group the row-parallel projections sum over (a tensor-parallel
    /// shard cannot run without one).
    pub fn set_collective(&mut self, group: Arc<dyn Collective>) -> Result<()> {
        let want = self.tp.map_or(1, |t| t.size);
        if group.world_size() != want {
            return Err(ModelError::Invalid(format!(
                "the shard is split {want} ways but its group has {} ranks",
                group.world_size()
            )));
        }
        for b in &mut self.blocks {
            b.attn.o.set_group(group.clone())?;
            b.mlp.down.set_group(group.clone())?;
        }
        Ok(())
    }

    pub fn tp_split(&self) -> Option<TpSplit> {
        self.tp
    }

    /// KV heads this shard holds (all, or its tensor-parallel share).
    pub fn local_kv_heads(&self) -> usize {
        self.tp.map_or(self.cfg.num_kv_heads, |t| t.kv_heads)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn shard(&self) -> &ShardSpec {
        &self.shard
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Whether every projection of a `rows`-token step (and the head, for
    /// up to as many rows) runs on the `gemv` kernel's pool, so libtorch's
    /// own threads have nothing worth waking for.
    pub fn projections_on_pool(&self, rows: i64) -> bool {
        self.blocks.iter().all(|b| {
            [
                &b.attn.qkv.linear,
                &b.attn.o.linear,
                &b.mlp.gate_up.linear,
                &b.mlp.down.linear,
            ]
            .iter()
            .all(|l| l.uses_kernel(rows))
        }) && self.head.as_ref().is_none_or(|h| h.uses_kernel(rows))
    }

    /// Bytes of weights this shard holds (a tied head counted once).
    pub fn weight_bytes(&self) -> usize {
        let t = |x: &Tensor| x.numel() * x.kind().elt_size_in_bytes();
        let mut n = self.embed.as_ref().map_or(0, t);
        for b in &self.blocks {
            n += b.attn.qkv.linear.bytes() + b.attn.o.linear.bytes();
            n += b.mlp.gate_up.linear.bytes() + b.mlp.down.linear.bytes();
            n += t(&b.attn_norm.weight) + t(&b.mlp_norm.weight);
        }
        n += self.final_norm.as_ref().map_or(0, |f| t(&f.weight));
        if let Some(h) = &self.head {
            if !self.head_is_embedding() {
                n += h.bytes();
            }
        }
        n
    }

    /// A token id the embedding has a row for.
    pub(super) fn check_token(&self, token: i64) -> Result<()> {
        if token < 0 || token as usize >= self.cfg.vocab_size {
            return Err(ModelError::Invalid(format!(
                "token id {token} is outside the vocabulary of {} tokens",
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// The head, when the embedding is looked up in its blocks (a tied
    /// head kept in the file's blocks, `Quantization::File`).
    pub(super) fn embedding_in_head(&self) -> Option<&Linear> {
        let h = self.head.as_ref()?;
        (self.shard.embed
            && self.embed.is_none()
            && self.cfg.tie_embeddings
            && h.block_type().is_some())
        .then_some(h)
    }

    /// Whether the head's weight is the embedding tensor itself (a tied
    /// head kept dense), counted once.
    fn head_is_embedding(&self) -> bool {
        match (
            &self.embed,
            self.head.as_ref().and_then(|h| h.dense_weight()),
        ) {
            (Some(e), Some(h)) => e.data_ptr() == h.data_ptr(),
            _ => false,
        }
    }

    /// Bytes of weights one decoded token reads: `weight_bytes` less an
    /// embedding the head does not share (a decode step reads one of its
    /// rows).
    pub fn decode_bytes(&self) -> usize {
        let e = match &self.embed {
            Some(e) if !self.head_is_embedding() => e.numel() * e.kind().elt_size_in_bytes(),
            _ => 0,
        };
        self.weight_bytes() - e
    }

    /// Token ids `[b, t]` to embeddings `[b, t, hidden]` (first stage only).
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        if let Some(h) = self.embedding_in_head() {
            let ids = Vec::<i64>::try_from(tokens.flatten(0, -1).to_device(Device::Cpu))?;
            let hsz = self.cfg.hidden_size;
            let mut rows = vec![0f32; ids.len() * hsz];
            for (id, out) in ids.iter().zip(rows.chunks_exact_mut(hsz)) {
                self.check_token(*id)?;
                h.dequantize_row(*id as usize, out);
            }
            let mut shape = tokens.size();
            shape.push(hsz as i64);
            return Ok(Tensor::from_slice(&rows)
                .view(shape.as_slice())
                .to_kind(self.kind)
                .to_device(self.device));
        }
        let e = self
            .embed
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("this shard holds no embedding".into()))?;
        Ok(Tensor::embedding(
            e,
            &tokens.to_device(self.device),
            -1,
            false,
            false,
        ))
    }

    /// Normed hidden states to float32 logits `[.., vocab]` (last stage only).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self
            .head
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("this shard holds no LM head".into()))?;
        Ok(head.forward(hidden).to_kind(Kind::Float))
    }

    /// Adds `delta` to element `index` of one weight (tests prove parity
    /// checks can fail).
    pub fn perturb(&self, layer: usize, delta: f64) {
        let w = self.blocks[layer]
            .mlp
            .down
            .linear
            .dense_weight()
            .expect("perturb a dense weight");
        let _guard = tch::no_grad_guard();
        let mut first = w.view([-1]).narrow(0, 0, 1);
        let _ = first.g_add_scalar_(delta);
    }
}
