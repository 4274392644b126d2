//! `staircase bench staircase`: a single model alone vs the layered pipeline vs the
//! staircase pipeline, on the same engine, in one process, over a fixed set of prompts.
//!
//! Per prompt it measures time to first answer token and total time of each variant, the
//! share of aggregator prompt tokens the prefix cache served, and each run's wall time
//! against its measured critical path; it reports ratios (which compare within one run on
//! one machine) rather than absolute times. Every run starts fresh ([`Runner::start_fresh`]):
//! the engines forget what the previous variant cached, and an untimed warm-up puts the
//! variant's static prompt prefixes back (a server's steady state), so no variant inherits
//! another's prompt-specific prefixes or drafts. This module measures; printing and files
//! are the CLI's.

use std::fmt::Write;
use std::sync::Arc;

use serde::Serialize;

use crate::engine::remote::launch::{LaunchError, LaunchOptions, LlamaServer};
use crate::engine::remote::{RemoteConfig, RemoteEngine};
use crate::engine::{Engine, EngineError, FinishReason};
use crate::eval::metrics::{self, Quality};
use crate::eval::runner::{pipeline_hit_limit, single_answer};
use crate::millis::millis;
use crate::pipeline::{Pipeline, RunError, RunReport, RunRequest, Runner};
use crate::policy::StreamMode;
use crate::trace::EventKind;
use crate::trace::chrome::ChromeTrace;

/// Prompts of the benchmark: short questions whose answers need a few paragraphs.
pub const PROMPTS: &[&str] = &[
    "Why is the sky blue?",
    "How do vaccines train the immune system?",
    "What are the trade-offs between trains and planes for a 600 km trip?",
];

/// Proposer length of the TTFT target (staircase at most 0.07x layered at 512 tokens).
pub const DEFAULT_PROPOSER_TOKENS: u32 = 512;
/// Answer length of the aggregator and the single model: long enough to measure a total
/// time, short enough that the proposers dominate the layered run as in real use.
pub const DEFAULT_ANSWER_TOKENS: u32 = 128;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub pipeline: Pipeline,
    pub prompts: Vec<String>,
    pub proposer_tokens: u32,
    pub answer_tokens: u32,
}

/// One variant on one prompt.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Measurement {
    pub ttft_ms: Option<f64>,
    pub total_ms: f64,
    /// Measured critical path of a pipeline run.
    pub critical_path_ms: Option<f64>,
    pub aggregator_prompt_tokens: u32,
    pub aggregator_cached_prompt_tokens: u32,
    /// Prompt tokens of the answer's first step, and how many the cache served: what
    /// stands between the first proposer chunk and the first answer token.
    pub first_step_prompt_tokens: u32,
    pub first_step_cached_tokens: u32,
    pub answer_chars: usize,
    /// The answer's reference-free checks (`staircase eval`'s): speed is never reported
    /// without quality.
    pub quality: Option<Quality>,
    /// Token F1 with the layered answer to the same prompt.
    pub f1_layered: Option<f64>,
}

impl Measurement {
    fn of_run(report: &RunReport, pipeline: &Pipeline) -> Self {
        let output = pipeline.output.0;
        let hit_limit = pipeline_hit_limit(pipeline, report.nodes[output].output_tokens);
        let first_step = report
            .timeline
            .events()
            .into_iter()
            .find_map(|e| match e.kind {
                EventKind::Step {
                    index: 0,
                    prompt_tokens,
                    cached_prompt_tokens,
                    ..
                } if e.lane == output => Some((prompt_tokens, cached_prompt_tokens)),
                _ => None,
            });
        Self {
            first_step_prompt_tokens: first_step.map_or(0, |s| s.0),
            first_step_cached_tokens: first_step.map_or(0, |s| s.1),
            ttft_ms: report.ttft_ms.map(millis),
            total_ms: millis(report.total_ms),
            critical_path_ms: Some(millis(report.critical_path_measured.length_ms)),
            aggregator_prompt_tokens: report.cache.aggregator_prompt_tokens,
            aggregator_cached_prompt_tokens: report.cache.aggregator_cached_prompt_tokens,
            answer_chars: report.answer.len(),
            quality: Some(Quality::of(&report.answer, hit_limit)),
            f1_layered: None,
        }
    }
}

