//! GGML tensor types llmos reads, and their dequantization to f32.
//!
//! Block formats (all little-endian, `d`/`m` are f16):
//! - Q4_0: 32 weights in 18 bytes: `d`, 16 bytes of nibbles; w = (q - 8) * d.
//! - Q4_1: 32 weights in 20 bytes: `d`, `m`, 16 bytes of nibbles; w = q * d + m.
//! - Q8_0: 32 weights in 34 bytes: `d`, 32 signed bytes; w = q * d.
//!
//! - Q5_0: 32 weights in 22 bytes: `d`, 4 bytes `qh` (bit j: weight j's
//!   fifth bit), 16 bytes of nibbles; w = (q - 16) * d.
//! - Q5_1: 32 weights in 24 bytes: `d`, `m`, `qh`, 16 bytes of nibbles;
//!   w = q * d + m.
//! - Q4_K: 256 weights in 144 bytes: `d`, `dmin`, 12 bytes of eight 6-bit
//!   scales and eight 6-bit mins (packed as `k_scale_min` unpacks them),
//!   128 bytes of nibbles; sub-block s of 32 weights: w = (d·sc_s)·q -
//!   (dmin·m_s). Bytes 32j..32j+32 hold sub-block 2j in their low nibbles
//!   and 2j+1 in their high.
//! - Q6_K: 256 weights in 210 bytes: 128 bytes `ql` (low 4 bits), 64 bytes
//!   `qh` (high 2 bits), 16 signed 8-bit scales (one per 16 weights), `d`;
//!   w = (d·sc)·(q - 32). In each half of 128 weights (`ql` + 64h, `qh` +
//!   32h), for l < 32: weight l is `ql[l]` low | `qh[l]` bits 0-1, l + 32
//!   `ql[l + 32]` low | bits 2-3, l + 64 `ql[l]` high | bits 4-5, l + 96
//!   `ql[l + 32]` high | bits 6-7.
//!
//! In Q4/Q5 blocks of 32 the low nibble of byte j is weight j, the high
//! nibble weight j + 16. Values are computed in the order and f32 roundings
//! of ggml's reference dequantization (the tests compare with gguf-py's).

use half::{bf16, f16};

/// ggml's own names (`Q4_K`, as in files and llama.cpp's messages).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q6_K,
}

impl GgmlType {
    pub const SUPPORTED: &'static str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K";

    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4_K,
            14 => Self::Q6_K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    pub fn as_u32(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q4_K => 12,
            Self::Q6_K => 14,
            Self::BF16 => 30,
        }
    }

    /// Weights per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => 32,
            Self::Q4_K | Self::Q6_K => QK_K,
        }
    }

    /// Whether this is a block-quantized type (kept in its blocks by
    /// `--quantize file`).
    pub fn is_quantized(self) -> bool {
        !matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q4_K => 144,
            Self::Q6_K => 210,
        }
    }
}

/// Human name of any ggml type number, for error messages.
pub fn ggml_type_name(v: u32) -> &'static str {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES.get(v as usize).copied().unwrap_or("unknown")
}

/// Weights per K-quant super-block.
pub const QK_K: usize = 256;

