//! The bounds of one run, whatever its plugins do: the total time spent inside plugin calls,
//! the steps of one node, and the steps in a row that make no progress. Each call is bounded
//! by its plugin's deadline, but a plugin that answers fast and never finishes (non-final
//! steps that generate nothing, forever), or one that spends just under its deadline on
//! every call, would hold a run without end; these bounds end it with a typed error naming
//! the plugin and the bound.
//!
//! The runtime sees plugins only through the policy traits, so the budget meters them there:
//! [`MeteredProvider`] wraps a run's [`PolicyProvider`] and every instance it hands out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::engine::{ChatMessage, SamplingParams};
use crate::guard::{GuardSession, Verdict};
use crate::policy::{
    AggregatorSession, CompressorPolicy, Demand, PluginConfig, PluginKind, PolicyError,
    PolicyProvider, RoleInput, RolePolicy, RouteChoice, RouteRequest, RouterPolicy, Source, Step,
    StreamMode,
};
use crate::sync::lock;

/// Time a run's plugins may spend in calls, all together. The built-in policies spend a
/// few milliseconds per run; a compressor that calls a model spends the generation's time
/// (up to its own deadline, `[sandbox] max_call_ms` at most), so this leaves room for one such call and stops
/// a run held by many calls each just under their deadline.
pub const DEFAULT_MAX_PLUGIN_TIME: Duration = Duration::from_secs(90);
/// Steps of one node: the built-in aggregator steps about once per 16-token chunk of each
/// proposer, so a few hundred steps cover the longest answers the engine's context allows.
pub const DEFAULT_MAX_STEPS_PER_NODE: u32 = 1024;
/// Steps in a row that generate nothing while no new input arrived: a policy repeating the
/// same step expects a different answer from the same prompt; a few allow for a model that
/// ends a step early more than once.
pub const DEFAULT_MAX_IDLE_STEPS: u32 = 8;

/// The bounds of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunLimits {
    /// Time inside plugin calls, all plugins of the run together.
    pub plugin_time: Duration,
    /// Steps of one aggregator node.
    pub steps_per_node: u32,
    /// Steps in a row of one node that generate nothing with no new input.
    pub idle_steps: u32,
}

impl Default for RunLimits {
    fn default() -> Self {
        Self {
            plugin_time: DEFAULT_MAX_PLUGIN_TIME,
            steps_per_node: DEFAULT_MAX_STEPS_PER_NODE,
            idle_steps: DEFAULT_MAX_IDLE_STEPS,
        }
    }
}

/// The bound a run went over.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RunBound {
    #[error(
        "the run's plugins spent {spent:?} in calls, over the run's limit of {limit:?} (`RunLimits::plugin_time`)"
    )]
    PluginTime { spent: Duration, limit: Duration },
    #[error("{steps} steps, over the limit of {limit} per node (`RunLimits::steps_per_node`)")]
    Steps { steps: u32, limit: u32 },
    #[error(
        "{steps} steps in a row generated nothing with no new input, over the limit of {limit} (`RunLimits::idle_steps`)"
    )]
    IdleSteps { steps: u32, limit: u32 },
}

/// One run's spending, shared by its nodes.
pub(crate) struct RunBudget {
    limits: RunLimits,
    plugin_time_ns: AtomicU64,
    /// The first bound exceeded and the plugin that exceeded it; the run ends with it.
    exceeded: Mutex<Option<(String, RunBound)>>,
}

