//! GGUF reader: header, metadata and tensor directory parsed with bounds checks
//! against the memory-mapped file; tensor data is read lazily by name.
//!
//! Layout (v2/v3, little-endian): magic "GGUF", version u32, tensor count u64,
//! metadata count u64, metadata key/values, tensor infos (name, dims
//! innermost-first, type, offset), padding to `general.alignment`, data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{MetaError, Result};
use crate::quant::GgmlType;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Row-major shape (outermost first), i.e. GGUF's dims reversed.
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute byte range in the file.
    pub start: u64,
    pub len: u64,
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    tensors: BTreeMap<String, GgufTensorInfo>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

const MAGIC: [u8; 4] = *b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

struct Cursor<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(MetaError::Truncated {
                path: self.path.to_path_buf(),
                what: what(),
                start: self.pos as u64,
                end: self.pos as u64 + n as u64,
                len: self.buf.len() as u64,
            }),
        }
    }
    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("length checked"))
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A count that must fit in what is left of the file, each element taking
    /// at least `min_elem` bytes: rejects absurd lengths before allocating.
    fn count(&mut self, min_elem: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_elem as u64) > left {
            return Err(MetaError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{} ({n} elements)", what()),
                start: self.pos as u64,
                end: self.pos as u64 + n.saturating_mul(min_elem as u64),
                len: self.buf.len() as u64,
            });
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.count(1, what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| MetaError::Corrupt {
            path: self.path.to_path_buf(),
            reason: format!("{} is not valid UTF-8", what()),
        })
    }
    fn value(&mut self, ty: u32, what: &dyn Fn() -> String, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => Value::Bool(self.array::<1>(what)?[0] != 0),
            8 => Value::String(self.string(what)?),
            9 if depth == 0 => {
                let elem_ty = self.u32(what)?;
                let n = self.count(1, what)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_ty, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(MetaError::Corrupt {
                    path: self.path.to_path_buf(),
                    reason: format!("{}: unknown value type {other}", what()),
                })
            }
        })
    }
}