/// Scale and min of sub-block `j` (0-7) of a Q4_K block's 12 packed bytes.
#[inline]
pub fn k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `bytes` of type `ty` into `out` (whose length is the element
/// count). `bytes.len()` must equal `out.len() / block_size * block_bytes`.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(
        bytes.len(),
        out.len() / ty.block_size() * ty.block_bytes(),
        "dequantize_into: byte length does not match element count"
    );
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    let q = b[2 + j];
                    o[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                    o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(20)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                for j in 0..16 {
                    let q = b[4 + j];
                    o[j] = (q & 0x0f) as f32 * d + m;
                    o[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    o[j] = (b[2 + j] as i8) as f32 * d;
                }
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let q5_1 = ty == GgmlType::Q5_1;
            let (bb, qh_at) = if q5_1 { (24, 4) } else { (22, 2) };
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[qh_at], b[qh_at + 1], b[qh_at + 2], b[qh_at + 3]]);
                for j in 0..16 {
                    let q = b[qh_at + 4 + j];
                    let lo = (q & 0x0f) as u32 | ((qh >> j) & 1) << 4;
                    let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                    if q5_1 {
                        let m = f16_at(b, 2);
                        o[j] = lo as f32 * d + m;
                        o[j + 16] = hi as f32 * d + m;
                    } else {
                        o[j] = (lo as i32 - 16) as f32 * d;
                        o[j + 16] = (hi as i32 - 16) as f32 * d;
                    }
                }
            }
        }
        GgmlType::Q4_K => {
            for (o, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(144)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let (scales, qs) = (&b[4..16], &b[16..144]);
                for j in 0..4 {
                    let (sc0, m0) = k_scale_min(2 * j, scales);
                    let (sc1, m1) = k_scale_min(2 * j + 1, scales);
                    let (d0, dm0) = (d * sc0 as f32, dmin * m0 as f32);
                    let (d1, dm1) = (d * sc1 as f32, dmin * m1 as f32);
                    for l in 0..32 {
                        let q = qs[32 * j + l];
                        o[64 * j + l] = d0 * (q & 0x0f) as f32 - dm0;
                        o[64 * j + 32 + l] = d1 * (q >> 4) as f32 - dm1;
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            for (o, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(210)) {
                let d = f16_at(b, 208);
                for h in 0..2 {
                    let (ql, qh) = (&b[64 * h..64 * h + 64], &b[128 + 32 * h..128 + 32 * h + 32]);
                    let sc = &b[192 + 8 * h..192 + 8 * h + 8];
                    let o = &mut o[128 * h..128 * h + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q = [
                            (ql[l] & 0x0f) | (qh[l] & 3) << 4,
                            (ql[l + 32] & 0x0f) | ((qh[l] >> 2) & 3) << 4,
                            (ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4,
                            (ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4,
                        ];
                        for (k, q) in q.into_iter().enumerate() {
                            let s = sc[is + 2 * k] as i8 as f32;
                            o[l + 32 * k] = d * s * (q as i32 - 32) as f32;
                        }
                    }
                }
            }
        }
    }
}

/// Quantizes f32 values to `ty` (used to write test fixtures and converted
/// files). Q4/Q8 use llama.cpp's reference rounding.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Vec<u8> {
    assert_eq!(values.len() % ty.block_size(), 0);
    let mut out = Vec::with_capacity(values.len() / ty.block_size() * ty.block_bytes());
    match ty {
        GgmlType::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => values
            .iter()
            .for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => values
            .iter()
            .for_each(|v| out.extend(bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q4_0 => {
            for blk in values.chunks_exact(32) {
                // The value of largest magnitude maps to -8.
                let max = blk
                    .iter()
                    .copied()
                    .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                for j in 0..16 {
                    let q0 = ((blk[j] * id + 8.5) as i32).clamp(0, 15) as u8;
                    let q1 = ((blk[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
                    out.push(q0 | (q1 << 4));
                }
            }
        }
        GgmlType::Q4_1 => {
            for blk in values.chunks_exact(32) {
                let min = blk.iter().copied().fold(f32::INFINITY, f32::min);
                let max = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(f16::from_f32(min).to_le_bytes());
                for j in 0..16 {
                    let q0 = (((blk[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    let q1 = (((blk[j + 16] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    out.push(q0 | (q1 << 4));
                }
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            for blk in values.chunks_exact(32) {
                let q: Vec<u32> = if ty == GgmlType::Q5_0 {
                    let max = blk
                        .iter()
                        .copied()
                        .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
                    let d = max / -16.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend(f16::from_f32(d).to_le_bytes());
                    blk.iter()
                        .map(|v| ((v * id + 16.5) as i32).clamp(0, 31) as u32)
                        .collect()
                } else {
                    let min = blk.iter().copied().fold(f32::INFINITY, f32::min);
                    let max = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let d = (max - min) / 31.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend(f16::from_f32(d).to_le_bytes());
                    out.extend(f16::from_f32(min).to_le_bytes());
                    blk.iter()
                        .map(|v| (((v - min) * id + 0.5) as i32).clamp(0, 31) as u32)
                        .collect()
                };
                let qh = (0..32).fold(0u32, |h, j| h | (q[j] >> 4) << j);
                out.extend(qh.to_le_bytes());
                for j in 0..16 {
                    out.push((q[j] & 0x0f) as u8 | ((q[j + 16] & 0x0f) as u8) << 4);
                }
            }
        }
        // K-quants: a plain min/max fit per sub-block, the sub-block scales
        // themselves quantized against the super-block's (llama.cpp
        // searches for better scales; any valid block serves the tests).
        GgmlType::Q4_K => {
            for blk in values.chunks_exact(QK_K) {
                let (mut scale, mut mins) = ([0f32; 8], [0f32; 8]);
                for (s, sub) in blk.chunks_exact(32).enumerate() {
                    let min = sub.iter().copied().fold(0f32, f32::min);
                    let max = sub.iter().copied().fold(0f32, f32::max);
                    scale[s] = (max - min) / 15.0;
                    mins[s] = -min;
                }
                let d = scale.iter().copied().fold(0f32, f32::max) / 63.0;
                let dmin = mins.iter().copied().fold(0f32, f32::max) / 63.0;
                let q6 = |v: f32, by: f32| {
                    if by > 0.0 {
                        (v / by).round().clamp(0.0, 63.0) as u8
                    } else {
                        0
                    }
                };
                let sc: Vec<u8> = scale.iter().map(|&v| q6(v, d)).collect();
                let m: Vec<u8> = mins.iter().map(|&v| q6(v, dmin)).collect();
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(f16::from_f32(dmin).to_le_bytes());
                let mut packed = [0u8; 12];
                for j in 0..4 {
                    packed[j] = sc[j] | (sc[j + 4] >> 4) << 6;
                    packed[j + 4] = m[j] | (m[j + 4] >> 4) << 6;
                    packed[j + 8] = (sc[j + 4] & 0x0f) | (m[j + 4] & 0x0f) << 4;
                }
                out.extend(packed);
                // Quantized against the stored (rounded) scales.
                let (d, dmin) = (f16::from_f32(d).to_f32(), f16::from_f32(dmin).to_f32());
                let q: Vec<u8> = blk
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let (s, mm) = (d * sc[i / 32] as f32, dmin * m[i / 32] as f32);
                        if s > 0.0 {
                            ((v + mm) / s).round().clamp(0.0, 15.0) as u8
                        } else {
                            0
                        }
                    })
                    .collect();
                for j in 0..4 {
                    for l in 0..32 {
                        out.push(q[64 * j + l] | q[64 * j + 32 + l] << 4);
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            for blk in values.chunks_exact(QK_K) {
                let scale: Vec<f32> = blk
                    .chunks_exact(16)
                    .map(|sub| sub.iter().fold(0f32, |m, v| m.max(v.abs())) / 31.0)
                    .collect();
                let d = scale.iter().copied().fold(0f32, f32::max) / 127.0;
                let sc: Vec<i8> = scale
                    .iter()
                    .map(|&v| {
                        if d > 0.0 {
                            (v / d).round().clamp(-128.0, 127.0) as i8
                        } else {
                            0
                        }
                    })
                    .collect();
                let dr = f16::from_f32(d).to_f32();
                let q: Vec<u8> = blk
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let s = dr * sc[i / 16] as f32;
                        let q = if s != 0.0 {
                            (v / s).round().clamp(-32.0, 31.0) as i32
                        } else {
                            0
                        };
                        (q + 32) as u8
                    })
                    .collect();
                let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
                for h in 0..2 {
                    for l in 0..32 {
                        let q = |k: usize| q[128 * h + l + 32 * k];
                        ql[64 * h + l] = (q(0) & 0x0f) | (q(2) & 0x0f) << 4;
                        ql[64 * h + l + 32] = (q(1) & 0x0f) | (q(3) & 0x0f) << 4;
                        qh[32 * h + l] =
                            q(0) >> 4 | (q(1) >> 4) << 2 | (q(2) >> 4) << 4 | (q(3) >> 4) << 6;
                    }
                }
                out.extend(ql);
                out.extend(qh);
                out.extend(sc.iter().map(|&s| s as u8));
                out.extend(f16::from_f32(d).to_le_bytes());
            }
        }
        GgmlType::Q8_0 => {
            for blk in values.chunks_exact(32) {
                let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                for v in blk {
                    out.push(((v * id).round() as i32).clamp(-127, 127) as i8 as u8);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect()
    }

    #[test]
    fn q4_1_hand_built_block() {
        // d = 0.5, m = -1.0, nibbles: low = j % 16, high = 15 - j % 16.
        let mut b = Vec::new();
        b.extend(f16::from_f32(0.5).to_le_bytes());
        b.extend(f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let mut out = vec![0f32; 32];
        dequantize_into(GgmlType::Q4_1, &b, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.5 - 1.0);
            assert_eq!(out[j + 16], (15 - j) as f32 * 0.5 - 1.0);
        }
    }

    #[test]
    fn q4_0_hand_built_block() {
        let mut b = Vec::new();
        b.extend(f16::from_f32(2.0).to_le_bytes());
        for j in 0..16u8 {
            b.push(j | (3 << 4));
        }
        let mut out = vec![0f32; 32];
        dequantize_into(GgmlType::Q4_0, &b, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], (j as f32 - 8.0) * 2.0);
            assert_eq!(out[j + 16], (3.0 - 8.0) * 2.0);
        }
    }

    #[test]
    fn q8_0_hand_built_block() {
        let mut b = Vec::new();
        b.extend(f16::from_f32(0.25).to_le_bytes());
        for j in 0..32i8 {
            b.push((j - 16) as u8);
        }
        let mut out = vec![0f32; 32];
        dequantize_into(GgmlType::Q8_0, &b, &mut out);
        for j in 0..32 {
            assert_eq!(out[j], (j as f32 - 16.0) * 0.25);
        }
    }

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let x = ramp(256);
        for (ty, tol) in [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 2e-3),
            (GgmlType::BF16, 2e-2),
            (GgmlType::Q8_0, 3.0 / 127.0),
            (GgmlType::Q4_1, 6.0 / 15.0 * 0.51 + 1e-2),
            (GgmlType::Q4_0, 3.0 / 8.0 * 0.51 + 1e-2 + 3.0 / 8.0),
        ] {
            let q = quantize(ty, &x);
            let mut y = vec![0f32; x.len()];
            dequantize_into(ty, &q, &mut y);
            let err = x
                .iter()
                .zip(&y)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= tol, "{ty:?}: max error {err} > {tol}");
        }
    }
}
