//! Tenant quotas, enforced when a request is admitted: its prompt plus its
//! token budget (`max_new_tokens`) is charged to its key's bucket before
//! it is queued on a replica; what it did not generate is refunded when
//! it ends. Each key has its own bucket and running count (a tenant's keys
//! may carry different limits; each request is held to its key's). A
//! bucket holds at most one minute of tokens and refills at
//! `tokens_per_minute / 60` a second; a request the bucket cannot pay is
//! refused (RESOURCE_EXHAUSTED, HTTP 429) with the time until it could.
//! `max_concurrent` bounds a tenant's requests streaming at once.
//!
//! Buckets live in each coordinator's memory: with C coordinators behind a
//! load balancer a tenant may use up to C times its rate (the keys and
//! limits themselves are replicated, so every coordinator enforces the
//! same ones).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::Caller;

#[derive(Debug)]
struct Use {
    /// Tokens in the bucket (may be fractional while refilling).
    tokens: f64,
    refilled: Instant,
    running: u32,
}

/// Every key's bucket and running count on this coordinator.
#[derive(Debug, Default)]
pub struct Quotas {
    keys: Mutex<HashMap<String, Use>>,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The request costs more than a full bucket: never admissible.
    TooLarge { cost: u64, per_minute: u64 },
    /// Not enough tokens now; enough after `retry_after`.
    Tokens {
        cost: u64,
        available: u64,
        per_minute: u64,
        retry_after: Duration,
    },
    /// `max_concurrent` requests already stream.
    Concurrency { max: u32 },
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::TooLarge { .. } => "too_large",
            Refusal::Tokens { .. } => "tokens_per_minute",
            Refusal::Concurrency { .. } => "max_concurrent",
        }
    }

    /// The gRPC status, naming the tenant and the limit; a retry hint
    /// (`retry-after-ms`, HTTP's Retry-After) when waiting helps.
    pub fn status(&self, tenant: &str) -> tonic::Status {
        let (msg, retry) = match self {
            Refusal::TooLarge { cost, per_minute } => {
                // No wait helps: a bad request (400 naming max_tokens).
                let mut s = tonic::Status::invalid_argument(format!(
                    "tenant {tenant}: the request needs {cost} tokens (prompt plus max_tokens) but its key allows {per_minute} tokens_per_minute: lower max_tokens"
                ));
                s.metadata_mut().insert(
                    crate::http::REQUEST_FIELD_KEY,
                    tonic::metadata::MetadataValue::from_static("max_new_tokens"),
                );
                return s;
            }
            Refusal::Tokens {
                cost,
                available,
                per_minute,
                retry_after,
            } => (
                format!(
                    "tenant {tenant} is over its quota of {per_minute} tokens_per_minute: the request needs {cost} tokens (prompt plus max_tokens), {available} are available; retry after {:.1} s",
                    retry_after.as_secs_f64()
                ),
                Some(*retry_after),
            ),
            Refusal::Concurrency { max } => (
                format!("tenant {tenant} has {max} requests streaming (max_concurrent {max}): wait for one to finish"),
                Some(Duration::from_secs(1)),
            ),
        };
        let mut s = tonic::Status::resource_exhausted(msg);
        if let Some(r) = retry {
            let ms = r.as_millis().max(1) as u64;
            s.metadata_mut()
                .insert("retry-after-ms", ms.to_string().parse().expect("digits"));
        }
        s
    }
}

impl Quotas {
    /// Admits a request of `caller` costing `cost` tokens at `now`, or says
    /// why not. A caller without limits is admitted at no charge.
    pub fn admit(
        self: &Arc<Self>,
        caller: &Caller,
        cost: u64,
        now: Instant,
    ) -> Result<Charge, Refusal> {
        let l = &caller.limits;
        let mut keys = self.keys.lock().unwrap();
        let per_minute = l.tokens_per_minute;
        let u = keys.entry(caller.key_id.clone()).or_insert(Use {
            tokens: per_minute as f64,
            refilled: now,
            running: 0,
        });
        let charged = if per_minute > 0 {
            let rate = per_minute as f64 / 60.0;
            u.tokens = (u.tokens + now.saturating_duration_since(u.refilled).as_secs_f64() * rate)
                .min(per_minute as f64);
            u.refilled = now;
            if cost > per_minute {
                return Err(Refusal::TooLarge { cost, per_minute });
            }
            if (cost as f64) > u.tokens {
                let missing = cost as f64 - u.tokens;
                return Err(Refusal::Tokens {
                    cost,
                    available: u.tokens.max(0.0) as u64,
                    per_minute,
                    retry_after: Duration::from_secs_f64(missing / rate),
                });
            }
            cost
        } else {
            0
        };
        if l.max_concurrent > 0 && u.running >= l.max_concurrent {
            return Err(Refusal::Concurrency {
                max: l.max_concurrent,
            });
        }
        u.tokens -= charged as f64;
        u.running += 1;
        Ok(Charge {
            quotas: Arc::clone(self),
            key: caller.key_id.clone(),
            charged,
            per_minute,
            used: None,
        })
    }

