//! A tiny fork-join pool for decode-step kernels: the calling thread works
//! too, and helpers spin briefly between jobs before parking. Decode runs
//! ~120 short products per token, ~50-200 us apart; waking parked threads for
//! each (as a general pool does) costs more than the work on small machines.
//!
//! Protocol: a job's chunks `0..n` are cut into one contiguous range per
//! participant. Each range is a word `epoch << 32 | front << 16 | back`. A
//! participant claims chunks from the front of its own range (in order, so
//! a product's rows stream from memory as one run), and when that is empty
//! steals from the back of the others' (so a participant that starts late
//! or runs slower leaves only the chunk in hand to wait on). A claim is a
//! CAS of a range word of the job's epoch, deciding from the word alone. A
//! successful claim proves epoch `e` is current and unfinished, so only then
//! is the job pointer read and called: the caller publishes the next job
//! (and lets this one's stack frame go) only after every chunk has
//! completed. The caller stores the job, then the ranges, then the `ticket`
//! (the epoch) that spinning helpers watch.
//!
//! A helper spins for the next job for [`SPIN`] of wall time (not a count of
//! `pause` instructions, whose cost differs tenfold between CPUs), then
//! parks on a condvar the caller signals when it publishes a job to
//! sleepers. Each participant counts the chunks it ran
//! ([`SpinPool::chunks_run`]), so a bench can tell which threads took part.

use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a helper spins for the next job before parking: longer than
/// the gaps between a decode step's products (tens to hundreds of
/// microseconds), short enough not to burn a core between requests.
const SPIN: Duration = Duration::from_millis(2);
/// Spin iterations between two reads of the clock.
const CLOCK_EVERY: u32 = 64;

type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Job {
    task: Task<'static>,
}

/// Chunks per job are carried in 16 bits of a range word.
pub const MAX_CHUNKS: usize = 0xffff;

fn range_word(epoch: u64, front: usize, back: usize) -> u64 {
    epoch << 32 | (front as u64) << 16 | back as u64
}

/// An atomic on a cache line (two) of its own: each participant claims
/// from its own range, and counts its own chunks, without pulling the
/// line from the others.
#[repr(align(128))]
struct Padded(AtomicU64);

struct Shared {
    /// The current job's epoch (helpers spin on it).
    ticket: AtomicU64,
    job: AtomicPtr<Job>,
    /// Each participant's range of the current job (module doc).
    ranges: Box<[Padded]>,
    /// Chunks completed, added once by each participant per job.
    done: AtomicUsize,
    sleep: Mutex<u64>,
    wake: Condvar,
    sleepers: AtomicUsize,
    /// Helpers park right after the current job instead of spinning (the
    /// caller is about to run libtorch's own threads).
    park_after: std::sync::atomic::AtomicBool,
    /// Chunks each participant ran (0: callers, 1..: helpers).
    ran: Box<[Padded]>,
}

pub struct SpinPool {
    shared: Arc<Shared>,
    helpers: usize,
    /// One job at a time.
    caller: Mutex<()>,
}

