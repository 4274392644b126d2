//! The sandbox: one wasmtime engine (pooling allocator when available), the linker with the
//! host imports, the epoch ticker, and loading: a component is checked against the
//! operator's grants and maxima, compiled or taken from the cache, type-checked against its
//! kind's world and canaried, and becomes a [`LoadedPlugin`]. Instances live in
//! `instance.rs`; which loaded plugin serves a name is the registry's business.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::{aggregator, compressor, guard, role, router, router_v2};
use super::cache::CodeCache;
use super::error::{PluginError, PluginRef};
use super::instance::StoreState;
use super::limits::{CompileBudget, LogLimits};
use super::manifest::{Capability, Manifest};
use crate::policy::PluginKind;

/// How often the ticker advances the engine's epoch. Deadlines are counted in ticks, so
/// this is their resolution; 2 ms keeps the ticker's own cost negligible.
pub const EPOCH_TICK: Duration = Duration::from_millis(2);
/// The operator's default cap on a plugin's memory: a Python or JavaScript component runs
/// in well under this, a Rust policy in a few MiB.
pub const DEFAULT_MAX_MEMORY_MIB: u32 = 256;
/// The operator's default cap on one call's wall time (`[sandbox] max_call_ms`). Policies
/// answer in microseconds to milliseconds (the built-ins ask 50-200 ms, the Python and
/// JavaScript examples 2 s); a call may hold a thread of the guest pool that long, so a
/// minute let a few requests occupy the pool for a minute each. 5 s still leaves room for a
/// compressor's short `model.complete` on the default model; an operator who grants a
/// slower model raises it.
pub const DEFAULT_MAX_CALL_MS: u32 = 5_000;
/// Largest answer accepted from one call (a step prompt, a history): 1 MiB of text is far
/// beyond any model context, so more is a runaway plugin.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1 << 20;
/// Bytes copied from a guest to the host in one call (import arguments and export
/// results): bounds what the host allocates on a guest's behalf. Above the output limit,
/// so an oversized answer gets the precise [`PluginError::OutputTooLarge`] instead.
pub const HOSTCALL_FUEL_BYTES: usize = 16 << 20;
/// Most messages accepted in one answer (a step prompt, a history): each one costs the
/// host template rendering and tokenizing after the call returned, and 50,000 empty
/// messages fit under any byte limit. A long chat is a few hundred.
pub const DEFAULT_MAX_MESSAGES: usize = 1024;
/// What an answer's message costs beyond its text (role markers of the chat template),
/// counted against the output limit so that many tiny messages weigh what they cost.
pub const MESSAGE_OVERHEAD_BYTES: usize = 16;
/// Bytes one call may write to its stdout and stderr (kept as log lines): a panic message
/// or a traceback is a few KiB; more is a plugin using the host's CPU and memory as a sink.
pub const DEFAULT_MAX_STDIO_BYTES_PER_CALL: u64 = 64 << 10;
/// Most tokens one `model.complete` may generate (`[sandbox] max_model_tokens`; a request
/// asking 0 or more gets this many): a compressor's summary is a few hundred tokens, and an
/// uncapped call would hold the engine (and a guest thread) for a whole context.
pub const DEFAULT_MAX_MODEL_TOKENS: u32 = 512;
/// Largest component accepted: a Python component (an interpreter and its standard library)
/// is about 40 MiB.
pub const DEFAULT_MAX_COMPONENT_BYTES: usize = 64 << 20;

// Pooling allocator sizing. Slots are virtual address space reserved up front; memory is
// committed only when touched, so these bound concurrency, not resident memory.
/// Live plugin instances at once (one per run and policy).
const POOL_COMPONENT_INSTANCES: u32 = 256;
/// Core instances at once: a Python component holds about a dozen.
const POOL_CORE_INSTANCES: u32 = 2048;
const POOL_MEMORIES: u32 = 256;
const POOL_TABLES: u32 = 256;
const POOL_CORE_INSTANCES_PER_COMPONENT: u32 = 64;
pub(crate) const POOL_MEMORIES_PER_COMPONENT: u32 = 16;
const POOL_TABLES_PER_COMPONENT: u32 = 16;
/// Python's indirect-call table has tens of thousands of entries.
const POOL_TABLE_ELEMENTS: usize = 100_000;
/// Instance metadata (vmctx) of interpreters with thousands of functions.
const POOL_INSTANCE_SIZE: usize = 4 << 20;

