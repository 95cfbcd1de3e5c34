//! The quality cost of int8 weight-only quantization on the embedded
//! SmolLM2, against bf16 (the dtype int8 replaces) on a fixed text: logit
//! error per position, perplexity, agreement of the most likely next token;
//! f32 alongside as the precision ceiling. Printed, and bounded so a broken
//! quantizer (wrong scale axis, lost sign, unscaled rows) fails.

use llmos_tests::*;
use llmos_worker::{LocalSequence, Quantization};
use tch::Kind;

const TEXT: &str = "The history of the printing press begins in the fifteenth century, \
when Johannes Gutenberg combined movable metal type, oil-based ink and a wooden screw press \
into a system that could produce books quickly and at a reasonable cost. Before his work, \
most books in Europe were copied by hand, a slow process that kept them rare and expensive. \
Within a few decades, printing shops had opened in hundreds of cities, and millions of \
volumes were in circulation. Scholars could compare identical copies of a text, merchants \
could spread price lists and news, and reformers could reach readers far beyond their own \
towns. The spread of printed material also encouraged people to learn to read, which in \
turn created a larger market for books, pamphlets and newspapers. Historians still debate \
how much the press caused these changes and how much it simply accelerated trends that \
were already under way, but few doubt that it transformed the way knowledge was stored, \
shared and questioned.";

fn load(kind: Kind, quantization: Quantization) -> TestModel {
    let e = load_quantized("smollm2", kind, quantization);
    tch::set_num_threads(2);
    e
}

/// Perplexity of `ids[1..]` under per-position logits `[t, vocab]`.
fn perplexity(logits: &[f32], ids: &[u32], vocab: usize) -> f64 {
    let n = ids.len() - 1;
    let nll: f64 = (0..n)
        .map(|p| {
            let row = &logits[p * vocab..(p + 1) * vocab];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
            -(row[ids[p + 1] as usize] as f64 - max - z.ln())
        })
        .sum();
    (nll / n as f64).exp()
}

fn argmaxes(logits: &[f32], vocab: usize) -> Vec<usize> {
    logits
        .chunks_exact(vocab)
        .map(|r| {
            r.iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                )
                .0
        })
        .collect()
}

#[test]
fn int8_quality_cost_against_bf16_on_smollm2() {
    let bf16 = load(Kind::BFloat16, Quantization::None);
    let ids = bf16.tokenizer.as_ref().unwrap().encode(TEXT, true).unwrap();
    assert!(ids.len() > 150, "the text is {} tokens", ids.len());
    let vocab = bf16.model.config().vocab_size;
    let l_bf16 = all_logits(&bf16, &ids);
    let bytes_bf16 = bf16.model.weight_bytes();
    drop(bf16);
    let int8 = load(Kind::BFloat16, Quantization::Int8);
    let l_int8 = all_logits(&int8, &ids);
    let bytes_int8 = int8.model.weight_bytes();
    drop(int8);
    let l_f32 = all_logits(&load(Kind::Float, Quantization::None), &ids);

    let mean_abs = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() as f64)
            .sum::<f64>()
            / a.len() as f64
    };
    let agree = |a: &[usize], b: &[usize]| {
        a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
    };
    let (p_f32, p_bf16, p_int8) = (
        perplexity(&l_f32, &ids, vocab),
        perplexity(&l_bf16, &ids, vocab),
        perplexity(&l_int8, &ids, vocab),
    );
    let (a_f32, a_bf16, a_int8) = (
        argmaxes(&l_f32, vocab),
        argmaxes(&l_bf16, vocab),
        argmaxes(&l_int8, vocab),
    );
    let scale = l_bf16.iter().map(|v| v.abs()).fold(0f32, f32::max);
    println!(
        "int8 weight-only quantization, SmolLM2-135M, {} tokens of fixed text:",
        ids.len()
    );
    println!(
        "  weights: bf16 {:.1} MB, int8 {:.1} MB ({:.2}x smaller; embedding/head stay bf16)",
        bytes_bf16 as f64 / 1e6,
        bytes_int8 as f64 / 1e6,
        bytes_bf16 as f64 / bytes_int8 as f64
    );
    println!("  logits vs bf16: int8 max-abs {:.3}, mean-abs {:.4} (bf16 vs f32: max-abs {:.3}, mean-abs {:.4}; largest |logit| {:.1})",
        max_abs_diff(&l_int8, &l_bf16), mean_abs(&l_int8, &l_bf16),
        max_abs_diff(&l_bf16, &l_f32), mean_abs(&l_bf16, &l_f32), scale);
    println!(
        "  perplexity: f32 {p_f32:.3}, bf16 {p_bf16:.3}, int8 {p_int8:.3} ({:+.2}% vs bf16)",
        (p_int8 / p_bf16 - 1.0) * 100.0
    );
    println!(
        "  next-token argmax agreement with bf16: int8 {:.1}%, f32 {:.1}%",
        agree(&a_int8, &a_bf16) * 100.0,
        agree(&a_f32, &a_bf16) * 100.0
    );

    // Quantization happened: weights shrank and logits moved.
    assert!(
        bytes_int8 * 3 < bytes_bf16 * 2,
        "{bytes_int8} vs {bytes_bf16} bytes"
    );
    assert!(mean_abs(&l_int8, &l_bf16) > 0.0);
    // And cost little: within 3% perplexity of bf16, the same most likely
    // token at 90% of positions or more. (A wrong scale axis or an
    // unscaled row makes the model's output noise.)
    assert!(
        p_int8 < p_bf16 * 1.03,
        "perplexity {p_int8} vs bf16 {p_bf16}"
    );
    assert!(agree(&a_int8, &a_bf16) >= 0.9);
}

