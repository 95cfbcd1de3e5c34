//! Model architectures on libtorch. One file per architecture family.

pub mod arena;
pub mod batch;
pub mod cpu_decode;
pub mod linear;
pub mod llama;
pub mod parallel;
pub mod sequence;
pub mod weights;

pub use llama::{Llama, ShardSpec};
pub use sequence::LocalSequence;

/// A model that cannot be loaded or run as asked.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model, shard or step does not fit what was asked (a shape, a
    /// part this shard does not hold, a tensor-parallel split).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Meta(#[from] llmos_meta::MetaError),
    #[error(transparent)]
    Kv(#[from] crate::kv::KvError),
    #[error(transparent)]
    Comm(#[from] crate::comm::CommError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
#[cfg(test)]
mod tp_tests;
