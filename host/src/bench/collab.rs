//! `bench collab`: one agent answering a prompt set all on the large model, all on the small
//! one, and routed between them per step by a router plugin (escalating when the small model
//! is unsure). Figures: total time, TTFT, the share of steps and tokens on each model, and
//! the routed answers' agreement with the all-large ones (token F1, beside the all-small
//! answers' as a floor). Each variant runs on engines of its own, loaded fresh, so no
//! variant is served from another's prefix cache.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use super::{BenchError, median};
use crate::engine::Engine;
use crate::engine::local::{LocalEngine, LocalEngineConfig};
use crate::eval::metrics::{token_f1, words};
use crate::millis::millis;
use crate::pipeline::{Models, Pipeline, RunRequest, Runner};
use crate::plugin::{HostConfig, PluginRuntime, Registry};
use crate::policy::StreamMode;

/// Prompts of the default set: short explanations and instructions, the kind of request a
/// small model mostly gets right.
pub const PROMPTS: &[&str] = &[
    "Describe the sea in a few sentences.",
    "Give three tips for staying focused while studying.",
    "What is photosynthesis?",
    "Write a short note inviting a friend to dinner.",
    "Explain what a computer network is.",
    "List four common fruits and their colours.",
];

/// Tokens of each answer.
pub const DEFAULT_MAX_TOKENS: u32 = 96;

/// What to compare.
#[derive(Clone, Debug)]
pub struct CollabBenchConfig {
    pub small: PathBuf,
    pub large: PathBuf,
    pub prompts: Vec<String>,
    pub max_tokens: u32,
    /// Tokens between two router calls.
    pub route_tokens: u32,
    /// The rule router's escalation threshold (`min-confidence`); `None`: its default.
    pub min_confidence: Option<f32>,
    pub threads: Option<usize>,
}

/// One variant over the prompt set.
#[derive(Clone, Debug, Serialize)]
pub struct VariantFigures {
    pub name: &'static str,
    /// All prompts, one after the other.
    pub total_ms: f64,
    pub ttft_ms_median: f64,
    pub steps_small: u32,
    pub steps_large: u32,
    pub tokens_small: u32,
    pub tokens_large: u32,
    pub answers: Vec<String>,
}

impl VariantFigures {
    /// Generated tokens per second over the whole set (answers differ in length, so this
    /// is the speed figure that does not reward a model for saying less).
    pub fn tokens_per_sec(&self) -> f64 {
        f64::from(self.tokens_small + self.tokens_large) / (self.total_ms / 1e3).max(1e-9)
    }

    /// Share of generated tokens that came from the small model.
    pub fn small_token_share(&self) -> f64 {
        let all = self.tokens_small + self.tokens_large;
        if all == 0 {
            0.0
        } else {
            f64::from(self.tokens_small) / f64::from(all)
        }
    }
}

/// The three variants and the ratios between them.
#[derive(Clone, Debug, Serialize)]
pub struct CollabReport {
    pub small: String,
    pub large: String,
    pub max_tokens: u32,
    pub route_tokens: u32,
    pub variants: Vec<VariantFigures>,
    /// All-large total time over routed total time (above 1: routing is faster).
    pub routed_speedup_vs_large: f64,
    /// All-large total time over all-small total time (the most routing can gain).
    pub small_speedup_vs_large: f64,
    /// Routed tokens per second over all-large tokens per second.
    pub routed_rate_vs_large: f64,
    /// All-small tokens per second over all-large tokens per second.
    pub small_rate_vs_large: f64,
    /// Mean token F1 of routed answers with the all-large ones.
    pub routed_agreement_with_large: f64,
    /// Mean token F1 of all-small answers with the all-large ones (the floor).
    pub small_agreement_with_large: f64,
    /// Reasons the router gave, with how often.
    pub reasons: Vec<(String, u32)>,
}

/// The pipeline of one variant: one agent, on a fixed model or routed.
fn pipeline(model: &str, config: &CollabBenchConfig) -> Result<Pipeline, BenchError> {
    let binding = match model {
        "routed" => {
            let threshold = config
                .min_confidence
                .map(|t| format!(", min-confidence = \"{t}\""))
                .unwrap_or_default();
            format!(
                "router = \"rule-router\"\nmodels = [\"small\", \"large\"]\nroute_tokens = {}\nconfig = {{ small = \"small\", large = \"large\"{threshold} }}",
                config.route_tokens
            )
        }
        fixed => format!("model = \"{fixed}\""),
    };
    let text = format!(
        "name = \"collab-{model}\"\n[[nodes]]\nid = \"answer\"\nkind = \"agent\"\nplugin = \"proposer\"\nmax_tokens = {}\n{binding}\n",
        config.max_tokens
    );
    Ok(Pipeline::parse(&text, "bench-collab")?)
}

