//! Tokenizers: built from GGUF metadata (byte-level BPE as in GPT-2/Llama 3,
//! or SentencePiece-style BPE with byte fallback as in Llama 2) or read from a
//! Hugging Face `tokenizer.json`, behind one type with the model's special
//! tokens and chat template. `DecodeStream` turns a growing token list into
//! text deltas that never split a multi-byte UTF-8 character.

use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{MetaError, Result};
use crate::gguf::GgufFile;

/// Llama 3's split regex (llama.cpp `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex (llama.cpp `qwen2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepend BOS in `encode(.., add_special = true)` ourselves (GGUF); HF
    /// `tokenizer.json` files carry their own post-processor.
    manual_bos: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos", &self.bos_token_id)
            .field("eos", &self.eos_token_ids)
            .finish()
    }
}

fn tok_err(path: &Path, reason: impl ToString) -> MetaError {
    MetaError::Tokenizer {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn split(pattern: &str) -> PreTokenizerWrapper {
    let re = SplitPattern::Regex(pattern.to_string());
    PreTokenizerWrapper::Split(
        Split::new(re, SplitDelimiterBehavior::Isolated, false).expect("valid regex"),
    )
}

impl Tokenizer {
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path();
        let model = g.get_str("tokenizer.ggml.model")?;
        let tokens = g.get_string_array("tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
            Some(_) => g
                .get_array("tokenizer.ggml.token_type")?
                .iter()
                .map(|v| v.as_i64().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let bos = g
            .get("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.as_u64())
            .map(|v| v as u32);
        let eos = g
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.as_u64())
            .map(|v| v as u32);
        let mut inner = match model {
            "gpt2" => {
                let vocab: Vocab = tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.to_string(), i as u32))
                    .collect();
                let merges = g
                    .get_string_array("tokenizer.ggml.merges")?
                    .iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| tok_err(path, format!("merge {m:?} is not two tokens")))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .build()
                    .map_err(|e| tok_err(path, e))?;
                let mut t = tokenizers::Tokenizer::new(bpe);
                let byte_level = ByteLevel::new(false, true, true);
                let pre = g
                    .get("tokenizer.ggml.pre")
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                let pre_tok: PreTokenizerWrapper = match pre {
                    // SmolLM's original tokenizer splits digits one by one.
                    "smollm" => PreTokenizerWrapper::Sequence(PreSequence::new(vec![
                        PreTokenizerWrapper::Digits(Digits::new(true)),
                        PreTokenizerWrapper::ByteLevel(byte_level),
                    ])),
                    "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "qwen2" => {
                        let re = if pre == "qwen2" {
                            QWEN2_SPLIT
                        } else {
                            LLAMA3_SPLIT
                        };
                        PreTokenizerWrapper::Sequence(PreSequence::new(vec![
                            split(re),
                            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
                        ]))
                    }
                    _ => PreTokenizerWrapper::ByteLevel(byte_level),
                };
                t.with_pre_tokenizer(Some(pre_tok));
                t.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
                t
            }
            "llama" => {
                let scores: Vec<f64> = g
                    .get_array("tokenizer.ggml.scores")?
                    .iter()
                    .map(|v| v.as_f64().unwrap_or(0.0))
                    .collect();
                let add_prefix = g
                    .get("tokenizer.ggml.add_space_prefix")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(true);
                sentencepiece_bpe(path, &tokens, &scores, &types, add_prefix)?
            }
            other => {
                return Err(tok_err(
                    path,
                    format!(
                        "tokenizer.ggml.model {other:?} is not supported (supported: gpt2, llama)"
                    ),
                ))
            }
        };
        // Control tokens (type 3) are special; user-defined ones (type 4) are
        // matched whole in text but are not special.
        let of_type = |ty: i64, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(_, &t)| t == ty)
                .map(|(s, _)| AddedToken::from(s.to_string(), special))
                .collect()
        };
        inner.add_special_tokens(&of_type(3, true));
        inner.add_tokens(&of_type(4, false));
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(model == "llama");
        Ok(Tokenizer {
            inner,
            manual_bos: add_bos && bos.is_some(),
            bos_token_id: bos,
            eos_token_ids: eos.into_iter().collect(),
            chat_template: g
                .get("tokenizer.chat_template")
                .and_then(|v| v.as_str())
                .map(str::to_string),
        })
    }

    /// Reads `tokenizer.json`, plus `tokenizer_config.json` (special tokens,
    /// chat template), `chat_template.jinja` and `generation_config.json`
    /// (EOS ids) where present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let json = std::fs::read(&path).map_err(|e| MetaError::io(&path, e))?;
        let read = |name: &str| -> Result<Option<Vec<u8>>> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(None);
            }
            std::fs::read(&p)
                .map(Some)
                .map_err(|e| MetaError::io(&p, e))
        };
        let template_file = dir.join("chat_template.jinja");
        let template = match read("chat_template.jinja")? {
            Some(b) => Some(String::from_utf8(b).map_err(|e| tok_err(&template_file, e))?),
            None => None,
        };
        Self::from_hf_files(
            dir,
            &json,
            read("tokenizer_config.json")?.as_deref(),
            read("generation_config.json")?.as_deref(),
            template,
        )
    }

    /// A Hugging Face tokenizer from the contents of its files (`dir`
    /// names them in errors): `tokenizer.json`, and where present
    /// `tokenizer_config.json`, `generation_config.json` and
    /// `chat_template.jinja`.
    pub fn from_hf_files(
        dir: &Path,
        tokenizer_json: &[u8],
        tokenizer_config: Option<&[u8]>,
        generation_config: Option<&[u8]>,
        chat_template_file: Option<String>,
    ) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        // The tokenizers library panics on some malformed files (a decoder
        // that is not JSON it expects, found by fuzzing): a bad file is an
        // error naming it, not a dead process.
        let inner = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(tokenizer_json))
            .map_err(|p| {
                let why = p
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("no message");
                tok_err(&path, format!("malformed: {why}"))
            })?
            .map_err(|e| tok_err(&path, e))?;
        let parse = |name: &str, b: Option<&[u8]>| -> Result<serde_json::Value> {
            match b {
                None => Ok(Default::default()),
                Some(b) => serde_json::from_slice(b).map_err(|e| tok_err(&dir.join(name), e)),
            }
        };
        let tc = parse("tokenizer_config.json", tokenizer_config)?;
        let gc = parse("generation_config.json", generation_config)?;
        let token_id = |v: Option<&serde_json::Value>| -> Option<u32> {
            let v = v?;
            let s = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            inner.token_to_id(s)
        };
        let mut eos: Vec<u32> = match gc.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| v as u32).into_iter().collect()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => Vec::new(),
        };
        if let Some(id) = token_id(tc.get("eos_token")) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        let bos = gc
            .get("bos_token_id")
            .and_then(|v| v.as_u64())
            .map(|v| v as u32)
            .or_else(|| token_id(tc.get("bos_token")));
        let chat_template = chat_template_file.or_else(|| {
            tc.get("chat_template")
                .and_then(|v| v.as_str())
                .map(str::to_string)
        });
        Ok(Tokenizer {
            inner,
            manual_bos: false,
            bos_token_id: bos,
            eos_token_ids: eos,
            chat_template,
        })
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    /// Encodes text; with `add_special` the model's BOS is prepended where it
    /// wants one. Chat-rendered prompts already carry their special tokens
    /// and are encoded with `add_special = false`.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special && !self.manual_bos)
            .map_err(|e| tok_err(Path::new("<tokenizer>"), e))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.manual_bos {
            ids.extend(self.bos_token_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| tok_err(Path::new("<tokenizer>"), e))
    }

    pub fn token_text(&self, id: u32) -> String {
        self.inner.id_to_token(id).unwrap_or_default()
    }

    pub fn bos_token(&self) -> String {
        self.bos_token_id
            .map(|i| self.token_text(i))
            .unwrap_or_default()
    }

    pub fn eos_token(&self) -> String {
        self.eos_token_ids
            .first()
            .map(|&i| self.token_text(i))
            .unwrap_or_default()
    }
}

