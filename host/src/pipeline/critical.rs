//! Critical path: which chain of nodes bounds a run's wall time.
//!
//! Each node costs its expected output tokens times the measured per-token decode latency,
//! plus its prompt times the per-token prefill latency (LAMaS-style); a pipeline's critical
//! path is its longest path by cost. The runtime computes it before a run, from estimates,
//! to give critical-path nodes the engine first, and after it, from when each node really
//! started and ended.
//! Latencies are refreshed from every finished request. This module only computes; it must
//! not run nodes.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use super::spec::{ModelBinding, Node, NodeIndex, NodeKind, Pipeline};
use crate::engine::{Timings, Usage};

/// Decode latency assumed before anything was measured: the default model decodes about
/// 100 tokens/s on this class of CPU (2 cores, llama.cpp kernels).
pub const DEFAULT_DECODE_PER_TOKEN: Duration = Duration::from_millis(10);
/// Prefill latency assumed before anything was measured: about 200 tokens/s, as above.
pub const DEFAULT_PREFILL_PER_TOKEN: Duration = Duration::from_millis(5);
/// Weight of a new measurement in the running average: recent runs dominate after about
/// five requests, yet one odd request cannot swing the estimate.
const SMOOTHING: f64 = 0.3;
/// Fewest prefilled tokens a request needs to measure prefill: a prompt served almost
/// whole from the prefix cache still waits a whole engine step (shared with every other
/// sequence's decode), which divided by a handful of tokens reads as a very slow prefill.
const MIN_PREFILL_SAMPLE: u32 = 32;
/// Prompt tokens a role or aggregator adds around its inputs (system prompt, instructions),
/// for estimates made before any prompt is built.
pub const PROMPT_OVERHEAD_TOKENS: u32 = 64;
/// Output tokens assumed for a node that sets no limit (the engine's default `max_tokens`).
pub const DEFAULT_EXPECTED_TOKENS: u32 = 256;

/// Per-token costs of one model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Latencies {
    #[serde(serialize_with = "crate::millis::serialize")]
    pub decode_per_token: Duration,
    #[serde(serialize_with = "crate::millis::serialize")]
    pub prefill_per_token: Duration,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            decode_per_token: DEFAULT_DECODE_PER_TOKEN,
            prefill_per_token: DEFAULT_PREFILL_PER_TOKEN,
        }
    }
}

/// Latencies refreshed from live measurements, shared by every run of a host: one figure
/// per model (models differ by an order of magnitude), and one over all of them for a model
/// nothing measured yet.
#[derive(Debug, Default)]
pub struct LatencyModel {
    current: Mutex<Measured>,
}

#[derive(Debug, Default)]
struct Measured {
    overall: Latencies,
    models: BTreeMap<String, Latencies>,
}

impl LatencyModel {
    /// Over every model.
    pub fn get(&self) -> Latencies {
        self.lock().overall
    }

    /// `model`'s, else the figure over every model.
    pub fn of(&self, model: &str) -> Latencies {
        let current = self.lock();
        current
            .models
            .get(model)
            .copied()
            .unwrap_or(current.overall)
    }

    /// Every model measured so far.
    pub fn models(&self) -> BTreeMap<String, Latencies> {
        self.lock().models.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Measured> {
        crate::sync::lock(&self.current)
    }

    /// Folds in what one finished request of `model` measured.
    pub fn observe(&self, model: &str, usage: &Usage, timings: &Timings) {
        let mut current = self.lock();
        let prefilled = usage
            .prompt_tokens
            .saturating_sub(usage.cached_prompt_tokens);
        let prefill = (prefilled >= MIN_PREFILL_SAMPLE && timings.prefill_done > timings.queued)
            .then(|| (timings.prefill_done - timings.queued) / prefilled);
        let decode = timings
            .first_token
            .filter(|first| usage.completion_tokens > 1 && timings.finished > *first)
            .map(|first| (timings.finished - first) / (usage.completion_tokens - 1));
        let Measured { overall, models } = &mut *current;
        // A model's first measurement replaces the assumed default outright.
        let own = models.entry(model.to_string()).or_insert(Latencies {
            decode_per_token: decode.unwrap_or(overall.decode_per_token),
            prefill_per_token: prefill.unwrap_or(overall.prefill_per_token),
        });
        for latencies in [overall, own] {
            if let Some(per) = prefill {
                latencies.prefill_per_token = blend(latencies.prefill_per_token, per);
            }
            if let Some(per) = decode {
                latencies.decode_per_token = blend(latencies.decode_per_token, per);
            }
        }
    }
}

fn blend(old: Duration, new: Duration) -> Duration {
    old.mul_f64(1.0 - SMOOTHING) + new.mul_f64(SMOOTHING)
}

/// The longest path of a DAG by node cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CriticalPath {
    /// From a source to the end.
    pub nodes: Vec<NodeIndex>,
    #[serde(serialize_with = "crate::millis::serialize")]
    pub length: Duration,
}

