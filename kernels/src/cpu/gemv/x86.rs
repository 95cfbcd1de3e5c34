//! The x86 bodies of `super`'s products: AVX2/FMA dot products and
//! `axpy` per element type, the AVX-512 register tiles, and AVX512-BF16's
//! bf16 dot product.

use std::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// An AVX2/FMA dot product of weight elements `$t` with f32 `x`: `$load`
/// widens the 8 elements at `$p` to 8 f32 lanes; four accumulators, a
/// scalar tail through `WeightElem::widen`; it asks for its weights
/// `PREFETCH_AHEAD` bytes early.
macro_rules! avx_dot {
    ($name:ident, $t:ty, |$p:ident| $load:expr) => {
        avx_dot!($name, $t, "avx2,fma", |$p| $load);
    };
    ($name:ident, $t:ty, $features:literal, |$p:ident| $load:expr) => {
        #[target_feature(enable = $features)]
        pub unsafe fn $name(a: &[$t], b: &[f32]) -> f32 {
            let n = a.len().min(b.len());
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                // The next 32 elements' bytes (two lines of f32, one of
                // bf16, half of int8) `PREFETCH_AHEAD` ahead.
                let a = (pa.add(i) as *const i8).wrapping_add(crate::cpu::PREFETCH_AHEAD);
                _mm_prefetch::<_MM_HINT_T0>(a);
                if std::mem::size_of::<$t>() == 4 {
                    _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(64));
                }
                for (k, acc) in acc.iter_mut().enumerate() {
                    let $p = pa.add(i + 8 * k);
                    let vb = _mm256_loadu_ps(pb.add(i + 8 * k));
                    *acc = _mm256_fmadd_ps($load, vb, *acc);
                }
                i += 32;
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut s = hsum(sum);
            while i < n {
                s += <$t as super::WeightElem>::widen(*pa.add(i)) * *pb.add(i);
                i += 1;
            }
            s
        }
    };
}

avx_dot!(dot_f32, f32, |p| _mm256_loadu_ps(p));
// bf16: the bit pattern shifted into the high half of an f32.
avx_dot!(dot_bf16, u16, |p| _mm256_castsi256_ps(_mm256_slli_epi32(
    _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
    16
)));
avx_dot!(dot_f16, half::f16, "avx2,fma,f16c", |p| _mm256_cvtph_ps(
    _mm_loadu_si128(p as *const __m128i)
));
avx_dot!(dot_i8, i8, |p| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
    _mm_loadl_epi64(p as *const __m128i)
)));
/// `out += p * v` on AVX2/FMA, 8 lanes a step (`$load` widens the 8
/// elements at `$q`), a scalar tail.
macro_rules! avx_axpy {
    ($name:ident, $t:ty, |$q:ident| $load:expr) => {
        avx_axpy!($name, $t, "avx2,fma", |$q| $load);
    };
    ($name:ident, $t:ty, $features:literal, |$q:ident| $load:expr) => {
        #[target_feature(enable = $features)]
        pub unsafe fn $name(out: &mut [f32], p: f32, v: &[$t]) {
            let n = out.len().min(v.len());
            let (po, pv) = (out.as_mut_ptr(), v.as_ptr());
            let vp = _mm256_set1_ps(p);
            let mut i = 0;
            while i + 8 <= n {
                let $q = pv.add(i);
                let o = _mm256_loadu_ps(po.add(i));
                _mm256_storeu_ps(po.add(i), _mm256_fmadd_ps(vp, $load, o));
                i += 8;
            }
            while i < n {
                *po.add(i) += p * <$t as super::WeightElem>::widen(*pv.add(i));
                i += 1;
            }
        }
    };
}
avx_axpy!(axpy_f32, f32, |q| _mm256_loadu_ps(q));
avx_axpy!(axpy_f16, half::f16, "avx2,fma,f16c", |q| _mm256_cvtph_ps(
    _mm_loadu_si128(q as *const __m128i)
));
avx_axpy!(axpy_bf16, u16, |q| _mm256_castsi256_ps(_mm256_slli_epi32(
    _mm256_cvtepu16_epi32(_mm_loadu_si128(q as *const __m128i)),
    16
)));

