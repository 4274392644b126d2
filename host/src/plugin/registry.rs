//! The registry: which loaded plugin serves each name, and hot reload.
//!
//! Plugins come from the binary (built-ins) and from watched folders (`NAME.wasm` with its
//! manifest `NAME.toml` beside it). The name table is swapped atomically (`arc-swap`); a run
//! holds an `Arc` of the version it started on, so replacing or removing a plugin never
//! disturbs a run in flight, and a removed version is freed when its last run ends. A new
//! version replaces the old one only after it compiled, type-checked and passed its canary;
//! otherwise it is rejected with a logged reason and the old one keeps serving.
//!
//! A folder can also be registered lazily ([`Registry::load_dir_lazy`], what `staircase run`
//! does): only manifests are read, and a plugin is compiled when a run first asks for it, so
//! a run never waits on compiling a plugin it does not use. A user plugin may not take a
//! built-in's name unless the host configuration lists that name in `overrides`; either way
//! the decision is logged at warn level with both sources.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};

use super::builtin;
use super::error::PluginError;
use super::manifest::Manifest;
use super::policies::{AggregatorInstance, CompressorInstance, RoleInstance, RouterInstance};
use super::runtime::{LoadedPlugin, PluginRuntime};
use crate::engine::ChatMessage;
use crate::policy::{
    AggregatorSession, CompressorPolicy, PluginConfig, PluginKind, PolicyError, PolicyProvider,
    RolePolicy, RouterPolicy, Source, StreamMode,
};

/// Quiet time after the last file event before reloading: editors and `cp` write a file in
/// several events, and a swap must not start on a half-written file. Small against the
/// 100 ms swap target.
pub const DEBOUNCE: Duration = Duration::from_millis(20);

/// What the registry did, for logs, tests and benchmarks.
#[derive(Clone, Debug)]
pub enum RegistryEvent {
    /// A version now serves its name.
    Loaded {
        plugin: super::PluginRef,
        path: Option<PathBuf>,
        sha256: String,
        from_cache: bool,
        /// From the first file event (or the load call) to the swap.
        elapsed: Duration,
    },
    /// A file was not loaded; the previous version, if any, keeps serving.
    Rejected { path: PathBuf, error: String },
    /// A plugin's file was removed; the name no longer resolves (or falls back to the
    /// built-in of that name).
    Unloaded { name: String, path: PathBuf },
}

/// A file of a plugin folder and what loading it gave.
pub type FileLoad = (PathBuf, Result<Arc<LoadedPlugin>, PluginError>);
/// A file of a plugin folder and whether it was registered to load on first use.
pub type FileRegistration = (PathBuf, Result<(), PluginError>);

/// One line of `staircase plugin list`.
#[derive(Clone, Debug)]
pub struct PluginSummary {
    pub name: String,
    pub version: String,
    pub kind: PluginKind,
    /// `None` for built-in plugins.
    pub path: Option<PathBuf>,
    pub sha256: String,
}

struct Entry {
    plugin: Arc<LoadedPlugin>,
    path: Option<PathBuf>,
}

/// A plugin registered by its manifest, compiled on first use.
struct Lazy {
    path: PathBuf,
    kind: PluginKind,
    /// Held while compiling, so concurrent first users compile once.
    loading: Mutex<()>,
}

/// Loaded plugins by name, with hot reload. Implements [`PolicyProvider`].
pub struct Registry {
    runtime: PluginRuntime,
    table: ArcSwap<HashMap<String, Arc<Entry>>>,
    /// Plugins registered but not compiled yet; they win over `table` for their name.
    lazy: Mutex<HashMap<String, Arc<Lazy>>>,
    builtins: Mutex<HashMap<String, Arc<LoadedPlugin>>>,
    /// Serialises table updates (readers never wait).
    update: Mutex<()>,
    subscribers: Mutex<Vec<Sender<RegistryEvent>>>,
    watchers: Mutex<Vec<notify::RecommendedWatcher>>,
}

impl Registry {
    pub fn new(runtime: PluginRuntime) -> Arc<Self> {
        Arc::new(Self {
            runtime,
            table: ArcSwap::from_pointee(HashMap::new()),
            lazy: Mutex::new(HashMap::new()),
            builtins: Mutex::new(HashMap::new()),
            update: Mutex::new(()),
            subscribers: Mutex::new(Vec::new()),
            watchers: Mutex::new(Vec::new()),
        })
    }

