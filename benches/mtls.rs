//! Mutual TLS against plaintext on the internal plane, same run, same
//! topology: a coordinator (internal plane on its own listener) and two
//! workers in this process, SmolLM2 over two pipeline stages. Measured on
//! each plane, alternating plaintext and TLS rounds so that drift of the
//! machine falls on both:
//!
//! - the serving load: closed-loop throughput of concurrent clients
//!   (every token crosses coordinator -> worker `Generate` and the stage
//!   boundary), and idle TTFT (one request at a time);
//! - the pipeline relay: decode ms/token and TTFT of one stream, with the
//!   engine relaying hidden states over gRPC (`Worker.Step`) and over a
//!   direct pipeline link (TCP).
//!
//! - TTFT of short prompts (16 tokens), requests alternating between the
//!   two clusters one by one (the finest comparison this machine allows).
//!
//! Targets (issue 25): throughput >= 0.95x plaintext, TTFT p50 within 5 ms.
//!
//! cargo bench -p llmos-benches --bench mtls [-- --clients N --requests N --rounds N --runs N --short N]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmos_proto::v1 as api;
use llmos_proto::v1::admin_client::AdminClient;
use llmos_tls::dev::{self, Holder};
use llmos_tls::{Role, Tls, TlsFiles};
use tonic::transport::Channel;

const PROMPT_TOKENS: u32 = 128;
const DECODE_TOKENS: u32 = 64;

use llmos_benches::arg;

