//! Tensor parallelism through the public API on loopback workers: tp, pp x
//! tp and tp beyond the KV heads give the single process's tokens, a model
//! that cannot be split is refused with the numbers, and a rank killed
//! mid-generation is UNAVAILABLE promptly and serves again once restarted.

use std::time::{Duration, Instant};

use llmos_proto::v1 as api;
use llmos_tests::cluster::*;
use llmos_tests::load;
use tch::Kind;

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
    let (mut admin, mut inference) = clients(&coordinator, 4).await;

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
    let (mut admin, mut inference) = clients(&coordinator, 2).await;
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
    let ids = loop {
        match ids_of(&mut inference, ids_request("tp", &prompt, 24)).await {
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
