//! The in-memory network the consensus tests run replicas over (compiled
//! only for tests: `cfg(test)` or the `test-util` feature the crate's own
//! integration tests turn on).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use raft::prelude::Message;
use rand::{Rng, SeedableRng};

use super::node::RaftNode;
use super::RaftTransport;

/// An in-memory network of replicas in one process, with faults.
#[derive(Default)]
pub struct MemNetwork {
    inner: Mutex<Net>,
}

#[derive(Default)]
struct Net {
    nodes: HashMap<u64, Weak<RaftNode>>,
    /// Pairs that cannot talk, both directions.
    cut: HashSet<(u64, u64)>,
    drop_rate: f64,
    delay: Duration,
    rng: Option<rand_chacha::ChaCha8Rng>,
    /// Snapshot outcomes by sender: (to, delivered).
    snapshots: HashMap<u64, Vec<(u64, bool)>>,
}

impl MemNetwork {
    pub fn new(seed: u64) -> Arc<Self> {
        let net = MemNetwork::default();
        net.inner.lock().unwrap().rng = Some(rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        Arc::new(net)
    }

    /// The transport of replica `id` on this network.
    pub fn transport(self: &Arc<Self>, id: u64) -> Arc<MemTransport> {
        Arc::new(MemTransport {
            from: id,
            net: self.clone(),
        })
    }

    pub fn register(&self, node: &Arc<RaftNode>) {
        self.inner
            .lock()
            .unwrap()
            .nodes
            .insert(node.id(), Arc::downgrade(node));
    }

    /// Splits the replicas into groups that cannot reach each other.
    pub fn partition(&self, groups: &[&[u64]]) {
        let mut n = self.inner.lock().unwrap();
        n.cut.clear();
        for (i, a) in groups.iter().enumerate() {
            for b in &groups[i + 1..] {
                for &x in *a {
                    for &y in *b {
                        n.cut.insert((x, y));
                        n.cut.insert((y, x));
                    }
                }
            }
        }
    }

    /// Cuts `id` off from every other replica.
    pub fn isolate(&self, id: u64) {
        let mut n = self.inner.lock().unwrap();
        let others: Vec<u64> = n.nodes.keys().copied().filter(|&x| x != id).collect();
        for o in others {
            n.cut.insert((id, o));
            n.cut.insert((o, id));
        }
    }

    pub fn heal(&self) {
        self.inner.lock().unwrap().cut.clear();
    }

    /// Drops each message with probability `rate` and delays the rest.
    pub fn set_faults(&self, rate: f64, delay: Duration) {
        let mut n = self.inner.lock().unwrap();
        n.drop_rate = rate;
        n.delay = delay;
    }

    fn deliver(&self, from: u64, msgs: Vec<Message>) {
        let mut groups: HashMap<u64, Vec<Message>> = HashMap::new();
        let delay;
        {
            let mut n = self.inner.lock().unwrap();
            delay = n.delay;
            for m in msgs {
                let rate = n.drop_rate;
                let lost = n.cut.contains(&(from, m.to))
                    || (rate > 0.0 && n.rng.as_mut().expect("seeded").gen_bool(rate))
                    || n.nodes.get(&m.to).is_none_or(|w| w.strong_count() == 0);
                if m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
                    n.snapshots.entry(from).or_default().push((m.to, !lost));
                }
                if lost {
                    continue;
                }
                groups.entry(m.to).or_default().push(m);
            }
        }
        for (to, msgs) in groups {
            let Some(node) = self
                .inner
                .lock()
                .unwrap()
                .nodes
                .get(&to)
                .and_then(Weak::upgrade)
            else {
                continue;
            };
            if delay.is_zero() {
                node.step(msgs);
            } else {
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    node.step(msgs);
                });
            }
        }
    }
}

pub struct MemTransport {
    from: u64,
    net: Arc<MemNetwork>,
}

impl RaftTransport for MemTransport {
    fn snapshot_outcomes(&self) -> Vec<(u64, bool)> {
        let mut n = self.net.inner.lock().unwrap();
        n.snapshots.remove(&self.from).unwrap_or_default()
    }

    fn send(&self, msgs: Vec<Message>) {
        self.net.deliver(self.from, msgs);
    }
    fn set_peer(&self, _id: u64, _address: &str) {}
    fn remove_peer(&self, _id: u64) {}
}
