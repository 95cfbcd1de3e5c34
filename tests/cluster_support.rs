//! A cluster on loopback for the integration tests: a coordinator in this
//! process, workers in this process or as `llmos-worker` processes, clients
//! of the public API, and the requests the tests send.

use std::time::{Duration, Instant};

use llmos_proto::v1 as api;
use llmos_proto::v1::admin_client::AdminClient;
use llmos_proto::v1::inference_client::InferenceClient;
use llmos_worker::server::register::Registration;
use llmos_worker::server::{serve_registered, HostHandle};
use tonic::transport::Channel;

/// The coordinator configuration of the tests: quick heartbeats.
pub fn test_config() -> llmos_coordinator::Config {
    llmos_coordinator::Config {
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(3),
        step_timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

/// A coordinator in this process with its internal plane (registry, Raft)
/// on a listener of its own; (public URL, internal URL).
pub async fn start_planes(config: llmos_coordinator::Config) -> (String, String) {
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let internal = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (p, i) = (public.local_addr().unwrap(), internal.local_addr().unwrap());
    tokio::spawn(async move {
        let r = llmos_coordinator::serve_planes(
            public,
            Some(internal),
            None,
            config,
            std::future::pending(),
        )
        .await;
        eprintln!("coordinator stopped: {r:?}");
    });
    (format!("http://{p}"), format!("http://{i}"))
}

pub async fn start_coordinator() -> String {
    start_coordinator_with(test_config()).await
}

pub async fn start_coordinator_with(config: llmos_coordinator::Config) -> String {
    start_coordinator_at("127.0.0.1:0", config).await
}

/// A coordinator listening on `addr` (a loopback address, or the host's
/// end of a test's network namespace link).
pub async fn start_coordinator_at(addr: &str, config: llmos_coordinator::Config) -> String {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        // A coordinator that cannot start says why (the test then fails
        // to connect to it).
        if let Err(e) = llmos_coordinator::serve(listener, config, std::future::pending()).await {
            eprintln!("coordinator at {addr} stopped: {e}");
        }
    });
    format!("http://{addr}")
}

/// A worker process stand-in: its server and registration tasks.
/// An `llmos-worker serve` process registering as `id`.
pub struct ProcWorker(std::process::Child);

impl ProcWorker {
    pub fn start(coordinator: &str, id: &str) -> Self {
        Self::start_with(coordinator, id, &[])
    }

    /// The `llmos-worker` binary beside the test binary.
    pub fn bin() -> std::path::PathBuf {
        let exe = std::env::current_exe().unwrap();
        let bin = exe.parent().unwrap().parent().unwrap().join("llmos-worker");
        assert!(
            bin.exists(),
            "{} is missing: build the binaries first",
            bin.display()
        );
        bin
    }