fn load(path: &std::path::Path, threads: Option<usize>) -> Result<Arc<dyn Engine>, BenchError> {
    let mut config = LocalEngineConfig::new(path);
    config.threads = threads;
    Ok(Arc::new(LocalEngine::load(config)?))
}

/// Runs the three variants.
pub fn run(config: &CollabBenchConfig) -> Result<CollabReport, BenchError> {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let registry = Registry::new(PluginRuntime::new(HostConfig::default())?);
    registry.load_builtins()?;
    let mut variants = Vec::new();
    let mut reasons: std::collections::BTreeMap<String, u32> = Default::default();
    for name in ["large", "small", "routed"] {
        let mut models = Models::default();
        if name != "small" {
            models.insert("large".into(), load(&config.large, config.threads)?);
        }
        if name != "large" {
            models.insert("small".into(), load(&config.small, config.threads)?);
        }
        let runner = Runner::new(models, registry.clone());
        let pipeline = pipeline(name, config)?;
        // One untimed run first: plugin instantiation and the engines' first steps.
        let warm = RunRequest::prompt("Say hello.", StreamMode::Staircase);
        tokio.block_on(runner.run(&pipeline, warm, None))?;
        let mut figures = VariantFigures {
            name: match name {
                "large" => "all large",
                "small" => "all small",
                _ => "routed",
            },
            total_ms: 0.0,
            ttft_ms_median: 0.0,
            steps_small: 0,
            steps_large: 0,
            tokens_small: 0,
            tokens_large: 0,
            answers: Vec::new(),
        };
        let mut ttfts = Vec::new();
        for prompt in &config.prompts {
            let request = RunRequest::prompt(prompt.clone(), StreamMode::Staircase);
            let report = tokio.block_on(runner.run(&pipeline, request, None))?;
            figures.total_ms += millis(report.total_ms);
            ttfts.push(report.ttft_ms.map_or(0.0, millis));
            let node = &report.nodes[0];
            if node.routes.is_empty() {
                let (steps, tokens) = if name == "small" {
                    (&mut figures.steps_small, &mut figures.tokens_small)
                } else {
                    (&mut figures.steps_large, &mut figures.tokens_large)
                };
                *steps += node.steps;
                *tokens += node.output_tokens;
            }
            for route in &node.routes {
                if route.model == "small" {
                    figures.steps_small += 1;
                    figures.tokens_small += route.tokens;
                } else {
                    figures.steps_large += 1;
                    figures.tokens_large += route.tokens;
                }
                // Numbers make every reason unique; count them by their words.
                let kind: String = route
                    .reason
                    .split(|c: char| c.is_ascii_digit())
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                *reasons.entry(kind).or_default() += 1;
            }
            figures.answers.push(report.answer);
        }
        figures.ttft_ms_median = median(&mut ttfts);
        variants.push(figures);
    }
    let agreement = |a: &VariantFigures, b: &VariantFigures| {
        let scores: Vec<f64> = a
            .answers
            .iter()
            .zip(&b.answers)
            .map(|(x, y)| token_f1(&words(x), &words(y)))
            .collect();
        scores.iter().sum::<f64>() / scores.len().max(1) as f64
    };
    let (large, small, routed) = (&variants[0], &variants[1], &variants[2]);
    Ok(CollabReport {
        small: config.small.display().to_string(),
        large: config.large.display().to_string(),
        max_tokens: config.max_tokens,
        route_tokens: config.route_tokens,
        routed_speedup_vs_large: large.total_ms / routed.total_ms.max(1e-9),
        small_speedup_vs_large: large.total_ms / small.total_ms.max(1e-9),
        routed_rate_vs_large: routed.tokens_per_sec() / large.tokens_per_sec().max(1e-9),
        small_rate_vs_large: small.tokens_per_sec() / large.tokens_per_sec().max(1e-9),
        routed_agreement_with_large: agreement(routed, large),
        small_agreement_with_large: agreement(small, large),
        reasons: reasons.into_iter().collect(),
        variants,
    })
}
