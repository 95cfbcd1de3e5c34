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

use llmos_proto::worker::v1 as wk;
use tonic::Code;

use crate::autoscaler::{Autoscaler, Signals};
use crate::cluster::Cluster;
use crate::error::CoordError;
use crate::leases::Transition;
use crate::placement::{plan_tp, ModelShape, Placement, PlanError, WorkerCapacity};
use crate::shard_spec::shard_spec;
use crate::sizing::{placement_request, rank_shape};
use crate::state::{ClusterState, Command, Deployment, ModelState, ParallelShape, Replica};

/// A model's reason is written at most this often while it only changes
/// figures (free memory moves with every heartbeat); a failure is written
/// at once.
const REASON_EVERY: Duration = Duration::from_secs(10);

/// First retry after a failed load; doubles per attempt up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

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
    /// By (model, replica).
    backoff: Mutex<HashMap<(String, u32), Backoff>>,
    /// When each model's (or replica's) reason was last written.
    reasons: Mutex<HashMap<(String, Option<u32>), Instant>>,
    autoscaler: Mutex<Autoscaler>,
}

impl Reconciler {
    pub fn new(cluster: Arc<Cluster>) -> Arc<Self> {
        Arc::new(Reconciler {
            cluster,
            loading: Mutex::default(),
            unloading: Mutex::default(),
            backoff: Mutex::default(),
            reasons: Mutex::default(),
            autoscaler: Mutex::default(),
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
        let state = c.read();
        // Every coordinator routes: its router forgets removed replicas.
        c.router.retain(
            &state
                .models
                .values()
                .flat_map(|d| d.instances.values().map(|r| (d.name.clone(), r.epoch)))
                .collect(),
        );
        if !leader {
            return;
        }
        if self.liveness(&state, now).await {
            return; // the next pass sees the new liveness
        }
        self.autoscale(&state).await;
        for dep in state.models.values() {
            if let Err(e) = self.converge(&state, dep).await {
                tracing::warn!(model = %dep.name, error = %e, "reconciling a model failed");
            }
        }
        self.collect_garbage(&state);
    }

    /// The built-in autoscaler's decisions for the models that ask for it,
    /// from the engines' load reports.
    async fn autoscale(&self, state: &ClusterState) {
        let c = &self.cluster;
        let now = Instant::now();
        let mut decisions = Vec::new();
        {
            let mut a = self.autoscaler.lock().unwrap();
            let scaled: Vec<&str> = state
                .models
                .values()
                .filter(|d| d.autoscale.is_some())
                .map(|d| d.name.as_str())
                .collect();
            a.retain(&scaled);
            for dep in state.models.values() {
                let (Some(bounds), false) =
                    (dep.autoscale, matches!(dep.state, ModelState::Failed(_)))
                else {
                    continue;
                };
                let mut s = Signals::default();
                for r in dep.serving() {
                    let load = c.router.load(&dep.name, r.epoch);
                    let reported = load.reported.unwrap_or_default();
                    s.serving += 1;
                    s.running += reported.running.max(load.in_flight);
                    s.waiting += reported.waiting;
                }
                let policy = &c.config.autoscale;
                if let Some(n) = a.decide(policy, &dep.name, dep.replicas, bounds, s, now) {
                    decisions.push((dep.name.clone(), dep.replicas, n, s));
                }
            }
        }
        for (name, from, to, s) in decisions {
            tracing::info!(model = %name, from, to, ?s, "autoscaling");
            if let Err(e) = c
                .propose(Command::ScaleModel {
                    name: name.clone(),
                    replicas: to,
                    at_ms: c.now_ms(),
                })
                .await
            {
                tracing::warn!(model = %name, error = %e, "autoscaling failed");
            }
        }
    }

    /// Writes due liveness transitions; whether it wrote any.
    async fn liveness(&self, state: &ClusterState, now: Instant) -> bool {
        let c = &self.cluster;
        let mut due = c.leases.transitions(
            state.workers.values(),
            now,
            c.now_ms(),
            c.config.heartbeat_timeout,
            c.config.worker_grace_period,
        );
        // A worker holding shards whose process is known dead (unhealthy,
        // or reported unreachable by a stream, and its port refuses
        // connections: the host answers, nothing listens) will not come
        // back as it was: its shards move now, not after its lease and the
        // grace period. A silent one (frozen, partitioned, its host down)
        // waits out both.
        let suspects = c.take_suspects();
        for w in state.workers.values() {
            let holds = || state.models.values().any(|d| d.replica_on(&w.id).is_some());
            if (!w.healthy || suspects.contains(&w.id))
                && !w.gone
                && !due.iter().any(|t| t.worker() == w.id)
                && holds()
                && refuses_connections(&w.address).await
            {
                tracing::warn!(worker = %w.id, address = %w.address, "unreachable and its port refuses connections: its process is gone; its shards move now");
                // Its lease would otherwise call it healthy again until
                // it lapses; a heartbeat from it (it was alive after all)
                // still does.
                c.leases.forget(&w.id);
                due.push(Transition::Gone(w.id.clone()));
            }
        }
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
        let c = &self.cluster;
        let now_ms = c.now_ms();
        // Draining replicas leave once their requests have finished (or the
        // drain timeout passed).
        for r in dep.instances.values().filter(|r| r.draining()) {
            let timed_out = now_ms.saturating_sub(r.draining_since_ms)
                >= c.config.drain_timeout.as_millis() as u64;
            let idle = c.router.idle_since(&dep.name, r.epoch, r.draining_since_ms)
                || !r
                    .placement
                    .stages
                    .iter()
                    .flat_map(|s| s.workers())
                    .any(|w| state.workers.get(w).is_some_and(|w| w.healthy));
            if idle || timed_out {
                if timed_out && !idle {
                    tracing::warn!(model = %dep.name, replica = r.id, timeout = ?c.config.drain_timeout, "drain timed out: removing the replica with requests still running");
                }
                tracing::info!(model = %dep.name, replica = r.id, "replica drained: removing it");
                c.propose(Command::RemoveReplica {
                    name: dep.name.clone(),
                    replica: r.id,
                    at_ms: now_ms,
                })
                .await?;
            }
        }
        let on_cordoned = |r: &Replica| {
            r.shards()
                .any(|(_, _, w)| state.workers.get(w).is_some_and(|w| w.cordoned))
        };
        // Replaced before they go (make-before-break): replicas on a
        // drained worker, and replicas of an older shape (a re-split).
        let outdated = |r: &Replica| r.shape != dep.shape;
        let moving = |r: &Replica| on_cordoned(r) || outdated(r);
        let active: Vec<&Replica> = dep.instances.values().filter(|r| !r.draining()).collect();
        // Replicas that count towards the replica count.
        let mut keep: Vec<&Replica> = active.iter().copied().filter(|r| !moving(r)).collect();
        let desired = dep.replicas as usize;
        if keep.len() > desired {
            // Scale down: the ones not serving yet first, then the newest.
            keep.sort_by_key(|r| (r.serving(), std::cmp::Reverse(r.id)));
            for r in &keep[..keep.len() - desired] {
                self.drain(dep, r, format!("scaled down to {desired}"))
                    .await?;
            }
        }
        let serving_kept = keep.iter().filter(|r| r.serving()).count();
        let mut old: Vec<&Replica> = active.iter().copied().filter(|r| moving(r)).collect();
        if serving_kept >= desired {
            for r in &old {
                let why = match r
                    .shards()
                    .map(|(_, _, w)| w)
                    .find(|w| state.workers.get(*w).is_some_and(|w| w.cordoned))
                {
                    Some(w) => format!("worker {w:?} drained; its replacement serves"),
                    None => "re-split: a replica of the new shape serves in its place".into(),
                };
                self.drain(dep, r, why).await?;
            }
        }
        if keep.len() < desired && !self.place(state, dep, None).await? {
            // No room for a replacement beside the old replicas: a re-split
            // frees one old replica's workers at a time, while another
            // replica serves (so capacity never drops to zero).
            let draining = dep.instances.values().any(|r| r.draining());
            old.retain(|r| outdated(r));
            old.sort_by_key(|r| (r.serving(), std::cmp::Reverse(r.id)));
            let others_serving = |r: &Replica| {
                active
                    .iter()
                    .filter(|o| o.id != r.id && o.serving())
                    .count()
            };
            if let Some(r) = old.first().filter(|r| !draining && others_serving(r) > 0) {
                self.drain(
                    dep,
                    r,
                    "re-split: no room beside it, so it makes way for a replica of the new shape"
                        .into(),
                )
                .await?;
            }
        }
        for r in active {
            self.converge_replica(state, dep, r).await?;
        }
        Ok(())
    }

    async fn drain(&self, dep: &Deployment, r: &Replica, reason: String) -> Result<(), CoordError> {
        tracing::info!(model = %dep.name, replica = r.id, %reason, "draining a replica");
        let c = &self.cluster;
        c.propose(Command::DrainReplica {
            name: dep.name.clone(),
            replica: r.id,
            reason,
            at_ms: c.now_ms(),
        })
        .await
    }

    /// Re-places a replica that lost a worker (or whose load failed, after
    /// its backoff), or loads what it is missing.
    async fn converge_replica(
        self: &Arc<Self>,
        state: &ClusterState,
        dep: &Deployment,
        r: &Replica,
    ) -> Result<(), CoordError> {
        let now = Instant::now();
        let bkey = (dep.name.clone(), r.id);
        let backoff = self.backoff.lock().unwrap().get(&bkey).cloned();
        if backoff.as_ref().is_some_and(|b| b.until > now) {
            return Ok(());
        }
        let lost = r
            .shards()
            .any(|(_, _, w)| state.workers.get(w).is_none_or(|w| w.gone));
        let retry = backoff.as_ref().is_some_and(|b| b.epoch == r.epoch);
        if lost || retry {
            return self.place(state, dep, Some(r)).await.map(|_| ());
        }
        if r.state == ModelState::Ready {
            self.backoff.lock().unwrap().remove(&bkey);
            return Ok(());
        }
        // Load what is missing, all at once.
        let mut waiting_on = None;
        for (stage, rank, worker) in r.shards() {
            if r.loaded.contains(&(stage, rank)) {
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
            let key = (dep.name.clone(), r.epoch, stage, rank);
            if !self.loading.lock().unwrap().insert(key.clone()) {
                continue;
            }
            let spec = shard_spec(
                state,
                dep,
                r,
                stage as usize,
                rank as usize,
                self.cluster.config.step_timeout,
            );
            let (me, worker, replica) = (self.clone(), worker.to_string(), r.id);
            tokio::spawn(async move {
                me.load(key.clone(), replica, worker, spec).await;
                me.loading.lock().unwrap().remove(&key);
                me.cluster.wake.notify_one();
            });
        }
        if let Some(reason) = waiting_on.filter(|w| *w != r.reason) {
            self.progress(dep, Some(r.id), reason, false).await;
        }
        Ok(())
    }

    /// Places a new replica of `dep` (`replica` None) or replica `replica`
    /// anew (whether it did), or records what it waits for.
    async fn place(
        &self,
        state: &ClusterState,
        dep: &Deployment,
        replica: Option<&Replica>,
    ) -> Result<bool, CoordError> {
        let c = &self.cluster;
        // A replica placed anew keeps its shape; a new one takes the
        // deployment's.
        let shape = replica.map_or(&dep.shape, |r| &r.shape);
        let planned = match c.model(&dep.name) {
            Some(rt) => rank_shape(
                &rt.config,
                &dep.dtype,
                &dep.quantization,
                &dep.serving,
                shape.tensor_parallel,
            )
            .and_then(|rank| Ok(self.plan(state, dep, replica, shape, &rank)?)),
            None => Err(CoordError::Invalid(format!(
                "cannot open {:?} on the leader",
                dep.source
            ))),
        };
        let id = replica.map_or(dep.next_replica, |r| r.id);
        match planned {
            Ok(placement) => {
                let workers: Vec<String> = placement
                    .stages
                    .iter()
                    .map(|s| s.workers().collect::<Vec<_>>().join("+"))
                    .collect();
                tracing::info!(model = %dep.name, replica = id, ?workers, "placing");
                c.propose(Command::PlaceModel {
                    name: dep.name.clone(),
                    generation: dep.generation,
                    replica: id,
                    shape: shape.clone(),
                    placement,
                    at_ms: c.now_ms(),
                })
                .await?;
                Ok(true)
            }
            Err(e) => {
                let permanent = matches!(
                    e,
                    CoordError::Invalid(_) | CoordError::Plan(PlanError::Invalid(_))
                );
                let serving = dep.serving().count();
                let what = match replica {
                    Some(r) => format!("replica {}", r.id),
                    None if dep.replicas > 1 => format!(
                        "replica {} of {} ({serving} serving)",
                        dep.instances.len() + 1,
                        dep.replicas
                    ),
                    None => String::new(),
                };
                let detail = match &e {
                    CoordError::Plan(PlanError::Insufficient {
                        stage, stage_short, ..
                    }) => format!(
                        "stage {stage}: waiting for {} more free on a worker ({e})",
                        gb(*stage_short)
                    ),
                    _ => e.to_string(),
                };
                let reason = if what.is_empty() {
                    detail
                } else {
                    format!("{what}: {detail}")
                };
                let current = replica.map_or(&dep.reason, |r| &r.reason);
                if reason != *current || permanent {
                    self.progress(dep, replica.map(|r| r.id), reason, permanent)
                        .await;
                }
                Ok(false)
            }
        }
    }

    /// A placement over the usable workers' free memory (less what loads
    /// in flight will take): healthy, not drained, in the deployment's
    /// pool with its labels, and holding no other replica of the model. A
    /// replica that lost workers keeps its stages where it can, each lost
    /// worker's slot taken by a spare with room.
    fn plan(
        &self,
        state: &ClusterState,
        dep: &Deployment,
        replica: Option<&Replica>,
        parallel: &ParallelShape,
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
                .flat_map(|m| m.instances.values())
                .filter(|r| replica.is_none_or(|me| me.epoch != r.epoch))
                .flat_map(|r| {
                    r.placement
                        .stages
                        .iter()
                        .enumerate()
                        .flat_map(move |(i, s)| {
                            s.workers()
                                .enumerate()
                                .filter(move |(k, w)| {
                                    *w == id && !r.loaded.contains(&(i as u32, *k as u32))
                                })
                                .map(move |_| s.bytes)
                        })
                })
                .sum();
            reported.saturating_sub(pending)
        };
        let mine = replica.map(|r| r.id);
        let usable = |w: &&crate::state::WorkerInfo| {
            w.schedulable()
                && w.matches(&dep.pool, &dep.labels)
                && dep.replica_on(&w.id).is_none_or(|r| Some(r.id) == mine)
        };
        if let Some(r) = replica {
            let mut p = r.placement.clone();
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
        let r = plan_tp(
            shape,
            &workers,
            &placement_request(parallel),
            parallel.tensor_parallel.max(1),
        );
        // Say where it looked when the pool or the other replicas limit it.
        match r {
            Err(PlanError::TooFewWorkers {
                needed,
                available,
                what,
            }) => Err(PlanError::TooFewWorkers {
                needed,
                available,
                what: format!(
                    "{what}; counting only healthy, undrained workers{} that hold no other replica of the model",
                    if dep.pool.is_empty() && dep.labels.is_empty() {
                        String::new()
                    } else {
                        format!(" in pool {:?} with labels {:?}", dep.pool, dep.labels)
                    }
                ),
            }),
            r => r,
        }
    }
    /// Loads one shard and records the outcome.
    async fn load(&self, key: ShardKey, replica: u32, worker: String, spec: wk::ShardSpec) {
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
                        tracing::info!(model = %name, replica, stage, rank, %worker, epoch, "shard loaded")
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
                    let bkey = (name.clone(), replica);
                    let attempts = b.get(&bkey).map_or(0, |b| b.attempts) + 1;
                    let wait = FIRST_BACKOFF
                        .saturating_mul(1 << (attempts - 1).min(10))
                        .min(MAX_BACKOFF);
                    b.insert(
                        bkey,
                        Backoff {
                            attempts,
                            until: Instant::now() + wait,
                            epoch,
                        },
                    );
                    attempts
                };
                let reason = if permanent {
                    format!("replica {replica} stage {stage} rank {rank} on worker {worker:?}: {e}")
                } else {
                    format!("stage {stage} rank {rank} on worker {worker:?}: load failed (attempt {attempts}; placing anew after a backoff): {e}")
                };
                tracing::warn!(model = %name, %reason, "load failed");
                let dep = c.read().models.get(&name).cloned();
                if let Some(dep) = dep.filter(|d| d.at_epoch(epoch).is_some()) {
                    self.progress(&dep, Some(replica), reason, permanent).await;
                }
            }
        }
    }

