//! `staircase bench plugins`: what the plugin host costs. Per-chunk call cost of the
//! built-in aggregator, instantiation (pooling vs on-demand), compile vs load from the
//! compiled cache, and file-change-to-swap latency of hot reload. Figures are measured in
//! one run and reported with ratios; nothing here asserts a speed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::engine::{ChatMessage, Role};
use crate::plugin::{
    AggregatorInstance, HostConfig, LoadedPlugin, Manifest, PluginError, PluginRuntime, Registry,
    RegistryEvent, builtin, manifest_path, read_manifest,
};
use crate::policy::{Source, StreamMode};

/// The aggregator measured: the built-in one pipelines use.
const AGGREGATOR: &str = "moa-aggregator";
/// Proposer chunk size: a few tokens, as a proposer streams them.
const CHUNK: &str = "token text, ok ";
/// Chunks per session: three proposers of ~250 tokens each.
const CHUNKS_PER_SESSION: usize = 200;
/// How long the per-chunk measurement runs, at least.
const CALL_BUDGET: Duration = Duration::from_secs(2);
const INSTANTIATIONS: usize = 500;
const SWAPS: usize = 10;
/// A swap that takes longer is reported as failed.
const SWAP_TIMEOUT: Duration = Duration::from_secs(60);

/// One measured figure.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    pub note: String,
}

fn row(name: &str, value: f64, unit: &'static str, note: impl Into<String>) -> BenchRow {
    BenchRow {
        name: name.into(),
        value,
        unit,
        note: note.into(),
    }
}

fn builtin_bytes(name: &str) -> Result<(&'static [u8], Manifest), PluginError> {
    let b = builtin::BUILTINS
        .iter()
        .find(|b| b.name == name)
        .ok_or_else(|| PluginError::NotFound { name: name.into() })?;
    let manifest = Manifest::parse(b.manifest).map_err(|e| PluginError::Manifest {
        path: PathBuf::from(name),
        reason: e.0,
    })?;
    Ok((b.wasm, manifest))
}

fn scratch_dir(what: &str) -> Result<PathBuf, PluginError> {
    let dir = std::env::temp_dir().join(format!("staircase-bench-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|error| PluginError::Io {
        path: dir.clone(),
        error,
    })?;
    Ok(dir)
}

fn runtime(cache_dir: Option<PathBuf>, pooling: bool) -> Result<PluginRuntime, PluginError> {
    PluginRuntime::new(HostConfig {
        cache_dir,
        pooling,
        ..HostConfig::default()
    })
}

/// Runs every plugin benchmark.
pub fn run() -> Result<Vec<BenchRow>, PluginError> {
    run_with(&[])
}

