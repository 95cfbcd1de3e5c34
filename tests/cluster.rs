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
use llmos_worker::Quantization;
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

/// Starts an in-process worker registering as `id` on a fresh port (its
/// tasks live as long as the test's runtime).
async fn start_worker(coordinator: &str, id: &str) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rv =
        std::sync::Arc::new(llmos_worker::collective::Rendezvous::bind("127.0.0.1:0").unwrap());
    tokio::spawn(registration_loop(Registration {
        coordinator: coordinator.into(),
        worker_id: id.into(),
        address: format!("http://{addr}"),
        device: "cpu".into(),
        collective_address: rv.local_addr().to_string(),
    }));
    tokio::spawn(async move {
        let _ = serve(
            listener,
            HostHandle::spawn_with(Some(rv)),
            std::future::pending(),
        )
        .await;
    });
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
    start_worker(&coordinator, "w0").await;
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
            ..Default::default()
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

/// Token ids of one generation, or its status.
async fn ids_of(
    inference: &mut InferenceClient<Channel>,
    req: api::GenerateRequest,
) -> Result<Vec<u32>, tonic::Status> {
    Ok(collect(inference, req)
        .await?
        .iter()
        .flat_map(|m| m.tokens.iter().map(|t| t.id))
        .collect())
}

fn serving_deploy(name: &str, serving: api::ServingOptions) -> api::DeployModelRequest {
    api::DeployModelRequest {
        name: name.into(),
        source: "smollm2".into(),
        layer_split: vec![15, 15],
        serving: Some(serving),
        ..Default::default()
    }
}

