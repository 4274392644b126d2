//! Chrome trace JSON ("Trace Event Format"), the format Perfetto and `chrome://tracing` open.
//!
//! Each lane is a thread (`tid`) of one process, named by a `thread_name` metadata event.
//! A node's life is a complete (`X`) event of category `node`, each aggregator step an `X`
//! event of category `step` inside it; first token, chunks and cancellations are instant
//! (`i`) events. Arguments carry what the SVG chart needs (`total_tokens`, `critical`), so a
//! chart can be drawn from the file alone.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{EventKind, Timeline};

/// The process id every lane belongs to.
const PID: u32 = 1;

/// A whole trace file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChromeTrace {
    #[serde(rename = "traceEvents")]
    pub trace_events: Vec<TraceEvent>,
    #[serde(rename = "displayTimeUnit", default)]
    pub display_time_unit: String,
}

/// One event of a trace file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceEvent {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cat: String,
    /// Phase: `X` complete, `i` instant, `M` metadata.
    pub ph: String,
    /// Microseconds.
    #[serde(default)]
    pub ts: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dur: Option<f64>,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub tid: u32,
    /// Instant scope (`t`: thread).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s: Option<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub args: Value,
}

/// Why a file is not a usable trace.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("not Chrome trace JSON: {0}")]
    Json(#[from] serde_json::Error),
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn tid(lane: usize) -> u32 {
    u32::try_from(lane + 1).unwrap_or(u32::MAX)
}

impl ChromeTrace {
    /// The trace of `timeline`; lanes listed in `critical` are marked as on the critical path.
    pub fn from_timeline(timeline: &Timeline, critical: &[usize]) -> Self {
        let events = timeline.events();
        let mut out = Vec::new();
        out.push(TraceEvent {
            name: "process_name".into(),
            cat: String::new(),
            ph: "M".into(),
            ts: 0.0,
            dur: None,
            pid: PID,
            tid: 0,
            s: None,
            args: json!({ "name": "staircase run" }),
        });
        let last = events.last().map_or(Duration::ZERO, |e| e.at);
        for (lane, name) in timeline.lanes().iter().enumerate() {
            out.push(TraceEvent {
                name: "thread_name".into(),
                cat: String::new(),
                ph: "M".into(),
                ts: 0.0,
                dur: None,
                pid: PID,
                tid: tid(lane),
                s: None,
                args: json!({ "name": name }),
            });
            let mine: Vec<_> = events.iter().filter(|e| e.lane == lane).collect();
            let Some(start) = mine
                .iter()
                .find(|e| e.kind == EventKind::Start)
                .map(|e| e.at)
            else {
                continue;
            };
            let mut tokens = 0;
            let mut cancelled = false;
            let end = mine
                .iter()
                .find_map(|e| match &e.kind {
                    EventKind::End { tokens: t } => {
                        tokens = *t;
                        Some(e.at)
                    }
                    EventKind::Cancelled { tokens: t, .. } => {
                        tokens = *t;
                        cancelled = true;
                        Some(e.at)
                    }
                    _ => None,
                })
                .unwrap_or(last);
            out.push(TraceEvent {
                name: name.clone(),
                cat: "node".into(),
                ph: "X".into(),
                ts: micros(start),
                dur: Some(micros(end.saturating_sub(start))),
                pid: PID,
                tid: tid(lane),
                s: None,
                args: json!({
                    "critical": critical.contains(&lane),
                    "tokens": tokens,
                    "cancelled": cancelled,
                }),
            });
        }
        for event in &events {
            let instant = |name: String, cat: &str, args: Value| TraceEvent {
                name,
                cat: cat.into(),
                ph: "i".into(),
                ts: micros(event.at),
                dur: None,
                pid: PID,
                tid: tid(event.lane),
                s: Some("t".into()),
                args,
            };
            // Something that ran from `started` until this event.
            let span = |name: String, cat: &str, started: Duration, args: Value| TraceEvent {
                name,
                cat: cat.into(),
                ph: "X".into(),
                ts: micros(started),
                dur: Some(micros(event.at.saturating_sub(started))),
                pid: PID,
                tid: tid(event.lane),
                s: None,
                args,
            };
            match &event.kind {
                EventKind::Start | EventKind::End { .. } => {}
                EventKind::FirstToken => {
                    out.push(instant("first token".into(), "token", Value::Null))
                }
                EventKind::Chunk {
                    to,
                    tokens,
                    total_tokens,
                } => out.push(instant(
                    format!("chunk -> {to}"),
                    "chunk",
                    json!({ "to": to, "tokens": tokens, "total_tokens": total_tokens }),
                )),
                EventKind::Cancelled { reason, .. } => out.push(instant(
                    "cancelled".into(),
                    "cancel",
                    json!({ "reason": reason }),
                )),
                EventKind::Note {
                    category,
                    name,
                    args,
                } => out.push(instant(name.clone(), category, args.clone())),
                EventKind::Step {
                    index,
                    started,
                    tokens,
                    prompt_tokens,
                    cached_prompt_tokens,
                    is_final,
                } => out.push(span(
                    format!("step {index}"),
                    "step",
                    *started,
                    json!({
                        "tokens": tokens,
                        "prompt_tokens": prompt_tokens,
                        "cached_prompt_tokens": cached_prompt_tokens,
                        "final": is_final,
                    }),
                )),
                EventKind::WarmUp {
                    started,
                    prompt_tokens,
                    cached_prompt_tokens,
                } => out.push(span(
                    "warm-up".into(),
                    "warm-up",
                    *started,
                    json!({
                        "prompt_tokens": prompt_tokens,
                        "cached_prompt_tokens": cached_prompt_tokens,
                    }),
                )),
            }
        }
        Self {
            trace_events: out,
            display_time_unit: "ms".into(),
        }
    }

    pub fn to_json(&self) -> String {
        // Serializing plain structs and `Value`s to a string cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<Self, TraceError> {
        Ok(serde_json::from_str(text)?)
    }

    /// Lane names by thread id, from the `thread_name` metadata events.
    pub fn lane_names(&self) -> BTreeMap<u32, String> {
        self.trace_events
            .iter()
            .filter(|e| e.ph == "M" && e.name == "thread_name")
            .map(|e| {
                let name = e.args.get("name").and_then(Value::as_str).unwrap_or("?");
                (e.tid, name.to_string())
            })
            .collect()
    }
}
