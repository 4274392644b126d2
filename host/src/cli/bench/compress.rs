//! `staircase bench compress`: TTFT per turn of a long session with no compression, inline
//! compression and background compression.

use std::path::PathBuf;

use anyhow::Context;

use crate::bench::compress::{self as bench, CompressBenchConfig};

/// Arguments of `staircase bench compress`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A GGUF model file instead of the default model.
    #[arg(long, value_name = "PATH.gguf")]
    model: Option<PathBuf>,
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value_t = 20)]
    turns: usize,
    /// Tokens of each answer.
    #[arg(long, default_value_t = 24)]
    answer_tokens: u32,
    /// The history budget, in tokens.
    #[arg(long, default_value_t = 160)]
    budget_tokens: u32,
    /// The compressor plugin.
    #[arg(long, default_value = "truncate-compressor")]
    compressor: String,
    /// Write the report as JSON to this file too.
    #[arg(long = "json-out", value_name = "FILE")]
    json: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = match args.model {
        Some(path) => path,
        None => crate::model::default_model_path()?,
    };
    let mut config = CompressBenchConfig::new(model);
    config.threads = args.threads;
    config.turns = args.turns;
    config.answer_tokens = args.answer_tokens;
    config.budget_tokens = args.budget_tokens;
    config.compressor = args.compressor;
    let report = bench::run(&config).context("compress benchmark")?;
    println!(
        "{} turns, history budget {} tokens, compressor {}",
        report.turns, report.budget_tokens, report.compressor
    );
    print!("{:>5}", "turn");
    for v in &report.variants {
        print!(
            " {:>16} {:>7} {:>7} {:>5}",
            format!("{} TTFT ms", v.name),
            "tokens",
            "cached",
            "F1"
        );
    }
    println!();
    for turn in 0..report.turns {
        print!("{:>5}", turn + 1);
        for v in &report.variants {
            let t = &v.turns[turn];
            print!(
                " {:>16.1} {:>7} {:>7} {:>5.2}",
                t.ttft_ms, t.history_tokens, t.cached_prompt_tokens, t.f1_with_none
            );
        }
        println!();
    }
    println!(
        "mean TTFT over budget, / none: inline {:.2}x, background {:.2}x ({} background turns used a compression)",
        report.inline_vs_none, report.background_vs_none, report.background_turns_compressed
    );
    if let Some(background) = report.variants.iter().find(|v| v.name == "background") {
        let idle: Vec<f64> = background.turns.iter().map(|t| t.idle_ms).collect();
        println!(
            "background work after a turn (client idle time it used): mean {:.1} ms, max {:.1} ms",
            idle.iter().sum::<f64>() / idle.len().max(1) as f64,
            idle.iter().copied().fold(0.0, f64::max)
        );
    }
    for v in &report.variants {
        println!(
            "{:>10}: mean TTFT over budget {:.1} ms, token F1 with none {:.2}, distinct-2 {:.2}",
            v.name, v.mean_ttft_over_budget_ms, v.mean_f1_with_none, v.mean_distinct_2
        );
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
