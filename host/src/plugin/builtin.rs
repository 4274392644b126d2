//! The built-in plugins, compiled from `plugins/` by the build script and embedded in the
//! binary with their manifests.

use std::path::{Path, PathBuf};

/// One embedded plugin.
pub struct Builtin {
    /// The guest crate it was built from.
    pub name: &'static str,
    pub wasm: &'static [u8],
    /// Its `plugin.toml`.
    pub manifest: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/builtin_plugins.rs"));

/// A component the guest build produced (built-in or test fixture), by crate name.
pub fn guest_artifact(crate_name: &str) -> PathBuf {
    Path::new(GUEST_ARTIFACTS).join(format!("{}.wasm", crate_name.replace('-', "_")))
}

/// The manifest of a guest crate of this repository, by its folder under `plugins/`.
pub fn guest_manifest(crate_dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins")
        .join(crate_dir)
        .join("plugin.toml")
}
