//! CPU products of a few activation rows through a weight, for decode
//! steps and batched steps.
//!
//! libtorch's one-row `linear` (MKL sgemv) streams weights from memory at
//! well under the machine's bandwidth with few threads; decode is nothing but
//! such products. This kernel reads each weight row once with AVX2/FMA
//! (chosen at run time; a portable loop otherwise), f32 accumulation, rows
//! split across a `SpinPool`. The tests below check it against
//! `Tensor::linear`; `benches/single_process.sh` shows the end-to-end effect.
//! (For f32 weights an AVX-512 variant and a four-rows-at-a-time variant
//! of the one-row loop were measured and brought nothing or lost: that loop
//! is bound by memory bandwidth.) Two or more rows on an AVX-512 CPU take
//! register tiles instead (`tile`), where arithmetic, not memory, bounds
//! the product; `benches/small_gemm.rs` compares them with libtorch.
//!
//! bfloat16 weights multiply activations rounded to bfloat16, with f32
//! accumulation: what a bf16 matrix product computes (Hugging Face's bf16
//! model rounds every activation). On CPUs with AVX512-BF16 (AMD Zen 4,
//! Intel Cooper Lake and later) the one-row product is one `vdpbf16ps` per
//! 32 elements, a quarter of the instructions of widening the weights for
//! an FMA (measured: no faster end to end on this memory-bound loop, ~20
//! GB/s a core either way). Other CPUs widen the weights and read the
//! rounded activations as f32; the result is the same up to summation
//! order.

use std::borrow::Cow;

use crate::cpu::calibrate::Body;
use crate::cpu::spin_pool::{SharedSlot, SpinPool};
use crate::cpu::vecmath::f32_to_bf16;

/// Tasks per pool thread in one product: a multiple of the thread count, so
/// threads running at one speed finish together (with fixed 64-row tasks a
/// 576-row projection was 5 tasks on one thread and 4 on the other, every
/// layer), and many of them, so a thread that runs slower or starts late
/// leaves only the task in hand for the other to wait on. The pool gives
/// each thread a contiguous share of the tasks, run in order (one stream of
/// rows with prefetch hints, `PREFETCH_AHEAD`), and lets a thread that is
/// done steal tasks from the back of the others' shares. Measured on the
/// 2-vCPU Xeon (SmolLM2 decode on 2 threads, tok/s, interleaved runs):
/// bf16 91-93 with 16 a thread or 64, 86-89 with 4; Q4_1 and Q8_0 the
/// same with 4 or 16. (Before the pool's shares, when threads took tasks
/// from one counter in turn, more tasks broke the streams: Q4_1 206-215
/// with 1-4 tasks a thread, 190 with 16.)
const TASKS_PER_THREAD: usize = 16;
/// Fewer rows than this per task cost more in claiming than they balance.
const MIN_ROWS_PER_TASK: usize = 16;

/// Rows per task for `rows` output rows on `threads` threads.
pub(crate) fn rows_per_task(threads: usize, rows: usize) -> usize {
    let tasks = (threads * TASKS_PER_THREAD)
        .min(rows.div_ceil(MIN_ROWS_PER_TASK))
        .max(rows.div_ceil(crate::cpu::spin_pool::MAX_CHUNKS));
    rows.div_ceil(tasks.max(1))
}

/// Weight element types the kernel reads.
pub trait WeightElem: Copy + Send + Sync {
    /// `row · x` on f32 `x` (attention over cached keys uses this).
    fn dot(row: &[Self], x: &[f32]) -> f32;
    fn widen(self) -> f32;

