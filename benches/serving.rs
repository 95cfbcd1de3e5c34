//! Load generator for the serving engine: SmolLM2 (f32) on one worker,
//! requests through the public `Generate` API with prompt and output lengths
//! from a fixed seeded distribution, in one process and one run:
//!
//! 1. idle: one request at a time (the TTFT and inter-token latency of an
//!    idle system);
//! 2. saturation: a closed loop of as many clients as requests in the
//!    workload, each sending its next request as soon as its last one ends
//!    (twice the workload in all), so the engine always has more work than
//!    it can batch; throughput is counted over the steady state, from the
//!    first request's end to the moment the first client finds nothing left
//!    to send (the drain, where the batch shrinks to the longest outputs,
//!    measures the workload's tail, not the engine);
//! 3. Poisson arrivals at 1/4, 1/2 and 3/4 of the saturation request rate;
//! 4. the same engine with batching off (`max_running` 1), saturated the
//!    same way (two clients keep its queue non-empty);
//! 5. Hugging Face transformers static batching of the same requests
//!    (`serving_hf.py`, batches in arrival order, padded, run to the
//!    batch's longest output), same thread count.
//!
//! Prints throughput (generated tokens/s), TTFT and inter-token latency
//! p50/p99, and the ratios the targets are stated in: saturated throughput
//! at least 4x batching off; TTFT p99 at half the saturation rate within 2x
//! of idle.
//!
//! cargo bench -p llmos-benches --bench serving [-- --requests 48]

use std::time::{Duration, Instant};

use llmos_proto::v1 as api;
use llmos_proto::v1::admin_client::AdminClient;
use llmos_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;

struct Workload {
    prompts: Vec<Vec<u32>>,
    outputs: Vec<u32>,
}

/// Chat-like requests: prompts of 16..128 random token ids, outputs of
/// 32..160 tokens, from one seeded generator. Each run draws its own
/// requests (another seed, same distribution), so no run is served from the
/// prefix cache another run filled.
fn workload(n: usize, seed: u64) -> Workload {
    let mut x = 0x9E3779B97F4A7C15u64 ^ seed.wrapping_mul(0xD1B54A32D192ED03);
    let mut next = |m: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % m
    };
    let mut prompts = Vec::new();
    let mut outputs = Vec::new();
    for _ in 0..n {
        let len = 16 + next(112) as usize;
        prompts.push((0..len).map(|_| 200 + next(40_000) as u32).collect());
        outputs.push(32 + next(129) as u32);
    }
    Workload { prompts, outputs }
}

/// What one request saw.
#[derive(Debug, Clone)]
struct Sample {
    ttft: f64,
    /// Gaps between consecutive tokens.
    gaps: Vec<f64>,
    tokens: usize,
    /// When each token arrived.
    arrivals: Vec<Instant>,
}

async fn one(mut c: InferenceClient<Channel>, model: String, prompt: Vec<u32>, out: u32) -> Sample {
    let sent = Instant::now();
    let mut s = c
        .generate(llmos_benches::greedy_request(&model, prompt, out))
        .await
        .unwrap()
        .into_inner();
    let (mut first, mut last, mut gaps, mut tokens) = (None, sent, Vec::new(), 0);
    let mut arrivals = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        let now = Instant::now();
        for _ in &m.tokens {
            arrivals.push(now);
            if first.is_none() {
                first = Some(now - sent);
            } else {
                gaps.push((now - last).as_secs_f64());
            }
            last = now;
            tokens += 1;
        }
    }
    Sample {
        ttft: first.expect("a token").as_secs_f64(),
        gaps,
        tokens,
        arrivals,
    }
}

struct Run {
    wall: f64,
    samples: Vec<Sample>,
}

impl Run {
    fn throughput(&self) -> f64 {
        self.samples.iter().map(|s| s.tokens).sum::<usize>() as f64 / self.wall
    }
    fn ttft(&self, q: f64) -> f64 {
        pct(self.samples.iter().map(|s| s.ttft).collect(), q)
    }
    fn itl(&self, q: f64) -> f64 {
        pct(
            self.samples.iter().flat_map(|s| s.gaps.clone()).collect(),
            q,
        )
    }
}

fn pct(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Sends the workload's requests at the given offsets from the start.
async fn run(ch: &Channel, model: &str, w: &Workload, offsets: &[f64]) -> Run {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, &at) in offsets.iter().enumerate() {
        tokio::time::sleep_until((start + Duration::from_secs_f64(at)).into()).await;
        let c = InferenceClient::new(ch.clone());
        tasks.push(tokio::spawn(one(
            c,
            model.into(),
            w.prompts[i].clone(),
            w.outputs[i],
        )));
    }
    let mut samples = Vec::new();
    for t in tasks {
        samples.push(t.await.unwrap());
    }
    Run {
        wall: start.elapsed().as_secs_f64(),
        samples,
    }
}

