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
use axum::routing::{MethodFilter, MethodRouter};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use llmos_proto::v1 as api;
use llmos_proto::v1::inference_server::Inference;
use serde_json::{json, Value};

use crate::auth::{Caller, Role};
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

/// Checks a body as `/v1/chat/completions` (`chat`) or `/v1/completions`
/// does (the fuzz target's entry): the choices it asks for, or the error
/// body a client would get.
#[doc(hidden)]
pub fn check_body(chat: bool, body: &[u8]) -> Result<usize, String> {
    let m = object(Ok(Bytes::copy_from_slice(body))).map_err(|e| e.body().to_string())?;
    let endpoint = if chat {
        Endpoint::Chat
    } else {
        Endpoint::Completions
    };
    let p = parse(endpoint, &m, &HeaderMap::new()).map_err(|e| e.body().to_string())?;
    Ok(p.choices.len())
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (health and liveness probes).
    Open,
    /// A key of at least this role (when keys are required).
    Key(Role),
    /// `/metrics`: a user key with `--metrics-need-key`, else open.
    Metrics,
}

struct Route {
    method: &'static str,
    path: &'static str,
    access: Access,
    handler: MethodRouter<Http>,
}

fn route<H, T>(method: &'static str, path: &'static str, access: Access, h: H) -> Route
where
    H: axum::handler::Handler<T, Http>,
    T: 'static,
{
    let m = axum::http::Method::from_bytes(method.as_bytes()).expect("a method name");
    let filter = MethodFilter::try_from(m).expect("a routable method");
    Route {
        method,
        path,
        access,
        handler: axum::routing::on(filter, h),
    }
}

/// Every route, with its access: the router is built from this list, so a
/// route cannot be served without saying who may call it.
fn routes() -> Vec<Route> {
    vec![
        route(
            "POST",
            "/v1/chat/completions",
            Access::Key(Role::User),
            chat,
        ),
        route(
            "POST",
            "/v1/completions",
            Access::Key(Role::User),
            completions,
        ),
        route("GET", "/v1/models", Access::Key(Role::User), models),
        route("GET", "/health", Access::Open, health),
        route("GET", "/live", Access::Open, || async { "ok" }),
        route("GET", "/metrics", Access::Metrics, metrics),
    ]
}

/// (method, path, access) of every route (tests enumerate them).
pub fn route_table() -> Vec<(&'static str, &'static str, Access)> {
    routes()
        .into_iter()
        .map(|r| (r.method, r.path, r.access))
        .collect()
}

/// The HTTP routes over `cluster`; bodies over `max_body_bytes` get 413.
pub fn router(cluster: Arc<Cluster>, max_body_bytes: usize) -> Router {
    let state = Http {
        inference: InferenceService {
            cluster: Arc::clone(&cluster),
        },
    };
    let mut router = Router::new();
    for r in routes() {
        let guard = axum::middleware::from_fn_with_state((Arc::clone(&cluster), r.access), require);
        router = router.route(r.path, r.handler.route_layer(guard));
    }
    router
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

/// Checks the `Authorization` header against the route's access; the
/// caller goes into the request's extensions.
async fn require(
    State((cluster, access)): State<(Arc<Cluster>, Access)>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let auth = &cluster.config.auth;
    let need = match access {
        Access::Open => return next.run(req).await,
        Access::Metrics if !auth.metrics_need_key => return next.run(req).await,
        Access::Metrics => Role::User,
        Access::Key(role) => role,
    };
    let value = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""));
    match crate::auth::check(auth, &cluster.read().api_keys, value, need) {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(denied) => {
            let unauthenticated = matches!(denied, crate::auth::Denied::Unauthenticated(_));
            let mut r = ApiError::from_status(&tonic::Status::from(denied)).into_response();
            if unauthenticated {
                r.headers_mut().insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static("Bearer"),
                );
            }
            r
        }
    }
}

/// Each choice (`n`, several prompts) is one generation, admitted on its
/// own: more than the key's `max_concurrent` could never all stream, so it
/// is refused before the first starts.
fn check_fanout(p: &request::Parsed) -> Result<(), ApiError> {
    let max = p.caller.as_ref().map_or(0, |c| c.limits.max_concurrent);
    if max > 0 && p.choices.len() > max as usize {
        return Err(ApiError::bad(
            "n",
            format!(
                "the request asks for {} choices (n times the prompts), but its API key streams at most {max} at once (max_concurrent)",
                p.choices.len()
            ),
        ));
    }
    Ok(())
}

/// Where a generation comes from: the caller's trace and key.
#[derive(Clone, Default)]
struct Origin {
    traceparent: Option<String>,
    caller: Option<Caller>,
}

impl request::Parsed {
    fn origin(&self) -> Origin {
        Origin {
            traceparent: self.traceparent.clone(),
            caller: self.caller.clone(),
        }
    }
}

/// `Generate`, the gRPC handler itself: the same checks, routing and
/// migration (and quota); an error before the first item is the HTTP
/// status.
async fn generate(
    state: &Http,
    req: &api::GenerateRequest,
    origin: &Origin,
) -> Result<GenerateStream, tonic::Status> {
    let mut request = tonic::Request::new(req.clone());
    if let Some(v) = origin.traceparent.as_deref().and_then(|t| t.parse().ok()) {
        request.metadata_mut().insert("traceparent", v);
    }
    if let Some(c) = &origin.caller {
        request.extensions_mut().insert(c.clone());
    }
    Ok(state.inference.generate(request).await?.into_inner())
}

async fn chat(
    State(state): State<Http>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let m = object(body)?;
    let mut p = parse(Endpoint::Chat, &m, &headers)?;
    p.caller = caller.map(|Extension(c)| c);
    check_fanout(&p)?;
    respond(state, p, Endpoint::Chat).await
}

async fn completions(
    State(state): State<Http>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let m = object(body)?;
    let mut p = parse(Endpoint::Completions, &m, &headers)?;
    p.caller = caller.map(|Extension(c)| c);
    check_fanout(&p)?;
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
