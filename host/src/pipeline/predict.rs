//! The critical-path model the tuner searches on and the run-time variant choice
//! ([`super::adaptive`]) predicts with: a pipeline's predicted critical path and
//! time to first token from per-model token latencies, before anything runs.
//!
//! Like [`crate::pipeline::critical`] (LAMaS-style), a node costs its prompt times the
//! prefill latency plus its output tokens times the decode latency of its model; unlike the
//! runtime's estimate it models staircase edges: a consumer starts on its inputs' first
//! chunks, writes part of its answer while they still stream, and only the rest after the
//! last one ends. The prediction is the finish time of the output node, which is what the
//! runtime's measured critical path explains (a chain of nodes, each counted from when its
//! input ended). Nodes of one level on one model share it, and so do their staircase
//! consumers on it: each other sequence adds the model's measured per-sequence decode cost. This module only computes.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::pipeline::critical::{self, Latencies, PROMPT_OVERHEAD_TOKENS};
use crate::pipeline::spec::{ModelBinding, NodeKind};
use crate::pipeline::stream::StreamPolicy;
use crate::pipeline::{NodeIndex, Pipeline};
use crate::policy::StreamMode;

/// Bytes per token, as the built-in aggregator estimates sizes from bytes.
const BYTES_PER_TOKEN: f64 = 4.0;
/// The built-in aggregator's `step-chars` and `step-tokens` defaults: a step per 160 new
/// bytes of input, 16 tokens each (a node's `config` overrides them, as the plugin reads it).
const STEP_CHARS: f64 = 160.0;
const STEP_TOKENS: f64 = 16.0;
/// Share of its inputs' remaining time a staircase consumer spends generating when input
/// is plentiful: between steps it prefills the new chunks and waits for the step decision.
/// Calibrated on the simulated backend (`tune::tests` checks prediction against runs).
pub const OVERLAP_DUTY: f64 = 0.85;

/// One model's measured costs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ModelLatency {
    /// One sequence alone.
    pub solo: Latencies,
    /// What each other sequence decoding at the same time adds to a token (zero on a
    /// backend that serves requests in parallel; most of a token on one CPU).
    #[serde(serialize_with = "crate::millis::serialize")]
    pub per_extra_sequence: Duration,
}

impl ModelLatency {
    pub fn uniform(solo: Latencies) -> Self {
        Self {
            solo,
            per_extra_sequence: Duration::ZERO,
        }
    }

    fn decode(&self, concurrent: usize) -> Duration {
        self.solo.decode_per_token
            + self.per_extra_sequence * u32::try_from(concurrent.saturating_sub(1)).unwrap_or(0)
    }
}

/// Latencies by model name, with one for models not measured.
#[derive(Clone, Debug, Serialize)]
pub struct LatencyTable {
    pub models: BTreeMap<String, ModelLatency>,
    pub fallback: ModelLatency,
}

impl LatencyTable {
    /// Every model costs `latency`.
    pub fn uniform(latency: ModelLatency) -> Self {
        Self {
            models: BTreeMap::new(),
            fallback: latency,
        }
    }

    pub fn with(mut self, model: &str, latency: ModelLatency) -> Self {
        self.models.insert(model.to_string(), latency);
        self
    }

    pub fn of(&self, model: &str) -> ModelLatency {
        self.models.get(model).copied().unwrap_or(self.fallback)
    }
}

/// What the model predicts for one pipeline and prompt.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prediction {
    #[serde(serialize_with = "crate::millis::serialize")]
    pub critical_path: Duration,
    #[serde(serialize_with = "crate::millis::serialize")]
    pub ttft: Duration,
    /// The chain that bounds the answer, from a source to the output.
    #[serde(skip)]
    pub path: Vec<NodeIndex>,
}

/// The model a node generates with (a routed node: its first model).
pub fn model_of(binding: &ModelBinding) -> Option<&str> {
    match binding {
        ModelBinding::None => None,
        ModelBinding::Fixed(name) => Some(name),
        ModelBinding::Routed { models, .. } => models.first().map(String::as_str),
    }
}

