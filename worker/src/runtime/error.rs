//! The shard host's error, and the failure kind of every error below it
//! (what a caller in another process classifies it by).

use llmos_meta::failure::FailureKind;
use llmos_meta::request::RequestError;
use llmos_meta::MetaError;

use crate::comm::CommError;
use crate::kv::KvError;
use crate::model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("model {0:?} is not loaded on this worker")]
    UnknownModel(String),
    #[error("the shard host has stopped")]
    HostStopped,
    /// The shard or the step cannot be served as asked.
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {limit_name} is {limit}, got {got}")]
    LimitExceeded {
        what: String,
        limit_name: &'static str,
        limit: usize,
        got: usize,
    },
    /// A pipeline link the step needs is not formed (yet): the step can be
    /// retried once it is.
    #[error("{0}")]
    LinkMissing(String),
    #[error("device {0:?} is not available: {1}")]
    DeviceUnavailable(String, String),
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

impl RuntimeError {
    pub fn kind(&self) -> FailureKind {
        match self {
            RuntimeError::UnknownModel(_) => FailureKind::NotFound,
            RuntimeError::HostStopped
            | RuntimeError::LinkMissing(_)
            | RuntimeError::DeviceUnavailable(..) => FailureKind::StageUnavailable,
            RuntimeError::Invalid(_)
            | RuntimeError::LimitExceeded { .. }
            | RuntimeError::Request(_) => FailureKind::InvalidRequest,
            RuntimeError::Meta(e) => e.failure_kind(),
            RuntimeError::Model(e) => model_kind(e),
            RuntimeError::Kv(e) => kv_kind(e),
            RuntimeError::Comm(e) => comm_kind(e),
            RuntimeError::Torch(_) => FailureKind::Internal,
        }
    }
}

fn model_kind(e: &ModelError) -> FailureKind {
    match e {
        ModelError::Invalid(_) => FailureKind::InvalidRequest,
        ModelError::Meta(e) => e.failure_kind(),
        ModelError::Kv(e) => kv_kind(e),
        ModelError::Comm(e) => comm_kind(e),
        ModelError::Torch(_) => FailureKind::Internal,
    }
}

fn kv_kind(e: &KvError) -> FailureKind {
    match e {
        KvError::Layout(_) | KvError::Request(_) => FailureKind::InvalidRequest,
        KvError::Torch(_) => FailureKind::Internal,
    }
}

/// A peer that failed or went silent makes the stage unavailable.
fn comm_kind(e: &CommError) -> FailureKind {
    match e {
        CommError::Failed(_) | CommError::PeerStepFailed(_) | CommError::DeviceUnavailable(..) => {
            FailureKind::StageUnavailable
        }
        CommError::Invalid(_) => FailureKind::InvalidRequest,
        CommError::Torch(_) => FailureKind::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layer_classifies_its_failures() {
        let cases: Vec<(RuntimeError, FailureKind)> = vec![
            (
                RuntimeError::UnknownModel("m".into()),
                FailureKind::NotFound,
            ),
            (
                MetaError::ModelNotFound {
                    spec: "x".into(),
                    reason: "y".into(),
                }
                .into(),
                FailureKind::NotFound,
            ),
            (
                ModelError::Comm(CommError::Failed("rank 1 went away".into())).into(),
                FailureKind::StageUnavailable,
            ),
            (
                KvError::Layout("block 9 is outside the pool".into()).into(),
                FailureKind::InvalidRequest,
            ),
            (
                RequestError::EmptyPrompt.into(),
                FailureKind::InvalidRequest,
            ),
            (
                RuntimeError::LinkMissing("not formed".into()),
                FailureKind::StageUnavailable,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.kind(), want, "{e}");
        }
    }
}
