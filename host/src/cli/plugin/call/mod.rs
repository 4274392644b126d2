//! `staircase plugin call`: runs one plugin of any kind alone, without a pipeline, and prints
//! every call it answered, what it was given, what it returned and how long it took; its
//! `host.log` lines are shown on stderr, and a limit it hits (deadline, memory, log budget)
//! ends the command with the typed error naming it. One file per kind feeds that kind what a
//! pipeline would, through the same [`PolicyProvider`] the pipeline runtime uses. It starts
//! no engine unless `--model` names one, so `model.complete` is refused by default.

mod aggregator;
mod compressor;
mod guard;
mod role;
mod router;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::engine::local::{LocalEngine, LocalEngineConfig};
use crate::engine::{ChatMessage, Engine};
use crate::plugin::{Capability, HostConfig, PluginRuntime, Registry};
use crate::policy::{PluginConfig, PluginKind, PolicyProvider, StreamMode};

/// What `plugin call` logs when `RUST_LOG` does not say: every line a plugin writes with
/// `host.log`, and the host's own warnings.
pub const LOG_FILTER: &str = "warn,staircase::plugin::host_imports=trace";

/// Into how many chunks a text is cut when no chunks are given: enough for a guard or an
/// aggregator to see text arrive in pieces (a word split across two pushes), few enough to
/// read the output at a glance.
const DEFAULT_CHUNKS: usize = 3;

/// `staircase plugin call` arguments. `--upstream` feeds roles and aggregators, the flags
/// from `--script` to `--chunk` one kind each; one the plugin's kind does not take is
/// refused rather than silently ignored.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The component (`NAME.wasm`, its manifest `NAME.toml` beside it).
    pub file: PathBuf,
    /// The user's message: a role's and an aggregator's conversation, a router's query, a
    /// guard's text (in three chunks) when no `--chunk` is given.
    #[arg(long, default_value = "What is 2 + 2?")]
    pub prompt: String,
    /// Roles and aggregators: an upstream agent's answer (repeatable), as `LABEL=TEXT`.
    #[arg(long = "upstream", value_name = "LABEL=TEXT")]
    pub upstream: Vec<String>,
    /// A configuration value of the plugin (repeatable), as `KEY=VALUE`.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    pub config: Vec<String>,
    /// Aggregators: the run to feed, a JSON file of `prompt`, `mode`, `proposers` and
    /// `events` (`push`, `finish`, `answered`); default: each `--upstream` answer in three
    /// chunks, interleaved, then their finishes.
    #[arg(long, value_name = "FILE")]
    pub script: Option<PathBuf>,
    /// Aggregators: how the pipeline runs it (a script's `mode` wins).
    #[arg(long, value_name = "MODE")]
    pub mode: Option<StreamMode>,
    /// Compressors: the history, a JSON list of `{"role", "content"}` messages (default: a
    /// short conversation).
    #[arg(long, value_name = "FILE")]
    pub history: Option<PathBuf>,
    /// Compressors: the token budget of the compressed history.
    #[arg(long, value_name = "TOKENS")]
    pub budget: Option<u32>,
    /// Routers: the models offered, comma-separated.
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub models: Vec<String>,
    /// Routers: tokens in the step's prompt (default: estimated from `--prompt`).
    #[arg(long, value_name = "N")]
    pub prompt_tokens: Option<u32>,
    /// Routers: the model of the node's previous step.
    #[arg(long, value_name = "NAME")]
    pub previous_model: Option<String>,
    /// Routers: how sure the previous model was, as the mean probability of its top token
    /// (0 to 1).
    #[arg(long, value_name = "P", requires = "previous_model")]
    pub confidence: Option<f32>,
    /// Guards: a chunk of the stream (repeatable; default: `--prompt` in three chunks).
    #[arg(long = "chunk", value_name = "TEXT")]
    pub chunks: Vec<String>,
    /// A GGUF model to answer the plugin's `model.complete` and `count-tokens`. Without it
    /// no engine starts: `model.complete` is refused and token counts are estimates.
    #[arg(long, value_name = "FILE.gguf")]
    pub model: Option<PathBuf>,
}

impl Args {
    /// The kind-specific flags given, each with the kind it feeds.
    fn kind_flags(&self) -> Vec<(&'static str, PluginKind)> {
        use PluginKind::{Aggregator, Compressor, Guard, Router};
        let given = [
            ("--script", Aggregator, self.script.is_some()),
            ("--mode", Aggregator, self.mode.is_some()),
            ("--history", Compressor, self.history.is_some()),
            ("--budget", Compressor, self.budget.is_some()),
            ("--models", Router, !self.models.is_empty()),
            ("--prompt-tokens", Router, self.prompt_tokens.is_some()),
            ("--previous-model", Router, self.previous_model.is_some()),
            ("--chunk", Guard, !self.chunks.is_empty()),
        ];
        given
            .into_iter()
            .filter(|(_, _, given)| *given)
            .map(|(flag, kind, _)| (flag, kind))
            .collect()
    }
}

/// The plugin to call and what every call of it needs.
pub(super) struct Target<'a> {
    pub provider: &'a dyn PolicyProvider,
    pub plugin: &'a str,
    pub config: &'a PluginConfig,
}

