//! The worker's gRPC server (`llmos.worker.v1.Worker`), with gRPC health
//! checking and server reflection. The only layer that speaks protobuf
//! (with the remote stage): it converts the wire's messages to the
//! engine's and runtime's types (`codec`) and their errors to
//! `tonic::Status` (`status`, the one mapping).
//!
//! - [`codec`]: wire <-> engine types, checked on the way in.
//! - [`status`]: errors to gRPC status codes and failure metadata.
//! - [`remote`]: another worker's stage (its `Step` stream).
//! - [`register`]: registration with the coordinator and heartbeats.

pub mod codec;
pub mod register;
pub mod remote;
pub mod status;

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llmos_meta::serving::{DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_RUNNING, DEFAULT_MAX_WAITING};
use llmos_meta::FinishReason;
use llmos_proto::worker::v1 as pb;
use pb::worker_server::{Worker, WorkerServer};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{
    EngineHandle, Finish, LocalStage, Pipeline, SchedulerConfig, SeqEvent, SeqParams, Stage,
    Submission,
};
pub use crate::runtime::HostHandle;
use crate::runtime::Loaded;
use remote::RemoteStage;

/// The spec without its pipeline links (which change when a neighbouring
/// stage restarts, while the engine stays good).
fn without_links(spec: &pb::ShardSpec) -> pb::ShardSpec {
    pb::ShardSpec {
        prev_link: None,
        next_link: None,
        ..spec.clone()
    }
}

/// What an engine keeps across a change of the stages after its own: the
/// spec without links, placement epoch and later stages' addresses.
fn engine_shape(spec: &pb::ShardSpec) -> pb::ShardSpec {
    let mut s = pb::ShardSpec {
        epoch: 0,
        ..without_links(spec)
    };
    if let Some(e) = s.engine.as_mut() {
        e.next_stages.clear();
    }
    s
}

/// A remote stage that does not answer a step within this (when the spec
/// leaves it at 0) is unavailable. Engine limits left at 0 take the serving
/// defaults of `llmos_meta::serving`.
pub const DEFAULT_STEP_TIMEOUT_MS: u32 = 30_000;

/// The shards this worker holds and the placement epoch each was loaded
/// under: shared by the server (which fences commands by it) and the
/// heartbeats (which report it to the coordinator's reconciler).
#[derive(Clone, Default)]
pub struct HeldShards {
    epochs: Arc<Mutex<BTreeMap<String, u64>>>,
    /// The engines this worker runs (shared with the server), for the load
    /// heartbeats report.
    engines: Engines,
}

type Engines = Arc<Mutex<HashMap<String, (pb::ShardSpec, EngineHandle)>>>;

impl HeldShards {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.epochs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The epoch `model` is held under, if held.
    pub fn epoch(&self, model: &str) -> Option<u64> {
        self.lock().get(model).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// What heartbeats report: each shard, with its engine's load where
    /// this worker runs the engine (the coordinators route by it).
    pub async fn report(&self) -> Vec<pb::HeldShard> {
        let held: Vec<(String, u64)> = self.lock().iter().map(|(m, &e)| (m.clone(), e)).collect();
        let mut out = Vec::with_capacity(held.len());
        for (model, epoch) in held {
            let engine = self
                .engines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&model)
                .map(|(_, e)| e.clone());
            let engine = match engine {
                Some(e) => e.stats().await.ok().map(|s| codec::engine_stats(&s)),
                None => None,
            };
            out.push(pb::HeldShard {
                model,
                epoch,
                engine,
            });
        }
        out
    }
}

pub struct WorkerService {
    host: HostHandle,
    /// Mutual TLS to the next stages' workers (None: plaintext).
    tls: Option<Arc<llmos_tls::Tls>>,
    /// Engines of the models whose first stage this worker holds, with the
    /// spec they were started from.
    engines: Engines,
    held: HeldShards,
}

impl WorkerService {
    pub fn new(host: HostHandle, held: HeldShards) -> Self {
        WorkerService {
            host,
            tls: None,
            engines: held.engines.clone(),
            held,
        }
    }

