//! One Raft replica: a thread owns the raft-rs `RawNode`, the durable
//! storage and the cluster state machine, and runs the Ready loop
//! (`ready_loop.rs`); async callers talk to it through [`RaftNode`], a
//! handle over a channel.
//!
//! Writes: `propose` on any replica. A follower's raft-rs forwards the
//! proposal to the leader; the caller's reply comes when *this* replica
//! applies the entry, so a write acknowledged by a follower is also visible
//! there. Fresh reads: `read_index` (raft's ReadIndex, also from followers)
//! then wait until applied. Every wait has a deadline: a minority partition
//! answers "leader unknown" or "not committed" instead of hanging.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use raft::prelude::{ConfChange, ConfChangeType, Message};
use tokio::sync::oneshot;

use super::log_store::LogError;
use super::ready_loop::Loop;
use super::RaftTransport;
use crate::state::{ClusterState, Command, StateError};

#[derive(Debug, Clone)]
pub enum Bootstrap {
    /// Boot (the first time) as one of these voters: id → peer address.
    Peers(BTreeMap<u64, String>),
    /// Start empty and wait for the leader to add this node.
    Join,
}

#[derive(Debug, Clone)]
pub struct RaftConfig {
    pub node_id: u64,
    pub cluster_id: String,
    pub data_dir: PathBuf,
    pub bootstrap: Bootstrap,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Applied entries between snapshots (log compaction).
    pub snapshot_entries: u64,
    /// Deadline of a write or a fresh read.
    pub request_timeout: Duration,
    /// fsync the log (off only in benchmarks that measure without it).
    pub sync: bool,
    /// Elections time out after exactly `election_ticks` instead of a
    /// random 1-2x (the deterministic test harness: raft-rs draws that
    /// randomness from the thread's generator, not from a seed).
    pub fixed_election_timeout: bool,
}

impl RaftConfig {
    pub fn new(node_id: u64, cluster_id: &str, data_dir: PathBuf, bootstrap: Bootstrap) -> Self {
        RaftConfig {
            node_id,
            cluster_id: cluster_id.to_string(),
            data_dir,
            bootstrap,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_entries: 1000,
            request_timeout: Duration::from_secs(5),
            sync: true,
            fixed_election_timeout: false,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.node_id == 0 {
            return Err("node id must be at least 1".into());
        }
        if let Bootstrap::Peers(p) = &self.bootstrap {
            if !p.contains_key(&self.node_id) {
                return Err(format!(
                    "the peer list {:?} does not contain this node's id {}",
                    p.keys().collect::<Vec<_>>(),
                    self.node_id
                ));
            }
            if p.contains_key(&0) {
                return Err("peer ids must be at least 1".into());
            }
        }
        if self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return Err("election ticks must exceed heartbeat ticks (> 0)".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RaftError {
    #[error("no leader is known to coordinator {node} (election in progress, or this node is cut off from a majority)")]
    NoLeader { node: u64 },
    #[error("another membership change (perhaps a learner's promotion) is not applied yet; retry shortly")]
    ChangePending,
    #[error("leadership changed while the write was in flight: it may or may not have been applied; read the state before retrying")]
    LeaderChanged,
    #[error("{what} not committed within {after:?}: no quorum reachable from coordinator {node}")]
    Timeout {
        what: &'static str,
        after: Duration,
        node: u64,
    },
    #[error("the write was dropped by raft: {0}")]
    Dropped(String),
    #[error("raft storage failed: {0}")]
    Storage(String),
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("coordinator {node} is shutting down")]
    Stopped { node: u64 },
}

/// What readers see, refreshed by the Ready loop.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Shared, immutable: readers clone the `Arc`, the Ready loop swaps in
    /// a new one (copying only while a reader still holds the old).
    pub state: Arc<ClusterState>,
    pub node_id: u64,
    pub leader_id: u64,
    pub term: u64,
    pub role: String,
    pub commit: u64,
    pub applied: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub voters: Vec<u64>,
    /// Members catching up before they vote.
    pub learners: Vec<u64>,
    pub log_bytes: u64,
    /// Times this node saw the leader change to another one.
    pub leader_changes: u64,
}

pub(super) type Reply<T> = oneshot::Sender<Result<T, RaftError>>;

pub(super) enum Input {
    Propose(Vec<u8>, Reply<Result<(), StateError>>),
    ConfChange(ConfChange, Reply<()>),
    ReadIndex(Reply<()>),
    Step(Vec<Message>),
    TransferLeader(u64),
    Stop,
}

impl Input {
    /// Writes and reads wait for a leader; messages from peers do not.
    pub(super) fn needs_leader(&self) -> bool {
        matches!(
            self,
            Input::Propose(..) | Input::ConfChange(..) | Input::ReadIndex(_)
        )
    }

    /// Answers the caller (if any) with `e`.
    pub(super) fn fail(self, e: RaftError) {
        match self {
            Input::Propose(_, r) => drop(r.send(Err(e))),
            Input::ConfChange(_, r) | Input::ReadIndex(r) => drop(r.send(Err(e))),
            Input::Step(_) | Input::TransferLeader(_) | Input::Stop => {}
        }
    }
}

/// Handle to a replica's Ready-loop thread.
pub struct RaftNode {
    id: u64,
    timeout: Duration,
    tx: mpsc::Sender<Input>,
    view: Arc<RwLock<View>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl RaftNode {
    /// Opens the data directory and starts the replica.
    pub fn start(
        cfg: RaftConfig,
        transport: Arc<dyn RaftTransport>,
    ) -> Result<Arc<RaftNode>, LogError> {
        let lp = Loop::open(&cfg, transport)?;
        let view = lp.view.clone();
        let (tx, rx) = mpsc::channel();
        let tick = cfg.tick;
        let thread = std::thread::Builder::new()
            .name(format!("raft-{}", cfg.node_id))
            .spawn(move || lp.run(rx, tick))
            .expect("spawn raft thread");
        Ok(Arc::new(RaftNode {
            id: cfg.node_id,
            timeout: cfg.request_timeout,
            tx,
            view,
            thread: Mutex::new(Some(thread)),
        }))
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    async fn call<T>(
        &self,
        what: &'static str,
        make: impl FnOnce(Reply<T>) -> Input,
    ) -> Result<T, RaftError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| RaftError::Stopped { node: self.id })?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(RaftError::Stopped { node: self.id }),
            Err(_) => Err(RaftError::Timeout {
                what,
                after: self.timeout,
                node: self.id,
            }),
        }
    }

    /// Replicates `cmd` and returns the state machine's verdict once this
    /// replica has applied it.
    pub async fn propose(&self, cmd: &Command) -> Result<Result<(), StateError>, RaftError> {
        let data = serde_json::to_vec(cmd).expect("command json");
        self.call("write", |r| Input::Propose(data, r)).await
    }

    /// Waits until this replica has applied everything committed when the
    /// call was made (linearizable read point).
    pub async fn read_index(&self) -> Result<(), RaftError> {
        self.call("read index", Input::ReadIndex).await
    }

    pub async fn add_member(&self, id: u64, address: &str) -> Result<(), RaftError> {
        if id == 0 || address.is_empty() {
            return Err(RaftError::Membership(
                "a member needs an id of at least 1 and an address".into(),
            ));
        }
        // A new member joins as a learner: it receives the log (or a
        // snapshot) without voting, and the leader promotes it to a voter
        // once it has caught up (`Loop::promote_learners`), so adding a
        // member never stalls commits on a replica that is still far
        // behind.
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::AddLearnerNode);
        cc.node_id = id;
        cc.context = address.as_bytes().to_vec().into();
        // A promotion in flight is applied within a round trip or two.
        let deadline = Instant::now() + self.timeout;
        loop {
            let cc = cc.clone();
            match self
                .call("membership change", |r| Input::ConfChange(cc, r))
                .await
            {
                Err(RaftError::ChangePending) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                r => return r,
            }
        }
    }

