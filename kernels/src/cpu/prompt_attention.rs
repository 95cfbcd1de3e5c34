//! Attention of a prompt's rows over the paged KV pool on AVX-512: a run
//! of consecutive positions of one sequence (row `i` of the run sees the
//! sequence's first `len0 + i` positions, the causal mask), as a prompt or
//! a prompt chunk after cached positions asks.
//!
//! [`super::attention`]'s one-row body recomputes, for every query row and
//! head, each key's dot product with a horizontal sum and widens each
//! cached element again; a prompt's rows share their keys and values, so
//! here each KV head's keys are widened once, transposed (`[d][positions]`
//! f32), and its values widened (`[positions][d]` f32); then every task
//! takes up to `max_items` query vectors (rows x the KV head's query heads)
//! at once: per 16 keys, one loaded vector of the transposed keys feeds
//! each query's multiply-add (no horizontal sums), and per position one
//! loaded value row feeds each query's weighted sum (the accumulators in
//! registers). A 512-token SmolLM2 prompt's attention took 13% of its time
//! through the one-row body.

use crate::cpu::attention::KvElem;
use crate::cpu::gemv::pool;
use crate::cpu::spin_pool::{SharedPtr, SharedSlot};

/// A run of query rows of one sequence: row `row0 + i` (of `q`/`out`)
/// attends to positions `0..len0 + i`, for `i < n`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Run {
    pub row0: usize,
    pub n: usize,
    pub len0: usize,
}

/// Shorter runs take the one-row body (the transposition costs more than it
/// saves).
pub(crate) const MIN_RUN: usize = 16;

