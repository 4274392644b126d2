//! The policy contract: what a pipeline needs from its policies, mirroring the WIT worlds in
//! `wit/v0.1.0/agent.wit`. Both rooms depend on it and neither on the other: the plugin host
//! implements these traits for WebAssembly components, the pipeline runtime calls them and
//! never touches wasmtime. A new plugin kind is a variant of [`PluginKind`] (and its row in
//! [`PluginKind::ALL`]), a trait here, and a method of [`PolicyProvider`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::engine::{CacheNamespace, ChatMessage, Confidence, SamplingParams, Usage};

/// An error a policy returned or caused (a trap, a timeout, a refused call), with the
/// plugin it came from already named in the message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// An upstream node whose output reaches a policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// The node id from the pipeline file.
    pub id: String,
    /// A human-readable label, such as the node's role name.
    pub label: String,
}

/// The finished output of an upstream node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamOutput {
    pub source: Source,
    pub text: String,
}

/// What an agent receives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoleInput {
    pub conversation: Vec<ChatMessage>,
    pub upstream: Vec<UpstreamOutput>,
}

/// An agent's role (WIT `role-policy`).
pub trait RolePolicy: Send {
    fn system_prompt(&mut self) -> Result<String, PolicyError>;
    /// The messages sent to the model, system prompt included.
    fn build_messages(&mut self, input: &RoleInput) -> Result<Vec<ChatMessage>, PolicyError>;
    /// Generation parameters (`seed` is not part of the WIT and stays at its default).
    fn params(&mut self) -> Result<SamplingParams, PolicyError>;
}

/// How a pipeline runs its aggregators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamMode {
    /// Step on the first chunks of the sources, then again as more arrive.
    Staircase,
    /// Classic Mixture-of-Agents: one step once every source is complete.
    Layered,
}

impl StreamMode {
    pub const ALL: [StreamMode; 2] = [StreamMode::Staircase, StreamMode::Layered];

    /// The name the command line, the API and pipeline files use.
    pub fn name(self) -> &'static str {
        match self {
            StreamMode::Staircase => "staircase",
            StreamMode::Layered => "layered",
        }
    }
}

impl fmt::Display for StreamMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for StreamMode {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_in(&Self::ALL, Self::name, "stream mode", s)
    }
}

/// Whether an aggregator still wants a source's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Demand {
    More,
    /// The source has given enough; the runtime may cancel it.
    Enough,
}

/// One generation step of an aggregator model.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// The full prompt of this step; its beginning stays stable across steps.
    pub messages: Vec<ChatMessage>,
    /// Tokens to generate now, continuing the answer so far. On a final step, 0 means
    /// "until the model stops or the node's budget is spent"; on any other step it is a
    /// warm-up: the prompt goes into the prefix cache and nothing is generated.
    pub max_tokens: u32,
    /// Generate until the model stops (or `max_tokens`, when not 0); no step follows.
    pub is_final: bool,
}

/// The staircase policy's state for one run (WIT `aggregator-policy.session`).
pub trait AggregatorSession: Send {
    /// A chunk of a source's output; chunks of one source arrive in order.
    fn push(&mut self, source_id: &str, text: &str) -> Result<Demand, PolicyError>;
    /// The source has no more output.
    fn finish(&mut self, source_id: &str) -> Result<(), PolicyError>;
    /// The aggregator's own answer grew by this text.
    fn answered(&mut self, text: &str) -> Result<(), PolicyError>;
    /// The step to run now, if any; asked after every push and finish.
    fn next_step(&mut self) -> Result<Option<Step>, PolicyError>;
}

/// Who pays for the model calls a plugin makes (WIT `model.complete`): the calls reuse only
/// `namespace`'s cached prefixes and past sessions (a server's tenant; the CLI's one default
/// namespace), and their tokens are counted on `meter`.
#[derive(Clone, Debug, Default)]
pub struct ModelAccount {
    pub namespace: CacheNamespace,
    pub meter: UsageMeter,
}

/// Where tokens go that their run can no longer report: a server charges them to the run's
/// tenant's quota.
#[derive(Clone)]
pub struct LateCharge(Arc<dyn Fn(u64) + Send + Sync>);

impl LateCharge {
    pub fn new(charge: impl Fn(u64) + Send + Sync + 'static) -> Self {
        Self(Arc::new(charge))
    }
}

impl fmt::Debug for LateCharge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LateCharge")
    }
}

