//! `staircase tune`: picks the pipeline variant with the shortest critical path that keeps
//! the quality, and, at run time, the variant that fits the latency budget under load.
//!
//! `space` describes what a pipeline may become (proposers and their models, a second
//! layer, the aggregator's model or none, edges, chunk schedule), `predict` is the
//! critical-path model, `probe` measures each model's token latencies on this host,
//! `search` is a beam search on the model, `adaptive` chooses among a file's declared
//! variants per request, `report` prints and draws. [`tune`] ties them together: measure,
//! search, run the shortlist for real (measured critical path against the prediction), score
//! it with `staircase eval` against the hand-written pipeline (and, on held-out prompts, the
//! chosen one again), and write the choice as a pipeline file whose `[[variants]]` are the
//! faster runners-up. Like `eval`, this room works through public APIs (the runner, the
//! engine trait, the eval runner); printing and files are the CLI's.

// Run-time variant choice and the critical-path model it shares with the search live beside
// the pipeline (a server chooses per request); re-exported where the tuner's callers found them.
pub use crate::pipeline::{adaptive, predict};
pub mod probe;
pub mod report;
pub mod search;
pub mod space;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::app::{Launcher, RunSpec};
use crate::engine::{Engine, EngineError};
use crate::eval::{self, EvalOptions, Variant};
use crate::millis::millis;
use crate::pipeline::report::NodeReport;
use crate::pipeline::stream::ChunkSchedule;
use crate::pipeline::{Pipeline, RunError, RunReport, RunRequest, Runner};
use crate::policy::StreamMode;
use predict::{LatencyTable, ModelLatency, predict};
use search::{Outcome, Prior, SearchOptions};
use space::{Genome, Shape, Space, SpaceError};

/// Shortlisted variants run for real and scored, by default.
pub const DEFAULT_SHORTLIST: usize = 4;
/// Bounds of the calibration factor (measured over predicted critical path).
const MIN_CALIBRATION: f64 = 0.25;
const MAX_CALIBRATION: f64 = 4.0;
/// Predicted over measured critical path of a tuned variant on the real host should lie
/// within 1/this and this: one run per variant on a shared CPU, answers of sampled length.
pub const PREDICTION_TOLERANCE: f64 = 1.5;
/// Tokens per probe request: enough decode steps for a stable per-token figure.
pub const PROBE_TOKENS: u32 = 32;

/// Why tuning failed.
#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error(transparent)]
    Space(#[from] SpaceError),
    #[error("model `{0}` is not one the runner has")]
    UnknownModel(String),
    #[error("measuring model `{model}`: {source}")]
    Probe { model: String, source: EngineError },
    #[error("running variant `{variant}`: {source}")]
    Run {
        variant: String,
        source: Box<RunError>,
    },
    #[error(transparent)]
    Eval(Box<eval::EvalError>),
    #[error("the [tune] table of `{origin}`: {reason}")]
    Table { origin: String, reason: String },
}

/// The `[tune]` table of a pipeline file; every key optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuneTable {
    pub latency_budget_ms: Option<u64>,
    /// Models to place on nodes (names of the models table); default: the file's.
    pub models: Option<Vec<String>>,
    /// Chunk schedules to try besides the file's.
    pub schedules: Option<Vec<Vec<u32>>>,
    /// Shares of the proposers' and refiners' token caps to try besides the file's (1).
    pub proposer_lengths: Option<Vec<f64>>,
    /// The search's quality weight per model (default 1).
    #[serde(default)]
    pub model_quality: BTreeMap<String, f64>,
    pub beam_width: Option<usize>,
    pub shortlist: Option<usize>,
}

impl TuneTable {
    /// The table of `pipeline`, or the defaults.
    pub fn of(pipeline: &Pipeline) -> Result<Self, TuneError> {
        match &pipeline.tune {
            None => Ok(Self::default()),
            Some(table) => {
                toml::Value::Table(table.clone())
                    .try_into()
                    .map_err(|e: toml::de::Error| TuneError::Table {
                        origin: pipeline.origin.clone(),
                        reason: e.message().to_string(),
                    })
            }
        }
    }
}

