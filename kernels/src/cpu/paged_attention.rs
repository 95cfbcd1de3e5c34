//! Attention over the paged KV pool: each query row attends to its
//! sequence's cached positions, read in place through its block table
//! (`[slots, kv_heads, head_dim]` pool layers, f32, bf16 or f16): single
//! rows on the split-K attention of [`super::attention`], a prompt's runs
//! of rows on [`super::prompt_attention`]. The CPU kernel the worker's
//! batched steps and fused step run, and the one the CUDA paged-attention
//! kernel is tested against.

use tch::Tensor;

#[cfg(target_arch = "x86_64")]
use super::attention::with_kv_elem;
use super::attention::{attend_tensors, Queries};
#[cfg(target_arch = "x86_64")]
use super::prompt_attention::attend_run;
use super::prompt_attention::{self, Run, MIN_RUN};
#[cfg(target_arch = "x86_64")]
use super::spin_pool::SharedPtr;

/// One query row of [`paged_attention`]: packed row `row` attends to
/// positions `0..len` of the sequence with block table `blocks`.
#[derive(Clone, Copy)]
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
    // Runs of a prompt's rows (consecutive rows of one block table, each
    // seeing one more position) take the prompt kernel; the other rows the
    // one-row body.
    let mut runs = Vec::new();
    let mut single: Vec<QueryRow> = Vec::new();
    let mut i = 0;
    while i < queries.len() {
        let mut j = i + 1;
        while j < queries.len() && {
            let (a, b) = (&queries[j - 1], &queries[j]);
            std::ptr::eq(a.blocks, b.blocks) && b.row == a.row + 1 && b.len == a.len + 1
        } {
            j += 1;
        }
        if j - i >= MIN_RUN && prompt_attention::available(d) {
            let run = Run {
                row0: queries[i].row,
                n: j - i,
                len0: queries[i].len,
            };
            runs.push((queries[i].blocks, run));
        } else {
            single.extend_from_slice(&queries[i..j]);
        }
        i = j;
    }
    // Position `pos` of a sequence with block table `blocks` at KV head
    // `h`: its block's slot, no division where the block size is a power of
    // two.
    let shift = block_size
        .is_power_of_two()
        .then(|| block_size.trailing_zeros());
    let slot = move |blocks: &[u32], h: usize, pos: usize| {
        let (b, o) = match shift {
            Some(s) => (pos >> s, pos & (block_size - 1)),
            None => (pos / block_size, pos % block_size),
        };
        (blocks[b] as usize * block_size + o) * row + h * d
    };
    // When libtorch's threads run the next products, do not spin against
    // them after this.
    let park = tch::get_num_threads() > 1;
    #[cfg(target_arch = "x86_64")]
    if !runs.is_empty() {
        with_kv_elem!(keys.kind(), T => {
            let (kp, vp) = (
                SharedPtr(keys.data_ptr() as *const T),
                SharedPtr(values.data_ptr() as *const T),
            );
            for &(blocks, run) in &runs {
                // SAFETY: checked above: every block of every query lies
                // inside the pool (a run's last query sees all its
                // positions), every query row inside `q`/`out`;
                // `available(d)` was checked.
                unsafe {
                    attend_run::<T>(
                        q,
                        out,
                        heads,
                        kv_heads,
                        d,
                        scale,
                        run,
                        |h, pos| kp.at(slot(blocks, h, pos)),
                        |h, pos| vp.at(slot(blocks, h, pos)),
                        park,
                    )
                }
            }
        })
    }
    if single.is_empty() {
        return;
    }
    let q_rows: Vec<(usize, usize)> = single.iter().map(|qr| (qr.row, qr.len)).collect();
    let m = Queries {
        heads,
        kv_heads,
        head_dim: d,
        scale,
        rows: &q_rows,
        park,
    };
    // Query `i` of `attend_tensors` is `single[i]`.
    let single = &single;
    let at = move |i: usize, h: usize, pos: usize| slot(single[i].blocks, h, pos);
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

    /// Runs of a prompt's rows (taken by the prompt kernel where the CPU
    /// has AVX-512: a fresh prompt, a chunk after cached positions, runs of
    /// every query-vector count a pass takes) beside single decode rows give,
    /// row for row, what each row attended alone gives (the one-row body),
    /// in f32, bf16 and f16 pools, head sizes 64 and 128, groups of 1 to 8
    /// query heads.
    #[test]
    fn prompt_runs_equal_their_rows_attended_alone() {
        tch::manual_seed(5);
        let (bs, num_blocks) = (16, 40);
        for (heads, kv, d) in [
            (9, 3, 64),
            (4, 4, 64),
            (8, 1, 64),
            (10, 2, 64),
            (8, 2, 128),
            (3, 3, 128),
        ] {
            for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
                let rand = || {
                    Tensor::randn(
                        [(num_blocks * bs) as i64, kv as i64, d as i64],
                        (Kind::Float, Device::Cpu),
                    )
                    .to_kind(kind)
                };
                let (kp, vp) = (rand(), rand());
                let (a, b) = (
                    scattered(20, num_blocks),
                    scattered(30, num_blocks)[20..].to_vec(),
                );
                // A fresh 37-row prompt of `a`, a decode row of `b`, a
                // 21-row chunk of `a` after 70 cached positions, a short
                // 5-row chunk (the one-row body) of `b`.
                let mut queries = Vec::new();
                for i in 0..37 {
                    queries.push(QueryRow {
                        row: i,
                        blocks: &a,
                        len: i + 1,
                    });
                }
                queries.push(QueryRow {
                    row: 37,
                    blocks: &b,
                    len: 150,
                });
                for i in 0..21 {
                    queries.push(QueryRow {
                        row: 38 + i,
                        blocks: &a,
                        len: 71 + i,
                    });
                }
                for i in 0..5 {
                    queries.push(QueryRow {
                        row: 59 + i,
                        blocks: &b,
                        len: 40 + i,
                    });
                }
                let n = 64;
                let q = Tensor::randn([n, heads as i64, d as i64], (Kind::Float, Device::Cpu));
                let qv: Vec<f32> = Vec::try_from(q.view([-1])).unwrap();
                let scale = 1.0 / (d as f32).sqrt();
                let mut got = vec![0f32; qv.len()];
                paged_attention(&qv, heads, &kp, &vp, bs, &queries, scale, &mut got);
                let mut want = vec![0f32; qv.len()];
                for qr in &queries {
                    let one = [QueryRow {
                        row: qr.row,
                        blocks: qr.blocks,
                        len: qr.len,
                    }];
                    paged_attention(&qv, heads, &kp, &vp, bs, &one, scale, &mut want);
                }
                let diff = got
                    .iter()
                    .zip(&want)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(diff < 2e-5, "{kind:?} heads {heads} kv {kv} d {d}: {diff}");
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
