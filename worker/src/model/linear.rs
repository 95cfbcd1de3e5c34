//! `Linear`: a weight `[out, in]` with optional bias, held in the model's
//! dtype, as int8 with per-output-channel scales (weight-only
//! quantization, [`Quantization::Int8`]), or in GGUF blocks (Q8_0, Q4_0,
//! Q4_1 named or as the file holds them, and Q5_0, Q5_1, Q4_K, Q6_K as the
//! file holds them: [`Quantization::Blocks`], [`Quantization::File`]).
//!
//! Block weights are multiplied in their blocks (`kernels::cpu::quant`)
//! for up to `SMALL_BATCH` rows, and up to `BLOCK_TILED_BATCH` where the
//! CPU has AVX-512 (4 weight rows dequantized into cache at a time, then
//! the f32 register tiles); larger batches dequantize the whole weight to the
//! input's dtype for the call (a long prompt's product is bound by
//! arithmetic, not by the bytes of the weight) and take libtorch's product.
//!
//! Up to `SMALL_BATCH` input rows on CPU (decode steps) go through the
//! `gemv` kernel, which reads each weight row once for all rows (f32, bf16
//! or int8 rows; an int8 row's dot product is scaled after). Larger batches
//! go through libtorch: `linear` for dense weights; for int8, a product with
//! the integer values widened to the input's dtype (exact: |q| <= 127),
//! scaled per output column. (libtorch's `_weight_int8pack_mm` was measured
//! on this machine's CPU for a 35-row prompt: as fast in bf16, 15x slower
//! in f32.)

use tch::{Device, Kind, Tensor};

use super::{ModelError, Result};
use llmos_kernels::cpu::gemv::{gemv_batch, pool};
use llmos_kernels::cpu::quant::{self as blockq, Blocks};
use llmos_meta::quant::GgmlType;

/// How a model's linear weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// In the model's dtype.
    #[default]
    None,
    /// int8 with one f32 scale per output channel (`max|row| / 127`); the
    /// embedding, norms and LM head stay in the model's dtype.
    Int8,
    /// The layers' linear weights in GGUF blocks of this type (Q8_0, Q4_0,
    /// Q4_1): the file's own blocks where it stores a weight so, else
    /// quantized at load with llama.cpp's rounding. The embedding, norms
    /// and head stay in the model's dtype.
    Blocks(GgmlType),
    /// Every weight as the GGUF file quantizes it: the layers' linears and
    /// the head in the file's blocks where they are of a block type
    /// (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K), the rest in the model's
    /// dtype (dequantized).
    File,
}

impl Quantization {
    /// Names accepted by `--quantize` and deploy requests.
    pub const SUPPORTED: &'static str = "none, int8, q8_0, q4_0, q4_1, file";

    /// `""`/`none`, `int8`, `q8_0`, `q4_0`, `q4_1` or `file`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "" | "none" => Ok(Quantization::None),
            "int8" => Ok(Quantization::Int8),
            "q8_0" => Ok(Quantization::Blocks(GgmlType::Q8_0)),
            "q4_0" => Ok(Quantization::Blocks(GgmlType::Q4_0)),
            "q4_1" => Ok(Quantization::Blocks(GgmlType::Q4_1)),
            "file" => Ok(Quantization::File),
            other => Err(ModelError::Invalid(format!(
                "unknown quantization {other:?} (supported: {})",
                Self::SUPPORTED
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::Int8 => "int8",
            Quantization::Blocks(GgmlType::Q8_0) => "q8_0",
            Quantization::Blocks(GgmlType::Q4_0) => "q4_0",
            Quantization::Blocks(_) => "q4_1",
            Quantization::File => "file",
        }
    }

    /// Whether a stored block type is kept as it is.
    pub fn keeps(self, ty: GgmlType) -> bool {
        match self {
            Quantization::Blocks(want) => want == ty,
            Quantization::File => blockq::is_block_type(ty),
            _ => false,
        }
    }
}

enum Store {
    /// The weight in the model's dtype; `fast`: a contiguous CPU f32 or
    /// bf16 tensor the `gemv` kernel reads.
    Dense { weight: Tensor, fast: bool },
    /// int8 `[out, in]` and f32 scales `[out]` (also as a vector).
    Int8 {
        q: Tensor,
        scales: Tensor,
        scales_f32: Vec<f32>,
    },
    /// GGUF blocks: `parts` (block type, rows) one after another, their
    /// bytes in one flat CPU uint8 tensor (a fused projection may hold
    /// parts the file stores in different types).
    Blocks {
        parts: Vec<(GgmlType, usize)>,
        data: Tensor,
    },
}

pub struct Linear {
    store: Store,
    bias: Option<Tensor>,
    /// The bias as f32, for `gemv_into`.
    bias_f32: Option<Vec<f32>>,
    out_f: i64,
    in_f: i64,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::with(weight, bias, Quantization::None).expect("a dense weight needs no conversion")
    }

