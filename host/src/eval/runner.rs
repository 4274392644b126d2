//! Runs variants over a prompt set and scores them. A variant is a single model answering
//! alone, or a pipeline in a mode (layered, or staircase with the file's chunk schedule or
//! another). Per prompt every variant answers on the same engine, then each answer gets the
//! reference-free checks, its token F1 against the layered baseline and the single model,
//! and (when asked) the judge's verdict against the layered baseline in both orders. A
//! second layered run with shifted seeds gives the noise floor: how much two answers of the
//! same system agree, and how a judge rates two samples of one system.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::judge::{Judge, PairJudgement, looped_copy};
use super::metrics::{self, Quality};
use super::rating::{self, Compared, Rater};
use super::stats::{
    Interval, Tally, TallySummary, Z_95, bootstrap_mean, wilson, win_tie_loss_scores,
};
use crate::app::{Launcher, RunSpec};
use crate::engine::{
    ChatMessage, DryOverrides, DrySampling, Engine, EngineError, FinishReason, GenerationEvent,
    GenerationRequest, Role,
};
use crate::millis::millis;
use crate::pipeline::stream::ChunkSchedule;
use crate::pipeline::{Pipeline, RunError, RunRequest};
use crate::policy::StreamMode;

/// Seed shift of the noise-floor run: any non-zero value gives other proposals.
pub const NOISE_SEED_OFFSET: u64 = 1000;

/// What answers.
#[derive(Clone, Debug)]
pub enum VariantKind {
    /// The pipeline's model alone, on the bare question.
    Single,
    Pipeline {
        pipeline: Box<Pipeline>,
        mode: StreamMode,
    },
}

/// One thing to evaluate.
#[derive(Clone, Debug)]
pub struct Variant {
    pub name: String,
    pub kind: VariantKind,
}

fn mode_name(mode: StreamMode) -> &'static str {
    match mode {
        StreamMode::Staircase => "staircase",
        StreamMode::Layered => "layered",
    }
}

impl Variant {
    pub fn single() -> Self {
        Self {
            name: "single".into(),
            kind: VariantKind::Single,
        }
    }

    /// `pipeline` in `mode`, with `schedule` on every staircase edge when given. Named
    /// `PIPELINE/MODE` or `PIPELINE/staircase@SIZES`.
    pub fn pipeline(
        mut pipeline: Pipeline,
        mode: StreamMode,
        schedule: Option<&ChunkSchedule>,
    ) -> Self {
        let mut name = format!("{}/{}", pipeline.name, mode_name(mode));
        if let (Some(schedule), StreamMode::Staircase) = (schedule, mode) {
            pipeline.set_chunk_schedule(schedule);
            let sizes: Vec<String> = schedule.sizes().iter().map(u32::to_string).collect();
            name = format!("{name}@{}", sizes.join(","));
        }
        Self {
            name,
            kind: VariantKind::Pipeline {
                pipeline: Box::new(pipeline),
                mode,
            },
        }
    }
}

/// Why an evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("variant `{variant}`: {source}")]
    Run { variant: String, source: RunError },
    #[error("variant `{variant}`: {source}")]
    Engine {
        variant: String,
        source: EngineError,
    },
    #[error("judge: {0}")]
    Judge(EngineError),
    #[error("variant `{variant}`: an output guard did not start: {source}")]
    Guard {
        variant: String,
        source: crate::policy::PolicyError,
    },
}

/// What to evaluate.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// This pipeline, run in `baseline_mode`, is the baseline every variant is compared with.
    pub baseline: Pipeline,
    /// `Layered` for `staircase eval` (the reference answer); `tune` compares with the
    /// hand-written pipeline as it runs.
    pub baseline_mode: StreamMode,
    /// Evaluated besides the baseline and the single model, which always run.
    pub variants: Vec<Variant>,
    pub prompts: Vec<String>,
    /// Output tokens of every proposer; `None` keeps each file's own.
    pub proposer_tokens: Option<u32>,
    /// Output tokens of every answer (pipeline output node and single model).
    pub answer_tokens: u32,
    /// Judge every variant against the baseline (two judge calls per variant and prompt).
    pub judge: bool,
    /// Tokens the pairwise judge compares the answers in before each verdict (0: none).
    pub judge_explain_tokens: u32,
    /// Also run the baseline with shifted seeds (the noise floor).
    pub noise_floor: bool,
    /// DRY fields set on every node of every pipeline and on the single model, over each
    /// one's own (the node default, [`DrySampling::RECOMMENDED`], for the single model);
    /// `dry_multiplier: 0` measures without DRY.
    pub dry: DryOverrides,
}