/// A saturated run: `clients` clients in a closed loop over the workload
/// (each sends its next request when its last one has ended). Returns the
/// run and the steady state's generated tokens/s and requests/s: from the
/// first request's end to the first client finding no request left.
async fn closed_loop(ch: &Channel, model: &str, w: &Workload, clients: usize) -> (Run, f64, f64) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let dry: Arc<Mutex<Option<Instant>>> = Arc::default();
    let ends: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (ch, model, next, dry, ends) = (
            ch.clone(),
            model.to_string(),
            next.clone(),
            dry.clone(),
            ends.clone(),
        );
        let (prompts, outputs) = (w.prompts.clone(), w.outputs.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= prompts.len() {
                    dry.lock().unwrap().get_or_insert_with(Instant::now);
                    return mine;
                }
                let c = InferenceClient::new(ch.clone());
                mine.push(one(c, model.clone(), prompts[i].clone(), outputs[i]).await);
                ends.lock().unwrap().push(Instant::now());
            }
        }));
    }
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await.unwrap());
    }
    let wall = start.elapsed().as_secs_f64();
    let ends = ends.lock().unwrap().clone();
    let from = *ends.iter().min().expect("a request ended");
    let to = dry.lock().unwrap().expect("the workload ran dry");
    let window = (to - from).as_secs_f64();
    let tokens = samples
        .iter()
        .flat_map(|s| &s.arrivals)
        .filter(|&&t| t > from && t <= to)
        .count();
    let done = ends.iter().filter(|&&t| t > from && t <= to).count();
    (
        Run { wall, samples },
        tokens as f64 / window,
        done as f64 / window,
    )
}

/// `n` chat-like requests twice over (two seeds), for a closed loop.
fn doubled(n: usize, seed: u64) -> Workload {
    let (a, b) = (workload(n, seed), workload(n, seed + 1000));
    Workload {
        prompts: [a.prompts, b.prompts].concat(),
        outputs: [a.outputs, b.outputs].concat(),
    }
}

/// Exponential gaps with mean `1 / rate`, from a seeded generator.
fn poisson(n: usize, rate: f64, seed: u64) -> Vec<f64> {
    let mut x = seed;
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let at = t;
            t += -u.ln() / rate;
            at
        })
        .collect()
}

fn row(name: &str, r: &Run) {
    row_at(name, r, r.throughput())
}

/// A row with the given throughput (a saturated run's steady state).
fn row_at(name: &str, r: &Run, tok_s: f64) {
    println!(
        "{name:<26}{:>9.1}{:>9.0}{:>9.0}{:>9.1}{:>9.1}{:>8.1}",
        tok_s,
        r.ttft(0.5) * 1e3,
        r.ttft(0.99) * 1e3,
        r.itl(0.5) * 1e3,
        r.itl(0.99) * 1e3,
        r.wall
    );
}

