//! The worker's gRPC server (`llmos.worker.v1.Worker`), with gRPC health
//! checking and server reflection. `WorkerError` maps to `tonic::Status` here
//! and nowhere else.

pub mod codec;
pub mod host;
pub mod register;

use std::pin::Pin;

use llmos_proto::worker::v1 as pb;
use pb::worker_server::{Worker, WorkerServer};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::error::{Result, WorkerError};
pub use host::HostHandle;

impl From<WorkerError> for Status {
    fn from(e: WorkerError) -> Status {
        use llmos_meta::MetaError;
        let msg = e.to_string();
        match e {
            WorkerError::InvalidRequest(_)
            | WorkerError::LimitExceeded { .. }
            | WorkerError::NoTokenizer { .. } => Status::invalid_argument(msg),
            WorkerError::UnknownModel(_) | WorkerError::Meta(MetaError::ModelNotFound { .. }) => {
                Status::not_found(msg)
            }
            WorkerError::Meta(MetaError::Io { ref source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Status::not_found(msg)
            }
            WorkerError::Meta(_) => Status::invalid_argument(msg),
            WorkerError::PositionMismatch { .. } => Status::failed_precondition(msg),
            WorkerError::DeviceUnavailable(..)
            | WorkerError::HostStopped
            | WorkerError::Transport(_) => Status::unavailable(msg),
            WorkerError::Torch(_) => Status::internal(msg),
        }
    }
}

pub struct WorkerService {
    host: HostHandle,
}

type ForwardStream = Pin<Box<dyn Stream<Item = Result<pb::ForwardResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn load_shard(
        &self,
        req: Request<pb::LoadShardRequest>,
    ) -> Result<Response<pb::LoadShardResponse>, Status> {
        let shard = req
            .into_inner()
            .shard
            .ok_or_else(|| Status::invalid_argument("LoadShardRequest.shard is required"))?;
        Ok(Response::new(self.host.load(shard).await?))
    }

    async fn unload_shard(
        &self,
        req: Request<pb::UnloadShardRequest>,
    ) -> Result<Response<pb::UnloadShardResponse>, Status> {
        self.host.unload(req.into_inner().model).await?;
        Ok(Response::new(pb::UnloadShardResponse {}))
    }

    type ForwardStream = ForwardStream;

    /// Answers each request in order; the first error ends the stream with
    /// its status. When the stream ends (the caller finished or went away)
    /// the KV caches of the sequences it touched are released, so a dropped
    /// client frees its cache on every stage.
    async fn forward(
        &self,
        req: Request<Streaming<pb::ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let mut inbound = req.into_inner();
        let host = self.host.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut touched = std::collections::HashSet::new();
            while let Some(msg) = inbound.next().await {
                let r = match msg {
                    Ok(req) => {
                        touched.insert((req.model.clone(), req.sequence_id.clone()));
                        host.forward(req).await.map_err(Status::from)
                    }
                    Err(s) => Err(s),
                };
                let failed = r.is_err();
                if tx.send(r).await.is_err() || failed {
                    break;
                }
            }
            for (model, seq) in touched {
                // The model may have been unloaded meanwhile: nothing to free.
                let _ = host.release(model, seq).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn release_sequence(
        &self,
        req: Request<pb::ReleaseSequenceRequest>,
    ) -> Result<Response<pb::ReleaseSequenceResponse>, Status> {
        let r = req.into_inner();
        let released = self.host.release(r.model, r.sequence_id).await?;
        Ok(Response::new(pb::ReleaseSequenceResponse { released }))
    }

    async fn stats(
        &self,
        _req: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        Ok(Response::new(self.host.stats().await?))
    }
}

/// Serves the worker API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    host: HostHandle,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<WorkerServer<WorkerService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(llmos_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| WorkerError::Transport(e.to_string()))?;
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(WorkerServer::new(WorkerService { host }))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
        .map_err(|e| WorkerError::Transport(e.to_string()))
}