/// The quality half: `staircase eval` over a sample of prompts.
#[derive(Clone, Debug)]
pub struct EvalSample {
    pub prompts: Vec<String>,
    pub answer_tokens: u32,
    pub judge: bool,
}

/// The critical path a tuned variant should fit in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    Fixed(Duration),
    /// This share of the hand-written pipeline's critical path as measured in the run
    /// (a budget that means the same on a quiet host and a busy one).
    OfHandWritten(f64),
}

impl Budget {
    fn resolve(self, hand_written_ms: f64) -> Duration {
        match self {
            Self::Fixed(d) => d,
            Self::OfHandWritten(share) => Duration::from_secs_f64(hand_written_ms * share / 1e3),
        }
    }
}

impl std::str::FromStr for Budget {
    type Err = String;

    /// `MS`, or `P%` of the hand-written pipeline's measured critical path.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s.strip_suffix('%') {
            Some(percent) => match percent.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p.is_finite() => Ok(Self::OfHandWritten(p / 100.0)),
                _ => Err(format!("`{s}` is not a positive percentage")),
            },
            None => s
                .parse::<u64>()
                .map(|ms| Self::Fixed(Duration::from_millis(ms)))
                .map_err(|_| format!("`{s}` is neither milliseconds nor a percentage like 70%")),
        }
    }
}

/// What to tune.
#[derive(Clone, Debug)]
pub struct TuneOptions {
    pub budget: Budget,
    /// Models to place on nodes; empty: the base file's.
    pub models: Vec<String>,
    pub schedules: Vec<ChunkSchedule>,
    /// Shares of the proposers' and refiners' token caps to try besides the file's.
    pub lengths: Vec<f64>,
    pub prior: Prior,
    pub width: usize,
    pub shortlist: usize,
    /// Prompts each shortlisted variant runs on, for its measured critical path.
    pub check_prompts: Vec<String>,
    pub eval: Option<EvalSample>,
    /// Prompts the choice never saw: the chosen variant and the hand-written pipeline are
    /// scored again on them, since the best of several noisy scores overstates the winner.
    pub holdout: Option<EvalSample>,
    /// Name of the written pipeline.
    pub name: String,
    /// Output tokens of every proposer and refiner; `None` keeps the file's.
    pub proposer_tokens: Option<u32>,
    /// Output tokens of the answer (the output node); `None` keeps the file's. The quality
    /// sample's answers are this long too, so checked runs and `eval` runs match.
    pub answer_tokens: Option<u32>,
}

/// A shortlisted variant, run for real.
#[derive(Clone, Debug, Serialize)]
pub struct Checked {
    pub name: String,
    pub description: String,
    /// The hand-written base pipeline, for comparison.
    pub hand_written: bool,
    pub prior: f64,
    pub predicted_critical_path_ms: f64,
    pub predicted_ttft_ms: f64,
    pub measured_critical_path_ms: f64,
    pub ttft_ms: Option<f64>,
    pub total_ms: f64,
    /// Predicted over measured critical path.
    pub prediction_ratio: f64,
    /// `eval`'s quality figure against the hand-written pipeline as it runs (rated higher
    /// + ties/2, else judged win + tie/2, else the share of answers not degenerate).
    pub quality: Option<f64>,
    /// `eval`'s figures behind `quality` (degenerate answers, ratings, the judge's verdicts
    /// and how often its two orders agreed).
    pub eval: Option<eval::runner::VariantSummary>,
    #[serde(skip)]
    pub genome: Option<Genome>,
}

