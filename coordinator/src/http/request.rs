//! A request body checked against what this server implements, and the
//! `GenerateRequest` it asks for.

use axum::http::HeaderMap;
use llmos_proto::v1 as api;
use serde_json::{json, Map, Value};

use super::ApiError;

/// The two generating endpoints: what they accept, and the shape of what
/// they answer.
#[derive(Clone, Copy)]
pub(super) enum Endpoint {
    Chat,
    Completions,
}

/// Fields both endpoints take.
const SHARED: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "user",
    // Extension (as vLLM's): keep generating past EOS, for benchmarks.
    "ignore_eos",
];

impl Endpoint {
    /// Whether the endpoint takes `field` (perhaps only to refuse a value).
    fn takes(&self, field: &str) -> bool {
        let own: &[&str] = match self {
            Endpoint::Chat => &["messages", "max_completion_tokens", "top_logprobs"],
            Endpoint::Completions => &["prompt", "echo", "suffix"],
        };
        SHARED.contains(&field) || own.contains(&field)
    }
}

/// What a request asks for, checked.
pub(super) struct Parsed {
    pub generate: api::GenerateRequest,
    pub stream: bool,
    pub include_usage: bool,
}

fn number(m: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(v) => Err(ApiError::bad(
            key,
            format!("{key} must be a number, got {v}"),
        )),
    }
}

fn uint(m: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::bad(
                key,
                format!("{key} must be a non-negative integer, got {v}"),
            )
        }),
    }
}

fn boolean(m: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::bad(
            key,
            format!("{key} must be true or false, got {v}"),
        )),
    }
}

/// Refuses `key` when present with another value than its neutral one.
fn unsupported(
    m: &Map<String, Value>,
    key: &str,
    neutral: &[Value],
    what: &str,
) -> Result<(), ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(()),
        Some(v) if neutral.contains(v) => Ok(()),
        Some(v) => Err(ApiError::bad(
            key,
            format!("{key} = {v} is not supported by this server yet ({what})"),
        )),
    }
}

