//! Bad input to the loaders gives a clear error naming the file and the
//! tensor, never a panic: truncated or corrupt files, unsupported
//! architectures and tensor types, missing tensors, shape mismatches. Also
//! checks every supported GGUF tensor type loads and runs.

use std::path::{Path, PathBuf};

use llmos_meta::gguf::Value;
use llmos_meta::gguf_writer::GgufWriter;
use llmos_meta::quant::{dequantize_into, quantize, GgmlType};
use llmos_meta::ModelSpec;
use llmos_tests::{all_logits, max_abs_diff, try_load, TestModel};
use llmos_worker::LoadOptions;
use tch::{Device, Kind};

const VOCAB: usize = 64;
const HIDDEN: usize = 32;
const INTER: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;
const LAYERS: usize = 2;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
        })
        .collect()
}

/// The tensors of a tiny Llama as (GGUF name, row-major shape).
fn tensors() -> Vec<(String, Vec<usize>)> {
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut t = vec![
        ("token_embd.weight".to_string(), vec![VOCAB, HIDDEN]),
        ("output_norm.weight".to_string(), vec![HIDDEN]),
        ("output.weight".to_string(), vec![VOCAB, HIDDEN]),
    ];
    for i in 0..LAYERS {
        for (n, s) in [
            ("attn_norm.weight", vec![HIDDEN]),
            ("attn_q.weight", vec![q, HIDDEN]),
            ("attn_k.weight", vec![kv, HIDDEN]),
            ("attn_v.weight", vec![kv, HIDDEN]),
            ("attn_output.weight", vec![HIDDEN, q]),
            ("ffn_norm.weight", vec![HIDDEN]),
            ("ffn_gate.weight", vec![INTER, HIDDEN]),
            ("ffn_up.weight", vec![INTER, HIDDEN]),
            ("ffn_down.weight", vec![HIDDEN, INTER]),
        ] {
            t.push((format!("blk.{i}.{n}"), s));
        }
    }
    t
}

/// A tiny Llama GGUF: `matrix_ty` for 2-D weights; `edit` may change the
/// architecture, drop or reshape a tensor, or change a type number.
fn tiny_gguf(dir: &Path, name: &str, matrix_ty: GgmlType, edit: impl Fn(&mut Fixture)) -> PathBuf {
    tiny_gguf_as(dir, name, matrix_ty, false, edit)
}

/// With `as_f32`, 2-D weights hold the values `matrix_ty` would store, but
/// written as F32: the exact reference for loading that type.
fn tiny_gguf_as(
    dir: &Path,
    name: &str,
    matrix_ty: GgmlType,
    as_f32: bool,
    edit: impl Fn(&mut Fixture),
) -> PathBuf {
    let mut f = Fixture {
        arch: "llama".into(),
        tensors: tensors(),
        raw_type: None,
    };
    edit(&mut f);
    let mut w = GgufWriter::new();
    let a = f.arch.clone();
    let u = |v: usize| Value::U32(v as u32);
    w.meta("general.architecture", Value::String(a.clone()))
        .meta(&format!("{a}.block_count"), u(LAYERS))
        .meta(&format!("{a}.context_length"), u(128))
        .meta(&format!("{a}.embedding_length"), u(HIDDEN))
        .meta(&format!("{a}.feed_forward_length"), u(INTER))
        .meta(&format!("{a}.attention.head_count"), u(HEADS))
        .meta(&format!("{a}.attention.head_count_kv"), u(KV_HEADS))
        .meta(
            &format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        )
        .meta(&format!("{a}.rope.freq_base"), Value::F32(10000.0));
    // A byte-level vocabulary of 62 letters and digits, a merge, and EOS.
    let mut toks: Vec<String> = ('a'..='z')
        .chain('A'..='Z')
        .chain('0'..='9')
        .map(String::from)
        .collect();
    toks.push("ab".into());
    toks.push("<|end|>".into());
    let mut types = vec![Value::I32(1); VOCAB - 1];
    types.push(Value::I32(3));
    w.meta("tokenizer.ggml.model", Value::String("gpt2".into()))
        .meta(
            "tokenizer.ggml.tokens",
            Value::Array(toks.into_iter().map(Value::String).collect()),
        )
        .meta("tokenizer.ggml.token_type", Value::Array(types))
        .meta(
            "tokenizer.ggml.merges",
            Value::Array(vec![Value::String("a b".into())]),
        )
        .meta("tokenizer.ggml.eos_token_id", u(VOCAB - 1));
    for (i, (n, shape)) in f.tensors.iter().enumerate() {
        let numel = shape.iter().product();
        let v = values(numel, i as u64 + 1);
        match (&f.raw_type, shape.len()) {
            (Some((target, ty)), _) if target == n => {
                w.raw_tensor(n, shape, *ty, vec![0u8; numel]);
            }
            (_, 1) => {
                let ones: Vec<f32> = v.iter().map(|x| 1.0 + x).collect();
                w.tensor(n, shape, GgmlType::F32, &ones);
            }
            _ if as_f32 => {
                let mut stored = vec![0f32; numel];
                dequantize_into(matrix_ty, &quantize(matrix_ty, &v), &mut stored);
                w.tensor(n, shape, GgmlType::F32, &stored);
            }
            _ => {
                w.tensor(n, shape, matrix_ty, &v);
            }
        }
    }
    let path = dir.join(name);
    w.write(&path).unwrap();
    path
}

