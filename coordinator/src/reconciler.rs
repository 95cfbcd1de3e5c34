//! The reconciler: on the leader only, it converges what is (placements,
//! loaded shards, what workers report holding) to what operators asked for
//! (the desired part of each `Deployment`), again on every pass, so it
//! survives its own restarts and a change of leader. Each pass:
//!
//! 1. **Liveness**: lease transitions (`crate::leases`) become log entries
//!    (unhealthy, healthy again, gone after the grace period).
//! 2. **Placement**: a model not placed yet, or placed on a worker that is
//!    gone, is placed (the planner over healthy workers' free memory, less
//!    what pending loads will take; a gone worker's stages move to a spare
//!    worker with room when one exists). A new placement is a new epoch.
//!    When nothing fits, the model's `reason` says what it waits for.
//! 3. **Loading**: every shard not loaded under the current epoch is sent
//!    `LoadShard` (all ranks at once: a tensor-parallel group links up while
//!    loading); each success is recorded (`ShardLoaded`), so a new leader
//!    continues where the old one stopped. A failure is recorded as the
//!    model's reason and retried with exponential backoff by placing the
//!    model anew; a refusal no retry can fix (INVALID_ARGUMENT, NOT_FOUND)
//!    fails the model.
//! 4. **Garbage**: a shard a worker reports holding that no current
//!    placement gives it (undeployed, moved away while the worker was
//!    gone) is unloaded, fenced by its epoch.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llmos_meta::ModelConfig;
use llmos_proto::worker::v1 as wk;
use tonic::Code;

use crate::cluster::Cluster;
use crate::error::CoordError;
use crate::leases::Transition;
use crate::placement::{
    plan_tp, ModelShape, Placement, PlacementRequest, PlanError, WorkerCapacity,
};
use crate::shard_spec::shard_spec;
use crate::state::{ClusterState, Command, Deployment, ModelState, ParallelShape, Serving};

/// A model's reason is written at most this often while it only changes
/// figures (free memory moves with every heartbeat); a failure is written
/// at once.
const REASON_EVERY: Duration = Duration::from_secs(10);

/// First retry after a failed load; doubles per attempt up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One rank's share of a model with `tp` ranks per stage, with its KV
/// cache: what the planner places. Refuses (with the numbers) a
/// tensor-parallel size the model's heads do not split by.
pub(crate) fn rank_shape(
    c: &ModelConfig,
    dtype: &str,
    quantization: &str,
    serving: &Serving,
    tp: u32,
) -> Result<ModelShape, CoordError> {
    let dtype_bytes = if dtype == "f32" { 4 } else { 2 };
    let mut shape = ModelShape::from_config(c, dtype_bytes);
    if quantization == "int8" {
        shape = shape.with_int8_layers(c, dtype_bytes);
    }
    let tp = tp.max(1);
    let split = c.tp_split(0, tp as usize).map_err(CoordError::Invalid)?;
    // A rank holds a tp-th of each layer's weights, and `kv_blocks` blocks
    // of its own KV heads for each of its layers.
    shape.layer_bytes = shape.layer_bytes.div_ceil(tp as u64)
        + serving.kv_blocks as u64
            * serving.block_size as u64
            * 2
            * (split.kv_heads * c.head_dim) as u64
            * dtype_bytes;
    Ok(shape)
}

/// What the operator's shape asks of the planner.
pub(crate) fn placement_request(shape: &ParallelShape) -> PlacementRequest {
    PlacementRequest {
        stages: (shape.stages > 0).then_some(shape.stages),
        split: (!shape.layer_split.is_empty()).then(|| shape.layer_split.clone()),
        reserve_bytes: 0,
    }
}

/// A shard: (model, epoch, stage, rank).
type ShardKey = (String, u64, u32, u32);

#[derive(Debug, Clone)]
struct Backoff {
    attempts: u32,
    until: Instant,
    /// The epoch whose load failed: placed anew once `until` passes.
    epoch: u64,
}

pub struct Reconciler {
    cluster: Arc<Cluster>,
    /// Loads and unloads in flight (results of an older epoch are refused
    /// by the state machine when they land).
    loading: Mutex<HashSet<ShardKey>>,
    unloading: Mutex<HashSet<(String, String, u64)>>,
    backoff: Mutex<HashMap<String, Backoff>>,
    /// When each model's reason was last written.
    reasons: Mutex<HashMap<String, Instant>>,
}

