//! Which SIMD body the decode products run, chosen per machine by
//! measurement at first use, not by CPU flags alone: a CPU can have
//! AVX-512 and still run the 256-bit body as fast or faster (AMD Zen 4
//! splits 512-bit operations in two; some Intel parts lower their clock
//! for them), and decode is bound by memory on some machines and by
//! instructions on others.
//!
//! For each family (block-quantized rows, bf16 rows) every body the CPU has
//! streams the same weights, larger than a typical last-level cache, one
//! thread, alternating bodies over a few rounds; the best time of each
//! decides. `LLMOS_CPU_KERNELS=portable|avx2|avx512` forces a body (the
//! nearest the CPU has) for comparisons. `llmos-worker bench` prints the
//! choice and the measured rates.

use std::sync::OnceLock;
use std::time::Instant;

use llmos_meta::quant::GgmlType;

use crate::cpu::quant::{self, Blocks};

/// A kernel body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// Plain loops (any CPU).
    Portable,
    /// AVX2, FMA and F16C, 8 lanes.
    Avx2,
    /// AVX-512 F, 16 lanes (bf16 rows: AVX512-BF16's `vdpbf16ps`).
    Avx512,
}

impl Body {
    pub fn name(self) -> &'static str {
        match self {
            Body::Portable => "portable",
            Body::Avx2 => "avx2",
            Body::Avx512 => "avx512",
        }
    }
}

/// Bodies of the block products this CPU can run, portable first.
pub fn available() -> Vec<Body> {
    let mut v = vec![Body::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        use std::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            v.push(Body::Avx2);
            if has!("avx512f") {
                v.push(Body::Avx512);
            }
        }
    }
    v
}

/// Bodies of bf16 row products this CPU can run: AVX2 widening the
/// weights, AVX512-BF16 dot products.
pub fn available_bf16() -> Vec<Body> {
    let mut v = vec![Body::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        use std::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") {
            v.push(Body::Avx2);
            if has!("avx512bf16") && has!("avx512bw") {
                v.push(Body::Avx512);
            }
        }
    }
    v
}

/// The bodies in use and what decided them.
#[derive(Clone, Debug)]
pub struct Choice {
    /// Block-quantized rows (Q8_0, Q4_0, Q4_1).
    pub blocks: Body,
    /// bf16 weight rows times one activation row.
    pub bf16: Body,
    /// GB/s of weights each body streamed, `("q4_1/avx2", 9.1)`, or empty
    /// when forced.
    pub rates: Vec<(String, f64)>,
    /// `LLMOS_CPU_KERNELS`, when it forced the bodies.
    pub forced: Option<String>,
}

/// The machine's choice (measured once, at first use: ~0.1 s).
pub fn choice() -> &'static Choice {
    static CHOICE: OnceLock<Choice> = OnceLock::new();
    CHOICE.get_or_init(|| {
        let c = match std::env::var("LLMOS_CPU_KERNELS") {
            Ok(s) if !s.is_empty() => forced(&s),
            _ => measure(),
        };
        tracing::info!(
            blocks = c.blocks.name(),
            bf16 = c.bf16.name(),
            rates = ?c.rates,
            forced = ?c.forced,
            "CPU kernel bodies chosen"
        );
        c
    })
}

fn forced(s: &str) -> Choice {
    let want = match s {
        "avx512" => Body::Avx512,
        "avx2" => Body::Avx2,
        "portable" => Body::Portable,
        other => {
            tracing::warn!(
                value = other,
                "LLMOS_CPU_KERNELS is not portable, avx2 or avx512: measuring instead"
            );
            return measure();
        }
    };
    // The wanted body where the CPU has it, else the best below it.
    let pick = |have: Vec<Body>| {
        have.into_iter()
            .rfind(|b| (*b as u8) <= (want as u8))
            .unwrap_or(Body::Portable)
    };
    Choice {
        blocks: pick(available()),
        bf16: pick(available_bf16()),
        rates: Vec::new(),
        forced: Some(s.to_string()),
    }
}

/// Bytes each family streams per timing: past most last-level caches.
const BYTES: usize = 48 << 20;
const ROUNDS: usize = 3;