    /// Dials other workers (the next pipeline stages) over mutual TLS.
    pub fn with_tls(mut self, tls: Option<Arc<llmos_tls::Tls>>) -> Self {
        self.tls = tls;
        self
    }

    fn engine(&self, model: &str) -> Option<EngineHandle> {
        self.engines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
            .map(|(_, e)| e.clone())
    }

    /// Starts (or keeps, or replaces) the engine a first-stage spec asks for.
    fn start_engine(&self, spec: &pb::ShardSpec, loaded: &Loaded) -> Result<(), Status> {
        let mut engines = self.engines.lock().unwrap_or_else(|e| e.into_inner());
        let Some(e) = spec.engine.as_ref().filter(|_| spec.embed) else {
            engines.remove(&spec.model);
            return Ok(());
        };
        // A neighbour's restart renames the links; the engine stays.
        if engines
            .get(&spec.model)
            .is_some_and(|(s, _)| without_links(s) == without_links(spec))
        {
            return Ok(());
        }
        let or = |v: u32, d: u32| if v == 0 { d } else { v } as usize;
        let stages = || -> Vec<Arc<dyn Stage>> {
            let timeout =
                Duration::from_millis(or(e.step_timeout_ms, DEFAULT_STEP_TIMEOUT_MS) as u64);
            let mut stages: Vec<Arc<dyn Stage>> = vec![Arc::new(LocalStage {
                host: self.host.clone(),
            })];
            for s in &e.next_stages {
                stages.push(Arc::new(RemoteStage::new(
                    s.worker_id.clone(),
                    s.address.clone(),
                    timeout,
                    self.tls.clone(),
                )));
            }
            stages
        };
        // Only the later stages changed (one was lost and loaded on another
        // worker, a new placement epoch) and this shard, its cache and its
        // boundary rows were kept: the engine goes on over the new stages,
        // so what it cached is recomputed by them alone when reused.
        if let Some((held, handle)) = engines.get_mut(&spec.model) {
            if loaded.kept && engine_shape(held) == engine_shape(spec) {
                handle.repipe(Pipeline::new(stages(), e.linked))?;
                tracing::info!(model = %spec.model, epoch = spec.epoch, "engine kept: later stages replaced");
                *held = spec.clone();
                return Ok(());
            }
        }
        let stages = stages();
        let cfg = SchedulerConfig {
            max_batch_tokens: or(e.max_batch_tokens, DEFAULT_MAX_BATCH_TOKENS),
            max_running: or(e.max_running, DEFAULT_MAX_RUNNING),
            max_waiting: or(e.max_waiting, DEFAULT_MAX_WAITING),
            max_in_flight: stages.len(),
            num_blocks: spec.kv_blocks as usize,
            block_size: spec.block_size as usize,
            prefix_caching: !e.disable_prefix_caching,
            max_context: loaded.max_context,
            vocab_size: loaded.vocab_size,
        };
        tracing::info!(model = %spec.model, ?cfg, "engine started");
        let handle = EngineHandle::spawn(spec.model.clone(), cfg, Pipeline::new(stages, e.linked))?;
        engines.insert(spec.model.clone(), (spec.clone(), handle));
        Ok(())
    }
}

type StepStream = Pin<Box<dyn Stream<Item = Result<pb::StepResponse, Status>> + Send>>;
type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::EngineEvent, Status>> + Send>>;

/// Cancels a sequence when its client's stream goes away first.
struct CancelOnDrop {
    engine: EngineHandle,
    id: u64,
    done: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.done {
            self.engine.cancel(self.id);
        }
    }
}