impl RunBudget {
    pub(crate) fn new(limits: RunLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            plugin_time_ns: AtomicU64::new(0),
            exceeded: Mutex::new(None),
        })
    }

    /// The bound this run went over, and the plugin that went over it.
    pub(crate) fn exceeded(&self) -> Option<(String, RunBound)> {
        lock(&self.exceeded).clone()
    }

    fn exceed(&self, plugin: &str, bound: RunBound) -> PolicyError {
        let message = format!("plugin `{plugin}`: {bound}");
        lock(&self.exceeded).get_or_insert_with(|| (plugin.to_string(), bound));
        PolicyError(message)
    }

    /// Runs one plugin call, charging its time to the run.
    fn call<T>(
        &self,
        plugin: &str,
        f: impl FnOnce() -> Result<T, PolicyError>,
    ) -> Result<T, PolicyError> {
        let started = Instant::now();
        let result = f();
        let spent = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let total = self
            .plugin_time_ns
            .fetch_add(spent, Ordering::Relaxed)
            .saturating_add(spent);
        let limit = self.limits.plugin_time;
        if u128::from(total) > limit.as_nanos() {
            return Err(self.exceed(
                plugin,
                RunBound::PluginTime {
                    spent: Duration::from_nanos(total),
                    limit,
                },
            ));
        }
        result
    }
}

/// A run's view of a [`PolicyProvider`]: every instance it hands out charges the run.
#[derive(Clone)]
pub(crate) struct MeteredProvider {
    inner: Arc<dyn PolicyProvider>,
    budget: Arc<RunBudget>,
}

impl MeteredProvider {
    pub(crate) fn new(inner: Arc<dyn PolicyProvider>, budget: Arc<RunBudget>) -> Self {
        Self { inner, budget }
    }

    pub(crate) fn budget(&self) -> &RunBudget {
        &self.budget
    }

    fn metered(&self, plugin: &str) -> Meter {
        Meter {
            plugin: plugin.to_string(),
            budget: self.budget.clone(),
            // Looked up once per instance, so a call costs one atomic add (a no-op without
            // a recorder, as in `run`); `serve` exports it on `/metrics`.
            calls: metrics::counter!("staircase_plugin_calls_total", "plugin" => plugin.to_string()),
        }
    }
}

/// What every metered instance holds: its plugin's name, the run's budget and its call counter.
struct Meter {
    plugin: String,
    budget: Arc<RunBudget>,
    calls: metrics::Counter,
}

impl Meter {
    fn call<T>(&self, f: impl FnOnce() -> Result<T, PolicyError>) -> Result<T, PolicyError> {
        self.calls.increment(1);
        self.budget.call(&self.plugin, f)
    }
}

impl PolicyProvider for MeteredProvider {
    fn role(
        &self,
        plugin: &str,
        config: &PluginConfig,
    ) -> Result<Box<dyn RolePolicy>, PolicyError> {
        let meter = self.metered(plugin);
        let inner = meter.call(|| self.inner.role(plugin, config))?;
        Ok(Box::new(MeteredRole { inner, meter }))
    }

    fn aggregator(
        &self,
        plugin: &str,
        config: &PluginConfig,
        conversation: &[ChatMessage],
        sources: &[Source],
        mode: StreamMode,
    ) -> Result<Box<dyn AggregatorSession>, PolicyError> {
        let meter = self.metered(plugin);
        let inner = meter.call(|| {
            self.inner
                .aggregator(plugin, config, conversation, sources, mode)
        })?;
        Ok(Box::new(MeteredSession::new(inner, meter)))
    }

    fn compressor(&self, plugin: &str) -> Result<Box<dyn CompressorPolicy>, PolicyError> {
        let meter = self.metered(plugin);
        let inner = meter.call(|| self.inner.compressor(plugin))?;
        Ok(Box::new(MeteredCompressor { inner, meter }))
    }

    fn router(
        &self,
        plugin: &str,
        config: &PluginConfig,
    ) -> Result<Box<dyn RouterPolicy>, PolicyError> {
        let meter = self.metered(plugin);
        let inner = meter.call(|| self.inner.router(plugin, config))?;
        Ok(Box::new(MeteredRouter { inner, meter }))
    }

    fn guard(
        &self,
        plugin: &str,
        config: &PluginConfig,
        info: &crate::guard::StreamInfo,
    ) -> Result<Box<dyn GuardSession>, PolicyError> {
        let meter = self.metered(plugin);
        let inner = meter.call(|| self.inner.guard(plugin, config, info))?;
        Ok(Box::new(MeteredGuard { inner, meter }))
    }

