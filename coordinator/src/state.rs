//! The cluster state and the commands that change it. `apply` is
//! deterministic and pure over the state (time arrives inside commands), so
//! replicas applying the same committed log agree: this is the seam a Raft
//! group or an etcd log backs. Commands are serde-serializable log entries.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::deployment::one;
pub use crate::deployment::{Deployment, ModelState, ParallelShape, Replica, Serving};
use crate::placement::Placement;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: String,
    pub address: String,
    pub device: String,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
    pub healthy: bool,
    pub last_heartbeat_ms: u64,
    /// host:port of its collective listener (tensor-parallel groups).
    #[serde(default)]
    pub collective_address: String,
    /// When it last registered (a restart registers again): names its
    /// pipeline links, so a restarted stage links up anew.
    #[serde(default)]
    pub registered_at_ms: u64,
    /// Unix ms since it has been unhealthy (its lease expired).
    #[serde(default)]
    pub unhealthy_since_ms: u64,
    /// Unhealthy for longer than the grace period: its shards are placed
    /// elsewhere, and it holds nothing until it registers again.
    #[serde(default)]
    pub gone: bool,
    /// The pool it registered in ("": the default pool) and its labels.
    #[serde(default)]
    pub pool: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Drained by an operator: nothing new is placed on it.
    #[serde(default)]
    pub cordoned: bool,
}

impl WorkerInfo {
    /// Whether a deployment asking for `pool` and `labels` may use it.
    pub fn matches(&self, pool: &str, labels: &BTreeMap<String, String>) -> bool {
        (pool.is_empty() || self.pool == pool)
            && labels.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }

    /// Healthy, not gone, not cordoned: new shards may go there.
    pub fn schedulable(&self) -> bool {
        self.healthy && !self.gone && !self.cordoned
    }
}

