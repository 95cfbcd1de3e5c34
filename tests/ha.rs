//! The replicated control plane across real coordinator processes over
//! loopback: elections, kill -9 of the leader during a stream of admin
//! writes (every acknowledged write survives), restart from the data
//! directory with catch-up through a snapshot, a frozen (partitioned)
//! leader, a minority that refuses writes, membership changes, 5 replicas
//! losing 2, refusal of corrupt or foreign data directories, and
//! generation that keeps working through a leader change.
//!
//! Needs `llmos-coordinator` built beside the test binary
//! (`cargo build --release --bins`, as `scripts/test.sh` does); the
//! process helpers are in `group_support.rs`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use llmos_proto::v1 as api;
use llmos_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;

use llmos_tests::group::*;

/// Sets `key`, trying each coordinator in turn (as the CLI does). Returns
/// whether the write was acknowledged.
async fn set(urls: &[String], key: &str, value: &str) -> bool {
    for u in urls {
        let Some(mut a) = try_admin(u).await else {
            continue;
        };
        let r = a
            .set_setting(api::SetSettingRequest {
                key: key.into(),
                value: value.into(),
            })
            .await;
        match r {
            Ok(_) => return true,
            // Not acknowledged (the replica is down, cut off, or died
            // mid-call): try the next one.
            Err(s) => assert!(
                matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ),
                "{:?}: {}",
                s.code(),
                s.message()
            ),
        }
    }
    false
}