/// Logits of `ids` fed `chunk` tokens at a time (1: decode steps through
/// the fused path's row products; a few: the batched rows' path).
fn logits_in_chunks(engine: &TestModel, ids: &[u32], chunk: usize) -> Vec<f32> {
    let _g = tch::no_grad_guard();
    let mut seq = LocalSequence::new(&engine.model, ids.len()).unwrap();
    let mut out = Vec::new();
    for c in ids.chunks(chunk) {
        let logits = seq.forward(&engine.model, c, true).unwrap();
        out.extend(Vec::<f32>::try_from(logits.view([-1])).unwrap());
    }
    out
}

/// The embedded Q4_1 file executed in its own blocks (`--quantize file`:
/// Q4_1 layers, the Q8_0 tied head) gives the logits of the same file
/// dequantized to f32 at load (the reference Hugging Face transformers
/// also computes from a GGUF, which `tests/python` compares with), within
/// 1e-3, on a 48-token prompt (4 weight rows at a time dequantized into
/// cache for the f32 register tiles, on AVX-512; longer prompts'
/// dequantize-then-libtorch path is `linear.rs`'s unit test), on one-token
/// decode steps and on 4-token steps (the block kernels), while holding ~5x fewer bytes
/// of weights (the embedding looked up in the head's Q8_0 blocks).
#[test]
fn gguf_blocks_match_the_dequantized_f32_model_on_smollm2() {
    let (dense_bytes, block_bytes) = blocks_match_dequantized("smollm2", "Q4_1 file");
    // The blocks were kept: Q4_1 layers hold 20 of every 128 f32 bytes,
    // the Q8_0 embedding/head 34 of 128, and no dense embedding is left.
    assert!(
        (block_bytes as f64) < dense_bytes as f64 * 0.25,
        "{block_bytes} vs {dense_bytes} bytes"
    );
}

/// `spec` executed in its blocks (`--quantize file`) against the same
/// file dequantized to f32 at load: logits within 1e-3 on a 48-token
/// prompt, on one-token decode steps and on 4-token steps (the block
/// kernels). Returns the weights' bytes, dense and in blocks.
fn blocks_match_dequantized(spec: &str, what_file: &str) -> (usize, usize) {
    let dense = load_quantized(spec, Kind::Float, Quantization::None);
    tch::set_num_threads(2);
    let ids = dense
        .tokenizer
        .as_ref()
        .unwrap()
        .encode(TEXT, true)
        .unwrap();
    let ids = &ids[..48];
    let want = all_logits(&dense, ids);
    let want_steps = logits_in_chunks(&dense, ids, 1);
    let dense_bytes = dense.model.weight_bytes();
    drop(dense);
    let blocks = load_quantized(spec, Kind::Float, Quantization::File);
    tch::set_num_threads(2);
    let block_bytes = blocks.model.weight_bytes();
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
    println!(
        "SmolLM2 {what_file}, {} tokens: weights f32 {:.1} MB, kept in blocks {:.1} MB; largest |logit| {scale:.1}",
        ids.len(),
        dense_bytes as f64 / 1e6,
        block_bytes as f64 / 1e6
    );
    for (what, got, reference) in [
        ("prompt", all_logits(&blocks, ids), &want),
        (
            "1-token steps",
            logits_in_chunks(&blocks, ids, 1),
            &want_steps,
        ),
        ("4-token steps", logits_in_chunks(&blocks, ids, 4), &want),
    ] {
        let d = max_abs_diff(&got, reference);
        println!("  {what}: max |logit - dequantized f32 logit| = {d:.2e}");
        assert!(d < 1e-3, "{what}: {d}");
    }
    (dense_bytes, block_bytes)
}