fn config_f64(config: &crate::policy::PluginConfig, key: &str, default: f64) -> f64 {
    config
        .get(key)
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(default)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Level of each node: its longest distance from a source.
pub fn levels(pipeline: &Pipeline) -> Vec<usize> {
    let mut level = vec![0usize; pipeline.nodes.len()];
    for (i, node) in pipeline.nodes.iter().enumerate() {
        level[i] = node
            .inputs
            .iter()
            .map(|e| level[e.from.0] + 1)
            .max()
            .unwrap_or(0);
    }
    level
}

/// Sequences decoding on node `i`'s model while it does: the nodes of its level on that
/// model, and the staircase consumers of that level on it (they step on its chunks while
/// it writes, each step taking its turn on the engine).
pub fn concurrency(pipeline: &Pipeline, mode: StreamMode, level: &[usize], i: usize) -> usize {
    let model = model_of(&pipeline.nodes[i].model);
    let on_model = |j: usize| model_of(&pipeline.nodes[j].model) == model;
    let peers = (0..pipeline.nodes.len())
        .filter(|&j| level[j] == level[i] && on_model(j))
        .count();
    let consumers = pipeline
        .nodes
        .iter()
        .enumerate()
        .filter(|&(j, node)| {
            on_model(j)
                && node.inputs.iter().any(|e| {
                    level[e.from.0] == level[i]
                        && matches!(e.stream.in_mode(mode), StreamPolicy::Staircase(_))
                })
        })
        .count();
    peers + consumers
}

/// Predicts `pipeline` run in `mode` on a prompt of `prompt_tokens`.
pub fn predict(
    pipeline: &Pipeline,
    mode: StreamMode,
    prompt_tokens: u32,
    table: &LatencyTable,
) -> Prediction {
    let n = pipeline.nodes.len();
    let expected: Vec<u32> = pipeline
        .nodes
        .iter()
        .map(critical::expected_tokens)
        .collect();
    // Who shares a model when.
    let level = levels(pipeline);
    let concurrent = |i: usize| concurrency(pipeline, mode, &level, i);
    let (mut first, mut finish) = (vec![0.0f64; n], vec![0.0f64; n]);
    let mut via: Vec<Option<NodeIndex>> = vec![None; n];
    for (i, node) in pipeline.nodes.iter().enumerate() {
        let Some(model) = model_of(&node.model) else {
            // A compressor: a plugin call on complete inputs, negligible next to generation.
            let (end, from) = latest_end(node.inputs.iter().map(|e| e.from), &finish);
            (first[i], finish[i], via[i]) = (end, end, from);
            continue;
        };
        let latency = table.of(model);
        let (d, p) = (
            secs(latency.decode(concurrent(i))),
            secs(latency.solo.prefill_per_token),
        );
        let out = f64::from(expected[i].max(1));
        let input_tokens: f64 = node
            .inputs
            .iter()
            .map(|e| f64::from(expected[e.from.0]))
            .sum();
        let prompt = f64::from(prompt_tokens + PROMPT_OVERHEAD_TOKENS) + input_tokens;
        let (end, from) = latest_end(node.inputs.iter().map(|e| e.from), &finish);
        via[i] = from;
        let staircase: Vec<_> = node
            .inputs
            .iter()
            .filter_map(|e| match e.stream.in_mode(mode) {
                StreamPolicy::Staircase(schedule) => Some((e.from, schedule)),
                StreamPolicy::Complete => None,
            })
            .collect();
        if node.inputs.is_empty() || staircase.is_empty() {
            first[i] = end + p * prompt + d;
            finish[i] = end + p * prompt + d * out;
            continue;
        }
        // Staircase: the first step comes on the earliest first chunk (a complete input
        // counts when it ends); the instruction and question were prefilled meanwhile.
        let mut start = f64::INFINITY;
        let mut first_chunk = 0.0;
        let mut last_chunks = 0.0;
        let mut input_rate = 0.0; // bytes per second while the inputs stream
        for edge in &node.inputs {
            let from = edge.from.0;
            let produced = f64::from(expected[from].max(1));
            let producer_d = (finish[from] - first[from]).max(0.0) / (produced - 1.0).max(1.0);
            let (arrival, size) = match staircase.iter().find(|(f, _)| f.0 == from) {
                Some((_, schedule)) => {
                    let size = f64::from(schedule.size(0)).min(produced);
                    last_chunks += f64::from(schedule.size(usize::MAX)).min(produced);
                    if producer_d > 0.0 {
                        input_rate += BYTES_PER_TOKEN / producer_d;
                    }
                    (first[from] + producer_d * (size - 1.0), size)
                }
                None => (finish[from], produced),
            };
            if arrival < start {
                (start, first_chunk) = (arrival, size);
            }
        }
        first[i] = start + p * first_chunk + d;
        let (step_chars, step_tokens) = match node.kind {
            NodeKind::Aggregator => (
                config_f64(&node.config, "step-chars", STEP_CHARS),
                config_f64(&node.config, "step-tokens", STEP_TOKENS),
            ),
            // An agent steps each time every input shows a new chunk.
            _ => (
                BYTES_PER_TOKEN * last_chunks.max(1.0),
                f64::from(crate::pipeline::role_session::ROLE_STEP_TOKENS),
            ),
        };
        // Tokens per second while inputs stream: the model's pace, or the pace new input
        // earns steps, whichever is lower.
        let rate = (OVERLAP_DUTY / d).min(step_tokens * input_rate / step_chars);
        let overlap = ((end - first[i]).max(0.0) * rate).min(out - 1.0);
        let tail = p * last_chunks + d * (out - overlap);
        finish[i] = (first[i] + d * (out - 1.0)).max(end + tail);
    }
    let output = pipeline.output.0;
    let mut path = vec![pipeline.output];
    let mut at = output;
    while let Some(previous) = via[at] {
        path.push(previous);
        at = previous.0;
    }
    path.reverse();
    Prediction {
        critical_path: Duration::from_secs_f64(finish[output].max(0.0)),
        ttft: Duration::from_secs_f64(first[output].max(0.0)),
        path,
    }
}

/// When the last of `inputs` ends, and which one it is.
fn latest_end(inputs: impl Iterator<Item = NodeIndex>, finish: &[f64]) -> (f64, Option<NodeIndex>) {
    inputs.fold((0.0, None), |(end, from), input| {
        if from.is_none() || finish[input.0] > end {
            (finish[input.0], Some(input))
        } else {
            (end, from)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOA: &str = r#"
[stream]
policy = "staircase"
chunk_tokens = [8, 16, 32]
[[nodes]]
id = "a"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 100
[[nodes]]
id = "b"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 50
[[nodes]]
id = "agg"
kind = "aggregator"
plugin = "moa"
model = "default"
max_tokens = 60
inputs = ["a", "b"]
"#;

    fn table(decode_ms: u64) -> LatencyTable {
        LatencyTable::uniform(ModelLatency::uniform(Latencies {
            decode_per_token: Duration::from_millis(decode_ms),
            prefill_per_token: Duration::ZERO,
        }))
    }

    #[test]
    fn layered_is_the_sum_along_the_longest_chain() {
        let p = Pipeline::parse(MOA, "t").unwrap();
        let got = predict(&p, StreamMode::Layered, 10, &table(10));
        // 100 tokens of `a`, then 60 of the aggregator.
        assert_eq!(got.critical_path, Duration::from_millis(1600));
        assert_eq!(got.ttft, Duration::from_millis(1010));
        assert_eq!(got.path.len(), 2);
        assert_eq!(p.node(got.path[0]).id, "a");
    }

    #[test]
    fn staircase_starts_on_the_first_chunk_and_overlaps() {
        let p = Pipeline::parse(MOA, "t").unwrap();
        let layered = predict(&p, StreamMode::Layered, 10, &table(10));
        let staircase = predict(&p, StreamMode::Staircase, 10, &table(10));
        // First chunk of 8 tokens: 80 ms, then one step token.
        assert_eq!(staircase.ttft, Duration::from_millis(90));
        assert!(staircase.critical_path < layered.critical_path);
        assert!(staircase.critical_path >= Duration::from_millis(1000));
    }
}
