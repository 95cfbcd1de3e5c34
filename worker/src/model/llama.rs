//! The Llama family (Llama 2/3/3.1/3.2, SmolLM2, Mistral, Qwen2): RMSNorm,
//! rotary embeddings (default, linear, llama3 scaling), grouped-query
//! attention with optional q/k/v bias, SiLU-gated MLP, tied or untied head.
//!
//! A `Llama` may hold only a contiguous range of layers (`ShardSpec`), with or
//! without the embedding and the final norm + head, so pipeline stages load
//! just their part of the weights. Weights are immutable; the KV cache is
//! passed in.

use llmos_meta::{LayerPart, ModelConfig, WeightKey, WeightSource};
use tch::{Device, Kind, Tensor};

use crate::error::{Result, WorkerError};
use crate::kv_cache::KvCache;
use crate::weights::{Loader, Progress};

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

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Computed in float32 and cast back, as Hugging Face does.
    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.square().mean_dim(-1, true, Kind::Float);
        let normed = (xf * (var + self.eps).rsqrt()).to_kind(kind);
        normed * &self.weight
    }
}

struct Attention {
    /// Fused `[q; k; v]` projection, `[(heads + 2 kv_heads) * head_dim, hidden]`.
    qkv: Tensor,
    qkv_bias: Option<Tensor>,
    o: Tensor,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

struct Mlp {
    /// Fused `[gate; up]`, `[2 * intermediate, hidden]`.
    gate_up: Tensor,
    down: Tensor,
    intermediate: i64,
}

struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

/// cos/sin tables, `[max_position, head_dim]`, in the model's dtype.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &ModelConfig, kind: Kind, device: Device) -> Self {
        let inv: Vec<f32> = cfg.rope_inv_freq().iter().map(|&f| f as f32).collect();
        let inv = Tensor::from_slice(&inv);
        let t = Tensor::arange(cfg.max_position as i64, (Kind::Float, Device::Cpu));
        let freqs = t.outer(&inv);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        Rope {
            cos: emb.cos().to_kind(kind).to_device(device),
            sin: emb.sin().to_kind(kind).to_device(device),
        }
    }

    /// Rotates `x` (`[b, heads, t, head_dim]`) for positions `start..start+t`.
    fn apply(&self, x: &Tensor, start: i64) -> Tensor {
        let t = x.size()[2];
        let cos = self.cos.narrow(0, start, t);
        let sin = self.sin.narrow(0, start, t);
        let half = x.size()[3] / 2;
        let x1 = x.narrow(3, 0, half);
        let x2 = x.narrow(3, half, half);
        let rotated = Tensor::cat(&[&x2.neg(), &x1], 3);
        x * cos + rotated * sin
    }
}

impl Attention {
    fn forward(&self, x: &Tensor, start: i64, rope: &Rope, layer: usize, cache: &mut KvCache) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden is [b, t, h]");
        let qkv = x.linear(&self.qkv, self.qkv_bias.as_ref());
        let (hq, hkv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let parts = qkv.split_with_sizes([hq, hkv, hkv], -1);
        let q = parts[0].view([b, t, self.heads, self.head_dim]).transpose(1, 2);
        let k = parts[1].view([b, t, self.kv_heads, self.head_dim]).transpose(1, 2);
        let v = parts[2].view([b, t, self.kv_heads, self.head_dim]).transpose(1, 2);
        let q = rope.apply(&q, start);
        let k = rope.apply(&k, start);
        let (k_all, v_all) = cache.append(layer, &k, &v);
        let total = start + t;
        // A fresh prompt is plainly causal; one token needs no mask; a chunk
        // after cached positions sees all of them plus its own causal part.
        let (mask, causal) = if t == 1 {
            (None, false)
        } else if start == 0 {
            (None, true)
        } else {
            let q_pos = Tensor::arange_start(start, total, (Kind::Int64, x.device())).unsqueeze(1);
            let k_pos = Tensor::arange(total, (Kind::Int64, x.device())).unsqueeze(0);
            (Some(k_pos.le_tensor(&q_pos)), false)
        };
        let y = Tensor::scaled_dot_product_attention(&q, &k_all, &v_all, mask, 0.0, causal, None, true);
        y.transpose(1, 2).reshape([b, t, hq]).linear::<Tensor>(&self.o, None)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        let gu = x.linear::<Tensor>(&self.gate_up, None);
        let g = gu.narrow(-1, 0, self.intermediate);
        let u = gu.narrow(-1, self.intermediate, self.intermediate);
        (g.silu() * u).linear::<Tensor>(&self.down, None)
    }
}

pub struct Llama {
    cfg: ModelConfig,
    shard: ShardSpec,
    embed: Option<Tensor>,
    blocks: Vec<Block>,
    final_norm: Option<RmsNorm>,
    head: Option<Tensor>,
    rope: Rope,
    kind: Kind,
    device: Device,
}

