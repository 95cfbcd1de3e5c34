//! Attention for one query position per sequence over the KV cache, on CPU:
//! `softmax(q . K^T * scale) . V` per query head, grouped-query aware. For a
//! single query libtorch's general attention kernel (blocked flash attention
//! through BLAS) spends more time in set-up than in arithmetic; this reads
//! the cached rows in place, wherever a caller's addressing puts them (the
//! paged pool's block tables: [`super::paged_attention`], whose tests
//! check it against `scaled_dot_product_attention`).

use tch::Tensor;

use crate::cpu::gemv::{pool, WeightElem};
use crate::cpu::spin_pool::{SharedPtr, SharedSlot};

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

impl KvElem for half::f16 {
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn load16(p: *const half::f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// Softmax statistics of one query head over a span of cached positions:
/// the largest scaled score, and the sum of `exp(score - max)`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SpanStats {
    pub max: f32,
    pub sum: f32,
}

/// `out_g = softmax(q_g . K^T * scale) . V` for the `group` query heads `g`
/// (one after another in `q` and `out`) that share one KV head, over the
/// `len` cached rows `key(j)`, `value(j)` (normalized over those rows).
/// `stats[g]` gets head `g`'s softmax statistics, so that spans of one
/// sequence attended separately can be merged (`merge_spans`). Each cached
/// row is read once for the whole group. `scores` is scratch.
///
/// On AVX-512 CPUs with head sizes of 16, 32, 64 or 128 the body is
/// `x86::attend` (scores 16 keys at a time, a vectorized softmax, the
/// weighted sum of values with the group's outputs in registers); elsewhere
/// a portable loop over `WeightElem::dot`/`axpy`.
///
/// # Safety
/// For every `j < len`, `key(j)` and `value(j)` point at `q.len() / group`
/// readable elements.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attend_span<T: KvElem>(
    q: &[f32],
    group: usize,
    len: usize,
    key: impl Fn(usize) -> *const T,
    value: impl Fn(usize) -> *const T,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    stats: &mut [SpanStats],
) {
    let d = q.len() / group;
    assert!(len > 0 && group * d == q.len() && out.len() == q.len() && stats.len() == group);
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::gemv::tiles_available() && matches!(d, 16 | 32 | 64 | 128) {
        // SAFETY: the caller's rows; the CPU features were checked.
        return x86::attend(q, group, d, len, &key, &value, scale, scores, out, stats);
    }
    attend_portable(q, group, len, &key, &value, scale, scores, out, stats)
}

/// `attend_span` on any CPU: `WeightElem::dot` per key and query head,
/// `WeightElem::axpy` per value and query head.
///
/// # Safety
/// As `attend_span`.
#[allow(clippy::too_many_arguments)]
unsafe fn attend_portable<T: KvElem>(
    q: &[f32],
    group: usize,
    len: usize,
    key: &impl Fn(usize) -> *const T,
    value: &impl Fn(usize) -> *const T,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    stats: &mut [SpanStats],
) {
    let d = q.len() / group;
    let row = |p: *const T| std::slice::from_raw_parts(p, d);
    // scores[g * len + j]
    scores.clear();
    scores.resize(group * len, 0.0);
    for j in 0..len {
        let k = row(key(j));
        for (g, qg) in q.chunks_exact(d).enumerate() {
            scores[g * len + j] = T::dot(k, qg) * scale;
        }
    }
    for (g, s) in scores.chunks_exact_mut(len).enumerate() {
        let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0f32;
        for x in s.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        stats[g] = SpanStats { max, sum };
        s.iter_mut().for_each(|x| *x /= sum);
    }
    out.fill(0.0);
    for j in 0..len {
        let v = row(value(j));
        for (g, o) in out.chunks_exact_mut(d).enumerate() {
            T::axpy(o, scores[g * len + j], v);
        }
    }
}