/// The operator's configuration of the plugin host.
#[derive(Clone)]
pub struct HostConfig {
    /// Where compiled code is cached; `None` compiles every load.
    pub cache_dir: Option<PathBuf>,
    /// Capabilities granted per plugin name.
    pub grants: HashMap<String, BTreeSet<Capability>>,
    /// Configuration values per plugin name (read by the `config` import).
    pub plugin_config: HashMap<String, BTreeMap<String, String>>,
    /// The model behind `count-tokens` and `model.complete`; without it `count-tokens`
    /// estimates (one token per 4 bytes, typical of English BPE vocabularies) and
    /// `model.complete` fails.
    pub engine: Option<Arc<dyn crate::engine::Engine>>,
    pub max_memory_mib: u32,
    pub max_call_ms: u32,
    /// Largest answer of one call, in bytes of text (messages also count
    /// [`MESSAGE_OVERHEAD_BYTES`] each); also the largest text `count-tokens` accepts.
    pub max_output_bytes: usize,
    /// Most messages in one answer.
    pub max_messages: usize,
    /// Bytes one call may write to stdout and stderr together (kept as log lines, within the
    /// log budget).
    pub max_stdio_bytes_per_call: u64,
    /// Most tokens one `model.complete` generates.
    pub max_model_tokens: u32,
    /// What a plugin may write to the host's log.
    pub log: LogLimits,
    /// Largest component file accepted.
    pub max_component_bytes: usize,
    /// How long compiling one component may take.
    pub compile_budget: CompileBudget,
    /// Built-in plugins a user plugin of the same name may replace. A name not listed is
    /// refused, so a plugin folder can never silently change what a built-in pipeline runs.
    pub overrides: BTreeSet<String>,
    /// Use the pooling allocator when it can be created (falls back to on-demand).
    pub pooling: bool,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            cache_dir: default_cache_dir(),
            grants: HashMap::new(),
            plugin_config: HashMap::new(),
            engine: None,
            max_memory_mib: DEFAULT_MAX_MEMORY_MIB,
            max_call_ms: DEFAULT_MAX_CALL_MS,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            max_messages: DEFAULT_MAX_MESSAGES,
            max_stdio_bytes_per_call: DEFAULT_MAX_STDIO_BYTES_PER_CALL,
            max_model_tokens: DEFAULT_MAX_MODEL_TOKENS,
            log: LogLimits::default(),
            max_component_bytes: DEFAULT_MAX_COMPONENT_BYTES,
            compile_budget: CompileBudget::default(),
            overrides: BTreeSet::new(),
            pooling: true,
        }
    }
}

impl std::fmt::Debug for HostConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostConfig")
            .field("cache_dir", &self.cache_dir)
            .field("grants", &self.grants)
            .field("plugin_config", &self.plugin_config)
            .field(
                "engine",
                &self.engine.as_ref().map(|e| e.model_info().name.clone()),
            )
            .field("max_memory_mib", &self.max_memory_mib)
            .field("max_call_ms", &self.max_call_ms)
            .field("max_output_bytes", &self.max_output_bytes)
            .field("max_messages", &self.max_messages)
            .field("max_stdio_bytes_per_call", &self.max_stdio_bytes_per_call)
            .field("max_model_tokens", &self.max_model_tokens)
            .field("log", &self.log)
            .field("max_component_bytes", &self.max_component_bytes)
            .field("compile_budget", &self.compile_budget)
            .field("overrides", &self.overrides)
            .field("pooling", &self.pooling)
            .finish()
    }
}

