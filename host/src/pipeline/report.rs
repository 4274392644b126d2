//! What a finished run measured, derived from its recorded events.
//!
//! Nothing here is counted while the run goes on: [`RunReport::from_events`] reads the
//! recorder's stream once the run is over, so the report, the `--json` output and the traces
//! cannot disagree with what live views saw.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::adaptive::Choice;
use super::critical::{self, CriticalPath};
use super::history::{HistoryEvent, HistoryEventKind, HistoryUse};
use super::plugin_log::PluginLine;
use super::record::{self, Recorded, RunEvent};
use super::spec::{NodeIndex, NodeKind, Pipeline};
use crate::engine::{ChatMessage, Confidence};
use crate::policy::StreamMode;
use crate::speculate::SpeculationStats;
use crate::trace::chrome::ChromeTrace;
use crate::trace::{EventKind, Timeline};

/// The timeline lane of a run's background compressions (after the nodes' lanes).
pub const COMPRESSION_LANE: &str = "compression";

/// What one node did; times are since the run began, in milliseconds when serialized.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeReport {
    pub id: String,
    pub kind: &'static str,
    #[serde(serialize_with = "crate::millis::serialize_opt")]
    pub started_ms: Option<Duration>,
    #[serde(serialize_with = "crate::millis::serialize_opt")]
    pub first_token_ms: Option<Duration>,
    #[serde(serialize_with = "crate::millis::serialize_opt")]
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
    /// What the node's plugins wrote with `host.log`, in order (when the binary's log layer
    /// routes them: [`super::plugin_log`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<PluginLine>,
    /// What each of the node's engine requests sent to its model, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prompts: Vec<StepPrompt>,
    pub text: String,
}

/// The messages of one engine request of a node.
#[derive(Clone, Debug, Serialize)]
pub struct StepPrompt {
    /// The node's engine request number (as in the timeline's steps).
    pub step: u32,
    pub messages: Vec<ChatMessage>,
}

/// One engine request of a routed node: where the router sent it and why.
#[derive(Clone, Debug, Serialize)]
pub struct RoutedStep {
    /// The node's engine request number (as in the timeline's steps).
    pub step: u32,
    /// Tokens of the answer before this step (the prefix the model continued).
    pub answer_tokens: u32,
    pub tokens: u32,
    /// How sure the model was of this step's tokens, when its engine reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidence: Option<Confidence>,
    pub model: String,
    pub reason: String,
}

/// A critical path by node id.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PathReport {
    pub nodes: Vec<String>,
    #[serde(serialize_with = "crate::millis::serialize")]
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
    #[serde(serialize_with = "crate::millis::serialize_opt")]
    pub ttft_ms: Option<Duration>,
    #[serde(serialize_with = "crate::millis::serialize")]
    pub total_ms: Duration,
    pub nodes: Vec<NodeReport>,
    /// Before the run, from estimated costs.
    pub critical_path_estimated: PathReport,
    /// After the run: the chain of dependencies that held the answer up
    /// ([`critical::measured_path`]).
    pub critical_path_measured: PathReport,
    pub cache: CacheStats,
    /// The model calls the run's plugins made while it went (a compressor's
    /// `model.complete`), counted apart from the nodes' own.
    pub model_calls: crate::engine::Usage,
    /// Which declared variant ran and why, when the pipeline has variants; the caller that
    /// chose sets it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<Choice>,
    /// Background compressions of conversations that started, finished or failed while the
    /// run went (in the memory's order).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryEvent>,
    #[serde(skip)]
    pub timeline: Timeline,
    /// The run's event stream, everything above is derived from.
    #[serde(skip)]
    pub events: Vec<Recorded>,
    #[serde(skip)]
    measured_lanes: Vec<usize>,
}

impl RunReport {
    /// Keeps the conversation memory's `history` (what it did while the run went) and shows
    /// it on a timeline lane of its own, [`COMPRESSION_LANE`]: from the first compression's
    /// start (the run's start for one already running) to the last one's end (or the run's,
    /// while one still runs), each start, end and failure an instant with its details. Only
    /// events from `run_start` on are placed.
    pub(crate) fn add_history(&mut self, history: Vec<HistoryEvent>, run_start: Instant) {
        let placed: Vec<(Duration, &HistoryEvent)> = history
            .iter()
            .filter_map(|e| Some((e.at.checked_duration_since(run_start)?, e)))
            .collect();
        if let Some(&(first_at, first)) = placed.first() {
            let mut lanes = self.timeline.lanes().to_vec();
            let lane = lanes.len();
            lanes.push(COMPRESSION_LANE.into());
            let timeline = Timeline::new(lanes);
            for event in self.timeline.events() {
                timeline.record_at(event.at, event.lane, event.kind);
            }
            let already_running = !matches!(first.kind, HistoryEventKind::Started { .. });
            timeline.record_at(
                if already_running {
                    Duration::ZERO
                } else {
                    first_at
                },
                lane,
                EventKind::Start,
            );
            // Compressions still running at the last placed event.
            let mut running = i64::from(already_running);
            let mut last = first_at;
            for &(at, event) in &placed {
                let (name, delta) = match &event.kind {
                    HistoryEventKind::Started { .. } => ("compression started", 1),
                    HistoryEventKind::Finished { .. } => ("compression finished", -1),
                    HistoryEventKind::Failed { .. } => ("compression failed", -1),
                };
                running += delta;
                last = at;
                timeline.record_at(
                    at,
                    lane,
                    EventKind::Note {
                        category: "history",
                        name: format!("{name} ({} messages)", event.messages),
                        args: serde_json::to_value(event).unwrap_or_default(),
                    },
                );
            }
            let end = if running > 0 { self.total_ms } else { last };
            timeline.record_at(end, lane, EventKind::End { tokens: 0 });
            self.timeline = timeline;
        }
        self.history = history;
    }

