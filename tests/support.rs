//! Helpers shared by the integration tests: the Hugging Face reference
//! script, reading its outputs, and running our engine the same way.

#[path = "cluster_support.rs"]
pub mod cluster;
#[path = "group_support.rs"]
pub mod group;

use std::path::{Path, PathBuf};
use std::process::Command;

use llmos_meta::{ModelSpec, OpenedModel};
use llmos_worker::model::{Llama, ShardSpec};
use llmos_worker::{
    GenerateRequest, LoadOptions, LocalModel, LocalSequence, PromptInput, Quantization,
    SamplingParams,
};
use serde::Deserialize;
use tch::{Device, Kind};

#[derive(Debug, Deserialize)]
pub struct RefPrompt {
    #[serde(default)]
    pub text: Option<String>,
    pub ids: Vec<u32>,
    pub logits_file: PathBuf,
    pub logits_shape: Vec<usize>,
    pub greedy: Vec<u32>,
    /// `[greedy.len(), vocab]`: the logits each greedy token was chosen from.
    pub greedy_logits_file: PathBuf,
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

/// A model loaded twice: `local` generates as `llmos-worker generate` does
/// (the engine over this process's shard host), `model` is the same
/// weights for driving the forward directly (`LocalSequence`, batched
/// steps) and for perturbing.
pub struct TestModel {
    pub local: LocalModel,
    pub model: Llama,
}

impl std::ops::Deref for TestModel {
    type Target = LocalModel;
    fn deref(&self) -> &LocalModel {
        &self.local
    }
}

pub fn load(spec: &str, kind: Kind) -> TestModel {
    load_quantized(spec, kind, Quantization::None)
}

pub fn load_quantized(spec: &str, kind: Kind, quantization: Quantization) -> TestModel {
    load_with_kv(spec, kind, quantization, None)
}

/// `load_quantized` with its KV cache in `kv_kind` (`None`: `kind`).
pub fn load_with_kv(
    spec: &str,
    kind: Kind,
    quantization: Quantization,
    kv_kind: Option<Kind>,
) -> TestModel {
    tch::set_num_threads(1);
    let spec = ModelSpec::parse(spec).unwrap();
    let opts = LoadOptions {
        kind,
        device: Device::Cpu,
        seed: 0,
        quantization,
        kv_kind,
    };
    try_load(&spec, &opts).unwrap()
}

/// Both loads of `spec`; the error is `LocalModel::load`'s message.
pub fn try_load(spec: &ModelSpec, opts: &LoadOptions) -> Result<TestModel, String> {
    let local = LocalModel::load(spec, opts, &mut |_, _| {}).map_err(|e| e.to_string())?;
    let opened = OpenedModel::open(spec).map_err(|e| e.to_string())?;
    let model = Llama::load(
        opened.weights.as_deref(),
        &opened.config,
        ShardSpec::full(&opened.config),
        opts,
        &mut |_, _| {},
    )
    .map_err(|e| e.to_string())?;
    Ok(TestModel { local, model })
}

/// Float32 logits `[t, vocab]` for every prompt position, flattened: the
/// prompt in one step of the paged forward the server runs.
pub fn all_logits(engine: &TestModel, ids: &[u32]) -> Vec<f32> {
    chunked_logits(engine, ids, ids.len())
}

/// Logits of `ids` computed in two steps (`..split`, then `split..`
/// attending to the blocks the first wrote): exercises attention over
/// cached positions with a partial causal mask. Returns all positions,
/// flattened.
pub fn chunked_logits(engine: &TestModel, ids: &[u32], split: usize) -> Vec<f32> {
    let _g = tch::no_grad_guard();
    let mut seq = LocalSequence::new(&engine.model, ids.len()).unwrap();
    let mut out = Vec::new();
    for chunk in [&ids[..split], &ids[split..]] {
        if chunk.is_empty() {
            continue;
        }
        let logits = seq.forward(&engine.model, chunk, true).unwrap();
        out.extend(Vec::<f32>::try_from(logits.view([-1])).unwrap());
    }
    out
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit counts differ");
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Greedy continuation of `n` tokens, ignoring EOS (as the reference does).
pub fn greedy(engine: &TestModel, ids: &[u32], n: usize) -> Vec<u32> {
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
pub fn worst_logit_diff(engine: &TestModel, r: &Reference) -> f32 {
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

/// What a batched run through the served forward found against the
/// reference.
#[derive(Debug, Default)]
pub struct BatchedParity {
    /// Largest max-abs logit difference over every prompt position.
    pub prompt_diff: f32,
    /// Largest max-abs logit difference over every decode row.
    pub decode_diff: f32,
    /// Steps that held a fresh prompt, a prompt chunk after cached
    /// positions and a decode row at once.
    pub mixed_steps: usize,
    pub steps: usize,
    /// Per prompt: the greedy tokens our logits choose (first from the
    /// prompt's last position, then from each decode row).
    pub greedy: Vec<Vec<u32>>,
}

/// Runs every reference prompt and its greedy continuation through the
/// paged forward the server runs, as the serving engine batches them: the
/// sequences share one KV pool on scattered blocks of 16; sequence `i`
/// arrives at step `2 i`; each step holds at most `budget` tokens: one
/// decode row per running sequence (fed the reference's greedy token, so
/// every row is compared with the logits the reference chose its next
/// token from), then prompt chunks. Every prompt position and every decode
/// row is compared with the reference.
pub fn batched_parity(engine: &TestModel, r: &Reference, budget: usize) -> BatchedParity {
    use llmos_worker::kv::{BatchLayout, SeqSlice};
    let _g = tch::no_grad_guard();
    let m = &engine.model;
    let bs = 16usize;
    let need: Vec<usize> = r
        .prompts
        .iter()
        .map(|p| (p.ids.len() + p.greedy.len()).div_ceil(bs))
        .collect();
    let total: usize = need.iter().sum();
    // Block ids handed out in a scattered order (7 is prime to the count
    // unless the count is a multiple of 7: then one more block).
    let num_blocks = if total.is_multiple_of(7) {
        total + 1
    } else {
        total
    };
    let mut order = (0..num_blocks).map(|i| ((i * 7 + 3) % num_blocks) as u32);
    let tables: Vec<Vec<u32>> = need
        .iter()
        .map(|&n| order.by_ref().take(n).collect())
        .collect();
    let mut pool = m.new_pool(num_blocks, bs).unwrap();
    let refs: Vec<(Vec<f32>, Vec<f32>)> = r
        .prompts
        .iter()
        .map(|p| (read_f32(&p.logits_file), read_f32(&p.greedy_logits_file)))
        .collect();
    let vocab = m.config().vocab_size;
    // Per sequence: positions cached, decode rows done.
    let mut cached = vec![0usize; r.prompts.len()];
    let mut decoded = vec![0usize; r.prompts.len()];
    let mut out = BatchedParity {
        greedy: vec![Vec::new(); r.prompts.len()],
        ..Default::default()
    };
    let row_diff = |got: &[f32], want: &[f32]| max_abs_diff(got, want);
    loop {
        let mut seqs = Vec::new();
        let mut ids: Vec<i64> = Vec::new();
        // (sequence, first position, tokens, decode row)
        let mut parts = Vec::new();
        let mut left = budget;
        for (i, p) in r.prompts.iter().enumerate() {
            let prompt_done = cached[i] >= p.ids.len();
            // The last greedy token's own logits are not in the reference.
            if out.steps < 2 * i || left == 0 || (prompt_done && decoded[i] + 1 >= p.greedy.len()) {
                continue;
            }
            let (tokens, decode) = if prompt_done {
                ids.push(p.greedy[decoded[i]] as i64);
                (1, true)
            } else {
                let n = (p.ids.len() - cached[i]).min(left);
                ids.extend(p.ids[cached[i]..cached[i] + n].iter().map(|&t| t as i64));
                (n, false)
            };
            left -= tokens;
            seqs.push(SeqSlice {
                position: cached[i],
                tokens,
                blocks: tables[i].clone(),
            });
            parts.push((i, cached[i], tokens, decode));
        }
        if seqs.is_empty() {
            if out.steps > 2 * r.prompts.len() {
                break;
            }
            out.steps += 1;
            continue;
        }
        let fresh = parts.iter().any(|&(_, at, _, d)| !d && at == 0);
        let chunk = parts.iter().any(|&(_, at, _, d)| !d && at > 0);
        let decode = parts.iter().any(|&(_, _, _, d)| d);
        out.mixed_steps += (fresh && chunk && decode) as usize;
        let layout = BatchLayout {
            seqs,
            block_size: bs,
        };
        let x = m.embed_packed(&tch::Tensor::from_slice(&ids)).unwrap();
        let hidden = m.forward_batch(&x, &layout, &mut pool).unwrap();
        let logits: Vec<f32> = Vec::try_from(m.logits(&hidden).unwrap().view([-1])).unwrap();
        let mut row = 0;
        for (i, at, n, decode) in parts {
            let p = &r.prompts[i];
            let (prompt_ref, greedy_ref) = &refs[i];
            for k in 0..n {
                let got = &logits[(row + k) * vocab..(row + k + 1) * vocab];
                let pos = at + k;
                if decode {
                    // Fed greedy[j]: the logits greedy[j + 1] was chosen from.
                    let j = decoded[i] + 1;
                    let want = &greedy_ref[j * vocab..(j + 1) * vocab];
                    out.decode_diff = out.decode_diff.max(row_diff(got, want));
                    out.greedy[i].push(argmax(got));
                } else {
                    let want = &prompt_ref[pos * vocab..(pos + 1) * vocab];
                    out.prompt_diff = out.prompt_diff.max(row_diff(got, want));
                    if pos + 1 == p.ids.len() {
                        out.greedy[i].push(argmax(got));
                    }
                }
            }
            row += n;
            cached[i] += n;
            if decode {
                decoded[i] += 1;
            }
        }
        out.steps += 1;
    }
    out
}

fn argmax(x: &[f32]) -> u32 {
    x.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0 as u32
}

/// The embedded SmolLM2 rewritten with the block types llama.cpp's
/// `Q4_K_M`/`Q5_K_M` files hold, as `path`: each layer's `ffn_down`
/// (1536 columns, whole 256-weight super-blocks) in Q4_K on even layers
/// and Q6_K on odd ones; the other matrices (576 columns, which K-quants
/// cannot cut, so llama.cpp falls back to these) in Q5_0 on even layers
/// and Q5_1 on odd ones, but `attn_v` in Q8_0 on even layers and Q5_0 on
/// odd ones; the tied embedding in Q8_0; norms in F32. Values are the
/// embedded file's, dequantized and quantized again.
pub fn mixed_block_smollm2(path: &Path) -> PathBuf {
    use llmos_meta::gguf::GgufFile;
    use llmos_meta::gguf_writer::GgufWriter;
    use llmos_meta::quant::{dequantize_into, GgmlType};
    let src = GgufFile::open(llmos_meta::source::embedded_model_path().unwrap()).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in &src.metadata {
        // The writer adds its own alignment; the rest is copied.
        if k != "general.alignment" {
            w.meta(k, v.clone());
        }
    }
    for name in src.tensor_names() {
        let info = src.tensor(name).unwrap();
        let numel: usize = info.shape.iter().product();
        let mut values = vec![0f32; numel];
        dequantize_into(info.ty, src.tensor_bytes(info), &mut values);
        let layer = name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        let ty = match (info.shape.len(), layer) {
            (1, _) => GgmlType::F32,
            (_, None) => GgmlType::Q8_0,
            (_, Some(l)) if name.ends_with("ffn_down.weight") => {
                if l % 2 == 0 {
                    GgmlType::Q4_K
                } else {
                    GgmlType::Q6_K
                }
            }
            // `attn_v` in another type than `attn_q`/`attn_k`, as
            // llama.cpp's K-quant mixes have it: the fused q/k/v
            // projection holds parts of two types.
            (_, Some(l)) if name.ends_with("attn_v.weight") => {
                if l % 2 == 0 {
                    GgmlType::Q8_0
                } else {
                    GgmlType::Q5_0
                }
            }
            (_, Some(l)) if l % 2 == 0 => GgmlType::Q5_0,
            _ => GgmlType::Q5_1,
        };
        w.tensor(name, &info.shape, ty, &values);
    }
    std::fs::write(path, w.to_bytes()).unwrap();
    path.to_path_buf()
}
