//! Elastic serving: what replicas, the router and live scaling give, each
//! as a ratio against a baseline run in the same invocation. SmolLM2 (f32)
//! on `llmos-worker` processes with one libtorch thread each, each pinned
//! to its own core (`taskset`); the coordinator and the clients run in this
//! process.
//!
//! 1. **Throughput at saturation**: clients in a closed loop (3 requests
//!    each, prompts of 32 random ids, 32 generated tokens each), one
//!    replica on one worker, then two replicas on two workers, at 32 and
//!    128 clients (`LLMOS_BENCH_CLIENTS`). Tokens/s counted while every
//!    client still had a request outstanding (the tail, where clients run
//!    out of work and a replica idles while the other finishes, is printed
//!    apart). At 128 clients both replicas run their `max_running` (64)
//!    sequences and the single replica has as many waiting: each
//!    configuration at its own saturation, which is what the target
//!    compares; at 32 the two replicas are each half as full as the one.
//! 2. **Prefix-aware routing against round-robin**, two replicas, 8
//!    clients, two workloads at several KV cache sizes. *Shared
//!    prefixes*: 16 groups of requests share a 128-token prefix (a system
//!    prompt, 8 blocks of 16), each request adds 16 tokens of its own and
//!    generates 8; 256 requests per policy (16 a group: each group's first
//!    request at a replica must miss). Each replica's KV cache holds half
//!    the groups' prefixes (64 blocks) beside the running sequences (about
//!    12 blocks) with a little less (72 blocks), a little more (80) or a
//!    third more (96) room, so routing a group to one replica can keep it
//!    cached while spreading every group over both replicas (a working set
//!    of 128 prefix blocks per replica) keeps only the share that fits.
//!    *Multi-turn chats*: 16 conversations of 6 turns after one shared
//!    32-token system prompt, each turn the whole history plus a 32-token
//!    message, the model's 16 answer tokens joining the history; 160 blocks a replica (a replica
//!    holds the histories of its half of the conversations, about 18
//!    blocks each at the end, not of all 16) or 384 (every history fits).
//!    Prefix-cache hit rate (cached prompt tokens / prompt tokens, from
//!    each response's usage) and TTFT p50/p99. The policy is switched with
//!    the cluster setting `routing.policy`; each policy gets prompts of its
//!    own and a deployment of its own (caches start empty).
//! 3. **Live changes under a light load** (2 clients, 16-token prompts, 16
//!    tokens out): time from `ScaleModel` to the first request routed to
//!    the new replica, and the p99 latency of the requests that ran during
//!    a scale-up, a scale-down, a drain and a re-split (1 stage to 2, on two
//!    more workers) against a steady window.
//!
//! cargo bench -p llmos-benches --bench elastic (builds the worker binary
//! first: `cargo build --release --bins`); `-- prefix` (or `saturation`,
//! `live`, several allowed) runs only the phases named.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llmos_benches::{pct, worker_bin, WorkerProcess};
use llmos_proto::v1 as api;
use llmos_proto::v1::admin_client::AdminClient;
use llmos_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;

/// An `llmos-worker serve` process on `core`, one libtorch thread.
fn start_worker(coordinator: &str, id: &str, core: usize) -> WorkerProcess {
    WorkerProcess::start(coordinator, id, Some(core), &["--drain-timeout-s", "60"])
}

/// A seeded stream of token ids in SmolLM2's ordinary range.
struct Ids(u64);