fn engine_finish(f: Finish) -> pb::EngineFinish {
    match f {
        Finish::Done(FinishReason::Length) => pb::EngineFinish::Length,
        Finish::Done(FinishReason::Eos) => pb::EngineFinish::Eos,
        _ => pb::EngineFinish::Cancelled,
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn load_shard(
        &self,
        req: Request<pb::LoadShardRequest>,
    ) -> Result<Response<pb::LoadShardResponse>, Status> {
        llmos_tls::require(
            &req,
            self.tls.is_some(),
            "llmos.worker.v1.Worker/LoadShard",
            COORDINATOR,
        )?;
        let shard = req
            .into_inner()
            .shard
            .ok_or_else(|| status::invalid("LoadShardRequest.shard is required"))?;
        // Fencing: a command from an older placement than the one held
        // (a coordinator that lost leadership, a retry that arrived late)
        // changes nothing.
        if let Some(held) = self.held.epoch(&shard.model) {
            if shard.epoch != 0 && shard.epoch < held {
                return Err(status::stale_epoch(format!(
                    "model {:?} is held here under placement epoch {held}; this load is for the older epoch {}",
                    shard.model, shard.epoch
                )));
            }
        }
        // The host holds weights and cache; the engine part of the spec
        // (later stages' addresses, limits) only restarts the engine.
        let config = codec::shard_config(&shard)?;
        let shard = pb::ShardSpec {
            kv_blocks: config.kv_blocks as u32,
            block_size: config.block_size as u32,
            ..shard
        };
        let loaded = self.host.load(config).await?;
        self.start_engine(&shard, &loaded)?;
        self.held.lock().insert(shard.model.clone(), shard.epoch);
        Ok(Response::new(pb::LoadShardResponse {
            weight_bytes: loaded.weight_bytes,
            load_seconds: loaded.load_seconds,
            max_context: loaded.max_context as u32,
        }))
    }

    async fn unload_shard(
        &self,
        req: Request<pb::UnloadShardRequest>,
    ) -> Result<Response<pb::UnloadShardResponse>, Status> {
        llmos_tls::require(
            &req,
            self.tls.is_some(),
            "llmos.worker.v1.Worker/UnloadShard",
            COORDINATOR,
        )?;
        let r = req.into_inner();
        // Only the epoch asked for: a newer placement loaded since stays.
        if r.epoch != 0 && self.held.epoch(&r.model).is_some_and(|e| e != r.epoch) {
            return Ok(Response::new(pb::UnloadShardResponse {}));
        }
        self.engines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&r.model);
        self.held.lock().remove(&r.model);
        self.host.unload(r.model).await?;
        Ok(Response::new(pb::UnloadShardResponse {}))
    }

    type StepStream = StepStream;

    /// Answers each step in order; the first error ends the stream with its
    /// status.
    async fn step(
        &self,
        req: Request<Streaming<pb::StepRequest>>,
    ) -> Result<Response<Self::StepStream>, Status> {
        llmos_tls::require(
            &req,
            self.tls.is_some(),
            "llmos.worker.v1.Worker/Step",
            WORKER,
        )?;
        let mut inbound = req.into_inner();
        let host = self.host.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let r = match msg.map(codec::step) {
                    Ok(Ok(step)) => match host.step(step).await {
                        Ok(out) => Ok(codec::output_to_wire(&out)),
                        Err(e) => Err(Status::from(e)),
                    },
                    Ok(Err(e)) => Err(Status::from(e)),
                    Err(s) => Err(s),
                };
                let failed = r.is_err();
                if tx.send(r).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        req: Request<pb::EngineRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        llmos_tls::require(
            &req,
            self.tls.is_some(),
            "llmos.worker.v1.Worker/Generate",
            COORDINATOR,
        )?;
        let traceparent = req
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let r = req.into_inner();
        // The sequence's span: a child of the coordinator's attempt, the
        // parent of its steps on every stage.
        let span = tracing::info_span!("sequence", request_id = %r.request_id, model = %r.model, prompt_tokens = r.prompt.len() as i64);
        llmos_meta::logging::set_parent(&span, traceparent.as_deref());
        if r.epoch != 0 {
            if let Some(held) = self.held.epoch(&r.model).filter(|&e| e != r.epoch) {
                return Err(status::stale_epoch(format!(
                    "model {:?} is held here under placement epoch {held}, not {} (the cluster placed it anew)",
                    r.model, r.epoch
                )));
            }
        }
        let engine = self.engine(&r.model).ok_or_else(|| {
            status::not_found(format!(
                "model {:?} has no engine on this worker (it does not hold its first stage)",
                r.model
            ))
        })?;
        if r.prompt.is_empty() || r.max_new_tokens == 0 {
            return Err(status::invalid(
                "a request needs a prompt and max_new_tokens of at least 1",
            ));
        }
        let sampling = codec::sampling(&r.sampling.unwrap_or_default());
        sampling
            .validate()
            .map_err(|e| status::invalid(e.to_string()))?;
        let sub = Submission {
            request_id: r.request_id,
            params: SeqParams {
                prompt: r.prompt,
                max_new_tokens: r.max_new_tokens as usize,
                stop_ids: r.stop_token_ids,
                priority: r.priority,
                deadline: (r.timeout_ms > 0).then(|| {
                    std::time::Instant::now() + Duration::from_millis(r.timeout_ms as u64)
                }),
                first_index: r.first_token_index,
            },
            sampling,
            trace: llmos_meta::logging::traceparent(&span),
        };
        let (id, mut events) = engine.submit(sub).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let mut guard = CancelOnDrop {
                    engine,
                    id,
                    done: false,
                };
                loop {
                    let ev = tokio::select! {
                        _ = tx.closed() => break,
                        ev = events.recv() => match ev {
                            Some(ev) => ev,
                            None => {
                                // The engine ends every sequence with an event; a
                                // closed channel means it stopped.
                                guard.done = true;
                                break;
                            }
                        },
                    };
                    let (msg, last) =
                        match ev {
                            Ok(SeqEvent::Token {
                                id,
                                logprob,
                                top,
                                queued,
                            }) => (
                                Ok(pb::EngineEvent {
                                    tokens: vec![codec::sampled_to_wire(
                                        &crate::runtime::Sampled { id, logprob, top },
                                    )],
                                    queue_s: queued.map_or(0.0, |q| q.as_secs_f64()),
                                    ..Default::default()
                                }),
                                false,
                            ),
                            Ok(SeqEvent::Finished(f)) => (
                                Ok(pb::EngineEvent {
                                    tokens: vec![],
                                    finish: engine_finish(f.reason) as i32,
                                    prompt_tokens: f.prompt_tokens as u32,
                                    cached_prompt_tokens: f.cached_prompt_tokens as u32,
                                    preemptions: f.preemptions,
                                    queue_s: 0.0,
                                }),
                                true,
                            ),
                            Err(e) => (Err(Status::from(e)), true),
                        };
                    guard.done |= last;
                    if tx.send(msg).await.is_err() || last {
                        break;
                    }
                }
                // Dropping the guard cancels the sequence unless it ended.
                drop(guard);
            },
            span,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn stats(
        &self,
        req: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        llmos_tls::require(
            &req,
            self.tls.is_some(),
            "llmos.worker.v1.Worker/Stats",
            COORDINATOR,
        )?;
        let mut resp = codec::host_stats(&self.host.stats().await?);
        for shard in &mut resp.shards {
            let model = shard
                .shard
                .as_ref()
                .map(|s| s.model.clone())
                .unwrap_or_default();
            if let (Some(spec), Some(epoch)) = (shard.shard.as_mut(), self.held.epoch(&model)) {
                spec.epoch = epoch;
            }
            if let Some(e) = self.engine(&model) {
                shard.engine = Some(codec::engine_stats(&e.stats().await?));
            }
        }
        Ok(Response::new(resp))
    }
}