/// Counts the tokens of the model calls a run's plugins make: into the run's usage while the
/// run goes; once it has ended ([`Self::close`]; a background compression outlives its run),
/// straight to its [`LateCharge`]. Every token is counted once, in one of the two. Clones
/// share the count.
#[derive(Clone, Debug, Default)]
pub struct UsageMeter(Arc<Mutex<MeterState>>);

#[derive(Debug, Default)]
struct MeterState {
    run: Usage,
    closed: bool,
    late: Option<LateCharge>,
}

impl UsageMeter {
    /// A meter whose tokens after [`Self::close`] go to `late` (none: they are not counted).
    pub fn new(late: Option<LateCharge>) -> Self {
        Self(Arc::new(Mutex::new(MeterState {
            late,
            ..MeterState::default()
        })))
    }

    /// Counts one model call.
    pub fn record(&self, usage: &Usage) {
        let late = {
            let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if !state.closed {
                let run = &mut state.run;
                run.prompt_tokens = run.prompt_tokens.saturating_add(usage.prompt_tokens);
                run.cached_prompt_tokens = run
                    .cached_prompt_tokens
                    .saturating_add(usage.cached_prompt_tokens);
                run.completion_tokens = run
                    .completion_tokens
                    .saturating_add(usage.completion_tokens);
                return;
            }
            state.late.clone()
        };
        // Outside the lock: the charge takes the owner's own lock.
        if let Some(LateCharge(charge)) = late {
            charge(u64::from(usage.prompt_tokens) + u64::from(usage.completion_tokens));
        }
    }

    /// Ends the run's share and returns it; later calls go to the late charge.
    pub fn close(&self) -> Usage {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        state.closed = true;
        state.run.clone()
    }
}

/// Shortens a history to a token budget (WIT `compressor-policy`).
pub trait CompressorPolicy: Send {
    fn compress(
        &mut self,
        history: &[ChatMessage],
        budget_tokens: u32,
    ) -> Result<Vec<ChatMessage>, PolicyError>;

    /// From now on, the model calls this compressor makes are background-class engine
    /// requests (`Priority::BACKGROUND`): a conversation's memory compresses for a later
    /// turn, so nobody waits for it. A compressor that calls no model ignores it.
    fn run_in_background(&mut self) {}

    /// From now on, the model calls this compressor makes are paid by `account`: the run
    /// (and tenant) whose conversation it compresses. A compressor that calls no model
    /// ignores it.
    fn bill_to(&mut self, _account: &ModelAccount) {}
}

/// What a router knows about a step (WIT 0.2.0 `router-policy.route-request`; a 0.1.0
/// router sees the first four fields).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteRequest {
    pub node_id: String,
    pub prompt_tokens: u32,
    pub query: String,
    pub models: Vec<String>,
    /// The node's label.
    pub role: String,
    /// Tokens of the node's answer so far.
    pub answer_tokens: u32,
    /// The node's budget for its whole answer.
    pub max_tokens: u32,
    /// The model of the node's previous step.
    pub previous_model: Option<String>,
    /// How sure `previous_model` was of the previous step's tokens, when its engine says.
    pub confidence: Option<Confidence>,
}

/// A router's answer: a model and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteChoice {
    /// One of the request's models.
    pub model: String,
    /// The router's reason (empty from a 0.1.0 router, which gives none).
    pub reason: String,
}

/// Chooses a model per step (WIT `router-policy`).
pub trait RouterPolicy: Send {
    fn route(&mut self, request: &RouteRequest) -> Result<RouteChoice, PolicyError>;
}

/// Per-node plugin settings from a pipeline file (`[nodes.config]`), key to value.
pub type PluginConfig = BTreeMap<String, String>;

/// Where a pipeline gets its policies by name. The plugin registry implements it; each call
/// returns a fresh instance on the newest version, so a run keeps the version it started with.
pub trait PolicyProvider: Send + Sync {
    // Role, aggregator and router instances take the node's `config` table from the
    // pipeline file (a plugin reads it through `host.config`). One method per kind, with the
    // settings required: a provider cannot drop them by implementing a variant without them.
    fn role(&self, plugin: &str, config: &PluginConfig)
    -> Result<Box<dyn RolePolicy>, PolicyError>;
    fn aggregator(
        &self,
        plugin: &str,
        config: &PluginConfig,
        conversation: &[ChatMessage],
        sources: &[Source],
        mode: StreamMode,
    ) -> Result<Box<dyn AggregatorSession>, PolicyError>;
    fn compressor(&self, plugin: &str) -> Result<Box<dyn CompressorPolicy>, PolicyError>;
    fn router(
        &self,
        plugin: &str,
        config: &PluginConfig,
    ) -> Result<Box<dyn RouterPolicy>, PolicyError>;
    /// A guard on one stream, whose `config` import sees `config`.
    fn guard(
        &self,
        plugin: &str,
        config: &PluginConfig,
        info: &crate::guard::StreamInfo,
    ) -> Result<Box<dyn crate::guard::GuardSession>, PolicyError>;
    /// Whether a plugin of that name exists, and of which kind (for validation).
    fn kind_of(&self, plugin: &str) -> Option<PluginKind>;
}

