//! The worker library's error type.

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Meta(#[from] llmos_meta::MetaError),
    #[error(transparent)]
    Request(#[from] llmos_meta::request::RequestError),
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
    #[error("the shard host has stopped")]
    HostStopped,
    #[error("transport: {0}")]
    Transport(String),
    #[error("the queue of model {model} is full ({waiting} waiting, limit {limit}); retry after {retry_after_ms} ms")]
    QueueFull {
        model: String,
        waiting: usize,
        limit: usize,
        retry_after_ms: u64,
    },
    #[error("request {request_id} did not finish within its timeout of {after:?} ({generated} tokens generated)")]
    DeadlineExceeded {
        request_id: String,
        after: std::time::Duration,
        generated: usize,
    },
    #[error("worker {worker} at {address} is unavailable: {reason}")]
    StageUnavailable {
        worker: String,
        address: String,
        reason: String,
    },
    #[error("worker {worker}: {}", status.message())]
    StageFailed {
        worker: String,
        status: tonic::Status,
    },
    #[error("{0}")]
    StepFailed(String),
    /// A tensor-parallel peer failed, closed its link or did not answer in
    /// time.
    #[error("collective: {0}")]
    Collective(String),
    /// A status already decided (shared by the sequences of a failed step).
    #[error("{}", .0.message())]
    Status(tonic::Status),
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
