//! `staircase bench`.

mod collab;
mod compress;
mod routing;
mod serve;
mod staircase;

use std::path::PathBuf;

use anyhow::Context;

use crate::bench::engine::{
    EngineBenchConfig, compare_quantizations, kv_width_costs, run as run_engine_bench,
};

/// Subcommands of `staircase bench`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// The local engine against a bare llama.cpp loop, batching, and warm-prefix TTFT.
    Engine(EngineArgs),
    /// Single model vs layered vs staircase Mixture-of-Agents: TTFT, total time, cache use.
    Staircase(staircase::Args),
    /// What the plugin host costs: per-chunk calls, instantiation, cached loading, hot reload.
    Plugins {
        /// Also save the figures as JSON here.
        #[arg(long = "json-out", value_name = "FILE")]
        json: Option<PathBuf>,
        /// Also measure compile vs cached load of these components (`NAME.wasm` with its
        /// manifest `NAME.toml` beside it), e.g. the Python and JavaScript examples.
        #[arg(long = "component", value_name = "FILE.wasm")]
        components: Vec<PathBuf>,
    },
    /// The server against in-process runs: 1, 4, 16 streaming clients, TTFT and req/s.
    Serve(serve::Args),
    /// Decode speed with and without speculative decoding, and the k-token forward cost curve.
    Speculation(SpeculationArgs),
    /// Routing policies on a multi-agent trace over `llama-server` replicas: cache hits, TTFT.
    Routing(routing::Args),
    /// The hand-written pipeline vs its tuned variant for a latency budget.
    Tune(super::tune::Args),
    /// Dual-model answers: all large vs all small vs routed per step (with escalation).
    Collab(collab::Args),
    /// A long chat session: TTFT per turn with no, inline and background compression.
    Compress(compress::Args),
}

/// Arguments of `staircase bench speculation`.
#[derive(Debug, clap::Args)]
pub struct SpeculationArgs {
    /// A GGUF file instead of the default model.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    threads: Option<usize>,
    /// Tokens generated per workload run.
    #[arg(long, default_value_t = 200)]
    max_tokens: u32,
    /// Runs per workload and engine (speed: the fastest run; ratio: the median of pairs).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Flash attention off in both engines (llama.cpp's other CPU kernels: outputs may then
    /// differ at near-ties).
    #[arg(long)]
    no_flash_attention: bool,
    /// Write the report as JSON to this file too.
    #[arg(long = "json-out", value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Arguments of `staircase bench engine`.
#[derive(Debug, clap::Args)]
pub struct EngineArgs {
    /// A GGUF file instead of the default model.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    threads: Option<usize>,
    /// Runs per comparison (rates: the best run; ratios: the median pair).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Instead: compare these GGUF files of one model (the first is the reference) for speed
    /// and greedy agreement, e.g. the default model and its `model quantize` variants.
    #[arg(long, num_args = 1..)]
    compare: Vec<PathBuf>,
    /// Instead: decode-step time while other sequences hold these many KV cells (the cost of
    /// keeping prefixes cached in llama.cpp's unified cache), e.g. `--kv-widths 0 1024 4096`.
    #[arg(long, num_args = 1..)]
    kv_widths: Vec<usize>,
    /// Flash attention off, in our engine and the bare loop alike.
    #[arg(long)]
    no_flash_attention: bool,
    /// Instead: our engine against llama.cpp's `llama-server` (started here on loopback) on
    /// the same GGUF and threads, at each `--concurrency` level: TTFT and decode.
    #[arg(long)]
    against_server: bool,
    /// Requests at once in `--against-server`'s measurements, a sweep in one run
    /// (e.g. `--concurrency 1,4,16`).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4])]
    concurrency: Vec<usize>,
    /// Write the report as JSON to this file too.
    #[arg(long = "json-out", value_name = "FILE")]
    json: Option<PathBuf>,
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Engine(args) => engine(args),
        Command::Staircase(args) => staircase::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Plugins { json, components } => plugins(json, components),
        Command::Speculation(args) => speculation(args),
        Command::Routing(args) => routing::run(args),
        Command::Tune(args) => super::tune::bench(args),
        Command::Collab(args) => collab::run(args),
        Command::Compress(args) => compress::run(args),
    }
}