struct Fixture {
    arch: String,
    tensors: Vec<(String, Vec<usize>)>,
    raw_type: Option<(String, u32)>,
}

fn load(path: &Path) -> Result<TestModel, String> {
    load_with(path, llmos_worker::Quantization::None)
}

fn load_with(path: &Path, quantization: llmos_worker::Quantization) -> Result<TestModel, String> {
    let spec = ModelSpec::parse(path.to_str().unwrap()).map_err(|e| e.to_string())?;
    let opts = LoadOptions {
        kind: Kind::Float,
        device: Device::Cpu,
        seed: 0,
        quantization,
        kv_kind: None,
    };
    try_load(&spec, &opts)
}

fn load_err(path: &Path) -> String {
    match load(path) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e,
    }
}

fn assert_names(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error {err:?} does not mention {p:?}");
    }
}

#[test]
fn every_supported_gguf_tensor_type_loads_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = (0..12).map(|i| (i * 5 % VOCAB) as u32).collect();
    let plain = all_logits(
        &load(&tiny_gguf(dir.path(), "f32.gguf", GgmlType::F32, |_| {})).unwrap(),
        &ids,
    );
    for ty in [
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_1,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ] {
        let typed = load(&tiny_gguf(dir.path(), &format!("{ty:?}.gguf"), ty, |_| {})).unwrap();
        let exact = load(&tiny_gguf_as(
            dir.path(),
            &format!("{ty:?}-f32.gguf"),
            ty,
            true,
            |_| {},
        ))
        .unwrap();
        let got = all_logits(&typed, &ids);
        // Same values in F32: only summation order may differ.
        let d = max_abs_diff(&got, &all_logits(&exact, &ids));
        assert!(
            d < 1e-5,
            "{ty:?}: differs from its values stored as F32 by {d}"
        );
        // And the type's own (lossy) data was read, not the F32 original.
        assert!(
            max_abs_diff(&got, &plain) > 1e-5,
            "{ty:?}: identical to unquantized weights"
        );
        // Block types also execute in their blocks (`file`): the prompt and
        // one-token decode steps give the same logits.
        if ty.is_quantized() {
            let path = dir.path().join(format!("{ty:?}.gguf"));
            let kept = load_with(&path, llmos_worker::Quantization::File).unwrap();
            assert!(
                kept.model.weight_bytes() < typed.model.weight_bytes(),
                "{ty:?}: the blocks were not kept"
            );
            let d = max_abs_diff(&all_logits(&kept, &ids), &got);
            assert!(d < 1e-4, "{ty:?} kept in blocks, prompt: {d}");
            let d = max_abs_diff(&llmos_tests::chunked_logits(&kept, &ids, 1), &got);
            assert!(d < 1e-4, "{ty:?} kept in blocks, steps: {d}");
        }
    }
}

#[test]
fn truncated_gguf_names_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_gguf(dir.path(), "cut.gguf", GgmlType::F32, |_| {});
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_err(&path);
    assert_names(&err, &["cut.gguf", "truncated", "blk.1.ffn_down.weight"]);
    // Cut inside the header too.
    std::fs::write(&path, &bytes[..200]).unwrap();
    assert_names(&load_err(&path), &["cut.gguf", "truncated"]);
}

#[test]
fn corrupt_magic_and_absurd_counts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_gguf(dir.path(), "bad.gguf", GgmlType::F32, |_| {});
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..4].copy_from_slice(b"GGML");
    std::fs::write(&path, &bytes).unwrap();
    assert_names(&load_err(&path), &["bad.gguf", "not a GGUF file"]);
    // A tensor count of 2^60 must not allocate: it is reported as truncation.
    bytes[..4].copy_from_slice(b"GGUF");
    bytes[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert_names(&load_err(&path), &["bad.gguf", "tensor count"]);
}

#[test]
fn unsupported_architecture_and_tensor_type_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_gguf(dir.path(), "arch.gguf", GgmlType::F32, |f| {
        f.arch = "gptneox".into()
    });
    assert_names(
        &load_err(&path),
        &["arch.gguf", "gptneox", "unsupported architecture"],
    );
    // Q2_K (type 10) is not read.
    let path = tiny_gguf(dir.path(), "q2k.gguf", GgmlType::F32, |f| {
        f.raw_type = Some(("blk.0.attn_q.weight".into(), 10))
    });
    assert_names(
        &load_err(&path),
        &["q2k.gguf", "blk.0.attn_q.weight", "Q2_K", "Q4_K"],
    );
}

