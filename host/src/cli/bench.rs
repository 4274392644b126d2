//! `staircase bench`.

mod staircase;

use std::path::PathBuf;

use anyhow::Context;

use crate::engine::local::bench::{BenchConfig, compare_quantizations, run as run_engine_bench};

/// Subcommands of `staircase bench`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// The local engine against a bare llama.cpp loop, batching, and warm-prefix TTFT.
    Engine(EngineArgs),
    /// Single model vs layered vs staircase Mixture-of-Agents: TTFT, total time, cache use.
    Staircase(staircase::Args),
    /// What the plugin host costs: per-chunk calls, instantiation, cached loading, hot reload.
    Plugins {
        /// Also save the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// Arguments of `staircase bench engine`.
#[derive(Debug, clap::Args)]
pub struct EngineArgs {
    /// A GGUF file instead of the default model.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    threads: Option<usize>,
    /// Runs per comparison; the best counts.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Instead: compare these GGUF files of one model (the first is the reference) for speed
    /// and greedy agreement, e.g. the default model and its `model quantize` variants.
    #[arg(long, num_args = 1..)]
    compare: Vec<PathBuf>,
    /// Write the report as JSON to this file too.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Engine(args) => engine(args),
        Command::Staircase(args) => staircase::run(args),
        Command::Plugins { json } => plugins(json),
    }
}

fn plugins(json: Option<PathBuf>) -> anyhow::Result<()> {
    let rows = crate::plugin::bench::run().context("plugin benchmark")?;
    println!("{:<48} {:>12}  note", "measure", "value");
    for row in &rows {
        println!(
            "{:<48} {:>9.2} {:<2}  {}",
            row.name, row.value, row.unit, row.note
        );
    }
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn engine(args: EngineArgs) -> anyhow::Result<()> {
    if !args.compare.is_empty() {
        return compare(&args);
    }
    let model = match args.model {
        Some(path) => path,
        None => crate::model::default_model_path()?,
    };
    let mut config = BenchConfig::new(model);
    config.threads = args.threads;
    config.repeats = args.repeats;
    let report = run_engine_bench(&config).context("engine benchmark")?;
    println!(
        "engine benchmark: {} on {} threads",
        report.model, report.threads
    );
    println!(
        "{:<22} {:>12} {:>12} {:>8}",
        "", "bare tok/s", "ours tok/s", "ratio"
    );
    for (name, c) in [("prefill", &report.prefill), ("decode", &report.decode)] {
        println!(
            "{:<22} {:>12.1} {:>12.1} {:>8.3}",
            format!("{name} ({} tok)", c.tokens),
            c.bare_tok_s,
            c.engine_tok_s,
            c.ratio
        );
    }
    println!(
        "{:<22} {:>12} {:>12} {:>8}",
        "batch", "tokens", "tok/s", "vs 1"
    );
    for b in &report.batches {
        println!(
            "{:<22} {:>12} {:>12.1} {:>8.2}",
            b.batch, b.generated_tokens, b.aggregate_tok_s, b.speedup
        );
    }
    let t = &report.ttft;
    println!(
        "TTFT, {}-token prompt, {} cached: cold {:.1} ms, warm {:.1} ms, {:.1}x faster",
        t.prompt_tokens, t.cached_prompt_tokens, t.cold_ms, t.warm_ms, t.speedup
    );
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn compare(args: &EngineArgs) -> anyhow::Result<()> {
    let points = compare_quantizations(&args.compare, args.threads, args.repeats)?;
    println!(
        "{:<36} {:>10} {:>10} {:>14} {:>10}",
        "model", "prefill/s", "decode/s", "8-tok verify", "same answers"
    );
    for p in &points {
        println!(
            "{:<36} {:>10.1} {:>10.1} {:>11.2} st {:>7}/{} {:?}",
            p.model,
            p.prefill_tok_s,
            p.decode_tok_s,
            p.verify8_in_steps,
            p.identical_answers,
            p.prompts,
            p.divergence
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&points)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