impl GgufFile {
    /// Opens and validates `path`: every tensor's data range must lie inside
    /// the file and every tensor type must be one llmos can read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| MetaError::io(&path, e))?;
        // SAFETY: the mapping is read-only; a file changed underneath us while
        // mapped is outside what any model loader can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| MetaError::io(&path, e))?;
        Self::parse(path, mmap)
    }

    /// Parses a GGUF held in memory (`path` names it in errors): what
    /// `open` checks, without a file (the fuzz target's entry).
    pub fn from_bytes(path: impl AsRef<Path>, bytes: &[u8]) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut anon =
            memmap2::MmapMut::map_anon(bytes.len().max(1)).map_err(|e| MetaError::io(&path, e))?;
        anon[..bytes.len()].copy_from_slice(bytes);
        let mmap = anon.make_read_only().map_err(|e| MetaError::io(&path, e))?;
        // The mapping is at least a page: parse only the bytes given.
        Self::parse_len(path, mmap, bytes.len())
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<Self> {
        let len = mmap.len();
        Self::parse_len(path, mmap, len)
    }

    fn parse_len(path: PathBuf, mmap: Mmap, len: usize) -> Result<Self> {
        let mut c = Cursor {
            path: &path,
            buf: &mmap[..len],
            pos: 0,
        };
        let magic: [u8; 4] = c.array(&|| "magic".into())?;
        if magic != MAGIC {
            return Err(MetaError::BadMagic {
                path: path.clone(),
                found: magic,
            });
        }
        let version = c.u32(&|| "version".into())?;
        if !(2..=3).contains(&version) {
            return Err(MetaError::UnsupportedVersion {
                path: path.clone(),
                version,
            });
        }
        let n_tensors = c.count(8 + 4 + 4 + 8, &|| "tensor count".into())?;
        let n_kv = c.count(8 + 4, &|| "metadata count".into())?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&|| format!("metadata key #{i}"))?;
            let ty = c.u32(&|| format!("metadata {key:?} type"))?;
            let v = c.value(ty, &|| format!("metadata {key:?}"), 0)?;
            metadata.insert(key, v);
        }
        let mut raw = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = c.string(&|| format!("tensor name #{i}"))?;
            let n_dims = c.u32(&|| format!("tensor {name:?} dims"))? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(MetaError::Corrupt {
                    path: path.clone(),
                    reason: format!("tensor {name:?} has {n_dims} dimensions (1 to 4 allowed)"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64(&|| format!("tensor {name:?} dims"))?);
            }
            let ty = c.u32(&|| format!("tensor {name:?} type"))?;
            let offset = c.u64(&|| format!("tensor {name:?} offset"))?;
            raw.push((name, dims, ty, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| MetaError::Metadata {
                    path: path.clone(),
                    key: "general.alignment".into(),
                    reason: format!("{v:?} is not a power of two"),
                })?,
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = len as u64;
        let mut tensors = BTreeMap::new();
        for (name, dims, ty, offset) in raw {
            let ty = GgmlType::from_u32(ty).ok_or_else(|| MetaError::UnsupportedTensorType {
                path: path.clone(),
                tensor: name.clone(),
                ty: format!("ggml type {ty} ({})", crate::quant::ggml_type_name(ty)),
                supported: GgmlType::SUPPORTED,
            })?;
            let numel = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| MetaError::Corrupt {
                    path: path.clone(),
                    reason: format!("tensor {name:?} dims {dims:?} overflow"),
                })?;
            if dims[0] % ty.block_size() as u64 != 0 {
                return Err(MetaError::Corrupt {
                    path: path.clone(),
                    reason: format!(
                        "tensor {name:?} row length {} is not a multiple of the {ty:?} block size {}",
                        dims[0],
                        ty.block_size()
                    ),
                });
            }
            let len = numel / ty.block_size() as u64 * ty.block_bytes() as u64;
            let start = data_start.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(start), Some(end)) if end <= file_len => {
                    let shape = dims.iter().rev().map(|&d| d as usize).collect();
                    tensors.insert(
                        name.clone(),
                        GgufTensorInfo {
                            name,
                            shape,
                            ty,
                            start,
                            len,
                        },
                    );
                }
                _ => {
                    return Err(MetaError::Truncated {
                        path: path.clone(),
                        what: format!("tensor {name:?} data"),
                        start: data_start.saturating_add(offset),
                        end: data_start.saturating_add(offset).saturating_add(len),
                        len: file_len,
                    })
                }
            }
        }
        Ok(GgufFile {
            path,
            mmap,
            version,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensors' names, in order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.get(name)
    }

    /// The raw (possibly quantized) bytes of a tensor, borrowed from the map.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        &self.mmap[info.start as usize..(info.start + info.len) as usize]
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn meta_err(&self, key: &str, reason: impl Into<String>) -> MetaError {
        MetaError::Metadata {
            path: self.path.clone(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.get(key) {
            None => Err(self.meta_err(key, "missing")),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.meta_err(key, format!("expected a string, found {v:?}"))),
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        match self.get(key) {
            None => Err(self.meta_err(key, "missing")),
            Some(v) => v.as_u64().ok_or_else(|| {
                self.meta_err(key, format!("expected an unsigned integer, found {v:?}"))
            }),
        }
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        match self.get(key) {
            None => Err(self.meta_err(key, "missing")),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.meta_err(key, format!("expected a number, found {v:?}"))),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value]> {
        match self.get(key) {
            None => Err(self.meta_err(key, "missing")),
            Some(v) => v
                .as_array()
                .ok_or_else(|| self.meta_err(key, "expected an array")),
        }
    }

    pub fn get_string_array(&self, key: &str) -> Result<Vec<&str>> {
        self.get_array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .ok_or_else(|| self.meta_err(key, format!("element {i} is not a string")))
            })
            .collect()
    }
}
