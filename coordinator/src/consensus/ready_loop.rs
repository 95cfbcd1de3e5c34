//! The Ready loop of one replica: [`Loop`] owns raft-rs's `RawNode`, the
//! durable storage and the cluster state machine. `RaftNode` (node.rs) runs
//! it on a thread and talks to it over a channel; the deterministic harness
//! (`sim.rs`) steps it directly. Each round follows raft-rs's order (send,
//! install a snapshot, answer reads, apply, persist, send persisted
//! messages, advance), one comment per step.

use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message};
use raft::{RawNode, StateRole};

use super::log_store::{DiskStorage, LogError};
use super::node::{Bootstrap, Input, RaftConfig, RaftError, Reply, View};
use super::RaftTransport;
use crate::state::{ClusterState, Command, StateError};

enum Pending {
    Write(Reply<Result<(), StateError>>),
    Conf(Reply<()>),
}

enum Done {
    Write(Reply<Result<(), StateError>>, Result<(), StateError>),
    Conf(Reply<()>, Result<(), RaftError>),
    Read(Reply<()>),
}

pub(super) struct Loop {
    id: u64,
    pub(super) raw: RawNode<DiskStorage>,
    pub(super) state: Arc<ClusterState>,
    transport: Arc<dyn RaftTransport>,
    pub(super) view: Arc<RwLock<View>>,
    incarnation: u64,
    next_proposal: u64,
    proposals: HashMap<Vec<u8>, Pending>,
    reads: HashMap<Vec<u8>, Reply<()>>,
    read_waits: Vec<(u64, Reply<()>)>,
    snapshot_entries: u64,
    was_leader: bool,
    /// The leader as of the last soft state (0: none known).
    known_leader: u64,
    /// The last nonzero leader seen, and how often it changed.
    last_leader: u64,
    leader_changes: u64,
    /// Requests that arrived while no leader was known, with deadlines:
    /// served once one is elected, else answered "no leader".
    awaiting_leader: Vec<(Instant, Input)>,
    leader_wait: Duration,
    /// A sole voter leads at once (after applying the bootstrap entries)
    /// instead of waiting for an election timeout.
    campaign_alone: bool,
    /// Answers held until the view that shows their effect is published.
    done: Vec<Done>,
    /// Set when storage failed: the replica stops taking part.
    pub(super) failed: Option<String>,
}