/// Everything a tuning run found.
#[derive(Clone, Debug, Serialize)]
pub struct TuneReport {
    pub base: String,
    pub budget_ms: f64,
    /// Measured over predicted critical path of the hand-written run (after `measured`);
    /// the search ran on `budget / calibration`.
    pub calibration: f64,
    /// What the hand-written run measured that the predictions take.
    pub measured: Calibration,
    /// Per-model latencies the predictions used (probed, then scaled by `measured`).
    pub latencies: LatencyTable,
    pub space_size: u128,
    pub evaluated: usize,
    pub front: Vec<FrontPoint>,
    pub checked: Vec<Checked>,
    pub chosen: String,
    pub met_budget: bool,
    /// `eval`'s check of the judge (the baseline's answer against a looped copy of it):
    /// a judge that fails it cannot rank the variants either.
    pub judge_check: Option<eval::runner::JudgeCheck>,
    /// The chosen variant against the hand-written pipeline on the held-out prompts.
    pub holdout: Option<Holdout>,
    /// The chosen variant as a pipeline file.
    pub file: String,
}

/// `eval` of the chosen variant against the hand-written pipeline on held-out prompts.
#[derive(Clone, Debug, Serialize)]
pub struct Holdout {
    pub prompts: usize,
    pub tuned: eval::runner::VariantSummary,
    pub hand_written: eval::runner::VariantSummary,
    pub judge_check: Option<eval::runner::JudgeCheck>,
}

/// A point of the predicted Pareto front.
#[derive(Clone, Debug, Serialize)]
pub struct FrontPoint {
    pub description: String,
    pub prior: f64,
    pub predicted_critical_path_ms: f64,
    pub predicted_ttft_ms: f64,
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// Per-model latencies, each distinct engine measured once.
pub async fn measure_models(
    runner: &Runner,
    models: &[String],
    concurrent: usize,
) -> Result<LatencyTable, TuneError> {
    let mut measured: Vec<(Arc<dyn Engine>, ModelLatency)> = Vec::new();
    let mut table = LatencyTable::uniform(ModelLatency::uniform(runner.latencies().get()));
    for name in models {
        let engine = runner
            .models()
            .get(name)
            .ok_or_else(|| TuneError::UnknownModel(name.clone()))?
            .clone();
        let known = measured
            .iter()
            .find(|(e, _)| Arc::ptr_eq(e, &engine))
            .map(|(_, l)| *l);
        let latency = match known {
            Some(l) => l,
            None => {
                let l = probe::measure(engine.as_ref(), PROBE_TOKENS, concurrent)
                    .await
                    .map_err(|source| TuneError::Probe {
                        model: name.clone(),
                        source,
                    })?;
                measured.push((engine, l));
                l
            }
        };
        table = table.with(name, latency);
    }
    Ok(table)
}

fn prompt_tokens(runner: &Runner, prompts: &[String]) -> u32 {
    let counts: Vec<f64> = prompts
        .iter()
        .filter_map(|p| {
            runner
                .models()
                .get(crate::pipeline::spec::DEFAULT_MODEL)
                .map(|e| f64::from(e.token_counter().count(p).get()))
        })
        .collect();
    mean(&counts).round() as u32
}

/// Mean measured critical path, TTFT and total of some runs, in ms.
type RunFigures = (f64, Option<f64>, f64);

/// Runs `pipeline` on each prompt: the mean figures, and the reports.
pub async fn measure_runs(
    launcher: &Launcher,
    pipeline: &Pipeline,
    prompts: &[String],
) -> Result<(RunFigures, Vec<RunReport>), RunError> {
    let runner = launcher.runner();
    let (mut paths, mut ttfts, mut totals) = (Vec::new(), Vec::new(), Vec::new());
    let mut reports = Vec::new();
    for prompt in prompts {
        // As `eval` does: no run inherits another's cached prefixes or speculation drafts
        // (variants share proposers and prompts, so a later one would decode faster).
        runner
            .start_fresh(Some((pipeline, StreamMode::Staircase)))
            .await?;
        let spec = RunSpec::measured(
            pipeline.clone(),
            RunRequest::prompt(prompt, StreamMode::Staircase),
        )?;
        let report = launcher.prepare(spec).await.run_alone().await?.report;
        paths.push(millis(report.critical_path_measured.length_ms));
        ttfts.extend(report.ttft_ms.map(millis));
        totals.push(millis(report.total_ms));
        reports.push(report);
    }
    let ttft = (!ttfts.is_empty()).then(|| mean(&ttfts));
    Ok(((mean(&paths), ttft, mean(&totals)), reports))
}

/// What the hand-written runs measured that the prediction then takes instead of
/// assumptions: what sharing the engine really costs inside a run (the probes share it
/// between plain requests; in a staircase run a consumer's steps and chunk prefills take
/// their turns too), and how long each node's answer was (one that stops by itself writes
/// fewer tokens than its cap, and a variant's same node is asked the same).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Calibration {
    /// Per model: the decode cost of each other sequence its sources measured in the run
    /// over the one the probes measured (a model with one source: its solo decode's).
    pub decode_scale: BTreeMap<String, f64>,
    /// Per node id: mean output tokens of a node that stopped before its cap.
    pub lengths: BTreeMap<String, u32>,
}

