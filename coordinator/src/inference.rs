//! The public `Inference` API: prompts are tokenized and checked here, then
//! queued with the model's serving engine (on the worker holding its first
//! stage), whose token stream is turned into text here. A client that goes
//! away drops the engine stream, which cancels the sequence and frees its
//! KV blocks on every stage.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use llmos_meta::request::SamplingParams;
use llmos_meta::{render_chat, ChatMessage, FinishReason, TextStreamer};
use llmos_proto::v1 as api;
use llmos_proto::worker::v1 as wk;
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::cluster::{Cluster, ModelRuntime};
use crate::error::{CoordError, Result};
use crate::router::{block_hashes, InFlight};
use crate::state::Replica;

#[derive(Clone)]
pub struct InferenceService {
    pub cluster: Arc<Cluster>,
}

/// What `Generate` answers: the response stream (also what the HTTP API
/// translates).
pub(crate) type GenerateStream =
    Pin<Box<dyn Stream<Item = Result<api::GenerateResponse, Status>> + Send>>;

impl InferenceService {
    /// The model's tokenizer and config, once a replica serves it.
    pub(crate) fn runtime(&self, model: &str) -> Result<Arc<ModelRuntime>> {
        let state = self.cluster.read();
        let dep = state
            .models
            .get(model)
            .ok_or_else(|| CoordError::UnknownModel(model.to_string()))?;
        if dep.serving().next().is_none() {
            return Err(CoordError::ModelNotReady {
                model: model.to_string(),
                state: if dep.reason.is_empty() {
                    format!("{:?}", dep.state)
                } else {
                    format!("{:?} ({})", dep.state, dep.reason)
                },
            });
        }
        self.cluster
            .model(model)
            .ok_or_else(|| CoordError::UnknownModel(model.to_string()))
    }

    /// Opens the sequence's token stream on the engine of a replica and
    /// waits for its first event.
    async fn open_engine(
        &self,
        replica: &Replica,
        req: wk::EngineRequest,
    ) -> Result<(String, wk::EngineEvent, tonic::Streaming<wk::EngineEvent>)> {
        let worker = replica
            .engine_worker()
            .ok_or_else(|| CoordError::Invalid("a replica without stages".into()))?
            .to_string();
        let address = self
            .cluster
            .read()
            .workers
            .get(&worker)
            .map(|w| w.address.clone())
            .unwrap_or_default();
        let mut client = self.cluster.worker(&worker).await?;
        // This attempt's span is the parent of the worker's `sequence`.
        let span = tracing::info_span!(
            "attempt",
            replica = replica.id as i64,
            worker = %worker,
            epoch = req.epoch as i64,
            first_token_index = req.first_token_index as i64
        );
        let mut req = tonic::Request::new(req);
        if let Some(tp) = llmos_meta::logging::traceparent(&span) {
            if let Ok(v) = tp.parse() {
                req.metadata_mut().insert("traceparent", v);
            }
        }
        let answer =
            tokio::time::timeout(self.cluster.config.connect_timeout, client.generate(req))
                .instrument(span)
                .await
                .map_err(|_| CoordError::WorkerUnavailable {
                    worker: worker.clone(),
                    address: address.clone(),
                    reason: "no answer to Generate".into(),
                })?;
        let mut events = match answer {
            Ok(stream) => stream.into_inner(),
            Err(status) => return Err(stage_error(&worker, &address, status, &self.cluster)),
        };
        match events.message().await {
            Ok(Some(first)) => Ok((worker, first, events)),
            Ok(None) => Err(CoordError::WorkerUnavailable {
                worker,
                address,
                reason: "its token stream ended before the first token".into(),
            }),
            Err(status) => Err(stage_error(&worker, &address, status, &self.cluster)),
        }
    }

