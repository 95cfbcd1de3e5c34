//! Tensor-parallel shards against the whole model: each rank holds its
//! heads and MLP columns, the ranks run a step together over a TCP group,
//! and the leader's logits equal the single-process model's.

use std::sync::Arc;
use std::time::Duration;

use llmos_meta::ModelConfig;
use tch::{Device, Kind, Tensor};

use crate::comm::{Collective, Rendezvous};
use crate::kv::{BatchLayout, SeqSlice};
use crate::model::cpu_decode::PagedSeq;
use crate::model::llama::LoadOptions;
use crate::model::{Llama, ShardSpec};

fn cfg() -> ModelConfig {
    let mut cfg = ModelConfig::preset("tiny").unwrap(); // 4 heads, 2 KV heads
    cfg.qkv_bias = true;
    cfg
}

fn opts() -> LoadOptions {
    LoadOptions {
        kind: Kind::Float,
        device: Device::Cpu,
        seed: 11,
        ..Default::default()
    }
}

/// Rank `rank` of `size`: the leader holds the embedding and head.
fn load_rank(cfg: &ModelConfig, rank: usize, size: usize) -> Llama {
    let split = cfg.tp_split(rank, size).unwrap();
    let shard = ShardSpec {
        layers: 0..cfg.num_layers,
        embed: rank == 0,
        head: rank == 0,
    };
    Llama::load_tp(None, cfg, shard, &opts(), Some(split), &mut |_, _| {}).unwrap()
}

fn layouts() -> (Vec<i64>, BatchLayout, Vec<i64>, BatchLayout) {
    let bs = 4;
    let prefill = BatchLayout {
        seqs: vec![
            SeqSlice {
                position: 0,
                tokens: 6,
                blocks: vec![7, 2],
            },
            SeqSlice {
                position: 0,
                tokens: 3,
                blocks: vec![0, 5],
            },
        ],
        block_size: bs,
    };
    let decode = BatchLayout {
        seqs: vec![
            SeqSlice {
                position: 6,
                tokens: 1,
                blocks: vec![7, 2],
            },
            SeqSlice {
                position: 3,
                tokens: 2,
                blocks: vec![0, 5],
            },
        ],
        block_size: bs,
    };
    (
        vec![5, 17, 99, 3, 8, 200, 41, 9, 1],
        prefill,
        vec![300, 77, 12],
        decode,
    )
}

