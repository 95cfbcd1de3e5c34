//! The one error type of this crate. Every variant names the file, and the
//! tensor or key where there is one, so a user can act on the message.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (magic {found:?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: [u8; 4] },
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: file is truncated or corrupt: {what} needs bytes {start}..{end} but the file has {len}")]
    Truncated {
        path: PathBuf,
        what: String,
        start: u64,
        end: u64,
        len: u64,
    },
    #[error("{path}: corrupt header: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: tensor {tensor:?} has type {ty}, which llmos does not support (supported: {supported})")]
    UnsupportedTensorType {
        path: PathBuf,
        tensor: String,
        ty: String,
        supported: &'static str,
    },
    #[error("{path}: unsupported architecture {arch:?} (supported: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        arch: String,
        supported: &'static str,
    },
    #[error("{path}: missing tensor {tensor:?}")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor {tensor:?} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: metadata {key:?}: {reason}")]
    Metadata {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{path}: invalid config: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("chat template: {reason}")]
    ChatTemplate { reason: String },
    #[error("model {spec:?} not found: {reason}")]
    ModelNotFound { spec: String, reason: String },
}

impl MetaError {
    /// How a caller should see this failure: a model or file that is not
    /// there, else a request that names something unusable.
    pub fn failure_kind(&self) -> crate::failure::FailureKind {
        use crate::failure::FailureKind;
        match self {
            MetaError::ModelNotFound { .. } => FailureKind::NotFound,
            MetaError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                FailureKind::NotFound
            }
            _ => FailureKind::InvalidRequest,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        MetaError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = MetaError> = std::result::Result<T, E>;