/// One answer with its checks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Answer {
    pub variant: String,
    pub text: String,
    pub ttft_ms: Option<f64>,
    pub total_ms: f64,
    /// Where a pipeline's first answer token went: the first token of any other node (a
    /// proposer's prefill), and the start of the answering node's first real step (warm-ups
    /// aside; in staircase mode after its first input chunk, or its opening).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_input_token_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_step_ms: Option<f64>,
    pub quality: Quality,
    /// Token F1 with the layered baseline's answer to the same prompt.
    pub f1_layered: Option<f64>,
    /// Token F1 with the single model's answer.
    pub f1_single: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judged: Option<PairJudgement>,
    /// The judge's [`rating`](super::rating) of this answer on its own (1 to 9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rating: Option<f64>,
    /// That rating against the baseline's on the same prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rated: Option<Compared>,
}

/// Every answer to one prompt.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PromptRecord {
    pub prompt: String,
    pub answers: Vec<Answer>,
    /// The judge check on this prompt: the baseline's answer (position "variant") against
    /// [`looped_copy`] of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_check: Option<PairJudgement>,
    /// The judge check by rating: the baseline's answer's and the looped copy's ratings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_ratings: Option<[Option<f64>; 2]>,
}

/// One variant over all prompts.
#[derive(Clone, Debug, Serialize)]
pub struct VariantSummary {
    pub variant: String,
    pub answers: usize,
    pub degenerate: usize,
    /// Answers that say a span of [`metrics::DEGENERATE_SPAN`] words twice verbatim (also
    /// counted in `degenerate`).
    pub repeated_span: usize,
    pub mean_distinct_2: f64,
    pub mean_words: f64,
    /// Answers the token limit cut mid-sentence.
    pub limit_mid_sentence: usize,
    pub mean_ttft_ms: Option<f64>,
    /// Means of [`Answer::first_input_token_ms`] and [`Answer::first_step_ms`].
    pub mean_first_input_token_ms: Option<f64>,
    pub mean_first_step_ms: Option<f64>,
    /// Mean over prompts of TTFT / the baseline's TTFT on the same prompt.
    pub ttft_over_layered: Option<f64>,
    pub mean_f1_layered: Option<f64>,
    pub mean_f1_single: Option<f64>,
    pub tally: Tally,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judged: Option<TallySummary>,
    /// Mean [`PairJudgement::weighted`] with its 95% interval, where the judge's engine
    /// reports the verdict letter's probabilities.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weighted_score: Option<Interval>,
    /// Mean rating (1 to 9) with its 95% interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_rating: Option<Interval>,
    /// Ratings against the baseline's, prompt by prompt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rated: Option<RatedSummary>,
}

/// A variant's ratings against the baseline's over all prompts.
#[derive(Clone, Debug, Serialize)]
pub struct RatedSummary {
    pub higher: usize,
    pub ties: usize,
    pub lower: usize,
    /// Prompts where either answer got no rating.
    pub unrated: usize,
    /// Higher + ties/2 with its bootstrap 95% interval: the rating's win + tie/2.
    pub score: Interval,
}

impl RatedSummary {
    fn of(compared: impl Iterator<Item = Option<Compared>>) -> Self {
        let (mut higher, mut ties, mut lower, mut unrated) = (0, 0, 0, 0);
        for c in compared {
            match c {
                Some(Compared::Higher) => higher += 1,
                Some(Compared::Tie) => ties += 1,
                Some(Compared::Lower) => lower += 1,
                None => unrated += 1,
            }
        }
        let scores = win_tie_loss_scores(higher, ties, lower);
        Self {
            higher,
            ties,
            lower,
            unrated,
            score: bootstrap_mean(&scores),
        }
    }
}

/// Everything an evaluation measured.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub baseline: String,
    pub proposer_tokens: Option<u32>,
    pub answer_tokens: u32,
    pub judge: Option<String>,
    /// How often the judge preferred the baseline's answer to a looped copy of it: a judge
    /// that fails this check cannot rank real answers, whatever it says of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge_check: Option<JudgeCheck>,
    pub summaries: Vec<VariantSummary>,
    pub prompts: Vec<PromptRecord>,
}