impl CriticalPath {
    pub fn contains(&self, node: NodeIndex) -> bool {
        self.nodes.contains(&node)
    }
}

/// The longest path through nodes given in topological order: `inputs[i]` lists the nodes
/// feeding node `i` (all before `i`), `costs[i]` is its cost.
pub fn longest_path(costs: &[Duration], inputs: &[Vec<NodeIndex>]) -> CriticalPath {
    let n = costs.len();
    let mut finish = vec![Duration::ZERO; n];
    let mut via: Vec<Option<NodeIndex>> = vec![None; n];
    for i in 0..n {
        // Ties go to the earlier node, so the answer does not depend on input order.
        let latest = inputs[i]
            .iter()
            .copied()
            .max_by_key(|input| (finish[input.0], std::cmp::Reverse(input.0)));
        via[i] = latest;
        finish[i] = latest.map_or(Duration::ZERO, |input| finish[input.0]) + costs[i];
    }
    let Some(end) = (0..n).max_by_key(|&i| (finish[i], std::cmp::Reverse(i))) else {
        return CriticalPath::default();
    };
    walk_back(&via, NodeIndex(end), finish[end])
}

/// The path ending at `end`, following `via` (each node's predecessor) back to its source.
fn walk_back(via: &[Option<NodeIndex>], end: NodeIndex, length: Duration) -> CriticalPath {
    let mut nodes = vec![end];
    let mut at = end.0;
    while let Some(previous) = via[at] {
        nodes.push(previous);
        at = previous.0;
    }
    nodes.reverse();
    CriticalPath { nodes, length }
}

/// The measured critical path of a finished run: walked back from the run's `output` node,
/// through the input that ended last before it (the one that held it up longest). `spans[i]` is
/// when node `i` started and ended (`None` if it never ran). A node counts the part of its work
/// that could not overlap that input: from when the input ended or the node started, whichever
/// came later. With complete edges that is the node's whole span; with staircase edges, what
/// it did after its producer finished. An input cancelled after the node ended did not hold it
/// up. So the length is the wall time the chain explains, never more: a run's wall time over
/// it shows how long nodes sat idle with their inputs ready (scheduling and runtime overhead).
pub fn measured_path(
    spans: &[Option<(Duration, Duration)>],
    inputs: &[Vec<NodeIndex>],
    output: NodeIndex,
) -> CriticalPath {
    let n = spans.len();
    let mut length = vec![Duration::ZERO; n];
    let mut via: Vec<Option<NodeIndex>> = vec![None; n];
    for i in 0..n {
        let Some((start, end)) = spans[i] else {
            continue;
        };
        let gate = inputs[i]
            .iter()
            .filter_map(|&input| spans[input.0].map(|(_, input_end)| (input, input_end)))
            .filter(|&(_, input_end)| input_end <= end)
            .max_by_key(|&(input, input_end)| (input_end, length[input.0]));
        length[i] = match gate {
            Some((input, input_end)) => {
                via[i] = Some(input);
                length[input.0] + end.saturating_sub(start.max(input_end))
            }
            None => end.saturating_sub(start),
        };
    }
    if spans.get(output.0).is_none_or(Option::is_none) {
        return CriticalPath::default();
    }
    walk_back(&via, output, length[output.0])
}

/// Output tokens a node is expected to write: `expected_tokens`, else its `max_tokens`.
pub fn expected_tokens(node: &Node) -> u32 {
    node.expected_tokens
        .or(node.params.max_tokens)
        .unwrap_or(DEFAULT_EXPECTED_TOKENS)
}

/// Estimated cost of every node of `pipeline` for a prompt of `prompt_tokens`.
pub fn estimate_costs(
    pipeline: &Pipeline,
    prompt_tokens: u32,
    measured: &LatencyModel,
) -> Vec<Duration> {
    let expected: Vec<u32> = pipeline.nodes.iter().map(expected_tokens).collect();
    pipeline
        .nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let input_tokens: u32 = node.inputs.iter().map(|e| expected[e.from.0]).sum();
            let prefill = prompt_tokens + PROMPT_OVERHEAD_TOKENS + input_tokens;
            match node.kind {
                // A compressor's cost is its plugin call: negligible next to generation.
                NodeKind::Compressor { .. } => Duration::ZERO,
                NodeKind::Agent | NodeKind::Aggregator => {
                    let latencies = match &node.model {
                        ModelBinding::Fixed(model) => measured.of(model),
                        ModelBinding::Routed { models, .. } => {
                            models.first().map_or(measured.get(), |m| measured.of(m))
                        }
                        ModelBinding::None => measured.get(),
                    };
                    latencies.prefill_per_token * prefill + latencies.decode_per_token * expected[i]
                }
            }
        })
        .collect()
}

