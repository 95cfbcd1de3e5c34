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
//! One activation row (decode) takes the fused bodies; several rows
//! (batched decode steps, short prompts) dequantize panels of 32 weight
//! rows, each row once, into a buffer and take the f32 AVX-512 register
//! tiles over every activation row (without AVX-512: each weight row dequantized once, f32
//! dot products per activation row); long prompts dequantize whole weights
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

/// Bytes of activation rows the register tiles of a block product take
/// at a time (a chunk stays in a core's L2 while every weight row passes).
const TILE_X_BYTES: usize = 512 << 10;
/// Weight rows the register tiles of a block product dequantize at a time:
/// each is dequantized once per product (per activation chunk before:
/// 3% of a 512-token prompt's time), and the panel (at most 192 KB for
/// 1536 columns) stays in L2 beside the activation chunk.
const TILE_PANEL: usize = 32;

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
    // Per part: its body, its first row, and (one activation row: the
    // fused bodies read them) the activation's scale sums.
    let mut first_row = 0;
    let parts: Vec<(Blocks<'_>, Body, usize, Vec<f32>)> = parts
        .iter()
        .map(|w| {
            let sums = if b == 1 {
                scale_weights(w.ty, x)
            } else {
                Vec::new()
            };
            let at = first_row;
            first_row += w.rows;
            (*w, body, at, sums)
        })
        .collect();
    let out = SharedSlot(y.as_mut_ptr());
    let tiles = b >= 2 && crate::cpu::gemv::tiles_available();
    let mut per_task = crate::cpu::gemv::rows_per_task(pool.threads(), rows);
    if tiles {
        per_task = per_task.next_multiple_of(4);
    }
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
                    let v = dot(*body, w.ty, w.row(r - at), x, sums);
                    // SAFETY: row `r` is this task's.
                    unsafe { *out.at(r) = v };
                }
                continue;
            }
            if tiles {
                // Several activation rows on AVX-512: a panel of up to
                // `TILE_PANEL` weight rows dequantized once into a buffer
                // (in cache), then the f32 register tiles over the
                // activation rows, 4 weight rows by 4 activation rows
                // (each loaded vector feeds 4 multiply-adds), in chunks of
                // activation rows that stay in the core's L2 beside the
                // panel (`TILE_X_BYTES`).
                let chunk = (TILE_X_BYTES / 4 / cols).max(16) / 4 * 4;
                for p0 in (lo..hi).step_by(TILE_PANEL) {
                    let p1 = (p0 + TILE_PANEL).min(hi);
                    buf.resize((p1 - p0) * cols, 0f32);
                    for (j, o) in buf.chunks_exact_mut(cols).enumerate() {
                        dequantize_row(*body, w.ty, w.row(p0 + j - at), o);
                    }
                    for c0 in (0..b).step_by(chunk) {
                        let c1 = (c0 + chunk).min(b);
                        let mut r = p0;
                        while r < p1 {
                            let nr = if p1 - r >= 4 { 4 } else { 1 };
                            // SAFETY: `buf` holds rows `p0..p1` of `cols`
                            // (row `r` at `r - p0`), `x` the rows `c0..c1`;
                            // `tiles_available` was checked; the outputs
                            // `(i, r..r + nr)` are this task's rows.
                            unsafe {
                                crate::cpu::gemv::tile_rows(
                                    buf.as_ptr().add((r - p0) * cols),
                                    nr,
                                    x,
                                    cols,
                                    c0..c1,
                                    r,
                                    rows,
                                    &out,
                                )
                            };
                            r += nr;
                        }
                    }
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
mod x86;

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
            for b in [1usize, 3, 9] {
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
        for b in [1usize, 3, 6] {
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