/// Merges the outputs of `group` query heads attended over separate spans
/// of one sequence: span `c`'s normalized outputs are `parts[c * group * d
/// ..]` (`[group, d]`) with statistics `stats[c * group..]`. Each span's
/// output is weighted by its share of the whole softmax's denominator.
pub(crate) fn merge_spans(
    parts: &[f32],
    stats: &[SpanStats],
    group: usize,
    d: usize,
    out: &mut [f32],
) {
    let spans = stats.len() / group;
    assert!(parts.len() == spans * group * d && out.len() == group * d && spans > 0);
    let mut weights = vec![0f32; spans];
    for (g, o) in out.chunks_exact_mut(d).enumerate() {
        let span = |c: usize| stats[c * group + g];
        let max = (0..spans).fold(f32::NEG_INFINITY, |m, c| m.max(span(c).max));
        for (c, w) in weights.iter_mut().enumerate() {
            *w = span(c).sum * (span(c).max - max).exp();
        }
        let total: f32 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= total);
        o.fill(0.0);
        for (c, w) in weights.iter().enumerate() {
            let p = &parts[(c * group + g) * d..][..d];
            o.iter_mut().zip(p).for_each(|(o, p)| *o += w * p);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{KvElem, SpanStats};
    use crate::cpu::vecmath::x86::{exp_in_place, lanes, max_of};

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

    /// `out[j] = (q . key(j)) * scale` for `j < len`, a `16 * C`-long query.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn key_scores<T: KvElem, const C: usize>(
        q: *const f32,
        len: usize,
        key: &impl Fn(usize) -> *const T,
        scale: f32,
        out: *mut f32,
    ) {
        let qv: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(q.add(16 * c)));
        let sc = _mm512_set1_ps(scale);
        let mut i = 0;
        while i < len {
            let n = (len - i).min(16);
            let mut acc = [_mm512_setzero_ps(); 16];
            for (j, a) in acc.iter_mut().enumerate() {
                // A short last batch repeats its last key (results masked).
                let k = key(i + j.min(n - 1));
                for (c, qc) in qv.iter().enumerate() {
                    *a = _mm512_fmadd_ps(T::load16(k.add(16 * c)), *qc, *a);
                }
            }
            let s = _mm512_mul_ps(transpose_sum16(&acc), sc);
            _mm512_mask_storeu_ps(out.add(i), lanes(n), s);
            i += 16;
        }
    }

    /// `out_h = inv[h] * sum_j p[h * stride + j] * value(j)` for `H` heads
    /// of `16 * C` lanes, their accumulators in registers.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn weighted_sum<T: KvElem, const C: usize, const H: usize>(
        p: *const f32,
        stride: usize,
        len: usize,
        value: &impl Fn(usize) -> *const T,
        inv: *const f32,
        out: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; H];
        for j in 0..len {
            let v = value(j);
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
        len: usize,
        value: &impl Fn(usize) -> *const T,
        inv: &[f32],
        out: &mut [f32],
    ) {
        let mut h = 0;
        while h < group {
            let n = (group - h).min((16 / C).clamp(1, 4));
            let (pp, ip, op) = (
                p.as_ptr().add(h * len),
                inv.as_ptr().add(h),
                out.as_mut_ptr().add(h * 16 * C),
            );
            match n {
                4 => weighted_sum::<T, C, 4>(pp, len, len, value, ip, op),
                3 => weighted_sum::<T, C, 3>(pp, len, len, value, ip, op),
                2 => weighted_sum::<T, C, 2>(pp, len, len, value, ip, op),
                _ => weighted_sum::<T, C, 1>(pp, len, len, value, ip, op),
            }
            h += n;
        }
    }

    /// `attend_span`'s body on AVX-512: per query head the scores (16 keys
    /// a batch) and a vectorized softmax, then the weighted sum of values
    /// for up to four heads at once (each cached value row loaded once for
    /// them).
    ///
    /// # Safety
    /// As `attend_span`; `d` is 16, 32, 64 or 128; the CPU has AVX-512 F,
    /// BW and VL.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn attend<T: KvElem>(
        q: &[f32],
        group: usize,
        d: usize,
        len: usize,
        key: &impl Fn(usize) -> *const T,
        value: &impl Fn(usize) -> *const T,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
        stats: &mut [SpanStats],
    ) {
        // Each head's scores, then each head's 1 / (sum of exponentials).
        scores.clear();
        scores.resize(group * len + group, 0.0);
        for (g, st) in stats.iter_mut().enumerate() {
            let (qg, sg) = (q.as_ptr().add(g * d), scores.as_mut_ptr().add(g * len));
            match d {
                16 => key_scores::<T, 1>(qg, len, key, scale, sg),
                32 => key_scores::<T, 2>(qg, len, key, scale, sg),
                64 => key_scores::<T, 4>(qg, len, key, scale, sg),
                _ => key_scores::<T, 8>(qg, len, key, scale, sg),
            }
            let s = &mut scores[g * len..(g + 1) * len];
            let max = max_of(s);
            let sum = exp_in_place(s, max);
            *st = SpanStats { max, sum };
            scores[group * len + g] = 1.0 / sum;
        }
        let (p, inv) = scores.split_at(group * len);
        match d {
            16 => weighted_sums::<T, 1>(p, group, len, value, inv, out),
            32 => weighted_sums::<T, 2>(p, group, len, value, inv, out),
            64 => weighted_sums::<T, 4>(p, group, len, value, inv, out),
            _ => weighted_sums::<T, 8>(p, group, len, value, inv, out),
        }
    }
}