    /// The weight stored as `quant` says (quantized on its device).
    pub fn with(weight: Tensor, bias: Option<Tensor>, quant: Quantization) -> Result<Self> {
        let (out_f, in_f) = (weight.size()[0], weight.size()[1]);
        let store = match quant {
            // `file` keeps blocks only where the file has them (the loader
            // hands those to `from_blocks`): a dense weight stays dense.
            Quantization::None | Quantization::File => {
                let weight = weight.contiguous();
                let fast = weight.device() == Device::Cpu
                    && matches!(weight.kind(), Kind::Float | Kind::BFloat16);
                Store::Dense { weight, fast }
            }
            Quantization::Int8 => {
                let (q, scales) = llmos_kernels::cuda::int8::quantize_per_channel(&weight)
                    .map_err(|e| ModelError::Invalid(e.to_string()))?;
                let scales_f32 = Vec::<f32>::try_from(scales.to_device(Device::Cpu))?;
                Store::Int8 {
                    q: q.contiguous(),
                    scales,
                    scales_f32,
                }
            }
            Quantization::Blocks(ty) => {
                if weight.device() != Device::Cpu {
                    return Err(ModelError::Invalid(format!(
                        "{} weights run on the CPU only",
                        quant.name()
                    )));
                }
                if in_f % blockq::BLOCK as i64 != 0 {
                    return Err(ModelError::Invalid(format!(
                        "a [{out_f}, {in_f}] weight cannot be quantized to {}: its rows are not whole {}-weight blocks",
                        quant.name(),
                        blockq::BLOCK
                    )));
                }
                let values = Vec::<f32>::try_from(weight.to_kind(Kind::Float).view([-1]))?;
                let bytes = llmos_meta::quant::quantize(ty, &values);
                return Self::from_blocks(
                    vec![(ty, out_f as usize)],
                    bytes_tensor(&bytes, out_f),
                    in_f as usize,
                    bias,
                );
            }
        };
        let bias_f32 = bias
            .as_ref()
            .map(|b| Vec::<f32>::try_from(b.to_kind(Kind::Float).to_device(Device::Cpu).view([-1])))
            .transpose()?;
        Ok(Linear {
            store,
            bias,
            bias_f32,
            out_f,
            in_f,
        })
    }

    /// A weight kept in GGUF blocks: `parts` (block type, rows) one after
    /// another, their bytes in `data` (uint8 on the CPU, any shape), rows
    /// of `in_f` weights.
    pub fn from_blocks(
        parts: Vec<(GgmlType, usize)>,
        data: Tensor,
        in_f: usize,
        bias: Option<Tensor>,
    ) -> Result<Self> {
        if data.kind() != Kind::Uint8 || data.device() != Device::Cpu {
            return Err(ModelError::Invalid(
                "block weights are CPU uint8 tensors".into(),
            ));
        }
        let want: usize = parts
            .iter()
            .map(|&(ty, rows)| rows * blockq::row_bytes(ty, in_f))
            .sum();
        if parts.is_empty() || data.numel() != want {
            return Err(ModelError::Invalid(format!(
                "{} bytes of block weights for parts {parts:?} of {in_f} columns (expected {want})",
                data.numel()
            )));
        }
        let out_f = parts.iter().map(|p| p.1).sum::<usize>() as i64;
        // Neighbouring parts of one type are one part (one set of
        // activation sums a product).
        let mut merged: Vec<(GgmlType, usize)> = Vec::with_capacity(parts.len());
        for (ty, rows) in parts {
            match merged.last_mut() {
                Some(last) if last.0 == ty => last.1 += rows,
                _ => merged.push((ty, rows)),
            }
        }
        let parts = merged;
        let data = data.contiguous();
        let lin = Linear {
            store: Store::Blocks { parts, data },
            bias: None,
            bias_f32: None,
            out_f,
            in_f: in_f as i64,
        };
        // Each part's shape and bytes checked by the kernels' own rule.
        lin.blocks().map_err(ModelError::Invalid)?;
        let bias_f32 = bias
            .as_ref()
            .map(|b| Vec::<f32>::try_from(b.to_kind(Kind::Float).to_device(Device::Cpu).view([-1])))
            .transpose()?;
        Ok(Linear {
            bias,
            bias_f32,
            ..lin
        })
    }

