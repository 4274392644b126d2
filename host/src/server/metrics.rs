//! Prometheus metrics through the `metrics` facade. Request counters and latency histograms
//! are recorded as requests finish (a remote model's per-replica latencies by the remote
//! engine itself); engine, replica, queue and reload figures are read from their owners when
//! `/metrics` is scraped, so they are never stale.
//!
//! Beside our own names, the figures a vLLM Grafana dashboard reads are exported under vLLM's
//! names and label (`vllm:*`, `model_name`: the pipeline or model a request named), so an
//! operator's dashboards and alerts work unchanged.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::openai::Usage;
use crate::app::{App, Rejection};
use crate::engine::remote::redact_url;
use crate::plugin::{Registry, RegistryEvent};
use crate::routing::BreakerState;

/// Latency buckets in seconds: a cached first token on a small CPU takes tens of ms, a
/// pipeline's whole answer up to minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// vLLM's names (v1 engine, `vllm/v1/metrics/loggers.py`), labelled `model_name`.
mod vllm {
    pub(super) const RUNNING: &str = "vllm:num_requests_running";
    pub(super) const WAITING: &str = "vllm:num_requests_waiting";
    pub(super) const TTFT: &str = "vllm:time_to_first_token_seconds";
    pub(super) const E2E: &str = "vllm:e2e_request_latency_seconds";
    pub(super) const PROMPT_TOKENS: &str = "vllm:prompt_tokens_total";
    pub(super) const GENERATION_TOKENS: &str = "vllm:generation_tokens_total";
    pub(super) const SUCCESS: &str = "vllm:request_success_total";
    pub(super) const LABEL: &str = "model_name";
}

/// One admitted request in vLLM's gauges: waiting until [`InFlight::running`], then running,
/// until dropped (whatever ended it: an answer, an error, a client that left).
pub(crate) struct InFlight {
    model: String,
    running: bool,
}

impl InFlight {
    /// It left the queue and runs.
    pub(crate) fn running(&mut self) {
        if !self.running {
            gauge!(vllm::WAITING, vllm::LABEL => self.model.clone()).decrement(1.0);
            gauge!(vllm::RUNNING, vllm::LABEL => self.model.clone()).increment(1.0);
            self.running = true;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let name = if self.running {
            vllm::RUNNING
        } else {
            vllm::WAITING
        };
        gauge!(name, vllm::LABEL => self.model.clone()).decrement(1.0);
    }
}

/// The process's recorder: installed once, shared by every server of the process.
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

pub(crate) struct Metrics {
    handle: PrometheusHandle,
}

impl Metrics {
    pub(crate) fn install() -> Result<Self, String> {
        if let Some(handle) = HANDLE.get() {
            return Ok(Self {
                handle: handle.clone(),
            });
        }
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .map_err(|e| e.to_string())?
            .install_recorder()
            .map_err(|e| e.to_string())?;
        let handle = HANDLE.get_or_init(|| handle).clone();
        Ok(Self { handle })
    }

    /// One answered request.
    pub(crate) fn request(&self, model: &str, status: &str) {
        counter!("staircase_requests_total", "model" => model.to_string(), "status" => status.to_string())
            .increment(1);
    }

    /// A request admitted to the queue (vLLM's waiting and running gauges).
    pub(crate) fn admitted(&self, model: &str) -> InFlight {
        gauge!(vllm::WAITING, vllm::LABEL => model.to_string()).increment(1.0);
        InFlight {
            model: model.to_string(),
            running: false,
        }
    }

