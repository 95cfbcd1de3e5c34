//! llmos coordinator: the control plane. Links no libtorch.
//!
//! - [`state`]: the cluster state (workers; models as desired and as
//!   observed, [`deployment`]) and the commands that change it, applied
//!   deterministically: the seam a replicated log (Raft, etcd) sits behind.
//! - [`placement`]: plans contiguous layer ranges over workers in proportion
//!   to their free memory, or checks an explicit split.
//! - [`store`]: [`store::MetaStore`], where the state machine lives:
//!   [`store::RaftStore`] (replicas form a Raft group, [`consensus`]) or
//!   [`etcd::EtcdStore`] (an external etcd holds the command log).
//! - [`consensus`]: raft-rs driven by a Ready loop, durable storage,
//!   gRPC and in-memory transports.
//! - [`cluster`]: the shared coordinator state (the store behind
//!   `propose`, worker leases, model tokenizers, worker clients) and its
//!   configuration.
//! - [`leases`]: worker liveness as leases in the leader's memory; only
//!   transitions reach the log.
//! - [`reconciler`]: the leader's loop converging placements and loaded
//!   shards to what deployments ask for.
//! - [`registry`]: the `Registry` service (workers register, heartbeat).
//! - [`admin`]: the `Admin` service; [`status`] assembles what it reports.
//! - [`settings`]: cluster settings' keys and the checks on their writes.
//! - [`inference`]: the `Inference` service (Generate, Tokenize, ListModels);
//!   Generate queues with the engine of one of the model's replicas.
//! - [`autoscaler`]: the built-in, off-by-default replica autoscaling rule.
//! - [`router`]: which replica serves a request (load and prompt-prefix
//!   affinity, in this coordinator's memory).
//! - [`metrics`]: Prometheus metrics (`/metrics` on the HTTP port).
//! - [`http`]: the OpenAI-compatible HTTP API, a translation onto
//!   `Inference.Generate`.
//! - [`auth`]: API keys, tenants and roles; the interceptor every public
//!   gRPC service sits behind (the HTTP API checks the same way).
//! - [`quota`]: tenants' token buckets and concurrency, charged when a
//!   request is admitted.
//! - [`error`]: `CoordError` and its mapping to gRPC status codes.

pub mod admin;
pub mod auth;
pub mod autoscaler;
pub mod cluster;
pub mod consensus;
pub mod deployment;
pub mod error;
pub mod etcd;
pub mod http;
pub mod inference;
pub mod leases;
pub mod metrics;
pub mod placement;
pub mod quota;
pub mod reconciler;
pub mod registry;
pub mod router;
pub mod settings;
pub mod shard_spec;
pub mod sizing;
pub mod state;
pub mod status;
pub mod store;

use std::sync::Arc;

pub use cluster::{Cluster, Config};
pub use store::StoreConfig;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Tls(String),
}

/// Serves every coordinator API on `listener` until `shutdown` completes:
/// opens the store (joins or founds the Raft group, or connects to etcd),
/// then serves the public, registry and peer services.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_with_http(listener, None, config, shutdown).await
}

/// The OpenAI-compatible HTTP API's listener and its request body limit.
pub struct HttpListener {
    pub listener: tokio::net::TcpListener,
    pub max_body_bytes: usize,
}

/// How long open HTTP streams may go on after shutdown began.
const HTTP_FINISH_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// [`serve`], plus the HTTP API on `http` when given.
pub async fn serve_with_http(
    listener: tokio::net::TcpListener,
    http: Option<HttpListener>,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_planes(listener, None, http, config, shutdown).await
}

