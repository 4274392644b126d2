//! `staircase eval`: scores variants (the single model, the layered baseline, staircase
//! runs by chunk schedule, other pipelines) on a prompt set; prints a table and writes
//! `eval.json` and `eval.svg` (quality vs time to first token).

use std::path::PathBuf;

use anyhow::Context;

use crate::eval::{self, EvalOptions, Variant};
use crate::pipeline::stream::ChunkSchedule;
use crate::policy::StreamMode;

/// Arguments of `staircase eval`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A JSONL prompt set (`{"instruction": ...}` a line; AlpacaEval, MT-Bench and
    /// Arena-Hard files work). Default: the shipped set, examples/eval/prompts.jsonl.
    #[arg(long, value_name = "FILE.jsonl")]
    prompts: Option<PathBuf>,
    /// Only the first N prompts.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// The pipeline whose run is the baseline (file or built-in name).
    #[arg(long, default_value = crate::pipeline::DEFAULT_PIPELINE)]
    pipeline: String,
    /// How the baseline runs: `layered` (the classic MoA), or `staircase` to compare
    /// variants with the pipeline as it runs by default (as `tune` does).
    #[arg(long, default_value = "layered", value_name = "MODE")]
    baseline_mode: StreamMode,
    /// A variant to evaluate besides the baseline and the single model: `PIPELINE:MODE`
    /// or `PIPELINE:staircase:SIZES` (e.g. `moa:staircase:16,32,64`); repeatable.
    /// Default: the pipeline in staircase mode with its own chunk schedule.
    #[arg(long = "variant", value_name = "SPEC")]
    variants: Vec<String>,
    /// Also evaluate the pipeline in staircase mode with these chunk sizes (comma
    /// separated, the last repeats); repeatable, for the quality/TTFT trade-off curve.
    #[arg(long = "schedule", value_name = "SIZES")]
    schedules: Vec<String>,
    /// Output tokens of every answer (the pipeline's output node and the single model).
    #[arg(long, default_value_t = 256)]
    answer_tokens: u32,
    /// Output tokens of every proposer (default: each file's own).
    #[arg(long)]
    proposer_tokens: Option<u32>,
    /// DRY strength on every node and the single model (0: off, to measure what DRY does);
    /// default: each node's own (0.8 unless its file says otherwise).
    #[arg(long, value_name = "X")]
    dry_multiplier: Option<f32>,
    /// Skip the pairwise judge (reference-free checks and agreement only).
    #[arg(long)]
    no_judge: bool,
    /// The judge: a model of the models table in `--config` (local or remote). Default: the
    /// strongest catalogue model on disk (`staircase model list`), else the default model.
    #[arg(long, value_name = "MODEL")]
    judge: Option<String>,
    /// Tokens the pairwise judge compares the two answers in before its verdict (MT-Bench's
    /// explanation; 0: the verdict alone, faster, and a small judge then names a position).
    #[arg(long, value_name = "N", default_value_t = crate::eval::judge::DEFAULT_EXPLAIN_TOKENS)]
    judge_explain_tokens: u32,
    /// A `staircase.toml` (models, plugin and pipeline folders); the flags above override it.
    #[arg(long, value_name = "staircase.toml")]
    config: Option<PathBuf>,
    /// Skip the second layered run with other seeds (the noise floor).
    #[arg(long)]
    no_noise_floor: bool,
    /// Where to write `eval.json` and `eval.svg`.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// A GGUF model file to run instead of the default model.
    #[arg(long, value_name = "PATH.gguf")]
    model: Option<PathBuf>,
    /// Also load the plugins in this folder; repeatable.
    #[arg(long = "plugins", value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    /// Score the answers of an earlier `eval.json` again (with `--judge`, or another judge
    /// than it had) instead of generating answers; the prompt and variant flags are ignored.
    #[arg(long, value_name = "eval.json")]
    answers: Option<PathBuf>,
}

pub(crate) fn schedule(sizes: &str) -> anyhow::Result<ChunkSchedule> {
    let sizes = sizes
        .split(',')
        .map(|s| s.trim().parse::<u32>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("chunk sizes `{sizes}`: expected numbers like 16,32,64"))?;
    Ok(ChunkSchedule::new(sizes)?)
}

/// A variant from `PIPELINE:MODE[:SIZES]` or `single`.
fn variant(app: &crate::app::App, spec: &str) -> anyhow::Result<Variant> {
    if spec == "single" {
        return Ok(Variant::single());
    }
    let mut parts = spec.splitn(3, ':');
    let (Some(name), Some(mode)) = (parts.next(), parts.next()) else {
        anyhow::bail!("variant `{spec}`: expected PIPELINE:MODE[:SIZES] or `single`");
    };
    let mode: StreamMode = mode
        .parse()
        .map_err(|e| anyhow::anyhow!("variant `{spec}`: {e}"))?;
    let pipeline = super::run::pipeline_of(app, name, None)?;
    let sizes = parts.next().map(schedule).transpose()?;
    Ok(Variant::pipeline(pipeline, mode, sizes.as_ref()))
}

