//! The router: which replica of a model serves a request. Per coordinator
//! replica, in memory (no Raft write per request). Each replica (named by
//! its placement epoch, unique in the cluster) has:
//!
//! - **load**: the larger of the requests this coordinator routed there and
//!   has not seen finish (`in_flight`), and the engine's own last report of
//!   running + waiting sequences (heartbeats; a report older than
//!   `REPORT_FRESH` is ignored). The report counts other coordinators'
//!   requests too; the in-flight count is current between reports.
//! - **prefix memory**: the hashes of the prompt blocks recently routed
//!   there (the engine's block size and `llmos_meta::hash::block_hash`, so
//!   they name the blocks its prefix cache holds), at most `PREFIX_MEMORY`
//!   per replica, oldest forgotten first.
//!
//! The rule: take the replica holding the longest cached prefix of the
//! prompt (in whole blocks), unless its load exceeds twice the least
//! loaded replica's plus `SLACK` sequences plus one for every
//! `HELD_BLOCKS_PER_SEQ` blocks of the prompt it holds, at most
//! `MAX_HELD_MARGIN` ("much busier": sending a request elsewhere
//! recomputes what it holds, and caches it a second time, so the more it
//! holds the busier it may be, within a bound so that a long conversation
//! does not queue behind a full replica); then, and when
//! no replica holds any of the prefix, the least loaded (ties: more free
//! KV blocks, then fewer requests routed so far). When several replicas
//! hold the longest prefix and it covers at least three quarters of the
//! prompt's blocks, they are tried in an order fixed per prefix
//! (rendezvous hashing on its first block), so a group that spilled onto a
//! second replica in a busy spell gathers on one again; when it covers
//! less (a system prompt shared by many conversations, each continuing
//! with its own turns), the least loaded of them first, so those
//! conversations spread over the replicas instead of herding onto one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Block hashes remembered per replica.
const PREFIX_MEMORY: usize = 8192;
/// Sequences a prefix-holding replica may carry beyond twice the least
/// loaded replica's load and still be preferred.
pub const SLACK: u32 = 2;
/// Blocks of the prompt a replica holds for each further sequence it may
/// carry and still be preferred.
pub const HELD_BLOCKS_PER_SEQ: usize = 2;
/// Most sequences the held blocks add to the margin.
pub const MAX_HELD_MARGIN: usize = 8;
/// The share of a prompt's blocks (numerator, denominator) a prefix held
/// by several replicas must cover for its requests to gather on one of
/// them (below it they go to the least loaded holder).
const GATHER: (usize, usize) = (3, 4);
/// A load report older than this is not used for routing.
const REPORT_FRESH: Duration = Duration::from_secs(10);

/// An engine's report (from the heartbeat of the worker running it).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineLoad {
    pub running: u32,
    pub waiting: u32,
    pub kv_blocks_free: u32,
    /// Prompt tokens the engine's prefix cache served, of those it looked
    /// up, since it started.
    pub prefix_hit_tokens: u64,
    pub prefix_queried_tokens: u64,
}

#[derive(Default)]
struct Entry {
    /// The last report, with when it arrived here and (wall clock, ms)
    /// for drain decisions compared with replicated timestamps.
    report: Option<(Instant, u64, EngineLoad)>,
    in_flight: u32,
    prefixes: HashSet<u64>,
    order: VecDeque<u64>,
    routed: u64,
    routed_for_prefix: u64,
}

impl Entry {
    fn load(&self, now: Instant) -> u32 {
        let reported = self
            .report
            .filter(|(at, _, _)| now.duration_since(*at) < REPORT_FRESH)
            .map_or(0, |(_, _, l)| l.running + l.waiting);
        self.in_flight.max(reported)
    }

    fn remember(&mut self, hashes: &[u64]) {
        for &h in hashes {
            if self.prefixes.insert(h) {
                self.order.push_back(h);
            }
        }
        while self.order.len() > PREFIX_MEMORY {
            if let Some(old) = self.order.pop_front() {
                self.prefixes.remove(&old);
            }
        }
    }

    /// Leading blocks of the prompt routed here lately.
    fn matched(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.prefixes.contains(h))
            .count()
    }
}

type Key = (String, u64);

