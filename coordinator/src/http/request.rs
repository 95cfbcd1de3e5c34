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

/// The most choices one request may ask for (`n`).
pub(super) const MAX_N: u64 = 16;
/// The most prompts one completions request may list.
pub(super) const MAX_PROMPTS: usize = 64;
/// The most choices (prompts times `n`) one request may ask for.
pub(super) const MAX_CHOICES: usize = 64;
/// The most alternatives completions' `logprobs` may ask for.
pub(super) const MAX_COMPLETION_LOGPROBS: u64 = 20;

/// What a request asks for, checked.
pub(super) struct Parsed {
    /// One per choice, by `index`: prompt `i`'s `n` choices are `i * n ..
    /// i * n + n`. Choice `j` of a prompt draws with the request's seed
    /// plus `j` (its own request id's seed when none is given).
    pub choices: Vec<api::GenerateRequest>,
    pub n: usize,
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    /// Report log-probabilities (with this many alternatives per token).
    pub logprobs: Option<u32>,
    /// Completions: start each choice's text with its prompt.
    pub echo: bool,
    /// The caller's W3C `traceparent` header: each choice's `generate`
    /// span is its child.
    pub traceparent: Option<String>,
    /// Who asks (the API key checked by the router's middleware).
    pub caller: Option<crate::auth::Caller>,
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

/// A non-negative integer that fits 32 bits.
fn uint32(m: &Map<String, Value>, key: &str) -> Result<Option<u32>, ApiError> {
    match uint(m, key)? {
        None => Ok(None),
        Some(v) => u32::try_from(v)
            .map(Some)
            .map_err(|_| ApiError::bad(key, format!("{key} must be below 2^32, got {v}"))),
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
    let n = uint(m, "n")?.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::bad(
            "n",
            format!("n must be between 1 and {MAX_N}, got {n}"),
        ));
    }
    let penalty = |key: &str, neutral: f64| -> Result<f32, ApiError> {
        Ok(number(m, key)?.unwrap_or(neutral) as f32)
    };
    let logit_bias = match m.get("logit_bias") {
        None | Some(Value::Null) => Default::default(),
        Some(Value::Object(o)) => {
            let mut out = std::collections::HashMap::new();
            for (k, v) in o {
                let id: u32 = k.parse().map_err(|_| {
                    ApiError::bad(
                        "logit_bias",
                        format!("logit_bias keys must be token ids, got {k:?}"),
                    )
                })?;
                let b = v.as_f64().ok_or_else(|| {
                    ApiError::bad(
                        "logit_bias",
                        format!("logit_bias[{k:?}] must be a number, got {v}"),
                    )
                })?;
                out.insert(id, b as f32);
            }
            out
        }
        Some(v) => {
            return Err(ApiError::bad(
                "logit_bias",
                format!("logit_bias must be an object of token id to bias, got {v}"),
            ))
        }
    };
    let (prompts, logprobs, echo) = match endpoint {
        Endpoint::Chat => {
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
            let top = uint32(m, "top_logprobs")?;
            let logprobs = boolean(m, "logprobs")?;
            if top.is_some_and(|t| t > 0) && !logprobs {
                return Err(ApiError::bad(
                    "top_logprobs",
                    "top_logprobs needs logprobs: true",
                ));
            }
            let prompt = api::generate_request::Prompt::Chat(api::ChatMessages { messages });
            (vec![prompt], logprobs.then(|| top.unwrap_or(0)), false)
        }
        Endpoint::Completions => {
            unsupported(m, "suffix", &[json!("")], "no insertion")?;
            let logprobs = uint(m, "logprobs")?;
            if let Some(k) = logprobs.filter(|&k| k > MAX_COMPLETION_LOGPROBS) {
                return Err(ApiError::bad(
                    "logprobs",
                    format!("logprobs must be at most {MAX_COMPLETION_LOGPROBS}, got {k}"),
                ));
            }
            let echo = boolean(m, "echo")?;
            if echo && logprobs.is_some() {
                return Err(ApiError::bad(
                    "echo",
                    "echo with logprobs asks for the prompt's log-probabilities, which this server does not compute yet",
                ));
            }
            use api::generate_request::Prompt;
            // Token ids: each a u32 (a larger number is no token id).
            let ids = |a: &[Value]| -> Option<Prompt> {
                let ids: Option<Vec<u32>> = a
                    .iter()
                    .map(|v| v.as_u64().and_then(|i| u32::try_from(i).ok()))
                    .collect();
                ids.filter(|ids| !ids.is_empty())
                    .map(|ids| Prompt::TokenIds(api::TokenIds { ids }))
            };
            let prompts = match m.get("prompt") {
                Some(Value::String(s)) => vec![Prompt::Text(s.clone())],
                Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_string) => a
                    .iter()
                    .map(|s| Prompt::Text(s.as_str().unwrap_or_default().into()))
                    .collect(),
                Some(Value::Array(a)) if ids(a).is_some() => ids(a).into_iter().collect(),
                Some(Value::Array(a))
                    if !a.is_empty() && a.iter().all(|p| p.as_array().is_some_and(|p| ids(p).is_some())) =>
                {
                    a.iter()
                        .filter_map(|p| p.as_array().and_then(|p| ids(p)))
                        .collect()
                }
                _ => {
                    return Err(ApiError::bad(
                        "prompt",
                        "prompt must be a string, a list of strings, a list of token ids, or a list of such lists",
                    ))
                }
            };
            if prompts.len() > MAX_PROMPTS {
                return Err(ApiError::bad(
                    "prompt",
                    format!(
                        "at most {MAX_PROMPTS} prompts per request, got {}",
                        prompts.len()
                    ),
                ));
            }
            (prompts, logprobs.map(|k| k as u32), echo)
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
    let header_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let seed = uint(m, "seed")?;
    let sampling = api::SamplingParams {
        temperature: number(m, "temperature")?.unwrap_or(1.0) as f32,
        top_k: uint32(m, "top_k")?.unwrap_or(0),
        top_p: number(m, "top_p")?.unwrap_or(1.0) as f32,
        seed,
        min_p: penalty("min_p", 0.0)?,
        presence_penalty: penalty("presence_penalty", 0.0)?,
        frequency_penalty: penalty("frequency_penalty", 0.0)?,
        repetition_penalty: penalty("repetition_penalty", 1.0)?,
        logit_bias,
    };
    if sampling.repetition_penalty <= 0.0 {
        // 0 on the wire means "none"; over HTTP it is a bad value.
        return Err(ApiError::bad(
            "repetition_penalty",
            format!(
                "repetition_penalty must be in (0, 10], got {}",
                sampling.repetition_penalty
            ),
        ));
    }
    // The checks `Generate` makes too, here first so the error names the
    // field.
    if let Err(e) = crate::inference::sampling_params(&sampling, logprobs.unwrap_or(0)).validate() {
        // Completions name the alternatives' count `logprobs`.
        let field = match e.field() {
            Some("top_logprobs") if !matches!(endpoint, Endpoint::Chat) => "logprobs",
            f => f.unwrap_or(""),
        };
        return Err(ApiError::bad(field, e.to_string()));
    }
    let stopping = api::StoppingCriteria {
        max_new_tokens: max_tokens.min(u32::MAX as u64) as u32,
        stop_sequences: stop,
        ignore_eos: boolean(m, "ignore_eos")?,
    };
    let count = prompts.len() * n as usize;
    if count > MAX_CHOICES {
        let param = if prompts.len() > 1 { "prompt" } else { "n" };
        return Err(ApiError::bad(
            param,
            format!(
                "{} prompt(s) times n = {n} asks for {count} choices; at most {MAX_CHOICES} per request",
                prompts.len()
            ),
        ));
    }
    // Each choice its own request id (and so its own seed when none is
    // given): the header's, or one made here, with the choice's index.
    let base_id = match (header_id.is_empty(), count) {
        (false, 1) | (true, 1) => None,
        (false, _) => Some(header_id.clone()),
        (true, _) => Some(super::response::fresh_id()),
    };
    let mut choices = Vec::with_capacity(count);
    for prompt in prompts {
        for j in 0..n {
            let index = choices.len();
            choices.push(api::GenerateRequest {
                model: model.clone(),
                prompt: Some(prompt.clone()),
                sampling: Some(api::SamplingParams {
                    seed: seed.map(|s| s.wrapping_add(j)),
                    ..sampling.clone()
                }),
                stopping: Some(stopping.clone()),
                logprobs: logprobs.is_some(),
                top_logprobs: logprobs.unwrap_or(0),
                request_id: base_id
                    .as_ref()
                    .map_or_else(|| header_id.clone(), |b| format!("{b}-{index}")),
                ..Default::default()
            });
        }
    }
    Ok(Parsed {
        choices,
        n: n as usize,
        model,
        stream,
        include_usage,
        logprobs,
        echo,
        traceparent: headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        caller: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<Parsed, ApiError> {
        parse(Endpoint::Chat, body.as_object().unwrap(), &HeaderMap::new())
    }

    fn completions(body: Value) -> Result<Parsed, ApiError> {
        parse(
            Endpoint::Completions,
            body.as_object().unwrap(),
            &HeaderMap::new(),
        )
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
                "logprobs": true, "top_logprobs": 4, "n": 1, "presence_penalty": 0.5,
                "frequency_penalty": -1, "repetition_penalty": 1.2, "min_p": 0.05,
                "logit_bias": {"17": -100, "3": 2.5}})
            .as_object()
            .unwrap(),
            &h,
        )
        .unwrap();
        assert!(p.stream && p.include_usage && p.logprobs == Some(4));
        assert_eq!(p.choices.len(), 1);
        let g = p.choices.into_iter().next().unwrap();
        assert!(g.logprobs && g.top_logprobs == 4);
        assert_eq!(g.request_id, "abc");
        assert_eq!(g.stopping.as_ref().unwrap().max_new_tokens, 5);
        assert_eq!(g.stopping.unwrap().stop_sequences, vec!["x".to_string()]);
        let s = g.sampling.unwrap();
        assert_eq!(s.seed, Some(3));
        assert_eq!(
            (
                s.presence_penalty,
                s.frequency_penalty,
                s.repetition_penalty,
                s.min_p
            ),
            (0.5, -1.0, 1.2, 0.05)
        );
        assert_eq!(s.logit_bias.get(&17), Some(&-100.0));
        assert_eq!(s.logit_bias.get(&3), Some(&2.5));
        let Some(api::generate_request::Prompt::Chat(c)) = g.prompt else {
            panic!("chat prompt")
        };
        assert_eq!(c.messages[1].content, "hi there");
    }

