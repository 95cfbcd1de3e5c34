//! A deterministic Raft harness. Three replicas' Ready loops (the real
//! `Loop`: raft-rs, the disk log, the state machine) are stepped by one
//! thread; their messages go into one simulated network. A seeded
//! generator alone decides every event: which replica ticks, which message
//! is delivered next (so messages are reordered), dropped, duplicated or
//! held back, when a replica is cut off and healed, when one crashes (its
//! loop dropped, reopened later from its directory), and where writes are
//! proposed. Nothing reads the wall clock (elections time out after a
//! fixed tick count), so a failing seed replays the same run.
//!
//! Checked on every step: at most one leader per term, and every pair of
//! replicas agrees on the terms of the entries both have committed. At the
//! end the network heals, and every replica converges to the same state,
//! holding every write that was acknowledged.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use raft::prelude::Message;
use raft::StateRole;
use rand::{Rng, SeedableRng};
use tokio::sync::oneshot;

use super::node::Input;
use super::ready_loop::Loop;
use super::{Bootstrap, RaftConfig, RaftError, RaftTransport};
use crate::state::{ClusterState, Command, StateError};

/// Collects what a replica sends (the harness reports the fate of each
/// snapshot to its sender itself, when it delivers or drops it).
struct Outbox(Arc<Mutex<Vec<Message>>>);

impl RaftTransport for Outbox {
    fn send(&self, msgs: Vec<Message>) {
        self.0.lock().unwrap().extend(msgs);
    }
    fn snapshot_outcomes(&self) -> Vec<(u64, bool)> {
        Vec::new()
    }
    fn set_peer(&self, _: u64, _: &str) {}
    fn remove_peer(&self, _: u64) {}
}

type WriteReply = oneshot::Receiver<Result<Result<(), StateError>, RaftError>>;

struct Sim {
    rng: rand::rngs::StdRng,
    dirs: BTreeMap<u64, tempfile::TempDir>,
    nodes: BTreeMap<u64, Option<Loop>>,
    outbox: Arc<Mutex<Vec<Message>>>,
    network: Vec<Message>,
    /// Replicas cut off from the others until the given step.
    isolated: BTreeMap<u64, usize>,
    /// Crashed replicas and the step they restart at.
    down: BTreeMap<u64, usize>,
    leaders: BTreeMap<u64, u64>,
    writes: Vec<(String, WriteReply)>,
    acked: BTreeSet<String>,
    next_key: usize,
    /// Snapshots delivered or lost.
    snapshots: usize,
}

const IDS: [u64; 3] = [1, 2, 3];

