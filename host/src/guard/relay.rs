//! Output guards between a run and its reader (an HTTP client, `staircase run`'s terminal):
//! the answer's text passes a [`GuardChain`] before it goes out, identically for a stream and
//! a whole answer. Guard calls run on the policy pool, off the async runtime, while the model
//! keeps generating; a stop cancels the run. This room only relays: the window's rules live in
//! [`crate::guard`], the wire formats with the front ends.

use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::guard::{GuardChain, GuardEvent, Outcome};
use crate::pipeline::{Guest, GuestPool, NodeIndex, Recorder, RunEvent};

/// What the guards did to one answer (a report's `guards` object).
#[derive(Debug, Default, Serialize)]
pub struct GuardReport {
    pub events: Vec<GuardEvent>,
    /// Bytes generated that the reader never saw (held, redacted or cut off).
    pub withheld_bytes: usize,
    /// Why the stream stopped (a guard's stop, or a guard that failed closed).
    pub stopped: Option<String>,
    /// Chunks the run generated (about one token each).
    #[serde(skip)]
    pub chunks: u32,
}

/// A run's recorder that a relay also tells what it let out and why: its verdicts as
/// [`RunEvent::Guard`] on the answering node, its released text as [`RunEvent::Released`],
/// so the run's live view shows the answer its client saw.
#[derive(Clone, Copy)]
pub struct Witness<'a> {
    pub recorder: &'a Recorder,
    pub node: NodeIndex,
}

impl Witness<'_> {
    pub fn verdicts(&self, events: &[GuardEvent]) {
        for event in events {
            self.recorder.record(RunEvent::Guard {
                node: self.node,
                event: event.clone(),
            });
        }
    }
}

/// Runs `work`, which sends its answer's text to `raw`, and relays to `client` only what
/// `chain` releases. `work`'s result is `None` when a guard stopped the stream first (the
/// run is dropped, cancelling it).
pub async fn relay<R>(
    chain: GuardChain,
    pool: Arc<GuestPool>,
    work: impl Future<Output = R>,
    mut raw: mpsc::UnboundedReceiver<String>,
    client: mpsc::UnboundedSender<String>,
    witness: Option<Witness<'_>>,
) -> (Option<R>, GuardReport) {
    let mut chain = Guest::new(pool, Box::new(chain));
    let mut report = GuardReport::default();
    let mut result = None;
    tokio::pin!(work);
    loop {
        tokio::select! {
            // The run's text first: a stop seen in it cancels the run before it goes on.
            biased;
            text = raw.recv() => match text {
                Some(text) => {
                    report.chunks += 1;
                    let outcome = chain.call(move |c| Ok(c.push(&text, 1))).await;
                    if !take(outcome, &client, &mut report, witness) {
                        return (None, finish(chain, report).await);
                    }
                }
                // `work` finished and dropped its sender: the whole answer went through.
                None => break,
            },
            done = &mut work, if result.is_none() => result = Some(done),
        }
    }
    let outcome = chain.call(|c| Ok(c.finish())).await;
    take(outcome, &client, &mut report, witness);
    (result, finish(chain, report).await)
}

/// Sends what an outcome released and records it; false once the stream stopped.
fn take(
    outcome: Result<Outcome, crate::policy::PolicyError>,
    client: &mpsc::UnboundedSender<String>,
    report: &mut GuardReport,
    witness: Option<Witness<'_>>,
) -> bool {
    let outcome = outcome.unwrap_or_else(|error| Outcome {
        // The pool lost the chain (a panic on its thread): nothing more may pass.
        stopped: Some(format!("the guards failed: {error}")),
        ..Outcome::default()
    });
    if let Some(witness) = witness {
        witness.verdicts(&outcome.events);
        if !outcome.released.is_empty() {
            witness.recorder.record(RunEvent::Released {
                text: outcome.released.clone(),
            });
        }
    }
    if !outcome.released.is_empty() {
        let _ = client.send(outcome.released);
    }
    report.events.extend(outcome.events);
    if let Some(reason) = outcome.stopped {
        report.stopped = Some(reason);
        return false;
    }
    true
}

async fn finish(mut chain: Guest<GuardChain>, mut report: GuardReport) -> GuardReport {
    report.withheld_bytes = chain.call(|c| Ok(c.withheld_bytes())).await.unwrap_or(0);
    report
}

/// Removes every `text` and `answer` field of a guarded answer's report, at any depth: they
/// are the run's texts before the guards, and only what the guards released may leave. The
/// nodes' plugin `logs` and model `prompts` go too: they may quote those texts.
pub fn strip_texts(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.remove("text");
            map.remove("answer");
            map.remove("logs");
            map.remove("prompts");
            map.values_mut().for_each(strip_texts);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_texts),
        _ => {}
    }
}
