//! Rotary position embedding applied in place to q and k (`cuda/rotary.cu`),
//! replacing libtorch's narrow, mul, roll, addcmul chain per tensor.
//!
//! Layout: Hugging Face's rotate-half (element `j` pairs with `j + d/2`).
//! q `[tokens, heads, d]` and k `[tokens, kv_heads, d]` may be views into the
//! fused qkv projection (token and head strides are passed; the last
//! dimension must be contiguous). The angle table is [`cos_sin_table`], so
//! the model's rope scaling lives in its inverse frequencies alone.

use tch::{Device, Kind, Tensor};

use crate::cuda::check::{self, ptr, FLOATS};
use crate::cuda::runtime::{Arg, Kernels, Launch};
use crate::cuda::Module;
use crate::Result;

/// `[max_position, d]` f32: `cos(p * inv_freq)` then `sin(p * inv_freq)`.
pub fn cos_sin_table(inv_freq: &[f32], max_position: i64, device: Device) -> Tensor {
    let inv = Tensor::from_slice(inv_freq);
    let angles = Tensor::arange(max_position, (Kind::Float, Device::Cpu)).outer(&inv);
    Tensor::cat(&[angles.cos(), angles.sin()], -1).to_device(device)
}

pub fn plan_rotary(q: &Tensor, k: &Tensor, positions: &Tensor, cos_sin: &Tensor) -> Result<Launch> {
    const OP: &str = "rotary";
    let kind = check::kind(OP, "q", q, &FLOATS)?;
    let qs = check::dims(OP, "q", q, 3)?;
    let qst = check::rows(OP, "q", q)?;
    check::same_kind(OP, "k", k, kind)?;
    let ks = check::dims(OP, "k", k, 3)?;
    let kst = check::rows(OP, "k", k)?;
    let (tokens, heads, d) = (qs[0], qs[1], qs[2]);
    if ks[0] != tokens || ks[2] != d {
        return Err(crate::KernelError::Invalid {
            op: OP,
            arg: "k",
            problem: format!("has shape {ks:?}: expected [{tokens}, kv_heads, {d}] like q {qs:?}"),
        });
    }
    if d % 2 != 0 {
        return Err(crate::KernelError::Invalid {
            op: OP,
            arg: "q",
            problem: format!("has head dimension {d}: rotary pairs need an even one"),
        });
    }
    check::kind(OP, "positions", positions, &[Kind::Int64])?;
    check::shape(OP, "positions", positions, &[tokens])?;
    check::contiguous(OP, "positions", positions)?;
    check::kind(OP, "cos_sin", cos_sin, &[Kind::Float])?;
    let table = check::dims(OP, "cos_sin", cos_sin, 2)?;
    check::shape(OP, "cos_sin", cos_sin, &[table[0], d])?;
    check::contiguous(OP, "cos_sin", cos_sin)?;
    check::fits(OP, "tokens", tokens, i32::MAX as i64)?;
    Ok(Launch {
        op: OP,
        module: Module::Rotary,
        function: format!("rotary_{}", check::suffix(kind)),
        grid: (tokens as u32, 1, 1),
        block: (check::threads((heads + ks[1]) * d / 2, 1024), 1, 1),
        args: vec![
            ptr(q),
            Arg::I64(qst[0]),
            Arg::I64(qst[1]),
            Arg::I32(heads as i32),
            ptr(k),
            Arg::I64(kst[0]),
            Arg::I64(kst[1]),
            Arg::I32(ks[1] as i32),
            Arg::I32(d as i32),
            ptr(positions),
            ptr(cos_sin),
            Arg::I64(table[0]),
        ],
        tensors: vec![
            ("q", q.device()),
            ("k", k.device()),
            ("positions", positions.device()),
            ("cos_sin", cos_sin.device()),
        ],
    })
}

impl Kernels {
    /// Rotates q and k in place for their tokens' positions.
    pub fn rotary(
        &self,
        q: &mut Tensor,
        k: &mut Tensor,
        positions: &Tensor,
        cos_sin: &Tensor,
    ) -> Result<()> {
        self.launch(&plan_rotary(q, k, positions, cos_sin)?)
    }
}

/// The CPU kernel (`cpu::elementwise::rope_in_place`) over tensors: f32
/// arithmetic, one rounding to the storage dtype.
pub mod reference {
    use super::*;
    use crate::cpu::elementwise::rope_in_place;
    use crate::cuda::check::{round, tensor, values};

    fn rotate(x: &Tensor, positions: &[i64], table: &[f32], d: usize) -> Tensor {
        let kind = x.kind();
        let size = x.size();
        let mut v = values(x);
        let half = d / 2;
        let per_token = (size[1] as usize) * d;
        for (t, &p) in positions.iter().enumerate() {
            // A table row is `[cos; sin]` of the position's angles.
            let (cos, sin) = table[p as usize * d..(p as usize + 1) * d].split_at(half);
            rope_in_place(&mut v[t * per_token..(t + 1) * per_token], d, cos, sin);
        }
        tensor(&round(kind, &v), &size, kind)
    }

