//! `Generate`'s stream as OpenAI's objects: one response, or server-sent
//! events.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use llmos_proto::v1 as api;
use serde_json::{json, Value};
use tokio_stream::{Stream, StreamExt};

use super::request::{Endpoint, Parsed};
use super::{generate, ApiError, Http};
use crate::inference::{finish_name as finish, GenerateStream};

fn usage(u: Option<api::Usage>) -> Value {
    let u = u.unwrap_or_default();
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}})
}

pub(super) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn token_logprob(t: &api::Token) -> Value {
    json!({"token": t.text, "logprob": t.logprob.unwrap_or(0.0),
        "bytes": t.text.as_bytes(), "top_logprobs": []})
}

pub(super) async fn respond(state: Http, p: Parsed, kind: Endpoint) -> Result<Response, ApiError> {
    let stream = generate(&state, &p).await?;
    let (id, object) = match kind {
        Endpoint::Chat => (format!("chatcmpl-{}", uuid_like()), "chat.completion"),
        Endpoint::Completions => (format!("cmpl-{}", uuid_like()), "text_completion"),
    };
    let created = now_s();
    if p.stream {
        return Ok(sse(stream, p, kind, id, created).into_response());
    }
    let mut stream = stream;
    let (mut text, mut lps, mut last) = (String::new(), Vec::new(), None);
    while let Some(item) = stream.next().await {
        let r = item.map_err(|s| ApiError::from_status(&s))?;
        for t in &r.tokens {
            text.push_str(&t.text);
            if p.generate.logprobs {
                lps.push(token_logprob(t));
            }
        }
        if r.finish_reason != 0 {
            last = Some(r);
        }
    }
    let last = last.ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the generation ended without a finish reason",
            None,
            None,
        )
    })?;
    let logprobs = if p.generate.logprobs {
        json!({"content": lps})
    } else {
        Value::Null
    };
    let choice = match kind {
        Endpoint::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
            "logprobs": logprobs, "finish_reason": finish(last.finish_reason)}),
        Endpoint::Completions => json!({"index": 0, "text": text, "logprobs": Value::Null,
            "finish_reason": finish(last.finish_reason)}),
    };
    Ok(Json(
        json!({"id": id, "object": object, "created": created, "model": p.generate.model,
        "system_fingerprint": Value::Null,
        "choices": [choice], "usage": usage(last.usage)}),
    )
    .into_response())
}

/// Server-sent events: a chunk per response with text (the role first, for
/// chat), the finish reason, the usage chunk (`choices: []`) when asked,
/// then `[DONE]`. A failure mid-stream is sent as an error event. Dropping
/// the response (a client gone) drops the `Generate` stream, which
/// cancels the sequence.
fn sse(
    mut stream: GenerateStream,
    p: Parsed,
    kind: Endpoint,
    id: String,
    created: u64,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let object = match kind {
        Endpoint::Chat => "chat.completion.chunk",
        Endpoint::Completions => "text_completion",
    };
    let (model, include_usage, logprobs) = (p.generate.model, p.include_usage, p.generate.logprobs);
    let chunk = move |choices: Value, usage: Option<Value>| {
        let mut c = json!({"id": id, "object": object, "created": created, "model": model,
            "system_fingerprint": Value::Null, "choices": choices});
        if include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        Event::default().data(c.to_string())
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(16);
    tokio::spawn(async move {
        if let Endpoint::Chat = kind {
            let first = json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                "logprobs": Value::Null, "finish_reason": Value::Null}]);
            if tx.send(chunk(first, None)).await.is_err() {
                return;
            }
        }
        while let Some(item) = stream.next().await {
            let r = match item {
                Ok(r) => r,
                Err(s) => {
                    let _ = tx
                        .send(Event::default().data(ApiError::from_status(&s).body().to_string()))
                        .await;
                    return;
                }
            };
            let text: String = r.tokens.iter().map(|t| t.text.as_str()).collect();
            if !text.is_empty() || (logprobs && !r.tokens.is_empty()) {
                let lp = if logprobs {
                    json!({"content": r.tokens.iter().map(token_logprob).collect::<Vec<_>>()})
                } else {
                    Value::Null
                };
                let choice = match kind {
                    Endpoint::Chat => {
                        json!([{"index": 0, "delta": {"content": text}, "logprobs": lp, "finish_reason": Value::Null}])
                    }
                    Endpoint::Completions => {
                        json!([{"index": 0, "text": text, "logprobs": Value::Null, "finish_reason": Value::Null}])
                    }
                };
                if tx.send(chunk(choice, None)).await.is_err() {
                    return;
                }
            }
            if r.finish_reason != 0 {
                let reason = finish(r.finish_reason);
                let choice = match kind {
                    Endpoint::Chat => {
                        json!([{"index": 0, "delta": {}, "logprobs": Value::Null, "finish_reason": reason}])
                    }
                    Endpoint::Completions => {
                        json!([{"index": 0, "text": "", "logprobs": Value::Null, "finish_reason": reason}])
                    }
                };
                if tx.send(chunk(choice, None)).await.is_err() {
                    return;
                }
                if include_usage
                    && tx
                        .send(chunk(json!([]), Some(usage(r.usage))))
                        .await
                        .is_err()
                {
                    return;
                }
                break;
            }
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok))
}

/// A response id: unique enough per coordinator (time and a counter).
fn uuid_like() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{nanos:x}{n:x}")
}
