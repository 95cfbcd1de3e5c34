//! What a shard host is asked to hold and to run, in the engine's terms:
//! a shard's configuration, one batched step and its output. The server
//! converts them from and to `llmos.worker.v1` (and the remote stage back
//! again); nothing below the server sees a protobuf type.

use std::ops::Range;
use std::time::Duration;

use llmos_meta::request::SamplingParams;
use tch::{Kind, Tensor};

use crate::comm::LinkSpec;
use crate::model::linear::Quantization;

/// One rank of a stage's tensor-parallel group. Rank 0 (the leader) takes
/// the stage's steps and passes each to the other ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorParallel {
    pub rank: usize,
    pub world_size: usize,
    /// Collective addresses (host:port) of the ranks, in rank order.
    pub peers: Vec<String>,
    /// Names the group on the ranks' listeners; new for every placement.
    pub group: String,
    /// A collective without an answer for this long fails (`None`: the
    /// host's default).
    pub timeout: Option<Duration>,
}

/// A shard a host is asked to hold: a contiguous range of a model's
/// layers (with its embedding and head where it has them), its paged KV
/// pool, and its place in a tensor-parallel group and a linked pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardConfig {
    /// Name the model is served under.
    pub model: String,
    /// What `llmos-worker generate --model` accepts: a path or `smollm2`.
    pub source: String,
    pub layers: Range<usize>,
    pub embed: bool,
    pub head: bool,
    pub kind: Kind,
    pub quantization: Quantization,
    /// The KV cache's element type (`None`: `kind`).
    pub kv_kind: Option<Kind>,
    pub kv_blocks: usize,
    pub block_size: usize,
    pub tensor_parallel: Option<TensorParallel>,
    /// Set on a stage leader whose activations travel over direct links.
    pub prev_link: Option<LinkSpec>,
    pub next_link: Option<LinkSpec>,
}

impl ShardConfig {
    /// The configuration without its pipeline links (which change when a
    /// neighbouring stage restarts, while this shard's weights and cache
    /// stay good).
    pub fn without_links(&self) -> ShardConfig {
        ShardConfig {
            prev_link: None,
            next_link: None,
            ..self.clone()
        }
    }
}

#[cfg(test)]
impl ShardConfig {
    /// The whole seeded tiny test model (2 layers), f32.
    pub fn tiny(model: &str, kv_blocks: usize, block_size: usize) -> ShardConfig {
        ShardConfig {
            model: model.into(),
            source: "synthetic:tiny".into(),
            layers: 0..2,
            embed: true,
            head: true,
            kind: Kind::Float,
            quantization: Quantization::None,
            kv_kind: None,
            kv_blocks,
            block_size,
            tensor_parallel: None,
            prev_link: None,
            next_link: None,
        }
    }
}

/// What a loaded shard reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Loaded {
    pub weight_bytes: u64,
    pub load_seconds: f64,
    /// The model's context length in positions.
    pub max_context: usize,
    /// The model's vocabulary (what requests' token ids must be below).
    pub vocab_size: usize,
    /// The shard was already held with this configuration: its weights and
    /// KV cache (and a first stage's boundary rows) were kept.
    pub kept: bool,
}

/// Sample a token from a sequence's last row: with these parameters, as
/// the sequence's `index`-th generated token (0 = first).
#[derive(Debug, Clone, PartialEq)]
pub struct SampleAt {
    pub params: SamplingParams,
    pub index: u64,
    /// The sequence's tokens, sent when its penalties count them.
    pub history: Option<crate::sampling::History>,
}

/// One sequence's part of a batched step. Its tokens are packed in the
/// step's input after those of the sequences before it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SeqStep {
    /// Positions already cached: this step's tokens start here.
    pub position: usize,
    pub tokens: usize,
    /// Block table covering `position + tokens` positions.
    pub blocks: Vec<u32>,
    /// Last stage: sample a token from this sequence's last row.
    pub sample: Option<SampleAt>,
    /// Last stage: return the logits of this sequence's last row.
    pub want_logits: bool,
    /// The W3C traceparent of the sequence's span, when it is traced.
    pub trace: Option<String>,
}

impl SeqStep {
    /// This sequence as a stage runs it that neither samples nor returns
    /// logits (a pipeline stage before the last, a tensor-parallel
    /// follower rank).
    pub fn layout_only(&self) -> SeqStep {
        SeqStep {
            sample: None,
            want_logits: false,
            ..self.clone()
        }
    }
}

/// A step's input.
#[derive(Debug)]
pub enum StepInput {
    /// First stage: the packed token ids.
    Tokens(Vec<u32>),
    /// Later stages: packed hidden states `[tokens, hidden]`.
    Hidden(Tensor),
    /// Later stages of a linked pipeline: the hidden states arrive over the
    /// link from the previous stage.
    FromPrevious,
}

impl Clone for StepInput {
    fn clone(&self) -> Self {
        match self {
            StepInput::Tokens(t) => StepInput::Tokens(t.clone()),
            StepInput::Hidden(h) => StepInput::Hidden(h.shallow_clone()),
            StepInput::FromPrevious => StepInput::FromPrevious,
        }
    }
}

/// One batched step of one model's shard.
#[derive(Debug, Clone)]
pub struct Step {
    pub model: String,
    /// Numbers the steps of a linked pipeline (every stage receives them in
    /// this order and matches what arrives over its link by it).
    pub id: u64,
    pub seqs: Vec<SeqStep>,
    pub input: StepInput,
    /// Send the output hidden states over the link to the next stage
    /// instead of answering with them.
    pub to_next: bool,
}

impl Step {
    /// Tokens of all sequences (the rows of the step's input).
    pub fn tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens).sum()
    }

    /// The step's sequences with nothing to sample or return.
    pub fn layout_only(&self) -> Vec<SeqStep> {
        self.seqs.iter().map(SeqStep::layout_only).collect()
    }
}

/// A sampled token, its log-probability under the model (before
/// penalties, temperature and truncation) and the most likely
/// alternatives when asked for (`SamplingParams::top_logprobs`).
pub type Sampled = crate::sampling::Choice;

/// What a step answers.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// Every stage but the last (unless sent on over a link): hidden states
    /// `[tokens, hidden]`.
    pub hidden: Option<Tensor>,
    /// Last stage: one per sequence with `sample`, in order.
    pub tokens: Vec<Sampled>,
    /// Last stage: float32 `[n, vocab]`, one row per sequence with
    /// `want_logits`.
    pub logits: Option<Tensor>,
}

/// A shard's share of the worker's resources.
#[derive(Debug, Clone)]
pub struct ShardStats {
    pub config: ShardConfig,
    pub weight_bytes: u64,
    pub kv_cache_bytes: u64,
    pub collective_bytes_sent: u64,
    pub link_bytes_sent: u64,
}

/// The host's shards and the device's memory.
#[derive(Debug, Clone)]
pub struct HostStats {
    pub shards: Vec<ShardStats>,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
}
