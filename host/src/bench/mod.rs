//! Every benchmark of `staircase bench`, through the library's public APIs, as any caller
//! would use them: `engine` (our engine against bare kernels, batching, warm-prefix TTFT),
//! `against_server` (our engine against llama.cpp's server on the same GGUF),
//! `speculation` (decode speed with and without speculative decoding), `plugins` (what
//! the plugin host costs), `staircase` (single model vs layered vs staircase pipelines),
//! `serve` (what HTTP adds to a run) and `routing` (routing policies over real replicas). Bare-kernel timings come from the one local-engine probe
//! (`engine::local::probe`). Figures are ratios measured within one run; nothing here
//! asserts a speed. This room must not reach into another room's internals, and no room
//! depends on it.

pub mod against_server;
pub mod collab;
pub mod compress;
pub mod engine;
pub mod plugins;
pub mod routing;
pub mod serve;
pub mod speculation;
pub mod staircase;

use std::time::Duration;

use crate::engine::EngineError;
use crate::plugin::PluginError;

/// Why a benchmark could not finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    Run(#[from] crate::pipeline::RunError),
    #[error(transparent)]
    Spec(#[from] crate::pipeline::SpecError),
    #[error("the compressor failed: {0}")]
    Compressor(String),
    #[error("starting the async runtime: {0}")]
    Runtime(#[from] std::io::Error),
    /// A request that should have produced a token did not, so it cannot be timed.
    #[error("a benchmark request finished without a token")]
    Untimed,
}

/// Seconds, never zero (so rates stay finite).
fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}

/// The `q` quantile of `values` by nearest rank (0 for none): the smallest value with at
/// least `q` of them at or below it, so a p99 is a value some request really had. The one
/// definition every benchmark's percentiles use. Sorts them.
fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// The median of `values` (0 for none); sorts them.
fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.5), 50.0);
        assert_eq!(percentile(&mut v, 0.99), 99.0);
        assert_eq!(percentile(&mut [3.0], 0.99), 3.0);
        assert_eq!(percentile(&mut [], 0.5), 0.0);
        // Not the other definition `bench routing` had (index round((n - 1) q)), which gave 3.
        assert_eq!(percentile(&mut [4.0, 1.0, 3.0, 2.0], 0.5), 2.0);
    }
}
