//! The OpenAI-compatible HTTP API: a thin translation onto the same
//! `Generate` the gRPC API serves (same validation, routing, migration and
//! errors). `POST /v1/chat/completions`, `POST /v1/completions`,
//! `GET /v1/models`, `GET /health` (some model can serve), `GET /live`.
//!
//! A field this server does not implement is refused with 400 naming it
//! (`param`), never ignored; so is an unknown field. Errors use OpenAI's
//! envelope `{"error": {"message", "type", "param", "code"}}` with the
//! status the gRPC code maps to (404 unknown model, 400 with
//! `context_length_exceeded`, 429 with `Retry-After` when the queue is
//! full, 503 when no replica serves, 504 past the deadline, 413 for a body
//! over the limit).
//!
//! `request` checks a body and builds the `GenerateRequest`; `response`
//! turns the `Generate` stream into OpenAI's objects and server-sent
//! events; `error` is the error envelope and the status mapping.

mod error;
mod request;
mod response;

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use llmos_proto::v1 as api;
use llmos_proto::v1::inference_server::Inference;
use serde_json::{json, Value};

use crate::cluster::Cluster;
use crate::inference::{GenerateStream, InferenceService};
use error::object;
pub use error::ApiError;
use request::{parse, Endpoint};
use response::{now_s, respond};

/// Metadata key of a refused request's machine-readable reason, where
/// OpenAI's API has a code for it.
pub const REQUEST_ERROR_KEY: &str = "llmos-request-error";
/// Its value for a prompt (plus max_tokens) over the model's context.
pub const CONTEXT_LENGTH_EXCEEDED: &str = "context-length-exceeded";
/// Metadata key naming the request field a refused request has wrong (the
/// wire's name: `logit_bias`, `max_new_tokens`, ...).
pub const REQUEST_FIELD_KEY: &str = "llmos-request-field";

#[derive(Clone)]
struct Http {
    inference: InferenceService,
}

/// The HTTP routes over `cluster`; bodies over `max_body_bytes` get 413.
pub fn router(cluster: Arc<Cluster>, max_body_bytes: usize) -> Router {
    let state = Http {
        inference: InferenceService { cluster },
    };
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/live", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "no such route",
                None,
                None,
            )
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// `Generate`, the gRPC handler itself: the same checks, routing and
/// migration; an error before the first item is the HTTP status.
async fn generate(
    state: &Http,
    req: &api::GenerateRequest,
    traceparent: Option<&str>,
) -> Result<GenerateStream, tonic::Status> {
    let mut request = tonic::Request::new(req.clone());
    if let Some(v) = traceparent.and_then(|t| t.parse().ok()) {
        request.metadata_mut().insert("traceparent", v);
    }
    Ok(state.inference.generate(request).await?.into_inner())
}

async fn chat(
    State(state): State<Http>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let m = object(body)?;
    let p = parse(Endpoint::Chat, &m, &headers)?;
    respond(state, p, Endpoint::Chat).await
}

async fn completions(
    State(state): State<Http>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let m = object(body)?;
    let p = parse(Endpoint::Completions, &m, &headers)?;
    respond(state, p, Endpoint::Completions).await
}

async fn models(State(state): State<Http>) -> Result<Json<Value>, ApiError> {
    let r = state
        .inference
        .list_models(tonic::Request::new(api::ListModelsRequest {}))
        .await
        .map_err(|s| ApiError::from_status(&s))?
        .into_inner();
    let created = now_s();
    Ok(Json(
        json!({"object": "list", "data": r.models.iter().map(|m| json!({
        "id": m.name, "object": "model", "created": created, "owned_by": "llmos",
        "max_model_len": m.max_context})).collect::<Vec<_>>()}),
    ))
}

/// 200 when some model has a replica serving, else 503 (a load balancer
/// sends nothing to a coordinator that could serve nothing).
async fn health(State(state): State<Http>) -> Response {
    let serving: Vec<String> = {
        let s = state.inference.cluster.read();
        s.models
            .iter()
            .filter(|(_, d)| d.serving().next().is_some())
            .map(|(n, _)| n.clone())
            .collect()
    };
    if serving.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "no model is serving"})),
        )
            .into_response()
    } else {
        Json(json!({"status": "ok", "serving": serving})).into_response()
    }
}

/// The Prometheus text exposition (`crate::metrics`).
async fn metrics(State(state): State<Http>) -> Response {
    let cluster = &state.inference.cluster;
    let text = cluster.metrics.render(cluster).await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
