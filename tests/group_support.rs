//! Coordinator processes over loopback for the HA and reconciler tests: a
//! Raft group of `llmos-coordinator` processes with data directories, and
//! clients that find its leader.
//!
//! Needs `llmos-coordinator` built beside the test binary
//! (`cargo build --release --bins`, as `scripts/test.sh` does).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llmos_proto::v1 as api;
use llmos_proto::v1::admin_client::AdminClient;
use tonic::transport::Channel;

pub const TICK_MS: u64 = 50;
/// Raft's election timeout is 10 to 20 ticks.
pub const ELECTION_TIMEOUT: Duration = Duration::from_millis(TICK_MS * 20);

pub fn coordinator_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("llmos-coordinator");
    assert!(
        bin.exists(),
        "{} is missing: build the binaries first (cargo build --release --bins)",
        bin.display()
    );
    bin
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Node {
    pub id: u64,
    pub port: u16,
    pub dir: PathBuf,
    pub args: Vec<String>,
    pub child: Option<Child>,
    pub starts: u32,
    /// LLMOS_LOG of the process (its stderr goes to a file beside `dir`).
    pub log: &'static str,
}

impl Node {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn start(&mut self) {
        self.starts += 1;
        let log =
            std::fs::File::create(self.dir.with_extension(format!("{}.log", self.starts))).unwrap();
        let child = Command::new(coordinator_bin())
            .args(&self.args)
            .env("LLMOS_LOG", self.log)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id();
        assert!(Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal("-CONT");
        }
        self.kill9();
    }
}

pub struct Group {
    pub _root: tempfile::TempDir,
    pub nodes: BTreeMap<u64, Node>,
}

pub fn node(root: &Path, id: u64, port: u16, extra: &[String]) -> Node {
    node_ticking(root, id, port, TICK_MS, extra)
}

/// A replica whose Raft ticks every `tick_ms` (elections time out after
/// 10 to 20 ticks).
pub fn node_ticking(root: &Path, id: u64, port: u16, tick_ms: u64, extra: &[String]) -> Node {
    let dir = root.join(format!("n{id}"));
    let mut args: Vec<String> = vec![
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        // Replicas share 127.0.0.1: the HTTP API's default port would clash.
        "--http-listen".into(),
        "off".into(),
        "--node-id".into(),
        id.to_string(),
        "--cluster-id".into(),
        "ha".into(),
        "--data-dir".into(),
        dir.display().to_string(),
        "--raft-tick-ms".into(),
        tick_ms.to_string(),
        "--snapshot-entries".into(),
        "40".into(),
        "--heartbeat-timeout-s".into(),
        "5".into(),
    ];
    args.extend_from_slice(extra);
    // Without API keys unless a test gives a bootstrap admin key; a
    // plaintext internal plane unless a test gives certificates.
    if !extra.iter().any(|a| a.starts_with("--admin-key-file")) {
        args.push("--no-auth".into());
    }
    if !extra.iter().any(|a| a.starts_with("--tls-cert")) {
        args.push("--insecure".into());
    }
    Node {
        id,
        port,
        dir,
        args,
        child: None,
        starts: 0,
        log: "warn",
    }
}

impl Group {
    /// `n` founding replicas from a static peer list.
    pub fn founded(n: u64) -> Group {
        Group::founded_ticking(n, TICK_MS)
    }

    /// `n` founding replicas ticking every `tick_ms`.
    pub fn founded_ticking(n: u64, tick_ms: u64) -> Group {
        Group::founded_with(n, tick_ms, &[])
    }

    /// `n` founding replicas ticking every `tick_ms`, with more
    /// `llmos-coordinator` arguments.
    pub fn founded_with(n: u64, tick_ms: u64, extra: &[String]) -> Group {
        Group::founded_logging(n, tick_ms, extra, "warn")
    }

    /// [`Group::founded_with`], the replicas logging at `log` (LLMOS_LOG).
    pub fn founded_logging(n: u64, tick_ms: u64, extra: &[String], log: &'static str) -> Group {
        let root = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let peers = (1..=n)
            .map(|i| format!("{i}=http://127.0.0.1:{}", ports[i as usize - 1]))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = BTreeMap::new();
        for i in 1..=n {
            let mut nd = node_ticking(
                root.path(),
                i,
                ports[i as usize - 1],
                tick_ms,
                &[&["--peers".to_string(), peers.clone()], extra].concat(),
            );
            nd.log = log;
            nd.start();
            nodes.insert(i, nd);
        }
        Group { _root: root, nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .values()
            .filter(|n| n.child.is_some())
            .map(Node::url)
            .collect()
    }
}

pub async fn admin(url: &str) -> AdminClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match tonic::transport::Endpoint::from_shared(url.to_string())
            .unwrap()
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
        {
            Ok(c) => return AdminClient::new(c),
            Err(e) => {
                assert!(Instant::now() < deadline, "{url}: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// One connection attempt (a replica that is down gives None).
pub async fn try_admin(url: &str) -> Option<AdminClient<Channel>> {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_millis(300))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .ok()
        .map(AdminClient::new)
}

pub async fn control_plane(url: &str) -> Option<api::ControlPlaneStatus> {
    let mut a = try_admin(url).await?;
    a.list_members(api::ListMembersRequest {})
        .await
        .ok()?
        .into_inner()
        .control_plane
}

/// Waits until the replicas at `urls` agree on a leader; returns its id.
pub async fn leader(urls: &[String], within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let mut ids = Vec::new();
        let mut leading = Vec::new();
        for u in urls {
            let cp = control_plane(u).await;
            ids.push(cp.as_ref().map(|c| c.leader_id).unwrap_or(0));
            if let Some(c) = cp.filter(|c| c.role == "Leader") {
                leading.push(c.node_id);
            }
        }
        // One of these replicas leads, and all of them know it.
        if leading.len() == 1 && ids.iter().all(|&i| i == leading[0]) {
            return ids[0];
        }
        assert!(
            Instant::now() < deadline,
            "no agreed leader among {urls:?}: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
