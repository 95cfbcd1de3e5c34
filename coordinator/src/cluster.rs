//! Shared coordinator state: the replicated cluster state behind
//! `propose`/`read` (a [`MetaStore`]: Raft or etcd), plus what is not
//! replicated: tokenizers and configs of deployed models (opened on first
//! use on every replica), and gRPC clients of workers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llmos_meta::{ModelConfig, ModelSpec, OpenedModel, Tokenizer};
use llmos_proto::worker::v1::registry_client::RegistryClient;
use llmos_proto::worker::v1::worker_client::WorkerClient;
use tonic::transport::{Channel, Endpoint};

use crate::error::{CoordError, Result};
use crate::leases::Leases;
use crate::router::Router;
use crate::state::{ClusterState, Command, StateError};
use crate::store::{MetaStore, StoreConfig};

#[derive(Debug, Clone)]
pub struct Config {
    /// How often workers heartbeat.
    pub heartbeat_interval: Duration,
    /// A worker's lease: without a heartbeat for this long it is marked
    /// unhealthy.
    pub heartbeat_timeout: Duration,
    /// How long a worker stays unhealthy before its shards are placed on
    /// other workers (it is gone).
    pub worker_grace_period: Duration,
    /// How often the reconciler passes over the state (it also runs at
    /// once after a deploy and after each load).
    pub reconcile_interval: Duration,
    /// Deadline of one forward step on one stage.
    pub step_timeout: Duration,
    /// Deadline of loading one shard.
    pub load_timeout: Duration,
    pub connect_timeout: Duration,
    /// `max_new_tokens` when a request gives none (the cluster setting
    /// `generate.default_max_new_tokens` overrides it).
    pub default_max_new_tokens: usize,
    /// How long a replica being removed (scale-down, drain) may take to
    /// finish its requests before it is unloaded anyway.
    pub drain_timeout: Duration,
    /// The built-in autoscaler's thresholds (for deployments that ask).
    pub autoscale: crate::autoscaler::Policy,
    /// Route round-robin instead of by load and prefix (the cluster
    /// setting `routing.policy` overrides it).
    pub round_robin: bool,
    /// How many times a request may move to another replica after the
    /// one serving it failed mid-stream (0: never; it then fails).
    pub migration_limit: u32,
    /// How long a request whose replica failed waits for a replica to
    /// serve it (another one, or the same once its lost part is replaced).
    pub migration_timeout: Duration,
    /// Where the cluster state is kept.
    pub store: StoreConfig,
    /// Also record metrics under vLLM's names (`--metrics-compat vllm`).
    pub vllm_metrics: bool,
    /// API keys: required or not, the bootstrap admin key (`crate::auth`).
    /// Off by default here (tests, embedding); the binary turns it on
    /// unless started with `--no-auth`.
    pub auth: crate::auth::AuthConfig,
    /// Largest public gRPC request message, in bytes (OUT_OF_RANGE naming
    /// the limit above it).
    pub grpc_max_message_bytes: usize,
    /// Streams one client connection may have open at once.
    pub max_streams_per_connection: u32,
    /// Where the internal plane (Registry, Peer) listens when apart from
    /// the public port (set by `serve_planes`; status reports it).
    pub internal_plane: Option<std::net::SocketAddr>,
    /// Mutual TLS on the internal plane (Raft peers, the registry, calls to
    /// workers): this coordinator's certificate and the CA. None: plaintext
    /// (the binary requires `--insecure` for that).
    pub tls: Option<Arc<llmos_tls::Tls>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(10),
            worker_grace_period: Duration::from_secs(30),
            reconcile_interval: Duration::from_millis(500),
            step_timeout: Duration::from_secs(30),
            load_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(3),
            default_max_new_tokens: 256,
            drain_timeout: Duration::from_secs(300),
            autoscale: Default::default(),
            round_robin: false,
            migration_limit: 3,
            migration_timeout: Duration::from_secs(60),
            store: StoreConfig::default(),
            vllm_metrics: false,
            auth: Default::default(),
            grpc_max_message_bytes: 8 << 20,
            max_streams_per_connection: 1024,
            internal_plane: None,
            tls: None,
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
    pub store: Arc<dyn MetaStore>,
    /// Worker leases (kept on the leader).
    pub leases: Leases,
    /// Wakes the reconciler before its next tick.
    pub wake: tokio::sync::Notify,
    /// Which replica serves a request (this coordinator's view).
    pub router: Arc<Router>,
    models: Mutex<HashMap<String, Arc<ModelRuntime>>>,
    clients: Mutex<HashMap<String, WorkerClient<Channel>>>,
    /// The leader's registry, for heartbeats a follower receives.
    leader_registry: Mutex<Option<(String, RegistryClient<Channel>)>>,
    /// Requests this coordinator moved to another replica mid-stream.
    migrations: std::sync::atomic::AtomicU64,
    /// Proposals the store failed to commit (no leader, timeout, a leader
    /// change), not those the state machine refused.
    proposals_failed: std::sync::atomic::AtomicU64,
    /// Workers a stream found unreachable since the reconciler's last
    /// pass: it checks at once whether their process is gone.
    suspects: Mutex<std::collections::HashSet<String>>,
    /// What `/metrics` reports.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Tenants' token buckets and running requests on this coordinator.
    pub quotas: Arc<crate::quota::Quotas>,
}

