//! llmos worker: runs a Llama-family model, or a pipeline shard of it, on
//! libtorch (CPU, or CUDA where libtorch sees a GPU). Every kernel it runs
//! beyond libtorch's (CPU products, attention, element-wise ops, the pool
//! they run on; the CUDA kernels) lives in `llmos_kernels`.
//!
//! - [`collective`]: tensor-parallel groups (TCP mesh, NCCL, solo).
//! - [`model`]: architectures (`Llama`), loadable by layer range (`ShardSpec`).
//! - [`weights`]: host tensors from a `WeightSource` (or seeded random) to libtorch.
//! - [`paged`]: the paged KV pool and the layout of a batched step.
//! - [`sampling`]: greedy and seeded temperature/top-k/top-p sampling.
//! - [`generate`]: the single-process generation loop (`LocalModel`, `LocalSequence`).
//! - [`engine`]: the serving engine (scheduler, block manager, stages).
//! - [`device`]: device and dtype selection, CUDA backend loading.
//! - [`server`]: the gRPC shard server (`llmos.worker.v1.Worker`) and its
//!   shard host (one thread owning shards and KV caches).

pub mod collective;
pub mod device;
pub mod engine;
pub mod error;
pub mod generate;
pub mod model;
pub mod paged;
pub mod sampling;
pub mod server;
pub mod weights;

pub use error::{Result, WorkerError};
pub use generate::{
    Completion, FinishReason, GenerateRequest, LocalModel, LocalSequence, PromptInput, TokenEvent,
};
pub use model::linear::Quantization;
pub use model::llama::LoadOptions;
pub use sampling::SamplingParams;
