//! Decode attention over the engine's paged KV pool
//! (`cuda/paged_attention.cu`): each sequence's one query row attends to its
//! cached positions, read in place through its block table: no gather of
//! the context into a contiguous tensor, as the libtorch path needs.
//!
//! Shapes: `q`, `out` `[seqs, heads, d]`; a pool layer `k_cache`, `v_cache`
//! `[num_blocks * block_size, kv_heads, d]` (the worker's `KvPool` layout);
//! `block_tables` i32 `[seqs, max_blocks]`; `context_lens` i32 `[seqs]`.
//! Table entries and lengths live on the device, so the wrapper cannot read
//! them without a synchronisation: the engine validates them on the host
//! (`BatchLayout::validate`) before they are uploaded. The reference checks
//! them.

use tch::{Kind, Tensor};

use crate::cuda::check::{self, ptr};
use crate::cuda::runtime::{Arg, Kernels, Launch};
use crate::cuda::Module;
use crate::{KernelError, Result};

/// Head dimensions the kernel takes: multiples of 32 up to this.
pub const MAX_HEAD_DIM: i64 = 256;

/// One decode step's attention inputs.
#[derive(Clone, Copy)]
pub struct PagedBatch<'a> {
    /// `[seqs, heads, d]`.
    pub q: &'a Tensor,
    /// A pool layer, `[num_blocks * block_size, kv_heads, d]`.
    pub k_cache: &'a Tensor,
    pub v_cache: &'a Tensor,
    /// i32 `[seqs, max_blocks]`.
    pub block_tables: &'a Tensor,
    /// i32 `[seqs]`.
    pub context_lens: &'a Tensor,
    pub block_size: i64,
    pub scale: f64,
}

pub fn plan_paged_attention(out: &Tensor, b: &PagedBatch<'_>) -> Result<Launch> {
    let PagedBatch {
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        block_size,
        scale,
    } = *b;
    const OP: &str = "paged_attention";
    let invalid = |arg, problem| KernelError::Invalid {
        op: OP,
        arg,
        problem,
    };
    let kind = check::kind(OP, "q", q, &[Kind::Float, Kind::BFloat16, Kind::Half])?;
    let qs = check::dims(OP, "q", q, 3)?;
    check::contiguous(OP, "q", q)?;
    let (seqs, heads, d) = (qs[0], qs[1], qs[2]);
    if d % 32 != 0 || d > MAX_HEAD_DIM {
        return Err(invalid(
            "q",
            format!(
                "has head dimension {d}: the kernel takes multiples of 32 up to {MAX_HEAD_DIM}"
            ),
        ));
    }
    check::same_kind(OP, "out", out, kind)?;
    check::shape(OP, "out", out, &qs)?;
    check::contiguous(OP, "out", out)?;
    check::same_kind(OP, "k_cache", k_cache, kind)?;
    let ks = check::dims(OP, "k_cache", k_cache, 3)?;
    check::contiguous(OP, "k_cache", k_cache)?;
    check::same_kind(OP, "v_cache", v_cache, kind)?;
    check::shape(OP, "v_cache", v_cache, &ks)?;
    check::contiguous(OP, "v_cache", v_cache)?;
    let (slots, kv_heads) = (ks[0], ks[1]);
    if ks[2] != d {
        return Err(invalid(
            "k_cache",
            format!("has head dimension {}, q has {d}", ks[2]),
        ));
    }
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(invalid(
            "k_cache",
            format!("has {kv_heads} KV heads, which must divide q's {heads} heads"),
        ));
    }
    if block_size <= 0 || slots % block_size != 0 {
        return Err(invalid(
            "block_size",
            format!("is {block_size}: the pool's {slots} slots must be whole blocks"),
        ));
    }
    check::kind(OP, "block_tables", block_tables, &[Kind::Int])?;
    let bt = check::dims(OP, "block_tables", block_tables, 2)?;
    check::contiguous(OP, "block_tables", block_tables)?;
    if bt[0] != seqs {
        return Err(invalid(
            "block_tables",
            format!("has {} rows for {seqs} sequences", bt[0]),
        ));
    }
    check::kind(OP, "context_lens", context_lens, &[Kind::Int])?;
    check::shape(OP, "context_lens", context_lens, &[seqs])?;
    check::contiguous(OP, "context_lens", context_lens)?;
    check::fits(OP, "sequences", seqs, 65535)?;
    check::fits(OP, "heads", heads, i32::MAX as i64)?;
    Ok(Launch {
        op: OP,
        module: Module::PagedAttention,
        function: format!("paged_attention_{}", check::suffix(kind)),
        grid: (heads as u32, seqs as u32, 1),
        block: (128, 1, 1),
        args: vec![
            ptr(out),
            ptr(q),
            ptr(k_cache),
            ptr(v_cache),
            ptr(block_tables),
            ptr(context_lens),
            Arg::I32(bt[1] as i32),
            Arg::I32(heads as i32),
            Arg::I32(kv_heads as i32),
            Arg::I32(d as i32),
            Arg::I32(block_size as i32),
            Arg::F32(scale as f32),
        ],
        tensors: vec![
            ("out", out.device()),
            ("q", q.device()),
            ("k_cache", k_cache.device()),
            ("v_cache", v_cache.device()),
            ("block_tables", block_tables.device()),
            ("context_lens", context_lens.device()),
        ],
    })
}

