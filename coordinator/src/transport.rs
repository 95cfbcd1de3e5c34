//! How activations reach a pipeline stage: the `StageTransport` seam. Today
//! one implementation, a gRPC Forward stream carrying raw little-endian
//! tensors (`GrpcStage`); NCCL send/recv between GPU stages joins with the
//! tensor-parallel work. `run_step` drives one step through all stages and
//! turns every failure into an error naming the stage's worker.

use std::time::Duration;

use llmos_proto::worker::v1 as wk;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::error::{CoordError, Result};

/// Why a stage did not answer.
#[derive(Debug)]
pub enum StageFault {
    /// No answer, a closed stream, or a transport error: the stage is gone.
    Unavailable(String),
    /// The stage answered with an error status.
    Failed(Status),
}

#[tonic::async_trait]
pub trait StageTransport: Send {
    /// The worker id, for messages.
    fn worker(&self) -> &str;
    /// The worker address, for messages.
    fn address(&self) -> &str;
    /// Sends one step's request and waits at most `timeout` for the answer.
    async fn exchange(
        &mut self,
        req: wk::ForwardRequest,
        timeout: Duration,
    ) -> Result<Option<wk::forward_response::Output>, StageFault>;
}

/// A stage reached over a gRPC `Forward` stream.
pub struct GrpcStage {
    pub worker: String,
    pub address: String,
    pub tx: mpsc::Sender<wk::ForwardRequest>,
    pub rx: Streaming<wk::ForwardResponse>,
}

#[tonic::async_trait]
impl StageTransport for GrpcStage {
    fn worker(&self) -> &str {
        &self.worker
    }

    fn address(&self) -> &str {
        &self.address
    }

    async fn exchange(
        &mut self,
        req: wk::ForwardRequest,
        timeout: Duration,
    ) -> Result<Option<wk::forward_response::Output>, StageFault> {
        self.tx
            .send(req)
            .await
            .map_err(|_| StageFault::Unavailable("its stream closed".into()))?;
        match tokio::time::timeout(timeout, self.rx.message()).await {
            Err(_) => Err(StageFault::Unavailable(format!(
                "no answer within {timeout:?}"
            ))),
            Ok(Ok(Some(r))) => Ok(r.output),
            Ok(Ok(None)) => Err(StageFault::Unavailable("its stream ended".into())),
            Ok(Err(s))
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) =>
            {
                Err(StageFault::Unavailable(s.message().to_string()))
            }
            Ok(Err(s)) => Err(StageFault::Failed(s)),
        }
    }
}

