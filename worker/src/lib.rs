//! llmos worker: runs a Llama-family model, or a pipeline shard of it, on
//! libtorch (CPU, or CUDA where libtorch sees a GPU). Every kernel it runs
//! beyond libtorch's (CPU products, attention, element-wise ops, sampling,
//! the pool they run on; the CUDA kernels) lives in `llmos_kernels`.
//!
//! Layers, top to bottom; each imports only the layers below it:
//!
//! - [`server`]: gRPC (`llmos.worker.v1.Worker`), the remote stage, the
//!   wire codec, registration, the one error-to-status mapping. The only
//!   layer that sees protobuf or tonic.
//! - [`engine`]: the serving engine of a model (scheduler, block manager,
//!   the `Stage` seam and the pipeline), over the runtime's step types.
//! - [`runtime`]: the shard host (load, step, tensor-parallel follower,
//!   device memory probe) and its types (`ShardConfig`, `Step`,
//!   `StepOutput`).
//! - [`model`], [`kv`], [`comm`]: architectures over the paged KV pool,
//!   the pool and a step's layout, collectives and pipeline links.
//! - [`sampling`]: greedy and seeded temperature/top-k/top-p sampling.
//!
//! [`generate`] (single-process generation, `llmos-worker generate`) sits
//! beside the server and runs the same forward over the same pool.
//! Each layer has its own error (`CommError`, `KvError`, `ModelError`,
//! `RuntimeError`, `EngineError`), classified by a failure kind that the
//! server turns into a status code.

pub mod comm;
pub mod engine;
pub mod generate;
pub mod kv;
pub mod metrics;
pub mod model;
pub mod runtime;
pub mod sampling;
pub mod server;

pub use generate::{
    Completion, FinishReason, GenerateError, GenerateRequest, LocalModel, PromptInput, TokenEvent,
};
pub use model::linear::Quantization;
pub use model::llama::LoadOptions;
pub use model::LocalSequence;
pub use sampling::SamplingParams;
