//! Pipeline overhead: SmolLM2 served by a coordinator over 1 worker and over
//! 2 workers (layers 0-15 and 15-30) on loopback, in one process and one run.
//! Prints prefill latency (time to first token of a 128-token prompt),
//! decode per-token latency (64 tokens), their 2-stage / 1-stage ratios, and
//! the bytes crossing each stage boundary per decoded token.
//!
//! cargo bench -p llmos-benches --bench pipeline

use std::time::Instant;

use llmos_proto::worker::v1 as wk;
use prost::Message;
use tonic::transport::Channel;

const PROMPT_TOKENS: usize = 128;
const DECODE_TOKENS: u32 = 64;
const REPEAT: usize = 5;

async fn cluster(workers: usize) -> Channel {
    let ch = llmos_benches::start_cluster(workers).await;
    llmos_benches::deploy_smollm2(&ch, "smol", workers as u32, None).await;
    ch
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
    let (p1, d1) = rt.block_on(async { measure(cluster(1).await).await });
    let (p2, d2) = rt.block_on(async { measure(cluster(2).await).await });
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
        }],
        input: Some(wk::step_request::Input::Hidden(hidden.clone())),
    }
    .encoded_len();
    let from_stage1 = wk::StepResponse {
        hidden: Some(hidden),
        tokens: vec![],
        logits: None,
    }
    .encoded_len();
    println!("SmolLM2-135M f32, 1 libtorch thread per stage, prompt {PROMPT_TOKENS} tokens, decode {DECODE_TOKENS} tokens, median of {REPEAT}");
    println!(
        "{:<10}{:>18}{:>22}",
        "stages", "prefill (TTFT) ms", "decode ms/token"
    );
    println!("{:<10}{:>18.1}{:>22.2}", 1, p1 * 1e3, d1 * 1e3);
    println!("{:<10}{:>18.1}{:>22.2}", 2, p2 * 1e3, d2 * 1e3);
    println!(
        "ratio 2/1: prefill {:.3}x, decode {:.3}x (target: decode <= 1.15x)",
        p2 / p1,
        d2 / d1
    );
    println!(
        "bytes per decoded token across the stage boundary: {} (stage 1 -> coordinator) + {} (coordinator -> stage 2) protobuf, of which 2 x {} tensor payload",
        from_stage1,
        to_stage2,
        576 * 4
    );
}