    /// Routes the request to a serving replica (`crate::router`); a replica
    /// that fails or refuses before the first token is left for another,
    /// the client seeing nothing of it. When every replica failed, the
    /// client gets RESOURCE_EXHAUSTED (with the engine's retry hint) if one
    /// of them was full, else the last failure.
    async fn route(&self, mut req: wk::EngineRequest, avoid: &[u64]) -> Result<Attached> {
        let model = req.model.clone();
        let model = model.as_str();
        let router = &self.cluster.router;
        let round_robin = self.cluster.round_robin();
        let mut tried: Vec<u64> = avoid.to_vec();
        let mut full: Option<CoordError> = None;
        let mut last: Option<CoordError> = None;
        let block_size = self
            .cluster
            .read()
            .models
            .get(model)
            .ok_or_else(|| CoordError::UnknownModel(model.to_string()))?
            .serving
            .block_size;
        let hashes = block_hashes(&req.prompt, block_size as usize);
        loop {
            let state = self.cluster.read();
            let dep = state
                .models
                .get(model)
                .ok_or_else(|| CoordError::UnknownModel(model.to_string()))?;
            let epochs: Vec<u64> = dep
                .serving()
                .map(|r| r.epoch)
                .filter(|e| !tried.contains(e))
                .collect();
            let Some(choice) = router.choose(model, &epochs, &hashes, round_robin) else {
                return Err(full.or(last).unwrap_or_else(|| CoordError::ModelNotReady {
                    model: model.to_string(),
                    state: "no replica serves".into(),
                }));
            };
            let replica = dep.at_epoch(choice.epoch).expect("chosen among them");
            let workers: Vec<String> = replica.shards().map(|(_, _, w)| w.to_string()).collect();
            let guard = router.start(model, choice, &hashes);
            req.epoch = choice.epoch;
            let e = match self.open_engine(replica, req.clone()).await {
                Ok((worker, first, events)) => {
                    let address = self
                        .cluster
                        .read()
                        .workers
                        .get(&worker)
                        .map(|w| w.address.clone())
                        .unwrap_or_default();
                    return Ok(Attached {
                        worker,
                        address,
                        epoch: choice.epoch,
                        workers,
                        first: Some(first),
                        events,
                        _in_flight: guard,
                    });
                }
                Err(e) => e,
            };
            use tonic::Code;
            // Down, full, or no longer holding this replica (moved,
            // removed): another replica may serve it. Bad input and
            // deadlines would fail anywhere.
            let code = match &e {
                CoordError::WorkerUnavailable { .. } => Code::Unavailable,
                CoordError::WorkerFailed { status, .. } => status.code(),
                _ => return Err(e),
            };
            if !matches!(
                code,
                Code::Unavailable
                    | Code::ResourceExhausted
                    | Code::FailedPrecondition
                    | Code::NotFound
            ) {
                return Err(e);
            }
            tracing::info!(model, replica = replica.id, error = %e, "a replica failed before the first token: trying another");
            tried.push(choice.epoch);
            if code == Code::ResourceExhausted {
                full = Some(e);
            } else {
                last = Some(e);
            }
        }
    }
}

/// A sequence's token stream on one replica's engine.
struct Attached {
    /// The engine's worker and its address.
    worker: String,
    address: String,
    /// The replica's placement epoch and every worker it runs on.
    epoch: u64,
    workers: Vec<String>,
    /// The first event, read while routing.
    first: Option<wk::EngineEvent>,
    events: tonic::Streaming<wk::EngineEvent>,
    _in_flight: InFlight,
}

/// What ended a stream on one replica.
enum Broke {
    /// The client went away (the sequence is cancelled by dropping the
    /// engine stream).
    ClientGone,
    /// The replica failed: the sequence may resume elsewhere.
    Replica(CoordError),
    /// A failure another replica would meet too, or the end: already sent.
    Ended,
}

/// A request in flight: what it takes to resume it on another replica.
struct Flight {
    svc: InferenceService,
    /// The request as first routed (its prompt: the client's).
    request: wk::EngineRequest,
    /// Tokens streamed to the client so far.
    emitted: Vec<u32>,
    deadline: Option<Instant>,
    migrations: u32,
    /// Each replica failure met, for the error that gives up.
    attempts: Vec<String>,
    /// Seconds the sequence waited in the queue of the replica that first
    /// served it (reported with its first token).
    queue_s: Option<f64>,
}

/// How often a stream waiting for its next token checks that every worker
/// of its replica is still alive (the leader marks one unhealthy when its
/// heartbeats stop: a frozen or partitioned worker answers no error).
const LIVENESS_CHECK: std::time::Duration = std::time::Duration::from_millis(250);
/// How often a resumed request looks again for a serving replica.
const RESUME_POLL: std::time::Duration = std::time::Duration::from_millis(100);

impl Flight {
    /// The engine request that continues the sequence after `emitted`.
    fn continuation(&self) -> wk::EngineRequest {
        let mut r = self.request.clone();
        r.prompt.extend_from_slice(&self.emitted);
        r.max_new_tokens -= self.emitted.len() as u32;
        r.first_token_index = self.emitted.len() as u64;
        r.timeout_ms = self.deadline.map_or(0, |d| {
            d.saturating_duration_since(Instant::now())
                .as_millis()
                .clamp(1, u32::MAX as u128) as u32
        });
        r
    }