/// SentencePiece-style BPE (Llama 2 GGUF): merges recovered from the
/// vocabulary, ordered by the merged token's score, with byte fallback.
fn sentencepiece_bpe(
    path: &Path,
    tokens: &[&str],
    scores: &[f64],
    types: &[i64],
    add_prefix: bool,
) -> Result<tokenizers::Tokenizer> {
    if scores.len() != tokens.len() {
        return Err(tok_err(
            path,
            format!("{} scores for {} tokens", scores.len(), tokens.len()),
        ));
    }
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let mut merges: Vec<(f64, u32, u32, String, String)> = Vec::new();
    for (id, (tok, &score)) in tokens.iter().zip(scores).enumerate() {
        // Byte, control and unknown tokens are never merge results.
        if matches!(types.get(id), Some(2 | 3 | 6)) {
            continue;
        }
        for (i, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(i);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                merges.push((score, li, ri, l.to_string(), r.to_string()));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges = merges.into_iter().map(|m| (m.3, m.4)).collect();
    let unk = tokens
        .iter()
        .zip(types)
        .find(|(_, &t)| t == 2)
        .map(|(s, _)| s.to_string())
        .unwrap_or_else(|| "<unk>".into());
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk)
        .byte_fallback(true)
        .fuse_unk(true)
        .build()
        .map_err(|e| tok_err(path, e))?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    let scheme = if add_prefix {
        PrependScheme::First
    } else {
        PrependScheme::Never
    };
    t.with_pre_tokenizer(Some(PreTokenizerWrapper::Metaspace(Metaspace::new(
        '▁', scheme, false,
    ))));
    let mut decoders = vec![
        DecoderWrapper::Replace(Replace::new("▁", " ").map_err(|e| tok_err(path, e))?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    t.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(
        decoders,
    ))));
    Ok(t)
}

