//! How the engine reaches a pipeline stage: the `Stage` seam. `LocalStage`
//! is this worker's own shard host; `RemoteStage` is another worker's `Step`
//! stream over gRPC. A stage runs one step at a time in arrival order, so
//! steps of different micro-batches overlap across stages.
//!
//! [`Pipeline`] moves a step through the stages in one of two ways:
//! relayed (the engine sends token ids to the first stage, takes its hidden
//! states back and sends them to the next, as TGI's router drives its
//! shards), or linked (every stage gets the step at once and hidden states
//! go stage to stage over pipeline links, NCCL or TCP; only the last
//! stage's sampled tokens come back).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llmos_proto::worker::v1 as pb;
use pb::worker_client::WorkerClient;
use tokio::sync::{mpsc, watch, Mutex};
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

/// A model's stages, first to last, and how steps move through them.
pub struct Pipeline {
    stages: Vec<Arc<dyn Stage>>,
    linked: bool,
    next_step: AtomicU64,
    /// Linked: the step each stage takes next. Steps reach every stage in
    /// ticket order, the order in which the stages' links pair them up.
    turns: Vec<watch::Sender<u64>>,
}

/// Passes a stage's turn to the next step when its step is done (or
/// abandoned).
struct Turn<'a>(&'a watch::Sender<u64>);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|t| *t += 1);
    }
}

impl Pipeline {
    /// `linked`: the stages were loaded with pipeline links between them.
    pub fn new(stages: Vec<Arc<dyn Stage>>, linked: bool) -> Self {
        // Step ids start at the clock in microseconds, so a restarted
        // engine's steps come after its predecessor's on links that outlive
        // it (what is left of older steps on a link is drained).
        let first = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let turns = stages.iter().map(|_| watch::channel(first).0).collect();
        Pipeline {
            stages,
            linked,
            next_step: AtomicU64::new(first),
            turns,
        }
    }

    pub fn len(&self) -> usize {
        self.stages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    pub fn is_linked(&self) -> bool {
        self.linked && self.stages.len() > 1
    }

    /// Numbers the next step. Call it in the order the steps are issued
    /// (before any of them runs): linked stages take steps in this order.
    pub fn ticket(&self) -> u64 {
        self.next_step.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs step `ticket` through the stages; the last stage's answer is
    /// the step's.
    pub async fn run(&self, ticket: u64, req: pb::StepRequest) -> Result<pb::StepResponse> {
        if !self.is_linked() {
            return run_relayed(&self.stages, req).await;
        }
        let n = self.stages.len();
        let middle = layout_only(&req.sequences);
        let calls = self.stages.iter().enumerate().map(|(i, stage)| {
            let input = if i == 0 {
                req.input.clone()
            } else {
                Some(pb::step_request::Input::FromPrevious(
                    pb::FromPreviousStage {},
                ))
            };
            let step = pb::StepRequest {
                step_id: ticket,
                to_next: i + 1 < n,
                ..stage_request(&req, i, n, &middle, input)
            };
            let turn = &self.turns[i];
            async move {
                let mut rx = turn.subscribe();
                // Err only when the sender is gone, which `self` prevents.
                let _ = rx.wait_for(|t| *t == ticket).await;
                let _turn = Turn(turn);
                stage.step(step).await
            }
        });
        let mut results = futures_util::future::join_all(calls).await;
        // The earliest stage's failure is the cause (later stages fail the
        // step because it sent them nothing).
        if let Some(i) = results.iter().position(|r| r.is_err()) {
            return results.swap_remove(i);
        }
        results.pop().expect("a pipeline has stages")
    }
}

/// Stage `i` of `n`'s part of `req`: only the last stage samples or
/// returns logits (the others get `middle`, the layout alone).
fn stage_request(
    req: &pb::StepRequest,
    i: usize,
    n: usize,
    middle: &[pb::StepSequence],
    input: Option<pb::step_request::Input>,
) -> pb::StepRequest {
    pb::StepRequest {
        model: req.model.clone(),
        sequences: if i + 1 == n {
            req.sequences.clone()
        } else {
            middle.to_vec()
        },
        input,
        ..Default::default()
    }
}

/// Runs a step through every stage in order: token ids into the first,
/// hidden states onward; the last stage's answer is the step's.
async fn run_relayed(
    stages: &[Arc<dyn Stage>],
    mut req: pb::StepRequest,
) -> Result<pb::StepResponse> {
    let n = stages.len();
    let mut input = req.input.take();
    // Only the last stage samples or returns logits.
    let middle = layout_only(&req.sequences);
    for (i, stage) in stages.iter().enumerate() {
        let step = stage_request(&req, i, n, &middle, input.take());
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
