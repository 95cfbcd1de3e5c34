//! `llmos-coordinator`: flags, logging, and `serve`.

use anyhow::{Context, Result};
use clap::Parser;
use llmos_coordinator::store::EtcdSettings;
use llmos_coordinator::store::{parse_peers, RaftSettings, StoreConfig};

#[derive(Parser)]
#[command(
    name = "llmos-coordinator",
    version,
    about = "llmos coordinator: placement, routing, public gRPC API"
)]
struct Cli {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(
        long,
        env = "LLMOS_COORDINATOR_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    listen: std::net::SocketAddr,
    /// Address of the internal plane: `Registry` (workers register and
    /// heartbeat there) and `Peer` (Raft between coordinators). Default:
    /// none, both served on --listen beside the public API. Given, --listen
    /// serves only `Inference` and `Admin` (API keys), so a NetworkPolicy
    /// can admit clients to one port and only cluster pods to the other.
    #[arg(long, env = "LLMOS_INTERNAL_LISTEN")]
    internal_listen: Option<std::net::SocketAddr>,
    /// Address of the OpenAI-compatible HTTP API (`off`: none). Default:
    /// --listen's IP, port 8000 (port 0 when --listen asks for port 0).
    #[arg(long, env = "LLMOS_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// Also export metrics under vLLM's names (`vllm`), for dashboards and
    /// autoscalers written for vLLM.
    #[arg(long, env = "LLMOS_METRICS_COMPAT", value_parser = ["vllm"])]
    metrics_compat: Option<String>,
    /// Logs on stderr as `text` or `json` (one object per line); the
    /// filter is LLMOS_LOG.
    #[arg(long, env = "LLMOS_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Export request spans (traces) to this OpenTelemetry collector over
    /// OTLP/HTTP, e.g. http://collector:4318 (`/v1/traces` is appended).
    #[arg(long, env = "LLMOS_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Largest HTTP request body, in bytes (413 above it).
    #[arg(long, env = "LLMOS_HTTP_MAX_BODY_BYTES", default_value_t = 8 << 20)]
    http_max_body_bytes: usize,
    /// Largest public gRPC request message, in bytes (OUT_OF_RANGE above it).
    #[arg(long, env = "LLMOS_GRPC_MAX_MESSAGE_BYTES", default_value_t = 8 << 20)]
    grpc_max_message_bytes: usize,
    /// Streams (calls) one client connection may have open at once; more
    /// wait for one to end.
    #[arg(long, env = "LLMOS_MAX_STREAMS_PER_CONNECTION", default_value_t = 1024)]
    max_streams_per_connection: u32,
    /// How often workers heartbeat (they learn it when they register), in
    /// milliseconds.
    #[arg(long, env = "LLMOS_HEARTBEAT_INTERVAL_MS", default_value_t = 2000)]
    heartbeat_interval_ms: u64,
    /// Seconds without a heartbeat after which a worker is marked unhealthy
    /// (its lease).
    #[arg(long, env = "LLMOS_HEARTBEAT_TIMEOUT_S", default_value_t = 10)]
    heartbeat_timeout_s: u64,
    /// Seconds a worker stays unhealthy before its shards are loaded on
    /// other workers with room (and it is told to unload them if it
    /// returns).
    #[arg(long, env = "LLMOS_WORKER_GRACE_PERIOD_S", default_value_t = 30)]
    worker_grace_period_s: u64,
    /// Seconds a replica being removed (scale-down, drain) may take to
    /// finish its requests before it is unloaded anyway.
    #[arg(long, env = "LLMOS_DRAIN_TIMEOUT_S", default_value_t = 300)]
    drain_timeout_s: u64,
    /// Autoscaled deployments gain a replica when more requests than this
    /// wait per serving replica for --autoscale-up-window-s...
    #[arg(long, default_value_t = 2.0)]
    autoscale_up_waiting: f64,
    #[arg(long, default_value_t = 30)]
    autoscale_up_window_s: u64,
    /// ...and lose one when no request runs or waits for this long.
    #[arg(long, default_value_t = 300)]
    autoscale_idle_window_s: u64,
    /// How requests are spread over a model's replicas: `prefix` (the
    /// replica holding the longest cached prompt prefix unless it is much
    /// busier, else the least loaded) or `round-robin`.
    #[arg(long, env = "LLMOS_ROUTING", default_value = "prefix", value_parser = ["prefix", "round-robin"])]
    routing: String,
    /// How many times a request may move to another replica after the one
    /// serving it failed mid-stream (0: never; the stream then fails).
    #[arg(long, env = "LLMOS_MIGRATION_LIMIT", default_value_t = 3)]
    migration_limit: u32,
    /// Seconds a request whose replica failed waits for a replica to serve
    /// it (another, or the same once its lost part is replaced).
    #[arg(long, env = "LLMOS_MIGRATION_TIMEOUT_S", default_value_t = 60)]
    migration_timeout_s: u64,
    /// Deadline of one forward step on one stage, in seconds.
    #[arg(long, default_value_t = 30)]
    step_timeout_s: u64,
    /// Where the cluster state is kept: `raft` (coordinators replicate it)
    /// or `etcd` (an external etcd holds it).
    #[arg(long, env = "LLMOS_STORE", default_value = "raft", value_parser = ["raft", "etcd"])]
    store: String,
    /// Names this cluster; a data directory or a peer of another cluster is refused.
    #[arg(long, env = "LLMOS_CLUSTER_ID", default_value = "llmos")]
    cluster_id: String,
    /// Raft: this replica's id (>= 1). 0: the StatefulSet ordinal of
    /// --pod-name plus 1 (pod `llmos-coordinator-2` is node 3).
    #[arg(long, env = "LLMOS_NODE_ID", default_value_t = 1)]
    node_id: u64,
    /// This pod's name, for --node-id 0 (Kubernetes: the downward API's
    /// metadata.name).
    #[arg(long, env = "LLMOS_POD_NAME")]
    pod_name: Option<String>,
    /// Raft: durable state (log, snapshots). Default: a temporary directory.
    #[arg(long, env = "LLMOS_DATA_DIR")]
    data_dir: Option<std::path::PathBuf>,
    /// Raft: founding members on first boot, `1=http://a:50051,2=...`
    /// (stable DNS names of a StatefulSet). Default: this node alone.
    #[arg(long, env = "LLMOS_PEERS", default_value = "")]
    peers: String,
    /// Raft: start empty and wait to be added with `llmos members add`.
    #[arg(long, env = "LLMOS_JOIN", value_parser = clap::builder::BoolishValueParser::new())]
    join: bool,
    /// Raft: the address peers reach this replica at (default:
    /// http://<internal-listen>, else http://<listen>).
    #[arg(long, env = "LLMOS_ADVERTISE")]
    advertise: Option<String>,
    /// Raft: applied entries between snapshots (log compaction).
    #[arg(long, default_value_t = 1000)]
    snapshot_entries: u64,
    /// Raft: milliseconds per tick; elections time out after 10 ticks.
    #[arg(long, default_value_t = 100)]
    raft_tick_ms: u64,
    /// Serve the public APIs without API keys: anyone who reaches the
    /// port is an admin (`llmos status` reports `auth: off`). For a
    /// development cluster on loopback only.
    #[arg(long, env = "LLMOS_NO_AUTH", value_parser = clap::builder::BoolishValueParser::new())]
    no_auth: bool,
    /// A file holding the bootstrap admin key (any string of 20+
    /// characters; e.g. `openssl rand -hex 32`), accepted as an admin key
    /// beside the keys `llmos keys create` makes. Read once at start; held
    /// in memory as a salted hash. LLMOS_ADMIN_KEY gives the key itself.
    #[arg(long, env = "LLMOS_ADMIN_KEY_FILE")]
    admin_key_file: Option<std::path::PathBuf>,
    /// With API keys required, serve the internal plane (Raft, worker
    /// registry: no keys) on the public port anyway. Without it, keys
    /// require --internal-listen: on a shared port, anyone reaching it
    /// could send Raft messages (e.g. commit a key of their own).
    #[arg(long, env = "LLMOS_SHARED_PLANES", value_parser = clap::builder::BoolishValueParser::new())]
    shared_planes: bool,
    #[command(flatten)]
    tls: llmos_tls::TlsFlags,
    /// `/metrics` needs a (user) API key too.
    #[arg(long, env = "LLMOS_METRICS_NEED_KEY", value_parser = clap::builder::BoolishValueParser::new())]
    metrics_need_key: bool,
    /// etcd: client endpoints, comma-separated.
    #[arg(
        long,
        env = "LLMOS_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379"
    )]
    etcd_endpoints: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // Dropped at the end of main: spans still batched go out.
    let _tracing = llmos_meta::logging::init_with_traces(
        &cli.log_format,
        "info",
        "llmos-coordinator",
        cli.otlp_endpoint.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let tls = internal_tls(&cli)?;
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("bind {}", cli.listen))?;
    // Handlers first: a signal after the announcement stops us gracefully.
    let signals = llmos_meta::shutdown::Signals::install().context("install signal handlers")?;
    let listen = listener.local_addr()?;
    let http = match http_address(cli.http_listen.as_deref(), cli.listen)? {
        None => None,
        Some(a) => Some(llmos_coordinator::HttpListener {
            listener: tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("bind --http-listen {a}"))?,
            max_body_bytes: cli.http_max_body_bytes,
        }),
    };
    let internal = match cli.internal_listen {
        None => None,
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("bind --internal-listen {a}"))?,
        ),
    };
    // Every address in one write: a launcher reading only the first line
    // may close the pipe after it.
    let mut announce = format!("listening on {listen}\n");
    if let Some(h) = &http {
        announce.push_str(&format!("http listening on {}\n", h.listener.local_addr()?));
    }
    let internal_addr = match &internal {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    if let Some(a) = internal_addr {
        announce.push_str(&format!("internal listening on {a}\n"));
    }
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        out.write_all(announce.as_bytes())?;
        out.flush()?;
    }
    let advertise = cli
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{}", internal_addr.unwrap_or(listen)));
    let store = match cli.store.as_str() {
        "etcd" => StoreConfig::Etcd(EtcdSettings::new(
            cli.etcd_endpoints
                .split(',')
                .map(|e| e.trim().to_string())
                .filter(|e| !e.is_empty())
                .collect(),
            &cli.cluster_id,
            &advertise,
        )),
        _ => StoreConfig::Raft(RaftSettings {
            node_id: node_id(cli.node_id, cli.pod_name.as_deref())?,
            cluster_id: cli.cluster_id.clone(),
            data_dir: cli.data_dir.clone(),
            peers: parse_peers(&cli.peers).map_err(|e| anyhow::anyhow!("--peers: {e}"))?,
            join: cli.join,
            advertise: Some(advertise),
            snapshot_entries: cli.snapshot_entries,
            tick: std::time::Duration::from_millis(cli.raft_tick_ms),
            ..Default::default()
        }),
    };
    let auth = auth_config(&cli)?;
    if auth.required && cli.internal_listen.is_none() {
        if !cli.shared_planes {
            anyhow::bail!(
                "API keys are required (the default), but without --internal-listen the internal plane (Raft between coordinators, the worker registry) would share the public port {}, where it takes no key: anyone reaching it could send Raft messages and commit a key of their own. Give --internal-listen ADDR (reachable only by the cluster's pods), or --shared-planes to accept that, or --no-auth",
                cli.listen
            );
        }
        tracing::warn!("--shared-planes: the internal plane (Raft, worker registry) takes no key on the public port; API keys can be bypassed by whoever reaches it");
    }
    let config = llmos_coordinator::Config {
        heartbeat_interval: std::time::Duration::from_millis(cli.heartbeat_interval_ms.max(50)),
        heartbeat_timeout: std::time::Duration::from_secs(cli.heartbeat_timeout_s),
        worker_grace_period: std::time::Duration::from_secs(cli.worker_grace_period_s),
        step_timeout: std::time::Duration::from_secs(cli.step_timeout_s),
        migration_limit: cli.migration_limit,
        migration_timeout: std::time::Duration::from_secs(cli.migration_timeout_s),
        drain_timeout: std::time::Duration::from_secs(cli.drain_timeout_s),
        autoscale: llmos_coordinator::autoscaler::Policy {
            up_waiting: cli.autoscale_up_waiting,
            up_window: std::time::Duration::from_secs(cli.autoscale_up_window_s),
            idle_window: std::time::Duration::from_secs(cli.autoscale_idle_window_s),
        },
        round_robin: cli.routing == "round-robin",
        vllm_metrics: cli.metrics_compat.as_deref() == Some("vllm"),
        store,
        auth,
        tls,
        grpc_max_message_bytes: cli.grpc_max_message_bytes,
        max_streams_per_connection: cli.max_streams_per_connection.max(1),
        ..Default::default()
    };
    llmos_coordinator::serve_planes(listener, internal, http, config, async {
        let why = signals.recv().await;
        tracing::info!(signal = why, "shutting down");
    })
    .await?;
    Ok(())
}

