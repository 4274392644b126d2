//! Load-adaptive choice: which of a pipeline's declared variants runs a request.
//!
//! Candidates are the file's own nodes and each `[[variants]]` entry, with the quality each
//! scored. Each gets a predicted critical path from the tuner's model at the per-token
//! latencies the runner measured most recently for each of its models, stretched by the
//! load each model's engine reports now ([`crate::engine::Engine::load`]: the local
//! engine's running and queued sequences, a remote engine's requests in flight): a token
//! behind `ahead` others on an engine serving `parallel` at once takes about
//! `1 + ahead / parallel` times as long. The best-scoring candidate whose prediction meets
//! the budget (the request's, else the file's) runs; when none does, the fastest runs, and
//! the choice says so. Without a budget or declared variants the file runs as written.

use std::time::Duration;

use serde::Serialize;

use super::predict::{LatencyTable, ModelLatency, model_of, predict};
use crate::engine::EngineLoad;
use crate::millis::millis;
use crate::pipeline::critical::Latencies;
use crate::pipeline::{Pipeline, RunRequest, Runner};

/// One model's state when a request starts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelNow {
    pub model: String,
    /// What its engine reported (`None`: a backend that cannot tell, taken as idle).
    pub load: Option<EngineLoad>,
    /// How much slower than alone its tokens are predicted under that load.
    pub stretch: f64,
    /// Its per-token decode latency as last measured, before the stretch.
    #[serde(serialize_with = "crate::millis::serialize")]
    pub decode_per_token_ms: Duration,
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
    /// The models the candidates run on, as the choice saw them.
    pub models: Vec<ModelNow>,
    pub reason: String,
}

/// The name the file's own nodes go by among its variants.
pub const OWN_VARIANT: &str = "main";

/// Chooses the variant of `pipeline` to run under the load its models' engines report now.
/// `budget` is the request's (else the file's). Returns the pipeline to run (the chosen
/// variant under the file's name) and the choice.
pub fn choose(
    runner: &Runner,
    pipeline: &Pipeline,
    request: &RunRequest,
    budget: Option<Duration>,
) -> (Pipeline, Option<Choice>) {
    let budget = budget.or(pipeline.adaptive.latency_budget);
    let declared = &pipeline.adaptive.variants;
    let Some(budget) = budget.filter(|_| !declared.is_empty()) else {
        return (pipeline.clone(), None);
    };
    let mut models: Vec<&str> = std::iter::once(pipeline)
        .chain(declared.iter().map(|v| &v.pipeline))
        .flat_map(|p| p.nodes.iter().filter_map(|n| model_of(&n.model)))
        .collect();
    models.sort_unstable();
    models.dedup();
    let now: Vec<ModelNow> = models
        .iter()
        .map(|&model| {
            let load = runner.models().get(model).and_then(|e| e.load());
            ModelNow {
                model: model.to_string(),
                load,
                stretch: load.map_or(1.0, |l| l.stretch()),
                decode_per_token_ms: runner.latencies().of(model).decode_per_token,
            }
        })
        .collect();
    let stretched = |latencies: Latencies, stretch: f64| {
        ModelLatency::uniform(Latencies {
            decode_per_token: latencies.decode_per_token.mul_f64(stretch),
            prefill_per_token: latencies.prefill_per_token.mul_f64(stretch),
        })
    };
    let table = now.iter().fold(
        LatencyTable::uniform(ModelLatency::uniform(runner.latencies().get())),
        |table, m| {
            let latencies = runner.latencies().of(&m.model);
            table.with(&m.model, stretched(latencies, m.stretch))
        },
    );
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
        .map(|(_, _, _, p)| predict(p, request.mode, prompt_tokens, &table).critical_path)
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
                "{} would not meet the budget of {:.0} ms under load ({}); this one is \
                 predicted at {:.0} ms",
                skipped.join(", "),
                millis(budget),
                describe(&now),
                millis(predicted[chosen])
            )
        }
    } else {
        format!(
            "no variant meets the budget of {:.0} ms ({}); the fastest is predicted at {:.0} ms",
            millis(budget),
            describe(&now),
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
            models: now,
            reason,
        }),
    )
}

/// The load of each model, for a reason a person reads.
fn describe(now: &[ModelNow]) -> String {
    now.iter()
        .map(|m| match m.load {
            Some(l) => format!(
                "`{}`: {} running, {} queued, tokens {:.1}x slower",
                m.model, l.running, l.queued, m.stretch
            ),
            None => format!("`{}`: load unknown", m.model),
        })
        .collect::<Vec<_>>()
        .join("; ")
}