impl Reconciler {
    pub fn new(cluster: Arc<Cluster>) -> Arc<Self> {
        Arc::new(Reconciler {
            cluster,
            loading: Mutex::default(),
            unloading: Mutex::default(),
            backoff: Mutex::default(),
            reasons: Mutex::default(),
        })
    }

    /// Runs passes every `reconcile_interval` (or sooner when woken) until
    /// `stop` completes.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(self.cluster.config.reconcile_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {}
                _ = self.cluster.wake.notified() => {}
            }
            self.pass().await;
        }
    }

    /// One pass over the whole state.
    pub async fn pass(self: &Arc<Self>) {
        let c = &self.cluster;
        let now = Instant::now();
        let leader = c.store.is_leader();
        if c.leases.set_leader(leader, now) {
            tracing::info!("leading: reconciling (liveness decisions wait one lease period)");
            self.backoff.lock().unwrap().clear();
        }
        if !leader {
            return;
        }
        let state = c.read();
        if self.liveness(&state, now).await {
            return; // the next pass sees the new liveness
        }
        for dep in state.models.values() {
            if let Err(e) = self.converge(&state, dep).await {
                tracing::warn!(model = %dep.name, error = %e, "reconciling a model failed");
            }
        }
        self.collect_garbage(&state);
    }

    /// Writes due liveness transitions; whether it wrote any.
    async fn liveness(&self, state: &ClusterState, now: Instant) -> bool {
        let c = &self.cluster;
        let due = c.leases.transitions(
            state.workers.values(),
            now,
            c.now_ms(),
            c.config.heartbeat_timeout,
            c.config.worker_grace_period,
        );
        for t in &due {
            let cmd = match t {
                Transition::Unhealthy(id) | Transition::Healthy(id) => {
                    let healthy = matches!(t, Transition::Healthy(_));
                    tracing::warn!(worker = %id, healthy, "lease transition");
                    Command::SetWorkerHealth {
                        id: id.clone(),
                        healthy,
                        at_ms: c.now_ms(),
                    }
                }
                Transition::Gone(id) => {
                    tracing::warn!(worker = %id, grace = ?c.config.worker_grace_period, "unhealthy past the grace period: gone; its shards move");
                    Command::WorkerGone { id: id.clone() }
                }
            };
            if let Err(e) = c.propose(cmd).await {
                tracing::warn!(error = %e, "recording a liveness change failed");
            }
        }
        !due.is_empty()
    }

    async fn converge(
        self: &Arc<Self>,
        state: &ClusterState,
        dep: &Deployment,
    ) -> Result<(), CoordError> {
        if matches!(dep.state, ModelState::Failed(_)) {
            return Ok(());
        }
        let now = Instant::now();
        let backoff = self.backoff.lock().unwrap().get(&dep.name).cloned();
        if backoff.as_ref().is_some_and(|b| b.until > now) {
            return Ok(());
        }
        let lost = dep
            .placement
            .stages
            .iter()
            .flat_map(|s| s.workers())
            .any(|w| state.workers.get(w).is_none_or(|w| w.gone));
        let retry = backoff.as_ref().is_some_and(|b| b.epoch == dep.epoch);
        if !dep.placed() || lost || retry {
            return self.place(state, dep).await;
        }
        if dep.state == ModelState::Ready {
            self.backoff.lock().unwrap().remove(&dep.name);
            return Ok(());
        }
        // Load what is missing, all at once.
        let mut waiting_on = None;
        for (stage, rank, worker) in dep.shards() {
            if dep.loaded.contains(&(stage, rank)) {
                continue;
            }
            let w = &state.workers[worker];
            if !w.healthy {
                waiting_on.get_or_insert(format!(
                    "stage {stage}: worker {worker:?} is unreachable; its shards move to another worker {} s after it was last heard from",
                    self.cluster.config.worker_grace_period.as_secs()
                ));
                continue;
            }
            let key = (dep.name.clone(), dep.epoch, stage, rank);
            if !self.loading.lock().unwrap().insert(key.clone()) {
                continue;
            }
            let spec = shard_spec(
                state,
                dep,
                stage as usize,
                rank as usize,
                self.cluster.config.step_timeout,
            );
            let (me, worker, generation) = (self.clone(), worker.to_string(), dep.generation);
            tokio::spawn(async move {
                me.load(key.clone(), generation, worker, spec).await;
                me.loading.lock().unwrap().remove(&key);
                me.cluster.wake.notify_one();
            });
        }
        if let Some(reason) = waiting_on.filter(|r| *r != dep.reason) {
            self.progress(dep, reason, false).await;
        }
        Ok(())
    }

    /// Places `dep` (anew), or records what it waits for.
    async fn place(&self, state: &ClusterState, dep: &Deployment) -> Result<(), CoordError> {
        let c = &self.cluster;
        let planned = match c.model(&dep.name) {
            Some(rt) => rank_shape(
                &rt.config,
                &dep.dtype,
                &dep.quantization,
                &dep.serving,
                dep.shape.tensor_parallel,
            )
            .and_then(|shape| Ok(self.plan(state, dep, &shape)?)),
            None => Err(CoordError::Invalid(format!(
                "cannot open {:?} on the leader",
                dep.source
            ))),
        };
        match planned {
            Ok(placement) => {
                let workers: Vec<String> = placement
                    .stages
                    .iter()
                    .map(|s| s.workers().collect::<Vec<_>>().join("+"))
                    .collect();
                tracing::info!(model = %dep.name, ?workers, "placing");
                c.propose(Command::PlaceModel {
                    name: dep.name.clone(),
                    generation: dep.generation,
                    placement,
                    at_ms: c.now_ms(),
                })
                .await
            }
            Err(e) => {
                let permanent = matches!(
                    e,
                    CoordError::Invalid(_) | CoordError::Plan(PlanError::Invalid(_))
                );
                let reason = match &e {
                    CoordError::Plan(PlanError::Insufficient {
                        stage, stage_short, ..
                    }) => format!(
                        "stage {stage}: waiting for {} more free on a worker ({e})",
                        gb(*stage_short)
                    ),
                    _ => e.to_string(),
                };
                if reason != dep.reason || permanent {
                    self.progress(dep, reason, permanent).await;
                }
                Ok(())
            }
        }
    }

    /// A placement over the healthy workers' free memory (less what loads
    /// in flight will take). A placed model that lost workers keeps its
    /// stages where it can, each lost worker's slot taken by a spare with
    /// room.
    fn plan(
        &self,
        state: &ClusterState,
        dep: &Deployment,
        shape: &ModelShape,
    ) -> Result<Placement, PlanError> {
        let free = |id: &str| -> u64 {
            let reported = self
                .cluster
                .leases
                .report(id)
                .map(|r| r.memory_free_bytes)
                .unwrap_or_else(|| state.workers[id].memory_free_bytes);
            // Shards placed there but not loaded yet will take their bytes.
            let pending: u64 = state
                .models
                .values()
                .filter(|m| m.name != dep.name)
                .flat_map(|m| {
                    m.placement
                        .stages
                        .iter()
                        .enumerate()
                        .flat_map(move |(i, s)| {
                            s.workers()
                                .enumerate()
                                .filter(move |(r, w)| {
                                    *w == id && !m.loaded.contains(&(i as u32, *r as u32))
                                })
                                .map(move |_| s.bytes)
                        })
                })
                .sum();
            reported.saturating_sub(pending)
        };
        let usable = |w: &&crate::state::WorkerInfo| w.healthy && !w.gone;
        if dep.placed() {
            let mut p = dep.placement.clone();
            let mut taken: HashSet<String> = p
                .stages
                .iter()
                .flat_map(|s| s.workers().map(String::from))
                .collect();
            let mut ok = true;
            for s in &mut p.stages {
                let bytes = s.bytes;
                for slot in std::iter::once(&mut s.worker).chain(s.followers.iter_mut()) {
                    if state.workers.get(slot.as_str()).is_some_and(|w| usable(&w)) {
                        continue;
                    }
                    let spare = state
                        .workers
                        .values()
                        .filter(usable)
                        .filter(|w| !taken.contains(&w.id))
                        .map(|w| (free(&w.id), &w.id))
                        .filter(|(f, _)| *f >= bytes)
                        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(a.1)));
                    match spare {
                        Some((_, id)) => {
                            taken.insert(id.clone());
                            *slot = id.clone();
                        }
                        None => ok = false,
                    }
                }
            }
            // Every slot now names a usable worker: kept, or a spare.
            if ok {
                return Ok(p);
            }
        }
        let workers: Vec<WorkerCapacity> = state
            .workers
            .values()
            .filter(usable)
            .map(|w| WorkerCapacity {
                id: w.id.clone(),
                free_bytes: free(&w.id),
            })
            .collect();
        plan_tp(
            shape,
            &workers,
            &placement_request(&dep.shape),
            dep.shape.tensor_parallel.max(1),
        )
    }

    /// Loads one shard and records the outcome.
    async fn load(&self, key: ShardKey, generation: u64, worker: String, spec: wk::ShardSpec) {
        let c = &self.cluster;
        let (name, epoch, stage, rank) = key;
        match crate::admin::load_stage(c, &worker, spec).await {
            Ok(_) => {
                let r = c
                    .propose(Command::ShardLoaded {
                        name: name.clone(),
                        epoch,
                        stage,
                        rank,
                        at_ms: c.now_ms(),
                    })
                    .await;
                match r {
                    Ok(()) => {
                        tracing::info!(model = %name, stage, rank, %worker, epoch, "shard loaded")
                    }
                    Err(e) => {
                        tracing::info!(model = %name, stage, rank, error = %e, "a load finished for a placement that changed")
                    }
                }
            }
            Err(e) => {
                let permanent = matches!(
                    &e,
                    CoordError::WorkerFailed { status, .. }
                        if matches!(status.code(), Code::InvalidArgument | Code::NotFound | Code::Unimplemented)
                );
                let attempts = {
                    let mut b = self.backoff.lock().unwrap();
                    let attempts = b.get(&name).map_or(0, |b| b.attempts) + 1;
                    let wait = FIRST_BACKOFF
                        .saturating_mul(1 << (attempts - 1).min(10))
                        .min(MAX_BACKOFF);
                    b.insert(
                        name.clone(),
                        Backoff {
                            attempts,
                            until: Instant::now() + wait,
                            epoch,
                        },
                    );
                    attempts
                };
                let reason = if permanent {
                    format!("stage {stage} rank {rank} on worker {worker:?}: {e}")
                } else {
                    format!("stage {stage} rank {rank} on worker {worker:?}: load failed (attempt {attempts}; placing anew after a backoff): {e}")
                };
                tracing::warn!(model = %name, %reason, "load failed");
                let dep = c.read().models.get(&name).cloned();
                if let Some(dep) = dep.filter(|d| d.generation == generation && d.epoch == epoch) {
                    self.progress(&dep, reason, permanent).await;
                }
            }
        }
    }

    async fn progress(&self, dep: &Deployment, reason: String, failed: bool) {
        let c = &self.cluster;
        {
            let mut last = self.reasons.lock().unwrap();
            let now = Instant::now();
            // Same kind of wait (the text before the figures) written lately:
            // not again yet.
            let kind = |r: &str| {
                r.split(|ch: char| ch.is_ascii_digit())
                    .take(2)
                    .collect::<String>()
            };
            if !failed
                && !dep.reason.is_empty()
                && kind(&dep.reason) == kind(&reason)
                && last
                    .get(&dep.name)
                    .is_some_and(|t| now.duration_since(*t) < REASON_EVERY)
            {
                return;
            }
            last.insert(dep.name.clone(), now);
        }
        if let Err(e) = c
            .propose(Command::ModelProgress {
                name: dep.name.clone(),
                generation: dep.generation,
                reason,
                failed,
                at_ms: c.now_ms(),
            })
            .await
        {
            tracing::debug!(model = %dep.name, error = %e, "recording progress failed");
        }
    }

    /// Unloads what workers report holding that no placement gives them.
    fn collect_garbage(self: &Arc<Self>, state: &ClusterState) {
        for (worker, report) in self.cluster.leases.reports() {
            for (model, epoch) in report.shards {
                // A worker of the current placement holding an older epoch
                // keeps it: the pending load replaces it (keeping weights
                // that did not change).
                let keep = state.models.get(&model).is_some_and(|d| {
                    d.placement.stages.iter().any(|s| s.holds(&worker)) && epoch <= d.epoch
                });
                if keep {
                    continue;
                }
                let key = (worker.clone(), model.clone(), epoch);
                if !self.unloading.lock().unwrap().insert(key.clone()) {
                    continue;
                }
                let me = self.clone();
                tokio::spawn(async move {
                    let (worker, model, epoch) = key.clone();
                    tracing::info!(%worker, %model, epoch, "unloading a shard no placement gives this worker");
                    if let Err(e) =
                        crate::admin::unload_shard(&me.cluster, &worker, &model, epoch).await
                    {
                        tracing::warn!(%worker, %model, error = %e, "unloading a stale shard failed");
                    }
                    // Reports lag a heartbeat behind: wait for the next one
                    // before trying this shard again.
                    tokio::time::sleep(me.cluster.config.heartbeat_interval).await;
                    me.unloading.lock().unwrap().remove(&key);
                });
            }
        }
    }
}

fn gb(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}