/// The inputs of every node, in the shape [`longest_path`] takes.
pub fn inputs_of(pipeline: &Pipeline) -> Vec<Vec<NodeIndex>> {
    pipeline
        .nodes
        .iter()
        .map(|n| n.inputs.iter().map(|e| e.from).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn longest_path_of_a_known_dag_is_exact() {
        // 0 -> 1 -> 3 -> 5, 0 -> 2 -> 3, 4 -> 5: 0-2-3-5 (48 ms) beats 0-1-3-5 (47) and 4-5 (47).
        let costs = [ms(10), ms(30), ms(31), ms(5), ms(45), ms(2)];
        let n = NodeIndex;
        let inputs = vec![
            vec![],
            vec![n(0)],
            vec![n(0)],
            vec![n(1), n(2)],
            vec![],
            vec![n(3), n(4)],
        ];
        let path = longest_path(&costs, &inputs);
        assert_eq!(path.nodes, vec![n(0), n(2), n(3), n(5)]);
        assert_eq!(path.length, ms(10 + 31 + 5 + 2));
    }

    #[test]
    fn a_single_heavy_source_is_the_path() {
        let costs = [ms(1), ms(100), ms(3)];
        let inputs = vec![vec![], vec![], vec![NodeIndex(0), NodeIndex(1)]];
        let path = longest_path(&costs, &inputs);
        assert_eq!(path.nodes, vec![NodeIndex(1), NodeIndex(2)]);
        assert_eq!(path.length, ms(103));
    }

    #[test]
    fn measured_path_counts_overlapping_work_once() {
        // Two proposers stream into an aggregator that runs alongside them and ends 50 ms
        // after the later one: the chain is that proposer plus the aggregator's last 50 ms.
        let inputs = vec![vec![], vec![], vec![NodeIndex(0), NodeIndex(1)]];
        let check = |spans: [Option<(u64, u64)>; 3], nodes: [usize; 2], length: u64| {
            let spans = spans.map(|span| span.map(|(start, end)| (ms(start), ms(end))));
            let path = measured_path(&spans, &inputs, NodeIndex(2));
            assert_eq!(path.nodes, nodes.map(NodeIndex).to_vec(), "{spans:?}");
            assert_eq!(path.length, ms(length), "{spans:?}");
        };
        check(
            [Some((0, 900)), Some((5, 1000)), Some((100, 1050))],
            [1, 2],
            995 + 50,
        );
        // The same nodes one after another (complete edges): whole spans add up, and the
        // 10 ms the aggregator waited after its inputs ended is not on the path.
        check(
            [Some((0, 900)), Some((5, 1000)), Some((1010, 1500))],
            [1, 2],
            995 + 490,
        );
        // A node that never ran is not on any path.
        check([None, Some((0, 10)), Some((10, 30))], [1, 2], 10 + 20);
        // A source cancelled once the output was done (nobody read it any more) ends after
        // it, but did not hold it up: the chain runs through the other source.
        check(
            [Some((0, 900)), Some((5, 1051)), Some((100, 1050))],
            [0, 2],
            900 + 150,
        );
    }

    #[test]
    fn latencies_follow_measurements() {
        let model = LatencyModel::default();
        // `..default()` keeps this compiling when other branches add usage fields.
        #[allow(clippy::needless_update)]
        let usage = Usage {
            prompt_tokens: 110,
            cached_prompt_tokens: 10,
            completion_tokens: 11,
            ..Usage::default()
        };
        let timings = Timings {
            prefill_done: ms(100),
            first_token: Some(ms(100)),
            finished: ms(300),
            ..Timings::default()
        };
        for _ in 0..50 {
            model.observe("small", &usage, &timings);
        }
        let l = model.of("small");
        assert_eq!(model.of("unmeasured"), model.get());
        // 100 ms / 100 prefilled tokens, 200 ms / 10 decode intervals.
        assert!(
            (l.prefill_per_token.as_secs_f64() - 0.001).abs() < 1e-5,
            "{l:?}"
        );
        assert!(
            (l.decode_per_token.as_secs_f64() - 0.020).abs() < 1e-5,
            "{l:?}"
        );
        // A second model keeps its own figure from its first request on.
        let slow = Timings {
            finished: ms(1100),
            ..timings
        };
        model.observe("large", &usage, &slow);
        let large = model.of("large").decode_per_token.as_secs_f64();
        assert!((large - 0.100).abs() < 1e-5, "{large}");
        assert!((model.of("small").decode_per_token.as_secs_f64() - 0.020).abs() < 1e-5);
    }
}
