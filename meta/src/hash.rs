//! The one stable hash of the project: 64-bit FNV-1a (stable across
//! processes, runs and platforms, unlike `DefaultHasher`). It names prefix
//! cache blocks (`block_hash`, which a router must compute the same way as
//! the engine), derives default seeds from request ids, and keys the CUDA
//! kernel cache.

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0100_0000_01b3;

/// An FNV-1a hasher fed bytes in pieces.
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(OFFSET)
    }
}

impl Fnv1a {
    pub fn new() -> Self {
        Self::default()
    }

    #[inline]
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(PRIME);
        }
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// FNV-1a of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = Fnv1a::new();
    h.write(bytes);
    h.finish()
}

/// The prefix cache's name for a full block of `tokens` after the block
/// named `parent` (0 for the first): FNV-1a over the parent's hash and the
/// ids, little-endian.
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = Fnv1a::new();
    h.write(&parent.to_le_bytes());
    for t in tokens {
        h.write(&t.to_le_bytes());
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published FNV-1a 64 test vectors, and a block hash that depends
    /// on its parent and on every id.
    #[test]
    fn matches_the_reference_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        let b = block_hash(0, &[1, 2, 3]);
        assert_ne!(b, block_hash(1, &[1, 2, 3]));
        assert_ne!(b, block_hash(0, &[1, 2, 4]));
        let mut h = Fnv1a::new();
        h.write(&0u64.to_le_bytes());
        h.write(&[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(h.finish(), b);
    }
}