#[test]
fn missing_tensor_and_shape_mismatch_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_gguf(dir.path(), "missing.gguf", GgmlType::F32, |f| {
        f.tensors.retain(|(n, _)| n != "blk.1.ffn_up.weight")
    });
    assert_names(
        &load_err(&path),
        &["missing.gguf", "missing tensor", "blk.1.ffn_up.weight"],
    );
    let path = tiny_gguf(dir.path(), "shape.gguf", GgmlType::F32, |f| {
        for (n, s) in f.tensors.iter_mut() {
            if n == "blk.0.ffn_gate.weight" {
                *s = vec![INTER / 2, HIDDEN];
            }
        }
    });
    assert_names(
        &load_err(&path),
        &[
            "shape.gguf",
            "blk.0.ffn_gate.weight",
            "[32, 32]",
            "[64, 32]",
        ],
    );
}

/// Writes a safetensors file by hand: `(name, dtype, shape, bytes)`.
fn write_safetensors(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}),
        );
        data.extend(bytes);
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// A tiny Hugging Face folder; `edit` changes the tensor list.
fn tiny_hf(dir: &Path, edit: impl Fn(&mut Vec<(String, &'static str, Vec<usize>)>)) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let hf_name = |g: &str| {
        let top = match g {
            "token_embd.weight" => Some("model.embed_tokens.weight"),
            "output_norm.weight" => Some("model.norm.weight"),
            "output.weight" => Some("lm_head.weight"),
            _ => None,
        };
        if let Some(t) = top {
            return t.to_string();
        }
        let rest = g.strip_prefix("blk.").unwrap();
        let (i, part) = rest.split_once('.').unwrap();
        let part = match part {
            "attn_norm.weight" => "input_layernorm.weight",
            "attn_q.weight" => "self_attn.q_proj.weight",
            "attn_k.weight" => "self_attn.k_proj.weight",
            "attn_v.weight" => "self_attn.v_proj.weight",
            "attn_output.weight" => "self_attn.o_proj.weight",
            "ffn_norm.weight" => "post_attention_layernorm.weight",
            "ffn_gate.weight" => "mlp.gate_proj.weight",
            "ffn_up.weight" => "mlp.up_proj.weight",
            "ffn_down.weight" => "mlp.down_proj.weight",
            p => panic!("{p}"),
        };
        format!("model.layers.{i}.{part}")
    };
    let mut list: Vec<(String, &'static str, Vec<usize>)> = tensors()
        .into_iter()
        .map(|(n, s)| (hf_name(&n), "F32", s))
        .collect();
    edit(&mut list);
    let t: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = list
        .iter()
        .enumerate()
        .map(|(i, (n, dt, s))| {
            let v = values(s.iter().product(), i as u64);
            let bytes: Vec<u8> = match *dt {
                "F32" => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                _ => vec![0u8; s.iter().product::<usize>()],
            };
            (n.as_str(), *dt, s.clone(), bytes)
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &t);
    dir.to_path_buf()
}

#[test]
fn safetensors_folder_faults_are_named() {
    let root = tempfile::tempdir().unwrap();
    // The well-formed folder loads and runs.
    let ok = tiny_hf(&root.path().join("ok"), |_| {});
    let e = load(&ok).unwrap();
    assert_eq!(all_logits(&e, &[1, 2, 3]).len(), 3 * VOCAB);

    let dir = tiny_hf(&root.path().join("missing"), |l| {
        l.retain(|(n, _, _)| n != "lm_head.weight")
    });
    assert_names(&load_err(&dir), &["missing", "lm_head.weight"]);

    let dir = tiny_hf(&root.path().join("shape"), |l| {
        for (n, _, s) in l.iter_mut() {
            if n == "model.layers.1.self_attn.k_proj.weight" {
                *s = vec![HIDDEN, HIDDEN];
            }
        }
    });
    assert_names(
        &load_err(&dir),
        &[
            "model.safetensors",
            "model.layers.1.self_attn.k_proj.weight",
            "[16, 32]",
        ],
    );

    let dir = tiny_hf(&root.path().join("dtype"), |l| l[0].1 = "I8");
    assert_names(
        &load_err(&dir),
        &["model.safetensors", "model.embed_tokens.weight", "I8"],
    );

    let dir = tiny_hf(&root.path().join("cut"), |_| {});
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 10]).unwrap();
    assert_names(&load_err(&dir), &["model.safetensors", "truncated"]);
    std::fs::write(&f, &bytes[..4]).unwrap();
    assert_names(&load_err(&dir), &["model.safetensors", "truncated"]);

    let dir = tiny_hf(&root.path().join("arch"), |_| {});
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("LlamaForCausalLM", "FalconForCausalLM"),
    )
    .unwrap();
    assert_names(&load_err(&dir), &["config.json", "FalconForCausalLM"]);
}

#[test]
fn unknown_model_names_are_explained() {
    let err = ModelSpec::parse("/no/such/model.gguf")
        .unwrap_err()
        .to_string();
    assert_names(&err, &["/no/such/model.gguf", "no such file"]);
    let err = ModelSpec::parse("synthetic:llama-9000")
        .unwrap_err()
        .to_string();
    assert_names(&err, &["llama-9000", "llama-3.2-1b"]);
}
