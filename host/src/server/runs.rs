//! Recent pipeline runs: their live event streams and, once over, their reports.
//!
//! Every pipeline run the server starts is registered here under its id before its response
//! begins (the id is in the `x-staircase-run-id` header), so a client can subscribe to
//! `GET /v1/runs/{id}/events` before the first event. That endpoint replays what the run has
//! recorded so far and streams the rest as SSE, then one `run_finished` (with the report) or
//! `run_failed` (with the error) event, and ends; a finished run replays the same way.
//! `GET /v1/runs` lists the caller's runs kept (the last `limits.recent_runs` of each
//! tenant), without their prompts unless `?include_prompt=true`.
//!
//! A run belongs to the tenant that started it: to anyone else its id answers 404, exactly
//! as an unknown id does, here and on the trace endpoints. Live subscribers are capped per
//! run and per tenant (429 beyond); each reads the run's log at its own pace, so one that
//! never reads costs the run nothing.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{Stream, StreamExt, stream};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use super::tenant::Tenant;
use super::{ServerState, lock};
use crate::pipeline::{Recorded, Recorder, RunReport};
use crate::policy::StreamMode;

/// Events a subscriber reads from the log at a time: bounds what one subscriber holds.
const READ_BATCH: usize = 256;

/// How a run ended, as its last event says.
#[derive(Clone)]
enum Outcome {
    Finished(Arc<RunReport>, Value),
    Failed(Value),
}

/// One run: what it is, its recorder, and its outcome once known.
pub(crate) struct Run {
    id: String,
    tenant: Tenant,
    model: String,
    mode: StreamMode,
    /// Output guards watch its answer: its events and report withhold every text the run
    /// generated (only what the guards released leaves, as `released` events).
    guarded: bool,
    /// The last user message, shortened, for the list.
    prompt: String,
    recorder: Recorder,
    outcome: Mutex<Option<Outcome>>,
    /// Live subscriptions to this run's events.
    subscribers: Arc<Semaphore>,
}

impl Run {
    pub(crate) fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    /// The run ended with `report` (`value` is its JSON as the completion carries it).
    pub(crate) fn finished(&self, report: Arc<RunReport>, mut value: Value) {
        if self.guarded {
            crate::guard::strip_texts(&mut value);
        }
        self.conclude(Outcome::Finished(report, value));
    }

    pub(crate) fn failed(&self, error: &ApiError) {
        self.conclude(Outcome::Failed(json!(error.object())));
    }