    /// Routes the request for the first time.
    async fn attach(&self) -> Result<Attached> {
        self.svc.route(self.continuation(), &[]).await
    }

    /// Resumes the sequence on a serving replica, avoiding `avoid` while
    /// another serves; waits (within the request's deadline and the
    /// coordinator's migration timeout) for one to serve: a lost stage
    /// replaced, a full queue drained.
    async fn resume_avoiding(&mut self, avoid: Option<u64>) -> Result<Attached> {
        let c = self.svc.cluster.clone();
        let until = [
            Some(Instant::now() + c.config.migration_timeout),
            self.deadline,
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("one is set");
        let mut avoid: Vec<u64> = avoid.into_iter().collect();
        let mut avoided_since = Instant::now();
        loop {
            let e = match self.svc.route(self.continuation(), &avoid).await {
                Ok(a) => return Ok(a),
                Err(e) => e,
            };
            match &e {
                CoordError::WorkerUnavailable { .. } => self.note(&e),
                CoordError::WorkerFailed { status, .. } if resumable(status) => self.note(&e),
                CoordError::WorkerFailed { status, .. }
                    if status.code() == tonic::Code::ResourceExhausted => {}
                CoordError::ModelNotReady { .. } => {}
                _ => return Err(e),
            }
            if Instant::now() >= until {
                return Err(self.give_up(&format!(
                    "no replica served it within {:?} (the migration timeout, --migration-timeout-s, or the request's deadline): {e}",
                    c.config.migration_timeout
                )));
            }
            // The replica avoided may serve again (a stage that came back,
            // or replaced under the same placement): after a while, it is
            // a candidate again.
            if !avoid.is_empty() && avoided_since.elapsed() > std::time::Duration::from_secs(1) {
                avoid.clear();
                avoided_since = Instant::now();
            }
            tokio::time::sleep(RESUME_POLL).await;
        }
    }

    /// Records a failure for the error that may end the request (once).
    fn note(&mut self, e: &CoordError) {
        let e = e.to_string();
        if !self.attempts.contains(&e) {
            self.attempts.push(e);
        }
    }

    /// A client's resume after its coordinator was lost: a migration.
    async fn resume(&mut self) -> Result<Attached> {
        self.resume_avoiding(None).await
    }

    fn give_up(&self, why: &str) -> CoordError {
        CoordError::NotResumed {
            request_id: self.request.request_id.clone(),
            tokens: self.emitted.len(),
            why: why.to_string(),
            attempts: self.attempts.clone(),
        }
    }

    /// Streams the sequence to the client, moving it to another replica
    /// each time the one serving it fails, until it finishes, fails for
    /// good or the client goes away.
    async fn stream(
        mut self,
        mut on: Attached,
        streamer: &mut TextStreamer<'_>,
        tx: &mpsc::Sender<Result<api::GenerateResponse, Status>>,
        logprobs: bool,
        started: Instant,
    ) -> usize {
        let mut first_at = None;
        loop {
            let e = match self
                .relay(&mut on, streamer, tx, logprobs, started, &mut first_at)
                .await
            {
                Broke::ClientGone | Broke::Ended => return self.emitted.len(),
                Broke::Replica(e) => e,
            };
            let failed_epoch = on.epoch;
            // Which of its workers failed is not always said (a broken
            // pipeline link names none): the leader checks each at once.
            for w in &on.workers {
                self.svc.cluster.suspect(w);
            }
            // Dropping the stream cancels what may remain of the sequence
            // there: a replica that comes back cannot continue it twice.
            drop(on);
            tracing::warn!(
                request_id = %self.request.request_id,
                tokens = self.emitted.len(),
                error = %e,
                "the replica serving the request failed mid-stream: resuming it on another"
            );
            self.note(&e);
            let limit = self.svc.cluster.config.migration_limit;
            let next = if self.migrations >= limit {
                Err(self.give_up(&format!(
                    "the migration limit ({limit}, --migration-limit) is spent"
                )))
            } else {
                self.migrations += 1;
                self.svc.cluster.count_migration();
                self.resume_avoiding(Some(failed_epoch)).await
            };
            on = match next {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(request_id = %self.request.request_id, error = %e, "not resumed");
                    let _ = tx.send(Err(Status::from(e))).await;
                    return self.emitted.len();
                }
            };
        }
    }