    /// Hands leadership to another voter (the one with the most of the
    /// log) before this replica stops, so writes do not wait out an
    /// election; returns once another leads or `within` passes.
    pub async fn step_down(&self, within: Duration) {
        let v = self.view();
        if v.leader_id != self.id {
            return;
        }
        let Some(to) = v.voters.iter().copied().find(|&i| i != self.id) else {
            return;
        };
        let _ = self.tx.send(Input::TransferLeader(to));
        let deadline = Instant::now() + within;
        while self.view().leader_id == self.id && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(
            node = self.id,
            to,
            led_by = self.view().leader_id,
            "stepped down before stopping"
        );
    }

    pub async fn remove_member(&self, id: u64) -> Result<(), RaftError> {
        let v = self.view();
        if !v.voters.contains(&id) && !v.learners.contains(&id) {
            return Err(RaftError::Membership(format!(
                "{id} is not a member (voters: {:?}, learners: {:?})",
                v.voters, v.learners
            )));
        }
        if v.voters.len() == 1 {
            return Err(RaftError::Membership(
                "the last member cannot be removed".into(),
            ));
        }
        if v.leader_id == id {
            // Hand leadership over first, so the group keeps a leader.
            let to = *v.voters.iter().find(|&&x| x != id).unwrap();
            let _ = self.tx.send(Input::TransferLeader(to));
            let deadline = Instant::now() + self.timeout;
            while self.view().leader_id == id {
                if Instant::now() > deadline {
                    return Err(RaftError::Timeout {
                        what: "leadership transfer",
                        after: self.timeout,
                        node: self.id,
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::RemoveNode);
        cc.node_id = id;
        self.call("membership change", |r| Input::ConfChange(cc, r))
            .await
    }

    /// Delivers messages from peers.
    pub fn step(&self, msgs: Vec<Message>) {
        let _ = self.tx.send(Input::Step(msgs));
    }

    pub fn view(&self) -> View {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn state(&self) -> Arc<ClusterState> {
        self.view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .state
            .clone()
    }

    pub fn is_leader(&self) -> bool {
        self.view().leader_id == self.id
    }

    /// Stops the Ready loop and waits for it.
    pub fn stop(&self) {
        let _ = self.tx.send(Input::Stop);
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }
}

impl Drop for RaftNode {
    fn drop(&mut self) {
        self.stop();
    }
}