/// What the router knows of one replica (for status).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplicaLoad {
    pub reported: Option<EngineLoad>,
    pub in_flight: u32,
    pub routed: u64,
    pub routed_for_prefix: u64,
}

/// A routing decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub epoch: u64,
    /// Leading prompt blocks this replica was sent lately.
    pub matched_blocks: usize,
}

#[derive(Default)]
pub struct Router {
    inner: Mutex<HashMap<Key, Entry>>,
    turn: Mutex<usize>,
}

/// A request routed to a replica: counted in flight until dropped.
pub struct InFlight {
    router: Arc<Router>,
    key: Key,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut g = self.router.lock();
        if let Some(e) = g.get_mut(&self.key) {
            e.in_flight = e.in_flight.saturating_sub(1);
        }
    }
}

/// The hashes of a prompt's whole blocks, as the engine names them.
pub fn block_hashes(prompt: &[u32], block_size: usize) -> Vec<u64> {
    let mut parent = 0;
    prompt
        .chunks_exact(block_size.max(1))
        .map(|chunk| {
            parent = llmos_meta::hash::block_hash(parent, chunk);
            parent
        })
        .collect()
}

impl Router {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An engine's load report.
    pub fn report(&self, model: &str, epoch: u64, load: EngineLoad, at_ms: u64) {
        self.lock()
            .entry((model.to_string(), epoch))
            .or_default()
            .report = Some((Instant::now(), at_ms, load));
    }

