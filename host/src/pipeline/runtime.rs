//! The pipeline runtime: runs a validated [`Pipeline`] on engines and policies.
//!
//! Every node is a future of one run, and the run joins them all, so they progress
//! concurrently and dropping the run drops every node and with it every engine stream
//! (cancelling its sequence). Output flows along edges as chunks cut by each edge's
//! streaming policy. Agents and aggregators share one step loop: the session (an aggregator
//! plugin, or [`RoleSession`] for an agent) gets every chunk in order and every finish, is
//! asked for its next step whenever the node is idle, and each step continues the node's own
//! partial answer on the engine (so the prefix cache serves the stable part of the prompt).
//! A consumer that has enough of a source releases it; a node nobody reads any more stops.
//! Critical-path nodes get a higher engine priority. Everything that happens is recorded on
//! a [`Timeline`]. This module must not touch wasmtime or llama.cpp: it sees only the
//! `Engine` and policy traits.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::try_join_all;
use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tracing::Instrument;

use super::budget::{MeteredProvider, RunBound, RunBudget, RunLimits};
use super::critical::{self, CriticalPath, LatencyModel};
use super::history::{HistoryCache, HistoryEvent, HistoryUse, TokenCount};
use super::policy::{
    AggregatorSession, CompressorPolicy, Demand, PolicyError, PolicyProvider, RouteChoice,
    RouteRequest, RouterPolicy, Source, StreamMode,
};
use super::role_session::RoleSession;
use super::spec::{DEFAULT_MODEL, ModelBinding, NodeIndex, NodeKind, Pipeline, SpecError};
use super::stream::{Chunk, Chunker};
use crate::engine::{
    Capability, ChatMessage, Confidence, Engine, EngineError, FinishReason, GenerationEvent,
    GenerationRequest, GenerationStream, MeasureConfidence, Priority, Prompt, Role, SamplingParams,
};
use crate::speculate::{DraftFeed, SpeculationStats};
use crate::trace::chrome::ChromeTrace;
use crate::trace::{EventKind, Timeline};

/// Engine priority of nodes on the estimated critical path; others keep the default (0), so
/// when the engine has more sequences than room, the chain that bounds the run goes first.
pub const CRITICAL_PRIORITY: Priority = Priority(10);

/// Models a pipeline may name, by name.
#[derive(Clone, Default)]
pub struct Models {
    engines: BTreeMap<String, Arc<dyn Engine>>,
}

impl Models {
    /// `engine` under [`DEFAULT_MODEL`] and under its own model name.
    pub fn with_default(engine: Arc<dyn Engine>) -> Self {
        let mut models = Self::default();
        models.insert(engine.model_info().name.clone(), engine.clone());
        models.insert(DEFAULT_MODEL.to_string(), engine);
        models
    }

    pub fn insert(&mut self, name: String, engine: Arc<dyn Engine>) {
        self.engines.insert(name, engine);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Engine>> {
        self.engines.get(name)
    }

    pub fn names(&self) -> Vec<String> {
        self.engines.keys().cloned().collect()
    }

    /// The engine used for token counts that belong to no particular model.
    fn counter(&self) -> Option<&Arc<dyn Engine>> {
        self.engines
            .get(DEFAULT_MODEL)
            .or_else(|| self.engines.values().next())
    }

    fn count_tokens(&self, text: &str) -> u32 {
        self.counter()
            .map_or(0, |e| e.token_counter().count(text).get())
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("node `{node}`: {source}")]
    Policy { node: String, source: PolicyError },
    #[error("node `{node}`: {source}")]
    Engine { node: String, source: EngineError },
    #[error("node `{node}`: model `{model}` is not available")]
    NoModel { node: String, model: String },
    #[error(
        "node `{node}`: plugin `{plugin}` gave no final step although every input has finished"
    )]
    NoFinalStep { node: String, plugin: String },
    #[error("node `{node}`: plugin `{plugin}` ended the run: {bound}")]
    Bound {
        node: String,
        plugin: String,
        bound: RunBound,
    },
    #[error("node `{node}`: router chose `{model}`, which is not one of {models:?}")]
    BadRoute {
        node: String,
        model: String,
        models: Vec<String>,
    },
}

/// What to run the pipeline on.
#[derive(Clone, Debug)]
pub struct RunRequest {
    pub conversation: Vec<ChatMessage>,
    pub mode: StreamMode,
}

impl RunRequest {
    /// One user message.
    pub fn prompt(text: impl Into<String>, mode: StreamMode) -> Self {
        Self {
            conversation: vec![ChatMessage::new(Role::User, text)],
            mode,
        }
    }
}

/// Live progress, for views and servers.
#[derive(Clone, Debug, PartialEq)]
pub enum RunEvent {
    NodeStarted {
        node: NodeIndex,
    },
    /// Text a node generated. Deltas of [`Pipeline::output`] are the answer.
    NodeDelta {
        node: NodeIndex,
        text: String,
        tokens: u32,
    },
    NodeFinished {
        node: NodeIndex,
        cancelled: bool,
    },
}

fn ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

fn ms_opt<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_secs_f64() * 1e3)),
        None => s.serialize_none(),
    }
}

