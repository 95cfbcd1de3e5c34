//! `ModelConfig`: the validated description of a Llama-family model, built
//! from a Hugging Face `config.json` (serde mirror below), from GGUF metadata,
//! or from a named synthetic preset. No `Option`s past validation.

use std::path::Path;

use serde::Deserialize;

use crate::error::{MetaError, Result};
use crate::gguf::GgufFile;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub const SUPPORTED: &'static str =
        "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (GGUF: llama, mistral, qwen2)";
}

/// How rotary frequencies are derived from `theta`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position: f64,
    },
    /// Per-frequency divisors as stored by llama.cpp in `rope_freqs.weight`.
    Factors(Vec<f32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Longest sequence (prompt + generated) the model accepts.
    pub max_position: usize,
    pub tie_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub qkv_bias: bool,
}

impl ModelConfig {
    /// What a first stage of several keeps beside its KV cache of `slots`
    /// positions: the float32 hidden state it sent on for each, so that a
    /// replaced later stage can recompute its cache from them.
    pub fn boundary_bytes(&self, slots: usize) -> u64 {
        slots as u64 * self.hidden_size as u64 * 4
    }

    /// Inverse rotary frequencies, `head_dim / 2` of them, after scaling.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Factors(div) => base.iter().zip(div).map(|(f, d)| f / *d as f64).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                let low_wavelen = original_max_position / low_freq_factor;
                let high_wavelen = original_max_position / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_max_position / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// Checks the numbers fit together; `origin` names the file in errors.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let err = |reason: String| {
            Err(MetaError::Config {
                path: origin.to_path_buf(),
                reason,
            })
        };
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position),
        ];
        for (name, v) in positive {
            if v == 0 {
                return err(format!("{name} must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return err(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            ));
        }
        if let RopeScaling::Factors(f) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                return err(format!(
                    "rope_freqs has {} factors, expected head_dim/2 = {}",
                    f.len(),
                    self.head_dim / 2
                ));
            }
        }
        // Also rejects NaN and infinities.
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.rms_norm_eps) || !positive(self.rope_theta) {
            return err("rms_norm_eps and rope_theta must be positive".into());
        }
        Ok(())
    }

    /// Parameter count (embedding counted once when tied).
    pub fn num_params(&self) -> usize {
        let (h, i, kv) = (
            self.hidden_size,
            self.intermediate_size,
            self.num_kv_heads * self.head_dim,
        );
        let q = self.num_heads * self.head_dim;
        let bias = if self.qkv_bias { q + 2 * kv } else { 0 };
        let layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h + bias;
        let embed = self.vocab_size * h * if self.tie_embeddings { 1 } else { 2 };
        layer * self.num_layers + embed + h
    }
}

/// Serde mirror of a Hugging Face `config.json` (the fields llmos reads).
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5 writes `rope_parameters` in place of the two above.
    rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

fn rope_from_json(v: &serde_json::Value, origin: &Path) -> Result<(Option<f64>, RopeScaling)> {
    let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
    let theta = num("rope_theta");
    let ty = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let need = |k: &str| {
        num(k).ok_or_else(|| MetaError::Config {
            path: origin.to_path_buf(),
            reason: format!("rope scaling {ty:?} needs {k}"),
        })
    };
    let scaling = match ty {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position: need("original_max_position_embeddings")?,
        },
        other => {
            return Err(MetaError::Config {
                path: origin.to_path_buf(),
                reason: format!(
                "rope scaling type {other:?} is not supported (supported: default, linear, llama3)"
            ),
            })
        }
    };
    Ok((theta, scaling))
}

