//! `Generate`'s streams as OpenAI's objects: one response, or server-sent
//! events. A request of several choices (`n`, or several prompts) runs one
//! `Generate` per choice, merged here by `index`.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use llmos_proto::v1 as api;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use super::request::{Endpoint, Parsed};
use super::{generate, ApiError, Http};
use crate::inference::{finish_name as finish, GenerateStream};

pub(super) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One choice's response, tagged with its index.
type Tagged = (usize, Result<api::GenerateResponse, Status>);

/// Relays `stream` as choice `index` until it ends or nobody listens
/// (dropping it then cancels the sequence).
async fn forward(index: usize, mut stream: GenerateStream, tx: &mpsc::Sender<Tagged>) -> bool {
    loop {
        let item = tokio::select! {
            _ = tx.closed() => return false,
            item = stream.next() => item,
        };
        match item {
            Some(item) => {
                if tx.send((index, item)).await.is_err() {
                    return false;
                }
            }
            None => return true,
        }
    }
}

/// Starts every choice. The first choice of every prompt starts at once,
/// together (an error of one before any token is the response's status;
/// the others are then dropped, which cancels them); a prompt's other
/// choices start once its first has answered (its prompt's full KV blocks
/// are then in the prefix cache, and the router's prefix affinity sends
/// them to the replica holding them: `n` choices share the prompt's blocks
/// instead of computing them `n` times). Nothing starts once the client
/// has gone.
async fn start(state: &Http, p: &Parsed) -> Result<mpsc::Receiver<Tagged>, ApiError> {
    let (tx, rx) = mpsc::channel(64);
    let mut heads = tokio::task::JoinSet::new();
    for (first, req) in p.choices.iter().enumerate().step_by(p.n) {
        let (state, req, origin) = (state.clone(), req.clone(), p.origin());
        heads.spawn(async move { (first, generate(&state, &req, &origin).await) });
    }
    let mut streams = Vec::new();
    while let Some(done) = heads.join_next().await {
        let (first, r) = done.map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                e.to_string(),
                None,
                None,
            )
        })?;
        // Returning drops the set: the other heads are cancelled.
        streams.push((first, r.map_err(|s| ApiError::from_status(&s))?));
    }
    for (first, stream) in streams {
        let siblings: Vec<(usize, api::GenerateRequest)> = (first + 1..first + p.n)
            .map(|i| (i, p.choices[i].clone()))
            .collect();
        let (state, tx, origin) = (state.clone(), tx.clone(), p.origin());
        tokio::spawn(async move {
            let mut stream = stream;
            // Its first answer before the siblings start.
            let head = tokio::select! {
                _ = tx.closed() => return,
                head = stream.next() => head,
            };
            let Some(head) = head else { return };
            let ok = head.is_ok();
            if tx.send((first, head)).await.is_err() || !ok {
                return;
            }
            for (i, req) in siblings {
                let tx = tx.clone();
                let state = state.clone();
                let origin = origin.clone();
                tokio::spawn(async move {
                    // Dropping a pending Generate (the client left) cancels it.
                    let opened = tokio::select! {
                        _ = tx.closed() => return,
                        r = generate(&state, &req, &origin) => r,
                    };
                    match opened {
                        Ok(s) => {
                            forward(i, s, &tx).await;
                        }
                        Err(s) => {
                            let _ = tx.send((i, Err(s))).await;
                        }
                    }
                });
            }
            forward(first, stream, &tx).await;
        });
    }
    Ok(rx)
}

/// The text each choice starts with: its prompt's, when `echo` asks.
fn echo_texts(state: &Http, p: &Parsed) -> Result<Vec<String>, ApiError> {
    use api::generate_request::Prompt;
    if !p.echo {
        return Ok(vec![String::new(); p.choices.len()]);
    }
    let rt = state
        .inference
        .runtime(&p.model)
        .map_err(|e| ApiError::from_status(&Status::from(e)))?;
    p.choices
        .iter()
        .map(|c| match &c.prompt {
            Some(Prompt::Text(t)) => Ok(t.clone()),
            Some(Prompt::TokenIds(ids)) => rt
                .tokenizer
                .as_ref()
                .and_then(|t| t.decode(&ids.ids, false).ok())
                .ok_or_else(|| {
                    ApiError::bad("echo", "the model has no tokenizer to echo token ids with")
                }),
            _ => Ok(String::new()),
        })
        .collect()
}