    /// The block type when the weight is kept in GGUF blocks (its first
    /// part's, where parts differ).
    pub fn block_type(&self) -> Option<GgmlType> {
        match &self.store {
            Store::Blocks { parts, .. } => Some(parts[0].0),
            _ => None,
        }
    }

    /// The block weight's parts as the kernels read them (empty for other
    /// stores); the error names a part whose bytes do not fit.
    fn blocks(&self) -> std::result::Result<Vec<Blocks<'_>>, String> {
        let Store::Blocks { parts, data } = &self.store else {
            return Ok(Vec::new());
        };
        // SAFETY: checked at construction: a contiguous CPU uint8 tensor,
        // immutable and alive as long as `self`.
        let mut bytes =
            unsafe { std::slice::from_raw_parts(data.data_ptr() as *const u8, data.numel()) };
        let cols = self.in_f as usize;
        let mut out = Vec::with_capacity(parts.len());
        for &(ty, rows) in parts {
            let n = (rows * blockq::row_bytes(ty, cols)).min(bytes.len());
            let (mine, rest) = bytes.split_at(n);
            out.push(Blocks::new(ty, mine, rows, cols)?);
            bytes = rest;
        }
        Ok(out)
    }

    /// The block weight's parts (checked at construction).
    fn block_parts(&self) -> Vec<Blocks<'_>> {
        self.blocks()
            .expect("block weights checked at construction")
    }

    /// Row `r` of a block weight dequantized into `out` (embedding lookups
    /// in a tied head kept in blocks).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let mut r = r;
        for b in self.block_parts() {
            if r < b.rows {
                return blockq::dequantize_row_of(b, r, out);
            }
            r -= b.rows;
        }
        panic!(
            "dequantize_row: row beyond the block weight's {} rows",
            self.out_f
        );
    }

    /// The dense weight (`None` when quantized).
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match &self.store {
            Store::Dense { weight, .. } => Some(weight),
            Store::Int8 { .. } | Store::Blocks { .. } => None,
        }
    }

    /// The tensor the `gemv` kernel and libtorch read: the dense weight,
    /// or the int8 values.
    #[cfg(test)]
    pub(crate) fn stored_weight(&self) -> &Tensor {
        match &self.store {
            Store::Dense { weight, .. } => weight,
            Store::Int8 { q, .. } => q,
            Store::Blocks { data, .. } => data,
        }
    }

    /// `stored_weight`, to move it (into a `WeightArena`).
    pub(crate) fn stored_weight_mut(&mut self) -> &mut Tensor {
        match &mut self.store {
            Store::Dense { weight, .. } => weight,
            Store::Int8 { q, .. } => q,
            Store::Blocks { data, .. } => data,
        }
    }

    /// Bytes the weight (and its scales) take.
    pub fn bytes(&self) -> usize {
        let t = |x: &Tensor| x.numel() * x.kind().elt_size_in_bytes();
        match &self.store {
            Store::Dense { weight, .. } => t(weight),
            Store::Int8 { q, scales, .. } => t(q) + t(scales),
            Store::Blocks { data, .. } => t(data),
        }
    }

    /// Whether `gemv_into` may be used (a contiguous CPU f32/bf16 or int8
    /// weight).
    pub fn has_gemv(&self) -> bool {
        match &self.store {
            Store::Dense { fast, .. } => *fast,
            Store::Int8 { q, .. } => q.device() == Device::Cpu,
            Store::Blocks { .. } => true,
        }
    }

    pub fn out_features(&self) -> usize {
        self.out_f as usize
    }

    /// `y = W x (+ b)` for one or a few f32 rows (`x`: rows x in, `y`: rows
    /// x out), with the `gemv` kernel: each weight row is read once for all
    /// rows.
    pub fn gemv_into(&self, x: &[f32], y: &mut [f32]) {
        assert!(
            self.has_gemv(),
            "gemv_into on a weight the kernel does not read"
        );
        let (out_f, in_f) = (self.out_f as usize, self.in_f as usize);
        assert_eq!(y.len() * in_f, x.len() * out_f, "gemv_into: rows differ");
        let n = out_f * in_f;
        // SAFETY: the weight is a contiguous CPU tensor of `n` elements of the
        // matched type, immutable and alive as long as `self`.
        unsafe {
            match &self.store {
                Store::Dense { weight, .. } if weight.kind() == Kind::Float => {
                    let w = std::slice::from_raw_parts(weight.data_ptr() as *const f32, n);
                    gemv_batch(pool(), w, in_f, x, y)
                }
                Store::Dense { weight, .. } => {
                    let w = std::slice::from_raw_parts(weight.data_ptr() as *const u16, n);
                    gemv_batch(pool(), w, in_f, x, y)
                }
                Store::Int8 { q, scales_f32, .. } => {
                    let w = std::slice::from_raw_parts(q.data_ptr() as *const i8, n);
                    gemv_batch(pool(), w, in_f, x, y);
                    for row in y.chunks_exact_mut(out_f) {
                        row.iter_mut().zip(scales_f32).for_each(|(y, s)| *y *= s);
                    }
                }
                Store::Blocks { .. } => blockq::gemv_block_parts(pool(), &self.block_parts(), x, y),
            }
        }
        if let Some(b) = &self.bias_f32 {
            for row in y.chunks_exact_mut(out_f) {
                row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
        }
    }

    /// Up to this many input rows go through the `gemv` kernel (each weight
    /// row read once for all of them); more through libtorch.
    pub const SMALL_BATCH: i64 = 8;
    /// f32 and int8 weights take the kernel's AVX-512 register tiles up to
    /// this many rows where the CPU has them: `benches/small_gemm.rs`
    /// measured them 1.0-2.1x faster than libtorch's f32 product from 16 to
    /// 256 rows on SmolLM2's shapes (libtorch repacks the weight on every
    /// call), and int8 through libtorch first widens the whole weight. Not
    /// beyond: at 512 rows the bench still had them 1.0-1.5x ahead, but a
    /// 512-token f32 prompt through the model took 1.40-1.60 s on the tiles
    /// against 0.84-0.94 s on libtorch. bf16 weights stay on libtorch above
    /// `SMALL_BATCH`: its bf16 product uses the CPU's bf16 dot-product
    /// instructions and ran 1.4-2x faster.
    pub const TILED_BATCH: i64 = 256;
    /// Block weights take the kernel up to this many rows where the CPU has
    /// AVX-512: 4 weight rows dequantized into cache at a time, then the
    /// f32 tiles over the activation rows in L2-sized chunks, instead of
    /// the whole weight dequantized on the calling thread before libtorch's
    /// product. `benches/small_gemm.rs` (AMD EPYC, Zen 4, 2 threads):
    /// 2.6-3.5x at 16 rows, 1.6-2.0x at 48, 1.3x at 128, 1.0-1.3x at 256
    /// on SmolLM2's shapes in Q8_0, Q4_1 and Q4_K. Whole prompts through
    /// the Q8_0 file (`llmos-worker bench`, interleaved runs): 32 tokens
    /// 55-61 ms against 126-186, 128 tokens 234-264 against 363-430, 512
    /// tokens 942-1056 against 991-1142 (Q4_1: 997-1079 against 896-1202);
    /// at 1024 tokens libtorch's product was 5% faster (2093 against 2285
    /// ms, medians of 3), so not beyond 512.
    pub const BLOCK_TILED_BATCH: i64 = 512;

    /// Whether a product of `rows` input rows runs on the `gemv` kernel's
    /// pool (not libtorch's threads).
    pub fn uses_kernel(&self, rows: i64) -> bool {
        if !self.has_gemv() || rows < 1 {
            return false;
        }
        if rows <= Self::SMALL_BATCH {
            return true;
        }
        let tileable = match &self.store {
            Store::Dense { weight, .. } => weight.kind() == Kind::Float,
            Store::Int8 { .. } | Store::Blocks { .. } => true,
        };
        let limit = match &self.store {
            Store::Blocks { .. } => Self::BLOCK_TILED_BATCH,
            _ => Self::TILED_BATCH,
        };
        rows <= limit && tileable && llmos_kernels::cpu::gemv::tiles_available()
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let rows: i64 = size[..size.len() - 1].iter().product();
        if self.uses_kernel(rows) {
            return self.forward_gemv(x, rows);
        }
        match &self.store {
            Store::Dense { weight, .. } => x.linear(weight, self.bias.as_ref()),
            Store::Int8 { q, scales, .. } => {
                let y = x.linear::<Tensor>(&q.to_kind(x.kind()), None) * scales.to_kind(x.kind());
                match &self.bias {
                    Some(b) => y + b,
                    None => y,
                }
            }
            Store::Blocks { .. } => {
                let w = self.dequantized(x.kind());
                x.linear(&w, self.bias.as_ref().map(|b| b.to_kind(x.kind())).as_ref())
            }
        }
    }

    /// A block weight dequantized to `kind` (for a prompt's product).
    fn dequantized(&self, kind: Kind) -> Tensor {
        let w = Tensor::empty([self.out_f, self.in_f], (Kind::Float, Device::Cpu));
        let n = (self.out_f * self.in_f) as usize;
        // SAFETY: `w` is a fresh contiguous f32 tensor of rows x cols.
        let mut out = unsafe { std::slice::from_raw_parts_mut(w.data_ptr() as *mut f32, n) };
        for b in self.block_parts() {
            let (mine, rest) = out.split_at_mut(b.rows * b.cols);
            blockq::dequantize_rows(b, mine);
            out = rest;
        }
        if kind == Kind::Float {
            w
        } else {
            w.to_kind(kind)
        }
    }

    fn forward_gemv(&self, x: &Tensor, rows: i64) -> Tensor {
        let size = x.size();
        let (out_f, in_f) = (self.out_f, self.in_f);
        let xf = if x.kind() == Kind::Float && x.is_contiguous() {
            x.shallow_clone()
        } else {
            x.to_kind(Kind::Float).contiguous()
        };
        let y = Tensor::empty([rows, out_f], (Kind::Float, Device::Cpu));
        // SAFETY: `xf` and `y` are contiguous f32 CPU tensors of the stated
        // lengths, alive for the call, and `y` is not aliased.
        unsafe {
            let xs =
                std::slice::from_raw_parts(xf.data_ptr() as *const f32, (rows * in_f) as usize);
            let ys =
                std::slice::from_raw_parts_mut(y.data_ptr() as *mut f32, (rows * out_f) as usize);
            self.gemv_into(xs, ys);
        }
        let mut out_size = size;
        *out_size.last_mut().unwrap() = out_f;
        let mut y = y.view(out_size.as_slice());
        if x.kind() != Kind::Float {
            y = y.to_kind(x.kind());
        }
        y
    }
}

