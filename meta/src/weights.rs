//! Host-side weight access: the `WeightSource` seam with a GGUF and a
//! Hugging Face safetensors implementation. Both map a logical `WeightKey` to
//! the file's own tensor name, check bounds, and hand out row-major tensors in
//! F32, F16 or BF16 (quantized GGUF types are dequantized to F32 here; GGUF's
//! llama.cpp-permuted Q/K rows are restored to Hugging Face's order).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::config::{Architecture, ModelConfig};
use crate::error::{MetaError, Result};
use crate::gguf::GgufFile;
use crate::quant::{dequantize_into, GgmlType};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerPart {
    AttnNorm,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    MlpNorm,
    Gate,
    Up,
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightKey {
    Embed,
    FinalNorm,
    LmHead,
    Layer(usize, LayerPart),
}

impl WeightKey {
    /// The shape the model expects for this weight.
    pub fn expected_shape(&self, c: &ModelConfig) -> Vec<usize> {
        let (h, q, kv) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        match self {
            WeightKey::Embed | WeightKey::LmHead => vec![c.vocab_size, h],
            WeightKey::FinalNorm => vec![h],
            WeightKey::Layer(_, p) => match p {
                LayerPart::AttnNorm | LayerPart::MlpNorm => vec![h],
                LayerPart::Q => vec![q, h],
                LayerPart::K | LayerPart::V => vec![kv, h],
                LayerPart::O => vec![h, q],
                LayerPart::QBias => vec![q],
                LayerPart::KBias | LayerPart::VBias => vec![kv],
                LayerPart::Gate | LayerPart::Up => vec![c.intermediate_size, h],
                LayerPart::Down => vec![h, c.intermediate_size],
            },
        }
    }

    fn gguf_name(&self) -> String {
        match self {
            WeightKey::Embed => "token_embd.weight".into(),
            WeightKey::FinalNorm => "output_norm.weight".into(),
            WeightKey::LmHead => "output.weight".into(),
            WeightKey::Layer(i, p) => {
                let s = match p {
                    LayerPart::AttnNorm => "attn_norm.weight",
                    LayerPart::Q => "attn_q.weight",
                    LayerPart::K => "attn_k.weight",
                    LayerPart::V => "attn_v.weight",
                    LayerPart::O => "attn_output.weight",
                    LayerPart::QBias => "attn_q.bias",
                    LayerPart::KBias => "attn_k.bias",
                    LayerPart::VBias => "attn_v.bias",
                    LayerPart::MlpNorm => "ffn_norm.weight",
                    LayerPart::Gate => "ffn_gate.weight",
                    LayerPart::Up => "ffn_up.weight",
                    LayerPart::Down => "ffn_down.weight",
                };
                format!("blk.{i}.{s}")
            }
        }
    }

    fn hf_name(&self) -> String {
        match self {
            WeightKey::Embed => "model.embed_tokens.weight".into(),
            WeightKey::FinalNorm => "model.norm.weight".into(),
            WeightKey::LmHead => "lm_head.weight".into(),
            WeightKey::Layer(i, p) => {
                let s = match p {
                    LayerPart::AttnNorm => "input_layernorm.weight",
                    LayerPart::Q => "self_attn.q_proj.weight",
                    LayerPart::K => "self_attn.k_proj.weight",
                    LayerPart::V => "self_attn.v_proj.weight",
                    LayerPart::O => "self_attn.o_proj.weight",
                    LayerPart::QBias => "self_attn.q_proj.bias",
                    LayerPart::KBias => "self_attn.k_proj.bias",
                    LayerPart::VBias => "self_attn.v_proj.bias",
                    LayerPart::MlpNorm => "post_attention_layernorm.weight",
                    LayerPart::Gate => "mlp.gate_proj.weight",
                    LayerPart::Up => "mlp.up_proj.weight",
                    LayerPart::Down => "mlp.down_proj.weight",
                };
                format!("model.layers.{i}.{s}")
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostDType {
    F32,
    F16,
    BF16,
}

impl HostDType {
    pub fn size(self) -> usize {
        match self {
            HostDType::F32 => 4,
            HostDType::F16 | HostDType::BF16 => 2,
        }
    }
}

/// A row-major tensor in host memory, borrowed from a mapping where possible.
#[derive(Debug)]
pub struct HostTensor<'a> {
    /// The tensor's name in its file, for messages.
    pub name: String,
    pub file: PathBuf,
    pub shape: Vec<usize>,
    pub dtype: HostDType,
    pub bytes: Cow<'a, [u8]>,
}

impl HostTensor<'_> {
    /// Fails with `ShapeMismatch` naming the file and tensor.
    pub fn check_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(MetaError::ShapeMismatch {
                path: self.file.clone(),
                tensor: self.name.clone(),
                expected: expected.to_vec(),
                found: self.shape.clone(),
            });
        }
        Ok(())
    }
}

/// A contiguous range of one dimension of a weight: a tensor-parallel
/// rank's part (rows of a column-parallel weight, columns of a row-parallel
/// one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    pub dim: usize,
    pub start: usize,
    pub len: usize,
}

