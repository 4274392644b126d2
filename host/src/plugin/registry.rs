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
//!
//! A file is identified by its path and the hash of its bytes, never by the name its manifest
//! declares: a second file declaring a name another file serves is refused (the first keeps
//! its grants and pipelines), and a built-in is never dropped (it serves again when the file
//! that replaced it goes or renames itself). Files are read once, as regular files only
//! (`folder.rs`). Every compile runs on one compile worker thread, so reloads, first uses and
//! an operator's `/admin/reload` storm never compile in parallel or on a request's thread; an
//! unchanged file is not compiled again, and a file that failed is not retried until its
//! bytes change.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, Weak};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use arc_swap::ArcSwap;

use super::builtin;
use super::error::{MAX_ERROR_DETAIL_BYTES, PluginError, clip};
use super::folder::{FolderReadError, read_regular, read_regular_text};
use super::manifest::Manifest;
use super::policies::{
    AggregatorInstance, CompressorInstance, GuardInstance, RoleInstance, RouterInstance,
};
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
/// Largest manifest read: a manifest is a dozen lines.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 10;
/// Failed files remembered (by the hash of their bytes); beyond it the memory starts over,
/// so a folder churning out broken files costs a bounded map.
const MAX_REMEMBERED_FAILURES: usize = 1024;

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
    /// The hash of the file's manifest and component, for a file (an unchanged file is not
    /// loaded again).
    identity: Option<FileIdentity>,
}

/// The sha256 of a plugin file's manifest text and component bytes together.
type FileIdentity = [u8; 32];

/// A plugin registered by its manifest, compiled on first use.
struct Lazy {
    path: PathBuf,
    kind: PluginKind,
}

/// Work for the compile worker.
type Job = Box<dyn FnOnce(&Registry) + Send>;

/// The compile worker: its queue and its thread's id (a job it runs that needs a compile
/// compiles in place rather than queueing behind itself).
struct Compiler {
    jobs: Sender<Job>,
    thread: ThreadId,
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
    watchers: Mutex<Vec<crate::watch::Watch>>,
    /// Started on first use.
    compiler: Mutex<Option<Compiler>>,
    /// Files that failed to load, by identity, with the reason: not retried until they change.
    failures: Mutex<HashMap<FileIdentity, String>>,
    /// Names registered lazily whose compile failed, with the reason (a run asking for one
    /// gets it instead of "not found").
    unavailable: Mutex<HashMap<String, (PluginKind, String)>>,
    me: Weak<Registry>,
}