/// A span of a sequence's positions attended by one task shorter than this
/// costs more in set-up and merging than it balances.
const MIN_SPAN: usize = 64;
/// Tasks per pool thread that splitting sequences aims at: tasks are
/// claimed one at a time, so the threads finish within one short task of
/// each other.
const TASKS_PER_THREAD: usize = 8;

/// Per-thread scratch of the attention tasks (scores and one group's
/// statistics), kept between calls.
struct Scratch {
    scores: Vec<f32>,
    stats: Vec<SpanStats>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = const {
        std::cell::RefCell::new(Scratch { scores: Vec::new(), stats: Vec::new() })
    };
}

/// One task: query `query`'s KV head `kv_head` (its whole group of query
/// heads) over positions `start..end`; `part` is where a span of a split
/// sequence leaves its output for `merge_spans` (`None`: the whole
/// sequence, written to `out`).
struct Task {
    query: usize,
    kv_head: usize,
    start: usize,
    end: usize,
    part: Option<usize>,
}

/// One attention call's queries: single query rows, each over its own
/// cached positions.
pub(crate) struct Queries<'a> {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Per query: its row of `q`/`out`, and how many positions it attends.
    pub rows: &'a [(usize, usize)],
    /// Park the pool's threads afterwards (libtorch's threads run next).
    pub park: bool,
}

/// Attention of single query rows over their cached positions on the decode
/// pool. `q`/`out` are `[rows, heads, head_dim]` (flat); query `i` is row
/// `m.rows[i].0` and attends to its first `m.rows[i].1` positions, whose
/// cached rows are `key(i, kv_head, pos)` and `value(i, kv_head, pos)`.
///
/// A task is one query's KV head with its whole group of query heads (each
/// cached row read once per group). Where those are too few to keep the
/// threads evenly busy (a lone decode step: 3 KV heads on 2 threads), each
/// sequence's positions are split into spans attended by separate tasks and
/// merged through their softmax statistics (the split-K of
/// flash-decoding).
///
/// # Safety
/// For every query `i`, KV head `h < m.kv_heads` and `pos < m.rows[i].1`,
/// `key(i, h, pos)` and `value(i, h, pos)` point at `head_dim` readable
/// elements; the rows named are distinct and inside `q`/`out`.
pub(crate) unsafe fn attend_queries<T: KvElem>(
    m: &Queries<'_>,
    q: &[f32],
    out: &mut [f32],
    key: impl Fn(usize, usize, usize) -> *const T + Sync,
    value: impl Fn(usize, usize, usize) -> *const T + Sync,
) {
    let Queries {
        heads,
        kv_heads,
        head_dim: d,
        scale,
        rows: queries,
        park,
    } = *m;
    let group = heads / kv_heads;
    assert!(group * kv_heads == heads && q.len() == out.len());
    for &(row, len) in queries {
        assert!(len > 0 && (row + 1) * heads * d <= q.len());
    }
    let threads = pool().threads();
    let want = TASKS_PER_THREAD * threads;
    let span = if threads == 1 || queries.len() * kv_heads >= want {
        usize::MAX
    } else {
        let total = queries.iter().map(|&(_, len)| len).sum::<usize>() * kv_heads;
        total.div_ceil(want).next_multiple_of(16).max(MIN_SPAN)
    };
    let mut tasks = Vec::new();
    // (query, KV head, first part, parts) of each split sequence.
    let mut merges = Vec::new();
    let mut parts = 0;
    for (i, &(_, len)) in queries.iter().enumerate() {
        for h in 0..kv_heads {
            let n = len.div_ceil(span);
            if n == 1 {
                tasks.push(Task {
                    query: i,
                    kv_head: h,
                    start: 0,
                    end: len,
                    part: None,
                });
                continue;
            }
            merges.push((i, h, parts, n));
            for c in 0..n {
                tasks.push(Task {
                    query: i,
                    kv_head: h,
                    start: c * span,
                    end: ((c + 1) * span).min(len),
                    part: Some(parts + c),
                });
            }
            parts += n;
        }
    }
    let mut part_out = vec![0f32; parts * group * d];
    let mut part_stats = vec![SpanStats::default(); parts * group];
    let (op, pp, sp) = (
        SharedSlot(out.as_mut_ptr()),
        SharedSlot(part_out.as_mut_ptr()),
        SharedSlot(part_stats.as_mut_ptr()),
    );
    let job = |t: usize| {
        let task = &tasks[t];
        let first = (queries[task.query].0 * heads + task.kv_head * group) * d;
        let n = group * d;
        // SAFETY: the caller's rows; each task writes only its own group's
        // outputs in `out` or its own part.
        unsafe {
            let dst = match task.part {
                None => std::slice::from_raw_parts_mut(op.at(first), n),
                Some(p) => std::slice::from_raw_parts_mut(pp.at(p * n), n),
            };
            SCRATCH.with(|s| {
                let s = &mut *s.borrow_mut();
                s.stats.resize(group, SpanStats::default());
                attend_span(
                    &q[first..first + n],
                    group,
                    task.end - task.start,
                    |j| key(task.query, task.kv_head, task.start + j),
                    |j| value(task.query, task.kv_head, task.start + j),
                    scale,
                    &mut s.scores,
                    dst,
                    &mut s.stats,
                );
                if let Some(p) = task.part {
                    std::ptr::copy_nonoverlapping(s.stats.as_ptr(), sp.at(p * group), group);
                }
            });
        }
    };
    if park {
        pool().run_then_park(tasks.len(), &job);
    } else {
        pool().run(tasks.len(), &job);
    }
    for (i, h, first, n) in merges {
        let at = (queries[i].0 * heads + h * group) * d;
        merge_spans(
            &part_out[first * group * d..(first + n) * group * d],
            &part_stats[first * group..(first + n) * group],
            group,
            d,
            &mut out[at..at + group * d],
        );
    }
}

