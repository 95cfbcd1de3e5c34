//! How the engine reaches a pipeline stage: the `Stage` seam. `LocalStage`
//! is this worker's own shard host; another worker's stage is the server's
//! `RemoteStage` (its `Step` stream over gRPC). A stage runs one step at a time in arrival order, so
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

use tch::Tensor;
use tokio::sync::watch;

use super::error::{EngineError, Result};
use crate::kv::slot;
use crate::runtime::{HostHandle, SeqStep, Step, StepInput, StepOutput};

#[async_trait::async_trait]
pub trait Stage: Send + Sync {
    /// The worker, for messages.
    fn worker(&self) -> &str;
    /// Runs one step; a stage that does not answer in time is unavailable.
    async fn step(&self, step: Step) -> Result<StepOutput>;
    /// A first stage's boundary rows: the hidden states it sent on for
    /// these KV slots (only the engine's own stage keeps and serves them).
    async fn boundary(&self, model: &str, _slots: Vec<i64>) -> Result<Tensor> {
        Err(EngineError::Invalid(format!(
            "the stage on {} serves no boundary rows of model {model:?}",
            self.worker()
        )))
    }
}

/// This worker's own shard.
pub struct LocalStage {
    pub host: HostHandle,
}

#[async_trait::async_trait]
impl Stage for LocalStage {
    fn worker(&self) -> &str {
        "this worker"
    }

    async fn step(&self, step: Step) -> Result<StepOutput> {
        Ok(self.host.step(step).await?)
    }

    async fn boundary(&self, model: &str, slots: Vec<i64>) -> Result<Tensor> {
        Ok(self.host.boundary(model, slots).await?)
    }
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
    pub async fn run(&self, ticket: u64, step: Step) -> Result<StepOutput> {
        if !self.is_linked() {
            return run_relayed(&self.stages, step).await;
        }
        let n = self.stages.len();
        let middle = step.layout_only();
        let calls = self.stages.iter().enumerate().map(|(i, stage)| {
            let input = if i == 0 {
                step.input.clone()
            } else {
                StepInput::FromPrevious
            };
            let step = Step {
                id: ticket,
                to_next: i + 1 < n,
                ..stage_step(&step, i, n, &middle, input)
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

impl Pipeline {
    /// Recomputes the later stages' KV cache for positions the first stage
    /// holds but they lost (a later stage was replaced): each of `seqs`
    /// (`position`.. `position + tokens`, its block table) is fed the
    /// first stage's boundary rows for those positions, relayed through
    /// stages `1..` with nothing sampled. The first stage does no work.
    /// Run it with no other step in flight: it uses no pipeline link and
    /// takes no turn.
    pub async fn repair(&self, model: &str, seqs: Vec<SeqStep>, block_size: usize) -> Result<()> {
        if self.stages.len() < 2 || seqs.is_empty() {
            return Ok(());
        }
        let slots: Vec<i64> = seqs
            .iter()
            .flat_map(|s| {
                (s.position..s.position + s.tokens).map(|p| slot(&s.blocks, block_size, p) as i64)
            })
            .collect();
        let hidden = self.stages[0].boundary(model, slots).await?;
        let step = Step {
            model: model.to_string(),
            id: 0,
            seqs: seqs.iter().map(SeqStep::layout_only).collect(),
            input: StepInput::Hidden(hidden),
            to_next: false,
        };
        run_relayed(&self.stages[1..], step).await.map(|_| ())
    }
}

/// Stage `i` of `n`'s part of `step`: only the last stage samples or
/// returns logits (the others get `middle`, the layout alone).
fn stage_step(step: &Step, i: usize, n: usize, middle: &[SeqStep], input: StepInput) -> Step {
    Step {
        model: step.model.clone(),
        id: 0,
        seqs: if i + 1 == n {
            step.seqs.clone()
        } else {
            middle.to_vec()
        },
        input,
        to_next: false,
    }
}

/// Runs a step through every stage in order: token ids into the first,
/// hidden states onward; the last stage's answer is the step's.
async fn run_relayed(stages: &[Arc<dyn Stage>], step: Step) -> Result<StepOutput> {
    let n = stages.len();
    let mut input = Some(step.input.clone());
    // Only the last stage samples or returns logits.
    let middle = step.layout_only();
    for (i, stage) in stages.iter().enumerate() {
        let part = stage_step(&step, i, n, &middle, input.take().expect("an input"));
        let out = stage.step(part).await?;
        if i + 1 == n {
            return Ok(out);
        }
        let hidden = out.hidden.ok_or_else(|| EngineError::StageFailed {
            worker: stage.worker().to_string(),
            kind: llmos_meta::failure::FailureKind::Internal,
            message: "a middle stage answered without hidden states".into(),
        })?;
        input = Some(StepInput::Hidden(hidden));
    }
    Err(EngineError::Invalid("a pipeline without stages".into()))
}
