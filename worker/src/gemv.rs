//! CPU matrix-vector product for decode steps (one row through a weight).
//!
//! libtorch's one-row `linear` (MKL sgemv) streams weights from memory at
//! well under the machine's bandwidth with few threads; decode is nothing but
//! such products. This kernel reads each weight row once with AVX2/FMA
//! (chosen at run time; a portable loop otherwise), f32 accumulation, rows
//! split across a `SpinPool`. The tests below check it against
//! `Tensor::linear`; `benches/single_process.sh` shows the end-to-end effect.
//! (An AVX-512 variant and a four-rows-at-a-time variant were measured and
//! brought nothing or lost: the loop is bound by memory bandwidth.)

use crate::spin_pool::{SharedOut, SpinPool};

/// Rows per parallel task: large enough to amortize scheduling, small enough
/// to balance two threads on the smallest projections.
const ROWS_PER_TASK: usize = 64;

/// Weight element types the kernel reads.
pub trait WeightElem: Copy + Send + Sync {
    fn dot(row: &[Self], x: &[f32]) -> f32;
    fn widen(self) -> f32;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[inline]
    fn dot(row: &[f32], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { x86::dot_f32(row, x) };
        }
        row.iter().zip(x).map(|(a, b)| a * b).sum()
    }
}

/// bfloat16 stored as its bit pattern.
impl WeightElem for u16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }

    #[inline]
    fn dot(row: &[u16], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { x86::dot_bf16(row, x) };
        }
        row.iter()
            .zip(x)
            .map(|(&a, b)| f32::from_bits((a as u32) << 16) * b)
            .sum()
    }
}

/// int8 weights (weight-only quantization): the dot product of the integer
/// values; the caller applies the row's scale.
impl WeightElem for i8 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self as f32
    }

    #[inline]
    fn dot(row: &[i8], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { x86::dot_i8(row, x) };
        }
        row.iter().zip(x).map(|(&a, b)| a as f32 * b).sum()
    }
}

/// `y[r] = dot(w[r * cols..(r + 1) * cols], x)` for every row `r`.
pub fn gemv<T: WeightElem>(pool: &SpinPool, w: &[T], cols: usize, x: &[f32], y: &mut [f32]) {
    assert_eq!(
        x.len(),
        cols,
        "gemv: x has {} elements, weight rows {cols}",
        x.len()
    );
    gemv_batch(pool, w, cols, x, y)
}

