//! Shared coordinator state: the cluster state machine behind `propose`
//! (single node for now: the Raft issue replaces this store with a
//! replicated one), plus what is not replicated: tokenizers and configs of
//! deployed models, and gRPC clients of workers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llmos_meta::{ModelConfig, ModelSpec, OpenedModel, Tokenizer};
use llmos_proto::worker::v1::worker_client::WorkerClient;
use tonic::transport::{Channel, Endpoint};

use crate::error::{CoordError, Result};
use crate::state::{ClusterState, Command, StateError};

#[derive(Debug, Clone)]
pub struct Config {
    /// How often workers heartbeat.
    pub heartbeat_interval: Duration,
    /// Missed-heartbeat time after which a worker is marked unhealthy.
    pub heartbeat_timeout: Duration,
    /// Deadline of one forward step on one stage.
    pub step_timeout: Duration,
    /// Deadline of loading one shard.
    pub load_timeout: Duration,
    pub connect_timeout: Duration,
    /// `max_new_tokens` when a request gives none.
    pub default_max_new_tokens: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(10),
            step_timeout: Duration::from_secs(30),
            load_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(3),
            default_max_new_tokens: 256,
        }
    }
}

/// What the coordinator knows of a deployed model besides its placement.
pub struct ModelRuntime {
    pub config: ModelConfig,
    pub tokenizer: Option<Tokenizer>,
}

pub struct Cluster {
    pub config: Config,
    state: Mutex<ClusterState>,
    models: Mutex<HashMap<String, Arc<ModelRuntime>>>,
    clients: Mutex<HashMap<String, WorkerClient<Channel>>>,
    started: std::time::Instant,
}

impl Cluster {
    pub fn new(config: Config) -> Arc<Self> {
        Arc::new(Cluster {
            config,
            state: Mutex::new(ClusterState::default()),
            models: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            started: std::time::Instant::now(),
        })
    }

    /// Milliseconds since start: the time stamped into commands.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Commits and applies a command.
    pub fn propose(&self, cmd: Command) -> Result<(), StateError> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .apply(&cmd)
    }

    /// A consistent copy of the state.
    pub fn read(&self) -> ClusterState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Opens a model's config and tokenizer (no weights) and keeps them.
    pub fn open_model(&self, name: &str, source: &str) -> Result<Arc<ModelRuntime>> {
        let opened = OpenedModel::open(&ModelSpec::parse(source)?)?;
        let rt = Arc::new(ModelRuntime {
            config: opened.config,
            tokenizer: opened.tokenizer,
        });
        self.models
            .lock()
            .unwrap()
            .insert(name.to_string(), rt.clone());
        Ok(rt)
    }

    pub fn model(&self, name: &str) -> Option<Arc<ModelRuntime>> {
        self.models.lock().unwrap().get(name).cloned()
    }

    pub fn forget_model(&self, name: &str) {
        self.models.lock().unwrap().remove(name);
    }

    /// A client of worker `id` (connected lazily, reused).
    pub async fn worker(&self, id: &str) -> Result<WorkerClient<Channel>> {
        let address = self
            .read()
            .workers
            .get(id)
            .map(|w| w.address.clone())
            .ok_or_else(|| StateError::UnknownWorker(id.to_string()))?;
        if let Some(c) = self.clients.lock().unwrap().get(&address) {
            return Ok(c.clone());
        }
        let unavailable = |reason: String| CoordError::WorkerUnavailable {
            worker: id.to_string(),
            address: address.clone(),
            reason,
        };
        let endpoint = Endpoint::from_shared(address.clone())
            .map_err(|e| unavailable(e.to_string()))?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let client = WorkerClient::new(channel).max_decoding_message_size(256 << 20);
        self.clients.lock().unwrap().insert(address, client.clone());
        Ok(client)
    }

    /// Drops a cached client (after a failure, or when a worker re-registers).
    pub fn forget_client(&self, address: &str) {
        self.clients.lock().unwrap().remove(address);
    }

    /// Marks workers unhealthy whose heartbeats stopped.
    pub fn check_heartbeats(&self) {
        let now = self.now_ms();
        let timeout = self.config.heartbeat_timeout.as_millis() as u64;
        let stale: Vec<String> = self
            .read()
            .workers
            .values()
            .filter(|w| w.healthy && now.saturating_sub(w.last_heartbeat_ms) > timeout)
            .map(|w| w.id.clone())
            .collect();
        for id in stale {
            tracing::warn!(worker = %id, "missed heartbeats: marking unhealthy");
            let _ = self.propose(Command::SetWorkerHealth { id, healthy: false });
        }
    }
}
