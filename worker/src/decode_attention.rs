//! Attention for one query position per sequence over the KV cache, on CPU:
//! `softmax(q . K^T * scale) . V` per query head, grouped-query aware. For a
//! single query libtorch's general attention kernel (blocked flash attention
//! through BLAS) spends more time in set-up than in arithmetic; this reads
//! the cache views in place. Tests check it against
//! `scaled_dot_product_attention`.

use tch::{Device, Kind, Tensor};

use crate::gemv::{pool, WeightElem};
use crate::spin_pool::{SharedOut, SharedPtr, SharedSlot};

/// Whether `decode_attention` handles these tensors (else use libtorch).
pub fn supported(q: &Tensor, k: &Tensor) -> bool {
    q.device() == Device::Cpu
        && matches!(k.kind(), Kind::Float | Kind::BFloat16)
        && k.stride()[3] == 1
        && q.size()[2] == 1
}

/// Cached key/value element types (f32, and bf16 as `u16`).
pub(crate) trait KvElem: WeightElem {
    /// The 16 elements at `p` widened to f32 lanes.
    ///
    /// # Safety
    /// `p` points at 16 readable elements; the CPU has AVX-512 F and BW.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl KvElem for f32 {
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl KvElem for u16 {
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn load16(p: *const u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // bf16: the bit pattern shifted into the high half of an f32.
        _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)),
            16,
        ))
    }
}

/// `out_g = softmax(q_g . K^T * scale) . V` for the `group` query heads `g`
/// (one after another in `q` and `out`) that share one KV head, over the key and value rows the
/// iterators yield in position order; each cached row is read once for the
/// whole group (grouped-query attention re-reads nothing). `scores` is
/// scratch. Shared by the contiguous-cache and the paged kernels, which
/// differ only in where each position's row lives.
///
/// On AVX-512 CPUs with head sizes of 16, 32, 64 or 128 the body is
/// `x86::attend` (scores 16 keys at a time, the weighted sum of values with
/// the group's outputs in registers); elsewhere a portable loop over
/// `WeightElem::dot`/`axpy`.
pub(crate) fn attend_row<'a, T: KvElem + 'a>(
    q: &[f32],
    group: usize,
    keys: impl Iterator<Item = &'a [T]>,
    values: impl Iterator<Item = &'a [T]>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let d = q.len() / group;
    debug_assert_eq!(out.len(), q.len());
    #[cfg(target_arch = "x86_64")]
    if crate::gemv::tiles_available() && matches!(d, 16 | 32 | 64 | 128) {
        let row = |r: &[T]| {
            assert!(r.len() >= d, "a cached row shorter than the head size");
            r.as_ptr()
        };
        let keys: Vec<*const T> = keys.map(row).collect();
        let values: Vec<*const T> = values.map(row).collect();
        assert_eq!(keys.len(), values.len());
        // SAFETY: every pointer starts a row of at least `d` elements
        // (checked above); the CPU features were checked.
        unsafe { x86::attend(q, group, d, &keys, &values, scale, scores, out) };
        return;
    }
    attend_portable(q, group, keys, values, scale, scores, out)
}

