//! Model architectures on libtorch. One file per architecture family.

pub mod arena;
pub mod batch;
pub mod cpu_decode;
pub mod linear;
pub mod llama;

pub use llama::{Llama, ShardSpec};
#[cfg(test)]
mod tp_tests;
