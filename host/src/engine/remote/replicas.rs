//! The replicas of one remote model: their health, breakers and load, the routing policy
//! that picks one per try, and the counters `/metrics` and `bench routing` read. One lock
//! over all of them, held only to choose or record (never across I/O).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::routing::{
    Breaker, BreakerConfig, BreakerState, Policy, ReplicaView, RouteHint, RouteRequest,
};

struct State {
    healthy: bool,
    /// A health check failed since the breaker last closed: a later pass means the replica
    /// was down and came back.
    seen_down: bool,
    breaker: Breaker,
    in_flight: usize,
    /// Requests in flight per run, per node (for the pipeline-aware policy).
    runs: HashMap<u64, HashMap<String, usize>>,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    predicted_hit_chars: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_prompt_tokens: AtomicU64,
}

/// See the module documentation.
pub struct Replicas {
    urls: Vec<String>,
    states: Mutex<Vec<State>>,
    counters: Vec<Counters>,
    policy: Box<dyn Policy>,
}

/// One replica's figures, for `/metrics`, status pages and benchmarks.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaStats {
    pub url: String,
    pub healthy: bool,
    pub breaker: BreakerState,
    pub in_flight: usize,
    /// Tries sent to it.
    pub requests: u64,
    /// Tries that failed (connect errors, timeouts, error statuses, broken streams).
    pub errors: u64,
    /// Prompt characters the routing policy expected it to have cached, summed.
    pub predicted_hit_chars: u64,
    /// Prompt tokens and cached prompt tokens, as the server reported them.
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
}

/// A try in flight on one replica; dropping it ends the try's share of the load.
pub struct Lease {
    replicas: Arc<Replicas>,
    pub index: usize,
    hint: Option<RouteHint>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut states = self.replicas.lock();
        let state = &mut states[self.index];
        state.in_flight = state.in_flight.saturating_sub(1);
        if let Some(hint) = &self.hint
            && let Some(nodes) = state.runs.get_mut(&hint.run)
        {
            if let Some(n) = nodes.get_mut(&hint.node) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    nodes.remove(&hint.node);
                }
            }
            if nodes.is_empty() {
                state.runs.remove(&hint.run);
            }
        }
    }
}