/// Logits of a prefill step and a mixed step, plus one fused decode token,
/// on the whole model or (with `group`) on one rank.
fn run(m: &Llama, embed_from: &Llama) -> Vec<Vec<f32>> {
    let _g = tch::no_grad_guard();
    let (ids1, l1, ids2, l2) = layouts();
    let mut pool = m.new_pool(8, 4).unwrap();
    let mut out = Vec::new();
    for (ids, layout) in [(ids1, l1), (ids2, l2)] {
        let x = embed_from.embed_packed(&Tensor::from_slice(&ids)).unwrap();
        let h = m.forward_batch(&x, &layout, &mut pool).unwrap();
        if m.shard().head {
            let rows: Vec<i64> = layout.last_rows().iter().map(|&r| r).collect();
            out.push(Vec::try_from(m.logits_rows(&h, &rows).unwrap().reshape([-1])).unwrap());
        }
    }
    // One more token of sequence 0 through the fused step.
    let x = embed_from.embed_row(42).unwrap();
    let blocks = [7u32, 2];
    let mut seq = PagedSeq {
        pool: &mut pool,
        blocks: &blocks,
        position: 7,
    };
    let fused = m.decode_hidden(x, &mut seq).unwrap();
    if m.shard().head {
        out.push(fused);
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// tp=2 (KV heads split) and tp=4 (more ranks than the 2 KV heads: each
/// replicated over 2 ranks) give the whole model's logits, on the batched
/// path (prefill, then decode rows beside a prompt chunk) and the fused
/// one-token path.
#[test]
fn tensor_parallel_ranks_match_the_whole_model() {
    let cfg = cfg();
    let whole = Llama::load(None, &cfg, ShardSpec::full(&cfg), &opts(), &mut |_, _| {}).unwrap();
    let want = run(&whole, &whole);
    for size in [2usize, 4] {
        let rvs: Vec<Arc<Rendezvous>> = (0..size)
            .map(|_| Arc::new(Rendezvous::bind("127.0.0.1:0").unwrap()))
            .collect();
        let peers: Vec<String> = rvs.iter().map(|r| r.local_addr().to_string()).collect();
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let (rv, peers, cfg) = (rvs[rank].clone(), peers.clone(), cfg.clone());
                std::thread::spawn(move || {
                    // Tensors are not shared across threads: each rank
                    // embeds with its own copy of the whole model.
                    let whole =
                        Llama::load(None, &cfg, ShardSpec::full(&cfg), &opts(), &mut |_, _| {})
                            .unwrap();
                    let g = rv
                        .form(
                            &format!("tp{size}"),
                            rank,
                            &peers,
                            Duration::from_secs(10),
                            Duration::from_secs(20),
                        )
                        .unwrap();
                    let g: Arc<dyn Collective> = Arc::new(g);
                    let mut m = load_rank(&cfg, rank, size);
                    let split = m.tp_split().unwrap();
                    assert_eq!(split.heads, 4 / size);
                    assert_eq!(split.kv_heads, (2 / size).max(1));
                    assert_eq!(m.local_kv_heads(), split.kv_heads);
                    // Each rank holds a 1/size share of the layer weights.
                    m.set_collective(g.clone()).unwrap();
                    let got = run(&m, &whole);
                    (got, m.weight_bytes(), g.bytes_sent())
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let (got, _, _) = &results[0];
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let d = max_diff(g, w);
            assert!(d < 1e-4, "tp={size} output {i}: max diff {d}");
            // Greedy picks agree.
            let argmax = |v: &[f32]| {
                v.iter()
                    .enumerate()
                    .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
                    .0
            };
            assert_eq!(argmax(g), argmax(w), "tp={size} output {i}");
        }
        // A follower holds only its share of the layers (no embedding or
        // head), and every rank sent its partial sums.
        let follower_bytes = results[1].1;
        assert!(
            (follower_bytes as f64) < whole.weight_bytes() as f64 / size as f64,
            "tp={size}: follower holds {follower_bytes} bytes"
        );
        assert!(results.iter().all(|r| r.2 > 0));
    }
}

#[test]
fn a_model_that_cannot_be_split_is_refused_with_the_numbers() {
    let cfg = cfg();
    let e = cfg.tp_split(0, 3).unwrap_err();
    assert!(
        e.contains("3 does not divide the model's 4 attention heads"),
        "{e}"
    );
    let mut odd = cfg.clone();
    odd.num_heads = 6;
    odd.num_kv_heads = 3; // 2 ranks split the heads, but not 3 KV heads
    let e = odd.tp_split(0, 2).unwrap_err();
    assert!(e.contains("2 and the model's 3 KV heads"), "{e}");
    odd.intermediate_size = 100;
    let e = odd.tp_split(0, 3).unwrap_err();
    assert!(
        e.contains("3 does not divide the model's 100 MLP columns"),
        "{e}"
    );
    // A rank without its group refuses to run rather than give partial sums.
    let m = load_rank(&cfg, 1, 2);
    let _g = tch::no_grad_guard();
    let mut pool = m.new_pool(2, 4).unwrap();
    let x = Tensor::zeros([1, 64], (Kind::Float, Device::Cpu));
    let layout = BatchLayout {
        seqs: vec![SeqSlice {
            position: 0,
            tokens: 1,
            blocks: vec![0],
        }],
        block_size: 4,
    };
    let e = m.forward_batch(&x, &layout, &mut pool).unwrap_err();
    assert!(e.to_string().contains("has no group"), "{e}");
}