impl ModelConfig {
    /// Reads and validates a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| MetaError::io(path, e))?;
        let raw: HfConfig = serde_json::from_str(&text).map_err(|e| MetaError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let arch_name = raw
            .architectures
            .first()
            .cloned()
            .or(raw.model_type.clone())
            .unwrap_or_default();
        let arch = match arch_name.as_str() {
            "LlamaForCausalLM" | "llama" => Architecture::Llama,
            "MistralForCausalLM" | "mistral" => Architecture::Mistral,
            "Qwen2ForCausalLM" | "qwen2" => Architecture::Qwen2,
            _ => {
                return Err(MetaError::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    arch: arch_name,
                    supported: Architecture::SUPPORTED,
                })
            }
        };
        let (mut theta, mut scaling) = (raw.rope_theta, RopeScaling::None);
        for v in [&raw.rope_scaling, &raw.rope_parameters]
            .into_iter()
            .flatten()
        {
            if v.is_object() {
                let (t, s) = rope_from_json(v, path)?;
                theta = theta.or(t);
                if s != RopeScaling::None {
                    scaling = s;
                }
            }
        }
        let mut max_position = raw.max_position_embeddings;
        // Sliding-window models (Mistral v0.1, Qwen2 when enabled) are served
        // with full attention inside one window: cap the context at the window.
        let sliding = match arch {
            Architecture::Mistral => raw.sliding_window,
            Architecture::Qwen2 if raw.use_sliding_window == Some(true) => raw.sliding_window,
            _ => None,
        };
        if let Some(w) = sliding {
            max_position = max_position.min(w);
        }
        let cfg = ModelConfig {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: theta.unwrap_or(10_000.0),
            rope_scaling: scaling,
            max_position,
            tie_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: match arch {
                Architecture::Qwen2 => true,
                _ => raw.attention_bias.unwrap_or(false),
            },
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads and validates the model description in GGUF metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch_name = g.get_str("general.architecture")?.to_string();
        let arch = match arch_name.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            _ => {
                return Err(MetaError::UnsupportedArchitecture {
                    path: g.path().to_path_buf(),
                    arch: arch_name,
                    supported: Architecture::SUPPORTED,
                })
            }
        };
        let a = arch_name.as_str();
        let key = |k: &str| format!("{a}.{k}");
        let u = |k: &str| g.get_u64(&key(k)).map(|v| v as usize);
        let hidden = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let kv_heads = if g.get(&key("attention.head_count_kv")).is_some() {
            u("attention.head_count_kv")?
        } else {
            heads
        };
        let head_dim = if g.get(&key("attention.key_length")).is_some() {
            u("attention.key_length")?
        } else {
            hidden / heads.max(1)
        };
        let vocab = match g.get(&key("vocab_size")) {
            Some(_) => u("vocab_size")?,
            None => g.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let mut scaling = match g.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: g.get_f64(&key("rope.scaling.factor"))?,
            },
            Some(other) => {
                return Err(MetaError::Metadata {
                    path: g.path().to_path_buf(),
                    key: key("rope.scaling.type"),
                    reason: format!("{other:?} is not supported (supported: none, linear)"),
                })
            }
        };
        if let Some(info) = g.tensor("rope_freqs.weight") {
            let mut f = vec![0f32; info.shape.iter().product()];
            crate::quant::dequantize_into(info.ty, g.tensor_bytes(info), &mut f);
            scaling = RopeScaling::Factors(f);
        }
        let tie = g.tensor("output.weight").is_none();
        let qkv_bias = g.tensor("blk.0.attn_q.bias").is_some();
        let cfg = ModelConfig {
            arch,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: u("feed_forward_length")?,
            num_layers: u("block_count")?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rms_norm_eps: g.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: match g.get(&key("rope.freq_base")) {
                Some(_) => g.get_f64(&key("rope.freq_base"))?,
                None => 10_000.0,
            },
            rope_scaling: scaling,
            max_position: u("context_length")?,
            tie_embeddings: tie,
            qkv_bias,
        };
        cfg.validate(g.path())?;
        Ok(cfg)
    }

    /// Named shapes for synthetic-weight runs (benchmarks, large-shape tests).
    pub fn preset(name: &str) -> Option<Self> {
        let llama = |vocab, hidden, inter, layers, heads, kv, theta, tie| ModelConfig {
            arch: Architecture::Llama,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: hidden / heads,
            rms_norm_eps: 1e-5,
            rope_theta: theta,
            rope_scaling: RopeScaling::None,
            max_position: 8192,
            tie_embeddings: tie,
            qkv_bias: false,
        };
        let llama3 = RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192.0,
        };
        Some(match name {
            "tiny" => llama(512, 64, 128, 2, 4, 2, 10_000.0, false),
            "smollm2-135m" => llama(49152, 576, 1536, 30, 9, 3, 100_000.0, true),
            "llama-3.2-1b" => ModelConfig {
                rope_scaling: llama3,
                ..llama(128256, 2048, 8192, 16, 32, 8, 500_000.0, true)
            },
            "llama-3-8b" => llama(128256, 4096, 14336, 32, 32, 8, 500_000.0, false),
            _ => return None,
        })
    }

    pub const PRESETS: &'static str = "tiny, smollm2-135m, llama-3.2-1b, llama-3-8b";
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, json: &str) -> std::path::PathBuf {
        let p = dir.join("config.json");
        std::fs::write(&p, json).unwrap();
        p
    }

    #[test]
    fn llama3_rope_scaling_matches_reference_values() {
        let cfg = ModelConfig::preset("llama-3.2-1b").unwrap();
        let f = cfg.rope_inv_freq();
        // Highest frequency untouched, lowest divided by the factor.
        assert!((f[0] - 1.0).abs() < 1e-12);
        let base_last = 1.0 / 500_000f64.powf(62.0 / 64.0);
        assert!((f[31] - base_last / 32.0).abs() < 1e-15);
    }

    #[test]
    fn hf_config_qwen2_has_bias_and_unsupported_arch_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":10,"hidden_size":8,
               "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,
               "num_key_value_heads":1,"rope_theta":1000000.0,"max_position_embeddings":64}"#,
        );
        let c = ModelConfig::from_hf_json(&p).unwrap();
        assert!(c.qkv_bias);
        assert_eq!(c.head_dim, 4);
        let p = write(
            d.path(),
            r#"{"architectures":["GPTNeoXForCausalLM"],"vocab_size":10,"hidden_size":8,
               "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2}"#,
        );
        let e = ModelConfig::from_hf_json(&p).unwrap_err().to_string();
        assert!(
            e.contains("GPTNeoXForCausalLM") && e.contains("config.json"),
            "{e}"
        );
    }

    #[test]
    fn indivisible_heads_are_refused_with_numbers() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":12,
               "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":3,
               "num_key_value_heads":2}"#,
        );
        let e = ModelConfig::from_hf_json(&p).unwrap_err().to_string();
        assert!(
            e.contains("3") && e.contains("2") && e.contains("num_key_value_heads"),
            "{e}"
        );
    }
}