/// What one choice has produced.
#[derive(Default)]
struct Choice {
    text: String,
    /// Characters before the next token's text (completions' text_offset).
    offset: usize,
    finish: Option<i32>,
    usage: Option<api::Usage>,
}

/// Log-probabilities of `tokens` in the endpoint's shape: chat's
/// `{"content": [...]}` entries, or completions' parallel lists;
/// `offset` is the text's length before them (advanced).
fn logprobs(kind: Endpoint, tokens: &[api::Token], offset: &mut usize) -> Value {
    match kind {
        Endpoint::Chat => json!({"content": tokens.iter().map(|t| json!({
            "token": t.text, "logprob": t.logprob.unwrap_or(0.0), "bytes": t.text.as_bytes(),
            "top_logprobs": t.top_logprobs.iter().map(|a| json!({
                "token": a.text, "logprob": a.logprob, "bytes": a.text.as_bytes()})).collect::<Vec<_>>()
        })).collect::<Vec<_>>()}),
        Endpoint::Completions => {
            let mut offsets = Vec::with_capacity(tokens.len());
            for t in tokens {
                offsets.push(*offset);
                *offset += t.text.chars().count();
            }
            json!({
                "tokens": tokens.iter().map(|t| t.text.as_str()).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| t.logprob.unwrap_or(0.0)).collect::<Vec<_>>(),
                "top_logprobs": tokens.iter().map(|t| {
                    let mut m = Map::new();
                    for a in &t.top_logprobs {
                        m.entry(a.text.clone()).or_insert(json!(a.logprob));
                    }
                    Value::Object(m)
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
    }
}

/// The request's usage: each prompt counted once (its first choice's
/// figures), the completion tokens of every choice.
fn usage(choices: &[Choice], n: usize) -> Value {
    let (mut prompt, mut cached, mut completion) = (0u32, 0u32, 0u32);
    for (i, c) in choices.iter().enumerate() {
        let u = c.usage.unwrap_or_default();
        if i % n == 0 {
            prompt += u.prompt_tokens;
            cached += u.cached_prompt_tokens;
        }
        completion += u.completion_tokens;
    }
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached}})
}

pub(super) async fn respond(state: Http, p: Parsed, kind: Endpoint) -> Result<Response, ApiError> {
    let echo = echo_texts(&state, &p)?;
    let mut rx = start(&state, &p).await?;
    let (id, object) = match kind {
        Endpoint::Chat => (format!("chatcmpl-{}", fresh_id()), "chat.completion"),
        Endpoint::Completions => (format!("cmpl-{}", fresh_id()), "text_completion"),
    };
    let created = now_s();
    if p.stream {
        return Ok(sse(rx, p, echo, kind, id, created).into_response());
    }
    let mut choices: Vec<Choice> = echo
        .into_iter()
        .map(|text| Choice {
            offset: text.chars().count(),
            text,
            ..Default::default()
        })
        .collect();
    let mut tokens: Vec<Vec<api::Token>> = vec![Vec::new(); choices.len()];
    while let Some((i, item)) = rx.recv().await {
        let r = item.map_err(|s| ApiError::from_status(&s))?;
        for t in &r.tokens {
            choices[i].text.push_str(&t.text);
        }
        tokens[i].extend(r.tokens);
        if r.finish_reason != 0 {
            choices[i].finish = Some(r.finish_reason);
            choices[i].usage = r.usage;
        }
    }
    if let Some(i) = choices.iter().position(|c| c.finish.is_none()) {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("choice {i}'s generation ended without a finish reason"),
            None,
            None,
        ));
    }
    let body: Vec<Value> = choices
        .iter_mut()
        .zip(&tokens)
        .enumerate()
        .map(|(i, (c, toks))| {
            let mut offset =
                c.text.chars().count() - toks.iter().map(|t| t.text.chars().count()).sum::<usize>();
            let lp = if p.logprobs.is_some() {
                logprobs(kind, toks, &mut offset)
            } else {
                Value::Null
            };
            let reason = finish(c.finish.unwrap_or_default());
            match kind {
                Endpoint::Chat => {
                    json!({"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": lp, "finish_reason": reason})
                }
                Endpoint::Completions => json!({"index": i, "text": c.text, "logprobs": lp,
                    "finish_reason": reason}),
            }
        })
        .collect();
    Ok(Json(
        json!({"id": id, "object": object, "created": created, "model": p.model,
        "system_fingerprint": Value::Null,
        "choices": body, "usage": usage(&choices, p.n)}),
    )
    .into_response())
}

