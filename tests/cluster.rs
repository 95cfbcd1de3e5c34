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
use llmos_tests::cluster::*;
use llmos_tests::load;
use llmos_worker::Quantization;
use tch::Kind;
use tonic::transport::Channel;

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
    let (mut admin, mut inference) = clients(&coordinator, 2).await;

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
    // Options it left unset are in force at the one stated default each,
    // and the status says so.
    let status = admin
        .cluster_status(api::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let options = status.models[0].options.clone().expect("options in force");
    {
        use llmos_meta::serving as d;
        assert_eq!(
            (
                options.kv_cache_blocks,
                options.block_size,
                options.max_batch_tokens,
                options.max_running,
                options.max_waiting,
                options.pipeline_transport.as_str(),
            ),
            (
                d::DEFAULT_KV_BLOCKS,
                d::DEFAULT_BLOCK_SIZE,
                d::DEFAULT_MAX_BATCH_TOKENS,
                d::DEFAULT_MAX_RUNNING,
                d::DEFAULT_MAX_WAITING,
                d::DEFAULT_PIPELINE_TRANSPORT,
            )
        );
    }
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
    // A split that does not cover the model is refused at once (more
    // stages than workers is not: the reconciler waits for workers).
    let e = admin
        .deploy_model(deploy("short", vec![10, 10]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("20 layers"), "{e}");
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
    assert!(e.message().contains("w1"), "{e}");
    // Classified by code and metadata, not by the message: the first
    // stage's worker answered that the stage behind it is unavailable.
    let detail = |key| e.metadata().get(key).and_then(|v| v.to_str().ok());
    assert_eq!(
        detail(llmos_meta::failure::FAILURE_KEY),
        Some("stage-unavailable"),
        "{e:?}"
    );
    assert_eq!(
        detail(llmos_meta::failure::FAILED_WORKER_KEY),
        Some("w1"),
        "{e:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
}

/// A deploy that does not fit is recorded and waits, saying what for
/// (the shortfall, in `ClusterStatus`); a caller that waits gets
/// DEADLINE_EXCEEDED with that reason; and it completes by itself when a
/// worker with room registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_that_does_not_fit_waits_and_completes_when_room_appears() {
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
    // They stay alive (heartbeats) with 1 MiB free each.
    let beats = tokio::spawn(async move {
        loop {
            for id in ["tiny0", "tiny1"] {
                let _ = reg
                    .heartbeat(wk::HeartbeatRequest {
                        worker_id: id.into(),
                        memory_free_bytes: 1 << 20,
                        shards: vec![],
                    })
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut admin = connect(&coordinator, AdminClient::new).await;
    let req = |wait, wait_timeout_ms| api::DeployModelRequest {
        name: "smol".into(),
        source: "smollm2".into(),
        wait,
        wait_timeout_ms,
        ..Default::default()
    };
    let e = admin.deploy_model(req(None, 1500)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e}");
    assert!(
        e.message().contains("waiting for") && e.message().contains("short by"),
        "{e}"
    );
    // It stays deployed, Pending, with the shortfall as its reason.
    let status = admin
        .cluster_status(api::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let m = &status.models[0];
    assert_eq!(m.state, "Pending", "{m:?}");
    assert!(m.reason.starts_with("stage 0: waiting for"), "{m:?}");
    assert!(m.stages.is_empty(), "{m:?}");
    // Deploying it again is refused: it exists.
    let e = admin.deploy_model(req(Some(false), 0)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
    // A worker with room registers: the model converges on it.
    start_worker(&coordinator, "big").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let m = loop {
        let status = admin
            .cluster_status(api::ClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        let m = status.models[0].clone();
        if m.state == "Ready" {
            break m;
        }
        assert!(Instant::now() < deadline, "not Ready: {m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(m.reason.is_empty(), "{m:?}");
    assert_eq!(m.stages.len(), 1, "{m:?}");
    assert_eq!(m.stages[0].worker_id, "big");
    assert_eq!(m.stages[0].ranks_loaded, 1);
    let mut inference = connect(&coordinator, InferenceClient::new).await;
    let msgs = collect(&mut inference, text_request("smol", "Hello", 3))
        .await
        .unwrap();
    assert!(msgs.iter().map(|m| m.tokens.len()).sum::<usize>() >= 1);
    // Undeploy: the worker unloads it.
    admin
        .undeploy_model(api::UndeployModelRequest {
            name: "smol".into(),
            wait: None,
        })
        .await
        .unwrap();
    let workers = admin
        .list_workers(api::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    let big = workers.iter().find(|w| w.id == "big").unwrap();
    let mut worker = connect(
        &big.address,
        llmos_proto::worker::v1::worker_client::WorkerClient::new,
    )
    .await;
    let held = worker
        .stats(wk::StatsRequest {})
        .await
        .unwrap()
        .into_inner()
        .shards;
    assert!(held.is_empty(), "{held:?}");
    beats.abort();
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
    let (mut admin, mut inference) = clients(&coordinator, 2).await;
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
    let (mut admin, mut inference) = clients(&coordinator, 2).await;
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

/// A 16-bit KV cache chosen at deploy time (`ServingOptions.kv_cache_dtype`)
/// for an f32 model: two pipeline stages, each holding its cache in that
/// type, give the single process's tokens and log-probabilities with the
/// same cache type (within 2e-5), while the f32 cache's log-probabilities
/// differ by ten times more (so the check can tell); ClusterStatus reports the type
/// in force; an unknown type is INVALID_ARGUMENT naming the choices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_bit_kv_cache_deployment_matches_one_process() {
    let prompts: [&[u32]; 2] = [&[1, 5, 9, 13], &[300, 2, 77, 41, 8, 19]];
    let run = |kv| {
        let m = llmos_tests::load_with_kv("synthetic:tiny", Kind::Float, Quantization::None, kv);
        prompts
            .iter()
            .map(|p| {
                let req = llmos_worker::generate::GenerateRequest {
                    prompt: llmos_worker::generate::PromptInput::Tokens(p.to_vec()),
                    sampling: Default::default(),
                    max_new_tokens: 24,
                    stop: vec![],
                    ignore_eos: true,
                };
                let mut out = Vec::new();
                m.generate(&req, &mut |t| {
                    out.push((t.id, t.logprob));
                    true
                })
                .unwrap();
                out
            })
            .collect::<Vec<_>>()
    };
    let (want, exact) = (run(Some(Kind::BFloat16)), run(None));
    let worst = |a: &[Vec<(u32, f32)>], b: &[Vec<(u32, f32)>]| {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| {
                assert_eq!(x.0, y.0, "the tokens agree");
                (x.1 - y.1).abs()
            })
            .fold(0f32, f32::max)
    };
    let moved = worst(&want, &exact);
    assert!(
        moved > 2e-4,
        "a bf16 cache moves the tiny model's log-probabilities ({moved}): the check below can tell"
    );

    let coordinator = start_coordinator().await;
    for id in ["w0", "w1"] {
        start_worker(&coordinator, id).await;
    }
    let (mut admin, mut inference) = clients(&coordinator, 2).await;
    let with_kv = |name: &str, stages, kv: &str| api::DeployModelRequest {
        serving: Some(api::ServingOptions {
            kv_cache_blocks: 64,
            kv_cache_dtype: kv.into(),
            ..Default::default()
        }),
        ..tp_deploy(name, "synthetic:tiny", stages, 1)
    };
    let err = admin
        .deploy_model(with_kv("bad", 1, "fp8"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("kv_cache_dtype \"fp8\" is not one of auto, f32, bf16, f16"),
        "{}",
        err.message()
    );

    admin.deploy_model(with_kv("kv", 2, "bf16")).await.unwrap();
    let mut got = Vec::new();
    for p in prompts {
        let req = api::GenerateRequest {
            logprobs: true,
            ..ids_request("kv", p, 24)
        };
        let msgs = collect(&mut inference, req).await.unwrap();
        got.push(
            msgs.iter()
                .flat_map(|m| m.tokens.iter().map(|t| (t.id, t.logprob.unwrap())))
                .collect::<Vec<_>>(),
        );
    }
    let diff = worst(&got, &want);
    eprintln!(
        "bf16 KV cache over 2 stages: log-probabilities within {diff:.2e} of one process \
         with a bf16 cache ({moved:.2e} from its f32 cache)"
    );
    assert!(diff < 2e-5, "{diff}");
    let status = admin
        .cluster_status(api::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let m = status.models.iter().find(|m| m.name == "kv").unwrap();
    assert_eq!(m.stages.len(), 2);
    assert_eq!(m.options.as_ref().unwrap().kv_cache_dtype, "bf16");
}
