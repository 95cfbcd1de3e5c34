//! Replicas in one process over the in-memory network: elections,
//! partitions, message loss, snapshots, restarts and membership.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::state::{ClusterState, Command};

struct Group {
    net: Arc<MemNetwork>,
    dirs: BTreeMap<u64, tempfile::TempDir>,
    nodes: BTreeMap<u64, Arc<RaftNode>>,
    snapshot_entries: u64,
}

fn config(
    id: u64,
    dir: &std::path::Path,
    bootstrap: Bootstrap,
    snapshot_entries: u64,
) -> RaftConfig {
    let mut c = RaftConfig::new(id, "test", dir.to_path_buf(), bootstrap);
    c.tick = Duration::from_millis(10);
    c.request_timeout = Duration::from_secs(2);
    c.snapshot_entries = snapshot_entries;
    c
}

fn put(key: &str, value: &str) -> Command {
    Command::PutSetting {
        key: key.into(),
        value: value.into(),
    }
}

impl Group {
    fn new(ids: &[u64], snapshot_entries: u64) -> Group {
        let mut g = Group {
            net: MemNetwork::new(7),
            dirs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            snapshot_entries,
        };
        let peers: BTreeMap<u64, String> = ids.iter().map(|&i| (i, format!("mem://{i}"))).collect();
        for &id in ids {
            g.dirs.insert(id, tempfile::tempdir().unwrap());
            g.start(id, Bootstrap::Peers(peers.clone()));
        }
        g
    }

    fn start(&mut self, id: u64, bootstrap: Bootstrap) {
        let dir = self
            .dirs
            .entry(id)
            .or_insert_with(|| tempfile::tempdir().unwrap());
        let node = RaftNode::start(
            config(id, dir.path(), bootstrap, self.snapshot_entries),
            self.net.transport(id),
        )
        .unwrap();
        self.net.register(&node);
        self.nodes.insert(id, node);
    }

    fn stop(&mut self, id: u64) {
        if let Some(n) = self.nodes.remove(&id) {
            n.stop();
        }
    }

    /// Waits until the given replicas agree on one leader among them.
    async fn leader_of(&self, ids: &[u64]) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let leaders: Vec<u64> = ids.iter().map(|i| self.nodes[i].view().leader_id).collect();
            if leaders[0] != 0
                && ids.contains(&leaders[0])
                && leaders.iter().all(|&l| l == leaders[0])
            {
                return leaders[0];
            }
            assert!(
                Instant::now() < deadline,
                "no common leader among {ids:?}: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn leader(&self) -> u64 {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        self.leader_of(&ids).await
    }

