//! `staircase tune PIPELINE --latency-budget MS`: searches the pipeline's variants on the
//! critical-path model, checks the shortlist with real runs and `eval`, prints the Pareto
//! front, writes `tune.json`, `tune.svg` and the chosen variant as a pipeline file.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::engine::Engine;
use crate::engine::simulated::{SimulatedEngine, SimulatedLatencies};
use crate::tune::{self, EvalSample, TuneOptions, TuneReport, TuneTable};

/// Arguments of `staircase tune` (and `staircase bench tune`).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The pipeline to tune (file or built-in name).
    #[arg(default_value = crate::pipeline::DEFAULT_PIPELINE)]
    pipeline: String,
    /// The critical path the answer should fit in: ms, or a share of the hand-written
    /// pipeline's as measured in the run, like `70%` (default: the file's `[tune]` table).
    #[arg(long, value_name = "MS|P%")]
    latency_budget: Option<tune::Budget>,
    /// Models to place on nodes (names of the models table); repeatable. Default: the
    /// `[tune]` table's, else the file's.
    #[arg(long = "models", value_name = "NAME")]
    models: Vec<String>,
    /// Chunk schedules to try besides the file's (comma separated); repeatable.
    #[arg(long = "schedule", value_name = "SIZES")]
    schedules: Vec<String>,
    /// Shares of the proposers' and refiners' token caps to try besides the file's, comma
    /// separated (default: the `[tune]` table's, else 1,0.5,0.25).
    #[arg(long, value_name = "SHARES", value_delimiter = ',')]
    proposer_lengths: Vec<f64>,
    /// Variants the beam keeps per round.
    #[arg(long)]
    beam_width: Option<usize>,
    /// Variants run for real and scored.
    #[arg(long)]
    shortlist: Option<usize>,
    /// A JSONL prompt set for the quality sample (default: the shipped eval set).
    #[arg(long, value_name = "FILE.jsonl")]
    prompts: Option<PathBuf>,
    /// Prompts of the quality sample (`eval`).
    #[arg(long, default_value_t = 3)]
    eval_prompts: usize,
    /// Prompts after the quality sample on which the chosen variant and the hand-written
    /// pipeline are scored again (the choice never saw them); 0: none.
    #[arg(long, default_value_t = 0)]
    holdout_prompts: usize,
    /// Prompts each shortlisted variant runs on for its measured critical path.
    #[arg(long, default_value_t = 1)]
    check_prompts: usize,
    /// Output tokens of every answer in the quality sample.
    #[arg(long, default_value_t = 128)]
    answer_tokens: u32,
    /// Output tokens of every proposer and refiner (default: the file's).
    #[arg(long)]
    proposer_tokens: Option<u32>,
    /// Skip the pairwise judge (quality: the share of answers not degenerate).
    #[arg(long)]
    no_judge: bool,
    /// Skip `eval` altogether (quality: the search's prior).
    #[arg(long)]
    no_eval: bool,
    /// Name of the written pipeline (default: PIPELINE-tuned).
    #[arg(long)]
    name: Option<String>,
    /// Where to write `tune.json`, `tune.svg` and NAME.toml.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Run on the simulated parallel backend (filler text; latency model only).
    #[arg(long)]
    simulated: bool,
    /// A GGUF model file to run instead of the default model.
    #[arg(long, value_name = "PATH.gguf")]
    model: Option<PathBuf>,
    /// Also load the plugins in this folder; repeatable.
    #[arg(long = "plugins", value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    /// A `staircase.toml` (the models table).
    #[arg(long, value_name = "staircase.toml")]
    config: Option<PathBuf>,
}

