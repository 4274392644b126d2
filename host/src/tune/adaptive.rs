//! Load-adaptive choice: which of a pipeline's declared variants runs a request.
//!
//! Candidates are the file's own nodes and each `[[variants]]` entry, with the quality each
//! scored. Each gets a predicted critical path from the tuner's model at the per-token
//! latencies the runner measured most recently, stretched by the load: a request that has
//! `ahead` others in front of it on a host running `slots` at a time waits about
//! `ahead / slots` critical paths more. The best-scoring candidate whose prediction meets
//! the budget (the request's, else the file's) runs; when none does, the fastest runs, and
//! the choice says so. Without a budget or declared variants the file runs as written.
//! [`Gauge`] counts runs in flight where nothing else does (`run`, tests); the server counts
//! its own queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use super::predict::{LatencyTable, ModelLatency, predict};
use crate::pipeline::{Pipeline, RunError, RunEvent, RunReport, RunRequest, Runner};

/// How busy the host is when a request starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Load {
    /// Requests running or waiting besides this one.
    pub ahead: usize,
    /// Requests the host runs at once.
    pub slots: usize,
}

impl Load {
    /// How much longer than its critical path a run is expected to take under this load.
    pub fn stretch(&self) -> f64 {
        1.0 + self.ahead as f64 / self.slots.max(1) as f64
    }
}

/// Which variant ran, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Choice {
    pub variant: String,
    /// Index into the file's `variants`; `None` for the file's own nodes.
    #[serde(skip)]
    pub index: Option<usize>,
    pub quality: Option<f64>,
    pub predicted_critical_path_ms: f64,
    pub budget_ms: Option<f64>,
    pub met_budget: bool,
    pub load: Load,
    #[serde(serialize_with = "as_millis")]
    pub decode_per_token_ms: Duration,
    pub reason: String,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// The name the file's own nodes go by among its variants.
pub const OWN_VARIANT: &str = "main";

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Chooses the variant of `pipeline` to run. `budget` is the request's (else the file's).
/// Returns the pipeline to run (the chosen variant under the file's name) and the choice.
pub fn choose(
    runner: &Runner,
    pipeline: &Pipeline,
    request: &RunRequest,
    budget: Option<Duration>,
    load: Load,
) -> (Pipeline, Option<Choice>) {
    let budget = budget.or(pipeline.adaptive.latency_budget);
    let declared = &pipeline.adaptive.variants;
    let Some(budget) = budget.filter(|_| !declared.is_empty()) else {
        return (pipeline.clone(), None);
    };
    let latencies = runner.latencies().get();
    let table = LatencyTable::uniform(ModelLatency::uniform(latencies));
    let prompt: String = request
        .conversation
        .iter()
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let prompt_tokens = runner
        .models()
        .get(crate::pipeline::spec::DEFAULT_MODEL)
        .map_or(0, |e| e.token_counter().count(&prompt).get());
    // The file's own nodes first: unscored, they rank above every scored variant.
    let candidates: Vec<(Option<usize>, &str, Option<f64>, &Pipeline)> =
        std::iter::once((None, OWN_VARIANT, pipeline.adaptive.quality, pipeline))
            .chain(
                declared
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (Some(i), v.name.as_str(), v.quality, &v.pipeline)),
            )
            .collect();
    let predicted: Vec<Duration> = candidates
        .iter()
        .map(|(_, _, _, p)| {
            predict(p, request.mode, prompt_tokens, &table)
                .critical_path
                .mul_f64(load.stretch())
        })
        .collect();
    let rank = |i: usize| {
        candidates[i]
            .2
            .unwrap_or(if i == 0 { f64::INFINITY } else { 0.0 })
    };
    let meeting: Vec<usize> = (0..candidates.len())
        .filter(|&i| predicted[i] <= budget)
        .collect();
    let (chosen, met) = match meeting.iter().copied().max_by(|&a, &b| {
        rank(a)
            .total_cmp(&rank(b))
            .then(predicted[b].cmp(&predicted[a]))
    }) {
        Some(i) => (i, true),
        None => (
            (0..candidates.len())
                .min_by_key(|&i| predicted[i])
                .unwrap_or(0),
            false,
        ),
    };
    let (index, name, quality, chosen_pipeline) = candidates[chosen];
    let reason = if met {
        let skipped: Vec<&str> = (0..candidates.len())
            .filter(|&i| rank(i) > rank(chosen) && predicted[i] > budget)
            .map(|i| candidates[i].1)
            .collect();
        if skipped.is_empty() {
            format!(
                "the best variant; its predicted critical path {:.0} ms meets the budget of {:.0} ms",
                millis(predicted[chosen]),
                millis(budget)
            )
        } else {
            format!(
                "{} would not meet the budget of {:.0} ms under load ({} ahead, {} slots); \
                 this one is predicted at {:.0} ms",
                skipped.join(", "),
                millis(budget),
                load.ahead,
                load.slots,
                millis(predicted[chosen])
            )
        }
    } else {
        format!(
            "no variant meets the budget of {:.0} ms ({} ahead, {} slots); the fastest is \
             predicted at {:.0} ms",
            millis(budget),
            load.ahead,
            load.slots,
            millis(predicted[chosen])
        )
    };
    let mut run = chosen_pipeline.clone();
    if index.is_some() {
        run.name.clone_from(&pipeline.name);
    }
    run.adaptive = Default::default();
    (
        run,
        Some(Choice {
            variant: name.to_string(),
            index,
            quality,
            predicted_critical_path_ms: millis(predicted[chosen]),
            budget_ms: Some(millis(budget)),
            met_budget: met,
            load,
            decode_per_token_ms: latencies.decode_per_token,
            reason,
        }),
    )
}

/// Runs in flight, for a host with no queue of its own to ask.
#[derive(Debug)]
pub struct Gauge {
    in_flight: Arc<AtomicUsize>,
    slots: usize,
}

/// Held while a run is in flight.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gauge {
    pub fn new(slots: usize) -> Self {
        Self {
            in_flight: Arc::new(AtomicUsize::new(0)),
            slots: slots.max(1),
        }
    }

    /// The load a new request would see.
    pub fn load(&self) -> Load {
        Load {
            ahead: self.in_flight.load(Ordering::Acquire),
            slots: self.slots,
        }
    }

    pub fn enter(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.in_flight.clone())
    }

    /// Chooses a variant under the gauge's load and runs it, counted in flight meanwhile.
    pub async fn run(
        &self,
        runner: &Runner,
        pipeline: &Pipeline,
        request: RunRequest,
        budget: Option<Duration>,
        events: Option<mpsc::UnboundedSender<RunEvent>>,
    ) -> Result<(RunReport, Option<Choice>), RunError> {
        let (chosen, choice) = choose(runner, pipeline, &request, budget, self.load());
        let _in_flight = self.enter();
        if let Some(choice) = &choice {
            tracing::info!(pipeline = %pipeline.name, variant = %choice.variant, reason = %choice.reason, "variant chosen");
        }
        let report = runner.run(&chosen, request, events).await?;
        Ok((report, choice))
    }
}
