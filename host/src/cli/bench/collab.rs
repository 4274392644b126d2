//! `staircase bench collab`: all-large vs all-small vs routed dual-model answers.

use std::path::PathBuf;

use anyhow::Context;

use crate::bench::collab::{self as bench, CollabBenchConfig};
use crate::engine::local::default_threads;
use crate::engine::local::quantize::{Quantization, quantized_copy};

/// Arguments of `staircase bench collab`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The small model; default: the default model's Q4_0 copy (made if missing).
    #[arg(long, value_name = "PATH.gguf")]
    small: Option<PathBuf>,
    /// The large model; default: the default model (Q4_1).
    #[arg(long, value_name = "PATH.gguf")]
    large: Option<PathBuf>,
    /// The large model is the default model's Q8_0 copy instead (made if missing).
    #[arg(long, conflicts_with = "large")]
    large_q8: bool,
    /// Where the quantized copies go; default: the models directory.
    #[arg(long)]
    models_dir: Option<PathBuf>,
    /// How many of the built-in prompts to run.
    #[arg(long, default_value_t = bench::PROMPTS.len())]
    prompts: usize,
    #[arg(long, default_value_t = bench::DEFAULT_MAX_TOKENS)]
    max_tokens: u32,
    /// Tokens between two router calls.
    #[arg(long, default_value_t = crate::pipeline::spec::DEFAULT_ROUTE_TOKENS)]
    route_tokens: u32,
    /// The rule router's escalation threshold (mean top-token probability).
    #[arg(long)]
    min_confidence: Option<f32>,
    #[arg(long)]
    threads: Option<usize>,
    /// Write the report as JSON to this file too.
    #[arg(long = "json-out", value_name = "FILE")]
    json: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let default = crate::model::default_model_path()?;
    let dir = match args.models_dir {
        Some(dir) => dir,
        None => crate::model::models_dir()?,
    };
    let threads = args.threads.unwrap_or_else(default_threads);
    let copy = |to| {
        quantized_copy(&default, &dir, to, threads)
            .with_context(|| format!("making the {to:?} copy of {}", default.display()))
    };
    let small = match args.small {
        Some(path) => path,
        None => copy(Quantization::Q4_0)?,
    };
    let large = match (args.large, args.large_q8) {
        (Some(path), _) => path,
        (None, true) => copy(Quantization::Q8_0)?,
        (None, false) => default,
    };
    let config = CollabBenchConfig {
        small,
        large,
        prompts: bench::PROMPTS
            .iter()
            .take(args.prompts)
            .map(|p| p.to_string())
            .collect(),
        max_tokens: args.max_tokens,
        route_tokens: args.route_tokens,
        min_confidence: args.min_confidence,
        threads: args.threads,
    };
    let report = bench::run(&config).context("collab benchmark")?;
    println!(
        "small {}\nlarge {}\n{} prompts, {} tokens each, router asked every {} tokens",
        report.small,
        report.large,
        config.prompts.len(),
        report.max_tokens,
        report.route_tokens
    );
    println!(
        "{:<10} {:>10} {:>10} {:>8} {:>12} {:>12} {:>13}",
        "variant", "total ms", "TTFT p50", "tok/s", "steps s/l", "tokens s/l", "small tokens"
    );
    for v in &report.variants {
        println!(
            "{:<10} {:>10.0} {:>10.1} {:>8.1} {:>12} {:>12} {:>12.0}%",
            v.name,
            v.total_ms,
            v.ttft_ms_median,
            v.tokens_per_sec(),
            format!("{}/{}", v.steps_small, v.steps_large),
            format!("{}/{}", v.tokens_small, v.tokens_large),
            100.0 * v.small_token_share()
        );
    }
    println!(
        "total time, all large / this: routed {:.2}x, all small {:.2}x\ntokens per second, this / all large: routed {:.2}x, all small {:.2}x\nagreement with all large (token F1): routed {:.2}, all small {:.2}",
        report.routed_speedup_vs_large,
        report.small_speedup_vs_large,
        report.routed_rate_vs_large,
        report.small_rate_vs_large,
        report.routed_agreement_with_large,
        report.small_agreement_with_large
    );
    for (reason, count) in &report.reasons {
        println!("  router: {count:>4} x {reason}");
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
