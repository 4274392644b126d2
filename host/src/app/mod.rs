//! The composition root: builds the engines, the plugin registry, the runner and the
//! pipeline table once, from `staircase.toml` with the command line's overrides. The CLI,
//! the server and the tests get everything they run through an [`App`]; nothing else names
//! concrete engine or plugin types to assemble them. This room wires; it runs nothing.

pub mod config;
mod guards;
mod models;
pub mod pinned;
pub mod pipelines;
pub mod run;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use config::{Config, ConfigError, ModelConfig, SandboxConfig};
pub use guards::{AnswerGuards, GuardedRun};
pub use models::ModelEntry;
pub use pinned::{Pinned, PinnedPlugin};
pub use pipelines::{PipelineTable, PipelineVersion, Rejection};
pub use run::{Fingerprint, Launcher, OutcomeReport, PreparedRun, Progress, RunOutcome, RunSpec};

use crate::engine::local::{EngineStats, LocalEngineConfig};
use crate::engine::remote::ReplicaStats;
use crate::engine::{Engine, EngineError};
use crate::model::ModelError;
use crate::pipeline::spec::DEFAULT_MODEL;
use crate::pipeline::{Models, Pipeline, Runner, SpecError};
use crate::plugin::{HostConfig, PluginError, PluginRuntime, Registry};

