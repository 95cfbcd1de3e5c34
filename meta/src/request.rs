//! The checks every generation request passes, wherever it enters: the
//! coordinator's `Generate`, single-process generation, a step's layout on
//! a worker. One place, so the limits and their messages never disagree.

/// A request that cannot be served as asked; each names the limit and the
/// numbers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfVocabulary { id: u32, vocab: usize },
    #[error("max_new_tokens must be at least 1")]
    NoNewTokens,
    #[error("{what}: the model's context length is {limit}, got {got}")]
    ContextExceeded {
        what: String,
        limit: usize,
        got: usize,
    },
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1], got {0} (0 on the wire means 1)")]
    TopP(f32),
    #[error("min_p must be in [0, 1], got {0}")]
    MinP(f32),
    #[error("{name} must be in {range}, got {value}")]
    Penalty {
        name: &'static str,
        range: &'static str,
        value: f32,
    },
    #[error("logit_bias: {0}")]
    LogitBias(String),
    #[error("top_logprobs must be at most {limit}, got {got}")]
    TopLogprobs { got: u32, limit: u32 },
    #[error("stop_sequences: {0}")]
    StopSequences(String),
}

impl RequestError {
    /// The request field at fault (the wire's names), where one is.
    pub fn field(&self) -> Option<&'static str> {
        Some(match self {
            RequestError::EmptyPrompt | RequestError::TokenOutOfVocabulary { .. } => "prompt",
            RequestError::NoNewTokens => "max_new_tokens",
            RequestError::ContextExceeded { .. } => return None,
            RequestError::Temperature(_) => "temperature",
            RequestError::TopP(_) => "top_p",
            RequestError::MinP(_) => "min_p",
            RequestError::Penalty { name, .. } => name,
            RequestError::LogitBias(_) => "logit_bias",
            RequestError::TopLogprobs { .. } => "top_logprobs",
            RequestError::StopSequences(_) => "stop_sequences",
        })
    }
}

/// The most alternatives a token's log-probabilities list (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// The most tokens one request may bias.
pub const MAX_LOGIT_BIAS: usize = 1024;
/// The most stop sequences one request may give, and the longest one in
/// bytes (each is searched for in the text after every token).
pub const MAX_STOP_SEQUENCES: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;

/// Checks a request's stop sequences against [`MAX_STOP_SEQUENCES`] and
/// [`MAX_STOP_BYTES`]; an empty one is refused (it would stop at once).
pub fn check_stop_sequences(stops: &[String]) -> Result<(), RequestError> {
    if stops.len() > MAX_STOP_SEQUENCES {
        return Err(RequestError::StopSequences(format!(
            "at most {MAX_STOP_SEQUENCES} stop sequences, got {}",
            stops.len()
        )));
    }
    for (i, s) in stops.iter().enumerate() {
        if s.is_empty() {
            return Err(RequestError::StopSequences(format!(
                "stop sequence {i} is empty"
            )));
        }
        if s.len() > MAX_STOP_BYTES {
            return Err(RequestError::StopSequences(format!(
                "stop sequence {i} has {} bytes; at most {MAX_STOP_BYTES}",
                s.len()
            )));
        }
    }
    Ok(())
}