impl HostTensor<'_> {
    /// Checks that `s` lies inside this tensor, naming the file and tensor.
    fn check_slice(&self, s: Slice) -> Result<()> {
        let ok =
            s.dim < self.shape.len().min(2) && s.len > 0 && s.start + s.len <= self.shape[s.dim];
        if !ok {
            return Err(MetaError::Corrupt {
                path: self.file.clone(),
                reason: format!(
                    "tensor {}: slice {s:?} is outside its shape {:?}",
                    self.name, self.shape
                ),
            });
        }
        Ok(())
    }

    /// The part `s` names, as its own row-major tensor (rows of a borrowed
    /// tensor stay borrowed).
    pub fn slice(self, s: Slice) -> Result<Self> {
        self.check_slice(s)?;
        let es = self.dtype.size();
        let cols: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[s.dim] = s.len;
        let bytes: Cow<[u8]> = if s.dim == 0 {
            let (a, b) = (s.start * cols * es, (s.start + s.len) * cols * es);
            match self.bytes {
                Cow::Borrowed(all) => Cow::Borrowed(&all[a..b]),
                Cow::Owned(all) => Cow::Owned(all[a..b].to_vec()),
            }
        } else {
            let row = cols * es;
            let (a, b) = (s.start * es, (s.start + s.len) * es);
            Cow::Owned(
                self.bytes
                    .chunks_exact(row)
                    .flat_map(|r| r[a..b].iter().copied())
                    .collect(),
            )
        };
        Ok(HostTensor {
            shape,
            bytes,
            ..self
        })
    }
}

/// Where a model's weights come from.
pub trait WeightSource: Send + Sync {
    /// The file or folder, for messages.
    fn origin(&self) -> &Path;
    fn contains(&self, key: WeightKey) -> bool;
    /// Loads a weight; `MissingTensor` names the file's tensor name if absent.
    fn load(&self, key: WeightKey) -> Result<HostTensor<'_>>;
    /// Loads part of a weight, reading (and dequantizing) as little of the
    /// file as the format allows.
    fn load_slice(&self, key: WeightKey, s: Slice) -> Result<HostTensor<'_>> {
        self.load(key)?.slice(s)
    }
    /// The stored shape of a weight without reading it (`None`: unknown
    /// without reading).
    fn load_shape(&self, _key: WeightKey) -> Result<Option<Vec<usize>>> {
        Ok(None)
    }
    /// A 2-D weight, or `part` of it, in the file's own block quantization
    /// (Q8_0, Q4_0, Q4_1), not dequantized: `None` when it is not stored
    /// so, or the part is not whole rows or whole blocks of columns (the
    /// caller then loads it dense).
    fn load_blocks(
        &self,
        _key: WeightKey,
        _part: Option<Slice>,
    ) -> Result<Option<BlockTensor<'_>>> {
        Ok(None)
    }
}

/// Rows of block-quantized weights as the file stores them: `rows` rows of
/// `cols / 32` blocks of `ty` each.
#[derive(Debug)]
pub struct BlockTensor<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: Cow<'a, [u8]>,
}