/// The judge check over all prompts (a win: the intact answer was preferred).
#[derive(Clone, Debug, Serialize)]
pub struct JudgeCheck {
    pub tally: Tally,
    pub summary: TallySummary,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weighted_score: Option<Interval>,
    /// Prompts where the real answer was rated above its looped copy, of those rated.
    pub rated_higher: usize,
    pub rated: usize,
    /// `rated_higher / rated` with its Wilson 95% interval.
    pub rated_higher_share: Interval,
}

impl JudgeCheck {
    fn of(records: &[PromptRecord]) -> Self {
        let mut tally = Tally::default();
        for check in records.iter().filter_map(|r| r.judge_check.as_ref()) {
            check.add_to(&mut tally);
        }
        let ratings: Vec<(f64, f64)> = records
            .iter()
            .filter_map(|r| match r.check_ratings {
                Some([Some(real), Some(looped)]) => Some((real, looped)),
                _ => None,
            })
            .collect();
        let rated_higher = ratings
            .iter()
            .filter(|(real, looped)| real > looped)
            .count();
        Self {
            summary: tally.summary(),
            tally,
            weighted_score: weighted_score(records.iter().filter_map(|r| r.judge_check.as_ref())),
            rated_higher,
            rated: ratings.len(),
            rated_higher_share: wilson(rated_higher, ratings.len(), Z_95),
        }
    }
}

/// The mean weighted score of `judgements` with its 95% interval; `None` when no pair has one.
fn weighted_score<'j>(judgements: impl Iterator<Item = &'j PairJudgement>) -> Option<Interval> {
    let scores: Vec<f64> = judgements.filter_map(|j| j.weighted).collect();
    (!scores.is_empty()).then(|| bootstrap_mean(&scores))
}

/// A single model's answer and how it went.
#[derive(Clone, Debug)]
pub struct SingleAnswer {
    pub text: String,
    pub ttft: Option<Duration>,
    pub total: Duration,
    pub reason: FinishReason,
}

/// `engine` answering `prompt` alone, greedy, with at most `max_tokens`, with `dry` (as a
/// pipeline node samples, [`DrySampling::RECOMMENDED`], for a fair comparison).
pub async fn single_answer(
    engine: &dyn Engine,
    prompt: &str,
    max_tokens: u32,
    dry: DrySampling,
) -> Result<SingleAnswer, EngineError> {
    let mut request = GenerationRequest::chat(vec![ChatMessage::new(Role::User, prompt)]);
    request.sampling.max_tokens = max_tokens;
    request.sampling.dry = dry;
    let start = Instant::now();
    let mut stream = engine.submit(request)?;
    let (mut text, mut ttft) = (String::new(), None);
    while let Some(event) = stream.next().await {
        match event? {
            GenerationEvent::Delta { text: delta, .. } => {
                if ttft.is_none() && !delta.is_empty() {
                    ttft = Some(start.elapsed());
                }
                text.push_str(&delta);
            }
            GenerationEvent::Finished { reason, .. } => {
                return Ok(SingleAnswer {
                    text,
                    ttft,
                    total: start.elapsed(),
                    reason,
                });
            }
        }
    }
    Err(EngineError::Stopped)
}

/// Whether a pipeline run's answer ran out of tokens: the output node used its whole budget.
pub fn pipeline_hit_limit(pipeline: &Pipeline, output_tokens: u32) -> bool {
    let budget = pipeline.nodes[pipeline.output.0]
        .params
        .max_tokens
        .unwrap_or(crate::engine::SamplingParams::default().max_tokens);
    output_tokens >= budget
}

/// The variant's pipeline with the evaluation's token limits.
fn sized(pipeline: &Pipeline, options: &EvalOptions) -> Pipeline {
    let mut pipeline = pipeline.clone();
    if let Some(tokens) = options.proposer_tokens {
        pipeline.set_proposer_tokens(tokens);
    }
    let output = pipeline.output.0;
    pipeline.nodes[output].params.max_tokens = Some(options.answer_tokens);
    for node in &mut pipeline.nodes {
        node.params.set_dry(options.dry);
    }
    pipeline
}