    /// Relays one replica's events until the sequence ends or the replica
    /// fails.
    async fn relay(
        &mut self,
        on: &mut Attached,
        streamer: &mut TextStreamer<'_>,
        tx: &mpsc::Sender<Result<api::GenerateResponse, Status>>,
        logprobs: bool,
        started: Instant,
        first_at: &mut Option<Instant>,
    ) -> Broke {
        let cluster = self.svc.cluster.clone();
        let mut check = tokio::time::interval(LIVENESS_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A client that goes away cancels at once, not at the next token.
            let next = match on.first.take() {
                Some(ev) => Ok(Some(ev)),
                None => tokio::select! {
                    _ = tx.closed() => {
                        tracing::info!(request_id = %self.request.request_id, "client went away: cancelling");
                        return Broke::ClientGone;
                    }
                    _ = check.tick() => {
                        if let Some(why) = dead_worker(&cluster, &on.workers) {
                            return Broke::Replica(CoordError::WorkerUnavailable {
                                worker: on.worker.clone(),
                                address: on.address.clone(),
                                reason: why,
                            });
                        }
                        continue;
                    }
                    next = on.events.message() => next,
                },
            };
            let ev = match next {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    return Broke::Replica(CoordError::WorkerUnavailable {
                        worker: on.worker.clone(),
                        address: on.address.clone(),
                        reason: "its token stream ended early".into(),
                    })
                }
                Err(status) => {
                    let e = stage_error(&on.worker, &on.address, status, &cluster);
                    let again = match &e {
                        CoordError::WorkerUnavailable { .. } => true,
                        CoordError::WorkerFailed { status, .. } => resumable(status),
                        _ => false,
                    };
                    if again {
                        return Broke::Replica(e);
                    }
                    tracing::warn!(request_id = %self.request.request_id, error = %e, "generation failed");
                    let _ = tx.send(Err(Status::from(e))).await;
                    return Broke::Ended;
                }
            };
            if ev.queue_s > 0.0 && self.queue_s.is_none() {
                self.queue_s = Some(ev.queue_s);
                // Recorded now: requests that then fail or are abandoned
                // (the longest waits, under overload) count too.
                cluster.metrics.queue_time(&self.request.model, ev.queue_s);
            }
            for t in &ev.tokens {
                first_at.get_or_insert_with(Instant::now);
                self.emitted.push(t.id);
                let produced = self.emitted.len() as u32;
                let (text, finish) = match streamer.push(t.id) {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return Broke::Ended;
                    }
                };
                let top_logprobs = match (logprobs, streamer.tokenizer()) {
                    (false, _) => Vec::new(),
                    (true, tok) => t
                        .top
                        .iter()
                        .map(|a| api::TopLogprob {
                            id: a.id,
                            text: tok
                                .and_then(|k| k.decode(&[a.id], false).ok())
                                .unwrap_or_default(),
                            logprob: a.logprob,
                        })
                        .collect(),
                };
                let token = api::Token {
                    id: t.id,
                    text,
                    logprob: logprobs.then_some(t.logprob),
                    top_logprobs,
                };
                let mut msg = api::GenerateResponse {
                    request_id: self.request.request_id.clone(),
                    tokens: vec![token],
                    ..Default::default()
                };
                if let Some(f) = finish {
                    let first = first_at.expect("set above");
                    let decode_s = first.elapsed().as_secs_f64();
                    let prompt_tokens = self.request.prompt.len() as u32;
                    msg.finish_reason = finish_code(f) as i32;
                    msg.usage = Some(api::Usage {
                        prompt_tokens,
                        completion_tokens: produced,
                        total_tokens: prompt_tokens + produced,
                        // Known at the engine's last event; the streamer
                        // may finish first (a stop sequence).
                        cached_prompt_tokens: 0,
                        preemptions: 0,
                        migrations: self.migrations,
                    });
                    msg.timings = Some(api::Timings {
                        time_to_first_token_s: (first - started).as_secs_f64(),
                        decode_s,
                        decode_tokens_per_s: if decode_s > 0.0 {
                            (produced - 1) as f64 / decode_s
                        } else {
                            0.0
                        },
                        queue_s: self.queue_s.unwrap_or(0.0),
                    });
                    if finish != Some(FinishReason::Stop) {
                        // The engine ended too: its last event has the
                        // prefix-cache and preemption figures.
                        if let Ok(Some(last)) = on.events.message().await {
                            if let Some(u) = msg.usage.as_mut() {
                                u.cached_prompt_tokens = last.cached_prompt_tokens;
                                u.preemptions = last.preemptions;
                            }
                        }
                    }
                }
                if tx.send(Ok(msg)).await.is_err() {
                    tracing::info!(request_id = %self.request.request_id, "client went away: cancelling");
                    return Broke::ClientGone;
                }
                if finish.is_some() {
                    return Broke::Ended;
                }
            }
            if ev.finish != wk::EngineFinish::Unspecified as i32 {
                // The engine finished without a token the streamer
                // finished on (cannot happen for length or EOS).
                let _ = tx
                    .send(Err(Status::internal(format!(
                        "the engine ended the sequence ({:?}) before the stream did",
                        wk::EngineFinish::try_from(ev.finish)
                    ))))
                    .await;
                return Broke::Ended;
            }
        }
    }
}

