//! `staircase bench staircase`: single model vs layered vs staircase Mixture-of-Agents.

use std::path::PathBuf;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::bench::staircase::{self as bench, BenchOptions, RemoteBackend};
use crate::engine::Engine;
use crate::engine::simulated::{SimulatedEngine, SimulatedLatencies};

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
    /// A `staircase.toml` (models, plugins, the `[limits]` and `[sandbox]` bounds every run
    /// keeps, on every backend); the flags above override it.
    #[arg(long, value_name = "staircase.toml")]
    config: Option<PathBuf>,
    /// Where the nodes run; give both (`--backend local --backend remote`) for the two
    /// tables and their ratios side by side from one run.
    #[arg(long, value_enum, default_values_t = [Backend::Local])]
    backend: Vec<Backend>,
    /// `llama-server` replicas of `--backend remote`.
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Flash attention off in the local engine (the A/B behind its default).
    #[arg(long)]
    no_flash_attention: bool,
    /// Run every node on a simulated backend that serves requests in parallel (a latency
    /// model of a GPU server, filler text) instead of the local engine: the runtime measured
    /// apart from the one CPU all local nodes share.
    #[arg(long)]
    simulated: bool,
    /// Simulated time of one forward pass (each generated token), in ms.
    #[arg(long, default_value_t = 20.0)]
    simulated_decode_ms: f64,
    /// Simulated prefill time per uncached prompt token, on top of the first pass, in ms.
    #[arg(long, default_value_t = 0.2)]
    simulated_prefill_ms: f64,
}

/// Where the benchmark's nodes run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The embedded engine on the model file.
    Local,
    /// `llama-server` replicas of the same model file on loopback (`--replicas`), started
    /// here, behind the remote engine.
    Remote,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let flash_attention = !args.no_flash_attention;
    let app = super::super::run::open_app(
        args.config.as_deref(),
        args.model.as_deref(),
        &args.plugin_dirs,
    )?
    .local_engine(move |config| config.flash_attention = flash_attention)
    .build()?;
    let pipeline = super::super::run::pipeline_of(&app, &args.pipeline, None)?;
    let runtime = super::super::runtime()?;
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
    if args.simulated {
        let latencies = SimulatedLatencies {
            decode_per_token: Duration::from_secs_f64(args.simulated_decode_ms.max(0.0) / 1e3),
            prefill_per_token: Duration::from_secs_f64(args.simulated_prefill_ms.max(0.0) / 1e3),
        };
        let engine: Arc<dyn Engine> =
            Arc::new(SimulatedEngine::new(latencies, runtime.handle().clone()));
        let launcher = app.launcher_on(engine.clone());
        let report = runtime.block_on(bench::run(launcher.runner(), &engine, &options))?;
        return write(&args, "bench-staircase", &report);
    }
    let mut summaries = Vec::new();
    for backend in &args.backend {
        let report = match backend {
            Backend::Local => {
                let report =
                    runtime.block_on(bench::run(app.runner(), &app.default_engine(), &options))?;
                write(&args, "bench-staircase", &report)?;
                report
            }
            Backend::Remote => {
                let model = match &args.model {
                    Some(path) => path.clone(),
                    None => crate::model::default_model_path()?,
                };
                let report = runtime.block_on(async {
                    let remote = RemoteBackend::start(&model, args.replicas)
                        .await
                        .context("starting the llama-server replicas")?;
                    let engine: Arc<dyn Engine> = remote.engine.clone();
                    let launcher = app.launcher_on(engine.clone());
                    let report = bench::run(launcher.runner(), &engine, &options).await?;
                    anyhow::Ok(report)
                })?;
                write(&args, "bench-staircase-remote", &report)?;
                report
            }
        };
        summaries.push((*backend, report.summary));
    }
    if summaries.len() > 1 {
        println!(
            "\n{:<8} {:>16} {:>16} {:>16} {:>12}",
            "backend", "TTFT stair/lay", "TTFT stair/one", "total stair/lay", "agg. hit"
        );
        for (backend, s) in &summaries {
            println!(
                "{:<8} {:>16.3} {:>16.2} {:>16.2} {:>11.0}%",
                format!("{backend:?}").to_lowercase(),
                s.ttft_staircase_over_layered,
                s.ttft_staircase_over_single,
                s.total_staircase_over_layered,
                100.0 * s.aggregator_cache_hit_staircase
            );
        }
    }
    Ok(())
}

/// Prints the table and writes `NAME.json`, `NAME.svg` and the first staircase run's timeline.
fn write(args: &Args, name: &str, report: &bench::BenchReport) -> anyhow::Result<()> {
    print!("{}", report.table());
    super::super::eval::write_json_and_svg(&args.out, name, report, &report.svg())?;
    if let Some(trace) = &report.staircase_trace {
        let trace_json = args.out.join(format!("{name}-timeline.json"));
        let trace_svg = args.out.join(format!("{name}-timeline.svg"));
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