/// A register tile on AVX-512: `MR` activation rows x `NR` weight rows,
/// one 16-lane accumulator per pair, 16 columns a step (`$load` widens
/// 16 weight elements at `$p` to f32; `$masked` loads the `$m` lanes of
/// the last partial step, zeros elsewhere), horizontal sums at the end.
macro_rules! avx512_tile {
    ($name:ident, $t:ty, |$p:ident| $load:expr, |$q:ident, $m:ident| $masked:expr) => {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        pub unsafe fn $name<const MR: usize, const NR: usize>(
            w: *const $t,
            x: *const f32,
            cols: usize,
            out: &mut [f32; 16],
        ) {
            let mut acc = [[_mm512_setzero_ps(); NR]; MR];
            let mut wv = [_mm512_setzero_ps(); NR];
            let mut k = 0;
            while k + 16 <= cols {
                for (j, v) in wv.iter_mut().enumerate() {
                    let $p = w.add(j * cols + k);
                    *v = $load;
                }
                for (i, acc) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(x.add(i * cols + k));
                    for (a, v) in acc.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(xv, *v, *a);
                    }
                }
                k += 16;
            }
            if k < cols {
                let $m: __mmask16 = ((1u32 << (cols - k)) - 1) as __mmask16;
                for (j, v) in wv.iter_mut().enumerate() {
                    let $q = w.add(j * cols + k);
                    *v = $masked;
                }
                for (i, acc) in acc.iter_mut().enumerate() {
                    let xv = _mm512_maskz_loadu_ps($m, x.add(i * cols + k));
                    for (a, v) in acc.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(xv, *v, *a);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                for (j, a) in acc.iter().enumerate() {
                    out[i * NR + j] = _mm512_reduce_add_ps(*a);
                }
            }
        }
    };
}

avx512_tile!(tile_f32, f32, |p| _mm512_loadu_ps(p), |p, m| {
    _mm512_maskz_loadu_ps(m, p)
});
avx512_tile!(
    tile_bf16,
    u16,
    |p| _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)),
        16
    )),
    |p, m| _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p as *const i16)),
        16
    ))
);
avx512_tile!(
    tile_f16,
    half::f16,
    |p| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
    |p, m| _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16))
);
avx512_tile!(
    tile_i8,
    i8,
    |p| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i))),
    |p, m| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)))
);

/// bf16 weights · f32 activations that are bf16 values, with
/// AVX512-BF16: two 16-lane f32 loads packed to 32 bf16 (exact for such
/// values) and one `vdpbf16ps` that multiplies 32 pairs into 16 f32
/// lanes; four accumulators; the tail is a masked load (zeros add
/// nothing).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn dot_bf16_avx512(a: &[u16], b: &[f32]) -> f32 {
    #[inline(always)]
    unsafe fn pair(pa: *const u16, pb: *const f32) -> (__m512bh, __m512bh) {
        let w = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(pa as *const _));
        let x = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(pb.add(16)), _mm512_loadu_ps(pb));
        (w, x)
    }
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 128 <= n {
        // This step's 256 bytes, `PREFETCH_AHEAD` ahead.
        let a = (pa.add(i) as *const i8).wrapping_add(crate::cpu::PREFETCH_AHEAD);
        _mm_prefetch::<_MM_HINT_T0>(a);
        _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(64));
        _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(128));
        _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(192));
        for (k, acc) in acc.iter_mut().enumerate() {
            let (w, x) = pair(pa.add(i + 32 * k), pb.add(i + 32 * k));
            *acc = _mm512_dpbf16_ps(*acc, w, x);
        }
        i += 128;
    }
    while i + 32 <= n {
        let (w, x) = pair(pa.add(i), pb.add(i));
        acc[0] = _mm512_dpbf16_ps(acc[0], w, x);
        i += 32;
    }
    if i < n {
        let r = n - i;
        let m: __mmask32 = (1u32 << r) - 1;
        let w =
            std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(m, pa.add(i) as _));
        let lo = _mm512_maskz_loadu_ps((m & 0xffff) as __mmask16, pb.add(i));
        let hi = _mm512_maskz_loadu_ps((m >> 16) as __mmask16, pb.add(i + 16));
        acc[1] = _mm512_dpbf16_ps(acc[1], w, _mm512_cvtne2ps_pbh(hi, lo));
    }
    _mm512_reduce_add_ps(_mm512_add_ps(
        _mm512_add_ps(acc[0], acc[1]),
        _mm512_add_ps(acc[2], acc[3]),
    ))
}