/// What one node did; times are since the run began, in milliseconds when serialized.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeReport {
    pub id: String,
    pub kind: &'static str,
    #[serde(serialize_with = "ms_opt")]
    pub started_ms: Option<Duration>,
    #[serde(serialize_with = "ms_opt")]
    pub first_token_ms: Option<Duration>,
    #[serde(serialize_with = "ms_opt")]
    pub finished_ms: Option<Duration>,
    pub output_tokens: u32,
    pub prompt_tokens: u32,
    pub cached_prompt_tokens: u32,
    /// Engine requests (aggregator steps).
    pub steps: u32,
    /// Stopped early because nobody read it any more.
    pub cancelled: bool,
    /// Speculative decoding over all of the node's requests, when the engine reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speculation: Option<SpeculationStats>,
    /// A routed node's engine requests: the model of each and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RoutedStep>,
    /// What the conversation memory did for a node with a history budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryUse>,
    pub text: String,
}

/// One engine request of a routed node: where the router sent it and why.
#[derive(Clone, Debug, Serialize)]
pub struct RoutedStep {
    /// The node's engine request number (as in the timeline's steps).
    pub step: u32,
    #[serde(serialize_with = "ms")]
    pub started_ms: Duration,
    /// Tokens of the answer before this step (the prefix the model continued).
    pub answer_tokens: u32,
    pub tokens: u32,
    pub prompt_tokens: u32,
    pub cached_prompt_tokens: u32,
    /// How sure the model was of this step's tokens, when its engine reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidence: Option<Confidence>,
    pub model: String,
    pub reason: String,
}

/// What a routed node tells its router about the next step.
#[derive(Default)]
struct StepFeatures {
    prompt_tokens: u32,
    query: String,
    answer_tokens: u32,
    max_tokens: u32,
    previous_model: Option<String>,
    confidence: Option<Confidence>,
}

impl StepFeatures {
    /// The step's prompt size and latest user message (counted only for a router).
    fn prompt(&mut self, messages: &[ChatMessage], routed: bool, runner: &Runner) {
        if !routed {
            return;
        }
        let text: String = messages.iter().map(|m| m.content.as_str()).collect();
        self.prompt_tokens = runner.models.count_tokens(&text);
        self.query = messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map_or_else(String::new, |m| m.content.clone());
    }
}

/// A critical path by node id.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PathReport {
    pub nodes: Vec<String>,
    #[serde(serialize_with = "ms")]
    pub length_ms: Duration,
}

/// Prompt tokens, and how many the prefix cache served.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CacheStats {
    pub prompt_tokens: u32,
    pub cached_prompt_tokens: u32,
    pub aggregator_prompt_tokens: u32,
    pub aggregator_cached_prompt_tokens: u32,
}

impl CacheStats {
    /// Share of aggregator prompt tokens served from the prefix cache.
    pub fn aggregator_hit_rate(&self) -> f64 {
        if self.aggregator_prompt_tokens == 0 {
            0.0
        } else {
            f64::from(self.aggregator_cached_prompt_tokens)
                / f64::from(self.aggregator_prompt_tokens)
        }
    }
}

/// Everything a finished run measured.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub pipeline: String,
    pub mode: StreamMode,
    pub answer: String,
    /// From the start of the run to the first answer token.
    #[serde(serialize_with = "ms_opt")]
    pub ttft_ms: Option<Duration>,
    #[serde(serialize_with = "ms")]
    pub total_ms: Duration,
    pub nodes: Vec<NodeReport>,
    /// Before the run, from estimated costs.
    pub critical_path_estimated: PathReport,
    /// After the run: the chain of dependencies that held the answer up
    /// ([`critical::measured_path`]).
    pub critical_path_measured: PathReport,
    pub cache: CacheStats,
    /// Background compressions that started, finished or failed during the run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryEvent>,
    #[serde(skip)]
    pub timeline: Timeline,
    #[serde(skip)]
    measured_lanes: Vec<usize>,
}

impl RunReport {
    /// The run as a Chrome trace, the measured critical path marked.
    pub fn trace(&self) -> ChromeTrace {
        ChromeTrace::from_timeline(&self.timeline, &self.measured_lanes)
    }
}

/// Runs pipelines on a set of models and a policy provider.
pub struct Runner {
    models: Models,
    policies: Arc<dyn PolicyProvider>,
    latencies: Arc<LatencyModel>,
    limits: RunLimits,
    /// Compressed conversations, shared by every run (and pinned copy) of this runner.
    history: Arc<HistoryCache>,
}

impl Runner {
    pub fn new(models: Models, policies: Arc<dyn PolicyProvider>) -> Self {
        Self {
            models,
            policies,
            latencies: Arc::new(LatencyModel::default()),
            limits: RunLimits::default(),
            history: HistoryCache::new(),
        }
    }

    /// The conversation memory of this runner's nodes.
    pub fn history(&self) -> &Arc<HistoryCache> {
        &self.history
    }