/// Runs the tuning and writes its files; returns the report.
pub(crate) fn execute(args: &Args) -> anyhow::Result<TuneReport> {
    let app = super::run::open_app(
        args.config.as_deref(),
        args.model.as_deref(),
        &args.plugin_dirs,
    )?
    .build()?;
    let base = super::run::pipeline_of(&app, &args.pipeline, None)?;
    let table = TuneTable::of(&base)?;
    let budget = args
        .latency_budget
        .or(table
            .latency_budget_ms
            .map(|ms| tune::Budget::Fixed(Duration::from_millis(ms))))
        .context(
            "give --latency-budget MS or P% (or latency_budget_ms in the file's [tune] table)",
        )?;
    let mut schedules = Vec::new();
    for sizes in table.schedules.clone().unwrap_or_default() {
        schedules.push(crate::pipeline::stream::ChunkSchedule::new(sizes)?);
    }
    for sizes in &args.schedules {
        schedules.push(super::eval::schedule(sizes)?);
    }
    if schedules.is_empty() {
        for sizes in tune::space::DEFAULT_SCHEDULES {
            schedules.push(crate::pipeline::stream::ChunkSchedule::new(sizes.to_vec())?);
        }
    }
    let mut prompts = match &args.prompts {
        Some(path) => crate::eval::prompts::load(path)?,
        None => crate::eval::prompts::shipped(),
    };
    let eval_prompts = args.eval_prompts.max(1);
    prompts.truncate((eval_prompts + args.holdout_prompts).max(args.check_prompts));
    if args.holdout_prompts > 0 && prompts.len() < eval_prompts + args.holdout_prompts {
        anyhow::bail!(
            "the prompt set has {} prompts; --eval-prompts {eval_prompts} and --holdout-prompts {} need {}",
            prompts.len(),
            args.holdout_prompts,
            eval_prompts + args.holdout_prompts
        );
    }
    let sample = |prompts: &[String]| EvalSample {
        prompts: prompts.to_vec(),
        answer_tokens: args.answer_tokens,
        judge: !args.no_judge,
    };
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-tuned", base.name));
    let options = TuneOptions {
        budget,
        models: if args.models.is_empty() {
            table.models.clone().unwrap_or_default()
        } else {
            args.models.clone()
        },
        schedules,
        lengths: if args.proposer_lengths.is_empty() {
            table
                .proposer_lengths
                .clone()
                .unwrap_or_else(|| tune::space::DEFAULT_LENGTHS.to_vec())
        } else {
            args.proposer_lengths.clone()
        },
        prior: tune::search::Prior {
            model_quality: table.model_quality.clone(),
        },
        width: args.beam_width.or(table.beam_width).unwrap_or(8),
        shortlist: args
            .shortlist
            .or(table.shortlist)
            .unwrap_or(tune::DEFAULT_SHORTLIST),
        check_prompts: prompts
            .iter()
            .take(args.check_prompts.max(1))
            .cloned()
            .collect(),
        eval: (!args.no_eval).then(|| sample(&prompts[..eval_prompts.min(prompts.len())])),
        holdout: (!args.no_eval && args.holdout_prompts > 0)
            .then(|| sample(&prompts[eval_prompts..eval_prompts + args.holdout_prompts])),
        name: name.clone(),
        proposer_tokens: args.proposer_tokens,
        answer_tokens: Some(args.answer_tokens),
    };
    let runtime = super::runtime()?;
    // The simulated backend runs with the configuration's limits, as the models do.
    let (launcher, engine) = if args.simulated {
        let latencies = SimulatedLatencies {
            decode_per_token: Duration::from_millis(20),
            prefill_per_token: Duration::from_micros(200),
        };
        let engine: Arc<dyn Engine> =
            Arc::new(SimulatedEngine::new(latencies, runtime.handle().clone()));
        (app.launcher_on(engine.clone()), engine)
    } else {
        (app.launcher().clone(), app.default_engine())
    };
    launcher.runner().check(&base)?;
    let report = runtime.block_on(tune::tune(&launcher, &engine, &base, &options))?;
    super::eval::write_json_and_svg(&args.out, "tune", &report, &report.svg())?;
    if !report.file.is_empty() {
        let path = args.out.join(format!("{name}.toml"));
        std::fs::write(&path, &report.file)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!(
            "wrote {} (run it: staircase run --pipeline {})",
            path.display(),
            path.display()
        );
    }
    Ok(report)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let report = execute(&args)?;
    print!("{}", report.table());
    Ok(())
}

/// `staircase bench tune`: the hand-written pipeline against the tuned variant, one run.
pub fn bench(args: Args) -> anyhow::Result<()> {
    let report = execute(&args)?;
    print!("{}", report.table());
    let hand = report.checked.iter().find(|c| c.hand_written);
    let tuned = report.checked.iter().find(|c| c.name == report.chosen);
    let (Some(hand), Some(tuned)) = (hand, tuned) else {
        anyhow::bail!("the tuning run has no hand-written or chosen variant to compare");
    };
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    println!("\ntuned / hand-written ({} vs {}):", tuned.name, hand.name);
    println!(
        "  critical path (measured) {:.2}, TTFT {}, total {:.2}, quality {} (hand-written {})",
        ratio(
            tuned.measured_critical_path_ms,
            hand.measured_critical_path_ms
        ),
        match (tuned.ttft_ms, hand.ttft_ms) {
            (Some(t), Some(h)) => format!("{:.2}", ratio(t, h)),
            _ => "-".into(),
        },
        ratio(tuned.total_ms, hand.total_ms),
        tuned.quality.map_or("-".into(), |q| format!("{q:.2}")),
        hand.quality.map_or("-".into(), |q| format!("{q:.2}")),
    );
    // The hand-written pipeline is eval's baseline here: every figure is tuned against it.
    if let (Some(t), Some(h)) = (&tuned.eval, &hand.eval) {
        print!("{}", tune::report::versus(t, h));
    }
    if let Some(check) = &report.judge_check {
        print!("{}", tune::report::judge_check_line(check));
    }
    if let Some((low, high)) = report.prediction_range() {
        println!(
            "  predicted / measured critical path of the tuned variants: {low:.2}-{high:.2} (tolerance {:.2}-{:.2})",
            1.0 / tune::PREDICTION_TOLERANCE,
            tune::PREDICTION_TOLERANCE
        );
    }
    Ok(())
}