impl Loop {
    /// Opens the data directory and builds the replica's loop (not yet
    /// running: `RaftNode::start` runs it on a thread, the deterministic
    /// harness steps it).
    pub(super) fn open(
        cfg: &RaftConfig,
        transport: Arc<dyn RaftTransport>,
    ) -> Result<Loop, LogError> {
        let initial = match &cfg.bootstrap {
            Bootstrap::Peers(peers) => {
                let mut cs = ConfState::default();
                cs.voters = peers.keys().copied().collect();
                let entries = peers
                    .iter()
                    .enumerate()
                    .map(|(i, (id, addr))| {
                        let mut cc = ConfChange::default();
                        cc.set_change_type(ConfChangeType::AddNode);
                        cc.node_id = *id;
                        cc.context = addr.as_bytes().to_vec().into();
                        let mut e = Entry::default();
                        e.set_entry_type(EntryType::EntryConfChange);
                        e.term = 1;
                        e.index = i as u64 + 1;
                        e.data = cc.write_to_bytes().expect("encode").into();
                        e
                    })
                    .collect();
                Some((cs, entries))
            }
            Bootstrap::Join => None,
        };
        let recovered = DiskStorage::open(
            &cfg.data_dir,
            &cfg.cluster_id,
            cfg.node_id,
            initial,
            cfg.sync,
        )?;
        let storage = recovered.storage;
        let snap = storage.snapshot_ref().clone();
        let state: ClusterState = if snap.data.is_empty() {
            ClusterState::default()
        } else {
            serde_json::from_slice(&snap.data).map_err(|e| LogError::Corrupt {
                path: cfg.data_dir.join("snapshot"),
                offset: 0,
                what: format!("state machine does not decode: {e}"),
            })?
        };
        tracing::info!(
            node = cfg.node_id,
            fresh = recovered.fresh,
            snapshot_index = snap.get_metadata().index,
            commit = storage.hard_state().commit,
            "raft storage opened"
        );
        for (id, addr) in &state.members {
            transport.set_peer(*id, addr);
        }
        if let Bootstrap::Peers(peers) = &cfg.bootstrap {
            for (id, addr) in peers {
                transport.set_peer(*id, addr);
            }
        }
        let raft_cfg = raft::Config {
            id: cfg.node_id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied: snap.get_metadata().index,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        let raft_cfg = if cfg.fixed_election_timeout {
            raft::Config {
                min_election_tick: cfg.election_ticks,
                max_election_tick: cfg.election_ticks + 1,
                ..raft_cfg
            }
        } else {
            raft_cfg
        };
        let logger = super::tracing_logger(cfg.node_id);
        let raw = RawNode::new(&raft_cfg, storage, &logger).map_err(|e| LogError::Corrupt {
            path: cfg.data_dir.clone(),
            offset: 0,
            what: format!("raft refused the stored state: {e}"),
        })?;
        let view = Arc::new(RwLock::new(View {
            state: Arc::new(state.clone()),
            node_id: cfg.node_id,
            ..Default::default()
        }));
        let lp = Loop {
            id: cfg.node_id,
            raw,
            state: Arc::new(state),
            transport,
            view: view.clone(),
            incarnation: rand::random(),
            next_proposal: 0,
            proposals: HashMap::new(),
            reads: HashMap::new(),
            read_waits: Vec::new(),
            snapshot_entries: cfg.snapshot_entries,
            was_leader: false,
            known_leader: 0,
            last_leader: 0,
            leader_changes: 0,
            campaign_alone: true,
            awaiting_leader: Vec::new(),
            leader_wait: cfg.request_timeout.mul_f64(0.9),
            done: Vec::new(),
            failed: None,
        };
        lp.publish();
        Ok(lp)
    }
}

impl Loop {
    pub(super) fn run(mut self, rx: mpsc::Receiver<Input>, tick: Duration) {
        // Apply what is committed on disk before waiting for input.
        self.step_once();
        let mut last_tick = Instant::now();
        loop {
            let wait = tick.saturating_sub(last_tick.elapsed());
            match rx.recv_timeout(wait) {
                Ok(Input::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(input) => {
                    self.handle(input);
                    // Take everything queued before one Ready: batching.
                    while let Ok(input) = rx.try_recv() {
                        if matches!(input, Input::Stop) {
                            return;
                        }
                        self.handle(input);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if last_tick.elapsed() >= tick {
                last_tick = Instant::now();
                self.raw.tick();
                self.sweep();
            }
            self.step_once();
        }
    }

    /// One round: Ready, then the sole-voter campaign, then requests that
    /// waited for a leader (each followed by the Ready it produces).
    pub(super) fn step_once(&mut self) {
        self.report_snapshots();
        self.promote_learners();
        self.ready_or_fail();
        if self.campaign_alone {
            let raft = &self.raw.raft;
            if raft.raft_log.applied >= raft.raft_log.committed {
                self.campaign_alone = false;
                if self.raw.store().conf_state().voters == [self.id] && raft.leader_id == 0 {
                    let _ = self.raw.campaign();
                    self.ready_or_fail();
                }
            }
        }
        if self.retry_awaiting_leader() {
            self.ready_or_fail();
        }
    }

    fn ready_or_fail(&mut self) {
        if self.failed.is_none() {
            if let Err(e) = self.on_ready() {
                tracing::error!(node = self.id, error = %e, "raft storage failed: this replica stops");
                self.failed = Some(e.to_string());
            }
        }
    }

    fn retry_awaiting_leader(&mut self) -> bool {
        if self.awaiting_leader.is_empty() {
            return false;
        }
        let mut handled = false;
        let now = Instant::now();
        let waiting = std::mem::take(&mut self.awaiting_leader);
        for (deadline, input) in waiting {
            if self.leader() != 0 || self.failed.is_some() {
                self.handle(input);
                handled = true;
            } else if now >= deadline {
                input.fail(RaftError::NoLeader { node: self.id });
            } else {
                self.awaiting_leader.push((deadline, input));
            }
        }
        handled
    }

    fn context(&mut self) -> Vec<u8> {
        self.next_proposal += 1;
        let mut c = self.incarnation.to_le_bytes().to_vec();
        c.extend_from_slice(&self.next_proposal.to_le_bytes());
        c
    }

    fn leader(&self) -> u64 {
        self.raw.raft.leader_id
    }

    pub(super) fn handle(&mut self, input: Input) {
        if let Some(e) = &self.failed {
            input.fail(RaftError::Storage(e.clone()));
            return;
        }
        if self.leader() == 0 && input.needs_leader() {
            let deadline = Instant::now() + self.leader_wait;
            self.awaiting_leader.push((deadline, input));
            return;
        }
        match input {
            Input::Propose(data, reply) => {
                let ctx = self.context();
                match self.raw.propose(ctx.clone(), data) {
                    Ok(()) => {
                        self.proposals.insert(ctx, Pending::Write(reply));
                    }
                    Err(e) => drop(reply.send(Err(RaftError::Dropped(e.to_string())))),
                }
            }
            Input::ConfChange(cc, reply) => {
                // raft-rs would turn a second pending change into an empty
                // entry and the caller would wait for nothing.
                if self.raw.raft.has_pending_conf() {
                    let _ = reply.send(Err(RaftError::ChangePending));
                    return;
                }
                let ctx = self.context();
                match self.raw.propose_conf_change(ctx.clone(), cc) {
                    Ok(()) => {
                        self.proposals.insert(ctx, Pending::Conf(reply));
                    }
                    Err(e) => drop(reply.send(Err(RaftError::Membership(e.to_string())))),
                }
            }
            Input::ReadIndex(reply) => {
                let ctx = self.context();
                self.raw.read_index(ctx.clone());
                self.reads.insert(ctx, reply);
            }
            Input::Step(msgs) => {
                for m in msgs {
                    if let Err(e) = self.raw.step(m) {
                        tracing::debug!(node = self.id, error = %e, "raft message ignored");
                    }
                }
            }
            Input::TransferLeader(to) => self.raw.transfer_leader(to),
            Input::Stop => {}
        }
    }

    /// On the leader: proposes the first learner that has caught up (has
    /// every committed entry) as a voter; one membership change at a time.
    fn promote_learners(&mut self) {
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader || raft.has_pending_conf() {
            return;
        }
        let committed = raft.raft_log.committed;
        let caught_up = self
            .raw
            .store()
            .conf_state()
            .learners
            .iter()
            .copied()
            .find(|id| raft.prs().get(*id).is_some_and(|p| p.matched >= committed));
        let Some(id) = caught_up else { return };
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::AddNode);
        cc.node_id = id;
        cc.context = self
            .state
            .members
            .get(&id)
            .cloned()
            .unwrap_or_default()
            .into_bytes()
            .into();
        match self.raw.propose_conf_change(b"promote".to_vec(), cc) {
            Ok(()) => tracing::info!(
                node = self.id,
                learner = id,
                "learner caught up: promoting it to voter"
            ),
            Err(e) => {
                tracing::debug!(node = self.id, learner = id, error = %e, "promotion not proposed")
            }
        }
    }

    /// Tells raft which snapshots reached their peer (it then probes and
    /// appends from the snapshot) and which were lost (it sends another).
    fn report_snapshots(&mut self) {
        for (to, delivered) in self.transport.snapshot_outcomes() {
            let status = if delivered {
                raft::SnapshotStatus::Finish
            } else {
                raft::SnapshotStatus::Failure
            };
            tracing::debug!(node = self.id, to, delivered, "snapshot outcome");
            self.raw.report_snapshot(to, status);
        }
    }

    /// Drops waiters whose callers gave up (deadline passed).
    fn sweep(&mut self) {
        self.proposals.retain(|_, p| match p {
            Pending::Write(r) => !r.is_closed(),
            Pending::Conf(r) => !r.is_closed(),
        });
        self.reads.retain(|_, r| !r.is_closed());
        self.read_waits.retain(|(_, r)| !r.is_closed());
    }

    fn send(&self, msgs: Vec<Message>) {
        if msgs.is_empty() {
            return;
        }
        self.transport.send(msgs);
    }

    /// The Ready loop, in raft-rs's documented order.
    fn on_ready(&mut self) -> Result<(), LogError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        // 1. Messages a leader may send before persisting (appends to peers).
        // Snapshots are reported to raft when the transport knows their
        // fate (below, in `report_snapshots`), not when handed to it.
        self.send(ready.take_messages());
        // 2. A snapshot from the leader replaces the state machine.
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            let state: ClusterState =
                serde_json::from_slice(&snap.data).map_err(|e| LogError::Corrupt {
                    path: "snapshot from leader".into(),
                    offset: 0,
                    what: e.to_string(),
                })?;
            self.raw.mut_store().apply_snapshot(snap)?;
            self.state = Arc::new(state);
            for (id, addr) in &self.state.members {
                self.transport.set_peer(*id, addr);
            }
            tracing::info!(
                node = self.id,
                index = self.raw.store().snapshot_ref().get_metadata().index,
                "installed a snapshot from the leader"
            );
        }
        // 3. Read states: ReadIndex answers.
        for rs in ready.take_read_states() {
            if let Some(r) = self.reads.remove(&rs.request_ctx) {
                self.read_waits.push((rs.index, r));
            }
        }
        // 4. Apply committed entries.
        let committed = ready.take_committed_entries();
        self.apply(committed)?;
        // 5. Persist new entries and the hard state (one write, one fsync).
        let hs = ready.hs().cloned();
        self.raw.mut_store().persist(ready.entries(), hs.as_ref())?;
        if let Some(ss) = ready.ss() {
            self.on_role(ss.raft_state, ss.leader_id);
        }
        // 6. Messages that must wait for persistence (votes, append acks).
        self.send(ready.take_persisted_messages());
        // 7. Advance; the light ready carries commits that followed.
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        self.send(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply(committed)?;
        self.raw.advance_apply();
        self.maybe_compact()?;
        self.answer_reads();
        self.publish();
        for d in self.done.drain(..) {
            match d {
                Done::Write(r, result) => drop(r.send(Ok(result))),
                Done::Conf(r, result) => drop(r.send(result)),
                Done::Read(r) => drop(r.send(Ok(()))),
            }
        }
        Ok(())
    }

    fn on_role(&mut self, role: StateRole, leader_id: u64) {
        let leader = role == StateRole::Leader;
        // A leader that is no longer the one (it stepped down, or this
        // follower stopped hearing from it) may never commit what was
        // proposed through it: a follower's proposals were forwarded to it
        // and are lost with it. Answer them at once, retryably, instead of
        // letting them wait out the request timeout; re-forwarding a write
        // could apply it twice, so the caller decides (the CLI retries).
        // Reads are idempotent: they are asked again of the next leader.
        let lost = (self.was_leader && !leader)
            || (self.known_leader != 0 && leader_id != self.known_leader);
        if lost {
            for (_, p) in self.proposals.drain() {
                match p {
                    Pending::Write(r) => drop(r.send(Err(RaftError::LeaderChanged))),
                    Pending::Conf(r) => drop(r.send(Err(RaftError::LeaderChanged))),
                }
            }
            let deadline = Instant::now() + self.leader_wait;
            for (_, r) in self.reads.drain() {
                self.awaiting_leader.push((deadline, Input::ReadIndex(r)));
            }
        }
        if leader_id != 0 && leader_id != self.last_leader {
            self.leader_changes += 1;
            self.last_leader = leader_id;
        }
        self.was_leader = leader;
        self.known_leader = leader_id;
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), LogError> {
        for e in entries {
            let index = e.index;
            if !e.data.is_empty() {
                match e.get_entry_type() {
                    EntryType::EntryNormal => {
                        let result = match serde_json::from_slice::<Command>(&e.data) {
                            Ok(cmd) => Arc::make_mut(&mut self.state).apply(&cmd),
                            Err(err) => {
                                // Deterministic on every replica: counted, not applied.
                                tracing::error!(node = self.id, index, error = %err, "undecodable command in the log");
                                Arc::make_mut(&mut self.state).applied += 1;
                                Ok(())
                            }
                        };
                        if let Some(Pending::Write(r)) = self.proposals.remove(&e.context[..]) {
                            self.done.push(Done::Write(r, result));
                        }
                    }
                    EntryType::EntryConfChange => {
                        let cc = ConfChange::parse_from_bytes(&e.data).map_err(|err| {
                            LogError::Corrupt {
                                path: "raft log".into(),
                                offset: index,
                                what: format!("conf change does not decode: {err}"),
                            }
                        })?;
                        let result = match self.raw.apply_conf_change(&cc) {
                            Ok(cs) => {
                                self.raw.mut_store().set_conf_state(cs)?;
                                let addr = String::from_utf8_lossy(&cc.context).into_owned();
                                match cc.get_change_type() {
                                    ConfChangeType::RemoveNode => {
                                        Arc::make_mut(&mut self.state).members.remove(&cc.node_id);
                                        self.transport.remove_peer(cc.node_id);
                                    }
                                    _ => {
                                        self.transport.set_peer(cc.node_id, &addr);
                                        Arc::make_mut(&mut self.state)
                                            .members
                                            .insert(cc.node_id, addr);
                                    }
                                }
                                tracing::info!(node = self.id, change = ?cc.get_change_type(), member = cc.node_id, "membership changed");
                                Ok(())
                            }
                            Err(err) => Err(RaftError::Membership(err.to_string())),
                        };
                        if let Some(Pending::Conf(r)) = self.proposals.remove(&e.context[..]) {
                            self.done.push(Done::Conf(r, result));
                        }
                    }
                    EntryType::EntryConfChangeV2 => {}
                }
            }
        }
        Ok(())
    }

    fn answer_reads(&mut self) {
        let applied = self.raw.raft.raft_log.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.read_waits)
            .into_iter()
            .partition(|(i, _)| *i <= applied);
        self.read_waits = waiting;
        for (_, r) in ready {
            self.done.push(Done::Read(r));
        }
    }

    fn maybe_compact(&mut self) -> Result<(), LogError> {
        let applied = self.raw.raft.raft_log.applied;
        let snap = self.raw.store().snapshot_ref().get_metadata().index;
        if applied >= snap + self.snapshot_entries {
            let data = serde_json::to_vec(&*self.state).expect("state json");
            self.raw.mut_store().compact(applied, data)?;
            tracing::info!(
                node = self.id,
                index = applied,
                "snapshot taken, log compacted"
            );
        }
        Ok(())
    }

    fn publish(&self) {
        let raft = &self.raw.raft;
        let store = self.raw.store();
        let v = View {
            state: self.state.clone(),
            node_id: self.id,
            leader_id: raft.leader_id,
            leader_changes: self.leader_changes,
            term: raft.term,
            role: format!("{:?}", raft.state),
            commit: raft.raft_log.committed,
            applied: raft.raft_log.applied,
            first_index: raft::Storage::first_index(store).unwrap_or(0),
            last_index: raft.raft_log.last_index(),
            snapshot_index: store.snapshot_ref().get_metadata().index,
            voters: {
                let mut v: Vec<u64> = store.conf_state().voters.clone();
                v.sort();
                v
            },
            learners: {
                let mut v: Vec<u64> = store.conf_state().learners.clone();
                v.sort();
                v
            },
            log_bytes: store.log_bytes(),
        };
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = v;
    }
}