impl Ids {
    fn take(&mut self, n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                200 + ((self.0 >> 33) % 40_000) as u32
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
struct Sample {
    /// Sent, relative to the run's start.
    sent: f64,
    ttft: f64,
    latency: f64,
    tokens: usize,
    prompt_tokens: u32,
    cached_tokens: u32,
    /// When each streamed message arrived (relative to the run's start)
    /// and the tokens it carried.
    stamps: Vec<(f64, usize)>,
    /// The generated token ids.
    ids: Vec<u32>,
}

async fn one(
    mut c: InferenceClient<Channel>,
    model: &str,
    prompt: Vec<u32>,
    out: u32,
    t0: Instant,
) -> Sample {
    let sent = Instant::now();
    let mut s = c
        .generate(llmos_benches::greedy_request(model, prompt, out))
        .await
        .expect("generate")
        .into_inner();
    let (mut first, mut tokens, mut usage, mut stamps) = (None, 0, None, Vec::new());
    let mut ids = Vec::new();
    while let Some(m) = s.message().await.expect("stream") {
        first.get_or_insert_with(Instant::now);
        tokens += m.tokens.len();
        ids.extend(m.tokens.iter().map(|t| t.id));
        stamps.push((t0.elapsed().as_secs_f64(), m.tokens.len()));
        if m.usage.is_some() {
            usage = m.usage;
        }
    }
    let u = usage.unwrap_or_default();
    Sample {
        sent: (sent - t0).as_secs_f64(),
        ttft: (first.expect("a token") - sent).as_secs_f64(),
        latency: sent.elapsed().as_secs_f64(),
        tokens,
        prompt_tokens: u.prompt_tokens,
        cached_tokens: u.cached_prompt_tokens,
        stamps,
        ids,
    }
}

/// What a closed loop measured.
struct Run {
    samples: Vec<Sample>,
    /// Seconds from the start to the last request's end.
    wall: f64,
    /// Seconds from the start until a client first found no request left:
    /// until then every client had one outstanding (the load was constant).
    busy: f64,
}

impl Run {
    /// Tokens/s streamed while every client had a request outstanding (the
    /// tail, where clients run out of work and replicas idle one by one,
    /// left out).
    fn busy_rate(&self) -> f64 {
        let tokens: usize = self
            .samples
            .iter()
            .flat_map(|s| &s.stamps)
            .filter(|(t, _)| *t <= self.busy)
            .map(|(_, n)| n)
            .sum();
        tokens as f64 / self.busy
    }
}

/// `clients` clients send the requests in order, each its next as soon
/// as its last ended.
async fn closed_loop(
    ch: &Channel,
    model: &str,
    requests: Vec<(Vec<u32>, u32)>,
    clients: usize,
) -> Run {
    let queue = Arc::new(Mutex::new(requests.into_iter()));
    let t0 = Instant::now();
    let busy = Arc::new(Mutex::new(None::<f64>));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (queue, busy, c, model) = (
            queue.clone(),
            busy.clone(),
            InferenceClient::new(ch.clone()),
            model.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let Some((p, n)) = queue.lock().unwrap().next() else {
                    busy.lock()
                        .unwrap()
                        .get_or_insert(t0.elapsed().as_secs_f64());
                    return out;
                };
                out.push(one(c.clone(), &model, p, n, t0).await);
            }
        }));
    }
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await.unwrap());
    }
    let wall = t0.elapsed().as_secs_f64();
    let busy = busy.lock().unwrap().unwrap_or(wall);
    Run {
        samples,
        wall,
        busy,
    }
}

async fn status(admin: &mut AdminClient<Channel>, model: &str) -> api::ModelStatus {
    admin
        .cluster_status(api::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .models
        .into_iter()
        .find(|m| m.name == model)
        .expect("deployed")
}

async fn scale(admin: &mut AdminClient<Channel>, model: &str, replicas: u32, wait: bool) {
    admin
        .scale_model(api::ScaleModelRequest {
            name: model.into(),
            replicas,
            wait: Some(wait),
            wait_timeout_ms: 300_000,
        })
        .await
        .expect("scale");
}

async fn deploy(admin: &mut AdminClient<Channel>, name: &str, replicas: u32, kv_blocks: u32) {
    admin
        .deploy_model(api::DeployModelRequest {
            name: name.into(),
            source: "smollm2".into(),
            replicas,
            serving: Some(api::ServingOptions {
                kv_cache_blocks: kv_blocks,
                ..Default::default()
            }),
            wait_timeout_ms: 300_000,
            ..Default::default()
        })
        .await
        .expect("deploy");
}

/// CPU seconds this process (coordinator and clients) has used.
fn own_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, r)| r)
        .split_whitespace()
        .collect();
    // utime and stime: fields 14 and 15 of the line, in clock ticks (100/s).
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Phase 1: one closed loop of `n` requests from `clients` clients:
/// tokens/s while every client was busy, tokens/s over the whole run, and
/// the cores this process (the coordinator and the clients) took.
async fn saturation(ch: &Channel, seed: u64, n: usize, clients: usize) -> (f64, f64, f64) {
    let mut ids = Ids(seed);
    let requests = (0..n).map(|_| (ids.take(32), 32)).collect();
    let cpu = own_cpu_s();
    let run = closed_loop(ch, "smol", requests, clients).await;
    let tokens = run.samples.iter().map(|s| s.tokens).sum::<usize>() as f64;
    (
        run.busy_rate(),
        tokens / run.wall,
        (own_cpu_s() - cpu) / run.wall,
    )
}

