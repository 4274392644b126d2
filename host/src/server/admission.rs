//! The bounded queue: at most `max_running` runs at once, at most `queue` more waiting;
//! past that a request is refused at once (429) instead of waiting without bound.
//!
//! Each tenant also has its own share ([`Quota`]): at most `max_requests` of its requests
//! running or queued, so one tenant cannot fill the whole queue, and optionally a budget of
//! tokens per minute. A tenant over its share gets a 429 of its own while other tenants are
//! still admitted. This room counts and refuses; it must not know who a tenant is (that is
//! `tenant`'s job) or run anything.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use super::lock;

pub(crate) struct Admission {
    /// Running plus waiting.
    admitted: Arc<Semaphore>,
    running: Arc<Semaphore>,
    capacity: usize,
    max_running: usize,
}

/// One tenant's share of the server: its requests in flight and its token budget.
#[derive(Debug)]
pub(crate) struct Quota {
    /// Requests of the tenant running or queued.
    requests: Arc<Semaphore>,
    max_requests: usize,
    tokens: Option<Mutex<TokenBucket>>,
}

/// A budget of tokens per minute, refilled continuously: a request is admitted while the
/// bucket is not empty and charged what it used when it ends, so a burst may overdraw it once
/// and then waits until the refill covers the overdraft.
#[derive(Debug)]
struct TokenBucket {
    per_minute: u64,
    level: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(per_minute: u64) -> Self {
        Self {
            per_minute,
            level: per_minute as f64,
            at: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let per_second = self.per_minute as f64 / 60.0;
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * per_second).min(self.per_minute as f64);
        self.at = now;
    }
}

impl Quota {
    /// `max_requests` running or queued at once (at least 1); `tokens_per_minute` when set.
    pub(crate) fn new(max_requests: usize, tokens_per_minute: Option<u64>) -> Self {
        let max_requests = max_requests.max(1);
        Self {
            requests: Arc::new(Semaphore::new(max_requests)),
            max_requests,
            tokens: tokens_per_minute.map(|n| Mutex::new(TokenBucket::new(n))),
        }
    }

    /// 429 when the tenant has spent its token budget (until the refill covers it).
    fn check_tokens(&self) -> Result<(), ApiError> {
        let Some(bucket) = &self.tokens else {
            return Ok(());
        };
        let mut bucket = lock(bucket);
        bucket.refill();
        if bucket.level > 0.0 {
            Ok(())
        } else {
            Err(ApiError::rate_limited(format!(
                "Your token budget of {} tokens per minute is spent; retry later",
                bucket.per_minute
            )))
        }
    }

    /// Charges `tokens` a request used against the budget.
    pub(crate) fn charge(&self, tokens: u64) {
        if let Some(bucket) = &self.tokens {
            let mut bucket = lock(bucket);
            bucket.refill();
            bucket.level -= tokens as f64;
        }
    }
}

/// A request's place: in the queue until [`Ticket::start`] returns.
pub(crate) struct Ticket {
    _tenant: OwnedSemaphorePermit,
    _admitted: OwnedSemaphorePermit,
    running: Arc<Semaphore>,
}

/// Held while a run runs.
pub(crate) struct Running {
    _tenant: OwnedSemaphorePermit,
    _admitted: OwnedSemaphorePermit,
    _running: OwnedSemaphorePermit,
}

impl Admission {
    pub(crate) fn new(max_running: usize, queue: usize) -> Self {
        let max_running = max_running.max(1);
        Self {
            admitted: Arc::new(Semaphore::new(max_running + queue)),
            running: Arc::new(Semaphore::new(max_running)),
            capacity: max_running + queue,
            max_running,
        }
    }

    /// A place in the queue for a request of the tenant with `quota`, or 429 when the tenant
    /// is over its share or the queue is full.
    pub(crate) fn admit(&self, quota: &Quota) -> Result<Ticket, ApiError> {
        quota.check_tokens()?;
        let tenant = quota.requests.clone().try_acquire_owned().map_err(|_| {
            ApiError::rate_limited(format!(
                "You have {} requests running or queued, your share of this server; retry \
                 when one ends",
                quota.max_requests
            ))
        })?;
        let admitted = self
            .admitted
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::overloaded())?;
        Ok(Ticket {
            _tenant: tenant,
            _admitted: admitted,
            running: self.running.clone(),
        })
    }

    /// Runs now running, and requests waiting for a slot.
    pub(crate) fn depth(&self) -> (usize, usize) {
        let admitted = self.capacity - self.admitted.available_permits();
        let running = self.max_running - self.running.available_permits();
        (running, admitted.saturating_sub(running))
    }
}

impl Ticket {
    /// Waits for a run slot.
    pub(crate) async fn start(self) -> Running {
        let running = self
            .running
            .acquire_owned()
            .await
            .expect("the admission semaphore is never closed");
        Running {
            _tenant: self._tenant,
            _admitted: self._admitted,
            _running: running,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unlimited() -> Quota {
        Quota::new(usize::MAX >> 4, None)
    }

    #[tokio::test]
    async fn past_the_queue_requests_are_refused_and_a_freed_place_is_reused() {
        let admission = Admission::new(1, 1);
        let quota = unlimited();
        let first = admission.admit(&quota).unwrap().start().await;
        let second = admission.admit(&quota).unwrap();
        assert_eq!(admission.depth(), (1, 1));
        assert_eq!(admission.admit(&quota).err().unwrap().status, 429);
        drop(first);
        let _second = second.start().await;
        assert_eq!(admission.depth(), (1, 0));
        assert!(admission.admit(&quota).is_ok());
    }

    #[tokio::test]
    async fn a_tenant_at_its_share_is_refused_while_another_is_admitted() {
        let admission = Admission::new(1, 8);
        let (a, b) = (Quota::new(2, None), Quota::new(2, None));
        let first = admission.admit(&a).unwrap().start().await;
        let _queued = admission.admit(&a).unwrap();
        let refused = admission.admit(&a).err().unwrap();
        assert_eq!(refused.status, 429);
        assert!(
            refused.message.contains("your share"),
            "{}",
            refused.message
        );
        assert!(admission.admit(&b).is_ok(), "another tenant still gets in");
        drop(first);
        assert!(
            admission.admit(&a).is_ok(),
            "a freed place is the tenant's again"
        );
    }

    #[test]
    fn a_spent_token_budget_refuses_until_it_refills() {
        let admission = Admission::new(4, 4);
        let quota = Quota::new(4, Some(600));
        drop(admission.admit(&quota).unwrap());
        quota.charge(601);
        assert_eq!(admission.admit(&quota).err().unwrap().status, 429);
        // A minute's refill covers the overdraft.
        if let Some(bucket) = &quota.tokens {
            lock(bucket).at -= std::time::Duration::from_secs(60);
        }
        assert!(admission.admit(&quota).is_ok());
    }
}