    /// The activations as a product with these weights reads them
    /// (converted once per product; borrowed where nothing changes).
    fn activations(x: &[f32]) -> Cow<'_, [f32]> {
        Cow::Borrowed(x)
    }
    /// `out += p * v` (attention's weighted sum of cached values).
    #[inline]
    fn axpy(out: &mut [f32], p: f32, v: &[Self]) {
        for (o, x) in out.iter_mut().zip(v) {
            *o += p * x.widen();
        }
    }

    /// `row · x` on `activations(x)`.
    #[inline]
    fn dot_act(row: &[Self], x: &[f32]) -> f32 {
        Self::dot(row, x)
    }

    /// A register tile of the many-row product on AVX-512 (only called when
    /// `tiles_available()`): `out[i * nr + j] = w row j · x row i` for
    /// `mr` (1..=4) activation rows of `activations(x)` and `nr` (1 or 4)
    /// weight rows, each `cols` long.
    ///
    /// # Safety
    /// `w` holds `nr * cols` elements and `x` `mr * cols`, and the CPU has
    /// the features `tiles_available` checks.
    unsafe fn tile(
        w: *const Self,
        x: *const f32,
        cols: usize,
        mr: usize,
        nr: usize,
        out: &mut [f32; 16],
    );
}

/// Whether the CPU runs the AVX-512 register tiles of `gemv_batch`.
pub fn tiles_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `WeightElem::tile` for element type `$t` through the AVX-512 kernel
/// `x86::$kernel`.
macro_rules! tile_method {
    ($t:ty, $kernel:ident) => {
        unsafe fn tile(
            w: *const $t,
            x: *const f32,
            cols: usize,
            mr: usize,
            nr: usize,
            out: &mut [f32; 16],
        ) {
            #[cfg(target_arch = "x86_64")]
            tile_dispatch!(x86::$kernel, w, x, cols, mr, nr, out);
        }
    };
}

/// `WeightElem::axpy` for element type `$t` through the AVX2 kernel
/// `x86::$kernel` where the CPU has it.
macro_rules! axpy_method {
    ($t:ty, $kernel:ident) => {
        #[inline]
        fn axpy(out: &mut [f32], p: f32, v: &[$t]) {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the features were just detected.
                return unsafe { x86::$kernel(out, p, v) };
            }
            out.iter_mut().zip(v).for_each(|(o, x)| *o += p * x.widen());
        }
    };
}

/// Dispatches a tile shape to the kernel instantiated for it.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_dispatch {
    ($($kernel:ident)::+, $w:expr, $x:expr, $cols:expr, $mr:expr, $nr:expr, $out:expr) => {
        match ($mr, $nr) {
            (4, 4) => $($kernel)::+::<4, 4>($w, $x, $cols, $out),
            (3, 4) => $($kernel)::+::<3, 4>($w, $x, $cols, $out),
            (2, 4) => $($kernel)::+::<2, 4>($w, $x, $cols, $out),
            (1, 4) => $($kernel)::+::<1, 4>($w, $x, $cols, $out),
            (4, 1) => $($kernel)::+::<4, 1>($w, $x, $cols, $out),
            (3, 1) => $($kernel)::+::<3, 1>($w, $x, $cols, $out),
            (2, 1) => $($kernel)::+::<2, 1>($w, $x, $cols, $out),
            (1, 1) => $($kernel)::+::<1, 1>($w, $x, $cols, $out),
            other => unreachable!("tile shape {other:?}"),
        }
    };
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

    axpy_method!(f32, axpy_f32);

    tile_method!(f32, tile_f32);
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

    /// Rounded to bf16 (the values stay f32, so the AVX2 body reads them
    /// as before).
    fn activations(x: &[f32]) -> Cow<'_, [f32]> {
        Cow::Owned(x.iter().map(|&v| (f32_to_bf16(v)).widen()).collect())
    }
    /// The body the machine's calibration chose (`calibrate`).
    #[inline]
    fn dot_act(row: &[u16], x: &[f32]) -> f32 {
        dot_bf16_with(crate::cpu::calibrate::choice().bf16, row, x)
    }

    axpy_method!(u16, axpy_bf16);

    tile_method!(u16, tile_bf16);
}

