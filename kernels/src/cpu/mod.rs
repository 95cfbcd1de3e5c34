//! The CPU kernels: the one CPU implementation of each op. The worker runs
//! them (decode rows, batched steps, the fused one-token step, sampling),
//! and the CUDA kernel of the same op (`crate::cuda`) is tested against
//! them.
//!
//! - [`gemv`]: products of a few activation rows through a weight (f32,
//!   bf16, int8 rows; AVX2/FMA, AVX-512 register tiles), and the process's
//!   pool for them.
//! - [`quant`]: the same products with GGUF block-quantized weights
//!   (Q8_0, Q4_0, Q4_1) read in their blocks.
//! - [`calibrate`]: which SIMD body (portable, AVX2, AVX-512) those
//!   products run on this machine, measured at first use.
//! - [`attention`]: one query row per sequence over its cached positions,
//!   split-K across threads, wherever the caller's addressing puts them.
//! - [`paged_attention`]: that attention through block tables of the
//!   paged KV pool.
//! - [`elementwise`]: RMSNorm, rotary embedding, SiLU-and-multiply on f32
//!   rows.
//! - [`sampling`]: token selection (greedy, temperature, top-k, top-p)
//!   and the counter-based uniform draw every sampler uses.
//! - [`vecmath`]: 16-lane exponential, max, sums of exponentials, bf16
//!   rounding.
//! - [`spin_pool`]: the fork-join pool every kernel here runs on.
//!
//! CPU features (AVX2/FMA, AVX-512, AVX512-BF16) are detected at run time;
//! tests of a feature's body run where the CPU has it and print a skip line
//! where it does not.

pub mod attention;
pub mod calibrate;
pub mod elementwise;
pub mod gemv;
pub mod paged_attention;
pub(crate) mod prompt_attention;
pub mod quant;
pub mod sampling;
pub mod spin_pool;
pub mod vecmath;

/// How far ahead of its reads (bytes) a decode row product asks for its
/// weights with `prefetcht0` (f32, bf16, int8 and block-quantized rows).
/// The rows stream from memory once per token, and on the 2-vCPU Xeon the
/// hardware prefetcher alone left every body well short of the rate the
/// memory gives (a software hint covers the latency a stream's start and
/// each 4 KB page cost it). Measured there (SmolLM2, `llmos-worker bench`,
/// decode tok/s on 1 and 2 threads, no hint -> this distance): f32 24 -> 31
/// and 44 -> 54 (runs interleaved, 16- and 512-token prompts alike), Q8_0
/// 57 -> 94 and 99 -> 176-190, Q4_1 81 -> 117 and 162 -> 210-215, bf16
/// 48 -> 63 and 73 -> 94, int8 50 -> 91 and 98 -> 172. 1024 bytes gave
/// less; 6-16 KB no more (f32 at 8 KB: 48 against 52-55 on 2 threads).
pub(crate) const PREFETCH_AHEAD: usize = 3072;

/// Tells the test output that part of a test did not run on this machine
/// and why. Written to the process's standard error directly, past
/// libtest's capture (which holds back a passing test's `eprintln!`), so
/// the line shows in every run's output.
#[cfg(test)]
pub(crate) fn skip_line(test: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED (part of) {test}: {reason}");
}