/// On mutual TLS, who may call what: the coordinators load, unload,
/// generate and read stats; only workers (an engine's first stage) step a
/// shard of a pipeline.
const COORDINATOR: &[llmos_tls::Role] = &[llmos_tls::Role::Coordinator];
const WORKER: &[llmos_tls::Role] = &[llmos_tls::Role::Worker];

/// How long, once shutdown has begun, the server waits for its open
/// requests and streams (an engine's step stream to a shard it still
/// holds stays open) before it stops anyway.
pub const FINISH_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// Serves the worker API on `listener` until `shutdown` completes, then
/// finishes the open requests for up to [`FINISH_GRACE`].
///
/// With `tls`, connections must complete a mutual-TLS handshake, and
/// each `Worker` call is checked against the caller's role (see
/// `COORDINATOR`, `WORKER`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    host: HostHandle,
    held: HeldShards,
    tls: Option<Arc<llmos_tls::Tls>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<WorkerServer<WorkerService>>()
        .await;
    let (reflection, reflection_v1alpha) = llmos_proto::reflection(&["llmos.worker.v1.Worker"])
        .map_err(|e| ServeError(e.to_string()))?;
    let (began, began_rx) = tokio::sync::oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            WorkerServer::new(WorkerService::new(host, held).with_tls(tls.clone()))
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
        );
    let signal = async move {
        shutdown.await;
        let _ = began.send(());
    };
    let server = async move {
        match tls {
            None => {
                router
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        signal,
                    )
                    .await
            }
            Some(tls) => {
                router
                    .serve_with_incoming_shutdown(
                        llmos_tls::server::incoming(listener, tls),
                        signal,
                    )
                    .await
            }
        }
    };
    let overdue = async move {
        match began_rx.await {
            Ok(()) => tokio::time::sleep(FINISH_GRACE).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        r = server => r.map_err(|e| ServeError(e.to_string())),
        () = overdue => {
            tracing::warn!(grace = ?FINISH_GRACE, "requests still open after shutdown began; stopping anyway");
            Ok(())
        }
    }
}