/// Undo llama.cpp's Q/K row permutation (its converter interleaves the two
/// rotary halves of each head): row (h, j, a) moves to (h, a, j), where a
/// head's rows are j in 0..head_dim/2 and a in 0..2.
fn unpermute_rows(bytes: &[u8], rows: usize, row_bytes: usize, n_heads: usize) -> Vec<u8> {
    let per_head = rows / n_heads;
    let half = per_head / 2;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..n_heads {
        for j in 0..half {
            for a in 0..2 {
                let src = h * per_head + j * 2 + a;
                let dst = h * per_head + a * half + j;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

/// Weights from a GGUF file.
pub struct GgufWeights {
    file: GgufFile,
    num_heads: usize,
    num_kv_heads: usize,
    permuted_qk: bool,
}

impl GgufWeights {
    pub fn new(file: GgufFile, cfg: &ModelConfig) -> Self {
        // llama.cpp's converter permutes Q/K for the llama architecture (which
        // includes Mistral); Qwen2 files keep Hugging Face's layout.
        let permuted_qk = matches!(cfg.arch, Architecture::Llama | Architecture::Mistral);
        GgufWeights {
            file,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            permuted_qk,
        }
    }
}

impl WeightSource for GgufWeights {
    fn origin(&self) -> &Path {
        self.file.path()
    }

    fn contains(&self, key: WeightKey) -> bool {
        self.file.tensor(&key.gguf_name()).is_some()
    }

    fn load(&self, key: WeightKey) -> Result<HostTensor<'_>> {
        self.load_part(key, None)
    }

    fn load_slice(&self, key: WeightKey, s: Slice) -> Result<HostTensor<'_>> {
        self.load_part(key, Some(s))
    }

    fn load_shape(&self, key: WeightKey) -> Result<Option<Vec<usize>>> {
        Ok(self.file.tensor(&key.gguf_name()).map(|i| i.shape.clone()))
    }

    fn load_blocks(&self, key: WeightKey, part: Option<Slice>) -> Result<Option<BlockTensor<'_>>> {
        let name = key.gguf_name();
        let Some(info) = self.file.tensor(&name) else {
            return Ok(None);
        };
        if !info.ty.is_quantized() || info.shape.len() != 2 {
            return Ok(None);
        }
        let (ty, rows, cols) = (info.ty, info.shape[0], info.shape[1]);
        let (bs, bb) = (ty.block_size(), ty.block_bytes());
        let row_bytes = cols / bs * bb;
        let raw = self.file.tensor_bytes(info);
        let s = part.unwrap_or(Slice {
            dim: 0,
            start: 0,
            len: rows,
        });
        HostTensor {
            name: name.clone(),
            file: self.file.path().to_path_buf(),
            shape: info.shape.clone(),
            dtype: HostDType::F32,
            bytes: Cow::Borrowed(&[]),
        }
        .check_slice(s)?;
        let (rows_out, cols_out, bytes): (usize, usize, Cow<[u8]>) = if s.dim == 0 {
            let b = &raw[s.start * row_bytes..(s.start + s.len) * row_bytes];
            (s.len, cols, Cow::Borrowed(b))
        } else if s.start.is_multiple_of(bs) && s.len.is_multiple_of(bs) {
            let (a, b) = (s.start / bs * bb, (s.start + s.len) / bs * bb);
            let mut out = Vec::with_capacity(rows * (b - a));
            for r in 0..rows {
                out.extend_from_slice(&raw[r * row_bytes + a..r * row_bytes + b]);
            }
            (rows, s.len, Cow::Owned(out))
        } else {
            return Ok(None);
        };
        let bytes = self.restore_rows(
            key,
            &name,
            &info.shape,
            part,
            rows_out,
            cols_out / bs * bb,
            bytes,
        )?;
        Ok(Some(BlockTensor {
            ty,
            rows: rows_out,
            cols: cols_out,
            bytes,
        }))
    }
}

impl GgufWeights {
    /// Loads a weight or a slice of it: rows of a quantized tensor are
    /// dequantized alone, and so are block-aligned column ranges.
    fn load_part(&self, key: WeightKey, part: Option<Slice>) -> Result<HostTensor<'_>> {
        let name = key.gguf_name();
        let info = self
            .file
            .tensor(&name)
            .ok_or_else(|| MetaError::MissingTensor {
                path: self.file.path().to_path_buf(),
                tensor: name.clone(),
            })?;
        let raw = self.file.tensor_bytes(info);
        let whole = |dtype, bytes| HostTensor {
            name: name.clone(),
            file: self.file.path().to_path_buf(),
            shape: info.shape.clone(),
            dtype,
            bytes,
        };
        let (shape, dtype, mut bytes): (Vec<usize>, HostDType, Cow<[u8]>) = match (info.ty, part) {
            (GgmlType::F32, _) | (GgmlType::F16, _) | (GgmlType::BF16, _) => {
                let dtype = match info.ty {
                    GgmlType::F32 => HostDType::F32,
                    GgmlType::F16 => HostDType::F16,
                    _ => HostDType::BF16,
                };
                let t = match part {
                    Some(s) => whole(dtype, Cow::Borrowed(raw)).slice(s)?,
                    None => whole(dtype, Cow::Borrowed(raw)),
                };
                (t.shape, t.dtype, t.bytes)
            }
            (ty, _) => {
                let rows = info.shape[0];
                let cols: usize = info.shape[1..].iter().product();
                let (bs, bb) = (ty.block_size(), ty.block_bytes());
                let row_bytes = cols / bs * bb;
                let s = part.unwrap_or(Slice {
                    dim: 0,
                    start: 0,
                    len: rows,
                });
                whole(HostDType::F32, Cow::Borrowed(&[])).check_slice(s)?;
                let mut shape = info.shape.clone();
                shape[s.dim] = s.len;
                let f: Vec<f32> = if s.dim == 0 {
                    let src = &raw[s.start * row_bytes..(s.start + s.len) * row_bytes];
                    let mut f = vec![0f32; s.len * cols];
                    dequantize_into(ty, src, &mut f);
                    f
                } else if s.start % bs == 0 && s.len % bs == 0 {
                    // Only the blocks of the column range, row by row.
                    let (a, b) = (s.start / bs * bb, (s.start + s.len) / bs * bb);
                    let mut f = vec![0f32; rows * s.len];
                    for (r, out) in f.chunks_exact_mut(s.len).enumerate() {
                        dequantize_into(ty, &raw[r * row_bytes + a..r * row_bytes + b], out);
                    }
                    f
                } else {
                    let mut row = vec![0f32; cols];
                    let mut f = Vec::with_capacity(rows * s.len);
                    for r in 0..rows {
                        dequantize_into(ty, &raw[r * row_bytes..(r + 1) * row_bytes], &mut row);
                        f.extend_from_slice(&row[s.start..s.start + s.len]);
                    }
                    f
                };
                let b: Vec<u8> = f.iter().flat_map(|v| v.to_le_bytes()).collect();
                (shape, HostDType::F32, Cow::Owned(b))
            }
        };
        if shape.len() == 2 {
            let row_bytes = shape[1] * dtype.size();
            bytes = self.restore_rows(key, &name, &info.shape, part, shape[0], row_bytes, bytes)?;
        }
        Ok(HostTensor {
            name,
            file: self.file.path().to_path_buf(),
            shape,
            dtype,
            bytes,
        })
    }

    /// Undoes llama.cpp's Q/K row permutation on `rows` rows of
    /// `row_bytes` each (the whole weight of shape `full`, or the part
    /// `part` of whole heads); other weights pass through.
    #[allow(clippy::too_many_arguments)]
    fn restore_rows<'b>(
        &self,
        key: WeightKey,
        name: &str,
        full: &[usize],
        part: Option<Slice>,
        rows: usize,
        row_bytes: usize,
        bytes: Cow<'b, [u8]>,
    ) -> Result<Cow<'b, [u8]>> {
        if !self.permuted_qk {
            return Ok(bytes);
        }
        let n = match key {
            WeightKey::Layer(_, LayerPart::Q) => self.num_heads,
            WeightKey::Layer(_, LayerPart::K) => self.num_kv_heads,
            _ => return Ok(bytes),
        };
        let all = full[0];
        if !all.is_multiple_of(2 * n) {
            return Err(MetaError::ShapeMismatch {
                path: self.file.path().to_path_buf(),
                tensor: name.to_string(),
                expected: vec![n * (all / n).max(2), full[1]],
                found: full.to_vec(),
            });
        }
        // The permutation is within each head: a slice of whole heads is
        // restored on its own.
        let per_head = all / n;
        let n = match part {
            Some(s) if s.dim == 0 => {
                if s.start % per_head != 0 || s.len % per_head != 0 {
                    return Err(MetaError::Corrupt {
                        path: self.file.path().to_path_buf(),
                        reason: format!(
                            "tensor {name}: rows {}..{} are not whole heads of {per_head}",
                            s.start,
                            s.start + s.len
                        ),
                    });
                }
                s.len / per_head
            }
            _ => n,
        };
        Ok(Cow::Owned(unpermute_rows(&bytes, rows, row_bytes, n)))
    }
}