/// Loads the plugin and calls it as a pipeline would.
pub fn run(args: Args) -> anyhow::Result<()> {
    let config: PluginConfig = args
        .config
        .iter()
        .map(|pair| split_pair(pair, "--config"))
        .collect::<anyhow::Result<_>>()?;
    let manifest_path = crate::plugin::manifest_path(&args.file);
    let manifest = crate::plugin::read_manifest(&manifest_path)?;
    for (flag, kind) in args.kind_flags() {
        if kind != manifest.kind {
            bail!(
                "{flag} feeds {}; {} is {}",
                kind.with_article(),
                manifest.name,
                manifest.kind.with_article()
            );
        }
    }
    if !args.upstream.is_empty()
        && !matches!(manifest.kind, PluginKind::Role | PluginKind::Aggregator)
    {
        bail!(
            "--upstream feeds roles and aggregators; {} is {}",
            manifest.name,
            manifest.kind.with_article()
        );
    }
    let mut host = HostConfig::default();
    // What the manifest asks for, as `plugin check` grants it: a call is the author's own
    // test, and `model.complete` without an engine is refused by the host all the same.
    host.grants
        .insert(manifest.name.clone(), manifest.capabilities.clone());
    // A compressor's policy takes no config: it reads the host's table, as a server's
    // operator sets it. The other kinds get it per instance, so the load's self-test runs
    // without it (a config that breaks the plugin then fails a call, not the load).
    if manifest.kind == PluginKind::Compressor {
        host.plugin_config
            .insert(manifest.name.clone(), config.clone());
    }
    if let Some(path) = &args.model {
        host.engine = Some(load_engine(path)?);
    }
    let registry = Registry::new(PluginRuntime::new(host)?);
    let loaded = registry
        .load_file(&args.file)
        .with_context(|| format!("{} does not load", args.file.display()))?;
    let manifest = &loaded.manifest;
    println!(
        "plugin        {} {} ({}; {} ms per call)",
        manifest.name,
        manifest.version,
        manifest.kind.name(),
        manifest.limits.call_ms
    );
    if manifest.capabilities.contains(&Capability::Model) && args.model.is_none() {
        println!("note          no --model: no engine runs, and model.complete is refused");
    }
    let target = Target {
        provider: registry.as_ref(),
        plugin: &manifest.name,
        config: &config,
    };
    match manifest.kind {
        PluginKind::Role => role::call(&target, &args),
        PluginKind::Aggregator => aggregator::call(&target, &args),
        PluginKind::Compressor => compressor::call(&target, &args),
        PluginKind::Router => router::call(&target, &args),
        PluginKind::Guard => guard::call(&target, &args),
    }
}

/// The engine behind `--model`, loaded as `staircase generate` loads one.
fn load_engine(path: &Path) -> anyhow::Result<Arc<dyn Engine>> {
    let engine = LocalEngine::load(LocalEngineConfig::new(path))
        .with_context(|| format!("loading the model {}", path.display()))?;
    Ok(Arc::new(engine))
}

/// Runs one call, printing its name and time; a failure (a limit hit, a trap) is the error.
pub(super) fn timed<T, E: std::error::Error + Send + Sync + 'static>(
    name: &str,
    call: impl FnOnce() -> Result<T, E>,
) -> anyhow::Result<T> {
    let (result, elapsed) = time(call);
    print_call(name, elapsed);
    result.with_context(|| format!("{name} failed"))
}

/// Runs `call` and measures it.
pub(super) fn time<T>(call: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let result = call();
    (result, start.elapsed())
}

pub(super) fn print_call(name: &str, elapsed: Duration) {
    println!(
        "call          {name:<15} {:.2} ms",
        crate::millis::millis(elapsed)
    );
}

/// What a call was given, printed before its call line.
pub(super) fn print_input(what: impl std::fmt::Display) {
    println!("  <- {what}");
}

/// What a call returned, printed after its call line.
pub(super) fn print_output(what: impl std::fmt::Display) {
    println!("  -> {what}");
}

/// Messages, one line each, under the call that took or returned them.
pub(super) fn print_messages(messages: &[ChatMessage]) {
    for message in messages {
        println!(
            "       {:<9} {:?}",
            format!("{:?}", message.role),
            message.content
        );
    }
}

/// `LABEL=TEXT` answers of upstream agents.
pub(super) fn upstream_pairs(args: &Args) -> anyhow::Result<Vec<(String, String)>> {
    args.upstream
        .iter()
        .map(|pair| split_pair(pair, "--upstream"))
        .collect()
}

fn split_pair(pair: &str, flag: &str) -> anyhow::Result<(String, String)> {
    let (key, value) = pair
        .split_once('=')
        .with_context(|| format!("{flag} {pair:?}: expected KEY=VALUE"))?;
    Ok((key.to_string(), value.to_string()))
}

/// `text` cut into `n` pieces of about equal length, on character boundaries; fewer when
/// the text is shorter than `n` characters, none when it is empty.
pub(super) fn chunks(text: &str, n: usize) -> Vec<&str> {
    let n = n.max(1);
    let mut pieces = Vec::with_capacity(n);
    let mut start = 0;
    for i in 1..=n {
        let mut end = text.len() * i / n;
        while !text.is_char_boundary(end) {
            end += 1;
        }
        if end > start {
            pieces.push(&text[start..end]);
            start = end;
        }
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_text_in_order_on_character_boundaries() {
        let text = "mail bob@example.org now";
        let pieces = chunks(text, 3);
        assert_eq!(pieces, ["mail bob", "@example", ".org now"]);
        let accented = "héé";
        let pieces = chunks(accented, 3);
        assert_eq!(pieces.concat(), accented);
        assert!(pieces.len() <= 3 && pieces.len() >= 2, "{pieces:?}");
        assert_eq!(chunks("ab", 3), ["a", "b"]);
        assert!(chunks("", 3).is_empty());
    }
}