/// Phase 2's workloads.
#[derive(Clone, Copy)]
enum Workload {
    /// `groups` system prompts of 128 tokens, each request one of them (in
    /// a seeded order) plus 16 tokens of its own, 8 generated; 8 clients.
    Shared { groups: usize, requests: usize },
    /// `convs` conversations of `turns` turns after one 32-token system
    /// prompt: each turn sends the whole history (the system prompt, every
    /// earlier 32-token user message and the model's 16-token answer to
    /// it) plus a new user message. 8 clients, each holding `convs / 8`
    /// conversations and sending their turns in rotation (one
    /// conversation's next turn after the others' current ones).
    Chats { convs: usize, turns: usize },
}

impl Workload {
    fn describe(&self) -> String {
        match *self {
            Workload::Shared { groups, requests } => format!(
                "shared prefixes ({groups} groups x 128-token prefix + 16 own tokens, 8 out, {requests} requests)"
            ),
            Workload::Chats { convs, turns } => format!(
                "multi-turn chats ({convs} conversations x {turns} turns of 32 user + 16 answer tokens after a 32-token system prompt, {} requests)",
                convs * turns
            ),
        }
    }
}

/// Phase 2: one routing policy over a workload: prefix-cache hit rate
/// (cached prompt tokens / prompt tokens), TTFT p50 and p99.
async fn prefix_workload(ch: &Channel, model: &str, w: Workload, seed: u64) -> (f64, f64, f64) {
    let samples = match w {
        Workload::Shared { groups, requests } => {
            let mut ids = Ids(seed);
            let groups: Vec<Vec<u32>> = (0..groups).map(|_| ids.take(128)).collect();
            // Groups interleaved as requests arrive: a seeded order.
            let mut order = Ids(seed ^ 0x5eed);
            let requests = (0..requests)
                .map(|_| {
                    let g = (order.take(1)[0] as usize) % groups.len();
                    let mut p = groups[g].clone();
                    p.extend(ids.take(16));
                    (p, 8)
                })
                .collect();
            closed_loop(ch, model, requests, 8).await.samples
        }
        Workload::Chats { convs, turns } => chats(ch, model, convs, turns, seed).await,
    };
    let prompt: u32 = samples.iter().map(|s| s.prompt_tokens).sum();
    let cached: u32 = samples.iter().map(|s| s.cached_tokens).sum();
    let ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
    (
        cached as f64 / prompt.max(1) as f64,
        pct(ttft.clone(), 0.5),
        pct(ttft, 0.99),
    )
}

/// The multi-turn chat workload (see `Workload::Chats`).
async fn chats(ch: &Channel, model: &str, convs: usize, turns: usize, seed: u64) -> Vec<Sample> {
    const CLIENTS: usize = 8;
    let system = Ids(seed).take(32);
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (c, model, system) = (
                InferenceClient::new(ch.clone()),
                model.to_string(),
                system.clone(),
            );
            tokio::spawn(async move {
                let mine: Vec<usize> = (client..convs).step_by(CLIENTS).collect();
                let mut users = Ids(seed ^ (client as u64 + 1) * 0x9e37);
                let mut history: Vec<Vec<u32>> = mine.iter().map(|_| system.clone()).collect();
                let mut out = Vec::new();
                for _ in 0..turns {
                    for h in history.iter_mut() {
                        h.extend(users.take(32));
                        let sample = one(c.clone(), &model, h.clone(), 16, t0).await;
                        h.extend(&sample.ids);
                        out.push(sample);
                    }
                }
                out
            })
        })
        .collect();
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await.unwrap());
    }
    samples
}

