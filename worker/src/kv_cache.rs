//! Contiguous per-sequence KV cache: one preallocated `[batch, kv_heads,
//! capacity, head_dim]` key and value tensor per layer, written in place.

use tch::{Device, Kind, Tensor};

use crate::error::{Result, WorkerError};

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

    /// Marks `n` positions as written (after all layers appended them).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Drops everything past `len` positions (e.g. to reuse a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}