impl SpinPool {
    /// A pool of `threads` participants: the caller plus `threads - 1` helpers.
    pub fn new(threads: usize) -> Self {
        let n = threads.max(1);
        let shared = Arc::new(Shared {
            ticket: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            ranges: (0..n).map(|_| Padded(AtomicU64::new(0))).collect(),
            done: AtomicUsize::new(0),
            sleep: Mutex::new(0),
            wake: Condvar::new(),
            sleepers: AtomicUsize::new(0),
            park_after: std::sync::atomic::AtomicBool::new(false),
            ran: (0..n).map(|_| Padded(AtomicU64::new(0))).collect(),
        });
        let helpers = n - 1;
        for i in 0..helpers {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("llmos-decode-{i}"))
                .spawn(move || helper(&s, i + 1))
                .expect("spawn decode helper thread");
        }
        SpinPool {
            shared,
            helpers,
            caller: Mutex::new(()),
        }
    }

    /// Participants: the caller and the helpers.
    pub fn threads(&self) -> usize {
        self.helpers + 1
    }

    /// Chunks each participant has run so far: the callers (index 0), then
    /// each helper. Jobs of one chunk, or on a pool without helpers, run
    /// inline and count for the caller.
    pub fn chunks_run(&self) -> Vec<u64> {
        self.shared
            .ran
            .iter()
            .map(|r| r.0.load(Ordering::Relaxed))
            .collect()
    }

    /// Runs `task(0..chunks)` across the pool and returns when all are done.
    /// `chunks` is at most `MAX_CHUNKS`. Each participant runs a contiguous
    /// share of the chunks in increasing order first (module doc), so
    /// neighbouring chunks should be neighbouring work.
    pub fn run(&self, chunks: usize, task: &(dyn Fn(usize) + Sync)) {
        self.run_inner(chunks, task, false)
    }

    /// Like `run`, but the helpers park as soon as the job is done, so they
    /// do not spin against other threads (libtorch's) that run next.
    pub fn run_then_park(&self, chunks: usize, task: &(dyn Fn(usize) + Sync)) {
        self.run_inner(chunks, task, true)
    }

    fn run_inner(&self, chunks: usize, task: &(dyn Fn(usize) + Sync), park: bool) {
        assert!(
            chunks <= MAX_CHUNKS,
            "SpinPool::run: {chunks} chunks > {MAX_CHUNKS}"
        );
        if chunks == 0 {
            return;
        }
        if self.helpers == 0 || chunks == 1 {
            (0..chunks).for_each(task);
            self.shared.ran[0]
                .0
                .fetch_add(chunks as u64, Ordering::Relaxed);
            return;
        }
        let _one = self.caller.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: the job (and the borrowed task) outlive every use: helpers
        // only call it after claiming a chunk of this epoch, and we return
        // only after all chunks are done.
        let task: Task<'static> = unsafe { std::mem::transmute::<Task<'_>, Task<'static>>(task) };
        let mut job = Job { task };
        s.done.store(0, Ordering::Relaxed);
        s.park_after.store(park, Ordering::Relaxed);
        s.job.store(&mut job, Ordering::Release);
        // Epochs are 32 bits (the range words'), wrapping.
        let epoch = (s.ticket.load(Ordering::Relaxed) + 1) & 0xffff_ffff;
        let parts = s.ranges.len();
        for (p, r) in s.ranges.iter().enumerate() {
            let (front, back) = (p * chunks / parts, (p + 1) * chunks / parts);
            r.0.store(range_word(epoch, front, back), Ordering::Release);
        }
        // SeqCst on this store and the `sleepers` load (and on the helper's
        // increment and re-check) so a helper going to sleep either sees the
        // new epoch or is seen and woken.
        s.ticket.store(epoch, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let mut e = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            *e = epoch;
            s.wake.notify_all();
        }
        work(s, epoch, 0);
        while s.done.load(Ordering::Acquire) < chunks {
            std::hint::spin_loop();
        }
    }
}

/// Claims one chunk of `epoch` from range `r`: its front (`steal`: its
/// back). `None` when the range is empty or of another epoch.
fn claim(r: &AtomicU64, epoch: u64, steal: bool) -> Option<usize> {
    let mut w = r.load(Ordering::Acquire);
    loop {
        let (e, front, back) = (w >> 32, (w >> 16) & 0xffff, w & 0xffff);
        if e != epoch || front >= back {
            return None;
        }
        let (next, chunk) = if steal {
            (w - 1, back - 1)
        } else {
            (w + (1 << 16), front)
        };
        match r.compare_exchange_weak(w, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some(chunk as usize),
            Err(now) => w = now,
        }
    }
}