/// Options for loading a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub kind: Kind,
    pub device: Device,
    /// Seed of synthetic weights.
    pub seed: u64,
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
        if shard.layers.end > cfg.num_layers || shard.layers.start > shard.layers.end {
            return Err(WorkerError::InvalidRequest(format!(
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
        let embed = if need_embed { Some(ld.get(WeightKey::Embed)?) } else { None };
        let mut blocks = Vec::with_capacity(shard.layers.len());
        for i in shard.layers.clone() {
            let mut w = |p| ld.get(WeightKey::Layer(i, p));
            let attn_norm = w(LayerPart::AttnNorm)?;
            let qkv = Tensor::cat(&[w(LayerPart::Q)?, w(LayerPart::K)?, w(LayerPart::V)?], 0);
            let qkv_bias = if cfg.qkv_bias {
                Some(Tensor::cat(
                    &[w(LayerPart::QBias)?, w(LayerPart::KBias)?, w(LayerPart::VBias)?],
                    0,
                ))
            } else {
                None
            };
            let o = w(LayerPart::O)?;
            let mlp_norm = w(LayerPart::MlpNorm)?;
            let gate_up = Tensor::cat(&[w(LayerPart::Gate)?, w(LayerPart::Up)?], 0);
            let down = w(LayerPart::Down)?;
            let norm = |weight| RmsNorm {
                weight,
                eps: cfg.rms_norm_eps,
            };
            blocks.push(Block {
                attn_norm: norm(attn_norm),
                attn: Attention {
                    qkv,
                    qkv_bias,
                    o,
                    heads: cfg.num_heads as i64,
                    kv_heads: cfg.num_kv_heads as i64,
                    head_dim: cfg.head_dim as i64,
                },
                mlp_norm: norm(mlp_norm),
                mlp: Mlp {
                    gate_up,
                    down,
                    intermediate: cfg.intermediate_size as i64,
                },
            });
        }
        let (final_norm, head) = if shard.head {
            let norm = RmsNorm {
                weight: ld.get(WeightKey::FinalNorm)?,
                eps: cfg.rms_norm_eps,
            };
            let head = if tied {
                embed.as_ref().expect("loaded for the tied head").shallow_clone()
            } else {
                ld.get(WeightKey::LmHead)?
            };
            (Some(norm), Some(head))
        } else {
            (None, None)
        };
        Ok(Llama {
            rope: Rope::new(cfg, opts.kind, opts.device),
            cfg: cfg.clone(),
            embed: if shard.embed { embed } else { None },
            shard,
            blocks,
            final_norm,
            head,
            kind: opts.kind,
            device: opts.device,
        })
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

    /// A KV cache for this shard's layers.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        KvCache::new(
            self.blocks.len(),
            batch,
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
            capacity.min(self.cfg.max_position),
            self.kind,
            self.device,
        )
    }

    /// Token ids `[b, t]` to embeddings `[b, t, hidden]` (first stage only).
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let e = self
            .embed
            .as_ref()
            .ok_or_else(|| WorkerError::InvalidRequest("this shard holds no embedding".into()))?;
        Ok(Tensor::embedding(e, &tokens.to_device(self.device), -1, false, false))
    }

    /// Runs this shard's layers over `hidden` (`[b, t, hidden]`) at positions
    /// `cache.len()..`, appending to the cache; applies the final norm if this
    /// shard holds the head.
    pub fn forward_hidden(&self, hidden: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let t = hidden.size()[1] as usize;
        cache.reserve(t)?;
        let start = cache.len() as i64;
        let mut x = hidden.shallow_clone();
        for (i, blk) in self.blocks.iter().enumerate() {
            let h = blk.attn.forward(&blk.attn_norm.forward(&x), start, &self.rope, i, cache);
            x = x + h;
            x = &x + blk.mlp.forward(&blk.mlp_norm.forward(&x));
        }
        cache.advance(t);
        Ok(match &self.final_norm {
            Some(n) => n.forward(&x),
            None => x,
        })
    }

    /// Full forward from token ids: `[b, t]` ids to normed hidden states.
    pub fn forward(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let x = self.embed(tokens)?;
        self.forward_hidden(&x, cache)
    }

    /// Normed hidden states to float32 logits `[.., vocab]` (last stage only).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self
            .head
            .as_ref()
            .ok_or_else(|| WorkerError::InvalidRequest("this shard holds no LM head".into()))?;
        Ok(hidden.linear::<Tensor>(head, None).to_kind(Kind::Float))
    }

    /// Adds `delta` to element `index` of one weight (tests prove parity
    /// checks can fail).
    pub fn perturb(&self, layer: usize, delta: f64) {
        let w = &self.blocks[layer].mlp.down;
        let _guard = tch::no_grad_guard();
        let mut first = w.view([-1]).narrow(0, 0, 1);
        let _ = first.g_add_scalar_(delta);
    }
}
