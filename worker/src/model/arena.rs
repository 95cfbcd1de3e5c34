//! A CPU model's linear weights moved into one anonymous mapping, back to
//! back in the order a decode step reads them, 2 MiB-aligned and advised for
//! transparent huge pages.
//!
//! Single-sequence decode streams every weight once per token, so how fast
//! memory delivers them bounds it. Left where loading put them, the weights
//! are hundreds of separate allocations scattered over memory that loading
//! also used for temporaries, read through 4 KiB pages. Measured on this
//! project's 2-core machine with SmolLM2's bf16 weights, products of one
//! token over the same weights interleaved in one process: median 11.6 ms
//! scattered, 10.9 ms copied into one 4 KiB-page mapping in read order,
//! 10.3-10.9 ms with huge pages. End to end (bf16 decode after a 512-token
//! prompt, alternating runs): 83.2 and 76.4 tok/s before, 90.0 and 85.4
//! after. Each weight is copied and its original released one at a time,
//! so loading peaks at most one weight (the tied embedding) above the
//! weights' size.

use std::sync::Arc;

use tch::{Device, Tensor};

/// Alignment of each weight in the arena (a cache line).
const ALIGN: usize = 64;
/// A transparent huge page.
const HUGE_PAGE: usize = 2 << 20;

/// One anonymous mapping the weights of a model live in; tensors over it
/// (`Tensor::from_blob`) do not own it, so it must outlive them: the model
/// that holds those tensors holds the arena.
pub struct WeightArena {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; the tensors over it are what is
// shared, and libtorch tensors are shared across threads as any others.
unsafe impl Send for WeightArena {}
unsafe impl Sync for WeightArena {}

impl WeightArena {
    /// A zero-filled mapping of at least `bytes`, starting on a huge-page
    /// boundary and advised for huge pages (advice the kernel may ignore).
    fn map(bytes: usize) -> std::io::Result<Self> {
        let len = bytes.max(1).next_multiple_of(HUGE_PAGE);
        // SAFETY: a fresh private anonymous mapping; the slack before the
        // aligned start and after its end is unmapped again.
        unsafe {
            let raw = libc::mmap(
                std::ptr::null_mut(),
                len + HUGE_PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if raw == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            let raw = raw as usize;
            let start = raw.next_multiple_of(HUGE_PAGE);
            if start > raw {
                libc::munmap(raw as *mut _, start - raw);
            }
            let end = raw + len + HUGE_PAGE;
            if end > start + len {
                libc::munmap((start + len) as *mut _, end - start - len);
            }
            #[cfg(target_os = "linux")]
            libc::madvise(start as *mut _, len, libc::MADV_HUGEPAGE);
            Ok(WeightArena {
                base: start as *mut u8,
                len,
            })
        }
    }

    /// Bytes mapped.
    #[cfg(test)]
    pub fn mapped_bytes(&self) -> usize {
        self.len
    }

    /// Whether `t`'s data lies in this arena.
    #[cfg(test)]
    pub fn holds(&self, t: &Tensor) -> bool {
        let p = t.data_ptr() as usize;
        p >= self.base as usize && p < self.base as usize + self.len
    }

    /// Moves each tensor in `tensors` (contiguous, on the CPU) into one new
    /// arena in the order given, replacing it with a tensor over its copy;
    /// each old tensor's memory is released as soon as it is replaced
    /// (unless something else holds it), so the peak grows by one tensor.
    /// The caller keeps the arena alive as long as the new tensors.
    pub fn place(tensors: Vec<&mut Tensor>) -> std::io::Result<Arc<WeightArena>> {
        let size = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let total = tensors
            .iter()
            .map(|t| size(t).next_multiple_of(ALIGN))
            .sum();
        let arena = WeightArena::map(total)?;
        let mut offset = 0;
        for t in tensors {
            assert!(
                t.device() == Device::Cpu && t.is_contiguous(),
                "the weight arena holds contiguous CPU tensors"
            );
            let bytes = size(t);
            // SAFETY: `offset + bytes <= total <= len` (sizes summed above);
            // the source is a contiguous tensor of `bytes` bytes; the new
            // tensor covers exactly the copy, which the arena outlives (the
            // caller's contract).
            *t = unsafe {
                let dst = arena.base.add(offset);
                std::ptr::copy_nonoverlapping(t.data_ptr() as *const u8, dst, bytes);
                Tensor::from_blob(dst, &t.size(), &t.stride(), t.kind(), Device::Cpu)
            };
            offset += bytes.next_multiple_of(ALIGN);
            // Hand the old copy's pages back to the system now: most weights
            // sit below glibc's mmap threshold, in heap memory it would keep
            // (measured: +150-200 MB peak resident memory for SmolLM2).
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: plain libc call.
            unsafe {
                libc::malloc_trim(0);
            }
        }
        Ok(Arc::new(arena))
    }
}

impl Drop for WeightArena {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base as *mut _, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// Placed tensors keep their values, shapes and dtypes, live in the
    /// arena at cache-line-aligned addresses in the order given, and compute
    /// as before.
    #[test]
    fn placed_tensors_keep_their_values_in_order() {
        let mut a = Tensor::randn([96, 40], (Kind::Float, Device::Cpu));
        let mut b = Tensor::randn([7, 13], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let mut c = Tensor::randn([3000, 700], (Kind::Float, Device::Cpu));
        let (a0, b0, c0) = (a.copy(), b.copy(), c.copy());
        let x = Tensor::randn([2, 40], (Kind::Float, Device::Cpu));
        let y0 = x.linear::<Tensor>(&a, None);
        let arena = WeightArena::place(vec![&mut a, &mut b, &mut c]).unwrap();
        assert!(arena.mapped_bytes() >= (96 * 40 + 3000 * 700) * 4 + 7 * 13 * 2);
        assert_eq!(arena.mapped_bytes() % HUGE_PAGE, 0);
        for (t, t0) in [(&a, &a0), (&b, &b0), (&c, &c0)] {
            assert!(arena.holds(t));
            assert_eq!(t.data_ptr() as usize % ALIGN, 0);
            assert_eq!((t.size(), t.kind()), (t0.size(), t0.kind()));
            assert!(t.equal(t0));
        }
        let addr = |t: &Tensor| t.data_ptr() as usize;
        assert!(addr(&a) < addr(&b) && addr(&b) < addr(&c));
        assert!(!arena.holds(&a0));
        assert!(x.linear::<Tensor>(&a, None).equal(&y0));
    }

    /// A model loaded on CPU reads every layer weight and its head from one
    /// arena, and a tied embedding shares the head's copy (not a second
    /// one); int8-quantized layers too.
    #[test]
    fn a_cpu_model_reads_its_weights_from_the_arena() {
        use crate::model::linear::Quantization;
        use crate::model::llama::LoadOptions;
        use crate::model::{Llama, ShardSpec};
        for (tie, quantization) in [(true, Quantization::None), (false, Quantization::Int8)] {
            let mut cfg = llmos_meta::ModelConfig::preset("tiny").unwrap();
            cfg.tie_embeddings = tie;
            let opts = LoadOptions {
                kind: Kind::BFloat16,
                quantization,
                ..Default::default()
            };
            let m = Llama::load(None, &cfg, ShardSpec::full(&cfg), &opts, &mut |_, _| {}).unwrap();
            let arena = m.weight_arena.as_ref().expect("an arena on CPU");
            for b in &m.blocks {
                for l in [
                    &b.attn.qkv.linear,
                    &b.attn.o.linear,
                    &b.mlp.gate_up.linear,
                    &b.mlp.down.linear,
                ] {
                    assert!(arena.holds(l.stored_weight()));
                }
            }
            let head = m.head.as_ref().unwrap().dense_weight().unwrap();
            assert!(arena.holds(head));
            let embed = m.embed.as_ref().unwrap();
            assert_eq!(embed.data_ptr() == head.data_ptr(), tie);
        }
    }
}