    /// Returns the rotated `(q, k)`. Positions must be inside the table.
    pub fn rotary(
        q: &Tensor,
        k: &Tensor,
        positions: &Tensor,
        cos_sin: &Tensor,
    ) -> (Tensor, Tensor) {
        let d = q.size()[2] as usize;
        let pos = Vec::<i64>::try_from(positions.to_device(Device::Cpu)).expect("positions");
        let table = values(cos_sin);
        assert!(pos
            .iter()
            .all(|&p| p >= 0 && (p as usize + 1) * d <= table.len()));
        (rotate(q, &pos, &table, d), rotate(k, &pos, &table, d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference equals the rotate-half chain Hugging Face runs
    /// (`q * cos + rotate_half(q) * sin`), at ragged positions, GQA.
    #[test]
    fn reference_matches_the_libtorch_chain() {
        tch::manual_seed(2);
        let d = 64i64;
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 10000f32.powf(-2.0 * i as f32 / d as f32))
            .collect();
        let table = cos_sin_table(&inv, 4096, Device::Cpu);
        let positions = Tensor::from_slice(&[0i64, 1, 7, 300, 4095]);
        for kind in [Kind::Float, Kind::BFloat16] {
            let q = Tensor::randn([5, 6, d], (Kind::Float, Device::Cpu)).to_kind(kind);
            let k = Tensor::randn([5, 2, d], (Kind::Float, Device::Cpu)).to_kind(kind);
            let (rq, rk) = reference::rotary(&q, &k, &positions, &table);
            let rope = |x: &Tensor| {
                let x = x.to_kind(Kind::Float);
                let cs = table.index_select(0, &positions).unsqueeze(1);
                let (cos, sin) = (cs.narrow(2, 0, d / 2), cs.narrow(2, d / 2, d / 2));
                let (cos, sin) = (
                    Tensor::cat(&[&cos, &cos], -1),
                    Tensor::cat(&[&sin, &sin], -1),
                );
                let (x1, x2) = (x.narrow(2, 0, d / 2), x.narrow(2, d / 2, d / 2));
                let rot = Tensor::cat(&[-x2, x1], -1);
                &x * cos + rot * sin
            };
            let tol = if kind == Kind::Float { 1e-5 } else { 2e-2 };
            for (got, x) in [(rq, &q), (rk, &k)] {
                assert_eq!(got.kind(), kind);
                let diff = (got.to_kind(Kind::Float) - rope(x))
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(diff < tol, "{kind:?}: {diff}");
            }
            // Position 0 is the identity.
            let (r0, _) = reference::rotary(
                &q.narrow(0, 0, 1),
                &k.narrow(0, 0, 1),
                &positions.narrow(0, 0, 1),
                &table,
            );
            assert!(r0.equal(&q.narrow(0, 0, 1)));
        }
    }

    #[test]
    fn plans_check_layout() {
        let dev = Device::Cpu;
        let qkv = Tensor::zeros([3, (4 + 2 * 2) * 64], (Kind::BFloat16, dev));
        let q = qkv.narrow(1, 0, 4 * 64).view([3, 4, 64]);
        let k = qkv.narrow(1, 4 * 64, 2 * 64).view([3, 2, 64]);
        let pos = Tensor::from_slice(&[0i64, 1, 2]);
        let table = cos_sin_table(&[1.0; 32], 16, dev);
        let p = plan_rotary(&q, &k, &pos, &table).unwrap();
        // Views into the fused projection: the token stride is the qkv row.
        assert_eq!(&p.args[1..3], &[Arg::I64(512), Arg::I64(64)]);
        assert_eq!(p.args[5], Arg::I64(512));
        assert_eq!(p.block.0, (4 + 2) * 32);
        let err = |r: Result<Launch>| r.expect_err("refused").to_string();
        assert!(err(plan_rotary(&q, &k.to_kind(Kind::Float), &pos, &table))
            .contains("k has dtype Float"));
        assert!(err(plan_rotary(&q, &k, &pos.to_kind(Kind::Int), &table))
            .contains("positions has dtype Int"));
        assert!(err(plan_rotary(&q, &k, &pos.narrow(0, 0, 2), &table))
            .contains("positions has shape [2], expected [3]"));
        assert!(err(plan_rotary(&q, &k.narrow(0, 0, 2), &pos, &table))
            .contains("expected [3, kv_heads, 64]"));
        assert!(err(plan_rotary(&q, &k, &pos, &table.narrow(1, 0, 32)))
            .contains("cos_sin has shape [16, 32], expected [16, 64]"));
        assert!(err(plan_rotary(&q.transpose(1, 2), &k, &pos, &table))
            .contains("last dimension must be contiguous"));
    }
}
