//! The run recorder: one ordered stream of typed events per run.
//!
//! The runtime records everything that happens in a run here, once, as a [`RunEvent`]
//! stamped with its time since the run began. Everything else is derived from that stream:
//! the report's per-node figures ([`super::report`]), the [`Timeline`] the traces are drawn
//! from, and live views: the terminal's and the server's answer path get every event
//! ([`Recorder::forward`]); the server's run-events SSE reads the log from where it left off
//! whenever [`Recorder::watch`] says it grew, so a subscriber that does not read costs the
//! run nothing (no copy, no channel, no work under the lock). A new kind of event is a new variant here plus, where a derived view needs it, one arm
//! in that view; consumers that do not care ignore it.
//!
//! This room records and fans out; it must not decide anything about the run.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, watch};

use super::history::HistoryUse;
use super::plugin_log::PluginLine;
use super::spec::NodeIndex;
use crate::engine::{ChatMessage, Confidence};
use crate::policy::StreamMode;
use crate::speculate::SpeculationStats;
use crate::trace::{EventKind, Timeline};

/// Why a cancelled node stopped (the only reason the runtime cancels a node today).
pub const CANCEL_REASON: &str = "no consumer reads it any more";

/// A node as a live view needs it, sent once when the run starts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeInfo {
    pub id: String,
    pub kind: &'static str,
    /// The nodes it reads, in input order.
    pub inputs: Vec<NodeIndex>,
}

/// Something that happened in a run. Serialized (for the server's run-events stream) with a
/// `type` tag in snake case; nodes are their index in the run's `run_started.nodes`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RunEvent {
    /// The first event of every run.
    RunStarted {
        pipeline: String,
        mode: StreamMode,
        nodes: Vec<NodeInfo>,
        /// The node that gives the answer.
        output: NodeIndex,
        /// The critical path estimated before the run.
        critical_estimated: Vec<NodeIndex>,
    },
    /// The node began work (its first model request or plugin call).
    NodeStarted { node: NodeIndex },
    /// Text a node generated. Deltas of the pipeline's output are the answer.
    NodeDelta {
        node: NodeIndex,
        text: String,
        tokens: u32,
    },
    /// A guard redacted, stopped, failed or overflowed: an inner-edge guard of `node`
    /// (`[[nodes.guards]]`) on what it hands to other nodes, or, on the output node, one of
    /// the answer's output guards.
    Guard {
        node: NodeIndex,
        event: crate::guard::GuardEvent,
    },
    /// A chunk of `node`'s output went to `to`; `total_tokens` counts its output so far.
    ChunkHanded {
        node: NodeIndex,
        to: NodeIndex,
        tokens: u32,
        total_tokens: u32,
    },
    /// A step (one engine request of an agent or aggregator, or a compressor's plugin call)
    /// began.
    StepStarted {
        node: NodeIndex,
        index: u32,
        is_final: bool,
        /// The messages the step sent to its model (none for a compressor's call).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        messages: Vec<ChatMessage>,
    },
    /// That step ended after `tokens` of output.
    StepFinished {
        node: NodeIndex,
        index: u32,
        #[serde(skip)]
        started: Duration,
        tokens: u32,
        prompt_tokens: u32,
        cached_prompt_tokens: u32,
        is_final: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        speculation: Option<SpeculationStats>,
    },
    /// A warm-up (a prompt prefilled into the prefix cache, nothing generated) ran from
    /// `started` until now.
    WarmUp {
        node: NodeIndex,
        #[serde(skip)]
        started: Duration,
        prompt_tokens: u32,
        cached_prompt_tokens: u32,
    },
    /// The node is done; `cancelled` when it stopped early because nobody read it any more.
    NodeFinished { node: NodeIndex, cancelled: bool },
    /// A routed node's step `index` ran on `model`, chosen by its router for `reason`.
    StepRouted {
        node: NodeIndex,
        index: u32,
        model: String,
        reason: String,
        /// Tokens of the answer before the step (what the model continued).
        answer_tokens: u32,
        tokens: u32,
        /// How sure the model was of the step's tokens, when its engine says.
        #[serde(skip_serializing_if = "Option::is_none")]
        confidence: Option<Confidence>,
    },
    /// A node with a history budget starts with the conversation as its memory gave it
    /// (full, or a ready compression of a prefix) and maybe a compression in the background.
    History { node: NodeIndex, used: HistoryUse },
    /// That node's first token, numbered in the memory's order of events (before a
    /// compression's end: the token did not wait for it).
    HistoryFirstToken { node: NodeIndex, seq: u64 },
    /// Answer text the answer's output guards let out to the reader: a guarded run's answer
    /// as its client saw it.
    Released { text: String },
    /// A line `node`'s plugin wrote with `host.log` ([`super::plugin_log`]).
    PluginLog {
        node: NodeIndex,
        #[serde(flatten)]
        line: PluginLine,
    },
}

