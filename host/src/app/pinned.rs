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
    AggregatorInstance, CompressorInstance, LoadedPlugin, PluginError, Registry, RoleInstance,
    RouterInstance,
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

/// The plugins of one run, by name.
pub struct Pinned {
    registry: Arc<Registry>,
    plugins: BTreeMap<String, Arc<LoadedPlugin>>,
}

impl Pinned {
    /// The versions now serving every plugin `pipeline` names (routers and their models
    /// included). A name with no plugin is left out: the run's check reports it.
    pub fn new(registry: Arc<Registry>, pipeline: &Pipeline) -> Self {
        let plugins = pipeline
            .nodes
            .iter()
            .filter_map(|n| registry.get(&n.plugin).map(|p| (n.plugin.clone(), p)))
            .chain(pipeline.nodes.iter().filter_map(|n| match &n.model {
                crate::pipeline::spec::ModelBinding::Routed { router, .. } => {
                    registry.get(router).map(|p| (router.clone(), p))
                }
                _ => None,
            }))
            .collect();
        Self { registry, plugins }
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
        self.plugins.get(name).ok_or_else(|| PluginError::NotFound {
            name: name.to_string(),
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

    fn kind_of(&self, plugin: &str) -> Option<PluginKind> {
        self.plugins.get(plugin).map(|p| p.kind())
    }
}