/// Runs chunks of `epoch` until none are left: `who`'s own range from the
/// front, then the others' from the back. Counts them once at the end.
fn work(s: &Shared, epoch: u64, who: usize) {
    let parts = s.ranges.len();
    let mut ran = 0;
    let run = |chunk: usize| {
        // SAFETY: the claim proves the job of `epoch` is live (module doc).
        unsafe { ((*s.job.load(Ordering::Acquire)).task)(chunk) }
    };
    while let Some(c) = claim(&s.ranges[who].0, epoch, false) {
        run(c);
        ran += 1;
    }
    for other in (1..parts).map(|k| (who + k) % parts) {
        while let Some(c) = claim(&s.ranges[other].0, epoch, true) {
            run(c);
            ran += 1;
        }
    }
    if ran > 0 {
        // Counted before `done` (Release): the caller, returning after
        // its Acquire load of `done`, sees every chunk counted.
        s.ran[who].0.fetch_add(ran as u64, Ordering::Relaxed);
        s.done.fetch_add(ran, Ordering::Release);
    }
}

fn helper(s: &Shared, who: usize) {
    let mut seen = 0u64;
    loop {
        // The epoch's ticket store (Release) orders `park_after` before it.
        let park_now = s.park_after.load(Ordering::Relaxed);
        let mut since = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.ticket.load(Ordering::Acquire);
            if e != seen {
                break e;
            }
            spins = spins.wrapping_add(1);
            let spun_out =
                park_now || (spins.is_multiple_of(CLOCK_EVERY) && since.elapsed() >= SPIN);
            if !spun_out {
                std::hint::spin_loop();
                continue;
            }
            // Park until a newer epoch is published.
            let mut guard = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while s.ticket.load(Ordering::SeqCst) == seen {
                guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::AcqRel);
            drop(guard);
            since = Instant::now();
        };
        seen = epoch;
        work(s, epoch, who);
    }
}

/// A read-only pointer shared by a pool job's tasks.
pub(crate) struct SharedPtr<T>(pub(crate) *const T);
// SAFETY: only read, from tasks that the job's caller outlives.
unsafe impl<T> Sync for SharedPtr<T> {}
impl<T> SharedPtr<T> {
    pub(crate) fn at(&self, i: usize) -> *const T {
        self.0.wrapping_add(i)
    }
}

