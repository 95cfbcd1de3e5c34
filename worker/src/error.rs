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
    #[error("model {0:?} is not loaded on this worker")]
    UnknownModel(String),
    #[error("sequence {sequence:?} has {cached} cached positions, the request says {requested}")]
    PositionMismatch {
        sequence: String,
        cached: usize,
        requested: usize,
    },
    #[error("the shard host has stopped")]
    HostStopped,
    #[error("transport: {0}")]
    Transport(String),
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
