//! The plugin manifest: what a plugin says about itself (name, version, kind, the
//! capabilities it asks for, its resource limits). It sits beside the component as
//! `NAME.toml` next to `NAME.wasm`, or is embedded in the host binary for built-in plugins.
//! Parsing only; granting capabilities is the runtime's job.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{MAX_ERROR_DETAIL_BYTES, MAX_QUOTED_BYTES, clip};
use crate::policy::PluginKind;

/// Longest name and version: they appear in every status line, metric label and error.
pub const MAX_NAME_BYTES: usize = 64;

/// A capability a plugin may ask for; the operator grants it in the host configuration.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// The `model` import: run the plugin's model to completion.
    Model,
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Capability::Model => f.write_str("model"),
        }
    }
}

/// Linear memory a plugin gets when its manifest names none: plenty for a Rust policy.
pub const DEFAULT_MEMORY_MIB: u32 = 64;
/// Wall time of one call when the manifest names none: a policy call sits on the path of
/// every chunk, so anything slower is a bug.
pub const DEFAULT_CALL_MS: u32 = 100;

/// Resource limits a plugin asks for (the operator's maxima cap them at load).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Limits {
    /// Linear memory of one instance, in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Wall time of one call into the plugin, in milliseconds.
    #[serde(default = "default_call_ms")]
    pub call_ms: u32,
    /// A guard's hold-back window, in bytes (other kinds ignore it): the most text the host
    /// holds for it, up to [`crate::guard::MAX_WINDOW_BYTES`].
    #[serde(default = "default_window_bytes")]
    pub window_bytes: u32,
}

fn default_memory_mib() -> u32 {
    DEFAULT_MEMORY_MIB
}

fn default_call_ms() -> u32 {
    DEFAULT_CALL_MS
}

fn default_window_bytes() -> u32 {
    crate::guard::DEFAULT_WINDOW_BYTES as u32
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mib: DEFAULT_MEMORY_MIB,
            call_ms: DEFAULT_CALL_MS,
            window_bytes: default_window_bytes(),
        }
    }
}

impl Limits {
    pub fn memory_bytes(&self) -> usize {
        (self.memory_mib as usize) << 20
    }

    pub fn call_deadline(&self) -> Duration {
        Duration::from_millis(u64::from(self.call_ms))
    }
}

/// What a plugin says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The name pipelines use for it; unique among loaded plugins.
    pub name: String,
    /// Its version, reported in errors and logs.
    pub version: String,
    pub kind: PluginKind,
    #[serde(default)]
    pub capabilities: BTreeSet<Capability>,
    #[serde(default)]
    pub limits: Limits,
    /// How `staircase plugin build` makes the component, when not from a known language's
    /// files; the host itself never runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildRecipe>,
}

/// A manifest's `[build]` table (Spin's way): any toolchain that writes a component.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BuildRecipe {
    /// A shell command run in the manifest's folder; it must write `NAME.wasm` there.
    pub command: String,
}

/// Why a manifest was not accepted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ManifestError(pub String);

impl Manifest {
    /// Parses a manifest from TOML text.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        // The parser quotes the offending line, which the file's author chose.
        let manifest: Manifest = toml::from_str(text).map_err(|e| {
            ManifestError(clip(&e.to_string(), MAX_ERROR_DETAIL_BYTES).into_owned())
        })?;
        if manifest.name.is_empty()
            || manifest.name.len() > MAX_NAME_BYTES
            || !manifest
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ManifestError(format!(
                "name {:?} must be 1 to {MAX_NAME_BYTES} ASCII letters, digits, '-' or '_'",
                clip(&manifest.name, MAX_QUOTED_BYTES)
            )));
        }
        if manifest.version.is_empty() || manifest.version.len() > MAX_NAME_BYTES {
            return Err(ManifestError(format!(
                "version must be 1 to {MAX_NAME_BYTES} bytes"
            )));
        }
        let limits = manifest.limits;
        if limits.memory_mib == 0 || limits.call_ms == 0 || limits.window_bytes == 0 {
            return Err(ManifestError("limits must be positive".into()));
        }
        if limits.window_bytes as usize > crate::guard::MAX_WINDOW_BYTES {
            return Err(ManifestError(format!(
                "window-bytes {} is over the host's maximum of {}",
                limits.window_bytes,
                crate::guard::MAX_WINDOW_BYTES
            )));
        }
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_manifest() {
        let m = Manifest::parse(
            "name = \"x\"\nversion = \"1.0.0\"\nkind = \"compressor\"\ncapabilities = [\"model\"]\n[limits]\nmemory-mib = 8\ncall-ms = 20\n",
        )
        .unwrap();
        assert_eq!(m.kind, PluginKind::Compressor);
        assert!(m.capabilities.contains(&Capability::Model));
        assert_eq!(m.limits.memory_bytes(), 8 << 20);
    }

    #[test]
    fn rejects_unknown_capabilities_and_bad_names() {
        let unknown = Manifest::parse(
            "name = \"x\"\nversion = \"1\"\nkind = \"role\"\ncapabilities = [\"network\"]\n",
        );
        assert!(unknown.unwrap_err().0.contains("network"));
        let bad = Manifest::parse("name = \"a b\"\nversion = \"1\"\nkind = \"role\"\n");
        assert!(bad.unwrap_err().0.contains("a b"));
    }
}