/// The user's cache folder for compiled plugins.
pub fn default_cache_dir() -> Option<PathBuf> {
    dirs::cache_dir().map(|d| d.join("staircase").join("plugins"))
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Result<Self, PluginError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .map_err(|e| PluginError::Runtime(format!("cannot start the epoch ticker: {e}")))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub(crate) struct RuntimeInner {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<StoreState>,
    pub(crate) config: HostConfig,
    pub(crate) cache: Option<CodeCache>,
    pub(crate) pooling: bool,
    /// The origin of the `now-ns` clock.
    pub(crate) origin: Instant,
    /// A compile that went over its budget and may still be running.
    abandoned_compile: std::sync::Mutex<Option<JoinHandle<()>>>,
    _ticker: EpochTicker,
}

/// The sandbox every plugin runs in. Cheap to clone.
#[derive(Clone)]
pub struct PluginRuntime {
    pub(crate) inner: Arc<RuntimeInner>,
}

/// The engine configuration; `pooling` gives the largest memory a pool slot must hold
/// (the operator's cap, in MiB), `None` allocates on demand.
fn engine_config(pooling: Option<u32>) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    // Plugins are synchronous; without the concurrency machinery a call costs half.
    config.concurrency_support(false);
    config.parallel_compilation(true);
    if let Some(max_memory_mib) = pooling {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(POOL_COMPONENT_INSTANCES)
            .total_core_instances(POOL_CORE_INSTANCES)
            .total_memories(POOL_MEMORIES)
            .total_tables(POOL_TABLES)
            .max_core_instances_per_component(POOL_CORE_INSTANCES_PER_COMPONENT)
            .max_memories_per_component(POOL_MEMORIES_PER_COMPONENT)
            .max_tables_per_component(POOL_TABLES_PER_COMPONENT)
            .table_elements(POOL_TABLE_ELEMENTS)
            .max_component_instance_size(POOL_INSTANCE_SIZE)
            .max_core_instance_size(POOL_INSTANCE_SIZE)
            .max_memory_size((max_memory_mib as usize) << 20);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

impl PluginRuntime {
    /// Builds the engine (pooling when possible), the linker and the epoch ticker.
    pub fn new(config: HostConfig) -> Result<Self, PluginError> {
        let (engine, pooling) = match config.pooling {
            true => match Engine::new(&engine_config(Some(config.max_memory_mib))) {
                Ok(engine) => (engine, true),
                Err(error) => {
                    tracing::warn!(%error, "pooling allocator unavailable; allocating on demand");
                    (on_demand_engine()?, false)
                }
            },
            false => (on_demand_engine()?, false),
        };
        let mut linker: Linker<StoreState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .and_then(|()| super::wasi_io::add_to_linker(&mut linker))
            .map_err(|e| PluginError::Runtime(format!("WASI linker: {e}")))?;
        compressor::Compressor::add_to_linker::<StoreState, wasmtime::component::HasSelf<StoreState>>(
            &mut linker,
            |state| state,
        )
        .map_err(|e| PluginError::Runtime(format!("host imports: {e}")))?;
        router_v2::Router::add_to_linker::<StoreState, wasmtime::component::HasSelf<StoreState>>(
            &mut linker,
            |state| state,
        )
        .map_err(|e| PluginError::Runtime(format!("host imports 0.2.0: {e}")))?;
        guard::Guard::add_to_linker::<StoreState, wasmtime::component::HasSelf<StoreState>>(
            &mut linker,
            |state| state,
        )
        .map_err(|e| PluginError::Runtime(format!("host imports 0.3.0: {e}")))?;
        let cache = match &config.cache_dir {
            Some(dir) => Some(CodeCache::new(dir.clone(), &engine)?),
            None => None,
        };
        let ticker = EpochTicker::start(engine.clone())?;
        Ok(Self {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                config,
                cache,
                pooling,
                origin: Instant::now(),
                abandoned_compile: std::sync::Mutex::new(None),
                _ticker: ticker,
            }),
        })
    }

    /// Whether instances come from the pooling allocator.
    pub fn is_pooling(&self) -> bool {
        self.inner.pooling
    }

    pub fn config(&self) -> &HostConfig {
        &self.inner.config
    }

    /// Loads a component: checks the manifest against the operator's grants and maxima,
    /// compiles it (or loads it from the cache), type-checks it against its kind's world
    /// and runs the canary. Blocking and CPU-heavy on a cache miss: call it off the async
    /// runtime.
    pub fn load(&self, wasm: &[u8], manifest: Manifest) -> Result<Arc<LoadedPlugin>, PluginError> {
        let started = Instant::now();
        let plugin = PluginRef {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
        };
        let config = &self.inner.config;
        let granted = config.grants.get(&manifest.name);
        for capability in &manifest.capabilities {
            if !granted.is_some_and(|g| g.contains(capability)) {
                return Err(PluginError::CapabilityNotGranted {
                    plugin,
                    capability: *capability,
                });
            }
        }
        for (what, asked, max) in [
            (
                "memory-mib",
                manifest.limits.memory_mib,
                config.max_memory_mib,
            ),
            ("call-ms", manifest.limits.call_ms, config.max_call_ms),
        ] {
            if asked > max {
                return Err(PluginError::LimitTooHigh {
                    plugin,
                    what,
                    asked,
                    max,
                });
            }
        }
        if wasm.len() > config.max_component_bytes {
            return Err(PluginError::ComponentTooLarge {
                plugin,
                bytes: wasm.len(),
                limit: config.max_component_bytes,
            });
        }
        let sha256 = hex::encode(Sha256::digest(wasm));
        let (component, from_cache) = self.compile(&plugin, wasm, &sha256)?;
        let compiled = started.elapsed();
        let pre =
            KindPre::new(&self.inner.linker, &component, manifest.kind).map_err(|reason| {
                PluginError::IncompatibleInterface {
                    plugin: plugin.clone(),
                    expected: manifest.kind,
                    reason,
                }
            })?;
        let loaded = Arc::new(LoadedPlugin {
            config: Arc::new(
                config
                    .plugin_config
                    .get(&manifest.name)
                    .cloned()
                    .unwrap_or_default(),
            ),
            model_granted: manifest.capabilities.contains(&Capability::Model),
            plugin,
            manifest,
            sha256,
            component,
            pre,
            from_cache,
            compile_time: compiled,
        });
        super::policies::self_test(self, &loaded)?;
        Ok(loaded)
    }
}