/// Sequences sharing `model` with the sources of `base` on it, as the prediction counts
/// them (the sources, and their staircase consumers on it).
fn sharing(base: &Pipeline, model: &str) -> usize {
    let level = predict::levels(base);
    base.nodes
        .iter()
        .position(|n| n.inputs.is_empty() && predict::model_of(&n.model) == Some(model))
        .map_or(1, |i| {
            predict::concurrency(base, StreamMode::Staircase, &level, i)
        })
}

/// A node that wrote less than this share of its cap stopped by itself.
const STOPPED_EARLY: f64 = 0.95;

impl Calibration {
    /// From the runs of `base` (each run's node reports), against the probed `table`.
    pub fn of(base: &Pipeline, runs: &[&[NodeReport]], table: &LatencyTable) -> Self {
        let mut calibration = Self::default();
        let mut rates: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (i, node) in base.nodes.iter().enumerate() {
            let ran: Vec<&NodeReport> = runs
                .iter()
                .filter_map(|nodes| nodes.get(i))
                .filter(|n| n.finished_ms.is_some() && !n.cancelled)
                .collect();
            let tokens: Vec<f64> = ran.iter().map(|n| f64::from(n.output_tokens)).collect();
            let cap = crate::pipeline::critical::expected_tokens(node);
            if !tokens.is_empty() && mean(&tokens) < f64::from(cap) * STOPPED_EARLY {
                calibration
                    .lengths
                    .insert(node.id.clone(), mean(&tokens).round().max(1.0) as u32);
            }
            let Some(model) = predict::model_of(&node.model).filter(|_| node.inputs.is_empty())
            else {
                continue;
            };
            for n in &ran {
                if let (Some(first), Some(end)) = (n.first_token_ms, n.finished_ms)
                    && n.output_tokens > 1
                    && end > first
                {
                    let per = (end - first) / (n.output_tokens - 1);
                    rates
                        .entry(model.to_string())
                        .or_default()
                        .push(per.as_secs_f64());
                }
            }
        }
        for (model, rates) in rates {
            let latency = table.of(&model);
            let sources = sharing(base, &model);
            let solo = latency.solo.decode_per_token.as_secs_f64();
            let extra = latency.per_extra_sequence.as_secs_f64();
            let scale = if sources > 1 && extra > 0.0 {
                (mean(&rates) - solo).max(0.0) / (sources - 1) as f64 / extra
            } else if solo > 0.0 {
                mean(&rates) / solo
            } else {
                1.0
            };
            calibration
                .decode_scale
                .insert(model, scale.clamp(MIN_CALIBRATION, MAX_CALIBRATION));
        }
        calibration
    }

    /// `table` with each measured model's sharing cost (or solo decode) scaled.
    pub fn table(&self, base: &Pipeline, table: &LatencyTable) -> LatencyTable {
        let mut out = table.clone();
        for (model, scale) in &self.decode_scale {
            let mut latency = table.of(model);
            let sources = sharing(base, model);
            if sources > 1 && !latency.per_extra_sequence.is_zero() {
                latency.per_extra_sequence = latency.per_extra_sequence.mul_f64(*scale);
            } else {
                latency.solo.decode_per_token = latency.solo.decode_per_token.mul_f64(*scale);
            }
            out = out.with(model, latency);
        }
        out
    }