    /// Picks one of `epochs` (the model's serving replicas, less those the
    /// caller excluded) for a prompt with `hashes`, by the rule above or
    /// (`round_robin`) in turn; None when `epochs` is empty.
    pub fn choose(
        &self,
        model: &str,
        epochs: &[u64],
        hashes: &[u64],
        round_robin: bool,
    ) -> Option<Choice> {
        if epochs.is_empty() {
            return None;
        }
        let mut g = self.lock();
        let now = Instant::now();
        if round_robin {
            let mut t = self.turn.lock().unwrap_or_else(|e| e.into_inner());
            *t += 1;
            let epoch = epochs[*t % epochs.len()];
            let matched = g
                .get(&(model.to_string(), epoch))
                .map_or(0, |e| e.matched(hashes));
            return Some(Choice {
                epoch,
                matched_blocks: matched,
            });
        }
        let mut seen: Vec<(u64, u32, u32, u64, usize)> = epochs
            .iter()
            .map(|&epoch| {
                let e = g.entry((model.to_string(), epoch)).or_default();
                let free = e.report.map_or(0, |(_, _, l)| l.kv_blocks_free);
                (epoch, e.load(now), free, e.routed, e.matched(hashes))
            })
            .collect();
        // Least loaded: load, then more free KV, then fewer routed.
        seen.sort_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)).then(a.3.cmp(&b.3)));
        let least = seen[0];
        // Among the replicas holding the longest prefix (several, once a
        // busy spell sent a group to a second replica): when that prefix is
        // most of the prompt, a fixed order per prefix (rendezvous hashing
        // on its first block), so a group's requests gather on one replica
        // again instead of alternating; when it is a shorter lead-in (a
        // system prompt before a conversation of its own), the least
        // loaded, so conversations sharing it spread instead of herding.
        let longest = seen.iter().map(|s| s.4).max().unwrap_or(0);
        let gather = longest * GATHER.1 >= hashes.len() * GATHER.0;
        let rank = |epoch: u64| {
            llmos_meta::hash::block_hash(
                hashes.first().copied().unwrap_or(0),
                &[epoch as u32, (epoch >> 32) as u32],
            )
        };
        let mut holders: Vec<_> = seen
            .iter()
            .filter(|s| longest > 0 && s.4 == longest)
            .collect();
        if gather {
            holders.sort_by_key(|s| rank(s.0));
        } else {
            holders.sort_by_key(|s| (s.1, rank(s.0)));
        }
        let pick = holders
            .into_iter()
            .find(|p| {
                let held = (p.4 / HELD_BLOCKS_PER_SEQ).min(MAX_HELD_MARGIN) as u32;
                p.1 <= 2 * least.1 + SLACK + held
            })
            .copied()
            .unwrap_or(least);
        Some(Choice {
            epoch: pick.0,
            matched_blocks: pick.4,
        })
    }

    /// Counts a request routed to replica `epoch` (until the guard drops)
    /// and remembers its prompt blocks there.
    pub fn start(self: &Arc<Self>, model: &str, choice: Choice, hashes: &[u64]) -> InFlight {
        let key = (model.to_string(), choice.epoch);
        let mut g = self.lock();
        let e = g.entry(key.clone()).or_default();
        e.in_flight += 1;
        e.routed += 1;
        if choice.matched_blocks > 0 {
            e.routed_for_prefix += 1;
        }
        e.remember(hashes);
        drop(g);
        InFlight {
            router: self.clone(),
            key,
        }
    }

    /// What the router knows of replica `epoch`.
    pub fn load(&self, model: &str, epoch: u64) -> ReplicaLoad {
        let g = self.lock();
        let Some(e) = g.get(&(model.to_string(), epoch)) else {
            return ReplicaLoad::default();
        };
        ReplicaLoad {
            reported: e.report.map(|(_, _, l)| l),
            in_flight: e.in_flight,
            routed: e.routed,
            routed_for_prefix: e.routed_for_prefix,
        }
    }

    /// Whether replica `epoch` has nothing to finish: nothing in flight
    /// from here, and its engine reported no sequence after `since_ms`.
    pub fn idle_since(&self, model: &str, epoch: u64, since_ms: u64) -> bool {
        let g = self.lock();
        let Some(e) = g.get(&(model.to_string(), epoch)) else {
            return false;
        };
        e.in_flight == 0
            && e.report
                .is_some_and(|(_, at, l)| at > since_ms && l.running + l.waiting == 0)
    }

    /// Forgets replicas no longer placed.
    pub fn retain(&self, live: &HashSet<(String, u64)>) {
        self.lock()
            .retain(|k, e| live.contains(k) || e.in_flight > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(running: u32) -> EngineLoad {
        EngineLoad {
            running,
            waiting: 0,
            kv_blocks_free: 100,
            ..Default::default()
        }
    }

    #[test]
    fn the_longest_prefix_wins_unless_its_replica_is_much_busier() {
        let r = Arc::new(Router::default());
        let system = block_hashes(&(0..64).collect::<Vec<u32>>(), 16);
        // Nothing known: the least loaded (both 0; fewer routed).
        r.report("m", 1, load(0), 1);
        r.report("m", 2, load(0), 1);
        let c = r.choose("m", &[1, 2], &system, false).unwrap();
        assert_eq!(c.matched_blocks, 0);
        let _a = r.start("m", c, &system);
        // The same prompt again goes where its blocks went, though that
        // replica now has one more in flight.
        let c2 = r.choose("m", &[1, 2], &system, false).unwrap();
        assert_eq!((c2.epoch, c2.matched_blocks), (c.epoch, 4));
        // A prompt sharing the first two blocks only still follows them.
        let mut other: Vec<u32> = (0..32).collect();
        other.extend(1000..1032);
        let part = block_hashes(&other, 16);
        assert_eq!(
            r.choose("m", &[1, 2], &part, false).unwrap().matched_blocks,
            2
        );
        // Much busier (more than twice the other's load plus SLACK plus
        // one per HELD_BLOCKS_PER_SEQ held blocks, 4 here): the least
        // loaded instead.
        let other_epoch = if c.epoch == 1 { 2 } else { 1 };
        let held = (4 / HELD_BLOCKS_PER_SEQ) as u32;
        r.report("m", c.epoch, load(2 * 3 + SLACK + held + 1), 2);
        r.report("m", other_epoch, load(3), 2);
        let c3 = r.choose("m", &[1, 2], &system, false).unwrap();
        assert_eq!(c3.epoch, other_epoch);
        r.report("m", c.epoch, load(2 * 3 + SLACK + held), 3);
        assert_eq!(
            r.choose("m", &[1, 2], &system, false).unwrap().epoch,
            c.epoch
        );
        // A prompt it holds less of (2 blocks) leaves it sooner.
        assert_eq!(
            r.choose("m", &[1, 2], &part, false).unwrap().epoch,
            other_epoch
        );
        // A long conversation's history (40 blocks) widens the margin by
        // MAX_HELD_MARGIN at most.
        let long: Vec<u32> = (5000..5640).collect();
        let long_hashes = block_hashes(&long, 16);
        let _held = r.start(
            "m",
            Choice {
                epoch: c.epoch,
                matched_blocks: 0,
            },
            &long_hashes,
        );
        let bound = 2 * 3 + SLACK + MAX_HELD_MARGIN as u32;
        r.report("m", c.epoch, load(bound), 4);
        let pick = r.choose("m", &[1, 2], &long_hashes, false).unwrap();
        assert_eq!((pick.epoch, pick.matched_blocks), (c.epoch, 40));
        r.report("m", c.epoch, load(bound + 1), 5);
        assert_eq!(
            r.choose("m", &[1, 2], &long_hashes, false).unwrap().epoch,
            other_epoch
        );
    }

    /// Both replicas hold a prefix. A group whose prefix is most of the
    /// prompt gathers on one of them (the same one whichever is less busy,
    /// short of much busier); conversations sharing only a system prompt
    /// (half of their first prompt) go to the less busy one instead of
    /// herding onto the replica the rendezvous order puts first.
    #[test]
    fn a_shared_lead_in_spreads_by_load_while_a_shared_prefix_gathers() {
        let r = Arc::new(Router::default());
        let system: Vec<u32> = (0..32).collect();
        let group: Vec<u32> = (500..596).collect();
        for epoch in [1, 2] {
            // Each replica is sent the system prompt and the group's prefix.
            let c = Choice {
                epoch,
                matched_blocks: 0,
            };
            drop(r.start("m", c, &block_hashes(&system, 16)));
            drop(r.start("m", c, &block_hashes(&group, 16)));
        }
        // The group's prefix (6 blocks) and 1 block of its own: 6 of 7.
        let mut ask = group.clone();
        ask.extend(9000..9016);
        let ask = block_hashes(&ask, 16);
        let mut picks = Vec::new();
        for (l1, l2) in [(0, 2), (2, 0)] {
            r.report("m", 1, load(l1), 1);
            r.report("m", 2, load(l2), 1);
            picks.push(r.choose("m", &[1, 2], &ask, false).unwrap());
        }
        assert_eq!(picks[0].matched_blocks, 6);
        assert_eq!(picks[0].epoch, picks[1].epoch, "the group gathers on one");
        // A first turn: the system prompt (2 blocks) and 2 of its own.
        let mut turn = system.clone();
        turn.extend(7000..7032);
        let turn = block_hashes(&turn, 16);
        for (l1, l2, want) in [(0, 2, 1), (2, 0, 2)] {
            r.report("m", 1, load(l1), 2);
            r.report("m", 2, load(l2), 2);
            let c = r.choose("m", &[1, 2], &turn, false).unwrap();
            assert_eq!((c.epoch, c.matched_blocks), (want, 2), "loads {l1}/{l2}");
        }
    }

    #[test]
    fn in_flight_counts_until_the_request_ends_and_spreads_new_prompts() {
        let r = Arc::new(Router::default());
        let mut guards = Vec::new();
        for i in 0..6u32 {
            let h = block_hashes(&[i; 16], 16);
            let c = r.choose("m", &[7, 8, 9], &h, false).unwrap();
            guards.push(r.start("m", c, &h));
        }
        for e in [7, 8, 9] {
            assert_eq!(r.load("m", e).in_flight, 2, "{e}");
        }
        assert!(!r.idle_since("m", 7, 0));
        guards.clear();
        assert_eq!(r.load("m", 7).in_flight, 0);
        assert!(!r.idle_since("m", 7, 0), "no report yet");
        r.report("m", 7, load(0), 50);
        assert!(r.idle_since("m", 7, 10));
        assert!(!r.idle_since("m", 7, 60), "a report from before the drain");
    }

    #[test]
    fn block_hashes_cover_whole_blocks_only_and_chain() {
        let a = block_hashes(&(0..40).collect::<Vec<u32>>(), 16);
        assert_eq!(a.len(), 2);
        let b = block_hashes(&(0..32).collect::<Vec<u32>>(), 16);
        assert_eq!(a, b);
        let mut c: Vec<u32> = (0..32).collect();
        c[0] = 99;
        assert_ne!(block_hashes(&c, 16)[1], a[1], "a block names its parents");
    }
}