/// `$body` with `$t` naming the element type of a KV cache of kind `$kind`
/// (f32, bf16 as `u16`, f16); another kind panics, naming it.
macro_rules! with_kv_elem {
    ($kind:expr, $t:ident => $body:expr) => {
        match $kind {
            tch::Kind::Float => {
                type $t = f32;
                $body
            }
            tch::Kind::BFloat16 => {
                type $t = u16;
                $body
            }
            tch::Kind::Half => {
                type $t = half::f16;
                $body
            }
            other => panic!("attention over a {other:?} KV cache (f32, bf16 or f16 only)"),
        }
    };
}
pub(crate) use with_kv_elem;

/// `attend_queries` over the cached rows of the f32, bf16 or f16 tensors `k` and
/// `v` at the element offsets `key_at(query, kv_head, pos)` and
/// `value_at(..)`.
///
/// # Safety
/// Every offset `attend_queries` asks for starts `head_dim` elements inside
/// its tensor; as `attend_queries` for the query rows.
pub(crate) unsafe fn attend_tensors(
    m: &Queries<'_>,
    q: &[f32],
    out: &mut [f32],
    k: &Tensor,
    v: &Tensor,
    key_at: impl Fn(usize, usize, usize) -> usize + Sync,
    value_at: impl Fn(usize, usize, usize) -> usize + Sync,
) {
    with_kv_elem!(k.kind(), T => {
        let (kp, vp) = (
            SharedPtr(k.data_ptr() as *const T),
            SharedPtr(v.data_ptr() as *const T),
        );
        attend_queries::<T>(
            m,
            q,
            out,
            |i, h, pos| kp.at(key_at(i, h, pos)),
            |i, h, pos| vp.at(value_at(i, h, pos)),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 body (where the CPU has it) equals the portable loop:
    /// head sizes 16-128, groups of 1-5 heads (several passes of the
    /// weighted sum), lengths around the 16-key batches, f32, bf16 and f16
    /// rows, each row at its own address.
    #[test]
    fn attend_span_bodies_agree() {
        if !crate::cpu::gemv::tiles_available() {
            crate::cpu::skip_line(
                "attend_span_bodies_agree",
                "no AVX-512 on this CPU: the AVX-512 body is not compared",
            );
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
                        .map(|&v| crate::cpu::vecmath::f32_to_bf16(v))
                        .collect();
                    let vb: Vec<u16> = vf
                        .iter()
                        .map(|&v| crate::cpu::vecmath::f32_to_bf16(v))
                        .collect();
                    let kh: Vec<half::f16> = kf.iter().map(|&v| half::f16::from_f32(v)).collect();
                    let vh: Vec<half::f16> = vf.iter().map(|&v| half::f16::from_f32(v)).collect();
                    let scale = 1.0 / (d as f32).sqrt();
                    fn both<T: KvElem>(
                        q: &[f32],
                        group: usize,
                        k: &[T],
                        v: &[T],
                        d: usize,
                        scale: f32,
                    ) -> f32 {
                        // Rows 3 elements apart beyond `d`.
                        let len = k.len() / (d + 3);
                        let (kp, vp) = (k.as_ptr(), v.as_ptr());
                        let key = |j: usize| kp.wrapping_add(j * (d + 3));
                        let value = |j: usize| vp.wrapping_add(j * (d + 3));
                        let (mut s, mut fast, mut slow) =
                            (Vec::new(), vec![0f32; q.len()], vec![1f32; q.len()]);
                        let mut sf = vec![SpanStats::default(); group];
                        let mut ss = vec![SpanStats::default(); group];
                        // SAFETY: `len` rows of `d + 3` elements.
                        unsafe {
                            attend_span(
                                q, group, len, key, value, scale, &mut s, &mut fast, &mut sf,
                            );
                            attend_portable(
                                q, group, len, &key, &value, scale, &mut s, &mut slow, &mut ss,
                            );
                        }
                        for (a, b) in sf.iter().zip(&ss) {
                            assert!((a.max - b.max).abs() <= 1e-5 * b.max.abs().max(1.0));
                            assert!((a.sum - b.sum).abs() <= 1e-4 * b.sum, "{a:?} {b:?}");
                        }
                        fast.iter()
                            .zip(&slow)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0.0, f32::max)
                    }
                    let ef = both(&q, group, &kf, &vf, d, scale);
                    let eb = both(&q, group, &kb, &vb, d, scale);
                    let eh = both(&q, group, &kh, &vh, d, scale);
                    assert!(
                        ef < 1e-5 && eb < 1e-5 && eh < 1e-5,
                        "d {d} group {group} len {len}: f32 {ef}, bf16 {eb}, f16 {eh}"
                    );
                }
            }
        }
    }

    /// Attending to a sequence in spans and merging them gives what
    /// attending to it whole gives, spans of any sizes (one of a single
    /// position), f32 rows.
    #[test]
    fn merged_spans_equal_the_whole_sequence() {
        let (group, d, len) = (3usize, 64usize, 150usize);
        let mut x = 11u32;
        let mut rnd = move || {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 8) as f32 / (1u32 << 24) as f32 * 6.0 - 3.0
        };
        let q: Vec<f32> = (0..group * d).map(|_| rnd()).collect();
        let k: Vec<f32> = (0..len * d).map(|_| rnd()).collect();
        let v: Vec<f32> = (0..len * d).map(|_| rnd()).collect();
        let mut scores = Vec::new();
        let attend = |start: usize, end: usize, scores: &mut Vec<f32>| {
            let mut out = vec![0f32; group * d];
            let mut stats = vec![SpanStats::default(); group];
            let (kp, vp) = (k.as_ptr(), v.as_ptr());
            // SAFETY: positions `start..end` of `len` rows of `d`.
            unsafe {
                attend_span(
                    &q,
                    group,
                    end - start,
                    |j| kp.add((start + j) * d),
                    |j| vp.add((start + j) * d),
                    0.125,
                    scores,
                    &mut out,
                    &mut stats,
                )
            };
            (out, stats)
        };
        let (whole, _) = attend(0, len, &mut scores);
        for cuts in [vec![0, 75, 150], vec![0, 1, 64, 149, 150], vec![0, 150]] {
            let (mut parts, mut stats) = (Vec::new(), Vec::new());
            for w in cuts.windows(2) {
                let (o, s) = attend(w[0], w[1], &mut scores);
                parts.extend(o);
                stats.extend(s);
            }
            let mut merged = vec![0f32; group * d];
            merge_spans(&parts, &stats, group, d, &mut merged);
            let diff = merged
                .iter()
                .zip(&whole)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff < 1e-5, "cuts {cuts:?}: {diff}");
        }
    }
}