/// `attend_row` on any CPU: `WeightElem::dot` per key and query head,
/// `WeightElem::axpy` per value and query head.
fn attend_portable<'a, T: KvElem + 'a>(
    q: &[f32],
    group: usize,
    keys: impl Iterator<Item = &'a [T]>,
    values: impl Iterator<Item = &'a [T]>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let d = q.len() / group;
    // scores[j * group + g]
    scores.clear();
    for k in keys {
        for qg in q.chunks_exact(d) {
            scores.push(T::dot(k, qg) * scale);
        }
    }
    // Softmax per query head: head g's scores are every group-th entry.
    for g in 0..group {
        let max = scores
            .iter()
            .skip(g)
            .step_by(group)
            .fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut total = 0f32;
        for s in scores.iter_mut().skip(g).step_by(group) {
            *s = (*s - max).exp();
            total += *s;
        }
        let inv = 1.0 / total;
        scores
            .iter_mut()
            .skip(g)
            .step_by(group)
            .for_each(|s| *s *= inv);
    }
    out.iter_mut().for_each(|a| *a = 0.0);
    for (p, v) in scores.chunks_exact(group).zip(values) {
        for (o, &p) in out.chunks_exact_mut(d).zip(p) {
            T::axpy(o, p, v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::KvElem;

    /// Lane `j` of the result is the horizontal sum of `v[j]`: pairs of
    /// vectors merged by interleaving and adding, four levels (45
    /// instructions for 16 sums, against ~8 for each one alone).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose_sum16(v: &[__m512; 16]) -> __m512 {
        // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3].
        let r: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
        });
        // Per 128-bit lane: partial sums of four vectors, in order.
        let s: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (_mm512_castps_pd(r[2 * i]), _mm512_castps_pd(r[2 * i + 1]));
            _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
            )
        });
        // 128-bit lanes added pairwise, then across the pair.
        let lanes = |a: __m512, b: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            )
        };
        lanes(lanes(s[0], s[1]), lanes(s[2], s[3]))
    }

    /// `out[j] = (q . keys[j]) * scale` for a `16 * C`-long query.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn key_scores<T: KvElem, const C: usize>(
        q: *const f32,
        keys: &[*const T],
        scale: f32,
        out: *mut f32,
    ) {
        let qv: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(q.add(16 * c)));
        let sc = _mm512_set1_ps(scale);
        for (i, batch) in keys.chunks(16).enumerate() {
            let n = batch.len();
            let mut acc = [_mm512_setzero_ps(); 16];
            for (j, a) in acc.iter_mut().enumerate() {
                // A short last batch repeats its last key (results masked).
                let k = batch[j.min(n - 1)];
                for (c, qc) in qv.iter().enumerate() {
                    *a = _mm512_fmadd_ps(T::load16(k.add(16 * c)), *qc, *a);
                }
            }
            let s = _mm512_mul_ps(transpose_sum16(&acc), sc);
            _mm512_mask_storeu_ps(out.add(16 * i), ((1u32 << n) - 1) as __mmask16, s);
        }
    }

    /// `out_h = inv[h] * sum_j p[h * stride + j] * values[j]` for `H` heads
    /// of `16 * C` lanes, their accumulators in registers.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn weighted_sum<T: KvElem, const C: usize, const H: usize>(
        p: *const f32,
        stride: usize,
        values: &[*const T],
        inv: *const f32,
        out: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; H];
        for (j, &v) in values.iter().enumerate() {
            let vv: [__m512; C] = std::array::from_fn(|c| T::load16(v.add(16 * c)));
            for (h, acc) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*p.add(h * stride + j));
                for (a, x) in acc.iter_mut().zip(&vv) {
                    *a = _mm512_fmadd_ps(w, *x, *a);
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            let s = _mm512_set1_ps(*inv.add(h));
            for (c, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add((h * C + c) * 16), _mm512_mul_ps(*a, s));
            }
        }
    }

    /// Heads of `16 * C` lanes at most `16 / C` at a time (their sums in 16
    /// registers), through `weighted_sum`.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn weighted_sums<T: KvElem, const C: usize>(
        p: &[f32],
        group: usize,
        values: &[*const T],
        inv: &[f32],
        out: &mut [f32],
    ) {
        let len = values.len();
        let mut h = 0;
        while h < group {
            let n = (group - h).min((16 / C).clamp(1, 4));
            let (pp, ip, op) = (
                p.as_ptr().add(h * len),
                inv.as_ptr().add(h),
                out.as_mut_ptr().add(h * 16 * C),
            );
            match n {
                4 => weighted_sum::<T, C, 4>(pp, len, values, ip, op),
                3 => weighted_sum::<T, C, 3>(pp, len, values, ip, op),
                2 => weighted_sum::<T, C, 2>(pp, len, values, ip, op),
                _ => weighted_sum::<T, C, 1>(pp, len, values, ip, op),
            }
            h += n;
        }
    }

    /// `attend_row`'s body on AVX-512: per query head the scores (16 keys a
    /// batch), a softmax, then the weighted sum of values for up to four
    /// heads at once (each cached value row loaded once for them).
    ///
    /// # Safety
    /// Every pointer in `keys` and `values` starts `d` readable elements;
    /// `d` is 16, 32, 64 or 128; the CPU has AVX-512 F, BW and VL.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn attend<T: KvElem>(
        q: &[f32],
        group: usize,
        d: usize,
        keys: &[*const T],
        values: &[*const T],
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let len = keys.len();
        assert!(q.len() == group * d && out.len() == q.len() && len > 0);
        // Each head's scores, then each head's 1 / (sum of exponentials).
        scores.clear();
        scores.resize(group * len + group, 0.0);
        for g in 0..group {
            let (qg, sg) = (q.as_ptr().add(g * d), scores.as_mut_ptr().add(g * len));
            match d {
                16 => key_scores::<T, 1>(qg, keys, scale, sg),
                32 => key_scores::<T, 2>(qg, keys, scale, sg),
                64 => key_scores::<T, 4>(qg, keys, scale, sg),
                _ => key_scores::<T, 8>(qg, keys, scale, sg),
            }
            let s = &mut scores[g * len..(g + 1) * len];
            let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut total = 0f32;
            for x in s.iter_mut() {
                *x = (*x - max).exp();
                total += *x;
            }
            scores[group * len + g] = 1.0 / total;
        }
        let (p, inv) = scores.split_at(group * len);
        match d {
            16 => weighted_sums::<T, 1>(p, group, values, inv, out),
            32 => weighted_sums::<T, 2>(p, group, values, inv, out),
            64 => weighted_sums::<T, 4>(p, group, values, inv, out),
            _ => weighted_sums::<T, 8>(p, group, values, inv, out),
        }
    }
}