    /// A run that finished (`reason`: `stop` or `length`): its latencies and tokens.
    pub(crate) fn finished(
        &self,
        model: &str,
        reason: &'static str,
        ttft: Option<Duration>,
        total: Duration,
        usage: &Usage,
    ) {
        let model = model.to_string();
        let vllm_label = [(vllm::LABEL, model.clone())];
        if let Some(ttft) = ttft {
            histogram!("staircase_ttft_seconds", "model" => model.clone())
                .record(ttft.as_secs_f64());
            histogram!(vllm::TTFT, &vllm_label).record(ttft.as_secs_f64());
        }
        histogram!("staircase_request_duration_seconds", "model" => model.clone())
            .record(total.as_secs_f64());
        histogram!(vllm::E2E, &vllm_label).record(total.as_secs_f64());
        counter!(vllm::PROMPT_TOKENS, &vllm_label).increment(u64::from(usage.prompt_tokens));
        counter!(vllm::GENERATION_TOKENS, &vllm_label)
            .increment(u64::from(usage.completion_tokens));
        counter!(vllm::SUCCESS, vllm::LABEL => model.clone(), "finished_reason" => reason)
            .increment(1);
        counter!("staircase_prompt_tokens_total", "model" => model.clone())
            .increment(u64::from(usage.prompt_tokens));
        counter!("staircase_completion_tokens_total", "model" => model.clone())
            .increment(u64::from(usage.completion_tokens));
        counter!("staircase_prefix_cache_hit_tokens_total", "model" => model)
            .increment(u64::from(usage.prompt_tokens_details.cached_tokens));
    }

    /// A pipeline run that chose among declared variants (`tune::adaptive`).
    pub(crate) fn variant(&self, model: &str, variant: &str, met_budget: bool) {
        counter!("staircase_variant_runs_total", "model" => model.to_string(), "variant" => variant.to_string(), "met_budget" => met_budget.to_string())
            .increment(1);
    }

    /// A client that left mid-stream.
    /// A streaming client stopped reading and its run was cancelled (also counted as
    /// cancelled).
    pub(crate) fn stalled(&self, model: &str) {
        counter!("staircase_requests_stalled_total", "model" => model.to_string()).increment(1);
    }

    pub(crate) fn cancelled(&self, model: &str) {
        counter!("staircase_requests_cancelled_total", "model" => model.to_string()).increment(1);
    }

    /// An output guard's verdict on an answer of `model` (not every release: only what
    /// changed the text or the stream).
    pub(crate) fn guard_event(&self, model: &str, event: &crate::guard::GuardEvent) {
        use crate::guard::GuardEvent;
        let (guard, verdict) = match event {
            GuardEvent::Redacted { guard, .. } => (guard, "redacted"),
            GuardEvent::Stopped { guard, .. } => (guard, "stopped"),
            GuardEvent::Failed {
                guard, open: true, ..
            } => (guard, "failed_open"),
            GuardEvent::Failed { guard, .. } => (guard, "failed_closed"),
            GuardEvent::Overflowed { guard, .. } => (guard, "overflowed"),
        };
        counter!(
            "staircase_guard_verdicts_total",
            "model" => model.to_string(),
            "guard" => guard.clone(),
            "verdict" => verdict
        )
        .increment(1);
    }

    /// A run failed in a plugin.
    pub(crate) fn plugin_failure(&self, plugin: &str, message: &str) {
        let cause = if message.contains("deadline") || message.contains("timed out") {
            "timeout"
        } else if message.contains("trap") || message.contains("panic") {
            "trap"
        } else {
            "error"
        };
        counter!("staircase_plugin_failures_total", "plugin" => plugin.to_string(), "cause" => cause)
            .increment(1);
    }