/// Serves like [`serve`] and, given a registration, registers with the
/// coordinators and heartbeats (reporting the shards held) while serving.
/// When `shutdown` completes, a registered worker with a drain timeout
/// first asks the coordinator to drain it and waits (serving meanwhile)
/// until it holds nothing or the timeout passes; then the server stops
/// accepting and finishes the requests it has.
pub async fn serve_registered(
    listener: tokio::net::TcpListener,
    host: HostHandle,
    registration: Option<register::Registration>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let tls = registration.as_ref().and_then(|r| r.tls.clone());
    serve_with_metrics(listener, None, host, registration, tls, shutdown).await
}

/// [`serve_registered`], its server on mutual TLS with `tls` (registered
/// or not), and Prometheus metrics (`crate::metrics`) at
/// `/metrics` on `metrics` when given.
pub async fn serve_with_metrics(
    listener: tokio::net::TcpListener,
    metrics: Option<tokio::net::TcpListener>,
    host: HostHandle,
    registration: Option<register::Registration>,
    tls: Option<Arc<llmos_tls::Tls>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let held = HeldShards::default();
    let metrics_server = metrics.map(|l| {
        let svc = Arc::new(WorkerService::new(host.clone(), held.clone()));
        tokio::spawn(serve_metrics(l, svc))
    });
    let heartbeats = registration
        .clone()
        .map(|r| tokio::spawn(register::registration_loop(r, held.clone())));
    let drained = {
        let held = held.clone();
        async move {
            shutdown.await;
            if let Some(r) = registration.filter(|r| !r.drain_timeout.is_zero()) {
                register::drain(&r, &held).await;
            }
        }
    };
    let r = serve(listener, host, held, tls, drained).await;
    if let Some(t) = heartbeats {
        t.abort();
    }
    if let Some(t) = metrics_server {
        t.abort();
    }
    r
}

/// `GET /metrics`: the collectors and what `Stats` reports, in the
/// Prometheus text format.
async fn serve_metrics(listener: tokio::net::TcpListener, svc: Arc<WorkerService>) {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let svc = svc.clone();
            async move {
                let mut text = crate::metrics::metrics().text();
                match svc.stats(Request::new(pb::StatsRequest {})).await {
                    Ok(r) => text.push_str(&crate::metrics::snapshot(r.get_ref())),
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics: the host's stats are unavailable")
                    }
                }
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the metrics server stopped");
    }
}

/// The server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[error("worker server: {0}")]
pub struct ServeError(String);
