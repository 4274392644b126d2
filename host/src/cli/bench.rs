//! `staircase bench`.

use std::path::PathBuf;

use anyhow::Context;

/// Subcommands of `staircase bench`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// What the plugin host costs: per-chunk calls, instantiation, cached loading, hot reload.
    Plugins {
        /// Also save the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also measure compile vs cached load of these components (`NAME.wasm` with its
        /// manifest `NAME.toml` beside it), e.g. the Python and JavaScript examples.
        #[arg(long = "component", value_name = "FILE.wasm")]
        components: Vec<PathBuf>,
    },
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Plugins { json, components } => plugins(json, components),
    }
}

fn plugins(json: Option<PathBuf>, components: Vec<PathBuf>) -> anyhow::Result<()> {
    let rows = crate::plugin::bench::run_with(&components).context("plugin benchmark")?;
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