impl Kernels {
    pub fn paged_attention(&self, b: &PagedBatch<'_>) -> Result<Tensor> {
        let out = Tensor::f_empty(b.q.size(), (b.q.kind(), b.q.device()))?;
        self.launch(&plan_paged_attention(&out, b)?)?;
        Ok(out)
    }
}

/// The CPU kernel (`cpu::paged_attention::paged_attention`, what the worker's
/// decode rows run) over tensors: checks the tables and lengths the CUDA
/// kernel trusts, reads f32 or bf16 caches in place (an f16 cache is
/// widened first), rounds the output to `q`'s dtype.
pub mod reference {
    use super::*;
    use crate::cpu::paged_attention::{paged_attention as cpu_paged_attention, QueryRow};
    use crate::cuda::check::{round, tensor, values};

    pub fn paged_attention(b: &PagedBatch<'_>) -> Result<Tensor> {
        let PagedBatch {
            q,
            k_cache,
            v_cache,
            block_tables,
            context_lens,
            block_size,
            scale,
        } = *b;
        let kind = q.kind();
        let (qs, ks) = (q.size(), k_cache.size());
        let (seqs, heads) = (qs[0] as usize, qs[1] as usize);
        let slots = ks[0] as usize;
        let bs = block_size as usize;
        let max_blocks = block_tables.size()[1] as usize;
        let tables = Vec::<i32>::try_from(
            block_tables
                .to_device(tch::Device::Cpu)
                .contiguous()
                .view([-1]),
        )?;
        let lens = Vec::<i32>::try_from(context_lens.to_device(tch::Device::Cpu))?;
        let mut rows = Vec::with_capacity(seqs);
        for s in 0..seqs {
            let len = lens[s];
            if len < 1 || len as usize > max_blocks * bs {
                return Err(KernelError::Invalid {
                    op: "paged_attention",
                    arg: "context_lens",
                    problem: format!(
                        "sequence {s} has length {len}, its table holds {}",
                        max_blocks * bs
                    ),
                });
            }
            let used = (len as usize).div_ceil(bs);
            let table: Vec<u32> = tables[s * max_blocks..s * max_blocks + used]
                .iter()
                .map(|&b| {
                    if b < 0 || (b as usize + 1) * bs > slots {
                        return Err(KernelError::Invalid {
                            op: "paged_attention",
                            arg: "block_tables",
                            problem: format!(
                                "sequence {s} names block {b}, the pool has {}",
                                slots / bs
                            ),
                        });
                    }
                    Ok(b as u32)
                })
                .collect::<Result<_>>()?;
            rows.push((table, len as usize));
        }
        let queries: Vec<QueryRow> = rows
            .iter()
            .enumerate()
            .map(|(row, (blocks, len))| QueryRow {
                row,
                blocks,
                len: *len,
            })
            .collect();
        // The kernel reads f32 and bf16 pools in place.
        let host = |t: &Tensor| {
            let t = t.to_device(tch::Device::Cpu).contiguous();
            match t.kind() {
                Kind::Float | Kind::BFloat16 => t,
                _ => t.to_kind(Kind::Float),
            }
        };
        let (k, v) = (host(k_cache), host(v_cache));
        let qv = values(q);
        let mut out = vec![0f32; qv.len()];
        cpu_paged_attention(&qv, heads, &k, &v, bs, &queries, scale as f32, &mut out);
        Ok(tensor(&round(kind, &out), &qs, kind))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tch::Device;

    /// A pool with ragged sequences scattered over shuffled blocks.
    pub(crate) struct Case {
        pub q: Tensor,
        pub k: Tensor,
        pub v: Tensor,
        pub tables: Tensor,
        pub lens: Tensor,
        pub block_size: i64,
        pub len_list: Vec<i64>,
        pub table_rows: Vec<Vec<i32>>,
    }

    impl Case {
        pub(crate) fn batch(&self, scale: f64) -> PagedBatch<'_> {
            PagedBatch {
                q: &self.q,
                k_cache: &self.k,
                v_cache: &self.v,
                block_tables: &self.tables,
                context_lens: &self.lens,
                block_size: self.block_size,
                scale,
            }
        }
    }