/// Server-sent events: a chunk per response with text (for chat, each
/// choice's role first), each choice's finish reason, the usage chunk
/// (`choices: []`) when asked, then `[DONE]`. A failure mid-stream is sent
/// as an error event. Dropping the response (a client gone) closes the
/// channel, which drops every choice's `Generate` stream, which cancels
/// its sequence.
fn sse(
    mut rx: mpsc::Receiver<Tagged>,
    p: Parsed,
    echo: Vec<String>,
    kind: Endpoint,
    id: String,
    created: u64,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let object = match kind {
        Endpoint::Chat => "chat.completion.chunk",
        Endpoint::Completions => "text_completion",
    };
    let (model, include_usage, want_lp, n) = (p.model, p.include_usage, p.logprobs.is_some(), p.n);
    let chunk = move |choices: Value, usage: Option<Value>| {
        let mut c = json!({"id": id, "object": object, "created": created, "model": model,
            "system_fingerprint": Value::Null, "choices": choices});
        if include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        Event::default().data(c.to_string())
    };
    let (tx, out) = mpsc::channel::<Event>(16);
    tokio::spawn(async move {
        let mut choices: Vec<Choice> = echo
            .iter()
            .map(|e| Choice {
                offset: e.chars().count(),
                ..Default::default()
            })
            .collect();
        // Chat's role, or completions' echoed prompt, opens each choice.
        for (i, e) in echo.iter().enumerate() {
            let open = match kind {
                Endpoint::Chat => {
                    json!([{"index": i, "delta": {"role": "assistant", "content": ""},
                    "logprobs": Value::Null, "finish_reason": Value::Null}])
                }
                Endpoint::Completions if !e.is_empty() => json!([{"index": i, "text": e,
                    "logprobs": Value::Null, "finish_reason": Value::Null}]),
                Endpoint::Completions => continue,
            };
            if tx.send(chunk(open, None)).await.is_err() {
                return;
            }
        }
        loop {
            // A client that leaves ends this at once (dropping `rx` cancels
            // every choice), not at the next token.
            let next = tokio::select! {
                _ = tx.closed() => return,
                next = rx.recv() => next,
            };
            let Some((i, item)) = next else { break };
            let r = match item {
                Ok(r) => r,
                Err(s) => {
                    let _ = tx
                        .send(Event::default().data(ApiError::from_status(&s).body().to_string()))
                        .await;
                    return;
                }
            };
            let c = &mut choices[i];
            let text: String = r.tokens.iter().map(|t| t.text.as_str()).collect();
            if !text.is_empty() || (want_lp && !r.tokens.is_empty()) {
                let lp = if want_lp {
                    logprobs(kind, &r.tokens, &mut c.offset)
                } else {
                    Value::Null
                };
                let choice = match kind {
                    Endpoint::Chat => {
                        json!([{"index": i, "delta": {"content": text}, "logprobs": lp, "finish_reason": Value::Null}])
                    }
                    Endpoint::Completions => {
                        json!([{"index": i, "text": text, "logprobs": lp, "finish_reason": Value::Null}])
                    }
                };
                if tx.send(chunk(choice, None)).await.is_err() {
                    return;
                }
            }
            if r.finish_reason != 0 {
                c.finish = Some(r.finish_reason);
                c.usage = r.usage;
                let reason = finish(r.finish_reason);
                let choice = match kind {
                    Endpoint::Chat => {
                        json!([{"index": i, "delta": {}, "logprobs": Value::Null, "finish_reason": reason}])
                    }
                    Endpoint::Completions => {
                        json!([{"index": i, "text": "", "logprobs": Value::Null, "finish_reason": reason}])
                    }
                };
                if tx.send(chunk(choice, None)).await.is_err() {
                    return;
                }
            }
        }
        if let Some(i) = choices.iter().position(|c| c.finish.is_none()) {
            let e = ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("choice {i}'s generation ended without a finish reason"),
                None,
                None,
            );
            let _ = tx.send(Event::default().data(e.body().to_string())).await;
            return;
        }
        if include_usage
            && tx
                .send(chunk(json!([]), Some(usage(&choices, n))))
                .await
                .is_err()
        {
            return;
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out).map(Ok))
}

/// A response or request id: unique enough per coordinator (time and a
/// counter).
pub(super) fn fresh_id() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{nanos:x}{n:x}")
}
