//! Layers of SmolLM2 split across gRPC worker shards (in-process servers on
//! loopback) give the logits and greedy tokens of the single-process model;
//! bad input gets the right status code; a dropped stream frees its caches.

use std::time::{Duration, Instant};

use llmos_proto::worker::v1 as pb;
use llmos_proto::worker::v1::worker_client::WorkerClient;
use llmos_tests::{all_logits, greedy, load, max_abs_diff};
use llmos_worker::server::codec::{from_wire, to_wire};
use llmos_worker::server::{serve, HostHandle};
use tch::{Kind, Tensor};
use tonic::transport::Channel;

async fn start_worker() -> WorkerClient<Channel> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, HostHandle::spawn(), std::future::pending()));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match WorkerClient::connect(format!("http://{addr}")).await {
            Ok(c) => return c.max_decoding_message_size(64 << 20),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("worker at {addr} not ready: {e}"),
        }
    }
}

fn shard(model: &str, layers: std::ops::Range<u32>, embed: bool, head: bool) -> pb::ShardSpec {
    pb::ShardSpec {
        model: model.into(),
        source: "smollm2".into(),
        layer_start: layers.start,
        layer_end: layers.end,
        embed,
        head,
        dtype: pb::DType::F32 as i32,
    }
}

/// One pipeline: a Forward stream per stage, fed in order.
struct Pipeline {
    model: String,
    stages: Vec<(
        tokio::sync::mpsc::Sender<pb::ForwardRequest>,
        tonic::Streaming<pb::ForwardResponse>,
    )>,
}

