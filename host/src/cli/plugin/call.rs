//! `staircase plugin call`: runs one plugin alone, without a model or a pipeline, and prints
//! every call it answered, what it returned and how long it took; its `host.log` lines are
//! shown on stderr, and a limit it hits (deadline, memory, log budget) ends the command with
//! the typed error naming it. Roles only for now: it feeds one the prompt as the user's
//! message, with optional upstream answers. It must not start an engine.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::engine::{ChatMessage, Role};
use crate::plugin::{HostConfig, PluginRuntime, Registry};
use crate::policy::{PluginConfig, PluginKind, PolicyProvider, RoleInput, Source, UpstreamOutput};

/// What `plugin call` logs when `RUST_LOG` does not say: every line a plugin writes with
/// `host.log`, and the host's own warnings.
pub const LOG_FILTER: &str = "warn,staircase::plugin::host_imports=trace";

/// `staircase plugin call` arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The component (`NAME.wasm`, its manifest `NAME.toml` beside it).
    pub file: PathBuf,
    /// The user's message fed to the role.
    #[arg(long, default_value = "What is 2 + 2?")]
    pub prompt: String,
    /// An upstream agent's answer the role sees (repeatable), as `LABEL=TEXT`.
    #[arg(long = "upstream", value_name = "LABEL=TEXT")]
    pub upstream: Vec<String>,
    /// A configuration value of the plugin (repeatable), as `KEY=VALUE`.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    pub config: Vec<String>,
}

/// Loads the plugin and calls it as a pipeline node would.
pub fn run(args: Args) -> anyhow::Result<()> {
    let config: PluginConfig = args
        .config
        .iter()
        .map(|pair| split_pair(pair, "--config"))
        .collect::<anyhow::Result<_>>()?;
    let upstream = args
        .upstream
        .iter()
        .enumerate()
        .map(|(i, pair)| {
            let (label, text) = split_pair(pair, "--upstream")?;
            Ok(UpstreamOutput {
                source: Source {
                    id: format!("upstream-{i}"),
                    label,
                },
                text,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let registry = Registry::new(PluginRuntime::new(HostConfig::default())?);
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
    if manifest.kind != PluginKind::Role {
        bail!(
            "plugin call feeds roles only so far; {} is {}",
            manifest.name,
            manifest.kind.with_article()
        );
    }
    let provider: &dyn PolicyProvider = registry.as_ref();
    let mut role = provider.role(&manifest.name, &config)?;
    let system = timed("system-prompt", || role.system_prompt())?;
    println!("  -> {system:?}");
    let params = timed("params", || role.params())?;
    println!("  -> {params:?}");
    let input = RoleInput {
        conversation: vec![ChatMessage::new(Role::User, args.prompt)],
        upstream,
    };
    let messages = timed("build-messages", || role.build_messages(&input))?;
    for message in &messages {
        println!(
            "  -> {:<9} {:?}",
            format!("{:?}", message.role),
            message.content
        );
    }
    Ok(())
}

/// Runs one call, printing its name and time; a failure (a limit hit, a trap) is the error.
fn timed<T, E: std::error::Error + Send + Sync + 'static>(
    name: &str,
    call: impl FnOnce() -> Result<T, E>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    let result = call();
    println!("call          {name:<15} {}", millis(start.elapsed()));
    result.with_context(|| format!("{name} failed"))
}

fn millis(elapsed: Duration) -> String {
    format!("{:.2} ms", crate::millis::millis(elapsed))
}

fn split_pair(pair: &str, flag: &str) -> anyhow::Result<(String, String)> {
    let (key, value) = pair
        .split_once('=')
        .with_context(|| format!("{flag} {pair:?}: expected KEY=VALUE"))?;
    Ok((key.to_string(), value.to_string()))
}
