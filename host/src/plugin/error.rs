//! Typed plugin errors. Every variant names the plugin and version it concerns, so a log
//! line or an HTTP error is enough to find the culprit.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::pipeline::policy::{PluginKind, PolicyError};

/// A plugin by name and version, as its manifest declares them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PluginRef {
    pub name: String,
    pub version: String,
}

impl fmt::Display for PluginRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// What went wrong with a plugin.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin {plugin}: `{call}` exceeded its deadline of {deadline:?}")]
    Timeout {
        plugin: PluginRef,
        call: &'static str,
        deadline: Duration,
    },
    #[error("plugin {plugin}: out of memory in `{call}` (limit {limit_mib} MiB)")]
    OutOfMemory {
        plugin: PluginRef,
        call: &'static str,
        limit_mib: u32,
    },
    #[error("plugin {plugin}: trapped in `{call}`: {kind}")]
    Trap {
        plugin: PluginRef,
        call: &'static str,
        /// wasmtime's trap description, e.g. "call stack exhausted" or "wasm `unreachable`
        /// instruction executed" (what a guest panic becomes).
        kind: String,
    },
    #[error("plugin {plugin}: `{call}` returned {bytes} bytes, over the limit of {limit} bytes")]
    OutputTooLarge {
        plugin: PluginRef,
        call: &'static str,
        bytes: usize,
        limit: usize,
    },
    #[error("plugin {plugin}: `{call}` returned an invalid answer: {reason}")]
    InvalidOutput {
        plugin: PluginRef,
        call: &'static str,
        reason: String,
    },
    #[error("plugin {plugin}: `{call}` failed: {message}")]
    Refused {
        plugin: PluginRef,
        call: &'static str,
        message: String,
    },
    #[error("plugin {plugin}: its instance trapped earlier and was dropped; start a new run")]
    Poisoned { plugin: PluginRef },
    #[error(
        "plugin {plugin}: incompatible interface (expected the `{expected:?}` world of staircase:agent@0.1.0): {reason}"
    )]
    IncompatibleInterface {
        plugin: PluginRef,
        expected: PluginKind,
        reason: String,
    },
    #[error("plugin {plugin}: invalid component: {reason}")]
    InvalidComponent { plugin: PluginRef, reason: String },
    #[error(
        "plugin {plugin}: asks for capability `{capability}`, which the host configuration does not grant to it"
    )]
    CapabilityNotGranted {
        plugin: PluginRef,
        capability: crate::plugin::Capability,
    },
    #[error("plugin {plugin}: asks for {what} of {asked}, over the host's maximum of {max}")]
    LimitTooHigh {
        plugin: PluginRef,
        what: &'static str,
        asked: u32,
        max: u32,
    },
    #[error("plugin {plugin}: instantiation failed: {reason}")]
    Instantiate { plugin: PluginRef, reason: String },
    #[error("plugin {plugin}: self-test failed: {reason}")]
    SelfTest { plugin: PluginRef, reason: String },
    #[error("manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        /// Not a `#[source]`: the message already carries it, and a source would make
        /// error chains print it twice.
        error: std::io::Error,
    },
    #[error("no plugin named `{name}` is loaded")]
    NotFound { name: String },
    #[error("plugin {plugin} is a {actual:?} plugin, not a {expected:?}")]
    WrongKind {
        plugin: PluginRef,
        expected: PluginKind,
        actual: PluginKind,
    },
    #[error("plugin runtime: {0}")]
    Runtime(String),
}

impl From<PluginError> for PolicyError {
    fn from(error: PluginError) -> Self {
        PolicyError(error.to_string())
    }
}