/// Runs `ids` at position `pos` through every stage in order: token ids to
/// the first, hidden states onward, sampling parameters to the last, which
/// answers with the sampled token.
pub async fn run_step(
    stages: &mut [Box<dyn StageTransport>],
    model: &str,
    seq: &str,
    ids: &[u32],
    pos: u32,
    sampling: wk::Sampling,
    timeout: Duration,
) -> Result<wk::SampledToken> {
    let mut data = Vec::with_capacity(ids.len() * 8);
    ids.iter()
        .for_each(|&i| data.extend((i as i64).to_le_bytes()));
    let mut input = wk::forward_request::Input::Tokens(wk::Tensor {
        dtype: wk::DType::I64 as i32,
        shape: vec![1, ids.len() as i64],
        data,
    });
    let n = stages.len();
    for (i, stage) in stages.iter_mut().enumerate() {
        let last = i + 1 == n;
        let req = wk::ForwardRequest {
            model: model.to_string(),
            sequence_id: seq.to_string(),
            position: pos,
            input: Some(input),
            want_logits: false,
            sample: last.then_some(sampling),
        };
        let out = stage.exchange(req, timeout).await.map_err(|f| match f {
            StageFault::Unavailable(reason) => CoordError::WorkerUnavailable {
                worker: stage.worker().to_string(),
                address: stage.address().to_string(),
                reason,
            },
            StageFault::Failed(status) => CoordError::WorkerFailed {
                worker: stage.worker().to_string(),
                status,
            },
        })?;
        input = match out {
            Some(wk::forward_response::Output::Hidden(h)) if !last => {
                wk::forward_request::Input::Hidden(h)
            }
            Some(wk::forward_response::Output::Token(t)) if last => return Ok(t),
            other => {
                return Err(CoordError::WorkerFailed {
                    worker: stage.worker().to_string(),
                    status: Status::internal(format!("unexpected output {other:?}")),
                })
            }
        };
    }
    Err(CoordError::Invalid("a deployment without stages".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wk::forward_response::Output;

    /// A stage that replays scripted answers and records what it received.
    struct Scripted {
        name: String,
        answers: Vec<Result<Option<Output>, &'static str>>,
        seen: Vec<wk::ForwardRequest>,
    }

    #[tonic::async_trait]
    impl StageTransport for Scripted {
        fn worker(&self) -> &str {
            &self.name
        }
        fn address(&self) -> &str {
            "scripted"
        }
        async fn exchange(
            &mut self,
            req: wk::ForwardRequest,
            timeout: Duration,
        ) -> Result<Option<Output>, StageFault> {
            self.seen.push(req);
            match self.answers.remove(0) {
                Ok(o) => Ok(o),
                Err("hang") => {
                    tokio::time::sleep(timeout * 2).await;
                    Err(StageFault::Unavailable(format!(
                        "no answer within {timeout:?}"
                    )))
                }
                Err(msg) => Err(StageFault::Failed(Status::invalid_argument(msg))),
            }
        }
    }

    fn hidden() -> Option<Output> {
        Some(Output::Hidden(wk::Tensor {
            dtype: wk::DType::F32 as i32,
            shape: vec![1, 1, 2],
            data: vec![0; 8],
        }))
    }

    fn stage(
        name: &str,
        answers: Vec<Result<Option<Output>, &'static str>>,
    ) -> Box<dyn StageTransport> {
        Box::new(Scripted {
            name: name.into(),
            answers,
            seen: Vec::new(),
        })
    }

    #[tokio::test]
    async fn a_step_passes_hidden_states_on_and_the_last_stage_samples() {
        let token = Some(Output::Token(wk::SampledToken {
            id: 7,
            logprob: -0.5,
        }));
        let mut stages = vec![stage("a", vec![Ok(hidden())]), stage("b", vec![Ok(token)])];
        let t = run_step(
            &mut stages,
            "m",
            "s",
            &[1, 2],
            0,
            wk::Sampling::default(),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(t.id, 7);
    }

    #[tokio::test(start_paused = true)]
    async fn faults_name_the_stage() {
        let sampling = wk::Sampling::default();
        let d = Duration::from_secs(5);
        // A silent stage: UNAVAILABLE naming it.
        let mut stages = vec![
            stage("a", vec![Ok(hidden())]),
            stage("b", vec![Err("hang")]),
        ];
        let e = run_step(&mut stages, "m", "s", &[1], 0, sampling, d)
            .await
            .unwrap_err();
        let s = Status::from(e);
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(
            s.message().contains("worker b") && s.message().contains("5s"),
            "{s}"
        );
        // A stage that rejects the request keeps its code.
        let mut stages = vec![stage("a", vec![Err("bad position")])];
        let s = Status::from(
            run_step(&mut stages, "m", "s", &[1], 0, sampling, d)
                .await
                .unwrap_err(),
        );
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(
            s.message().contains("worker a") && s.message().contains("bad position"),
            "{s}"
        );
        // A middle stage answering with a token instead of hidden states.
        let token = Some(Output::Token(wk::SampledToken {
            id: 1,
            logprob: 0.0,
        }));
        let mut stages = vec![stage("a", vec![Ok(token)]), stage("b", vec![])];
        let s = Status::from(
            run_step(&mut stages, "m", "s", &[1], 0, sampling, d)
                .await
                .unwrap_err(),
        );
        assert_eq!(s.code(), tonic::Code::Internal);
    }
}