/// [`run`], and `components` (each `NAME.wasm` with `NAME.toml` beside it, e.g. the Python
/// and JavaScript examples) measured for compile vs cached load.
pub fn run_with(components: &[PathBuf]) -> Result<Vec<BenchRow>, PluginError> {
    let mut rows = Vec::new();
    for path in components {
        rows.extend(compile_vs_cache(path)?);
    }
    let (wasm, manifest) = builtin_bytes(AGGREGATOR)?;

    // Compile vs cached load.
    let cache_dir = scratch_dir("cache")?;
    let cold = runtime(Some(cache_dir.clone()), true)?.load(wasm, manifest.clone())?;
    let pooled = runtime(Some(cache_dir.clone()), true)?;
    let warm = pooled.load(wasm, manifest.clone())?;
    let compile = cold.compile_time.as_secs_f64();
    let cached = warm.compile_time.as_secs_f64();
    rows.push(row(
        "compile (moa-aggregator)",
        compile * 1e3,
        "ms",
        "cranelift, cache miss",
    ));
    rows.push(row(
        "load from compiled cache",
        cached * 1e3,
        "ms",
        format!("{:.0}x faster than compiling", compile / cached.max(1e-9)),
    ));

    // Instantiation: pooling vs on-demand.
    let on_demand = runtime(Some(cache_dir.clone()), false)?;
    let warm_od = on_demand.load(wasm, manifest.clone())?;
    let pool_us = instantiate_cost(&pooled, &warm)?;
    let od_us = instantiate_cost(&on_demand, &warm_od)?;
    rows.push(row(
        "instantiate + open session (pooling)",
        pool_us,
        "µs",
        if pooled.is_pooling() {
            "pooling allocator"
        } else {
            "pooling unavailable: on-demand"
        },
    ));
    rows.push(row(
        "instantiate + open session (on-demand)",
        od_us,
        "µs",
        format!("pooling is {:.1}x faster", od_us / pool_us.max(1e-9)),
    ));

    // Per-chunk calls.
    for mode in [StreamMode::Staircase, StreamMode::Layered] {
        let (per_chunk, steps) = chunk_cost(&pooled, &warm, mode)?;
        rows.push(row(
            &format!("per chunk: push + next-step ({mode:?})"),
            per_chunk,
            "µs",
            format!("target < 5 µs; {steps} steps per {CHUNKS_PER_SESSION}-chunk session"),
        ));
    }

    // Hot reload.
    let (median, max, compile_swap) = swap_latency(&cache_dir)?;
    rows.push(row(
        "file change -> swap (cached), median",
        median * 1e3,
        "ms",
        format!(
            "target < 100 ms; max {:.1} ms over {SWAPS} swaps",
            max * 1e3
        ),
    ));
    rows.push(row(
        "file change -> swap (new component, compiled)",
        compile_swap * 1e3,
        "ms",
        "includes compiling",
    ));
    let _ = std::fs::remove_dir_all(&cache_dir);
    Ok(rows)
}

/// Compile time and cached-load time of one component, with a cache of its own.
fn compile_vs_cache(wasm_path: &Path) -> Result<Vec<BenchRow>, PluginError> {
    let manifest = read_manifest(&manifest_path(wasm_path))?;
    let wasm = std::fs::read(wasm_path).map_err(|error| PluginError::Io {
        path: wasm_path.to_path_buf(),
        error,
    })?;
    let cache = scratch_dir(&format!("cache-{}", manifest.name))?;
    let runtime = runtime(Some(cache.clone()), true)?;
    let cold = runtime.load(&wasm, manifest.clone())?;
    let warm = runtime.load(&wasm, manifest.clone())?;
    let _ = std::fs::remove_dir_all(&cache);
    let (compile, cached) = (
        cold.compile_time.as_secs_f64(),
        warm.compile_time.as_secs_f64(),
    );
    Ok(vec![
        row(
            &format!("compile ({})", manifest.name),
            compile * 1e3,
            "ms",
            format!("{} KiB component", wasm.len() / 1024),
        ),
        row(
            &format!("load from compiled cache ({})", manifest.name),
            cached * 1e3,
            "ms",
            format!("{:.0}x faster than compiling", compile / cached.max(1e-9)),
        ),
    ])
}

fn conversation() -> Vec<ChatMessage> {
    vec![ChatMessage::new(Role::User, "Why is the sky blue?")]
}

fn sources() -> Vec<Source> {
    (0..3)
        .map(|i| Source {
            id: format!("p{i}"),
            label: format!("proposer {i}"),
        })
        .collect()
}

fn instantiate_cost(
    runtime: &PluginRuntime,
    plugin: &Arc<LoadedPlugin>,
) -> Result<f64, PluginError> {
    let (conversation, sources) = (conversation(), sources());
    let started = Instant::now();
    for _ in 0..INSTANTIATIONS {
        let session = AggregatorInstance::new(
            runtime,
            plugin,
            &conversation,
            &sources,
            StreamMode::Staircase,
        )?;
        drop(session);
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / INSTANTIATIONS as f64)
}