/// How the next token is chosen: the project's one sampling-parameter
/// type (the wire's `Sampling` messages are converted to it where they
/// arrive).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 selects greedy decoding.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1 disables top-p.
    pub top_p: f32,
    pub seed: u64,
    /// 0 disables min-p (candidates at least this fraction of the top
    /// token's probability).
    pub min_p: f32,
    /// OpenAI's, over generated tokens; 0 disables. In [-2, 2].
    pub presence_penalty: f32,
    /// OpenAI's, over generated tokens; 0 disables. In [-2, 2].
    pub frequency_penalty: f32,
    /// Hugging Face's, over prompt and generated tokens; 1 disables.
    pub repetition_penalty: f32,
    /// Added to these tokens' logits before the draw, each in [-100, 100].
    pub logit_bias: Vec<(u32, f32)>,
    /// Report this many most likely alternatives with each token (at most
    /// [`MAX_TOP_LOGPROBS`]).
    pub top_logprobs: u32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    /// From the wire's fields, where an unset (0) `top_p` means 1.
    pub fn from_wire(temperature: f32, top_k: u32, top_p: f32, seed: u64) -> Self {
        SamplingParams {
            temperature,
            top_k: top_k as usize,
            top_p: if top_p == 0.0 { 1.0 } else { top_p },
            seed,
            ..Default::default()
        }
    }

    /// Whether the sampler needs the sequence's tokens (penalties count them).
    pub fn needs_history(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }

    /// Whether the logits are changed before the draw.
    pub fn adjusts_logits(&self) -> bool {
        self.needs_history() || !self.logit_bias.is_empty()
    }

    pub fn validate(&self) -> Result<(), RequestError> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(RequestError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(RequestError::TopP(self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(RequestError::MinP(self.min_p));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(RequestError::Penalty {
                    name,
                    range: "[-2, 2]",
                    value,
                });
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 10.0) {
            return Err(RequestError::Penalty {
                name: "repetition_penalty",
                range: "(0, 10]",
                value: self.repetition_penalty,
            });
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(RequestError::LogitBias(format!(
                "at most {MAX_LOGIT_BIAS} tokens may be biased, got {}",
                self.logit_bias.len()
            )));
        }
        if let Some((id, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return Err(RequestError::LogitBias(format!(
                "the bias of token {id} must be in [-100, 100], got {b}"
            )));
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(RequestError::TopLogprobs {
                got: self.top_logprobs,
                limit: MAX_TOP_LOGPROBS,
            });
        }
        Ok(())
    }

    /// [`validate`](Self::validate), and every biased token inside a
    /// vocabulary of `vocab`.
    pub fn validate_for(&self, vocab: usize) -> Result<(), RequestError> {
        self.validate()?;
        match self.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
            Some((id, _)) => Err(RequestError::LogitBias(format!(
                "token id {id} is outside the vocabulary of {vocab} tokens"
            ))),
            None => Ok(()),
        }
    }
}

/// A prompt's token ids: at least one, each inside the vocabulary.
pub fn check_prompt(ids: &[u32], vocab: usize) -> Result<(), RequestError> {
    if ids.is_empty() {
        return Err(RequestError::EmptyPrompt);
    }
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(&id) => Err(RequestError::TokenOutOfVocabulary { id, vocab }),
        None => Ok(()),
    }
}

/// `positions` positions of one sequence within the model's context of
/// `limit`; `what` says what they are, for the message.
pub fn check_context(
    positions: usize,
    limit: usize,
    what: impl FnOnce() -> String,
) -> Result<(), RequestError> {
    if positions > limit {
        return Err(RequestError::ContextExceeded {
            what: what(),
            limit,
            got: positions,
        });
    }
    Ok(())
}

/// A prompt of `prompt` tokens plus `max_new` new ones: at least one new
/// token, and all of them within the context.
pub fn check_generation(prompt: usize, max_new: usize, limit: usize) -> Result<(), RequestError> {
    if max_new == 0 {
        return Err(RequestError::NoNewTokens);
    }
    check_context(prompt + max_new, limit, || {
        format!("prompt of {prompt} tokens plus max_new_tokens {max_new}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_limit_names_its_numbers() {
        assert_eq!(check_prompt(&[], 10), Err(RequestError::EmptyPrompt));
        let e = check_prompt(&[1, 10, 3], 10).unwrap_err().to_string();
        assert_eq!(e, "token id 10 is outside the vocabulary of 10 tokens");
        check_prompt(&[0, 9], 10).unwrap();
        assert_eq!(check_generation(5, 0, 100), Err(RequestError::NoNewTokens));
        let e = check_generation(60, 41, 100).unwrap_err().to_string();
        assert_eq!(
            e,
            "prompt of 60 tokens plus max_new_tokens 41: the model's context length is 100, got 101"
        );
        check_generation(60, 40, 100).unwrap();
        let many: Vec<String> = (0..17).map(|i| i.to_string()).collect();
        let e = check_stop_sequences(&many).unwrap_err();
        assert_eq!(e.field(), Some("stop_sequences"));
        assert!(
            e.to_string().contains("at most 16 stop sequences, got 17"),
            "{e}"
        );
        let e = check_stop_sequences(&["x".repeat(257)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("257 bytes; at most 256"), "{e}");
        assert!(check_stop_sequences(&[String::new()]).is_err());
        check_stop_sequences(&many[..16]).unwrap();
    }
}
