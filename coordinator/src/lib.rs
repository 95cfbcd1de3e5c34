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
    let listen = listener.local_addr()?;
    let (store, peer): (Arc<dyn store::MetaStore>, _) = match &config.store {
        StoreConfig::Raft(s) => {
            let (store, peer) = store::RaftStore::start(s, listen)?;
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
    let mut served = vec![
        "llmos.v1.Inference",
        "llmos.v1.Admin",
        "llmos.worker.v1.Registry",
    ];
    if peer.is_some() {
        served.push("llmos.coordinator.v1.Peer");
    }
    let (reflection, reflection_v1alpha) =
        llmos_proto::reflection(&served).expect("valid descriptor sets");
    let peer = peer.map(|p| {
        llmos_proto::coordinator::v1::peer_server::PeerServer::new(p)
            .max_decoding_message_size(256 << 20)
    });
    let (stopping, stop_seen) = tokio::sync::oneshot::channel::<()>();
    let http_task = http.map(|h| {
        let router = http::router(Arc::clone(&cluster), h.max_body_bytes);
        tokio::spawn(async move {
            let r = axum::serve(h.listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stop_seen.await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        })
    });
    let shutdown = async move {
        shutdown.await;
        let _ = stopping.send(());
    };
    use tonic::service::interceptor::InterceptedService;
    let max_message = cluster.config.grpc_max_message_bytes;
    let result = tonic::transport::Server::builder()
        // A client opening more streams on one connection waits for one
        // to end (HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS).
        .max_concurrent_streams(Some(cluster.config.max_streams_per_connection))
        .add_optional_service(peer)
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            llmos_proto::worker::v1::registry_server::RegistryServer::new(
                registry::RegistryService {
                    cluster: Arc::clone(&cluster),
                },
            ),
        )
        .add_service(InterceptedService::new(
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
                cluster,
                need: auth::Role::User,
            },
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await;
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
