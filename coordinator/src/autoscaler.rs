//! The built-in autoscaling policy, off unless a deployment asks for it
//! (`--autoscale MIN,MAX`): for a cluster without a Kubernetes autoscaler.
//! An external autoscaler reads the same signals from `ClusterStatus` (per
//! replica: running, waiting, in flight, free KV blocks) and calls
//! `Admin.ScaleModel`, which is all this does too.
//!
//! The rule, evaluated by the leader on every reconciler pass from the
//! engines' load reports (`crate::router`):
//! - **up** by one replica (up to MAX) when the requests waiting per
//!   serving replica stay above `up_waiting` for `up_window`;
//! - **down** by one replica (down to MIN) when no replica has a running or
//!   waiting request for `idle_window`;
//! - a count outside [MIN, MAX] is brought inside at once.
//!
//! Each decision restarts both windows, so replicas change one at a time
//! and a new replica gets a window to take load before the next.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The policy's thresholds (coordinator flags).
#[derive(Debug, Clone)]
pub struct Policy {
    pub up_waiting: f64,
    pub up_window: Duration,
    pub idle_window: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            up_waiting: 2.0,
            up_window: Duration::from_secs(30),
            idle_window: Duration::from_secs(300),
        }
    }
}

/// One model's load as the leader sees it now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Signals {
    pub serving: u32,
    pub running: u32,
    pub waiting: u32,
}

#[derive(Debug, Default)]
struct Windows {
    busy_since: Option<Instant>,
    idle_since: Option<Instant>,
}

/// The windows of every autoscaled model (leader memory: a new leader
/// starts them afresh).
#[derive(Debug, Default)]
pub struct Autoscaler {
    windows: HashMap<String, Windows>,
}

impl Autoscaler {
    /// The replica count `model` should move to now, if any.
    pub fn decide(
        &mut self,
        policy: &Policy,
        model: &str,
        desired: u32,
        (min, max): (u32, u32),
        s: Signals,
        now: Instant,
    ) -> Option<u32> {
        let w = self.windows.entry(model.to_string()).or_default();
        if desired < min || desired > max {
            *w = Windows::default();
            return Some(desired.clamp(min, max));
        }
        let busy = s.serving > 0 && s.waiting as f64 / s.serving as f64 > policy.up_waiting;
        let idle = s.running == 0 && s.waiting == 0;
        w.busy_since = if busy {
            w.busy_since.or(Some(now))
        } else {
            None
        };
        w.idle_since = if idle {
            w.idle_since.or(Some(now))
        } else {
            None
        };
        let held = |since: Option<Instant>, window: Duration| {
            since.is_some_and(|t| now.duration_since(t) >= window)
        };
        let next = if held(w.busy_since, policy.up_window) && desired < max {
            Some(desired + 1)
        } else if held(w.idle_since, policy.idle_window) && desired > min {
            Some(desired - 1)
        } else {
            None
        };
        if next.is_some() {
            *w = Windows::default();
        }
        next
    }

    /// Forgets models no longer autoscaled.
    pub fn retain(&mut self, models: &[&str]) {
        self.windows.retain(|m, _| models.contains(&m.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            up_waiting: 2.0,
            up_window: Duration::from_secs(10),
            idle_window: Duration::from_secs(60),
        }
    }

    fn load(serving: u32, running: u32, waiting: u32) -> Signals {
        Signals {
            serving,
            running,
            waiting,
        }
    }

    #[test]
    fn waiting_above_the_threshold_for_a_window_adds_one_replica() {
        let (p, mut a, t0) = (policy(), Autoscaler::default(), Instant::now());
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(a.decide(&p, "m", 1, (1, 3), load(1, 8, 5), at(0)), None);
        assert_eq!(a.decide(&p, "m", 1, (1, 3), load(1, 8, 5), at(9)), None);
        // A dip below the threshold restarts the window.
        assert_eq!(a.decide(&p, "m", 1, (1, 3), load(1, 8, 2), at(9)), None);
        assert_eq!(a.decide(&p, "m", 1, (1, 3), load(1, 8, 5), at(12)), None);
        assert_eq!(a.decide(&p, "m", 1, (1, 3), load(1, 8, 5), at(22)), Some(2));
        // The new replica gets a window; per replica, 5 waiting over 2 is
        // 2.5: still busy, so after another window, 3; never above MAX.
        assert_eq!(a.decide(&p, "m", 2, (1, 3), load(2, 8, 5), at(23)), None);
        assert_eq!(a.decide(&p, "m", 2, (1, 3), load(2, 8, 5), at(33)), Some(3));
        assert_eq!(a.decide(&p, "m", 3, (1, 3), load(3, 8, 9), at(34)), None);
        assert_eq!(a.decide(&p, "m", 3, (1, 3), load(3, 8, 9), at(90)), None);
    }

    #[test]
    fn idle_for_a_window_removes_one_replica_down_to_min() {
        let (p, mut a, t0) = (policy(), Autoscaler::default(), Instant::now());
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(a.decide(&p, "m", 3, (1, 3), load(3, 0, 0), at(0)), None);
        assert_eq!(a.decide(&p, "m", 3, (1, 3), load(3, 1, 0), at(30)), None);
        assert_eq!(a.decide(&p, "m", 3, (1, 3), load(3, 0, 0), at(31)), None);
        assert_eq!(a.decide(&p, "m", 3, (1, 3), load(3, 0, 0), at(91)), Some(2));
        // The window starts again after each decision.
        assert_eq!(a.decide(&p, "m", 2, (1, 3), load(2, 0, 0), at(92)), None);
        assert_eq!(
            a.decide(&p, "m", 2, (1, 3), load(2, 0, 0), at(152)),
            Some(1)
        );
        assert_eq!(a.decide(&p, "m", 1, (1, 3), load(1, 0, 0), at(999)), None);
    }

    #[test]
    fn a_count_outside_the_bounds_is_brought_inside_at_once() {
        let (p, mut a, t0) = (policy(), Autoscaler::default(), Instant::now());
        assert_eq!(a.decide(&p, "m", 5, (1, 3), load(5, 0, 0), t0), Some(3));
        assert_eq!(a.decide(&p, "m", 1, (2, 3), load(1, 0, 0), t0), Some(2));
    }
}
