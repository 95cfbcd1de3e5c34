//! Turning sampled token ids into streamed text and a finish decision: EOS,
//! the token budget, stop sequences, and text that never splits a UTF-8
//! character. Shared by the single-process engine and the coordinator.

use serde::Serialize;

use crate::error::Result;
use crate::tokenizer::{DecodeStream, StopMatcher, StopOutcome, Tokenizer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The token budget was reached.
    Length,
    /// The model produced an end-of-sequence token.
    Eos,
    /// A stop sequence appeared in the text.
    Stop,
    /// The caller stopped the stream.
    Cancelled,
}

pub struct TextStreamer<'t> {
    tokenizer: Option<&'t Tokenizer>,
    eos: Vec<u32>,
    max_new_tokens: usize,
    produced: usize,
    decoder: DecodeStream,
    stops: StopMatcher,
}

impl<'t> TextStreamer<'t> {
    /// Without a tokenizer, tokens carry no text and only the budget ends
    /// generation. With `ignore_eos`, EOS ids are ordinary tokens.
    pub fn new(
        tokenizer: Option<&'t Tokenizer>,
        max_new_tokens: usize,
        stop: Vec<String>,
        ignore_eos: bool,
    ) -> Self {
        let eos = match (tokenizer, ignore_eos) {
            (Some(t), false) => t.eos_token_ids.clone(),
            _ => Vec::new(),
        };
        TextStreamer {
            tokenizer,
            eos,
            max_new_tokens,
            produced: 0,
            decoder: DecodeStream::new(),
            stops: StopMatcher::new(stop),
        }
    }

    /// The tokenizer the text comes from (none: tokens carry no text).
    pub fn tokenizer(&self) -> Option<&'t Tokenizer> {
        self.tokenizer
    }

    /// Takes the next token: the text it adds (possibly empty) and, if
    /// generation ends with it, why.
    pub fn push(&mut self, id: u32) -> Result<(String, Option<FinishReason>)> {
        self.produced += 1;
        let is_eos = self.eos.contains(&id);
        let mut finish = if is_eos {
            Some(FinishReason::Eos)
        } else if self.produced >= self.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        let delta = match self.tokenizer {
            Some(t) if !is_eos => self.decoder.step(t, id)?,
            _ => String::new(),
        };
        let text = match self.stops.push(&delta) {
            StopOutcome::Stopped(before) => {
                finish = Some(FinishReason::Stop);
                before
            }
            StopOutcome::Continue(mut s) => {
                if finish.is_some() {
                    s.push_str(&self.stops.flush());
                }
                s
            }
        };
        Ok((text, finish))
    }
}