    /// The same runner with other bounds per run.
    pub fn with_limits(mut self, limits: RunLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The bounds every run gets.
    pub fn limits(&self) -> RunLimits {
        self.limits
    }

    pub fn models(&self) -> &Models {
        &self.models
    }

    /// A runner on the same models and learned latencies that takes its policies from
    /// `policies` (a server pins one run's plugin versions this way).
    pub fn with_policies(&self, policies: Arc<dyn PolicyProvider>) -> Runner {
        Self {
            models: self.models.clone(),
            policies,
            latencies: self.latencies.clone(),
            limits: self.limits,
            history: self.history.clone(),
        }
    }

    /// The per-token latencies learned so far.
    pub fn latencies(&self) -> &LatencyModel {
        &self.latencies
    }

    /// Checks the pipeline's plugins and models against this runner's.
    pub fn check(&self, pipeline: &Pipeline) -> Result<(), SpecError> {
        let policies = self.policies.clone();
        pipeline.check_bindings(&move |name| policies.kind_of(name), &self.models.names())
    }

    /// Checks that the models of `pipeline` can do what its nodes ask in `mode`: a staircase
    /// node with inputs continues its own partial answer at every step after the first.
    pub fn check_capabilities(
        &self,
        pipeline: &Pipeline,
        mode: StreamMode,
    ) -> Result<(), RunError> {
        // A routed node continues its answer at every part after the first, in any mode.
        let continues = |n: &&super::spec::Node| {
            matches!(n.model, ModelBinding::Routed { .. })
                || (mode == StreamMode::Staircase && !n.inputs.is_empty())
        };
        for node in pipeline.nodes.iter().filter(continues) {
            let models = match &node.model {
                ModelBinding::None => continue,
                ModelBinding::Fixed(name) => std::slice::from_ref(name),
                ModelBinding::Routed { models, .. } => models.as_slice(),
            };
            for engine in models.iter().filter_map(|m| self.models.get(m)) {
                engine
                    .model_info()
                    .require(Capability::AssistantPrefix)
                    .map_err(|source| RunError::Engine {
                        node: node.id.clone(),
                        source,
                    })?;
            }
        }
        Ok(())
    }

    /// The critical path estimated for `request`, before running.
    pub fn estimate(&self, pipeline: &Pipeline, request: &RunRequest) -> CriticalPath {
        let prompt: String = request
            .conversation
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let costs = critical::estimate_costs(
            pipeline,
            self.models.count_tokens(&prompt),
            self.latencies.get(),
        );
        critical::longest_path(&costs, &critical::inputs_of(pipeline))
    }

    /// Runs `pipeline` on `request`. Progress goes to `events` if given; the answer is also
    /// in the report. Dropping the returned future cancels every node.
    pub async fn run(
        &self,
        pipeline: &Pipeline,
        request: RunRequest,
        events: Option<mpsc::UnboundedSender<RunEvent>>,
    ) -> Result<RunReport, RunError> {
        self.check(pipeline)?;
        self.check_capabilities(pipeline, request.mode)?;
        let estimated = self.estimate(pipeline, &request);
        let history_from = self.history.mark();
        let timeline = Timeline::new(pipeline.nodes.iter().map(|n| n.id.clone()).collect());
        let n = pipeline.nodes.len();
        let priorities: Vec<Priority> = (0..n)
            .map(|i| {
                if estimated.contains(NodeIndex(i)) {
                    CRITICAL_PRIORITY
                } else {
                    Priority::default()
                }
            })
            .collect();
        let ctx = RunCtx {
            runner: self,
            pipeline,
            request: &request,
            timeline: &timeline,
            events: events.as_ref(),
            priorities,
            run_id: NEXT_RUN_ID.fetch_add(1, Ordering::Relaxed),
            policies: MeteredProvider::new(self.policies.clone(), RunBudget::new(self.limits)),
        };

        // Wiring: one inbox per node with inputs, a wake-up per producer, a flag per edge.
        let wakers: Vec<Arc<Notify>> = (0..n).map(|_| Arc::new(Notify::new())).collect();
        let mut inboxes: Vec<Option<mpsc::UnboundedReceiver<Inbound>>> = Vec::with_capacity(n);
        let mut senders: Vec<Option<mpsc::UnboundedSender<Inbound>>> = Vec::with_capacity(n);
        let mut wanted: Vec<Vec<Arc<AtomicBool>>> = Vec::with_capacity(n);
        for node in &pipeline.nodes {
            if node.inputs.is_empty() {
                inboxes.push(None);
                senders.push(None);
            } else {
                let (tx, rx) = mpsc::unbounded_channel();
                inboxes.push(Some(rx));
                senders.push(Some(tx));
            }
            wanted.push(
                node.inputs
                    .iter()
                    .map(|_| Arc::new(AtomicBool::new(true)))
                    .collect(),
            );
        }
        let mut nodes = Vec::with_capacity(n);
        for (i, inbox) in inboxes.into_iter().enumerate() {
            let ix = NodeIndex(i);
            let edges = pipeline
                .consumers(ix)
                .into_iter()
                .filter_map(|(consumer, slot)| {
                    let tx = senders[consumer.0].clone()?;
                    Some(OutEdge {
                        to: pipeline.node(consumer).id.clone(),
                        slot,
                        tx,
                        chunker: Chunker::new(
                            pipeline.node(consumer).inputs[slot]
                                .stream
                                .in_mode(request.mode),
                        ),
                        wanted: wanted[consumer.0][slot].clone(),
                    })
                })
                .collect();
            let inputs = InputSide {
                rx: inbox,
                wanted: wanted[i].clone(),
                producers: pipeline.nodes[i]
                    .inputs
                    .iter()
                    .map(|e| wakers[e.from.0].clone())
                    .collect(),
            };
            let emitter = Emitter {
                ctx: &ctx,
                node: ix,
                edges,
                is_output: ix == pipeline.output,
                text: String::new(),
                tokens: 0,
                first_token: None,
                history_seq: pipeline.nodes[i].history.as_ref().map(|_| None),
            };
            let span = tracing::debug_span!("node", id = %pipeline.nodes[i].id);
            nodes.push(
                ctx.run_node(ix, inputs, emitter, wakers[i].clone())
                    .instrument(span),
            );
        }
        // Only producers hold inbox senders now, so an inbox closes when its producers end.
        drop(senders);

        let reports = try_join_all(nodes).await?;
        let total = timeline.now();

        let spans: Vec<_> = reports
            .iter()
            .map(|r| r.started_ms.zip(r.finished_ms))
            .collect();
        let measured =
            critical::measured_path(&spans, &critical::inputs_of(pipeline), pipeline.output);
        let path_report = |path: &CriticalPath| PathReport {
            nodes: path
                .nodes
                .iter()
                .map(|&i| pipeline.node(i).id.clone())
                .collect(),
            length_ms: path.length,
        };
        let mut cache = CacheStats::default();
        for (node, report) in pipeline.nodes.iter().zip(&reports) {
            cache.prompt_tokens += report.prompt_tokens;
            cache.cached_prompt_tokens += report.cached_prompt_tokens;
            if node.kind == NodeKind::Aggregator {
                cache.aggregator_prompt_tokens += report.prompt_tokens;
                cache.aggregator_cached_prompt_tokens += report.cached_prompt_tokens;
            }
        }
        let output = &reports[pipeline.output.0];
        Ok(RunReport {
            pipeline: pipeline.name.clone(),
            mode: request.mode,
            answer: output.text.clone(),
            ttft_ms: output.first_token_ms,
            total_ms: total,
            critical_path_estimated: path_report(&estimated),
            critical_path_measured: path_report(&measured),
            measured_lanes: measured.nodes.iter().map(|i| i.0).collect(),
            cache,
            history: self
                .history
                .events()
                .into_iter()
                .filter(|e| e.seq > history_from)
                .collect(),
            nodes: reports,
            timeline,
        })
    }
}

/// What arrives in a node's inbox: an event of its input number `slot`.
struct Inbound {
    slot: usize,
    event: EdgeEvent,
}

enum EdgeEvent {
    Chunk(Chunk),
    Finished,
}

/// A node's side of its incoming edges.
struct InputSide {
    rx: Option<mpsc::UnboundedReceiver<Inbound>>,
    wanted: Vec<Arc<AtomicBool>>,
    producers: Vec<Arc<Notify>>,
}

impl InputSide {
    /// Tells input `slot` this node reads no more of it.
    fn release(&self, slot: usize) {
        self.wanted[slot].store(false, Ordering::Release);
        // `notify_one` keeps a permit if the producer is not waiting right now.
        self.producers[slot].notify_one();
    }

