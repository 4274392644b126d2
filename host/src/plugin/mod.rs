//! The WebAssembly plugin host: sandbox, loading, compiled-code cache and hot reload.
//!
//! Every agent policy (role, aggregator, compressor, router, guard) is a component exporting one
//! world of `wit/v0.1.0/agent.wit`. This room owns wasmtime: one [`PluginRuntime`] (one
//! `wasmtime::Engine`, pooling allocator, epoch ticker, linker with the host imports), the
//! on-disk compiled-code cache, and the [`Registry`] that loads, type-checks, canaries and
//! hot-swaps plugins. The pipeline sees plugins only through the traits of
//! [`crate::policy`], which the registry provides; nothing outside this module
//! touches wasmtime. It must not know about pipelines beyond those traits, and never runs a
//! guest call without a deadline.

mod bindings;
pub mod builtin;
mod cache;
mod error;
pub mod folder;
mod guest_output;
mod host_imports;
mod instance;
mod limits;
pub mod manifest;
mod policies;
mod registry;
mod runtime;
mod wasi_io;

pub use error::{LimitExceeded, MAX_QUOTED_BYTES, PluginError, PluginRef, clip};
pub use limits::{CompileBudget, LogLimits};
pub use manifest::{BuildRecipe, Capability, Limits, Manifest};
pub use policies::{
    AggregatorInstance, CompressorInstance, GuardInstance, RoleInstance, RouterInstance,
};
pub use registry::{
    FileLoad, FileRegistration, PluginSummary, Registry, RegistryEvent, load_files, manifest_path,
    read_manifest,
};
pub use runtime::{HostConfig, LoadedPlugin, PluginRuntime};

/// The user's plugin folder (`staircase plugin list` reads it when it exists).
pub fn default_plugin_dir() -> Option<std::path::PathBuf> {
    dirs::data_dir().map(|d| d.join("staircase").join("plugins"))
}
