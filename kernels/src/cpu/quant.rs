//! Products with GGUF block-quantized weights kept in their blocks (Q8_0,
//! Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K; formats in `llmos_meta::quant`):
//! decode reads a quarter (Q4) to a half (Q8) of the bytes of bf16 weights,
//! and decode is bound by the bytes it reads.
//!
//! Each block is dequantized in registers and multiplied with f32
//! activations, accumulating in f32: the result is the product with the
//! dequantized weight (`llmos_meta::quant::dequantize_into`) up to
//! summation order. The activations are not quantized (llama.cpp rounds
//! them to 8 bits for its integer dot products; we keep the dequantized
//! model's exact logits). For Q4/Q5 blocks `w = q·d + m` (Q4_0: `m = -8d`,
//! Q5_0: `m = -16d`), so a block's share of a dot product is
//! `d·Σ q·x + m·Σ x`; the per-block sums of `x` are computed once per
//! product. Q4_K's 32-weight sub-blocks are the same with `d·sc` and
//! `-dmin·m`; Q6_K's 16-weight ones take `(d·sc)·Σ (q - 32)·x`.
//!
//! One activation row (decode) takes the fused bodies; a few rows
//! dequantize each weight row once into a buffer and take the f32 dot
//! product per activation row; prompts dequantize whole weights
//! ([`dequantize_rows`]) for a general matrix product. Bodies: portable,
//! AVX2/FMA/F16C and AVX-512, chosen per machine by `calibrate::choice`.
//! Every block type has a fused body for each; the portable body
//! dequantizes one block at a time into a buffer the f32 dot product reads.

use llmos_meta::quant::{dequantize_into, GgmlType};

use crate::cpu::calibrate::{self, Body};
use crate::cpu::gemv::WeightElem;
use crate::cpu::spin_pool::{SharedSlot, SpinPool};

/// Weights per block.
pub const BLOCK: usize = 32;

/// A `rows x cols` weight of block-quantized rows, each `cols / 32`
/// blocks of `ty`.
#[derive(Clone, Copy, Debug)]
pub struct Blocks<'a> {
    pub ty: GgmlType,
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
}

/// Whether products read `ty` in its blocks.
pub fn is_block_type(ty: GgmlType) -> bool {
    ty.is_quantized()
}

/// Whether `x86::dequantize_avx2` reads `ty` (others dequantize with the
/// reference loop).
fn has_simd_dequantize(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1)
}

impl<'a> Blocks<'a> {
    /// Checks the type, that rows are whole blocks and that `data` holds
    /// exactly `rows` of them; the error names what differs.
    pub fn new(ty: GgmlType, data: &'a [u8], rows: usize, cols: usize) -> Result<Self, String> {
        if !is_block_type(ty) {
            return Err(format!(
                "{ty:?} is not a block type the kernels read (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K)"
            ));
        }
        let bs = ty.block_size();
        if cols == 0 || !cols.is_multiple_of(bs) {
            return Err(format!(
                "{cols} columns are not whole {bs}-weight {ty:?} blocks"
            ));
        }
        let want = rows * row_bytes(ty, cols);
        if data.len() != want {
            return Err(format!(
                "{} bytes for {rows} x {cols} {ty:?} weights (expected {want})",
                data.len()
            ));
        }
        Ok(Blocks {
            ty,
            data,
            rows,
            cols,
        })
    }

    fn row_bytes(&self) -> usize {
        row_bytes(self.ty, self.cols)
    }

    fn row(&self, r: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }
}

/// Bytes of one row of `cols` weights of block type `ty`.
pub fn row_bytes(ty: GgmlType, cols: usize) -> usize {
    cols / ty.block_size() * ty.block_bytes()
}

/// What the two f16 at the start of each block are multiplied by to give
/// the block's `m·Σx` term, interleaved as the blocks hold them: Q4_1 and
/// Q5_1 `[0, Σx]` (`d`, `m`), Q4_0 `[-8·Σx, 0]` (`m = -8d`), Q5_0
/// `[-16·Σx, 0]`; for Q4_K each 32-weight sub-block's `Σx`; empty for
/// Q8_0 and Q6_K.
fn scale_weights(ty: GgmlType, x: &[f32]) -> Vec<f32> {
    let sums = x.chunks_exact(BLOCK).map(|c| c.iter().sum::<f32>());
    match ty {
        GgmlType::Q4_1 | GgmlType::Q5_1 => sums.flat_map(|s| [0.0, s]).collect(),
        GgmlType::Q4_0 => sums.flat_map(|s| [-8.0 * s, 0.0]).collect(),
        GgmlType::Q5_0 => sums.flat_map(|s| [-16.0 * s, 0.0]).collect(),
        GgmlType::Q4_K => sums.collect(),
        _ => Vec::new(),
    }
}

/// `w_row · x` by dequantizing one block at a time into a buffer.
fn dot_dequantized(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    let (bs, bb) = (ty.block_size(), ty.block_bytes());
    let mut w = [0f32; llmos_meta::quant::QK_K];
    let w = &mut w[..bs];
    row.chunks_exact(bb)
        .zip(x.chunks_exact(bs))
        .map(|(b, xb)| {
            dequantize_into(ty, b, w);
            <f32 as WeightElem>::dot(w, xb)
        })
        .sum()
}

