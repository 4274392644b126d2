//! Run timelines: recording, Chrome/Perfetto export and the staircase SVG chart.
//!
//! A [`Timeline`] holds what happened to each lane (one lane per pipeline node) in a run:
//! start, first token, each chunk handed downstream, each aggregator step, end,
//! cancellation (the pipeline runtime derives it from the run's recorded events). [`chrome`] turns it into Chrome trace JSON (opens in Perfetto and
//! `chrome://tracing`) and reads such files back; [`svg`] draws one as a staircase chart.
//! This module records and draws; it must not know about engines, plugins or pipelines.

pub mod chrome;
pub mod svg;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// What happened on a lane.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum EventKind {
    /// The node began work (its first model request or plugin call).
    Start,
    FirstToken,
    /// A chunk went to `to`; `total_tokens` counts the node's output so far.
    Chunk {
        to: String,
        tokens: u32,
        total_tokens: u32,
    },
    /// An aggregator step ran from `started` until this event.
    Step {
        index: u32,
        #[serde(skip)]
        started: Duration,
        tokens: u32,
        prompt_tokens: u32,
        cached_prompt_tokens: u32,
        is_final: bool,
    },
    /// A warm-up (a prompt prefilled into the prefix cache, nothing generated) ran from
    /// `started` until this event.
    WarmUp {
        #[serde(skip)]
        started: Duration,
        prompt_tokens: u32,
        cached_prompt_tokens: u32,
    },
    End {
        tokens: u32,
    },
    /// The node stopped early, after `tokens` of output.
    Cancelled {
        reason: String,
        tokens: u32,
    },
    /// Something the node decided or was given, shown as an instant event: a routed
    /// step's model and reason, what its conversation memory did.
    Note {
        /// The trace category (`route`, `history`).
        category: &'static str,
        name: String,
        args: serde_json::Value,
    },
}

/// One recorded event.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// Since the timeline began.
    pub at: Duration,
    pub lane: usize,
    pub kind: EventKind,
}

/// The events of one run, recorded from any task.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    lanes: Vec<String>,
    events: Mutex<Vec<Event>>,
}

impl Timeline {
    /// A timeline starting now with the named lanes.
    pub fn new(lanes: Vec<String>) -> Self {
        Self {
            start: Instant::now(),
            lanes,
            events: Mutex::new(Vec::new()),
        }
    }

    /// Time since the timeline began.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn record(&self, lane: usize, kind: EventKind) {
        self.record_at(self.now(), lane, kind);
    }

    pub fn record_at(&self, at: Duration, lane: usize, kind: EventKind) {
        // A poisoned lock only means another recorder panicked; the events are still valid.
        crate::sync::lock(&self.events).push(Event { at, lane, kind });
    }

    pub fn lanes(&self) -> &[String] {
        &self.lanes
    }

    /// The events so far, in time order.
    pub fn events(&self) -> Vec<Event> {
        let mut events = crate::sync::lock(&self.events).clone();
        events.sort_by_key(|e| e.at);
        events
    }
}