/// Without `--judge`: the strongest catalogue model on disk (the catalogue lists models
/// weakest first) when it is not the default model, added to the models table; says which.
fn strongest_judge(builder: &mut crate::app::AppBuilder) -> anyhow::Result<Option<String>> {
    let status = crate::model::catalogue_status()?;
    let Some(strongest) = status.iter().rev().find(|m| m.installed.is_some()) else {
        return Ok(None);
    };
    if strongest.name == crate::model::catalogue::DEFAULT.name {
        return Ok(None);
    }
    let name = builder.config_mut().add_catalogue_model(&strongest.name);
    eprintln!(
        "eval: the judge is {} (the strongest catalogue model installed; --judge MODEL to choose)",
        strongest.name
    );
    Ok(Some(name))
}

/// The app, with the judge `args` asks for (or the strongest installed) in its models table,
/// and that judge's name (`None`: the default model).
fn app_and_judge(args: &Args) -> anyhow::Result<(crate::app::App, Option<String>)> {
    let mut builder = super::run::open_app(
        args.config.as_deref(),
        args.model.as_deref(),
        &args.plugin_dirs,
    )?;
    let judge = match &args.judge {
        Some(name) => Some(name.clone()),
        None if args.no_judge => None,
        None => strongest_judge(&mut builder)?,
    };
    Ok((builder.build()?, judge))
}

/// The judge engine: `--judge` from the models table, else the default model.
fn judge_engine(
    app: &crate::app::App,
    name: Option<&str>,
) -> anyhow::Result<std::sync::Arc<dyn crate::engine::Engine>> {
    match name {
        Some(name) => app.engine(name).with_context(|| {
            format!(
                "judge `{name}` is not in the models table (models: {})",
                app.model_names().join(", ")
            )
        }),
        None => Ok(app.default_engine()),
    }
}

/// `--answers`: the saved answers scored again.
fn rescore(args: &Args, path: &std::path::Path) -> anyhow::Result<()> {
    let answered: eval::runner::Answered = serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{} is not an eval.json", path.display()))?;
    let (app, judge) = app_and_judge(args)?;
    let judge = judge_engine(&app, judge.as_deref())?;
    let judge = (!args.no_judge).then_some(judge.as_ref());
    let report = super::runtime()?.block_on(eval::runner::score(
        answered,
        judge,
        args.judge_explain_tokens,
    ))?;
    print!("{}", report.table());
    write_json_and_svg(&args.out, "eval", &report, &report.svg())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(path) = &args.answers {
        return rescore(&args, path);
    }
    let mut prompts = match &args.prompts {
        Some(path) => eval::prompts::load(path)?,
        None => eval::prompts::shipped(),
    };
    if let Some(limit) = args.limit {
        prompts.truncate(limit.max(1));
    }
    let (app, judge) = app_and_judge(&args)?;
    let baseline = super::run::pipeline_of(&app, &args.pipeline, None)?;
    let mut variants = args
        .variants
        .iter()
        .map(|s| variant(&app, s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for sizes in &args.schedules {
        variants.push(Variant::pipeline(
            baseline.clone(),
            StreamMode::Staircase,
            Some(&schedule(sizes)?),
        ));
    }
    if variants.is_empty() {
        // The pipeline the other way than the baseline runs.
        let other = match args.baseline_mode {
            StreamMode::Layered => StreamMode::Staircase,
            StreamMode::Staircase => StreamMode::Layered,
        };
        variants.push(Variant::pipeline(baseline.clone(), other, None));
    }
    // The single model always runs; a `single` variant would only repeat it.
    variants.retain(|v| !matches!(v.kind, eval::VariantKind::Single));
    let (runner, engine) = (app.runner(), app.default_engine());
    let launcher = app.launcher();
    let judge = judge_engine(&app, judge.as_deref())?;
    for v in &variants {
        if let eval::VariantKind::Pipeline { pipeline, .. } = &v.kind {
            runner.check(pipeline)?;
        }
    }
    let options = EvalOptions {
        baseline,
        baseline_mode: args.baseline_mode,
        variants,
        prompts,
        proposer_tokens: args.proposer_tokens,
        answer_tokens: args.answer_tokens,
        judge: !args.no_judge,
        judge_explain_tokens: args.judge_explain_tokens,
        noise_floor: !args.no_noise_floor,
        dry: crate::engine::DryOverrides {
            dry_multiplier: args.dry_multiplier,
            ..Default::default()
        },
    };
    let report = super::runtime()?.block_on(eval::runner::run_judged_by(
        launcher,
        &engine,
        judge.as_ref(),
        &options,
    ))?;
    print!("{}", report.table());
    write_json_and_svg(&args.out, "eval", &report, &report.svg())
}

/// Writes `STEM.json` and `STEM.svg` into `out` (created if missing) and says so.
pub(crate) fn write_json_and_svg(
    out: &std::path::Path,
    stem: &str,
    report: &impl serde::Serialize,
    svg: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let json_path = out.join(format!("{stem}.json"));
    let svg_path = out.join(format!("{stem}.svg"));
    std::fs::write(&json_path, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    std::fs::write(&svg_path, svg)
        .with_context(|| format!("cannot write {}", svg_path.display()))?;
    println!("wrote {} and {}", json_path.display(), svg_path.display());
    Ok(())
}
