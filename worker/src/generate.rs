//! Single-process generation: prompt (text, chat messages or token ids) to a
//! stream of token events, with the model's EOS, stop sequences, a token
//! budget and the context limit enforced.

use std::time::Instant;

use llmos_meta::request::{check_generation, check_prompt, RequestError};
use llmos_meta::serving::{DEFAULT_BLOCK_SIZE, DEFAULT_MAX_BATCH_TOKENS};
use llmos_meta::{render_chat, ChatMessage, ModelSpec, OpenedModel, TextStreamer, Tokenizer};
use serde::Serialize;
use tch::Tensor;

use crate::error::{Result, WorkerError};
use crate::model::cpu_decode::PagedSeq;
use crate::model::llama::LoadOptions;
use crate::model::{Llama, ShardSpec};
use crate::paged::{BatchLayout, KvPool, SeqSlice};
use crate::sampling::{Sampler, SamplingParams};
use crate::weights::Progress;

#[derive(Debug, Clone)]
pub enum PromptInput {
    /// Raw text, encoded with the model's BOS where it wants one.
    Text(String),
    /// Messages rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: PromptInput,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    /// Keep going past EOS (benchmarks).
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenEvent {
    pub id: u32,
    /// Text this token adds (may be empty while a multi-byte character or a
    /// possible stop sequence is incomplete).
    pub text: String,
    pub logprob: f32,
}

pub use llmos_meta::FinishReason;

#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub text: String,
    pub token_ids: Vec<u32>,
    /// Prompt forward plus the first token.
    pub time_to_first_token_s: f64,
    /// Everything after the first token.
    pub decode_s: f64,
}

impl Completion {
    /// Decode speed after the first token.
    pub fn decode_tokens_per_s(&self) -> f64 {
        let n = self.usage.completion_tokens.saturating_sub(1);
        if self.decode_s > 0.0 {
            n as f64 / self.decode_s
        } else {
            0.0
        }
    }
}

/// Lowers libtorch's intra-op threads to one for decode steps and restores
/// the previous count when dropped.
struct DecodeThreads {
    prefill: i32,
}

impl DecodeThreads {
    fn new() -> Self {
        DecodeThreads {
            prefill: tch::get_num_threads(),
        }
    }

    fn decode_phase(&self) {
        self.set(1);
    }

    /// A prompt of `rows` tokens: one libtorch thread when every product
    /// runs on the `gemv` kernel's pool (libtorch's OpenMP workers would
    /// spin against it: a 256-token f32 SmolLM2 prompt took 0.77-0.80 s with
    /// two, 0.69-0.72 s with one), else the caller's count.
    fn prompt_phase(&self, model: &Llama, rows: usize) {
        self.set(if model.projections_on_pool(rows as i64) {
            1
        } else {
            self.prefill
        });
    }

    fn set(&self, n: i32) {
        if tch::get_num_threads() != n {
            tch::set_num_threads(n);
        }
    }
}

impl Drop for DecodeThreads {
    fn drop(&mut self) {
        tch::set_num_threads(self.prefill);
    }
}

/// One sequence on a model in this process: a paged KV pool holding just
/// its blocks (block table `0..n`), driven through the forward the server
/// runs.
pub struct LocalSequence {
    pool: KvPool,
    blocks: Vec<u32>,
    /// Positions cached so far.
    position: usize,
    /// libtorch's thread count per phase, restored when the sequence ends.
    threads: DecodeThreads,
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
            threads: DecodeThreads::new(),
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

    /// The prompt's forward: logits of its last position.
    pub fn prefill(&mut self, model: &Llama, ids: &[u32]) -> Result<Vec<f32>> {
        self.threads
            .prompt_phase(model, ids.len().min(DEFAULT_MAX_BATCH_TOKENS as usize));
        let logits = self.forward(model, ids, false);
        // After the prompt, steps are one token: libtorch's small ops run
        // on one thread (the decode kernels use their own pool) so its
        // OpenMP workers do not spin against them.
        self.threads.decode_phase();
        Ok(Vec::try_from(logits?.view([-1]))?)
    }

