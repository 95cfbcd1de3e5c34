//! How a failure's kind crosses a process boundary: a gRPC status code plus
//! this machine-readable detail in the status metadata (never a substring
//! of the message). A worker sets it on every status it answers with, so a
//! caller tells "the worker answered: this failed" (the key is present)
//! from "the worker could not be reached" (a transport error, no key).

/// Metadata key of the failure kind.
pub const FAILURE_KEY: &str = "llmos-failure";
/// Metadata key of the worker a failure is about, where it names one (a
/// pipeline stage behind the worker that answered).
pub const FAILED_WORKER_KEY: &str = "llmos-failed-worker";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The request itself is wrong (a field, a limit).
    InvalidRequest,
    /// The model (or its file) is not there.
    NotFound,
    /// A stage of the model's pipeline (or a tensor-parallel rank) could
    /// not be reached or stopped answering; `FAILED_WORKER_KEY` names it.
    StageUnavailable,
    /// The engine's queue is full (`retry-after-ms` says when to retry).
    QueueFull,
    /// The request's deadline passed.
    DeadlineExceeded,
    /// The worker holds the model under another placement epoch than the
    /// command or request carries (it was away while the model moved, or
    /// the command is older than what it holds).
    StaleEpoch,
    /// Anything else inside the worker.
    Internal,
}

impl FailureKind {
    pub const ALL: [FailureKind; 7] = [
        FailureKind::InvalidRequest,
        FailureKind::NotFound,
        FailureKind::StageUnavailable,
        FailureKind::QueueFull,
        FailureKind::DeadlineExceeded,
        FailureKind::StaleEpoch,
        FailureKind::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::InvalidRequest => "invalid-request",
            FailureKind::NotFound => "not-found",
            FailureKind::StageUnavailable => "stage-unavailable",
            FailureKind::QueueFull => "queue-full",
            FailureKind::DeadlineExceeded => "deadline-exceeded",
            FailureKind::StaleEpoch => "stale-epoch",
            FailureKind::Internal => "internal",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips() {
        for k in FailureKind::ALL {
            assert_eq!(FailureKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(FailureKind::parse("is unavailable"), None);
    }
}
