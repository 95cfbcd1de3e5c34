//! Another worker's pipeline stage: the engine's `Stage` over that
//! worker's `Step` stream (one stream, reopened after a fault). Steps go
//! out in wire form and answers come back checked (`codec`).

use std::time::Duration;

use llmos_meta::failure::{FailureKind, FAILURE_KEY};
use llmos_proto::worker::v1 as pb;
use pb::worker_client::WorkerClient;
use tokio::sync::{mpsc, Mutex};
use tonic::Streaming;

use super::codec;
use crate::engine::{EngineError, Result, Stage};
use crate::runtime::{Step, StepOutput};

type Link = (mpsc::Sender<pb::StepRequest>, Streaming<pb::StepResponse>);

/// Another worker's shard, over one `Step` stream (reopened after a fault).
pub struct RemoteStage {
    worker: String,
    address: String,
    timeout: Duration,
    /// Mutual TLS to that worker (None: plaintext).
    tls: Option<std::sync::Arc<llmos_tls::Tls>>,
    link: Mutex<Option<Link>>,
}

impl RemoteStage {
    pub fn new(
        worker: String,
        address: String,
        timeout: Duration,
        tls: Option<std::sync::Arc<llmos_tls::Tls>>,
    ) -> Self {
        RemoteStage {
            tls,
            worker,
            address,
            timeout,
            link: Mutex::new(None),
        }
    }

    fn unavailable(&self, reason: impl Into<String>) -> EngineError {
        EngineError::StageUnavailable {
            worker: self.worker.clone(),
            address: self.address.clone(),
            reason: reason.into(),
        }
    }

    async fn open(&self) -> Result<Link> {
        let url = if self.address.contains("://") {
            self.address.clone()
        } else {
            format!("http://{}", self.address)
        };
        let endpoint = tonic::transport::Endpoint::from_shared(url)
            .map_err(|e| self.unavailable(e.to_string()))?
            .connect_timeout(self.timeout)
            .tcp_nodelay(true);
        let channel = llmos_tls::client::connect(
            endpoint,
            self.tls.as_ref(),
            llmos_tls::Role::Worker,
            self.timeout,
        )
        .await
        .map_err(|e| self.unavailable(format!("cannot connect: {}", llmos_tls::error_chain(&e))))?;
        let mut client = WorkerClient::new(channel)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20);
        let (tx, rx) = mpsc::channel(4);
        let resp = tokio::time::timeout(
            self.timeout,
            client.step(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| self.unavailable(format!("no answer to Step within {:?}", self.timeout)))?
        .map_err(|s| self.unavailable(s.message().to_string()))?;
        Ok((tx, resp.into_inner()))
    }
}

#[async_trait::async_trait]
impl Stage for RemoteStage {
    fn worker(&self) -> &str {
        &self.worker
    }

    async fn step(&self, step: Step) -> Result<StepOutput> {
        let req = codec::step_to_wire(&step);
        let mut guard = self.link.lock().await;
        if guard.is_none() {
            *guard = Some(self.open().await?);
        }
        let (tx, rx) = guard.as_mut().expect("opened above");
        let answer = async {
            tx.send(req)
                .await
                .map_err(|_| self.unavailable("its stream closed"))?;
            match tokio::time::timeout(self.timeout, rx.message()).await {
                Err(_) => Err(self.unavailable(format!("no answer within {:?}", self.timeout))),
                Ok(Ok(Some(r))) => codec::output(&r).map_err(|e| EngineError::StageFailed {
                    worker: self.worker.clone(),
                    kind: FailureKind::Internal,
                    message: format!("its answer does not decode: {e}"),
                }),
                Ok(Ok(None)) => Err(self.unavailable("its stream ended")),
                Ok(Err(s))
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ) =>
                {
                    Err(self.unavailable(s.message().to_string()))
                }
                // The stage answered: its failure kind is in the metadata
                // (or, from a status without it, such as tonic's own, read
                // from the code).
                Ok(Err(status)) => Err(EngineError::StageFailed {
                    worker: self.worker.clone(),
                    kind: status
                        .metadata()
                        .get(FAILURE_KEY)
                        .and_then(|v| v.to_str().ok())
                        .and_then(FailureKind::parse)
                        .unwrap_or_else(|| kind_of_code(status.code())),
                    message: status.message().to_string(),
                }),
            }
        }
        .await;
        if answer.is_err() {
            // The stream ends with the first error: open a new one next time.
            *guard = None;
        }
        answer
    }
}

/// The kind of a status that carries none: the code's, where one kind has
/// that code (`status::code` is its inverse there), else internal.
fn kind_of_code(code: tonic::Code) -> FailureKind {
    FailureKind::ALL
        .into_iter()
        .find(|&k| super::status::code(k) == code)
        .unwrap_or(FailureKind::Internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_without_a_kind_keeps_its_code() {
        for code in [
            tonic::Code::InvalidArgument,
            tonic::Code::NotFound,
            tonic::Code::DeadlineExceeded,
            tonic::Code::ResourceExhausted,
        ] {
            assert_eq!(super::super::status::code(kind_of_code(code)), code);
        }
        assert_eq!(
            kind_of_code(tonic::Code::Unimplemented),
            FailureKind::Internal
        );
    }
}
