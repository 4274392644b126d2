//! One plugin instance: its store (WASI context inheriting nothing, limits, epoch deadline,
//! hostcall fuel) and the call wrapper that runs every guest call under the deadline and
//! turns every failure into a typed [`PluginError`], dropping a store that failed. It does
//! not choose which version serves a name (the registry does).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::Store;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::error::{PluginError, PluginRef};
use super::limits::Limiter;
use super::runtime::{EPOCH_TICK, HOSTCALL_FUEL_BYTES, KindPre, LoadedPlugin, PluginRuntime};

/// The call name of instantiation in errors.
const INSTANTIATE: &str = "instantiate";

/// What a plugin instance's store holds.
pub(crate) struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: Limiter,
    pub(crate) plugin: PluginRef,
    pub(crate) config: Arc<BTreeMap<String, String>>,
    pub(crate) model_granted: bool,
    pub(crate) engine: Option<Arc<dyn crate::engine::Engine>>,
    pub(crate) origin: Instant,
    /// When the current call must end (the `model` import waits at most until then).
    pub(crate) deadline: Instant,
}

impl StoreState {
    pub(crate) fn table_mut(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// One instance of a plugin in its own store. A call that traps, times out or runs out of
/// memory drops the store; later calls fail with [`PluginError::Poisoned`].
pub(crate) struct PluginInstance {
    store: Option<Store<StoreState>>,
    pub(crate) plugin: Arc<LoadedPlugin>,
    deadline: Duration,
    deadline_ticks: u64,
    max_output: usize,
}

impl PluginInstance {
    /// A fresh store for `plugin`, with nothing inherited from the host.
    pub(crate) fn store(runtime: &PluginRuntime, plugin: &Arc<LoadedPlugin>) -> Self {
        Self::store_with(runtime, plugin, None)
    }

    /// A fresh store whose `config` import also sees `overrides` (a pipeline node's
    /// settings), which win over the operator's values for this plugin.
    pub(crate) fn store_with(
        runtime: &PluginRuntime,
        plugin: &Arc<LoadedPlugin>,
        overrides: Option<&BTreeMap<String, String>>,
    ) -> Self {
        let inner = &runtime.inner;
        let config = match overrides {
            Some(overrides) if !overrides.is_empty() => {
                let mut merged = BTreeMap::clone(&plugin.config);
                merged.extend(overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
                Arc::new(merged)
            }
            _ => plugin.config.clone(),
        };
        // No env, args, preopened folders or stdio (the builder inherits nothing unless
        // asked); network off explicitly.
        let wasi = wasmtime_wasi::WasiCtxBuilder::new()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = StoreState {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter::new(plugin.manifest.limits.memory_bytes()),
            plugin: plugin.plugin.clone(),
            config,
            model_granted: plugin.model_granted,
            engine: inner.config.engine.clone(),
            origin: inner.origin,
            deadline: Instant::now(),
        };
        let mut store = Store::new(&inner.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.epoch_deadline_trap();
        store.set_hostcall_fuel(HOSTCALL_FUEL_BYTES);
        let deadline = plugin.manifest.limits.call_deadline();
        // Round up, plus one tick: the current tick may be about to end.
        let deadline_ticks = deadline.as_nanos().div_ceil(EPOCH_TICK.as_nanos()) as u64 + 1;
        Self {
            store: Some(store),
            plugin: plugin.clone(),
            deadline,
            deadline_ticks,
            max_output: inner.config.max_output_bytes,
        }
    }

    pub(crate) fn plugin_ref(&self) -> &PluginRef {
        &self.plugin.plugin
    }

    /// Runs one guest call under the deadline, mapping any failure to a typed error and
    /// dropping the store if it may be corrupt.
    pub(crate) fn call<R>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(&mut Store<StoreState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        let Some(store) = self.store.as_mut() else {
            return Err(PluginError::Poisoned {
                plugin: self.plugin.plugin.clone(),
            });
        };
        store.set_epoch_deadline(self.deadline_ticks);
        store.data_mut().deadline = Instant::now() + self.deadline;
        // A host function may panic on the guest's behalf: wasmtime-wasi's blocking I/O
        // (a guest writing to its discarded stdio, e.g. a Rust panic message) runs a tokio
        // `block_on`, which panics on an async runtime's worker thread. The panic unwinds
        // out of wasm to here; it fails this call and the instance, never the host.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(store)));
        let error = match outcome {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => {
                let refused = store.data().limiter.memory_refused;
                self.classify(call, refused, error)
            }
            Err(panic) => PluginError::Trap {
                plugin: self.plugin.plugin.clone(),
                call,
                kind: format!(
                    "a host call made by the plugin failed: {} (WASI I/O such as printing is \
                     unavailable when the plugin is called from an async task; use the `log` import)",
                    panic_message(&panic)
                ),
            },
        };
        tracing::warn!(%error, "plugin call failed; dropping its instance");
        self.store = None;
        Err(error)
    }

    fn classify(
        &self,
        call: &'static str,
        memory_refused: bool,
        error: wasmtime::Error,
    ) -> PluginError {
        let plugin = self.plugin.plugin.clone();
        match error.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => PluginError::Timeout {
                plugin,
                call,
                deadline: self.deadline,
            },
            _ if memory_refused => PluginError::OutOfMemory {
                plugin,
                call,
                limit_mib: self.plugin.manifest.limits.memory_mib,
            },
            Some(trap) => PluginError::Trap {
                plugin,
                call,
                kind: trap.to_string(),
            },
            // Not a trap: e.g. the instance pool is exhausted, or a link error.
            None if call == INSTANTIATE => PluginError::Instantiate {
                plugin,
                reason: format!("{error:#}"),
            },
            None => PluginError::Trap {
                plugin,
                call,
                kind: format!("{error:#}"),
            },
        }
    }

    /// Fails when an answer is larger than the host accepts, dropping the instance.
    pub(crate) fn check_output(
        &mut self,
        call: &'static str,
        bytes: usize,
    ) -> Result<(), PluginError> {
        if bytes > self.max_output {
            return Err(self.reject(PluginError::OutputTooLarge {
                plugin: self.plugin.plugin.clone(),
                call,
                bytes,
                limit: self.max_output,
            }));
        }
        Ok(())
    }

    /// Drops the instance after an answer the host cannot accept: a plugin that produced
    /// one is in a state nobody should build on.
    pub(crate) fn reject(&mut self, error: PluginError) -> PluginError {
        tracing::warn!(%error, "plugin answer rejected; dropping its instance");
        self.store = None;
        error
    }

    /// Instantiation, under the same deadline and error mapping as a call (a component's
    /// start code runs here).
    pub(crate) fn instantiate<B>(
        &mut self,
        f: impl FnOnce(&mut Store<StoreState>, &KindPre) -> wasmtime::Result<B>,
    ) -> Result<B, PluginError> {
        let plugin = self.plugin.clone();
        self.call(INSTANTIATE, |store| f(store, &plugin.pre))
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}
