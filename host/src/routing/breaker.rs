//! A circuit breaker per replica: after `failure_threshold` failures in a row the replica is
//! open (not routed to) for `open_for`; then it is half-open: requests may try it again, and
//! the first success (a request or a health check) closes it while a failure opens it again.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Failures in a row that open the breaker: one refused connection is noise, a few in a row
/// mean the replica is down.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
/// How long an open breaker keeps requests away before they may try again: long enough not
/// to hammer a restarting server, short against the minutes a pipeline runs.
pub const DEFAULT_OPEN_FOR: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    #[serde(with = "secs")]
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            open_for: DEFAULT_OPEN_FOR,
        }
    }
}

/// Durations as seconds (fractions allowed) in configuration files.
pub(crate) mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Clone, Debug)]
pub struct Breaker {
    config: BreakerConfig,
    failures: u32,
    opened_at: Option<Instant>,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            failures: 0,
            opened_at: None,
        }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.opened_at {
            None => BreakerState::Closed,
            Some(at) if now.duration_since(at) < self.config.open_for => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Whether a request may go to the replica now.
    pub fn allows(&self, now: Instant) -> bool {
        self.state(now) != BreakerState::Open
    }

    pub fn record_success(&mut self) {
        self.failures = 0;
        self.opened_at = None;
    }

    pub fn record_failure(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let half_open = self.state(now) == BreakerState::HalfOpen;
        if half_open || self.failures >= self.config.failure_threshold {
            self.opened_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_and_half_opens_after_the_cooldown() {
        let config = BreakerConfig {
            failure_threshold: 2,
            open_for: Duration::from_secs(10),
        };
        let mut breaker = Breaker::new(config);
        let t0 = Instant::now();
        breaker.record_failure(t0);
        assert_eq!(breaker.state(t0), BreakerState::Closed);
        breaker.record_failure(t0);
        assert_eq!(breaker.state(t0), BreakerState::Open);
        assert!(!breaker.allows(t0 + Duration::from_secs(9)));
        let later = t0 + Duration::from_secs(10);
        assert_eq!(breaker.state(later), BreakerState::HalfOpen);
        // One failure while half-open opens it again at once.
        breaker.record_failure(later);
        assert_eq!(breaker.state(later), BreakerState::Open);
        breaker.record_success();
        assert_eq!(breaker.state(later), BreakerState::Closed);
    }

    #[test]
    fn a_success_resets_the_count() {
        let mut breaker = Breaker::new(BreakerConfig {
            failure_threshold: 2,
            open_for: Duration::from_secs(1),
        });
        let now = Instant::now();
        breaker.record_failure(now);
        breaker.record_success();
        breaker.record_failure(now);
        assert_eq!(breaker.state(now), BreakerState::Closed);
    }
}
