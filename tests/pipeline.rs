//! Layers of SmolLM2 split across gRPC worker shards (in-process servers on
//! loopback), driven step by step over their `Step` streams with a block
//! table, give the logits and greedy tokens of the single-process model; bad
//! input gets the right status code and a reason.

use std::time::{Duration, Instant};

use llmos_proto::worker::v1 as pb;
use llmos_proto::worker::v1::worker_client::WorkerClient;
use llmos_tests::{all_logits, greedy, load, max_abs_diff};
use llmos_worker::server::codec::{from_wire, to_wire};
use llmos_worker::server::{serve_registered, HostHandle};
use tch::{Kind, Tensor};
use tonic::transport::Channel;

async fn start_worker() -> WorkerClient<Channel> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_registered(
        listener,
        HostHandle::spawn(),
        None,
        std::future::pending(),
    ));
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

const BLOCK: u32 = 16;

fn shard(model: &str, layers: std::ops::Range<u32>, embed: bool, head: bool) -> pb::ShardSpec {
    pb::ShardSpec {
        model: model.into(),
        source: "smollm2".into(),
        layer_start: layers.start,
        layer_end: layers.end,
        embed,
        head,
        dtype: pb::DType::F32 as i32,
        kv_blocks: 64,
        block_size: BLOCK,
        engine: None,
        tensor_parallel: None,
        quantization: 0,
        ..Default::default()
    }
}

/// One pipeline: a Step stream per stage, fed in order. Each named sequence
/// gets its own run of 16 blocks (256 positions).
struct Pipeline {
    model: String,
    stages: Vec<(
        tokio::sync::mpsc::Sender<pb::StepRequest>,
        tonic::Streaming<pb::StepResponse>,
    )>,
    seqs: Vec<String>,
}