/// An output pointer shared by a pool job's tasks, each writing only its
/// own disjoint elements.
pub struct SharedSlot<T>(pub *mut T);
// SAFETY: tasks write disjoint elements (each user states which).
unsafe impl<T: Send> Sync for SharedSlot<T> {}
impl<T> SharedSlot<T> {
    pub fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_exactly_once_across_many_jobs() {
        let pool = SpinPool::new(3);
        for n in [1usize, 2, 7, 64, 1000] {
            for _ in 0..50 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "n = {n}"
                );
            }
        }
    }

    /// Every participant takes part in large jobs, whether they follow each
    /// other closely (helpers spinning) or after pauses longer than the
    /// spin (helpers parked, woken by the new job), and the chunk counts
    /// add up. Fails if a helper never gets work (e.g. parked and never
    /// woken, or the caller always claiming everything first).
    #[test]
    fn every_participant_runs_chunks_of_large_jobs() {
        let pool = SpinPool::new(2);
        let busy = |us: u64| {
            let t = Instant::now();
            while t.elapsed() < Duration::from_micros(us) {
                std::hint::spin_loop();
            }
        };
        let (jobs, chunks) = (20, 64);
        let mut joined = 0;
        let before = pool.chunks_run();
        for j in 0..jobs {
            if j % 2 == 1 {
                // Longer than SPIN: the helper parks.
                std::thread::sleep(SPIN * 3);
            }
            let start = pool.chunks_run();
            pool.run(chunks, &|_| busy(200));
            let end = pool.chunks_run();
            if end[1] > start[1] {
                joined += 1;
            }
        }
        let after = pool.chunks_run();
        let total: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
        assert_eq!(total, (jobs * chunks) as u64);
        // Each job is ~13 ms of work: a helper that is alive and woken
        // joins nearly all of them even on a busy machine.
        assert!(
            joined >= jobs * 3 / 4,
            "the helper joined {joined} of {jobs} jobs: {after:?}"
        );
    }

    /// A participant stuck in a chunk leaves the rest of its share to the
    /// others: chunk 0 (the front of the caller's share, or whoever claims
    /// it) waits until every other chunk has run. Fails (times out) if
    /// shares are not stolen.
    #[test]
    fn a_stuck_participants_share_is_run_by_the_others() {
        let pool = SpinPool::new(2);
        let n = 64;
        for _ in 0..5 {
            let done = AtomicUsize::new(0);
            let waited = std::sync::atomic::AtomicBool::new(false);
            pool.run(n, &|i| {
                if i == 0 {
                    let t = Instant::now();
                    while done.load(Ordering::Acquire) < n - 1 {
                        assert!(
                            t.elapsed() < Duration::from_secs(20),
                            "chunks 1..{n} were not run while chunk 0 was stuck: {} ran",
                            done.load(Ordering::Relaxed)
                        );
                        std::thread::yield_now();
                    }
                    waited.store(true, Ordering::Relaxed);
                } else {
                    done.fetch_add(1, Ordering::Release);
                }
            });
            assert!(waited.load(Ordering::Relaxed));
            assert_eq!(done.load(Ordering::Relaxed), n - 1);
        }
    }

    /// Each participant runs the chunks it takes from its own share in
    /// order from the share's front, and those it steals from another's
    /// share from that share's back, in descending order: what keeps a
    /// product's rows one stream per thread.
    #[test]
    fn shares_run_in_order_and_are_stolen_from_the_back() {
        let pool = SpinPool::new(2);
        let caller = std::thread::current().id();
        for n in [2usize, 9, 64, 301] {
            for _ in 0..20 {
                let log = Mutex::new(Vec::new());
                pool.run(n, &|i| {
                    let who = usize::from(std::thread::current().id() != caller);
                    log.lock().unwrap().push((who, i));
                    // Uneven work, so steals happen.
                    let t = Instant::now();
                    while t.elapsed() < Duration::from_micros(if i % 7 == who { 40 } else { 5 }) {
                        std::hint::spin_loop();
                    }
                });
                let log = log.into_inner().unwrap();
                assert_eq!(log.len(), n);
                let share = |p: usize| p * n / 2..(p + 1) * n / 2;
                for who in 0..2 {
                    let ran: Vec<usize> = log.iter().filter(|e| e.0 == who).map(|e| e.1).collect();
                    let own: Vec<usize> = ran
                        .iter()
                        .copied()
                        .filter(|c| share(who).contains(c))
                        .collect();
                    let first = share(who).start;
                    assert!(
                        own.iter().enumerate().all(|(k, &c)| c == first + k),
                        "participant {who} ran its share out of order: {own:?} (n = {n})"
                    );
                    let stolen: Vec<usize> = ran
                        .iter()
                        .copied()
                        .filter(|c| !share(who).contains(c))
                        .collect();
                    assert!(
                        stolen.windows(2).all(|w| w[0] > w[1]),
                        "participant {who} stole out of order: {stolen:?} (n = {n})"
                    );
                    if let Some(&last) = stolen.first() {
                        assert_eq!(last, share(1 - who).end - 1, "steals start at the back");
                    }
                }
            }
        }
    }

    #[test]
    fn parked_helpers_wake_for_new_jobs() {
        let pool = SpinPool::new(2);
        pool.run(4, &|_| {});
        std::thread::sleep(std::time::Duration::from_millis(50)); // helpers park
        let sum = AtomicUsize::new(0);
        pool.run(100, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 4950);
    }
}