    /// `n` choices per prompt, prompt-major; choice j draws with seed + j
    /// and each has its own request id.
    #[test]
    fn choices_are_prompts_times_n() {
        let p = completions(
            json!({"model": "m", "prompt": ["a", "b"], "n": 3, "seed": 10,
            "logprobs": 2, "echo": false}),
        )
        .unwrap();
        assert_eq!((p.choices.len(), p.n, p.logprobs), (6, 3, Some(2)));
        let seeds: Vec<_> = p
            .choices
            .iter()
            .map(|c| c.sampling.as_ref().unwrap().seed)
            .collect();
        assert_eq!(seeds, [10, 11, 12, 10, 11, 12].map(Some));
        let texts: Vec<_> = p
            .choices
            .iter()
            .map(|c| match &c.prompt {
                Some(api::generate_request::Prompt::Text(t)) => t.clone(),
                _ => panic!("text prompt"),
            })
            .collect();
        assert_eq!(texts, ["a", "a", "a", "b", "b", "b"]);
        let ids: std::collections::HashSet<_> =
            p.choices.iter().map(|c| c.request_id.clone()).collect();
        assert_eq!(ids.len(), 6, "every choice has its own request id");
        let p = completions(json!({"model": "m", "prompt": [[1, 2], [3]]})).unwrap();
        assert_eq!(p.choices.len(), 2);
        let ok = completions(json!({"model": "m", "prompt": [1, 2, 3], "echo": true})).unwrap();
        assert!(ok.echo);
        assert!(matches!(
            ok.choices[0].prompt,
            Some(api::generate_request::Prompt::TokenIds(ref t)) if t.ids == [1, 2, 3]
        ));
    }