fn plugins(json: Option<PathBuf>, components: Vec<PathBuf>) -> anyhow::Result<()> {
    let rows = crate::bench::plugins::run_with(&components).context("plugin benchmark")?;
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

fn speculation(args: SpeculationArgs) -> anyhow::Result<()> {
    use crate::bench::speculation as bench;
    let model = match args.model {
        Some(path) => path,
        None => crate::model::default_model_path()?,
    };
    let mut config = bench::SpeculationBenchConfig::new(model);
    config.threads = args.threads;
    config.max_tokens = args.max_tokens;
    config.repeats = args.repeats;
    config.flash_attention = !args.no_flash_attention;
    let report = bench::run(&config).context("speculation benchmark")?;
    println!(
        "speculation benchmark: {} on {} threads, flash attention {}",
        report.model,
        report.threads,
        if report.flash_attention { "on" } else { "off" }
    );
    println!(
        "forward cost with logits at every position ({}-token context):",
        config.cost_context
    );
    println!("{:>8} {:>10} {:>10}", "tokens", "ms", "x step");
    for p in &report.cost_curve {
        println!("{:>8} {:>10.2} {:>10.2}", p.tokens, p.ms, p.relative);
    }
    println!(
        "ceiling with every draft accepted: {:.2}x (draft of {})",
        report.ceiling_speedup, report.ceiling_draft_len
    );
    println!(
        "{:<12} {:>7} {:>10} {:>10} {:>7} {:>9} {:>9} {:>9}",
        "workload", "tokens", "plain t/s", "spec t/s", "ratio", "identical", "accepted", "tok/fwd"
    );
    for w in &report.workloads {
        println!(
            "{:<12} {:>7} {:>10.1} {:>10.1} {:>7.2} {:>9} {:>9} {:>9.2}",
            w.name,
            w.completion_tokens,
            w.plain_tok_s,
            w.speculative_tok_s,
            w.ratio,
            if w.identical { "yes" } else { "NO" },
            format!(
                "{}/{}",
                w.speculation.accepted_tokens, w.speculation.drafted_tokens
            ),
            w.speculation.tokens_per_forward()
        );
    }
    let a = &report.automaton;
    println!(
        "automaton over {} tokens: {:.0} ns per token added, {:.1} us per match and 16-token draft",
        a.tokens, a.extend_ns_per_token, a.draft_us
    );
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn engine(args: EngineArgs) -> anyhow::Result<()> {
    if args.against_server {
        return against_server(&args);
    }
    if !args.compare.is_empty() {
        return compare(&args);
    }
    if !args.kv_widths.is_empty() {
        let model = match &args.model {
            Some(path) => path.clone(),
            None => crate::model::default_model_path()?,
        };
        println!("{:>12} {:>10} {:>10}", "other cells", "step ms", "relative");
        let flash_attention = !args.no_flash_attention;
        for p in kv_width_costs(&model, args.threads, &args.kv_widths, flash_attention)? {
            println!(
                "{:>12} {:>10.2} {:>10.2}",
                p.other_cells, p.step_ms, p.relative
            );
        }
        return Ok(());
    }
    let model = match args.model {
        Some(path) => path,
        None => crate::model::default_model_path()?,
    };
    let mut config = EngineBenchConfig::new(model);
    config.threads = args.threads;
    config.repeats = args.repeats;
    config.flash_attention = !args.no_flash_attention;
    let report = run_engine_bench(&config).context("engine benchmark")?;
    println!(
        "engine benchmark: {} on {} threads",
        report.model, report.threads
    );
    println!(
        "{:<22} {:>12} {:>12} {:>8}",
        "", "bare tok/s", "ours tok/s", "ratio"
    );
    for (name, c) in [("prefill", &report.prefill), ("decode", &report.decode)] {
        println!(
            "{:<22} {:>12.1} {:>12.1} {:>8.3}",
            format!("{name} ({} tok)", c.tokens),
            c.bare_tok_s,
            c.engine_tok_s,
            c.ratio
        );
    }
    println!(
        "{:<22} {:>12} {:>12} {:>8}",
        "batch", "tokens", "tok/s", "vs 1"
    );
    for b in &report.batches {
        println!(
            "{:<22} {:>12} {:>12.1} {:>8.2}",
            b.batch, b.generated_tokens, b.aggregate_tok_s, b.speedup
        );
    }
    let t = &report.ttft;
    println!(
        "TTFT, {}-token prompt, {} cached: cold {:.1} ms, warm {:.1} ms, {:.1}x faster",
        t.prompt_tokens, t.cached_prompt_tokens, t.cold_ms, t.warm_ms, t.speedup
    );
    let c = &report.decode_with_cache;
    println!(
        "decode with {} cached cells: {:.1} tok/s, {:.3}x the cache-off rate",
        c.cached_cells, c.decode_tok_s, c.ratio
    );
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn against_server(args: &EngineArgs) -> anyhow::Result<()> {
    use crate::bench::against_server::{AgainstServerConfig, run};
    let model = match &args.model {
        Some(path) => path.clone(),
        None => crate::model::pull_default_blocking(true)?,
    };
    let mut config = AgainstServerConfig::new(model);
    config.threads = args.threads;
    config.repeats = args.repeats;
    config.concurrency.clone_from(&args.concurrency);
    config.flash_attention = !args.no_flash_attention;
    let report = super::runtime()?
        .block_on(run(&config))
        .context("engine against llama-server")?;
    println!(
        "our engine against llama-server: {} on {} threads, flash attention {}",
        report.model,
        report.threads,
        if report.flash_attention { "on" } else { "off" }
    );
    println!(
        "{:<10} {:>12} {:>12} {:>10} {:>14} {:>14} {:>10}",
        "requests", "ours TTFT", "server TTFT", "ratio", "ours tok/s", "server tok/s", "ratio"
    );
    for s in &report.scenarios {
        println!(
            "{:<10} {:>10.0}ms {:>10.0}ms {:>10.3} {:>14.1} {:>14.1} {:>10.3}",
            s.requests,
            s.ours.ttft_ms,
            s.server.ttft_ms,
            s.ttft_ratio,
            s.ours.decode_tok_s,
            s.server.decode_tok_s,
            s.decode_ratio
        );
    }
    println!("TTFT ratio below 1 and decode ratio above 1 favour our engine");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn compare(args: &EngineArgs) -> anyhow::Result<()> {
    let points = compare_quantizations(&args.compare, args.threads, args.repeats)?;
    println!(
        "{:<36} {:>10} {:>10} {:>14} {:>10}",
        "model", "prefill/s", "decode/s", "8-tok verify", "same answers"
    );
    for p in &points {
        println!(
            "{:<36} {:>10.1} {:>10.1} {:>11.2} st {:>7}/{} {:?}",
            p.model,
            p.prefill_tok_s,
            p.decode_tok_s,
            p.verify8_in_steps,
            p.identical_answers,
            p.prompts,
            p.divergence
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&points)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