fn text_content(v: &Value, at: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (i, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => {
                        return Err(ApiError::bad(
                            &format!("{at}[{i}]"),
                            format!("{at}[{i}]: only text content parts ({{\"type\": \"text\", \"text\": ...}}) are supported"),
                        ))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(ApiError::bad(
            at,
            format!("{at} must be a string or a list of text parts"),
        )),
    }
}

pub(super) fn parse(
    endpoint: Endpoint,
    m: &Map<String, Value>,
    headers: &HeaderMap,
) -> Result<Parsed, ApiError> {
    for k in m.keys() {
        if !endpoint.takes(k) {
            return Err(ApiError::bad(k, format!("unknown field {k:?}")));
        }
    }
    let model = match m.get("model") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            return Err(ApiError::bad(
                "model",
                "model is required (a deployed model's name)",
            ))
        }
    };
    unsupported(m, "n", &[json!(1)], "one choice per request")?;
    unsupported(m, "min_p", &[json!(0), json!(0.0)], "no min-p sampling")?;
    for p in ["presence_penalty", "frequency_penalty"] {
        unsupported(
            m,
            p,
            &[json!(0), json!(0.0)],
            "no penalties in the samplers",
        )?;
    }
    unsupported(
        m,
        "repetition_penalty",
        &[json!(1), json!(1.0)],
        "no penalties in the samplers",
    )?;
    unsupported(
        m,
        "logit_bias",
        &[json!({})],
        "no logit bias in the samplers",
    )?;
    let prompt = match endpoint {
        Endpoint::Chat => {
            unsupported(
                m,
                "top_logprobs",
                &[json!(0)],
                "only the chosen token's log-probability",
            )?;
            let Some(Value::Array(msgs)) = m.get("messages") else {
                return Err(ApiError::bad(
                    "messages",
                    "messages must be a list of {role, content}",
                ));
            };
            if msgs.is_empty() {
                return Err(ApiError::bad("messages", "messages is empty"));
            }
            let mut messages = Vec::new();
            for (i, msg) in msgs.iter().enumerate() {
                let role = msg.get("role").and_then(Value::as_str).unwrap_or_default();
                if !matches!(role, "system" | "user" | "assistant") {
                    return Err(ApiError::bad(
                        &format!("messages[{i}].role"),
                        format!(
                            "messages[{i}].role must be system, user or assistant, got {role:?}"
                        ),
                    ));
                }
                let content = text_content(
                    msg.get("content").unwrap_or(&Value::Null),
                    &format!("messages[{i}].content"),
                )?;
                messages.push(api::ChatMessage {
                    role: role.into(),
                    content,
                });
            }
            api::generate_request::Prompt::Chat(api::ChatMessages { messages })
        }
        Endpoint::Completions => {
            unsupported(m, "echo", &[json!(false)], "the prompt is not echoed")?;
            unsupported(m, "suffix", &[json!("")], "no insertion")?;
            unsupported(
                m,
                "logprobs",
                &[json!(0)],
                "use the chat endpoint's logprobs",
            )?;
            match m.get("prompt") {
                Some(Value::String(s)) => api::generate_request::Prompt::Text(s.clone()),
                Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                    api::generate_request::Prompt::Text(a[0].as_str().unwrap_or_default().into())
                }
                Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => {
                    api::generate_request::Prompt::TokenIds(api::TokenIds {
                        ids: a.iter().filter_map(Value::as_u64).map(|i| i as u32).collect(),
                    })
                }
                Some(Value::Array(a)) if a.len() > 1 && a.iter().all(Value::is_string) => {
                    return Err(ApiError::bad(
                        "prompt",
                        "a list of several prompts is not supported by this server yet (send one request per prompt)",
                    ))
                }
                _ => {
                    return Err(ApiError::bad(
                        "prompt",
                        "prompt must be a string, a list of one string, or a list of token ids",
                    ))
                }
            }
        }
    };
    let max_tokens = match (uint(m, "max_completion_tokens")?, uint(m, "max_tokens")?) {
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => 0,
    };
    if max_tokens == 0 && (m.contains_key("max_tokens") || m.contains_key("max_completion_tokens"))
    {
        let p = if m.contains_key("max_completion_tokens") {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        return Err(ApiError::bad(p, format!("{p} must be at least 1")));
    }
    let stop = match m.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect(),
        Some(v) => {
            return Err(ApiError::bad(
                "stop",
                format!("stop must be a string or a list of strings, got {v}"),
            ))
        }
    };
    let stream = boolean(m, "stream")?;
    let include_usage = match m.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => {
            for k in o.keys() {
                if k != "include_usage" {
                    return Err(ApiError::bad(
                        &format!("stream_options.{k}"),
                        format!("unknown field stream_options.{k}"),
                    ));
                }
            }
            boolean(o, "include_usage")?
        }
        Some(v) => {
            return Err(ApiError::bad(
                "stream_options",
                format!("stream_options must be an object, got {v}"),
            ))
        }
    };
    let logprobs = match endpoint {
        Endpoint::Chat => boolean(m, "logprobs")?,
        Endpoint::Completions => false,
    };
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let generate = api::GenerateRequest {
        model,
        prompt: Some(prompt),
        sampling: Some(api::SamplingParams {
            temperature: number(m, "temperature")?.unwrap_or(1.0) as f32,
            top_k: uint(m, "top_k")?.unwrap_or(0) as u32,
            top_p: number(m, "top_p")?.unwrap_or(1.0) as f32,
            seed: uint(m, "seed")?,
        }),
        stopping: Some(api::StoppingCriteria {
            max_new_tokens: max_tokens.min(u32::MAX as u64) as u32,
            stop_sequences: stop,
            ignore_eos: boolean(m, "ignore_eos")?,
        }),
        logprobs,
        request_id,
        ..Default::default()
    };
    Ok(Parsed {
        generate,
        stream,
        include_usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<Parsed, ApiError> {
        parse(Endpoint::Chat, body.as_object().unwrap(), &HeaderMap::new())
    }

    fn param(e: ApiError) -> Option<String> {
        e.body()["error"]["param"].as_str().map(str::to_string)
    }

    #[test]
    fn a_chat_request_becomes_the_generate_request() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "abc".parse().unwrap());
        let p = parse(
            Endpoint::Chat,
            json!({"model": "m", "messages": [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
                "max_completion_tokens": 5, "max_tokens": 9, "temperature": 0.5, "seed": 3,
                "stop": "x", "stream": true, "stream_options": {"include_usage": true},
                "logprobs": true, "n": 1, "presence_penalty": 0})
            .as_object()
            .unwrap(),
            &h,
        )
        .unwrap();
        assert!(p.stream && p.include_usage && p.generate.logprobs);
        let g = p.generate;
        assert_eq!(g.request_id, "abc");
        assert_eq!(g.stopping.as_ref().unwrap().max_new_tokens, 5);
        assert_eq!(g.stopping.unwrap().stop_sequences, vec!["x".to_string()]);
        assert_eq!(g.sampling.unwrap().seed, Some(3));
        let Some(api::generate_request::Prompt::Chat(c)) = g.prompt else {
            panic!("chat prompt")
        };
        assert_eq!(c.messages[1].content, "hi there");
    }

    #[test]
    fn what_is_not_implemented_or_unknown_is_refused_by_name() {
        let base = || json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (key, value) in [
            ("n", json!(2)),
            ("presence_penalty", json!(0.5)),
            ("frequency_penalty", json!(1)),
            ("repetition_penalty", json!(1.2)),
            ("logit_bias", json!({"1": 5})),
            ("top_logprobs", json!(3)),
            ("min_p", json!(0.1)),
            ("frobnicate", json!(true)),
        ] {
            let mut b = base();
            b[key] = value;
            let e = chat(b).err().unwrap_or_else(|| panic!("{key} accepted"));
            assert_eq!(param(e).as_deref(), Some(key));
        }
        let mut b = base();
        b["messages"][0]["role"] = json!("tool");
        assert_eq!(
            param(chat(b).err().unwrap()).as_deref(),
            Some("messages[0].role")
        );
        let mut b = base();
        b["max_tokens"] = json!(0);
        assert_eq!(param(chat(b).err().unwrap()).as_deref(), Some("max_tokens"));
        let e = parse(
            Endpoint::Completions,
            json!({"model": "m", "prompt": ["a", "b"]})
                .as_object()
                .unwrap(),
            &HeaderMap::new(),
        )
        .err()
        .unwrap();
        assert_eq!(param(e).as_deref(), Some("prompt"));
        let ok = parse(
            Endpoint::Completions,
            json!({"model": "m", "prompt": [1, 2, 3], "echo": false})
                .as_object()
                .unwrap(),
            &HeaderMap::new(),
        )
        .unwrap();
        assert!(matches!(
            ok.generate.prompt,
            Some(api::generate_request::Prompt::TokenIds(ref t)) if t.ids == [1, 2, 3]
        ));
    }
}
