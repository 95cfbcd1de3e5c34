//! The KV block allocator of one deployed model, with prefix caching.
//!
//! Blocks are numbered `0..num_blocks` and mean the same positions on every
//! stage. A block is *used* while any sequence holds it (reference count),
//! *cached* when it is full and its content is known by hash (the hash of
//! the previous block's hash and this block's token ids, so equal hashes mean
//! equal prefixes), *free* otherwise. A used block that is released keeps its
//! content if cached and becomes evictable; allocation takes never-cached
//! free blocks first, then evicts. A new prompt starts with the longest run
//! of cached full blocks matching its tokens; those blocks are shared, never
//! written (a sequence only writes positions past its hit, in blocks it
//! alone holds).
//!
//! Eviction is a segmented LRU. A cached block that no later prompt has hit
//! since it was cached is *probationary*; one that a prompt hit (a shared
//! system prompt, an earlier chat turn) is *protected*. Probationary blocks
//! are evicted first, least recently released first, then protected ones;
//! when a block is evicted, the protected segment holds at most
//! [`PROTECTED_SHARE`] of the evictable blocks (those no sequence holds;
//! the share is of them, not of the whole cache, so that while running
//! sequences hold much of it, what they computed last still has room in
//! probation until their next turn hits it), beyond which its least
//! recently released blocks move back to probation keeping their release
//! time (and must be hit again to be protected), so prefixes that stopped
//! being used (an earlier workload's) go before newer blocks. Without the
//! segments, what every finished request leaves behind (its own prompt
//! tail and generated blocks, which no other prompt shares) pushes shared
//! prefixes out as soon as the cache is full. A sequence's blocks are
//! released last first, so that among them its tail is evicted before its
//! head (evicting a chain's first block makes every block after it
//! unreachable).

use std::collections::{BTreeMap, HashMap};

use llmos_meta::hash::block_hash;

#[derive(Debug, Clone, Default)]
struct Block {
    refs: u32,
    /// Set while the block's content is registered in the prefix cache.
    cached: Option<CachedKey>,
    /// Tick of the last release (LRU order among evictable blocks).
    released_at: u64,
    /// A prompt hit this block since it was cached (or since it was moved
    /// back to probation): released, it goes to the protected segment, so
    /// an evictable block is in `protected` exactly when this is set.
    hit: bool,
    /// Its keys and values are on the first stage only: a later stage was
    /// replaced since they were computed (see `mark_all_stale`).
    stale: bool,
}

/// Most of the evictable blocks the protected segment may hold when a
/// block is evicted (the share of segmented LRU's usual split).
pub const PROTECTED_SHARE: f64 = 0.8;

#[derive(Debug, Clone)]
struct CachedKey {
    hash: u64,
    parent: u64,
    tokens: Vec<u32>,
}

/// Counters reported in `Stats` and `ClusterStatus`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Prompt tokens looked up (full blocks' worth that could have hit).
    pub queried_tokens: u64,
    /// Prompt tokens served from cached blocks.
    pub hit_tokens: u64,
    /// Cached blocks evicted to make room.
    pub evictions: u64,
}

pub struct BlockManager {
    block_size: usize,
    blocks: Vec<Block>,
    /// Free blocks that hold no cached content.
    free: Vec<u32>,
    /// Released cached blocks no prompt hit, by release tick (oldest first).
    probation: BTreeMap<u64, u32>,
    /// Released cached blocks a prompt hit, by release tick (oldest first).
    protected: BTreeMap<u64, u32>,
    by_hash: HashMap<u64, u32>,
    tick: u64,
    prefix_caching: bool,
    stats: PrefixStats,
}

