//! One run's plugin versions, fixed when the run starts.
//!
//! The registry opens every instance on the newest version, so nodes of one run that start
//! at different moments could straddle a hot swap. A [`Pinned`] provider takes the version
//! serving each of a pipeline's plugins once, before the run, and opens every node's
//! instance on it: a run sees one consistent set of versions, and the server can say which.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::engine::ChatMessage;
use crate::pipeline::Pipeline;
use crate::plugin::{
    AggregatorInstance, CompressorInstance, GuardInstance, LoadedPlugin, PluginError, Registry,
    RoleInstance, RouterInstance,
};
use crate::policy::{
    AggregatorSession, CompressorPolicy, PluginConfig, PluginKind, PolicyError, PolicyProvider,
    RolePolicy, RouterPolicy, Source, StreamMode,
};

/// A plugin version a run used, for reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PinnedPlugin {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

impl PinnedPlugin {
    /// `name@version:sha-prefix`, as fingerprints name a plugin.
    pub fn label(&self) -> String {
        format!("{}@{}:{}", self.name, self.version, &self.sha256[..12])
    }
}

/// The plugins of one run, by name.
pub struct Pinned {
    registry: Arc<Registry>,
    plugins: BTreeMap<String, Arc<LoadedPlugin>>,
    /// Names whose plugin could not be had (a failed compile), with why: a node using one
    /// fails with this reason.
    unavailable: BTreeMap<String, String>,
}

/// Every plugin name a run of `pipeline` uses: its nodes', their routers', their history
/// compressors' and their inner-edge guards'. Its output guards are the front end's, pinned with the other guards on the
/// answer ([`Pinned::of`]).
pub fn plugin_names(pipeline: &Pipeline) -> Vec<String> {
    let mut names: Vec<String> = pipeline
        .nodes
        .iter()
        .flat_map(|n| {
            let router = match &n.model {
                crate::pipeline::spec::ModelBinding::Routed { router, .. } => Some(router),
                _ => None,
            };
            let compressor = n.history.as_ref().map(|h| &h.compressor);
            let guards = n.guards.iter().map(|g| &g.plugin);
            std::iter::once(&n.plugin)
                .chain(router)
                .chain(compressor)
                .chain(guards)
        })
        .cloned()
        .collect();
    names.sort();
    names.dedup();
    names
}

impl Pinned {
    /// The versions now serving every plugin `pipeline` names (routers and history
    /// compressors included). A name with no plugin is left out: the run's check reports it.
    /// A name still waiting for its first compile compiles now (blocking: a server awaits
    /// [`Registry::compiled`] first, so it never does).
    pub fn new(registry: Arc<Registry>, pipeline: &Pipeline) -> Self {
        Self::of(registry, plugin_names(pipeline))
    }

    /// The versions now serving the plugins `names`.
    pub fn of(registry: Arc<Registry>, names: impl IntoIterator<Item = String>) -> Self {
        let mut plugins = BTreeMap::new();
        let mut unavailable = BTreeMap::new();
        for name in names {
            match registry.resolve(&name) {
                Ok(plugin) => {
                    plugins.insert(name, plugin);
                }
                Err(PluginError::NotFound { .. }) => {}
                Err(error) => {
                    unavailable.insert(name, error.to_string());
                }
            }
        }
        Self {
            registry,
            plugins,
            unavailable,
        }
    }

    /// What this run uses, sorted by name.
    pub fn versions(&self) -> Vec<PinnedPlugin> {
        self.plugins
            .values()
            .map(|p| PinnedPlugin {
                name: p.manifest.name.clone(),
                version: p.manifest.version.clone(),
                sha256: p.sha256.clone(),
            })
            .collect()
    }

    fn get(&self, name: &str) -> Result<&Arc<LoadedPlugin>, PluginError> {
        self.plugins
            .get(name)
            .ok_or_else(|| match self.unavailable.get(name) {
                Some(reason) => PluginError::Unavailable {
                    name: name.to_string(),
                    reason: reason.clone(),
                },
                None => PluginError::NotFound {
                    name: name.to_string(),
                },
            })
    }
}

impl PolicyProvider for Pinned {
    fn role(
        &self,
        plugin: &str,
        config: &PluginConfig,
    ) -> Result<Box<dyn RolePolicy>, PolicyError> {
        Ok(Box::new(RoleInstance::with_config(
            self.registry.runtime(),
            self.get(plugin)?,
            config,
        )?))
    }

    fn aggregator(
        &self,
        plugin: &str,
        config: &PluginConfig,
        conversation: &[ChatMessage],
        sources: &[Source],
        mode: StreamMode,
    ) -> Result<Box<dyn AggregatorSession>, PolicyError> {
        Ok(Box::new(AggregatorInstance::with_config(
            self.registry.runtime(),
            self.get(plugin)?,
            config,
            conversation,
            sources,
            mode,
        )?))
    }

    fn compressor(&self, plugin: &str) -> Result<Box<dyn CompressorPolicy>, PolicyError> {
        Ok(Box::new(CompressorInstance::new(
            self.registry.runtime(),
            self.get(plugin)?,
        )?))
    }

    fn router(
        &self,
        plugin: &str,
        config: &PluginConfig,
    ) -> Result<Box<dyn RouterPolicy>, PolicyError> {
        Ok(Box::new(RouterInstance::with_config(
            self.registry.runtime(),
            self.get(plugin)?,
            config,
        )?))
    }

    fn guard(
        &self,
        plugin: &str,
        config: &PluginConfig,
        info: &crate::guard::StreamInfo,
    ) -> Result<Box<dyn crate::guard::GuardSession>, PolicyError> {
        Ok(Box::new(GuardInstance::with_config(
            self.registry.runtime(),
            self.get(plugin)?,
            config,
            info,
        )?))
    }

    fn kind_of(&self, plugin: &str) -> Option<PluginKind> {
        // Names this run did not pin (its failed compiles, and the answer's output guards,
        // which the front end pins with the chain) answer from the registry.
        match self.plugins.get(plugin) {
            Some(p) => Some(p.kind()),
            None => self.registry.kind_of(plugin),
        }
    }
}
