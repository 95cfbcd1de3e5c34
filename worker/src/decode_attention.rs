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

/// `out_g = softmax(q_g . K^T * scale) . V` for the `group` query heads `g`
/// (one after another in `q` and `out`) that share one KV head, over the key and value rows the
/// iterators yield in position order; each cached row is read once for the
/// whole group (grouped-query attention re-reads nothing). `scores` is
/// scratch. Shared by the contiguous-cache and the paged kernels, which
/// differ only in where each position's row lives.
pub(crate) fn attend_row<'a, T: WeightElem + 'a>(
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

fn run<T: WeightElem>(
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
