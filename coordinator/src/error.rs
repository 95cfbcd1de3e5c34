//! The coordinator's error type and its one mapping to gRPC status codes.

use tonic::Status;

use crate::consensus::RaftError;
use crate::placement::PlanError;
use crate::state::StateError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("model {0:?} is not deployed")]
    UnknownModel(String),
    #[error("model {model:?} is not ready: {state}")]
    ModelNotReady { model: String, state: String },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{what}: {limit_name} is {limit}, got {got}")]
    Limit {
        what: String,
        limit_name: &'static str,
        limit: usize,
        got: usize,
    },
    #[error(transparent)]
    Request(#[from] llmos_meta::request::RequestError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Meta(#[from] llmos_meta::MetaError),
    #[error("worker {worker} ({address}) is unavailable: {reason}")]
    WorkerUnavailable {
        worker: String,
        address: String,
        reason: String,
    },
    #[error("worker {worker} failed: {status}")]
    WorkerFailed { worker: String, status: Status },
    #[error("control plane: {0}")]
    Store(#[from] StoreError),
    #[error("model {model:?} failed: {reason} (undeploy it, fix the cause, deploy again)")]
    DeployFailed { model: String, reason: String },
    #[error("request {request_id} lost its replica after {tokens} tokens and was not resumed: {why}; failures: [{}]", attempts.join("; "))]
    NotResumed {
        request_id: String,
        tokens: usize,
        why: String,
        attempts: Vec<String>,
    },
    #[error("model {model:?} is not ready after {waited:?} ({state}: {reason}); it stays deployed and keeps converging (undeploy to cancel)")]
    NotReadyInTime {
        model: String,
        waited: std::time::Duration,
        state: String,
        reason: String,
    },
}

impl From<CoordError> for Status {
    fn from(e: CoordError) -> Status {
        let msg = e.to_string();
        match e {
            CoordError::UnknownModel(_) | CoordError::State(StateError::UnknownModel(_)) => {
                Status::not_found(msg)
            }
            CoordError::State(StateError::UnknownWorker(_) | StateError::UnknownKey(_)) => {
                Status::not_found(msg)
            }
            CoordError::Meta(llmos_meta::MetaError::ModelNotFound { .. }) => Status::not_found(msg),
            CoordError::Request(llmos_meta::request::RequestError::ContextExceeded { .. }) => {
                // A reason the HTTP API names with OpenAI's code.
                let mut s = Status::invalid_argument(msg);
                s.metadata_mut().insert(
                    crate::http::REQUEST_ERROR_KEY,
                    tonic::metadata::MetadataValue::from_static(
                        crate::http::CONTEXT_LENGTH_EXCEEDED,
                    ),
                );
                s
            }
            CoordError::Request(ref r) => {
                // The field at fault, for the HTTP API's `param`.
                let mut s = Status::invalid_argument(msg);
                if let Some(f) = r.field() {
                    s.metadata_mut().insert(
                        crate::http::REQUEST_FIELD_KEY,
                        tonic::metadata::MetadataValue::from_static(f),
                    );
                }
                s
            }
            CoordError::Invalid(_)
            | CoordError::Limit { .. }
            | CoordError::Plan(PlanError::Invalid(_)) => Status::invalid_argument(msg),
            CoordError::Meta(_) => Status::invalid_argument(msg),
            CoordError::Plan(PlanError::Insufficient { .. } | PlanError::TooFewWorkers { .. })
            | CoordError::DeployFailed { .. } => Status::failed_precondition(msg),
            CoordError::NotReadyInTime { .. } => Status::deadline_exceeded(msg),
            // The first stage's worker holds the model under another
            // placement: it is moving; retrying is right.
            CoordError::WorkerFailed { ref status, .. }
                if status
                    .metadata()
                    .get(llmos_meta::failure::FAILURE_KEY)
                    .is_some_and(|v| {
                        v.as_bytes()
                            == llmos_meta::failure::FailureKind::StaleEpoch
                                .as_str()
                                .as_bytes()
                    }) =>
            {
                Status::unavailable(msg)
            }
            CoordError::State(StateError::ModelExists(_)) => Status::already_exists(msg),
            CoordError::State(_) => Status::failed_precondition(msg),
            CoordError::ModelNotReady { .. } => Status::unavailable(msg),
            // Answered (the failure kind says so): a client does not resume
            // it on another coordinator.
            CoordError::NotResumed { .. } => {
                use llmos_meta::failure::{FailureKind, FAILURE_KEY};
                let mut s = Status::unavailable(msg);
                s.metadata_mut().insert(
                    FAILURE_KEY,
                    tonic::metadata::MetadataValue::from_static(
                        FailureKind::StageUnavailable.as_str(),
                    ),
                );
                s
            }
            CoordError::WorkerUnavailable { worker, .. } => {
                use llmos_meta::failure::{FailureKind, FAILED_WORKER_KEY, FAILURE_KEY};
                let mut s = Status::unavailable(msg);
                s.metadata_mut().insert(
                    FAILURE_KEY,
                    tonic::metadata::MetadataValue::from_static(
                        FailureKind::StageUnavailable.as_str(),
                    ),
                );
                if let Ok(v) = worker.parse() {
                    s.metadata_mut().insert(FAILED_WORKER_KEY, v);
                }
                s
            }
            CoordError::Store(StoreError::Raft(RaftError::Membership(_)))
            | CoordError::Store(StoreError::Unsupported(_)) => Status::failed_precondition(msg),
            CoordError::Store(_) => Status::unavailable(msg),
            CoordError::WorkerFailed { status, worker } => {
                let mut s = Status::new(
                    status.code(),
                    format!("worker {worker}: {}", status.message()),
                );
                // The engine's retry hint (a full queue) and the failure's
                // kind (and failed worker) reach the client.
                for key in [
                    "retry-after-ms",
                    llmos_meta::failure::FAILURE_KEY,
                    llmos_meta::failure::FAILED_WORKER_KEY,
                ] {
                    if let Some(v) = status.metadata().get(key) {
                        s.metadata_mut().insert(key, v.clone());
                    }
                }
                s
            }
        }
    }
}

pub type Result<T, E = CoordError> = std::result::Result<T, E>;
