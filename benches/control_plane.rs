//! Committed admin writes per second and commit latency of the control
//! plane: three `llmos-coordinator` processes (Raft, fsync on) over
//! loopback, against a three-member etcd cluster (fsync on) on the same
//! machine in the same run, with the same writers.
//!
//! `cargo bench -p llmos-benches --bench control_plane` (builds the
//! coordinator binary first: `cargo build --release --bins`).
//!
//! llmos writes are `Admin.SetSetting` calls (gRPC to a coordinator, a
//! follower forwarding to the leader, commit, apply, answer); etcd writes
//! are `Put`s to its leader. Latency: one writer, one write at a time.
//! Throughput: 32 concurrent writers.
//!
//! Idle workers: 8 workers registered and heartbeating at the interval the
//! coordinator asks for (2 s), half of them through a follower, holding
//! nothing; the Raft log's growth over a 30 s window, as writes per minute
//! (leases: near zero; a replicated heartbeat each: ~240).
//!
//! `-- --baseline PATH` runs every llmos phase with another
//! `llmos-coordinator` binary too (e.g. one built from an older commit), in
//! the same invocation.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmos_proto::v1 as api;
use llmos_proto::v1::admin_client::AdminClient;

const SEQUENTIAL: usize = 300;
const CONCURRENT_WRITERS: usize = 32;
const CONCURRENT_WRITES: usize = 3000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf()
}

