//! The x86 bodies of `super`'s block products: AVX2/FMA/F16C and AVX-512,
//! per block type, and the SIMD dequantization.

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
        let w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128($q as *const __m128i)));
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

/// `$body!(name, ...)` with one vector width's target features and
/// operations inserted after the name (`$feat`, `$zero`, `$set1`, `$fma`,
/// `$add`, `$reduce`), as `dot_body!` and `q4k_body!` take them.
macro_rules! width {
    (avx2 $body:ident!($name:ident, $($rest:tt)*)) => {
        $body!($name, "avx2,fma,f16c", _mm256_setzero_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps, hsum, $($rest)*);
    };
    (avx512 $body:ident!($name:ident, $($rest:tt)*)) => {
        $body!($name, "avx512f,avx2,fma,f16c", _mm512_setzero_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps, _mm512_reduce_add_ps, $($rest)*);
    };
}

/// A row · x body: `$feat` the target features, `$zero`/`$set1`/`$fma`/
/// `$add`/`$reduce` the vector width's operations (`width!` passes
/// them), `$sum` the per-block product macro.
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

width!(avx2 dot_body!(dot_q4_avx2, q4_sum8, true));
width!(avx2 dot_body!(dot_q8_avx2, q8_sum8, false));
width!(avx512 dot_body!(dot_q4_avx512, q4_sum16, true));
width!(avx512 dot_body!(dot_q8_avx512, q8_sum16, false));
width!(avx512 dot_body!(dot_q5_avx512, q5_sum16, true));
width!(avx2 dot_body!(dot_q5_avx2, q5_sum8, true));

/// Hints for the `lines` cache lines `PREFETCH_AHEAD` bytes past `p`.
macro_rules! prefetch_ahead {
    ($p:expr, $lines:expr) => {
        let a = ($p as *const i8).wrapping_add(crate::cpu::PREFETCH_AHEAD);
        for line in 0..$lines {
            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(64 * line));
        }
    };
}

/// A Q4_K row · x body: `nsb` super-blocks at `row`, `xs` the sum of
/// each 32 values of `x`. Each sub-block adds `(d·sc)·Σ q·x -
/// (dmin·m)·Σ x`. `$pair!(q, x0)` is the width's `(Σ q·x, Σ q·x)` of
/// the two sub-blocks in the 32 bytes at `q` (low nibbles against the
/// 32 values at `x0`, high nibbles against the 32 after them).
macro_rules! q4k_body {
    ($name:ident, $feat:literal, $zero:ident, $set1:ident, $fma:ident, $add:ident,
     $reduce:ident, $pair:ident) => {
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(row: *const u8, nsb: usize, x: *const f32, xs: *const f32) -> f32 {
            let (mut acc0, mut acc1) = ($zero(), $zero());
            let mut mins = 0f32;
            for sb in 0..nsb {
                let p = row.add(sb * 144);
                prefetch_ahead!(p, 3);
                let (d, dmin) = (f16_at!(p), f16_at!(p.add(2)));
                let scales = std::slice::from_raw_parts(p.add(4), 12);
                let (xb, sums) = (x.add(sb * 256), xs.add(sb * 8));
                for j in 0..4 {
                    let (sc0, m0) = llmos_meta::quant::k_scale_min(2 * j, scales);
                    let (sc1, m1) = llmos_meta::quant::k_scale_min(2 * j + 1, scales);
                    let (s0, s1) = $pair!(p.add(16 + 32 * j), xb.add(64 * j));
                    acc0 = $fma($set1(d * sc0 as f32), s0, acc0);
                    acc1 = $fma($set1(d * sc1 as f32), s1, acc1);
                    mins += dmin * m0 as f32 * *sums.add(2 * j)
                        + dmin * m1 as f32 * *sums.add(2 * j + 1);
                }
            }
            $reduce($add(acc0, acc1)) - mins
        }
    };
}
macro_rules! q4k_pair16 {
    ($q:expr, $x0:expr) => {{
        let mask = _mm512_set1_epi32(0x0f);
        let qa = _mm512_cvtepu8_epi32(_mm_loadu_si128($q as *const __m128i));
        let qb = _mm512_cvtepu8_epi32(_mm_loadu_si128($q.add(16) as *const __m128i));
        let s0 = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(_mm512_and_si512(qb, mask)),
            _mm512_loadu_ps($x0.add(16)),
            _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_and_si512(qa, mask)),
                _mm512_loadu_ps($x0),
            ),
        );
        let s1 = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(qb)),
            _mm512_loadu_ps($x0.add(48)),
            _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(qa)),
                _mm512_loadu_ps($x0.add(32)),
            ),
        );
        (s0, s1)
    }};
}
macro_rules! q4k_pair8 {
    ($q:expr, $x0:expr) => {{
        let mask = _mm_set1_epi8(0x0f);
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for h in 0..2 {
            let qs = _mm_loadu_si128($q.add(16 * h) as *const __m128i);
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
            let x0 = $x0.add(16 * h);
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
        (s0, s1)
    }};
}
width!(avx512 q4k_body!(dot_q4k_avx512, q4k_pair16));
width!(avx2 q4k_body!(dot_q4k_avx2, q4k_pair8));

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
