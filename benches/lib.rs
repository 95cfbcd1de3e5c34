//! End-to-end benchmarks and their shared set-up: `pipeline.rs` (pipeline
//! overhead), `tensor_parallel.rs` (tp=2 vs tp=1), `serving.rs` (load
//! generator: continuous batching against no batching and transformers
//! static batching), `small_gemm.rs` (the batched step's products against
//! libtorch's), `gpu_kernels.rs` (CUDA kernels against libtorch chains),
//! `control_plane.rs` (Raft vs etcd), `elastic.rs` (replicas, routing and
//! live scaling), `failover.rs` (streams through the loss of workers);
//! the single-process comparison with
//! peers is `single_process.sh`, int8 against bf16 `quantization.sh`.

use std::time::{Duration, Instant};

use llmos_proto::v1 as api;
use llmos_proto::v1::admin_client::AdminClient;
use llmos_worker::server::register::Registration;
use llmos_worker::server::{serve_registered, HostHandle};
use tonic::transport::Channel;

/// The value after `name` on the command line (e.g. `--requests 48`), or
/// `default`.
pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The phases named on a bench's command line (words not starting with
/// `-`; cargo passes `--bench` too), each checked against `known`: tells
/// whether a phase runs (all of them when none is named).
pub fn phases(known: &[&str]) -> impl Fn(&str) -> bool {
    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for n in &named {
        assert!(
            known.contains(&n.as_str()),
            "unknown phase {n:?}: one of {}",
            known.join(", ")
        );
    }
    move |phase| named.is_empty() || named.iter().any(|n| n == phase)
}

/// A channel to `url`, retrying for up to 20 s while the server starts.
pub async fn connect(url: &str) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tonic::transport::Endpoint::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
        {
            Ok(c) => return c,
            Err(e) => {
                assert!(Instant::now() < deadline, "{url}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A greedy request for exactly `max_new_tokens` tokens (EOS ignored) of
/// `model` after the token ids `ids`.
pub fn greedy_request(model: &str, ids: Vec<u32>, max_new_tokens: u32) -> api::GenerateRequest {
    api::GenerateRequest {
        model: model.into(),
        prompt: Some(api::generate_request::Prompt::TokenIds(api::TokenIds {
            ids,
        })),
        stopping: Some(api::StoppingCriteria {
            max_new_tokens,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Streams `max_new_tokens` greedy tokens (EOS ignored) of `model` after the
/// token ids `ids`; returns when the first token arrived and how many came.
pub async fn stream_greedy(
    ch: &Channel,
    model: &str,
    ids: Vec<u32>,
    max_new_tokens: u32,
) -> (Instant, usize) {
    let req = greedy_request(model, ids, max_new_tokens);
    let mut client = llmos_proto::v1::inference_client::InferenceClient::new(ch.clone());
    let mut s = client.generate(req).await.unwrap().into_inner();
    let (mut first, mut n) = (None, 0);
    while let Some(m) = s.message().await.unwrap() {
        n += m.tokens.len();
        first.get_or_insert_with(Instant::now);
    }
    (first.expect("a token"), n)
}

/// A coordinator on loopback in this process (heartbeats every 200 ms);
/// returns its URL.
pub async fn start_coordinator(config: llmos_coordinator::Config) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = llmos_coordinator::Config {
        heartbeat_interval: Duration::from_millis(200),
        ..config
    };
    tokio::spawn(llmos_coordinator::serve(
        listener,
        config,
        std::future::pending(),
    ));
    url
}

/// A coordinator and `workers` workers on loopback, in this process; returns
/// a channel to the coordinator once every worker has registered.
pub async fn start_cluster(workers: usize) -> Channel {
    let url = start_coordinator(Default::default()).await;
    for i in 0..workers {
        start_worker(&url, &format!("w{i}"), None).await;
    }
    let ch = connect(&url).await;
    wait_for_workers(&ch, workers).await;
    ch
}

/// A worker in this process registered as `id` with the coordinator at
/// `url` (its registry); over mutual TLS with `tls`.
pub async fn start_worker(url: &str, id: &str, tls: Option<std::sync::Arc<llmos_tls::Tls>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let rv = std::sync::Arc::new(
        llmos_worker::comm::Rendezvous::bind_with("127.0.0.1:0", tls.clone()).unwrap(),
    );
    let registration = Registration {
        coordinator: url.to_string(),
        tls,
        worker_id: id.to_string(),
        address: format!("http://{addr}"),
        device: "cpu".into(),
        collective_address: rv.local_addr().to_string(),
        ..Default::default()
    };
    tokio::spawn(serve_registered(
        l,
        HostHandle::spawn_with(Some(rv), tch::Device::Cpu),
        Some(registration),
        std::future::pending(),
    ));
}

/// Returns once `n` workers have registered with the coordinator at `ch`.
pub async fn wait_for_workers(ch: &Channel, n: usize) {
    let mut admin = AdminClient::new(ch.clone());
    while admin
        .list_workers(api::ListWorkersRequest {})
        .await
        .unwrap()
        .get_ref()
        .workers
        .len()
        < n
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deploys the embedded SmolLM2 as `name` over `stages` stages.
pub async fn deploy_smollm2(
    ch: &Channel,
    name: &str,
    stages: u32,
    serving: Option<api::ServingOptions>,
) {
    AdminClient::new(ch.clone())
        .deploy_model(api::DeployModelRequest {
            name: name.into(),
            source: "smollm2".into(),
            stages,
            serving,
            ..Default::default()
        })
        .await
        .unwrap();
}

/// An `llmos-worker serve` process (one libtorch thread), killed when
/// dropped.
pub struct WorkerProcess(pub std::process::Child);

/// The `llmos-worker` binary beside this bench's executable.
pub fn worker_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("llmos-worker");
    assert!(
        bin.exists(),
        "{} is missing: cargo build --release --bins",
        bin.display()
    );
    bin
}

/// Where a worker's log goes: appended to `$LLMOS_BENCH_LOG_DIR/<id>.log`
/// when that is set (to see what a bench's workers did), else nowhere.
fn log_file(id: &str) -> std::process::Stdio {
    let Some(dir) = std::env::var_os("LLMOS_BENCH_LOG_DIR") else {
        return std::process::Stdio::null();
    };
    let path = std::path::Path::new(&dir).join(format!("{id}.log"));
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(f) => f.into(),
        Err(e) => panic!("cannot open {}: {e}", path.display()),
    }
}

impl WorkerProcess {
    /// Registers as `id` with `coordinator`; pinned to `core` with
    /// `taskset` when given.
    pub fn start(coordinator: &str, id: &str, core: Option<usize>, extra: &[&str]) -> Self {
        let bin = worker_bin();
        let mut cmd = match core {
            Some(c) => {
                let mut t = std::process::Command::new("taskset");
                t.args(["-c", &c.to_string()]).arg(bin);
                t
            }
            None => std::process::Command::new(bin),
        };
        let child = cmd
            .args(["serve", "--listen", "127.0.0.1:0", "--threads", "1"])
            .args(["--coordinator", coordinator, "--worker-id", id])
            .args(extra)
            // A plaintext internal plane unless `extra` gives certificates.
            .args((!extra.iter().any(|a| *a == "--tls-cert")).then_some("--insecure"))
            .stdout(std::process::Stdio::null())
            .stderr(log_file(id))
            .spawn()
            .expect("llmos-worker (and taskset when pinned)");
        WorkerProcess(child)
    }

    /// SIGKILL, and reap it.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The `q` quantile (0..1) of `v`, nearest rank; NaN when empty.
pub fn pct(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}