/// Whether a worker's answer means its replica failed (the sequence can
/// continue on another): a stage unreachable or stopped, the model moved
/// or unloaded there. Bad input, the request's deadline and internal
/// errors would fail anywhere.
fn resumable(status: &Status) -> bool {
    use llmos_meta::failure::{FailureKind, FAILURE_KEY};
    let kind = status
        .metadata()
        .get(FAILURE_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(FailureKind::parse);
    match kind {
        Some(FailureKind::StageUnavailable | FailureKind::StaleEpoch | FailureKind::NotFound) => {
            true
        }
        Some(_) => false,
        None => matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
    }
}

/// Why the replica on `workers` cannot go on, if one of them is unhealthy
/// (its heartbeats stopped) or gone.
fn dead_worker(cluster: &Cluster, workers: &[String]) -> Option<String> {
    let state = cluster.read();
    workers.iter().find_map(|id| match state.workers.get(id) {
        None => Some(format!("worker {id} of its replica left the cluster")),
        Some(w) if w.gone || !w.healthy => Some(format!(
            "worker {id} of its replica stopped answering (no heartbeat for {:?})",
            cluster.config.heartbeat_timeout
        )),
        Some(_) => None,
    })
}

/// A worker's status as the client should see it: transport failures (no
/// failure kind in the metadata: the worker did not answer) are
/// UNAVAILABLE naming the worker; the engine's own answers (queue full with
/// its retry hint, deadline, bad input, a stage behind it unavailable) keep
/// their code and metadata.
fn stage_error(worker: &str, address: &str, status: Status, cluster: &Cluster) -> CoordError {
    let answered = status
        .metadata()
        .contains_key(llmos_meta::failure::FAILURE_KEY);
    if !answered
        && matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        )
    {
        cluster.forget_client(address);
        cluster.suspect(worker);
        return CoordError::WorkerUnavailable {
            worker: worker.to_string(),
            address: address.to_string(),
            reason: status.message().to_string(),
        };
    }
    // A stage behind the engine it names could not be reached.
    if let Some(failed) = status
        .metadata()
        .get(llmos_meta::failure::FAILED_WORKER_KEY)
        .and_then(|v| v.to_str().ok())
    {
        cluster.suspect(failed);
    }
    CoordError::WorkerFailed {
        worker: worker.to_string(),
        status,
    }
}

/// The gRPC deadline of a request (`grpc-timeout`), if any.
fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => std::time::Duration::from_secs(n * 3600),
        "M" => std::time::Duration::from_secs(n * 60),
        "S" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_millis(n),
        "u" => std::time::Duration::from_micros(n),
        "n" => std::time::Duration::from_nanos(n),
        _ => return None,
    })
}

/// The request's sampling parameters as the project's one type (the
/// seed is set by the caller: the request's, or one made from its id).
pub(crate) fn sampling_params(s: &api::SamplingParams, top_logprobs: u32) -> SamplingParams {
    let mut logit_bias: Vec<(u32, f32)> = s.logit_bias.iter().map(|(&id, &b)| (id, b)).collect();
    logit_bias.sort_unstable_by_key(|e| e.0);
    SamplingParams {
        min_p: s.min_p,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        repetition_penalty: if s.repetition_penalty == 0.0 {
            1.0
        } else {
            s.repetition_penalty
        },
        logit_bias,
        top_logprobs,
        ..SamplingParams::from_wire(s.temperature, s.top_k, s.top_p, s.seed.unwrap_or(0))
    }
}

/// The worker's wire form of sampling parameters.
fn worker_sampling(p: &SamplingParams) -> wk::Sampling {
    wk::Sampling {
        temperature: p.temperature,
        top_k: p.top_k.min(u32::MAX as usize) as u32,
        top_p: p.top_p,
        seed: p.seed,
        min_p: p.min_p,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        repetition_penalty: p.repetition_penalty,
        logit_bias: p
            .logit_bias
            .iter()
            .map(|&(id, bias)| wk::TokenBias { id, bias })
            .collect(),
        top_logprobs: p.top_logprobs,
    }
}

