//! Worker liveness as leases in the leader's memory. A heartbeat renews a
//! worker's lease (and reports its free memory and the shards it holds);
//! nothing is written to the replicated log unless liveness changes: a
//! lease that expires makes the worker unhealthy, a renewal of an expired
//! one makes it healthy again, and one unhealthy for longer than the grace
//! period is gone (its shards are placed elsewhere). A new leader knows no
//! lease: it counts every worker as renewed when it took over, so it waits
//! one lease period before declaring anything dead.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::state::WorkerInfo;

/// What one heartbeat reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub memory_free_bytes: u64,
    /// (model, placement epoch) of every shard held.
    pub shards: Vec<(String, u64)>,
}

#[derive(Debug, Clone)]
struct Lease {
    renewed: Instant,
    /// None until the first heartbeat this leader received.
    report: Option<Report>,
}

/// A liveness change to write to the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Unhealthy(String),
    Healthy(String),
    Gone(String),
}

impl Transition {
    pub fn worker(&self) -> &str {
        match self {
            Transition::Unhealthy(w) | Transition::Healthy(w) | Transition::Gone(w) => w,
        }
    }
}

#[derive(Default)]
pub struct Leases {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// When this coordinator last became leader; None: not leader.
    leading_since: Option<Instant>,
    leases: HashMap<String, Lease>,
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called on every reconciler pass with whether this coordinator leads;
    /// taking over starts every lease afresh. Returns true on a take-over.
    pub fn set_leader(&self, leader: bool, now: Instant) -> bool {
        let mut g = self.lock();
        match (leader, g.leading_since.is_some()) {
            (true, false) => {
                g.leading_since = Some(now);
                g.leases.clear();
                true
            }
            (false, true) => {
                g.leading_since = None;
                g.leases.clear();
                false
            }
            _ => false,
        }
    }

    /// A heartbeat from `id`.
    pub fn renew(&self, id: &str, report: Report, now: Instant) {
        self.lock().leases.insert(
            id.to_string(),
            Lease {
                renewed: now,
                report: Some(report),
            },
        );
    }

    /// The last report of `id` this leader received.
    pub fn report(&self, id: &str) -> Option<Report> {
        self.lock().leases.get(id).and_then(|l| l.report.clone())
    }

    /// Every report received, by worker.
    pub fn reports(&self) -> Vec<(String, Report)> {
        self.lock()
            .leases
            .iter()
            .filter_map(|(id, l)| Some((id.clone(), l.report.clone()?)))
            .collect()
    }

    /// Forgets a worker (it registered anew: its old report is void).
    pub fn forget(&self, id: &str) {
        self.lock().leases.remove(id);
    }

    /// The liveness changes due now. `timeout`: a lease's length; `grace`:
    /// how long a worker stays unhealthy before it is gone (measured from
    /// the logged `unhealthy_since_ms`, against `now_ms`, so it survives a
    /// change of leader; a new leader still waits one lease first).
    pub fn transitions<'a>(
        &self,
        workers: impl IntoIterator<Item = &'a WorkerInfo>,
        now: Instant,
        now_ms: u64,
        timeout: Duration,
        grace: Duration,
    ) -> Vec<Transition> {
        let mut g = self.lock();
        let Some(since) = g.leading_since else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for w in workers {
            let lease = g.leases.entry(w.id.to_string()).or_insert(Lease {
                renewed: since,
                report: None,
            });
            let expired = now.duration_since(lease.renewed) > timeout;
            let heard = lease.report.is_some() && !expired;
            if w.healthy && expired {
                out.push(Transition::Unhealthy(w.id.to_string()));
            } else if !w.healthy && heard {
                out.push(Transition::Healthy(w.id.to_string()));
            } else if !w.healthy
                && !w.gone
                && expired
                && now_ms.saturating_sub(w.unhealthy_since_ms) > grace.as_millis() as u64
            {
                out.push(Transition::Gone(w.id.to_string()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);
    const GRACE: Duration = Duration::from_secs(30);

    fn known(id: &str, healthy: bool, gone: bool, since_ms: u64) -> WorkerInfo {
        WorkerInfo {
            id: id.into(),
            address: String::new(),
            device: "cpu".into(),
            memory_total_bytes: 0,
            memory_free_bytes: 0,
            healthy,
            last_heartbeat_ms: 0,
            collective_address: String::new(),
            registered_at_ms: 0,
            unhealthy_since_ms: since_ms,
            gone,
            pool: String::new(),
            labels: Default::default(),
            cordoned: false,
        }
    }

    #[test]
    fn a_lease_expires_recovers_and_a_long_absence_is_gone() {
        let l = Leases::default();
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        // Not leader: nothing to decide.
        assert!(l
            .transitions(&[known("a", true, false, 0)], s(100), 0, LEASE, GRACE)
            .is_empty());
        assert!(l.set_leader(true, t0));
        assert!(!l.set_leader(true, t0), "already leading");
        l.renew("a", Report::default(), s(1));
        // Within the lease: nothing.
        let a = [known("a", true, false, 0)];
        assert!(l.transitions(&a, s(10), 10_000, LEASE, GRACE).is_empty());
        // Expired: unhealthy (once; the state then says unhealthy).
        assert_eq!(
            l.transitions(&a, s(12), 12_000, LEASE, GRACE),
            vec![Transition::Unhealthy("a".into())]
        );
        let a = [known("a", false, false, 12_000)];
        assert!(l.transitions(&a, s(30), 30_000, LEASE, GRACE).is_empty());
        // Past the grace period: gone.
        assert_eq!(
            l.transitions(&a, s(43), 43_000, LEASE, GRACE),
            vec![Transition::Gone("a".into())]
        );
        // It comes back: healthy again.
        l.renew("a", Report::default(), s(50));
        let a = [known("a", false, true, 12_000)];
        assert_eq!(
            l.transitions(&a, s(51), 51_000, LEASE, GRACE),
            vec![Transition::Healthy("a".into())]
        );
    }

    #[test]
    fn a_new_leader_waits_one_lease_before_declaring_anyone_dead() {
        let l = Leases::default();
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        // Took over at t0 + 100 s; the worker's last heartbeat went to the
        // old leader long ago, and it has been unhealthy since 0 ms.
        l.set_leader(true, s(100));
        let ws = [known("a", true, false, 0), known("b", false, false, 0)];
        assert!(l.transitions(&ws, s(105), 105_000, LEASE, GRACE).is_empty());
        assert_eq!(
            l.transitions(&ws, s(111), 111_000, LEASE, GRACE),
            vec![
                Transition::Unhealthy("a".into()),
                Transition::Gone("b".into())
            ]
        );
        // Losing leadership forgets the leases.
        l.renew("a", Report::default(), s(112));
        l.set_leader(false, s(113));
        assert!(l.report("a").is_none());
    }
}