    /// Waits until every running replica has applied the same state.
    async fn converged(&self) -> ClusterState {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let states: Vec<ClusterState> =
                self.nodes.values().map(|n| (*n.state()).clone()).collect();
            if states.windows(2).all(|w| w[0] == w[1]) {
                return states[0].clone();
            }
            assert!(Instant::now() < deadline, "replicas did not converge");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_elect_replicate_and_forward_writes_from_followers() {
    let g = Group::new(&[1, 2, 3], 1000);
    let leader = g.leader().await;
    let follower = *g.nodes.keys().find(|&&i| i != leader).unwrap();
    // A follower forwards the write and answers once it applied it itself.
    g.nodes[&follower]
        .propose(&put("a", "1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(g.nodes[&follower].state().settings["a"], "1");
    g.nodes[&leader]
        .propose(&put("b", "2"))
        .await
        .unwrap()
        .unwrap();
    // A rejected command is committed and reported, everywhere the same.
    let r = g.nodes[&leader]
        .propose(&Command::DeleteSetting { key: "zz".into() })
        .await
        .unwrap();
    assert!(r.is_err());
    // ReadIndex on a follower sees every acknowledged write.
    g.nodes[&follower].read_index().await.unwrap();
    assert_eq!(g.nodes[&follower].state().settings["b"], "2");
    let s = g.converged().await;
    assert_eq!(s.settings.len(), 2);
    assert_eq!(s.members.len(), 3);
    assert_eq!(s.applied, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_refuses_writes_and_the_majority_goes_on() {
    let g = Group::new(&[1, 2, 3], 1000);
    let old = g.leader().await;
    let rest: Vec<u64> = g.nodes.keys().copied().filter(|&i| i != old).collect();
    g.net.isolate(old);
    // The cut-off leader cannot commit: an error, not an acknowledgement.
    let r = g.nodes[&old].propose(&put("lost", "x")).await;
    assert!(
        matches!(
            r,
            Err(RaftError::Timeout { .. })
                | Err(RaftError::NoLeader { .. })
                | Err(RaftError::LeaderChanged)
        ),
        "{r:?}"
    );
    let new = g.leader_of(&rest).await;
    assert_ne!(new, old);
    g.nodes[&rest[0]]
        .propose(&put("kept", "y"))
        .await
        .unwrap()
        .unwrap();
    // With check-quorum the old leader steps down and says no leader is known.
    let t = Instant::now();
    loop {
        if g.nodes[&old].view().leader_id == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "old leader kept leading alone"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        g.nodes[&old].propose(&put("late", "z")).await,
        Err(RaftError::NoLeader { node: old })
    );
    assert!(matches!(
        g.nodes[&old].read_index().await,
        Err(RaftError::NoLeader { .. })
    ));
    g.net.heal();
    g.leader().await;
    let s = g.converged().await;
    assert_eq!(s.settings.get("kept").map(String::as_str), Some("y"));
    assert!(!s.settings.contains_key("lost") && !s.settings.contains_key("late"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_survive_message_loss_and_delay() {
    let g = Group::new(&[1, 2, 3], 1000);
    g.leader().await;
    g.net.set_faults(0.2, Duration::from_millis(3));
    let mut acked = Vec::new();
    for i in 0..40 {
        let leader = g.leader().await;
        if let Ok(Ok(())) = g.nodes[&leader].propose(&put(&format!("k{i}"), "v")).await {
            acked.push(i);
        }
    }
    g.net.set_faults(0.0, Duration::ZERO);
    assert!(
        acked.len() >= 30,
        "only {} of 40 writes committed",
        acked.len()
    );
    let s = g.converged().await;
    for i in acked {
        assert!(
            s.settings.contains_key(&format!("k{i}")),
            "acknowledged k{i} lost"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_catches_up_through_a_snapshot_and_restarts_from_disk() {
    let mut g = Group::new(&[1, 2, 3], 20);
    let leader = g.leader().await;
    let lagging = *g.nodes.keys().find(|&&i| i != leader).unwrap();
    g.net.isolate(lagging);
    let rest: Vec<u64> = g.nodes.keys().copied().filter(|&i| i != lagging).collect();
    for i in 0..60 {
        let l = g.leader_of(&rest).await;
        g.nodes[&l]
            .propose(&put(&format!("k{i}"), &i.to_string()))
            .await
            .unwrap()
            .unwrap();
    }
    let l = g.leader_of(&rest).await;
    assert!(
        g.nodes[&l].view().snapshot_index >= 40,
        "leader compacted its log"
    );
    g.net.heal();
    let s = g.converged().await;
    assert_eq!(s.settings.len(), 60);
    assert!(
        g.nodes[&lagging].view().snapshot_index >= 40,
        "caught up by snapshot"
    );
    // Restart every replica from its data directory: same state.
    let ids: Vec<u64> = g.nodes.keys().copied().collect();
    for &id in &ids {
        g.stop(id);
    }
    for &id in &ids {
        g.start(id, Bootstrap::Join);
    }
    g.leader().await;
    let after = g.converged().await;
    assert_eq!(after.settings, s.settings);
    let l = g.leader().await;
    g.nodes[&l]
        .propose(&put("after", "restart"))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_added_and_removed_at_run_time() {
    let mut g = Group::new(&[1], 1000);
    assert_eq!(g.leader().await, 1);
    g.nodes[&1]
        .propose(&put("before", "join"))
        .await
        .unwrap()
        .unwrap();
    for id in [2, 3] {
        g.start(id, Bootstrap::Join);
        // Joins as a learner; the leader promotes it once it caught up.
        g.nodes[&1]
            .add_member(id, &format!("mem://{id}"))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !g.nodes[&1].view().voters.contains(&id) {
            assert!(
                Instant::now() < deadline,
                "{id} not promoted: {:?}",
                g.nodes[&1].view().learners
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let s = g.converged().await;
    assert_eq!(s.settings["before"], "join");
    assert_eq!(s.members.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(g.nodes[&3].view().voters, vec![1, 2, 3]);
    assert!(g.nodes[&3].view().learners.is_empty());
    // Removing the leader hands leadership over first.
    g.nodes[&2].remove_member(1).await.unwrap();
    g.stop(1);
    let l = g.leader().await;
    assert_ne!(l, 1);
    g.nodes[&l]
        .propose(&put("after", "remove"))
        .await
        .unwrap()
        .unwrap();
    let s = g.converged().await;
    assert_eq!(s.members.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(g.nodes[&2].view().voters, vec![2, 3]);
    assert!(matches!(
        g.nodes[&2].remove_member(9).await,
        Err(RaftError::Membership(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_replicas_survive_two_failures_but_not_three() {
    let mut g = Group::new(&[1, 2, 3, 4, 5], 1000);
    let leader = g.leader().await;
    g.stop(leader);
    let other = *g.nodes.keys().next().unwrap();
    g.stop(other);
    let l = g.leader().await;
    g.nodes[&l]
        .propose(&put("two", "down"))
        .await
        .unwrap()
        .unwrap();
    g.converged().await;
    let third = *g.nodes.keys().find(|&&i| i != l).unwrap();
    g.stop(third);
    let r = g.nodes[&l].propose(&put("three", "down")).await;
    assert!(r.is_err(), "a minority of 2 of 5 must not commit: {r:?}");
}