/// An event and when it happened.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recorded {
    /// Since the run began; `at_ms` when serialized.
    #[serde(rename = "at_ms", serialize_with = "crate::millis::serialize")]
    pub at: Duration,
    #[serde(flatten)]
    pub event: RunEvent,
}

impl Recorded {
    /// The event as a guarded run shows it to its client: a node's text before the output
    /// guards is withheld (its token count stays), and so are its plugins' log lines (which
    /// may quote it); everything else as recorded.
    pub fn without_generated_text(&self) -> Recorded {
        let mut shown = self.clone();
        match &mut shown.event {
            RunEvent::NodeDelta { text, .. } => text.clear(),
            RunEvent::PluginLog { line, .. } => line.message.clear(),
            // An aggregator's prompt quotes its sources' text.
            RunEvent::StepStarted { messages, .. } => messages.clear(),
            _ => {}
        }
        shown
    }
}

/// A live listener; dropped when it returns `false` (its receiver went away).
type Subscriber = Box<dyn FnMut(&Recorded) -> bool + Send>;

#[derive(Default)]
struct Log {
    events: Vec<Recorded>,
    subscribers: Vec<Subscriber>,
    closed: bool,
}

/// One run's event stream: records from any task, in order, and fans out live.
pub struct Recorder {
    start: Instant,
    log: Mutex<Log>,
    /// Bumped after every event and at close; readers of the log wait on it.
    grew: watch::Sender<()>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Recorder {
    /// A recorder whose clock starts now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            log: Mutex::new(Log::default()),
            grew: watch::Sender::new(()),
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        // A poisoned lock only means a subscriber panicked; the events are still valid.
        crate::sync::lock(&self.log)
    }

    /// Time since the recorder began.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Records `event` now and hands it to every subscriber; returns its time. Stamped under
    /// the lock, so the stream is in time order.
    pub fn record(&self, event: RunEvent) -> Duration {
        let mut log = self.log();
        let recorded = Recorded {
            at: self.now(),
            event,
        };
        let at = recorded.at;
        log.subscribers.retain_mut(|s| s(&recorded));
        log.events.push(recorded);
        drop(log);
        self.grew.send_replace(());
        at
    }

    /// Every event so far, in order.
    pub fn events(&self) -> Vec<Recorded> {
        self.log().events.clone()
    }

    /// A receiver that changes whenever an event is recorded or the recorder closes. Mark
    /// it seen, then [`Recorder::read_from`]: an event recorded after the read changes it.
    pub fn watch(&self) -> watch::Receiver<()> {
        self.grew.subscribe()
    }

    /// Up to `max` events from index `from` on, and whether the recorder is closed (then
    /// nothing follows what the log holds).
    pub fn read_from(&self, from: usize, max: usize) -> (Vec<Recorded>, bool) {
        let log = self.log();
        let from = from.min(log.events.len());
        let to = from.saturating_add(max).min(log.events.len());
        (log.events[from..to].to_vec(), log.closed)
    }

    /// Sends every later event (without its time) to `tx`.
    pub fn forward(&self, tx: mpsc::UnboundedSender<RunEvent>) {
        let mut log = self.log();
        if !log.closed {
            log.subscribers
                .push(Box::new(move |event| tx.send(event.event.clone()).is_ok()));
        }
    }

    /// Ends every subscription: the owner of the run calls it once the run's outcome is
    /// known, so a subscriber that sees its stream end can look the outcome up.
    pub fn close(&self) {
        let mut log = self.log();
        log.closed = true;
        log.subscribers.clear();
        drop(log);
        self.grew.send_replace(());
    }
}

/// Output tokens of `node` in `events`.
fn output_tokens(events: &[Recorded], node: NodeIndex) -> u32 {
    events
        .iter()
        .map(|r| match &r.event {
            RunEvent::NodeDelta {
                node: n, tokens, ..
            } if *n == node => *tokens,
            _ => 0,
        })
        .sum()
}

