//! The cluster state and the commands that change it. `apply` is
//! deterministic and pure over the state (time arrives inside commands), so
//! replicas applying the same committed log agree: this is the seam a Raft
//! group or an etcd log backs. Commands are serde-serializable log entries.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ModelState {
    /// Asked for, not placed yet (`Deployment::reason` says what it waits
    /// for).
    Pending,
    /// Placed; shards are loading.
    Loading,
    Ready,
    /// Will not converge without an edit (a shard the workers refuse to
    /// load); undeploy it.
    Failed(String),
}

/// How the operator asked for a model to be split (0 / empty: automatic).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParallelShape {
    pub stages: u32,
    pub layer_split: Vec<u32>,
    pub tensor_parallel: u32,
}

/// One deployed model: what the operator asked for (desired) beside what
/// the reconciler has made of it so far (observed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub name: String,
    // --- desired ---
    pub source: String,
    pub dtype: String,
    /// "none" or "int8" ("" in logs from before quantization: none).
    #[serde(default)]
    pub quantization: String,
    #[serde(default)]
    pub serving: Serving,
    #[serde(default)]
    pub shape: ParallelShape,
    /// Changes on every edit of the desired part (the log index of the
    /// edit).
    #[serde(default)]
    pub generation: u64,
    // --- observed ---
    /// Empty until placed.
    pub placement: Placement,
    /// The log index of the current placement: carried by every shard
    /// command, so a worker tells a stale command (or a stale request)
    /// from a current one. 0: not placed.
    #[serde(default)]
    pub epoch: u64,
    /// (stage, rank) pairs loaded under `epoch`.
    #[serde(default)]
    pub loaded: BTreeSet<(u32, u32)>,
    pub state: ModelState,
    /// What it waits for, or why the last attempt failed; empty when Ready.
    #[serde(default)]
    pub reason: String,
    /// Unix ms since `state` (as stamped by the leader).
    #[serde(default)]
    pub since_ms: u64,
}

impl Deployment {
    /// Every (stage, rank) of the placement.
    pub fn shards(&self) -> impl Iterator<Item = (u32, u32, &str)> {
        self.placement.stages.iter().enumerate().flat_map(|(i, s)| {
            s.workers()
                .enumerate()
                .map(move |(r, w)| (i as u32, r as u32, w))
        })
    }

    pub fn placed(&self) -> bool {
        !self.placement.stages.is_empty()
    }

    fn set_state(&mut self, state: ModelState, reason: String, at_ms: u64) {
        if self.state != state {
            self.since_ms = at_ms;
        }
        self.state = state;
        self.reason = reason;
    }
}

/// How a deployed model is served: its KV cache and engine limits (0 in a
/// request means the default; stored resolved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serving {
    pub kv_blocks: u32,
    pub block_size: u32,
    pub max_batch_tokens: u32,
    pub max_running: u32,
    pub max_waiting: u32,
    pub prefix_caching: bool,
    /// "auto", "grpc" or "link" (see `ServingOptions.pipeline_transport`);
    /// "" in logs from before it: auto.
    #[serde(default)]
    pub pipeline_transport: String,
}

impl Default for Serving {
    fn default() -> Self {
        use llmos_meta::serving as d;
        Serving {
            kv_blocks: d::DEFAULT_KV_BLOCKS,
            block_size: d::DEFAULT_BLOCK_SIZE,
            max_batch_tokens: d::DEFAULT_MAX_BATCH_TOKENS,
            max_running: d::DEFAULT_MAX_RUNNING,
            max_waiting: d::DEFAULT_MAX_WAITING,
            prefix_caching: true,
            pipeline_transport: d::DEFAULT_PIPELINE_TRANSPORT.into(),
        }
    }
}