    async fn progress(&self, dep: &Deployment, replica: Option<u32>, reason: String, failed: bool) {
        let c = &self.cluster;
        let current = replica
            .and_then(|id| dep.instances.get(&id))
            .map_or(&dep.reason, |r| &r.reason);
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
            let key = (dep.name.clone(), replica);
            if !failed
                && !current.is_empty()
                && kind(current) == kind(&reason)
                && last
                    .get(&key)
                    .is_some_and(|t| now.duration_since(*t) < REASON_EVERY)
            {
                return;
            }
            last.insert(key, now);
        }
        if let Err(e) = c
            .propose(Command::ModelProgress {
                name: dep.name.clone(),
                generation: dep.generation,
                replica,
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
                // A worker of a current replica holding an older epoch
                // keeps it: the pending load replaces it (keeping weights
                // that did not change).
                let keep = state
                    .models
                    .get(&model)
                    .and_then(|d| d.replica_on(&worker))
                    .is_some_and(|r| epoch <= r.epoch);
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

/// Whether nothing listens at a worker's address (`http://host:port`):
/// the connection is refused (a timeout or any other error says nothing).
async fn refuses_connections(address: &str) -> bool {
    let Some(hostport) = address
        .strip_prefix("http://")
        .or_else(|| address.strip_prefix("https://"))
    else {
        return false;
    };
    let hostport = hostport.trim_end_matches('/');
    match tokio::time::timeout(
        std::time::Duration::from_millis(500),
        tokio::net::TcpStream::connect(hostport),
    )
    .await
    {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        _ => false,
    }
}

fn gb(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}