/// Microseconds per chunk (one push and one next-step) and steps per session.
fn chunk_cost(
    runtime: &PluginRuntime,
    plugin: &Arc<LoadedPlugin>,
    mode: StreamMode,
) -> Result<(f64, usize), PluginError> {
    let (conversation, sources) = (conversation(), sources());
    let mut calls = 0usize;
    let mut steps = 0usize;
    let mut busy = Duration::ZERO;
    while busy < CALL_BUDGET {
        let mut session = AggregatorInstance::new(runtime, plugin, &conversation, &sources, mode)?;
        steps = 0;
        let started = Instant::now();
        for i in 0..CHUNKS_PER_SESSION {
            session.try_push(&sources[i % sources.len()].id, CHUNK)?;
            steps += usize::from(session.try_next_step()?.is_some());
        }
        busy += started.elapsed();
        calls += CHUNKS_PER_SESSION;
    }
    Ok((busy.as_secs_f64() * 1e6 / calls as f64, steps))
}

/// Writes `bytes` to `path` atomically (a temporary name the watcher ignores, then rename).
fn replace(path: &Path, bytes: &[u8]) -> Result<(), PluginError> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|error| PluginError::Io {
            path: path.to_path_buf(),
            error,
        })
}

fn wait_loaded(
    events: &std::sync::mpsc::Receiver<RegistryEvent>,
    sha256: &str,
) -> Result<(), PluginError> {
    let deadline = Instant::now() + SWAP_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(RegistryEvent::Loaded { sha256: s, .. }) if s == sha256 => return Ok(()),
            Ok(RegistryEvent::Rejected { error, .. }) => return Err(PluginError::Runtime(error)),
            Ok(_) => {}
            Err(_) => return Err(PluginError::Runtime("no swap within the timeout".into())),
        }
    }
}

/// Median and max seconds from a file change to the swap, with both versions cached, and
/// the same for a version that must be compiled first.
fn swap_latency(cache_dir: &Path) -> Result<(f64, f64, f64), PluginError> {
    use sha2::{Digest, Sha256};
    let read = |crate_name: &str| {
        let path = builtin::guest_artifact(crate_name);
        std::fs::read(&path).map_err(|error| PluginError::Io { path, error })
    };
    let v1 = read("reload-v1")?;
    let v2 = read("reload-v2")?;
    let manifest =
        std::fs::read(builtin::guest_manifest("fixtures/reload-v1")).map_err(|error| {
            PluginError::Io {
                path: builtin::guest_manifest("fixtures/reload-v1"),
                error,
            }
        })?;
    let dir = scratch_dir("reload")?;
    let wasm_path = dir.join("reloadable.wasm");
    replace(&dir.join("reloadable.toml"), &manifest)?;
    replace(&wasm_path, &v1)?;
    let registry = Registry::new(runtime(Some(cache_dir.to_path_buf()), true)?);
    registry.load_file(&wasm_path)?;
    // Warm the cache with v2 once.
    registry.runtime().load(
        &v2,
        Manifest::parse(&String::from_utf8_lossy(&manifest)).map_err(|e| {
            PluginError::Manifest {
                path: dir.join("reloadable.toml"),
                reason: e.0,
            }
        })?,
    )?;
    registry.watch(std::slice::from_ref(&dir))?;
    let events = registry.subscribe();
    let mut times = Vec::with_capacity(SWAPS);
    for i in 0..SWAPS {
        let bytes = if i % 2 == 0 { &v2 } else { &v1 };
        let sha = hex::encode(Sha256::digest(bytes));
        let started = Instant::now();
        replace(&wasm_path, bytes)?;
        wait_loaded(&events, &sha)?;
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    // A component the cache has never seen: the proposer, under the same name.
    let fresh = builtin_bytes("proposer")?.0;
    let fresh_dir = scratch_dir("fresh-cache")?;
    let cold_registry = Registry::new(runtime(Some(fresh_dir.clone()), true)?);
    replace(&wasm_path, &v1)?;
    cold_registry.load_file(&wasm_path)?;
    cold_registry.watch(std::slice::from_ref(&dir))?;
    let cold_events = cold_registry.subscribe();
    drop(registry);
    let sha = hex::encode(Sha256::digest(fresh));
    let started = Instant::now();
    replace(&wasm_path, fresh)?;
    wait_loaded(&cold_events, &sha)?;
    let compile_swap = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&fresh_dir);
    Ok((times[times.len() / 2], times[times.len() - 1], compile_swap))
}