/// Why the host could not be assembled; the message names the stage, the cause follows.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("getting the model")]
    Model(#[from] ModelError),
    #[error("loading model `{name}`")]
    Engine {
        name: String,
        #[source]
        source: EngineError,
    },
    #[error("loading the built-in plugins")]
    Plugin(#[from] PluginError),
    #[error("loading plugins from {dir}")]
    PluginDir {
        dir: PathBuf,
        #[source]
        source: PluginError,
    },
    #[error(transparent)]
    Pipeline(#[from] SpecError),
    #[error("watching {what}: {reason}")]
    Watch { what: &'static str, reason: String },
}

/// A change to every local engine's settings.
type AdjustLocal = dyn Fn(&mut LocalEngineConfig);

/// Builds an [`App`]: a config (or the defaults), then the command line's overrides.
pub struct AppBuilder {
    config: Config,
    model: Option<PathBuf>,
    plugin_dirs: Vec<PathBuf>,
    pipeline_dirs: Vec<PathBuf>,
    local: Option<Box<AdjustLocal>>,
}

impl AppBuilder {
    /// The defaults: the default model, built-in pipelines and plugins, the user's plugins.
    pub fn new() -> Self {
        Self::from_config(Config::default())
    }

    pub fn from_config(config: Config) -> Self {
        Self {
            config,
            model: None,
            plugin_dirs: Vec::new(),
            pipeline_dirs: Vec::new(),
            local: None,
        }
    }

    /// `staircase.toml` at `path`.
    pub fn from_file(path: &Path) -> Result<Self, AppError> {
        Ok(Self::from_config(Config::load(path)?))
    }

    /// `--model PATH.gguf`: the default model runs this file.
    pub fn model(mut self, path: Option<PathBuf>) -> Self {
        self.model = path;
        self
    }

    /// `--plugins DIR`, added to the config's folders.
    pub fn plugin_dirs(mut self, dirs: impl IntoIterator<Item = PathBuf>) -> Self {
        self.plugin_dirs.extend(dirs);
        self
    }

    /// `--pipelines DIR`, added to the config's folders.
    pub fn pipeline_dirs(mut self, dirs: impl IntoIterator<Item = PathBuf>) -> Self {
        self.pipeline_dirs.extend(dirs);
        self
    }

    /// Adjusts every local engine's settings (a benchmark's A/B switches).
    pub fn local_engine(mut self, adjust: impl Fn(&mut LocalEngineConfig) + 'static) -> Self {
        self.local = Some(Box::new(adjust));
        self
    }

    /// The config with the overrides applied (what [`AppBuilder::build`] builds).
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn config_mut(&mut self) -> &mut Config {
        &mut self.config
    }

    /// Loads every model, the plugins and the pipelines. A plugin or pipeline file that
    /// fails is logged and skipped (one broken file does not stop the others); a missing
    /// plugin folder, a model that does not load, or a broken built-in is an error.
    pub fn build(self) -> Result<App, AppError> {
        let mut config = self.config;
        config.plugins.dirs.extend(self.plugin_dirs);
        config.pipelines.dirs.extend(self.pipeline_dirs);
        let mut models = models::load(&config, self.model.as_deref(), self.local.as_deref())?;
        // `[limits] max_tokens` bounds every request on every engine, whoever sets it (a
        // client, a pipeline file, a role plugin, `model.complete`).
        if let Some(cap) = config.limits.max_tokens {
            for model in &mut models {
                model.engine = crate::engine::capped(model.engine.clone(), cap);
            }
        }
        let default = models
            .iter()
            .find(|m| m.is_default)
            .map(|m| m.engine.clone())
            .ok_or_else(|| AppError::Engine {
                name: DEFAULT_MODEL.into(),
                source: EngineError::InvalidRequest(
                    "no default model: set `default_model` in staircase.toml".into(),
                ),
            })?;
        let mut host = HostConfig {
            engine: Some(default.clone()),
            grants: config
                .grants
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ..HostConfig::default()
        };
        config.sandbox.apply_to_host(&mut host);
        let registry = Registry::new(PluginRuntime::new(host)?);
        registry.load_builtins()?;
        let user_dir =
            crate::plugin::default_plugin_dir().filter(|d| config.plugins.user_dir && d.is_dir());
        let plugin_dirs: Vec<PathBuf> = user_dir
            .into_iter()
            .chain(config.plugins.dirs.iter().cloned())
            .collect();
        for dir in &plugin_dirs {
            load_plugin_dir(&registry, dir)?;
        }
        let mut table = Models::with_default(default);
        for model in &models {
            table.insert(model.name.clone(), model.engine.clone());
        }
        let runner = Arc::new(
            Runner::new(table, registry.clone())
                .with_limits(config.sandbox.run_limits())
                .with_guest_pool(Arc::new(config.sandbox.guest_pool()))
                .with_compression_threads(config.sandbox.compression_threads()),
        );
        let checker = runner.clone();
        let pipelines = PipelineTable::with_overrides(
            config.pipelines.dirs.clone(),
            Box::new(move |p: &Pipeline| checker.check(p)),
            config.sandbox.pipeline_overrides.clone(),
        )?;
        let launcher = Launcher::new(runner.clone(), registry.clone(), config.limits.max_tokens);
        Ok(App {
            config,
            models,
            plugin_dirs,
            registry,
            runner,
            launcher,
            pipelines,
            reloading: std::sync::Mutex::new(()),
            reload_queue: tokio::sync::Mutex::new(()),
        })
    }
}

impl Default for AppBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers a folder's plugins by manifest; each compiles when a run first uses it, so a run
/// never waits on a plugin it does not use (issue 17's compile-bomb class).
fn load_plugin_dir(registry: &Registry, dir: &Path) -> Result<(), AppError> {
    let loads = registry
        .load_dir_lazy(dir)
        .map_err(|source| AppError::PluginDir {
            dir: dir.to_path_buf(),
            source,
        })?;
    for (path, result) in loads {
        if let Err(error) = result {
            tracing::warn!(path = %path.display(), %error, "plugin not loaded");
        }
    }
    Ok(())
}

/// Everything a host runs, built once.
pub struct App {
    config: Config,
    models: Vec<ModelEntry>,
    plugin_dirs: Vec<PathBuf>,
    registry: Arc<Registry>,
    runner: Arc<Runner>,
    /// Every run of [`App::runner`] starts here.
    launcher: Launcher,
    pipelines: Arc<PipelineTable>,
    /// Held by a forced rescan ([`App::reload`]).
    reloading: std::sync::Mutex<()>,
    /// Held while a server's rescan waits its turn ([`App::reload_queued`]).
    reload_queue: tokio::sync::Mutex<()>,
}

/// What a forced rescan found.
#[derive(Debug, Default, serde::Serialize)]
pub struct ReloadSummary {
    pub plugins_rejected: Vec<String>,
    pub pipelines_rejected: Vec<String>,
}

impl App {
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The runner on every model, with policies from the registry's newest versions.
    pub fn runner(&self) -> &Arc<Runner> {
        &self.runner
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn pipelines(&self) -> &Arc<PipelineTable> {
        &self.pipelines
    }

    /// The engine pipelines call `default`.
    pub fn default_engine(&self) -> Arc<dyn Engine> {
        self.models
            .iter()
            .find(|m| m.is_default)
            .map(|m| m.engine.clone())
            .unwrap_or_else(|| self.models[0].engine.clone())
    }

    /// An engine by any name pipelines may use (a config name, `default`, or the model's own).
    pub fn engine(&self, name: &str) -> Option<Arc<dyn Engine>> {
        self.runner.models().get(name).cloned()
    }

    /// Every name [`App::engine`] answers to.
    pub fn model_names(&self) -> Vec<String> {
        self.runner.models().names()
    }

    /// The models as configured.
    pub fn models(&self) -> &[ModelEntry] {
        &self.models
    }

    /// A pipeline by name from the table, or a file read into it (a one-shot command's
    /// `--pipeline path.toml`).
    pub fn pipeline(&self, file_or_name: &str) -> Result<Arc<PipelineVersion>, SpecError> {
        if let Some(version) = self.pipelines.get(file_or_name) {
            return Ok(version);
        }
        let path = Path::new(file_or_name);
        if path.exists() {
            return self.pipelines.load_file(path);
        }
        let known: Vec<String> = self
            .pipelines
            .list()
            .iter()
            .map(|v| v.name.clone())
            .collect();
        Err(SpecError {
            origin: file_or_name.to_string(),
            line: None,
            kind: crate::pipeline::SpecErrorKind::Io(format!(
                "no such file, and no pipeline of that name (known: {})",
                known.join(", ")
            )),
        })
    }

    /// The one way in: prepares a run of the app's models ([`Launcher::prepare`]).
    pub async fn prepare(&self, spec: RunSpec) -> PreparedRun {
        self.launcher.prepare(spec).await
    }

    /// Where every run on the app's models starts.
    pub fn launcher(&self) -> &Launcher {
        &self.launcher
    }

    /// Runs on `engine` alone (a simulated backend, `llama-server` replicas) with
    /// everything the configuration bounds a run by: `[limits] max_tokens` on the engine and
    /// every node, the `[sandbox]` run limits, the policy pool and the compression threads.
    pub fn launcher_on(&self, engine: Arc<dyn Engine>) -> Launcher {
        let limits = &self.config.limits;
        let engine = match limits.max_tokens {
            Some(cap) => crate::engine::capped(engine, cap),
            None => engine,
        };
        let runner = Runner::new(Models::with_default(engine), self.registry.clone())
            .with_limits(self.config.sandbox.run_limits())
            .with_guest_pool(self.runner.guest_pool().clone())
            .with_compression_threads(self.config.sandbox.compression_threads());
        Launcher::new(Arc::new(runner), self.registry.clone(), limits.max_tokens)
    }

    /// A runner for one run of `pipeline` whose plugins are fixed to the versions serving
    /// now, and those versions (a benchmark that drives the runner itself).
    pub fn pinned_runner(&self, pipeline: &Pipeline) -> (Runner, Vec<PinnedPlugin>) {
        let pinned = Pinned::new(self.registry.clone(), pipeline);
        let versions = pinned.versions();
        (self.runner.with_policies(Arc::new(pinned)), versions)
    }

    /// The latest stats of every local engine, by model name.
    pub fn engine_stats(&self) -> Vec<(String, EngineStats)> {
        self.models
            .iter()
            .filter_map(|m| m.local_stats().map(|s| (m.name.clone(), s)))
            .collect()
    }

    /// Every remote model's per-replica figures, by model name.
    pub fn replica_stats(&self) -> Vec<(String, Vec<ReplicaStats>)> {
        self.models
            .iter()
            .filter_map(|m| m.replica_stats().map(|s| (m.name.clone(), s)))
            .collect()
    }

    /// Waits until no local engine holds or queues a request (or `timeout` passes, then
    /// returns the stats that were not idle). Tests use this instead of sleeping.
    pub fn wait_idle(&self, timeout: Duration) -> Result<(), Vec<(String, EngineStats)>> {
        let busy: Vec<(String, EngineStats)> = self
            .models
            .iter()
            .filter_map(|m| m.wait_idle(timeout).map(|s| (m.name.clone(), s)))
            .collect();
        if busy.is_empty() { Ok(()) } else { Err(busy) }
    }

    /// Watches the plugin and pipeline folders and swaps changes in.
    pub fn watch(&self) -> Result<(), AppError> {
        self.registry
            .watch(&self.plugin_dirs)
            .map_err(|e| AppError::Watch {
                what: "plugin folders",
                reason: e.to_string(),
            })?;
        self.pipelines.watch().map_err(|e| AppError::Watch {
            what: "pipeline folders",
            reason: e.to_string(),
        })
    }

    /// [`App::reload`] for a server: callers wait their turn without holding a thread, and
    /// one rescan at a time runs on a blocking thread (a storm of requests costs one
    /// thread, not one each).
    pub async fn reload_queued(self: Arc<Self>) -> Result<ReloadSummary, String> {
        let _turn = self.reload_queue.lock().await;
        let app = self.clone();
        tokio::task::spawn_blocking(move || app.reload())
            .await
            .map_err(|e| e.to_string())
    }

    /// Reads every plugin and pipeline folder again. Reloads run one at a time (a storm of
    /// them waits in line), and an unchanged file is not compiled again. Blocking.
    pub fn reload(&self) -> ReloadSummary {
        let _one_at_a_time = crate::sync::lock(&self.reloading);
        let mut summary = ReloadSummary::default();
        for dir in &self.plugin_dirs {
            match self.registry.load_dir(dir) {
                Ok(loads) => summary.plugins_rejected.extend(
                    loads
                        .into_iter()
                        .filter_map(|(_, r)| r.err().map(|e| e.to_string())),
                ),
                Err(error) => summary.plugins_rejected.push(error.to_string()),
            }
        }
        summary.pipelines_rejected = self
            .pipelines
            .rescan()
            .into_iter()
            .map(|e| e.to_string())
            .collect();
        summary
    }

    /// The plugin folders loaded (the user's, when it exists, first).
    pub fn plugin_dirs(&self) -> &[PathBuf] {
        &self.plugin_dirs
    }
}
