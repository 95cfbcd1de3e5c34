//! A tiny fork-join pool for decode-step kernels: the calling thread works
//! too, and helpers spin briefly between jobs before parking. Decode runs
//! ~120 short products per token, ~50-200 us apart; waking parked threads for
//! each (as a general pool does) costs more than the work on small machines.
//!
//! Protocol: a job is published by storing its pointer, then a `ticket`
//! `epoch << 32 | chunks << 16 | next_chunk` with a new epoch (Release). A
//! participant claims chunk `i` by CAS-ing the ticket from `(e, n, i)` to
//! `(e, n, i + 1)`, `i < n`, deciding from the ticket alone. A successful
//! claim proves epoch `e` is current and unfinished, so only then is the job
//! pointer read and called: the caller publishes the next job (and lets this
//! one's stack frame go) only after every chunk has completed.
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

/// Chunks per job are carried in 16 bits of the ticket.
pub const MAX_CHUNKS: usize = 0xffff;

fn ticket(epoch: u64, chunks: usize, next: usize) -> u64 {
    epoch << 32 | (chunks as u64) << 16 | next as u64
}

struct Shared {
    ticket: AtomicU64,
    job: AtomicPtr<Job>,
    done: AtomicUsize,
    sleep: Mutex<u64>,
    wake: Condvar,
    sleepers: AtomicUsize,
    /// Helpers park right after the current job instead of spinning (the
    /// caller is about to run libtorch's own threads).
    park_after: std::sync::atomic::AtomicBool,
    /// Chunks each participant ran (0: callers, 1..: helpers).
    ran: Box<[AtomicU64]>,
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
        let shared = Arc::new(Shared {
            ticket: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            sleep: Mutex::new(0),
            wake: Condvar::new(),
            sleepers: AtomicUsize::new(0),
            park_after: std::sync::atomic::AtomicBool::new(false),
            ran: (0..threads.max(1)).map(|_| AtomicU64::new(0)).collect(),
        });
        let helpers = threads.saturating_sub(1);
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
            .map(|r| r.load(Ordering::Relaxed))
            .collect()
    }

    /// Runs `task(0..chunks)` across the pool and returns when all are done.
    /// `chunks` is at most `MAX_CHUNKS`.
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
            self.shared.ran[0].fetch_add(chunks as u64, Ordering::Relaxed);
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
        let epoch = (s.ticket.load(Ordering::Relaxed) >> 32) + 1;
        // SeqCst on this store and the `sleepers` load (and on the helper's
        // increment and re-check) so a helper going to sleep either sees the
        // new epoch or is seen and woken.
        s.ticket.store(ticket(epoch, chunks, 0), Ordering::SeqCst);
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

/// Claims and runs chunks of `epoch` until none are left; `who` counts
/// them.
fn work(s: &Shared, epoch: u64, who: usize) {
    loop {
        let t = s.ticket.load(Ordering::Acquire);
        let (e, chunks, next) = (t >> 32, (t >> 16) & 0xffff, t & 0xffff);
        if e != epoch || next >= chunks {
            return;
        }
        if s.ticket
            .compare_exchange_weak(t, t + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            // SAFETY: the claim proves the job of `epoch` is live (module doc).
            unsafe { ((*s.job.load(Ordering::Acquire)).task)(next as usize) };
            // Counted before `done` (Release): the caller, returning after
            // its Acquire load of `done`, sees every chunk counted.
            s.ran[who].fetch_add(1, Ordering::Relaxed);
            s.done.fetch_add(1, Ordering::Release);
        }
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
            let e = s.ticket.load(Ordering::Acquire) >> 32;
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
            while s.ticket.load(Ordering::SeqCst) >> 32 == seen {
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
