//! Helpers shared by the integration tests: the Hugging Face reference
//! script, reading its outputs, and running our engine the same way.

#[path = "cluster_support.rs"]
pub mod cluster;

use std::path::{Path, PathBuf};
use std::process::Command;

use llmos_meta::ModelSpec;
use llmos_worker::{
    Engine, GenerateRequest, LoadOptions, PromptInput, Quantization, SamplingParams,
};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Deserialize)]
pub struct RefPrompt {
    #[serde(default)]
    pub text: Option<String>,
    pub ids: Vec<u32>,
    pub logits_file: PathBuf,
    pub logits_shape: Vec<usize>,
    pub greedy: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct RefChat {
    pub messages: Vec<llmos_meta::ChatMessage>,
    pub rendered: String,
}

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub prompts: Vec<RefPrompt>,
    #[serde(default)]
    pub tokenizer_dir: Option<PathBuf>,
    #[serde(default)]
    pub chat: Option<RefChat>,
    #[serde(default)]
    pub model_dir: Option<PathBuf>,
}

/// The venv's Python, set up by `scripts/setup.sh` (the test command exports it).
pub fn python() -> PathBuf {
    let p = std::env::var("LLMOS_PYTHON").expect(
        "LLMOS_PYTHON is unset: run the tests with scripts/test.sh, which sets up the reference venv",
    );
    PathBuf::from(p)
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs `tests/parity/hf_reference.py MODE OUT ARG` and reads its manifest.
pub fn reference(mode: &str, arg: &str, out: &Path) -> Reference {
    let script = repo_root().join("tests/parity/hf_reference.py");
    let status = Command::new(python())
        .arg(&script)
        .arg(mode)
        .arg(out)
        .arg(arg)
        .env("LLMOS_REF_THREADS", "1")
        .status()
        .expect("run the Hugging Face reference script");
    assert!(
        status.success(),
        "{} {mode} failed: {status}",
        script.display()
    );
    let text = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn load(spec: &str, kind: Kind) -> Engine {
    load_quantized(spec, kind, Quantization::None)
}

pub fn load_quantized(spec: &str, kind: Kind, quantization: Quantization) -> Engine {
    tch::set_num_threads(1);
    let spec = ModelSpec::parse(spec).unwrap();
    let opts = LoadOptions {
        kind,
        device: Device::Cpu,
        seed: 0,
        quantization,
    };
    Engine::load(&spec, &opts, &mut |_, _| {}).unwrap()
}

/// Float32 logits `[t, vocab]` for every prompt position, flattened.
pub fn all_logits(engine: &Engine, ids: &[u32]) -> Vec<f32> {
    let _g = tch::no_grad_guard();
    let mut cache = engine.model.new_cache(1, ids.len());
    let x: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let hidden = engine
        .model
        .forward(&Tensor::from_slice(&x).unsqueeze(0), &mut cache)
        .unwrap();
    let logits = engine.model.logits(&hidden).unwrap();
    Vec::try_from(logits.view([-1])).unwrap()
}

/// Logits of `ids` computed in two chunks (`..split`, then `split..`
/// against the cache of the first): exercises attention over cached
/// positions with a partial causal mask. Returns all positions, flattened.
pub fn chunked_logits(engine: &Engine, ids: &[u32], split: usize) -> Vec<f32> {
    let _g = tch::no_grad_guard();
    let mut cache = engine.model.new_cache(1, ids.len());
    let x: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let mut out = Vec::new();
    for chunk in [&x[..split], &x[split..]] {
        let hidden = engine
            .model
            .forward(&Tensor::from_slice(chunk).unsqueeze(0), &mut cache)
            .unwrap();
        out.extend(Vec::<f32>::try_from(engine.model.logits(&hidden).unwrap().view([-1])).unwrap());
    }
    out
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit counts differ");
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Greedy continuation of `n` tokens, ignoring EOS (as the reference does).
pub fn greedy(engine: &Engine, ids: &[u32], n: usize) -> Vec<u32> {
    let req = GenerateRequest {
        prompt: PromptInput::Tokens(ids.to_vec()),
        sampling: SamplingParams::default(),
        max_new_tokens: n,
        stop: vec![],
        ignore_eos: true,
    };
    engine.generate(&req, &mut |_| true).unwrap().token_ids
}

/// Largest per-position logit difference over all reference prompts.
pub fn worst_logit_diff(engine: &Engine, r: &Reference) -> f32 {
    r.prompts
        .iter()
        .map(|p| {
            let ours = all_logits(engine, &p.ids);
            let theirs = read_f32(&p.logits_file);
            assert_eq!(theirs.len(), p.logits_shape.iter().product::<usize>());
            max_abs_diff(&ours, &theirs)
        })
        .fold(0f32, f32::max)
}