/// A bf16 row · activations rounded to bf16, with `body` (one of
/// `calibrate::available_bf16()`; the AVX-512 body is AVX512-BF16's).
pub fn dot_bf16_with(body: Body, row: &[u16], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match body {
        // SAFETY: bodies are only chosen where the CPU has their features.
        Body::Avx512 => return unsafe { x86::dot_bf16_avx512(row, x) },
        // SAFETY: as above.
        Body::Avx2 => return unsafe { x86::dot_bf16(row, x) },
        Body::Portable => {}
    }
    row.iter()
        .zip(x)
        .map(|(&a, b)| f32::from_bits((a as u32) << 16) * b)
        .sum()
}

/// IEEE half precision (`--kv-dtype f16`: llama.cpp's default KV cache
/// type). Widened with F16C/AVX-512 conversions where the CPU has them.
impl WeightElem for half::f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }

    #[inline]
    fn dot(row: &[half::f16], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_f16c() {
            // SAFETY: the features were just detected.
            return unsafe { x86::dot_f16(row, x) };
        }
        row.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
    }

    #[inline]
    fn axpy(out: &mut [f32], p: f32, v: &[half::f16]) {
        #[cfg(target_arch = "x86_64")]
        if has_f16c() {
            // SAFETY: the features were just detected.
            return unsafe { x86::axpy_f16(out, p, v) };
        }
        out.iter_mut()
            .zip(v)
            .for_each(|(o, x)| *o += p * x.to_f32());
    }

    tile_method!(half::f16, tile_f16);
}

/// Whether the CPU has the AVX2, FMA and F16C bodies of f16 elements.
#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    })
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

    tile_method!(i8, tile_i8);
}