impl PluginRuntime {
    /// The compiled component (from the cache when it holds it) and whether it came from
    /// the cache. A compile runs under the component's [`CompileBudget`].
    fn compile(
        &self,
        plugin: &PluginRef,
        wasm: &[u8],
        sha256: &str,
    ) -> Result<(Component, bool), PluginError> {
        let engine = &self.inner.engine;
        if let Some(component) = self
            .inner
            .cache
            .as_ref()
            .and_then(|cache| cache.lookup(engine, sha256))
        {
            metrics::counter!("staircase_plugin_compiles_total", "source" => "cache").increment(1);
            return Ok((component, true));
        }
        metrics::counter!("staircase_plugin_compiles_total", "source" => "compiler").increment(1);
        let compiled = self.precompile_within_budget(plugin, wasm)?;
        if let Some(cache) = &self.inner.cache {
            cache.store(sha256, &compiled);
        }
        // SAFETY: these bytes were produced by `precompile_component` on this engine just now.
        let component = unsafe { Component::deserialize(engine, &compiled) }
            .map_err(|e| invalid_component(plugin, &e))?;
        Ok((component, false))
    }

    /// Compiles on a thread of its own and waits at most the budget. Cranelift cannot be
    /// interrupted, so a compile over budget is abandoned: its thread finishes on its own
    /// and its result is dropped (never cached, so the next load is refused the same way).
    fn precompile_within_budget(
        &self,
        plugin: &PluginRef,
        wasm: &[u8],
    ) -> Result<Vec<u8>, PluginError> {
        let budget = self.inner.config.compile_budget.for_size(wasm.len());
        // A compile abandoned over its budget still runs on every core: the next one waits
        // for it, so a compile bomb costs one compile's worth of CPU, never a pile of them.
        let abandoned = self
            .inner
            .abandoned_compile
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(abandoned) = abandoned {
            tracing::info!(%plugin, "waiting for an abandoned compile to end before compiling");
            let _ = abandoned.join();
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let engine = self.inner.engine.clone();
        let bytes = wasm.to_vec();
        let thread = std::thread::Builder::new()
            .name("plugin-compile".into())
            .spawn(move || {
                let _ = tx.send(engine.precompile_component(&bytes));
            })
            .map_err(|e| PluginError::Runtime(format!("cannot start a compile: {e}")))?;
        let answer = rx.recv_timeout(budget);
        if matches!(answer, Err(std::sync::mpsc::RecvTimeoutError::Timeout)) {
            *self
                .inner
                .abandoned_compile
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(thread);
        }
        match answer {
            Ok(Ok(compiled)) => Ok(compiled),
            Ok(Err(error)) => Err(invalid_component(plugin, &error)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(PluginError::CompileTimeout {
                plugin: plugin.clone(),
                bytes: wasm.len(),
                budget,
            }),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(PluginError::InvalidComponent {
                    plugin: plugin.clone(),
                    reason: "the compiler stopped without an answer".into(),
                })
            }
        }
    }
}

fn invalid_component(plugin: &PluginRef, error: &wasmtime::Error) -> PluginError {
    PluginError::InvalidComponent {
        plugin: plugin.clone(),
        reason: super::error::clip(&format!("{error:#}"), super::error::MAX_ERROR_DETAIL_BYTES)
            .into_owned(),
    }
}

fn on_demand_engine() -> Result<Engine, PluginError> {
    Engine::new(&engine_config(None)).map_err(|e| PluginError::Runtime(format!("engine: {e}")))
}

/// The pre-instantiated component of one kind (the type check happened when building it).
pub(crate) enum KindPre {
    Role(role::RolePre<StoreState>),
    Aggregator(aggregator::AggregatorPre<StoreState>),
    Compressor(compressor::CompressorPre<StoreState>),
    Router(router::RouterPre<StoreState>),
    /// A router exporting `staircase:agent@0.2.0`.
    RouterV2(router_v2::RouterPre<StoreState>),
    Guard(guard::GuardPre<StoreState>),
}

impl KindPre {
    fn new(
        linker: &Linker<StoreState>,
        component: &Component,
        kind: PluginKind,
    ) -> Result<Self, String> {
        // Type errors quote the component's import names, which the component chose.
        let reason = |e: wasmtime::Error| {
            super::error::clip(&format!("{e:#}"), super::error::MAX_ERROR_DETAIL_BYTES).into_owned()
        };
        let pre = linker.instantiate_pre(component).map_err(reason)?;
        let typed = match kind {
            PluginKind::Role => role::RolePre::new(pre).map(KindPre::Role),
            PluginKind::Aggregator => aggregator::AggregatorPre::new(pre).map(KindPre::Aggregator),
            PluginKind::Compressor => compressor::CompressorPre::new(pre).map(KindPre::Compressor),
            PluginKind::Guard => guard::GuardPre::new(pre).map(KindPre::Guard),
            // The newest version first; a router exporting neither gets both reasons.
            PluginKind::Router => match router_v2::RouterPre::new(pre.clone()) {
                Ok(pre) => Ok(KindPre::RouterV2(pre)),
                Err(v2) => router::RouterPre::new(pre)
                    .map(KindPre::Router)
                    .map_err(|v1| {
                        wasmtime::format_err!(
                            "exports neither 0.2.0 ({}) nor 0.1.0 ({v1:#})",
                            reason(v2)
                        )
                    }),
            },
        };
        typed.map_err(reason)
    }
}

/// A compiled, type-checked plugin that passed its canary. Runs hold an `Arc` to it, so a
/// replaced or removed version lives until its last run ends.
pub struct LoadedPlugin {
    pub plugin: PluginRef,
    pub manifest: Manifest,
    /// Hex sha256 of the component bytes.
    pub sha256: String,
    pub(crate) component: Component,
    pub(crate) pre: KindPre,
    pub(crate) config: Arc<BTreeMap<String, String>>,
    pub(crate) model_granted: bool,
    /// Whether the compiled code came from the on-disk cache.
    pub from_cache: bool,
    /// Time to compile or load from the cache.
    pub compile_time: Duration,
}

impl LoadedPlugin {
    pub fn kind(&self) -> PluginKind {
        self.manifest.kind
    }

    /// Names of the component's exports and imports, as its type declares them.
    pub fn interface(&self, runtime: &PluginRuntime) -> (Vec<String>, Vec<String>) {
        let ty = self.component.component_type();
        let engine = &runtime.inner.engine;
        (
            ty.exports(engine)
                .map(|(name, _)| name.to_string())
                .collect(),
            ty.imports(engine)
                .map(|(name, _)| name.to_string())
                .collect(),
        )
    }
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("plugin", &self.plugin)
            .field("kind", &self.manifest.kind)
            .field("sha256", &self.sha256)
            .finish()
    }
}