/// `y[b * rows + r] = dot(w row r, x[b * cols..])` for `b` input rows:
/// each weight row is read from memory once and used for every input row
/// (small batches, where a general matrix product repacks the weight).
pub fn gemv_batch<T: WeightElem>(pool: &SpinPool, w: &[T], cols: usize, x: &[f32], y: &mut [f32]) {
    assert!(
        cols > 0 && x.len() % cols == 0,
        "gemv_batch: x is not b x cols"
    );
    let b = x.len() / cols;
    assert_eq!(y.len() % b.max(1), 0);
    let rows = y.len() / b.max(1);
    assert_eq!(
        w.len(),
        rows * cols,
        "gemv_batch: weight is not rows x cols"
    );
    let out = SharedOut(y.as_mut_ptr());
    let per_task = ROWS_PER_TASK.max(rows.div_ceil(crate::spin_pool::MAX_CHUNKS));
    pool.run(rows.div_ceil(per_task), &|task| {
        let first = task * per_task;
        for r in first..(first + per_task).min(rows) {
            let row = &w[r * cols..(r + 1) * cols];
            for i in 0..b {
                let v = T::dot(row, &x[i * cols..(i + 1) * cols]);
                // SAFETY: `(i, r)` is in bounds, and row `r` is this task's.
                unsafe { *out.at(i * rows + r) = v };
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
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
    /// scalar tail through `WeightElem::widen`.
    macro_rules! avx_dot {
        ($name:ident, $t:ty, |$p:ident| $load:expr) => {
            #[target_feature(enable = "avx2,fma")]
            pub unsafe fn $name(a: &[$t], b: &[f32]) -> f32 {
                let n = a.len().min(b.len());
                let (pa, pb) = (a.as_ptr(), b.as_ptr());
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i + 32 <= n {
                    for (k, acc) in acc.iter_mut().enumerate() {
                        let $p = pa.add(i + 8 * k);
                        let vb = _mm256_loadu_ps(pb.add(i + 8 * k));
                        *acc = _mm256_fmadd_ps($load, vb, *acc);
                    }
                    i += 32;
                }
                let sum =
                    _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
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
    avx_dot!(dot_i8, i8, |p| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
        _mm_loadl_epi64(p as *const __m128i)
    )));
}

static POOL: std::sync::OnceLock<SpinPool> = std::sync::OnceLock::new();

/// The process-wide pool for decode products. Its size is fixed by the first
/// call: libtorch's intra-op thread count at that time (engines call this at
/// load, before decode steps lower libtorch's count).
pub fn pool() -> &'static SpinPool {
    POOL.get_or_init(|| SpinPool::new(tch::get_num_threads().max(1) as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    fn pool() -> SpinPool {
        SpinPool::new(2)
    }

    #[test]
    fn matches_libtorch_linear_f32_and_bf16_including_ragged_tails() {
        tch::manual_seed(3);
        for (rows, cols) in [(1, 1), (7, 31), (130, 576), (65, 100)] {
            let w = Tensor::randn([rows, cols], (Kind::Float, tch::Device::Cpu));
            let x = Tensor::randn([1, cols], (Kind::Float, tch::Device::Cpu));
            let xs: Vec<f32> = Vec::try_from(x.view([-1])).unwrap();
            // f32
            let want: Vec<f32> = Vec::try_from(x.linear::<Tensor>(&w, None).view([-1])).unwrap();
            let ws: Vec<f32> = Vec::try_from(w.view([-1])).unwrap();
            let mut y = vec![0f32; rows as usize];
            gemv(&pool(), &ws, cols as usize, &xs, &mut y);
            for (a, b) in y.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "f32 {rows}x{cols}: {a} vs {b}"
                );
            }
            // bf16 weights, f32 accumulation: compare with libtorch on the
            // same bf16 values widened to f32.
            let wb = w.to_kind(Kind::BFloat16);
            let want: Vec<f32> = Vec::try_from(
                x.linear::<Tensor>(&wb.to_kind(Kind::Float), None)
                    .view([-1]),
            )
            .unwrap();
            let bits: Vec<u16> = Vec::<i16>::try_from(wb.view_dtype(Kind::Int16).view([-1]))
                .unwrap()
                .into_iter()
                .map(|v| v as u16)
                .collect();
            gemv(&pool(), &bits, cols as usize, &xs, &mut y);
            for (a, b) in y.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "bf16 {rows}x{cols}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn int8_rows_match_libtorch_on_the_integer_values() {
        tch::manual_seed(5);
        for (rows, cols, b) in [(130i64, 576i64, 1i64), (7, 31, 3), (65, 100, 8)] {
            let w = Tensor::randint_low(-127, 128, [rows, cols], (Kind::Int8, tch::Device::Cpu));
            let x = Tensor::randn([b, cols], (Kind::Float, tch::Device::Cpu));
            let want: Vec<f32> =
                Vec::try_from(x.linear::<Tensor>(&w.to_kind(Kind::Float), None).view([-1]))
                    .unwrap();
            let ws: Vec<i8> = Vec::try_from(w.view([-1])).unwrap();
            let xs: Vec<f32> = Vec::try_from(x.view([-1])).unwrap();
            let mut y = vec![0f32; (rows * b) as usize];
            gemv_batch(&pool(), &ws, cols as usize, &xs, &mut y);
            for (a, w) in y.iter().zip(&want) {
                assert!(
                    (a - w).abs() <= 1e-3 * (1.0 + w.abs()),
                    "{rows}x{cols}x{b}: {a} vs {w}"
                );
            }
        }
    }

    #[test]
    fn batch_of_rows_matches_libtorch_linear() {
        tch::manual_seed(4);
        for (rows, cols, b) in [(130i64, 576i64, 3i64), (7, 31, 8), (65, 100, 2)] {
            let w = Tensor::randn([rows, cols], (Kind::Float, tch::Device::Cpu));
            let x = Tensor::randn([b, cols], (Kind::Float, tch::Device::Cpu));
            let want: Vec<f32> = Vec::try_from(x.linear::<Tensor>(&w, None).view([-1])).unwrap();
            let ws: Vec<f32> = Vec::try_from(w.view([-1])).unwrap();
            let xs: Vec<f32> = Vec::try_from(x.view([-1])).unwrap();
            let mut y = vec![0f32; (rows * b) as usize];
            gemv_batch(&pool(), &ws, cols as usize, &xs, &mut y);
            for (a, w) in y.iter().zip(&want) {
                assert!(
                    (a - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{rows}x{cols}x{b}: {a} vs {w}"
                );
            }
        }
    }
}