/// `w_row · x` with the chosen body (`xs`: `scale_weights(x)`).
fn dot(body: Body, ty: GgmlType, row: &[u8], x: &[f32], xs: &[f32]) -> f32 {
    debug_assert_eq!(row.len(), row_bytes(ty, x.len()));
    let nb = x.len() / BLOCK;
    match body {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the body is only chosen where the CPU has its features;
        // `row` holds `nb` blocks of `ty`, `x` `nb * 32` values and `xs`
        // `2 * nb` scale weights (Q4; unread for Q8_0).
        Body::Avx2 => unsafe {
            let nsb = x.len() / llmos_meta::quant::QK_K;
            match ty {
                GgmlType::Q8_0 => x86::dot_q8_avx2(ty, row.as_ptr(), nb, x.as_ptr(), xs.as_ptr()),
                GgmlType::Q5_0 | GgmlType::Q5_1 => {
                    x86::dot_q5_avx2(ty, row.as_ptr(), nb, x.as_ptr(), xs.as_ptr())
                }
                GgmlType::Q4_K => x86::dot_q4k_avx2(row.as_ptr(), nsb, x.as_ptr(), xs.as_ptr()),
                GgmlType::Q6_K => x86::dot_q6k_avx2(row.as_ptr(), nsb, x.as_ptr()),
                _ => x86::dot_q4_avx2(ty, row.as_ptr(), nb, x.as_ptr(), xs.as_ptr()),
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; for K-quants `row` holds `x.len() / 256`
        // super-blocks and `xs` (Q4_K) a sum per 32 values.
        Body::Avx512 => unsafe {
            let nsb = x.len() / llmos_meta::quant::QK_K;
            match ty {
                GgmlType::Q8_0 => x86::dot_q8_avx512(ty, row.as_ptr(), nb, x.as_ptr(), xs.as_ptr()),
                GgmlType::Q5_0 | GgmlType::Q5_1 => {
                    x86::dot_q5_avx512(ty, row.as_ptr(), nb, x.as_ptr(), xs.as_ptr())
                }
                GgmlType::Q4_K => x86::dot_q4k_avx512(row.as_ptr(), nsb, x.as_ptr(), xs.as_ptr()),
                GgmlType::Q6_K => x86::dot_q6k_avx512(row.as_ptr(), nsb, x.as_ptr()),
                _ => x86::dot_q4_avx512(ty, row.as_ptr(), nb, x.as_ptr(), xs.as_ptr()),
            }
        },
        _ => dot_dequantized(ty, row, x),
    }
}

/// Dequantizes one row into `out` (`cols` values) with the chosen body.
fn dequantize_row(body: Body, ty: GgmlType, row: &[u8], out: &mut [f32]) {
    match body {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the body's features are present (AVX-512 implies the
        // AVX2 set); `row` holds `out.len() / 32` blocks.
        Body::Avx2 | Body::Avx512 if has_simd_dequantize(ty) => unsafe {
            x86::dequantize_avx2(ty, row.as_ptr(), out.len() / BLOCK, out.as_mut_ptr())
        },
        _ => dequantize_into(ty, row, out),
    }
}

/// `y[i * rows + r] = w row r · x row i` for the `x.len() / cols`
/// activation rows of `x`, across `pool`.
pub fn gemv_blocks(pool: &SpinPool, w: Blocks<'_>, x: &[f32], y: &mut [f32]) {
    gemv_blocks_with(calibrate::choice().blocks, pool, w, x, y)
}

/// `gemv_blocks` with a given body (tests and the calibration compare
/// bodies).
pub fn gemv_blocks_with(body: Body, pool: &SpinPool, w: Blocks<'_>, x: &[f32], y: &mut [f32]) {
    gemv_block_parts_with(body, pool, &[w], x, y)
}

/// `gemv_blocks` of a weight whose rows are `parts` one after another,
/// each part of its own block type (a fused projection whose weights a
/// file stores in different types, e.g. a K-quant file's `attn_v` beside
/// its `attn_q`), in one pool job: `y[i * rows + r]` for the parts' rows
/// `r` counted across them.
pub fn gemv_block_parts(pool: &SpinPool, parts: &[Blocks<'_>], x: &[f32], y: &mut [f32]) {
    gemv_block_parts_with(calibrate::choice().blocks, pool, parts, x, y)
}

fn gemv_block_parts_with(
    body: Body,
    pool: &SpinPool,
    parts: &[Blocks<'_>],
    x: &[f32],
    y: &mut [f32],
) {
    assert!(!parts.is_empty(), "gemv_blocks: no weight");
    let cols = parts[0].cols;
    assert!(
        parts.iter().all(|p| p.cols == cols),
        "gemv_blocks: parts of different widths"
    );
    assert!(
        x.len().is_multiple_of(cols),
        "gemv_blocks: x is not b x {cols}"
    );
    let rows: usize = parts.iter().map(|p| p.rows).sum();
    let b = x.len() / cols;
    assert_eq!(y.len(), b * rows, "gemv_blocks: y is not b x rows");
    if b == 0 {
        return;
    }
    // Per part: its body, its first row, each activation row's scale sums.
    let mut first_row = 0;
    let parts: Vec<(Blocks<'_>, Body, usize, Vec<Vec<f32>>)> = parts
        .iter()
        .map(|w| {
            let sums = x
                .chunks_exact(cols)
                .map(|r| scale_weights(w.ty, r))
                .collect();
            let at = first_row;
            first_row += w.rows;
            (*w, body, at, sums)
        })
        .collect();
    let out = SharedSlot(y.as_mut_ptr());
    let per_task = crate::cpu::gemv::rows_per_task(pool.threads(), rows);
    pool.run(rows.div_ceil(per_task), &|task| {
        let (first, end) = (task * per_task, ((task + 1) * per_task).min(rows));
        let mut buf = Vec::new();
        for (w, body, at, sums) in &parts {
            let (lo, hi) = (first.max(*at), end.min(at + w.rows));
            if lo >= hi {
                continue;
            }
            if b == 1 {
                for r in lo..hi {
                    let v = dot(*body, w.ty, w.row(r - at), x, &sums[0]);
                    // SAFETY: row `r` is this task's.
                    unsafe { *out.at(r) = v };
                }
                continue;
            }
            // Several activation rows: each weight row dequantized once.
            buf.resize(cols, 0f32);
            for r in lo..hi {
                dequantize_row(*body, w.ty, w.row(r - at), &mut buf);
                for i in 0..b {
                    let v = <f32 as WeightElem>::dot(&buf, &x[i * cols..(i + 1) * cols]);
                    // SAFETY: `(i, r)` is in bounds and row `r` is this task's.
                    unsafe { *out.at(i * rows + r) = v };
                }
            }
        }
    });
}

/// The whole weight as f32 (`rows * cols` values): what a prompt's matrix
/// product reads. On the calling thread: the decode pool's helpers would
/// compete with libtorch's threads, which spin between the products around
/// it (measured: 115 ms a 512-token SmolLM2 prompt across the pool, 30 ms
/// on the caller).
pub fn dequantize_rows(w: Blocks<'_>, out: &mut [f32]) {
    assert_eq!(
        out.len(),
        w.rows * w.cols,
        "dequantize_rows: out is not rows x cols"
    );
    let body = calibrate::choice().blocks;
    for (r, o) in out.chunks_exact_mut(w.cols).enumerate() {
        dequantize_row(body, w.ty, w.row(r), o);
    }
}

/// Row `r` of `w` dequantized into `out` (`cols` values).
pub fn dequantize_row_of(w: Blocks<'_>, r: usize, out: &mut [f32]) {
    assert!(
        r < w.rows && out.len() == w.cols,
        "dequantize_row_of: row {r} of {}",
        w.rows
    );
    dequantize_row(calibrate::choice().blocks, w.ty, w.row(r), out)
}

/// `dot` of every row once, single-threaded: what the calibration times.
pub(crate) fn sweep(body: Body, w: Blocks<'_>, x: &[f32]) -> f32 {
    let xs = scale_weights(w.ty, x);
    (0..w.rows).map(|r| dot(body, w.ty, w.row(r), x, &xs)).sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use llmos_meta::quant::GgmlType;

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// The 32 nibbles of a Q4 block at `q` as four 8-lane f32 vectors
    /// (weights 0-7, 8-15 from the low nibbles, 16-23, 24-31 from the high).
    /// (Macros, not closures or helper functions: those would not inherit
    /// the caller's target features and the intrinsics would become calls.)
    macro_rules! nibbles8 {
        ($q:expr) => {{
            let mask = _mm_set1_epi8(0x0f);
            let qs = _mm_loadu_si128($q as *const __m128i);
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
            [
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(lo, lo))),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(hi, hi))),
            ]
        }};
    }

    /// Eight signed bytes at `q` as an 8-lane f32 vector.
    macro_rules! bytes8 {
        ($q:expr) => {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64($q as *const __m128i)))
        };
    }

    /// The f16 at `p` as f32.
    macro_rules! f16_at {
        ($p:expr) => {
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                ($p as *const u16).read_unaligned() as i32,
            )))
        };
    }

    /// The first 4 bytes of 8 blocks `bb` bytes apart from `p` (the f16
    /// `d`, and `m` in Q4_1) as 16 f32 at `out`: `[d0, m0, d1, m1, ..]`;
    /// `$keep_m` false zeroes the odd entries (not a scale outside Q4_1).
    macro_rules! scales8 {
        ($p:expr, $idx:expr, $keep_m:expr, $out:expr) => {{
            let mut g = _mm256_i32gather_epi32::<1>($p as *const i32, $idx);
            if !$keep_m {
                g = _mm256_and_si256(g, _mm256_set1_epi32(0xffff));
            }
            _mm256_storeu_ps($out, _mm256_cvtph_ps(_mm256_castsi256_si128(g)));
            _mm256_storeu_ps(
                $out.add(8),
                _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(g)),
            );
        }};
    }

    /// Byte offsets of 8 consecutive blocks of `bb` bytes.
    macro_rules! offsets8 {
        ($bb:expr) => {
            _mm256_mullo_epi32(
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                _mm256_set1_epi32($bb as i32),
            )
        };
    }

    /// Block layout: bytes per block, offset of the weights (after `d`, and
    /// `m` in Q4_1/Q5_1; Q5's start with `qh`), whether the second f16 is
    /// `m`.
    fn layout(ty: GgmlType) -> (usize, usize, bool) {
        let keep_m = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
        (ty.block_bytes(), if keep_m { 4 } else { 2 }, keep_m)
    }

    /// `Σ q·x` of one block (its integers widened to f32) against the 32
    /// values at `$xb`, as a vector the caller scales by the block's `d`:
    /// one macro per block type and vector width.
    macro_rules! q4_sum8 {
        ($p:expr, $xb:expr) => {{
            let w = nibbles8!($p);
            let mut s = _mm256_mul_ps(w[0], _mm256_loadu_ps($xb));
            s = _mm256_fmadd_ps(w[1], _mm256_loadu_ps($xb.add(8)), s);
            s = _mm256_fmadd_ps(w[2], _mm256_loadu_ps($xb.add(16)), s);
            _mm256_fmadd_ps(w[3], _mm256_loadu_ps($xb.add(24)), s)
        }};
    }
    /// A Q5 block's `Σ q·x` from `$p` (its `qh`, then 16 bytes of
    /// nibbles): `qh`'s bit j spread to byte j as 0x10 (broadcast, byte
    /// shuffle, bit test), or-ed into the nibbles.
    macro_rules! q5_sum8 {
        ($p:expr, $xb:expr) => {{
            let qh = ($p as *const u32).read_unaligned();
            let bits = _mm256_shuffle_epi8(
                _mm256_set1_epi32(qh as i32),
                _mm256_setr_epi64x(
                    0,
                    0x0101010101010101,
                    0x0202020202020202,
                    0x0303030303030303,
                ),
            );
            let sel = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
            let fifth = _mm256_and_si256(
                _mm256_cmpeq_epi8(_mm256_and_si256(bits, sel), sel),
                _mm256_set1_epi8(0x10),
            );
            let mask = _mm_set1_epi8(0x0f);
            let qs = _mm_loadu_si128($p.add(4) as *const __m128i);
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
            let q = _mm256_or_si256(_mm256_set_m128i(hi, lo), fifth);
            let (a, b) = (_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
            let mut s = _mm256_mul_ps(widen8!(a), _mm256_loadu_ps($xb));
            s = _mm256_fmadd_ps(
                widen8!(_mm_unpackhi_epi64(a, a)),
                _mm256_loadu_ps($xb.add(8)),
                s,
            );
            s = _mm256_fmadd_ps(widen8!(b), _mm256_loadu_ps($xb.add(16)), s);
            _mm256_fmadd_ps(
                widen8!(_mm_unpackhi_epi64(b, b)),
                _mm256_loadu_ps($xb.add(24)),
                s,
            )
        }};
    }
    /// The low 8 unsigned bytes of `$v` as an 8-lane f32 vector.
    macro_rules! widen8 {
        ($v:expr) => {
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32($v))
        };
    }
    macro_rules! q8_sum8 {
        ($q:expr, $xb:expr) => {{
            let mut s = _mm256_mul_ps(bytes8!($q), _mm256_loadu_ps($xb));
            s = _mm256_fmadd_ps(bytes8!($q.add(8)), _mm256_loadu_ps($xb.add(8)), s);
            s = _mm256_fmadd_ps(bytes8!($q.add(16)), _mm256_loadu_ps($xb.add(16)), s);
            _mm256_fmadd_ps(bytes8!($q.add(24)), _mm256_loadu_ps($xb.add(24)), s)
        }};
    }
    macro_rules! q4_sum16 {
        ($p:expr, $xb:expr) => {{
            let q = _mm512_cvtepu8_epi32(_mm_loadu_si128($p as *const __m128i));
            let lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0x0f)));
            let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(q));
            _mm512_fmadd_ps(
                hi,
                _mm512_loadu_ps($xb.add(16)),
                _mm512_mul_ps(lo, _mm512_loadu_ps($xb)),
            )
        }};
    }
    /// A Q5 block's `Σ q·x` from `$p` (its `qh`, then 16 bytes of
    /// nibbles): each weight's fifth bit set from `qh` by mask.
    macro_rules! q5_sum16 {
        ($p:expr, $xb:expr) => {{
            let qh = ($p as *const u32).read_unaligned();
            let q = _mm512_cvtepu8_epi32(_mm_loadu_si128($p.add(4) as *const __m128i));
            let sixteen = _mm512_set1_epi32(16);
            let lo = _mm512_and_si512(q, _mm512_set1_epi32(0x0f));
            let lo = _mm512_mask_or_epi32(lo, qh as __mmask16, lo, sixteen);
            let hi = _mm512_srli_epi32::<4>(q);
            let hi = _mm512_mask_or_epi32(hi, (qh >> 16) as __mmask16, hi, sixteen);
            _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(hi),
                _mm512_loadu_ps($xb.add(16)),
                _mm512_mul_ps(_mm512_cvtepi32_ps(lo), _mm512_loadu_ps($xb)),
            )
        }};
    }
    macro_rules! q8_sum16 {
        ($q:expr, $xb:expr) => {{
            let w0 =
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128($q as *const __m128i)));
            let w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                $q.add(16) as *const __m128i
            )));
            _mm512_fmadd_ps(
                w1,
                _mm512_loadu_ps($xb.add(16)),
                _mm512_mul_ps(w0, _mm512_loadu_ps($xb)),
            )
        }};
    }

    /// A row · x body: `$vec` the vector type, `$zero`/`$set1`/`$fma`/
    /// `$reduce` its operations, `$sum` the per-block product macro.
    /// Scales are read 8 blocks at a time (one gather, two conversions);
    /// the `m` terms of 8 blocks are one product with `sw` (see
    /// `scale_weights`); the blocks after the last 8 take scalar scales.
    macro_rules! dot_body {
        ($name:ident, $feat:literal, $zero:ident, $set1:ident, $fma:ident, $add:ident, $reduce:ident, $sum:ident, $q4:literal) => {
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(
                ty: GgmlType,
                row: *const u8,
                nb: usize,
                x: *const f32,
                sw: *const f32,
            ) -> f32 {
                let (bb, qo, q4_1) = layout(ty);
                let idx = offsets8!(bb);
                let (mut acc0, mut acc1) = ($zero(), $zero());
                let mut macc = _mm256_setzero_ps();
                let mut dm = [0f32; 16];
                let full = nb / 8 * 8;
                let mut b = 0;
                while b < full {
                    // The 8 blocks (at most 272 bytes: 5 lines) this
                    // many bytes ahead (`PREFETCH_AHEAD`); past the row
                    // the task's next row follows, past the task a hint
                    // only.
                    let a = (row as *const i8).wrapping_add(b * bb + crate::cpu::PREFETCH_AHEAD);
                    for line in 0..5 {
                        _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(64 * line));
                    }
                    scales8!(row.add(b * bb), idx, q4_1, dm.as_mut_ptr());
                    if $q4 {
                        macc = _mm256_fmadd_ps(
                            _mm256_loadu_ps(dm.as_ptr()),
                            _mm256_loadu_ps(sw.add(2 * b)),
                            macc,
                        );
                        macc = _mm256_fmadd_ps(
                            _mm256_loadu_ps(dm.as_ptr().add(8)),
                            _mm256_loadu_ps(sw.add(2 * b + 8)),
                            macc,
                        );
                    }
                    // Two accumulators in named registers (an array indexed
                    // in a loop the compiler may keep in memory).
                    for k in (0..8).step_by(2) {
                        let p = row.add((b + k) * bb + qo);
                        let s0 = $sum!(p, x.add((b + k) * 32));
                        let s1 = $sum!(p.add(bb), x.add((b + k + 1) * 32));
                        acc0 = $fma($set1(dm[2 * k]), s0, acc0);
                        acc1 = $fma($set1(dm[2 * k + 2]), s1, acc1);
                    }
                    b += 8;
                }
                let mut tail = 0f32;
                while b < nb {
                    let p = row.add(b * bb);
                    let d = f16_at!(p);
                    let s = $sum!(p.add(qo), x.add(b * 32));
                    acc0 = $fma($set1(d), s, acc0);
                    if $q4 {
                        let m = if q4_1 { f16_at!(p.add(2)) } else { 0.0 };
                        // (`q4_1`: the block has an `m`, Q4_1 or Q5_1.)
                        tail += d * *sw.add(2 * b) + m * *sw.add(2 * b + 1);
                    }
                    b += 1;
                }
                $reduce($add(acc0, acc1)) + hsum(macc) + tail
            }
        };
    }

    dot_body!(
        dot_q4_avx2,
        "avx2,fma,f16c",
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps,
        hsum,
        q4_sum8,
        true
    );
    dot_body!(
        dot_q8_avx2,
        "avx2,fma,f16c",
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps,
        hsum,
        q8_sum8,
        false
    );
    dot_body!(
        dot_q4_avx512,
        "avx512f,avx2,fma,f16c",
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps,
        _mm512_reduce_add_ps,
        q4_sum16,
        true
    );
    dot_body!(
        dot_q8_avx512,
        "avx512f,avx2,fma,f16c",
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps,
        _mm512_reduce_add_ps,
        q8_sum16,
        false
    );

    dot_body!(
        dot_q5_avx512,
        "avx512f,avx2,fma,f16c",
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps,
        _mm512_reduce_add_ps,
        q5_sum16,
        true
    );

    /// Hints for the `lines` cache lines `PREFETCH_AHEAD` bytes past `p`.
    macro_rules! prefetch_ahead {
        ($p:expr, $lines:expr) => {
            let a = ($p as *const i8).wrapping_add(crate::cpu::PREFETCH_AHEAD);
            for line in 0..$lines {
                _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(64 * line));
            }
        };
    }

    /// Q4_K row · x: `nsb` super-blocks at `row`, `xs` the sum of each 32
    /// values of `x`. Each sub-block adds `(d·sc)·Σ q·x - (dmin·m)·Σ x`.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn dot_q4k_avx512(row: *const u8, nsb: usize, x: *const f32, xs: *const f32) -> f32 {
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut mins = 0f32;
        let mask = _mm512_set1_epi32(0x0f);
        for sb in 0..nsb {
            let p = row.add(sb * 144);
            prefetch_ahead!(p, 3);
            let (d, dmin) = (f16_at!(p), f16_at!(p.add(2)));
            let scales = std::slice::from_raw_parts(p.add(4), 12);
            let (xb, sums) = (x.add(sb * 256), xs.add(sb * 8));
            for j in 0..4 {
                let (sc0, m0) = llmos_meta::quant::k_scale_min(2 * j, scales);
                let (sc1, m1) = llmos_meta::quant::k_scale_min(2 * j + 1, scales);
                let q = p.add(16 + 32 * j);
                let qa = _mm512_cvtepu8_epi32(_mm_loadu_si128(q as *const __m128i));
                let qb = _mm512_cvtepu8_epi32(_mm_loadu_si128(q.add(16) as *const __m128i));
                let x0 = xb.add(64 * j);
                let s0 = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(_mm512_and_si512(qb, mask)),
                    _mm512_loadu_ps(x0.add(16)),
                    _mm512_mul_ps(
                        _mm512_cvtepi32_ps(_mm512_and_si512(qa, mask)),
                        _mm512_loadu_ps(x0),
                    ),
                );
                let s1 = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(qb)),
                    _mm512_loadu_ps(x0.add(48)),
                    _mm512_mul_ps(
                        _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(qa)),
                        _mm512_loadu_ps(x0.add(32)),
                    ),
                );
                acc0 = _mm512_fmadd_ps(_mm512_set1_ps(d * sc0 as f32), s0, acc0);
                acc1 = _mm512_fmadd_ps(_mm512_set1_ps(d * sc1 as f32), s1, acc1);
                mins +=
                    dmin * m0 as f32 * *sums.add(2 * j) + dmin * m1 as f32 * *sums.add(2 * j + 1);
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) - mins
    }

    dot_body!(
        dot_q5_avx2,
        "avx2,fma,f16c",
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps,
        hsum,
        q5_sum8,
        true
    );

    /// `dot_q4k_avx512` on 8 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4k_avx2(row: *const u8, nsb: usize, x: *const f32, xs: *const f32) -> f32 {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut mins = 0f32;
        let mask = _mm_set1_epi8(0x0f);
        for sb in 0..nsb {
            let p = row.add(sb * 144);
            prefetch_ahead!(p, 3);
            let (d, dmin) = (f16_at!(p), f16_at!(p.add(2)));
            let scales = std::slice::from_raw_parts(p.add(4), 12);
            let (xb, sums) = (x.add(sb * 256), xs.add(sb * 8));
            for j in 0..4 {
                let (sc0, m0) = llmos_meta::quant::k_scale_min(2 * j, scales);
                let (sc1, m1) = llmos_meta::quant::k_scale_min(2 * j + 1, scales);
                let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for h in 0..2 {
                    let qs = _mm_loadu_si128(p.add(16 + 32 * j + 16 * h) as *const __m128i);
                    let lo = _mm_and_si128(qs, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
                    let x0 = xb.add(64 * j + 16 * h);
                    s0 = _mm256_fmadd_ps(widen8!(lo), _mm256_loadu_ps(x0), s0);
                    s0 = _mm256_fmadd_ps(
                        widen8!(_mm_unpackhi_epi64(lo, lo)),
                        _mm256_loadu_ps(x0.add(8)),
                        s0,
                    );
                    s1 = _mm256_fmadd_ps(widen8!(hi), _mm256_loadu_ps(x0.add(32)), s1);
                    s1 = _mm256_fmadd_ps(
                        widen8!(_mm_unpackhi_epi64(hi, hi)),
                        _mm256_loadu_ps(x0.add(40)),
                        s1,
                    );
                }
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d * sc0 as f32), s0, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d * sc1 as f32), s1, acc1);
                mins +=
                    dmin * m0 as f32 * *sums.add(2 * j) + dmin * m1 as f32 * *sums.add(2 * j + 1);
            }
        }
        hsum(_mm256_add_ps(acc0, acc1)) - mins
    }

    /// A Q6_K row · x body on `$lanes`-lane vectors: `nsb` super-blocks at
    /// `row`; each 16 weights add `(d·sc)·Σ (q - 32)·x`. `$bytes` widens
    /// `$lanes` bytes at a pointer to 32-bit lanes; the rest are the width's
    /// operations.
    macro_rules! q6k_body {
        ($name:ident, $feat:literal, $lanes:literal, $bytes:ident, $zero:ident, $set1:ident,
         $fma:ident, $add:ident, $mul:ident, $load:ident, $reduce:ident, $iset1:ident,
         $and:ident, $or:ident, $sub:ident, $slli:ident, $srli:ident, $cvt:ident) => {
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(row: *const u8, nsb: usize, x: *const f32) -> f32 {
                let (mut acc0, mut acc1) = ($zero(), $zero());
                let (m4, m3, off) = ($iset1(0x0f), $iset1(3), $iset1(32));
                for sb in 0..nsb {
                    let p = row.add(sb * 210);
                    prefetch_ahead!(p, 4);
                    let d = f16_at!(p.add(208));
                    for h in 0..2 {
                        let (ql, qh) = (p.add(64 * h), p.add(128 + 32 * h));
                        let sc = p.add(192 + 8 * h) as *const i8;
                        let xb = x.add(sb * 256 + 128 * h);
                        for l in (0..32).step_by($lanes) {
                            let (a, b, hb) = (
                                $bytes!(ql.add(l)),
                                $bytes!(ql.add(l + 32)),
                                $bytes!(qh.add(l)),
                            );
                            // Weights l + 32k: low/high nibbles of `ql`
                            // with bits 2k..2k+1 of `qh` above them.
                            let q = [
                                $or($and(a, m4), $slli::<4>($and(hb, m3))),
                                $or($and(b, m4), $slli::<4>($and($srli::<2>(hb), m3))),
                                $or($srli::<4>(a), $slli::<4>($and($srli::<4>(hb), m3))),
                                $or($srli::<4>(b), $slli::<4>($srli::<6>(hb))),
                            ];
                            for (k, q) in q.into_iter().enumerate() {
                                let s = $mul($cvt($sub(q, off)), $load(xb.add(32 * k + l)));
                                let scale = $set1(d * *sc.add(l / 16 + 2 * k) as f32);
                                if k % 2 == 0 {
                                    acc0 = $fma(scale, s, acc0);
                                } else {
                                    acc1 = $fma(scale, s, acc1);
                                }
                            }
                        }
                    }
                }
                $reduce($add(acc0, acc1))
            }
        };
    }
    macro_rules! bytes16 {
        ($p:expr) => {
            _mm512_cvtepu8_epi32(_mm_loadu_si128($p as *const __m128i))
        };
    }
    macro_rules! bytes8u {
        ($p:expr) => {
            _mm256_cvtepu8_epi32(_mm_loadl_epi64($p as *const __m128i))
        };
    }
    q6k_body!(
        dot_q6k_avx512,
        "avx512f,avx2,fma,f16c",
        16,
        bytes16,
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps,
        _mm512_mul_ps,
        _mm512_loadu_ps,
        _mm512_reduce_add_ps,
        _mm512_set1_epi32,
        _mm512_and_si512,
        _mm512_or_si512,
        _mm512_sub_epi32,
        _mm512_slli_epi32,
        _mm512_srli_epi32,
        _mm512_cvtepi32_ps
    );
    q6k_body!(
        dot_q6k_avx2,
        "avx2,fma,f16c",
        8,
        bytes8u,
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps,
        _mm256_mul_ps,
        _mm256_loadu_ps,
        hsum,
        _mm256_set1_epi32,
        _mm256_and_si256,
        _mm256_or_si256,
        _mm256_sub_epi32,
        _mm256_slli_epi32,
        _mm256_srli_epi32,
        _mm256_cvtepi32_ps
    );

    /// `nb` blocks of `ty` at `row` dequantized to `out`, 8 lanes a step.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dequantize_avx2(ty: GgmlType, row: *const u8, nb: usize, out: *mut f32) {
        for b in 0..nb {
            let o = out.add(b * 32);
            match ty {
                GgmlType::Q8_0 => {
                    let p = row.add(b * 34);
                    let d = _mm256_set1_ps(f16_at!(p));
                    for k in 0..4 {
                        _mm256_storeu_ps(o.add(8 * k), _mm256_mul_ps(bytes8!(p.add(2 + 8 * k)), d));
                    }
                }
                // Rounded as the reference rounds: Q4_1 `q·d + m` (two
                // roundings, not fused), Q4_0 `(q - 8)·d` (the difference
                // is exact).
                GgmlType::Q4_1 => {
                    let p = row.add(b * 20);
                    let (d, m) = (
                        _mm256_set1_ps(f16_at!(p)),
                        _mm256_set1_ps(f16_at!(p.add(2))),
                    );
                    for (k, w) in nibbles8!(p.add(4)).into_iter().enumerate() {
                        _mm256_storeu_ps(o.add(8 * k), _mm256_add_ps(_mm256_mul_ps(w, d), m));
                    }
                }
                _ => {
                    let p = row.add(b * 18);
                    let (d, eight) = (_mm256_set1_ps(f16_at!(p)), _mm256_set1_ps(8.0));
                    for (k, w) in nibbles8!(p.add(2)).into_iter().enumerate() {
                        _mm256_storeu_ps(o.add(8 * k), _mm256_mul_ps(_mm256_sub_ps(w, eight), d));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmos_meta::quant::quantize;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2654435761).rotate_left(13);
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Every available body, one activation row and several, equals the
    /// product with the dequantized weight (the reference llmos loads when
    /// it does not keep blocks), for each block type, including a row
    /// count that does not divide into the pool's tasks.
    #[test]
    fn block_products_equal_the_dequantized_product() {
        let pool = SpinPool::new(2);
        // 8 blocks a row (one group of scales), 11 (a group and a tail);
        // K-quants: one and three super-blocks.
        let types = [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
        ];
        for (ty, cols) in types.into_iter().flat_map(|t| [(t, 256), (t, 352)]).chain(
            [GgmlType::Q4_K, GgmlType::Q6_K]
                .into_iter()
                .flat_map(|t| [(t, 256), (t, 768)]),
        ) {
            let rows = 67;
            let data = quantize(ty, &values(rows * cols, 7));
            let w = Blocks::new(ty, &data, rows, cols).unwrap();
            let mut deq = vec![0f32; rows * cols];
            dequantize_into(ty, &data, &mut deq);
            for b in [1usize, 3] {
                let x = values(b * cols, 99);
                let want: Vec<f32> = (0..b)
                    .flat_map(|i| {
                        let (x, deq) = (&x, &deq);
                        (0..rows).map(move |r| {
                            let xr = &x[i * cols..(i + 1) * cols];
                            let wr = &deq[r * cols..(r + 1) * cols];
                            wr.iter()
                                .zip(xr)
                                .map(|(a, b)| (*a as f64) * (*b as f64))
                                .sum::<f64>() as f32
                        })
                    })
                    .collect();
                for body in calibrate::available() {
                    let mut y = vec![0f32; b * rows];
                    gemv_blocks_with(body, &pool, w, &x, &mut y);
                    for (k, (g, e)) in y.iter().zip(&want).enumerate() {
                        assert!(
                            (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                            "{ty:?} {body:?} cols={cols} b={b} out {k}: {g} vs {e}"
                        );
                    }
                }
            }
            // The SIMD dequantization equals the reference exactly.
            let mut got = vec![0f32; rows * cols];
            dequantize_rows(w, &mut got);
            assert_eq!(got, deq, "{ty:?} dequantize_rows");
        }
        for body in [Body::Avx2, Body::Avx512] {
            if !calibrate::available().contains(&body) {
                crate::cpu::skip_line(
                    "block_products_equal_the_dequantized_product",
                    &format!("{body:?} body: this CPU lacks its features"),
                );
            }
        }
    }

    /// A weight of parts in different block types (rows one part after
    /// another) equals the product with its dequantized rows, one
    /// activation row and several, every body; parts of different widths
    /// are refused.
    #[test]
    fn parts_of_different_types_equal_the_dequantized_product() {
        let pool = SpinPool::new(2);
        let cols = 512;
        let types = [
            (GgmlType::Q5_0, 40),
            (GgmlType::Q8_0, 7),
            (GgmlType::Q4_K, 21),
            (GgmlType::Q6_K, 3),
        ];
        let datas: Vec<Vec<u8>> = types
            .iter()
            .enumerate()
            .map(|(k, &(ty, rows))| quantize(ty, &values(rows * cols, k as u32)))
            .collect();
        let parts: Vec<Blocks<'_>> = types
            .iter()
            .zip(&datas)
            .map(|(&(ty, rows), d)| Blocks::new(ty, d, rows, cols).unwrap())
            .collect();
        let mut deq = Vec::new();
        for (&(ty, rows), d) in types.iter().zip(&datas) {
            let mut f = vec![0f32; rows * cols];
            dequantize_into(ty, d, &mut f);
            deq.extend(f);
        }
        let rows = deq.len() / cols;
        for b in [1usize, 3] {
            let x = values(b * cols, 5);
            for body in calibrate::available() {
                let mut y = vec![0f32; b * rows];
                gemv_block_parts_with(body, &pool, &parts, &x, &mut y);
                for i in 0..b {
                    for r in 0..rows {
                        let e: f64 = deq[r * cols..(r + 1) * cols]
                            .iter()
                            .zip(&x[i * cols..(i + 1) * cols])
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum();
                        let g = y[i * rows + r];
                        assert!(
                            (g as f64 - e).abs() <= 1e-4 * (1.0 + e.abs()),
                            "{body:?} b={b} row {r}: {g} vs {e}"
                        );
                    }
                }
            }
        }
        let narrow = quantize(GgmlType::Q8_0, &values(2 * 256, 1));
        let mixed = [
            parts[0],
            Blocks::new(GgmlType::Q8_0, &narrow, 2, 256).unwrap(),
        ];
        let r = std::panic::catch_unwind(|| {
            gemv_block_parts(&pool, &mixed, &values(cols, 1), &mut vec![0f32; 42])
        });
        assert!(r.is_err(), "parts of different widths were accepted");
    }

    #[test]
    fn malformed_weights_are_refused_by_what_differs() {
        let e = Blocks::new(GgmlType::Q4_1, &[0; 40], 1, 48).unwrap_err();
        assert!(e.contains("48 columns"), "{e}");
        let e = Blocks::new(GgmlType::Q4_1, &[0; 39], 1, 64).unwrap_err();
        assert!(e.contains("39 bytes") && e.contains("expected 40"), "{e}");
        let e = Blocks::new(GgmlType::F32, &[0; 128], 1, 32).unwrap_err();
        assert!(e.contains("F32"), "{e}");
    }
}