    #[test]
    fn what_is_not_implemented_bad_or_unknown_is_refused_by_name() {
        let base = || json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (key, value) in [
            ("n", json!(17)),
            ("n", json!(0)),
            ("logit_bias", json!({"x": 5})),
            ("logit_bias", json!([1])),
            ("top_logprobs", json!(3)),
            ("presence_penalty", json!("high")),
            ("presence_penalty", json!(2.5)),
            ("repetition_penalty", json!(0)),
            ("min_p", json!(1.5)),
            ("temperature", json!(-1)),
            ("logit_bias", json!({"5": 101})),
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
        for (body, key) in [
            (json!({"model": "m", "prompt": [["a"]]}), "prompt"),
            (
                json!({"model": "m", "prompt": "a", "suffix": "b"}),
                "suffix",
            ),
            (
                json!({"model": "m", "prompt": "a", "logprobs": 21}),
                "logprobs",
            ),
            (
                json!({"model": "m", "prompt": "a", "logprobs": 1, "echo": true}),
                "echo",
            ),
        ] {
            let e = completions(body)
                .err()
                .unwrap_or_else(|| panic!("{key} accepted"));
            assert_eq!(param(e).as_deref(), Some(key));
        }
        let many: Vec<String> = (0..=MAX_PROMPTS).map(|i| i.to_string()).collect();
        let e = completions(json!({"model": "m", "prompt": many}))
            .err()
            .unwrap();
        assert_eq!(param(e).as_deref(), Some("prompt"));
        let e = completions(json!({"model": "m", "prompt": ["a", "b", "c", "d", "e"], "n": 16}))
            .err()
            .unwrap();
        assert_eq!(param(e).as_deref(), Some("prompt"));
        // Past 32 bits: refused, not wrapped.
        for (body, key) in [
            (json!({"model": "m", "prompt": [4294967301u64]}), "prompt"),
            (
                json!({"model": "m", "prompt": "a", "top_k": 4294967297u64}),
                "top_k",
            ),
        ] {
            let e = completions(body)
                .err()
                .unwrap_or_else(|| panic!("{key} accepted"));
            assert_eq!(param(e).as_deref(), Some(key));
        }
    }
}
