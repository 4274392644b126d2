//! `staircase bench staircase`: single model vs layered vs staircase Mixture-of-Agents.

use std::path::PathBuf;

use anyhow::Context;

use crate::pipeline::bench::{self, BenchOptions};

/// Arguments of `staircase bench staircase`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The pipeline to compare (file or built-in name).
    #[arg(long, default_value = crate::pipeline::DEFAULT_PIPELINE)]
    pipeline: String,
    /// Output tokens of every proposer.
    #[arg(long, default_value_t = bench::DEFAULT_PROPOSER_TOKENS)]
    proposer_tokens: u32,
    /// Output tokens of the answer (aggregator and single model).
    #[arg(long, default_value_t = bench::DEFAULT_ANSWER_TOKENS)]
    answer_tokens: u32,
    /// How many of the built-in prompts to run.
    #[arg(long, default_value_t = bench::PROMPTS.len())]
    prompts: usize,
    /// Where to write `bench-staircase.json` and `bench-staircase.svg`.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// A GGUF model file to run instead of the default model.
    #[arg(long, value_name = "PATH.gguf")]
    model: Option<PathBuf>,
    /// Also load the plugins in this folder; repeatable.
    #[arg(long = "plugins", value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let pipeline = super::super::run::load_pipeline(&args.pipeline, None)?;
    let (runner, engine) =
        super::super::run::open_runner(args.model.as_deref(), &args.plugin_dirs)?;
    let options = BenchOptions {
        pipeline,
        prompts: bench::PROMPTS
            .iter()
            .take(args.prompts.max(1))
            .map(|p| p.to_string())
            .collect(),
        proposer_tokens: args.proposer_tokens,
        answer_tokens: args.answer_tokens,
    };
    let report = super::super::runtime()?.block_on(bench::run(&runner, &engine, &options))?;
    print!("{}", report.table());
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let json = args.out.join("bench-staircase.json");
    let svg = args.out.join("bench-staircase.svg");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", json.display()))?;
    std::fs::write(&svg, report.svg())
        .with_context(|| format!("cannot write {}", svg.display()))?;
    println!("wrote {} and {}", json.display(), svg.display());
    if let Some(trace) = &report.staircase_trace {
        let trace_json = args.out.join("bench-staircase-timeline.json");
        let trace_svg = args.out.join("bench-staircase-timeline.svg");
        std::fs::write(&trace_json, trace.to_json())
            .with_context(|| format!("cannot write {}", trace_json.display()))?;
        std::fs::write(&trace_svg, crate::trace::svg::render(trace)?)
            .with_context(|| format!("cannot write {}", trace_svg.display()))?;
        println!(
            "wrote the first staircase run's timeline: {} and {}",
            trace_json.display(),
            trace_svg.display()
        );
    }
    Ok(())
}