/// The register tiles of `nr` (1 or 4) weight rows at `w` (`cols` each,
/// weight row `r` of the product onwards) with the activation rows `acts`
/// of `x`, 4 at a time: `out[i * rows + r + j]` for `i` in `acts`, `j <
/// nr`.
///
/// # Safety
/// `w` holds `nr * cols` elements, `x` the rows `acts`; the CPU has what
/// `tiles_available` checks; no other thread writes those outputs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile_rows<T: WeightElem>(
    w: *const T,
    nr: usize,
    x: &[f32],
    cols: usize,
    acts: std::ops::Range<usize>,
    r: usize,
    rows: usize,
    out: &SharedSlot<f32>,
) {
    let mut tile = [0f32; 16];
    for i0 in acts.clone().step_by(4) {
        let mr = (acts.end - i0).min(4);
        T::tile(w, x.as_ptr().add(i0 * cols), cols, mr, nr, &mut tile);
        for i in 0..mr {
            for j in 0..nr {
                *out.at((i0 + i) * rows + r + j) = tile[i * nr + j];
            }
        }
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
    let x = T::activations(x);
    let x = &x[..];
    let out = SharedSlot(y.as_mut_ptr());
    if b >= 2 && tiles_available() {
        // Register tiles of 4 weight rows x up to 4 activation rows: each
        // loaded vector feeds 4 multiply-adds (the row-by-row loop below
        // loads two vectors per multiply-add and is bound by loads), and the
        // weight is read in place (a general product first copies it into
        // its own layout, which at a few dozen rows costs a third of the
        // product).
        let per_task = rows_per_task(pool.threads(), rows).next_multiple_of(4);
        pool.run(rows.div_ceil(per_task), &|task| {
            let first = task * per_task;
            let end = (first + per_task).min(rows);
            let mut r = first;
            while r < end {
                let nr = if end - r >= 4 { 4 } else { 1 };
                // SAFETY: rows `r..r + nr` of `w` and every row of `x` are
                // in bounds; `tiles_available` was checked; the outputs
                // `(i, r..r + nr)` are this task's rows.
                unsafe { tile_rows(w.as_ptr().add(r * cols), nr, x, cols, 0..b, r, rows, &out) };
                r += nr;
            }
        });
        return;
    }
    let per_task = rows_per_task(pool.threads(), rows);
    pool.run(rows.div_ceil(per_task), &|task| {
        let first = task * per_task;
        for r in first..(first + per_task).min(rows) {
            let row = &w[r * cols..(r + 1) * cols];
            for i in 0..b {
                let v = T::dot_act(row, &x[i * cols..(i + 1) * cols]);
                // SAFETY: `(i, r)` is in bounds, and row `r` is this task's.
                unsafe { *out.at(i * rows + r) = v };
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86;

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

    /// `gemv_batch` of `b` random rows through a random `rows x cols` weight
    /// equals libtorch's product, with f32 weights and with bf16 weights
    /// (activations rounded to bf16, f32 accumulation: libtorch on the same
    /// bf16 values widened to f32).
    fn check_against_libtorch(rows: i64, cols: i64, b: i64) {
        let w = Tensor::randn([rows, cols], (Kind::Float, tch::Device::Cpu));
        let x = Tensor::randn([b, cols], (Kind::Float, tch::Device::Cpu));
        let xs: Vec<f32> = Vec::try_from(x.view([-1])).unwrap();
        let mut y = vec![0f32; (rows * b) as usize];
        let wb = w.to_kind(Kind::BFloat16);
        let xb = x.to_kind(Kind::BFloat16).to_kind(Kind::Float);
        let bits: Vec<u16> = Vec::<i16>::try_from(wb.view_dtype(Kind::Int16).view([-1]))
            .unwrap()
            .into_iter()
            .map(|v| v as u16)
            .collect();
        let ws: Vec<f32> = Vec::try_from(w.view([-1])).unwrap();
        for (name, want) in [
            ("f32", x.linear::<Tensor>(&w, None)),
            ("bf16", xb.linear::<Tensor>(&wb.to_kind(Kind::Float), None)),
        ] {
            if name == "f32" {
                gemv_batch(&pool(), &ws, cols as usize, &xs, &mut y);
            } else {
                gemv_batch(&pool(), &bits, cols as usize, &xs, &mut y);
            }
            let want: Vec<f32> = Vec::try_from(want.view([-1])).unwrap();
            for (a, w) in y.iter().zip(&want) {
                assert!(
                    (a - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{name} {rows}x{cols}x{b}: {a} vs {w}"
                );
            }
        }
    }

    #[test]
    fn matches_libtorch_linear_f32_and_bf16_including_ragged_tails() {
        tch::manual_seed(3);
        for (rows, cols) in [(1, 1), (7, 31), (130, 576), (65, 100)] {
            check_against_libtorch(rows, cols, 1);
        }
    }

    /// Every bf16 body this CPU can run gives the scalar sum (to rounding)
    /// on bf16-valued activations at every length around its 32- and
    /// 128-element steps.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn bf16_dot_bodies_agree_at_every_tail_length() {
        let avx512 = std::is_x86_feature_detected!("avx512bf16")
            && std::is_x86_feature_detected!("avx512bw");
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        for (has, body) in [(avx512, "AVX512-BF16"), (avx2, "AVX2/FMA")] {
            if !has {
                crate::cpu::skip_line(
                    "bf16_dot_bodies_agree_at_every_tail_length",
                    &format!("no {body} on this CPU: its bf16 body is not compared"),
                );
            }
        }
        for n in (0..300).chain([576, 1536, 1537]) {
            let a: Vec<u16> = (0..n)
                .map(|i| f32_to_bf16(((i * 7 % 13) as f32 - 6.0) * 0.37))
                .collect();
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.21 + 1e-3)
                .collect();
            let x = u16::activations(&x);
            assert!(x.iter().all(|&v| f32_to_bf16(v).widen() == v));
            let want: f64 = a
                .iter()
                .zip(x.iter())
                .map(|(&w, &v)| w.widen() as f64 * v as f64)
                .sum();
            let tol = 1e-4 * (1.0 + want.abs());
            if avx512 {
                // SAFETY: detected above.
                let got = unsafe { x86::dot_bf16_avx512(&a, &x) } as f64;
                assert!((got - want).abs() <= tol, "avx512 n={n}: {got} vs {want}");
            }
            if avx2 {
                // SAFETY: detected above.
                let got = unsafe { x86::dot_bf16(&a, &x) } as f64;
                assert!((got - want).abs() <= tol, "avx2 n={n}: {got} vs {want}");
            }
            let got = u16::dot_act(&a, &x) as f64;
            assert!((got - want).abs() <= tol, "dispatch n={n}: {got} vs {want}");
        }
    }

    /// f16 elements (the f16 KV cache): the dot product, `out += p * v`
    /// and the many-row product (tiles where the CPU has AVX-512) give the
    /// f64 sums of the widened values, at every length around their 8-,
    /// 16- and 32-element steps.
    #[test]
    fn f16_rows_match_the_widened_sums() {
        use half::f16;
        for n in (0..100).chain([576, 1537]) {
            let a: Vec<f16> = (0..n)
                .map(|i| f16::from_f32(((i * 7 % 13) as f32 - 6.0) * 0.37))
                .collect();
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.21 + 1e-3)
                .collect();
            let want: f64 = a.iter().zip(&x).map(|(w, &v)| w.to_f64() * v as f64).sum();
            let got = f16::dot(&a, &x) as f64;
            assert!(
                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "dot n={n}: {got} vs {want}"
            );
            let mut out = x.clone();
            f16::axpy(&mut out, -0.75, &a);
            for (i, (o, w)) in out.iter().zip(&a).enumerate() {
                let want = x[i] as f64 - 0.75 * w.to_f64();
                assert!(
                    (*o as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "axpy n={n} at {i}"
                );
            }
        }
        for (rows, cols, b) in [
            (130usize, 576usize, 1usize),
            (7, 31, 3),
            (65, 100, 8),
            (9, 17, 13),
        ] {
            let w: Vec<f16> = (0..rows * cols)
                .map(|i| f16::from_f32(((i * 7 % 29) as f32 - 14.0) * 0.07))
                .collect();
            let x: Vec<f32> = (0..b * cols)
                .map(|i| ((i * 5 % 23) as f32 - 11.0) * 0.05)
                .collect();
            let mut y = vec![0f32; rows * b];
            gemv_batch(&pool(), &w, cols, &x, &mut y);
            for i in 0..b {
                for r in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|c| w[r * cols + c].to_f64() * x[i * cols + c] as f64)
                        .sum();
                    let got = y[i * rows + r] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{rows}x{cols}x{b} ({i}, {r}): {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn int8_rows_match_libtorch_on_the_integer_values() {
        tch::manual_seed(5);
        for (rows, cols, b) in [
            (130i64, 576i64, 1i64),
            (7, 31, 3),
            (65, 100, 8),
            (21, 40, 37),
        ] {
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

    /// Row-by-row and (where the CPU has AVX-512) register tiles: every
    /// tile shape (4 or 1 weight rows x 1-4 activation rows), partial
    /// 16-column steps, many activation-row blocks.
    #[test]
    fn batch_of_rows_matches_libtorch_linear() {
        if !tiles_available() {
            crate::cpu::skip_line(
                "batch_of_rows_matches_libtorch_linear",
                "no AVX-512 on this CPU: the register tiles are not compared, only row-by-row",
            );
        }
        tch::manual_seed(4);
        for (rows, cols, b) in [
            (130i64, 576i64, 3i64),
            (7, 31, 8),
            (65, 100, 2),
            (70, 1536, 48),
            (9, 17, 13),
            (64, 576, 128),
        ] {
            check_against_libtorch(rows, cols, b);
        }
    }
}