/// Token ids of a prompt, checked against the vocabulary.
fn prompt_ids(
    rt: &ModelRuntime,
    model: &str,
    prompt: Option<api::generate_request::Prompt>,
) -> Result<Vec<u32>> {
    use api::generate_request::Prompt;
    let tok = || {
        rt.tokenizer.as_ref().ok_or_else(|| {
            CoordError::Invalid(format!("model {model} has no tokenizer: send token ids"))
        })
    };
    let ids = match prompt {
        None => return Err(CoordError::Invalid("the request has no prompt".into())),
        Some(Prompt::TokenIds(t)) => t.ids,
        Some(Prompt::Text(text)) => tok()?.encode(&text, true)?,
        Some(Prompt::Chat(c)) => {
            let t = tok()?;
            let template = t.chat_template.as_deref().ok_or_else(|| {
                CoordError::Invalid(format!("model {model} has no chat template"))
            })?;
            let messages: Vec<ChatMessage> = c
                .messages
                .into_iter()
                .map(|m| ChatMessage::new(m.role, m.content))
                .collect();
            t.encode(
                &render_chat(template, &messages, true, &t.bos_token(), &t.eos_token())?,
                false,
            )?
        }
    };
    llmos_meta::request::check_prompt(&ids, rt.config.vocab_size)?;
    Ok(ids)
}

/// The engine's priority (1 low, 2 normal, 3 high) of a request asking
/// `asked` (the wire's enum) with a key capped at `cap` (0: no cap): a
/// request above its key's ceiling is served at the ceiling, not refused.
fn engine_priority(asked: i32, cap: u32) -> i32 {
    let p = match api::Priority::try_from(asked).unwrap_or_default() {
        api::Priority::Unspecified | api::Priority::Normal => 2,
        api::Priority::Low => 1,
        api::Priority::High => 3,
    };
    if cap > 0 {
        p.min(cap as i32)
    } else {
        p
    }
}

fn finish_code(f: FinishReason) -> api::FinishReason {
    match f {
        FinishReason::Length => api::FinishReason::Length,
        FinishReason::Eos => api::FinishReason::Eos,
        FinishReason::Stop => api::FinishReason::Stop,
        FinishReason::Cancelled => api::FinishReason::Cancelled,
    }
}

/// A wire finish reason as OpenAI and vLLM name it (`stop`, `length`;
/// `abort` for a cancelled sequence).
pub(crate) fn finish_name(code: i32) -> &'static str {
    match api::FinishReason::try_from(code) {
        Ok(api::FinishReason::Length) => "length",
        Ok(api::FinishReason::Cancelled) => "abort",
        _ => "stop",
    }
}

