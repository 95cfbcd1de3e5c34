//! The cluster state and the commands that change it. `apply` is
//! deterministic and pure over the state (time arrives inside commands), so
//! replicas applying the same committed log agree: this is the seam a Raft
//! group or an etcd log backs. Commands are serde-serializable log entries.

use std::collections::BTreeMap;

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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ModelState {
    Loading,
    Ready,
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub name: String,
    pub source: String,
    pub dtype: String,
    /// "none" or "int8" ("" in logs from before quantization: none).
    #[serde(default)]
    pub quantization: String,
    pub placement: Placement,
    pub state: ModelState,
    #[serde(default)]
    pub serving: Serving,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// A worker joins, or rejoins after a restart (same id, new details).
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
    Heartbeat {
        id: String,
        memory_free_bytes: u64,
        at_ms: u64,
    },
    /// Decided by the leader from missed heartbeats; applied as a fact.
    SetWorkerHealth {
        id: String,
        healthy: bool,
    },
    RemoveWorker {
        id: String,
    },
    DeployModel {
        name: String,
        source: String,
        dtype: String,
        #[serde(default)]
        quantization: String,
        placement: Placement,
        #[serde(default)]
        serving: Serving,
    },
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
                    },
                );
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
            Command::SetWorkerHealth { id, healthy } => self.worker_mut(id)?.healthy = *healthy,
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
            } => {
                if self.models.contains_key(name) {
                    return Err(StateError::ModelExists(name.clone()));
                }
                for id in placement.stages.iter().flat_map(|s| s.workers()) {
                    let w = self
                        .workers
                        .get(id)
                        .ok_or_else(|| StateError::UnknownWorker(id.to_string()))?;
                    if !w.healthy {
                        return Err(StateError::UnhealthyWorker { id: w.id.clone() });
                    }
                }
                self.models.insert(
                    name.clone(),
                    Deployment {
                        name: name.clone(),
                        source: source.clone(),
                        dtype: dtype.clone(),
                        quantization: quantization.clone(),
                        placement: placement.clone(),
                        state: ModelState::Loading,
                        serving: serving.clone(),
                    },
                );
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
mod tests {
    use super::*;
    use crate::placement::Stage;

    fn register(id: &str, at_ms: u64) -> Command {
        Command::RegisterWorker {
            id: id.into(),
            address: format!("http://{id}:50061"),
            device: "cpu".into(),
            memory_total_bytes: 100,
            memory_free_bytes: 90,
            at_ms,
            collective_address: String::new(),
        }
    }

    fn deploy(name: &str, workers: &[&str]) -> Command {
        let stages = workers
            .iter()
            .enumerate()
            .map(|(i, w)| Stage {
                worker: w.to_string(),
                layer_start: i as u32 * 10,
                layer_end: (i as u32 + 1) * 10,
                embed: i == 0,
                head: i + 1 == workers.len(),
                bytes: 10,
                ..Default::default()
            })
            .collect();
        Command::DeployModel {
            name: name.into(),
            source: "smollm2".into(),
            dtype: "f32".into(),
            quantization: "none".into(),
            placement: Placement {
                stages,
                ..Default::default()
            },
            serving: Serving::default(),
        }
    }

    fn log() -> Vec<Command> {
        vec![
            register("a", 1),
            register("b", 2),
            Command::Heartbeat {
                id: "a".into(),
                memory_free_bytes: 50,
                at_ms: 10,
            },
            deploy("m", &["a", "b"]),
            Command::SetModelState {
                name: "m".into(),
                state: ModelState::Ready,
            },
            Command::SetWorkerHealth {
                id: "b".into(),
                healthy: false,
            },
            deploy("n", &["b"]),
            Command::RemoveWorker { id: "a".into() },
            register("b", 20),
        ]
    }

    #[test]
    fn replicas_applying_the_same_serialized_log_agree() {
        let wire: Vec<String> = log()
            .iter()
            .map(|c| serde_json::to_string(c).unwrap())
            .collect();
        let run = || {
            let mut s = ClusterState::default();
            let results: Vec<_> = wire
                .iter()
                .map(|j| s.apply(&serde_json::from_str(j).unwrap()))
                .collect();
            (s, results)
        };
        let (a, ra) = run();
        let (b, rb) = run();
        assert_eq!(a, b);
        assert_eq!(ra, rb);
        assert_eq!(a.applied, 9);
        // Deploying on the unhealthy worker and removing a busy one were refused.
        assert_eq!(ra[6], Err(StateError::UnhealthyWorker { id: "b".into() }));
        assert_eq!(
            ra[7],
            Err(StateError::WorkerInUse {
                id: "a".into(),
                models: vec!["m".into()]
            })
        );
        assert_eq!(a.models["m"].state, ModelState::Ready);
        assert!(!a.models.contains_key("n"));
        // A restarted worker re-registers healthy with its new details.
        assert!(a.workers["b"].healthy);
        assert_eq!(a.workers["b"].last_heartbeat_ms, 20);
        assert_eq!(a.workers["a"].memory_free_bytes, 50);
    }

    #[test]
    fn unknown_names_are_errors_that_leave_the_state_unchanged() {
        let mut s = ClusterState::default();
        s.apply(&register("a", 1)).unwrap();
        let before = s.clone();
        assert_eq!(
            s.apply(&Command::UndeployModel { name: "x".into() }),
            Err(StateError::UnknownModel("x".into()))
        );
        assert_eq!(
            s.apply(&deploy("m", &["zz"])),
            Err(StateError::UnknownWorker("zz".into()))
        );
        assert_eq!(s.workers, before.workers);
        assert_eq!(s.models, before.models);
        s.apply(&deploy("m", &["a"])).unwrap();
        assert_eq!(
            s.apply(&deploy("m", &["a"])),
            Err(StateError::ModelExists("m".into()))
        );
        s.apply(&Command::UndeployModel { name: "m".into() })
            .unwrap();
        s.apply(&Command::RemoveWorker { id: "a".into() }).unwrap();
        assert!(s.workers.is_empty() && s.models.is_empty());
    }
}