    /// `pipeline` expecting each measured node's length (within its cap).
    pub fn lengths(&self, mut pipeline: Pipeline) -> Pipeline {
        for node in &mut pipeline.nodes {
            if let Some(&tokens) = self.lengths.get(&node.id) {
                let cap = crate::pipeline::critical::expected_tokens(node);
                node.expected_tokens = Some(tokens.min(cap));
            }
        }
        pipeline
    }
}

/// The variant sized as the tuning run asks.
fn sized(
    mut pipeline: Pipeline,
    proposer_tokens: Option<u32>,
    answer_tokens: Option<u32>,
) -> Pipeline {
    if let Some(tokens) = answer_tokens {
        let output = pipeline.output.0;
        pipeline.nodes[output].params.max_tokens = Some(tokens);
        pipeline.nodes[output].expected_tokens = None;
    }
    if let Some(tokens) = proposer_tokens {
        let output = pipeline.output;
        for (i, node) in pipeline.nodes.iter_mut().enumerate() {
            if i != output.0 && node.kind == crate::pipeline::spec::NodeKind::Agent {
                node.params.max_tokens = Some(tokens);
                node.expected_tokens = Some(tokens);
            }
        }
    }
    pipeline
}

/// Searches the variants of `base`, checks the shortlist against real runs, scores it with
/// `eval` (answers and judge on `judge_engine`), and picks the best that meets the budget.
pub async fn tune(
    launcher: &Launcher,
    judge_engine: &Arc<dyn Engine>,
    base: &Pipeline,
    options: &TuneOptions,
) -> Result<TuneReport, TuneError> {
    let runner = launcher.runner();
    let answer_tokens = options
        .answer_tokens
        .or(options.eval.as_ref().map(|e| e.answer_tokens));
    let base = sized(base.clone(), options.proposer_tokens, answer_tokens);
    let space_of = |base: &Pipeline| {
        Space::of(
            base,
            options.models.clone(),
            &options.schedules,
            &options.lengths,
        )
    };
    let (space, base_genome) = space_of(&base)?;
    let concurrent = base_genome.proposers.iter().flatten().count();
    let probed = measure_models(runner, &space.models, concurrent).await?;
    let prompt_tokens = prompt_tokens(runner, &options.check_prompts);
    // The hand-written pipeline runs first: its measured over predicted critical path
    // calibrates the search's budget to what this host does now (a busy host runs slower
    // than its probes said), bounded so one odd run cannot swing it far.
    let run_error = |pipeline: &Pipeline| {
        let variant = pipeline.name.clone();
        move |source| TuneError::Run {
            variant,
            source: Box::new(source),
        }
    };
    let (base_run, base_reports) = measure_runs(launcher, &base, &options.check_prompts)
        .await
        .map_err(run_error(&base))?;
    // The probes alone under-predict a real run (0.2-0.7x on a busy host): the run's own
    // per-model decode latencies and node lengths replace them, for the search and for
    // every prediction below.
    let base_nodes: Vec<&[NodeReport]> = base_reports.iter().map(|r| r.nodes.as_slice()).collect();
    let measured = Calibration::of(&base, &base_nodes, &probed);
    let table = measured.table(&base, &probed);
    let base = measured.lengths(base);
    let (space, base_genome) = space_of(&base)?;
    let base_predicted =
        millis(predict(&base, StreamMode::Staircase, prompt_tokens, &table).critical_path);
    let calibration = if base_predicted > 0.0 && base_run.0 > 0.0 {
        (base_run.0 / base_predicted).clamp(MIN_CALIBRATION, MAX_CALIBRATION)
    } else {
        1.0
    };
    let budget = options.budget.resolve(base_run.0);
    let search_budget = budget.div_f64(calibration);
    let search_options = SearchOptions {
        budget: search_budget,
        width: options.width,
        prompt_tokens,
        ..SearchOptions::default()
    };
    let outcome = search::search(
        &space,
        &base_genome,
        &options.prior,
        &table,
        &search_options,
    )?;
    tracing::info!(evaluated = outcome.scored.len(), "search done");
    let shortlist = shortlist(&outcome, search_budget, options.shortlist);

    let mut checked = Vec::new();
    let mut candidates: Vec<(Option<Genome>, Pipeline)> = vec![(None, base.clone())];
    for (k, g) in shortlist.iter().enumerate() {
        let name = format!("{}-{}", options.name, k + 1);
        // The templates carry the base's sizes; a proposer answering alone gets the answer's.
        let mut pipeline = space.build(g, &name)?;
        if g.aggregator.is_none() {
            pipeline = measured.lengths(sized(pipeline, None, answer_tokens));
        }
        candidates.push((Some(g.clone()), pipeline));
    }
    for (genome, pipeline) in &candidates {
        // A shared host drifts between the first probes and a variant's runs: each variant
        // is predicted at its models' solo latency probed again just before and just after
        // its runs (the mean of the two brackets what the host did meanwhile).
        let (now, (measured, ttft, total)) = match genome {
            None => (table.clone(), base_run),
            Some(_) => {
                let before = probe_models(runner, pipeline).await?;
                let (figures, _) = measure_runs(launcher, pipeline, &options.check_prompts)
                    .await
                    .map_err(run_error(pipeline))?;
                let after = probe_models(runner, pipeline).await?;
                (rescaled(&table, &probed, &[before, after]), figures)
            }
        };
        let prediction = predict(pipeline, StreamMode::Staircase, prompt_tokens, &now);
        let predicted = millis(prediction.critical_path);
        checked.push(Checked {
            name: pipeline.name.clone(),
            description: match genome {
                Some(g) => space.describe(g),
                None => space.describe(&base_genome),
            },
            hand_written: genome.is_none(),
            prior: options
                .prior
                .of(&space, genome.as_ref().unwrap_or(&base_genome)),
            predicted_critical_path_ms: predicted,
            predicted_ttft_ms: millis(prediction.ttft),
            measured_critical_path_ms: measured,
            ttft_ms: ttft,
            total_ms: total,
            prediction_ratio: if measured > 0.0 {
                predicted / measured
            } else {
                0.0
            },
            quality: None,
            eval: None,
            genome: genome.clone(),
        });
    }

    let mut judge_check = None;
    if let Some(sample) = &options.eval {
        let tuned = candidates
            .iter()
            .filter(|(genome, _)| genome.is_some())
            .map(|(_, p)| p);
        let report = against_hand_written(launcher, judge_engine, &base, tuned, sample).await?;
        judge_check.clone_from(&report.judge_check);
        for c in &mut checked {
            let name = if c.hand_written {
                &report.baseline
            } else {
                &c.name
            };
            if let Some(s) = report.summaries.iter().find(|s| &s.variant == name) {
                // Against itself the baseline scores one half, the mark of equal quality.
                c.quality = Some(if c.hand_written && sample.judge {
                    0.5
                } else {
                    eval::report::quality(s).0
                });
                c.eval = Some(s.clone());
            }
        }
    }

    let budget_ms = millis(budget);
    let tuned: Vec<&Checked> = checked.iter().filter(|c| !c.hand_written).collect();
    let meets = |c: &&Checked| c.measured_critical_path_ms <= budget_ms;
    let by_quality = |a: &&&Checked, b: &&&Checked| {
        a.quality
            .unwrap_or(a.prior)
            .total_cmp(&b.quality.unwrap_or(b.prior))
            .then(
                b.measured_critical_path_ms
                    .total_cmp(&a.measured_critical_path_ms),
            )
    };
    let met: Vec<&Checked> = tuned.iter().copied().filter(meets).collect();
    let (chosen, met_budget) = match met.iter().max_by(by_quality) {
        Some(c) => (*c, true),
        None => (
            tuned
                .iter()
                .copied()
                .min_by(|a, b| {
                    a.measured_critical_path_ms
                        .total_cmp(&b.measured_critical_path_ms)
                })
                .unwrap_or(&checked[0]),
            false,
        ),
    };
    let holdout = match (&options.holdout, chosen.hand_written) {
        (Some(sample), false) => {
            let pipeline = candidates
                .iter()
                .map(|(_, p)| p)
                .filter(|p| p.name == chosen.name);
            let report =
                against_hand_written(launcher, judge_engine, &base, pipeline, sample).await?;
            let summary = |name: &str| report.summaries.iter().find(|s| s.variant == name);
            summary(&chosen.name)
                .zip(summary(&report.baseline))
                .map(|(tuned, hand_written)| Holdout {
                    prompts: sample.prompts.len(),
                    tuned: tuned.clone(),
                    hand_written: hand_written.clone(),
                    judge_check: report.judge_check.clone(),
                })
        }
        _ => None,
    };
    let file = written_file(&space, chosen, &tuned, budget, &options.name);
    Ok(TuneReport {
        base: base.name.clone(),
        budget_ms,
        calibration,
        measured,
        latencies: table.clone(),
        space_size: space.size(),
        evaluated: outcome.scored.len(),
        front: outcome
            .front
            .iter()
            .map(|s| FrontPoint {
                description: space.describe(&s.genome),
                prior: s.prior,
                predicted_critical_path_ms: millis(s.prediction.critical_path),
                predicted_ttft_ms: millis(s.prediction.ttft),
            })
            .collect(),
        chosen: chosen.name.clone(),
        met_budget,
        judge_check,
        checked,
        holdout,
        file,
    })
}