/// A coordinator and two workers; over mutual TLS with the certificates
/// in `certs` when given. Both models (relayed and linked) deployed.
async fn cluster(certs: Option<&Path>) -> Channel {
    let load = |name: &str| certs.map(|d| Tls::load(TlsFiles::in_dir(d, name)).unwrap());
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let internal = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", public.local_addr().unwrap());
    let internal_url = format!("http://{}", internal.local_addr().unwrap());
    let config = llmos_coordinator::Config {
        heartbeat_interval: Duration::from_millis(200),
        tls: load("coordinator-1"),
        ..Default::default()
    };
    tokio::spawn(llmos_coordinator::serve_planes(
        public,
        Some(internal),
        None,
        config,
        std::future::pending(),
    ));
    for i in 0..2 {
        llmos_benches::start_worker(
            &internal_url,
            &format!("w{i}"),
            load(&format!("worker-w{i}")),
        )
        .await;
    }
    let ch = llmos_benches::connect(&url).await;
    llmos_benches::wait_for_workers(&ch, 2).await;
    for (name, transport) in [("relayed", "grpc"), ("linked", "link")] {
        AdminClient::new(ch.clone())
            .deploy_model(api::DeployModelRequest {
                name: name.into(),
                source: "smollm2".into(),
                stages: 2,
                wait: Some(true),
                serving: Some(api::ServingOptions {
                    pipeline_transport: transport.into(),
                    // Every run sends the same prompts.
                    disable_prefix_caching: true,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    ch
}

fn prompt(seed: u32) -> Vec<u32> {
    (0..PROMPT_TOKENS)
        .map(|i| 100 + (i * 37 + seed * 101) % 40000)
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One stream at a time: (TTFT p50, decode seconds per token p50).
async fn single(ch: &Channel, model: &str, runs: usize) -> (f64, f64) {
    let mut ttft = Vec::new();
    let mut per_token = Vec::new();
    for i in 0..runs + 1 {
        let t0 = Instant::now();
        let (first, n) =
            llmos_benches::stream_greedy(ch, model, prompt(i as u32), DECODE_TOKENS + 1).await;
        if i > 0 {
            ttft.push((first - t0).as_secs_f64());
            per_token.push(first.elapsed().as_secs_f64() / (n - 1) as f64);
        }
    }
    (median(ttft), median(per_token))
}

/// TTFT of `n` short prompts (16 tokens, 2 tokens out) on each cluster,
/// the requests alternating between them so that the machine's drift
/// falls on both: (plaintext p50, TLS p50) in seconds.
async fn ttft_interleaved(plain: &Channel, tls: &Channel, model: &str, n: usize) -> (f64, f64) {
    let (mut p, mut t) = (Vec::new(), Vec::new());
    for i in 0..n {
        let ids: Vec<u32> = prompt(5000 + i as u32)[..16].to_vec();
        for (ch, out) in [(plain, &mut p), (tls, &mut t)] {
            let t0 = Instant::now();
            let (first, _) = llmos_benches::stream_greedy(ch, model, ids.clone(), 2).await;
            out.push((first - t0).as_secs_f64());
        }
    }
    (median(p), median(t))
}

/// `clients` concurrent streams until `requests` are done: tokens/s.
async fn load(ch: &Channel, model: &str, clients: usize, requests: usize) -> f64 {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (ch, model, next) = (ch.clone(), model.to_string(), next.clone());
            tokio::spawn(async move {
                let mut tokens = 0;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= requests {
                        return tokens;
                    }
                    let (_, n) = llmos_benches::stream_greedy(
                        &ch,
                        &model,
                        prompt(1000 + i as u32),
                        DECODE_TOKENS,
                    )
                    .await;
                    tokens += n;
                }
            })
        })
        .collect();
    let mut tokens = 0;
    for t in tasks {
        tokens += t.await.unwrap();
    }
    tokens as f64 / t0.elapsed().as_secs_f64()
}

#[derive(Default)]
struct Figures {
    tok_s: Vec<f64>,
    idle_ttft: Vec<f64>,
    relay_ttft: Vec<f64>,
    relay_decode: Vec<f64>,
    link_ttft: Vec<f64>,
    link_decode: Vec<f64>,
}

async fn round(ch: &Channel, f: &mut Figures, clients: usize, requests: usize, runs: usize) {
    f.tok_s.push(load(ch, "relayed", clients, requests).await);
    let (t, d) = single(ch, "relayed", runs).await;
    f.idle_ttft.push(t);
    f.relay_ttft.push(t);
    f.relay_decode.push(d);
    let (t, d) = single(ch, "linked", runs).await;
    f.link_ttft.push(t);
    f.link_decode.push(d);
}

fn main() {
    tch::set_num_threads(1);
    let clients = arg("--clients", 8);
    let requests = arg("--requests", 24);
    let rounds = arg("--rounds", 2);
    let runs = arg("--runs", 5);
    let dir = tempfile::tempdir().unwrap();
    let holders: Vec<Holder> = [
        (Role::Coordinator, "1"),
        (Role::Worker, "w0"),
        (Role::Worker, "w1"),
    ]
    .into_iter()
    .map(|(role, id)| Holder::bound(role, id))
    .collect();
    dev::init(dir.path(), &holders, &["127.0.0.1".into()]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let plain_ch = cluster(None).await;
        let tls_ch = cluster(Some(dir.path())).await;
        let cp = AdminClient::new(tls_ch.clone())
            .cluster_status(api::ClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .control_plane
            .unwrap();
        println!(
            "SmolLM2-135M f32 over 2 pipeline stages (2 workers, 1 libtorch thread each, one process); \
             prompts {PROMPT_TOKENS} tokens, {DECODE_TOKENS} decoded, prefix cache off; load: {clients} clients, \
             {requests} requests per round; single streams: median of {runs}; {rounds} rounds per plane, alternating"
        );
        println!("TLS cluster's internal plane: {}", cp.internal_tls);
        // Warm-up of both (allocations, thread pools, connections).
        for ch in [&plain_ch, &tls_ch] {
            let _ = load(ch, "relayed", 2, 2).await;
            let _ = single(ch, "linked", 1).await;
        }
        let (mut plain, mut tls) = (Figures::default(), Figures::default());
        for _ in 0..rounds {
            round(&plain_ch, &mut plain, clients, requests, runs).await;
            round(&tls_ch, &mut tls, clients, requests, runs).await;
        }
        let short = arg("--short", 40);
        let (short_relay_p, short_relay_t) =
            ttft_interleaved(&plain_ch, &tls_ch, "relayed", short).await;
        let (short_link_p, short_link_t) =
            ttft_interleaved(&plain_ch, &tls_ch, "linked", short).await;
        let m = |v: &Vec<f64>| median(v.clone());
        println!(
            "\n{:<34}{:>14}{:>14}{:>14}",
            "", "plaintext", "mutual TLS", "TLS/plain"
        );
        let ratio_row = |what: &str, p: f64, t: f64, unit: &str| {
            println!("{what:<34}{p:>11.2}{unit:>3}{t:>11.2}{unit:>3}{:>13.3}x", t / p);
        };
        ratio_row("serving load throughput", m(&plain.tok_s), m(&tls.tok_s), "t/s");
        ratio_row(
            "relayed decode",
            m(&plain.relay_decode) * 1e3,
            m(&tls.relay_decode) * 1e3,
            "ms",
        );
        ratio_row(
            "linked decode",
            m(&plain.link_decode) * 1e3,
            m(&tls.link_decode) * 1e3,
            "ms",
        );
        let delta_row = |what: &str, p: f64, t: f64| {
            println!(
                "{what:<34}{:>11.2} ms{:>11.2} ms{:>+12.2} ms",
                p * 1e3,
                t * 1e3,
                (t - p) * 1e3
            );
        };
        delta_row("idle TTFT p50 (relayed)", m(&plain.idle_ttft), m(&tls.idle_ttft));
        delta_row("linked TTFT p50", m(&plain.link_ttft), m(&tls.link_ttft));
        delta_row(
            &format!("TTFT p50, 16-tok, relayed (x{short})"),
            short_relay_p,
            short_relay_t,
        );
        delta_row(
            &format!("TTFT p50, 16-tok, linked (x{short})"),
            short_link_p,
            short_link_t,
        );
        println!(
            "\nserving throughput TLS/plain {:.3}x (target >= 0.95x); TTFT p50 TLS - plain, 128-token prompts: {:+.2} ms relayed, {:+.2} ms linked; 16-token prompts, requests alternating: {:+.2} ms relayed, {:+.2} ms linked (target within 5 ms)",
            m(&tls.tok_s) / m(&plain.tok_s),
            (m(&tls.idle_ttft) - m(&plain.idle_ttft)) * 1e3,
            (m(&tls.link_ttft) - m(&plain.link_ttft)) * 1e3,
            (short_relay_t - short_relay_p) * 1e3,
            (short_link_t - short_link_p) * 1e3
        );
        println!(
            "per round (plain / TLS tok/s): {}",
            plain
                .tok_s
                .iter()
                .zip(&tls.tok_s)
                .map(|(p, t)| format!("{p:.1}/{t:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    });
}
