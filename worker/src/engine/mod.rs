//! The serving engine of one deployed model, on the worker that holds its
//! first stage: an actor (one task) owning the [`Scheduler`] and driving
//! batched steps through the pipeline's [`Stage`]s.
//!
//! - [`blocks`]: KV block allocator with prefix caching (content hash, LRU).
//! - [`scheduler`]: iteration-level batching, chunked prefill, priorities,
//!   preemption by recompute, deadlines, the bounded queue.
//! - [`stage`]: the `Stage` seam (this worker's host; the server's remote
//!   stage is another worker's) and `Pipeline` (relayed or linked steps).
//! - [`error`]: the engine's error type, `EngineError`.
//!
//! It speaks the runtime's types (`Step`, `StepOutput`); protobuf stays in
//! the server.
//!
//! With `p` stages up to `p` steps are in flight (each with its own
//! sequences), so while stage 2 runs one micro-batch, stage 1 runs the next.
//! Sequences' tokens stream back as each step completes; a client that goes
//! away cancels its sequence, which frees its blocks.

pub mod blocks;
pub mod error;
pub mod scheduler;
pub mod stage;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmos_meta::request::SamplingParams;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::runtime::{SampleAt, SeqStep, Step, StepInput, StepOutput};
pub use error::{EngineError, Result};
use scheduler::Scheduler;
pub use scheduler::{
    Finish, Finished, Refusal, Repair, SchedulerConfig, SchedulerStats, SeqEvent, SeqParams,
    StepPlan,
};
pub use stage::{LocalStage, Pipeline, Stage};

/// What one request asks of the engine.
#[derive(Debug, Clone)]
pub struct Submission {
    pub request_id: String,
    pub params: SeqParams,
    pub sampling: SamplingParams,
    /// The W3C traceparent of the sequence's span (its steps' spans on
    /// every stage are children of it, or link to it).
    pub trace: Option<String>,
}

/// Events of one sequence: tokens, then `Finished`, or an error.
pub type Events = mpsc::UnboundedReceiver<Result<SeqEvent>>;

enum Cmd {
    Submit {
        id: u64,
        sub: Box<Submission>,
        events: mpsc::UnboundedSender<Result<SeqEvent>>,
        accepted: oneshot::Sender<Result<()>>,
    },
    Cancel(u64),
    Stats(oneshot::Sender<EngineStats>),
    /// The later stages were replaced (see `EngineHandle::repipe`).
    Repipe(Pipeline),
}

#[derive(Debug, Clone, Copy, Default)]
pub struct EngineStats {
    pub scheduler: SchedulerStats,
    pub generated_tokens: u64,
    /// Positions the later stages recomputed from the first stage's
    /// boundary rows after they were replaced.
    pub repaired_tokens: u64,
}

/// A handle to a running engine; the engine stops when the last is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    model: Arc<str>,
    tx: mpsc::UnboundedSender<Cmd>,
    next_id: Arc<AtomicU64>,
}

impl EngineHandle {
    /// Starts an engine for `model` over `stages` (first to last).
    pub fn spawn(model: String, cfg: SchedulerConfig, stages: Pipeline) -> Result<Self> {
        cfg.validate().map_err(EngineError::Invalid)?;
        if stages.is_empty() {
            return Err(EngineError::Invalid("an engine needs a stage".into()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let name: Arc<str> = model.as_str().into();
        let engine = Engine {
            model,
            sched: Scheduler::new(cfg),
            stages: Arc::new(stages),
            clients: HashMap::new(),
            generated: 0,
            repaired: 0,
            recent_ms: 1000.0,
            held: None,
            exclusive: false,
            pending: None,
        };
        tokio::spawn(engine.run(rx));
        Ok(EngineHandle {
            model: name,
            tx,
            next_id: Arc::new(AtomicU64::new(1)),
        })
    }

    /// Queues a sequence; its events arrive on the returned receiver. A full
    /// queue or a prompt that can never fit is refused here.
    pub async fn submit(&self, sub: Submission) -> Result<(u64, Events)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = mpsc::unbounded_channel();
        let (accepted, ok) = oneshot::channel();
        self.tx
            .send(Cmd::Submit {
                id,
                sub: Box::new(sub),
                events,
                accepted,
            })
            .map_err(|_| self.stopped())?;
        ok.await.map_err(|_| self.stopped())??;
        Ok((id, rx))
    }

    /// Ends a sequence (its client went away); its blocks are freed.
    pub fn cancel(&self, id: u64) {
        let _ = self.tx.send(Cmd::Cancel(id));
    }

    /// The stages after this worker's were replaced (a lost stage loaded on
    /// another worker) while this worker kept its shard, its KV cache and
    /// its boundary rows: the engine goes on over `stages`. Its running
    /// sequences end as failed (their clients resume them, see
    /// `coordinator::inference`); what it has cached stays, and a sequence
    /// that reuses it (a resumed one: its prompt is the old prompt plus
    /// the tokens it had streamed) has only the later stages recompute
    /// those positions, from the boundary rows, not the whole model.
    pub fn repipe(&self, stages: Pipeline) -> Result<()> {
        self.tx
            .send(Cmd::Repipe(stages))
            .map_err(|_| self.stopped())
    }

    pub async fn stats(&self) -> Result<EngineStats> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Cmd::Stats(tx)).map_err(|_| self.stopped())?;
        rx.await.map_err(|_| self.stopped())
    }