    /// A worker started by `cmd` (e.g. inside a network namespace).
    pub fn spawn(mut cmd: std::process::Command) -> Self {
        ProcWorker(
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    /// With more `llmos-worker serve` arguments (e.g. a drain timeout).
    pub fn start_with(coordinator: &str, id: &str, extra: &[&str]) -> Self {
        let child = std::process::Command::new(Self::bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--threads", "1"])
            .args(["--coordinator", coordinator, "--worker-id", id])
            .args(extra)
            // A plaintext internal plane unless `extra` gives certificates.
            .args((!extra.iter().any(|a| *a == "--tls-cert")).then_some("--insecure"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        ProcWorker(child)
    }

    /// Waits up to `within` for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no goodbye, connections reset.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Sends `sig` (`-STOP` freezes it: it neither answers nor
    /// heartbeats, and keeps what it holds; `-CONT` thaws it).
    pub fn signal(&self, sig: &str) {
        assert!(std::process::Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .unwrap()
            .success());
    }
}

impl Drop for ProcWorker {
    fn drop(&mut self) {
        // A frozen process must thaw to die; a dead one ignores this.
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.id().to_string()])
            .stderr(std::process::Stdio::null())
            .status();
        self.kill9();
    }
}

/// Starts an in-process worker registering as `id` on a fresh port (its
/// tasks live as long as the test's runtime).
pub async fn start_worker(coordinator: &str, id: &str) {
    start_worker_in(coordinator, id, "", &[]).await
}

/// An in-process worker of worker pool `pool` with `labels` (k, v).
pub async fn start_worker_in(coordinator: &str, id: &str, pool: &str, labels: &[(&str, &str)]) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rv = std::sync::Arc::new(llmos_worker::comm::Rendezvous::bind("127.0.0.1:0").unwrap());
    let registration = Registration {
        coordinator: coordinator.into(),
        worker_id: id.into(),
        address: format!("http://{addr}"),
        device: "cpu".into(),
        collective_address: rv.local_addr().to_string(),
        pool: pool.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    tokio::spawn(async move {
        let _ = serve_registered(
            listener,
            HostHandle::spawn_with(Some(rv), tch::Device::Cpu),
            Some(registration),
            std::future::pending(),
        )
        .await;
    });
}

pub async fn connect<T>(url: &str, make: impl Fn(Channel) -> T) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tonic::transport::Endpoint::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
        {
            Ok(c) => return make(c),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("{url}: {e}"),
        }
    }
}

pub async fn wait_for_workers(admin: &mut AdminClient<Channel>, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let w = admin
            .list_workers(api::ListWorkersRequest {})
            .await
            .unwrap()
            .into_inner()
            .workers;
        if w.iter().filter(|w| w.healthy).count() >= n {
            return;
        }
        assert!(Instant::now() < deadline, "workers did not register: {w:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Admin and Inference clients of the coordinator at `url`, once
/// `workers` workers have registered with it.
pub async fn clients(
    url: &str,
    workers: usize,
) -> (AdminClient<Channel>, InferenceClient<Channel>) {
    let mut admin = connect(url, AdminClient::new).await;
    let inference = connect(url, InferenceClient::new).await;
    wait_for_workers(&mut admin, workers).await;
    (admin, inference)
}

/// All streamed messages, or the status that ended the stream.
pub async fn collect(
    client: &mut InferenceClient<Channel>,
    req: api::GenerateRequest,
) -> Result<Vec<api::GenerateResponse>, tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        out.push(m);
    }
    Ok(out)
}

/// Token ids of one generation, or its status.
pub async fn ids_of(
    inference: &mut InferenceClient<Channel>,
    req: api::GenerateRequest,
) -> Result<Vec<u32>, tonic::Status> {
    Ok(collect(inference, req)
        .await?
        .iter()
        .flat_map(|m| m.tokens.iter().map(|t| t.id))
        .collect())
}

pub async fn generated_ids(
    client: &mut InferenceClient<Channel>,
    req: api::GenerateRequest,
) -> Vec<u32> {
    ids_of(client, req).await.unwrap()
}

pub fn ids_request(model: &str, ids: &[u32], max: u32) -> api::GenerateRequest {
    api::GenerateRequest {
        model: model.into(),
        prompt: Some(api::generate_request::Prompt::TokenIds(api::TokenIds {
            ids: ids.to_vec(),
        })),
        stopping: Some(api::StoppingCriteria {
            max_new_tokens: max,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn tp_deploy(name: &str, source: &str, stages: u32, tp: u32) -> api::DeployModelRequest {
    api::DeployModelRequest {
        name: name.into(),
        source: source.into(),
        stages,
        tensor_parallel: tp,
        serving: Some(api::ServingOptions {
            kv_cache_blocks: 64,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The status of model `name`, if deployed (and the call succeeded).
pub async fn model_status(
    admin: &mut AdminClient<Channel>,
    name: &str,
) -> Option<api::ModelStatus> {
    admin
        .cluster_status(api::ClusterStatusRequest {})
        .await
        .ok()?
        .into_inner()
        .models
        .into_iter()
        .find(|m| m.name == name)
}

/// Polls until `done` holds for the model's status; returns that status.
pub async fn wait_model(
    admin: &mut AdminClient<Channel>,
    name: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&api::ModelStatus) -> bool,
) -> api::ModelStatus {
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        if let Some(m) = model_status(admin, name).await {
            if done(&m) {
                return m;
            }
            last = Some(m);
        }
        assert!(Instant::now() < deadline, "{what}: {last:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How one stream of a load ended: its token ids and the migrations its
/// usage reported.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub ids: Vec<u32>,
    pub migrations: u32,
}

/// The chaos workload: `n` requests of `max_new` tokens over a few prompts,
/// greedy and seeded in turn (ignoring EOS, so every run has one length).
pub fn mixed_requests(model: &str, n: usize, max_new: u32) -> Vec<api::GenerateRequest> {
    let prompts: [&[u32]; 3] = [
        &[1, 504, 3458, 282, 4649, 314],
        &[1, 9690, 314, 253, 1345, 28, 2575, 30, 2102],
        &[1, 4093, 13149, 359, 260, 10, 37, 89, 1562, 11, 1094, 42],
    ];
    (0..n)
        .map(|i| {
            let mut r = ids_request(model, prompts[i % prompts.len()], max_new);
            r.request_id = format!("chaos-{i}");
            if i % 2 == 1 {
                r.sampling = Some(api::SamplingParams {
                    temperature: 0.8,
                    top_p: 0.95,
                    seed: Some(1000 + i as u64),
                    ..Default::default()
                });
            }
            r
        })
        .collect()
}

/// Runs `reqs` at once against the coordinator at `url`; `received`
/// counts the tokens as they arrive (to time faults). A stream still open
/// after `within` is reported as hung.
pub async fn run_streams(
    url: &str,
    reqs: Vec<api::GenerateRequest>,
    received: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    within: Duration,
) -> Vec<Result<Outcome, String>> {
    let mut tasks = Vec::new();
    for req in reqs {
        let mut client = connect(url, InferenceClient::new).await;
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            let run = async {
                let mut stream = client
                    .generate(req)
                    .await
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                    .into_inner();
                let mut out = Outcome {
                    ids: Vec::new(),
                    migrations: 0,
                };
                loop {
                    match stream.message().await {
                        Ok(Some(m)) => {
                            received
                                .fetch_add(m.tokens.len(), std::sync::atomic::Ordering::Relaxed);
                            out.ids.extend(m.tokens.iter().map(|t| t.id));
                            if let Some(u) = m.usage {
                                out.migrations = u.migrations;
                            }
                        }
                        Ok(None) => return Ok(out),
                        Err(s) => return Err(format!("{:?}: {}", s.code(), s.message())),
                    }
                }
            };
            tokio::time::timeout(within, run)
                .await
                .unwrap_or_else(|_| Err(format!("hung: still open after {within:?}")))
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Waits (up to `within`) until `received` reaches `n`.
pub async fn wait_tokens(received: &std::sync::atomic::AtomicUsize, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while received.load(std::sync::atomic::Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "the streams did not reach {n} tokens"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// KV blocks each worker's engines hold (worker id, blocks used), from
/// their `Stats`.
pub async fn kv_blocks_in_use(admin: &mut AdminClient<Channel>) -> Vec<(String, u32)> {
    use llmos_proto::worker::v1 as wk;
    let workers = admin
        .list_workers(api::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    let mut out = Vec::new();
    for w in workers.iter().filter(|w| w.healthy) {
        let Ok(ch) = tonic::transport::Endpoint::from_shared(w.address.clone())
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await
        else {
            continue;
        };
        let Ok(stats) = wk::worker_client::WorkerClient::new(ch)
            .stats(wk::StatsRequest {})
            .await
        else {
            continue;
        };
        let used = stats
            .into_inner()
            .shards
            .iter()
            .filter_map(|s| s.engine.as_ref())
            .map(|e| e.kv_blocks_used)
            .sum();
        out.push((w.id.clone(), used));
    }
    out
}

/// Whether a stream broke without an answer from its coordinator (the
/// `Generate` resume protocol: then another coordinator resumes it).
pub fn lost_connection(s: &tonic::Status) -> bool {
    !s.metadata().contains_key(llmos_meta::failure::FAILURE_KEY)
        && matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        )
}

/// One stream following the documented client protocol: started on
/// `urls[first]`; when its coordinator goes away, sent again to the next
/// with `resume` listing the tokens received. Returns the outcome and how
/// many times it resumed.
pub async fn stream_resuming(
    urls: &[String],
    first: usize,
    req: api::GenerateRequest,
    received: &std::sync::atomic::AtomicUsize,
) -> Result<(Outcome, u32), String> {
    assert!(
        !req.request_id.is_empty(),
        "a resumable request names itself"
    );
    let mut out = Outcome {
        ids: Vec::new(),
        migrations: 0,
    };
    let mut resumes = 0;
    let mut errors = Vec::new();
    for k in 0..2 * urls.len() {
        let url = &urls[(first + k) % urls.len()];
        let Ok(ch) = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect_timeout(Duration::from_millis(500))
            .connect()
            .await
        else {
            errors.push(format!("{url}: not reachable"));
            continue;
        };
        let mut r = req.clone();
        if !out.ids.is_empty() {
            resumes += 1;
            r.resume = Some(api::Resume {
                received_token_ids: out.ids.clone(),
            });
        }
        let mut stream = match InferenceClient::new(ch).generate(r).await {
            Ok(s) => s.into_inner(),
            Err(s) if lost_connection(&s) || s.code() == tonic::Code::Unavailable => {
                errors.push(format!("{url}: {:?}: {}", s.code(), s.message()));
                continue;
            }
            Err(s) => return Err(format!("{url}: {:?}: {}", s.code(), s.message())),
        };
        loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    received.fetch_add(m.tokens.len(), std::sync::atomic::Ordering::Relaxed);
                    out.ids.extend(m.tokens.iter().map(|t| t.id));
                    if let Some(u) = m.usage {
                        out.migrations = u.migrations;
                    }
                }
                Ok(None) => return Ok((out, resumes)),
                Err(s) if lost_connection(&s) => {
                    errors.push(format!("{url}: {:?}: {}", s.code(), s.message()));
                    break;
                }
                Err(s) => return Err(format!("{url}: {:?}: {}", s.code(), s.message())),
            }
        }
    }
    Err(format!("no coordinator finished it: {errors:?}"))
}
