//! Torch-free model metadata shared by the coordinator, the worker and the CLI.
//!
//! - [`gguf`]: GGUF reader (header, metadata, tensor directory; memory-mapped).
//! - [`quant`]: GGML tensor types and dequantization (F32, F16, BF16, Q8_0, Q4_0, Q4_1).
//! - [`gguf_writer`]: GGUF writer for converted files and test fixtures.
//! - [`config`]: validated [`ModelConfig`] from `config.json`, GGUF metadata or a preset.
//! - [`weights`]: the [`WeightSource`] seam over GGUF and safetensors.
//! - [`tokenizer`]: tokenizers from GGUF or `tokenizer.json`; streaming decode; stop sequences.
//! - [`chat`]: chat-template rendering.
//! - [`source`]: resolving a model name or path and opening it.
//! - [`streamer`]: token ids to streamed text and a finish reason.
//! - [`request`]: the checks every generation request passes (prompt,
//!   vocabulary, context length), stated once.
//! - [`serving`]: the serving options' defaults, stated once.
//! - [`shutdown`]: SIGINT or SIGTERM, the signals every process stops on.
//! - [`failure`]: a failure's kind as it crosses processes (status code +
//!   metadata detail).
//! - [`hash`]: the project's one stable hash (FNV-1a): prefix-cache block
//!   names, default seeds, kernel cache keys.

pub mod chat;
pub mod config;
pub mod error;
pub mod failure;
pub mod gguf;
pub mod gguf_writer;
pub mod hash;
pub mod logging;
pub mod quant;
pub mod request;
pub mod serving;
pub mod shutdown;
pub mod source;
pub mod streamer;
pub mod tokenizer;
pub mod weights;

pub use chat::{render_chat, ChatMessage};
pub use config::{Architecture, ModelConfig, RopeScaling, TpSplit};
pub use error::{MetaError, Result};
pub use source::{ModelSpec, OpenedModel};
pub use streamer::{FinishReason, TextStreamer};
pub use tokenizer::{DecodeStream, StopMatcher, StopOutcome, Tokenizer};
pub use weights::{BlockTensor, HostDType, HostTensor, LayerPart, Slice, WeightKey, WeightSource};
