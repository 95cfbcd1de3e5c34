//! No lost request: streams running on a model of 2 replicas x 2 pipeline
//! stages (plus a spare worker) while workers are killed with SIGKILL and
//! frozen with SIGSTOP. Every stream completes, each output is the one an
//! undisturbed run of the same requests gives, the lost stage is replaced
//! on the spare (the surviving stage keeps its weights), and every engine's
//! KV accounting returns to zero. Prints a summary line.
//!
//! Needs `llmos-worker` built beside the test binary (`cargo build
//! --release --bins`, as `scripts/test.sh` does).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmos_proto::v1 as api;
use llmos_proto::v1::admin_client::AdminClient;
use llmos_tests::cluster::*;
use tonic::transport::Channel;

/// A stream may take this long, faults included (a frozen worker is
/// noticed after the test coordinator's 3 s lease).
const STREAM_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Default)]
struct Tally {
    requests: usize,
    kills: usize,
    freezes: usize,
    migrations: u32,
    lost: Vec<String>,
    mismatched: Vec<String>,
}

impl Tally {
    fn check(&mut self, round: &str, got: Vec<Result<Outcome, String>>, want: &[Outcome]) {
        for (i, (g, w)) in got.into_iter().zip(want).enumerate() {
            self.requests += 1;
            match g {
                Ok(o) => {
                    self.migrations += o.migrations;
                    if o.ids != w.ids {
                        self.mismatched
                            .push(format!("{round} #{i}: {:?}, want {:?}", o.ids, w.ids));
                    }
                }
                Err(e) => self.lost.push(format!("{round} #{i}: {e}")),
            }
        }
    }
}

async fn replicas(admin: &mut AdminClient<Channel>) -> Vec<api::ReplicaStatus> {
    model_status(admin, "smol")
        .await
        .expect("deployed")
        .replicas
}

/// Runs the workload, applying `fault` once the streams have produced
/// `after` tokens; returns the outcomes and when the fault hit.
async fn round(
    url: &str,
    reqs: &[api::GenerateRequest],
    after: usize,
    fault: impl FnOnce(),
) -> (Vec<Result<Outcome, String>>, Instant) {
    let received = Arc::new(AtomicUsize::new(0));
    let run = tokio::spawn({
        let (url, reqs, received) = (url.to_string(), reqs.to_vec(), received.clone());
        async move { run_streams(&url, reqs, received, STREAM_DEADLINE).await }
    });
    wait_tokens(&received, after, Duration::from_secs(90)).await;
    fault();
    let at = Instant::now();
    (run.await.unwrap(), at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_killed_and_frozen_workers_token_for_token() {
    let coordinator = start_coordinator().await;
    let mut workers: BTreeMap<String, ProcWorker> = (0..5)
        .map(|i| {
            let id = format!("w{i}");
            (id.clone(), ProcWorker::start(&coordinator, &id))
        })
        .collect();
    let (mut admin, _inference) = clients(&coordinator, 5).await;
    admin
        .deploy_model(api::DeployModelRequest {
            name: "smol".into(),
            source: "smollm2".into(),
            replicas: 2,
            stages: 2,
            layer_split: vec![15, 15],
            wait_timeout_ms: 180_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let reqs = mixed_requests("smol", 6, 24);
    // The undisturbed run.
    let reference: Vec<Outcome> = run_streams(
        &coordinator,
        reqs.clone(),
        Arc::new(AtomicUsize::new(0)),
        STREAM_DEADLINE,
    )
    .await
    .into_iter()
    .map(|r| r.expect("an undisturbed stream failed"))
    .collect();
    assert!(reference
        .iter()
        .all(|o| o.ids.len() == 24 && o.migrations == 0));
    let mut tally = Tally::default();

    // 1. SIGKILL the second stage of one replica mid-stream.
    let before = replicas(&mut admin).await;
    let (hit, kept) = (before[0].id, before[0].stages[0].worker_id.clone());
    let victim = before[0].stages[1].worker_id.clone();
    let (got, killed_at) = round(&coordinator, &reqs, 12, || {
        workers.get_mut(&victim).unwrap().kill9();
    })
    .await;
    tally.kills += 1;
    tally.check("kill", got, &reference);
    // Only the lost stage is replaced: on the spare, the first stage
    // staying where it was (no group teardown).
    let m = wait_model(
        &mut admin,
        "smol",
        Duration::from_secs(90),
        "the lost stage was not replaced",
        |m| {
            m.replicas.iter().any(|r| {
                r.id == hit && r.state == "Ready" && r.stages.iter().all(|s| s.worker_id != victim)
            })
        },
    )
    .await;
    let replaced_after = killed_at.elapsed();
    let r = m.replicas.iter().find(|r| r.id == hit).unwrap();
    assert_eq!(
        r.stages[0].worker_id, kept,
        "the surviving stage moved: {r:?}"
    );
    // The killed worker comes back as a spare.
    workers.insert(victim.clone(), ProcWorker::start(&coordinator, &victim));

    // 2. SIGSTOP the engine's worker of the other replica mid-stream: it
    // answers nothing; its streams move once its lease lapses.
    let frozen = replicas(&mut admin)
        .await
        .into_iter()
        .find(|r| r.id != hit)
        .expect("two replicas")
        .stages[0]
        .worker_id
        .clone();
    let (got, _) = round(&coordinator, &reqs, 12, || {
        workers[&frozen].signal("-STOP");
    })
    .await;
    tally.freezes += 1;
    tally.check("freeze", got, &reference);
    workers[&frozen].signal("-CONT");

    // 3. Once thawed, it serves again under its placement (its late
    // sequences were cancelled, not continued), and nothing holds KV.
    wait_model(
        &mut admin,
        "smol",
        Duration::from_secs(30),
        "the thawed replica did not serve again",
        |m| m.replicas.iter().filter(|r| r.state == "Ready").count() == 2,
    )
    .await;
    let (got, _) = round(&coordinator, &reqs, 0, || {}).await;
    tally.check("after", got, &reference);
    let deadline = Instant::now() + Duration::from_secs(15);
    let held = loop {
        let held: Vec<(String, u32)> = kv_blocks_in_use(&mut admin)
            .await
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect();
        if held.is_empty() || Instant::now() > deadline {
            break held;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "chaos summary: requests {}, kills {}, freezes {}, migrations {}, lost requests {}, mismatched outputs {}, lost stage replaced {:.1} s after the kill",
        tally.requests,
        tally.kills,
        tally.freezes,
        tally.migrations,
        tally.lost.len(),
        tally.mismatched.len(),
        replaced_after.as_secs_f64()
    );
    assert!(tally.lost.is_empty(), "lost requests: {:#?}", tally.lost);
    assert!(
        tally.mismatched.is_empty(),
        "outputs differ from the undisturbed run: {:#?}",
        tally.mismatched
    );
    assert!(
        tally.migrations > 0,
        "no stream was migrated: the faults missed them"
    );
    assert!(held.is_empty(), "KV blocks still held: {held:?}");
}
