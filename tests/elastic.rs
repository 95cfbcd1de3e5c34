//! Elastic serving end to end over loopback: replicas added and removed
//! while clients generate (no request fails, every greedy output is the
//! single-replica one), a worker drained by the operator or stopped with
//! SIGTERM under load, a replica that dies before the first token, worker
//! pools, and the refusals of bad scale requests.
//!
//! Needs `llmos-worker` built beside the test binary (`cargo build
//! --release --bins`, as `scripts/test.sh` does).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmos_proto::v1 as api;
use llmos_proto::v1::admin_client::AdminClient;
use llmos_proto::v1::inference_client::InferenceClient;
use llmos_tests::cluster::*;
use tonic::transport::Channel;

fn request(model: &str) -> api::GenerateRequest {
    ids_request(model, &[1, 504, 3458, 282, 4649, 314], 8)
}

fn deploy(name: &str, replicas: u32) -> api::DeployModelRequest {
    api::DeployModelRequest {
        name: name.into(),
        source: "smollm2".into(),
        replicas,
        wait_timeout_ms: 120_000,
        ..Default::default()
    }
}

async fn status_of(admin: &mut AdminClient<Channel>, name: &str) -> api::ModelStatus {
    model_status(admin, name)
        .await
        .unwrap_or_else(|| panic!("{name} is not deployed"))
}

/// The workers holding each replica's engine.
fn engine_workers(m: &api::ModelStatus) -> Vec<String> {
    m.replicas
        .iter()
        .map(|r| r.stages[0].worker_id.clone())
        .collect()
}

/// Four worker processes and SmolLM2 over 2 stages (15/15 layers) in
/// `replicas` replicas; the coordinator, clients, the greedy output and a
/// load of two clients checking it.
async fn two_stage_under_load(
    replicas: u32,
) -> (
    Vec<ProcWorker>,
    AdminClient<Channel>,
    InferenceClient<Channel>,
    Vec<u32>,
    Load,
) {
    let coordinator = start_coordinator().await;
    let workers: Vec<ProcWorker> = (0..4)
        .map(|i| ProcWorker::start(&coordinator, &format!("w{i}")))
        .collect();
    let (mut admin, mut inference) = clients(&coordinator, 4).await;
    admin
        .deploy_model(api::DeployModelRequest {
            stages: 2,
            layer_split: vec![15, 15],
            ..deploy("smol", replicas)
        })
        .await
        .unwrap();
    let want = generated_ids(&mut inference, request("smol")).await;
    let load = Load::start(&coordinator, "smol", want.clone(), 2).await;
    (workers, admin, inference, want, load)
}

/// `clients` loops of generations against the coordinator until stopped
/// (or 2000 requests each), checking every output against `want`.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(usize, Vec<String>)>>,
}

impl Load {
    async fn start(coordinator: &str, model: &str, want: Vec<u32>, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let mut inference = connect(coordinator, InferenceClient::new).await;
            let (stop, want, model) = (stop.clone(), want.clone(), model.to_string());
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut failed) = (0, Vec::new());
                for _ in 0..2000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match ids_of(&mut inference, request(&model)).await {
                        Ok(ids) if ids == want => ok += 1,
                        Ok(ids) => failed.push(format!("output {ids:?}, want {want:?}")),
                        Err(e) => failed.push(format!("{:?}: {}", e.code(), e.message())),
                    }
                }
                (ok, failed)
            }));
        }
        Load { stop, tasks }
    }

    /// Stops the clients; (requests served, failures).
    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut ok, mut failed) = (0, Vec::new());
        for t in self.tasks {
            let (o, f) = t.await.unwrap();
            ok += o;
            failed.extend(f);
        }
        (ok, failed)
    }
}