    /// The run as a Chrome trace, the measured critical path marked.
    pub fn trace(&self) -> ChromeTrace {
        let mut trace = ChromeTrace::from_timeline(&self.timeline, &self.measured_lanes);
        if let Some(variant) = &self.variant {
            trace.trace_events.push(crate::trace::chrome::TraceEvent {
                name: "staircase_variant".into(),
                cat: String::new(),
                ph: "M".into(),
                ts: 0.0,
                dur: None,
                pid: 1,
                tid: 0,
                s: None,
                args: serde_json::to_value(variant).unwrap_or_default(),
            });
        }
        trace
    }
}

impl NodeReport {
    /// What `events` say node `ix` of `pipeline` did.
    fn from_events(pipeline: &Pipeline, ix: NodeIndex, events: &[Recorded]) -> Self {
        let node = pipeline.node(ix);
        let mut report = NodeReport {
            id: node.id.clone(),
            kind: node.kind.name(),
            ..NodeReport::default()
        };
        let mut finished = None;
        for Recorded { at, event } in events {
            match event {
                RunEvent::NodeStarted { node } if *node == ix => {
                    report.started_ms.get_or_insert(*at);
                }
                RunEvent::NodeDelta { node, text, tokens } if *node == ix => {
                    report.first_token_ms.get_or_insert(*at);
                    report.text.push_str(text);
                    report.output_tokens += tokens;
                }
                RunEvent::StepFinished {
                    node,
                    prompt_tokens,
                    cached_prompt_tokens,
                    speculation,
                    ..
                } if *node == ix => {
                    report.steps += 1;
                    report.prompt_tokens += prompt_tokens;
                    report.cached_prompt_tokens += cached_prompt_tokens;
                    if let Some(stats) = speculation {
                        report
                            .speculation
                            .get_or_insert_with(SpeculationStats::default)
                            .merge(stats);
                    }
                }
                RunEvent::WarmUp {
                    node,
                    prompt_tokens,
                    cached_prompt_tokens,
                    ..
                } if *node == ix => {
                    report.prompt_tokens += prompt_tokens;
                    report.cached_prompt_tokens += cached_prompt_tokens;
                }
                RunEvent::NodeFinished { node, cancelled } if *node == ix => {
                    finished = Some(*at);
                    report.cancelled = *cancelled;
                }
                RunEvent::StepRouted {
                    node,
                    index,
                    model,
                    reason,
                    answer_tokens,
                    tokens,
                    confidence,
                } if *node == ix => report.routes.push(RoutedStep {
                    step: *index,
                    answer_tokens: *answer_tokens,
                    tokens: *tokens,
                    confidence: *confidence,
                    model: model.clone(),
                    reason: reason.clone(),
                }),
                RunEvent::History { node, used } if *node == ix => {
                    let seq = report.history.take().and_then(|h| h.first_token_seq);
                    report.history = Some(HistoryUse {
                        first_token_seq: seq,
                        ..used.clone()
                    });
                }
                RunEvent::PluginLog { node, line } if *node == ix => {
                    report.logs.push(line.clone());
                }
                RunEvent::StepStarted {
                    node,
                    index,
                    messages,
                    ..
                } if *node == ix && !messages.is_empty() => report.prompts.push(StepPrompt {
                    step: *index,
                    messages: messages.clone(),
                }),
                RunEvent::HistoryFirstToken { node, seq } if *node == ix => {
                    report
                        .history
                        .get_or_insert_with(HistoryUse::default)
                        .first_token_seq = Some(*seq);
                }
                _ => {}
            }
        }
        // A node that never started has no span, even when it was cancelled.
        report.finished_ms = report.started_ms.and(finished);
        report
    }
}

impl RunReport {
    /// The report of a run of `pipeline` that recorded `events` and took `total`;
    /// `estimated` is the critical path estimated before it.
    pub fn from_events(
        pipeline: &Pipeline,
        mode: StreamMode,
        estimated: &CriticalPath,
        events: Vec<Recorded>,
        total: Duration,
    ) -> Self {
        let nodes: Vec<NodeReport> = (0..pipeline.nodes.len())
            .map(|i| NodeReport::from_events(pipeline, NodeIndex(i), &events))
            .collect();
        let spans: Vec<_> = nodes
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
        for (node, report) in pipeline.nodes.iter().zip(&nodes) {
            cache.prompt_tokens += report.prompt_tokens;
            cache.cached_prompt_tokens += report.cached_prompt_tokens;
            if node.kind == NodeKind::Aggregator {
                cache.aggregator_prompt_tokens += report.prompt_tokens;
                cache.aggregator_cached_prompt_tokens += report.cached_prompt_tokens;
            }
        }
        let output = &nodes[pipeline.output.0];
        let timeline = record::timeline(
            pipeline.nodes.iter().map(|n| n.id.clone()).collect(),
            &events,
        );
        RunReport {
            pipeline: pipeline.name.clone(),
            mode,
            answer: output.text.clone(),
            ttft_ms: output.first_token_ms,
            total_ms: total,
            critical_path_estimated: path_report(estimated),
            critical_path_measured: path_report(&measured),
            measured_lanes: measured.nodes.iter().map(|i| i.0).collect(),
            cache,
            model_calls: Default::default(),
            variant: None,
            history: Vec::new(),
            nodes,
            timeline,
            events,
        }
    }
}
