//! The reconciling control plane end to end over loopback: a worker that
//! goes away has its shards placed on a spare worker after the grace period
//! (and, when it comes back, unloads what it no longer owns), and a deploy
//! whose leader is killed half-way is finished by the next leader.
//!
//! Needs `llmos-worker` and `llmos-coordinator` built beside the test
//! binary (`cargo build --release --bins`, as `scripts/test.sh` does).

use std::time::{Duration, Instant};

use llmos_proto::v1 as api;
use llmos_proto::v1::admin_client::AdminClient;
use llmos_proto::v1::inference_client::InferenceClient;
use llmos_proto::worker::v1 as wk;
use llmos_tests::cluster::*;
use llmos_tests::group::{self, Group};
use tonic::transport::Channel;

/// The token ids SmolLM2 gives greedily for this prompt, and the request.
fn request(model: &str) -> api::GenerateRequest {
    ids_request(model, &[1, 504, 3458, 282, 4649, 314], 12)
}

/// SmolLM2 split 15/15 over two stages.
fn smol_15_15(wait: Option<bool>) -> api::DeployModelRequest {
    api::DeployModelRequest {
        name: "smol".into(),
        source: "smollm2".into(),
        layer_split: vec![15, 15],
        wait,
        ..Default::default()
    }
}

/// A coordinator that finds a silent worker within a second and gives it
/// `grace` before placing its shards elsewhere.
async fn fast_coordinator(grace: Duration) -> String {
    start_coordinator_with(llmos_coordinator::Config {
        heartbeat_timeout: Duration::from_secs(1),
        worker_grace_period: grace,
        reconcile_interval: Duration::from_millis(200),
        ..test_config()
    })
    .await
}