/// Blocks given to a new prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptBlocks {
    pub blocks: Vec<u32>,
    /// Leading positions already in the cache (a multiple of the block size).
    pub cached_tokens: usize,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        assert!(num_blocks > 0 && block_size > 0);
        BlockManager {
            block_size,
            blocks: vec![Block::default(); num_blocks],
            // Pop from the end: hand out low numbers first.
            free: (0..num_blocks as u32).rev().collect(),
            probation: BTreeMap::new(),
            protected: BTreeMap::new(),
            by_hash: HashMap::new(),
            tick: 0,
            prefix_caching,
            stats: PrefixStats::default(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks held by at least one sequence.
    pub fn used(&self) -> usize {
        self.blocks.len() - self.available()
    }

    /// Blocks an allocation can take (free plus evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.probation.len() + self.protected.len()
    }

    /// Blocks whose content is in the prefix cache.
    pub fn cached(&self) -> usize {
        self.by_hash.len()
    }

    pub fn stats(&self) -> PrefixStats {
        self.stats
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// One block, or `None` when every block is held.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                self.demote_overflow();
                let (_, b) = match self.probation.pop_first() {
                    Some(e) => e,
                    None => self.protected.pop_first()?,
                };
                let key = self.blocks[b as usize]
                    .cached
                    .take()
                    .expect("evictable is cached");
                self.by_hash.remove(&key.hash);
                self.stats.evictions += 1;
                self.blocks[b as usize].hit = false;
                b
            }
        };
        let blk = &mut self.blocks[b as usize];
        blk.refs = 1;
        // Its positions will be computed anew, on every stage.
        blk.stale = false;
        Some(b)
    }

    /// Every block's content is now on the first stage only (the later
    /// stages were replaced): a sequence that reuses a cached block, or
    /// runs on, first has the later stages recompute it (`stale_from`).
    pub fn mark_all_stale(&mut self) {
        for b in &mut self.blocks {
            b.stale = true;
        }
    }

    /// The first position of a sequence (block table `blocks`, `computed`
    /// positions cached) the later stages lost: the start of its first
    /// stale block among those holding computed positions.
    pub fn stale_from(&self, blocks: &[u32], computed: usize) -> Option<usize> {
        let n = self.blocks_for(computed).min(blocks.len());
        blocks[..n]
            .iter()
            .position(|&b| self.blocks[b as usize].stale)
            .map(|i| i * self.block_size)
    }

    /// How many leading blocks of `blocks` (of a sequence with `computed`
    /// positions cached) the prefix cache holds: what a resumed request
    /// will find again.
    pub fn cached_prefix(&self, blocks: &[u32], computed: usize) -> usize {
        let full = (computed / self.block_size).min(blocks.len());
        blocks[..full]
            .iter()
            .take_while(|&&b| self.blocks[b as usize].cached.is_some())
            .count()
    }

    /// Marks blocks as held by every stage (`fresh`) or by the first only.
    pub fn set_stale(&mut self, blocks: &[u32], stale: bool) {
        for &b in blocks {
            self.blocks[b as usize].stale = stale;
        }
    }

    fn take_ref(&mut self, b: u32) {
        let blk = &mut self.blocks[b as usize];
        if blk.refs == 0 {
            let segment = if blk.hit {
                &mut self.protected
            } else {
                &mut self.probation
            };
            segment.remove(&blk.released_at);
        }
        blk.refs += 1;
    }

    /// The hashes of the full blocks a prompt of `tokens` could share (the
    /// block of its last token excluded, as in [`Self::allocate_prompt`]);
    /// empty without prefix caching.
    pub fn prompt_chain(&self, tokens: &[u32]) -> Vec<u64> {
        if !self.prefix_caching || tokens.is_empty() {
            return Vec::new();
        }
        let mut parent = 0u64;
        tokens[..tokens.len() - 1]
            .chunks_exact(self.block_size)
            .map(|chunk| {
                parent = block_hash(parent, chunk);
                parent
            })
            .collect()
    }

    /// How many leading blocks of `chain` (from [`Self::prompt_chain`]) are
    /// cached now.
    pub fn cached_run(&self, chain: &[u64]) -> usize {
        chain
            .iter()
            .take_while(|h| self.by_hash.contains_key(h))
            .count()
    }

    /// Blocks for a prompt of `tokens` that will then grow to `positions`
    /// positions: the longest cached prefix of full blocks (never the block
    /// of the last token, which must be computed), then fresh blocks. `None`
    /// (and nothing taken) when not enough blocks are available.
    pub fn allocate_prompt(&mut self, tokens: &[u32], positions: usize) -> Option<PromptBlocks> {
        let bs = self.block_size;
        let need = self.blocks_for(positions.max(tokens.len()));
        let mut hits = Vec::new();
        if self.prefix_caching {
            let mut parent = 0u64;
            for chunk in tokens[..tokens.len() - 1].chunks_exact(bs) {
                let h = block_hash(parent, chunk);
                let Some(&b) = self.by_hash.get(&h) else {
                    break;
                };
                let key = self.blocks[b as usize]
                    .cached
                    .as_ref()
                    .expect("indexed is cached");
                if key.parent != parent || key.tokens != chunk {
                    break; // a hash collision: treat as a miss
                }
                hits.push(b);
                parent = h;
            }
        }
        // Hit blocks that are evictable stop counting as available once taken.
        let hit_evictable = hits
            .iter()
            .filter(|&&b| self.blocks[b as usize].refs == 0)
            .count();
        if self.available() - hit_evictable < need - hits.len() {
            return None;
        }
        if self.prefix_caching {
            self.stats.queried_tokens += ((tokens.len() - 1) / bs * bs) as u64;
            self.stats.hit_tokens += (hits.len() * bs) as u64;
        }
        for &b in &hits {
            self.take_ref(b);
            self.blocks[b as usize].hit = true;
        }
        let cached_tokens = hits.len() * bs;
        let mut blocks = hits;
        while blocks.len() < need {
            blocks.push(self.allocate().expect("counted above"));
        }
        Some(PromptBlocks {
            blocks,
            cached_tokens,
        })
    }

    /// Registers the full blocks of a sequence whose first `computed`
    /// positions (of `tokens`) are now in the cache, so later prompts can
    /// share them. Blocks already registered are skipped.
    pub fn register_full(&mut self, tokens: &[u32], blocks: &[u32], computed: usize) {
        if !self.prefix_caching {
            return;
        }
        let bs = self.block_size;
        let mut parent = 0u64;
        for (i, chunk) in tokens[..computed.min(tokens.len())]
            .chunks_exact(bs)
            .enumerate()
        {
            let h = block_hash(parent, chunk);
            let b = blocks[i];
            match &self.blocks[b as usize].cached {
                Some(k) if k.hash == h => {}
                Some(_) => break, // holds other content: cannot be this prefix
                None => {
                    if let std::collections::hash_map::Entry::Vacant(e) = self.by_hash.entry(h) {
                        e.insert(b);
                        self.blocks[b as usize].cached = Some(CachedKey {
                            hash: h,
                            parent,
                            tokens: chunk.to_vec(),
                        });
                    }
                }
            }
            parent = h;
        }
    }

    /// Drops one reference to each block of a sequence (given in position
    /// order; released last first, see the module's note on eviction).
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            let blk = &mut self.blocks[b as usize];
            assert!(blk.refs > 0, "block {b} released more often than taken");
            blk.refs -= 1;
            if blk.refs == 0 {
                if blk.cached.is_some() {
                    self.tick += 1;
                    blk.released_at = self.tick;
                    if blk.hit {
                        self.protected.insert(self.tick, b);
                    } else {
                        self.probation.insert(self.tick, b);
                    }
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    /// Before an eviction: moves the protected segment's least recently
    /// released blocks back to probation while it holds more than
    /// [`PROTECTED_SHARE`] of the evictable blocks. They keep their release
    /// time, so they go before blocks released after them.
    fn demote_overflow(&mut self) {
        let evictable = self.probation.len() + self.protected.len();
        let cap = (evictable as f64 * PROTECTED_SHARE) as usize;
        while self.protected.len() > cap {
            let (at, b) = self.protected.pop_first().expect("over the cap");
            self.blocks[b as usize].hit = false;
            self.probation.insert(at, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_release_and_accounting() {
        let mut m = BlockManager::new(4, 2, false);
        let a = m.allocate_prompt(&[1, 2, 3], 4).unwrap();
        assert_eq!(a.blocks.len(), 2);
        assert_eq!(a.cached_tokens, 0);
        assert_eq!((m.used(), m.available()), (2, 2));
        assert!(
            m.allocate_prompt(&[1, 2, 3, 4, 5], 6).is_none(),
            "3 blocks > 2 left"
        );
        assert_eq!(m.used(), 2, "a refused prompt takes nothing");
        let b = m.allocate().unwrap();
        m.release(&a.blocks);
        m.release(&[b]);
        assert_eq!((m.used(), m.available()), (0, 4));
    }

    #[test]
    fn identical_prefixes_share_full_blocks_and_lru_evicts_oldest() {
        let mut m = BlockManager::new(6, 2, true);
        let p1 = [7, 8, 9, 10, 11];
        let a = m.allocate_prompt(&p1, 5).unwrap();
        assert_eq!(a.cached_tokens, 0);
        m.register_full(&p1, &a.blocks, 5);
        // Same first 4 tokens: two full blocks hit, a fresh block for the rest.
        let p2 = [7, 8, 9, 10, 99, 98];
        let b = m.allocate_prompt(&p2, 7).unwrap();
        assert_eq!(b.cached_tokens, 4);
        assert_eq!(&b.blocks[..2], &a.blocks[..2]);
        assert_eq!(m.stats().hit_tokens, 4);
        // A prompt that is exactly two cached blocks recomputes its last block.
        let c = m.allocate_prompt(&[7, 8, 9, 10], 4);
        assert_eq!(c.as_ref().unwrap().cached_tokens, 2);
        m.release(&c.unwrap().blocks);
        m.release(&a.blocks);
        m.release(&b.blocks);
        assert_eq!(m.used(), 0);
        assert_eq!(m.cached(), 2);
        // Content survives release; a later prompt still hits.
        let d = m.allocate_prompt(&p1, 5).unwrap();
        assert_eq!(d.cached_tokens, 4);
        m.release(&d.blocks);
        // Filling every block evicts the cached ones, oldest first.
        let all: Vec<u32> = (0..6).map(|_| m.allocate().unwrap()).collect();
        assert!(m.allocate().is_none());
        assert_eq!(m.cached(), 0);
        assert_eq!(m.stats().evictions, 2);
        m.release(&all);
        assert_eq!(m.used(), 0);
    }

    /// Evictable blocks go least recently released first: with room for
    /// one block fewer than asked, the prefix released earlier is evicted
    /// (its block reused) and the one released later still hits.
    #[test]
    fn eviction_takes_the_least_recently_released_block_first() {
        let mut m = BlockManager::new(4, 2, true);
        let (pa, pb) = ([1, 2, 3], [5, 6, 7]);
        let a = m.allocate_prompt(&pa, 3).unwrap();
        m.register_full(&pa, &a.blocks, 3);
        let b = m.allocate_prompt(&pb, 3).unwrap();
        m.register_full(&pb, &b.blocks, 3);
        // B's prefix released before A's, then A's: A is the newer.
        m.release(&b.blocks);
        m.release(&a.blocks);
        assert_eq!((m.used(), m.cached()), (0, 2));
        // Two never-cached blocks are free; the third allocation evicts.
        let mut taken: Vec<u32> = (0..2).map(|_| m.allocate().unwrap()).collect();
        assert_eq!(m.stats().evictions, 0, "free blocks go before cached ones");
        taken.push(m.allocate().unwrap());
        assert_eq!(m.stats().evictions, 1);
        assert_eq!(
            taken[2], b.blocks[0],
            "the least recently released is evicted"
        );
        m.release(&taken);
        assert_eq!(m.allocate_prompt(&pb, 3).unwrap().cached_tokens, 0);
        let again = m.allocate_prompt(&pa, 3).unwrap();
        assert_eq!(again.cached_tokens, 2, "the newer prefix survived");
    }

    /// A finished sequence's blocks are evicted last first: its head (what
    /// a later prompt can share) outlives its tail.
    #[test]
    fn a_released_sequence_loses_its_tail_before_its_head() {
        let mut m = BlockManager::new(4, 2, true);
        let p = [1, 2, 3, 4, 5, 6, 7];
        let a = m.allocate_prompt(&p, 8).unwrap();
        m.register_full(&p, &a.blocks, 7);
        m.release(&a.blocks);
        assert_eq!(m.cached(), 3);
        // One fresh block (the never-cached fourth), then one eviction.
        let x = m.allocate().unwrap();
        let y = m.allocate().unwrap();
        assert_eq!((x, m.stats().evictions), (a.blocks[3], 1));
        assert_eq!(y, a.blocks[2], "the last cached block goes first");
        m.release(&[x, y]);
        assert_eq!(
            m.allocate_prompt(&[1, 2, 3, 4, 9], 5)
                .unwrap()
                .cached_tokens,
            4,
            "the first two blocks still hit"
        );
    }

    /// Blocks no prompt reused (a request's own tail) are evicted before a
    /// prefix prompts shared, even one released long before them; with a
    /// plain LRU the shared prefix would go first.
    #[test]
    fn shared_prefixes_outlive_blocks_nobody_reused() {
        /// One request: `prefix` then `own` fresh tokens; cached, released;
        /// returns its cached tokens.
        fn request(m: &mut BlockManager, next: &mut u32, prefix: &[u32], own: u32) -> usize {
            let p: Vec<u32> = prefix.iter().copied().chain(*next..*next + own).collect();
            *next += own;
            let a = m.allocate_prompt(&p, p.len()).unwrap();
            m.register_full(&p, &a.blocks, p.len());
            m.release(&a.blocks);
            a.cached_tokens
        }
        let mut m = BlockManager::new(10, 2, true);
        let mut next = 100;
        let system = [1, 2, 3, 4];
        assert_eq!(request(&mut m, &mut next, &system, 5), 0);
        assert_eq!(
            request(&mut m, &mut next, &system, 5),
            4,
            "the second turn hits"
        );
        // Many requests of other users fill the cache with blocks nobody
        // shares.
        for _ in 0..10 {
            request(&mut m, &mut next, &[], 9);
        }
        assert!(m.stats().evictions > 0);
        assert_eq!(
            request(&mut m, &mut next, &system, 5),
            4,
            "the shared prefix survived"
        );
    }

    /// One-token-block prefix `[t, 1000 + t]`, cached and then hit once:
    /// its block ends in the protected segment.
    fn hit_once(m: &mut BlockManager, t: u32) {
        let p = [t, 1000 + t];
        let a = m.allocate_prompt(&p, 2).unwrap();
        m.register_full(&p, &a.blocks, 1);
        m.release(&a.blocks);
        let b = m.allocate_prompt(&p, 2).unwrap();
        assert_eq!(b.cached_tokens, 1);
        m.release(&b.blocks);
    }

    /// The protected segment is capped: prefixes hit once and never again
    /// go back to probation when an eviction needs the room, so a change
    /// of workload is not locked out by old favourites.
    #[test]
    fn the_protected_segment_is_capped_and_demotes_its_oldest() {
        let mut m = BlockManager::new(6, 1, true);
        for t in 0..5u32 {
            hit_once(&mut m, t);
        }
        assert_eq!(m.protected.len(), 5, "every block was hit");
        assert_eq!((m.stats().evictions, m.cached()), (0, 5));
        // The free block, then an eviction: five evictable, at most four
        // protected; the oldest hit prefix (token 0) was moved back and is
        // evicted.
        let x = [m.allocate().unwrap(), m.allocate().unwrap()];
        assert_eq!((m.stats().evictions, m.protected.len()), (1, 4));
        m.release(&x);
        assert_eq!(m.allocate_prompt(&[0, 7], 2).unwrap().cached_tokens, 0);
        assert_eq!(m.allocate_prompt(&[1, 7], 2).unwrap().cached_tokens, 1);
    }

    /// The cap is a share of the evictable blocks, not of the cache: while
    /// running sequences hold most of it, an earlier workload's protected
    /// prefixes still go before the block a conversation computed last
    /// (which its next turn will hit). With the cap a share of the whole
    /// cache (8 of 10 here) that block, the only one in probation, would be
    /// evicted first.
    #[test]
    fn old_protected_prefixes_go_before_newer_blocks_while_the_cache_is_held() {
        let mut m = BlockManager::new(10, 1, true);
        for t in 0..6u32 {
            hit_once(&mut m, t);
        }
        // A conversation's turn leaves its newest block in probation.
        let turn = [50, 51];
        let a = m.allocate_prompt(&turn, 2).unwrap();
        m.register_full(&turn, &a.blocks, 1);
        m.release(&a.blocks);
        // Running sequences take the three free blocks, then two more.
        let held: Vec<u32> = (0..5).map(|_| m.allocate().unwrap()).collect();
        assert_eq!(m.stats().evictions, 2);
        m.release(&held);
        assert_eq!(
            m.allocate_prompt(&[50, 52], 2).unwrap().cached_tokens,
            1,
            "the newest block survived"
        );
        for t in 0..6u32 {
            let a = m.allocate_prompt(&[t, 9], 2).unwrap();
            assert_eq!(
                a.cached_tokens,
                usize::from(t >= 2),
                "prefix {t}: the two oldest went"
            );
            m.release(&a.blocks);
        }
    }

    #[test]
    fn a_different_earlier_block_means_no_hit() {
        let mut m = BlockManager::new(8, 2, true);
        let a = m.allocate_prompt(&[1, 2, 3, 4, 5], 5).unwrap();
        m.register_full(&[1, 2, 3, 4, 5], &a.blocks, 5);
        // Second block equal, first different: the hash chain differs.
        let b = m.allocate_prompt(&[9, 9, 3, 4, 5], 5).unwrap();
        assert_eq!(b.cached_tokens, 0);
    }
}