    fn stopped(&self) -> EngineError {
        EngineError::Stopped(self.model.to_string())
    }
}

struct Client {
    events: mpsc::UnboundedSender<Result<SeqEvent>>,
    sampling: SamplingParams,
    request_id: String,
    trace: Option<String>,
    started: Instant,
    /// When its first step was planned.
    scheduled: Option<Instant>,
    /// Whether its queue time went out (with its first token).
    told_queue: bool,
    timeout: Option<Duration>,
}

struct Engine {
    model: String,
    sched: Scheduler,
    stages: Arc<Pipeline>,
    clients: HashMap<u64, Client>,
    generated: u64,
    repaired: u64,
    /// Moving average of request durations (ms): the retry hint of a full queue.
    recent_ms: f64,
    /// A plan that needs repairs, waiting for the steps in flight to end
    /// (repairs run alone).
    held: Option<(StepPlan, Vec<Repair>)>,
    /// A plan with repairs is in flight: nothing else is issued.
    exclusive: bool,
    /// Repairs to run as soon as the steps in flight end, before anything
    /// is scheduled (the cached blocks of the sequences a replacement
    /// ended, which their resumed requests will reuse).
    pending: Option<Vec<Repair>>,
}

/// How long the repairs that follow a replacement retry while the new
/// stage is still loading (its shard not there yet, its server not up).
const REPAIR_WAIT: Duration = Duration::from_secs(10);

type StepResult = (StepPlan, Vec<Repair>, Result<StepOutput>);