/// Incremental detokenizer: feed token ids one at a time, get the text they
/// add. Text is held back while it would end in an incomplete UTF-8 character
/// (the tokenizer decodes those to U+FFFD).
#[derive(Debug, Default)]
pub struct DecodeStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl DecodeStream {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn step(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }
}

/// Finds stop sequences in streamed text. Text that might be the start of a
/// stop sequence is held back until it is known not to be one.
#[derive(Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

#[derive(Debug, PartialEq)]
pub enum StopOutcome {
    /// Text safe to emit now.
    Continue(String),
    /// A stop sequence was found: emit this text (before the stop) and finish.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.pending.push_str(text);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(i) = hit {
            let out = self.pending[..i].to_string();
            self.pending.clear();
            return StopOutcome::Stopped(out);
        }
        // Hold back the longest suffix that is a proper prefix of some stop.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > keep && self.pending.ends_with(&s[..i]) {
                    keep = i;
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopOutcome::Continue(out)
    }

    /// Text still held back when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing (fuzz/seeds/tokenizer_json): the tokenizers
    /// library panics on this file's decoder; loading it is an error.
    #[test]
    fn a_tokenizer_json_the_library_panics_on_is_an_error() {
        let data = include_bytes!("../../fuzz/seeds/tokenizer_json/regression-decoder-panic");
        let json = data.split(|&b| b == 0xFF).next().unwrap();
        let e = Tokenizer::from_hf_files(Path::new("/m"), json, None, None, None)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains("/m/tokenizer.json") && e.contains("malformed"),
            "{e}"
        );
    }

    #[test]
    fn stop_matcher_holds_back_partial_matches() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abc E"), StopOutcome::Continue("abc ".into()));
        assert_eq!(m.push("N"), StopOutcome::Continue("".into()));
        assert_eq!(m.push("x"), StopOutcome::Continue("ENx".into()));
        assert_eq!(m.push("yyEN"), StopOutcome::Continue("yy".into()));
        assert_eq!(m.push("Dzz"), StopOutcome::Stopped("".into()));
        let mut m = StopMatcher::new(vec!["ab".into()]);
        assert_eq!(m.push("xxa"), StopOutcome::Continue("xx".into()));
        assert_eq!(m.flush(), "a");
    }

    fn spm_fixture() -> tokenizers::Tokenizer {
        // A tiny SentencePiece vocabulary: unk, byte tokens for 0xC3 0xA9
        // ("é"), pieces with scores that make "▁hello" one token.
        let mut tokens = vec![
            "<unk>", "<0xC3>", "<0xA9>", "▁", "h", "e", "l", "o", "w", "r", "d",
        ];
        let mut types = vec![2, 6, 6, 1, 1, 1, 1, 1, 1, 1, 1];
        let mut scores = vec![0.0; tokens.len()];
        for (t, s) in [
            ("▁h", -1.0),
            ("ll", -2.0),
            ("▁he", -3.0),
            ("▁hell", -4.0),
            ("▁hello", -5.0),
            ("or", -6.0),
            ("▁w", -7.0),
        ] {
            tokens.push(t);
            types.push(1);
            scores.push(s);
        }
        sentencepiece_bpe(Path::new("t"), &tokens, &scores, &types, true).unwrap()
    }

    #[test]
    fn sentencepiece_merges_by_score_and_falls_back_to_bytes() {
        let t = spm_fixture();
        let enc = t.encode("hello world é", false).unwrap();
        let toks: Vec<&str> = enc.get_tokens().iter().map(|s| s.as_str()).collect();
        assert_eq!(toks[0], "▁hello");
        assert!(toks.contains(&"▁w") && toks.contains(&"or"), "{toks:?}");
        assert_eq!(&toks[toks.len() - 2..], ["<0xC3>", "<0xA9>"]);
        assert_eq!(t.decode(enc.get_ids(), false).unwrap(), "hello world é");
    }
}
