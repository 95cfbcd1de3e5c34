//! The CUDA kernels.
//!
//! Each kernel is CUDA C under `kernels/cuda/` compiled at run time with
//! NVRTC (so one binary serves every GPU architecture and builds on machines
//! without CUDA), with a safe wrapper over libtorch tensors. Each is tested
//! against the CPU kernel of the same op in [`crate::cpu`] (the fast one the
//! worker runs, not a second slow copy).
//!
//! - [`compile`]: NVRTC compilation with the PTX cached on disk by source
//!   hash, compiler options, NVRTC version and GPU architecture. Works
//!   without a GPU.
//! - [`check`]: the wrappers' argument checks (dtype, shape, strides,
//!   device), one error naming the kernel, the argument and the numbers.
//! - [`runtime`]: [`Kernels`], a CUDA device's loaded modules; launches on
//!   libtorch's stream (the device's default stream, the only one the worker
//!   uses), so kernels and libtorch ops are ordered without synchronising.
//! - The kernels: [`rms_norm`] (RMSNorm and fused residual-add + RMSNorm),
//!   [`rotary`] (rotary embedding in place on q and k), [`activation`]
//!   (SiLU-and-multiply), [`paged_attention`] (decode attention over the
//!   engine's block tables, GQA), [`sampling`] (greedy / temperature /
//!   top-k / top-p on the device), [`int8`] (weight-only int8 products with
//!   per-channel scales, and the quantizer).
//!
//! A wrapper validates its arguments into a [`Launch`] (pure, testable
//! without a GPU); [`Kernels::launch`] then checks the tensors' device and
//! runs it.

pub mod activation;
pub mod check;
pub mod compile;
pub mod int8;
pub mod paged_attention;
pub mod rms_norm;
pub mod rotary;
pub mod runtime;
pub mod sampling;

#[cfg(test)]
mod gpu_tests;

pub use runtime::{cuda_available, device_memory, load_torch_cuda, Arg, Kernels, Launch};

/// The kernel sources, compiled one module each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    RmsNorm,
    Rotary,
    Activation,
    PagedAttention,
    Sampling,
    Int8Linear,
}

impl Module {
    pub const ALL: [Module; 6] = [
        Module::RmsNorm,
        Module::Rotary,
        Module::Activation,
        Module::PagedAttention,
        Module::Sampling,
        Module::Int8Linear,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Module::RmsNorm => "rms_norm",
            Module::Rotary => "rotary",
            Module::Activation => "activation",
            Module::PagedAttention => "paged_attention",
            Module::Sampling => "sampling",
            Module::Int8Linear => "int8_linear",
        }
    }

    /// The full source NVRTC compiles: the shared prelude, then the kernel.
    pub fn source(self) -> String {
        let body = match self {
            Module::RmsNorm => include_str!("../../cuda/rms_norm.cu"),
            Module::Rotary => include_str!("../../cuda/rotary.cu"),
            Module::Activation => include_str!("../../cuda/activation.cu"),
            Module::PagedAttention => include_str!("../../cuda/paged_attention.cu"),
            Module::Sampling => include_str!("../../cuda/sampling.cu"),
            Module::Int8Linear => include_str!("../../cuda/int8_linear.cu"),
        };
        format!("{}\n{body}", include_str!("../../cuda/common.cuh"))
    }
}
