//! Contiguous per-sequence KV cache: one preallocated `[batch, kv_heads,
//! capacity, head_dim]` key and value tensor per layer, written in place.

use tch::{Device, Kind, Tensor};

use crate::error::{Result, WorkerError};

/// Round-to-nearest-even f32 to bfloat16 bits (as libtorch converts).
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// Writes f32 `src` at element `off` of a contiguous CPU f32 or bf16 tensor,
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
                *dst.add(i) = f32_to_bf16(*x);
            }
        }
        other => panic!("store_row into a {other:?} tensor"),
    }
}

pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// A cache for `layers` layers holding up to `capacity` positions.
    pub fn new(
        layers: usize,
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        kind: Kind,
        device: Device,
    ) -> Self {
        let shape = [
            batch as i64,
            kv_heads as i64,
            capacity as i64,
            head_dim as i64,
        ];
        let alloc = || {
            (0..layers)
                .map(|_| Tensor::zeros(shape, (kind, device)))
                .collect()
        };
        KvCache {
            keys: alloc(),
            values: alloc(),
            len: 0,
            capacity,
        }
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Checks that `n` more positions fit.
    pub fn reserve(&self, n: usize) -> Result<()> {
        if self.len + n > self.capacity {
            return Err(WorkerError::LimitExceeded {
                what: "KV cache".into(),
                limit_name: "capacity in positions",
                limit: self.capacity,
                got: self.len + n,
            });
        }
        Ok(())
    }

    /// Writes `k`, `v` (`[batch, kv_heads, t, head_dim]`) for `layer` at the
    /// current length and returns views of all cached keys and values.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let t = k.size()[2];
        let start = self.len as i64;
        self.keys[layer].narrow(2, start, t).copy_(k);
        self.values[layer].narrow(2, start, t).copy_(v);
        let end = start + t;
        (
            self.keys[layer].narrow(2, 0, end),
            self.values[layer].narrow(2, 0, end),
        )
    }

    /// Makes room for `n` more positions, reallocating (at least doubling,
    /// at most `max` positions) and copying what is cached.
    pub fn grow_for(&mut self, n: usize, max: usize) -> Result<()> {
        let needed = self.len + n;
        if needed <= self.capacity {
            return Ok(());
        }
        if needed > max {
            return Err(WorkerError::LimitExceeded {
                what: "sequence".into(),
                limit_name: "the model's context length",
                limit: max,
                got: needed,
            });
        }
        let cap = needed.max(self.capacity * 2).min(max);
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let mut size = t.size();
            size[2] = cap as i64;
            let bigger = Tensor::zeros(size.as_slice(), (t.kind(), t.device()));
            bigger
                .narrow(2, 0, self.len as i64)
                .copy_(&t.narrow(2, 0, self.len as i64));
            *t = bigger;
        }
        self.capacity = cap;
        Ok(())
    }

    /// Bytes held by the cache tensors.
    pub fn bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }

    /// The whole key and value tensors of `layer` (`[batch, kv_heads,
    /// capacity, head_dim]`).
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.keys[layer], &self.values[layer])
    }

    /// Writes one position of sequence 0 for `layer` from f32 rows laid out
    /// `[kv_heads, head_dim]`, converting to the cache's dtype (f32 or bf16).
    pub fn write_position(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (_, heads, cap, d) = self.keys[layer].size4().expect("cache is 4-D");
        let (heads, cap, d) = (heads as usize, cap as usize, d as usize);
        assert!(pos < cap && k.len() == heads * d && v.len() == heads * d);
        for (t, src) in [(&self.keys[layer], k), (&self.values[layer], v)] {
            for h in 0..heads {
                // SAFETY: the cache tensors are contiguous CPU tensors owned
                // by `self` (borrowed mutably); `off + d` is within
                // `heads * cap * d`.
                unsafe { store_row(t, h * cap * d + pos * d, &src[h * d..(h + 1) * d]) };
            }
        }
    }

    /// Marks `n` positions as written (after all layers appended them).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