/// A replicated log entry. Liveness is not in the log beyond its
/// transitions: heartbeats renew a lease in the leader's memory
/// (`crate::leases`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// A worker joins, or rejoins after a restart (same id, new details):
    /// the shards it held are lost, and so is whatever its pipeline
    /// neighbours linked to it (they reload).
    RegisterWorker {
        id: String,
        address: String,
        device: String,
        memory_total_bytes: u64,
        memory_free_bytes: u64,
        at_ms: u64,
        #[serde(default)]
        collective_address: String,
    },
    /// Only in logs from before leases (a heartbeat per entry); applied as
    /// before, never proposed now.
    Heartbeat {
        id: String,
        memory_free_bytes: u64,
        at_ms: u64,
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
    /// Records what the operator asks for; the reconciler places it. (Logs
    /// from before the reconciler carry a placement, applied as placed.)
    DeployModel {
        name: String,
        source: String,
        dtype: String,
        #[serde(default)]
        quantization: String,
        #[serde(default)]
        placement: Placement,
        #[serde(default)]
        serving: Serving,
        #[serde(default)]
        shape: ParallelShape,
        #[serde(default)]
        at_ms: u64,
    },
    /// The reconciler's placement of generation `generation`: a new epoch,
    /// nothing loaded under it yet.
    PlaceModel {
        name: String,
        generation: u64,
        placement: Placement,
        at_ms: u64,
    },
    /// A worker answered a load of (stage, rank) under `epoch`; the model
    /// is Ready when every shard is.
    ShardLoaded {
        name: String,
        epoch: u64,
        stage: u32,
        rank: u32,
        at_ms: u64,
    },
    /// What the reconciler waits for, or why an attempt failed; `failed`:
    /// it will not retry (Failed).
    ModelProgress {
        name: String,
        generation: u64,
        reason: String,
        failed: bool,
        at_ms: u64,
    },
    /// Only in logs from before the reconciler.
    SetModelState {
        name: String,
        state: ModelState,
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
            } => {
                let rejoined = self.workers.contains_key(id);
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
                    },
                );
                if rejoined {
                    self.lose_shards_of(id, *at_ms);
                }
            }
            Command::Heartbeat {
                id,
                memory_free_bytes,
                at_ms,
            } => {
                let w = self.worker_mut(id)?;
                w.memory_free_bytes = *memory_free_bytes;
                w.last_heartbeat_ms = w.last_heartbeat_ms.max(*at_ms);
                w.healthy = true;
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
            Command::DeployModel {
                name,
                source,
                dtype,
                quantization,
                placement,
                serving,
                shape,
                at_ms,
            } => {
                if self.models.contains_key(name) {
                    return Err(StateError::ModelExists(name.clone()));
                }
                if !placement.stages.is_empty() {
                    self.check_placement(placement)?;
                }
                let mut dep = Deployment {
                    name: name.clone(),
                    source: source.clone(),
                    dtype: dtype.clone(),
                    quantization: quantization.clone(),
                    serving: serving.clone(),
                    shape: shape.clone(),
                    generation: index,
                    placement: Placement::default(),
                    epoch: 0,
                    loaded: BTreeSet::new(),
                    state: ModelState::Pending,
                    reason: String::new(),
                    since_ms: *at_ms,
                };
                if !placement.stages.is_empty() {
                    dep.placement = placement.clone();
                    dep.epoch = index;
                    dep.state = ModelState::Loading;
                }
                self.models.insert(name.clone(), dep);
            }
            Command::PlaceModel {
                name,
                generation,
                placement,
                at_ms,
            } => {
                self.model_of(name, *generation)?;
                self.check_placement(placement)?;
                let dep = self.models.get_mut(name).expect("checked above");
                dep.placement = Placement {
                    group_nonce: index,
                    ..placement.clone()
                };
                dep.epoch = index;
                dep.loaded.clear();
                dep.set_state(ModelState::Loading, String::new(), *at_ms);
            }
            Command::ShardLoaded {
                name,
                epoch,
                stage,
                rank,
                at_ms,
            } => {
                let dep = self.model_at(name, *epoch)?;
                if !dep.shards().any(|(s, r, _)| (s, r) == (*stage, *rank)) {
                    return Err(StateError::NoSuchShard {
                        name: name.clone(),
                        stage: *stage,
                        rank: *rank,
                    });
                }
                let dep = self.models.get_mut(name).expect("checked above");
                dep.loaded.insert((*stage, *rank));
                if dep.loaded.len() == dep.shards().count() {
                    dep.set_state(ModelState::Ready, String::new(), *at_ms);
                }
            }
            Command::ModelProgress {
                name,
                generation,
                reason,
                failed,
                at_ms,
            } => {
                self.model_of(name, *generation)?;
                let dep = self.models.get_mut(name).expect("checked above");
                if *failed {
                    dep.set_state(ModelState::Failed(reason.clone()), reason.clone(), *at_ms);
                } else {
                    dep.reason = reason.clone();
                }
            }
            Command::SetModelState { name, state } => {
                self.models
                    .get_mut(name)
                    .ok_or_else(|| StateError::UnknownModel(name.clone()))?
                    .state = state.clone();
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
        }
        Ok(())
    }

    fn model(&self, name: &str) -> Result<&Deployment, StateError> {
        self.models
            .get(name)
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

    fn model_at(&self, name: &str, epoch: u64) -> Result<&Deployment, StateError> {
        let dep = self.model(name)?;
        if dep.epoch != epoch {
            return Err(StateError::StaleEpoch {
                name: name.to_string(),
                current: dep.epoch,
                got: epoch,
            });
        }
        Ok(dep)
    }

    /// A placement names registered, healthy workers.
    fn check_placement(&self, placement: &Placement) -> Result<(), StateError> {
        for id in placement.stages.iter().flat_map(|s| s.workers()) {
            let w = self
                .workers
                .get(id)
                .ok_or_else(|| StateError::UnknownWorker(id.to_string()))?;
            if !w.healthy {
                return Err(StateError::UnhealthyWorker { id: w.id.clone() });
            }
        }
        Ok(())
    }

    /// Worker `id` restarted: its shards are gone; so are the engine of a
    /// model whose later stage it holds (it names the stage's address) and
    /// the pipeline links of its neighbouring stages (named by its
    /// registration), and every rank of a tensor-parallel group it is in
    /// (the group forms anew). Those shards load again.
    fn lose_shards_of(&mut self, id: &str, at_ms: u64) {
        let names: Vec<String> = self.models_on(id);
        for name in names {
            let linked = crate::shard_spec::pipeline_linked(self, &self.models[&name]);
            let dep = self.models.get_mut(&name).expect("listed above");
            let stages = &dep.placement.stages;
            let near = |i: usize| {
                stages[i].holds(id)
                    || i == 0
                    || (linked
                        && (i > 0 && stages[i - 1].holds(id)
                            || stages.get(i + 1).is_some_and(|s| s.holds(id))))
            };
            let lost: Vec<usize> = (0..stages.len()).filter(|&i| near(i)).collect();
            dep.loaded.retain(|(s, _)| !lost.contains(&(*s as usize)));
            if dep.state == ModelState::Ready {
                dep.set_state(
                    ModelState::Loading,
                    format!("worker {id:?} restarted: reloading its shards"),
                    at_ms,
                );
            }
        }
    }

    fn worker_mut(&mut self, id: &str) -> Result<&mut WorkerInfo, StateError> {
        self.workers
            .get_mut(id)
            .ok_or_else(|| StateError::UnknownWorker(id.to_string()))
    }

    /// Models with a stage on worker `id`.
    pub fn models_on(&self, id: &str) -> Vec<String> {
        self.models
            .values()
            .filter(|m| m.placement.stages.iter().any(|s| s.holds(id)))
            .map(|m| m.name.clone())
            .collect()
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
