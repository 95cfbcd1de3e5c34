//! Tests of `host.rs`: served steps of a hosted shard.

use super::*;
use tch::Kind;

fn tiny(model: &str) -> ShardConfig {
    ShardConfig::tiny(model, 16, 4)
}

/// Logits rows of a step's answer.
fn rows(r: &StepOutput) -> Vec<Vec<f32>> {
    let t = r.logits.as_ref().expect("logits");
    let (n, v) = t.size2().unwrap();
    let flat = Vec::<f32>::try_from(t.reshape([-1])).unwrap();
    (0..n as usize)
        .map(|i| flat[i * v as usize..(i + 1) * v as usize].to_vec())
        .collect()
}

/// Two sequences on `host`: a prompt prefilled alone, then decoded
/// greedily one token per step (the one-token path), and from the
/// second step on a second prompt's chunk in the same batched steps.
/// Returns every step's logits rows.
async fn run(host: &HostHandle) -> Vec<Vec<f32>> {
    let (a, b): (&[u32], &[u32]) = (&[1, 5, 9, 13, 200, 7], &[300, 2, 77]);
    let seq = |position: usize, tokens: usize, first: u32| SeqStep {
        position,
        tokens,
        blocks: (first..first + 8).collect(),
        want_logits: true,
        ..Default::default()
    };
    let step = |seqs, ids: &[u32]| Step {
        model: "m".into(),
        id: 0,
        seqs,
        input: StepInput::Tokens(ids.to_vec()),
        to_next: false,
    };
    let mut out = Vec::new();
    let r = host.step(step(vec![seq(0, 6, 0)], a)).await.unwrap();
    out.extend(rows(&r));
    let mut next = crate::sampling::argmax(out.last().unwrap());
    for i in 0..8usize {
        let r = if i == 1 {
            // A decode row and a fresh prompt chunk in one step.
            let mut input = vec![next];
            input.extend_from_slice(b);
            host.step(step(vec![seq(6 + i, 1, 0), seq(0, 3, 8)], &input))
                .await
                .unwrap()
        } else {
            host.step(step(vec![seq(6 + i, 1, 0)], &[next]))
                .await
                .unwrap()
        };
        let r = rows(&r);
        next = crate::sampling::argmax(&r[0]);
        out.extend(r);
    }
    out
}

/// GPU: a shard served on CUDA (the batched path throughout, the paged
/// cache on the device) gives the CPU shard's logits (whose one-token
/// steps take the fused CPU path) and so its greedy tokens. Ignored by
/// default: a GPU test (see the README).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a CUDA GPU: cargo test --release -- --ignored gpu_ on a GPU machine"]
async fn gpu_served_steps_on_cuda_match_cpu() {
    crate::runtime::device::load_torch_cuda().expect("libtorch_cuda.so loads");
    assert!(
        tch::Cuda::device_count() > 0,
        "a GPU test ran without a CUDA device (run it with --ignored on a GPU machine)"
    );
    let cpu = HostHandle::spawn();
    let gpu = HostHandle::spawn_with(None, Device::Cuda(0));
    cpu.load(tiny("m")).await.unwrap();
    gpu.load(tiny("m")).await.unwrap();
    let (want, got) = (run(&cpu).await, run(&gpu).await);
    assert_eq!(want.len(), got.len());
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        let diff = w
            .iter()
            .zip(g)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-3, "row {i}: logits differ by {diff}");
        assert_eq!(
            crate::sampling::argmax(w),
            crate::sampling::argmax(g),
            "row {i}"
        );
    }
}

/// A shard loaded with a 16-bit KV cache (`ShardSpec.kv_dtype`) serves the
/// f32 cache's steps (prompts, a mixed batch, one-token steps) with logits
/// moved only by the rounding of its cached keys and values, and moved:
/// the cache really holds the rounded values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_with_a_16_bit_kv_cache_serves_the_f32_cache_steps() {
    let exact = HostHandle::spawn();
    exact.load(tiny("m")).await.unwrap();
    let want = run(&exact).await;
    for (kv, tol) in [(Kind::Half, 5e-3), (Kind::BFloat16, 5e-2)] {
        let host = HostHandle::spawn();
        host.load(ShardConfig {
            kv_kind: Some(kv),
            ..tiny("m")
        })
        .await
        .unwrap();
        let got = run(&host).await;
        assert_eq!(want.len(), got.len());
        let diff = want
            .iter()
            .flatten()
            .zip(got.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{kv:?} KV cache: max |logit diff| {diff:.3e}");
        assert!(diff > 0.0 && diff < tol, "{kv:?} KV cache: {diff}");
    }
}