impl Engine {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        let mut in_flight: JoinSet<StepResult> = JoinSet::new();
        loop {
            for (id, f) in self.sched.expire(Instant::now()) {
                self.finished(id, f);
            }
            if in_flight.is_empty() && !self.exclusive {
                if let Some(repairs) = self.pending.take() {
                    self.exclusive = true;
                    let repairer = self.repairer();
                    in_flight.spawn(async move {
                        let until = Instant::now() + REPAIR_WAIT;
                        let r = loop {
                            match repairer.run(&repairs).await {
                                Ok(()) => break Ok(StepOutput::default()),
                                Err(_) if Instant::now() < until => {
                                    tokio::time::sleep(Duration::from_millis(50)).await
                                }
                                Err(e) => break Err(e),
                            }
                        };
                        (StepPlan::default(), repairs, r)
                    });
                }
            }
            while in_flight.len() < self.sched.config().max_in_flight
                && !self.exclusive
                && self.pending.is_none()
            {
                let (plan, repairs) = match self.held.take() {
                    Some(held) => held,
                    None => {
                        let Some(plan) = self.sched.schedule() else {
                            break;
                        };
                        let repairs = self.sched.repairs(&plan);
                        (plan, repairs)
                    }
                };
                if !repairs.is_empty() {
                    // Repairs use no link and take no turn: they run
                    // alone, and the plan's step after them.
                    if !in_flight.is_empty() {
                        self.held = Some((plan, repairs));
                        break;
                    }
                    self.exclusive = true;
                }
                let now = Instant::now();
                for p in &plan.seqs {
                    if let Some(c) = self.clients.get_mut(&p.id) {
                        c.scheduled.get_or_insert(now);
                    }
                }
                let req = self.request(&plan);
                let repairer = self.repairer();
                // Numbered here, in issue order (the tasks may start in any).
                let ticket = repairer.stages.ticket();
                in_flight.spawn(async move {
                    let r = match repairer.run(&repairs).await {
                        Ok(()) => repairer.stages.run(ticket, req).await,
                        Err(e) => Err(e),
                    };
                    (plan, repairs, r)
                });
            }
            let deadline = self.sched.next_deadline();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Cmd::Repipe(stages)) => {
                        // Steps in flight on the old stages are abandoned
                        // (one may wait on a hung stage until its timeout);
                        // their sequences end here.
                        in_flight.abort_all();
                        while in_flight.join_next().await.is_some() {}
                        self.repipe(stages);
                    }
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => match done {
                    Ok((plan, repairs, r)) => self.completed(plan, repairs, r),
                    Err(e) => tracing::error!(model = %self.model, error = %e, "a step task died"),
                },
                _ = sleep_until(deadline), if deadline.is_some() => {
                    for (id, f) in self.sched.expire(Instant::now()) {
                        self.finished(id, f);
                    }
                }
            }
        }
        // Every handle is gone (the shard was unloaded or replaced).
        while let Some(done) = in_flight.join_next().await {
            if let Ok((plan, repairs, r)) = done {
                self.completed(plan, repairs, r);
            }
        }
        for (id, f) in self.sched.drain(Finish::Failed) {
            self.finished(id, f);
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Submit {
                id,
                sub,
                events,
                accepted,
            } => {
                // Biased ids outside the vocabulary: refused here, never
                // silently dropped by the sampler.
                if let Err(e) = sub.sampling.validate_for(self.sched.config().vocab_size) {
                    let _ = accepted.send(Err(e.into()));
                    return;
                }
                let timeout = sub
                    .params
                    .deadline
                    .map(|d| d.saturating_duration_since(Instant::now()));
                match self.sched.submit(id, sub.params) {
                    Ok(displaced) => {
                        self.clients.insert(
                            id,
                            Client {
                                events,
                                sampling: sub.sampling,
                                request_id: sub.request_id,
                                trace: sub.trace,
                                started: Instant::now(),
                                scheduled: None,
                                told_queue: false,
                                timeout,
                            },
                        );
                        let _ = accepted.send(Ok(()));
                        if let Some((victim, f)) = displaced {
                            self.finished(victim, f);
                        }
                    }
                    Err(r) => {
                        let _ = accepted.send(Err(self.refusal(r)));
                    }
                }
            }
            Cmd::Cancel(id) => {
                if let Some(f) = self.sched.cancel(id) {
                    self.finished(id, f);
                }
            }
            Cmd::Stats(tx) => {
                let _ = tx.send(EngineStats {
                    scheduler: self.sched.stats(),
                    generated_tokens: self.generated,
                    repaired_tokens: self.repaired,
                });
            }
            Cmd::Repipe(stages) => self.repipe(stages),
        }
    }

    /// Goes on over new later stages (no step in flight: the caller
    /// abandoned them).
    fn repipe(&mut self, stages: Pipeline) {
        self.held = None;
        self.exclusive = false;
        self.sched.set_max_in_flight(stages.len());
        self.stages = Arc::new(stages);
        let (ended, repairs) = self.sched.stages_replaced(self.stages.len() > 1);
        tracing::info!(model = %self.model, stages = self.stages.len(), ended = ended.len(), "later stages replaced: the engine goes on with its cache");
        for (id, f) in ended {
            self.finished(id, f);
        }
        self.pending = (!repairs.is_empty()).then_some(repairs);
    }

    /// A full queue, with the recent request duration as the retry hint.
    fn queue_full(&self, waiting: usize, limit: usize) -> EngineError {
        EngineError::QueueFull {
            model: self.model.clone(),
            waiting,
            limit,
            retry_after_ms: self.recent_ms.clamp(50.0, 60_000.0) as u64,
        }
    }

    fn refusal(&self, r: Refusal) -> EngineError {
        match r {
            Refusal::QueueFull { waiting, limit } => self.queue_full(waiting, limit),
            Refusal::Invalid(e) => e.into(),
            Refusal::TooLong { blocks, limit } => EngineError::LimitExceeded {
                what: "prompt plus max_new_tokens".into(),
                limit_name: "the KV cache in blocks",
                limit,
                got: blocks,
            },
        }
    }

    /// The repairs' runner for a step task: this engine's stages and model.
    fn repairer(&self) -> Repairer {
        Repairer {
            stages: self.stages.clone(),
            model: self.model.clone(),
            block_size: self.sched.config().block_size,
            chunk: self.sched.config().max_batch_tokens,
        }
    }

    /// The step: packed token ids and each sequence's slice.
    fn request(&self, plan: &StepPlan) -> Step {
        let tokens = plan
            .seqs
            .iter()
            .flat_map(|p| p.tokens.iter().copied())
            .collect();
        let seqs = plan
            .seqs
            .iter()
            .map(|p| SeqStep {
                position: p.position,
                tokens: p.tokens.len(),
                blocks: p.blocks.clone(),
                sample: p.sample_index.and_then(|index| {
                    self.clients.get(&p.id).map(|c| SampleAt {
                        params: c.sampling.clone(),
                        index,
                        history: c
                            .sampling
                            .needs_history()
                            .then(|| self.sched.history(p.id))
                            .flatten(),
                    })
                }),
                want_logits: false,
                trace: self.clients.get(&p.id).and_then(|c| c.trace.clone()),
            })
            .collect();
        Step {
            model: self.model.clone(),
            id: 0,
            seqs,
            input: StepInput::Tokens(tokens),
            to_next: false,
        }
    }

    fn completed(&mut self, plan: StepPlan, repairs: Vec<Repair>, r: Result<StepOutput>) {
        if !repairs.is_empty() {
            self.exclusive = false;
            match &r {
                Err(e) => {
                    self.sched.repair_failed(&repairs);
                    if plan.seqs.is_empty() {
                        tracing::warn!(model = %self.model, error = %e, "the later stages' cache was not recomputed after their replacement: resumed requests will recompute it");
                        return;
                    }
                }
                Ok(_) => {
                    let n: usize = repairs.iter().map(|r| r.tokens).sum();
                    self.repaired += n as u64;
                    tracing::info!(model = %self.model, sequences = repairs.len(), positions = n, "later stages' cache recomputed from the first stage's boundary rows");
                }
            }
        }
        match r {
            Ok(out) => {
                let want = plan
                    .seqs
                    .iter()
                    .filter(|p| p.sample_index.is_some())
                    .count();
                if out.tokens.len() != want {
                    let e = EngineError::Invalid(format!(
                        "the last stage sampled {} tokens for {want} sequences",
                        out.tokens.len()
                    ));
                    return self.failed(&plan, e);
                }
                for (id, ev) in self.sched.complete(&plan, out.tokens) {
                    match ev {
                        SeqEvent::Finished(f) => self.finished(id, f),
                        mut tok => {
                            self.generated += 1;
                            if let Some(c) = self.clients.get_mut(&id) {
                                if let SeqEvent::Token { queued, .. } = &mut tok {
                                    if !c.told_queue {
                                        c.told_queue = true;
                                        *queued = c.scheduled.map(|s| s - c.started);
                                    }
                                }
                                let _ = c.events.send(Ok(tok));
                            }
                        }
                    }
                }
            }
            Err(e) => self.failed(&plan, e),
        }
    }

    fn failed(&mut self, plan: &StepPlan, e: EngineError) {
        tracing::warn!(model = %self.model, error = %e, sequences = plan.seqs.len(), "step failed");
        let e = Arc::new(e);
        for (id, _) in self.sched.fail(plan) {
            if let Some(c) = self.clients.remove(&id) {
                let _ = c.events.send(Err(EngineError::Step(e.clone())));
            }
        }
    }

    fn finished(&mut self, id: u64, f: Finished) {
        let Some(c) = self.clients.remove(&id) else {
            return;
        };
        let ms = c.started.elapsed().as_secs_f64() * 1e3;
        let ev = match f.reason {
            Finish::DeadlineExceeded => Err(EngineError::DeadlineExceeded {
                request_id: c.request_id,
                after: c.timeout.unwrap_or_default(),
                generated: f.generated,
            }),
            Finish::Displaced => {
                Err(self.queue_full(self.sched.stats().waiting, self.sched.config().max_waiting))
            }
            Finish::Failed => Err(EngineError::Stopped(self.model.clone())),
            _ => {
                self.recent_ms = 0.8 * self.recent_ms + 0.2 * ms;
                Ok(SeqEvent::Finished(f))
            }
        };
        let _ = c.events.send(ev);
    }
}

/// What a step task needs to run repairs on the engine's stages.
struct Repairer {
    stages: Arc<Pipeline>,
    model: String,
    block_size: usize,
    chunk: usize,
}

impl Repairer {
    /// Has the later stages recompute each repair's positions, a sequence
    /// at a time (a later chunk attends to the earlier), at most `chunk`
    /// positions a step.
    async fn run(&self, repairs: &[Repair]) -> Result<()> {
        for r in repairs {
            let end = r.position + r.tokens;
            let mut at = r.position;
            while at < end {
                let n = (end - at).min(self.chunk.max(1));
                let seq = SeqStep {
                    position: at,
                    tokens: n,
                    blocks: r.blocks[..(at + n).div_ceil(self.block_size)].to_vec(),
                    sample: None,
                    want_logits: false,
                    trace: None,
                };
                self.stages
                    .repair(&self.model, vec![seq], self.block_size)
                    .await?;
                at += n;
            }
        }
        Ok(())
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
