//! Single-process generation (`llmos-worker generate`): prompt (text, chat
//! messages or token ids) to a stream of token events, with the model's
//! EOS, stop sequences, a token budget and the context limit enforced. It
//! is the serving engine over a one-stage pipeline whose stage is this
//! process's shard host: the path a served request takes.

use std::sync::Arc;
use std::time::Instant;

use llmos_meta::request::{check_generation, check_prompt, RequestError};
use llmos_meta::serving::{DEFAULT_BLOCK_SIZE, DEFAULT_MAX_BATCH_TOKENS};
use llmos_meta::{
    render_chat, ChatMessage, ModelConfig, ModelSpec, OpenedModel, TextStreamer, Tokenizer,
};
use serde::Serialize;

use crate::engine::{
    EngineError, EngineHandle, Finish, LocalStage, Pipeline, SchedulerConfig, SeqEvent, SeqParams,
    Stage, Submission,
};
use crate::model::llama::LoadOptions;
use crate::model::weights::Progress;
use crate::model::{Llama, ModelError, ShardSpec};
use crate::runtime::{HostHandle, RuntimeError, ShardConfig};
use crate::sampling::SamplingParams;

/// Why a single-process generation cannot run.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("model {model} has no tokenizer: pass token ids instead of text")]
    NoTokenizer { model: String },
    #[error("model {model} has no chat template")]
    NoChatTemplate { model: String },
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Meta(#[from] llmos_meta::MetaError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

pub type Result<T, E = GenerateError> = std::result::Result<T, E>;

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

/// A whole model in one process, with its tokenizer: the serving engine
/// over a one-stage pipeline whose stage is this process's shard host.
/// A generation runs the path a served request runs (the scheduler, the
/// host's step, the forward over the paged pool, the fused one-token CPU
/// step, the sampler), one sequence at a time.
pub struct LocalModel {
    pub name: String,
    pub tokenizer: Option<Tokenizer>,
    config: ModelConfig,
    weight_bytes: usize,
    decode_bytes: usize,
    host: HostHandle,
    /// One generation at a time: they share the host's shard and its pool,
    /// and each starts its own engine (whose block allocator starts empty).
    busy: std::sync::Mutex<()>,
    /// Runs the engine (one worker thread of its own, so `generate` works
    /// from any thread, inside another runtime too); shut down on drop.
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for LocalModel {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl LocalModel {
    pub fn load(spec: &ModelSpec, opts: &LoadOptions, progress: Progress<'_>) -> Result<Self> {
        let opened = OpenedModel::open(spec)?;
        let shard = ShardSpec::full(&opened.config);
        let model = Llama::load(
            opened.weights.as_deref(),
            &opened.config,
            shard.clone(),
            opts,
            progress,
        )?;
        let (weight_bytes, decode_bytes) = (model.weight_bytes(), model.decode_bytes());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("llmos-local-engine")
            .enable_time()
            .build()
            .map_err(|e| {
                GenerateError::Runtime(RuntimeError::Invalid(format!(
                    "cannot start a runtime: {e}"
                )))
            })?;
        let host = HostHandle::spawn_with(None, opts.device);
        let config = ShardConfig {
            model: opened.name.clone(),
            source: match spec {
                ModelSpec::Gguf(p) | ModelSpec::HfDir(p) => p.display().to_string(),
                ModelSpec::Synthetic { name, .. } => format!("synthetic:{name}"),
            },
            layers: shard.layers,
            embed: true,
            head: true,
            kind: opts.kind,
            quantization: opts.quantization,
            kv_kind: opts.kv_kind,
            // Grown to each request's length as it comes.
            kv_blocks: 1,
            block_size: DEFAULT_BLOCK_SIZE as usize,
            tensor_parallel: None,
            prev_link: None,
            next_link: None,
        };
        let adopting = host.clone();
        run_on(&rt, async move { adopting.adopt(config, model).await })?;
        Ok(LocalModel {
            name: opened.name,
            tokenizer: opened.tokenizer,
            config: opened.config,
            weight_bytes,
            decode_bytes,
            host,
            busy: std::sync::Mutex::new(()),
            rt: Some(rt),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Bytes of weights the model holds.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Bytes of weights one decoded token reads (the embedding's other
    /// rows are not read).
    pub fn decode_bytes(&self) -> usize {
        self.decode_bytes
    }

    fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| GenerateError::NoTokenizer {
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
                let template =
                    tok.chat_template
                        .as_deref()
                        .ok_or_else(|| GenerateError::NoChatTemplate {
                            model: self.name.clone(),
                        })?;
                let text =
                    render_chat(template, messages, true, &tok.bos_token(), &tok.eos_token())?;
                tok.encode(&text, false)?
            }
        };
        check_prompt(&ids, self.config.vocab_size)?;
        Ok(ids)
    }

    /// Runs one generation. `on_token` sees each token as it is produced and
    /// returns `false` to cancel.
    ///
    /// The sequence is submitted to an engine over this process's shard
    /// host, as a served request is: the prompt prefilled in chunks of the
    /// serving default's step size, then one token a step (the fused CPU
    /// step where it applies), EOS and the token budget enforced by the
    /// engine, stop sequences by the text streamer.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<Completion> {
        req.sampling.validate_for(self.config.vocab_size)?;
        if req.max_new_tokens == 0 {
            return Err(RequestError::NoNewTokens.into());
        }
        let ids = self.prompt_ids(&req.prompt)?;
        check_generation(ids.len(), req.max_new_tokens, self.config.max_position)?;
        // A panic in another caller's `on_token` leaves nothing to repair.
        let _one_at_a_time = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        let mut streamer = TextStreamer::new(
            self.tokenizer.as_ref(),
            req.max_new_tokens,
            req.stop.clone(),
            req.ignore_eos,
        );
        let stop_ids = match (&self.tokenizer, req.ignore_eos) {
            (Some(t), false) => t.eos_token_ids.clone(),
            _ => Vec::new(),
        };
        let mut out_ids = Vec::new();
        let mut text = String::new();
        let mut first_token_at = None;
        let rt = self
            .rt
            .as_ref()
            .expect("the runtime lives as long as the model");
        let bs = DEFAULT_BLOCK_SIZE as usize;
        let want = (ids.len() + req.max_new_tokens).div_ceil(bs) + 1;
        let sub = Submission {
            request_id: "local".into(),
            params: SeqParams {
                prompt: ids.clone(),
                max_new_tokens: req.max_new_tokens,
                stop_ids,
                priority: 0,
                deadline: None,
                first_index: 0,
            },
            sampling: req.sampling.clone(),
            trace: None,
        };
        let (host, name, max_context, vocab_size) = (
            self.host.clone(),
            self.name.clone(),
            self.config.max_position,
            self.config.vocab_size,
        );
        // The engine runs on the model's runtime; its events come back over
        // a channel this thread blocks on.
        let (engine, seq, events) = run_on(rt, async move {
            let blocks = host.reserve_blocks(&name, want).await?;
            let stage: Arc<dyn Stage> = Arc::new(LocalStage { host });
            let cfg = SchedulerConfig {
                max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS as usize,
                max_running: 1,
                max_waiting: 1,
                max_in_flight: 1,
                num_blocks: blocks,
                block_size: bs,
                prefix_caching: false,
                max_context,
                vocab_size,
            };
            let engine = EngineHandle::spawn(name, cfg, Pipeline::new(vec![stage], false))?;
            let (seq, mut events) = engine.submit(sub).await?;
            let (tx, rx) = std::sync::mpsc::channel();
            tokio::spawn(async move {
                while let Some(ev) = events.recv().await {
                    if tx.send(ev).is_err() {
                        break;
                    }
                }
            });
            Ok::<_, GenerateError>((engine, seq, rx))
        })?;
        let finish = loop {
            let (id, logprob) = match events.recv() {
                Ok(Ok(SeqEvent::Token { id, logprob, .. })) => (id, logprob),
                // The engine ended the sequence after the streamer's last
                // token: its reason.
                Ok(Ok(SeqEvent::Finished(f))) => {
                    break match f.reason {
                        Finish::Done(r) => r,
                        _ => FinishReason::Cancelled,
                    }
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(EngineError::Stopped(self.name.clone()).into()),
            };
            first_token_at.get_or_insert_with(Instant::now);
            out_ids.push(id);
            let (piece, finish) = streamer.push(id)?;
            text.push_str(&piece);
            let keep_going = on_token(&TokenEvent {
                id,
                text: piece,
                logprob,
            });
            let finish = match finish {
                Some(f) => Some(f),
                None if !keep_going => Some(FinishReason::Cancelled),
                None => None,
            };
            if let Some(f) = finish {
                // The engine ends at EOS and the token budget itself; a stop
                // sequence or the caller ends it here, and its blocks go
                // back now.
                engine.cancel(seq);
                break f;
            }
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

/// Runs `fut` on `rt` and waits for it on this thread (which may itself be
/// inside another runtime: it only blocks on a channel).
fn run_on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .expect("the model's runtime finishes what it starts")
}