impl Cluster {
    pub fn new(config: Config, store: Arc<dyn MetaStore>) -> Arc<Self> {
        let metrics = crate::metrics::Metrics::new(config.vllm_metrics);
        Arc::new(Cluster {
            router: Arc::new(Router::default()),
            config,
            store,
            leases: Leases::default(),
            wake: tokio::sync::Notify::new(),
            models: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            leader_registry: Mutex::new(None),
            migrations: Default::default(),
            proposals_failed: Default::default(),
            suspects: Default::default(),
            metrics,
            quotas: Default::default(),
        })
    }

    /// A stream found `worker` unreachable: the reconciler (on the
    /// leader) checks at once whether its process is gone, instead of
    /// waiting for its lease to lapse.
    pub fn suspect(&self, worker: &str) {
        self.suspects.lock().unwrap().insert(worker.to_string());
        self.wake.notify_one();
    }

    /// The workers suspected since the last call.
    pub fn take_suspects(&self) -> std::collections::HashSet<String> {
        std::mem::take(&mut *self.suspects.lock().unwrap())
    }

    pub fn count_migration(&self) {
        self.migrations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Requests this coordinator moved to another replica mid-stream since
    /// it started.
    pub fn migrations(&self) -> u64 {
        self.migrations.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Wall-clock milliseconds: the time stamped into commands (replicas
    /// compare heartbeats stamped by each other).
    pub fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// Commits a command through the store; the state machine's refusal
    /// comes back as `CoordError::State`.
    pub async fn propose(&self, cmd: Command) -> Result<()> {
        let verdict = self.store.propose(cmd).await.inspect_err(|_| {
            self.proposals_failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })?;
        verdict?;
        Ok(())
    }

    /// Proposals this coordinator made that the store failed to commit.
    pub fn proposals_failed(&self) -> u64 {
        self.proposals_failed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The state as applied on this replica (request routing): shared and
    /// immutable, so a request costs an `Arc` clone, not a deep copy.
    pub fn read(&self) -> Arc<ClusterState> {
        self.store.local()
    }

    /// The state including every write committed before the call.
    pub async fn read_fresh(&self) -> Result<Arc<ClusterState>> {
        self.store.sync().await?;
        Ok(self.store.local())
    }

    /// `max_new_tokens` for requests that give none.
    pub fn default_max_new_tokens(&self) -> usize {
        self.read()
            .settings
            .get(crate::settings::SETTING_DEFAULT_MAX_NEW_TOKENS)
            .and_then(|v| v.parse().ok())
            .unwrap_or(self.config.default_max_new_tokens)
    }

    /// Whether requests go round-robin over replicas (else by load and
    /// prompt prefix).
    pub fn round_robin(&self) -> bool {
        match self.read().settings.get(crate::settings::SETTING_ROUTING) {
            Some(v) => v == "round-robin",
            None => self.config.round_robin,
        }
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

    /// The runtime of a deployed model, opened here on first use (a
    /// replica that did not handle the deploy opens it from the source).
    pub fn model(&self, name: &str) -> Option<Arc<ModelRuntime>> {
        if let Some(rt) = self.models.lock().unwrap().get(name).cloned() {
            return Some(rt);
        }
        let source = self.read().models.get(name)?.source.clone();
        match self.open_model(name, &source) {
            Ok(rt) => Some(rt),
            Err(e) => {
                tracing::error!(model = name, %source, error = %e, "opening a deployed model's metadata failed");
                None
            }
        }
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
        let channel = llmos_tls::client::connect(
            endpoint,
            self.config.tls.as_ref(),
            llmos_tls::Role::Worker,
            self.config.connect_timeout,
        )
        .await
        .map_err(|e| unavailable(llmos_tls::error_chain(&e)))?;
        let client = WorkerClient::new(channel).max_decoding_message_size(256 << 20);
        self.clients.lock().unwrap().insert(address, client.clone());
        Ok(client)
    }

    /// Drops a cached client (after a failure, or when a worker re-registers).
    pub fn forget_client(&self, address: &str) {
        self.clients.lock().unwrap().remove(address);
    }

    /// A client of the leader's registry (heartbeats reach the leader's
    /// leases through a follower); None when no leader is known or this
    /// coordinator is it.
    pub fn leader_registry(&self) -> Option<RegistryClient<Channel>> {
        let leader = self.store.status().leader;
        if leader.is_empty() || self.store.is_leader() {
            return None;
        }
        let mut cached = self.leader_registry.lock().unwrap();
        if let Some((_, c)) = cached.as_ref().filter(|(a, _)| *a == leader) {
            return Some(c.clone());
        }
        let channel = llmos_tls::client::connect_lazy(
            Endpoint::from_shared(leader.clone())
                .ok()?
                .connect_timeout(self.config.connect_timeout),
            self.config.tls.as_ref(),
            llmos_tls::Role::Coordinator,
            self.config.connect_timeout,
        );
        let client = RegistryClient::new(channel);
        *cached = Some((leader, client.clone()));
        Some(client)
    }
}