fn config(id: u64, dir: &std::path::Path) -> RaftConfig {
    let peers = IDS.iter().map(|&i| (i, format!("sim://{i}"))).collect();
    let mut c = RaftConfig::new(id, "sim", dir.to_path_buf(), Bootstrap::Peers(peers));
    c.fixed_election_timeout = true;
    c.sync = false;
    // Compaction runs too: a replica that fell behind catches up through a
    // snapshot.
    c.snapshot_entries = 25;
    c
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut sim = Sim {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            dirs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            outbox: Arc::default(),
            network: Vec::new(),
            isolated: BTreeMap::new(),
            down: BTreeMap::new(),
            leaders: BTreeMap::new(),
            writes: Vec::new(),
            acked: BTreeSet::new(),
            next_key: 0,
            snapshots: 0,
        };
        for id in IDS {
            sim.dirs.insert(id, tempfile::tempdir().unwrap());
            sim.boot(id);
        }
        sim
    }

    fn boot(&mut self, id: u64) {
        let lp = Loop::open(
            &config(id, self.dirs[&id].path()),
            Arc::new(Outbox(self.outbox.clone())),
        )
        .expect("open");
        self.nodes.insert(id, Some(lp));
        self.settle(id);
    }

    fn settle(&mut self, id: u64) {
        if let Some(lp) = self.nodes.get_mut(&id).and_then(Option::as_mut) {
            lp.step_once();
        }
        let sent = std::mem::take(&mut *self.outbox.lock().unwrap());
        self.network.extend(sent);
    }

    fn cut_off(&self, a: u64, step: usize) -> bool {
        self.isolated.get(&a).is_some_and(|&until| step < until)
    }

    /// One event chosen by the seed.
    fn event(&mut self, step: usize, faults: bool) {
        let id = IDS[self.rng.gen_range(0..IDS.len())];
        let roll: u32 = self.rng.gen_range(0..1000);
        match roll {
            0..=299 => {
                if let Some(lp) = self.nodes.get_mut(&id).and_then(Option::as_mut) {
                    lp.raw.tick();
                }
                self.settle(id);
            }
            300..=889 => self.deliver(step, faults),
            890..=989 => self.propose(id),
            990..=995 if faults => {
                // Cut a replica off for a while.
                let len = self.rng.gen_range(50..400);
                self.isolated.insert(id, step + len);
            }
            996..=998 if faults && self.down.is_empty() => {
                // Crash: the loop goes away with everything in memory; it
                // comes back from its directory later.
                self.nodes.insert(id, None);
                let len = self.rng.gen_range(50..300);
                self.down.insert(id, step + len);
            }
            _ => self.deliver(step, faults),
        }
        let due: Vec<u64> = self
            .down
            .iter()
            .filter(|(_, &at)| at <= step)
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            self.down.remove(&id);
            self.boot(id);
        }
    }

    fn deliver(&mut self, step: usize, faults: bool) {
        if self.network.is_empty() {
            return;
        }
        // Any message in flight, not just the oldest: reordering.
        let i = self.rng.gen_range(0..self.network.len());
        let m = self.network.swap_remove(i);
        let roll: u32 = self.rng.gen_range(0..100);
        let lost = (faults && roll < 10)
            || self.cut_off(m.from, step)
            || self.cut_off(m.to, step)
            || self.nodes.get(&m.to).is_none_or(Option::is_none);
        if m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
            let status = if lost {
                raft::SnapshotStatus::Failure
            } else {
                raft::SnapshotStatus::Finish
            };
            if let Some(lp) = self.nodes.get_mut(&m.from).and_then(Option::as_mut) {
                lp.raw.report_snapshot(m.to, status);
            }
            self.snapshots += 1;
        }
        if lost {
            return;
        }
        if faults && roll < 13 {
            self.network.push(m.clone()); // duplicated
        }
        let to = m.to;
        if let Some(lp) = self.nodes.get_mut(&to).and_then(Option::as_mut) {
            lp.handle(Input::Step(vec![m]));
        }
        self.settle(to);
    }

    fn propose(&mut self, id: u64) {
        let Some(lp) = self.nodes.get_mut(&id).and_then(Option::as_mut) else {
            return;
        };
        let key = format!("k{:05}", self.next_key);
        self.next_key += 1;
        let cmd = Command::PutSetting {
            key: key.clone(),
            value: id.to_string(),
        };
        let (tx, rx) = oneshot::channel();
        lp.handle(Input::Propose(serde_json::to_vec(&cmd).unwrap(), tx));
        self.writes.push((key, rx));
        self.settle(id);
    }

    /// Collects answered writes; checks the safety properties.
    fn check(&mut self, seed: u64, step: usize) {
        for (key, rx) in &mut self.writes {
            if let Ok(Ok(Ok(()))) = rx.try_recv() {
                self.acked.insert(key.clone());
            }
        }
        let live: Vec<&Loop> = self.nodes.values().flatten().collect();
        for lp in &live {
            assert!(
                lp.failed.is_none(),
                "seed {seed} step {step}: replica {} failed: {:?}",
                lp.raw.raft.id,
                lp.failed
            );
            let r = &lp.raw.raft;
            if r.state == StateRole::Leader {
                let leader = *self.leaders.entry(r.term).or_insert(r.id);
                assert_eq!(
                    leader, r.id,
                    "seed {seed} step {step}: two leaders in term {}",
                    r.term
                );
            }
        }
        for a in &live {
            for b in &live {
                let (la, lb) = (&a.raw.raft.raft_log, &b.raw.raft.raft_log);
                let lo = la.first_index().max(lb.first_index());
                let hi = la.committed.min(lb.committed);
                for i in lo..=hi {
                    if let (Ok(ta), Ok(tb)) = (la.term(i), lb.term(i)) {
                        assert_eq!(
                            ta, tb,
                            "seed {seed} step {step}: replicas {} and {} committed different entries at {i}",
                            a.raw.raft.id, b.raw.raft.id
                        );
                    }
                }
            }
        }
    }

    /// Heals everything and runs until the replicas agree.
    fn converge(&mut self, seed: u64) -> ClusterState {
        self.isolated.clear();
        for id in std::mem::take(&mut self.down).into_keys() {
            self.boot(id);
        }
        for round in 0..4000 {
            for id in IDS {
                if let Some(lp) = self.nodes.get_mut(&id).and_then(Option::as_mut) {
                    lp.raw.tick();
                }
                self.settle(id);
            }
            while !self.network.is_empty() {
                self.deliver(usize::MAX, false);
            }
            self.check(seed, 1_000_000 + round);
            let states: Vec<&ClusterState> = self
                .nodes
                .values()
                .flatten()
                .map(|lp| lp.state.as_ref())
                .collect();
            let leading = self
                .nodes
                .values()
                .flatten()
                .any(|lp| lp.raw.raft.state == StateRole::Leader);
            if leading && states.windows(2).all(|w| equal(w[0], w[1])) && round > 50 {
                return states[0].clone();
            }
        }
        panic!("seed {seed}: the replicas did not converge");
    }
}

