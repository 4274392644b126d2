//! The default runner: the local engine on a GGUF model and the plugin registry with the
//! built-in plugins. The CLI, the server and the tests assemble a runner here, the one
//! place in `pipeline/` that names concrete engine and plugin types.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::runtime::{Models, Runner};
use crate::engine::local::{LocalEngine, LocalEngineConfig};
use crate::engine::{Engine, EngineError};
use crate::model::ModelError;
use crate::plugin::{HostConfig, PluginError, PluginRuntime, Registry};

/// Why the default runner could not be assembled. The message names the stage; the cause
/// follows as the error's source.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("getting the model")]
    Model(#[from] ModelError),
    #[error("loading the model")]
    Engine(#[from] EngineError),
    #[error("loading the built-in plugins")]
    Plugin(#[from] PluginError),
    #[error("loading plugins from {dir}")]
    PluginDir {
        dir: PathBuf,
        #[source]
        source: PluginError,
    },
}

/// A runner and the engine under it.
pub struct DefaultRunner {
    pub runner: Runner,
    pub engine: Arc<dyn Engine>,
    /// The same engine, for what only the local engine tells (live sequences, KV use).
    pub local: Arc<LocalEngine>,
    pub registry: Arc<Registry>,
}

/// The engine with `config`, and a registry with the built-ins (whose plugins count tokens
/// and, when granted, call the model through that engine), then the user's plugin folder when
/// it exists, then `plugin_dirs`. Folder plugins are compiled on first use, so a run never
/// waits on one it does not use; one that fails to load is logged and skipped, so one broken
/// plugin does not stop pipelines that do not use it; a missing folder is an error.
pub fn open_with(
    config: LocalEngineConfig,
    plugin_dirs: &[PathBuf],
) -> Result<DefaultRunner, SetupError> {
    let local = Arc::new(LocalEngine::load(config)?);
    let engine: Arc<dyn Engine> = local.clone();
    let registry = Registry::new(PluginRuntime::new(HostConfig {
        engine: Some(engine.clone()),
        ..HostConfig::default()
    })?);
    registry.load_builtins()?;
    let user_dir = crate::plugin::default_plugin_dir().filter(|d| d.is_dir());
    for dir in user_dir.iter().chain(plugin_dirs) {
        // Registered by manifest; compiled when a run first uses one.
        let loads = registry
            .load_dir_lazy(dir)
            .map_err(|source| SetupError::PluginDir {
                dir: dir.clone(),
                source,
            })?;
        for (path, result) in loads {
            if let Err(error) = result {
                tracing::warn!(path = %path.display(), %error, "plugin not loaded");
            }
        }
    }
    let runner = Runner::new(Models::with_default(engine.clone()), registry.clone());
    Ok(DefaultRunner {
        runner,
        engine,
        local,
        registry,
    })
}

/// [`open_with`] on `model`, or on the default model (fetched on first use) when `None`.
pub fn open(model: Option<&Path>, plugin_dirs: &[PathBuf]) -> Result<DefaultRunner, SetupError> {
    let path = match model {
        Some(path) => path.to_path_buf(),
        None => crate::model::default_model_path()?,
    };
    open_with(LocalEngineConfig::new(path), plugin_dirs)
}
