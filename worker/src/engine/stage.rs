//! How the engine reaches a pipeline stage: the `Stage` seam. `LocalStage`
//! is this worker's own shard host; `RemoteStage` is another worker's `Step`
//! stream over gRPC (NCCL send/recv between GPU stages joins with the
//! tensor-parallel work). A stage runs one step at a time in arrival order,
//! so steps of different micro-batches overlap across stages.

use std::time::Duration;

use llmos_proto::worker::v1 as pb;
use pb::worker_client::WorkerClient;
use tokio::sync::{mpsc, Mutex};
use tonic::Streaming;

use crate::error::{Result, WorkerError};
use crate::server::HostHandle;

#[tonic::async_trait]
pub trait Stage: Send + Sync {
    /// The worker, for messages.
    fn worker(&self) -> &str;
    /// Runs one step; a stage that does not answer in time is unavailable.
    async fn step(&self, req: pb::StepRequest) -> Result<pb::StepResponse>;
}

/// This worker's own shard.
pub struct LocalStage {
    pub host: HostHandle,
}

#[tonic::async_trait]
impl Stage for LocalStage {
    fn worker(&self) -> &str {
        "this worker"
    }

    async fn step(&self, req: pb::StepRequest) -> Result<pb::StepResponse> {
        self.host.step(req).await
    }
}

type Link = (mpsc::Sender<pb::StepRequest>, Streaming<pb::StepResponse>);

/// Another worker's shard, over one `Step` stream (reopened after a fault).
pub struct RemoteStage {
    worker: String,
    address: String,
    timeout: Duration,
    link: Mutex<Option<Link>>,
}

impl RemoteStage {
    pub fn new(worker: String, address: String, timeout: Duration) -> Self {
        RemoteStage {
            worker,
            address,
            timeout,
            link: Mutex::new(None),
        }
    }

    fn unavailable(&self, reason: impl Into<String>) -> WorkerError {
        WorkerError::StageUnavailable {
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
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| self.unavailable(format!("cannot connect: {e}")))?;
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

#[tonic::async_trait]
impl Stage for RemoteStage {
    fn worker(&self) -> &str {
        &self.worker
    }

    async fn step(&self, req: pb::StepRequest) -> Result<pb::StepResponse> {
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
                Ok(Ok(Some(r))) => Ok(r),
                Ok(Ok(None)) => Err(self.unavailable("its stream ended")),
                Ok(Err(s))
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ) =>
                {
                    Err(self.unavailable(s.message().to_string()))
                }
                Ok(Err(status)) => Err(WorkerError::StageFailed {
                    worker: self.worker.clone(),
                    status,
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

/// The step's sequences as a stage runs them that neither samples nor
/// returns logits (a pipeline stage before the last, a tensor-parallel
/// follower rank).
pub(crate) fn layout_only(seqs: &[pb::StepSequence]) -> Vec<pb::StepSequence> {
    seqs.iter()
        .map(|s| pb::StepSequence {
            sample: None,
            want_logits: false,
            ..s.clone()
        })
        .collect()
}

/// Runs a step through every stage in order: token ids into the first,
/// hidden states onward; the last stage's answer is the step's.
pub async fn run_pipeline(
    stages: &[std::sync::Arc<dyn Stage>],
    req: pb::StepRequest,
) -> Result<pb::StepResponse> {
    let n = stages.len();
    let mut input = req.input;
    // Only the last stage samples or returns logits.
    let middle = layout_only(&req.sequences);
    for (i, stage) in stages.iter().enumerate() {
        let step = pb::StepRequest {
            model: req.model.clone(),
            sequences: if i + 1 == n {
                req.sequences.clone()
            } else {
                middle.clone()
            },
            input: input.take(),
        };
        let resp = stage.step(step).await?;
        if i + 1 == n {
            return Ok(resp);
        }
        let hidden = resp.hidden.ok_or_else(|| WorkerError::StageFailed {
            worker: stage.worker().to_string(),
            status: tonic::Status::internal("a middle stage answered without hidden states"),
        })?;
        input = Some(pb::step_request::Input::Hidden(hidden));
    }
    Err(WorkerError::InvalidRequest(
        "a pipeline without stages".into(),
    ))
}