#[tonic::async_trait]
impl api::inference_server::Inference for InferenceService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        req: Request<api::GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let deadline = grpc_timeout(req.metadata());
        let header = |key: &str| {
            req.metadata()
                .get(key)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let (traceparent, header_id) = (header("traceparent"), header("x-request-id"));
        // Who asks (put there by the auth interceptor; none with auth off).
        let caller = req.extensions().get::<crate::auth::Caller>().cloned();
        let mut r = req.into_inner();
        if r.request_id.is_empty() {
            // `x-request-id` names the request when the body does not.
            r.request_id = header_id.unwrap_or_default();
        }
        let rt = self.runtime(&r.model)?;
        let ids = prompt_ids(&rt, &r.model, r.prompt)?;
        let stopping = r.stopping.unwrap_or_default();
        llmos_meta::request::check_stop_sequences(&stopping.stop_sequences)
            .map_err(CoordError::from)?;
        let max_new = match stopping.max_new_tokens as usize {
            0 => self
                .cluster
                .default_max_new_tokens()
                .min(rt.config.max_position.saturating_sub(ids.len())),
            n => n,
        };
        llmos_meta::request::check_generation(ids.len(), max_new, rt.config.max_position)
            .map_err(CoordError::from)?;
        let s = r.sampling.unwrap_or_default();
        if r.top_logprobs > 0 && !r.logprobs {
            return Err(Status::invalid_argument(
                "top_logprobs needs logprobs: set logprobs to true",
            ));
        }
        let mut params = sampling_params(&s, r.top_logprobs);
        params
            .validate_for(rt.config.vocab_size)
            .map_err(CoordError::from)?;
        let had_id = !r.request_id.is_empty();
        let request_id = if r.request_id.is_empty() {
            // Unique per process (a counter), so two requests in one
            // millisecond do not share an id, nor the seed made from it.
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("req-{}-{}-{n}", self.cluster.now_ms(), std::process::id())
        } else {
            r.request_id
        };
        params.seed = s
            .seed
            .unwrap_or_else(|| llmos_meta::hash::fnv1a(request_id.as_bytes()));
        let sampling = worker_sampling(&params);
        // The engine stops at EOS and the token budget; stop sequences are
        // text, found by the streamer here (which then drops the stream,
        // cancelling the sequence).
        let stop_token_ids = match (&rt.tokenizer, stopping.ignore_eos) {
            (Some(t), false) => t.eos_token_ids.clone(),
            _ => Vec::new(),
        };
        let priority = engine_priority(
            r.priority,
            caller.as_ref().map_or(0, |c| c.limits.priority_max),
        );
        let timeout = [
            (r.timeout_ms > 0).then(|| std::time::Duration::from_millis(r.timeout_ms as u64)),
            deadline,
        ]
        .into_iter()
        .flatten()
        .min();
        let started = Instant::now();
        // The request's span: a child of the caller's (`traceparent`), the
        // parent of each attempt on a replica.
        let span = tracing::info_span!("generate", request_id = %request_id, model = %r.model);
        llmos_meta::logging::set_parent(&span, traceparent.as_deref());
        let resumed = r.resume.map(|x| x.received_token_ids).unwrap_or_default();
        if !resumed.is_empty() {
            if !had_id {
                return Err(Status::invalid_argument(
                    "resume needs the request_id of the stream it continues (the first response carried it)",
                ));
            }
            if resumed.len() >= max_new {
                return Err(Status::invalid_argument(format!(
                    "resume lists {} received tokens, but the request generates at most {max_new} (max_new_tokens): nothing is left to resume",
                    resumed.len()
                )));
            }
            llmos_meta::request::check_prompt(&resumed, rt.config.vocab_size)
                .map_err(|e| Status::invalid_argument(format!("resume: {e}")))?;
        }
        let request = wk::EngineRequest {
            model: r.model.clone(),
            request_id: request_id.clone(),
            prompt: ids,
            sampling: Some(sampling),
            max_new_tokens: max_new as u32,
            stop_token_ids,
            priority,
            timeout_ms: 0,
            epoch: 0,
            first_token_index: 0,
        };
        let mut flight = Flight {
            svc: InferenceService {
                cluster: self.cluster.clone(),
            },
            request,
            emitted: Vec::new(),
            deadline: timeout.map(|t| started + t),
            migrations: 0,
            attempts: Vec::new(),
            queue_s: None,
        };
        // The text of what a lost stream sent is rebuilt, not sent again:
        // the streamer's held-back text (an incomplete character, a
        // possible stop sequence) is then what it was.
        let mut streamer = TextStreamer::new(
            rt.tokenizer.as_ref(),
            max_new,
            stopping.stop_sequences.clone(),
            stopping.ignore_eos,
        );
        let mut done = None;
        for &t in &resumed {
            flight.emitted.push(t);
            if let (_, Some(f)) = streamer.push(t).map_err(CoordError::from)? {
                done = Some(f);
                break;
            }
        }
        if !resumed.is_empty() {
            flight.migrations = 1;
        }
        let (tx, rx) = mpsc::channel(16);
        let observer = self.cluster.metrics.request(&flight.request.model, started);
        if let Some(f) = done {
            // Every token was sent; only the last message was lost.
            let produced = flight.emitted.len() as u32;
            let prompt_tokens = flight.request.prompt.len() as u32;
            let _ = tx.try_send(Ok(api::GenerateResponse {
                request_id,
                finish_reason: finish_code(f) as i32,
                usage: Some(api::Usage {
                    prompt_tokens,
                    completion_tokens: produced,
                    total_tokens: prompt_tokens + produced,
                    migrations: flight.migrations,
                    ..Default::default()
                }),
                ..Default::default()
            }));
            return Ok(Response::new(Box::pin(crate::metrics::observe(
                ReceiverStream::new(rx),
                observer,
            ))));
        }
        // The tenant pays its prompt and token budget now, before the
        // request queues; the unused part comes back when it ends.
        let prompt_len = flight.request.prompt.len() as u64;
        if caller.is_none() && self.cluster.config.auth.required {
            // Every public entry checks the key first: a caller missing
            // here is a bug, and must not mean "no quota".
            return Err(Status::internal(
                "the request reached Generate without a checked API key",
            ));
        }
        let mut charge = match caller.as_ref().filter(|c| !c.tenant.is_empty()) {
            None => None,
            Some(c) => {
                // A resume's received tokens are prefilled again: charged
                // with the prompt (the budget counts them as generated).
                let cost = prompt_len + max_new as u64;
                match self.cluster.quotas.admit(c, cost, Instant::now()) {
                    Ok(charge) => {
                        self.cluster.metrics.tenant_admitted(&c.tenant);
                        Some((c.tenant.clone(), charge))
                    }
                    Err(refusal) => {
                        self.cluster
                            .metrics
                            .tenant_refused(&c.tenant, refusal.reason());
                        tracing::info!(tenant = %c.tenant, key = %c.key_id, reason = refusal.reason(), "request refused by quota");
                        return Err(refusal.status(&c.tenant));
                    }
                }
            }
        };
        let attached = if resumed.is_empty() {
            flight.attach().instrument(span.clone()).await?
        } else {
            flight.resume().instrument(span.clone()).await?
        };
        let logprobs = r.logprobs;
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                // The streamer borrows the tokenizer: it lives in this task.
                let mut streamer = TextStreamer::new(
                    rt.tokenizer.as_ref(),
                    max_new,
                    stopping.stop_sequences,
                    stopping.ignore_eos,
                );
                for &t in &flight.emitted {
                    let _ = streamer.push(t);
                }
                let metrics = Arc::clone(&flight.svc.cluster.metrics);
                let emitted = flight
                    .stream(attached, &mut streamer, &tx, logprobs, started)
                    .await;
                if let Some((tenant, charge)) = charge.as_mut() {
                    charge.used(prompt_len + emitted as u64);
                    let generated = emitted.saturating_sub(resumed.len()) as u64;
                    metrics.tenant_tokens(tenant, prompt_len + resumed.len() as u64, generated);
                }
                drop(charge);
            },
            span,
        ));
        Ok(Response::new(Box::pin(crate::metrics::observe(
            ReceiverStream::new(rx),
            observer,
        ))))
    }

    async fn tokenize(
        &self,
        req: Request<api::TokenizeRequest>,
    ) -> Result<Response<api::TokenizeResponse>, Status> {
        let r = req.into_inner();
        let rt = self.runtime(&r.model)?;
        let tok = rt
            .tokenizer
            .as_ref()
            .ok_or_else(|| CoordError::Invalid(format!("model {} has no tokenizer", r.model)))?;
        let ids = match r.input {
            Some(api::tokenize_request::Input::Text(t)) => tok
                .encode(&t, r.add_special_tokens)
                .map_err(CoordError::from)?,
            Some(api::tokenize_request::Input::Chat(c)) => {
                prompt_ids(&rt, &r.model, Some(api::generate_request::Prompt::Chat(c)))?
            }
            None => return Err(Status::invalid_argument("the request has no input")),
        };
        let tokens = ids.iter().map(|&i| tok.token_text(i)).collect();
        Ok(Response::new(api::TokenizeResponse { ids, tokens }))
    }

    async fn list_models(
        &self,
        _req: Request<api::ListModelsRequest>,
    ) -> Result<Response<api::ListModelsResponse>, Status> {
        let state = self.cluster.read();
        let models = state
            .models
            .values()
            .filter_map(|m| {
                let rt = self.cluster.model(&m.name)?;
                Some(api::ModelInfo {
                    name: m.name.clone(),
                    architecture: format!("{:?}", rt.config.arch),
                    num_layers: rt.config.num_layers as u32,
                    vocab_size: rt.config.vocab_size as u32,
                    max_context: rt.config.max_position as u32,
                    dtype: m.dtype.clone(),
                    quantization: if m.quantization.is_empty() {
                        "none".into()
                    } else {
                        m.quantization.clone()
                    },
                })
            })
            .collect();
        Ok(Response::new(api::ListModelsResponse { models }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keys_priority_cap_lowers_what_a_request_asks() {
        let (low, normal, high) = (
            api::Priority::Low as i32,
            api::Priority::Normal as i32,
            api::Priority::High as i32,
        );
        assert_eq!(engine_priority(high, 0), 3);
        assert_eq!(engine_priority(high, 2), 2);
        assert_eq!(engine_priority(normal, 1), 1);
        assert_eq!(engine_priority(low, 3), 1);
        assert_eq!(engine_priority(api::Priority::Unspecified as i32, 0), 2);
        // An unknown value on the wire is normal, then capped.
        assert_eq!(engine_priority(99, 1), 1);
    }
}