/// Scale 1 → 3 → 1, drain the worker of the remaining replica, then stop
/// the next one with SIGTERM, all while three clients generate: no request
/// fails, every output is the single-replica one, every added replica
/// serves, and the SIGTERM'd worker exits 0 once its replica moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_drain_and_sigterm_under_load_lose_no_request() {
    let coordinator = start_coordinator().await;
    let mut workers: Vec<ProcWorker> = (0..3)
        .map(|i| {
            ProcWorker::start_with(&coordinator, &format!("w{i}"), &["--drain-timeout-s", "90"])
        })
        .collect();
    let (mut admin, mut inference) = clients(&coordinator, 3).await;
    admin.deploy_model(deploy("smol", 1)).await.unwrap();
    let want = generated_ids(&mut inference, request("smol")).await;
    assert_eq!(want.len(), 8);
    let load = Load::start(&coordinator, "smol", want.clone(), 3).await;

    let t = Instant::now();
    admin
        .scale_model(api::ScaleModelRequest {
            name: "smol".into(),
            replicas: 3,
            wait: Some(true),
            wait_timeout_ms: 120_000,
        })
        .await
        .unwrap();
    println!("scale 1 -> 3 under load: {:?}", t.elapsed());
    let m = wait_model(
        &mut admin,
        "smol",
        Duration::from_secs(60),
        "every replica serves requests",
        |m| m.replicas.len() == 3 && m.replicas.iter().all(|r| r.routed > 0),
    )
    .await;
    let mut on: Vec<String> = engine_workers(&m);
    on.sort();
    assert_eq!(on, ["w0", "w1", "w2"], "one replica per worker");

    let t = Instant::now();
    admin
        .scale_model(api::ScaleModelRequest {
            name: "smol".into(),
            replicas: 1,
            wait: Some(true),
            wait_timeout_ms: 120_000,
        })
        .await
        .unwrap();
    println!("scale 3 -> 1 under load: {:?}", t.elapsed());
    let m = status_of(&mut admin, "smol").await;
    assert_eq!((m.replicas.len(), m.replicas_desired), (1, 1), "{m:#?}");

    // Drain the worker of the one replica: a replacement serves first.
    let first = engine_workers(&m)[0].clone();
    let t = Instant::now();
    let drained = admin
        .drain_worker(api::DrainWorkerRequest {
            worker_id: first.clone(),
            wait: Some(true),
            wait_timeout_ms: 120_000,
        })
        .await
        .unwrap()
        .into_inner();
    println!("drain of {first} under load: {:?}", t.elapsed());
    assert_eq!(drained.replicas.len(), 1, "{drained:?}");
    let m = wait_model(
        &mut admin,
        "smol",
        Duration::from_secs(30),
        "one serving replica",
        |m| m.state == "Ready" && m.replicas.len() == 1,
    )
    .await;
    let second = engine_workers(&m)[0].clone();
    assert_ne!(second, first);
    let ws = admin
        .list_workers(api::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert!(ws.iter().any(|w| w.id == first && w.cordoned), "{ws:?}");
    admin
        .uncordon_worker(api::UncordonWorkerRequest {
            worker_id: first.clone(),
        })
        .await
        .unwrap();

    // SIGTERM the worker of the replica now: it asks to be drained and
    // exits once its replica moved.
    let idx: usize = second[1..].parse().unwrap();
    let t = Instant::now();
    workers[idx].signal("-TERM");
    let status = tokio::task::block_in_place(|| workers[idx].wait_exit(Duration::from_secs(120)))
        .expect("the SIGTERM'd worker did not exit");
    println!(
        "SIGTERM of {second} under load: exited after {:?}",
        t.elapsed()
    );
    assert!(status.success(), "{status:?}");
    let m = wait_model(
        &mut admin,
        "smol",
        Duration::from_secs(30),
        "served elsewhere",
        |m| m.state == "Ready" && m.replicas.len() == 1,
    )
    .await;
    assert_ne!(engine_workers(&m)[0], second);

    let (ok, failed) = load.stop().await;
    println!("{ok} requests served during scale, drain and SIGTERM");
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert!(ok >= 30, "only {ok} requests");
}

/// Two replicas; one's worker is killed: requests routed to it fail
/// before their first token and are served by the other replica, the
/// client seeing nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_dies_before_the_first_token_is_left_for_another() {
    let coordinator = start_coordinator().await;
    let mut workers: Vec<ProcWorker> = (0..2)
        .map(|i| ProcWorker::start(&coordinator, &format!("w{i}")))
        .collect();
    let (mut admin, mut inference) = clients(&coordinator, 2).await;
    admin.deploy_model(deploy("smol", 2)).await.unwrap();
    let want = generated_ids(&mut inference, request("smol")).await;
    workers[0].kill9();
    // Both replicas stay Ready in the state until the lease expires: the
    // router keeps choosing the dead one for some requests.
    for _ in 0..6 {
        assert_eq!(generated_ids(&mut inference, request("smol")).await, want);
    }
    let m = status_of(&mut admin, "smol").await;
    let dead = m
        .replicas
        .iter()
        .find(|r| r.stages[0].worker_id == "w0")
        .expect("still placed on w0");
    assert!(dead.routed > 0, "the dead replica was never tried: {m:#?}");
}

