//! The projections of a batched decode step: `rows` activation rows times a
//! weight of SmolLM2's shapes, through llmos's `gemv_batch` (the weight read
//! in place, AVX-512 register tiles where the CPU has them) and through
//! libtorch's `linear` (MKL) on the same threads, in one run. Prints each
//! time, GFLOP/s and the ratio, per weight dtype and row count; the worker
//! sends products of up to `Linear::TILED_BATCH` rows to the kernel.
//!
//! GGUF block weights (Q8_0, Q4_1, Q4_K) the same way: llmos's
//! `gemv_blocks` (4 weight rows dequantized into cache at a time, then the
//! f32 tiles) against what the worker does above `TILED_BATCH` rows (and
//! did above 8 before): the whole weight dequantized on the calling thread,
//! then libtorch's product.
//!
//! cargo bench -p llmos-benches --bench small_gemm

use std::time::Instant;

use llmos_kernels::cpu::gemv::{gemv_batch, pool, tiles_available};
use llmos_kernels::cpu::quant::{dequantize_rows, gemv_blocks, Blocks};
use llmos_meta::quant::{quantize, GgmlType};
use tch::{Device, Kind, Tensor};

/// Median seconds of `f` over `reps` runs after one warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let threads = tch::get_num_threads();
    let _ = pool(); // sized by libtorch's thread count, as in the worker
    println!(
        "small GEMM (x[rows, in] . W[out, in]^T), {threads} threads, AVX-512 tiles: {}",
        tiles_available()
    );
    println!(
        "{:<6}{:<16}{:>6}{:>12}{:>10}{:>12}{:>10}{:>9}",
        "dtype", "weight", "rows", "llmos ms", "GFLOP/s", "libtorch ms", "GFLOP/s", "ratio"
    );
    // SmolLM2-135M: fused qkv, o, fused gate/up, down; the tied LM head.
    let shapes = [
        ("qkv 960x576", 960i64, 576i64),
        ("gate_up 3072x576", 3072, 576),
        ("down 576x1536", 576, 1536),
        ("head 49152x576", 49152, 576),
    ];
    let _g = tch::no_grad_guard();
    for kind in [Kind::Float, Kind::BFloat16] {
        for &(name, out_f, in_f) in &shapes {
            let w = Tensor::randn([out_f, in_f], (Kind::Float, Device::Cpu)).to_kind(kind);
            let n = (out_f * in_f) as usize;
            for rows in [4i64, 16, 48, 128, 256, 512] {
                let x = Tensor::randn([rows, in_f], (Kind::Float, Device::Cpu));
                let xs: Vec<f32> = Vec::try_from(x.view([-1])).unwrap();
                let mut y = vec![0f32; (rows * out_f) as usize];
                let reps = if out_f > 10_000 { 5 } else { 30 };
                // SAFETY: `w` is a contiguous CPU tensor of `n` elements of
                // the matched type, alive for the loop.
                let ours = unsafe {
                    match kind {
                        Kind::Float => {
                            let ws = std::slice::from_raw_parts(w.data_ptr() as *const f32, n);
                            time(reps, || gemv_batch(pool(), ws, in_f as usize, &xs, &mut y))
                        }
                        _ => {
                            let ws = std::slice::from_raw_parts(w.data_ptr() as *const u16, n);
                            time(reps, || gemv_batch(pool(), ws, in_f as usize, &xs, &mut y))
                        }
                    }
                };
                let xk = x.to_kind(kind);
                let theirs = time(reps, || {
                    let _ = xk.linear::<Tensor>(&w, None);
                });
                let flop = 2.0 * (rows * out_f * in_f) as f64;
                print_row(
                    if kind == Kind::Float { "f32" } else { "bf16" },
                    name,
                    rows,
                    ours,
                    theirs,
                    flop,
                );
            }
        }
    }
    println!("block weights: libtorch ms = the whole weight dequantized on the calling thread + libtorch's f32 product");
    for (label, ty) in [
        ("q8_0", GgmlType::Q8_0),
        ("q4_1", GgmlType::Q4_1),
        ("q4_k", GgmlType::Q4_K),
    ] {
        for &(name, out_f, in_f) in &shapes[..3] {
            let (rows_w, cols) = (out_f as usize, in_f as usize);
            if cols % ty.block_size() != 0 {
                continue;
            }
            let values: Vec<f32> =
                Vec::try_from(Tensor::randn([out_f * in_f], (Kind::Float, Device::Cpu)) * 0.05)
                    .unwrap();
            let data = quantize(ty, &values);
            let w = Blocks::new(ty, &data, rows_w, cols).unwrap();
            for rows in [16i64, 48, 128, 256] {
                let x = Tensor::randn([rows, in_f], (Kind::Float, Device::Cpu));
                let xs: Vec<f32> = Vec::try_from(x.view([-1])).unwrap();
                let mut y = vec![0f32; rows as usize * rows_w];
                let ours = time(30, || gemv_blocks(pool(), w, &xs, &mut y));
                let theirs = time(30, || {
                    let d = Tensor::empty([out_f, in_f], (Kind::Float, Device::Cpu));
                    // SAFETY: a fresh contiguous f32 tensor of rows x cols.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(d.data_ptr() as *mut f32, rows_w * cols)
                    };
                    dequantize_rows(w, out);
                    let _ = x.linear::<Tensor>(&d, None);
                });
                let flop = 2.0 * (rows * out_f * in_f) as f64;
                print_row(label, name, rows, ours, theirs, flop);
            }
        }
    }
}

fn print_row(dtype: &str, name: &str, rows: i64, ours: f64, theirs: f64, flop: f64) {
    println!(
        "{:<6}{:<16}{:>6}{:>12.3}{:>10.1}{:>12.3}{:>10.1}{:>8.2}x",
        dtype,
        name,
        rows,
        ours * 1e3,
        flop / ours / 1e9,
        theirs * 1e3,
        flop / theirs / 1e9,
        theirs / ours
    );
}
