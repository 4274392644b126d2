//! The one way in: `run`, `serve`, `eval` and `tune` turn a request into a run here, the same
//! way, and the benchmarks get their runners here ([`super::App::launcher_on`]). [`Launcher::prepare`] chooses the declared variant
//! that fits the budget under the load now, shapes the pipeline (the configured and asked
//! token caps on every node, a client's sampling fields on the answering node), pins the
//! plugin versions serving now and names them in the fingerprint; [`PreparedRun::run`] runs
//! it and hands back a typed [`RunOutcome`]. Front ends parse, call and format; none of them
//! reshapes a pipeline or reads an answer out of the event stream. This room prepares and
//! runs one request; it owns no HTTP, terminal or queue.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::pinned::{self, Pinned, PinnedPlugin};
use super::pipelines::PipelineVersion;
use crate::pipeline::adaptive::{self, Choice};
use crate::pipeline::plugin_log::{self, PluginLine};
use crate::pipeline::spec::ParamOverrides;
use crate::pipeline::{
    NodeIndex, Pipeline, Recorder, RunError, RunEvent, RunId, RunReport, RunRequest, Runner,
};
use crate::plugin::Registry;

/// What a front end asks to run.
pub struct RunSpec {
    /// The run's one id, given out before it starts (a server names it in its response).
    pub id: RunId,
    /// The pipeline as declared (its variants included).
    pub pipeline: Arc<Pipeline>,
    /// The table's version of it, when it came from the table (the fingerprint names it).
    pub version: Option<Arc<PipelineVersion>>,
    pub request: RunRequest,
    /// Sampling fields a client set, over the answering node's own.
    pub answer_params: Option<ParamOverrides>,
    /// A cap on every node's output (`--max-tokens`, a server's limit); the configured
    /// `[limits] max_tokens` applies as well.
    pub max_tokens: Option<u32>,
    /// The critical path the answer should fit in (else the file's budget).
    pub latency_budget: Option<Duration>,
}

impl RunSpec {
    /// `version` of the pipeline table on `request`, as run `id`.
    pub fn served(id: RunId, version: Arc<PipelineVersion>, request: RunRequest) -> Self {
        Self {
            version: Some(version.clone()),
            ..Self::new(id, version.pipeline.clone(), request)
        }
    }

    /// `pipeline` (one built by the caller: an evaluation's variant) on `request`, as run
    /// `id`.
    pub fn new(id: RunId, pipeline: impl Into<Arc<Pipeline>>, request: RunRequest) -> Self {
        Self {
            id,
            pipeline: pipeline.into(),
            version: None,
            request,
            answer_params: None,
            max_tokens: None,
            latency_budget: None,
        }
    }

    /// Runs the file's own nodes: no declared variant is chosen (an evaluation or a
    /// measurement runs exactly what it names).
    pub fn as_written(mut self) -> Self {
        Arc::make_mut(&mut self.pipeline).adaptive = Default::default();
        self
    }

    /// A pipeline of the caller's on one prompt, as written, as a new run: how an
    /// evaluation or a measurement runs.
    pub fn measured(pipeline: Pipeline, request: RunRequest) -> Result<Self, RunError> {
        Ok(Self::new(RunId::random()?, pipeline, request).as_written())
    }
}

/// The runner, the plugins to pin and the configured caps every run goes through. An
/// [`super::App`] has one on its models; [`super::App::launcher_on`] makes one on another
/// engine with the same configuration.
#[derive(Clone)]
pub struct Launcher {
    runner: Arc<Runner>,
    registry: Arc<Registry>,
    /// `[limits] max_tokens`.
    max_tokens: Option<u32>,
}

impl Launcher {
    /// Runs of `runner`, their plugins pinned from `registry`, every node capped at
    /// `max_tokens` when set.
    pub fn new(runner: Arc<Runner>, registry: Arc<Registry>, max_tokens: Option<u32>) -> Self {
        Self {
            runner,
            registry,
            max_tokens,
        }
    }