struct StEntry {
    file: usize,
    dtype: HostDType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// Weights from a Hugging Face folder: `model.safetensors` or the shards
/// listed in `model.safetensors.index.json`, each memory-mapped.
pub struct SafetensorsWeights {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, StEntry>,
}

impl SafetensorsWeights {
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| MetaError::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| MetaError::Corrupt {
                    path: index.clone(),
                    reason: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| MetaError::Corrupt {
                    path: index.clone(),
                    reason: "no \"weight_map\" object".into(),
                })?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (fi, path) in names.into_iter().enumerate() {
            let f = std::fs::File::open(&path).map_err(|e| MetaError::io(&path, e))?;
            // SAFETY: read-only mapping of a weights file.
            let mmap = unsafe { Mmap::map(&f) }.map_err(|e| MetaError::io(&path, e))?;
            for (name, e) in parse_safetensors_header(&path, &mmap, fi)? {
                entries.insert(name, e);
            }
            files.push((path, mmap));
        }
        Ok(SafetensorsWeights {
            dir: dir.to_path_buf(),
            files,
            entries,
        })
    }
}

/// Checks a safetensors file's header held in memory (the fuzz target's
/// entry): the tensors it lists, or why it is refused.
#[doc(hidden)]
pub fn check_safetensors_header(buf: &[u8]) -> Result<usize> {
    parse_safetensors_header(Path::new("<fuzz>"), buf, 0).map(|v| v.len())
}