    /// An output guard stopped the answer for `reason` (the run was cancelled).
    pub(crate) fn stopped(&self, reason: &str) {
        self.conclude(Outcome::Failed(json!({
            "message": format!("an output guard stopped the answer: {reason}"),
            "type": "content_filter",
        })));
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

    fn summary(&self, include_prompt: bool) -> Value {
        let (status, ttft, total) = match self.outcome() {
            None => ("running", None, None),
            Some(Outcome::Failed(_)) => ("failed", None, None),
            Some(Outcome::Finished(report, _)) => (
                "finished",
                report.ttft_ms.map(crate::millis::millis),
                Some(crate::millis::millis(report.total_ms)),
            ),
        };
        let mut summary = json!({
            "id": self.id,
            "model": self.model,
            "mode": self.mode,
            "guarded": self.guarded,
            "status": status,
            "ttft_ms": ttft,
            "total_ms": total,
        });
        if include_prompt {
            summary["prompt"] = json!(self.prompt);
        }
        summary
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
pub(crate) struct Runs {
    runs: Mutex<VecDeque<Arc<Run>>>,
    /// Live subscribers allowed per run.
    per_run_subscribers: usize,
}

/// Characters of a prompt shown in the list.
const PROMPT_CHARS: usize = 120;

impl Runs {
    /// No runs yet; each run will take at most `per_run_subscribers` live subscribers.
    pub(crate) fn new(per_run_subscribers: usize) -> Self {
        Self {
            runs: Mutex::new(VecDeque::new()),
            per_run_subscribers: per_run_subscribers.max(1),
        }
    }

    /// Registers a run of `tenant` about to start, dropping the tenant's oldest beyond
    /// `keep` (one tenant's traffic never pushes out another's runs). A `guarded` run's
    /// events and report are shown without the texts it generated.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        &self,
        id: &str,
        tenant: &Tenant,
        model: &str,
        mode: StreamMode,
        prompt: &str,
        keep: usize,
        guarded: bool,
    ) -> Arc<Run> {
        let run = Arc::new(Run {
            id: id.to_string(),
            tenant: tenant.clone(),
            model: model.to_string(),
            mode,
            guarded,
            prompt: prompt.chars().take(PROMPT_CHARS).collect(),
            recorder: Recorder::new(),
            outcome: Mutex::new(None),
            subscribers: Arc::new(Semaphore::new(self.per_run_subscribers)),
        });
        let mut runs = lock(&self.runs);
        runs.push_back(run.clone());
        let own = runs.iter().filter(|r| r.tenant == *tenant).count();
        if own > keep.max(1)
            && let Some(oldest) = runs.iter().position(|r| r.tenant == *tenant)
        {
            runs.remove(oldest);
        }
        run
    }

    /// The run `id` when `tenant` started it; another tenant's run is as unknown as a run
    /// that never was.
    pub(crate) fn get(&self, id: &str, tenant: &Tenant) -> Option<Arc<Run>> {
        lock(&self.runs)
            .iter()
            .find(|r| r.id == id && r.tenant == *tenant)
            .cloned()
    }

    /// The report of a finished run of `tenant`.
    pub(crate) fn report(&self, id: &str, tenant: &Tenant) -> Option<Arc<RunReport>> {
        match self.get(id, tenant)?.outcome()? {
            Outcome::Finished(report, _) => Some(report),
            Outcome::Failed(_) => None,
        }
    }

    /// `tenant`'s runs, newest first.
    fn list(&self, tenant: &Tenant, include_prompt: bool) -> Vec<Value> {
        lock(&self.runs)
            .iter()
            .rev()
            .filter(|r| r.tenant == *tenant)
            .map(|r| r.summary(include_prompt))
            .collect()
    }
}

/// The error for a run id the server does not (or no longer) keep.
pub(crate) fn unknown(state: &ServerState, id: &str) -> ApiError {
    ApiError::not_found(format!(
        "No recent pipeline run `{id}` (the server keeps the last {})",
        state.options.limits.recent_runs
    ))
}

/// The query of `GET /v1/runs`.
#[derive(Deserialize)]
pub(crate) struct ListQuery {
    /// Show each run's prompt (its first 120 characters).
    #[serde(default)]
    include_prompt: bool,
}

/// `GET /v1/runs`: the caller's runs kept, newest first.
pub(crate) async fn list(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let tenant = state.authorize(&headers)?;
    let data = state.runs.list(&tenant, query.include_prompt);
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// An event's JSON as the run's client may read it.
fn event_data(run: &Run, recorded: &Recorded) -> String {
    let data = if run.guarded {
        serde_json::to_string(&recorded.without_generated_text())
    } else {
        serde_json::to_string(recorded)
    };
    data.unwrap_or_default()
}

/// The last event: the outcome. Looked up once the recorder is closed, so it is set.
fn outcome_event(run: &Run) -> Event {
    let value = match run.outcome() {
        Some(Outcome::Finished(_, report)) => json!({ "type": "run_finished", "report": report }),
        Some(Outcome::Failed(error)) => json!({ "type": "run_failed", "error": error }),
        None => json!({ "type": "run_failed", "error": { "message": "the run has no outcome" } }),
    };
    Event::default().data(value.to_string())
}

/// One live subscription: where it is in the run's log, and its places under the caps
/// (given back when the client goes away and the stream is dropped).
struct Subscription {
    run: Arc<Run>,
    read: usize,
    grew: tokio::sync::watch::Receiver<()>,
    _run_place: OwnedSemaphorePermit,
    _tenant_place: OwnedSemaphorePermit,
}

impl Subscription {
    /// The next events (waiting until there are some), or `None` once the closed log is
    /// read to its end.
    async fn next_batch(&mut self) -> Option<Vec<Recorded>> {
        loop {
            // Seen before reading: an event recorded after the read changes it again.
            self.grew.mark_unchanged();
            let (batch, closed) = self.run.recorder().read_from(self.read, READ_BATCH);
            if !batch.is_empty() {
                self.read += batch.len();
                return Some(batch);
            }
            if closed || self.grew.changed().await.is_err() {
                return None;
            }
        }
    }
}

/// `GET /v1/runs/{id}/events`: the run's events as SSE, from its first.
pub(crate) async fn events(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let tenant = state.authorize(&headers)?;
    let run = state
        .runs
        .get(&id, &tenant)
        .ok_or_else(|| unknown(&state, &id))?;
    let run_place = run.subscribers.clone().try_acquire_owned().map_err(|_| {
        ApiError::rate_limited(format!(
            "This run has {} live subscribers already, the most it takes",
            state.options.limits.run_subscribers.max(1)
        ))
    })?;
    let tenant_place = tenant
        .subscribers()
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::rate_limited(format!(
                "You have {} live run subscriptions already, the most you may hold",
                state.options.limits.tenant_subscribers.max(1)
            ))
        })?;
    let subscription = Subscription {
        grew: run.recorder().watch(),
        run,
        read: 0,
        _run_place: run_place,
        _tenant_place: tenant_place,
    };
    let events = stream::unfold(Some(subscription), |subscription| async move {
        let mut subscription = subscription?;
        match subscription.next_batch().await {
            Some(batch) => {
                let run = &subscription.run;
                let events: Vec<Event> = batch
                    .iter()
                    .map(|r| Event::default().data(event_data(run, r)))
                    .collect();
                Some((events, Some(subscription)))
            }
            None => Some((vec![outcome_event(&subscription.run)], None)),
        }
    })
    .flat_map(stream::iter)
    .map(Ok);
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{NodeIndex, RunEvent};
    use std::time::Duration;

    #[tokio::test]
    async fn a_run_dropped_before_its_outcome_ends_its_subscribers_as_failed() {
        let runs = Runs::new(2);
        let alice = Tenant::test("alice");
        let run = runs.start("r1", &alice, "moa", StreamMode::Staircase, "hi", 2, false);
        run.recorder()
            .record(RunEvent::NodeStarted { node: NodeIndex(0) });
        let mut subscription = Subscription {
            grew: run.recorder().watch(),
            run: run.clone(),
            read: 0,
            _run_place: run.subscribers.clone().try_acquire_owned().unwrap(),
            _tenant_place: alice.subscribers().clone().try_acquire_owned().unwrap(),
        };
        assert_eq!(subscription.next_batch().await.unwrap().len(), 1);
        drop(RunGuard(run.clone()));
        assert!(
            subscription.next_batch().await.is_none(),
            "the live stream ended"
        );
        assert!(matches!(run.outcome(), Some(Outcome::Failed(_))));
        assert_eq!(runs.list(&alice, false)[0]["status"], "failed");
        assert!(runs.report("r1", &alice).is_none());
    }

    #[test]
    fn the_oldest_runs_of_a_tenant_go_first() {
        let runs = Runs::new(2);
        let (alice, bob) = (Tenant::test("alice"), Tenant::test("bob"));
        runs.start("b1", &bob, "moa", StreamMode::Layered, "hi", 2, false);
        for id in ["a", "b", "c"] {
            runs.start(id, &alice, "moa", StreamMode::Layered, "hi", 2, false);
        }
        assert!(runs.get("a", &alice).is_none());
        let ids: Vec<_> = runs
            .list(&alice, false)
            .iter()
            .map(|r| r["id"].clone())
            .collect();
        assert_eq!(ids, ["c", "b"], "newest first");
        assert!(
            runs.get("b1", &bob).is_some(),
            "alice's runs never push out bob's"
        );
    }

    #[test]
    fn a_run_is_its_tenants_alone_and_listed_without_its_prompt() {
        let runs = Runs::new(2);
        let (alice, bob) = (Tenant::test("alice"), Tenant::test("bob"));
        runs.start(
            "r1",
            &alice,
            "moa",
            StreamMode::Layered,
            "my pin is 4711",
            8,
            false,
        );
        assert!(runs.get("r1", &bob).is_none());
        assert!(runs.list(&bob, false).is_empty());
        let listed = &runs.list(&alice, false)[0];
        assert!(listed.get("prompt").is_none());
        assert_eq!(runs.list(&alice, true)[0]["prompt"], "my pin is 4711");
    }

    #[test]
    fn a_guarded_run_is_listed_without_the_text_it_generated() {
        let runs = Runs::new(2);
        let alice = Tenant::test("alice");
        let run = runs.start("g1", &alice, "moa", StreamMode::Layered, "hi", 8, true);
        let listed = &runs.list(&alice, false)[0];
        assert_eq!(
            (&listed["id"], &listed["guarded"]),
            (&json!("g1"), &json!(true))
        );
        let generated = Recorded {
            at: Duration::ZERO,
            event: RunEvent::NodeDelta {
                node: NodeIndex(0),
                text: "bob@example.org".into(),
                tokens: 3,
            },
        };
        let released = Recorded {
            at: Duration::ZERO,
            event: RunEvent::Released {
                text: "[email]".into(),
            },
        };
        let shown: Value = serde_json::from_str(&event_data(&run, &generated)).unwrap();
        assert_eq!((&shown["text"], &shown["tokens"]), (&json!(""), &json!(3)));
        let shown: Value = serde_json::from_str(&event_data(&run, &released)).unwrap();
        assert_eq!(shown["text"], "[email]");
        let plain = runs.start("p1", &alice, "moa", StreamMode::Layered, "hi", 8, false);
        assert!(event_data(&plain, &generated).contains("bob@"));
    }
}