async fn settings(url: &str) -> Result<BTreeMap<String, String>, tonic::Status> {
    let mut a = admin(url).await;
    Ok(a.list_settings(api::ListSettingsRequest {})
        .await?
        .into_inner()
        .settings
        .into_iter()
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_loses_no_acknowledged_write_and_it_rejoins_through_a_snapshot() {
    let mut g = Group::founded(3);
    let urls = g.urls();
    let first = leader(&urls, Duration::from_secs(15)).await;

    let writer = {
        let urls = urls.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..240 {
                // Start with a follower so follower forwarding is exercised.
                let mut order = urls.clone();
                order.rotate_left(i % urls.len());
                if set(&order, &format!("k{i:03}"), &format!("v{i}")).await {
                    acked.push(i);
                }
            }
            acked
        })
    };
    // Kill the leader once writes are flowing.
    let deadline = Instant::now() + Duration::from_secs(30);
    while settings(&urls[0]).await.map(|s| s.len()).unwrap_or(0) < 60 {
        assert!(Instant::now() < deadline, "writes did not flow");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let applied_at_kill = control_plane(&g.nodes[&first].url())
        .await
        .unwrap()
        .applied_index;
    let killed_at = Instant::now();
    g.nodes.get_mut(&first).unwrap().kill9();
    let rest = g.urls();
    let second = leader(&rest, Duration::from_secs(10)).await;
    let election = killed_at.elapsed();
    assert_ne!(second, first);
    assert!(
        election < ELECTION_TIMEOUT * 4,
        "a new leader took {election:?} (election timeout up to {ELECTION_TIMEOUT:?})"
    );
    println!("new leader {second} elected {election:?} after kill -9 of {first}");

    let acked = writer.await.unwrap();
    assert!(
        acked.len() >= 200,
        "only {} of 240 writes acknowledged",
        acked.len()
    );
    let on_leader = settings(&g.nodes[&second].url()).await.unwrap();
    for i in &acked {
        assert_eq!(
            on_leader.get(&format!("k{i:03}")).map(String::as_str),
            Some(format!("v{i}").as_str()),
            "acknowledged write k{i:03} missing on the new leader"
        );
    }

    // Restart the killed replica from its data directory: it catches up,
    // through a snapshot since the others compacted past what it had.
    g.nodes.get_mut(&first).unwrap().start();
    let all = g.urls();
    leader(&all, Duration::from_secs(15)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(s) = settings(&g.nodes[&first].url()).await {
            if s == settings(&g.nodes[&second].url()).await.unwrap() {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "restarted replica did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cp = control_plane(&g.nodes[&first].url()).await.unwrap();
    assert!(
        cp.snapshot_index > applied_at_kill,
        "expected a snapshot from the leader past index {applied_at_kill}, got {}",
        cp.snapshot_index
    );
}

/// Writes resume when a new leader does: a steady writer (every write
/// through a follower first, as a client behind a load balancer might
/// land) sees the gap between its last acknowledged write before a kill -9
/// of the leader and its first after it stay under 2 s: a write a follower
/// had forwarded to the dead leader is answered UNAVAILABLE as soon as the
/// follower stops following it, and the retry reaches the new leader. No
/// acknowledged write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_within_an_election_after_the_leader_is_killed() {
    let mut g = Group::founded(3);
    let urls = g.urls();
    let first = leader(&urls, Duration::from_secs(15)).await;
    let followers_first: Vec<String> = {
        let leader_url = g.nodes[&first].url();
        let mut v: Vec<String> = urls.iter().filter(|u| **u != leader_url).cloned().collect();
        v.push(leader_url);
        v
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (order, stop) = (followers_first.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked: Vec<(Instant, String)> = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && i < 5000 {
                let key = format!("w{i:05}");
                if set(&order, &key, "v").await {
                    acked.push((Instant::now(), key));
                }
                i += 1;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed_at = Instant::now();
    g.nodes.get_mut(&first).unwrap().kill9();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let acked = writer.await.unwrap();
    assert!(
        acked.iter().any(|(t, _)| *t < killed_at)
            && acked.last().unwrap().0 > killed_at + Duration::from_secs(2),
        "writes before and well after the kill"
    );
    // The longest stretch without an acknowledged write around the kill.
    let (gap, from) = acked
        .windows(2)
        .filter(|w| w[1].0 > killed_at)
        .map(|w| (w[1].0 - w[0].0, w[0].0))
        .max()
        .unwrap();
    println!(
        "{} writes acknowledged; longest gap {gap:?}, from {:?} after the kill",
        acked.len(),
        from.saturating_duration_since(killed_at)
    );
    assert!(gap < Duration::from_secs(2), "writes stalled {gap:?}");
    let rest = g.urls();
    leader(&rest, Duration::from_secs(10)).await;
    let have = settings(&rest[0]).await.unwrap();
    let lost: Vec<&String> = acked
        .iter()
        .map(|(_, k)| k)
        .filter(|k| !have.contains_key(*k))
        .collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
}

/// A leader stopped with SIGTERM (what Kubernetes sends) hands leadership
/// over before it exits: a new leader leads well inside the 1-2 s election
/// timeout of the default 100 ms tick, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_with_sigterm_hands_over_leadership() {
    let mut g = Group::founded_ticking(3, 100);
    let urls = g.urls();
    let first = leader(&urls, Duration::from_secs(15)).await;
    assert!(set(&urls, "before", "term").await);
    let t0 = Instant::now();
    g.nodes[&first].signal("-TERM");
    let mut child = g.nodes.get_mut(&first).unwrap().child.take().unwrap();
    let rest: Vec<String> = g
        .nodes
        .values()
        .filter(|n| n.id != first)
        .map(|n| n.url())
        .collect();
    let second = leader(&rest, Duration::from_secs(10)).await;
    let took = t0.elapsed();
    assert_ne!(second, first);
    println!("leader {second} after SIGTERM of leader {first}: {took:?}");
    assert!(
        took < Duration::from_millis(900),
        "no hand-over: a new leader took {took:?} (an election takes 1 s or more)"
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "exit: {status}");
    assert!(set(&rest, "after", "term").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_is_replaced_and_a_minority_refuses_writes() {
    let mut g = Group::founded(3);
    let urls = g.urls();
    let first = leader(&urls, Duration::from_secs(15)).await;
    // Freeze the leader (as a partition would cut it off).
    g.nodes[&first].signal("-STOP");
    let rest: Vec<String> = g
        .nodes
        .values()
        .filter(|n| n.id != first)
        .map(Node::url)
        .collect();
    let second = leader(&rest, Duration::from_secs(10)).await;
    assert_ne!(second, first);
    assert!(set(&rest, "during", "partition").await);
    g.nodes[&first].signal("-CONT");
    // The old leader rejoins as a follower and learns the write.
    leader(&urls, Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while settings(&g.nodes[&first].url())
        .await
        .ok()
        .and_then(|s| s.get("during").cloned())
        .is_none()
    {
        assert!(Instant::now() < deadline, "old leader did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Two of three gone: the survivor is a minority and says so.
    let survivor = second;
    let others: Vec<u64> = g.nodes.keys().copied().filter(|&i| i != survivor).collect();
    for id in others {
        g.nodes.get_mut(&id).unwrap().kill9();
    }
    let mut a = admin(&g.nodes[&survivor].url()).await;
    // Each write is refused (never acknowledged); once the survivor's
    // leadership lapses (check-quorum) it answers "no leader".
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = Instant::now();
        let e = a
            .set_setting(api::SetSettingRequest {
                key: "minority".into(),
                value: "x".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{}", e.message());
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "answer took {:?}",
            t.elapsed()
        );
        if e.message().contains("no leader is known") {
            break;
        }
        assert!(Instant::now() < deadline, "last answer: {}", e.message());
    }
    assert!(
        settings(&g.nodes[&survivor].url()).await.is_err(),
        "fresh reads need a quorum too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_and_leave_at_run_time_and_five_survive_two_failures() {
    // One founder; two more join through the Admin API.
    let root = tempfile::tempdir().unwrap();
    let mut nodes: BTreeMap<u64, Node> = BTreeMap::new();
    let mut n1 = node(root.path(), 1, free_port(), &[]);
    n1.start();
    nodes.insert(1, n1);
    assert_eq!(leader(&[nodes[&1].url()], Duration::from_secs(10)).await, 1);
    assert!(set(&[nodes[&1].url()], "founded", "alone").await);
    for id in [2, 3] {
        let mut n = node(root.path(), id, free_port(), &["--join".into()]);
        n.start();
        let url = n.url();
        nodes.insert(id, n);
        admin(&url).await; // listening
        let mut a = admin(&nodes[&1].url()).await;
        a.add_member(api::AddMemberRequest { id, address: url })
            .await
            .unwrap();
    }
    let urls: Vec<String> = nodes.values().map(Node::url).collect();
    leader(&urls, Duration::from_secs(10)).await;
    let s = settings(&nodes[&3].url()).await.unwrap();
    assert_eq!(s.get("founded").map(String::as_str), Some("alone"));
    let cp = control_plane(&nodes[&2].url()).await.unwrap();
    assert_eq!(
        cp.members.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // Adding an existing member is refused with the reason.
    let e = admin(&nodes[&2].url())
        .await
        .add_member(api::AddMemberRequest {
            id: 3,
            address: nodes[&3].url(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    // Remove the founder (it may lead: leadership moves first).
    admin(&nodes[&2].url())
        .await
        .remove_member(api::RemoveMemberRequest { id: 1 })
        .await
        .unwrap();
    nodes.get_mut(&1).unwrap().kill9();
    let rest = vec![nodes[&2].url(), nodes[&3].url()];
    leader(&rest, Duration::from_secs(10)).await;
    assert!(set(&rest, "after", "removal").await);
    let cp = control_plane(&nodes[&3].url()).await.unwrap();
    assert_eq!(
        cp.members.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![2, 3]
    );
    drop(nodes);

    // Five founders lose two (the leader among them) and go on.
    let mut g = Group::founded(5);
    let urls = g.urls();
    let l = leader(&urls, Duration::from_secs(15)).await;
    assert!(set(&urls, "five", "up").await);
    let other = *g.nodes.keys().find(|&&i| i != l).unwrap();
    g.nodes.get_mut(&l).unwrap().kill9();
    g.nodes.get_mut(&other).unwrap().kill9();
    let rest = g.urls();
    leader(&rest, Duration::from_secs(10)).await;
    assert!(set(&rest, "three", "left").await);
    for u in &rest {
        let s = settings(u).await.unwrap();
        assert_eq!(s.get("five").map(String::as_str), Some("up"));
        assert_eq!(s.get("three").map(String::as_str), Some("left"));
    }
}

/// Runs the coordinator binary to completion and returns (success, stderr).
fn run_to_exit(args: &[String]) -> (bool, String) {
    let out = Command::new(coordinator_bin())
        .args(args)
        .env("LLMOS_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_foreign_data_directories_refuse_to_start() {
    let root = tempfile::tempdir().unwrap();
    let mut n = node(root.path(), 1, free_port(), &[]);
    n.start();
    admin(&n.url()).await; // listening
    assert!(set(&[n.url()], "a", "1").await);
    n.kill9();
    // Another cluster's name on this directory.
    let mut foreign = n.args.clone();
    let at = foreign.iter().position(|a| a == "ha").unwrap();
    foreign[at] = "other".into();
    let (ok, err) = run_to_exit(&foreign);
    assert!(!ok && err.contains("belongs to cluster \"ha\""), "{err}");
    // One flipped byte in the snapshot (a torn tail of the log is a write
    // a crash cut short: dropped, see log_store's tests).
    let snap = n.dir.join("snapshot");
    let mut b = std::fs::read(&snap).unwrap();
    let i = b.len() - 1;
    b[i] ^= 0x20;
    std::fs::write(&snap, &b).unwrap();
    let (ok, err) = run_to_exit(&n.args);
    assert!(!ok && err.contains("snapshot is corrupt"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_keeps_working_through_a_leader_change() {
    let mut g = Group::founded(3);
    let urls = g.urls();
    let first = leader(&urls, Duration::from_secs(15)).await;
    // Two in-process workers that know every coordinator.
    for id in ["w0", "w1"] {
        llmos_tests::cluster::start_worker(&urls.join(","), id).await;
    }
    let follower = g.nodes.values().find(|n| n.id != first).unwrap().url();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut a = admin(&follower).await;
        let n = a
            .list_workers(api::ListWorkersRequest {})
            .await
            .map(|r| r.into_inner().workers.len())
            .unwrap_or(0);
        if n == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "workers did not register");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Deploy through a follower (forwarded writes).
    admin(&follower)
        .await
        .deploy_model(api::DeployModelRequest {
            name: "tiny".into(),
            source: "synthetic:tiny".into(),
            stages: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    let request = |n: u32| api::GenerateRequest {
        model: "tiny".into(),
        prompt: Some(api::generate_request::Prompt::TokenIds(api::TokenIds {
            ids: vec![1, 5, 9, 13],
        })),
        stopping: Some(api::StoppingCriteria {
            max_new_tokens: n,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let channel = tonic::transport::Endpoint::from_shared(follower.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut inference = InferenceClient::new(channel);
    let baseline: Vec<u32> = collect_ids(&mut inference, request(48)).await;
    assert_eq!(baseline.len(), 48);
    // Kill the leader while a stream runs on a follower.
    let mut stream = inference.generate(request(48)).await.unwrap().into_inner();
    let mut ids = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        ids.extend(m.tokens.iter().map(|t| t.id));
        if ids.len() == 8 {
            g.nodes.get_mut(&first).unwrap().kill9();
        }
    }
    assert_eq!(
        ids, baseline,
        "the stream through the leader change completed unchanged"
    );
    let rest = g.urls();
    leader(&rest, Duration::from_secs(10)).await;
    // New requests on both survivors complete; admin writes work again.
    for u in &rest {
        let ch = tonic::transport::Endpoint::from_shared(u.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let got = collect_ids(&mut InferenceClient::new(ch), request(48)).await;
        assert_eq!(got, baseline);
    }
    assert!(set(&rest, "after", "failover").await);
}

async fn collect_ids(c: &mut InferenceClient<Channel>, req: api::GenerateRequest) -> Vec<u32> {
    let mut s = c.generate(req).await.unwrap().into_inner();
    let mut ids = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        ids.extend(m.tokens.iter().map(|t| t.id));
    }
    ids
}
