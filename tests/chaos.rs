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

/// The chaos tests run one at a time: each loads SmolLM2 on several
/// worker processes, which two at once would fight over this machine's
/// cores for (timing every fault after the first's).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Prints a chaos summary where the test output shows it even when the
/// test passes (the harness captures `println!`, not direct writes).
fn summary(line: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

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
    let _one = ONE_AT_A_TIME.lock().await;
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
    summary(format!(
        "chaos summary: requests {}, kills {}, freezes {}, migrations {}, lost requests {}, mismatched outputs {}, lost stage replaced {:.1} s after the kill",
        tally.requests,
        tally.kills,
        tally.freezes,
        tally.migrations,
        tally.lost.len(),
        tally.mismatched.len(),
        replaced_after.as_secs_f64()
    ));
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

/// The coordinator leader of a 3-replica control plane is killed with
/// SIGKILL, together with a worker, while streams run through every
/// coordinator: the streams it served are resumed by their clients on
/// another coordinator (the documented protocol), the others migrate or
/// continue; every output is the undisturbed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_the_loss_of_the_coordinator_leader_and_a_worker() {
    let _one = ONE_AT_A_TIME.lock().await;
    use llmos_tests::group::*;
    let mut g = Group::founded_with(
        3,
        TICK_MS,
        &["--heartbeat-interval-ms".into(), "200".into()],
    );
    let urls = g.urls();
    let first_leader = leader(&urls, Duration::from_secs(15)).await;
    let mut workers: BTreeMap<String, ProcWorker> = (0..3)
        .map(|i| {
            let id = format!("w{i}");
            (id.clone(), ProcWorker::start(&urls.join(","), &id))
        })
        .collect();
    let mut a = admin(&urls[0]).await;
    wait_for_workers(&mut a, 3).await;
    a.deploy_model(api::DeployModelRequest {
        name: "smol".into(),
        source: "smollm2".into(),
        replicas: 2,
        wait_timeout_ms: 180_000,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("deploy: {e:?}"));
    let reqs = mixed_requests("smol", 6, 24);
    let received = AtomicUsize::new(0);
    let mut reference = Vec::new();
    for r in &reqs {
        let (o, _) = stream_resuming(&urls, 0, r.clone(), &received)
            .await
            .unwrap();
        reference.push(o);
    }
    assert!(reference.iter().all(|o| o.ids.len() == 24));
    // The CLI too follows the resume protocol; it starts on the leader.
    let leader_url = g.nodes[&first_leader].url();
    let cli_order: Vec<String> = std::iter::once(leader_url.clone())
        .chain(urls.iter().filter(|u| **u != leader_url).cloned())
        .collect();
    let cli_reference = Cli::run(&cli_order);
    cli_reference.wait_done();
    let cli_want = cli_reference.ids();
    assert_eq!(cli_want.len(), 48, "{:?}", cli_reference.lines());
    // The streams, spread over the three coordinators.
    let received = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        let (urls, r, received) = (urls.clone(), r.clone(), received.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(
                STREAM_DEADLINE,
                stream_resuming(&urls, i % urls.len(), r, &received),
            )
            .await
            .unwrap_or_else(|_| Err(format!("hung: still open after {STREAM_DEADLINE:?}")))
        }));
    }
    let cli = Cli::run(&cli_order);
    wait_tokens(&received, 12, Duration::from_secs(90)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while cli.ids().len() < 4 {
        assert!(
            Instant::now() < deadline,
            "the CLI streamed nothing: {:?}",
            cli.lines()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    g.nodes.get_mut(&first_leader).unwrap().kill9();
    // And the engine worker of one replica.
    let status = loop {
        let rest = g.urls();
        if let Some(mut c) = try_admin(&rest[0]).await {
            if let Ok(s) = c.cluster_status(api::ClusterStatusRequest {}).await {
                break s.into_inner();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let victim = status.models[0].replicas[0].stages[0].worker_id.clone();
    workers.get_mut(&victim).unwrap().kill9();
    let mut tally = Tally::default();
    let mut resumes = 0;
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap().map(|(o, r)| {
            resumes += r;
            o
        }));
    }
    tally.kills += 2;
    tally.check("leader+worker", got, &reference);
    summary(format!(
        "chaos summary (control plane): requests {}, kills {} (the coordinator leader and a worker), client resumes {resumes}, migrations {}, lost requests {}, mismatched outputs {}",
        tally.requests,
        tally.kills,
        tally.migrations,
        tally.lost.len(),
        tally.mismatched.len()
    ));
    assert!(tally.lost.is_empty(), "lost requests: {:#?}", tally.lost);
    assert!(
        tally.mismatched.is_empty(),
        "outputs differ from the undisturbed run: {:#?}",
        tally.mismatched
    );
    assert!(resumes > 0, "no stream was resumed: the leader served none");
    cli.wait_done();
    // It was killed under the CLI's stream: the CLI resumed elsewhere.
    assert!(cli.stderr().contains("trying the next"), "{}", cli.stderr());
    assert_eq!(
        cli.ids(),
        cli_want,
        "the CLI's resumed stream differs: {}",
        cli.stderr()
    );
    // The survivors elect a leader and serve new requests.
    let rest = g.urls();
    leader(&rest, Duration::from_secs(10)).await;
    let (o, _) = stream_resuming(&rest, 0, reqs[1].clone(), &AtomicUsize::new(0))
        .await
        .unwrap();
    assert_eq!(o.ids, reference[1].ids);
}

/// A network namespace linked to this one by a veth pair, for a worker
/// that can be cut off (its link set down: its traffic goes nowhere, with
/// no reset; the routes stay on the link, so nothing leaves through
/// another interface). Removed when dropped.
struct Netns {
    name: String,
    host_if: String,
    peer_if: String,
    subnet: String,
    host_ip: String,
    peer_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    fn create() -> Result<Netns, String> {
        let pid = std::process::id();
        let k = pid % 250 + 1;
        let n = Netns {
            name: format!("llmos-chaos-{pid}"),
            host_if: format!("lc{}h", pid % 100_000),
            peer_if: format!("lc{}n", pid % 100_000),
            subnet: format!("10.251.{k}.0/30"),
            host_ip: format!("10.251.{k}.1"),
            peer_ip: format!("10.251.{k}.2"),
        };
        ip(&["netns", "add", &n.name])?;
        let (ns, h, p) = (n.name.as_str(), n.host_if.as_str(), n.peer_if.as_str());
        ip(&["link", "add", h, "type", "veth", "peer", "name", p])?;
        ip(&["link", "set", p, "netns", ns])?;
        ip(&["addr", "add", &format!("{}/30", n.host_ip), "dev", h])?;
        ip(&["link", "set", h, "up"])?;
        // Should the link's route ever go, its traffic is dropped here
        // rather than sent to the default gateway.
        ip(&["route", "add", "blackhole", &n.subnet, "metric", "4000"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/30", n.peer_ip),
            "dev",
            p,
        ])?;
        ip(&["-n", ns, "link", "set", p, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        Ok(n)
    }

    /// Cuts the link (true) or restores it.
    fn partition(&self, cut: bool) {
        ip(&[
            "-n",
            &self.name,
            "link",
            "set",
            &self.peer_if,
            if cut { "down" } else { "up" },
        ])
        .unwrap();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["route", "del", "blackhole", &self.subnet, "metric", "4000"]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A worker in a network namespace is partitioned from the coordinator
/// mid-stream: it neither answers nor resets anything; its streams move
/// once its lease lapses, and when the link returns it serves again under
/// its placement, its cut-off sequences cancelled. Skipped, saying so,
/// where network namespaces cannot be created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_a_network_partition_of_a_worker() {
    let _one = ONE_AT_A_TIME.lock().await;
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(e) => {
            summary(format!("SKIPPED: the network partition case needs network namespaces, which this machine refused: {e}"));
            return;
        }
    };
    let coordinator = start_coordinator_at(&format!("{}:0", ns.host_ip), test_config()).await;
    let mut cut_off = std::process::Command::new("ip");
    cut_off
        .args(["netns", "exec", &ns.name])
        .arg(ProcWorker::bin())
        .args(["serve", "--threads", "1", "--worker-id", "wp", "--insecure"])
        .args(["--listen", &format!("{}:0", ns.peer_ip)])
        .args(["--coordinator", &coordinator]);
    let _workers = [
        ProcWorker::spawn(cut_off),
        ProcWorker::start(&coordinator, "w0"),
    ];
    let (mut admin, _inference) = clients(&coordinator, 2).await;
    admin
        .deploy_model(api::DeployModelRequest {
            name: "smol".into(),
            source: "smollm2".into(),
            replicas: 2,
            wait_timeout_ms: 180_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let reqs = mixed_requests("smol", 6, 24);
    let undisturbed = |r: Vec<Result<Outcome, String>>| -> Vec<Outcome> {
        r.into_iter()
            .map(|r| r.expect("an undisturbed stream failed"))
            .collect()
    };
    let reference = undisturbed(
        run_streams(
            &coordinator,
            reqs.clone(),
            Arc::new(AtomicUsize::new(0)),
            STREAM_DEADLINE,
        )
        .await,
    );
    let mut tally = Tally::default();
    let (got, _) = round(&coordinator, &reqs, 12, || ns.partition(true)).await;
    tally.check("partition", got, &reference);
    ns.partition(false);
    // Healed: both replicas serve again, with the same outputs, and no
    // engine holds KV for the sequences cut off.
    wait_model(
        &mut admin,
        "smol",
        Duration::from_secs(30),
        "the partitioned worker did not serve again",
        |m| m.replicas.iter().filter(|r| r.state == "Ready").count() == 2,
    )
    .await;
    let (got, _) = round(&coordinator, &reqs, 0, || {}).await;
    tally.check("healed", got, &reference);
    let deadline = Instant::now() + Duration::from_secs(15);
    let held = loop {
        let all = kv_blocks_in_use(&mut admin).await;
        let held: Vec<_> = all.iter().filter(|(_, n)| *n > 0).cloned().collect();
        if (held.is_empty() && all.len() == 2) || Instant::now() > deadline {
            break all;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    summary(format!(
        "chaos summary (partition): requests {}, partitions 1, migrations {}, lost requests {}, mismatched outputs {}",
        tally.requests,
        tally.migrations,
        tally.lost.len(),
        tally.mismatched.len()
    ));
    assert!(tally.lost.is_empty(), "lost requests: {:#?}", tally.lost);
    assert!(tally.mismatched.is_empty(), "{:#?}", tally.mismatched);
    assert!(
        tally.migrations > 0,
        "no stream was on the partitioned worker"
    );
    assert!(
        held.len() == 2 && held.iter().all(|(_, n)| *n == 0),
        "KV blocks still held (or a worker unreachable): {held:?}"
    );
}

/// `llmos --coordinator A,B,C generate --json` (greedy, 48 tokens): its
/// output lines as they come, and its stderr.
struct Cli {
    child: std::sync::Mutex<std::process::Child>,
    lines: Arc<std::sync::Mutex<Vec<String>>>,
    reader: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    stderr: std::sync::Mutex<Option<String>>,
}

impl Cli {
    fn run(coordinators: &[String]) -> Cli {
        use std::io::BufRead;
        let bin = ProcWorker::bin().with_file_name("llmos");
        let mut child = std::process::Command::new(bin)
            .args(["--coordinator", &coordinators.join(",")])
            .args([
                "generate",
                "--model",
                "smol",
                "--raw",
                "--json",
                "--ignore-eos",
            ])
            .args(["--max-tokens", "48", "--prompt", "The capital of France is"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the llmos binary (cargo build --release --bins)");
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        Cli {
            child: std::sync::Mutex::new(child),
            lines,
            reader: std::sync::Mutex::new(Some(reader)),
            stderr: std::sync::Mutex::new(None),
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The token ids printed so far.
    fn ids(&self) -> Vec<u32> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v.get("id").and_then(|i| i.as_u64()).map(|i| i as u32))
            .collect()
    }

    /// Waits (up to 2 minutes) for it to exit successfully.
    fn wait_done(&self) {
        let deadline = Instant::now() + STREAM_DEADLINE;
        loop {
            if let Some(s) = self.child.lock().unwrap().try_wait().unwrap() {
                if let Some(r) = self.reader.lock().unwrap().take() {
                    r.join().unwrap();
                }
                assert!(s.success(), "llmos generate failed: {}", self.stderr());
                return;
            }
            assert!(Instant::now() < deadline, "llmos generate hung");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What it wrote to stderr, once it exited (empty before).
    fn stderr(&self) -> String {
        use std::io::Read;
        let mut cached = self.stderr.lock().unwrap();
        if cached.is_none() {
            let mut c = self.child.lock().unwrap();
            if c.try_wait().ok().flatten().is_some() {
                let mut s = String::new();
                if let Some(mut e) = c.stderr.take() {
                    let _ = e.read_to_string(&mut s);
                }
                *cached = Some(s);
            }
        }
        cached.clone().unwrap_or_default()
    }
}

/// The resume protocol's refusals and a resume that continues exactly;
/// with migration off (`migration_limit` 0), a stream whose replica dies
/// ends with UNAVAILABLE naming the worker and the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_refusals_and_a_spent_migration_limit() {
    let _one = ONE_AT_A_TIME.lock().await;
    let coordinator = start_coordinator_with(llmos_coordinator::Config {
        migration_limit: 0,
        ..test_config()
    })
    .await;
    let mut worker = ProcWorker::start(&coordinator, "w0");
    let (mut admin, mut inference) = clients(&coordinator, 1).await;
    admin
        .deploy_model(api::DeployModelRequest {
            name: "smol".into(),
            source: "smollm2".into(),
            wait_timeout_ms: 120_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let req = mixed_requests("smol", 2, 16).remove(1); // seeded
    let whole = generated_ids(&mut inference, req.clone()).await;
    let resume = |ids: &[u32]| api::GenerateRequest {
        resume: Some(api::Resume {
            received_token_ids: ids.to_vec(),
        }),
        ..req.clone()
    };
    // Continues after the 5 tokens received: the undisturbed tail.
    let msgs = collect(&mut inference, resume(&whole[..5])).await.unwrap();
    let tail: Vec<u32> = msgs
        .iter()
        .flat_map(|m| m.tokens.iter().map(|t| t.id))
        .collect();
    assert_eq!(tail, whole[5..]);
    assert_eq!(msgs.last().unwrap().usage.unwrap().migrations, 1);
    // Refusals name what is wrong.
    let refused = |r: api::GenerateRequest| {
        let mut c = inference.clone();
        async move { collect(&mut c, r).await.unwrap_err() }
    };
    let e = refused(api::GenerateRequest {
        request_id: String::new(),
        ..resume(&whole[..5])
    })
    .await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("request_id"), "{}", e.message());
    let e = refused(resume(&whole)).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("nothing is left"), "{}", e.message());
    let e = refused(resume(&[whole[0], 1 << 30])).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("resume"), "{}", e.message());
    // Migration off: the replica's death ends the stream, saying why.
    let long = api::GenerateRequest {
        stopping: Some(api::StoppingCriteria {
            max_new_tokens: 200,
            ignore_eos: true,
            ..Default::default()
        }),
        ..req.clone()
    };
    let mut stream = inference.generate(long).await.unwrap().into_inner();
    stream.message().await.unwrap().expect("a first token");
    worker.kill9();
    let e = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended normally after its replica died"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.code(), tonic::Code::Unavailable, "{}", e.message());
    assert!(
        e.message().contains("w0") && e.message().contains("migration limit (0"),
        "{}",
        e.message()
    );
}
