//! `staircase trace`.

use std::path::PathBuf;

use anyhow::Context;

use crate::trace::{chrome::ChromeTrace, svg};

/// Subcommands of `staircase trace`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Draw a run trace (from `staircase run --trace FILE.json`) as a staircase SVG chart.
    Render {
        /// The Chrome trace JSON file.
        file: PathBuf,
        /// Where to write the SVG (default: the trace's name with `.svg`).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Render { file, output } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let trace =
                ChromeTrace::from_json(&text).with_context(|| file.display().to_string())?;
            let chart = svg::render(&trace).with_context(|| file.display().to_string())?;
            let output = output.unwrap_or_else(|| file.with_extension("svg"));
            std::fs::write(&output, chart)
                .with_context(|| format!("cannot write {}", output.display()))?;
            eprintln!("wrote {}", output.display());
            Ok(())
        }
    }
}