    /// One token: the fused CPU step over this sequence's blocks where it
    /// applies, else the batched forward with one row. Float32 logits.
    pub fn decode(&mut self, model: &Llama, token: u32) -> Result<Vec<f32>> {
        if model.fused_decode_supported() {
            self.threads.decode_phase();
            let mut seq = PagedSeq {
                pool: &mut self.pool,
                blocks: &self.blocks,
                position: self.position,
            };
            let logits = model.decode_step(token, &mut seq)?;
            self.position += 1;
            return Ok(logits);
        }
        self.threads.prompt_phase(model, 1);
        Ok(Vec::try_from(
            self.forward(model, &[token], false)?.view([-1]),
        )?)
    }
}

/// A whole model in one process, with its tokenizer.
pub struct LocalModel {
    pub name: String,
    pub model: Llama,
    pub tokenizer: Option<Tokenizer>,
}

impl LocalModel {
    pub fn load(spec: &ModelSpec, opts: &LoadOptions, progress: Progress<'_>) -> Result<Self> {
        let opened = OpenedModel::open(spec)?;
        let shard = ShardSpec::full(&opened.config);
        let model = Llama::load(
            opened.weights.as_deref(),
            &opened.config,
            shard,
            opts,
            progress,
        )?;
        Ok(LocalModel {
            name: opened.name,
            model,
            tokenizer: opened.tokenizer,
        })
    }

    fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| WorkerError::NoTokenizer {
                model: self.name.clone(),
            })
    }

    /// Token ids of a prompt, checked against the vocabulary.
    pub fn prompt_ids(&self, prompt: &PromptInput) -> Result<Vec<u32>> {
        let ids = match prompt {
            PromptInput::Tokens(ids) => ids.clone(),
            PromptInput::Text(text) => self.tokenizer()?.encode(text, true)?,
            PromptInput::Chat(messages) => {
                let tok = self.tokenizer()?;
                let template = tok.chat_template.as_deref().ok_or_else(|| {
                    WorkerError::InvalidRequest(format!("model {} has no chat template", self.name))
                })?;
                let text =
                    render_chat(template, messages, true, &tok.bos_token(), &tok.eos_token())?;
                tok.encode(&text, false)?
            }
        };
        check_prompt(&ids, self.model.config().vocab_size)?;
        Ok(ids)
    }

    /// Runs one generation. `on_token` sees each token as it is produced and
    /// returns `false` to cancel.
    ///
    /// The sequence runs through the same forward the server runs: a paged
    /// KV pool holding just this sequence's blocks, the prompt prefilled in
    /// chunks of the serving default's step size, then one token a step
    /// (the fused CPU step over the same blocks where it applies).
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<Completion> {
        req.sampling.validate()?;
        if req.max_new_tokens == 0 {
            return Err(RequestError::NoNewTokens.into());
        }
        let ids = self.prompt_ids(&req.prompt)?;
        check_generation(
            ids.len(),
            req.max_new_tokens,
            self.model.config().max_position,
        )?;
        let _guard = tch::no_grad_guard();
        let started = Instant::now();
        let mut seq = LocalSequence::new(&self.model, ids.len() + req.max_new_tokens)?;
        let mut sampler = Sampler::new(req.sampling.clone());
        let mut streamer = TextStreamer::new(
            self.tokenizer.as_ref(),
            req.max_new_tokens,
            req.stop.clone(),
            req.ignore_eos,
        );
        let mut out_ids = Vec::new();
        let mut text = String::new();
        let mut first_token_at = None;
        let mut logits = seq.prefill(&self.model, &ids)?;
        let finish = loop {
            let (id, logprob) = sampler.sample(&logits);
            first_token_at.get_or_insert_with(Instant::now);
            out_ids.push(id);
            let (piece, finish) = streamer.push(id)?;
            text.push_str(&piece);
            let keep_going = on_token(&TokenEvent {
                id,
                text: piece,
                logprob,
            });
            if let Some(f) = finish {
                break f;
            }
            if !keep_going {
                break FinishReason::Cancelled;
            }
            logits = seq.decode(&self.model, id)?;
        };
        let first = first_token_at.expect("at least one token");
        Ok(Completion {
            finish_reason: finish,
            usage: Usage {
                prompt_tokens: ids.len(),
                completion_tokens: out_ids.len(),
                total_tokens: ids.len() + out_ids.len(),
            },
            text,
            token_ids: out_ids,
            time_to_first_token_s: (first - started).as_secs_f64(),
            decode_s: first.elapsed().as_secs_f64(),
        })
    }
}
