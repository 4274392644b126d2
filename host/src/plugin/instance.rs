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

use super::error::{LimitExceeded, MAX_ERROR_DETAIL_BYTES, PluginError, PluginRef, clip};
use super::guest_output::GuestOutput;
use super::limits::{Limiter, LogBudget};
use super::runtime::{
    EPOCH_TICK, HOSTCALL_FUEL_BYTES, KindPre, LoadedPlugin, MESSAGE_OVERHEAD_BYTES, PluginRuntime,
};

/// The call name of instantiation in errors.
const INSTANTIATE: &str = "instantiate";
/// Entries in one store's resource table (WASI streams, sessions): a policy holds a handful;
/// wasmtime's default of a million lets a guest make the host allocate for each.
const MAX_RESOURCES: usize = 1024;
/// Largest `get-random-bytes` answer: the host allocates it, and a seed or a nonce is tens
/// of bytes.
const MAX_RANDOM_BYTES: u64 = 64 << 10;

/// What a plugin instance's store holds.
pub(crate) struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: Limiter,
    pub(crate) plugin: PluginRef,
    pub(crate) config: Arc<BTreeMap<String, String>>,
    pub(crate) model_granted: bool,
    pub(crate) engine: Option<Arc<dyn crate::engine::Engine>>,
    /// The engine priority of `model.complete` requests (background for a history
    /// compression nobody waits for).
    pub(crate) model_priority: crate::engine::Priority,
    /// Who pays for `model.complete`: its namespace and token meter (the shared namespace,
    /// counted nowhere, until a caller bills the instance to its run).
    pub(crate) model_account: crate::policy::ModelAccount,
    pub(crate) origin: Instant,
    /// When the current call must end (the `model` import waits at most until then).
    pub(crate) deadline: Instant,
    pub(crate) log: LogBudget,
    /// Bytes the current call wrote to stdout and stderr, and how many it may.
    pub(crate) stdio_written: u64,
    /// What the current call wrote to stdout and stderr, logged when it returns.
    pub(crate) stdout: GuestOutput,
    pub(crate) stderr: GuestOutput,
    pub(crate) max_stdio: u64,
    /// Largest text `count-tokens` accepts, and largest prompt of `model.complete`.
    pub(crate) max_count_bytes: usize,
    pub(crate) max_messages: usize,
    /// Most tokens of one `model.complete`.
    pub(crate) max_model_tokens: u32,
}

impl StoreState {
    /// The resource table and the current call's count of written bytes.
    pub(crate) fn io_parts(&mut self) -> (&mut ResourceTable, &mut u64) {
        (&mut self.table, &mut self.stdio_written)
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
    max_messages: usize,
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
        // No env, args, preopened folders or stdin (the builder inherits nothing unless
        // asked); stdout and stderr become log lines; network off explicitly.
        let max_stdio = inner.config.max_stdio_bytes_per_call;
        let (stdout, stderr) = (GuestOutput::new(max_stdio), GuestOutput::new(max_stdio));
        let wasi = wasmtime_wasi::WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .max_random_size(MAX_RANDOM_BYTES)
            .build();
        let state = StoreState {
            wasi,
            table: {
                let mut table = ResourceTable::new();
                table.set_max_capacity(MAX_RESOURCES);
                table
            },
            limiter: Limiter::new(plugin.manifest.limits.memory_bytes()),
            plugin: plugin.plugin.clone(),
            config,
            model_granted: plugin.model_granted,
            engine: inner.config.engine.clone(),
            model_priority: crate::engine::Priority::default(),
            model_account: Default::default(),
            origin: inner.origin,
            deadline: Instant::now(),
            log: LogBudget::new(inner.config.log, plugin.plugin.clone()),
            stdio_written: 0,
            stdout,
            stderr,
            max_stdio,
            max_count_bytes: inner.config.max_output_bytes,
            max_messages: inner.config.max_messages,
            max_model_tokens: inner.config.max_model_tokens,
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
            max_messages: inner.config.max_messages,
        }
    }

    /// The engine priority of this instance's later `model.complete` calls.
    pub(crate) fn set_model_priority(&mut self, priority: crate::engine::Priority) {
        if let Some(store) = self.store.as_mut() {
            store.data_mut().model_priority = priority;
        }
    }

    /// Who pays for this instance's later `model.complete` calls.
    pub(crate) fn set_model_account(&mut self, account: crate::policy::ModelAccount) {
        if let Some(store) = self.store.as_mut() {
            store.data_mut().model_account = account;
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
        // Inside the caller's run and node spans (the pool carries them over), so a plugin's
        // `host.log` lines and any failure name the run.
        let _span =
            tracing::debug_span!("plugin_call", plugin = %self.plugin.plugin, call).entered();
        store.set_epoch_deadline(self.deadline_ticks);
        let state = store.data_mut();
        state.deadline = Instant::now() + self.deadline;
        state.log.new_call();
        state.stdio_written = 0;
        // A last line of defence: the host functions are written not to panic on guest
        // input (the ones of wasmtime-wasi that nest a tokio runtime are replaced), but if
        // one did, the panic unwinds out of wasm to here and fails this call and the
        // instance, never the host.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(store)));
        // Also after a failure: a guest's panic message is on its stderr.
        store.data_mut().log_guest_output();
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
                    "a host call made by the plugin panicked: {}",
                    clip(&panic_message(&panic), MAX_ERROR_DETAIL_BYTES)
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
        if let Some(limit) = error.downcast_ref::<LimitExceeded>() {
            return PluginError::LimitExceeded {
                plugin,
                call,
                limit: Box::new(limit.clone()),
            };
        }
        // wasmtime's descriptions may quote the guest (its function names in a backtrace).
        let detail = |text: String| clip(&text, MAX_ERROR_DETAIL_BYTES).into_owned();
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
                kind: detail(trap.to_string()),
            },
            // Not a trap: e.g. the instance pool is exhausted, or a link error.
            None if call == INSTANTIATE => PluginError::Instantiate {
                plugin,
                reason: detail(format!("{error:#}")),
            },
            None => PluginError::Trap {
                plugin,
                call,
                kind: detail(format!("{error:#}")),
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

    /// Fails when an answer of messages costs the host more than it accepts: their text
    /// (each message weighing [`MESSAGE_OVERHEAD_BYTES`] more) against the output limit, and
    /// their number against the message limit. Checked when the call returns, before the
    /// host renders or tokenizes any of it.
    pub(crate) fn check_messages(
        &mut self,
        call: &'static str,
        messages: &[crate::engine::ChatMessage],
    ) -> Result<(), PluginError> {
        if messages.len() > self.max_messages {
            return Err(self.reject(PluginError::LimitExceeded {
                plugin: self.plugin.plugin.clone(),
                call,
                limit: Box::new(LimitExceeded {
                    what: "messages in an answer",
                    limit: self.max_messages as u64,
                    asked: messages.len() as u64,
                }),
            }));
        }
        let bytes = messages
            .iter()
            .map(|m| m.content.len() + MESSAGE_OVERHEAD_BYTES)
            .sum();
        self.check_output(call, bytes)
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