/// Replicas land only in the pool (and on the labels) a deployment names;
/// more replicas than the pool holds: the status names the shortfall and
/// the replicas that fit serve. Bad scale requests are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_confine_replicas_and_a_shortfall_leaves_the_rest_serving() {
    let coordinator = start_coordinator().await;
    start_worker_in(&coordinator, "a0", "a", &[]).await;
    start_worker_in(&coordinator, "b0", "b", &[("zone", "z1")]).await;
    start_worker_in(&coordinator, "b1", "b", &[("zone", "z2")]).await;
    let (mut admin, mut inference) = clients(&coordinator, 3).await;
    admin
        .deploy_model(api::DeployModelRequest {
            pool: "b".into(),
            wait: Some(false),
            ..deploy("smol", 3)
        })
        .await
        .unwrap();
    let m = wait_model(
        &mut admin,
        "smol",
        Duration::from_secs(60),
        "two replicas serve, the third waits",
        |m| {
            m.replicas.len() == 2
                && m.replicas.iter().all(|r| r.state == "Ready")
                && m.reason.contains("replica 3 of 3")
        },
    )
    .await;
    assert_eq!(m.state, "Loading");
    assert!(m.reason.contains("in pool \"b\""), "{}", m.reason);
    let mut on = engine_workers(&m);
    on.sort();
    assert_eq!(on, ["b0", "b1"]);
    // A prompt of two whole blocks, twice: the second goes where the
    // first went (routed for its prefix) and hits that engine's cache.
    let prompt: Vec<u32> = (0..40).map(|i| 1000 + i).collect();
    for _ in 0..2 {
        generated_ids(&mut inference, ids_request("smol", &prompt, 4)).await;
    }
    let m = wait_model(
        &mut admin,
        "smol",
        Duration::from_secs(10),
        "a prefix-cache hit reported",
        |m| m.replicas.iter().any(|r| r.prefix_cache_hit_rate > 0.0),
    )
    .await;
    let hit = m
        .replicas
        .iter()
        .find(|r| r.prefix_cache_hit_rate > 0.0)
        .unwrap();
    assert_eq!((hit.routed, hit.routed_for_prefix), (2, 1), "{m:#?}");
    let ws = admin
        .list_workers(api::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    let a0 = ws.iter().find(|w| w.id == "a0").unwrap();
    assert!(a0.shards.is_empty() && a0.pool == "a", "{a0:?}");

    // Labels narrow further.
    let mut labels = std::collections::HashMap::new();
    labels.insert("zone".to_string(), "z2".to_string());
    admin
        .deploy_model(api::DeployModelRequest {
            pool: "b".into(),
            labels,
            ..deploy("z2only", 1)
        })
        .await
        .unwrap();
    let m = status_of(&mut admin, "z2only").await;
    assert_eq!(engine_workers(&m), ["b1"]);

    // Bad input.
    let e = admin
        .scale_model(api::ScaleModelRequest {
            name: "nope".into(),
            replicas: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    assert!(e.message().contains("nope"), "{e}");
    let e = admin
        .scale_model(api::ScaleModelRequest {
            name: "smol".into(),
            replicas: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("at least 1"), "{e}");
    let e = admin
        .drain_worker(api::DrainWorkerRequest {
            worker_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let e = admin
        .deploy_model(api::DeployModelRequest {
            layer_split: vec![10, 10],
            stages: 2,
            ..deploy("badsplit", 1)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(
        e.message().contains("20") && e.message().contains("30"),
        "{e}"
    );
}

/// A 2-stage replica re-split from 15/15 to 8/22 layers while clients
/// generate: the new shape is loaded beside the old (four workers), the
/// traffic moves, the old one drains; no request fails, every output is
/// the one before. A split that does not cover the layers is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_split_under_load_loses_no_request_and_keeps_the_output() {
    let (_workers, mut admin, mut inference, want, load) = two_stage_under_load(1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let e = admin
        .resplit_model(api::ResplitModelRequest {
            name: "smol".into(),
            stages: 2,
            layer_split: vec![10, 10],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(
        e.message().contains("20") && e.message().contains("30"),
        "{e}"
    );
    let t = Instant::now();
    admin
        .resplit_model(api::ResplitModelRequest {
            name: "smol".into(),
            stages: 2,
            layer_split: vec![8, 22],
            wait: Some(true),
            wait_timeout_ms: 120_000,
        })
        .await
        .unwrap();
    println!("re-split 15/15 -> 8/22 under load: {:?}", t.elapsed());
    let m = status_of(&mut admin, "smol").await;
    assert_eq!(m.replicas.len(), 1, "{m:#?}");
    let ranges: Vec<(u32, u32)> = m.replicas[0]
        .stages
        .iter()
        .map(|s| (s.layer_start, s.layer_end))
        .collect();
    assert_eq!(ranges, [(0, 8), (8, 30)]);
    let (ok, failed) = load.stop().await;
    println!("{ok} requests served during the re-split");
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert_eq!(generated_ids(&mut inference, request("smol")).await, want);
}

/// Two 2-stage replicas fill four workers: no room for a new shape beside
/// them, so the re-split replaces one replica at a time while the other
/// serves; no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_room_replicas_re_split_one_at_a_time_while_the_other_serves() {
    let (_workers, mut admin, _, _, load) = two_stage_under_load(2).await;
    let t = Instant::now();
    admin
        .resplit_model(api::ResplitModelRequest {
            name: "smol".into(),
            stages: 2,
            layer_split: vec![8, 22],
            wait: Some(true),
            wait_timeout_ms: 180_000,
        })
        .await
        .unwrap();
    println!(
        "re-split of 2 replicas, one at a time, under load: {:?}",
        t.elapsed()
    );
    let m = status_of(&mut admin, "smol").await;
    assert_eq!(m.replicas.len(), 2, "{m:#?}");
    for r in &m.replicas {
        assert_eq!(
            (r.stages[0].layer_end, r.stages[1].layer_end),
            (8, 30),
            "{r:?}"
        );
    }
    let (ok, failed) = load.stop().await;
    println!("{ok} requests served during the re-split");
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
}

/// The built-in autoscaler (short windows here): requests waiting beyond
/// the threshold add a replica up to the maximum; idleness removes it
/// down to the minimum. Bounds that make no sense are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autoscaler_adds_a_replica_under_load_and_removes_it_when_idle() {
    let coordinator = start_coordinator_with(llmos_coordinator::Config {
        autoscale: llmos_coordinator::autoscaler::Policy {
            up_waiting: 1.0,
            up_window: Duration::from_secs(1),
            idle_window: Duration::from_secs(3),
        },
        ..test_config()
    })
    .await;
    start_worker(&coordinator, "w0").await;
    start_worker(&coordinator, "w1").await;
    let (mut admin, mut inference) = clients(&coordinator, 2).await;
    let e = admin
        .deploy_model(api::DeployModelRequest {
            autoscale_min: 0,
            autoscale_max: 2,
            ..deploy("bad", 1)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("min 0, max 2"), "{e}");
    admin
        .deploy_model(api::DeployModelRequest {
            autoscale_min: 1,
            autoscale_max: 2,
            // One sequence at a time: the others wait.
            serving: Some(api::ServingOptions {
                max_running: 1,
                ..Default::default()
            }),
            ..deploy("smol", 1)
        })
        .await
        .unwrap();
    let want = generated_ids(&mut inference, request("smol")).await;
    let load = Load::start(&coordinator, "smol", want, 4).await;
    let m = wait_model(
        &mut admin,
        "smol",
        Duration::from_secs(60),
        "scaled up to 2",
        |m| {
            m.replicas_desired == 2 && m.replicas.iter().filter(|r| r.state == "Ready").count() == 2
        },
    )
    .await;
    assert_eq!((m.autoscale_min, m.autoscale_max), (1, 2));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = status_of(&mut admin, "smol").await;
    assert_eq!(m.replicas_desired, 2, "never above the maximum: {m:#?}");
    let (ok, failed) = load.stop().await;
    assert!(failed.is_empty(), "{failed:?}");
    println!("{ok} requests served while scaling up");
    wait_model(
        &mut admin,
        "smol",
        Duration::from_secs(60),
        "scaled down to 1 when idle",
        |m| m.replicas_desired == 1 && m.replicas.len() == 1,
    )
    .await;
}

/// Only when every replica's queue is full does a request fail, with
/// RESOURCE_EXHAUSTED and the engine's retry hint (the router tried the
/// one it chose, then the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_exhausted_only_when_every_replica_is_full() {
    let coordinator = start_coordinator().await;
    start_worker(&coordinator, "w0").await;
    start_worker(&coordinator, "w1").await;
    let (mut admin, mut inference) = clients(&coordinator, 2).await;
    admin
        .deploy_model(api::DeployModelRequest {
            // One running and one waiting sequence per replica.
            serving: Some(api::ServingOptions {
                max_running: 1,
                max_waiting: 1,
                ..Default::default()
            }),
            ..deploy("smol", 2)
        })
        .await
        .unwrap();
    let long = || ids_request("smol", &[1, 504, 3458, 282, 4649, 314], 300);
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = connect(&coordinator, InferenceClient::new).await;
        let req = long();
        held.push(tokio::spawn(async move { ids_of(&mut c, req).await }));
        // Each lands before the next is routed (the router counts it).
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_model(
        &mut admin,
        "smol",
        Duration::from_secs(20),
        "both replicas full",
        |m| m.replicas.iter().all(|r| r.running == 1 && r.waiting == 1),
    )
    .await;
    let e = ids_of(&mut inference, long()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("limit 1"), "{e}");
    assert!(e.metadata().get("retry-after-ms").is_some(), "{e:?}");
    for h in held {
        h.abort();
    }
}