/// Phase 3's load: 2 clients until stopped; every sample kept.
struct Light {
    stop: Arc<AtomicBool>,
    t0: Instant,
    tasks: Vec<tokio::task::JoinHandle<Vec<Sample>>>,
}

impl Light {
    fn start(ch: &Channel) -> Light {
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let tasks = (0..2u64)
            .map(|i| {
                let (stop, c) = (stop.clone(), InferenceClient::new(ch.clone()));
                tokio::spawn(async move {
                    let mut ids = Ids(1000 + i);
                    let mut out = Vec::new();
                    // Bounded: at most 3000 requests per client.
                    for _ in 0..3000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        out.push(one(c.clone(), "smol", ids.take(16), 16, t0).await);
                    }
                    out
                })
            })
            .collect();
        Light { stop, t0, tasks }
    }

    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.unwrap());
        }
        all
    }
}

/// p99 latency of the requests running at some point within [from, to].
fn p99_between(samples: &[Sample], from: f64, to: f64) -> (f64, usize) {
    let v: Vec<f64> = samples
        .iter()
        .filter(|s| s.sent <= to && s.sent + s.latency >= from)
        .map(|s| s.latency)
        .collect();
    let n = v.len();
    (pct(v, 0.99), n)
}

/// The machine's own ceiling for two pinned processes: `llmos-worker
/// bench` (256-token prefill, 64 decoded tokens, one thread) alone on core
/// 0, then on cores 0 and 1 at once; (prefill, decode) scaling.
fn hardware_ceiling() -> (f64, f64) {
    let run = |core: usize| {
        Command::new("taskset")
            .args(["-c", &core.to_string()])
            .arg(worker_bin())
            .args(["bench", "--threads", "1", "--prompt-tokens", "256"])
            .args(["--decode-tokens", "64", "--repeat", "3"])
            .stderr(Stdio::null())
            .output()
            .expect("llmos-worker bench")
    };
    let figures = |out: &std::process::Output| -> (f64, f64) {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench json");
        (
            v["prefill_tokens_per_s"].as_f64().unwrap(),
            v["decode_tokens_per_s"].as_f64().unwrap(),
        )
    };
    let alone = figures(&run(0));
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| run(0));
        let b = s.spawn(|| run(1));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (a, b) = (figures(&a), figures(&b));
    ((a.0 + b.0) / alone.0, (a.1 + b.1) / alone.1)
}

#[tokio::main]
async fn main() {
    let coordinator = llmos_benches::start_coordinator(Default::default()).await;
    let _workers: Vec<WorkerProcess> = (0..2)
        .map(|i| start_worker(&coordinator, &format!("w{i}"), i))
        .collect();
    let ch = llmos_benches::connect(&coordinator).await;
    llmos_benches::wait_for_workers(&ch, 2).await;
    let mut admin = AdminClient::new(ch.clone());
    println!("elastic serving: SmolLM2 f32, 2 llmos-worker processes, 1 thread each, pinned to cores 0 and 1");
    let run = llmos_benches::phases(&["saturation", "prefix", "live"]);

    deploy(&mut admin, "smol", 1, 0).await;
    if run("saturation") {
        saturation_phase(&mut admin, &ch).await;
    }
    if run("prefix") {
        prefix_phase(&mut admin, &ch).await;
    }
    if run("live") {
        live_phase(&mut admin, &ch, &coordinator).await;
    }
}

/// The engine's default `max_running` (sequences a replica runs at once).
const MAX_RUNNING: usize = llmos_meta::serving::DEFAULT_MAX_RUNNING as usize;