/// `eval` of `tuned` against `base`, the hand-written pipeline as it runs (the baseline).
async fn against_hand_written(
    launcher: &Launcher,
    judge_engine: &Arc<dyn Engine>,
    base: &Pipeline,
    tuned: impl Iterator<Item = &Pipeline>,
    sample: &EvalSample,
) -> Result<eval::EvalReport, TuneError> {
    let variants = tuned
        .map(|p| {
            let mut v = Variant::pipeline(p.clone(), StreamMode::Staircase, None);
            v.name.clone_from(&p.name);
            v
        })
        .collect();
    let options = EvalOptions {
        baseline: base.clone(),
        baseline_mode: StreamMode::Staircase,
        variants,
        prompts: sample.prompts.clone(),
        proposer_tokens: None,
        answer_tokens: sample.answer_tokens,
        judge: sample.judge,
        // Tune ranks by the judge's ratings; its pairwise verdicts are reported only.
        judge_explain_tokens: 0,
        noise_floor: false,
        dry: Default::default(),
    };
    eval::runner::run(launcher, judge_engine, &options)
        .await
        .map_err(|e| TuneError::Eval(Box::new(e)))
}

/// The solo latencies of `pipeline`'s models, probed now.
async fn probe_models(
    runner: &Runner,
    pipeline: &Pipeline,
) -> Result<Vec<(String, ModelLatency)>, TuneError> {
    let mut models: Vec<&str> = pipeline
        .nodes
        .iter()
        .filter_map(|n| predict::model_of(&n.model))
        .collect();
    models.sort_unstable();
    models.dedup();
    let mut out = Vec::new();
    for model in models {
        let Some(engine) = runner.models().get(model) else {
            continue;
        };
        let latency = probe::measure(engine.as_ref(), PROBE_TOKENS, 1)
            .await
            .map_err(|source| TuneError::Probe {
                model: model.to_string(),
                source,
            })?;
        out.push((model.to_string(), latency));
    }
    Ok(out)
}