/// `bytes` as a CPU uint8 tensor of `rows` rows.
pub(super) fn bytes_tensor(bytes: &[u8], rows: i64) -> Tensor {
    Tensor::from_slice(bytes).view([rows, -1])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both paths of an int8 weight (gemv rows, the widened product; with a
    /// bias) equal the product with the dequantized weight.
    #[test]
    fn int8_paths_match_the_dequantized_product() {
        tch::manual_seed(21);
        let w = Tensor::randn([96, 64], (Kind::Float, Device::Cpu)) * 0.1;
        let b = Tensor::randn([96], (Kind::Float, Device::Cpu));
        for kind in [Kind::Float, Kind::BFloat16] {
            let lin =
                Linear::with(w.to_kind(kind), Some(b.to_kind(kind)), Quantization::Int8).unwrap();
            let (q, s) = llmos_kernels::cuda::int8::quantize_per_channel(&w.to_kind(kind)).unwrap();
            let deq = llmos_kernels::cuda::int8::dequantize(&q, &s, Kind::Float);
            assert!(lin.dense_weight().is_none());
            assert_eq!(lin.bytes(), 96 * 64 + 96 * 4);
            for rows in [1i64, 5, 40, 200] {
                let x = Tensor::randn([rows, 64], (Kind::Float, Device::Cpu)).to_kind(kind);
                let want = x
                    .to_kind(Kind::Float)
                    .linear(&deq, Some(&b.to_kind(kind).to_kind(Kind::Float)));
                let got = lin.forward(&x);
                assert_eq!(got.kind(), kind);
                let rel = (got.to_kind(Kind::Float) - &want)
                    .abs()
                    .max()
                    .double_value(&[])
                    / want.abs().max().double_value(&[]);
                let tol = if kind == Kind::Float { 1e-5 } else { 2e-2 };
                assert!(rel < tol, "{kind:?} rows {rows}: {rel}");
            }
            // 3-D input (batch, tokens, hidden) keeps its leading shape.
            let x3 = Tensor::randn([2, 20, 64], (Kind::Float, Device::Cpu)).to_kind(kind);
            assert_eq!(lin.forward(&x3).size(), vec![2, 20, 96]);
        }
        assert!(Quantization::parse("int4")
            .unwrap_err()
            .to_string()
            .contains("int8"));
    }

    /// A dense weight quantized at load to each block type: every path
    /// (one row and a few through the block kernels, a prompt's
    /// dequantized product; with a bias; f32 and bf16 activations) equals
    /// the product with the dequantized weight, and the weight is held in
    /// its blocks' bytes. Rows that are not whole blocks are refused by
    /// shape.
    #[test]
    fn block_weights_match_the_dequantized_product_on_every_path() {
        tch::manual_seed(22);
        let w = Tensor::randn([70, 96], (Kind::Float, Device::Cpu)) * 0.1;
        let b = Tensor::randn([70], (Kind::Float, Device::Cpu));
        for (name, ty) in [
            ("q8_0", GgmlType::Q8_0),
            ("q4_0", GgmlType::Q4_0),
            ("q4_1", GgmlType::Q4_1),
        ] {
            let q = Quantization::parse(name).unwrap();
            assert_eq!((q, q.name()), (Quantization::Blocks(ty), name));
            let lin = Linear::with(w.shallow_clone(), Some(b.shallow_clone()), q).unwrap();
            assert_eq!(lin.block_type(), Some(ty));
            assert_eq!(lin.bytes(), 70 * 3 * ty.block_bytes());
            let values = Vec::<f32>::try_from(w.view([-1])).unwrap();
            let mut deq = vec![0f32; values.len()];
            llmos_meta::quant::dequantize_into(
                ty,
                &llmos_meta::quant::quantize(ty, &values),
                &mut deq,
            );
            let deq = Tensor::from_slice(&deq).view([70, 96]);
            for kind in [Kind::Float, Kind::BFloat16] {
                for rows in [1i64, 5, 40, 300, 600] {
                    let x = Tensor::randn([rows, 96], (Kind::Float, Device::Cpu)).to_kind(kind);
                    let want = x.to_kind(Kind::Float).linear(&deq, Some(&b));
                    let got = lin.forward(&x).to_kind(Kind::Float);
                    let err = (got - &want).abs().max().double_value(&[]);
                    let tol = if kind == Kind::Float { 1e-4 } else { 5e-2 };
                    assert!(err < tol, "{name} {kind:?} rows {rows}: {err}");
                }
            }
        }
        let e = Linear::with(
            Tensor::zeros([4, 48], (Kind::Float, Device::Cpu)),
            None,
            Quantization::Blocks(GgmlType::Q4_1),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("[4, 48]") && e.contains("q4_1"), "{e}");
        assert_eq!(Quantization::parse("file").unwrap(), Quantization::File);
    }
}
