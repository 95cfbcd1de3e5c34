//! The paged KV cache of a stage: per layer, one key and one value tensor of
//! `num_blocks * block_size` slots of `[kv_heads, head_dim]`, shared by all
//! sequences. A sequence owns a list of blocks (its block table, decided by
//! the engine's `BlockManager`); position `p` of a sequence lives in slot
//! `blocks[p / block_size] * block_size + p % block_size`. Every stage of a
//! pipeline holds the same number of blocks, so one block table addresses
//! the same positions on all of them.
//!
//! Layout `[slot, kv_head, head_dim]` (token-major): a step writes its new
//! positions with one `index_copy_` per layer, a prompt chunk gathers its
//! context with one `index_select`, and decode rows are read in place by
//! `llmos_kernels::cpu::paged_attention::paged_attention` (the CPU kernel the
//! CUDA paged-attention kernel is tested against).

use tch::{Device, Kind, Tensor};

/// A pool that cannot be made or a step layout that does not fit it.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("{0}")]
    Layout(String),
    #[error(transparent)]
    Request(#[from] llmos_meta::request::RequestError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = KvError> = std::result::Result<T, E>;

/// Shape of a stage's KV pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolShape {
    pub layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl PoolShape {
    /// Bytes one block takes across all layers (keys and values).
    pub fn block_bytes(&self, kind: Kind) -> usize {
        2 * self.layers * self.block_size * self.kv_heads * self.head_dim * kind.elt_size_in_bytes()
    }
}

pub struct KvPool {
    shape: PoolShape,
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
}

impl KvPool {
    pub fn new(shape: PoolShape, kind: Kind, device: Device) -> Result<Self> {
        if shape.block_size == 0 || shape.num_blocks == 0 {
            return Err(KvError::Layout(format!(
                "a KV pool needs at least one block of at least one position, got {} blocks of {}",
                shape.num_blocks, shape.block_size
            )));
        }
        let size = [
            (shape.num_blocks * shape.block_size) as i64,
            shape.kv_heads as i64,
            shape.head_dim as i64,
        ];
        let alloc = || -> Result<Vec<Tensor>> {
            (0..shape.layers)
                .map(|_| Ok(Tensor::f_zeros(size, (kind, device))?))
                .collect()
        };
        Ok(KvPool {
            keys: alloc()?,
            values: alloc()?,
            shape,
        })
    }

    pub fn shape(&self) -> PoolShape {
        self.shape
    }

    pub fn bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }

    /// Keys and values of `layer`, `[slots, kv_heads, head_dim]`.
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.keys[layer], &self.values[layer])
    }

    /// Writes `k`, `v` (`[t, kv_heads, head_dim]`) of `layer` into `slots`
    /// (`[t]` int64).
    pub fn write(&mut self, layer: usize, slots: &Tensor, k: &Tensor, v: &Tensor) {
        let kind = self.keys[layer].kind();
        let _ = self.keys[layer].index_copy_(0, slots, &k.to_kind(kind));
        let _ = self.values[layer].index_copy_(0, slots, &v.to_kind(kind));
    }

    /// Keys and values of `layer` at `slots`, `[t, kv_heads, head_dim]`.
    pub fn gather(&self, layer: usize, slots: &Tensor) -> (Tensor, Tensor) {
        (
            self.keys[layer].index_select(0, slots),
            self.values[layer].index_select(0, slots),
        )
    }

    /// Writes one position from f32 rows `[kv_heads * head_dim]` (the fused
    /// decode step), converting to the pool's dtype.
    pub fn write_slot(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let row = self.shape.kv_heads * self.shape.head_dim;
        assert!(slot < self.shape.num_blocks * self.shape.block_size);
        assert!(k.len() == row && v.len() == row);
        for (t, src) in [(&self.keys[layer], k), (&self.values[layer], v)] {
            assert!(t.device() == Device::Cpu);
            // SAFETY: pool tensors are contiguous CPU tensors owned by `self`
            // (borrowed mutably); `slot * row + row` is within their extent.
            unsafe { store_row(t, slot * row, src) };
        }
    }
}

/// One sequence's part of a batched step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSlice {
    /// Positions already in the cache (where this step's tokens start).
    pub position: usize,
    /// Tokens this step adds (at least one).
    pub tokens: usize,
    /// Block table, covering at least `position + tokens` positions.
    pub blocks: Vec<u32>,
}

impl SeqSlice {
    pub fn len_after(&self) -> usize {
        self.position + self.tokens
    }
}

/// Slot of position `pos` of a sequence with block table `blocks`.
pub fn slot(blocks: &[u32], block_size: usize, pos: usize) -> usize {
    blocks[pos / block_size] as usize * block_size + pos % block_size
}

/// A batched step: sequences in order, their tokens packed one after another.
#[derive(Debug, Clone)]
pub struct BatchLayout {
    pub seqs: Vec<SeqSlice>,
    pub block_size: usize,
}

