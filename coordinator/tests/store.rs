//! One state-machine suite, run against both `MetaStore`s: three Raft
//! replicas (in-memory network, disk logs) and two coordinators on a real
//! etcd (Debian's `etcd-server`, started here on loopback).

use std::collections::BTreeMap;
use std::process::{Child, Command as Proc, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmos_coordinator::consensus::{Bootstrap, MemNetwork, RaftConfig, RaftNode};
use llmos_coordinator::etcd::EtcdStore;
use llmos_coordinator::placement::{Placement, Stage};
use llmos_coordinator::state::{ClusterState, Command, StateError};
use llmos_coordinator::store::EtcdSettings;
use llmos_coordinator::store::{MetaStore, RaftStore};

fn register(id: &str, at: u64) -> Command {
    Command::RegisterWorker {
        id: id.into(),
        address: format!("http://{id}:1"),
        device: "cpu".into(),
        memory_total_bytes: 100,
        memory_free_bytes: 80,
        at_ms: at,
        collective_address: String::new(),
        pool: String::new(),
        labels: Default::default(),
    }
}

fn deploy(name: &str) -> Command {
    Command::DeployModel {
        name: name.into(),
        source: "synthetic:tiny".into(),
        dtype: "f32".into(),
        quantization: "none".into(),
        serving: Default::default(),
        shape: Default::default(),
        replicas: 1,
        pool: String::new(),
        labels: Default::default(),
        autoscale: None,
        at_ms: 3,
    }
}

/// The reconciler's placement of m (generation 3) on `worker`.
fn place(worker: &str) -> Command {
    Command::PlaceModel {
        name: "m".into(),
        generation: 3,
        replica: 0,
        shape: Default::default(),
        placement: Placement {
            stages: vec![Stage {
                worker: worker.into(),
                layer_end: 2,
                embed: true,
                head: true,
                bytes: 10,
                ..Default::default()
            }],
            ..Default::default()
        },
        at_ms: 4,
    }
}

fn put(k: &str, v: &str) -> Command {
    Command::PutSetting {
        key: k.into(),
        value: v.into(),
    }
}

/// The state without membership (Raft keeps its members there; etcd's
/// membership is etcd's own).
fn comparable(mut s: ClusterState) -> ClusterState {
    s.members.clear();
    s
}

async fn synced(replicas: &[Arc<dyn MetaStore>]) -> Vec<ClusterState> {
    let mut out = Vec::new();
    for r in replicas {
        r.sync().await.expect("fresh read");
        out.push(comparable((*r.local()).clone()));
    }
    out
}

/// The suite: the same commands give the same verdicts and states as a
/// plain local `apply`, on every replica, whichever replica wrote them.
async fn state_machine_suite(replicas: Vec<Arc<dyn MetaStore>>) {
    let log = vec![
        register("a", 1),
        register("b", 2),
        deploy("m"),
        deploy("m"),                              // exists: refused
        place("a"),                               // epoch 5
        Command::RemoveWorker { id: "a".into() }, // busy: refused
        place("b"),                               // placed anew: epoch 7
        Command::ShardLoaded {
            name: "m".into(),
            epoch: 5, // stale: the placement above is epoch 7
            stage: 0,
            rank: 0,
            at_ms: 5,
        },
        Command::ShardLoaded {
            name: "m".into(),
            epoch: 7,
            stage: 0,
            rank: 0,
            at_ms: 5,
        },
        Command::RemoveWorker { id: "a".into() }, // no longer busy
        register("a", 7),
        Command::SetWorkerHealth {
            id: "b".into(),
            healthy: false,
            at_ms: 8,
        },
        Command::WorkerGone { id: "b".into() },
        place("b"),                                   // unhealthy: refused
        Command::UndeployModel { name: "zz".into() }, // unknown: refused
        put("generate.default_max_new_tokens", "64"),
        Command::DeleteSetting { key: "nope".into() }, // unknown: refused
        Command::UndeployModel { name: "m".into() },
        Command::RemoveWorker { id: "a".into() },
        Command::RemoveWorker { id: "b".into() },
    ];
    let mut expected = ClusterState::default();
    for (i, cmd) in log.iter().enumerate() {
        let want = expected.apply(cmd);
        let writer = &replicas[i % replicas.len()];
        let got = writer.propose(cmd.clone()).await.expect("committed");
        assert_eq!(got, want, "verdict of command {i} ({cmd:?})");
        // The writer reads its own write at once.
        assert_eq!(
            comparable((*writer.local()).clone()).applied,
            expected.applied
        );
    }
    let cordon = Command::CordonWorker {
        id: "zz".into(),
        cordoned: true,
    };
    assert!(matches!(
        replicas[0].propose(cordon.clone()).await.unwrap(),
        Err(StateError::UnknownWorker(_))
    ));
    expected.apply(&cordon).unwrap_err();
    for s in synced(&replicas).await {
        assert_eq!(s, expected);
    }

    // Concurrent writers on every replica: one order, everywhere.
    let mut tasks = Vec::new();
    for (r, store) in replicas.iter().enumerate() {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..15 {
                let key = format!("c{r}.{i}");
                if let Ok(Ok(())) = store.propose(put(&key, &i.to_string())).await {
                    acked.push(key);
                }
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_eq!(acked.len(), 15 * replicas.len());
    let states = synced(&replicas).await;
    for s in &states {
        assert_eq!(s, &states[0], "replicas disagree");
        for k in &acked {
            assert!(s.settings.contains_key(k), "acknowledged {k} missing");
        }
    }
}

fn raft_group(
    dir: &std::path::Path,
    snapshot_entries: u64,
) -> (Arc<MemNetwork>, Vec<Arc<RaftNode>>) {
    let net = MemNetwork::new(3);
    let peers: BTreeMap<u64, String> = (1..=3).map(|i| (i, format!("mem://{i}"))).collect();
    let nodes: Vec<Arc<RaftNode>> = (1..=3)
        .map(|i| {
            let mut c = RaftConfig::new(
                i,
                "suite",
                dir.join(i.to_string()),
                Bootstrap::Peers(peers.clone()),
            );
            c.tick = Duration::from_millis(10);
            c.snapshot_entries = snapshot_entries;
            let n = RaftNode::start(c, net.transport(i)).unwrap();
            net.register(&n);
            n
        })
        .collect();
    (net, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_store_passes_the_state_machine_suite() {
    let dir = tempfile::tempdir().unwrap();
    let (_net, nodes) = raft_group(dir.path(), 16);
    let stores: Vec<Arc<dyn MetaStore>> = nodes
        .iter()
        .map(|n| RaftStore::from_node(n.clone()) as Arc<dyn MetaStore>)
        .collect();
    state_machine_suite(stores.clone()).await;
    assert!(
        stores[0].status().snapshot_index > 0,
        "the log was compacted"
    );
    assert_eq!(stores.iter().filter(|s| s.is_leader()).count(), 1);
}

/// A real etcd on loopback ports, removed at drop.
struct Etcd {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_etcd() -> Etcd {
    let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("etcd is not installed: run scripts/setup.sh (installs Debian's etcd-server)");
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Proc::new(bin)
        .args([
            "--name",
            "t",
            "--data-dir",
            &dir.path().display().to_string(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("t={peer_url}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcd");
    Etcd {
        child,
        url,
        _dir: dir,
    }
}

async fn etcd_store(url: &str, name: &str, snapshot_entries: u64) -> Arc<EtcdStore> {
    let mut s = EtcdSettings::new(vec![url.to_string()], "suite", name);
    s.snapshot_entries = snapshot_entries;
    s.lease_ttl = Duration::from_secs(2);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match EtcdStore::start(s.clone()).await {
            Ok(st) => return st,
            Err(e) => {
                assert!(Instant::now() < deadline, "etcd did not come up: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_passes_the_state_machine_suite_against_a_real_etcd() {
    let etcd = start_etcd();
    let a = etcd_store(&etcd.url, "coord-a", 16).await;
    let b = etcd_store(&etcd.url, "coord-b", 16).await;
    state_machine_suite(vec![a.clone() as Arc<dyn MetaStore>, b.clone()]).await;

    // Exactly one leader through etcd's election; it compacted the log.
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.is_leader() == b.is_leader() {
        assert!(Instant::now() < deadline, "no single etcd-elected leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (leader, follower) = if a.is_leader() { (a, b) } else { (b, a) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while leader.status().snapshot_index == 0 && follower.status().snapshot_index == 0 {
        // Snapshots are written by the leader as it applies.
        leader.propose(put("tick", "x")).await.unwrap().unwrap();
        assert!(Instant::now() < deadline, "the leader never compacted");
    }
    // A coordinator started later loads snapshot + log: the same state.
    leader.sync().await.unwrap();
    let want = leader.local();
    let late = etcd_store(&etcd.url, "coord-c", 16).await;
    late.sync().await.unwrap();
    assert_eq!(late.local(), want);
    assert!(late.status().snapshot_index > 0, "loaded from the snapshot");

    // The leader leaves: another takes over well before its lease would lapse.
    leader.shutdown().await;
    let t = Instant::now();
    while !(follower.is_leader() || late.is_leader()) {
        assert!(t.elapsed() < Duration::from_secs(10), "no new leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Membership belongs to etcd: asked of llmos, it says so.
    let e = follower
        .add_member(9, "http://x:1")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("etcd"), "{e}");
}