async fn workers_of(admin: &mut AdminClient<Channel>) -> Vec<api::WorkerStatus> {
    admin
        .list_workers(api::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers
}

async fn held_by(address: &str) -> Vec<wk::HeldShard> {
    let mut w = connect(address, wk::worker_client::WorkerClient::new).await;
    let stats = w.stats(wk::StatsRequest {}).await.unwrap().into_inner();
    stats
        .shards
        .iter()
        .filter_map(|s| s.shard.as_ref())
        .map(|s| wk::HeldShard {
            model: s.model.clone(),
            epoch: s.epoch,
            engine: None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_worker_is_replaced_by_a_spare_and_unloads_its_stale_shard_when_it_returns() {
    let coordinator = fast_coordinator(Duration::from_secs(2)).await;
    let late = ProcWorker::start(&coordinator, "late");
    start_worker(&coordinator, "steady").await;
    let (mut admin, mut inference) = clients(&coordinator, 2).await;
    admin.deploy_model(smol_15_15(None)).await.unwrap();
    let want = generated_ids(&mut inference, request("smol")).await;
    let before = model_status(&mut admin, "smol").await.unwrap();
    assert!(
        before.stages.iter().any(|s| s.worker_id == "late"),
        "{before:?}"
    );
    let late_address = before
        .stages
        .iter()
        .find(|s| s.worker_id == "late")
        .unwrap()
        .worker_address
        .clone();
    start_worker(&coordinator, "spare").await;
    wait_for_workers(&mut admin, 3).await;

    // Frozen: no answers, no heartbeats, and it keeps its shard.
    late.signal("-STOP");
    let t0 = Instant::now();
    let after = wait_model(
        &mut admin,
        "smol",
        Duration::from_secs(60),
        "not re-placed and Ready",
        |m| m.epoch != before.epoch && m.state == "Ready",
    )
    .await;
    let moved_after = t0.elapsed();
    assert!(
        moved_after >= Duration::from_secs(3),
        "moved before lease (1 s) + grace (2 s): {moved_after:?}"
    );
    let workers: Vec<&str> = after.stages.iter().map(|s| s.worker_id.as_str()).collect();
    assert!(
        workers.contains(&"spare") && !workers.contains(&"late"),
        "{after:?}"
    );
    let listed = workers_of(&mut admin).await;
    assert!(
        listed.iter().any(|w| w.id == "late" && w.gone),
        "{listed:?}"
    );
    // The same greedy tokens from the new placement.
    assert_eq!(generated_ids(&mut inference, request("smol")).await, want);

    // It returns holding the old epoch's shard: it is healthy again and is
    // told to unload what it no longer owns.
    late.signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held = held_by(&late_address).await;
        if held.is_empty() {
            break;
        }
        assert!(held.iter().all(|h| h.epoch == before.epoch), "{held:?}");
        assert!(Instant::now() < deadline, "still holds {held:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listed = workers_of(&mut admin).await;
    assert!(
        listed
            .iter()
            .any(|w| w.id == "late" && w.healthy && !w.gone),
        "{listed:?}"
    );
    assert_eq!(generated_ids(&mut inference, request("smol")).await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_half_done_when_its_leader_is_killed_is_finished_by_the_next_leader() {
    let mut g = Group::founded(3);
    let urls = g.urls();
    let first = group::leader(&urls, Duration::from_secs(15)).await;
    for id in ["w0", "w1"] {
        start_worker(&urls.join(","), id).await;
    }
    let leader_url = g.nodes[&first].url();
    let mut admin = group::admin(&leader_url).await;
    wait_for_workers(&mut admin, 2).await;
    admin.deploy_model(smol_15_15(Some(false))).await.unwrap();
    // Recorded, not loaded, when the leader dies.
    let recorded = model_status(&mut admin, "smol").await.unwrap();
    assert_ne!(recorded.state, "Ready", "{recorded:?}");
    g.nodes.get_mut(&first).unwrap().kill9();
    let rest: Vec<String> = g.urls();
    let second = group::leader(&rest, Duration::from_secs(15)).await;
    assert_ne!(second, first);
    let mut admin = group::admin(&rest[0]).await;
    let m = wait_model(
        &mut admin,
        "smol",
        Duration::from_secs(60),
        "the new leader did not finish the deploy",
        |m| m.state == "Ready",
    )
    .await;
    assert_eq!(m.stages.len(), 2, "{m:?}");
    assert!(m.stages.iter().all(|s| s.ranks_loaded == 1), "{m:?}");
    // Served, with no operator action, the tokens one process gives.
    let want = {
        let engine = llmos_tests::load("smollm2", tch::Kind::Float);
        engine
            .generate(
                &llmos_worker::GenerateRequest {
                    prompt: llmos_worker::PromptInput::Tokens(vec![1, 504, 3458, 282, 4649, 314]),
                    sampling: Default::default(),
                    max_new_tokens: 12,
                    stop: vec![],
                    ignore_eos: true,
                },
                &mut |_| true,
            )
            .unwrap()
            .token_ids
    };
    let ch = tonic::transport::Endpoint::from_shared(rest[1].clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut inference = InferenceClient::new(ch);
    assert_eq!(generated_ids(&mut inference, request("smol")).await, want);
}

/// Issue 21 item 3 across processes: the second stage's worker is killed;
/// the reconciler loads its layers on a spare while the first stage's
/// worker keeps its shard, its engine and their cache. The same request
/// again reuses the cached prompt blocks: only the new second stage
/// recomputes them (from the first stage's boundary rows), and the tokens
/// are those of before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_second_stage_recomputes_only_its_own_cache() {
    let coordinator = fast_coordinator(Duration::from_secs(1)).await;
    let mut procs: std::collections::BTreeMap<String, ProcWorker> = ["a", "b"]
        .iter()
        .map(|id| (id.to_string(), ProcWorker::start(&coordinator, id)))
        .collect();
    let (mut admin, mut inference) = clients(&coordinator, 2).await;
    admin.deploy_model(smol_15_15(None)).await.unwrap();
    // 40 prompt ids: two full blocks of 16 to reuse.
    let prompt: Vec<u32> = (0..40u32).map(|i| 1000 + (i * 389) % 20_000).collect();
    let want = generated_ids(&mut inference, ids_request("smol", &prompt, 12)).await;
    let before = model_status(&mut admin, "smol").await.unwrap();
    let (first, second) = (
        before.stages[0].worker_id.clone(),
        before.stages[1].worker_id.clone(),
    );
    procs.insert("spare".into(), ProcWorker::start(&coordinator, "spare"));
    wait_for_workers(&mut admin, 3).await;
    procs.get_mut(&second).unwrap().kill9();
    let after = wait_model(
        &mut admin,
        "smol",
        Duration::from_secs(60),
        "the second stage was not replaced",
        |m| m.epoch != before.epoch && m.state == "Ready",
    )
    .await;
    assert_eq!(after.stages[0].worker_id, first, "{after:?}");
    assert_eq!(after.stages[1].worker_id, "spare", "{after:?}");
    assert_eq!(
        generated_ids(&mut inference, ids_request("smol", &prompt, 12)).await,
        want
    );
    let s = admin
        .cluster_status(api::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let serving = s
        .models
        .into_iter()
        .find(|m| m.name == "smol")
        .and_then(|m| m.serving)
        .expect("the engine's figures");
    assert_eq!(serving.repaired_tokens, 32, "{serving:?}");
    assert_eq!(serving.kv_blocks_used, 0, "{serving:?}");
}
