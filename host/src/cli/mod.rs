//! The command line. Each subcommand lives in its own file and calls the same library
//! functions the server and the tests use; nothing here does work of its own.

mod bench;
mod completions;
mod eval;
mod generate;
mod model;
mod plugin;
mod run;
mod serve;
mod trace;
mod tune;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Multi-agent LLM pipelines with staircase streaming and sandboxed WebAssembly policies.
#[derive(Debug, Parser)]
#[command(name = "staircase", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr as text or as one JSON object each (for log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "STAIRCASE_LOG_FORMAT")]
    log_format: LogFormat,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a pipeline on a prompt and stream its answer.
    Run(run::Args),
    /// Serve pipelines and models over an OpenAI-compatible HTTP API.
    Serve(serve::Args),
    /// Generate with one model, no pipeline.
    Generate(generate::Args),
    /// Create, build, run alone, check and list plugins.
    #[command(subcommand)]
    Plugin(plugin::Command),
    /// Fetch and list models.
    #[command(subcommand)]
    Model(model::Command),
    /// Score variants (single model, pipelines by mode and chunk schedule) on a prompt set.
    Eval(eval::Args),
    /// Search a pipeline's variants for the best one within a latency budget.
    Tune(tune::Args),
    /// Run a benchmark and print its table.
    #[command(subcommand)]
    Bench(bench::Command),
    /// Work with run traces.
    #[command(subcommand)]
    Trace(trace::Command),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(completions::Args),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match &cli.command {
        Command::Plugin(command) => command.log_filter(),
        _ => None,
    };
    init_tracing(cli.log_format, filter.unwrap_or(DEFAULT_LOG_FILTER));
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Plugin(command) => plugin::run(command),
        Command::Model(command) => model::run(command),
        Command::Eval(args) => eval::run(args),
        Command::Tune(args) => tune::run(args),
        Command::Bench(command) => bench::run(command),
        Command::Trace(command) => trace::run(command),
        Command::Completions(args) => completions::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// What is logged when `RUST_LOG` does not say: warnings, and the server's access log.
const DEFAULT_LOG_FILTER: &str = "warn,staircase::access=info";

/// Logs go to stderr, filtered by `RUST_LOG` (default: `default_filter`, the command's or
/// [`DEFAULT_LOG_FILTER`]); text is in colour only on a terminal (a journal or a log file
/// gets plain text).
fn init_tracing(format: LogFormat, default_filter: &str) {
    use crate::pipeline::plugin_log::RunLogLayer;
    use std::io::IsTerminal;
    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, fmt};
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Plugins' `host.log` lines also go to the run that wrote them, whatever stderr's filter.
    let runs = RunLogLayer.with_filter(filter_fn(RunLogLayer::interest));
    let logs = fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(runs);
    match format {
        LogFormat::Text => registry
            .with(
                logs.with_ansi(std::io::stderr().is_terminal())
                    .with_filter(filter),
            )
            .init(),
        // Fields at the top level of each object, beside `timestamp`, `level` and `target`;
        // `spans` holds the request, run and node it happened in (their ids).
        LogFormat::Json => registry
            .with(
                logs.json()
                    .flatten_event(true)
                    .with_span_list(true)
                    .with_filter(filter),
            )
            .init(),
    }
}

/// A multi-threaded tokio runtime for commands that need one.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
