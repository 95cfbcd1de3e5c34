//! GPU tests: each kernel against the CPU kernel of its op and against the
//! libtorch op chain it replaces, on ragged batches, in bf16, fp16 and f32.
//! Ignored by default (the test summary counts them); run them on a GPU
//! machine with `cargo test --release -- --ignored gpu_`, where a missing
//! GPU fails them.

use tch::{Device, Kind, Tensor};

use crate::cuda::paged_attention::tests::{case, dense};
use crate::cuda::sampling::SampleParams;
use crate::cuda::{cuda_available, int8, load_torch_cuda, Kernels};

fn gpu() -> Option<(Kernels, Device)> {
    assert!(
        cuda_available(),
        "a GPU test ran without a CUDA device (they are #[ignore]d: run them with --ignored on a GPU machine)"
    );
    load_torch_cuda().expect("libtorch_cuda.so");
    assert!(
        tch::Cuda::is_available(),
        "the driver sees a GPU, libtorch does not"
    );
    let k = Kernels::new(0).expect("kernels on cuda:0");
    k.preload().expect("every module loads");
    let dev = k.device();
    Some((k, dev))
}

/// Largest absolute difference relative to the largest magnitude of `want`.
fn rel(got: &Tensor, want: &Tensor) -> f64 {
    let (g, w) = (
        got.to_device(Device::Cpu).to_kind(Kind::Float),
        want.to_device(Device::Cpu).to_kind(Kind::Float),
    );
    (g - &w).abs().max().double_value(&[]) / w.abs().max().double_value(&[]).max(1e-12)
}

fn tol(kind: Kind) -> f64 {
    match kind {
        Kind::Float => 1e-5,
        Kind::Half => 2e-3,
        _ => 1.6e-2,
    }
}

const KINDS: [Kind; 3] = [Kind::BFloat16, Kind::Half, Kind::Float];