/// The plugin kinds, one WIT world each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    Role,
    Aggregator,
    Compressor,
    Router,
    /// An output guard (WIT 0.3.0): sees a stream's text before it leaves.
    Guard,
}

impl PluginKind {
    pub const ALL: [PluginKind; 5] = [
        PluginKind::Role,
        PluginKind::Aggregator,
        PluginKind::Compressor,
        PluginKind::Router,
        PluginKind::Guard,
    ];

    /// The name manifests, messages and the WIT worlds use: the one table of kind names.
    pub fn name(self) -> &'static str {
        match self {
            PluginKind::Role => "role",
            PluginKind::Aggregator => "aggregator",
            PluginKind::Compressor => "compressor",
            PluginKind::Router => "router",
            PluginKind::Guard => "guard",
        }
    }

    /// The name with its article, for messages ("an aggregator").
    pub fn with_article(self) -> String {
        let name = self.name();
        let article = if name.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        format!("{article} {name}")
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PluginKind {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_in(&Self::ALL, Self::name, "plugin kind", s)
    }
}

/// A name that is not in one of the tables above.
#[derive(Debug, thiserror::Error)]
#[error("unknown {what} `{name}` (known: {known})")]
pub struct UnknownName {
    what: &'static str,
    name: String,
    known: String,
}

fn parse_in<T: Copy>(
    all: &[T],
    name_of: fn(T) -> &'static str,
    what: &'static str,
    name: &str,
) -> Result<T, UnknownName> {
    all.iter()
        .copied()
        .find(|v| name_of(*v).eq_ignore_ascii_case(name))
        .ok_or_else(|| UnknownName {
            what,
            name: name.to_string(),
            known: all
                .iter()
                .map(|v| name_of(*v))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_meter_counts_each_call_once_in_the_run_or_after_it_to_the_late_charge() {
        let late = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let charged = late.clone();
        let meter = UsageMeter::new(Some(LateCharge::new(move |tokens| {
            charged.fetch_add(tokens, std::sync::atomic::Ordering::SeqCst);
        })));
        let call = Usage {
            prompt_tokens: 10,
            cached_prompt_tokens: 4,
            completion_tokens: 5,
        };
        meter.clone().record(&call);
        meter.record(&call);
        let run = meter.close();
        assert_eq!(run.prompt_tokens, 20);
        assert_eq!(run.cached_prompt_tokens, 8);
        assert_eq!(run.completion_tokens, 10);
        assert_eq!(late.load(std::sync::atomic::Ordering::SeqCst), 0);
        // After the run: the owner is charged, the run's share stays as reported.
        meter.record(&call);
        assert_eq!(late.load(std::sync::atomic::Ordering::SeqCst), 15);
        assert_eq!(meter.close(), run);
    }

    #[test]
    fn every_name_round_trips_and_matches_serde() {
        for kind in PluginKind::ALL {
            let name = kind.name();
            assert_eq!(name.parse::<PluginKind>().ok(), Some(kind));
            assert_eq!(
                serde_json::to_value(kind).ok(),
                Some(serde_json::json!(name))
            );
        }
        for mode in StreamMode::ALL {
            let name = mode.name();
            assert_eq!(name.parse::<StreamMode>().ok(), Some(mode));
            assert_eq!(
                serde_json::to_value(mode).ok(),
                Some(serde_json::json!(name))
            );
        }
    }

    #[test]
    fn an_unknown_name_lists_the_known_ones() {
        let err = "judge".parse::<PluginKind>().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "unknown plugin kind `judge` (known: role, aggregator, compressor, router, guard)"
            )
        );
        assert_eq!(PluginKind::Aggregator.with_article(), "an aggregator");
        assert_eq!(PluginKind::Router.with_article(), "a router");
    }
}