/// Every coordinator API: the public plane (`Inference`, `Admin`: API
/// keys) on `public`, the internal plane (`Registry` for workers, `Peer`
/// for Raft) on `internal` when given, else on `public` too; health and
/// reflection (of what each listener serves) on both; the HTTP API on
/// `http`. Raft peers and workers are then given the internal address.
pub async fn serve_planes(
    public: tokio::net::TcpListener,
    internal: Option<tokio::net::TcpListener>,
    http: Option<HttpListener>,
    mut config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    if config.tls.is_some() && internal.is_none() {
        return Err(ServeError::Tls(
            "mutual TLS is for the internal plane: it needs its own listener (--internal-listen), apart from the public port".into(),
        ));
    }
    config.internal_plane = match &internal {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let peers_reach = match &internal {
        Some(l) => l.local_addr()?,
        None => public.local_addr()?,
    };
    let (store, peer): (Arc<dyn store::MetaStore>, _) = match &config.store {
        StoreConfig::Raft(s) => {
            let (store, peer) = store::RaftStore::start(s, peers_reach, config.tls.clone())?;
            (store, Some(peer))
        }
        StoreConfig::Etcd(s) => (etcd::EtcdStore::start(s.clone()).await?, None),
    };
    let cluster = Cluster::new(config, store.clone());
    let (stop_reconciler, stopped) = tokio::sync::oneshot::channel::<()>();
    let reconciler = tokio::spawn(reconciler::Reconciler::new(cluster.clone()).run(async {
        let _ = stopped.await;
    }));
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<llmos_proto::v1::inference_server::InferenceServer<inference::InferenceService>>()
        .await;
    let (stopping, stop_seen) = tokio::sync::watch::channel(false);
    let peer = peer.map(|mut p| {
        p.stopping = stop_seen.clone();
        llmos_proto::coordinator::v1::peer_server::PeerServer::new(p)
            .max_decoding_message_size(256 << 20)
    });
    let stopped_signal = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let http_task = http.map(|h| {
        let router = http::router(Arc::clone(&cluster), h.max_body_bytes);
        let seen = stopped_signal(stop_seen.clone());
        tokio::spawn(async move {
            let r = axum::serve(h.listener, router)
                .with_graceful_shutdown(seen)
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        })
    });
    use tonic::service::interceptor::InterceptedService;
    let max_message = cluster.config.grpc_max_message_bytes;
    let public_services = |b: &mut tonic::service::RoutesBuilder| {
        b.add_service(InterceptedService::new(
            llmos_proto::v1::admin_server::AdminServer::new(admin::AdminService {
                cluster: Arc::clone(&cluster),
            })
            .max_decoding_message_size(max_message),
            auth::Require {
                cluster: Arc::clone(&cluster),
                need: auth::Role::Admin,
            },
        ))
        .add_service(InterceptedService::new(
            llmos_proto::v1::inference_server::InferenceServer::new(inference::InferenceService {
                cluster: Arc::clone(&cluster),
            })
            .max_decoding_message_size(max_message),
            auth::Require {
                cluster: Arc::clone(&cluster),
                need: auth::Role::User,
            },
        ));
    };
    // On mutual TLS, the registry takes workers (and coordinators
    // forwarding heartbeats to the leader); Peer takes coordinators only.
    let internal_services = |b: &mut tonic::service::RoutesBuilder| {
        b.add_service(InterceptedService::new(
            llmos_proto::worker::v1::registry_server::RegistryServer::new(
                registry::RegistryService {
                    cluster: Arc::clone(&cluster),
                },
            ),
            llmos_tls::server::RequireRole {
                tls_on: cluster.config.tls.is_some(),
                service: "llmos.worker.v1.Registry",
                roles: &[llmos_tls::Role::Worker, llmos_tls::Role::Coordinator],
            },
        ));
        if let Some(p) = peer.clone() {
            b.add_service(p);
        }
    };
    // Reflection advertises exactly what each listener serves.
    let mut public_names = vec!["llmos.v1.Inference", "llmos.v1.Admin"];
    let mut internal_names = vec!["llmos.worker.v1.Registry"];
    if peer.is_some() {
        internal_names.push("llmos.coordinator.v1.Peer");
    }
    let tls = cluster.config.tls.clone();
    let mut planes = Vec::new();
    match internal {
        None => {
            public_names.extend(internal_names);
            let mut b = tonic::service::Routes::builder();
            public_services(&mut b);
            internal_services(&mut b);
            planes.push((public, b, public_names, None));
        }
        Some(internal) => {
            let mut b = tonic::service::Routes::builder();
            public_services(&mut b);
            planes.push((public, b, public_names, None));
            let mut b = tonic::service::Routes::builder();
            internal_services(&mut b);
            planes.push((internal, b, internal_names, tls));
        }
    }
    let mut servers = tokio::task::JoinSet::new();
    for (listener, mut routes, names, tls) in planes {
        let (reflection, reflection_v1alpha) =
            llmos_proto::reflection(&names).expect("valid descriptor sets");
        routes
            .add_service(health.clone())
            .add_service(reflection)
            .add_service(reflection_v1alpha);
        let seen = stopped_signal(stop_seen.clone());
        let max_streams = cluster.config.max_streams_per_connection;
        // A client opening more streams on one connection waits for one to
        // end (HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS).
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(max_streams))
            .add_routes(routes.routes());
        match tls {
            None => servers.spawn(server.serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                seen,
            )),
            Some(tls) => servers.spawn(
                server
                    .serve_with_incoming_shutdown(llmos_tls::server::incoming(listener, tls), seen),
            ),
        };
    }
    drop(cluster);
    // The first server to stop (shutdown, or an error) stops the others.
    let mut result = Ok(());
    tokio::select! {
        _ = shutdown => {}
        Some(r) = servers.join_next() => {
            result = r.expect("a server task");
        }
    }
    let _ = stopping.send(true);
    while let Some(r) = servers.join_next().await {
        if result.is_ok() {
            result = r.expect("a server task");
        }
    }
    if let Some(mut t) = http_task {
        if tokio::time::timeout(HTTP_FINISH_GRACE, &mut t)
            .await
            .is_err()
        {
            tracing::warn!(grace = ?HTTP_FINISH_GRACE, "HTTP streams still open after shutdown began; stopping them");
            t.abort();
        }
    }
    let _ = stop_reconciler.send(());
    let _ = reconciler.await;
    store.shutdown().await;
    Ok(result?)
}