/// The trace view of `events`: one lane per node, named by `lanes`.
pub fn timeline(lanes: Vec<String>, events: &[Recorded]) -> Timeline {
    let timeline = Timeline::new(lanes.clone());
    let mut seen_token = vec![false; lanes.len()];
    let lane_name = |i: NodeIndex| lanes.get(i.0).cloned().unwrap_or_default();
    for Recorded { at, event } in events {
        let (node, kind) = match event {
            RunEvent::NodeStarted { node } => (*node, EventKind::Start),
            RunEvent::NodeDelta { node, .. } => match seen_token.get_mut(node.0) {
                Some(seen) if !*seen => {
                    *seen = true;
                    (*node, EventKind::FirstToken)
                }
                _ => continue,
            },
            RunEvent::ChunkHanded {
                node,
                to,
                tokens,
                total_tokens,
            } => (
                *node,
                EventKind::Chunk {
                    to: lane_name(*to),
                    tokens: *tokens,
                    total_tokens: *total_tokens,
                },
            ),
            RunEvent::StepFinished {
                node,
                index,
                started,
                tokens,
                prompt_tokens,
                cached_prompt_tokens,
                is_final,
                ..
            } => (
                *node,
                EventKind::Step {
                    index: *index,
                    started: *started,
                    tokens: *tokens,
                    prompt_tokens: *prompt_tokens,
                    cached_prompt_tokens: *cached_prompt_tokens,
                    is_final: *is_final,
                },
            ),
            RunEvent::WarmUp {
                node,
                started,
                prompt_tokens,
                cached_prompt_tokens,
            } => (
                *node,
                EventKind::WarmUp {
                    started: *started,
                    prompt_tokens: *prompt_tokens,
                    cached_prompt_tokens: *cached_prompt_tokens,
                },
            ),
            RunEvent::NodeFinished { node, cancelled } => {
                let tokens = output_tokens(events, *node);
                let kind = if *cancelled {
                    EventKind::Cancelled {
                        reason: CANCEL_REASON.into(),
                        tokens,
                    }
                } else {
                    EventKind::End { tokens }
                };
                (*node, kind)
            }
            RunEvent::StepRouted {
                node,
                index,
                model,
                reason,
                tokens,
                confidence,
                ..
            } => (
                *node,
                EventKind::Note {
                    category: "route",
                    name: format!("step {index} on {model}"),
                    args: serde_json::json!({
                        "model": model,
                        "reason": reason,
                        "tokens": tokens,
                        "confidence": confidence,
                    }),
                },
            ),
            RunEvent::Guard { node, event } => (
                *node,
                EventKind::Note {
                    category: "guard",
                    name: event.summary(),
                    args: serde_json::to_value(event).unwrap_or_default(),
                },
            ),
            RunEvent::History { node, used } => (
                *node,
                EventKind::Note {
                    category: "history",
                    name: if used.replaced_messages > 0 {
                        format!("compressed history ({} messages)", used.replaced_messages)
                    } else {
                        "full history".into()
                    },
                    args: serde_json::to_value(used).unwrap_or_default(),
                },
            ),
            RunEvent::RunStarted { .. }
            | RunEvent::StepStarted { .. }
            | RunEvent::HistoryFirstToken { .. }
            | RunEvent::Released { .. }
            | RunEvent::PluginLog { .. } => continue,
        };
        timeline.record_at(*at, node.0, kind);
    }
    timeline
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(node: usize, text: &str) -> RunEvent {
        RunEvent::NodeDelta {
            node: NodeIndex(node),
            text: text.into(),
            tokens: 1,
        }
    }

    #[test]
    fn a_reader_is_told_when_the_log_grows_and_when_it_closes() {
        let recorder = Recorder::new();
        recorder.record(RunEvent::NodeStarted { node: NodeIndex(0) });
        let mut watch = recorder.watch();
        watch.mark_unchanged();
        let (past, closed) = recorder.read_from(0, 16);
        assert_eq!((past.len(), closed), (1, false));
        assert!(!watch.has_changed().unwrap());
        recorder.record(delta(0, "a"));
        assert!(watch.has_changed().unwrap(), "a new event wakes the reader");
        watch.mark_unchanged();
        let (next, _) = recorder.read_from(1, 16);
        assert_eq!(next[0].event, delta(0, "a"));
        recorder.close();
        assert!(watch.has_changed().unwrap(), "closing wakes the reader");
        assert!(recorder.read_from(2, 16).1);
        assert_eq!(
            recorder.read_from(0, 1).0.len(),
            1,
            "at most `max` at a time"
        );
        let (tx, mut forwarded) = mpsc::unbounded_channel();
        recorder.forward(tx);
        recorder.record(delta(0, "late"));
        assert!(
            forwarded.try_recv().is_err(),
            "closed: nothing forwarded after close"
        );
        assert_eq!(recorder.events().len(), 3, "the log keeps everything");
        let times: Vec<_> = recorder.events().iter().map(|r| r.at).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "in time order");
    }

    #[test]
    fn events_serialize_with_a_type_tag_and_their_time() {
        let recorded = Recorded {
            at: Duration::from_millis(5),
            event: delta(2, "hi"),
        };
        let value = serde_json::to_value(&recorded).unwrap();
        assert_eq!(value["type"], "node_delta");
        assert_eq!(value["node"], 2);
        assert_eq!(value["text"], "hi");
        assert_eq!(value["at_ms"], 5.0);
    }

    #[test]
    fn the_timeline_has_one_first_token_and_the_end_counts_the_output() {
        let recorder = Recorder::new();
        recorder.record(RunEvent::NodeStarted { node: NodeIndex(0) });
        recorder.record(delta(0, "a"));
        recorder.record(delta(0, "b"));
        recorder.record(RunEvent::NodeFinished {
            node: NodeIndex(0),
            cancelled: true,
        });
        let timeline = timeline(vec!["p".into()], &recorder.events());
        let kinds: Vec<_> = timeline.events().into_iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            vec![
                EventKind::Start,
                EventKind::FirstToken,
                EventKind::Cancelled {
                    reason: CANCEL_REASON.into(),
                    tokens: 2
                }
            ]
        );
    }
}