/// The serving engine through the public API, over two pipeline stages:
/// concurrent requests batch (with micro-batches in flight on both stages)
/// and give the tokens they give alone; a cache too small for all of them
/// preempts and still gives the same tokens; a repeated system prompt hits
/// the prefix cache (hit rate in ClusterStatus) with unchanged tokens; a
/// full queue is RESOURCE_EXHAUSTED with a retry hint; a timeout is
/// DEADLINE_EXCEEDED; and every block comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_engine_through_the_api() {
    let coordinator = start_coordinator().await;
    start_worker(&coordinator, "s0").await;
    start_worker(&coordinator, "s1").await;
    let mut admin = connect(&coordinator, AdminClient::new).await;
    let mut inference = connect(&coordinator, InferenceClient::new).await;
    wait_for_workers(&mut admin, 2).await;
    let opts = |blocks, running, waiting| api::ServingOptions {
        kv_cache_blocks: blocks,
        max_running: running,
        max_waiting: waiting,
        ..Default::default()
    };
    admin
        .deploy_model(serving_deploy("roomy", opts(256, 8, 16)))
        .await
        .unwrap();
    let questions = [
        "What is the capital of Italy?",
        "Name three colours of the rainbow.",
        "Why is the sky blue? Answer in one sentence.",
        "Write a haiku about autumn leaves falling.",
        "What is 12 times 12?",
        "Give me a synonym for happy.",
    ];
    let req = |model: &str, q: &str| api::GenerateRequest {
        model: model.into(),
        prompt: Some(api::generate_request::Prompt::Chat(api::ChatMessages {
            messages: vec![
                api::ChatMessage {
                    role: "system".into(),
                    content: "You are a concise assistant. Answer briefly and precisely, \
                              without preamble, in plain English."
                        .into(),
                },
                api::ChatMessage {
                    role: "user".into(),
                    content: q.into(),
                },
            ],
        })),
        stopping: Some(api::StoppingCriteria {
            max_new_tokens: 24,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut alone = Vec::new();
    for q in questions {
        alone.push(ids_of(&mut inference, req("roomy", q)).await.unwrap());
    }
    let before = serving(&mut admin, "roomy").await;
    // The shared system prompt (more than one 16-position block) hit the
    // prefix cache from the second request on.
    assert!(before.prefix_hit_tokens >= 5 * 16, "{before:?}");
    assert!(before.prefix_cache_hit_rate > 0.3, "{before:?}");
    let run_all = |model: &'static str| {
        let questions = questions;
        let coordinator = coordinator.clone();
        async move {
            let mut tasks = Vec::new();
            for q in questions {
                let mut c = connect(&coordinator, InferenceClient::new).await;
                let r = req(model, q);
                tasks.push(tokio::spawn(
                    async move { ids_of(&mut c, r).await.unwrap() },
                ));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        }
    };
    assert_eq!(run_all("roomy").await, alone, "batched == alone");
    let after = serving(&mut admin, "roomy").await;
    let steps = after.steps - before.steps;
    assert!(
        steps < 6 * 24 / 2,
        "{steps} steps for 144 tokens: not batched"
    );
    assert_eq!((after.running, after.kv_blocks_used), (0, 0), "{after:?}");

    // 14 blocks of 16 positions for six sequences of ~60: preemption.
    admin
        .deploy_model(serving_deploy("tight", opts(14, 8, 16)))
        .await
        .unwrap();
    assert_eq!(run_all("tight").await, alone, "preempted == alone");
    let tight = serving(&mut admin, "tight").await;
    assert!(tight.preemptions > 0, "{tight:?}");
    assert_eq!(tight.kv_blocks_used, 0, "{tight:?}");

    // One running, one waiting: a third is refused with a retry hint; a
    // timeout ends a request with DEADLINE_EXCEEDED.
    admin
        .deploy_model(serving_deploy("narrow", opts(64, 1, 1)))
        .await
        .unwrap();
    let long = |timeout_ms| api::GenerateRequest {
        stopping: Some(api::StoppingCriteria {
            max_new_tokens: 400,
            ignore_eos: true,
            ..Default::default()
        }),
        timeout_ms,
        ..req("narrow", questions[0])
    };
    let mut first = inference.generate(long(0)).await.unwrap().into_inner();
    first.message().await.unwrap().unwrap(); // running
    let mut c = connect(&coordinator, InferenceClient::new).await;
    let second = long(400);
    let waiting = tokio::spawn(async move { ids_of(&mut c, second).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while serving(&mut admin, "narrow").await.waiting == 0 {
        assert!(Instant::now() < deadline, "the second request never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = ids_of(&mut inference, long(0)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("limit 1"), "{e}");
    assert!(e.metadata().get("retry-after-ms").is_some(), "{e:?}");
    let e = waiting.await.unwrap().unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e}");
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = serving(&mut admin, "narrow").await;
        if (s.running, s.waiting, s.kv_blocks_used) == (0, 0, 0) {
            break;
        }
        assert!(Instant::now() < deadline, "not freed: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ids_request(model: &str, ids: &[u32], max: u32) -> api::GenerateRequest {
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

async fn generated_ids(
    client: &mut InferenceClient<Channel>,
    req: api::GenerateRequest,
) -> Vec<u32> {
    collect(client, req)
        .await
        .unwrap()
        .iter()
        .flat_map(|m| m.tokens.iter().map(|t| t.id))
        .collect()
}

fn tp_deploy(name: &str, source: &str, stages: u32, tp: u32) -> api::DeployModelRequest {
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

/// Int8 weight-only quantization chosen at deploy time: two pipeline
/// stages of the tiny model, each quantizing its layers at load, give the
/// single process's int8 greedy tokens; ListModels reports it; an unknown
/// scheme is INVALID_ARGUMENT naming it and the supported ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn int8_deployment_matches_one_process() {
    let prompts: [&[u32]; 2] = [&[1, 5, 9, 13], &[300, 2, 77, 41, 8, 19]];
    let q = llmos_tests::load_quantized("synthetic:tiny", Kind::Float, Quantization::Int8);
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| llmos_tests::greedy(&q, p, 24))
        .collect();
    drop(q);
    let dense = load("synthetic:tiny", Kind::Float);
    let dense_tokens: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| llmos_tests::greedy(&dense, p, 24))
        .collect();
    drop(dense);
    assert_ne!(
        want, dense_tokens,
        "int8 changes the tiny model's tokens: the check below can tell"
    );

    let coordinator = start_coordinator().await;
    for id in ["w0", "w1"] {
        start_worker(&coordinator, id).await;
    }
    let mut admin = connect(&coordinator, AdminClient::new).await;
    let mut inference = connect(&coordinator, InferenceClient::new).await;
    wait_for_workers(&mut admin, 2).await;
    let err = admin
        .deploy_model(api::DeployModelRequest {
            quantization: "int4".into(),
            ..tp_deploy("bad", "synthetic:tiny", 1, 1)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("\"int4\"") && err.message().contains("int8"),
        "{}",
        err.message()
    );

    admin
        .deploy_model(api::DeployModelRequest {
            quantization: "int8".into(),
            ..tp_deploy("q8", "synthetic:tiny", 2, 1)
        })
        .await
        .unwrap();
    for (p, w) in prompts.iter().zip(&want) {
        let got = generated_ids(&mut inference, ids_request("q8", p, 24)).await;
        assert_eq!(&got, w, "prompt {p:?}");
    }
    let models = inference
        .list_models(api::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models[0].quantization, "int8");
}

/// Tensor parallelism through the public API on four in-process workers:
/// tp=2, pp=2 x tp=2, and tp=4 (more ranks than the model's 2 KV heads) on
/// the tiny model, and SmolLM2 from its Q4_1 GGUF over tp=3 (each rank
/// dequantizing only its rows and columns): greedy tokens equal the single
/// process, alone and batched. A model that cannot be split is refused
/// with the numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_parallel_deployments_match_one_process() {
    let prompts: [&[u32]; 3] = [&[1, 5, 9, 13], &[300, 2, 77, 41, 8, 19], &[7]];
    let tiny = load("synthetic:tiny", Kind::Float);
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| llmos_tests::greedy(&tiny, p, 24))
        .collect();
    drop(tiny);

    let coordinator = start_coordinator().await;
    for id in ["w0", "w1", "w2", "w3"] {
        start_worker(&coordinator, id).await;
    }
    let mut admin = connect(&coordinator, AdminClient::new).await;
    let mut inference = connect(&coordinator, InferenceClient::new).await;
    wait_for_workers(&mut admin, 4).await;

    for (name, stages, tp) in [("tp2", 1, 2), ("pp2tp2", 2, 2), ("tp4", 1, 4)] {
        let d = admin
            .deploy_model(tp_deploy(name, "synthetic:tiny", stages, tp))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(d.stages.len(), stages as usize, "{name}");
        let mut seen: Vec<String> = Vec::new();
        for s in &d.stages {
            assert_eq!(s.tensor_parallel_workers.len(), tp as usize - 1, "{name}");
            seen.push(s.worker_id.clone());
            seen.extend(s.tensor_parallel_workers.iter().cloned());
        }
        seen.sort();
        seen.dedup();
        assert_eq!(
            seen.len(),
            (stages * tp) as usize,
            "{name}: a worker per rank"
        );
        // Alone, then all three at once (a batched step broadcast to the
        // group).
        for (p, w) in prompts.iter().zip(&want) {
            let got = generated_ids(&mut inference, ids_request(name, p, 24)).await;
            assert_eq!(&got, w, "{name}: prompt {p:?} alone");
        }
        let mut tasks = Vec::new();
        for p in prompts {
            let mut c = inference.clone();
            let req = ids_request(name, p, 24);
            tasks.push(tokio::spawn(
                async move { generated_ids(&mut c, req).await },
            ));
        }
        for (t, w) in tasks.into_iter().zip(&want) {
            assert_eq!(&t.await.unwrap(), w, "{name}: batched");
        }
        admin
            .undeploy_model(api::UndeployModelRequest { name: name.into() })
            .await
            .unwrap();
    }

    // SmolLM2 has 9 heads: 2 ranks cannot split them.
    let e = admin
        .deploy_model(tp_deploy("smol-tp2", "smollm2", 1, 2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(
        e.message()
            .contains("2 does not divide the model's 9 attention heads"),
        "{e}"
    );
    // Asking for more ranks than there are workers names both counts.
    let e = admin
        .deploy_model(tp_deploy("tiny-big", "synthetic:tiny", 3, 2))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("need 6 workers, 4 are registered"),
        "{e}"
    );

    // SmolLM2 from the GGUF over 3 ranks.
    let smol = load("smollm2", Kind::Float);
    let prompt = smol
        .prompt_ids(&llmos_worker::PromptInput::Text(
            "The capital of France is".into(),
        ))
        .unwrap();
    let want = llmos_tests::greedy(&smol, &prompt, 16);
    drop(smol);
    admin
        .deploy_model(tp_deploy("smol-tp3", "smollm2", 1, 3))
        .await
        .unwrap();
    let got = generated_ids(&mut inference, ids_request("smol-tp3", &prompt, 16)).await;
    assert_eq!(got, want, "SmolLM2 over tp=3");
}

/// One rank of a tp=2 group is a real process; SIGKILL it mid-generation:
/// the stream ends with UNAVAILABLE within seconds (the surviving rank's
/// collective sees the closed link; if the killed one led, the leader's
/// stream is gone). Then the rank's process restarts under the same worker
/// id: the coordinator reloads the stage on it, the group re-forms, and the
/// model serves again with the single process's greedy tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_rank_mid_generation_is_unavailable_promptly_and_a_restart_recovers() {
    let prompt = [1u32, 5, 9, 13];
    let tiny = load("synthetic:tiny", Kind::Float);
    let want = llmos_tests::greedy(&tiny, &prompt, 24);
    drop(tiny);
    let coordinator = start_coordinator().await;
    start_worker(&coordinator, "w0").await;
    let mut p1 = ProcWorker::start(&coordinator, "p1");
    let mut admin = connect(&coordinator, AdminClient::new).await;
    let mut inference = connect(&coordinator, InferenceClient::new).await;
    wait_for_workers(&mut admin, 2).await;
    admin
        .deploy_model(tp_deploy("tp", "synthetic:tiny", 1, 2))
        .await
        .unwrap();
    let mut stream = inference
        .generate(ids_request("tp", &[1, 2, 3], 1000))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    let mut killed_at = None;
    let status = loop {
        match stream.message().await {
            Ok(Some(m)) => {
                n += m.tokens.len();
                if n >= 5 && killed_at.is_none() {
                    p1.kill9();
                    killed_at = Some(Instant::now());
                }
            }
            Ok(None) => panic!("the stream ended without an error after {n} tokens"),
            Err(s) => break s,
        }
    };
    let after = killed_at.expect("killed after 5 tokens").elapsed();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert!(after < Duration::from_secs(10), "took {after:?}");

    // The same worker id comes back on a new port: requests fail until its
    // rank is reloaded and the group re-formed, then serve again.
    let _p1 = ProcWorker::start(&coordinator, "p1");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut failures = Vec::new();
    let got = loop {
        match collect(&mut inference, ids_request("tp", &prompt, 24)).await {
            Ok(r) => break r,
            // Never a wrong answer or an internal error while it recovers.
            Err(e) => {
                assert!(
                    matches!(
                        e.code(),
                        tonic::Code::Unavailable | tonic::Code::FailedPrecondition
                    ),
                    "{e}"
                );
                failures.push(e);
            }
        }
        assert!(
            Instant::now() < deadline,
            "not serving 60 s after the rank restarted: {failures:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let ids: Vec<u32> = got
        .iter()
        .flat_map(|m| m.tokens.iter().map(|t| t.id))
        .collect();
    assert_eq!(
        ids,
        want,
        "after the restart ({} failed tries)",
        failures.len()
    );
    let workers = admin
        .list_workers(api::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        workers.workers.len(),
        2,
        "the restarted rank re-registered, not a third worker"
    );
}