/// One tensor-parallel rank's share of a model's layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpSplit {
    pub rank: usize,
    pub size: usize,
    /// Query heads this rank holds (heads / size), from `head_start`.
    pub heads: usize,
    pub head_start: usize,
    /// KV heads this rank holds, from `kv_head_start`: kv_heads / size, or 1
    /// (replicated over size / kv_heads ranks) when size exceeds them.
    pub kv_heads: usize,
    pub kv_head_start: usize,
    /// MLP columns this rank holds (intermediate / size), from `inter_start`.
    pub intermediate: usize,
    pub inter_start: usize,
}

impl ModelConfig {
    /// How `size` ranks split this model's layers, and rank `rank`'s part;
    /// a model that cannot be split so is refused with the numbers.
    pub fn tp_split(&self, rank: usize, size: usize) -> std::result::Result<TpSplit, String> {
        let (h, kv, i) = (self.num_heads, self.num_kv_heads, self.intermediate_size);
        if size == 0 || rank >= size {
            return Err(format!(
                "tensor-parallel rank {rank} of {size} ranks is out of range"
            ));
        }
        if h % size != 0 {
            return Err(format!(
                "tensor parallelism {size} does not divide the model's {h} attention heads"
            ));
        }
        if i % size != 0 {
            return Err(format!(
                "tensor parallelism {size} does not divide the model's {i} MLP columns"
            ));
        }
        let (kv_heads, kv_head_start) = if kv % size == 0 {
            (kv / size, rank * (kv / size))
        } else if size % kv == 0 {
            // More ranks than KV heads: each rank keeps the one KV head its
            // query heads read, replicated over size / kv ranks.
            (1, rank / (size / kv))
        } else {
            return Err(format!(
                "tensor parallelism {size} and the model's {kv} KV heads: one must divide the other"
            ));
        };
        let heads = h / size;
        Ok(TpSplit {
            rank,
            size,
            heads,
            head_start: rank * heads,
            kv_heads,
            kv_head_start,
            intermediate: i / size,
            inter_start: rank * (i / size),
        })
    }
}