/// Equal as state machines (members are Raft's own bookkeeping).
fn equal(a: &ClusterState, b: &ClusterState) -> bool {
    a.settings == b.settings && a.workers == b.workers && a.models == b.models
}

fn run(seed: u64, steps: usize) -> (usize, usize, usize, usize) {
    let mut sim = Sim::new(seed);
    for step in 0..steps {
        sim.event(step, true);
        sim.check(seed, step);
    }
    let end = sim.converge(seed);
    for key in &sim.acked {
        assert!(
            end.settings.contains_key(key),
            "seed {seed}: acknowledged write {key} is missing"
        );
    }
    println!(
        "seed {seed}: {} of {} writes acknowledged, {} terms with a leader (last term {}), {} snapshots sent, final commit {}",
        sim.acked.len(),
        sim.next_key,
        sim.leaders.len(),
        sim.nodes.values().flatten().map(|lp| lp.raw.raft.term).max().unwrap_or(0),
        sim.snapshots,
        sim.nodes.values().flatten().map(|lp| lp.raw.raft.raft_log.committed).max().unwrap_or(0)
    );
    (
        sim.acked.len(),
        sim.next_key,
        sim.leaders.len(),
        sim.snapshots,
    )
}

#[test]
fn seeded_runs_with_loss_reordering_partitions_and_crashes_stay_safe() {
    let seeds: Vec<u64> = match std::env::var("LLMOS_SIM_SEED") {
        // Replays one seed (the one a failure names).
        Ok(s) => vec![s.parse().expect("LLMOS_SIM_SEED is a number")],
        Err(_) => (1..=12).collect(),
    };
    let (mut acked, mut elections, mut snapshots) = (0, 0, 0);
    let n = seeds.len();
    for seed in seeds {
        let (a, proposed, terms, snaps) = run(seed, 3000);
        snapshots += snaps;
        assert!(
            a > 0,
            "seed {seed}: no write of {proposed} was acknowledged"
        );
        acked += a;
        elections += terms;
    }
    // The faults did their work: leaders changed, a replica caught up
    // through a snapshot, writes went through.
    assert!(snapshots > 0, "no snapshot was sent in {n} runs");
    assert!(elections >= 2 * n, "only {elections} leaders in {n} runs");
    assert!(
        acked > 10 * n,
        "only {acked} writes acknowledged in {n} runs"
    );
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let trace = |seed| {
        let mut sim = Sim::new(seed);
        let mut out = Vec::new();
        for step in 0..1500 {
            sim.event(step, true);
            sim.check(seed, step);
            let lp: Vec<(u64, u64, u64)> = sim
                .nodes
                .values()
                .flatten()
                .map(|lp| {
                    (
                        lp.raw.raft.term,
                        lp.raw.raft.leader_id,
                        lp.raw.raft.raft_log.committed,
                    )
                })
                .collect();
            out.push(lp);
        }
        (out, sim.acked)
    };
    assert_eq!(trace(7), trace(7));
}