fn measure() -> Choice {
    let mut rates = Vec::new();
    // Q4_1 blocks (the Q4 and Q8 bodies share their structure): d = 1,
    // m = 0, varied nibbles.
    let cols = 2048;
    let row = quant::row_bytes(GgmlType::Q4_1, cols);
    let rows = BYTES / row;
    let mut data = vec![0u8; rows * row];
    for (i, b) in data.chunks_exact_mut(20).enumerate() {
        b[..2].copy_from_slice(&0x3c00u16.to_le_bytes());
        for (j, q) in b[4..].iter_mut().enumerate() {
            *q = (i * 7 + j * 13) as u8;
        }
    }
    let x: Vec<f32> = (0..cols).map(|i| (i % 17) as f32 / 17.0).collect();
    let w = Blocks::new(GgmlType::Q4_1, &data, rows, cols).expect("calibration weights");
    let bodies = available();
    let best = time_bodies(&bodies, |b| {
        std::hint::black_box(quant::sweep(b, w, &x));
    });
    let blocks = pick(&bodies, &best, data.len(), "q4_1", &mut rates);
    drop(data);
    // bf16 rows.
    let bf16 = {
        let n = BYTES / 2;
        let wb: Vec<u16> = (0..n).map(|i| 0x3c00 + (i % 255) as u16).collect();
        let bodies = available_bf16();
        let best = time_bodies(&bodies, |b| {
            let s: f32 = wb
                .chunks_exact(cols)
                .map(|r| crate::cpu::gemv::dot_bf16_with(b, r, &x))
                .sum();
            std::hint::black_box(s);
        });
        pick(&bodies, &best, n * 2, "bf16", &mut rates)
    };
    Choice {
        blocks,
        bf16,
        rates,
        forced: None,
    }
}

/// The best of `ROUNDS` times of each body, bodies alternating within a
/// round (so a drift in the machine's speed hits all alike).
fn time_bodies(bodies: &[Body], run: impl Fn(Body)) -> Vec<f64> {
    let mut best = vec![f64::INFINITY; bodies.len()];
    for _ in 0..ROUNDS {
        for (k, &b) in bodies.iter().enumerate() {
            let t = Instant::now();
            run(b);
            best[k] = best[k].min(t.elapsed().as_secs_f64());
        }
    }
    best
}

/// The fastest body; a faster wider body must beat the narrower one by 3%
/// (within the noise the narrower one is kept: it is the one that runs at
/// full clock everywhere).
fn pick(
    bodies: &[Body],
    best: &[f64],
    bytes: usize,
    family: &str,
    rates: &mut Vec<(String, f64)>,
) -> Body {
    let mut chosen = 0;
    for k in 0..bodies.len() {
        rates.push((
            format!("{family}/{}", bodies[k].name()),
            bytes as f64 / best[k] / 1e9,
        ));
        if best[k] < best[chosen] * 0.97 {
            chosen = k;
        }
    }
    bodies[chosen]
}

/// GB/s of a plain read of `bytes` of memory (summing 64-bit words) by
/// `threads` threads, each its own contiguous part, the best of 5: the
/// machine's memory bandwidth, that decode's thread scaling is compared
/// with (`llmos-worker bench`).
pub fn read_bandwidth(threads: usize, bytes: usize) -> f64 {
    let threads = threads.max(1);
    let words: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    let part = words.len().div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let sum: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = words
                .chunks(part)
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &w| a.wrapping_add(w))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("reader"))
                .fold(0, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (words.len() * 8) as f64 / best / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_is_a_body_this_cpu_has_and_its_rates_are_measured() {
        let c = choice();
        println!("{c:?}");
        assert!(available().contains(&c.blocks), "{c:?}");
        assert!(available_bf16().contains(&c.bf16), "{c:?}");
        if c.forced.is_none() {
            assert_eq!(c.rates.len(), available().len() + available_bf16().len());
            assert!(
                c.rates.iter().all(|(_, r)| *r > 0.0 && r.is_finite()),
                "{c:?}"
            );
        }
    }

    #[test]
    fn a_forced_body_falls_back_to_the_best_the_cpu_has() {
        let c = forced("avx512");
        assert_eq!(c.blocks, *available().last().unwrap());
        assert_eq!(c.bf16, *available_bf16().last().unwrap());
        let p = forced("portable");
        assert_eq!((p.blocks, p.bf16), (Body::Portable, Body::Portable));
    }
}
