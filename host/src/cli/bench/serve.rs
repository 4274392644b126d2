//! `staircase bench serve`: the HTTP server against in-process runs of the same app.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::bench::serve::{self as bench, ServeBenchOptions};

/// Arguments of `staircase bench serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Pipelines or models to serve, by name.
    #[arg(long, num_args = 1.., default_values_t = ["moa".to_string(), "default".to_string()])]
    targets: Vec<String>,
    /// Concurrent streaming clients, one variant each.
    #[arg(long, num_args = 1.., default_values_t = [1, 4, 16])]
    clients: Vec<usize>,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 4)]
    requests: usize,
    /// Output tokens of every node.
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// A GGUF model file to run instead of the default model.
    #[arg(long, value_name = "PATH.gguf")]
    model: Option<PathBuf>,
    /// A `staircase.toml` to serve with (its pipeline folders, models, limits and guards).
    #[arg(long, value_name = "staircase.toml")]
    config: Option<PathBuf>,
    /// Write the report as JSON to this file too.
    #[arg(long = "json-out", value_name = "FILE")]
    json: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let app = Arc::new(
        super::super::run::open_app(args.config.as_deref(), args.model.as_deref(), &[])?.build()?,
    );
    let options = ServeBenchOptions {
        targets: args.targets,
        clients: args.clients,
        requests_per_client: args.requests.max(1),
        max_tokens: args.max_tokens,
    };
    let report = super::super::runtime()?.block_on(bench::run(app, &options))?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
