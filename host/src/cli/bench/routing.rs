//! `staircase bench routing`: the routing policies on a multi-agent trace against
//! `llama-server` replicas this command starts (see `bench::routing`).

use std::path::PathBuf;

use anyhow::Context;

use crate::bench::routing::{self as bench, RoutingBenchConfig};

/// Arguments of `staircase bench routing`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Replicas started for each policy (one llama.cpp thread each).
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Runs of each kind in the trace (MoA, debate, chat session).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Runs in flight at once.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 12)]
    max_tokens: u32,
    /// A GGUF model file instead of the default model.
    #[arg(long, value_name = "PATH.gguf")]
    model: Option<PathBuf>,
    /// Also save the figures as JSON here.
    #[arg(long = "json-out", value_name = "FILE")]
    json: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = match args.model {
        Some(path) => path,
        None => crate::model::pull_default_blocking(true)?,
    };
    let mut config = RoutingBenchConfig::new(model);
    config.replicas = args.replicas;
    config.runs = args.runs;
    config.concurrency = args.concurrency;
    config.max_tokens = args.max_tokens;
    let runtime = tokio::runtime::Runtime::new()?;
    let figures = runtime
        .block_on(bench::run(&config))
        .context("routing benchmark")?;
    println!(
        "{:<16} {:>8} {:>9} {:>9} {:>10} {:>10} {:>10}  spread",
        "policy", "requests", "prompt", "hit rate", "TTFT p50", "TTFT p99", "total s"
    );
    for f in &figures {
        println!(
            "{:<16} {:>8} {:>9} {:>8.1}% {:>8.0}ms {:>8.0}ms {:>10.1}  {:?}",
            f.policy,
            f.requests,
            f.prompt_tokens,
            f.hit_rate * 100.0,
            f.ttft_p50_ms,
            f.ttft_p99_ms,
            f.total_ms / 1e3,
            f.spread
        );
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&figures)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