    pub fn runner(&self) -> &Arc<Runner> {
        &self.runner
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Everything a run needs before it starts. Waits, without holding a thread, for any
    /// plugin of the chosen pipeline still waiting for its first compile, so a run never
    /// compiles on the runtime.
    pub async fn prepare(&self, spec: RunSpec) -> PreparedRun {
        let (chosen, variant) = adaptive::choose(
            &self.runner,
            &spec.pipeline,
            &spec.request,
            spec.latency_budget,
        );
        let pipeline = self.shaped(chosen, &spec);
        for name in pinned::plugin_names(&pipeline) {
            self.registry.compiled(&name).await;
        }
        let pinned = Pinned::new(self.registry.clone(), &pipeline);
        let plugins = pinned.versions();
        let fingerprint = Fingerprint::of(
            spec.version
                .as_deref()
                .map_or(pipeline.name.clone(), |v| v.label()),
            &plugins,
        );
        PreparedRun {
            id: spec.id,
            runner: self.runner.with_policies(Arc::new(pinned)),
            pipeline,
            request: spec.request,
            version: spec.version,
            plugins,
            variant,
            fingerprint,
        }
    }

    /// `chosen` with the caps on every node, then the asked sampling on the answering node.
    fn shaped(&self, mut pipeline: Pipeline, spec: &RunSpec) -> Pipeline {
        // The configured cap bounds what the file asks for; the request may then lower it.
        let cap = match (self.max_tokens, spec.max_tokens) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(max) = cap {
            pipeline.limit_tokens(max);
        }
        if let Some(asked) = &spec.answer_params {
            let params = &mut pipeline.nodes[pipeline.output.0].params;
            // A request's own `max_tokens` can only lower the cap.
            let max_tokens = match (asked.max_tokens, params.max_tokens) {
                (Some(max), cap) => Some(cap.map_or(max, |cap| cap.min(max))),
                (None, cap) => cap,
            };
            *params = asked.clone().or(params.clone());
            params.max_tokens = max_tokens;
        }
        pipeline
    }
}

/// What one run ran: its pipeline (the table's version of it) and its plugins' versions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// `pipeline` (its table label, or its name), then each plugin as
    /// `name@version:sha-prefix`, joined by `;`.
    fn of(pipeline: String, plugins: &[PinnedPlugin]) -> Self {
        let parts = std::iter::once(pipeline).chain(plugins.iter().map(PinnedPlugin::label));
        Self(parts.collect::<Vec<_>>().join(";"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A run ready to start.
pub struct PreparedRun {
    id: RunId,
    runner: Runner,
    pipeline: Pipeline,
    request: RunRequest,
    version: Option<Arc<PipelineVersion>>,
    plugins: Vec<PinnedPlugin>,
    variant: Option<Choice>,
    fingerprint: Fingerprint,
}

/// What a run shows while it goes.
pub enum Progress<'a> {
    /// Anything the run recorded.
    Event(&'a RunEvent),
    /// The text the answer grew by (the answering node's delta, also seen as an event).
    Answer(&'a str),
}

impl PreparedRun {
    pub fn id(&self) -> RunId {
        self.id
    }

    /// The pipeline that runs: the chosen variant, shaped.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Which declared variant runs and why, when the pipeline has variants.
    pub fn variant(&self) -> Option<&Choice> {
        self.variant.as_ref()
    }

    /// Runs, recording every event on `recorder` (a server's live run; its subscribers watch
    /// it) and showing each to `watch` as it happens. Dropping the future cancels every node.
    pub async fn run(
        self,
        recorder: &Recorder,
        mut watch: impl FnMut(Progress<'_>),
    ) -> Result<RunOutcome, RunError> {
        let (events_tx, mut events) = mpsc::unbounded_channel();
        recorder.forward(events_tx);
        let output = self.pipeline.output;
        let mut on_event = |event: RunEvent| {
            watch(Progress::Event(&event));
            if let RunEvent::NodeDelta { node, text, .. } = &event
                && *node == output
            {
                watch(Progress::Answer(text));
            }
        };
        // Its plugins' `host.log` lines, recorded as they come.
        let (_attached, mut plugin_lines) = plugin_log::attach(self.id.to_string());
        let record_line = |line: PluginLine| {
            if let Some(node) = self.pipeline.nodes.iter().position(|n| n.id == line.node) {
                recorder.record(RunEvent::PluginLog {
                    node: NodeIndex(node),
                    line,
                });
            }
        };
        let result = {
            // Every log line of the run (its nodes', its plugins') carries its id.
            let span =
                tracing::info_span!("run", run_id = %self.id, pipeline = %self.pipeline.name);
            let run = self
                .runner
                .run_as(self.id, &self.pipeline, self.request, recorder)
                .instrument(span);
            tokio::pin!(run);
            loop {
                tokio::select! {
                    result = &mut run => break result,
                    Some(event) = events.recv() => on_event(event),
                    Some(line) = plugin_lines.recv() => record_line(line),
                }
            }
        };
        // Events sent just before the run returned.
        while let Ok(event) = events.try_recv() {
            on_event(event);
        }
        let mut report = result?;
        report.variant = self.variant;
        let cap = self.pipeline.node(output).params.max_tokens;
        let hit_cap = cap.is_some_and(|cap| report.nodes[output.0].output_tokens >= cap);
        Ok(RunOutcome {
            id: self.id,
            answer: report.answer.clone(),
            hit_cap,
            report,
            pipeline: self.pipeline,
            version: self.version,
            plugins: self.plugins,
            fingerprint: self.fingerprint,
        })
    }

    /// [`PreparedRun::run`] on a recorder of its own, watched by nobody.
    pub async fn run_alone(self) -> Result<RunOutcome, RunError> {
        self.run(&Recorder::new(), |_| {}).await
    }
}

/// A finished run.
pub struct RunOutcome {
    pub id: RunId,
    pub answer: String,
    /// The answer used the whole of its token cap (an OpenAI `finish_reason` of `length`).
    pub hit_cap: bool,
    /// What the run measured; its `variant` is the choice that ran.
    pub report: RunReport,
    /// The pipeline that ran (the chosen variant, shaped).
    pub pipeline: Pipeline,
    pub version: Option<Arc<PipelineVersion>>,
    /// The plugin versions the run used.
    pub plugins: Vec<PinnedPlugin>,
    pub fingerprint: Fingerprint,
}

/// A run's report as front ends print it: the measurements, and what ran.
#[derive(Serialize)]
pub struct OutcomeReport<'a> {
    pub run_id: String,
    #[serde(flatten)]
    pub report: &'a RunReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline_version: Option<&'a PipelineVersion>,
    pub plugins: &'a [PinnedPlugin],
    pub system_fingerprint: &'a Fingerprint,
}

impl RunOutcome {
    /// Everything the run cost: its nodes' tokens and those of its plugins' own model calls
    /// (a compressor's), the prompt tokens the prefix cache served among them.
    pub fn usage(&self) -> crate::engine::Usage {
        let (report, calls) = (&self.report, &self.report.model_calls);
        let completion: u32 = report.nodes.iter().map(|n| n.output_tokens).sum();
        crate::engine::Usage {
            prompt_tokens: report
                .cache
                .prompt_tokens
                .saturating_add(calls.prompt_tokens),
            cached_prompt_tokens: report
                .cache
                .cached_prompt_tokens
                .saturating_add(calls.cached_prompt_tokens),
            completion_tokens: completion.saturating_add(calls.completion_tokens),
        }
    }

    /// The report with the run's id (`prefix` before it: a server's `chatcmpl-`), its
    /// pipeline version, plugins and fingerprint.
    pub fn full_report(&self, prefix: &str) -> OutcomeReport<'_> {
        OutcomeReport {
            run_id: format!("{prefix}{}", self.id),
            report: &self.report,
            pipeline_version: self.version.as_deref(),
            plugins: &self.plugins,
            system_fingerprint: &self.fingerprint,
        }
    }
}
