//! Pipeline overhead: SmolLM2 served by a coordinator over 1 worker and over
//! 2 workers (layers 0-15 and 15-30) on loopback, in one process and one run:
//! 2 stages with hidden states relayed by the engine over gRPC, and 2 stages
//! joined by a direct TCP pipeline link. Prints prefill latency (time to
//! first token of a 128-token prompt), decode per-token latency (64
//! tokens), their ratios to 1 stage and to each other, and the bytes
//! crossing the stage boundary per decoded token (the link's measured by
//! the worker).
//!
//! cargo bench -p llmos-benches --bench pipeline

use std::time::Instant;

use llmos_proto::v1 as api;
use llmos_proto::v1::admin_client::AdminClient;
use llmos_proto::worker::v1 as wk;
use llmos_proto::worker::v1::worker_client::WorkerClient;
use prost::Message;
use tonic::transport::Channel;

const PROMPT_TOKENS: usize = 128;
const DECODE_TOKENS: u32 = 64;
const REPEAT: usize = 5;

async fn cluster(workers: usize, transport: &str) -> Channel {
    let ch = llmos_benches::start_cluster(workers).await;
    // Every run sends the same prompt: without this the prefix cache
    // would serve all but its last block from the second run on.
    let serving = api::ServingOptions {
        pipeline_transport: transport.into(),
        disable_prefix_caching: true,
        ..Default::default()
    };
    llmos_benches::deploy_smollm2(&ch, "smol", workers as u32, Some(serving)).await;
    ch
}

/// Bytes the first stage's worker has sent over its pipeline link.
async fn link_bytes(ch: &Channel) -> u64 {
    let status = AdminClient::new(ch.clone())
        .cluster_status(api::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = &status.models[0].stages[0];
    let mut w = WorkerClient::new(llmos_benches::connect(&first.worker_address).await);
    let stats = w.stats(wk::StatsRequest {}).await.unwrap().into_inner();
    stats.shards.iter().map(|s| s.link_bytes_sent).sum()
}

/// (time to first token, seconds per decoded token), medians.
async fn measure(ch: Channel) -> (f64, f64) {
    let prompt: Vec<u32> = (0..PROMPT_TOKENS as u32)
        .map(|i| 100 + (i * 37) % 40000)
        .collect();
    let mut ttft = Vec::new();
    let mut per_token = Vec::new();
    for i in 0..REPEAT + 1 {
        let t0 = Instant::now();
        let (first, n) =
            llmos_benches::stream_greedy(&ch, "smol", prompt.clone(), DECODE_TOKENS + 1).await;
        if i > 0 {
            ttft.push((first - t0).as_secs_f64());
            per_token.push(first.elapsed().as_secs_f64() / (n - 1) as f64);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(&mut ttft), median(&mut per_token))
}

fn main() {
    tch::set_num_threads(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (p1, d1) = rt.block_on(async { measure(cluster(1, "grpc").await).await });
    let (p2, d2) = rt.block_on(async { measure(cluster(2, "grpc").await).await });
    let (pl, dl, link_per_token) = rt.block_on(async {
        let ch = cluster(2, "link").await;
        let before = link_bytes(&ch).await;
        let (p, d) = measure(ch.clone()).await;
        // Every run: a 128-token prompt then 64 decoded tokens.
        let runs = (REPEAT + 1) as u64;
        let sent = link_bytes(&ch).await - before;
        let prompt_bytes = runs * (PROMPT_TOKENS as u64 * 576 * 4 + 50);
        (
            p,
            d,
            (sent.saturating_sub(prompt_bytes)) as f64 / (runs * DECODE_TOKENS as u64) as f64,
        )
    });
    // What crosses the stage boundary for one decoded token: the step to
    // stage 2 (hidden state [1, 576] f32 and the block table) and, back from
    // it, the sampled token; stage 1 answers the engine with the hidden state.
    let hidden = wk::Tensor {
        dtype: wk::DType::F32 as i32,
        shape: vec![1, 576],
        data: vec![0; 576 * 4],
    };
    let to_stage2 = wk::StepRequest {
        model: "smol".into(),
        sequences: vec![wk::StepSequence {
            position: 200,
            tokens: 1,
            blocks: (0..13).collect(),
            sample: Some(wk::Sampling::default()),
            sample_index: 100,
            want_logits: false,
            ..Default::default()
        }],
        input: Some(wk::step_request::Input::Hidden(hidden.clone())),
        ..Default::default()
    }
    .encoded_len();
    let from_stage1 = wk::StepResponse {
        hidden: Some(hidden),
        tokens: vec![],
        logits: None,
    }
    .encoded_len();
    println!("SmolLM2-135M f32, 1 libtorch thread per stage, prompt {PROMPT_TOKENS} tokens (prefix cache off), decode {DECODE_TOKENS} tokens, median of {REPEAT}");
    println!(
        "{:<16}{:>18}{:>22}",
        "stages", "prefill (TTFT) ms", "decode ms/token"
    );
    println!("{:<16}{:>18.1}{:>22.2}", "1", p1 * 1e3, d1 * 1e3);
    println!("{:<16}{:>18.1}{:>22.2}", "2, relayed", p2 * 1e3, d2 * 1e3);
    println!("{:<16}{:>18.1}{:>22.2}", "2, linked", pl * 1e3, dl * 1e3);
    println!(
        "ratio relayed/1: prefill {:.3}x, decode {:.3}x (target: decode <= 1.15x)",
        p2 / p1,
        d2 / d1
    );
    println!(
        "ratio linked/1: prefill {:.3}x, decode {:.3}x; linked/relayed: prefill {:.3}x, decode {:.3}x",
        pl / p1,
        dl / d1,
        pl / p2,
        dl / d2
    );
    println!(
        "bytes per decoded token across the stage boundary: relayed {} (stage 1 -> engine) + {} (engine -> stage 2) protobuf, of which 2 x {} tensor payload; linked {:.0} measured (one {}-byte hidden state, a 32-byte header and 18 bytes of framing; no return trip)",
        from_stage1,
        to_stage2,
        576 * 4,
        link_per_token,
        576 * 4
    );
}
