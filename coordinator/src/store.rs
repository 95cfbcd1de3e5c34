//! [`MetaStore`]: where the cluster state machine lives. Two real
//! implementations: [`RaftStore`] (coordinator replicas form a Raft group,
//! see [`crate::consensus`]) and [`crate::etcd::EtcdStore`] (an external
//! etcd holds the command log). Every coordinator write goes through
//! `propose`; request routing reads `local`; reads that must be fresh call
//! `sync` first.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::consensus::{Bootstrap, GrpcTransport, PeerService, RaftConfig, RaftError, RaftNode};
use crate::state::{ClusterState, Command, StateError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Raft(#[from] RaftError),
    #[error("etcd at {endpoints}: {reason}")]
    Etcd { endpoints: String, reason: String },
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Storage(#[from] crate::consensus::log_store::LogError),
    #[error("invalid control-plane configuration: {0}")]
    Config(String),
}

/// One member of the control plane, as reported.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberInfo {
    pub id: u64,
    pub address: String,
    pub leader: bool,
    /// Catching up; promoted to voter by the leader once it has.
    pub learner: bool,
}

/// What `ClusterStatus` reports about the store.
#[derive(Debug, Clone, Default)]
pub struct ControlPlane {
    pub store: &'static str,
    pub node_id: u64,
    pub role: String,
    pub leader_id: u64,
    pub leader: String,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    /// Times this coordinator saw the leader change to another (the first
    /// leader it learns of counts).
    pub leader_changes: u64,
    pub members: Vec<MemberInfo>,
}

#[tonic::async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// Commits `cmd` and returns the state machine's verdict once this
    /// coordinator has applied it (so it reads its own writes).
    async fn propose(&self, cmd: Command) -> Result<Result<(), StateError>, StoreError>;
    /// Waits until this coordinator has applied every write committed
    /// before the call (linearizable read point).
    async fn sync(&self) -> Result<(), StoreError>;
    /// The state as applied here (may trail the leader slightly): a shared,
    /// immutable view (an `Arc` clone, not a copy).
    fn local(&self) -> Arc<ClusterState>;
    /// Whether this coordinator runs the leader-only duties (heartbeat
    /// watchdog).
    fn is_leader(&self) -> bool;
    fn status(&self) -> ControlPlane;
    async fn add_member(&self, id: u64, address: &str) -> Result<(), StoreError>;
    async fn remove_member(&self, id: u64) -> Result<(), StoreError>;
    /// Leaves cleanly (stops the Ready loop; resigns an etcd election).
    async fn shutdown(&self);
}

/// Which store a coordinator uses, from its flags.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    Raft(RaftSettings),
    Etcd(EtcdSettings),
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::Raft(RaftSettings::default())
    }
}

/// An etcd-backed control plane (`--store etcd`): `etcd.rs`.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    pub cluster_id: String,
    /// This coordinator's name in the election (its address, typically).
    pub name: String,
    pub lease_ttl: Duration,
    pub request_timeout: Duration,
    /// Applied log entries between snapshots.
    pub snapshot_entries: u64,
}

impl EtcdSettings {
    pub fn new(endpoints: Vec<String>, cluster_id: &str, name: &str) -> Self {
        EtcdSettings {
            endpoints,
            cluster_id: cluster_id.to_string(),
            name: name.to_string(),
            lease_ttl: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            snapshot_entries: 1000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub node_id: u64,
    pub cluster_id: String,
    /// None: a temporary directory (state lost at exit; for trying things).
    pub data_dir: Option<PathBuf>,
    /// Founding members (id → address) on first boot; empty: this node alone.
    pub peers: BTreeMap<u64, String>,
    /// Start empty and wait to be added (`AddMember`) instead of founding.
    pub join: bool,
    /// Address peers reach this node at; default `http://<listen address>`.
    pub advertise: Option<String>,
    pub snapshot_entries: u64,
    pub tick: Duration,
    pub election_ticks: usize,
    pub request_timeout: Duration,
    pub sync: bool,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            node_id: 1,
            cluster_id: "llmos".into(),
            data_dir: None,
            peers: BTreeMap::new(),
            join: false,
            advertise: None,
            snapshot_entries: 1000,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            request_timeout: Duration::from_secs(5),
            sync: true,
        }
    }
}

/// Parses `1=http://a:50051,2=http://b:50051`.
pub fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("peer {part:?} is not ID=ADDRESS"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("peer id {id:?} is not a number"))?;
        let addr = addr.trim();
        let addr = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        if peers.insert(id, addr).is_some() {
            return Err(format!("peer id {id} appears twice"));
        }
    }
    Ok(peers)
}

pub struct RaftStore {
    node: Arc<RaftNode>,
    /// Keeps a temporary data directory alive as long as the store.
    _tmp: Option<tempfile::TempDir>,
}