impl Pipeline {
    async fn open(model: &str, workers: &mut [WorkerClient<Channel>]) -> Self {
        let mut stages = Vec::new();
        for w in workers.iter_mut() {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let resp = w
                .step(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            stages.push((tx, resp));
        }
        Pipeline {
            model: model.into(),
            stages,
            seqs: Vec::new(),
        }
    }

    fn blocks(&mut self, seq: &str) -> Vec<u32> {
        let i = match self.seqs.iter().position(|s| s == seq) {
            Some(i) => i,
            None => {
                self.seqs.push(seq.to_string());
                self.seqs.len() - 1
            }
        } as u32;
        (i * 16..(i + 1) * 16).collect()
    }

    /// Runs `ids` (at cached position `pos`) through every stage; returns the
    /// last position's logits.
    async fn step(&mut self, seq: &str, ids: &[u32], pos: u32) -> Result<Vec<f32>, tonic::Status> {
        let s = self.slice(seq, ids, pos, None, 0);
        let r = self.run(s, ids).await?;
        let t = from_wire(r.logits.as_ref().expect("logits"), "logits").unwrap();
        Ok(Vec::try_from(t.view([-1])).unwrap())
    }

    /// Like `step`, with the last stage sampling token number `index`.
    async fn sample(
        &mut self,
        seq: &str,
        ids: &[u32],
        pos: u32,
        s: pb::Sampling,
        index: u64,
    ) -> (u32, f32) {
        let slice = self.slice(seq, ids, pos, Some(s), index);
        let r = self.run(slice, ids).await.unwrap();
        (r.tokens[0].id, r.tokens[0].logprob)
    }

    fn slice(
        &mut self,
        seq: &str,
        ids: &[u32],
        pos: u32,
        sample: Option<pb::Sampling>,
        index: u64,
    ) -> pb::StepSequence {
        pb::StepSequence {
            position: pos,
            tokens: ids.len() as u32,
            blocks: self.blocks(seq),
            want_logits: sample.is_none(),
            sample,
            sample_index: index,
            ..Default::default()
        }
    }

    async fn run(
        &mut self,
        seq: pb::StepSequence,
        ids: &[u32],
    ) -> Result<pb::StepResponse, tonic::Status> {
        let mut input = Some(pb::step_request::Input::Tokens(packed(ids)));
        let n = self.stages.len();
        for (i, (tx, rx)) in self.stages.iter_mut().enumerate() {
            // Only the last stage samples or returns logits.
            let seq = if i + 1 == n {
                seq.clone()
            } else {
                pb::StepSequence {
                    sample: None,
                    want_logits: false,
                    ..seq.clone()
                }
            };
            tx.send(pb::StepRequest {
                model: self.model.clone(),
                sequences: vec![seq],
                input: input.take(),
                ..Default::default()
            })
            .await
            .unwrap();
            let out = rx.message().await?.expect("a response per request");
            if i + 1 == n {
                return Ok(out);
            }
            input = Some(pb::step_request::Input::Hidden(out.hidden.expect("hidden")));
        }
        unreachable!("the last stage answers")
    }
}

/// Packed token ids, `[t]` int64.
fn packed(ids: &[u32]) -> pb::Tensor {
    let v: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    to_wire(&Tensor::from_slice(&v))
}

/// A one-sequence step of `tokens` at position 0 on blocks 0..4.
fn step_request(model: &str, n: u32, input: pb::step_request::Input) -> pb::StepRequest {
    pb::StepRequest {
        model: model.into(),
        sequences: vec![pb::StepSequence {
            position: 0,
            tokens: n,
            blocks: vec![0, 1, 2, 3],
            ..Default::default()
        }],
        input: Some(input),
        ..Default::default()
    }
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
                    epoch: 0,
                })
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_code() {
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
    // The pool holds 64 blocks of 16 positions for 2 layers, 3 KV heads of 64.
    let stats = w.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.shards[0].kv_cache_bytes, 64 * 16 * 2 * 2 * 3 * 64 * 4);

    let mut workers = [w.clone()];
    let mut p = Pipeline::open("nope", &mut workers).await;
    let e = p.step("s", &[1, 2], 0).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");

    // Asking a shard without the head for logits.
    let mut p = Pipeline::open("m", &mut workers).await;
    let e = p.step("s", &[1, 2], 0).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("LM head"), "{e}");

    // Each of these ends its stream with INVALID_ARGUMENT and a reason.
    let mut hidden = to_wire(&Tensor::zeros([2, 576], (Kind::Float, tch::Device::Cpu)));
    let short_table = {
        let mut r = step_request("m", 80, pb::step_request::Input::Tokens(packed(&[1; 80])));
        r.sequences[0].blocks = vec![0, 1];
        r
    };
    let outside = {
        let mut r = step_request("m", 2, pb::step_request::Input::Tokens(packed(&[1, 2])));
        r.sequences[0].blocks = vec![64];
        r
    };
    let cases = [
        (
            step_request("m", 2, pb::step_request::Input::Hidden(hidden.clone())),
            "embeds tokens",
        ),
        (
            step_request("m", 3, pb::step_request::Input::Tokens(packed(&[1, 2]))),
            "3 tokens in its sequences but 2 token ids",
        ),
        (
            step_request("m", 2, pb::step_request::Input::Tokens(packed(&[1, 60000]))),
            "token id 60000 is outside the vocabulary of 49152",
        ),
        (short_table, "block table has 2 blocks"),
        (outside, "names block 64"),
        (
            {
                hidden.data.truncate(10);
                step_request("m", 2, pb::step_request::Input::Tokens(hidden))
            },
            "10 bytes",
        ),
    ];
    for (req, why) in cases {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut resp = w
            .step(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        tx.send(req).await.unwrap();
        let e = resp.message().await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains(why), "{why}: {e}");
    }

    // No engine here: this shard was loaded without one.
    let e = w
        .generate(pb::EngineRequest {
            model: "m".into(),
            prompt: vec![1],
            max_new_tokens: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    assert!(e.message().contains("no engine"), "{e}");
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
        ..Default::default()
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
                ..Default::default()
            },
            want_seeded,
        ),
    ] {
        let mut p = Pipeline::open("m", &mut workers).await;
        let (mut tok, lp) = p.sample(seq, &prompt, 0, s.clone(), 0).await;
        assert!(lp <= 0.0);
        let mut got = vec![tok];
        let mut pos = prompt.len() as u32;
        while got.len() < 12 {
            tok = p
                .sample(seq, &[tok], pos, s.clone(), got.len() as u64)
                .await
                .0;
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