/// `q`: `[b, heads, 1, d]`; `k`, `v`: `[b, kv_heads, len, d]` (views with a
/// unit innermost stride). Returns `[b, heads, 1, d]` in `q`'s dtype.
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    let (b, heads, _, d) = q.size4().expect("q is [b, heads, 1, d]");
    let qf = q.to_kind(Kind::Float).contiguous();
    let out = Tensor::empty([b, heads, 1, d], (Kind::Float, Device::Cpu));
    let n = (b * heads * d) as usize;
    // SAFETY: `qf` and `out` are contiguous f32 CPU tensors of `n` elements.
    let (qs, os) = unsafe {
        (
            std::slice::from_raw_parts(qf.data_ptr() as *const f32, n),
            std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n),
        )
    };
    attend_into(qs, heads as usize, k, v, k.size()[2] as usize, scale, os);
    out.to_kind(q.kind())
}

/// Attention of `q` (`[b, heads, d]` as a flat slice) over the first `len`
/// positions of `k`, `v` (`[b, kv_heads, >= len, d]`, unit innermost
/// stride, f32 or bf16), written to `out` (same layout as `q`).
pub fn attend_into(
    q: &[f32],
    heads: usize,
    k: &Tensor,
    v: &Tensor,
    len: usize,
    scale: f64,
    out: &mut [f32],
) {
    let (b, kv_heads, cap, d) = k.size4().expect("k is [b, kv_heads, len, d]");
    assert!(len as i64 <= cap && k.stride()[3] == 1 && v.stride()[3] == 1);
    assert_eq!(q.len(), b as usize * heads * d as usize);
    assert_eq!(out.len(), q.len());
    let (ks, vs) = (k.stride(), v.stride());
    let dims = Dims {
        group: heads / kv_heads as usize,
        kv_heads: kv_heads as usize,
        len,
        d: d as usize,
        k_strides: [ks[0] as usize, ks[1] as usize, ks[2] as usize],
        v_strides: [vs[0] as usize, vs[1] as usize, vs[2] as usize],
        scale: scale as f32,
    };
    let qp = SharedPtr(q.as_ptr());
    let op = SharedSlot(out.as_mut_ptr());
    match k.kind() {
        Kind::Float => run::<f32>(
            &dims,
            b as usize,
            &qp,
            SharedPtr(k.data_ptr() as _),
            SharedPtr(v.data_ptr() as _),
            &op,
        ),
        _ => run::<u16>(
            &dims,
            b as usize,
            &qp,
            SharedPtr(k.data_ptr() as _),
            SharedPtr(v.data_ptr() as _),
            &op,
        ),
    }
}

struct Dims {
    group: usize,
    kv_heads: usize,
    len: usize,
    d: usize,
    k_strides: [usize; 3],
    v_strides: [usize; 3],
    scale: f32,
}