/// `table` with each model's figures scaled by how much its solo decode and prefill moved
/// since `probed`: the mean ratio over the probe rounds `now`.
fn rescaled(
    table: &LatencyTable,
    probed: &LatencyTable,
    now: &[Vec<(String, ModelLatency)>],
) -> LatencyTable {
    let ratio = |now: Duration, then: Duration| {
        if then.is_zero() {
            1.0
        } else {
            (now.as_secs_f64() / then.as_secs_f64()).clamp(MIN_CALIBRATION, MAX_CALIBRATION)
        }
    };
    let mut ratios: BTreeMap<&str, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for (model, fresh) in now.iter().flatten() {
        let was = probed.of(model);
        let entry = ratios.entry(model).or_default();
        entry.0.push(ratio(
            fresh.solo.decode_per_token,
            was.solo.decode_per_token,
        ));
        entry.1.push(ratio(
            fresh.solo.prefill_per_token,
            was.solo.prefill_per_token,
        ));
    }
    let mut out = table.clone();
    for (model, (decode, prefill)) in ratios {
        let (decode, prefill) = (mean(&decode), mean(&prefill));
        let mut latency = table.of(model);
        latency.solo.decode_per_token = latency.solo.decode_per_token.mul_f64(decode);
        latency.per_extra_sequence = latency.per_extra_sequence.mul_f64(decode);
        latency.solo.prefill_per_token = latency.solo.prefill_per_token.mul_f64(prefill);
        out = out.with(model, latency);
    }
    out
}