/// One variant's answer to one prompt, before scoring.
struct Run {
    text: String,
    ttft_ms: Option<f64>,
    total_ms: f64,
    first_input_token_ms: Option<f64>,
    first_step_ms: Option<f64>,
    hit_limit: bool,
}

/// Runs one variant on one prompt.
async fn answer(
    launcher: &Launcher,
    engine: &dyn Engine,
    variant: &Variant,
    prompt: &str,
    options: &EvalOptions,
) -> Result<Run, EvalError> {
    match &variant.kind {
        VariantKind::Single => {
            let dry = options.dry.over(DrySampling::RECOMMENDED);
            let a = single_answer(engine, prompt, options.answer_tokens, dry)
                .await
                .map_err(|source| EvalError::Engine {
                    variant: variant.name.clone(),
                    source,
                })?;
            Ok(Run {
                text: a.text,
                ttft_ms: a.ttft.map(millis),
                total_ms: millis(a.total),
                first_input_token_ms: None,
                first_step_ms: None,
                hit_limit: a.reason == FinishReason::Length,
            })
        }
        VariantKind::Pipeline { pipeline, mode } => {
            let failed = |source| EvalError::Run {
                variant: variant.name.clone(),
                source,
            };
            let spec =
                RunSpec::measured(sized(pipeline, options), RunRequest::prompt(prompt, *mode))
                    .map_err(failed)?;
            let prepared = launcher.prepare(spec).await;
            // A pipeline's own output guards: what is judged is what its client would read.
            let (outcome, released) = if pipeline.guards.is_empty() {
                (prepared.run_alone().await.map_err(failed)?, None)
            } else {
                let started = std::time::Instant::now();
                let info = crate::guard::StreamInfo::answer_of(pipeline);
                let guards = launcher
                    .open_guards(&pipeline.guards, &info)
                    .await
                    .map_err(|source| EvalError::Guard {
                        variant: variant.name.clone(),
                        source,
                    })?;
                let guarded = guards.run_whole(prepared).await;
                match guarded.outcome {
                    Some(outcome) => (outcome.map_err(failed)?, Some(guarded.released)),
                    // Stopped: the answer is what was released before the stop.
                    None => {
                        return Ok(Run {
                            text: guarded.released,
                            ttft_ms: None,
                            total_ms: millis(started.elapsed()),
                            first_input_token_ms: None,
                            first_step_ms: None,
                            hit_limit: false,
                        });
                    }
                }
            };
            let (pipeline, report) = (outcome.pipeline, outcome.report);
            let output = &report.nodes[pipeline.output.0];
            let first_input_token_ms = report
                .nodes
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != pipeline.output.0)
                .filter_map(|(_, n)| n.first_token_ms)
                .min()
                .map(millis);
            Ok(Run {
                first_input_token_ms,
                first_step_ms: output.started_ms.map(millis),
                hit_limit: pipeline_hit_limit(&pipeline, output.output_tokens),
                ttft_ms: report.ttft_ms.map(millis),
                total_ms: millis(report.total_ms),
                text: released.unwrap_or(report.answer),
            })
        }
    }
}

/// Runs the evaluation. `engine` answers as the single model and judges.
pub async fn run(
    launcher: &Launcher,
    engine: &Arc<dyn Engine>,
    options: &EvalOptions,
) -> Result<EvalReport, EvalError> {
    run_judged_by(launcher, engine, engine.as_ref(), options).await
}

