//! Model architectures on libtorch. One file per architecture family.

pub mod linear;
pub mod llama;

pub use llama::{Llama, ShardSpec};