/// A replicated log entry. Liveness is not in the log beyond its
/// transitions: heartbeats renew a lease in the leader's memory
/// (`crate::leases`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// A worker joins, or rejoins after a restart (same id, new details):
    /// the shards it held are lost, and so is whatever its pipeline
    /// neighbours linked to it (they reload). A cordon survives it.
    RegisterWorker {
        id: String,
        address: String,
        device: String,
        memory_total_bytes: u64,
        memory_free_bytes: u64,
        at_ms: u64,
        #[serde(default)]
        collective_address: String,
        #[serde(default)]
        pool: String,
        #[serde(default)]
        labels: BTreeMap<String, String>,
    },
    /// A lease transition decided by the leader: expired (unhealthy) or
    /// renewed after expiring (healthy again).
    SetWorkerHealth {
        id: String,
        healthy: bool,
        #[serde(default)]
        at_ms: u64,
    },
    /// Unhealthy for longer than the grace period (decided by the leader).
    WorkerGone {
        id: String,
    },
    RemoveWorker {
        id: String,
    },
    /// Drain (cordoned) or uncordon a worker: nothing new is placed on a
    /// cordoned worker, and the reconciler moves its replicas away.
    CordonWorker {
        id: String,
        cordoned: bool,
    },
    /// Records what the operator asks for; the reconciler places it.
    DeployModel {
        name: String,
        source: String,
        dtype: String,
        #[serde(default)]
        quantization: String,
        #[serde(default)]
        serving: Serving,
        #[serde(default)]
        shape: ParallelShape,
        #[serde(default = "one")]
        replicas: u32,
        #[serde(default)]
        pool: String,
        #[serde(default)]
        labels: BTreeMap<String, String>,
        #[serde(default)]
        autoscale: Option<(u32, u32)>,
        #[serde(default)]
        at_ms: u64,
    },
    /// A new replica count (a new generation).
    ScaleModel {
        name: String,
        replicas: u32,
        at_ms: u64,
    },
    /// A new parallel shape (a new generation): the reconciler re-splits
    /// the replicas, one replacement at a time.
    ReshapeModel {
        name: String,
        shape: ParallelShape,
        at_ms: u64,
    },
    /// The reconciler's placement of replica `replica` (a new one when it
    /// is the model's `next_replica`, else a replacement) for generation
    /// `generation`: a new epoch, nothing loaded under it yet.
    PlaceModel {
        name: String,
        generation: u64,
        #[serde(default)]
        replica: u32,
        /// The shape `placement` was planned for.
        #[serde(default)]
        shape: ParallelShape,
        placement: Placement,
        at_ms: u64,
    },
    /// A worker answered a load of (stage, rank) of the replica placed
    /// under `epoch`; the replica is Ready when every shard is.
    ShardLoaded {
        name: String,
        epoch: u64,
        stage: u32,
        rank: u32,
        at_ms: u64,
    },
    /// What the reconciler waits for, or why an attempt failed, for one
    /// replica or (none) for the model; `failed`: it will not retry (the
    /// model is Failed).
    ModelProgress {
        name: String,
        generation: u64,
        #[serde(default)]
        replica: Option<u32>,
        reason: String,
        failed: bool,
        at_ms: u64,
    },
    /// Replica `replica` takes no new requests from now on (scale-down, or
    /// its worker drained); `reason` says which.
    DrainReplica {
        name: String,
        replica: u32,
        reason: String,
        at_ms: u64,
    },
    /// A drained replica is gone (its shards are unloaded as garbage).
    RemoveReplica {
        name: String,
        replica: u32,
        at_ms: u64,
    },
    UndeployModel {
        name: String,
    },
    PutSetting {
        key: String,
        value: String,
    },
    DeleteSetting {
        key: String,
    },
    /// An API key (its salted hash, never the secret).
    CreateKey {
        key: crate::auth::ApiKey,
    },
    RevokeKey {
        id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum StateError {
    #[error("worker {0:?} is not registered")]
    UnknownWorker(String),
    #[error("worker {id:?} is unhealthy")]
    UnhealthyWorker { id: String },
    #[error("model {0:?} is not deployed")]
    UnknownModel(String),
    #[error("model {0:?} is already deployed")]
    ModelExists(String),
    #[error("setting {0:?} is not set")]
    UnknownSetting(String),
    #[error("API key {0} does not exist (revoked already, or never made)")]
    UnknownKey(String),
    #[error("API key {0} exists already")]
    KeyExists(String),
    #[error("worker {id:?} holds shards of {models:?}: undeploy them first")]
    WorkerInUse { id: String, models: Vec<String> },
    #[error("model {name:?} is at generation {current}, not {got}")]
    StaleGeneration {
        name: String,
        current: u64,
        got: u64,
    },
    #[error("model {name:?} is at placement epoch {current}, not {got}")]
    StaleEpoch {
        name: String,
        current: u64,
        got: u64,
    },
    #[error("placement of {name:?}: stage {stage} rank {rank} does not exist")]
    NoSuchShard { name: String, stage: u32, rank: u32 },
    #[error("model {name:?} has no replica {replica}")]
    UnknownReplica { name: String, replica: u32 },
    #[error("worker {id:?} is cordoned (drained): nothing new is placed there")]
    CordonedWorker { id: String },
    #[error("worker {id:?} already holds replica {replica} of {name:?}")]
    WorkerHoldsReplica {
        id: String,
        name: String,
        replica: u32,
    },
    #[error("model {name:?}: {replicas} replicas asked for; at least 1 (undeploy to remove it)")]
    NoReplicas { name: String, replicas: u32 },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    pub workers: BTreeMap<String, WorkerInfo>,
    pub models: BTreeMap<String, Deployment>,
    /// Commands applied so far (successful or not), for snapshots.
    pub applied: u64,
    /// Coordinator replicas: raft id → peer address (kept by membership
    /// changes, so a replica restoring a snapshot knows its peers).
    #[serde(default)]
    pub members: BTreeMap<u64, String>,
    /// Cluster settings set by operators (`SetSetting`).
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// API keys by id (`crate::auth`): salted hashes, never secrets.
    #[serde(default)]
    pub api_keys: BTreeMap<String, crate::auth::ApiKey>,
}

impl ClusterState {
    /// Applies one committed command. A rejected command leaves the state
    /// unchanged (except the applied count) and returns why.
    pub fn apply(&mut self, cmd: &Command) -> Result<(), StateError> {
        self.applied += 1;
        let index = self.applied;
        match cmd {
            Command::RegisterWorker {
                id,
                address,
                device,
                memory_total_bytes,
                memory_free_bytes,
                at_ms,
                collective_address,
                pool,
                labels,
            } => {
                let before = self.workers.get(id);
                let rejoined = before.is_some();
                let cordoned = before.is_some_and(|w| w.cordoned);
                self.workers.insert(
                    id.clone(),
                    WorkerInfo {
                        id: id.clone(),
                        address: address.clone(),
                        device: device.clone(),
                        memory_total_bytes: *memory_total_bytes,
                        memory_free_bytes: *memory_free_bytes,
                        healthy: true,
                        last_heartbeat_ms: *at_ms,
                        collective_address: collective_address.clone(),
                        registered_at_ms: *at_ms,
                        unhealthy_since_ms: 0,
                        gone: false,
                        pool: pool.clone(),
                        labels: labels.clone(),
                        cordoned,
                    },
                );
                if rejoined {
                    self.lose_shards_of(id, *at_ms);
                }
            }
            Command::SetWorkerHealth { id, healthy, at_ms } => {
                let w = self.worker_mut(id)?;
                if w.healthy && !healthy {
                    w.unhealthy_since_ms = *at_ms;
                }
                w.healthy = *healthy;
                if *healthy {
                    w.gone = false;
                    w.unhealthy_since_ms = 0;
                }
            }
            Command::WorkerGone { id } => {
                let w = self.worker_mut(id)?;
                w.healthy = false;
                w.gone = true;
            }
            Command::RemoveWorker { id } => {
                if !self.workers.contains_key(id) {
                    return Err(StateError::UnknownWorker(id.clone()));
                }
                let models = self.models_on(id);
                if !models.is_empty() {
                    return Err(StateError::WorkerInUse {
                        id: id.clone(),
                        models,
                    });
                }
                self.workers.remove(id);
            }
            Command::CordonWorker { id, cordoned } => {
                self.worker_mut(id)?.cordoned = *cordoned;
            }
            Command::DeployModel {
                name,
                source,
                dtype,
                quantization,
                serving,
                shape,
                replicas,
                pool,
                labels,
                autoscale,
                at_ms,
            } => {
                if self.models.contains_key(name) {
                    return Err(StateError::ModelExists(name.clone()));
                }
                if *replicas == 0 {
                    return Err(StateError::NoReplicas {
                        name: name.clone(),
                        replicas: 0,
                    });
                }
                self.models.insert(
                    name.clone(),
                    Deployment {
                        name: name.clone(),
                        source: source.clone(),
                        dtype: dtype.clone(),
                        quantization: quantization.clone(),
                        serving: serving.clone(),
                        shape: shape.clone(),
                        replicas: *replicas,
                        pool: pool.clone(),
                        labels: labels.clone(),
                        autoscale: *autoscale,
                        generation: index,
                        instances: BTreeMap::new(),
                        next_replica: 0,
                        state: ModelState::Pending,
                        reason: String::new(),
                        since_ms: *at_ms,
                    },
                );
            }
            Command::ScaleModel {
                name,
                replicas,
                at_ms,
            } => {
                if *replicas == 0 {
                    return Err(StateError::NoReplicas {
                        name: name.clone(),
                        replicas: 0,
                    });
                }
                let dep = self.model_mut(name)?;
                dep.replicas = *replicas;
                dep.generation = index;
                dep.refresh(*at_ms);
            }
            Command::ReshapeModel { name, shape, at_ms } => {
                let dep = self.model_mut(name)?;
                dep.shape = shape.clone();
                dep.generation = index;
                dep.refresh(*at_ms);
            }
            Command::PlaceModel {
                name,
                generation,
                replica,
                shape,
                placement,
                at_ms,
            } => {
                let dep = self.model_of(name, *generation)?;
                if *replica > dep.next_replica {
                    return Err(StateError::UnknownReplica {
                        name: name.clone(),
                        replica: *replica,
                    });
                }
                self.check_placement(placement)?;
                for id in placement.stages.iter().flat_map(|s| s.workers()) {
                    if let Some(other) = dep.replica_on(id).filter(|r| r.id != *replica) {
                        return Err(StateError::WorkerHoldsReplica {
                            id: id.to_string(),
                            name: name.clone(),
                            replica: other.id,
                        });
                    }
                }
                let dep = self.models.get_mut(name).expect("checked above");
                if *replica == dep.next_replica {
                    dep.next_replica += 1;
                    dep.reason.clear();
                }
                let r = dep.instances.entry(*replica).or_insert_with(|| Replica {
                    id: *replica,
                    shape: ParallelShape::default(),
                    placement: Placement::default(),
                    epoch: 0,
                    loaded: BTreeSet::new(),
                    state: ModelState::Loading,
                    reason: String::new(),
                    since_ms: *at_ms,
                    draining_since_ms: 0,
                });
                r.placement = Placement {
                    group_nonce: index,
                    ..placement.clone()
                };
                r.epoch = index;
                r.shape = shape.clone();
                r.loaded.clear();
                r.set_state(ModelState::Loading, String::new(), *at_ms);
                dep.refresh(*at_ms);
            }
            Command::ShardLoaded {
                name,
                epoch,
                stage,
                rank,
                at_ms,
            } => {
                let r = self.replica_at(name, *epoch)?;
                if !r.shards().any(|(s, r, _)| (s, r) == (*stage, *rank)) {
                    return Err(StateError::NoSuchShard {
                        name: name.clone(),
                        stage: *stage,
                        rank: *rank,
                    });
                }
                let id = r.id;
                let dep = self.models.get_mut(name).expect("checked above");
                let r = dep.instances.get_mut(&id).expect("checked above");
                r.loaded.insert((*stage, *rank));
                if r.loaded.len() == r.shards().count() {
                    r.set_state(ModelState::Ready, String::new(), *at_ms);
                }
                dep.refresh(*at_ms);
            }
            Command::ModelProgress {
                name,
                generation,
                replica,
                reason,
                failed,
                at_ms,
            } => {
                self.model_of(name, *generation)?;
                let dep = self.models.get_mut(name).expect("checked above");
                if *failed {
                    if dep.state != ModelState::Failed(reason.clone()) {
                        dep.since_ms = *at_ms;
                    }
                    dep.state = ModelState::Failed(reason.clone());
                    dep.reason = reason.clone();
                } else if let Some(id) = replica {
                    dep.instances
                        .get_mut(id)
                        .ok_or_else(|| StateError::UnknownReplica {
                            name: name.clone(),
                            replica: *id,
                        })?
                        .reason = reason.clone();
                } else {
                    dep.reason = reason.clone();
                }
            }
            Command::DrainReplica {
                name,
                replica,
                reason,
                at_ms,
            } => {
                let dep = self.model_mut(name)?;
                let r =
                    dep.instances
                        .get_mut(replica)
                        .ok_or_else(|| StateError::UnknownReplica {
                            name: name.clone(),
                            replica: *replica,
                        })?;
                if !r.draining() {
                    r.draining_since_ms = (*at_ms).max(1);
                    r.reason = reason.clone();
                }
                dep.refresh(*at_ms);
            }
            Command::RemoveReplica {
                name,
                replica,
                at_ms,
            } => {
                let dep = self.model_mut(name)?;
                dep.instances
                    .remove(replica)
                    .ok_or_else(|| StateError::UnknownReplica {
                        name: name.clone(),
                        replica: *replica,
                    })?;
                dep.refresh(*at_ms);
            }
            Command::UndeployModel { name } => {
                self.models
                    .remove(name)
                    .ok_or_else(|| StateError::UnknownModel(name.clone()))?;
            }
            Command::PutSetting { key, value } => {
                self.settings.insert(key.clone(), value.clone());
            }
            Command::DeleteSetting { key } => {
                self.settings
                    .remove(key)
                    .ok_or_else(|| StateError::UnknownSetting(key.clone()))?;
            }
            Command::CreateKey { key } => {
                if self.api_keys.contains_key(&key.id) {
                    return Err(StateError::KeyExists(key.id.clone()));
                }
                self.api_keys.insert(key.id.clone(), key.clone());
            }
            Command::RevokeKey { id } => {
                self.api_keys
                    .remove(id)
                    .ok_or_else(|| StateError::UnknownKey(id.clone()))?;
            }
        }
        Ok(())
    }

    fn model(&self, name: &str) -> Result<&Deployment, StateError> {
        self.models
            .get(name)
            .ok_or_else(|| StateError::UnknownModel(name.to_string()))
    }

    fn model_mut(&mut self, name: &str) -> Result<&mut Deployment, StateError> {
        self.models
            .get_mut(name)
            .ok_or_else(|| StateError::UnknownModel(name.to_string()))
    }

    /// The model, if `generation` is its current one.
    fn model_of(&self, name: &str, generation: u64) -> Result<&Deployment, StateError> {
        let dep = self.model(name)?;
        if dep.generation != generation {
            return Err(StateError::StaleGeneration {
                name: name.to_string(),
                current: dep.generation,
                got: generation,
            });
        }
        Ok(dep)
    }

    /// The replica of `name` placed under `epoch`.
    fn replica_at(&self, name: &str, epoch: u64) -> Result<&Replica, StateError> {
        let dep = self.model(name)?;
        dep.at_epoch(epoch).ok_or_else(|| StateError::StaleEpoch {
            name: name.to_string(),
            current: dep.instances.values().map(|r| r.epoch).max().unwrap_or(0),
            got: epoch,
        })
    }

    /// A placement names registered, healthy, uncordoned workers.
    fn check_placement(&self, placement: &Placement) -> Result<(), StateError> {
        for id in placement.stages.iter().flat_map(|s| s.workers()) {
            let w = self
                .workers
                .get(id)
                .ok_or_else(|| StateError::UnknownWorker(id.to_string()))?;
            if !w.healthy {
                return Err(StateError::UnhealthyWorker { id: w.id.clone() });
            }
            if w.cordoned {
                return Err(StateError::CordonedWorker { id: w.id.clone() });
            }
        }
        Ok(())
    }

    /// Worker `id` restarted: its shards are gone; so are the engine of a
    /// replica whose later stage it holds (it names the stage's address)
    /// and the pipeline links of its neighbouring stages (named by its
    /// registration), and every rank of a tensor-parallel group it is in
    /// (the group forms anew). Those shards load again.
    fn lose_shards_of(&mut self, id: &str, at_ms: u64) {
        let names: Vec<String> = self.models_on(id);
        for name in names {
            let dep = &self.models[&name];
            let Some(r) = dep.replica_on(id) else {
                continue;
            };
            let rid = r.id;
            let linked = crate::shard_spec::pipeline_linked(self, dep, &r.placement);
            let dep = self.models.get_mut(&name).expect("listed above");
            let r = dep.instances.get_mut(&rid).expect("found above");
            let stages = &r.placement.stages;
            let near = |i: usize| {
                stages[i].holds(id)
                    || i == 0
                    || (linked
                        && (i > 0 && stages[i - 1].holds(id)
                            || stages.get(i + 1).is_some_and(|s| s.holds(id))))
            };
            let lost: Vec<usize> = (0..stages.len()).filter(|&i| near(i)).collect();
            r.loaded.retain(|(s, _)| !lost.contains(&(*s as usize)));
            if r.state == ModelState::Ready {
                r.set_state(
                    ModelState::Loading,
                    format!("worker {id:?} restarted: reloading its shards"),
                    at_ms,
                );
            }
            dep.refresh(at_ms);
        }
    }

    fn worker_mut(&mut self, id: &str) -> Result<&mut WorkerInfo, StateError> {
        self.workers
            .get_mut(id)
            .ok_or_else(|| StateError::UnknownWorker(id.to_string()))
    }

    /// Models with a replica on worker `id`.
    pub fn models_on(&self, id: &str) -> Vec<String> {
        self.models
            .values()
            .filter(|m| m.replica_on(id).is_some())
            .map(|m| m.name.clone())
            .collect()
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