impl Registry {
    pub fn new(runtime: PluginRuntime) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            runtime,
            table: ArcSwap::from_pointee(HashMap::new()),
            lazy: Mutex::new(HashMap::new()),
            builtins: Mutex::new(HashMap::new()),
            update: Mutex::new(()),
            subscribers: Mutex::new(Vec::new()),
            watchers: Mutex::new(Vec::new()),
            compiler: Mutex::new(None),
            failures: Mutex::new(HashMap::new()),
            unavailable: Mutex::new(HashMap::new()),
            me: me.clone(),
        })
    }

    /// Queues `job` on the compile worker (starting it on first use).
    fn enqueue(&self, job: Job) -> Result<(), PluginError> {
        let mut compiler = lock(&self.compiler);
        if compiler.is_none() {
            let (tx, rx) = mpsc::channel::<Job>();
            let registry = self.me.clone();
            let thread = std::thread::Builder::new()
                .name("plugin-compiler".into())
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        let Some(registry) = registry.upgrade() else {
                            return;
                        };
                        // A panicking job fails its own caller (its answer channel drops),
                        // never the worker every later compile needs.
                        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            job(&registry)
                        }));
                        if ran.is_err() {
                            tracing::error!("a plugin compile job panicked");
                        }
                    }
                })
                .map_err(|e| PluginError::Runtime(format!("cannot start the compiler: {e}")))?;
            *compiler = Some(Compiler {
                jobs: tx,
                thread: thread.thread().id(),
            });
        }
        let stopped = || PluginError::Runtime("the plugin compiler stopped".into());
        compiler
            .as_ref()
            .ok_or_else(stopped)?
            .jobs
            .send(job)
            .map_err(|_| stopped())
    }

    /// Runs `job` on the compile worker and waits for its answer (in place when called from
    /// the worker itself). Blocking: never call it on the async runtime.
    fn on_compiler<R: Send + 'static>(
        &self,
        job: impl FnOnce(&Registry) -> R + Send + 'static,
    ) -> Result<R, PluginError> {
        let here = std::thread::current().id();
        if lock(&self.compiler)
            .as_ref()
            .is_some_and(|c| c.thread == here)
        {
            return Ok(job(self));
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.enqueue(Box::new(move |registry| {
            let _ = tx.send(job(registry));
        }))?;
        rx.recv()
            .map_err(|_| PluginError::Runtime("the plugin compiler stopped".into()))
    }

    /// Waits, without blocking a thread, until `name` no longer waits to be compiled (its
    /// first compile is queued on the compile worker now if it was not). Returns at once for
    /// a name that is not registered lazily. What a server awaits before pinning a run's
    /// plugins, so no request thread ever compiles.
    pub async fn compiled(&self, name: &str) {
        if !lock(&self.lazy).contains_key(name) {
            return;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let name = name.to_string();
        let queued = self.enqueue(Box::new(move |registry| {
            let _ = registry.compile_lazy(&name);
            let _ = tx.send(());
        }));
        if queued.is_ok() {
            let _ = rx.await;
        }
    }

    /// Compiles `name` if it is still registered lazily (on the compile worker).
    fn compile_lazy(&self, name: &str) -> Result<(), PluginError> {
        let Some(lazy) = lock(&self.lazy).get(name).cloned() else {
            return Ok(());
        };
        let result = self.reload_now(&lazy.path, Instant::now());
        {
            let mut pending = lock(&self.lazy);
            if pending.get(name).is_some_and(|l| Arc::ptr_eq(l, &lazy)) {
                pending.remove(name);
            }
        }
        if let Err(error) = &result {
            lock(&self.unavailable).insert(name.to_string(), (lazy.kind, error.to_string()));
        }
        result.map(|_| ())
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
            self.install(loaded.clone(), None, None);
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
                        self.check_claim(&manifest, &path)?;
                        Ok(manifest)
                    })
                    .map(|manifest| {
                        lock(&self.lazy).insert(
                            manifest.name.clone(),
                            Arc::new(Lazy {
                                path: path.clone(),
                                kind: manifest.kind,
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

    /// Refuses a file declaring a name another file serves (or is registered to serve): a
    /// plugin is its file, so the first file keeps the name, its grants and its pipelines.
    fn check_claim(&self, manifest: &Manifest, path: &Path) -> Result<(), PluginError> {
        let name = &manifest.name;
        let served = self
            .table
            .load()
            .get(name)
            .and_then(|e| e.path.clone())
            .or_else(|| lock(&self.lazy).get(name).map(|l| l.path.clone()));
        match served {
            Some(other) if other != path => Err(PluginError::NameTaken {
                name: name.clone(),
                path: path.to_path_buf(),
                other,
            }),
            _ => Ok(()),
        }
    }

    /// Loads a file and swaps it in, or reports why not, on the compile worker.
    fn reload(&self, wasm_path: &Path, since: Instant) -> Result<Arc<LoadedPlugin>, PluginError> {
        let path = wasm_path.to_path_buf();
        self.on_compiler(move |registry| registry.reload_now(&path, since))?
    }

    /// [`Self::reload`] on this thread (the compile worker's).
    fn reload_now(
        &self,
        wasm_path: &Path,
        since: Instant,
    ) -> Result<Arc<LoadedPlugin>, PluginError> {
        let files = read_files(&self.runtime, wasm_path, &manifest_path(wasm_path));
        let loaded = files.and_then(|(manifest, wasm, identity)| {
            // An unchanged file keeps serving as it is: nothing to compile or announce.
            if let Some(entry) = self.table.load().get(&manifest.name)
                && entry.path.as_deref() == Some(wasm_path)
                && entry.identity == Some(identity)
            {
                tracing::debug!(path = %wasm_path.display(), "plugin file unchanged; not reloaded");
                return Ok((entry.plugin.clone(), identity, false));
            }
            if let Some(reason) = lock(&self.failures).get(&identity) {
                return Err(PluginError::KnownBad {
                    path: wasm_path.to_path_buf(),
                    reason: reason.clone(),
                });
            }
            self.check_name(&manifest, wasm_path)?;
            self.check_claim(&manifest, wasm_path)?;
            match self.runtime.load(&wasm, manifest) {
                Ok(loaded) => Ok((loaded, identity, true)),
                Err(error) => {
                    let mut failures = lock(&self.failures);
                    if failures.len() >= MAX_REMEMBERED_FAILURES {
                        failures.clear();
                    }
                    failures.insert(identity, error.to_string());
                    Err(error)
                }
            }
        });
        match loaded {
            Ok((loaded, _, false)) => Ok(loaded),
            Ok((loaded, identity, true)) => {
                lock(&self.lazy).remove(&loaded.manifest.name);
                lock(&self.unavailable).remove(&loaded.manifest.name);
                self.install(
                    loaded.clone(),
                    Some(wasm_path.to_path_buf()),
                    Some(identity),
                );
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

    fn install(
        &self,
        plugin: Arc<LoadedPlugin>,
        path: Option<PathBuf>,
        identity: Option<FileIdentity>,
    ) {
        let _guard = lock(&self.update);
        let mut table = HashMap::clone(&self.table.load());
        // A file that now declares another name stops serving its old one (and a built-in
        // it replaced serves again).
        if let Some(path) = &path {
            let renamed: Vec<String> = table
                .iter()
                .filter(|(name, e)| e.path.as_ref() == Some(path) && **name != plugin.manifest.name)
                .map(|(name, _)| name.clone())
                .collect();
            for name in renamed {
                table.remove(&name);
                if let Some(builtin) = lock(&self.builtins).get(&name) {
                    table.insert(
                        name,
                        Arc::new(Entry {
                            plugin: builtin.clone(),
                            path: None,
                            identity: None,
                        }),
                    );
                }
            }
        }
        if let Some(old) = table.get(&plugin.manifest.name)
            && old.path != path
        {
            tracing::warn!(name = %plugin.manifest.name, old = ?old.path, new = ?path, "plugin name now served from another source (`None` is the built-in)");
        }
        table.insert(
            plugin.manifest.name.clone(),
            Arc::new(Entry {
                plugin,
                path,
                identity,
            }),
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
                        identity: None,
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

    /// The version serving `name` (compiling it first, on the compile worker, if it was
    /// registered lazily), or why there is none. Blocking on a first compile.
    pub fn resolve(&self, name: &str) -> Result<Arc<LoadedPlugin>, PluginError> {
        self.get_or_err(name)
    }

    fn get_or_err(&self, name: &str) -> Result<Arc<LoadedPlugin>, PluginError> {
        if lock(&self.lazy).contains_key(name) {
            let owned = name.to_string();
            self.on_compiler(move |registry| registry.compile_lazy(&owned))??;
        }
        if let Some(entry) = self.table.load().get(name) {
            return Ok(entry.plugin.clone());
        }
        match lock(&self.unavailable).get(name).map(|(_, reason)| reason) {
            Some(reason) => Err(PluginError::Unavailable {
                name: name.to_string(),
                reason: reason.clone(),
            }),
            None => Err(PluginError::NotFound {
                name: name.to_string(),
            }),
        }
    }

    /// The version serving `name` now, without compiling: `None` for a name still waiting
    /// for its first compile (see [`Self::compiled`]) or not served.
    pub fn get_ready(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.table.load().get(name).map(|e| e.plugin.clone())
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
        let registry = Arc::downgrade(self);
        let watch = crate::watch::watch(
            &crate::watch::flat(dirs),
            DEBOUNCE,
            "plugin-reload",
            move |batch| reload_batch(&registry, batch),
        )
        .map_err(|e| PluginError::Runtime(format!("watching {dirs:?}: {e}")))?;
        lock(&self.watchers).push(watch);
        Ok(())
    }
}

/// Reloads each plugin a batch of changed files touched, once (unloads a removed one);
/// `false` once the registry is gone.
fn reload_batch(registry: &Weak<Registry>, batch: crate::watch::Batch) -> bool {
    let mut touched: BTreeMap<PathBuf, Instant> = BTreeMap::new();
    for (path, at) in batch {
        if let Some(wasm) = plugin_file(&path) {
            let since = touched.entry(wasm).or_insert(at);
            *since = (*since).min(at);
        }
    }
    let Some(registry) = registry.upgrade() else {
        return false;
    };
    for (wasm, since) in touched {
        if wasm.symlink_metadata().is_ok() {
            let _ = registry.reload(&wasm, since);
        } else {
            registry.unload(&wasm);
        }
    }
    true
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
    read_manifest_text(path).and_then(|text| parse_manifest(path, &text))
}

fn read_manifest_text(path: &Path) -> Result<String, PluginError> {
    read_regular_text(path, MAX_MANIFEST_BYTES).map_err(|error| {
        let reason = if error.is_not_found() {
            "not found (a plugin's manifest sits beside its component: NAME.toml next to NAME.wasm)"
                .to_string()
        } else {
            error.to_string()
        };
        PluginError::Manifest {
            path: path.to_path_buf(),
            reason,
        }
    })
}

fn parse_manifest(path: &Path, text: &str) -> Result<Manifest, PluginError> {
    Manifest::parse(text).map_err(|e| PluginError::Manifest {
        path: path.to_path_buf(),
        // The parser quotes the file's lines, which the file's author chose.
        reason: clip(&e.0, MAX_ERROR_DETAIL_BYTES).into_owned(),
    })
}

/// The manifest and component of a plugin file, each read once as a regular file within
/// its size limit, and their identity (the hash of both).
fn read_files(
    runtime: &PluginRuntime,
    wasm_path: &Path,
    manifest_path: &Path,
) -> Result<(Manifest, Vec<u8>, FileIdentity), PluginError> {
    let text = read_manifest_text(manifest_path)?;
    let manifest = parse_manifest(manifest_path, &text)?;
    let limit = runtime.config().max_component_bytes as u64;
    let wasm = read_regular(wasm_path, limit).map_err(|error| match error {
        FolderReadError::TooLarge { bytes, limit } => PluginError::ComponentTooLarge {
            plugin: super::PluginRef {
                name: manifest.name.clone(),
                version: manifest.version.clone(),
            },
            bytes: bytes as usize,
            limit: limit as usize,
        },
        FolderReadError::Io(error) => PluginError::Io {
            path: wasm_path.to_path_buf(),
            error,
        },
        other => PluginError::Io {
            path: wasm_path.to_path_buf(),
            error: std::io::Error::other(other.to_string()),
        },
    })?;
    let mut hasher = Sha256::new();
    hasher.update((text.len() as u64).to_le_bytes());
    hasher.update(text.as_bytes());
    hasher.update(&wasm);
    Ok((manifest, wasm, hasher.finalize().into()))
}

/// Reads a component and a manifest and loads them (what `staircase plugin check` runs).
pub fn load_files(
    runtime: &PluginRuntime,
    wasm_path: &Path,
    manifest_path: &Path,
) -> Result<Arc<LoadedPlugin>, PluginError> {
    let (manifest, wasm, _) = read_files(runtime, wasm_path, manifest_path)?;
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

    fn guard(
        &self,
        plugin: &str,
        config: &PluginConfig,
        info: &crate::guard::StreamInfo,
    ) -> Result<Box<dyn crate::guard::GuardSession>, PolicyError> {
        Ok(Box::new(GuardInstance::with_config(
            &self.runtime,
            &self.get_or_err(plugin)?,
            config,
            info,
        )?))
    }

    fn kind_of(&self, plugin: &str) -> Option<PluginKind> {
        // A lazily registered plugin answers from its manifest, without compiling.
        if let Some(lazy) = lock(&self.lazy).get(plugin) {
            return Some(lazy.kind);
        }
        // One whose compile failed too: a run then fails at the node with the reason.
        self.table
            .load()
            .get(plugin)
            .map(|e| e.plugin.kind())
            .or_else(|| lock(&self.unavailable).get(plugin).map(|(kind, _)| *kind))
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