    fn release_all(&mut self) {
        for slot in 0..self.wanted.len() {
            self.release(slot);
        }
        self.rx = None;
    }

    async fn recv(&mut self) -> Option<Inbound> {
        match &mut self.rx {
            Some(rx) => rx.recv().await,
            None => None,
        }
    }
}

/// One outgoing edge.
struct OutEdge {
    to: String,
    slot: usize,
    tx: mpsc::UnboundedSender<Inbound>,
    chunker: Chunker,
    wanted: Arc<AtomicBool>,
}

impl OutEdge {
    fn open(&self) -> bool {
        self.wanted.load(Ordering::Acquire) && !self.tx.is_closed()
    }
}

/// Hands a node's output to the caller and downstream, and records it.
struct Emitter<'r> {
    ctx: &'r RunCtx<'r>,
    node: NodeIndex,
    edges: Vec<OutEdge>,
    is_output: bool,
    text: String,
    tokens: u32,
    first_token: Option<Duration>,
    /// The node keeps a conversation budget: its first token takes a number in the
    /// memory's order of events (so tests see it did not wait for a compression).
    history_seq: Option<Option<u64>>,
}

impl Emitter<'_> {
    /// Whether anyone still reads this node.
    fn wanted(&self) -> bool {
        self.is_output || self.edges.iter().any(OutEdge::open)
    }

    fn delta(&mut self, text: &str, tokens: u32) {
        if text.is_empty() && tokens == 0 {
            return;
        }
        if self.first_token.is_none() {
            let now = self.ctx.timeline.now();
            self.first_token = Some(now);
            if let Some(seq) = self.history_seq.as_mut() {
                *seq = Some(self.ctx.runner.history.mark());
            }
            self.ctx
                .timeline
                .record_at(now, self.node.0, EventKind::FirstToken);
        }
        self.text.push_str(text);
        self.tokens += tokens;
        self.ctx.send(RunEvent::NodeDelta {
            node: self.node,
            text: text.to_string(),
            tokens,
        });
        for edge in &mut self.edges {
            if !edge.open() {
                continue;
            }
            if let Some(chunk) = edge.chunker.push(text, tokens) {
                Self::send_chunk(self.ctx, self.node, self.tokens, edge, chunk);
            }
        }
    }

    fn send_chunk(ctx: &RunCtx, node: NodeIndex, total: u32, edge: &OutEdge, chunk: Chunk) {
        ctx.timeline.record(
            node.0,
            EventKind::Chunk {
                to: edge.to.clone(),
                tokens: chunk.tokens,
                total_tokens: total,
            },
        );
        // A closed inbox means the consumer is done; nothing to deliver then.
        let _ = edge.tx.send(Inbound {
            slot: edge.slot,
            event: EdgeEvent::Chunk(chunk),
        });
    }

    /// The output is over: the rest of every chunker, then the end of every edge.
    fn finish(&mut self) {
        for edge in &mut self.edges {
            if edge.open()
                && let Some(chunk) = edge.chunker.finish()
            {
                Self::send_chunk(self.ctx, self.node, self.tokens, edge, chunk);
            }
            let _ = edge.tx.send(Inbound {
                slot: edge.slot,
                event: EdgeEvent::Finished,
            });
        }
    }
}