/// The three variants on one prompt.
#[derive(Clone, Debug, Serialize)]
pub struct PromptResult {
    pub prompt: String,
    pub single: Measurement,
    pub layered: Measurement,
    pub staircase: Measurement,
}

/// Ratios over all prompts (means of per-prompt ratios), with their targets.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Target: at most 0.07 (93% lower).
    pub ttft_staircase_over_layered: f64,
    /// Target: at most 1.5.
    pub ttft_staircase_over_single: f64,
    /// Target: at most 1.05.
    pub wall_over_critical_path_layered: f64,
    pub wall_over_critical_path_staircase: f64,
    pub total_staircase_over_layered: f64,
    /// Share of the staircase aggregator's prompt tokens served by the prefix cache.
    pub aggregator_cache_hit_staircase: f64,
    pub aggregator_cache_hit_layered: f64,
}

/// Everything the benchmark measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub pipeline: String,
    pub model: String,
    pub proposer_tokens: u32,
    pub answer_tokens: u32,
    pub results: Vec<PromptResult>,
    pub summary: Summary,
    /// The first prompt's staircase run, for its timeline chart.
    #[serde(skip)]
    pub staircase_trace: Option<ChromeTrace>,
}

/// Time to first token, total time and checks of `engine` answering `prompt` alone, and
/// the answer.
async fn single(
    engine: &Arc<dyn Engine>,
    prompt: &str,
    max_tokens: u32,
) -> Result<(Measurement, String), RunError> {
    let answer = single_answer(
        engine.as_ref(),
        prompt,
        max_tokens,
        crate::engine::DrySampling::RECOMMENDED,
    )
    .await
    .map_err(|source| RunError::Engine {
        node: "single".into(),
        source,
    })?;
    let measurement = Measurement {
        ttft_ms: answer.ttft.map(millis),
        total_ms: millis(answer.total),
        answer_chars: answer.text.len(),
        quality: Some(Quality::of(
            &answer.text,
            answer.reason == FinishReason::Length,
        )),
        ..Measurement::default()
    };
    Ok((measurement, answer.text))
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Runs the benchmark. `engine` is the model the single-model variant uses (the one the
/// pipeline's nodes run on).
pub async fn run(
    runner: &Runner,
    engine: &Arc<dyn Engine>,
    options: &BenchOptions,
) -> Result<BenchReport, RunError> {
    let mut pipeline = options.pipeline.clone();
    pipeline.set_proposer_tokens(options.proposer_tokens);
    let output = pipeline.output;
    pipeline.nodes[output.0].params.max_tokens = Some(options.answer_tokens);
    runner.check(&pipeline)?;

    let mut results = Vec::new();
    let mut staircase_trace = None;
    for prompt in &options.prompts {
        tracing::info!(prompt, "bench: single model");
        engine.forget_history();
        runner.start_fresh(None).await?;
        let (mut single, single_text) = single(engine, prompt, options.answer_tokens).await?;
        tracing::info!(prompt, "bench: staircase");
        runner
            .start_fresh(Some((&pipeline, StreamMode::Staircase)))
            .await?;
        let staircase = runner
            .run(
                &pipeline,
                RunRequest::prompt(prompt.clone(), StreamMode::Staircase),
                None,
            )
            .await?;
        tracing::info!(prompt, "bench: layered");
        runner
            .start_fresh(Some((&pipeline, StreamMode::Layered)))
            .await?;
        let layered = runner
            .run(
                &pipeline,
                RunRequest::prompt(prompt.clone(), StreamMode::Layered),
                None,
            )
            .await?;
        if staircase_trace.is_none() {
            staircase_trace = Some(staircase.trace());
        }
        let layered_words = metrics::words(&layered.answer);
        let mut staircase_m = Measurement::of_run(&staircase, &pipeline);
        staircase_m.f1_layered = Some(metrics::token_f1(
            &metrics::words(&staircase.answer),
            &layered_words,
        ));
        single.f1_layered = Some(metrics::token_f1(
            &metrics::words(&single_text),
            &layered_words,
        ));
        results.push(PromptResult {
            prompt: prompt.clone(),
            single,
            layered: Measurement::of_run(&layered, &pipeline),
            staircase: staircase_m,
        });
    }

    let hit = |m: &Measurement| {
        if m.aggregator_prompt_tokens == 0 {
            0.0
        } else {
            f64::from(m.aggregator_cached_prompt_tokens) / f64::from(m.aggregator_prompt_tokens)
        }
    };
    let summary = Summary {
        ttft_staircase_over_layered: mean(
            results
                .iter()
                .filter_map(|r| ratio(r.staircase.ttft_ms, r.layered.ttft_ms)),
        ),
        ttft_staircase_over_single: mean(
            results
                .iter()
                .filter_map(|r| ratio(r.staircase.ttft_ms, r.single.ttft_ms)),
        ),
        wall_over_critical_path_layered: mean(
            results
                .iter()
                .filter_map(|r| ratio(Some(r.layered.total_ms), r.layered.critical_path_ms)),
        ),
        wall_over_critical_path_staircase: mean(
            results
                .iter()
                .filter_map(|r| ratio(Some(r.staircase.total_ms), r.staircase.critical_path_ms)),
        ),
        total_staircase_over_layered: mean(
            results
                .iter()
                .filter_map(|r| ratio(Some(r.staircase.total_ms), Some(r.layered.total_ms))),
        ),
        aggregator_cache_hit_staircase: mean(results.iter().map(|r| hit(&r.staircase))),
        aggregator_cache_hit_layered: mean(results.iter().map(|r| hit(&r.layered))),
    };
    Ok(BenchReport {
        pipeline: pipeline.name.clone(),
        model: engine.model_info().name.clone(),
        proposer_tokens: options.proposer_tokens,
        answer_tokens: options.answer_tokens,
        results,
        summary,
        staircase_trace,
    })
}

/// The remote backend of the benchmark: `llama-server` replicas of one GGUF on loopback
/// (each one thread, as the local engine has on a small machine), behind one remote engine
/// with the pipeline-aware routing. The servers stop when this is dropped.
pub struct RemoteBackend {
    pub engine: Arc<RemoteEngine>,
    _servers: Vec<LlamaServer>,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteBackendError {
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl RemoteBackend {
    /// Starts `replicas` servers on `model` and connects to them. Call from a tokio runtime.
    pub async fn start(
        model: &std::path::Path,
        replicas: usize,
    ) -> Result<Self, RemoteBackendError> {
        // Two slots of 4096 tokens: an aggregator's prompt holds every proposal.
        let launch = LaunchOptions {
            context_tokens: 8192,
            ..LaunchOptions::default()
        };
        let servers = (0..replicas.max(1))
            .map(|_| LlamaServer::start_with(model, &launch))
            .collect::<Result<Vec<_>, _>>()?;
        let mut config = RemoteConfig::new("bench", servers.iter().map(LlamaServer::url).collect());
        config.routing = crate::routing::PolicyConfig::PipelineAware;
        let name = format!("llama-server x{}", servers.len());
        let engine = Arc::new(RemoteEngine::connect(&name, config).await?);
        Ok(Self {
            engine,
            _servers: servers,
        })
    }
}

/// Picks one variant's measurement out of a prompt's results.
type Pick = fn(&PromptResult) -> &Measurement;

fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"))
}

impl BenchReport {
    /// The table printed by the CLI.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "pipeline {} on {} (proposers {} tokens, answers {} tokens)",
            self.pipeline, self.model, self.proposer_tokens, self.answer_tokens
        );
        let _ = writeln!(
            out,
            "{:<44} {:>10} {:>10} {:>10} {:>12} {:>9} {:>6} {:>6} {:>6} {:>6}",
            "prompt / variant",
            "TTFT ms",
            "total ms",
            "crit. ms",
            "agg. cached",
            "agg. hit",
            "dist-2",
            "run",
            "degen.",
            "F1 lay"
        );
        for r in &self.results {
            let _ = writeln!(out, "{}", r.prompt);
            for (name, m) in [
                ("  single model", &r.single),
                ("  layered MoA", &r.layered),
                ("  staircase MoA", &r.staircase),
            ] {
                let hit = if m.aggregator_prompt_tokens == 0 {
                    "-".to_string()
                } else {
                    format!(
                        "{:.0}%",
                        100.0 * f64::from(m.aggregator_cached_prompt_tokens)
                            / f64::from(m.aggregator_prompt_tokens)
                    )
                };
                let (distinct, run, degenerate) = m.quality.as_ref().map_or_else(
                    || ("-".to_string(), "-".to_string(), "-"),
                    |q| {
                        (
                            format!("{:.2}", q.distinct_2),
                            q.repeat_run.to_string(),
                            if q.degenerate { "yes" } else { "no" },
                        )
                    },
                );
                let _ = writeln!(
                    out,
                    "{:<44} {:>10} {:>10.0} {:>10} {:>12} {:>9} {:>6} {:>6} {:>6} {:>6}",
                    name,
                    cell(m.ttft_ms),
                    m.total_ms,
                    cell(m.critical_path_ms),
                    format!(
                        "{}/{}",
                        m.aggregator_cached_prompt_tokens, m.aggregator_prompt_tokens
                    ),
                    hit,
                    distinct,
                    run,
                    degenerate,
                    m.f1_layered
                        .map_or_else(|| "-".to_string(), |f| format!("{f:.2}"))
                );
            }
        }
        let s = &self.summary;
        let _ = writeln!(
            out,
            "\nTTFT staircase / layered   {:.3}  (target <= 0.07)",
            s.ttft_staircase_over_layered
        );
        let _ = writeln!(
            out,
            "TTFT staircase / single    {:.2}   (target <= 1.5)",
            s.ttft_staircase_over_single
        );
        let _ = writeln!(
            out,
            "wall / critical path       layered {:.3}, staircase {:.3}  (target <= 1.05)",
            s.wall_over_critical_path_layered, s.wall_over_critical_path_staircase
        );
        let _ = writeln!(
            out,
            "total staircase / layered  {:.2}",
            s.total_staircase_over_layered
        );
        let _ = writeln!(
            out,
            "aggregator prompt tokens from the prefix cache: staircase {:.0}%, layered {:.0}%",
            100.0 * s.aggregator_cache_hit_staircase,
            100.0 * s.aggregator_cache_hit_layered
        );
        let degenerate = |pick: Pick| {
            self.results
                .iter()
                .filter(|r| pick(r).quality.as_ref().is_some_and(|q| q.degenerate))
                .count()
        };
        let _ = writeln!(
            out,
            "degenerate answers: single {}, layered {}, staircase {} of {}  (target: staircase <= layered, <= 1 in 20; `staircase eval` judges them)",
            degenerate(|r| &r.single),
            degenerate(|r| &r.layered),
            degenerate(|r| &r.staircase),
            self.results.len()
        );
        out
    }

    /// Mean TTFT and total time of each variant as a bar chart.
    pub fn svg(&self) -> String {
        let variants: [(&str, Pick); 3] = [
            ("single model", |r| &r.single),
            ("layered MoA", |r| &r.layered),
            ("staircase MoA", |r| &r.staircase),
        ];
        let rows: Vec<(&str, f64, f64)> = variants
            .iter()
            .map(|(name, get)| {
                (
                    *name,
                    mean(self.results.iter().filter_map(|r| get(r).ttft_ms)),
                    mean(self.results.iter().map(|r| get(r).total_ms)),
                )
            })
            .collect();
        let max = rows.iter().map(|r| r.2.max(r.1)).fold(1.0f64, f64::max);
        let (width, left, bar_w) = (900.0, 140.0, 600.0);
        let height = 70.0 + 60.0 * rows.len() as f64;
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"#
        );
        let _ = writeln!(
            svg,
            r##"<text x="10" y="22" font-size="14" font-weight="bold">{} on {}: mean time to first token (dark) / total time (light), ms</text>"##,
            self.pipeline, self.model
        );
        for (i, (name, ttft, total)) in rows.iter().enumerate() {
            let y = 45.0 + 60.0 * i as f64;
            let _ = writeln!(
                svg,
                r##"<text x="10" y="{:.0}">{name}</text><rect x="{left}" y="{y:.0}" width="{:.1}" height="22" fill="#9ecae1"/><rect x="{left}" y="{:.0}" width="{:.1}" height="22" fill="#08519c"/><text x="{:.1}" y="{:.0}">{ttft:.0} / {total:.0}</text>"##,
                y + 26.0,
                bar_w * total / max,
                y + 22.0,
                (bar_w * ttft / max).max(1.0),
                left + bar_w * total / max + 6.0,
                y + 26.0
            );
        }
        let _ = writeln!(svg, "</svg>");
        svg
    }
}
