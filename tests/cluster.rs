//! A coordinator and two workers on loopback (one in this process, one an
//! `llmos-worker` process): workers register, a model is deployed over
//! both, `Generate` streams the tokens a single process gives, bad requests
//! get their codes, a dropped client frees its KV blocks, and a stage whose
//! process is killed gives UNAVAILABLE naming it.

use std::time::{Duration, Instant};

use llmos_proto::v1 as api;
use llmos_proto::v1::admin_client::AdminClient;
use llmos_proto::v1::inference_client::InferenceClient;
use llmos_proto::worker::v1 as wk;
use llmos_tests::load;
use llmos_worker::server::register::{registration_loop, Registration};
use llmos_worker::server::{serve, HostHandle};
use tch::Kind;
use tonic::transport::Channel;

async fn start_coordinator() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = llmos_coordinator::Config {
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(3),
        step_timeout: Duration::from_secs(20),
        ..Default::default()
    };
    tokio::spawn(llmos_coordinator::serve(
        listener,
        config,
        std::future::pending(),
    ));
    format!("http://{addr}")
}

/// A worker process stand-in: its server and registration tasks.
#[allow(dead_code)] // held to keep the tasks' handles with the test
struct Worker {
    server: tokio::task::JoinHandle<()>,
    registration: tokio::task::JoinHandle<()>,
}

/// An `llmos-worker serve` process registering as `id`.
struct ProcWorker(std::process::Child);

impl ProcWorker {
    fn start(coordinator: &str, id: &str) -> Self {
        let exe = std::env::current_exe().unwrap();
        let bin = exe.parent().unwrap().parent().unwrap().join("llmos-worker");
        assert!(
            bin.exists(),
            "{} is missing: build the binaries first",
            bin.display()
        );
        let child = std::process::Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--threads", "1"])
            .args(["--coordinator", coordinator, "--worker-id", id])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        ProcWorker(child)
    }