    pub fn runtime(&self) -> &PluginRuntime {
        &self.runtime
    }

    /// Events from now on (loads, rejections, unloads).
    pub fn subscribe(&self) -> Receiver<RegistryEvent> {
        let (tx, rx) = mpsc::channel();
        lock(&self.subscribers).push(tx);
        rx
    }

    fn emit(&self, event: RegistryEvent) {
        match &event {
            RegistryEvent::Loaded {
                plugin,
                path,
                from_cache,
                elapsed,
                ..
            } => tracing::info!(
                %plugin, path = ?path, from_cache, ?elapsed, "plugin loaded"
            ),
            RegistryEvent::Rejected { path, error } => {
                tracing::error!(path = %path.display(), %error, "plugin rejected; the previous version keeps serving")
            }
            RegistryEvent::Unloaded { name, path } => {
                tracing::info!(name, path = %path.display(), "plugin unloaded")
            }
        }
        lock(&self.subscribers).retain(|tx| tx.send(event.clone()).is_ok());
    }

    /// Loads the plugins embedded in the binary.
    pub fn load_builtins(&self) -> Result<(), PluginError> {
        for builtin in builtin::BUILTINS {
            let started = Instant::now();
            let manifest =
                Manifest::parse(builtin.manifest).map_err(|e| PluginError::Manifest {
                    path: PathBuf::from(format!("<built-in {}>", builtin.name)),
                    reason: e.0,
                })?;
            let loaded = self.runtime.load(builtin.wasm, manifest)?;
            lock(&self.builtins).insert(loaded.manifest.name.clone(), loaded.clone());
            self.install(loaded.clone(), None);
            self.emit(RegistryEvent::Loaded {
                plugin: loaded.plugin.clone(),
                path: None,
                sha256: loaded.sha256.clone(),
                from_cache: loaded.from_cache,
                elapsed: started.elapsed(),
            });
        }
        Ok(())
    }

    /// Loads `NAME.wasm` with its manifest `NAME.toml` and makes it serve its name.
    pub fn load_file(&self, wasm_path: &Path) -> Result<Arc<LoadedPlugin>, PluginError> {
        self.reload(wasm_path, Instant::now())
    }

    /// Loads every `*.wasm` in a folder; failures are reported per file and do not stop
    /// the others.
    pub fn load_dir(&self, dir: &Path) -> Result<Vec<FileLoad>, PluginError> {
        Ok(wasm_files(dir)?
            .into_iter()
            .map(|path| {
                let result = self.load_file(&path);
                (path, result)
            })
            .collect())
    }

    /// Registers every `*.wasm` of a folder by its manifest, to be compiled when a run first
    /// asks for it. Returns the files registered and the ones refused (a bad manifest, a
    /// built-in's name).
    pub fn load_dir_lazy(&self, dir: &Path) -> Result<Vec<FileRegistration>, PluginError> {
        Ok(wasm_files(dir)?
            .into_iter()
            .map(|path| {
                let result = read_manifest(&manifest_path(&path))
                    .and_then(|manifest| {
                        self.check_name(&manifest, &path)?;
                        Ok(manifest)
                    })
                    .map(|manifest| {
                        lock(&self.lazy).insert(
                            manifest.name.clone(),
                            Arc::new(Lazy {
                                path: path.clone(),
                                kind: manifest.kind,
                                loading: Mutex::new(()),
                            }),
                        );
                    });
                if let Err(error) = &result {
                    self.emit(RegistryEvent::Rejected {
                        path: path.clone(),
                        error: error.to_string(),
                    });
                }
                (path, result)
            })
            .collect())
    }