impl Pipeline {
    async fn open(model: &str, workers: &mut [WorkerClient<Channel>]) -> Self {
        let mut stages = Vec::new();
        for w in workers.iter_mut() {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let resp = w
                .forward(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            stages.push((tx, resp));
        }
        Pipeline {
            model: model.into(),
            stages,
        }
    }

    /// Runs `ids` (at cached position `pos`) through every stage; returns the
    /// last position's logits.
    async fn step(&mut self, seq: &str, ids: &[u32], pos: u32) -> Result<Vec<f32>, tonic::Status> {
        match self.run(seq, ids, pos, None).await? {
            pb::forward_response::Output::Logits(l) => {
                let t = from_wire(&l, "logits").unwrap();
                Ok(Vec::try_from(t.view([-1])).unwrap())
            }
            other => panic!("expected logits, got {other:?}"),
        }
    }

    /// Like `step`, with the last stage sampling: returns (token, logprob).
    async fn sample(&mut self, seq: &str, ids: &[u32], pos: u32, s: pb::Sampling) -> (u32, f32) {
        match self.run(seq, ids, pos, Some(s)).await.unwrap() {
            pb::forward_response::Output::Token(t) => (t.id, t.logprob),
            other => panic!("expected a token, got {other:?}"),
        }
    }

    async fn run(
        &mut self,
        seq: &str,
        ids: &[u32],
        pos: u32,
        sample: Option<pb::Sampling>,
    ) -> Result<pb::forward_response::Output, tonic::Status> {
        let x: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let mut input =
            pb::forward_request::Input::Tokens(to_wire(&Tensor::from_slice(&x).unsqueeze(0)));
        let n = self.stages.len();
        for (i, (tx, rx)) in self.stages.iter_mut().enumerate() {
            let last = i + 1 == n;
            tx.send(pb::ForwardRequest {
                model: self.model.clone(),
                sequence_id: seq.into(),
                position: pos,
                input: Some(input),
                want_logits: last,
                sample: if last { sample } else { None },
            })
            .await
            .unwrap();
            let out = rx
                .message()
                .await?
                .expect("a response per request")
                .output
                .unwrap();
            input = match out {
                pb::forward_response::Output::Hidden(h) if !last => {
                    pb::forward_request::Input::Hidden(h)
                }
                out => return Ok(out),
            };
        }
        unreachable!("the last stage answers")
    }
}

/// A first-stage request for `tokens` of sequence `seq` at position `pos`.
fn tokens_request(seq: &str, pos: u32, tokens: pb::Tensor) -> pb::ForwardRequest {
    pb::ForwardRequest {
        model: "m".into(),
        sequence_id: seq.into(),
        position: pos,
        input: Some(pb::forward_request::Input::Tokens(tokens)),
        want_logits: false,
        sample: None,
    }
}

fn ids(v: &[i64]) -> pb::Tensor {
    to_wire(&Tensor::from_slice(v).unsqueeze(0))
}

fn argmax(v: &[f32]) -> u32 {
    llmos_worker::sampling::argmax(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_two_three_stages_match_single_process() {
    let engine = load("smollm2", Kind::Float);
    let prompt = engine
        .prompt_ids(&llmos_worker::PromptInput::Text(
            "The three primary colours are".into(),
        ))
        .unwrap();
    let want_first = {
        let all = all_logits(&engine, &prompt);
        let v = engine.model.config().vocab_size;
        all[all.len() - v..].to_vec()
    };
    let want_greedy = greedy(&engine, &prompt, 16);
    let full_bytes = engine.model.weight_bytes() as u64;
    let embed_bytes =
        (engine.model.config().vocab_size * engine.model.config().hidden_size * 4) as u64;
    drop(engine);

    let mut workers = vec![
        start_worker().await,
        start_worker().await,
        start_worker().await,
    ];
    // 1 stage, an uneven 2-stage split, and 3 stages.
    let splits: [&[std::ops::Range<u32>]; 3] = [&[0..30], &[0..4, 4..30], &[0..7, 7..19, 19..30]];
    for (si, split) in splits.iter().enumerate() {
        let model = format!("smollm2-split{si}");
        let mut bytes = 0;
        for (i, layers) in split.iter().enumerate() {
            let spec = shard(&model, layers.clone(), i == 0, i + 1 == split.len());
            let r = workers[i]
                .load_shard(pb::LoadShardRequest { shard: Some(spec) })
                .await
                .unwrap();
            bytes += r.into_inner().weight_bytes;
        }
        // Each stage holds only its layers: together the full model, plus
        // one more embedding copy where the tied head sits on another stage.
        let extra = if split.len() > 1 { embed_bytes } else { 0 };
        assert_eq!(bytes, full_bytes + extra, "split {split:?}");

        let mut p = Pipeline::open(&model, &mut workers[..split.len()]).await;
        let first = p.step("s", &prompt, 0).await.unwrap();
        let d = max_abs_diff(&first, &want_first);
        assert!(d <= 1e-4, "split {split:?}: logits differ by {d}");
        let mut tokens = vec![argmax(&first)];
        let mut pos = prompt.len() as u32;
        while tokens.len() < 16 {
            let l = p.step("s", &[*tokens.last().unwrap()], pos).await.unwrap();
            tokens.push(argmax(&l));
            pos += 1;
        }
        assert_eq!(tokens, want_greedy, "split {split:?}");
        drop(p);
        for (i, _) in split.iter().enumerate() {
            workers[i]
                .unload_shard(pb::UnloadShardRequest {
                    model: model.clone(),
                })
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_code_and_dropped_streams_free_caches() {
    let mut w = start_worker().await;
    let missing = w
        .load_shard(pb::LoadShardRequest {
            shard: Some(pb::ShardSpec {
                source: "/no/such/model.gguf".into(),
                ..shard("m", 0..1, true, true)
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing}");
    w.load_shard(pb::LoadShardRequest {
        shard: Some(shard("m", 0..2, true, false)),
    })
    .await
    .unwrap();

    let mut workers = [w.clone()];
    let mut p = Pipeline::open("nope", &mut workers).await;
    let e = p.step("s", &[1, 2], 0).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");

    // Asking a shard without the head for logits, and a position mismatch.
    let mut p = Pipeline::open("m", &mut workers).await;
    let e = p.step("s", &[1, 2], 0).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("LM head"), "{e}");

    // Hidden states sent to a first stage, and malformed bytes.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut resp = w
        .forward(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut bad = to_wire(&Tensor::zeros([1, 1, 576], (Kind::Float, tch::Device::Cpu)));
    bad.data.truncate(10);
    tx.send(tokens_request("s", 0, bad)).await.unwrap();
    let e = resp.message().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");

    // Two sequences on one stream, a wrong position, then the stream drops.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut resp = w
        .forward(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for seq in ["a", "b"] {
        tx.send(tokens_request(seq, 0, ids(&[5, 6]))).await.unwrap();
        resp.message().await.unwrap().unwrap();
    }
    let stats = w.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.shards[0].sequences, 2);
    assert!(stats.shards[0].kv_cache_bytes > 0);
    tx.send(tokens_request("a", 7, ids(&[5]))).await.unwrap();
    let e = resp.message().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(
        e.message().contains("2 cached positions") && e.message().contains("says 7"),
        "{e}"
    );
    drop((tx, resp));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = w.stats(pb::StatsRequest {}).await.unwrap().into_inner();
        if s.shards[0].sequences == 0 {
            assert_eq!(s.shards[0].kv_cache_bytes, 0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "caches not freed after the stream ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_stage_sampling_matches_single_process_greedy_and_seeded() {
    let engine = load("smollm2", Kind::Float);
    let prompt = engine
        .prompt_ids(&llmos_worker::PromptInput::Text("Once upon a time".into()))
        .unwrap();
    let params = llmos_worker::SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.9,
        seed: 11,
    };
    let want = |p: llmos_worker::SamplingParams| {
        let req = llmos_worker::GenerateRequest {
            prompt: llmos_worker::PromptInput::Tokens(prompt.clone()),
            sampling: p,
            max_new_tokens: 12,
            stop: vec![],
            ignore_eos: true,
        };
        engine.generate(&req, &mut |_| true).unwrap().token_ids
    };
    let (want_greedy, want_seeded) = (want(Default::default()), want(params.clone()));
    drop(engine);

    let mut workers = vec![start_worker().await, start_worker().await];
    for (i, layers) in [0..13u32, 13..30].into_iter().enumerate() {
        let spec = shard("m", layers, i == 0, i == 1);
        workers[i]
            .load_shard(pb::LoadShardRequest { shard: Some(spec) })
            .await
            .unwrap();
    }
    for (seq, s, want) in [
        ("greedy", pb::Sampling::default(), want_greedy),
        (
            "seeded",
            pb::Sampling {
                temperature: params.temperature,
                top_k: params.top_k as u32,
                top_p: params.top_p,
                seed: params.seed,
            },
            want_seeded,
        ),
    ] {
        let mut p = Pipeline::open("m", &mut workers).await;
        let (mut tok, lp) = p.sample(seq, &prompt, 0, s).await;
        assert!(lp <= 0.0);
        let mut got = vec![tok];
        let mut pos = prompt.len() as u32;
        while got.len() < 12 {
            tok = p.sample(seq, &[tok], pos, s).await.0;
            got.push(tok);
            pos += 1;
        }
        assert_eq!(got, want, "{seq}");
    }
}

/// The tiny random Llama (GQA, untied, llama3 rope, sharded safetensors)
/// split over 2 uneven and 3 stages matches Hugging Face transformers
/// directly: last-position logits and 64-token greedy continuations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_fixture_over_stages_matches_transformers() {
    let out = tempfile::tempdir().unwrap();
    let r = llmos_tests::reference("tiny", "llama", out.path());
    let source = r.model_dir.as_ref().unwrap().to_str().unwrap().to_string();
    let mut workers = vec![
        start_worker().await,
        start_worker().await,
        start_worker().await,
    ];
    for (si, split) in [vec![0..1u32, 1..3], vec![0..1, 1..2, 2..3]]
        .into_iter()
        .enumerate()
    {
        let model = format!("tiny{si}");
        for (i, layers) in split.iter().enumerate() {
            let spec = pb::ShardSpec {
                source: source.clone(),
                ..shard(&model, layers.clone(), i == 0, i + 1 == split.len())
            };
            workers[i]
                .load_shard(pb::LoadShardRequest { shard: Some(spec) })
                .await
                .unwrap();
        }
        for (pi, p) in r.prompts.iter().enumerate().skip(1).take(2) {
            let mut pipe = Pipeline::open(&model, &mut workers[..split.len()]).await;
            let seq = format!("p{pi}");
            let first = pipe.step(&seq, &p.ids, 0).await.unwrap();
            let theirs = llmos_tests::read_f32(&p.logits_file);
            let vocab = p.logits_shape[1];
            let d = max_abs_diff(&first, &theirs[theirs.len() - vocab..]);
            assert!(
                d <= 1e-4,
                "split {split:?}: logits differ from transformers by {d}"
            );
            let mut tokens = vec![argmax(&first)];
            let mut pos = p.ids.len() as u32;
            while tokens.len() < 64 {
                let l = pipe
                    .step(&seq, &[*tokens.last().unwrap()], pos)
                    .await
                    .unwrap();
                tokens.push(argmax(&l));
                pos += 1;
            }
            assert_eq!(tokens, p.greedy, "split {split:?}, prompt {pi}");
        }
    }
}