/// transformers static batching of the same workload, via `serving_hf.py`.
fn transformers(w: &Workload, batch: usize, threads: i32) -> Option<f64> {
    let dir = tempfile::tempdir().ok()?;
    let file = dir.path().join("workload.json");
    let json = format!(
        "{{\"prompts\": {:?}, \"outputs\": {:?}}}",
        w.prompts, w.outputs
    );
    std::fs::write(&file, json).ok()?;
    let python = std::env::var("LLMOS_PYTHON").unwrap_or_else(|_| "python3".into());
    let gguf = std::env::var("LLMOS_SMOLLM2_GGUF").ok()?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("serving_hf.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(&gguf)
        .arg(&file)
        .args([
            "--batch",
            &batch.to_string(),
            "--threads",
            &threads.to_string(),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "serving_hf.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.starts_with("tokens_per_s"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

use llmos_benches::arg;

fn main() {
    let n = arg("--requests", 48);
    let hf_batch = arg("--hf-batch", 8);
    let threads = tch::get_num_threads();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kv_blocks = arg("--kv-blocks", 1024) as u32;
    let only_saturated = std::env::args().any(|a| a == "--only-saturated");
    let w = workload(n, 0);
    rt.block_on(async {
        let ch = llmos_benches::start_cluster(1).await;
        // Enough KV blocks for every sequence of a saturated run (up to 287
        // positions each): preemption would measure the cache size.
        let batched = api::ServingOptions {
            kv_cache_blocks: kv_blocks,
            ..Default::default()
        };
        llmos_benches::deploy_smollm2(&ch, "batched", 1, Some(batched)).await;
        let off = api::ServingOptions {
            max_running: 1,
            max_waiting: n as u32,
            ..Default::default()
        };
        llmos_benches::deploy_smollm2(&ch, "single", 1, Some(off)).await;
        let prompt_tokens: usize = w.prompts.iter().map(Vec::len).sum();
        let out_tokens: u32 = w.outputs.iter().sum();
        println!(
            "SmolLM2-135M f32, 1 worker, {threads} threads, {kv_blocks} KV blocks; {n} requests: \
             prompts 16-127 tokens ({prompt_tokens} in all), outputs 32-160 tokens \
             ({out_tokens} in all), seeded"
        );
        // Warm-up (first-use allocations, thread pools).
        let _ = run(&ch, "batched", &workload(4, 100), &[0.0; 4]).await;
        let _ = run(&ch, "single", &workload(1, 101), &[0.0]).await;

        if only_saturated {
            let (sat, tok_s, _) = closed_loop(&ch, "batched", &doubled(n, 40), n).await;
            row_at("saturated (closed loop)", &sat, tok_s);
            return;
        }
        let idle_n = 12.min(n);
        let wi = workload(idle_n, 1);
        let mut idle_samples = Vec::new();
        let t0 = Instant::now();
        for i in 0..idle_n {
            let c = InferenceClient::new(ch.clone());
            idle_samples.push(one(c, "batched".into(), wi.prompts[i].clone(), wi.outputs[i]).await);
        }
        let idle = Run {
            wall: t0.elapsed().as_secs_f64(),
            samples: idle_samples,
        };
        let (sat, sat_tok_s, sat_rate) = closed_loop(&ch, "batched", &doubled(n, 40), n).await;
        println!(
            "\n{:<26}{:>9}{:>9}{:>9}{:>9}{:>9}{:>8}",
            "run", "tok/s", "TTFT50", "TTFT99", "ITL50", "ITL99", "wall s"
        );
        println!(
            "{:<26}{:>9}{:>9}{:>9}{:>9}{:>9}",
            "", "", "ms", "ms", "ms", "ms"
        );
        row("idle (one at a time)", &idle);
        row_at(&format!("saturated ({n} clients)"), &sat, sat_tok_s);
        let mut half = None;
        for (i, f) in [0.25, 0.5, 0.75].into_iter().enumerate() {
            let rate = f * sat_rate;
            let wr = workload(n, 2 + i as u64);
            let r = run(&ch, "batched", &wr, &poisson(n, rate, 7 + i as u64)).await;
            row(&format!("Poisson {f:.2}x ({rate:.2} req/s)"), &r);
            if f == 0.5 {
                half = Some(r);
            }
        }
        let (single, single_tok_s, _) = closed_loop(&ch, "single", &workload(12, 60), 2).await;
        row_at("batching off (2 clients)", &single, single_tok_s);
        let status = AdminClient::new(ch.clone())
            .cluster_status(api::ClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if let Some(s) = status
            .models
            .iter()
            .find(|m| m.name == "batched")
            .and_then(|m| m.serving.clone())
        {
            println!(
                "engine: {} steps, {} tokens, {} preemptions, prefix-cache hit rate {:.3}",
                s.steps, s.generated_tokens, s.preemptions, s.prefix_cache_hit_rate
            );
        }
        let half = half.expect("the 0.5x run");
        println!(
            "\ncontinuous batching / batching off (saturated throughput, steady state): {:.2}x \
             (target >= 4x)",
            sat_tok_s / single_tok_s
        );
        println!(
            "saturated runs to the end (drain included): batched {:.1} tok/s over {:.1} s, \
             batching off {:.1} tok/s",
            sat.throughput(),
            sat.wall,
            single.throughput()
        );
        println!(
            "TTFT p99 at 0.5x saturation / idle TTFT p99: {:.2}x (target <= 2x)",
            half.ttft(0.99) / idle.ttft(0.99)
        );
        match transformers(&w, hf_batch, threads) {
            Some(hf) => {
                println!(
                    "transformers static batching (batch {hf_batch}): {hf:.1} tok/s; \
                     llmos saturated / transformers: {:.2}x",
                    sat_tok_s / hf
                );
            }
            None => println!("transformers static batching: not run (see stderr)"),
        }
    });
}
