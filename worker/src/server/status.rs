//! The one mapping of the worker's errors to gRPC. Every layer classifies
//! its own errors (`kind()`); here the kind becomes the status code, and
//! travels with the failed worker (where one is named) and the retry hint
//! in the metadata for callers to classify by (`llmos_meta::failure`).

use llmos_meta::failure::{FailureKind, FAILED_WORKER_KEY, FAILURE_KEY};
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use super::codec::WireError;
use crate::engine::EngineError;
use crate::runtime::RuntimeError;

pub fn code(kind: FailureKind) -> Code {
    match kind {
        FailureKind::InvalidRequest => Code::InvalidArgument,
        FailureKind::NotFound => Code::NotFound,
        FailureKind::StageUnavailable => Code::Unavailable,
        FailureKind::QueueFull => Code::ResourceExhausted,
        FailureKind::DeadlineExceeded => Code::DeadlineExceeded,
        FailureKind::StaleEpoch => Code::FailedPrecondition,
        FailureKind::Internal => Code::Internal,
    }
}

fn status(
    kind: FailureKind,
    message: String,
    failed_worker: Option<&str>,
    retry_after_ms: Option<u64>,
) -> Status {
    let mut s = Status::new(code(kind), message);
    let md = s.metadata_mut();
    md.insert(FAILURE_KEY, MetadataValue::from_static(kind.as_str()));
    if let Some(w) = failed_worker.and_then(|w| w.parse().ok()) {
        md.insert(FAILED_WORKER_KEY, w);
    }
    if let Some(ms) = retry_after_ms.and_then(|ms| ms.to_string().parse().ok()) {
        md.insert("retry-after-ms", ms);
    }
    s
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        status(
            e.kind(),
            e.to_string(),
            e.failed_worker(),
            e.retry_after_ms(),
        )
    }
}

impl From<RuntimeError> for Status {
    fn from(e: RuntimeError) -> Status {
        status(e.kind(), e.to_string(), None, None)
    }
}

impl From<WireError> for Status {
    fn from(e: WireError) -> Status {
        status(FailureKind::InvalidRequest, e.to_string(), None, None)
    }
}

/// A request the server itself refuses (a missing field).
pub fn invalid(message: impl Into<String>) -> Status {
    status(FailureKind::InvalidRequest, message.into(), None, None)
}

/// The model is held here under another placement epoch.
pub fn stale_epoch(message: impl Into<String>) -> Status {
    status(FailureKind::StaleEpoch, message.into(), None, None)
}

/// No such model here.
pub fn not_found(message: impl Into<String>) -> Status {
    status(FailureKind::NotFound, message.into(), None, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_become_codes_and_metadata() {
        let full = Status::from(EngineError::QueueFull {
            model: "m".into(),
            waiting: 2,
            limit: 2,
            retry_after_ms: 120,
        });
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert_eq!(full.metadata().get("retry-after-ms").unwrap(), "120");
        assert_eq!(full.metadata().get(FAILURE_KEY).unwrap(), "queue-full");
        // A stage's failure, shared by a step's sequences, names the stage.
        let shared = std::sync::Arc::new(EngineError::StageUnavailable {
            worker: "w2".into(),
            address: "127.0.0.1:9".into(),
            reason: "its stream ended".into(),
        });
        let s = Status::from(EngineError::Step(shared));
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.metadata().get(FAILED_WORKER_KEY).unwrap(), "w2");
        assert_eq!(s.metadata().get(FAILURE_KEY).unwrap(), "stage-unavailable");
        let s = Status::from(RuntimeError::UnknownModel("m".into()));
        assert_eq!(s.code(), Code::NotFound);
        // Every kind has its own code.
        let codes: std::collections::HashSet<_> =
            FailureKind::ALL.iter().map(|&k| code(k) as i32).collect();
        assert_eq!(codes.len(), FailureKind::ALL.len());
    }
}