/// What woke a node up.
enum Wake {
    Engine(Option<Result<GenerationEvent, EngineError>>),
    Input(Option<Inbound>),
    Released,
}

/// Shared state of one run.
struct RunCtx<'r> {
    runner: &'r Runner,
    pipeline: &'r Pipeline,
    request: &'r RunRequest,
    timeline: &'r Timeline,
    events: Option<&'r mpsc::UnboundedSender<RunEvent>>,
    priorities: Vec<Priority>,
    /// Tells a replicated remote model which requests are one run's (see `routing`).
    run_id: u64,
    /// The runner's policies, metered against this run's bounds.
    policies: MeteredProvider,
}

/// Run ids for routing hints: unique within the process.
static NEXT_RUN_ID: AtomicU64 = AtomicU64::new(0);

impl<'r> RunCtx<'r> {
    fn send(&self, event: RunEvent) {
        if let Some(events) = self.events {
            // A caller that stopped listening still gets the report.
            let _ = events.send(event);
        }
    }

    /// A policy's failure as the run's error: the bound it went over, when it did.
    fn policy_error(&self, node: NodeIndex) -> impl Fn(PolicyError) -> RunError + '_ {
        move |source| {
            let node = self.pipeline.node(node).id.clone();
            match self.policies.budget().exceeded() {
                Some((plugin, bound)) => RunError::Bound {
                    node,
                    plugin,
                    bound,
                },
                None => RunError::Policy { node, source },
            }
        }
    }

    fn sources(&self, node: NodeIndex) -> Vec<Source> {
        self.pipeline
            .node(node)
            .inputs
            .iter()
            .map(|e| {
                let input = self.pipeline.node(e.from);
                Source {
                    id: input.id.clone(),
                    label: input.label.clone(),
                }
            })
            .collect()
    }

    async fn run_node(
        &'r self,
        ix: NodeIndex,
        inputs: InputSide,
        emitter: Emitter<'r>,
        waker: Arc<Notify>,
    ) -> Result<NodeReport, RunError> {
        let node = self.pipeline.node(ix);
        let policy_error = self.policy_error(ix);
        let mode = self.request.mode;
        // A long conversation: the compressed form when one is ready, else the full one
        // (its compression starts in the background, for the next turn). Never waits.
        let (conversation, history) = match &node.history {
            Some(policy) => {
                let models = self.runner.models.clone();
                let count: TokenCount = Arc::new(move |text: &str| models.count_tokens(text));
                let (conversation, used) = self.runner.history.prepare(
                    &policy.compressor,
                    policy.budget_tokens,
                    &self.request.conversation,
                    &count,
                    &self.runner.policies,
                );
                (conversation, Some(used))
            }
            None => (self.request.conversation.clone(), None),
        };
        match node.kind {
            NodeKind::Compressor { budget_tokens } => {
                let compressor = self
                    .policies
                    .compressor(&node.plugin)
                    .map_err(&policy_error)?;
                self.run_compressor(ix, compressor, budget_tokens, inputs, emitter)
                    .await
            }
            NodeKind::Agent => {
                let mut role = self
                    .policies
                    .role_with_config(&node.plugin, &node.config)
                    .map_err(&policy_error)?;
                let sampling = node.params.apply(role.params().map_err(&policy_error)?);
                let session = RoleSession::new(role, conversation, self.sources(ix), mode);
                let mut report = self
                    .run_stepped(ix, Box::new(session), sampling, inputs, emitter, waker)
                    .await?;
                report.history = history.map(|used| HistoryUse {
                    first_token_seq: report.history.take().and_then(|h| h.first_token_seq),
                    ..used
                });
                Ok(report)
            }
            NodeKind::Aggregator => {
                let session = self
                    .policies
                    .aggregator(&node.plugin, &conversation, &self.sources(ix), mode)
                    .map_err(&policy_error)?;
                let sampling = node.params.apply(SamplingParams::default());
                let mut report = self
                    .run_stepped(ix, session, sampling, inputs, emitter, waker)
                    .await?;
                report.history = history.map(|used| HistoryUse {
                    first_token_seq: report.history.take().and_then(|h| h.first_token_seq),
                    ..used
                });
                Ok(report)
            }
        }
    }

    /// The engine for a step of `node`, asking its router when it has one (then the
    /// router's choice comes back too).
    fn engine_for(
        &self,
        ix: NodeIndex,
        router: &mut Option<Box<dyn RouterPolicy>>,
        features: &StepFeatures,
    ) -> Result<(&'r Arc<dyn Engine>, Option<RouteChoice>), RunError> {
        let node = self.pipeline.node(ix);
        let (name, choice) = match (&node.model, router.as_mut()) {
            (ModelBinding::Routed { models, .. }, Some(router)) => {
                let choice = router
                    .route(&RouteRequest {
                        node_id: node.id.clone(),
                        prompt_tokens: features.prompt_tokens,
                        query: features.query.clone(),
                        models: models.clone(),
                        role: node.label.clone(),
                        answer_tokens: features.answer_tokens,
                        max_tokens: features.max_tokens,
                        previous_model: features.previous_model.clone(),
                        confidence: features.confidence,
                    })
                    .map_err(self.policy_error(ix))?;
                if !models.contains(&choice.model) {
                    return Err(RunError::BadRoute {
                        node: node.id.clone(),
                        model: choice.model,
                        models: models.clone(),
                    });
                }
                (choice.model.clone(), Some(choice))
            }
            (ModelBinding::Fixed(name), _) => (name.clone(), None),
            _ => (DEFAULT_MODEL.to_string(), None),
        };
        let engine = self
            .runner
            .models
            .get(&name)
            .ok_or_else(|| RunError::NoModel {
                node: node.id.clone(),
                model: name,
            })?;
        Ok((engine, choice))
    }

    /// The step loop of agents and aggregators.
    async fn run_stepped(
        &'r self,
        ix: NodeIndex,
        mut session: Box<dyn AggregatorSession>,
        sampling: SamplingParams,
        mut inputs: InputSide,
        mut emitter: Emitter<'r>,
        waker: Arc<Notify>,
    ) -> Result<NodeReport, RunError> {
        let node = self.pipeline.node(ix);
        let policy_error = self.policy_error(ix);
        let mut router = match &node.model {
            ModelBinding::Routed { router, .. } => Some(
                self.policies
                    .router_with_config(router, &node.config)
                    .map_err(&policy_error)?,
            ),
            _ => None,
        };
        let sources = self.sources(ix);
        let mut open: Vec<bool> = vec![true; sources.len()];
        // The inputs' text, for the engine to draft from: an aggregator copies its proposers.
        let feed = (!sources.is_empty()).then(DraftFeed::new);
        let budget = sampling.max_tokens;
        let mut report = NodeReport {
            id: node.id.clone(),
            kind: node.kind.name(),
            ..NodeReport::default()
        };
        let mut answer = String::new();
        let mut answer_tokens = 0u32;
        // A routed node asks its router before every engine request of at most this many
        // tokens; the others send a policy step whole.
        let route_tokens = match &node.model {
            ModelBinding::Routed { step_tokens, .. } => Some(*step_tokens),
            _ => None,
        };
        let mut features = StepFeatures {
            max_tokens: budget,
            ..StepFeatures::default()
        };

        // Applies one inbox event to the session (chunks in order, finishes, releases).
        let mut on_input = |session: &mut Box<dyn AggregatorSession>,
                            inputs: &mut InputSide,
                            input: Option<Inbound>|
         -> Result<(), RunError> {
            let Some(Inbound { slot, event }) = input else {
                // Every producer has ended: whatever is still open is finished.
                for (slot, is_open) in open.iter_mut().enumerate() {
                    if std::mem::replace(is_open, false) {
                        if let Some(feed) = &feed {
                            feed.finish(&sources[slot].id);
                        }
                        session.finish(&sources[slot].id).map_err(&policy_error)?;
                    }
                }
                inputs.rx = None;
                return Ok(());
            };
            if !open[slot] {
                return Ok(());
            }
            let id = &sources[slot].id;
            match event {
                EdgeEvent::Chunk(chunk) => {
                    if let Some(feed) = &feed {
                        feed.push_text(id, &chunk.text);
                    }
                    let demand = session
                        .push(&sources[slot].id, &chunk.text)
                        .map_err(&policy_error)?;
                    if demand == Demand::Enough {
                        open[slot] = false;
                        inputs.release(slot);
                        if let Some(feed) = &feed {
                            feed.finish(id);
                        }
                        session.finish(id).map_err(&policy_error)?;
                    }
                }
                EdgeEvent::Finished => {
                    open[slot] = false;
                    if let Some(feed) = &feed {
                        feed.finish(id);
                    }
                    session.finish(id).map_err(&policy_error)?;
                }
            }
            Ok(())
        };

        let engine_error = |source| RunError::Engine {
            node: node.id.clone(),
            source,
        };
        // A warm-up step running on the engine, and when it was submitted.
        let mut warming: Option<(GenerationStream, Duration)> = None;
        let mut cancelled = false;
        'run: loop {
            if !emitter.wanted() {
                cancelled = true;
                break;
            }
            let step = match session.next_step().map_err(&policy_error)? {
                // A non-final step of zero tokens is a warm-up: its prompt goes into the
                // prefix cache while the node waits for input. One at a time is enough.
                Some(step) if !step.is_final && step.max_tokens == 0 => {
                    if warming.is_none() {
                        features.prompt(&step.messages, router.is_some(), self.runner);
                        let (engine, _) = self.engine_for(ix, &mut router, &features)?;
                        let request = self.step_request(ix, step.messages, &answer, 0, &sampling);
                        let started = self.timeline.now();
                        // A warm-up only saves work; the step after it reports real trouble.
                        match engine.submit(request) {
                            Ok(stream) => warming = Some((stream, started)),
                            Err(error) => {
                                tracing::warn!(node = %node.id, %error, "warm-up refused")
                            }
                        }
                    }
                    None
                }
                step => step,
            };
            let Some(step) = step else {
                if inputs.rx.is_none() {
                    return Err(RunError::NoFinalStep {
                        node: node.id.clone(),
                        plugin: node.plugin.clone(),
                    });
                }
                let wake = tokio::select! {
                    input = inputs.recv() => Wake::Input(input),
                    _ = waker.notified() => Wake::Released,
                };
                if let Wake::Input(input) = wake {
                    on_input(&mut session, &mut inputs, input)?;
                }
                continue;
            };

            if report.started_ms.is_none() {
                let now = self.timeline.now();
                report.started_ms = Some(now);
                self.timeline.record_at(now, ix.0, EventKind::Start);
                self.send(RunEvent::NodeStarted { node: ix });
            }
            let remaining = budget.saturating_sub(answer_tokens);
            // A final step with `max_tokens` 0 runs to the node's budget; otherwise the policy
            // caps it like any step.
            let max_tokens = if step.is_final && step.max_tokens == 0 {
                remaining
            } else {
                step.max_tokens.min(remaining)
            };
            // Only a spent budget gives zero here (zero-token non-final steps were skipped).
            if max_tokens == 0 {
                break;
            }
            // The step extends the warm-up's prompt: let that land in the cache first.
            if let Some((stream, started)) = warming.take() {
                self.finish_warm_up(ix, stream, started, &mut report).await;
            }
            features.prompt(&step.messages, router.is_some(), self.runner);
            let mut step_left = max_tokens;
            let reason = loop {
                let part = route_tokens.map_or(step_left, |n| n.min(step_left));
                features.answer_tokens = answer_tokens;
                let (engine, choice) = self.engine_for(ix, &mut router, &features)?;
                let mut request =
                    self.step_request(ix, step.messages.clone(), &answer, part, &sampling);
                if let Some(feed) = &feed {
                    request.extensions.insert(feed.clone());
                }
                if choice.is_some() {
                    request.extensions.insert(MeasureConfidence);
                }
                let step_started = self.timeline.now();
                let mut stream = engine.submit(request).map_err(engine_error)?;
                let mut step_text = String::new();
                let mut step_tokens = 0u32;
                let (reason, usage, extensions) = loop {
                    let wake = tokio::select! {
                        event = stream.next() => Wake::Engine(event),
                        input = inputs.recv(), if inputs.rx.is_some() => Wake::Input(input),
                        _ = waker.notified() => Wake::Released,
                    };
                    match wake {
                        Wake::Engine(Some(Ok(GenerationEvent::Delta {
                            text,
                            token_count: count,
                            ..
                        }))) => {
                            step_text.push_str(&text);
                            step_tokens += count;
                            emitter.delta(&text, count);
                        }
                        Wake::Engine(Some(Ok(GenerationEvent::Finished {
                            reason,
                            usage,
                            timings,
                            extensions,
                        }))) => {
                            self.runner.latencies.observe(&usage, &timings);
                            break (reason, usage, extensions);
                        }
                        Wake::Engine(Some(Err(error))) => return Err(engine_error(error)),
                        Wake::Engine(None) => return Err(engine_error(EngineError::Stopped)),
                        Wake::Input(input) => on_input(&mut session, &mut inputs, input)?,
                        Wake::Released => {
                            if !emitter.wanted() {
                                // Dropping the stream cancels the engine sequence.
                                drop(stream);
                                cancelled = true;
                                answer_tokens += step_tokens;
                                break 'run;
                            }
                        }
                    }
                };
                report.steps += 1;
                report.prompt_tokens += usage.prompt_tokens;
                report.cached_prompt_tokens += usage.cached_prompt_tokens;
                if let Some(stats) = extensions.get::<SpeculationStats>() {
                    report
                        .speculation
                        .get_or_insert_with(SpeculationStats::default)
                        .merge(stats);
                }
                answer.push_str(&step_text);
                answer_tokens += step_tokens;
                step_left = step_left.saturating_sub(step_tokens);
                // The policy's step is over when the model stops or its tokens are spent;
                // a routed node asks its router again before the next part.
                let last = route_tokens.is_none()
                    || reason == FinishReason::Stop
                    || step_left == 0
                    || answer_tokens >= budget;
                self.timeline.record(
                    ix.0,
                    EventKind::Step {
                        index: report.steps - 1,
                        started: step_started,
                        tokens: step_tokens,
                        prompt_tokens: usage.prompt_tokens,
                        cached_prompt_tokens: usage.cached_prompt_tokens,
                        is_final: step.is_final && last,
                    },
                );
                if let Some(choice) = choice {
                    let confidence = extensions.get::<Confidence>().copied();
                    tracing::debug!(
                        node = %node.id,
                        model = %choice.model,
                        reason = %choice.reason,
                        tokens = step_tokens,
                        "routed step"
                    );
                    report.routes.push(RoutedStep {
                        step: report.steps - 1,
                        started_ms: step_started,
                        answer_tokens: answer_tokens - step_tokens,
                        tokens: step_tokens,
                        prompt_tokens: usage.prompt_tokens,
                        cached_prompt_tokens: usage.cached_prompt_tokens,
                        confidence,
                        model: choice.model.clone(),
                        reason: choice.reason,
                    });
                    features.previous_model = Some(choice.model);
                    features.confidence = confidence;
                }
                session.answered(&step_text).map_err(&policy_error)?;
                if last {
                    break reason;
                }
            };
            // The model may end a non-final step early (end of sequence): it said all it
            // could from what it had seen. The next step, with more input, continues the
            // answer; only the final step or the budget ends the node.
            if step.is_final || answer_tokens >= budget {
                break;
            }
            if reason == FinishReason::Stop {
                tracing::debug!(node = %node.id, "model ended a non-final step early");
            }
        }

        inputs.release_all();
        let end = self.timeline.now();
        if cancelled {
            self.timeline.record_at(
                end,
                ix.0,
                EventKind::Cancelled {
                    reason: "no consumer reads it any more".into(),
                    tokens: answer_tokens,
                },
            );
        } else {
            self.timeline.record_at(
                end,
                ix.0,
                EventKind::End {
                    tokens: answer_tokens,
                },
            );
        }
        emitter.finish();
        self.send(RunEvent::NodeFinished {
            node: ix,
            cancelled,
        });
        report.first_token_ms = emitter.first_token;
        if let Some(seq) = emitter.history_seq {
            report.history = Some(HistoryUse {
                first_token_seq: seq,
                ..HistoryUse::default()
            });
        }
        report.finished_ms = report.started_ms.map(|_| end);
        report.output_tokens = emitter.tokens;
        report.cancelled = cancelled;
        report.text = std::mem::take(&mut emitter.text);
        Ok(report)
    }

    /// The engine request of one step of node `ix`, continuing `answer`.
    fn step_request(
        &self,
        ix: NodeIndex,
        messages: Vec<ChatMessage>,
        answer: &str,
        max_tokens: u32,
        sampling: &SamplingParams,
    ) -> GenerationRequest {
        // Built from `chat` and then filled, so fields other engines add keep defaults.
        let mut request = GenerationRequest::chat(Vec::new());
        request.prompt = Prompt::Chat {
            messages,
            assistant_prefix: (!answer.is_empty()).then(|| answer.to_string()),
        };
        request.sampling = SamplingParams {
            max_tokens,
            ..sampling.clone()
        };
        request.priority = self.priorities[ix.0];
        request.extensions.insert(crate::routing::RouteHint {
            run: self.run_id,
            node: self.pipeline.node(ix).id.clone(),
        });
        request
    }

    /// Waits for a warm-up to finish and records it. A failed warm-up costs only its cache
    /// benefit, so it is logged, not raised.
    async fn finish_warm_up(
        &self,
        ix: NodeIndex,
        mut stream: GenerationStream,
        started: Duration,
        report: &mut NodeReport,
    ) {
        while let Some(event) = stream.next().await {
            match event {
                Ok(GenerationEvent::Delta { .. }) => {}
                Ok(GenerationEvent::Finished { usage, .. }) => {
                    report.prompt_tokens += usage.prompt_tokens;
                    report.cached_prompt_tokens += usage.cached_prompt_tokens;
                    self.timeline.record(
                        ix.0,
                        EventKind::WarmUp {
                            started,
                            prompt_tokens: usage.prompt_tokens,
                            cached_prompt_tokens: usage.cached_prompt_tokens,
                        },
                    );
                    return;
                }
                Err(error) => {
                    tracing::warn!(node = %self.pipeline.node(ix).id, %error, "warm-up failed");
                    return;
                }
            }
        }
    }

    /// A compressor: waits for its inputs in full, shortens them in one plugin call.
    async fn run_compressor(
        &'r self,
        ix: NodeIndex,
        mut compressor: Box<dyn CompressorPolicy>,
        budget_tokens: u32,
        mut inputs: InputSide,
        mut emitter: Emitter<'r>,
    ) -> Result<NodeReport, RunError> {
        let node = self.pipeline.node(ix);
        let sources = self.sources(ix);
        let mut texts = vec![String::new(); sources.len()];
        let mut pending = sources.len();
        while pending > 0 {
            let Some(Inbound { slot, event }) = inputs.recv().await else {
                break;
            };
            match event {
                EdgeEvent::Chunk(chunk) => texts[slot].push_str(&chunk.text),
                EdgeEvent::Finished => pending -= 1,
            }
        }
        inputs.release_all();
        let started = self.timeline.now();
        self.timeline.record_at(started, ix.0, EventKind::Start);
        self.send(RunEvent::NodeStarted { node: ix });
        let history: Vec<ChatMessage> = sources
            .iter()
            .zip(&texts)
            .map(|(source, text)| {
                ChatMessage::new(Role::Assistant, format!("{}: {}", source.label, text))
            })
            .collect();
        // A compressor may call a model through its plugin import, which blocks until the
        // engine answers; on a blocking thread the other nodes of this run keep moving.
        let compressed =
            tokio::task::spawn_blocking(move || compressor.compress(&history, budget_tokens))
                .await
                .unwrap_or_else(|join| {
                    Err(PolicyError(format!("the compressor call failed: {join}")))
                })
                .map_err(self.policy_error(ix))?;
        let text = compressed
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n\n");
        let tokens = self.runner.models.count_tokens(&text);
        emitter.delta(&text, tokens);
        emitter.finish();
        let end = self.timeline.now();
        self.timeline
            .record_at(end, ix.0, EventKind::End { tokens });
        self.send(RunEvent::NodeFinished {
            node: ix,
            cancelled: false,
        });
        Ok(NodeReport {
            id: node.id.clone(),
            kind: node.kind.name(),
            started_ms: Some(started),
            first_token_ms: emitter.first_token,
            finished_ms: Some(end),
            output_tokens: tokens,
            steps: 1,
            text,
            ..NodeReport::default()
        })
    }
}