/// Phase 1: saturation with 1 replica, then 2, at each client count of
/// `LLMOS_BENCH_CLIENTS` (default 32 and 128: with 128 both replicas run
/// their 64 sequences and 1 replica has as many waiting).
async fn saturation_phase(admin: &mut AdminClient<Channel>, ch: &Channel) {
    let loads: Vec<usize> = std::env::var("LLMOS_BENCH_CLIENTS")
        .unwrap_or("32,128".into())
        .split(',')
        .map(|v| v.parse().expect("LLMOS_BENCH_CLIENTS: client counts"))
        .collect();
    let mut figures = Vec::new();
    for replicas in [1u32, 2] {
        scale(admin, "smol", replicas, true).await;
        saturation(ch, 7, 32, 32).await; // warm-up (first batches, allocator)
        for &clients in &loads {
            figures.push(saturation(ch, 11 + clients as u64, 3 * clients, clients).await);
        }
    }
    for (i, &clients) in loads.iter().enumerate() {
        let (one, two) = (figures[i], figures[loads.len() + i]);
        println!(
            "saturation, {clients} clients in a closed loop, {} requests x 32 tokens:",
            3 * clients
        );
        println!("  1 replica on 1 worker : {:.1} tokens/s while every client was busy, {:.1} over the whole run (coordinator + clients used {:.2} cores)", one.0, one.1, one.2);
        println!("  2 replicas on 2 workers: {:.1} tokens/s while every client was busy, {:.1} over the whole run (coordinator + clients used {:.2} cores)", two.0, two.1, two.2);
        // Saturated: each of the two replicas has as many requests as it
        // runs at once (the engine's max_running), more waiting at one.
        let saturated = clients >= 2 * MAX_RUNNING;
        println!(
            "  ratio 2 replicas / 1: {:.2}x while busy{}, {:.2}x over the whole run",
            two.0 / one.0,
            if saturated {
                " (both saturated: target >= 1.8x)"
            } else {
                " (2 replicas not saturated: below 2 x max_running clients)"
            },
            two.1 / one.1
        );
    }
    let (prefill, decode) = hardware_ceiling();
    println!(
        "  this machine's ceiling, 2 pinned llmos-worker bench processes against 1: prefill {prefill:.2}x, decode {decode:.2}x (shared memory bandwidth)"
    );
}

/// Phase 2: prefix-aware routing against round-robin, 2 replicas, each
/// workload at two cache sizes.
async fn prefix_phase(admin: &mut AdminClient<Channel>, ch: &Channel) {
    let shared = Workload::Shared {
        groups: 16,
        requests: 256,
    };
    let chats = Workload::Chats {
        convs: 16,
        turns: 6,
    };
    // Shared prefixes: a replica's cache holds its half of the groups'
    // 128 prefix blocks beside the running sequences (about 12 blocks)
    // with a little less (72), a little more (80) or a third more (96)
    // room than that: round-robin's share of the 16 prefixes a replica
    // can keep grows with it while the prefix policy needs only its 8.
    // Chats: 16 conversations end at about 18 blocks each (about 290 in
    // all): 160 blocks a replica (its half of them beside the running
    // sequences, not all), and 384 (one replica holds them all: no
    // pressure, what is left is where the next turn goes).
    let runs = [
        (shared, 72, [909, 1010]),
        (shared, 80, [101, 202]),
        (shared, 96, [303, 404]),
        (chats, 160, [505, 606]),
        (chats, 384, [707, 808]),
    ];
    for (workload, kv, seeds) in runs {
        let mut results = Vec::new();
        for (policy, seed) in ["round-robin", "prefix"].into_iter().zip(seeds) {
            // A fresh deployment per policy: each starts with empty caches
            // (the second would otherwise inherit what the first left).
            deploy(admin, "chat", 2, kv).await;
            admin
                .set_setting(api::SetSettingRequest {
                    key: "routing.policy".into(),
                    value: policy.into(),
                })
                .await
                .expect("setting");
            let figures = prefix_workload(ch, "chat", workload, seed).await;
            // Requests routed to each replica, and of those for a prefix
            // the router knew there.
            let mut split: Vec<(u64, u64, u64)> = status(admin, "chat")
                .await
                .replicas
                .iter()
                .map(|r| (r.epoch, r.routed, r.routed_for_prefix))
                .collect();
            split.sort();
            let split: Vec<(u64, u64)> = split.into_iter().map(|(_, a, b)| (a, b)).collect();
            results.push((policy, figures, split));
            admin
                .undeploy_model(api::UndeployModelRequest {
                    name: "chat".into(),
                    wait: Some(true),
                })
                .await
                .expect("undeploy");
        }
        println!(
            "{}, 2 replicas with {kv} KV blocks each, 8 clients:",
            workload.describe()
        );
        for (policy, (hit, p50, p99), split) in &results {
            println!(
                "  {policy:<11}: prefix-cache hit rate {:.1}%  TTFT p50 {:.0} ms  p99 {:.0} ms  (requests per replica, of them for a prefix routed there before: {split:?})",
                hit * 100.0,
                p50 * 1e3,
                p99 * 1e3
            );
        }
        let (rr, px) = (results[0].1, results[1].1);
        println!(
            "  ratio prefix / round-robin: hit rate {:.2}x (target >= 1.8x), TTFT p50 {:.2}x, p99 {:.2}x (lower is better)",
            px.0 / rr.0.max(1e-9),
            px.1 / rr.1,
            px.2 / rr.2
        );
    }
    admin
        .delete_setting(api::DeleteSettingRequest {
            key: "routing.policy".into(),
        })
        .await
        .expect("setting");
}

