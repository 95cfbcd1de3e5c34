//! llmos's compute: every kernel the worker runs, on CPU and on CUDA.
//!
//! - [`cpu`]: the CPU kernels (products of a few rows through a weight and
//!   register tiles, decode attention over block tables, vector math,
//!   element-wise ops, the fork-join spin pool they run on). Each is the
//!   one CPU implementation of its op: the worker runs it, and the CUDA
//!   kernel of the same op is tested against it.
//! - [`cuda`]: the CUDA kernels (CUDA C compiled at run time by NVRTC) and
//!   their safe wrappers over libtorch tensors, the device's memory, and
//!   the loader of libtorch's CUDA backend.

pub mod cpu;
pub mod cuda;

pub use cuda::{cuda_available, device_memory, load_torch_cuda};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{op}: {arg} {problem}")]
    Invalid {
        op: &'static str,
        arg: &'static str,
        problem: String,
    },
    #[error("{op}: {arg} is on {found}, the kernels run on {expected}")]
    WrongDevice {
        op: &'static str,
        arg: &'static str,
        found: String,
        expected: String,
    },
    #[error("CUDA is not available: {0}")]
    Unavailable(String),
    #[error("NVRTC could not compile {module} for {arch}: {log}")]
    Compile {
        module: &'static str,
        arch: String,
        log: String,
    },
    #[error("kernel cache {path}: {error}")]
    Cache {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("CUDA driver ({during}): {error}")]
    Driver { during: String, error: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, KernelError>;