/// API keys: required unless --no-auth; the bootstrap admin key from
/// LLMOS_ADMIN_KEY or --admin-key-file.
fn auth_config(cli: &Cli) -> Result<llmos_coordinator::auth::AuthConfig> {
    use llmos_coordinator::auth::{AuthConfig, BootstrapKey};
    if cli.no_auth {
        tracing::warn!(
            "--no-auth: the public APIs take no API key; anyone reaching them is an admin"
        );
        return Ok(AuthConfig {
            required: false,
            bootstrap: None,
            metrics_need_key: false,
        });
    }
    let env_key = std::env::var("LLMOS_ADMIN_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    if env_key.is_some() && cli.admin_key_file.is_some() {
        anyhow::bail!(
            "both LLMOS_ADMIN_KEY and --admin-key-file give the bootstrap admin key: give one"
        );
    }
    let key = match (env_key, &cli.admin_key_file) {
        (Some(k), _) => {
            Some(BootstrapKey::new(&k).map_err(|e| anyhow::anyhow!("LLMOS_ADMIN_KEY: {e}"))?)
        }
        (_, Some(path)) => {
            let k = std::fs::read_to_string(path)
                .with_context(|| format!("--admin-key-file {}", path.display()))?;
            Some(
                BootstrapKey::new(&k)
                    .map_err(|e| anyhow::anyhow!("--admin-key-file {}: {e}", path.display()))?,
            )
        }
        _ => None,
    };
    if key.is_none() {
        tracing::warn!("API keys are required and no bootstrap admin key was given (--admin-key-file, LLMOS_ADMIN_KEY): only keys already in the cluster state are accepted");
    }
    Ok(AuthConfig {
        required: true,
        bootstrap: key,
        metrics_need_key: cli.metrics_need_key,
    })
}