fn run<T: KvElem>(
    m: &Dims,
    batch: usize,
    q: &SharedPtr<f32>,
    k: SharedPtr<T>,
    v: SharedPtr<T>,
    out: &SharedOut,
) {
    // One task per query head (not per KV head): with few KV heads that
    // balances the threads; a group's K/V rows are re-read from cache.
    let heads = m.kv_heads * m.group;
    pool().run(batch * heads, &|task| {
        let (bi, head) = (task / heads, task % heads);
        let h = head / m.group;
        let kb = bi * m.k_strides[0] + h * m.k_strides[1];
        let vb = bi * m.v_strides[0] + h * m.v_strides[1];
        let qo = (bi * heads + head) * m.d;
        let mut scores = Vec::with_capacity(m.len);
        // SAFETY: all offsets stay inside the tensors' extents given by
        // their sizes and strides; `out` rows are this task's alone.
        unsafe {
            let rows = |first: *const T, stride: usize| {
                (0..m.len).map(move |j| std::slice::from_raw_parts(first.add(j * stride), m.d))
            };
            attend_row(
                std::slice::from_raw_parts(q.at(qo), m.d),
                1,
                rows(k.at(kb), m.k_strides[2]),
                rows(v.at(vb), m.v_strides[2]),
                m.scale,
                &mut scores,
                std::slice::from_raw_parts_mut(out.at(qo), m.d),
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 body (where the CPU has it) equals the portable loop:
    /// head sizes 16-128, groups of 1-5 heads (several passes of the
    /// weighted sum), lengths around the 16-key batches, f32 and bf16
    /// rows, each row at its own address.
    #[test]
    fn attend_row_bodies_agree() {
        if !crate::gemv::tiles_available() {
            eprintln!("no AVX-512 here: only the portable body runs");
            return;
        }
        let mut x = 7u32;
        let mut rnd = move || {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
        };
        for d in [16usize, 32, 64, 128] {
            for group in 1..=5usize {
                for len in [1usize, 2, 15, 16, 17, 33, 100] {
                    let q: Vec<f32> = (0..group * d).map(|_| rnd()).collect();
                    // Rows 3 elements apart beyond `d`: not one contiguous block.
                    let kf: Vec<f32> = (0..len * (d + 3)).map(|_| rnd()).collect();
                    let vf: Vec<f32> = (0..len * (d + 3)).map(|_| rnd()).collect();
                    let kb: Vec<u16> = kf
                        .iter()
                        .map(|&v| crate::kv_cache::f32_to_bf16(v))
                        .collect();
                    let vb: Vec<u16> = vf
                        .iter()
                        .map(|&v| crate::kv_cache::f32_to_bf16(v))
                        .collect();
                    let scale = 1.0 / (d as f32).sqrt();
                    fn both<T: KvElem>(
                        q: &[f32],
                        group: usize,
                        k: &[T],
                        v: &[T],
                        d: usize,
                        scale: f32,
                    ) -> f32 {
                        fn rows<T>(m: &[T], d: usize) -> impl Iterator<Item = &[T]> {
                            m.chunks_exact(d + 3).map(move |r| &r[..d])
                        }
                        let (mut s, mut fast, mut slow) =
                            (Vec::new(), vec![0f32; q.len()], vec![1f32; q.len()]);
                        attend_row(q, group, rows(k, d), rows(v, d), scale, &mut s, &mut fast);
                        attend_portable(q, group, rows(k, d), rows(v, d), scale, &mut s, &mut slow);
                        fast.iter()
                            .zip(&slow)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0.0, f32::max)
                    }
                    let ef = both(&q, group, &kf, &vf, d, scale);
                    let eb = both(&q, group, &kb, &vb, d, scale);
                    assert!(
                        ef < 1e-5 && eb < 1e-5,
                        "d {d} group {group} len {len}: f32 {ef}, bf16 {eb}"
                    );
                }
            }
        }
    }

    #[test]
    fn matches_sdpa_on_cache_views_f32_and_bf16() {
        tch::manual_seed(5);
        let opts = (Kind::Float, Device::Cpu);
        for (b, heads, kv, len, d) in [(1, 9, 3, 37, 64), (2, 4, 4, 1, 16), (1, 8, 2, 130, 32)] {
            // A cache with spare capacity, viewed up to `len`, as the model does.
            let cap = len + 5;
            let kc = Tensor::randn([b, kv, cap, d], opts);
            let vc = Tensor::randn([b, kv, cap, d], opts);
            let q = Tensor::randn([b, heads, 1, d], opts);
            for kind in [Kind::Float, Kind::BFloat16] {
                let (kc, vc, q) = (kc.to_kind(kind), vc.to_kind(kind), q.to_kind(kind));
                let (k, v) = (kc.narrow(2, 0, len), vc.narrow(2, 0, len));
                assert!(supported(&q, &k));
                let scale = 1.0 / (d as f64).sqrt();
                let got = decode_attention(&q, &k, &v, scale).to_kind(Kind::Float);
                let want = Tensor::scaled_dot_product_attention::<Tensor>(
                    &q.to_kind(Kind::Float),
                    &k.to_kind(Kind::Float),
                    &v.to_kind(Kind::Float),
                    None,
                    0.0,
                    false,
                    None,
                    true,
                );
                let diff = (got - want).abs().max().double_value(&[]);
                let tol = if kind == Kind::Float { 1e-5 } else { 2e-2 };
                assert!(diff < tol, "{kind:?} b{b} h{heads} kv{kv} len{len}: {diff}");
            }
        }
    }
}