    fn kind_of(&self, plugin: &str) -> Option<PluginKind> {
        self.inner.kind_of(plugin)
    }
}

struct MeteredGuard {
    inner: Box<dyn GuardSession>,
    meter: Meter,
}

impl GuardSession for MeteredGuard {
    fn window_bytes(&self) -> usize {
        self.inner.window_bytes()
    }

    fn push(
        &mut self,
        window: &str,
        new_bytes: usize,
        tokens: u32,
    ) -> Result<Verdict, PolicyError> {
        let inner = &mut self.inner;
        self.meter.call(|| inner.push(window, new_bytes, tokens))
    }

    fn finish(&mut self, window: &str) -> Result<Verdict, PolicyError> {
        let inner = &mut self.inner;
        self.meter.call(|| inner.finish(window))
    }
}

struct MeteredRole {
    inner: Box<dyn RolePolicy>,
    meter: Meter,
}

impl RolePolicy for MeteredRole {
    fn system_prompt(&mut self) -> Result<String, PolicyError> {
        let inner = &mut self.inner;
        self.meter.call(|| inner.system_prompt())
    }

    fn build_messages(&mut self, input: &RoleInput) -> Result<Vec<ChatMessage>, PolicyError> {
        let inner = &mut self.inner;
        self.meter.call(|| inner.build_messages(input))
    }

    fn params(&mut self) -> Result<SamplingParams, PolicyError> {
        let inner = &mut self.inner;
        self.meter.call(|| inner.params())
    }
}

struct MeteredCompressor {
    inner: Box<dyn CompressorPolicy>,
    meter: Meter,
}

impl CompressorPolicy for MeteredCompressor {
    fn compress(
        &mut self,
        history: &[ChatMessage],
        budget_tokens: u32,
    ) -> Result<Vec<ChatMessage>, PolicyError> {
        let inner = &mut self.inner;
        self.meter.call(|| inner.compress(history, budget_tokens))
    }

    fn run_in_background(&mut self) {
        self.inner.run_in_background();
    }

    fn bill_to(&mut self, account: &crate::policy::ModelAccount) {
        self.inner.bill_to(account);
    }
}

struct MeteredRouter {
    inner: Box<dyn RouterPolicy>,
    meter: Meter,
}

impl RouterPolicy for MeteredRouter {
    fn route(&mut self, request: &RouteRequest) -> Result<RouteChoice, PolicyError> {
        let inner = &mut self.inner;
        self.meter.call(|| inner.route(request))
    }
}

/// An aggregator session that also counts its node's steps: a step is counted when
/// `next-step` asks for one (a warm-up is not a step), so the step over the bound never
/// runs; it made no progress when the runtime reports (`answered`) that it generated
/// nothing and no chunk or finish arrived since the step before.
struct MeteredSession {
    inner: Box<dyn AggregatorSession>,
    meter: Meter,
    steps: u32,
    idle: u32,
    input_since_step: bool,
}

impl MeteredSession {
    fn new(inner: Box<dyn AggregatorSession>, meter: Meter) -> Self {
        Self {
            inner,
            meter,
            steps: 0,
            idle: 0,
            input_since_step: true,
        }
    }
}

impl AggregatorSession for MeteredSession {
    fn push(&mut self, source_id: &str, text: &str) -> Result<Demand, PolicyError> {
        self.input_since_step = true;
        let inner = &mut self.inner;
        self.meter.call(|| inner.push(source_id, text))
    }

    fn finish(&mut self, source_id: &str) -> Result<(), PolicyError> {
        self.input_since_step = true;
        let inner = &mut self.inner;
        self.meter.call(|| inner.finish(source_id))
    }

    fn answered(&mut self, text: &str) -> Result<(), PolicyError> {
        let progress = !text.is_empty() || self.input_since_step;
        self.idle = if progress { 0 } else { self.idle + 1 };
        self.input_since_step = false;
        let limits = self.meter.budget.limits;
        if self.idle > limits.idle_steps {
            return Err(self.meter.budget.exceed(
                &self.meter.plugin,
                RunBound::IdleSteps {
                    steps: self.idle,
                    limit: limits.idle_steps,
                },
            ));
        }
        let inner = &mut self.inner;
        self.meter.call(|| inner.answered(text))
    }

