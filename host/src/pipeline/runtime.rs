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
//! Critical-path nodes get a higher engine priority. Everything that happens is recorded once,
//! on the run's [`Recorder`]; the report, the timeline and live views derive from it. This module must not touch wasmtime or llama.cpp: it sees only the
//! `Engine` and policy traits.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use tokio::sync::{Notify, mpsc};
use tracing::Instrument;

use super::budget::{MeteredProvider, RunBound, RunBudget, RunLimits};
use super::critical::{self, CriticalPath, LatencyModel};
use super::guest::{Guest, GuestPool};
use super::history::{HistoryCache, StartGate, TokenCount, Warm};
use super::record::{NodeInfo, Recorder, RunEvent};
use super::role_session::RoleSession;
use super::run_id::RunId;
use super::spec::{DEFAULT_MODEL, ModelBinding, NodeIndex, NodeKind, Pipeline, SpecError};
use super::stream::{Chunk, Chunker};
use crate::engine::{
    CacheNamespace, Capability, ChatMessage, Confidence, Engine, EngineError, FinishReason,
    GenerationEvent, GenerationRequest, GenerationStream, MeasureConfidence, Priority, Prompt,
    Role, SamplingParams,
};
use crate::policy::{
    AggregatorSession, CompressorPolicy, Demand, LateCharge, ModelAccount, PolicyError,
    PolicyProvider, RouteChoice, RouteRequest, RouterPolicy, Source, StreamMode, UsageMeter,
};
// Re-exported where callers found it before the report had its own room.
pub use super::report::RunReport;
use crate::guard::GuardChain;
use crate::speculate::{DraftFeed, SpeculationStats};

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

    /// Every engine forgets what earlier requests cached ([`Engine::forget_history`]).
    pub fn forget_history(&self) {
        for engine in self.engines.values() {
            engine.forget_history();
        }
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
    #[error(transparent)]
    Id(#[from] super::run_id::RunIdError),
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
    /// Whose cached prefixes and past sessions the run's engine requests may reuse (the
    /// server's tenant; the CLI's one default namespace).
    pub namespace: CacheNamespace,
    /// Where the tokens of the run's plugin model calls go once the run has ended (a
    /// background compression that outlives it): a server's tenant quota. While the run
    /// goes they are in its report (`RunReport::model_calls`).
    pub late_charge: Option<LateCharge>,
}

impl RunRequest {
    /// One user message.
    pub fn prompt(text: impl Into<String>, mode: StreamMode) -> Self {
        Self {
            conversation: vec![ChatMessage::new(Role::User, text)],
            mode,
            namespace: CacheNamespace::default(),
            late_charge: None,
        }
    }
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

/// Runs pipelines on a set of models and a policy provider.
pub struct Runner {
    models: Models,
    policies: Arc<dyn PolicyProvider>,
    latencies: Arc<LatencyModel>,
    limits: RunLimits,
    /// Compressed conversations, shared by every run (and pinned copy) of this runner.
    history: Arc<HistoryCache>,
    /// Where every policy call runs (never on the async runtime).
    guests: Arc<GuestPool>,
}

impl Runner {
    pub fn new(models: Models, policies: Arc<dyn PolicyProvider>) -> Self {
        Self {
            models,
            policies,
            latencies: Arc::new(LatencyModel::default()),
            limits: RunLimits::default(),
            history: HistoryCache::new(),
            guests: Arc::new(GuestPool::default()),
        }
    }

    /// The same runner with its policy calls on `pool` (sized by `[sandbox] guest_threads`).
    pub fn with_guest_pool(mut self, pool: Arc<GuestPool>) -> Self {
        self.guests = pool;
        self
    }

    /// The same runner with a new conversation memory running at most `threads`
    /// compressions at once (`[sandbox] compression_threads`).
    pub fn with_compression_threads(mut self, threads: usize) -> Self {
        self.history = HistoryCache::with_threads(threads);
        self
    }

    /// The pool every policy call of this runner's runs goes through.
    pub fn guest_pool(&self) -> &Arc<GuestPool> {
        &self.guests
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
            guests: self.guests.clone(),
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
        let costs =
            critical::estimate_costs(pipeline, self.models.count_tokens(&prompt), &self.latencies);
        critical::longest_path(&costs, &critical::inputs_of(pipeline))
    }

    /// What a measurement does before each timed run, so that every run starts as on a
    /// server that has served this pipeline before but never this prompt: every engine
    /// forgets the prefixes and drafts earlier runs left ([`Engine::forget_history`]; one
    /// variant's proposers, with fixed seeds, would otherwise hand the next variant's their
    /// whole answers as speculation drafts and their prompts as cached prefixes), then a
    /// run of a few tokens on another prompt caches `pipeline`'s static prefixes again
    /// (system prompts, the aggregator's instruction) and warms its plugin instances.
    pub async fn start_fresh(
        &self,
        pipeline: Option<(&Pipeline, StreamMode)>,
    ) -> Result<(), RunError> {
        const WARM_UP_PROMPT: &str = "Say hello.";
        const WARM_UP_TOKENS: u32 = 4;
        self.models.forget_history();
        if let Some((pipeline, mode)) = pipeline {
            let mut warm = pipeline.clone();
            warm.limit_tokens(WARM_UP_TOKENS);
            self.run(&warm, RunRequest::prompt(WARM_UP_PROMPT, mode), None)
                .await?;
        }
        Ok(())
    }

    /// Runs `pipeline` on `request`. Progress goes to `events` if given; the answer is also
    /// in the report. Dropping the returned future cancels every node.
    pub async fn run(
        &self,
        pipeline: &Pipeline,
        request: RunRequest,
        events: Option<mpsc::UnboundedSender<RunEvent>>,
    ) -> Result<RunReport, RunError> {
        let recorder = Recorder::new();
        if let Some(events) = events {
            recorder.forward(events);
        }
        self.run_recorded(pipeline, request, &recorder).await
    }

    /// Runs `pipeline` on `request`, recording every event on `recorder` (whose subscribers
    /// watch it live); the report is derived from those events. The caller closes the
    /// recorder when it is done with the outcome. The run gets a new id.
    pub async fn run_recorded(
        &self,
        pipeline: &Pipeline,
        request: RunRequest,
        recorder: &Recorder,
    ) -> Result<RunReport, RunError> {
        self.run_as(RunId::random()?, pipeline, request, recorder)
            .await
    }

    /// [`Runner::run_recorded`] as run `id` (the id its caller already gave out).
    pub async fn run_as(
        &self,
        id: RunId,
        pipeline: &Pipeline,
        request: RunRequest,
        recorder: &Recorder,
    ) -> Result<RunReport, RunError> {
        self.check(pipeline)?;
        self.check_capabilities(pipeline, request.mode)?;
        let estimated = self.estimate(pipeline, &request);
        let history_from = self.history.mark();
        let run_start = Instant::now()
            .checked_sub(recorder.now())
            .unwrap_or_else(Instant::now);
        let n = pipeline.nodes.len();
        recorder.record(RunEvent::RunStarted {
            pipeline: pipeline.name.clone(),
            mode: request.mode,
            nodes: pipeline
                .nodes
                .iter()
                .map(|node| NodeInfo {
                    id: node.id.clone(),
                    kind: node.kind.name(),
                    inputs: node.inputs.iter().map(|e| e.from).collect(),
                })
                .collect(),
            output: pipeline.output,
            critical_estimated: estimated.nodes.clone(),
        });
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
            recorder,
            priorities,
            run_id: id,
            policies: MeteredProvider::new(self.policies.clone(), RunBudget::new(self.limits)),
            model_calls: ClosingMeter(UsageMeter::new(request.late_charge.clone())),
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
                        to: consumer,
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
                tokens: 0,
                history_seq: pipeline.nodes[i].history.as_ref().map(|_| None),
                history_gate: None,
                guard: None,
                edges_ended: false,
            };
            let span = tracing::info_span!("node", id = %pipeline.nodes[i].id);
            nodes.push(
                ctx.run_node(ix, inputs, emitter, wakers[i].clone())
                    .instrument(span),
            );
        }
        // Only producers hold inbox senders now, so an inbox closes when its producers end.
        drop(senders);

        try_join_all(nodes).await?;
        let total = recorder.now();
        let mut report =
            RunReport::from_events(pipeline, request.mode, &estimated, recorder.events(), total);
        // Background compressions that started or ended while the run went, on their lane:
        // its own namespace's only (another tenant's are none of its business).
        let history = self
            .history
            .events()
            .into_iter()
            .filter(|e| e.seq > history_from && e.namespace == request.namespace)
            .collect();
        report.add_history(history, run_start);
        report.model_calls = ctx.model_calls.0.close();
        Ok(report)
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
    to: NodeIndex,
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
    /// Output so far, for the chunks' running totals.
    tokens: u32,
    /// The node keeps a conversation budget: its first token takes a number in the
    /// memory's order of events (so tests see it did not wait for a compression).
    history_seq: Option<Option<u64>>,
    /// Opened at the first token: the compression this node's turn started may begin.
    history_gate: Option<StartGate>,
    /// The node's inner-edge guards (`[[nodes.guards]]`): other nodes get only what they
    /// release.
    guard: Option<Guest<GuardChain>>,
    /// Every edge got its end (the output ended, or a guard stopped it).
    edges_ended: bool,
}

impl Emitter<'_> {
    /// Whether anyone still reads this node.
    fn wanted(&self) -> bool {
        self.is_output || (!self.edges_ended && self.edges.iter().any(OutEdge::open))
    }

    async fn delta(&mut self, text: &str, tokens: u32) {
        if text.is_empty() && tokens == 0 {
            return;
        }
        if let Some(None) = self.history_seq {
            let seq = self.ctx.runner.history.mark();
            self.history_seq = Some(Some(seq));
            self.ctx.recorder.record(RunEvent::HistoryFirstToken {
                node: self.node,
                seq,
            });
            if let Some(gate) = self.history_gate.take() {
                gate.open();
            }
        }
        self.tokens += tokens;
        self.ctx.recorder.record(RunEvent::NodeDelta {
            node: self.node,
            text: text.to_string(),
            tokens,
        });
        if self.edges_ended {
            return;
        }
        match self.guard.as_mut() {
            None => self.hand(text, tokens),
            Some(guard) => {
                let pushed = text.to_owned();
                let outcome = guard
                    .call(move |chain| Ok(chain.push(&pushed, tokens)))
                    .await;
                self.take_guarded(outcome, tokens);
            }
        }
    }

    /// Chunks `text` onto every open edge.
    fn hand(&mut self, text: &str, tokens: u32) {
        for edge in &mut self.edges {
            if !edge.open() {
                continue;
            }
            if let Some(chunk) = edge.chunker.push(text, tokens) {
                Self::send_chunk(self.ctx, self.node, self.tokens, edge, chunk);
            }
        }
    }

    /// Hands on what the guards released and records their verdicts; a stop (or a guard
    /// failing closed) ends every edge here.
    fn take_guarded(&mut self, outcome: Result<crate::guard::Outcome, PolicyError>, tokens: u32) {
        let outcome = outcome.unwrap_or_else(|error| crate::guard::Outcome {
            // The pool lost the chain (a panic on its thread): nothing more may pass.
            stopped: Some(format!("the guards failed: {error}")),
            ..Default::default()
        });
        if !outcome.released.is_empty() {
            self.hand(&outcome.released, tokens);
        }
        for event in outcome.events {
            self.ctx.recorder.record(RunEvent::Guard {
                node: self.node,
                event,
            });
        }
        if let Some(reason) = outcome.stopped {
            // In the node's span, which names it and its run.
            tracing::info!(%reason, "an inner-edge guard stopped the output");
            self.end_edges();
        }
    }

    fn send_chunk(ctx: &RunCtx, node: NodeIndex, total: u32, edge: &OutEdge, chunk: Chunk) {
        ctx.recorder.record(RunEvent::ChunkHanded {
            node,
            to: edge.to,
            tokens: chunk.tokens,
            total_tokens: total,
        });
        // A closed inbox means the consumer is done; nothing to deliver then.
        let _ = edge.tx.send(Inbound {
            slot: edge.slot,
            event: EdgeEvent::Chunk(chunk),
        });
    }

    /// The output is over: what the guards still held, the rest of every chunker, then the
    /// end of every edge.
    async fn finish(&mut self) {
        if !self.edges_ended
            && let Some(guard) = self.guard.as_mut()
        {
            let outcome = guard.call(|chain| Ok(chain.finish())).await;
            self.take_guarded(outcome, 0);
        }
        self.end_edges();
    }

    /// The rest of every chunker, then the end of every edge; once.
    fn end_edges(&mut self) {
        if std::mem::replace(&mut self.edges_ended, true) {
            return;
        }
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

/// Ends input `slot` for the session (and the draft feed), once.
async fn close_input(
    session: &mut Guest<dyn AggregatorSession>,
    open: &mut [bool],
    sources: &[Source],
    feed: &Option<DraftFeed>,
    slot: usize,
) -> Result<(), PolicyError> {
    if !std::mem::replace(&mut open[slot], false) {
        return Ok(());
    }
    let id = sources[slot].id.clone();
    if let Some(feed) = feed {
        feed.finish(&id);
    }
    session.call(move |session| session.finish(&id)).await
}

/// Applies one inbox event to the session (chunks in order, finishes, releases).
async fn on_input(
    session: &mut Guest<dyn AggregatorSession>,
    inputs: &mut InputSide,
    open: &mut [bool],
    sources: &[Source],
    feed: &Option<DraftFeed>,
    input: Option<Inbound>,
) -> Result<(), PolicyError> {
    let Some(Inbound { slot, event }) = input else {
        // Every producer has ended: whatever is still open is finished.
        for slot in 0..sources.len() {
            close_input(session, open, sources, feed, slot).await?;
        }
        inputs.rx = None;
        return Ok(());
    };
    match event {
        EdgeEvent::Chunk(chunk) if open[slot] => {
            let id = sources[slot].id.clone();
            if let Some(feed) = feed {
                feed.push_text(&id, &chunk.text);
            }
            let text = chunk.text;
            let demand = session
                .call(move |session| session.push(&id, &text))
                .await?;
            if demand == Demand::Enough {
                inputs.release(slot);
                close_input(session, open, sources, feed, slot).await?;
            }
        }
        EdgeEvent::Chunk(_) => {}
        EdgeEvent::Finished => close_input(session, open, sources, feed, slot).await?,
    }
    Ok(())
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
    recorder: &'r Recorder,
    priorities: Vec<Priority>,
    /// Tells a replicated remote model which requests are one run's (see `routing`).
    run_id: RunId,
    /// The runner's policies, metered against this run's bounds.
    policies: MeteredProvider,
    /// The tokens of the run's plugin model calls (compressors'); closed when the run ends
    /// or is dropped, so what comes later goes to the request's late charge.
    model_calls: ClosingMeter,
}

/// Closes its meter when dropped: a cancelled run's later model calls are charged, too.
struct ClosingMeter(UsageMeter);

impl Drop for ClosingMeter {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl<'r> RunCtx<'r> {
    /// Who pays for the model calls of this run's plugins: its namespace, its meter.
    fn model_account(&self) -> ModelAccount {
        ModelAccount {
            namespace: self.request.namespace.clone(),
            meter: self.model_calls.0.clone(),
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

    /// Runs `call` with the run's (metered) policies on the guest pool, off the runtime:
    /// opening an instance runs the plugin's start code.
    async fn on_pool<R: Send + 'static>(
        &self,
        call: impl FnOnce(&MeteredProvider) -> Result<R, PolicyError> + Send + 'static,
    ) -> Result<R, PolicyError> {
        let policies = self.policies.clone();
        self.runner.guests.run(move || call(&policies)).await?
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
        mut emitter: Emitter<'r>,
        waker: Arc<Notify>,
    ) -> Result<(), RunError> {
        let node = self.pipeline.node(ix);
        let policy_error = self.policy_error(ix);
        let mode = self.request.mode;
        if !node.guards.is_empty() && !emitter.edges.is_empty() {
            let specs = node.guards.clone();
            let info = crate::guard::StreamInfo {
                node_id: node.id.clone(),
                model: match &node.model {
                    ModelBinding::Fixed(model) => model.clone(),
                    ModelBinding::Routed { .. } => "routed".into(),
                    ModelBinding::None => String::new(),
                },
                to_client: false,
            };
            let (chain, unopened) = self
                .on_pool(move |policies| crate::guard::open_chain(policies, &specs, &info))
                .await
                .map_err(&policy_error)?;
            for event in unopened {
                self.recorder.record(RunEvent::Guard { node: ix, event });
            }
            emitter.guard = Some(Guest::new(self.runner.guests.clone(), Box::new(chain)));
        }
        // A long conversation: the compressed form when one is ready, else the full one
        // (its compression starts in the background, for the next turn). Never waits.
        let conversation = match &node.history {
            Some(policy) => {
                let models = self.runner.models.clone();
                let count: TokenCount = Arc::new(move |text: &str| models.count_tokens(text));
                let (conversation, used, gate) = self.runner.history.prepare(
                    &self.model_account(),
                    &policy.compressor,
                    policy.budget_tokens,
                    &self.request.conversation,
                    &count,
                    &self.runner.policies,
                    self.history_warm(ix),
                );
                self.recorder.record(RunEvent::History { node: ix, used });
                emitter.history_gate = gate;
                conversation
            }
            None => self.request.conversation.clone(),
        };
        match node.kind {
            NodeKind::Compressor { budget_tokens } => {
                let plugin = node.plugin.clone();
                let compressor = self
                    .on_pool(move |policies| policies.compressor(&plugin))
                    .await
                    .map_err(&policy_error)?;
                self.run_compressor(ix, compressor, budget_tokens, inputs, emitter)
                    .await
            }
            NodeKind::Agent => {
                let (plugin, config) = (node.plugin.clone(), node.config.clone());
                let (role, params) = self
                    .on_pool(move |policies| {
                        let mut role = policies.role(&plugin, &config)?;
                        let params = role.params()?;
                        Ok((role, params))
                    })
                    .await
                    .map_err(&policy_error)?;
                let sampling = node.params.apply(params);
                let session = RoleSession::new(role, conversation, self.sources(ix), mode);
                self.run_stepped(ix, Box::new(session), sampling, inputs, emitter, waker)
                    .await
            }
            NodeKind::Aggregator => {
                let (plugin, config) = (node.plugin.clone(), node.config.clone());
                let sources = self.sources(ix);
                let session = self
                    .on_pool(move |policies| {
                        policies.aggregator(&plugin, &config, &conversation, &sources, mode)
                    })
                    .await
                    .map_err(&policy_error)?;
                let sampling = node.params.apply(SamplingParams::default());
                self.run_stepped(ix, session, sampling, inputs, emitter, waker)
                    .await
            }
        }
    }

    /// How a compressed conversation of agent `ix` gets into its engine's prefix cache before
    /// a turn uses it: the node's role builds the prompt (as its first step will, no inputs
    /// yet) and a background warm-up prefills it. None for other kinds and routed nodes,
    /// whose prompt or engine is only known at the step.
    fn history_warm(&self, ix: NodeIndex) -> Option<Warm> {
        let node = self.pipeline.node(ix);
        let ModelBinding::Fixed(model) = &node.model else {
            return None;
        };
        if node.kind != NodeKind::Agent || !node.inputs.is_empty() {
            return None;
        }
        let engine = self.runner.models.get(model)?.clone();
        let policies = self.runner.policies.clone();
        let (plugin, config) = (node.plugin.clone(), node.config.clone());
        // Background work for the run's tenant: its namespace, its meter.
        let account = self.model_account();
        Some(Arc::new(move |conversation: &[ChatMessage]| {
            let input = crate::policy::RoleInput {
                conversation: conversation.to_vec(),
                upstream: Vec::new(),
            };
            let messages = match policies
                .role(&plugin, &config)
                .and_then(|mut role| role.build_messages(&input))
            {
                Ok(messages) => messages,
                Err(error) => {
                    tracing::debug!(%plugin, %error, "no warm-up of a compressed history");
                    return;
                }
            };
            let mut request = GenerationRequest::chat(messages);
            request.sampling.max_tokens = 0;
            request.priority = Priority::BACKGROUND;
            request.namespace = account.namespace.clone();
            match engine
                .submit(request)
                .and_then(GenerationStream::blocking_collect)
            {
                Ok(done) => account.meter.record(&done.usage),
                Err(error) => tracing::debug!(%error, "warm-up of a compressed history failed"),
            }
        }))
    }

    /// The engine for a step of `node`, asking its router when it has one (then the
    /// router's choice comes back too).
    async fn engine_for(
        &self,
        ix: NodeIndex,
        router: &mut Option<Guest<dyn RouterPolicy>>,
        features: &StepFeatures,
    ) -> Result<(&'r Arc<dyn Engine>, Option<RouteChoice>), RunError> {
        let node = self.pipeline.node(ix);
        let (name, choice) = match (&node.model, router.as_mut()) {
            (ModelBinding::Routed { models, .. }, Some(router)) => {
                let request = RouteRequest {
                    node_id: node.id.clone(),
                    prompt_tokens: features.prompt_tokens,
                    query: features.query.clone(),
                    models: models.clone(),
                    role: node.label.clone(),
                    answer_tokens: features.answer_tokens,
                    max_tokens: features.max_tokens,
                    previous_model: features.previous_model.clone(),
                    confidence: features.confidence,
                };
                let choice = router
                    .call(move |router| router.route(&request))
                    .await
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
        session: Box<dyn AggregatorSession>,
        sampling: SamplingParams,
        mut inputs: InputSide,
        mut emitter: Emitter<'r>,
        waker: Arc<Notify>,
    ) -> Result<(), RunError> {
        let node = self.pipeline.node(ix);
        let policy_error = self.policy_error(ix);
        let mut session = Guest::new(self.runner.guests.clone(), session);
        let mut router = match &node.model {
            ModelBinding::Routed { router, .. } => {
                let (plugin, config) = (router.clone(), node.config.clone());
                let router = self
                    .on_pool(move |policies| policies.router(&plugin, &config))
                    .await
                    .map_err(&policy_error)?;
                Some(Guest::new(self.runner.guests.clone(), router))
            }
            _ => None,
        };
        let sources = self.sources(ix);
        let mut open: Vec<bool> = vec![true; sources.len()];
        // The inputs' text, for the engine to draft from: an aggregator copies its proposers.
        let feed = (!sources.is_empty()).then(DraftFeed::new);
        let budget = sampling.max_tokens;
        let mut started = false;
        let mut steps = 0u32;
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
            let step = match session
                .call(|session| session.next_step())
                .await
                .map_err(&policy_error)?
            {
                // A non-final step of zero tokens is a warm-up: its prompt goes into the
                // prefix cache while the node waits for input. One at a time is enough.
                Some(step) if !step.is_final && step.max_tokens == 0 => {
                    if warming.is_none() {
                        features.prompt(&step.messages, router.is_some(), self.runner);
                        let (engine, _) = self.engine_for(ix, &mut router, &features).await?;
                        let request = self.step_request(ix, step.messages, &answer, 0, &sampling);
                        let started = self.recorder.now();
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
                    on_input(&mut session, &mut inputs, &mut open, &sources, &feed, input)
                        .await
                        .map_err(&policy_error)?;
                }
                continue;
            };

            if !std::mem::replace(&mut started, true) {
                self.recorder.record(RunEvent::NodeStarted { node: ix });
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
                self.finish_warm_up(ix, stream, started).await;
            }
            features.prompt(&step.messages, router.is_some(), self.runner);
            let mut step_left = max_tokens;
            let reason = loop {
                let part = route_tokens.map_or(step_left, |n| n.min(step_left));
                features.answer_tokens = answer_tokens;
                let (engine, choice) = self.engine_for(ix, &mut router, &features).await?;
                // Latencies are learned per model: the routed one, else the node's.
                let model_name = match (&choice, &self.pipeline.node(ix).model) {
                    (Some(choice), _) => choice.model.clone(),
                    (None, ModelBinding::Fixed(name)) => name.clone(),
                    (None, _) => DEFAULT_MODEL.to_string(),
                };
                let mut request =
                    self.step_request(ix, step.messages.clone(), &answer, part, &sampling);
                if let Some(feed) = &feed {
                    request.extensions.insert(feed.clone());
                }
                if choice.is_some() {
                    request.extensions.insert(MeasureConfidence);
                }
                let step_started = self.recorder.record(RunEvent::StepStarted {
                    node: ix,
                    index: steps,
                    is_final: step.is_final && part == step_left,
                    messages: step.messages.clone(),
                });
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
                            emitter.delta(&text, count).await;
                        }
                        Wake::Engine(Some(Ok(GenerationEvent::Finished {
                            reason,
                            usage,
                            timings,
                            extensions,
                        }))) => {
                            self.runner.latencies.observe(&model_name, &usage, &timings);
                            break (reason, usage, extensions);
                        }
                        Wake::Engine(Some(Err(error))) => return Err(engine_error(error)),
                        Wake::Engine(None) => return Err(engine_error(EngineError::Stopped)),
                        Wake::Input(input) => {
                            on_input(&mut session, &mut inputs, &mut open, &sources, &feed, input)
                                .await
                                .map_err(&policy_error)?
                        }
                        Wake::Released => {
                            if !emitter.wanted() {
                                // Dropping the stream cancels the engine sequence.
                                drop(stream);
                                cancelled = true;
                                break 'run;
                            }
                        }
                    }
                };
                answer.push_str(&step_text);
                answer_tokens += step_tokens;
                step_left = step_left.saturating_sub(step_tokens);
                // The policy's step is over when the model stops or its tokens are spent;
                // a routed node asks its router again before the next part.
                let last = route_tokens.is_none()
                    || reason == FinishReason::Stop
                    || step_left == 0
                    || answer_tokens >= budget;
                self.recorder.record(RunEvent::StepFinished {
                    node: ix,
                    index: steps,
                    started: step_started,
                    tokens: step_tokens,
                    prompt_tokens: usage.prompt_tokens,
                    cached_prompt_tokens: usage.cached_prompt_tokens,
                    is_final: step.is_final && last,
                    speculation: extensions.get::<SpeculationStats>().cloned(),
                });
                if let Some(choice) = choice {
                    let confidence = extensions.get::<Confidence>().copied();
                    tracing::debug!(
                        node = %node.id,
                        model = %choice.model,
                        reason = %choice.reason,
                        tokens = step_tokens,
                        "routed step"
                    );
                    self.recorder.record(RunEvent::StepRouted {
                        node: ix,
                        index: steps,
                        model: choice.model.clone(),
                        reason: choice.reason,
                        answer_tokens: answer_tokens - step_tokens,
                        tokens: step_tokens,
                        confidence,
                    });
                    features.previous_model = Some(choice.model);
                    features.confidence = confidence;
                }
                steps += 1;
                let answered = step_text.clone();
                session
                    .call(move |session| session.answered(&answered))
                    .await
                    .map_err(&policy_error)?;
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
        emitter.finish().await;
        self.recorder.record(RunEvent::NodeFinished {
            node: ix,
            cancelled,
        });
        Ok(())
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
        request.namespace = self.request.namespace.clone();
        request.extensions.insert(crate::routing::RouteHint {
            run: self.run_id.routing_key(),
            node: self.pipeline.node(ix).id.clone(),
        });
        request
    }

    /// Waits for a warm-up to finish and records it. A failed warm-up costs only its cache
    /// benefit, so it is logged, not raised.
    async fn finish_warm_up(&self, ix: NodeIndex, mut stream: GenerationStream, started: Duration) {
        while let Some(event) = stream.next().await {
            match event {
                Ok(GenerationEvent::Delta { .. }) => {}
                Ok(GenerationEvent::Finished { usage, .. }) => {
                    self.recorder.record(RunEvent::WarmUp {
                        node: ix,
                        started,
                        prompt_tokens: usage.prompt_tokens,
                        cached_prompt_tokens: usage.cached_prompt_tokens,
                    });
                    return;
                }
                Err(error) => {
                    tracing::warn!(node = %self.pipeline.node(ix).id, %error, "warm-up failed");
                    return;
                }
            }
        }
    }

    /// A compressor: waits for its inputs in full, shortens them in one plugin call (its one
    /// step).
    async fn run_compressor(
        &'r self,
        ix: NodeIndex,
        mut compressor: Box<dyn CompressorPolicy>,
        budget_tokens: u32,
        mut inputs: InputSide,
        mut emitter: Emitter<'r>,
    ) -> Result<(), RunError> {
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
        self.recorder.record(RunEvent::NodeStarted { node: ix });
        let started = self.recorder.record(RunEvent::StepStarted {
            node: ix,
            index: 0,
            is_final: true,
            messages: Vec::new(),
        });
        let history: Vec<ChatMessage> = sources
            .iter()
            .zip(&texts)
            .map(|(source, text)| {
                ChatMessage::new(Role::Assistant, format!("{}: {}", source.label, text))
            })
            .collect();
        // A compressor may call a model through its plugin import, which blocks until the
        // engine answers; on the guest pool the other nodes and requests keep moving.
        compressor.bill_to(&self.model_account());
        let compressed = self
            .runner
            .guests
            .run(move || compressor.compress(&history, budget_tokens))
            .await
            .and_then(|answer| answer)
            .map_err(self.policy_error(ix))?;
        let text = compressed
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n\n");
        let tokens = self.runner.models.count_tokens(&text);
        emitter.delta(&text, tokens).await;
        self.recorder.record(RunEvent::StepFinished {
            node: ix,
            index: 0,
            started,
            tokens,
            prompt_tokens: 0,
            cached_prompt_tokens: 0,
            is_final: true,
            speculation: None,
        });
        emitter.finish().await;
        self.recorder.record(RunEvent::NodeFinished {
            node: ix,
            cancelled: false,
        });
        Ok(())
    }
}
