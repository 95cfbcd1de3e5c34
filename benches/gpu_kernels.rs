//! Each CUDA kernel of `llmos-kernels` against the libtorch op chain it
//! would replace, on decode- and prompt-sized Llama-3.2-1B shapes (bf16), in
//! one run: microseconds per call and the ratio. The worker switches a chain
//! for its kernel only where this shows the kernel faster. Prints a line and
//! exits where no CUDA device is present.
//!
//! cargo bench -p llmos-benches --bench gpu_kernels

use std::time::Instant;

use llmos_kernels::cuda::paged_attention::PagedBatch;
use llmos_kernels::cuda::sampling::SampleParams;
use llmos_kernels::cuda::{cuda_available, int8, load_torch_cuda, rotary, Kernels};
use tch::{Device, Kind, Tensor};

const ITERS: u32 = 200;

fn time(mut f: impl FnMut()) -> f64 {
    for _ in 0..10 {
        f();
    }
    tch::Cuda::synchronize(0);
    let t = Instant::now();
    for _ in 0..ITERS {
        f();
    }
    tch::Cuda::synchronize(0);
    t.elapsed().as_secs_f64() * 1e6 / ITERS as f64
}

fn row(name: &str, kernel_us: f64, chain_us: f64) {
    println!(
        "{name:<44}{kernel_us:>10.1}{chain_us:>12.1}{:>9.2}x",
        chain_us / kernel_us
    );
}