impl BatchLayout {
    /// Checks the layout against a pool and a context limit: every block
    /// table covers its positions with blocks that exist.
    pub fn validate(&self, shape: &PoolShape, max_position: usize) -> Result<()> {
        if self.block_size != shape.block_size {
            return Err(KvError::Layout(format!(
                "block size {} does not match the pool's {}",
                self.block_size, shape.block_size
            )));
        }
        if self.seqs.is_empty() {
            return Err(KvError::Layout("a step without sequences".into()));
        }
        for (i, s) in self.seqs.iter().enumerate() {
            if s.tokens == 0 {
                return Err(KvError::Layout(format!(
                    "sequence {i} of the step adds no tokens"
                )));
            }
            llmos_meta::request::check_context(s.len_after(), max_position, || {
                format!("sequence {i} of the step")
            })?;
            let need = s.len_after().div_ceil(self.block_size);
            if s.blocks.len() < need {
                return Err(KvError::Layout(format!(
                    "sequence {i} reaches position {} but its block table has {} blocks of {}",
                    s.len_after(),
                    s.blocks.len(),
                    self.block_size
                )));
            }
            if let Some(b) = s.blocks.iter().find(|&&b| b as usize >= shape.num_blocks) {
                return Err(KvError::Layout(format!(
                    "sequence {i} names block {b}; the pool has {} blocks",
                    shape.num_blocks
                )));
            }
        }
        Ok(())
    }

    pub fn total_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens).sum()
    }

    /// Position of every packed token.
    pub fn positions(&self) -> Vec<i64> {
        self.seqs
            .iter()
            .flat_map(|s| (s.position..s.len_after()).map(|p| p as i64))
            .collect()
    }

    /// Cache slot of every packed token.
    pub fn slots(&self) -> Vec<i64> {
        self.seqs
            .iter()
            .flat_map(|s| {
                (s.position..s.len_after()).map(|p| slot(&s.blocks, self.block_size, p) as i64)
            })
            .collect()
    }

    /// Slots of positions `0..len` of sequence `i`.
    pub fn context_slots(&self, i: usize, len: usize) -> Vec<i64> {
        let s = &self.seqs[i];
        (0..len)
            .map(|p| slot(&s.blocks, self.block_size, p) as i64)
            .collect()
    }

    /// Packed row of each sequence's first token.
    pub fn offsets(&self) -> Vec<usize> {
        let mut at = 0;
        self.seqs
            .iter()
            .map(|s| {
                let o = at;
                at += s.tokens;
                o
            })
            .collect()
    }

    /// Packed row of each sequence's last token.
    pub fn last_rows(&self) -> Vec<i64> {
        let mut at = 0i64;
        self.seqs
            .iter()
            .map(|s| {
                at += s.tokens as i64;
                at - 1
            })
            .collect()
    }
}

/// Writes f32 `src` at element `off` of a contiguous CPU f32, bf16 or f16 tensor,
/// converting to its dtype.
///
/// # Safety
/// `t` is contiguous on the CPU, `off + src.len()` is within it, and no
/// other reference reads or writes those elements meanwhile.
pub(crate) unsafe fn store_row(t: &Tensor, off: usize, src: &[f32]) {
    match t.kind() {
        Kind::Float => {
            let dst = (t.data_ptr() as *mut f32).add(off);
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len());
        }
        Kind::BFloat16 => {
            let dst = (t.data_ptr() as *mut u16).add(off);
            for (i, x) in src.iter().enumerate() {
                *dst.add(i) = llmos_kernels::cpu::vecmath::f32_to_bf16(*x);
            }
        }
        Kind::Half => {
            let dst = (t.data_ptr() as *mut half::f16).add(off);
            for (i, x) in src.iter().enumerate() {
                *dst.add(i) = half::f16::from_f32(*x);
            }
        }
        other => panic!("store_row into a {other:?} tensor"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_maps_positions_to_slots_and_refuses_short_tables() {
        let layout = BatchLayout {
            seqs: vec![
                SeqSlice {
                    position: 3,
                    tokens: 3,
                    blocks: vec![9, 4],
                },
                SeqSlice {
                    position: 0,
                    tokens: 1,
                    blocks: vec![1],
                },
            ],
            block_size: 4,
        };
        assert_eq!(layout.positions(), vec![3, 4, 5, 0]);
        assert_eq!(layout.slots(), vec![39, 16, 17, 4]);
        assert_eq!(layout.last_rows(), vec![2, 3]);
        assert_eq!(layout.offsets(), vec![0, 3]);
        let shape = PoolShape {
            layers: 1,
            num_blocks: 10,
            block_size: 4,
            kv_heads: 1,
            head_dim: 2,
        };
        layout.validate(&shape, 100).unwrap();
        let mut short = layout.clone();
        short.seqs[0].blocks.pop();
        let e = short.validate(&shape, 100).unwrap_err().to_string();
        assert!(e.contains("block table has 1 blocks"), "{e}");
        let mut outside = layout.clone();
        outside.seqs[1].blocks = vec![10];
        let e = outside.validate(&shape, 100).unwrap_err().to_string();
        assert!(e.contains("block 10") && e.contains("10 blocks"), "{e}");
        let e = layout.validate(&shape, 5).unwrap_err().to_string();
        assert!(e.contains("context length"), "{e}");
    }
}