/// The bf16 and f16 KV cache options on the f32 model (`--kv-dtype bf16`,
/// `--kv-dtype f16`): the logit cost of rounding cached keys and values, on
/// one-token decode steps (the fused step reading the pool in place) and on
/// a prompt continued in a second chunk (gathering the cached positions).
/// Printed; bounded so a pool that is not rounded (no difference) or a
/// broken conversion (noise) fails. f16 keeps 3 more bits than bf16, so its
/// bound is 8x tighter.
#[test]
fn reduced_kv_cache_cost_on_the_f32_model() {
    let full = load(Kind::Float, Quantization::None);
    let ids = full.tokenizer.as_ref().unwrap().encode(TEXT, true).unwrap();
    let ids = &ids[..64];
    let vocab = full.model.config().vocab_size;
    let want_steps = logits_in_chunks(&full, ids, 1);
    let want_chunked = chunked_logits(&full, ids, 40);
    drop(full);
    let spec = llmos_meta::ModelSpec::parse("smollm2").unwrap();
    for (kv_kind, name, bound) in [(Kind::BFloat16, "bf16", 1.0), (Kind::Half, "f16", 0.125)] {
        let opts = llmos_worker::LoadOptions {
            kind: Kind::Float,
            kv_kind: Some(kv_kind),
            ..Default::default()
        };
        let rounded = try_load(&spec, &opts).unwrap();
        let got_steps = logits_in_chunks(&rounded, ids, 1);
        let got_chunked = chunked_logits(&rounded, ids, 40);
        drop(rounded);
        let agree = argmaxes(&got_steps, vocab)
            .iter()
            .zip(argmaxes(&want_steps, vocab))
            .filter(|(a, b)| **a == *b)
            .count() as f64
            / ids.len() as f64;
        let (d_steps, d_chunked) = (
            max_abs_diff(&got_steps, &want_steps),
            max_abs_diff(&got_chunked, &want_chunked),
        );
        println!(
            "{name} KV cache on the f32 SmolLM2, {} positions: max |logit diff| steps {d_steps:.4}, chunked prompt {d_chunked:.4}; next-token argmax agreement {:.1}%",
            ids.len(),
            agree * 100.0
        );
        assert!(
            d_steps > 0.0 && d_chunked > 0.0,
            "{name}: the cache was not rounded"
        );
        assert!(
            d_steps < bound && d_chunked < bound,
            "{name}: {d_steps} {d_chunked} (bound {bound})"
        );
        assert!(agree >= 0.9, "{name}: {agree}");
    }
}

/// Q5_0, Q5_1, Q4_K and Q6_K (with Q8_0): the embedded model rewritten
/// with the types of llama.cpp's K-quant files (`mixed_block_smollm2`,
/// whose fused q/k/v projections hold parts of two types).
/// Its dequantization equals gguf-py's bit for bit, every tensor; executed
/// in its blocks (`--quantize file`) it gives the logits of the same file
/// dequantized to f32 within 1e-3, on a prompt, one-token decode steps and
/// 4-token steps. (`tests/parity.rs` compares the file with transformers.)
#[test]
fn k_quant_and_q5_blocks_match_their_dequantization_on_smollm2() {
    use llmos_meta::gguf::GgufFile;
    use llmos_meta::quant::dequantize_into;
    let dir = tempfile::tempdir().unwrap();
    let path = mixed_block_smollm2(&dir.path().join("smollm2-mixed.gguf"));

    // Dequantization against gguf-py.
    let out = dir.path().join("reference");
    std::fs::create_dir(&out).unwrap();
    let status = std::process::Command::new(python())
        .arg(repo_root().join("tests/parity/gguf_dequant.py"))
        .arg(&path)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "gguf_dequant.py: {status}");
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("tensors.json")).unwrap()).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let mut types = std::collections::BTreeMap::new();
    for t in &listed {
        let name = t["name"].as_str().unwrap();
        let info = file.tensor(name).unwrap();
        let mut ours = vec![0f32; info.shape.iter().product()];
        dequantize_into(info.ty, file.tensor_bytes(info), &mut ours);
        let want = read_f32(std::path::Path::new(t["file"].as_str().unwrap()));
        assert_eq!(ours.len(), want.len(), "{name}");
        let bad = ours
            .iter()
            .zip(&want)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(
            bad.is_none(),
            "{name} ({:?}): value {} is {} here, {} in gguf-py",
            info.ty,
            bad.unwrap(),
            ours[bad.unwrap()],
            want[bad.unwrap()]
        );
        *types.entry(format!("{:?}", info.ty)).or_insert(0) += 1;
    }
    println!("dequantized exactly as gguf-py: {types:?}");
    for ty in ["Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0"] {
        assert!(
            types.contains_key(ty),
            "no {ty} tensor was compared: {types:?}"
        );
    }

    // Executed in blocks against the dequantized model.
    let (dense_bytes, block_bytes) =
        blocks_match_dequantized(path.to_str().unwrap(), "Q4_K/Q6_K/Q5_0/Q5_1/Q8_0 file");
    // Every matrix stays in the file's blocks, the fused q/k/v projections
    // too (parts of two types): the weights take no more than the file.
    let file_bytes = std::fs::metadata(&path).unwrap().len() as usize;
    println!("  file {:.1} MB", file_bytes as f64 / 1e6);
    assert!(
        block_bytes <= file_bytes && (block_bytes as f64) < dense_bytes as f64 * 0.3,
        "{block_bytes} bytes of weights, {file_bytes} in the file, {dense_bytes} dense: the blocks were not kept"
    );
}