/// Whether the kernel takes head size `d` on this CPU.
pub(crate) fn available(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        (d == 64 || d == 128)
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = d;
        false
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::attend_run;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::cpu::vecmath::x86::{exp_in_place, max_of};

    /// Query vectors a task's pass takes at once, per head size: their
    /// weighted sums' accumulators (`16 * C` lanes each) fill 24 of the 32
    /// vector registers.
    const fn max_items(c: usize) -> usize {
        24 / c
    }

    /// One query vector of a pass: its row of `q`, its row of `out`, and
    /// how many positions it attends.
    #[derive(Clone, Copy)]
    struct Item {
        q: *const f32,
        out: *mut f32,
        len: usize,
    }

    /// Attention of `run`'s rows: `q`/`out` are `[rows, heads, d]` (flat) f32;
    /// `key(h, pos)`/`value(h, pos)` point at KV head `h`'s cached row of
    /// position `pos` (`d` elements). `park`: the pool's threads park
    /// afterwards (libtorch's threads run next).
    ///
    /// # Safety
    /// `available(d)`; every `pos < run.len0 + run.n - 1` of every KV head has
    /// readable rows; the run's rows lie inside `q` and `out`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn attend_run<T: KvElem>(
        q: &[f32],
        out: &mut [f32],
        heads: usize,
        kv_heads: usize,
        d: usize,
        scale: f32,
        run: Run,
        key: impl Fn(usize, usize) -> *const T + Sync,
        value: impl Fn(usize, usize) -> *const T + Sync,
        park: bool,
    ) {
        let group = heads / kv_heads;
        let len = run.len0 + run.n - 1;
        // The transposed keys' rows are whole 16-key batches (zero past
        // `len`, never weighted).
        let lp = len.next_multiple_of(16);
        let mut kt = vec![0f32; kv_heads * d * lp];
        let mut vs = vec![0f32; kv_heads * len * d];
        let (ktp, vsp) = (SharedSlot(kt.as_mut_ptr()), SharedSlot(vs.as_mut_ptr()));
        // Widen (and transpose the keys) in blocks of 64 positions.
        let blocks = len.div_ceil(64);
        let widen = |t: usize| {
            let (h, b) = (t / blocks, t % blocks);
            for pos in b * 64..((b + 1) * 64).min(len) {
                let (k, v) = (key(h, pos), value(h, pos));
                for c in 0..d / 16 {
                    // SAFETY: the caller's rows; each task writes its own
                    // positions of its own head.
                    unsafe {
                        let kv = T::load16(k.add(16 * c));
                        let mut lanes = [0f32; 16];
                        _mm512_storeu_ps(lanes.as_mut_ptr(), kv);
                        for (l, x) in lanes.iter().enumerate() {
                            *ktp.at((h * d + 16 * c + l) * lp + pos) = *x;
                        }
                        _mm512_storeu_ps(
                            vsp.at((h * len + pos) * d + 16 * c),
                            T::load16(v.add(16 * c)),
                        );
                    }
                }
            }
        };
        pool().run(kv_heads * blocks, &widen);
        // Tasks: `rows` consecutive query rows with one KV head's query
        // heads, longest rows first (tasks are claimed in order).
        let per = max_items(d / 16);
        let rows = (per / group).max(1);
        let nblocks = run.n.div_ceil(rows);
        let (qp, op) = (SharedPtr(q.as_ptr()), SharedSlot(out.as_mut_ptr()));
        let (ktr, vsr) = (SharedPtr(kt.as_ptr()), SharedPtr(vs.as_ptr()));
        let task = |t: usize| {
            let (h, b) = (t % kv_heads, nblocks - 1 - t / kv_heads);
            let mut items = Vec::with_capacity(rows * group);
            for i in b * rows..((b + 1) * rows).min(run.n) {
                for g in 0..group {
                    let at = ((run.row0 + i) * heads + h * group + g) * d;
                    items.push(Item {
                        q: qp.at(at),
                        out: op.at(at),
                        len: run.len0 + i,
                    });
                }
            }
            let (k, v) = (ktr.at(h * d * lp), vsr.at(h * len * d));
            SCORES.with(|s| {
                let s = &mut *s.borrow_mut();
                for chunk in items.chunks(per) {
                    // SAFETY: `available(d)` (the caller's promise); the
                    // items' rows are this task's; `k`/`v` hold `lp`/`len`
                    // positions of this head.
                    unsafe {
                        match (d, chunk.len()) {
                            (64, 6) => pass::<4, 6>(chunk, k, lp, v, scale, s),
                            (64, 5) => pass::<4, 5>(chunk, k, lp, v, scale, s),
                            (64, 4) => pass::<4, 4>(chunk, k, lp, v, scale, s),
                            (64, 3) => pass::<4, 3>(chunk, k, lp, v, scale, s),
                            (64, 2) => pass::<4, 2>(chunk, k, lp, v, scale, s),
                            (64, _) => pass::<4, 1>(chunk, k, lp, v, scale, s),
                            (_, 3) => pass::<8, 3>(chunk, k, lp, v, scale, s),
                            (_, 2) => pass::<8, 2>(chunk, k, lp, v, scale, s),
                            _ => pass::<8, 1>(chunk, k, lp, v, scale, s),
                        }
                    }
                }
            });
        };
        if park {
            pool().run_then_park(nblocks * kv_heads, &task);
        } else {
            pool().run(nblocks * kv_heads, &task);
        }
    }

    thread_local! {
        /// Per-thread scores of a pass (`M` rows of `lp`).
        static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// `M` query vectors of `16 * C` lanes over one KV head's transposed
    /// keys `kt` (`[16 * C][lp]`) and widened values `v` (a row of `16 * C`
    /// per position): scores 16 keys a time, a softmax per query over its
    /// own positions, then the weighted sums, normalized.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pass<const C: usize, const M: usize>(
        items: &[Item],
        kt: *const f32,
        lp: usize,
        v: *const f32,
        scale: f32,
        s: &mut Vec<f32>,
    ) {
        let it: [Item; M] = std::array::from_fn(|m| items[m]);
        let d = 16 * C;
        let lmax = it.iter().map(|i| i.len).max().unwrap_or(0);
        let lb = lmax.next_multiple_of(16);
        s.clear();
        s.resize(M * lb, 0.0);
        let sp = s.as_mut_ptr();
        let sc = _mm512_set1_ps(scale);
        let mut kb = 0;
        while kb < lmax {
            let mut acc = [_mm512_setzero_ps(); M];
            for dd in 0..d {
                let k = _mm512_loadu_ps(kt.add(dd * lp + kb));
                for (a, i) in acc.iter_mut().zip(&it) {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*i.q.add(dd)), k, *a);
                }
            }
            for (m, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(sp.add(m * lb + kb), _mm512_mul_ps(*a, sc));
            }
            kb += 16;
        }
        let mut inv = [0f32; M];
        for (m, i) in it.iter().enumerate() {
            let row = std::slice::from_raw_parts_mut(sp.add(m * lb), lb);
            let (mine, past) = row.split_at_mut(i.len);
            let max = max_of(mine);
            inv[m] = 1.0 / exp_in_place(mine, max);
            // Positions past this query's own are not weighted.
            past.fill(0.0);
        }
        let mut acc = [[_mm512_setzero_ps(); C]; M];
        for j in 0..lmax {
            let vv: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(v.add(j * d + 16 * c)));
            for (m, a) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*sp.add(m * lb + j));
                for (x, y) in a.iter_mut().zip(&vv) {
                    *x = _mm512_fmadd_ps(w, *y, *x);
                }
            }
        }
        for (m, i) in it.iter().enumerate() {
            let f = _mm512_set1_ps(inv[m]);
            for (c, a) in acc[m].iter().enumerate() {
                _mm512_storeu_ps(i.out.add(16 * c), _mm512_mul_ps(*a, f));
            }
        }
    }
}