    /// The exposition text, with the gauges read now.
    pub(crate) fn render(&self, app: &App, running: usize, waiting: usize) -> String {
        gauge!("staircase_runs_running").set(running as f64);
        gauge!("staircase_queue_depth").set(waiting as f64);
        // Every served name shows vLLM's gauges, at 0 before its first request.
        let names = app
            .pipelines()
            .list()
            .iter()
            .map(|v| v.name.clone())
            .collect::<Vec<_>>();
        for name in names.into_iter().chain(app.model_names()) {
            for gauge in [vllm::RUNNING, vllm::WAITING] {
                gauge!(gauge, vllm::LABEL => name.clone()).increment(0.0);
            }
        }
        for (model, stats) in app.engine_stats() {
            let g = |name: &'static str, v: usize| {
                gauge!(name, "model" => model.clone()).set(v as f64);
            };
            g("staircase_engine_live_sequences", stats.live_sequences);
            g("staircase_engine_queued", stats.queued);
            g("staircase_engine_kv_cells_used", stats.kv_cells_used);
            g(
                "staircase_engine_kv_sequence_positions",
                stats.kv_sequence_positions,
            );
            g("staircase_prefix_cache_cells", stats.cache_cells);
            g("staircase_prefix_cache_entries", stats.cache_entries);
            g(
                "staircase_prefix_cache_locked_prefixes",
                stats.locked_prefixes,
            );
            counter!("staircase_speculation_drafted_tokens_total", "model" => model.clone())
                .absolute(stats.speculation.drafted_tokens);
            counter!("staircase_speculation_accepted_tokens_total", "model" => model.clone())
                .absolute(stats.speculation.accepted_tokens);
        }
        // 0 once a local engine's thread crashed (`/health` answers 503 then).
        for entry in app.models() {
            if let Some(engine) = entry.local() {
                gauge!("staircase_engine_up", "model" => entry.name.clone())
                    .set(if engine.crashed() { 0.0 } else { 1.0 });
            }
        }
        for (model, replicas) in app.replica_stats() {
            for replica in replicas {
                let labels = [
                    ("model", model.clone()),
                    ("replica", redact_url(&replica.url)),
                ];
                counter!("staircase_replica_requests_total", &labels).absolute(replica.requests);
                counter!("staircase_replica_errors_total", &labels).absolute(replica.errors);
                gauge!("staircase_replica_in_flight", &labels).set(replica.in_flight as f64);
                gauge!("staircase_replica_healthy", &labels)
                    .set(f64::from(u8::from(replica.healthy)));
                // 0 closed, 1 half-open, 2 open: a value alerts can compare.
                gauge!("staircase_replica_breaker_state", &labels).set(match replica.breaker {
                    BreakerState::Closed => 0.0,
                    BreakerState::HalfOpen => 1.0,
                    BreakerState::Open => 2.0,
                });
                counter!("staircase_replica_prompt_tokens_total", &labels)
                    .absolute(replica.prompt_tokens);
                counter!("staircase_replica_cached_prompt_tokens_total", &labels)
                    .absolute(replica.cached_prompt_tokens);
                counter!("staircase_replica_routed_prefix_hit_chars_total", &labels)
                    .absolute(replica.predicted_hit_chars);
            }
        }
        let (accepted, rejected) = app.pipelines().counts();
        counter!("staircase_reloads_total", "what" => "pipeline", "result" => "accepted")
            .absolute(accepted);
        counter!("staircase_reloads_total", "what" => "pipeline", "result" => "rejected")
            .absolute(rejected);
        self.handle.run_upkeep();
        self.handle.render()
    }
}

/// Plugin versions the registry accepted and files it rejected since the server started.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub(crate) struct PluginLog {
    pub(crate) accepted: u64,
    pub(crate) rejected: u64,
    pub(crate) last_rejection: Option<Rejection>,
}

/// Counts the registry's loads and rejections (and keeps the last rejection) on a thread of
/// its own; it ends with the registry.
pub(crate) fn count_plugin_reloads(registry: &Registry, log: Arc<Mutex<PluginLog>>) {
    let events = registry.subscribe();
    let spawned = std::thread::Builder::new()
        .name("plugin-events".into())
        .spawn(move || {
            for event in events {
                match event {
                    RegistryEvent::Loaded { .. } => {
                        super::lock(&log).accepted += 1;
                        counter!("staircase_reloads_total", "what" => "plugin", "result" => "accepted")
                            .increment(1);
                    }
                    RegistryEvent::Rejected { path, error } => {
                        counter!("staircase_reloads_total", "what" => "plugin", "result" => "rejected")
                            .increment(1);
                        let mut log = super::lock(&log);
                        log.rejected += 1;
                        log.last_rejection = Some(Rejection {
                            path,
                            error,
                            at_unix_ms: SystemTime::now()
                                .duration_since(SystemTime::UNIX_EPOCH)
                                .map_or(0, |d| d.as_millis()),
                        });
                    }
                    RegistryEvent::Unloaded { .. } => {}
                }
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "plugin reloads will not be counted");
    }
}
