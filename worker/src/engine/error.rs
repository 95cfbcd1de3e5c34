//! The engine's error: refusals at admission, how a sequence ends other
//! than by finishing, and the failure of a stage.

use std::sync::Arc;
use std::time::Duration;

use llmos_meta::failure::FailureKind;
use llmos_meta::request::RequestError;

use crate::runtime::RuntimeError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
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
        after: Duration,
        generated: usize,
    },
    #[error("{what}: {limit_name} is {limit}, got {got}")]
    LimitExceeded {
        what: String,
        limit_name: &'static str,
        limit: usize,
        got: usize,
    },
    /// A configuration or an answer that cannot be used.
    #[error("{0}")]
    Invalid(String),
    #[error("the engine of model {0} stopped")]
    Stopped(String),
    /// A stage could not be reached or stopped answering.
    #[error("worker {worker} at {address} is unavailable: {reason}")]
    StageUnavailable {
        worker: String,
        address: String,
        reason: String,
    },
    /// A stage answered: this failed there, as `kind`.
    #[error("worker {worker}: {message}")]
    StageFailed {
        worker: String,
        kind: FailureKind,
        message: String,
    },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Request(#[from] RequestError),
    /// A step's failure, shared by every sequence of the step.
    #[error(transparent)]
    Step(Arc<EngineError>),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    pub fn kind(&self) -> FailureKind {
        match self {
            EngineError::QueueFull { .. } => FailureKind::QueueFull,
            EngineError::DeadlineExceeded { .. } => FailureKind::DeadlineExceeded,
            EngineError::LimitExceeded { .. }
            | EngineError::Invalid(_)
            | EngineError::Request(_) => FailureKind::InvalidRequest,
            EngineError::Stopped(_) | EngineError::StageUnavailable { .. } => {
                FailureKind::StageUnavailable
            }
            EngineError::StageFailed { kind, .. } => *kind,
            EngineError::Runtime(e) => e.kind(),
            EngineError::Step(e) => e.kind(),
        }
    }

    /// The worker the failure is about, where it names one (a stage behind
    /// this worker).
    pub fn failed_worker(&self) -> Option<&str> {
        match self {
            EngineError::StageUnavailable { worker, .. }
            | EngineError::StageFailed { worker, .. } => Some(worker),
            EngineError::Step(e) => e.failed_worker(),
            _ => None,
        }
    }

    /// When a refused request may be retried.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            EngineError::QueueFull { retry_after_ms, .. } => Some(*retry_after_ms),
            EngineError::Step(e) => e.retry_after_ms(),
            _ => None,
        }
    }
}