/// The internal plane's TLS from the flags (which needs its own port).
fn internal_tls(cli: &Cli) -> Result<Option<std::sync::Arc<llmos_tls::Tls>>> {
    if cli.tls.tls_cert.is_some() && cli.internal_listen.is_none() {
        anyhow::bail!("--tls-cert: mutual TLS is for the internal plane, which then needs its own port: give --internal-listen ADDR");
    }
    Ok(cli.tls.load(
        llmos_tls::Role::Coordinator,
        "Raft between coordinators, the worker registry, calls to workers",
    )?)
}

/// Where the HTTP API listens: the flag, `off`, or by default --listen's
/// IP with port 8000 (0 when --listen's port is 0, so that several
/// coordinators started with port 0 do not collide).
fn http_address(
    flag: Option<&str>,
    grpc: std::net::SocketAddr,
) -> Result<Option<std::net::SocketAddr>> {
    match flag {
        Some("off") | Some("none") => Ok(None),
        Some(a) => Ok(Some(a.parse().map_err(|e| {
            anyhow::anyhow!("--http-listen {a:?}: not an address (ip:port) or `off`: {e}")
        })?)),
        None => Ok(Some(std::net::SocketAddr::new(
            grpc.ip(),
            if grpc.port() == 0 { 0 } else { 8000 },
        ))),
    }
}

