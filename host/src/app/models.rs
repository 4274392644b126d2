//! The models table: one engine per named model of `staircase.toml`. The one place that
//! constructs engines, so a new backend kind is one match arm here.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::AppError;
use super::config::{Config, ModelConfig};
use crate::engine::Engine;
use crate::engine::local::{EngineStats, LocalEngine, LocalEngineConfig};
use crate::engine::remote::{RemoteEngine, ReplicaStats};
use crate::pipeline::spec::DEFAULT_MODEL;

/// One named model and its engine.
pub struct ModelEntry {
    pub name: String,
    pub engine: Arc<dyn Engine>,
    /// Pipelines call this one `default`.
    pub is_default: bool,
    /// The same engine when it is local, for what only a local engine tells.
    local: Option<Arc<LocalEngine>>,
    /// The same engine when it is remote, for its replicas' figures.
    remote: Option<Arc<RemoteEngine>>,
}

impl ModelEntry {
    /// The same engine when it is local, for its stats (tests wait on them).
    pub fn local(&self) -> Option<&Arc<LocalEngine>> {
        self.local.as_ref()
    }

    /// The local engine's stats (`None` for other kinds).
    pub fn local_stats(&self) -> Option<EngineStats> {
        self.local.as_ref().map(|l| l.stats())
    }

    /// The same engine when it is remote, for its replicas and health checks.
    pub fn remote(&self) -> Option<&Arc<RemoteEngine>> {
        self.remote.as_ref()
    }

    /// A remote engine's per-replica figures (`None` for other kinds).
    pub fn replica_stats(&self) -> Option<Vec<ReplicaStats>> {
        self.remote.as_ref().map(|r| r.replica_stats())
    }

    /// Waits until the engine holds and queues nothing: `None` then, or the stats of a
    /// local engine still busy when `timeout` passed.
    pub(super) fn wait_idle(&self, timeout: Duration) -> Option<EngineStats> {
        let local = self.local.as_ref()?;
        match local.wait_for_stats(timeout, |s| {
            s.live_sequences == 0 && s.queued == 0 && s.locked_prefixes == 0
        }) {
            Some(_) => None,
            None => Some(local.stats()),
        }
    }
}

/// Loads every model of the config; with none, one local `default` on the default model.
/// `model_override` (`--model`) replaces the default model's file.
pub(super) fn load(
    config: &Config,
    model_override: Option<&Path>,
    adjust: Option<&dyn Fn(&mut LocalEngineConfig)>,
) -> Result<Vec<ModelEntry>, AppError> {
    let mut table = config.models.clone();
    if table.is_empty() {
        table.insert(
            DEFAULT_MODEL.to_string(),
            ModelConfig::Local {
                path: None,
                catalogue: None,
                threads: None,
                context_tokens: None,
            },
        );
    }
    let default_name = config
        .default_model_name()
        .map(str::to_string)
        .or_else(|| table.keys().next().cloned())
        .unwrap_or_else(|| DEFAULT_MODEL.to_string());
    let mut entries = Vec::new();
    for (name, model) in table {
        let is_default = name == default_name;
        let entry = match model {
            ModelConfig::Local {
                path,
                catalogue,
                threads,
                context_tokens,
            } => {
                let path = match (is_default.then_some(model_override).flatten(), path) {
                    (Some(over), _) => over.to_path_buf(),
                    (None, Some(path)) => path,
                    // A catalogue model is pulled on first use, as the default model is.
                    (None, None) => match catalogue {
                        Some(name) => crate::model::model_path(crate::model::find(&name)?)?,
                        None => crate::model::default_model_path()?,
                    },
                };
                let mut local_config = LocalEngineConfig::new(path);
                local_config.threads = threads.or(local_config.threads);
                local_config.context_tokens = context_tokens.or(local_config.context_tokens);
                if let Some(adjust) = adjust {
                    adjust(&mut local_config);
                }
                let local = Arc::new(LocalEngine::load(local_config).map_err(|source| {
                    AppError::Engine {
                        name: name.clone(),
                        source,
                    }
                })?);
                ModelEntry {
                    name,
                    engine: local.clone(),
                    is_default,
                    local: Some(local),
                    remote: None,
                }
            }
            ModelConfig::Remote(remote) => {
                let engine = Arc::new(RemoteEngine::open(&name, *remote).map_err(|source| {
                    AppError::Engine {
                        name: name.clone(),
                        source,
                    }
                })?);
                ModelEntry {
                    name,
                    engine: engine.clone(),
                    is_default,
                    local: None,
                    remote: Some(engine),
                }
            }
        };
        entries.push(entry);
    }
    Ok(entries)
}
