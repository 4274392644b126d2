//! Replica choice: which of several servers of one model gets a request. One file per
//! policy behind [`Policy`], the SGLang gateway's approximate radix tree in `tree.rs`, and the
//! per-replica circuit breaker in `breaker.rs`. This room only decides; it sends nothing (the
//! remote engine owns the HTTP side, health checks and retries) and never blocks.

pub mod breaker;
pub mod cache_aware;
pub mod least_load;
pub mod pipeline_aware;
pub mod round_robin;
pub mod tree;

use serde::{Deserialize, Serialize};

pub use self::breaker::{Breaker, BreakerConfig, BreakerState};
pub use self::cache_aware::{CacheAware, CacheAwareConfig};
pub use self::least_load::LeastLoad;
pub use self::pipeline_aware::{PipelineAware, PipelineAwareConfig};
pub use self::round_robin::RoundRobin;

/// Which run and node a request belongs to, when a pipeline sent it. A pipeline puts it in
/// the request's `extensions`; the pipeline-aware policy keeps a node's successive steps on
/// one replica and spreads the nodes of one run. Other policies ignore it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RouteHint {
    pub run: u64,
    pub node: String,
}

/// What a policy sees of one request.
#[derive(Clone, Copy, Debug)]
pub struct RouteRequest<'a> {
    /// The prompt as text (the messages concatenated in order): what replicas may have cached.
    pub text: &'a str,
    pub hint: Option<&'a RouteHint>,
}

/// What a policy sees of one replica at the moment of choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaView {
    /// Whether it may be chosen: healthy, breaker not open, not already tried for this request.
    pub available: bool,
    /// Requests it is serving now.
    pub in_flight: usize,
    /// Of those, requests of other nodes of this request's run (0 without a hint).
    pub run_in_flight: usize,
}

/// A routing policy. `select` is also where a policy learns: it records that the request's
/// text went to the replica it returns.
pub trait Policy: Send + Sync {
    fn name(&self) -> &'static str;

    /// The index of an available replica, or `None` when none is available.
    fn select(&self, request: &RouteRequest<'_>, replicas: &[ReplicaView]) -> Option<usize>;

    /// Characters of `text` the policy believes `replica` has cached (for metrics).
    fn predicted_hit(&self, _text: &str, _replica: usize) -> usize {
        0
    }
}

/// The policies by name, as `staircase.toml` and `bench routing` name them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case", deny_unknown_fields)]
pub enum PolicyConfig {
    CacheAware(#[serde(default)] CacheAwareConfig),
    #[default]
    PipelineAware,
    RoundRobin,
    LeastLoad,
}

impl PolicyConfig {
    pub fn build(&self) -> Box<dyn Policy> {
        match self {
            Self::CacheAware(config) => Box::new(CacheAware::new(config.clone())),
            Self::PipelineAware => Box::new(PipelineAware::new(PipelineAwareConfig::default())),
            Self::RoundRobin => Box::new(RoundRobin::default()),
            Self::LeastLoad => Box::new(LeastLoad),
        }
    }

    /// Every policy with its defaults, for comparisons.
    pub fn all() -> Vec<Self> {
        vec![
            Self::CacheAware(CacheAwareConfig::default()),
            Self::PipelineAware,
            Self::RoundRobin,
            Self::LeastLoad,
        ]
    }
}

/// The available replica with the fewest requests in flight (lowest index on a tie).
pub(crate) fn least_loaded(replicas: &[ReplicaView]) -> Option<usize> {
    replicas
        .iter()
        .enumerate()
        .filter(|(_, r)| r.available)
        .min_by_key(|(index, r)| (r.in_flight, *index))
        .map(|(index, _)| index)
}

#[cfg(test)]
pub(crate) fn views(loads: &[usize]) -> Vec<ReplicaView> {
    loads
        .iter()
        .map(|&in_flight| ReplicaView {
            available: true,
            in_flight,
            run_in_flight: 0,
        })
        .collect()
}