#[test]
#[ignore = "needs a CUDA GPU: cargo test --release -- --ignored gpu_ on a GPU machine"]
fn gpu_rms_norm_matches_reference_and_libtorch() {
    let Some((k, dev)) = gpu() else { return };
    tch::manual_seed(11);
    for kind in KINDS {
        // Rows strided: a view into a wider buffer, as the worker's hidden
        // states may be.
        let wide = Tensor::randn([37, 2304], (Kind::Float, dev)).to_kind(kind);
        let mut x = wide.narrow(1, 0, 2048);
        let mut r = Tensor::randn([37, 2048], (Kind::Float, dev)).to_kind(kind);
        let w = (Tensor::rand([2048], (Kind::Float, dev)) + 0.5).to_kind(kind);
        let plain = k.rms_norm(&x, &w, 1e-5).unwrap();
        let want = crate::cuda::rms_norm::reference::rms_norm(&x, &w, 1e-5);
        assert!(
            rel(&plain, &want) < tol(kind),
            "{kind:?} rms_norm vs reference"
        );
        let chain = x.rms_norm([2048], Some(&w), 1e-5);
        assert!(
            rel(&plain, &chain) < 2.0 * tol(kind),
            "{kind:?} rms_norm vs libtorch"
        );
        let (want_x, want_r) =
            crate::cuda::rms_norm::reference::fused_add_rms_norm(&x, &r, &w, 1e-5);
        let chain_r = &x + &r;
        let chain_x = chain_r.rms_norm([2048], Some(&w), 1e-5);
        k.fused_add_rms_norm(&mut x, &mut r, &w, 1e-5).unwrap();
        assert!(
            rel(&r, &want_r) < tol(kind) && rel(&r, &chain_r) < tol(kind),
            "{kind:?} residual"
        );
        assert!(rel(&x, &want_x) < tol(kind), "{kind:?} fused vs reference");
        assert!(
            rel(&x, &chain_x) < 2.0 * tol(kind),
            "{kind:?} fused vs libtorch"
        );
        // The padding columns of the wide buffer are untouched.
        assert!(wide.narrow(1, 2048, 256).isfinite().all().int64_value(&[]) == 1);
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --release -- --ignored gpu_ on a GPU machine"]
fn gpu_rotary_matches_reference_and_libtorch() {
    let Some((k, dev)) = gpu() else { return };
    tch::manual_seed(12);
    let (heads, kv, d) = (32i64, 8i64, 64i64);
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 500000f32.powf(-2.0 * i as f32 / d as f32))
        .collect();
    let table = crate::cuda::rotary::cos_sin_table(&inv, 8192, dev);
    let positions = Tensor::from_slice(&[0i64, 5, 6, 7, 100, 101, 4000, 8191, 17]).to_device(dev);
    for kind in KINDS {
        let qkv = Tensor::randn([9, (heads + 2 * kv) * d], (Kind::Float, dev)).to_kind(kind);
        let mut q = qkv.narrow(1, 0, heads * d).view([9, heads, d]);
        let mut kk = qkv.narrow(1, heads * d, kv * d).view([9, kv, d]);
        let (want_q, want_k) = crate::cuda::rotary::reference::rotary(&q, &kk, &positions, &table);
        let rope = |x: &Tensor| {
            let cs = table.index_select(0, &positions).unsqueeze(1);
            let (cos, sin) = (cs.narrow(2, 0, d / 2), cs.narrow(2, d / 2, d / 2));
            let (cos, sin) = (
                Tensor::cat(&[&cos, &cos], -1).to_kind(kind),
                Tensor::cat(&[&sin, &sin], -1).to_kind(kind),
            );
            let rot = Tensor::cat(&[-x.narrow(2, d / 2, d / 2), x.narrow(2, 0, d / 2)], -1);
            x * cos + rot * sin
        };
        let (chain_q, chain_k) = (rope(&q), rope(&kk));
        let v_before = qkv.narrow(1, (heads + kv) * d, kv * d).copy();
        k.rotary(&mut q, &mut kk, &positions, &table).unwrap();
        assert!(
            rel(&q, &want_q) < tol(kind) && rel(&kk, &want_k) < tol(kind),
            "{kind:?} vs reference"
        );
        assert!(
            rel(&q, &chain_q) < 2.0 * tol(kind) && rel(&kk, &chain_k) < 2.0 * tol(kind),
            "{kind:?} vs libtorch"
        );
        assert!(
            qkv.narrow(1, (heads + kv) * d, kv * d).equal(&v_before),
            "v columns untouched"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --release -- --ignored gpu_ on a GPU machine"]
fn gpu_silu_and_mul_matches_reference_and_libtorch() {
    let Some((k, dev)) = gpu() else { return };
    tch::manual_seed(13);
    for kind in KINDS {
        for rows in [1i64, 33] {
            let x = (Tensor::randn([rows, 2 * 8192], (Kind::Float, dev)) * 3).to_kind(kind);
            let got = k.silu_and_mul(&x).unwrap();
            assert!(
                rel(&got, &crate::cuda::activation::reference::silu_and_mul(&x)) < tol(kind),
                "{kind:?}"
            );
            let chain = x.narrow(1, 0, 8192).silu() * x.narrow(1, 8192, 8192);
            assert!(rel(&got, &chain) < 2.0 * tol(kind), "{kind:?} vs libtorch");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --release -- --ignored gpu_ on a GPU machine"]
fn gpu_paged_attention_matches_reference_and_dense_attention() {
    let Some((k, dev)) = gpu() else { return };
    tch::manual_seed(14);
    // Llama-3.2-1B's heads (32 / 8, d 128) and SmolLM2's (9 / 3, d 64).
    for (heads, kv, d) in [(32i64, 8i64, 128i64), (9, 3, 64)] {
        for kind in KINDS {
            let c = case(kind, dev, &[1, 15, 16, 17, 100, 1000, 2049], heads, kv, d);
            let scale = 1.0 / (d as f64).sqrt();
            let got = k.paged_attention(&c.batch(scale)).unwrap();
            let want =
                crate::cuda::paged_attention::reference::paged_attention(&c.batch(scale)).unwrap();
            assert!(
                rel(&got, &want) < tol(kind),
                "{kind:?} {heads}/{kv}/{d} vs reference"
            );
            assert!(
                rel(&got, &dense(&c, scale)) < tol(kind),
                "{kind:?} {heads}/{kv}/{d} vs libtorch"
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --release -- --ignored gpu_ on a GPU machine"]
fn gpu_sampling_matches_reference() {
    let Some((k, dev)) = gpu() else { return };
    tch::manual_seed(15);
    let (rows, vocab) = (64i64, 49152i64);
    let logits = Tensor::randn([rows, vocab], (Kind::Float, dev)) * 4.0;
    let params: Vec<SampleParams> = (0..rows)
        .map(|i| match i % 4 {
            0 => SampleParams::greedy(),
            1 => SampleParams {
                temperature: 0.8,
                top_k: 50,
                top_p: 1.0,
                uniform: (i as f32 * 0.37) % 1.0,
                min_p: 0.0,
            },
            2 => SampleParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 0.9,
                uniform: (i as f32 * 0.61) % 1.0,
                min_p: 0.0,
            },
            _ => SampleParams {
                temperature: 1.2,
                top_k: 200,
                top_p: 0.7,
                uniform: (i as f32 * 0.13) % 1.0,
                min_p: 0.0,
            },
        })
        .collect();
    let (ids, lps) = k.sample(&logits, &params).unwrap();
    let ids = Vec::<i64>::try_from(ids.to_device(Device::Cpu)).unwrap();
    let lps = Vec::<f32>::try_from(lps.to_device(Device::Cpu)).unwrap();
    let (want_ids, want_lps) =
        crate::cuda::sampling::reference::sample_rows(&logits, &params).unwrap();
    let host = Vec::<f32>::try_from(logits.to_device(Device::Cpu).view([-1])).unwrap();
    let mut same = 0;
    for r in 0..rows as usize {
        let row = &host[r * vocab as usize..(r + 1) * vocab as usize];
        if params[r].temperature <= 0.0 {
            assert_eq!(ids[r], want_ids[r], "row {r}: greedy differs");
        } else {
            assert!(
                crate::cuda::sampling::reference::candidates(row, &params[r])[ids[r] as usize],
                "row {r}: not a candidate"
            );
        }
        same += (ids[r] == want_ids[r]) as usize;
        assert!(
            (lps[r] - want_lps[r]).abs() < 1e-3 || ids[r] != want_ids[r],
            "row {r}: logprob {} vs {}",
            lps[r],
            want_lps[r]
        );
    }
    // Float sums in another order may move a draw that lands within
    // rounding of a boundary; anything more is a bug.
    assert!(same >= rows as usize - 2, "{same} of {rows} rows agree");
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --release -- --ignored gpu_ on a GPU machine"]
fn gpu_int8_linear_matches_reference_and_dequantized_matmul() {
    let Some((k, dev)) = gpu() else { return };
    tch::manual_seed(16);
    let w = Tensor::randn([5632, 2048], (Kind::Float, dev)) * 0.02;
    let (q, s) = int8::quantize_per_channel(&w).unwrap();
    for kind in KINDS {
        for m in [1i64, 3, 8] {
            let x = Tensor::randn([m, 2048], (Kind::Float, dev)).to_kind(kind);
            let got = k.int8_linear(&x, &q, &s).unwrap();
            assert!(
                rel(&got, &int8::reference::int8_linear(&x, &q, &s)) < tol(kind),
                "{kind:?} m={m}"
            );
            let chain = x
                .to_kind(Kind::Float)
                .matmul(&int8::dequantize(&q, &s, Kind::Float).tr());
            assert!(
                rel(&got, &chain) < 2.0 * tol(kind),
                "{kind:?} m={m} vs libtorch"
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --release -- --ignored gpu_ on a GPU machine"]
fn gpu_kernels_reject_host_tensors_and_reuse_cached_ptx() {
    let Some((k, _dev)) = gpu() else { return };
    let x = Tensor::zeros([2, 64], (Kind::BFloat16, Device::Cpu));
    let w = Tensor::ones([64], (Kind::BFloat16, Device::Cpu));
    let err = k.rms_norm(&x, &w, 1e-5).unwrap_err().to_string();
    assert!(
        err.contains("is on cpu, the kernels run on cuda:0"),
        "{err}"
    );
    // preload() compiled (or read) every module: compiling again hits the cache.
    let again = crate::cuda::compile::compile(
        crate::cuda::Module::PagedAttention,
        k.arch(),
        &crate::cuda::compile::default_cache_dir(),
    )
    .unwrap();
    assert!(again.cache_hit);
}