    /// Names registered lazily and not compiled yet.
    pub fn pending(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.lazy).keys().cloned().collect();
        names.sort();
        names
    }

    /// Refuses a user plugin that would take a built-in's name, unless the host's
    /// `overrides` list that name; logs the decision with both sources.
    fn check_name(&self, manifest: &Manifest, path: &Path) -> Result<(), PluginError> {
        let name = &manifest.name;
        if !lock(&self.builtins).contains_key(name) {
            return Ok(());
        }
        let plugin = super::PluginRef {
            name: name.clone(),
            version: manifest.version.clone(),
        };
        if self.runtime.config().overrides.contains(name) {
            tracing::warn!(%plugin, builtin = "built-in", user = %path.display(), "a user plugin replaces the built-in of the same name (the host's overrides allow it)");
            return Ok(());
        }
        tracing::warn!(%plugin, builtin = "built-in", user = %path.display(), "refused: a user plugin may not take a built-in's name");
        Err(PluginError::ReservedName {
            plugin,
            path: path.to_path_buf(),
        })
    }

    /// Loads a file and swaps it in, or reports why not.
    fn reload(&self, wasm_path: &Path, since: Instant) -> Result<Arc<LoadedPlugin>, PluginError> {
        let loaded = read_manifest(&manifest_path(wasm_path))
            .and_then(|manifest| self.check_name(&manifest, wasm_path))
            .and_then(|()| load_from_disk(&self.runtime, wasm_path));
        match loaded {
            Ok(loaded) => {
                lock(&self.lazy).remove(&loaded.manifest.name);
                self.install(loaded.clone(), Some(wasm_path.to_path_buf()));
                self.emit(RegistryEvent::Loaded {
                    plugin: loaded.plugin.clone(),
                    path: Some(wasm_path.to_path_buf()),
                    sha256: loaded.sha256.clone(),
                    from_cache: loaded.from_cache,
                    elapsed: since.elapsed(),
                });
                Ok(loaded)
            }
            Err(error) => {
                self.emit(RegistryEvent::Rejected {
                    path: wasm_path.to_path_buf(),
                    error: error.to_string(),
                });
                Err(error)
            }
        }
    }

    fn install(&self, plugin: Arc<LoadedPlugin>, path: Option<PathBuf>) {
        let _guard = lock(&self.update);
        let mut table = HashMap::clone(&self.table.load());
        // A file that now declares another name stops serving its old one.
        if let Some(path) = &path {
            table.retain(|name, e| e.path.as_ref() != Some(path) || *name == plugin.manifest.name);
        }
        if let Some(old) = table.get(&plugin.manifest.name)
            && old.path != path
        {
            tracing::warn!(name = %plugin.manifest.name, old = ?old.path, new = ?path, "plugin name now served from another source (`None` is the built-in)");
        }
        table.insert(
            plugin.manifest.name.clone(),
            Arc::new(Entry { plugin, path }),
        );
        self.table.store(Arc::new(table));
    }

    fn unload(&self, wasm_path: &Path) {
        let _guard = lock(&self.update);
        let mut table = HashMap::clone(&self.table.load());
        let names: Vec<String> = table
            .iter()
            .filter(|(_, e)| e.path.as_deref() == Some(wasm_path))
            .map(|(name, _)| name.clone())
            .collect();
        if names.is_empty() {
            return;
        }
        for name in &names {
            table.remove(name);
            if let Some(builtin) = lock(&self.builtins).get(name) {
                table.insert(
                    name.clone(),
                    Arc::new(Entry {
                        plugin: builtin.clone(),
                        path: None,
                    }),
                );
            }
        }
        self.table.store(Arc::new(table));
        drop(_guard);
        for name in names {
            self.emit(RegistryEvent::Unloaded {
                name,
                path: wasm_path.to_path_buf(),
            });
        }
    }

    /// The version now serving `name` (compiling it first if it was registered lazily;
    /// `None` also when that compile failed).
    pub fn get(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.get_or_err(name).ok()
    }

    fn get_or_err(&self, name: &str) -> Result<Arc<LoadedPlugin>, PluginError> {
        let lazy = lock(&self.lazy).get(name).cloned();
        if let Some(lazy) = lazy {
            let _compiling = lock(&lazy.loading);
            // Another caller may have compiled it while this one waited.
            if lock(&self.lazy)
                .get(name)
                .is_some_and(|l| Arc::ptr_eq(l, &lazy))
            {
                let loaded = self.reload(&lazy.path, Instant::now());
                lock(&self.lazy).remove(name);
                loaded?;
            }
        }
        self.table
            .load()
            .get(name)
            .map(|e| e.plugin.clone())
            .ok_or_else(|| PluginError::NotFound {
                name: name.to_string(),
            })
    }

    /// A fresh role instance on the newest version of `name` (typed errors).
    pub fn open_role(&self, name: &str) -> Result<RoleInstance, PluginError> {
        RoleInstance::new(&self.runtime, &self.get_or_err(name)?)
    }

    /// A fresh role instance on the newest version of `name` with a pipeline node's
    /// settings (typed errors).
    pub fn open_role_with_config(
        &self,
        name: &str,
        config: &PluginConfig,
    ) -> Result<RoleInstance, PluginError> {
        RoleInstance::with_config(&self.runtime, &self.get_or_err(name)?, config)
    }

    /// A fresh aggregator session on the newest version of `name` (typed errors).
    pub fn open_aggregator(
        &self,
        name: &str,
        conversation: &[ChatMessage],
        sources: &[Source],
        mode: StreamMode,
    ) -> Result<AggregatorInstance, PluginError> {
        AggregatorInstance::new(
            &self.runtime,
            &self.get_or_err(name)?,
            conversation,
            sources,
            mode,
        )
    }

    /// [`Self::open_aggregator`] with a pipeline node's settings.
    pub fn open_aggregator_with_config(
        &self,
        name: &str,
        config: &PluginConfig,
        conversation: &[ChatMessage],
        sources: &[Source],
        mode: StreamMode,
    ) -> Result<AggregatorInstance, PluginError> {
        AggregatorInstance::with_config(
            &self.runtime,
            &self.get_or_err(name)?,
            config,
            conversation,
            sources,
            mode,
        )
    }

    /// A fresh compressor instance on the newest version of `name` (typed errors).
    pub fn open_compressor(&self, name: &str) -> Result<CompressorInstance, PluginError> {
        CompressorInstance::new(&self.runtime, &self.get_or_err(name)?)
    }

    /// A fresh router instance on the newest version of `name` (typed errors).
    pub fn open_router(&self, name: &str) -> Result<RouterInstance, PluginError> {
        RouterInstance::new(&self.runtime, &self.get_or_err(name)?)
    }

    pub fn list(&self) -> Vec<PluginSummary> {
        let table = self.table.load();
        let mut list: Vec<PluginSummary> = table
            .values()
            .map(|e| PluginSummary {
                name: e.plugin.manifest.name.clone(),
                version: e.plugin.manifest.version.clone(),
                kind: e.plugin.kind(),
                path: e.path.clone(),
                sha256: e.plugin.sha256.clone(),
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Watches folders for plugin files: new and changed `NAME.wasm`/`NAME.toml` pairs are
    /// reloaded after [`DEBOUNCE`], removed `NAME.wasm` files unloaded. Reloads run on a
    /// dedicated thread, never on the async runtime. Watching stops when the registry is
    /// dropped.
    pub fn watch(self: &Arc<Self>, dirs: &[PathBuf]) -> Result<(), PluginError> {
        let (tx, rx) = mpsc::channel::<(PathBuf, Instant)>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = event {
                    use notify::event::{AccessKind, AccessMode, EventKind};
                    // Reads are not changes; a close after writing is (it ends a `cp`).
                    if matches!(event.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write))
                    {
                        return;
                    }
                    let now = Instant::now();
                    for path in event.paths {
                        let _ = tx.send((path, now));
                    }
                }
            })
            .map_err(|e| PluginError::Runtime(format!("file watcher: {e}")))?;
        for dir in dirs {
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(|e| PluginError::Runtime(format!("watching {}: {e}", dir.display())))?;
        }
        lock(&self.watchers).push(watcher);
        let registry = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("plugin-reload".into())
            .spawn(move || reload_loop(registry, rx))
            .map_err(|e| PluginError::Runtime(format!("reload thread: {e}")))?;
        Ok(())
    }
}

