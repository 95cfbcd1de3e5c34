//! Vectorized elementwise math of the CPU hot loops: the softmax of
//! attention scores and the log-probability of each sampled token (a sum of
//! exponentials over the whole vocabulary, once per token). AVX-512 where
//! the CPU has it (chosen at run time), plain loops otherwise.

/// Round-to-nearest-even f32 to bfloat16 bits (as libtorch converts).
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// The largest element of `s` (negative infinity for an empty `s`).
pub fn max(s: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::gemv::tiles_available() && !s.is_empty() {
        // SAFETY: AVX-512 F was detected.
        return unsafe { x86::max_of(s) };
    }
    s.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `sum_j e^(s[j] - shift)`, summed in f64 (f32 partial sums of at most
/// 1,024 terms).
pub fn sum_exp(s: &[f32], shift: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::gemv::tiles_available() {
        // SAFETY: AVX-512 F was detected.
        return s
            .chunks(1024)
            .map(|c| unsafe { x86::sum_exp(c, shift) } as f64)
            .sum();
    }
    s.iter().map(|&x| (x - shift).exp() as f64).sum()
}

/// `out = silu(gate) * up` (`silu(g) = g / (1 + e^-g)`).
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::gemv::tiles_available() {
        // SAFETY: AVX-512 F was detected; the lengths were checked.
        return unsafe { x86::silu_mul(gate, up, out) };
    }
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// Lanes `0..n` (at most 16) set.
    #[inline(always)]
    pub fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// `e^x` per lane (a softmax's arguments, after the maximum is
    /// subtracted, are `<= 0`; SiLU's are any): `x = n ln 2 + r` with an integer `n` and
    /// `|r| <= ln 2 / 2` (`n ln 2` subtracted in two parts, so `r` keeps its
    /// precision for large `|x|`); `e^r` by its Taylor series to the 7th
    /// power (truncation below 3e-9); times `2^n` by `vscalefps`, which
    /// gives 0 for very negative `n` and infinity above ~88.7. Within a few
    /// units in the last place of libm. Arguments below -100 are taken as
    /// -100 (e^-100 is ~4e-44); NaN stays NaN.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp16(x: __m512) -> __m512 {
        // ln 2 = LN2_HI + LN2_LO; LN2_HI has 15 significant bits, so
        // n * LN2_HI is exact for |n| < 2^8.
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        let x = _mm512_max_ps(_mm512_set1_ps(-100.0), x);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// The largest element of a non-empty `s`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn max_of(s: &[f32]) -> f32 {
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for (i, c) in s.chunks(16).enumerate() {
            m = _mm512_max_ps(
                m,
                _mm512_mask_loadu_ps(m, lanes(c.len()), s.as_ptr().add(16 * i)),
            );
        }
        _mm512_reduce_max_ps(m)
    }

    /// `s[j] = e^(s[j] - shift)`; returns their sum.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_in_place(s: &mut [f32], shift: f32) -> f32 {
        let (n, p) = (s.len(), s.as_mut_ptr());
        let m = _mm512_set1_ps(shift);
        let mut total = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let k = lanes((n - i).min(16));
            let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), m));
            _mm512_mask_storeu_ps(p.add(i), k, e);
            total = _mm512_add_ps(total, _mm512_maskz_mov_ps(k, e));
            i += 16;
        }
        _mm512_reduce_add_ps(total)
    }

    /// `out = silu(gate) * up`, 16 lanes a step.
    ///
    /// # Safety
    /// The three slices have one length; the CPU has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let one = _mm512_set1_ps(1.0);
        for (i, o) in out.chunks_mut(16).enumerate() {
            let k = lanes(o.len());
            let g = _mm512_maskz_loadu_ps(k, gate.as_ptr().add(16 * i));
            let u = _mm512_maskz_loadu_ps(k, up.as_ptr().add(16 * i));
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let s = _mm512_div_ps(g, _mm512_add_ps(one, e));
            _mm512_mask_storeu_ps(o.as_mut_ptr(), k, _mm512_mul_ps(s, u));
        }
    }

    /// `sum_j e^(s[j] - shift)` in f32.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sum_exp(s: &[f32], shift: f32) -> f32 {
        let m = _mm512_set1_ps(shift);
        let mut total = _mm512_setzero_ps();
        for (i, c) in s.chunks(16).enumerate() {
            let k = lanes(c.len());
            let e = exp16(_mm512_sub_ps(
                _mm512_maskz_loadu_ps(k, s.as_ptr().add(16 * i)),
                m,
            ));
            total = _mm512_add_ps(total, _mm512_maskz_mov_ps(k, e));
        }
        _mm512_reduce_add_ps(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorized exponential against libm's over a softmax's
    /// arguments (`x <= 0`), including where the result underflows.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_matches_libm() {
        if !crate::cpu::gemv::tiles_available() {
            crate::cpu::skip_line(
                "vector_exp_matches_libm",
                "no AVX-512 on this CPU: the 16-lane exponential does not run here",
            );
            return;
        }
        use std::arch::x86_64::*;
        let xs: Vec<f32> = (0..=16_000)
            .map(|i| -(i as f32) * 0.01)
            .chain([-1e30, -0.0])
            .collect();
        for c in xs.chunks(16) {
            let mut x = [0f32; 16];
            x[..c.len()].copy_from_slice(c);
            let mut y = [0f32; 16];
            // SAFETY: AVX-512 F was checked.
            unsafe { _mm512_storeu_ps(y.as_mut_ptr(), x86::exp16(_mm512_loadu_ps(x.as_ptr()))) };
            for (x, y) in x.iter().zip(&y) {
                let want = x.exp();
                assert!(
                    (y - want).abs() <= 5e-7 * want + 1e-38,
                    "exp({x}) = {y}, libm {want}"
                );
            }
        }
    }

    /// Maximum and sum of exponentials at lengths around the 16-lane steps
    /// (masked tails) and over a vocabulary-sized row, against plain loops.
    #[test]
    fn max_and_sum_exp_match_plain_loops() {
        let mut x = 3u32;
        let mut rnd = move || {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 8) as f32 / (1u32 << 24) as f32 * 40.0 - 20.0
        };
        for n in [1usize, 15, 16, 17, 33, 1023, 1025, 49_152] {
            let s: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let want_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&s), want_max, "n {n}");
            let want: f64 = s.iter().map(|&v| ((v - want_max) as f64).exp()).sum();
            let got = sum_exp(&s, want_max);
            assert!((got - want).abs() <= 1e-6 * want, "n {n}: {got} vs {want}");
        }
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }

    /// SiLU-and-multiply against the plain formula, over large positive and
    /// negative gates (where `e^-g` overflows or vanishes) and a masked tail.
    #[test]
    fn silu_mul_matches_the_formula() {
        let n = 1000;
        let gate: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) * 0.25).collect();
        let up: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let mut out = vec![0f32; n];
        silu_mul(&gate, &up, &mut out);
        for i in 0..n {
            let (g, u) = (gate[i] as f64, up[i] as f64);
            let want = g / (1.0 + (-g).exp()) * u;
            assert!(
                (out[i] as f64 - want).abs() <= 1e-6 * want.abs() + 1e-30,
                "silu({g}) * {u} = {}, want {want}",
                out[i]
            );
        }
    }
}
