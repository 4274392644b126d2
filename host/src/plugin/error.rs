//! Typed plugin errors. Every variant names the plugin and version it concerns, so a log
//! line or an HTTP error is enough to find the culprit.

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::policy::{PluginKind, PolicyError};

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

/// Longest piece of a plugin-supplied string quoted in an error: enough to recognise it, and
/// a 15 MiB model name costs the log 512 bytes, not 45 MiB.
pub const MAX_QUOTED_BYTES: usize = 512;

/// Longest error detail that may carry plugin-influenced text (a trap's backtrace names the
/// guest's functions, a validation error quotes its bytes).
pub const MAX_ERROR_DETAIL_BYTES: usize = 2048;

/// A string a plugin supplied, as it may enter an error or a log line: at most `max` bytes
/// (cut at a character boundary), with the full length noted when it was cut. Every place
/// that quotes plugin text goes through here.
pub fn clip(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… ({} bytes in all)", &text[..end], text.len()))
}

/// A host limit a plugin's call ran into: what was bounded, the bound, and what the plugin
/// asked for. Host functions fail with it (as a trap), and the call's error names it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {asked} is over the limit of {limit}")]
pub struct LimitExceeded {
    pub what: &'static str,
    pub limit: u64,
    pub asked: u64,
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
    #[error("plugin {plugin}: `{call}` ran into a host limit: {limit}")]
    LimitExceeded {
        plugin: PluginRef,
        call: &'static str,
        /// Boxed: errors travel in `Result`s on every call path.
        limit: Box<LimitExceeded>,
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
    #[error(
        "plugin {plugin} from {path}: its name belongs to a built-in plugin; \
         list the name in the host's `overrides` to replace the built-in"
    )]
    ReservedName { plugin: PluginRef, path: PathBuf },
    #[error("plugin {plugin}: the component is {bytes} bytes, over the maximum of {limit} bytes")]
    ComponentTooLarge {
        plugin: PluginRef,
        bytes: usize,
        limit: usize,
    },
    #[error(
        "plugin {plugin}: compiling did not finish within its budget of {budget:?} \
         (a component of {bytes} bytes)"
    )]
    CompileTimeout {
        plugin: PluginRef,
        bytes: usize,
        budget: Duration,
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
    #[error("plugin `{name}` is not available: {reason}")]
    Unavailable { name: String, reason: String },
    #[error(
        "{path}: declares the name `{name}`, which {other} serves; a plugin is its file, so \
         the first file keeps the name (rename one of them)"
    )]
    NameTaken {
        name: String,
        path: PathBuf,
        other: PathBuf,
    },
    #[error("{path}: failed before and has not changed since: {reason}")]
    KnownBad { path: PathBuf, reason: String },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_keeps_short_text_and_cuts_long_text_at_a_char_boundary() {
        assert_eq!(clip("short", 10), "short");
        let long = "é".repeat(100);
        let clipped = clip(&long, 5);
        assert!(clipped.starts_with("éé…"), "{clipped}");
        assert!(clipped.ends_with("(200 bytes in all)"), "{clipped}");
        assert!(clip(&"x".repeat(15 << 20), MAX_QUOTED_BYTES).len() < MAX_QUOTED_BYTES + 64);
    }
}
