//! The worker library's error type.

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Meta(#[from] llmos_meta::MetaError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("{what}: {limit_name} is {limit}, got {got}")]
    LimitExceeded {
        what: String,
        limit_name: &'static str,
        limit: usize,
        got: usize,
    },
    #[error("model {model} has no tokenizer: pass token ids instead of text")]
    NoTokenizer { model: String },
    #[error("device {0:?} is not available: {1}")]
    DeviceUnavailable(String, String),
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