/// The Raft id: `--node-id`, or for 0 the StatefulSet ordinal (the pod
/// name's trailing `-N`) plus 1.
fn node_id(flag: u64, pod_name: Option<&str>) -> Result<u64> {
    if flag != 0 {
        return Ok(flag);
    }
    let name = pod_name.ok_or_else(|| {
        anyhow::anyhow!("--node-id 0 takes the id from --pod-name (LLMOS_POD_NAME), which is unset")
    })?;
    let ordinal = name
        .rsplit_once('-')
        .and_then(|(_, n)| n.parse::<u64>().ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--node-id 0: pod name {name:?} does not end in -<ordinal> (a StatefulSet pod's name does)"
            )
        })?;
    Ok(ordinal + 1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_http_address_defaults_beside_grpc() {
        let grpc: std::net::SocketAddr = "10.1.2.3:50051".parse().unwrap();
        assert_eq!(
            super::http_address(None, grpc).unwrap(),
            Some("10.1.2.3:8000".parse().unwrap())
        );
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(
            super::http_address(None, any).unwrap(),
            Some("127.0.0.1:0".parse().unwrap())
        );
        assert_eq!(super::http_address(Some("off"), grpc).unwrap(), None);
        let e = super::http_address(Some("8000"), grpc)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--http-listen"), "{e}");
    }

    #[test]
    fn node_id_zero_takes_the_statefulset_ordinal_plus_one() {
        assert_eq!(super::node_id(4, None).unwrap(), 4);
        assert_eq!(super::node_id(0, Some("llmos-coordinator-0")).unwrap(), 1);
        assert_eq!(
            super::node_id(0, Some("rel-llmos-coordinator-12")).unwrap(),
            13
        );
        let e = super::node_id(0, Some("coordinator"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"coordinator\""), "{e}");
        let e = super::node_id(0, None).unwrap_err().to_string();
        assert!(e.contains("LLMOS_POD_NAME"), "{e}");
    }
}