fn main() {
    if !cuda_available() {
        println!("gpu_kernels: no CUDA device, nothing measured");
        return;
    }
    load_torch_cuda().expect("libtorch_cuda.so");
    let k = Kernels::new(0).expect("kernels");
    k.preload().expect("modules");
    let dev = Device::Cuda(0);
    let bf = (Kind::BFloat16, dev);
    let _g = tch::no_grad_guard();
    println!(
        "llmos-kernels on {} (bf16, Llama-3.2-1B shapes, {ITERS} calls each)",
        k.arch()
    );
    println!(
        "{:<44}{:>10}{:>12}{:>10}",
        "op", "kernel us", "libtorch us", "speedup"
    );
    let (h, heads, kv, d, inter) = (2048i64, 32i64, 8i64, 64i64, 8192i64);
    for rows in [1i64, 64, 512] {
        let mut x = Tensor::randn([rows, h], bf);
        let mut r = Tensor::randn([rows, h], bf);
        let w = Tensor::ones([h], bf);
        let kern = time(|| k.fused_add_rms_norm(&mut x, &mut r, &w, 1e-5).unwrap());
        let chain = time(|| {
            let s = &x + &r;
            let _ = s.rms_norm([h], Some(&w), 1e-5);
        });
        row(&format!("fused add + RMSNorm, {rows} rows"), kern, chain);

        let qkv = Tensor::randn([rows, (heads + 2 * kv) * d], bf);
        let mut q = qkv.narrow(1, 0, heads * d).view([rows, heads, d]);
        let mut kk = qkv.narrow(1, heads * d, kv * d).view([rows, kv, d]);
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 500000f32.powf(-2.0 * i as f32 / d as f32))
            .collect();
        let table = rotary::cos_sin_table(&inv, 8192, dev);
        let cos = table
            .narrow(1, 0, d / 2)
            .repeat([1, 2])
            .to_kind(Kind::BFloat16)
            .unsqueeze(1);
        let sin = table
            .narrow(1, d / 2, d / 2)
            .repeat([1, 2])
            .to_kind(Kind::BFloat16)
            .unsqueeze(1);
        let pos = Tensor::arange(rows, (Kind::Int64, dev));
        let kern = time(|| k.rotary(&mut q, &mut kk, &pos, &table).unwrap());
        let chain = time(|| {
            for x in [&q, &kk] {
                let (c, s) = (cos.index_select(0, &pos), sin.index_select(0, &pos));
                let rot = Tensor::cat(&[-x.narrow(2, d / 2, d / 2), x.narrow(2, 0, d / 2)], -1);
                let _ = x * c + rot * s;
            }
        });
        row(&format!("rotary q+k, {rows} tokens"), kern, chain);

        let gu = Tensor::randn([rows, 2 * inter], bf);
        let kern = time(|| {
            let _ = k.silu_and_mul(&gu).unwrap();
        });
        let chain = time(|| {
            let _ = gu.narrow(1, 0, inter).silu() * gu.narrow(1, inter, inter);
        });
        row(&format!("SiLU and multiply, {rows} rows"), kern, chain);
    }
    // Paged attention: 32 sequences of 1024 positions on scattered blocks,
    // against gathering each context and running libtorch's SDPA.
    let (seqs, len, bs) = (32i64, 1024i64, 16i64);
    let blocks_per = len / bs;
    let slots = seqs * blocks_per * bs;
    let kc = Tensor::randn([slots, kv, d], bf);
    let vc = Tensor::randn([slots, kv, d], bf);
    let perm = Tensor::randperm(seqs * blocks_per, (Kind::Int64, dev));
    let tables = perm.view([seqs, blocks_per]).to_kind(Kind::Int);
    let lens = Tensor::full([seqs], len, (Kind::Int, dev));
    let qd = Tensor::randn([seqs, heads, d], bf);
    let batch = PagedBatch {
        q: &qd,
        k_cache: &kc,
        v_cache: &vc,
        block_tables: &tables,
        context_lens: &lens,
        block_size: bs,
        scale: 1.0 / (d as f64).sqrt(),
    };
    let kern = time(|| {
        let _ = k.paged_attention(&batch).unwrap();
    });
    let offsets = Tensor::arange(bs, (Kind::Int64, dev));
    let slot_ids = (perm.view([seqs, blocks_per, 1]) * bs + offsets).view([seqs, len]);
    let chain = time(|| {
        let kk = kc
            .index_select(0, &slot_ids.view([-1]))
            .view([seqs, len, kv, d])
            .transpose(1, 2);
        let vv = vc
            .index_select(0, &slot_ids.view([-1]))
            .view([seqs, len, kv, d])
            .transpose(1, 2);
        let q = qd.unsqueeze(2);
        let _ = Tensor::scaled_dot_product_attention(
            &q,
            &kk,
            &vv,
            None::<Tensor>,
            0.0,
            false,
            None,
            true,
        );
    });
    row(
        &format!("paged attention, {seqs} seqs x {len} positions"),
        kern,
        chain,
    );
    // Sampling 64 rows of a 128256 vocabulary, top-k 50 top-p 0.9.
    let logits = Tensor::randn([64, 128256], (Kind::Float, dev));
    let params = vec![
        SampleParams {
            temperature: 0.8,
            top_k: 50,
            top_p: 0.9,
            uniform: 0.5,
            min_p: 0.0,
        };
        64
    ];
    let kern = time(|| {
        let _ = k.sample(&logits, &params).unwrap();
    });
    let chain = time(|| {
        let (v, i) = (&logits / 0.8).topk(50, -1, true, true);
        let p = v.softmax(-1, Kind::Float);
        let keep = p.cumsum(-1, Kind::Float).le(0.9);
        let p = p * keep;
        let pick = p.multinomial(1, false);
        let _ = i.gather(1, &pick, false);
    });
    row("sampling 64 x 128256, top-k 50 top-p 0.9", kern, chain);
    // Int8 decode rows: the MLP's up projection.
    let (q8, s8) =
        int8::quantize_per_channel(&(Tensor::randn([inter, h], (Kind::Float, dev)) * 0.02))
            .unwrap();
    let wb = int8::dequantize(&q8, &s8, Kind::BFloat16);
    for m in [1i64, 8] {
        let x = Tensor::randn([m, h], bf);
        let kern = time(|| {
            let _ = k.int8_linear(&x, &q8, &s8).unwrap();
        });
        let chain = time(|| {
            let _ = x.linear::<Tensor>(&wb, None);
        });
        row(
            &format!("int8 linear {m} x {h} -> {inter} (vs bf16 linear)"),
            kern,
            chain,
        );
    }
}
