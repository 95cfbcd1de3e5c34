//! Decode attention over the paged KV pool: each query row attends to its
//! sequence's cached positions, read in place through its block table
//! (`[slots, kv_heads, head_dim]` pool layers, f32 or bf16), on the
//! split-K attention of [`super::attention`]. The CPU kernel the worker's
//! decode rows and fused step run, and the one the CUDA paged-attention
//! kernel is tested against.

use tch::Tensor;

use super::attention::{attend_tensors, Queries};

/// One query row of [`paged_attention`]: packed row `row` attends to
/// positions `0..len` of the sequence with block table `blocks`.
pub struct QueryRow<'a> {
    pub row: usize,
    pub blocks: &'a [u32],
    pub len: usize,
}

/// Attention of single query rows over their sequences' cached positions,
/// read in place through block tables. `q` and `out` are `[rows, heads,
/// head_dim]` f32 (flat); only the rows named in `queries` are written.
/// `keys`/`values` are a pool layer (`[slots, kv_heads, head_dim]`, f32 or
/// bf16). Grouped-query: head `h` reads KV head `h / (heads / kv_heads)`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    q: &[f32],
    heads: usize,
    keys: &Tensor,
    values: &Tensor,
    block_size: usize,
    queries: &[QueryRow<'_>],
    scale: f32,
    out: &mut [f32],
) {
    let (slots, kv_heads, d) = keys.size3().expect("pool layer is [slots, kv, d]");
    let (slots, kv_heads, d) = (slots as usize, kv_heads as usize, d as usize);
    assert!(keys.is_contiguous() && values.is_contiguous() && keys.size() == values.size());
    assert_eq!(q.len(), out.len());
    assert_eq!(q.len() % (heads * d), 0);
    for qr in queries {
        assert!((qr.row + 1) * heads * d <= q.len());
        assert!(qr.len >= 1 && qr.blocks.len() * block_size >= qr.len);
        assert!(qr
            .blocks
            .iter()
            .all(|&b| (b as usize + 1) * block_size <= slots));
    }
    let row = kv_heads * d;
    let q_rows: Vec<(usize, usize)> = queries.iter().map(|qr| (qr.row, qr.len)).collect();
    // Position `pos` of query `i` at KV head `h`: its block's slot, no
    // division where the block size is a power of two.
    let shift = block_size
        .is_power_of_two()
        .then(|| block_size.trailing_zeros());
    let at = move |i: usize, h: usize, pos: usize| {
        let (b, o) = match shift {
            Some(s) => (pos >> s, pos & (block_size - 1)),
            None => (pos / block_size, pos % block_size),
        };
        (queries[i].blocks[b] as usize * block_size + o) * row + h * d
    };
    let m = Queries {
        heads,
        kv_heads,
        head_dim: d,
        scale,
        rows: &q_rows,
        // When libtorch's threads run the next products, do not spin
        // against them after this.
        park: tch::get_num_threads() > 1,
    };
    // SAFETY: checked above: every block of every query lies inside the
    // pool and every query row inside `q`/`out`.
    unsafe { attend_tensors(&m, q, out, keys, values, at, at) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Attention of one query per table (blocks, length) over a pool of
    /// `num_blocks` blocks filled with random keys and values, against
    /// libtorch's attention over the same keys and values laid out
    /// contiguously, in f32, bf16 and f16 pools.
    fn check_against_sdpa(
        (heads, kv, d, bs, num_blocks): (usize, usize, usize, usize, usize),
        tables: &[(Vec<u32>, usize)],
    ) {
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            // A pool layer as the worker lays it out: `[slots, kv_heads, d]`.
            let pool = |_| {
                Tensor::zeros(
                    [(num_blocks * bs) as i64, kv as i64, d as i64],
                    (kind, Device::Cpu),
                )
            };
            let (mut kp, mut vp) = (pool(0), pool(1));
            let n = tables.len() as i64;
            let mut ctx = Vec::new();
            for (blocks, len) in tables {
                let rand = || {
                    Tensor::randn(
                        [*len as i64, kv as i64, d as i64],
                        (Kind::Float, Device::Cpu),
                    )
                };
                let (k, v) = (rand(), rand());
                let slots: Vec<i64> = (0..*len)
                    .map(|p| (blocks[p / bs] as usize * bs + p % bs) as i64)
                    .collect();
                let slots = Tensor::from_slice(&slots);
                let _ = kp.index_copy_(0, &slots, &k.to_kind(kind));
                let _ = vp.index_copy_(0, &slots, &v.to_kind(kind));
                ctx.push((k.to_kind(kind), v.to_kind(kind)));
            }
            let q = Tensor::randn([n, heads as i64, d as i64], (Kind::Float, Device::Cpu));
            let qv: Vec<f32> = Vec::try_from(q.view([-1])).unwrap();
            let mut out = vec![0f32; qv.len()];
            let queries: Vec<QueryRow> = tables
                .iter()
                .enumerate()
                .map(|(row, (b, len))| QueryRow {
                    row,
                    blocks: b,
                    len: *len,
                })
                .collect();
            let scale = 1.0 / (d as f32).sqrt();
            paged_attention(&qv, heads, &kp, &vp, bs, &queries, scale, &mut out);
            let got = Tensor::from_slice(&out).view([n, heads as i64, d as i64]);
            for (row, (k, v)) in ctx.iter().enumerate() {
                let qi = q.get(row as i64).unsqueeze(0).unsqueeze(2); // [1, h, 1, d]
                let kt = k.to_kind(Kind::Float).permute([1, 0, 2]).unsqueeze(0);
                let vt = v.to_kind(Kind::Float).permute([1, 0, 2]).unsqueeze(0);
                let want = Tensor::scaled_dot_product_attention::<Tensor>(
                    &qi, &kt, &vt, None, 0.0, false, None, true,
                )
                .view([heads as i64, d as i64]);
                let diff = (got.get(row as i64) - want).abs().max().double_value(&[]);
                assert!(
                    diff < 1e-4,
                    "{kind:?} heads {heads} kv {kv} d {d} row {row} of {}: {diff}",
                    tables[row].1
                );
            }
        }
    }

    /// `n` distinct blocks of a pool of `num_blocks` (prime to 13),
    /// scattered.
    fn scattered(n: usize, num_blocks: usize) -> Vec<u32> {
        (0..n).map(|i| ((i * 13 + 5) % num_blocks) as u32).collect()
    }

    /// Scattered block tables read through the pool give libtorch's
    /// attention over the same keys and values laid out contiguously.
    #[test]
    fn paged_attention_matches_sdpa_f32_bf16_and_f16() {
        tch::manual_seed(11);
        let bs = 4;
        // Two sequences of 13 and 1 positions on non-contiguous blocks;
        // twelve of 1..=12 positions on scattered blocks.
        check_against_sdpa(
            (9, 3, 16, bs, 32),
            &[(vec![7, 2, 30, 11], 13), (vec![5], 1)],
        );
        // Distinct blocks for all twelve (a block written twice would
        // hold only the later sequence's keys).
        let mut next = (0..32u32).map(|i| (i * 13 + 5) % 32);
        let many: Vec<(Vec<u32>, usize)> = (1..=12usize)
            .map(|len| {
                let blocks = next.by_ref().take(len.div_ceil(bs)).collect();
                (blocks, len)
            })
            .collect();
        check_against_sdpa((9, 3, 16, bs, 32), &many);
        // One sequence of 100 positions on 25 scattered blocks: split into
        // spans across the pool's threads and merged.
        let long: Vec<u32> = (0..25u32).map(|i| (i * 7 + 3) % 32).collect();
        check_against_sdpa((9, 3, 16, bs, 32), &[(long, 100)]);
        // Head sizes and groups of the models served: SmolLM2's 9 heads
        // over 3 KV heads of 64 (37 positions, and 600 split into spans),
        // no grouping, groups of 4; blocks of 16 as served.
        for (heads, kv, d, len) in [
            (9, 3, 64, 37usize),
            (4, 4, 16, 1),
            (8, 2, 32, 130),
            (9, 3, 64, 600),
        ] {
            let n = len.div_ceil(16);
            check_against_sdpa((heads, kv, d, 16, 64), &[(scattered(n, 64), len)]);
        }
    }
}
