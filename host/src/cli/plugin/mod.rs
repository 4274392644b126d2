//! `staircase plugin`: scaffold a plugin from the templates in the binary (`new`), build it
//! with its language's toolchain (`build`), rebuild it on every save into a running server
//! (`dev`), run one alone (`call`), write the WIT (`wit`), check a component and list
//! plugins. The larger verbs are a file (or folder) each here;
//! the loading and checking is the plugin host's (`crate::plugin`).

mod build;
mod call;
mod dev;
mod new;
mod templates;

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::plugin::{Capability, HostConfig, PluginRuntime, Registry};

/// Subcommands of `staircase plugin`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a plugin folder: source, manifest, build recipe and a sample pipeline that
    /// uses it. Needs no checkout of the repository.
    New(new::Args),
    /// Build a plugin folder into NAME.wasm beside its manifest (cargo, componentize-py,
    /// componentize-js, or the manifest's `[build] command`), then check it.
    Build(build::Args),
    /// Build, check and install a plugin folder into a running server's plugin folder, then
    /// rebuild on every saved change: the server swaps each good version in for the next
    /// request; a version that fails to build or check is reported and not installed.
    Dev(dev::Args),
    /// Run a plugin of any kind alone (a role on a prompt, an aggregator on a scripted run,
    /// a compressor on a history, a router on a request, a guard on a stream of chunks):
    /// prints each call, what it was given and returned, its time, the plugin's log lines
    /// (stderr) and any limit it hit. Starts no model unless `--model` names one.
    Call(call::Args),
    /// Write the WIT packages in the binary (`v0.1.0/agent.wit`, ...) into a folder, for
    /// authors whose toolchain reads WIT (componentize-py, componentize-js, wit-bindgen).
    Wit {
        /// The folder to write into (created if missing; existing files are replaced).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Load a component with its manifest, type-check it against its kind's world, run its
    /// self-test, and print what it is. Exits non-zero on any problem.
    Check {
        /// The component (`NAME.wasm`).
        file: PathBuf,
        /// Its manifest (default: `NAME.toml` beside the component).
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Grant only these capabilities (default: grant what the manifest asks for).
        #[arg(long = "grant", value_name = "CAPABILITY")]
        grants: Option<Vec<Capability>>,
        /// Grant no capability (checks the plugin as a host that grants none would load it).
        #[arg(long, conflicts_with = "grants")]
        no_grant: bool,
    },
    /// List the built-in plugins and those in plugin folders.
    List {
        /// A folder of `NAME.wasm` + `NAME.toml` pairs (repeatable; default: the user's
        /// plugin folder, if it exists). `--plugins` as on every other command; `--dir` is
        /// the older spelling.
        #[arg(long = "plugins", alias = "dir", value_name = "DIR")]
        dirs: Vec<PathBuf>,
    },
}

impl Command {
    /// The log filter this command wants when `RUST_LOG` does not say: `call` shows the
    /// plugin's own log lines.
    pub fn log_filter(&self) -> Option<&'static str> {
        matches!(self, Command::Call(_)).then_some(call::LOG_FILTER)
    }
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::New(args) => new::run(args),
        Command::Build(args) => build::run(args),
        Command::Dev(args) => dev::run(args),
        Command::Call(args) => call::run(args),
        Command::Check {
            file,
            manifest,
            grants,
            no_grant,
        } => check(
            file,
            manifest,
            if no_grant { Some(Vec::new()) } else { grants },
        ),
        Command::List { dirs } => list(dirs),
        Command::Wit { out } => wit(&out),
    }
}

pub(super) fn check(
    file: PathBuf,
    manifest: Option<PathBuf>,
    grants: Option<Vec<Capability>>,
) -> anyhow::Result<()> {
    let manifest_path = manifest.unwrap_or_else(|| crate::plugin::manifest_path(&file));
    let parsed = crate::plugin::read_manifest(&manifest_path)?;
    let mut config = HostConfig::default();
    let granted = grants.map_or_else(|| parsed.capabilities.clone(), |g| g.into_iter().collect());
    config.grants.insert(parsed.name.clone(), granted);
    let runtime = PluginRuntime::new(config)?;
    let loaded = crate::plugin::load_files(&runtime, &file, &manifest_path)
        .with_context(|| format!("{} does not load", file.display()))?;
    let (exports, imports) = loaded.interface(&runtime);
    let m = &loaded.manifest;
    let capabilities: Vec<String> = m.capabilities.iter().map(|c| c.to_string()).collect();
    println!("plugin        {} {}", m.name, m.version);
    println!("kind          {}", m.kind.name());
    println!("sha256        {}", loaded.sha256);
    println!("exports       {}", exports.join(", "));
    println!("imports       {}", imports.join(", "));
    println!(
        "capabilities  {}",
        if capabilities.is_empty() {
            "(none)".into()
        } else {
            capabilities.join(", ")
        }
    );
    println!(
        "limits        memory {} MiB, {} ms per call",
        m.limits.memory_mib, m.limits.call_ms
    );
    println!(
        "ok            type-checked and self-tested; {} in {:.1} ms",
        if loaded.from_cache {
            "loaded from the compiled cache"
        } else {
            "compiled"
        },
        crate::millis::millis(loaded.compile_time)
    );
    Ok(())
}

fn wit(out: &Path) -> anyhow::Result<()> {
    for (path, text) in templates::WIT_FILES {
        let file = out.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        println!("wrote         {}", file.display());
    }
    Ok(())
}

fn list(mut dirs: Vec<PathBuf>) -> anyhow::Result<()> {
    if dirs.is_empty() {
        dirs.extend(crate::plugin::default_plugin_dir().filter(|d| d.is_dir()));
    }
    let registry = Registry::new(PluginRuntime::new(HostConfig::default())?);
    registry
        .load_builtins()
        .context("loading the built-in plugins")?;
    let mut rejected = Vec::new();
    for dir in &dirs {
        for (path, result) in registry.load_dir(dir)? {
            if let Err(error) = result {
                rejected.push((path, error));
            }
        }
    }
    println!("{:<24} {:<10} {:<11} source", "name", "version", "kind");
    for plugin in registry.list() {
        let source = plugin
            .path
            .map_or_else(|| "built-in".to_string(), |p| p.display().to_string());
        println!(
            "{:<24} {:<10} {:<11} {source}",
            plugin.name,
            plugin.version,
            plugin.kind.name()
        );
    }
    for (path, error) in &rejected {
        println!("rejected {}: {error}", path.display());
    }
    Ok(())
}