/// The shortlist: of each [`Shape`], the variant with the best prior that meets the budget
/// (at equal prior the faster), best first; else the fastest. The prior cannot rank shapes
/// the judge finds about equal (on 40 prompts two proposers with complete edges, two with
/// staircase edges and three short ones were each rated within a few points of `moa`), so
/// the real runs and `eval` compare one of each instead of near-copies of one shape (the
/// prior favours every added node, so its top few are all two-layer).
fn shortlist(outcome: &Outcome, budget: Duration, k: usize) -> Vec<Genome> {
    let mut best_of_shape: BTreeMap<Shape, &search::Scored> = BTreeMap::new();
    // `scored` is fastest first, so a later variant replaces one only with a better prior.
    for s in outcome.scored.iter().filter(|s| s.meets(budget)) {
        let best = best_of_shape.entry(s.genome.shape()).or_insert(s);
        if s.prior > best.prior {
            *best = s;
        }
    }
    let mut meeting: Vec<&search::Scored> = best_of_shape.into_values().collect();
    meeting.sort_by(|a, b| {
        b.prior
            .total_cmp(&a.prior)
            .then(a.prediction.critical_path.cmp(&b.prediction.critical_path))
    });
    let mut out: Vec<Genome> = meeting
        .iter()
        .take(k.max(1))
        .map(|s| s.genome.clone())
        .collect();
    if !out.contains(&outcome.best.genome) {
        out.insert(0, outcome.best.genome.clone());
        out.truncate(k.max(1));
    }
    out
}

/// The chosen variant as a pipeline file: its nodes at the top, the budget, its quality, and
/// the faster runners-up as `[[variants]]` for load-adaptive runs.
fn written_file(
    space: &Space,
    chosen: &Checked,
    tuned: &[&Checked],
    budget: Duration,
    name: &str,
) -> String {
    let Some(genome) = &chosen.genome else {
        return String::new();
    };
    let mut file = space.toml(genome, name);
    file.insert(
        "latency_budget_ms".into(),
        toml::Value::Integer(i64::try_from(budget.as_millis()).unwrap_or(i64::MAX)),
    );
    if let Some(q) = chosen.quality {
        file.insert("quality".into(), toml::Value::Float(q));
    }
    let mut variants: Vec<&&Checked> = tuned
        .iter()
        .filter(|c| {
            c.name != chosen.name
                && c.predicted_critical_path_ms < chosen.predicted_critical_path_ms
        })
        .collect();
    variants.sort_by(|a, b| {
        a.predicted_critical_path_ms
            .total_cmp(&b.predicted_critical_path_ms)
            .reverse()
    });
    let tables: Vec<toml::Value> = variants
        .iter()
        .filter_map(|c| {
            let g = c.genome.as_ref()?;
            let mut t = space.toml(g, &c.name);
            t.remove("description");
            if let Some(q) = c.quality {
                t.insert("quality".into(), toml::Value::Float(q));
            }
            Some(toml::Value::Table(t))
        })
        .collect();
    let mut header = format!(
        "# Written by `staircase tune {}` for a latency budget of {} ms: {}.\n",
        space.base,
        budget.as_millis(),
        chosen.description
    );
    if !tables.is_empty() {
        file.insert("variants".into(), toml::Value::Array(tables));
        header.push_str(
            "# `[[variants]]` are faster runners-up that `run` and `serve` switch to under load.\n",
        );
    }
    format!("{header}{}", toml::to_string(&file).unwrap_or_default())
}