/// Collects file events until [`DEBOUNCE`] passes without one, then reloads each touched
/// plugin once. Ends when the watcher (owned by the registry) is gone.
fn reload_loop(registry: Weak<Registry>, rx: Receiver<(PathBuf, Instant)>) {
    while let Ok((first, at)) = rx.recv() {
        let mut touched: BTreeMap<PathBuf, Instant> = BTreeMap::new();
        let mut note = |path: PathBuf, at: Instant| {
            if let Some(wasm) = plugin_file(&path) {
                touched.entry(wasm).or_insert(at);
            }
        };
        note(first, at);
        loop {
            match rx.recv_timeout(DEBOUNCE) {
                Ok((path, at)) => note(path, at),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        let Some(registry) = registry.upgrade() else {
            return;
        };
        for (wasm, since) in touched {
            if wasm.exists() {
                let _ = registry.reload(&wasm, since);
            } else {
                registry.unload(&wasm);
            }
        }
    }
}

/// The `*.wasm` files of a folder, sorted.
fn wasm_files(dir: &Path) -> Result<Vec<PathBuf>, PluginError> {
    let entries = std::fs::read_dir(dir).map_err(|error| PluginError::Io {
        path: dir.to_path_buf(),
        error,
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
        .collect();
    paths.sort();
    Ok(paths)
}

/// The plugin file a changed path belongs to (`x.wasm` for `x.wasm` and `x.toml`).
fn plugin_file(path: &Path) -> Option<PathBuf> {
    match path.extension()?.to_str()? {
        "wasm" => Some(path.to_path_buf()),
        "toml" => Some(path.with_extension("wasm")),
        _ => None,
    }
}

/// The manifest beside a component: `NAME.toml` next to `NAME.wasm`.
pub fn manifest_path(wasm_path: &Path) -> PathBuf {
    wasm_path.with_extension("toml")
}

/// Reads and parses a manifest file.
pub fn read_manifest(path: &Path) -> Result<Manifest, PluginError> {
    let text = std::fs::read_to_string(path).map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound => PluginError::Manifest {
            path: path.to_path_buf(),
            reason: "not found (a plugin's manifest sits beside its component: NAME.toml next to NAME.wasm)".into(),
        },
        _ => PluginError::Io {
            path: path.to_path_buf(),
            error,
        },
    })?;
    Manifest::parse(&text).map_err(|e| PluginError::Manifest {
        path: path.to_path_buf(),
        reason: e.0,
    })
}

/// Reads a component and the manifest beside it and loads them.
pub(crate) fn load_from_disk(
    runtime: &PluginRuntime,
    wasm_path: &Path,
) -> Result<Arc<LoadedPlugin>, PluginError> {
    load_files(runtime, wasm_path, &manifest_path(wasm_path))
}

/// Reads a component and a manifest and loads them (what `staircase plugin check` runs).
pub fn load_files(
    runtime: &PluginRuntime,
    wasm_path: &Path,
    manifest_path: &Path,
) -> Result<Arc<LoadedPlugin>, PluginError> {
    let manifest = read_manifest(manifest_path)?;
    let wasm = std::fs::read(wasm_path).map_err(|error| PluginError::Io {
        path: wasm_path.to_path_buf(),
        error,
    })?;
    runtime.load(&wasm, manifest)
}

/// Poisoning cannot leave these maps inconsistent (every update is a whole-value swap), so
/// a panicked holder's lock is still usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PolicyProvider for Registry {
    fn role(
        &self,
        plugin: &str,
        config: &PluginConfig,
    ) -> Result<Box<dyn RolePolicy>, PolicyError> {
        Ok(Box::new(self.open_role_with_config(plugin, config)?))
    }

    fn aggregator(
        &self,
        plugin: &str,
        config: &PluginConfig,
        conversation: &[ChatMessage],
        sources: &[Source],
        mode: StreamMode,
    ) -> Result<Box<dyn AggregatorSession>, PolicyError> {
        Ok(Box::new(self.open_aggregator_with_config(
            plugin,
            config,
            conversation,
            sources,
            mode,
        )?))
    }

    fn compressor(&self, plugin: &str) -> Result<Box<dyn CompressorPolicy>, PolicyError> {
        Ok(Box::new(self.open_compressor(plugin)?))
    }

    fn router(
        &self,
        plugin: &str,
        config: &PluginConfig,
    ) -> Result<Box<dyn RouterPolicy>, PolicyError> {
        Ok(Box::new(RouterInstance::with_config(
            &self.runtime,
            &self.get_or_err(plugin)?,
            config,
        )?))
    }

    fn kind_of(&self, plugin: &str) -> Option<PluginKind> {
        // A lazily registered plugin answers from its manifest, without compiling.
        if let Some(lazy) = lock(&self.lazy).get(plugin) {
            return Some(lazy.kind);
        }
        self.table.load().get(plugin).map(|e| e.plugin.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_change_reloads_its_component() {
        let dir = Path::new("/plugins");
        assert_eq!(plugin_file(&dir.join("a.wasm")), Some(dir.join("a.wasm")));
        assert_eq!(plugin_file(&dir.join("a.toml")), Some(dir.join("a.wasm")));
        assert_eq!(plugin_file(&dir.join("a.partial")), None);
        assert_eq!(plugin_file(&dir.join("README")), None);
        assert_eq!(manifest_path(&dir.join("a.wasm")), dir.join("a.toml"));
    }
}