    /// Tokens in key `key`'s bucket (not refilled to now).
    pub fn available(&self, key: &str) -> Option<f64> {
        self.keys.lock().unwrap().get(key).map(|u| u.tokens)
    }

    /// Requests of key `key` streaming now.
    pub fn running(&self, key: &str) -> u32 {
        self.keys.lock().unwrap().get(key).map_or(0, |u| u.running)
    }
}

/// One admitted request's charge: dropped, it frees its concurrency slot
/// and refunds what was charged but not used ([`Charge::used`]; all of it
/// when never told, as for a request that failed before any token).
#[derive(Debug)]
pub struct Charge {
    quotas: Arc<Quotas>,
    key: String,
    charged: u64,
    per_minute: u64,
    used: Option<u64>,
}

impl Charge {
    /// The request used `tokens` (its prompt plus what it generated).
    pub fn used(&mut self, tokens: u64) {
        self.used = Some(tokens.min(self.charged));
    }

    pub fn charged(&self) -> u64 {
        self.charged
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let refund = self.charged - self.used.unwrap_or(0);
        let mut keys = self.quotas.keys.lock().unwrap();
        if let Some(u) = keys.get_mut(&self.key) {
            u.running = u.running.saturating_sub(1);
            if refund > 0 {
                u.tokens = (u.tokens + refund as f64).min(self.per_minute as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Limits, Role};

    fn caller(tenant: &str, tpm: u64, conc: u32) -> Caller {
        Caller {
            key_id: format!("key-of-{tenant}"),
            tenant: tenant.into(),
            role: Role::User,
            limits: Limits {
                tokens_per_minute: tpm,
                max_concurrent: conc,
                priority_max: 0,
            },
        }
    }

    #[test]
    fn a_bucket_charges_at_admission_refunds_the_unused_and_refills() {
        let q = Arc::new(Quotas::default());
        let t0 = Instant::now();
        let a = caller("a", 600, 0); // 10 tokens a second
        let mut c = q.admit(&a, 400, t0).unwrap();
        assert_eq!(q.available("key-of-a"), Some(200.0));
        match q.admit(&a, 300, t0) {
            Err(Refusal::Tokens {
                retry_after,
                available,
                ..
            }) => {
                assert_eq!(available, 200);
                assert_eq!(retry_after, Duration::from_secs(10));
                let s = Refusal::Tokens {
                    cost: 300,
                    available,
                    per_minute: 600,
                    retry_after,
                }
                .status("a");
                assert_eq!(s.code(), tonic::Code::ResourceExhausted);
                assert_eq!(s.metadata().get("retry-after-ms").unwrap(), "10000");
                assert!(
                    s.message().contains("600 tokens_per_minute"),
                    "{}",
                    s.message()
                );
            }
            other => panic!("{other:?}"),
        }
        // Another tenant has its own bucket.
        assert!(q.admit(&caller("b", 600, 0), 500, t0).is_ok());
        // Used 150 of 400: 250 come back.
        c.used(150);
        drop(c);
        assert_eq!(q.available("key-of-a"), Some(450.0));
        // Refill: 5 s later, 50 more (capped at a minute's worth).
        let _c = q.admit(&a, 500, t0 + Duration::from_secs(5)).unwrap();
        assert_eq!(q.available("key-of-a"), Some(0.0));
        assert_eq!(
            q.admit(&a, 700, t0).unwrap_err(),
            Refusal::TooLarge {
                cost: 700,
                per_minute: 600
            }
        );
    }

    #[test]
    fn keys_of_one_tenant_keep_their_own_buckets() {
        let q = Arc::new(Quotas::default());
        let t0 = Instant::now();
        let limited = caller("a", 100, 0);
        let mut unlimited = caller("a", 0, 0);
        unlimited.key_id = "another-key-of-a".into();
        // An unlimited key's requests neither charge nor empty the bucket
        // of the tenant's limited key.
        let c = q.admit(&unlimited, 1000, t0).unwrap();
        assert_eq!(c.charged(), 0);
        drop(c);
        let _c = q.admit(&limited, 100, t0).unwrap();
        assert_eq!(q.available("key-of-a"), Some(0.0));
        assert!(q.admit(&unlimited, 1000, t0).is_ok());
    }

    #[test]
    fn concurrency_is_bounded_and_released_on_drop() {
        let q = Arc::new(Quotas::default());
        let t0 = Instant::now();
        let a = caller("a", 0, 2);
        let c1 = q.admit(&a, 10, t0).unwrap();
        let _c2 = q.admit(&a, 10, t0).unwrap();
        assert_eq!(
            q.admit(&a, 10, t0).unwrap_err(),
            Refusal::Concurrency { max: 2 }
        );
        drop(c1);
        assert!(q.admit(&a, 10, t0).is_ok());
        assert_eq!(q.running("key-of-a"), 1);
    }
}