    pub(crate) fn case(
        kind: Kind,
        device: Device,
        lens: &[i64],
        heads: i64,
        kv_heads: i64,
        d: i64,
    ) -> Case {
        let block_size = 16i64;
        let per_seq: Vec<i64> = lens
            .iter()
            .map(|l| (l + block_size - 1) / block_size)
            .collect();
        let max_blocks = *per_seq.iter().max().unwrap();
        let num_blocks = per_seq.iter().sum::<i64>() + 3;
        let order =
            Vec::<i64>::try_from(Tensor::randperm(num_blocks, (Kind::Int64, Device::Cpu))).unwrap();
        let mut next = order.into_iter();
        let table_rows: Vec<Vec<i32>> = per_seq
            .iter()
            .map(|&n| {
                let mut row: Vec<i32> = (0..n).map(|_| next.next().unwrap() as i32).collect();
                row.resize(max_blocks as usize, 0);
                row
            })
            .collect();
        let flat: Vec<i32> = table_rows.concat();
        let slots = num_blocks * block_size;
        let f = (Kind::Float, Device::Cpu);
        Case {
            q: Tensor::randn([lens.len() as i64, heads, d], f)
                .to_kind(kind)
                .to_device(device),
            k: Tensor::randn([slots, kv_heads, d], f)
                .to_kind(kind)
                .to_device(device),
            v: Tensor::randn([slots, kv_heads, d], f)
                .to_kind(kind)
                .to_device(device),
            tables: Tensor::from_slice(&flat)
                .view([lens.len() as i64, max_blocks])
                .to_device(device),
            lens: Tensor::from_slice(&lens.iter().map(|&l| l as i32).collect::<Vec<_>>())
                .to_device(device),
            block_size,
            len_list: lens.to_vec(),
            table_rows,
        }
    }