/// Runs the evaluation with `judge` (any model of the models table, a remote one
/// included) judging; `engine` answers as the single model.
pub async fn run_judged_by(
    launcher: &Launcher,
    engine: &Arc<dyn Engine>,
    judge_engine: &dyn Engine,
    options: &EvalOptions,
) -> Result<EvalReport, EvalError> {
    let baseline = Variant::pipeline(options.baseline.clone(), options.baseline_mode, None);
    let single = Variant::single();
    let mut noise = None;
    if options.noise_floor {
        let mut pipeline = options.baseline.clone();
        pipeline.offset_seeds(NOISE_SEED_OFFSET);
        let mut variant = Variant::pipeline(pipeline, options.baseline_mode, None);
        variant.name = format!("{} (seeds +{NOISE_SEED_OFFSET})", baseline.name);
        noise = Some(variant);
    }
    let mut order: Vec<&Variant> = vec![&single];
    order.extend(options.variants.iter().filter(|v| v.name != baseline.name));
    order.push(&baseline);
    order.extend(noise.as_ref());

    let mut records = Vec::new();
    for (index, prompt) in options.prompts.iter().enumerate() {
        tracing::info!(prompt, index, "eval");
        let mut answers = Vec::new();
        for variant in &order {
            // The single model's engine may be outside the runner's models table.
            engine.forget_history();
            let pipeline = match &variant.kind {
                VariantKind::Single => None,
                VariantKind::Pipeline { pipeline, mode } => Some((pipeline.as_ref(), *mode)),
            };
            launcher
                .runner()
                .start_fresh(pipeline)
                .await
                .map_err(|source| EvalError::Run {
                    variant: variant.name.clone(),
                    source,
                })?;
            let run = answer(launcher, engine.as_ref(), variant, prompt, options).await?;
            answers.push(Answer {
                variant: variant.name.clone(),
                quality: Quality::of(&run.text, run.hit_limit),
                text: run.text,
                ttft_ms: run.ttft_ms,
                total_ms: run.total_ms,
                first_input_token_ms: run.first_input_token_ms,
                first_step_ms: run.first_step_ms,
                f1_layered: None,
                f1_single: None,
                judged: None,
                rating: None,
                rated: None,
            });
        }
        let words_of = |name: &str| {
            answers
                .iter()
                .find(|a| a.variant == name)
                .map(|a| metrics::words(&a.text))
        };
        let (layered_words, single_words) = (words_of(&baseline.name), words_of(&single.name));
        for a in &mut answers {
            let words = metrics::words(&a.text);
            if a.variant != baseline.name {
                a.f1_layered = layered_words.as_ref().map(|l| metrics::token_f1(&words, l));
            }
            if a.variant != single.name {
                a.f1_single = single_words.as_ref().map(|s| metrics::token_f1(&words, s));
            }
        }
        records.push(PromptRecord {
            prompt: prompt.clone(),
            answers,
            judge_check: None,
            check_ratings: None,
        });
    }
    let answered = Answered {
        model: engine.model_info().name.clone(),
        baseline: baseline.name,
        proposer_tokens: options.proposer_tokens,
        answer_tokens: options.answer_tokens,
        prompts: records,
    };
    score(
        answered,
        options.judge.then_some(judge_engine),
        options.judge_explain_tokens,
    )
    .await
}

/// The answers of an evaluation, as generated or read back from its `eval.json` (whose
/// other fields are ignored), ready to be scored.
#[derive(Clone, Debug, Deserialize)]
pub struct Answered {
    pub model: String,
    pub baseline: String,
    pub proposer_tokens: Option<u32>,
    pub answer_tokens: u32,
    pub prompts: Vec<PromptRecord>,
}

