//! The shard host: one OS thread owns the loaded shards and their paged KV
//! pools (libtorch work is blocking); `HostHandle` sends it commands. Steps
//! of all models run here one at a time, in arrival order. It speaks the
//! engine's types ([`step`]); the server converts the wire's.
//!
//! - [`step`]: a shard's configuration, a step, its output, the stats.
//! - [`host`]: loading a shard (tensor-parallel group, pipeline links, KV
//!   fit check) and running a step (fused or batched, sampling).
//! - [`follower`]: a tensor-parallel follower rank's loop and the leader's
//!   step broadcast.
//! - [`links`]: the pipeline links of the hosted shards.
//! - [`device`]: device and dtype selection, device memory.
//! - [`error`]: `RuntimeError` and the failure kind of each error below it.

pub mod device;
pub mod error;
mod follower;
mod host;
mod links;
pub mod step;

use std::sync::Arc;

use tch::{Device, Tensor};
use tokio::sync::oneshot;

use crate::comm::Rendezvous;
use crate::model::Llama;
pub use error::{Result, RuntimeError};
use links::{LinkTable, Links};
pub use step::{
    HostStats, Loaded, SampleAt, Sampled, SeqStep, ShardConfig, ShardStats, Step, StepInput,
    StepOutput, TensorParallel,
};

enum Command {
    Load(
        ShardConfig,
        std::sync::mpsc::Sender<Command>,
        oneshot::Sender<Result<Loaded>>,
    ),
    /// A model loaded in this process, hosted whole (single-process
    /// generation).
    Adopt(ShardConfig, Box<Llama>, oneshot::Sender<Result<Loaded>>),
    /// Grow a shard's KV pool to at least this many blocks; answers with
    /// the pool's block count.
    Reserve(String, usize, oneshot::Sender<Result<usize>>),
    Unload(String, oneshot::Sender<Result<()>>),
    /// A step, with its input when it arrived over the pipeline link.
    Step(Step, Option<Tensor>, oneshot::Sender<Result<StepOutput>>),
    Stats(oneshot::Sender<HostStats>),
    /// A first stage's boundary rows for these KV slots.
    Boundary(String, Vec<i64>, oneshot::Sender<Result<Tensor>>),
}

#[derive(Clone)]
pub struct HostHandle {
    tx: std::sync::mpsc::Sender<Command>,
    links: LinkTable,
}

impl HostHandle {
    /// Starts the host thread; it ends when every handle is dropped. It
    /// cannot hold tensor-parallel shards (no collective listener).
    pub fn spawn() -> Self {
        Self::spawn_with(None, Device::Cpu)
    }

    /// Starts the host thread with the worker's collective listener, which
    /// tensor-parallel groups and pipeline links form over; shards are
    /// loaded on `device`.
    pub fn spawn_with(rendezvous: Option<Arc<Rendezvous>>, device: Device) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let links = LinkTable::default();
        let mut host = host::Host::new(rendezvous, device, links.clone());
        std::thread::Builder::new()
            .name("llmos-shard-host".into())
            .spawn(move || {
                let _no_grad = tch::no_grad_guard();
                while let Ok(cmd) = rx.recv() {
                    host.handle(cmd);
                }
            })
            .expect("spawn the shard host thread");
        HostHandle { tx, links }
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .map_err(|_| RuntimeError::HostStopped)?;
        rx.await.map_err(|_| RuntimeError::HostStopped)
    }

    /// Loads a shard (or keeps it, when asked again for the same one).
    pub async fn load(&self, config: ShardConfig) -> Result<Loaded> {
        let me = self.tx.clone();
        self.call(|tx| Command::Load(config, me, tx)).await?
    }

    /// Hosts a model this process loaded (the whole model, no group or
    /// links), with a KV pool of `config.kv_blocks` blocks.
    pub async fn adopt(&self, config: ShardConfig, model: Llama) -> Result<Loaded> {
        self.call(|tx| Command::Adopt(config, Box::new(model), tx))
            .await?
    }

    /// Grows `model`'s KV pool to at least `blocks` blocks (what it caches
    /// is dropped when it grows); returns the pool's block count.
    pub async fn reserve_blocks(&self, model: &str, blocks: usize) -> Result<usize> {
        self.call(|tx| Command::Reserve(model.to_string(), blocks, tx))
            .await?
    }

    pub async fn unload(&self, model: String) -> Result<()> {
        self.call(|tx| Command::Unload(model, tx)).await?
    }

    /// Runs one step. In a linked pipeline its input first arrives over the
    /// link from the previous stage (received here, off the host thread, so
    /// a stage waiting for its input blocks no other model's steps), and a
    /// step that fails is reported over the link to the next stage, which
    /// then fails it at once.
    pub async fn step(&self, step: Step) -> Result<StepOutput> {
        let links = if step.to_next || matches!(step.input, StepInput::FromPrevious) {
            self.links.get(&step.model)
        } else {
            Links::default()
        };
        let (id, to_next) = (step.id, step.to_next);
        let r = self.linked_step(step, &links).await;
        if let (Err(e), true, Some(next)) = (&r, to_next, &links.next) {
            if let Err(e2) = next.send_failed(id) {
                tracing::warn!(error = %e, link_error = %e2, "cannot report a failed step to the next stage");
            }
        }
        r
    }

    async fn linked_step(&self, step: Step, links: &Links) -> Result<StepOutput> {
        // A link missing here is being (re)formed: the step is retried
        // later.
        if step.to_next && links.next.is_none() {
            return Err(RuntimeError::LinkMissing(format!(
                "model {:?} has no pipeline link to its next stage on this worker (not formed)",
                step.model
            )));
        }
        let input = match (&step.input, &links.prev) {
            (StepInput::FromPrevious, None) => {
                return Err(RuntimeError::LinkMissing(format!(
                    "model {:?} has no pipeline link from its previous stage on this worker (not formed)",
                    step.model
                )))
            }
            (StepInput::FromPrevious, Some(prev)) => {
                let rows = step.tokens() as i64;
                let (prev, id, cols) = (prev.clone(), step.id, links.hidden);
                let t = tokio::task::spawn_blocking(move || {
                    let _no_grad = tch::no_grad_guard();
                    prev.recv(id, rows, cols)
                })
                .await
                .map_err(|e| RuntimeError::LinkMissing(format!("the link receiver died: {e}")))??;
                Some(t)
            }
            _ => None,
        };
        self.call(|tx| Command::Step(step, input, tx)).await?
    }

    /// The hidden states `model`'s first stage sent on for these KV slots,
    /// `[slots, hidden]`: the input a replaced later stage recomputes its
    /// cache from.
    pub async fn boundary(&self, model: &str, slots: Vec<i64>) -> Result<Tensor> {
        self.call(|tx| Command::Boundary(model.to_string(), slots, tx))
            .await?
    }

    pub async fn stats(&self) -> Result<HostStats> {
        self.call(Command::Stats).await
    }
}

#[cfg(test)]
mod tests;