fn parse_safetensors_header(
    path: &Path,
    buf: &[u8],
    file: usize,
) -> Result<Vec<(String, StEntry)>> {
    let truncated = |what: &str, start: u64, end: u64| MetaError::Truncated {
        path: path.to_path_buf(),
        what: what.into(),
        start,
        end,
        len: buf.len() as u64,
    };
    let corrupt = |reason: String| MetaError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if buf.len() < 8 {
        return Err(truncated("safetensors header length", 0, 8));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap());
    let header_end = 8u64.checked_add(n).filter(|&e| e <= buf.len() as u64);
    let header_end = header_end
        .ok_or_else(|| truncated("safetensors header", 8, 8u64.saturating_add(n)))?
        as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&buf[8..header_end])
            .map_err(|e| corrupt(format!("header JSON: {e}")))?;
    let data_len = (buf.len() - header_end) as u64;
    let mut out = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let dt = v.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        let dtype = match dt {
            "F32" => HostDType::F32,
            "F16" => HostDType::F16,
            "BF16" => HostDType::BF16,
            _ => {
                return Err(MetaError::UnsupportedTensorType {
                    path: path.to_path_buf(),
                    tensor: name,
                    ty: dt.to_string(),
                    supported: "F32, F16, BF16",
                })
            }
        };
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64().map(|x| x as usize))
                    .collect()
            })
            .ok_or_else(|| corrupt(format!("tensor {name:?} has no shape")))?;
        let offs: Vec<u64> = v
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .filter(|o: &Vec<u64>| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| corrupt(format!("tensor {name:?} has bad data_offsets")))?;
        let numel: u64 = shape.iter().map(|&d| d as u64).product();
        if offs[1] - offs[0] != numel * dtype.size() as u64 {
            return Err(corrupt(format!(
                "tensor {name:?}: {} bytes for shape {shape:?} of {dt}",
                offs[1] - offs[0]
            )));
        }
        if offs[1] > data_len {
            return Err(truncated(
                &format!("tensor {name:?} data"),
                header_end as u64 + offs[0],
                header_end as u64 + offs[1],
            ));
        }
        out.push((
            name,
            StEntry {
                file,
                dtype,
                shape,
                start: header_end + offs[0] as usize,
                end: header_end + offs[1] as usize,
            },
        ));
    }
    Ok(out)
}

impl WeightSource for SafetensorsWeights {
    fn origin(&self) -> &Path {
        &self.dir
    }

    fn contains(&self, key: WeightKey) -> bool {
        self.entries.contains_key(&key.hf_name())
    }

    fn load_shape(&self, key: WeightKey) -> Result<Option<Vec<usize>>> {
        Ok(self.entries.get(&key.hf_name()).map(|e| e.shape.clone()))
    }

    fn load(&self, key: WeightKey) -> Result<HostTensor<'_>> {
        let name = key.hf_name();
        let e = self
            .entries
            .get(&name)
            .ok_or_else(|| MetaError::MissingTensor {
                path: self.dir.clone(),
                tensor: name.clone(),
            })?;
        let (path, mmap) = &self.files[e.file];
        Ok(HostTensor {
            name,
            file: path.clone(),
            shape: e.shape.clone(),
            dtype: e.dtype,
            bytes: Cow::Borrowed(&mmap[e.start..e.end]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(n, 2, d/2, ...).swapaxes(1, 2): row (h, a, j) -> (h, j, a).
        let (n, per_head) = (2usize, 6usize);
        let rows = n * per_head;
        let orig: Vec<u8> = (0..rows as u8).collect();
        let mut permuted = vec![0u8; rows];
        for h in 0..n {
            for a in 0..2 {
                for j in 0..per_head / 2 {
                    permuted[h * per_head + j * 2 + a] = orig[h * per_head + a * per_head / 2 + j];
                }
            }
        }
        assert_ne!(permuted, orig);
        assert_eq!(unpermute_rows(&permuted, rows, 1, n), orig);
    }
}