/// Phase 3: live changes under a light load, "smol" at 1 replica first.
async fn live_phase(admin: &mut AdminClient<Channel>, ch: &Channel, coordinator: &str) {
    scale(admin, "smol", 1, true).await;
    let load = Light::start(ch);
    tokio::time::sleep(Duration::from_secs(15)).await;
    let steady = (0.0, load.now());
    // Scale-up: until the new replica got its first request.
    let before: Vec<u64> = status(admin, "smol")
        .await
        .replicas
        .iter()
        .map(|r| r.epoch)
        .collect();
    let up_from = load.now();
    let t = Instant::now();
    scale(admin, "smol", 2, false).await;
    let first_request = loop {
        let m = status(admin, "smol").await;
        if m.replicas
            .iter()
            .any(|r| !before.contains(&r.epoch) && r.routed > 0)
        {
            break t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "the new replica never served: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let up = (up_from, load.now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let down_from = load.now();
    let t = Instant::now();
    scale(admin, "smol", 1, true).await;
    let scale_down = t.elapsed();
    let down = (down_from, load.now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = status(admin, "smol").await;
    let holder = m.replicas[0].stages[0].worker_id.clone();
    let drain_from = load.now();
    let t = Instant::now();
    admin
        .drain_worker(api::DrainWorkerRequest {
            worker_id: holder.clone(),
            wait: Some(true),
            wait_timeout_ms: 300_000,
        })
        .await
        .expect("drain");
    let drain_took = t.elapsed();
    let drain = (drain_from, load.now());
    // Re-split the one replica into 2 stages of 15 layers: two more workers
    // (one per core) take the new shape beside the old.
    let _more: Vec<WorkerProcess> = (2..4)
        .map(|i| start_worker(&coordinator, &format!("w{i}"), i % 2))
        .collect();
    llmos_benches::wait_for_workers(ch, 4).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let resplit_from = load.now();
    let t = Instant::now();
    admin
        .resplit_model(api::ResplitModelRequest {
            name: "smol".into(),
            stages: 2,
            layer_split: vec![15, 15],
            wait: Some(true),
            wait_timeout_ms: 300_000,
        })
        .await
        .expect("resplit");
    let resplit_took = t.elapsed();
    let resplit = (resplit_from, load.now());
    let samples = load.stop().await;
    let (steady_p99, n0) = p99_between(&samples, steady.0, steady.1);
    println!("live changes under 2 clients (16-token prompts, 16 out):");
    println!(
        "  scale 1 -> 2: first request routed to the new replica {:.2} s after ScaleModel",
        first_request.as_secs_f64()
    );
    println!("  scale 2 -> 1 (drained and removed): {:.2} s; drain of {holder} (replacement first): {:.2} s", scale_down.as_secs_f64(), drain_took.as_secs_f64());
    println!(
        "  p99 latency, steady: {:.0} ms ({n0} requests)",
        steady_p99 * 1e3
    );
    println!(
        "  re-split 1 stage -> 15/15 over 2 stages (new shape beside the old): {:.2} s",
        resplit_took.as_secs_f64()
    );
    for (name, (from, to)) in [
        ("scale-up", up),
        ("scale-down", down),
        ("drain", drain),
        ("re-split", resplit),
    ] {
        let (p99, n) = p99_between(&samples, from, to);
        println!(
            "  p99 latency, {name:<10}: {:.0} ms ({n} requests), {:.2}x steady",
            p99 * 1e3,
            p99 / steady_p99
        );
    }
}
