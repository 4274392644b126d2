//! Recent pipeline runs: their live event streams and, once over, their reports.
//!
//! Every pipeline run the server starts is registered here under its id before its response
//! begins (the id is in the `x-staircase-run-id` header), so a client can subscribe to
//! `GET /v1/runs/{id}/events` before the first event. That endpoint replays what the run has
//! recorded so far and streams the rest as SSE, then one `run_finished` (with the report) or
//! `run_failed` (with the error) event, and ends; a finished run replays the same way.
//! `GET /v1/runs` lists the runs kept (the last `limits.recent_runs`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{Stream, StreamExt, stream};
use serde_json::{Value, json};

use super::error::ApiError;
use super::{ServerState, lock};
use crate::pipeline::{Recorded, Recorder, RunReport};
use crate::policy::StreamMode;

/// How a run ended, as its last event says.
#[derive(Clone)]
enum Outcome {
    Finished(Arc<RunReport>, Value),
    Failed(Value),
}

/// One run: what it is, its recorder, and its outcome once known.
pub(crate) struct Run {
    id: String,
    model: String,
    mode: StreamMode,
    /// The last user message, shortened, for the list.
    prompt: String,
    recorder: Recorder,
    outcome: Mutex<Option<Outcome>>,
}

impl Run {
    pub(crate) fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    /// The run ended with `report` (`value` is its JSON as the completion carries it).
    pub(crate) fn finished(&self, report: Arc<RunReport>, value: Value) {
        self.conclude(Outcome::Finished(report, value));
    }

    pub(crate) fn failed(&self, error: &ApiError) {
        self.conclude(Outcome::Failed(json!(error.object())));
    }

    /// Sets the outcome (the first one wins), then ends the live subscriptions: a
    /// subscriber whose stream ends finds the outcome set.
    fn conclude(&self, outcome: Outcome) {
        lock(&self.outcome).get_or_insert(outcome);
        self.recorder.close();
    }

    fn outcome(&self) -> Option<Outcome> {
        lock(&self.outcome).clone()
    }

    fn summary(&self) -> Value {
        let (status, ttft, total) = match self.outcome() {
            None => ("running", None, None),
            Some(Outcome::Failed(_)) => ("failed", None, None),
            Some(Outcome::Finished(report, _)) => (
                "finished",
                report.ttft_ms.map(|d| d.as_secs_f64() * 1e3),
                Some(report.total_ms.as_secs_f64() * 1e3),
            ),
        };
        json!({
            "id": self.id,
            "model": self.model,
            "mode": self.mode,
            "prompt": self.prompt,
            "status": status,
            "ttft_ms": ttft,
            "total_ms": total,
        })
    }
}

/// Ends a run that is dropped before it concluded (its client went away, or it timed out
/// inside its request), so no subscriber waits for it forever.
pub(crate) struct RunGuard(pub(crate) Arc<Run>);

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.0.conclude(Outcome::Failed(json!({
            "message": "the run was cancelled before it finished",
            "type": "cancelled",
        })));
    }
}

/// The runs kept, oldest first.
#[derive(Default)]
pub(crate) struct Runs {
    runs: Mutex<VecDeque<Arc<Run>>>,
}

/// Characters of a prompt shown in the list.
const PROMPT_CHARS: usize = 120;

impl Runs {
    /// Registers a run about to start, dropping the oldest beyond `keep`.
    pub(crate) fn start(
        &self,
        id: &str,
        model: &str,
        mode: StreamMode,
        prompt: &str,
        keep: usize,
    ) -> Arc<Run> {
        let run = Arc::new(Run {
            id: id.to_string(),
            model: model.to_string(),
            mode,
            prompt: prompt.chars().take(PROMPT_CHARS).collect(),
            recorder: Recorder::new(),
            outcome: Mutex::new(None),
        });
        let mut runs = lock(&self.runs);
        runs.push_back(run.clone());
        while runs.len() > keep.max(1) {
            runs.pop_front();
        }
        run
    }

    pub(crate) fn get(&self, id: &str) -> Option<Arc<Run>> {
        lock(&self.runs).iter().find(|r| r.id == id).cloned()
    }

    /// The report of a finished run.
    pub(crate) fn report(&self, id: &str) -> Option<Arc<RunReport>> {
        match self.get(id)?.outcome()? {
            Outcome::Finished(report, _) => Some(report),
            Outcome::Failed(_) => None,
        }
    }

    fn list(&self) -> Vec<Value> {
        lock(&self.runs).iter().rev().map(|r| r.summary()).collect()
    }
}

/// The error for a run id the server does not (or no longer) keep.
pub(crate) fn unknown(state: &ServerState, id: &str) -> ApiError {
    ApiError::not_found(format!(
        "No recent pipeline run `{id}` (the server keeps the last {})",
        state.options.limits.recent_runs
    ))
}

/// `GET /v1/runs`: the runs kept, newest first.
pub(crate) async fn list(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    state.authorize(&headers)?;
    Ok(Json(json!({ "object": "list", "data": state.runs.list() })))
}

fn event_of(recorded: &Recorded) -> Event {
    Event::default().data(serde_json::to_string(recorded).unwrap_or_default())
}

/// The last event: the outcome. Looked up when the live stream has ended, so it is set.
fn outcome_event(run: &Run) -> Event {
    let value = match run.outcome() {
        Some(Outcome::Finished(_, report)) => json!({ "type": "run_finished", "report": report }),
        Some(Outcome::Failed(error)) => json!({ "type": "run_failed", "error": error }),
        None => json!({ "type": "run_failed", "error": { "message": "the run has no outcome" } }),
    };
    Event::default().data(value.to_string())
}

/// `GET /v1/runs/{id}/events`: the run's events as SSE, from its first.
pub(crate) async fn events(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    state.authorize(&headers)?;
    let run = state.runs.get(&id).ok_or_else(|| unknown(&state, &id))?;
    let (past, live) = run.recorder().subscribe();
    let past = stream::iter(past.iter().map(event_of).collect::<Vec<_>>());
    let live = stream::unfold(live, |mut rx| async move {
        rx.recv().await.map(|recorded| (event_of(&recorded), rx))
    });
    let end = stream::once(async move { outcome_event(&run) });
    let events = past.chain(live).chain(end).map(Ok);
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{NodeIndex, RunEvent};

    #[test]
    fn a_run_dropped_before_its_outcome_ends_its_subscribers_as_failed() {
        let runs = Runs::default();
        let run = runs.start("r1", "moa", StreamMode::Staircase, "hi", 2);
        run.recorder()
            .record(RunEvent::NodeStarted { node: NodeIndex(0) });
        let (past, mut live) = run.recorder().subscribe();
        assert_eq!(past.len(), 1);
        drop(RunGuard(run.clone()));
        assert!(live.try_recv().is_err(), "the live stream ended");
        assert!(matches!(run.outcome(), Some(Outcome::Failed(_))));
        assert_eq!(runs.list()[0]["status"], "failed");
        assert!(runs.report("r1").is_none());
    }

    #[test]
    fn the_oldest_runs_go_first() {
        let runs = Runs::default();
        for id in ["a", "b", "c"] {
            runs.start(id, "moa", StreamMode::Layered, "hi", 2);
        }
        assert!(runs.get("a").is_none());
        let ids: Vec<_> = runs.list().iter().map(|r| r["id"].clone()).collect();
        assert_eq!(ids, ["c", "b"], "newest first");
    }
}
