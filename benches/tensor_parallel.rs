//! Tensor parallelism on CPU over loopback: decode latency of one model
//! served by one worker process (tp=1, 2 threads) against the same model
//! split over two worker processes (tp=2, 1 thread each: the same cores),
//! in one run, with the bytes each rank sends to its group per decoded
//! token (read from the workers' Stats).
//!
//! Model: a Llama-3.2-1B shape with synthetic bf16 weights (SmolLM2's 9
//! heads do not split in 2), or `LLMOS_TP_BENCH_MODEL` (a `synthetic:`
//! preset or a path).
//!
//! cargo bench -p llmos-benches --bench tensor_parallel

use std::process::{Child, Command, Stdio};

use llmos_benches::connect;
use llmos_proto::v1 as api;
use llmos_proto::v1::admin_client::AdminClient;
use llmos_proto::worker::v1 as wk;
use tonic::transport::Channel;

const DECODE_TOKENS: u32 = 32;
const REPEAT: usize = 3;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn worker_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("llmos-worker");
    assert!(
        bin.exists(),
        "{} is missing: cargo build --release --bins first",
        bin.display()
    );
    bin
}

/// A coordinator in this process and `ranks` worker processes of
/// `threads` threads each; the model deployed over them as tp=`ranks`.
async fn cluster(model: &str, ranks: u32, threads: u32) -> (Channel, Vec<Proc>) {
    let url = llmos_benches::start_coordinator(Default::default()).await;
    let procs: Vec<Proc> = (0..ranks)
        .map(|i| {
            Proc(
                Command::new(worker_bin())
                    .args(["serve", "--listen", "127.0.0.1:0"])
                    .args(["--threads", &threads.to_string()])
                    .args(["--coordinator", &url, "--worker-id", &format!("r{i}")])
                    .arg("--insecure")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let ch = connect(&url).await;
    llmos_benches::wait_for_workers(&ch, ranks as usize).await;
    AdminClient::new(ch.clone())
        .deploy_model(api::DeployModelRequest {
            name: "m".into(),
            source: model.into(),
            dtype: "bf16".into(),
            tensor_parallel: ranks,
            serving: Some(api::ServingOptions {
                kv_cache_blocks: 64,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    (ch, procs)
}

/// Bytes all ranks have sent to their groups.
async fn collective_bytes(ch: &Channel) -> u64 {
    let workers = AdminClient::new(ch.clone())
        .list_workers(api::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    let mut total = 0;
    for w in workers {
        let mut c = wk::worker_client::WorkerClient::new(connect(&w.address).await);
        let s = c.stats(wk::StatsRequest {}).await.unwrap().into_inner();
        total += s
            .shards
            .iter()
            .map(|s| s.collective_bytes_sent)
            .sum::<u64>();
    }
    total
}

/// (median seconds per decoded token, collective bytes per decoded token).
async fn measure(ch: &Channel) -> (f64, f64) {
    let mut per_token = Vec::new();
    let mut bytes = Vec::new();
    for i in 0..REPEAT + 1 {
        let b0 = collective_bytes(ch).await;
        let (first, n) =
            llmos_benches::stream_greedy(ch, "m", vec![1, 2, 3, 4, 5, 6, 7, 8], DECODE_TOKENS + 1)
                .await;
        let secs = first.elapsed().as_secs_f64() / (n - 1) as f64;
        let b1 = collective_bytes(ch).await;
        if i > 0 {
            per_token.push(secs);
            // The prompt step is in the delta too; it is one of n steps.
            bytes.push((b1 - b0) as f64 / n as f64);
        }
    }
    per_token.sort_by(f64::total_cmp);
    bytes.sort_by(f64::total_cmp);
    (per_token[REPEAT / 2], bytes[REPEAT / 2])
}

#[tokio::main]
async fn main() {
    let model =
        std::env::var("LLMOS_TP_BENCH_MODEL").unwrap_or_else(|_| "synthetic:llama-3.2-1b".into());
    println!("model {model} (bf16), {DECODE_TOKENS} decoded tokens, median of {REPEAT} requests");
    let (ch, procs) = cluster(&model, 1, 2).await;
    let (tp1, b1) = measure(&ch).await;
    drop(procs);
    let (ch, procs) = cluster(&model, 2, 1).await;
    let (tp2, b2) = measure(&ch).await;
    drop(procs);
    println!(
        "tp=1 (1 process x 2 threads): {:.1} ms/token, {:.0} collective bytes/token",
        tp1 * 1e3,
        b1
    );
    println!(
        "tp=2 (2 processes x 1 thread): {:.1} ms/token, {:.0} collective bytes/token (all ranks)",
        tp2 * 1e3,
        b2
    );
    println!(
        "tp=2 / tp=1 decode latency: {:.2}x ({:.2}x the tokens/s)",
        tp2 / tp1,
        tp1 / tp2
    );
}