    /// SIGKILL: no goodbye, connections reset.
    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ProcWorker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Starts a worker registering as `id` on a fresh port.
async fn start_worker(coordinator: &str, id: &str) -> Worker {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let registration = tokio::spawn(registration_loop(Registration {
        coordinator: coordinator.into(),
        worker_id: id.into(),
        address: format!("http://{addr}"),
        device: "cpu".into(),
    }));
    let server = tokio::spawn(async move {
        let _ = serve(listener, HostHandle::spawn(), std::future::pending()).await;
    });
    Worker {
        server,
        registration,
    }
}

async fn connect<T>(url: &str, make: impl Fn(Channel) -> T) -> T {
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

async fn wait_for_workers(admin: &mut AdminClient<Channel>, n: usize) {
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

fn text_request(model: &str, prompt: &str, max: u32) -> api::GenerateRequest {
    api::GenerateRequest {
        model: model.into(),
        prompt: Some(api::generate_request::Prompt::Text(prompt.into())),
        stopping: Some(api::StoppingCriteria {
            max_new_tokens: max,
            ..Default::default()
        }),
        logprobs: true,
        ..Default::default()
    }
}

/// All streamed messages, or the status that ended the stream.
async fn collect(
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

/// The model's engine figures, as `ClusterStatus` reports them.
async fn serving(admin: &mut AdminClient<Channel>, model: &str) -> api::ServingStatus {
    let s = admin
        .cluster_status(api::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let m = s.models.into_iter().find(|m| m.name == model).unwrap();
    m.serving.expect("the engine's figures")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_generate_cancel_and_faults() {
    const PROMPT: &str = "The capital of France is";
    let engine = load("smollm2", Kind::Float);
    let want = engine
        .generate(
            &llmos_worker::GenerateRequest {
                prompt: llmos_worker::PromptInput::Text(PROMPT.into()),
                sampling: Default::default(),
                max_new_tokens: 20,
                stop: vec![],
                ignore_eos: false,
            },
            &mut |_| true,
        )
        .unwrap();
    drop(engine);

    let coordinator = start_coordinator().await;
    let _w0 = start_worker(&coordinator, "w0").await;
    let mut w1 = ProcWorker::start(&coordinator, "w1");
    let mut admin = connect(&coordinator, AdminClient::new).await;
    let mut inference = connect(&coordinator, InferenceClient::new).await;
    wait_for_workers(&mut admin, 2).await;

    // Deploy over both workers with an explicit uneven split.
    let deploy = |name: &str, split: Vec<u32>| api::DeployModelRequest {
        name: name.into(),
        source: "smollm2".into(),
        layer_split: split,
        ..Default::default()
    };
    let d = admin
        .deploy_model(deploy("smol", vec![12, 18]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.stages.len(), 2);
    assert_eq!(
        (
            d.stages[0].layer_start,
            d.stages[0].layer_end,
            d.stages[1].layer_end
        ),
        (0, 12, 30)
    );
    assert_ne!(d.stages[0].worker_id, d.stages[1].worker_id);
    let models = inference
        .list_models(api::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models[0].num_layers, 30);

    // Generate streams the single-process tokens and text.
    let msgs = collect(&mut inference, text_request("smol", PROMPT, 20))
        .await
        .unwrap();
    let ids: Vec<u32> = msgs
        .iter()
        .flat_map(|m| m.tokens.iter().map(|t| t.id))
        .collect();
    let text: String = msgs
        .iter()
        .flat_map(|m| m.tokens.iter().map(|t| t.text.clone()))
        .collect();
    assert_eq!(ids, want.token_ids);
    assert_eq!(text, want.text);
    assert!(msgs
        .iter()
        .flat_map(|m| &m.tokens)
        .all(|t| t.logprob.is_some_and(|l| l <= 0.0)));
    let last = msgs.last().unwrap();
    let expect_finish = match want.finish_reason {
        llmos_meta::FinishReason::Eos => api::FinishReason::Eos,
        _ => api::FinishReason::Length,
    };
    assert_eq!(last.finish_reason, expect_finish as i32);
    assert_eq!(last.usage.unwrap().completion_tokens as usize, ids.len());

    // Bad requests and deploys get their codes.
    let e = collect(&mut inference, text_request("nope", PROMPT, 4))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let long = "word ".repeat(9000);
    let e = collect(&mut inference, text_request("smol", &long, 4))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(
        e.message().contains("context length") && e.message().contains("8192"),
        "{e}"
    );
    let e = admin
        .deploy_model(deploy("three", vec![10, 10, 10]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = admin
        .deploy_model(deploy("smol", vec![]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");

    // A client that drops its stream frees its blocks (on every stage: they
    // share one block table).
    let mut stream = inference
        .generate(api::GenerateRequest {
            stopping: Some(api::StoppingCriteria {
                max_new_tokens: 500,
                ignore_eos: true,
                ..Default::default()
            }),
            ..text_request("smol", PROMPT, 500)
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    stream.message().await.unwrap().unwrap();
    let busy = serving(&mut admin, "smol").await;
    assert_eq!(busy.running, 1, "{busy:?}");
    assert!(busy.kv_blocks_used >= 1, "{busy:?}");
    assert_eq!(busy.kv_blocks_total, 1024);
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = serving(&mut admin, "smol").await;
        if s.running == 0 && s.kv_blocks_used == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still held after the client left: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A stage that goes down: UNAVAILABLE naming it, in bounded time.
    w1.kill9();
    let t0 = Instant::now();
    let e = collect(&mut inference, text_request("smol", PROMPT, 4))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(
        e.message().contains("w1") || e.message().contains("w0"),
        "{e}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_little_memory_is_failed_precondition_with_the_shortfall() {
    let coordinator = start_coordinator().await;
    let mut reg = connect(&coordinator, wk::registry_client::RegistryClient::new).await;
    for id in ["tiny0", "tiny1"] {
        reg.register(wk::RegisterRequest {
            worker_id: id.into(),
            address: "http://127.0.0.1:9".into(),
            device: "cpu".into(),
            memory_total_bytes: 1 << 20,
            memory_free_bytes: 1 << 20,
        })
        .await
        .unwrap();
    }
    let mut admin = connect(&coordinator, AdminClient::new).await;
    let e = admin
        .deploy_model(api::DeployModelRequest {
            name: "smol".into(),
            source: "smollm2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("short by"), "{e}");
    let status = admin
        .cluster_status(api::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        status.models.is_empty(),
        "nothing half-deployed: {status:?}"
    );
    assert_eq!(status.workers.len(), 2);
}