impl Replicas {
    pub fn new(urls: Vec<String>, policy: Box<dyn Policy>, breaker: &BreakerConfig) -> Self {
        Self {
            states: Mutex::new(
                urls.iter()
                    .map(|_| State {
                        // Routable until a health check or a request says otherwise.
                        healthy: true,
                        seen_down: false,
                        breaker: Breaker::new(breaker.clone()),
                        in_flight: 0,
                        runs: HashMap::new(),
                    })
                    .collect(),
            ),
            counters: urls.iter().map(|_| Counters::default()).collect(),
            urls,
            policy,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<State>> {
        // Counters and flags only: still right after a panic elsewhere.
        self.states
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many replicas there are.
    pub fn count(&self) -> usize {
        self.urls.len()
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    pub fn url(&self, index: usize) -> &str {
        &self.urls[index]
    }

    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    /// Picks a replica for one try, skipping those in `skip`, and counts the try as in
    /// flight there until the lease is dropped. `None` when no replica is available.
    pub fn choose(
        self: &Arc<Self>,
        text: &str,
        hint: Option<&RouteHint>,
        skip: &[bool],
    ) -> Option<Lease> {
        let now = Instant::now();
        let mut states = self.lock();
        let views: Vec<ReplicaView> = states
            .iter()
            .enumerate()
            .map(|(index, state)| ReplicaView {
                available: state.healthy
                    && state.breaker.allows(now)
                    && !skip.get(index).copied().unwrap_or(false),
                in_flight: state.in_flight,
                run_in_flight: hint
                    .and_then(|h| state.runs.get(&h.run).map(|nodes| (h, nodes)))
                    .map_or(0, |(h, nodes)| {
                        nodes
                            .iter()
                            .filter(|(node, _)| **node != h.node)
                            .map(|(_, n)| n)
                            .sum()
                    }),
            })
            .collect();
        let index = self
            .policy
            .select(&RouteRequest { text, hint }, &views)
            .filter(|&i| views.get(i).is_some_and(|v| v.available))?;
        let state = &mut states[index];
        state.in_flight += 1;
        if let Some(hint) = hint {
            *state
                .runs
                .entry(hint.run)
                .or_default()
                .entry(hint.node.clone())
                .or_default() += 1;
        }
        drop(states);
        let counters = &self.counters[index];
        counters.requests.fetch_add(1, Ordering::Relaxed);
        let hit = self.policy.predicted_hit(text, index) as u64;
        counters
            .predicted_hit_chars
            .fetch_add(hit, Ordering::Relaxed);
        Some(Lease {
            replicas: self.clone(),
            index,
            hint: hint.cloned(),
        })
    }

    /// A try on `index` finished: closes its breaker.
    pub fn succeeded(&self, index: usize, prompt_tokens: u32, cached_prompt_tokens: u32) {
        let mut states = self.lock();
        states[index].breaker.record_success();
        states[index].healthy = true;
        drop(states);
        let counters = &self.counters[index];
        counters
            .prompt_tokens
            .fetch_add(prompt_tokens.into(), Ordering::Relaxed);
        counters
            .cached_prompt_tokens
            .fetch_add(cached_prompt_tokens.into(), Ordering::Relaxed);
    }

    /// A try on `index` failed. `replica_fault` is false for answers about the request (a
    /// 4xx) or the load (a 429), which say nothing about the replica's health.
    pub fn failed(&self, index: usize, replica_fault: bool) {
        self.counters[index].errors.fetch_add(1, Ordering::Relaxed);
        if replica_fault {
            self.lock()[index].breaker.record_failure(Instant::now());
        }
    }

    /// A health check's verdict. A pass after a failed check (the replica went down and came
    /// back, e.g. restarted) closes its breaker; so does a pass once the cool-down is over. A
    /// replica that stays up but fails requests keeps its breaker open for the cool-down.
    pub fn health(&self, index: usize, healthy: bool) {
        let mut states = self.lock();
        let state = &mut states[index];
        state.healthy = healthy;
        if !healthy {
            state.seen_down = true;
        } else if state.seen_down || state.breaker.state(Instant::now()) == BreakerState::HalfOpen {
            state.breaker.record_success();
            state.seen_down = false;
        }
    }

    pub fn stats(&self) -> Vec<ReplicaStats> {
        let now = Instant::now();
        let states = self.lock();
        states
            .iter()
            .zip(&self.counters)
            .zip(&self.urls)
            .map(|((state, counters), url)| ReplicaStats {
                url: url.clone(),
                healthy: state.healthy,
                breaker: state.breaker.state(now),
                in_flight: state.in_flight,
                requests: counters.requests.load(Ordering::Relaxed),
                errors: counters.errors.load(Ordering::Relaxed),
                predicted_hit_chars: counters.predicted_hit_chars.load(Ordering::Relaxed),
                prompt_tokens: counters.prompt_tokens.load(Ordering::Relaxed),
                cached_prompt_tokens: counters.cached_prompt_tokens.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// Checks every replica's health once, concurrently, with the API key when there is one (a
/// keyed server may refuse an anonymous `/health`). An empty `path` checks nothing.
pub async fn check_health(
    replicas: &Replicas,
    client: &reqwest::Client,
    api_key: Option<&str>,
    path: &str,
    timeout: Duration,
) {
    if path.is_empty() {
        return;
    }
    let checks = (0..replicas.count()).map(|index| {
        let mut request = client.get(format!("{}{}", replicas.url(index), path));
        if let Some(key) = api_key {
            request = request.bearer_auth(key);
        }
        async move {
            let ok = matches!(
                tokio::time::timeout(timeout, request.send()).await,
                Ok(Ok(response)) if response.status().is_success()
            );
            (index, ok)
        }
    });
    for (index, ok) in futures_util::future::join_all(checks).await {
        if !ok {
            tracing::debug!(replica = replicas.url(index), "health check failed");
        }
        replicas.health(index, ok);
    }
}