/// Scores `answered`: with a `judge`, every answer is rated and every variant judged
/// against the baseline in both orders, beside the judge check; then every variant's
/// figures are summed up, in the order of the first prompt's answers. Earlier verdicts and
/// ratings in `answered` are replaced.
pub async fn score(
    mut answered: Answered,
    judge_engine: Option<&dyn Engine>,
    explain_tokens: u32,
) -> Result<EvalReport, EvalError> {
    let baseline = answered.baseline.clone();
    let judge = judge_engine.map(|engine| Judge::new(engine).explaining(explain_tokens));
    let rater = judge_engine.map(|engine| Rater { engine });
    for (index, record) in answered.prompts.iter_mut().enumerate() {
        let prompt = record.prompt.as_str();
        record.judge_check = None;
        record.check_ratings = None;
        let baseline_text = record
            .answers
            .iter()
            .find(|a| a.variant == baseline)
            .map(|a| a.text.clone())
            .unwrap_or_default();
        for a in &mut record.answers {
            a.judged = None;
            a.rating = None;
            a.rated = None;
        }
        let (Some(judge), Some(rater)) = (&judge, &rater) else {
            continue;
        };
        tracing::info!(prompt, index, "eval: judging");
        for a in &mut record.answers {
            a.rating = rater
                .rate(prompt, &a.text)
                .await
                .map_err(EvalError::Judge)?;
            if a.variant != baseline {
                a.judged = Some(
                    judge
                        .pair(prompt, &a.text, &baseline_text)
                        .await
                        .map_err(EvalError::Judge)?,
                );
            }
        }
        let baseline_rating = record
            .answers
            .iter()
            .find(|a| a.variant == baseline)
            .and_then(|a| a.rating);
        for a in &mut record.answers {
            if a.variant != baseline {
                a.rated = a
                    .rating
                    .zip(baseline_rating)
                    .map(|(mine, base)| rating::compare(mine, base));
            }
        }
        if !baseline_text.trim().is_empty() {
            let looped = looped_copy(&baseline_text);
            record.judge_check = Some(
                judge
                    .pair(prompt, &baseline_text, &looped)
                    .await
                    .map_err(EvalError::Judge)?,
            );
            let looped_rating = rater
                .rate(prompt, &looped)
                .await
                .map_err(EvalError::Judge)?;
            record.check_ratings = Some([baseline_rating, looped_rating]);
        }
    }
    let judge_check = judge.is_some().then(|| JudgeCheck::of(&answered.prompts));
    let mut order: Vec<String> = Vec::new();
    for a in answered.prompts.iter().flat_map(|r| &r.answers) {
        if !order.contains(&a.variant) {
            order.push(a.variant.clone());
        }
    }
    let summaries = order
        .iter()
        .map(|v| summarize(v, &baseline, &answered.prompts, judge.is_some()))
        .collect();
    Ok(EvalReport {
        model: answered.model,
        baseline,
        proposer_tokens: answered.proposer_tokens,
        answer_tokens: answered.answer_tokens,
        judge: judge_engine.map(|j| j.model_info().name.clone()),
        judge_check,
        summaries,
        prompts: answered.prompts,
    })
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// One variant's figures over every prompt.
pub fn summarize(
    name: &str,
    baseline: &str,
    records: &[PromptRecord],
    judged: bool,
) -> VariantSummary {
    let pick = |r: &PromptRecord, v: &str| r.answers.iter().find(|a| a.variant == v).cloned();
    let answers: Vec<Answer> = records.iter().filter_map(|r| pick(r, name)).collect();
    let ttft_ratio = mean(records.iter().filter_map(|r| {
        let mine = pick(r, name)?.ttft_ms?;
        let base = pick(r, baseline)?.ttft_ms?;
        (base > 0.0).then(|| mine / base)
    }));
    let mut tally = Tally::default();
    for judgement in answers.iter().filter_map(|a| a.judged.as_ref()) {
        judgement.add_to(&mut tally);
    }
    VariantSummary {
        variant: name.to_string(),
        answers: answers.len(),
        degenerate: answers.iter().filter(|a| a.quality.degenerate).count(),
        repeated_span: answers
            .iter()
            .filter(|a| a.quality.repeated_span >= metrics::DEGENERATE_SPAN)
            .count(),
        mean_distinct_2: mean(answers.iter().map(|a| a.quality.distinct_2)).unwrap_or(0.0),
        mean_words: mean(answers.iter().map(|a| a.quality.words as f64)).unwrap_or(0.0),
        limit_mid_sentence: answers
            .iter()
            .filter(|a| a.quality.ending == metrics::Ending::LimitMidSentence)
            .count(),
        mean_ttft_ms: mean(answers.iter().filter_map(|a| a.ttft_ms)),
        mean_first_input_token_ms: mean(answers.iter().filter_map(|a| a.first_input_token_ms)),
        mean_first_step_ms: mean(answers.iter().filter_map(|a| a.first_step_ms)),
        ttft_over_layered: ttft_ratio,
        mean_f1_layered: mean(answers.iter().filter_map(|a| a.f1_layered)),
        mean_f1_single: mean(answers.iter().filter_map(|a| a.f1_single)),
        judged: (judged && name != baseline).then(|| tally.summary()),
        weighted_score: weighted_score(answers.iter().filter_map(|a| a.judged.as_ref())),
        mean_rating: {
            let ratings: Vec<f64> = answers.iter().filter_map(|a| a.rating).collect();
            (!ratings.is_empty()).then(|| bootstrap_mean(&ratings))
        },
        rated: (judged && name != baseline)
            .then(|| RatedSummary::of(answers.iter().map(|a| a.rated))),
        tally,
    }
}