impl RaftStore {
    /// Opens the data directory and starts the replica; returns the `Peer`
    /// service the coordinator's gRPC server must host. Needs a tokio
    /// runtime (the gRPC transport's sender tasks run on it).
    pub fn start(
        s: &RaftSettings,
        listen: std::net::SocketAddr,
        tls: Option<Arc<llmos_tls::Tls>>,
    ) -> Result<(Arc<RaftStore>, PeerService), StoreError> {
        let advertise = s
            .advertise
            .clone()
            .unwrap_or_else(|| format!("http://{listen}"));
        let (dir, tmp) = match &s.data_dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("llmos-coordinator-")
                    .tempdir()
                    .map_err(|e| StoreError::Config(format!("temporary data dir: {e}")))?;
                tracing::warn!(dir = %t.path().display(), "no --data-dir: cluster state lives in a temporary directory and is lost at exit");
                (t.path().to_path_buf(), Some(t))
            }
        };
        let bootstrap = if s.join {
            Bootstrap::Join
        } else if s.peers.is_empty() {
            Bootstrap::Peers([(s.node_id, advertise.clone())].into())
        } else {
            Bootstrap::Peers(s.peers.clone())
        };
        let mut cfg = RaftConfig::new(s.node_id, &s.cluster_id, dir, bootstrap);
        cfg.tick = s.tick;
        cfg.election_ticks = s.election_ticks;
        cfg.heartbeat_ticks = (s.election_ticks / 5).max(1);
        cfg.snapshot_entries = s.snapshot_entries;
        cfg.request_timeout = s.request_timeout;
        // A temporary directory is lost at exit anyway: syncing it buys no
        // durability, only stalls (seconds, on a disk busy with other
        // processes' reads).
        cfg.sync = s.sync && tmp.is_none();
        cfg.validate().map_err(StoreError::Config)?;
        let transport = GrpcTransport::new(&s.cluster_id, s.node_id, &advertise, tls);
        let node = RaftNode::start(cfg, transport.clone())?;
        let peer = PeerService {
            cluster_id: s.cluster_id.clone(),
            node: node.clone(),
            transport,
            // `serve_planes` gives it the server's stop signal.
            stopping: tokio::sync::watch::channel(false).1,
        };
        Ok((Arc::new(RaftStore { node, _tmp: tmp }), peer))
    }

    /// Wraps a replica started elsewhere (tests over the in-memory network).
    pub fn from_node(node: Arc<RaftNode>) -> Arc<RaftStore> {
        Arc::new(RaftStore { node, _tmp: None })
    }

    pub fn node(&self) -> &Arc<RaftNode> {
        &self.node
    }
}

#[tonic::async_trait]
impl MetaStore for RaftStore {
    async fn propose(&self, cmd: Command) -> Result<Result<(), StateError>, StoreError> {
        Ok(self.node.propose(&cmd).await?)
    }

    async fn sync(&self) -> Result<(), StoreError> {
        Ok(self.node.read_index().await?)
    }

    fn local(&self) -> Arc<ClusterState> {
        self.node.state()
    }

    fn is_leader(&self) -> bool {
        self.node.is_leader()
    }

    fn status(&self) -> ControlPlane {
        let v = self.node.view();
        ControlPlane {
            store: "raft",
            node_id: v.node_id,
            role: v.role,
            leader_id: v.leader_id,
            leader: v
                .state
                .members
                .get(&v.leader_id)
                .cloned()
                .unwrap_or_default(),
            term: v.term,
            commit_index: v.commit,
            applied_index: v.applied,
            snapshot_index: v.snapshot_index,
            leader_changes: v.leader_changes,
            members: v
                .state
                .members
                .iter()
                .map(|(&id, a)| MemberInfo {
                    id,
                    address: a.clone(),
                    leader: id == v.leader_id,
                    learner: v.learners.contains(&id),
                })
                .collect(),
        }
    }

    async fn add_member(&self, id: u64, address: &str) -> Result<(), StoreError> {
        let v = self.node.view();
        if v.voters.contains(&id) || v.learners.contains(&id) {
            return Err(StoreError::Raft(RaftError::Membership(format!(
                "{id} is already a member"
            ))));
        }
        Ok(self.node.add_member(id, address).await?)
    }

    async fn remove_member(&self, id: u64) -> Result<(), StoreError> {
        Ok(self.node.remove_member(id).await?)
    }

    async fn shutdown(&self) {
        // A leader hands over first: the others need not wait out an
        // election timeout (a Kubernetes rollout stops pods one by one).
        self.node.step_down(Duration::from_secs(2)).await;
        let node = self.node.clone();
        let _ = tokio::task::spawn_blocking(move || node.stop()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_lists_parse_and_bad_ones_say_why() {
        let p = parse_peers("1=a:1, 2=http://b:2").unwrap();
        assert_eq!(p[&1], "http://a:1");
        assert_eq!(p[&2], "http://b:2");
        assert!(parse_peers("1=a,1=b").unwrap_err().contains("twice"));
        assert!(parse_peers("x=a").unwrap_err().contains("not a number"));
        assert!(parse_peers("a").unwrap_err().contains("ID=ADDRESS"));
    }
}