    /// libtorch's chain: gather each sequence's context, repeat KV heads,
    /// softmax(q k^T * scale) v.
    pub(crate) fn dense(c: &Case, scale: f64) -> Tensor {
        let heads = c.q.size()[1];
        let kv_heads = c.k.size()[1];
        let rows: Vec<Tensor> = c
            .len_list
            .iter()
            .enumerate()
            .map(|(s, &len)| {
                let slots: Vec<i64> = (0..len)
                    .map(|p| {
                        c.table_rows[s][(p / c.block_size) as usize] as i64 * c.block_size
                            + p % c.block_size
                    })
                    .collect();
                let idx = Tensor::from_slice(&slots).to_device(c.k.device());
                let rep = heads / kv_heads;
                let k =
                    c.k.index_select(0, &idx)
                        .to_kind(Kind::Float)
                        .repeat_interleave_self_int(rep, 1, None::<i64>);
                let v =
                    c.v.index_select(0, &idx)
                        .to_kind(Kind::Float)
                        .repeat_interleave_self_int(rep, 1, None::<i64>);
                let q = c.q.get(s as i64).to_kind(Kind::Float); // [heads, d]
                let scores = q.unsqueeze(1).matmul(&k.permute([1, 2, 0])).squeeze_dim(1) * scale; // [heads, len]
                scores
                    .softmax(-1, Kind::Float)
                    .unsqueeze(1)
                    .matmul(&v.transpose(0, 1))
                    .squeeze_dim(1)
            })
            .collect();
        Tensor::stack(&rows, 0)
    }

    #[test]
    fn reference_matches_dense_attention_on_ragged_sequences() {
        tch::manual_seed(4);
        for (kind, tol) in [(Kind::Float, 1e-5), (Kind::BFloat16, 2e-2)] {
            let c = case(kind, Device::Cpu, &[1, 15, 16, 17, 100], 6, 2, 64);
            let scale = 0.125;
            let got = reference::paged_attention(&c.batch(scale)).unwrap();
            assert_eq!(got.kind(), kind);
            let diff = (got.to_kind(Kind::Float) - dense(&c, scale))
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff < tol, "{kind:?}: {diff}");
        }
    }

    #[test]
    fn reference_refuses_bad_tables_and_plans_check_shapes() {
        tch::manual_seed(5);
        let c = case(Kind::BFloat16, Device::Cpu, &[5, 20], 4, 2, 64);
        let long = Tensor::from_slice(&[5i32, 200]);
        let b = c.batch(1.0);
        let err = reference::paged_attention(&PagedBatch {
            context_lens: &long,
            ..b
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("sequence 1 has length 200"),
            "{err}"
        );
        let bad = Tensor::from_slice(&[0i32, 0, 999, 1]).view([2, 2]);
        let err = reference::paged_attention(&PagedBatch {
            block_tables: &bad,
            ..b
        })
        .unwrap_err();
        assert!(err.to_string().contains("names block 999"), "{err}");

        let p = plan_paged_attention(&c.q.empty_like(), &b).unwrap();
        assert_eq!(
            (p.function.as_str(), p.grid),
            ("paged_attention_bf16", (4, 2, 1))
        );
        let plan = |q: &Tensor, k: &Tensor, bt: &Tensor, lens: &Tensor, bs: i64| {
            let v = k.empty_like();
            let b = PagedBatch {
                q,
                k_cache: k,
                v_cache: &v,
                block_tables: bt,
                context_lens: lens,
                block_size: bs,
                scale: 1.0,
            };
            plan_paged_attention(&q.empty_like(), &b)
                .expect_err("refused")
                .to_string()
        };
        let q3 = Tensor::zeros([2, 3, 64], (Kind::BFloat16, Device::Cpu));
        assert!(plan(&q3, &c.k, &c.tables, &c.lens, 16)
            .contains("2 KV heads, which must divide q's 3 heads"));
        let q48 = Tensor::zeros([2, 4, 48], (Kind::BFloat16, Device::Cpu));
        assert!(plan(&q48, &c.k, &c.tables, &c.lens, 16).contains("head dimension 48"));
        assert!(plan(&c.q, &c.k, &c.tables, &c.lens, 7).contains("block_size is 7"));
        assert!(
            plan(&c.q, &c.k, &c.tables.to_kind(Kind::Int64), &c.lens, 16)
                .contains("block_tables has dtype Int64")
        );
        assert!(plan(&c.q, &c.k, &c.tables.narrow(0, 0, 1), &c.lens, 16)
            .contains("1 rows for 2 sequences"));
        assert!(plan(&c.q, &c.k.to_kind(Kind::Half), &c.tables, &c.lens, 16)
            .contains("k_cache has dtype Half"));
    }
}