    fn next_step(&mut self) -> Result<Option<Step>, PolicyError> {
        let inner = &mut self.inner;
        let step = self.meter.call(|| inner.next_step())?;
        let warm_up = step
            .as_ref()
            .is_some_and(|s| !s.is_final && s.max_tokens == 0);
        if step.is_some() && !warm_up {
            let limit = self.meter.budget.limits.steps_per_node;
            if self.steps >= limit {
                return Err(self.meter.budget.exceed(
                    &self.meter.plugin,
                    RunBound::Steps {
                        steps: self.steps + 1,
                        limit,
                    },
                ));
            }
            self.steps += 1;
        }
        Ok(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session that asks for a step forever (a unit-test double of a runaway plugin).
    struct Endless;

    fn step() -> Step {
        Step {
            messages: Vec::new(),
            max_tokens: 1,
            is_final: false,
        }
    }

    impl AggregatorSession for Endless {
        fn push(&mut self, _: &str, _: &str) -> Result<Demand, PolicyError> {
            Ok(Demand::More)
        }
        fn finish(&mut self, _: &str) -> Result<(), PolicyError> {
            Ok(())
        }
        fn answered(&mut self, _: &str) -> Result<(), PolicyError> {
            Ok(())
        }
        fn next_step(&mut self) -> Result<Option<Step>, PolicyError> {
            Ok(Some(step()))
        }
    }

    fn session(limits: RunLimits) -> (MeteredSession, Arc<RunBudget>) {
        let budget = RunBudget::new(limits);
        let meter = Meter {
            plugin: "endless".into(),
            budget: budget.clone(),
            calls: metrics::Counter::noop(),
        };
        (MeteredSession::new(Box::new(Endless), meter), budget)
    }

    #[test]
    fn steps_that_generate_nothing_without_new_input_end_the_run() {
        let limits = RunLimits {
            idle_steps: 3,
            ..RunLimits::default()
        };
        let (mut session, budget) = session(limits);
        // The first step follows the run's start (input); then three idle ones are allowed.
        for _ in 0..4 {
            session.answered("").unwrap();
        }
        // New input resets the count.
        session.push("p0", "more").unwrap();
        for _ in 0..4 {
            session.answered("").unwrap();
        }
        let error = session.answered("").unwrap_err();
        assert!(
            error.0.contains("`endless`") && error.0.contains("idle_steps"),
            "{error}"
        );
        assert_eq!(
            budget.exceeded(),
            Some((
                "endless".to_string(),
                RunBound::IdleSteps { steps: 4, limit: 3 }
            ))
        );
    }

    #[test]
    fn a_node_gets_at_most_its_steps() {
        let limits = RunLimits {
            steps_per_node: 5,
            ..RunLimits::default()
        };
        let (mut session, budget) = session(limits);
        for _ in 0..5 {
            session.next_step().unwrap();
            session.answered("text").unwrap();
        }
        assert!(session.next_step().is_err(), "the sixth step is refused");
        assert_eq!(
            budget.exceeded().map(|(_, bound)| bound),
            Some(RunBound::Steps { steps: 6, limit: 5 })
        );
    }

    #[test]
    fn plugin_time_adds_up_over_calls() {
        let budget = RunBudget::new(RunLimits {
            plugin_time: Duration::from_nanos(1),
            ..RunLimits::default()
        });
        // Any call takes more than a nanosecond.
        let error = budget
            .call("slow", || {
                std::hint::black_box((0..1000).sum::<u64>());
                Ok(())
            })
            .unwrap_err();
        assert!(error.0.contains("plugin_time"), "{error}");
        assert!(matches!(
            budget.exceeded(),
            Some((plugin, RunBound::PluginTime { .. })) if plugin == "slow"
        ));
    }
}