#[derive(Default)]
struct Figures {
    p50_ms: f64,
    p99_ms: f64,
    writes_per_s: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs the sequential and concurrent phases with `write(i)`.
async fn measure<F, Fut>(write: F) -> Figures
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let write = Arc::new(write);
    let mut lat = Vec::with_capacity(SEQUENTIAL);
    for i in 0..SEQUENTIAL {
        let t = Instant::now();
        assert!(write(i).await, "write {i} failed");
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..CONCURRENT_WRITERS {
        let write = write.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            let mut i = w;
            while i < CONCURRENT_WRITES {
                if write(SEQUENTIAL + i).await {
                    ok += 1;
                }
                i += CONCURRENT_WRITERS;
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    assert_eq!(ok, CONCURRENT_WRITES);
    Figures {
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        writes_per_s: CONCURRENT_WRITES as f64 / started.elapsed().as_secs_f64(),
    }
}

/// A 3-replica Raft group of `bin` on loopback: the processes, the ports,
/// and the leader's port.
async fn group(bin: &Path, dir: &Path) -> (Procs, Vec<u16>, u16) {
    assert!(
        bin.exists(),
        "{} missing: cargo build --release --bins",
        bin.display()
    );
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers = (0..3)
        .map(|i| format!("{}=http://127.0.0.1:{}", i + 1, ports[i]))
        .collect::<Vec<_>>()
        .join(",");
    let mut procs = Procs(Vec::new());
    for i in 0..3 {
        procs.0.push(
            Command::new(bin)
                .args(["--listen", &format!("127.0.0.1:{}", ports[i])])
                .args(["--http-listen", "off"])
                .args(["--node-id", &(i + 1).to_string(), "--peers", &peers])
                .args([
                    "--data-dir",
                    &dir.join(format!("c{i}")).display().to_string(),
                ])
                .env("LLMOS_LOG", "error")
                // No API keys (an environment variable, so that a binary
                // older than the flag runs too).
                .env("LLMOS_NO_AUTH", "1")
                // A plaintext internal plane (an environment variable, as above).
                .env("LLMOS_INSECURE", "1")
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let mut leader = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while leader.is_none() {
        for p in &ports {
            if let Some(cp) = control_plane(*p).await.filter(|c| c.role == "Leader") {
                leader = Some(cp.node_id as usize);
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leader = ports[leader.unwrap() - 1];
    (procs, ports, leader)
}

async fn control_plane(port: u16) -> Option<api::ControlPlaneStatus> {
    let mut a = AdminClient::new(llmos_benches::connect(&format!("http://127.0.0.1:{port}")).await);
    a.list_members(api::ListMembersRequest {})
        .await
        .ok()?
        .into_inner()
        .control_plane
}

async fn llmos(bin: &Path, dir: &Path) -> Figures {
    let (procs, _, leader) = group(bin, dir).await;
    // Writers talk to the leader (as an operator's client would after its
    // first redirect-free try).
    let ch = llmos_benches::connect(&format!("http://127.0.0.1:{leader}")).await;
    let f = measure(move |i| {
        let mut a = AdminClient::new(ch.clone());
        async move {
            a.set_setting(api::SetSettingRequest {
                key: format!("bench.k{}", i % 512),
                value: i.to_string(),
            })
            .await
            .is_ok()
        }
    })
    .await;
    drop(procs);
    f
}

const IDLE_WORKERS: usize = 8;
const IDLE_WINDOW: Duration = Duration::from_secs(30);

/// Raft log entries per minute while `IDLE_WORKERS` idle workers heartbeat.
async fn idle_writes_per_minute(bin: &Path, dir: &Path) -> f64 {
    use llmos_proto::worker::v1 as wk;
    let (procs, ports, leader) = group(bin, dir).await;
    let follower = *ports.iter().find(|&&p| p != leader).unwrap();
    let mut beats = Vec::new();
    for i in 0..IDLE_WORKERS {
        let port = if i % 2 == 0 { leader } else { follower };
        let ch = llmos_benches::connect(&format!("http://127.0.0.1:{port}")).await;
        let mut reg = wk::registry_client::RegistryClient::new(ch);
        let id = format!("idle{i}");
        let interval = reg
            .register(wk::RegisterRequest {
                worker_id: id.clone(),
                address: format!("http://127.0.0.{}:9", i + 2),
                device: "cpu".into(),
                memory_total_bytes: 1 << 34,
                memory_free_bytes: 1 << 33,
                collective_address: String::new(),
                ..Default::default()
            })
            .await
            .expect("register")
            .into_inner()
            .heartbeat_interval_ms;
        beats.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(interval as u64));
            loop {
                tick.tick().await;
                let r = reg
                    .heartbeat(wk::HeartbeatRequest {
                        worker_id: id.clone(),
                        memory_free_bytes: 1 << 33,
                        shards: vec![],
                    })
                    .await;
                assert!(r.is_ok_and(|r| r.into_inner().known), "heartbeat of {id}");
            }
        }));
    }
    // Let registrations settle, then count what the log grows by.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let commit = |cp: Option<api::ControlPlaneStatus>| cp.expect("leader answers").commit_index;
    let before = commit(control_plane(leader).await);
    tokio::time::sleep(IDLE_WINDOW).await;
    let after = commit(control_plane(leader).await);
    for b in beats {
        b.abort();
    }
    drop(procs);
    (after - before) as f64 * 60.0 / IDLE_WINDOW.as_secs_f64()
}

async fn etcd(dir: &Path) -> Option<Figures> {
    let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
    let client: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peer: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let cluster = (0..3)
        .map(|i| format!("e{i}=http://127.0.0.1:{}", peer[i]))
        .collect::<Vec<_>>()
        .join(",");
    let mut procs = Procs(Vec::new());
    for i in 0..3 {
        let c = format!("http://127.0.0.1:{}", client[i]);
        let p = format!("http://127.0.0.1:{}", peer[i]);
        procs.0.push(
            Command::new(bin)
                .args([
                    "--name",
                    &format!("e{i}"),
                    "--data-dir",
                    &dir.join(format!("e{i}")).display().to_string(),
                ])
                .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
                .args([
                    "--listen-peer-urls",
                    &p,
                    "--initial-advertise-peer-urls",
                    &p,
                ])
                .args([
                    "--initial-cluster",
                    &cluster,
                    "--initial-cluster-state",
                    "new",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let endpoints: Vec<String> = client
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    // Talk to the leader, like the llmos writers.
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader_ep = loop {
        let mut found = None;
        for ep in &endpoints {
            if let Ok(mut c) = etcd_client::Client::connect([ep.as_str()], None).await {
                if let Ok(s) = c.status().await {
                    if s.leader() != 0
                        && s.leader() == s.header().map(|h| h.member_id()).unwrap_or(0)
                    {
                        found = Some(ep.clone());
                    }
                }
            }
        }
        if let Some(f) = found {
            break f;
        }
        assert!(Instant::now() < deadline, "etcd cluster did not elect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let client = etcd_client::Client::connect([leader_ep.as_str()], None)
        .await
        .unwrap();
    let f = measure(move |i| {
        let mut kv = client.kv_client();
        async move {
            kv.put(format!("bench/k{}", i % 512), i.to_string(), None)
                .await
                .is_ok()
        }
    })
    .await;
    drop(procs);
    Some(f)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let baseline = args
        .iter()
        .position(|a| a == "--baseline")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let dir = tempfile::tempdir().unwrap();
    println!(
        "control plane: 3 replicas over loopback, fsync on, data in {}",
        dir.path().display()
    );
    println!("sequential: {SEQUENTIAL} writes, one at a time; concurrent: {CONCURRENT_WRITES} writes from {CONCURRENT_WRITERS} writers");
    let mut runs = vec![("llmos raft", bin_dir().join("llmos-coordinator"))];
    if let Some(b) = baseline {
        runs.push(("baseline  ", b));
    }
    let mut figures = Vec::new();
    for (n, (name, bin)) in runs.iter().enumerate() {
        let l = llmos(bin, &dir.path().join(format!("w{n}"))).await;
        println!(
            "{name}   : commit latency p50 {:.2} ms  p99 {:.2} ms  | {:.0} writes/s",
            l.p50_ms, l.p99_ms, l.writes_per_s
        );
        figures.push(l);
    }
    for (n, (name, bin)) in runs.iter().enumerate() {
        let w = idle_writes_per_minute(bin, &dir.path().join(format!("i{n}"))).await;
        println!(
            "{name}   : {IDLE_WORKERS} idle workers heartbeating: {w:.1} Raft writes/min ({}s window)",
            IDLE_WINDOW.as_secs()
        );
    }
    if let [now, base] = &figures[..] {
        println!(
            "ratio llmos/baseline: throughput {:.2}x, p50 latency {:.2}x, p99 latency {:.2}x",
            now.writes_per_s / base.writes_per_s,
            now.p50_ms / base.p50_ms,
            now.p99_ms / base.p99_ms
        );
    }
    match etcd(dir.path()).await {
        Some(e) => {
            println!(
                "etcd 3.4     : commit latency p50 {:.2} ms  p99 {:.2} ms  | {:.0} writes/s",
                e.p50_ms, e.p99_ms, e.writes_per_s
            );
            for ((name, _), l) in runs.iter().zip(&figures) {
                println!(
                    "ratio {}/etcd: throughput {:.2}x, p50 latency {:.2}x, p99 latency {:.2}x",
                    name.trim(),
                    l.writes_per_s / e.writes_per_s,
                    l.p50_ms / e.p50_ms,
                    l.p99_ms / e.p99_ms
                );
            }
        }
        None => println!("etcd not installed (scripts/setup.sh installs it): no peer figures"),
    }
}
