//! Our policy: it knows which requests belong to one pipeline run (the [`RouteHint`] a
//! pipeline attaches). A node's successive requests (an aggregator's steps, a debater's
//! rounds) continue the same prompt, so they stay on the replica that served the node before,
//! whose cache holds that prefix. Everything else is placed by an estimate of its cost on each
//! replica: the prompt it would prefill there (the text the tree says the replica has not
//! seen, in tokens) plus a charge for each request in flight there, and a much larger one for
//! each request of another node of the same run, because the proposers of one run are the
//! requests that should run side by side. So independent proposers spread even when their
//! prompts share a system prompt, where the SGLang policy piles them onto the replica that
//! holds it until the load gap reaches its threshold.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::cache_aware::record;
use super::tree::Tree;
use super::{Policy, ReplicaView, RouteHint, RouteRequest};

/// Characters per token in the cost estimate (typical English text in BPE vocabularies).
const CHARS_PER_TOKEN: usize = 4;
/// Nodes whose replica is remembered; older ones are forgotten first (runs end).
const REMEMBERED_NODES: usize = 4096;

#[derive(Clone, Debug, PartialEq)]
pub struct PipelineAwareConfig {
    /// Cost of a request in flight on a replica, in prompt tokens: what it slows the next
    /// request by, about a short prompt's prefill.
    pub in_flight_tokens: usize,
    /// Cost of a request of another node of the same run on a replica: large, so a run's
    /// independent nodes prefer separate replicas unless one holds far more of the prompt.
    pub sibling_tokens: usize,
    pub max_tree_chars: usize,
}

impl Default for PipelineAwareConfig {
    fn default() -> Self {
        Self {
            in_flight_tokens: 32,
            sibling_tokens: 512,
            max_tree_chars: 1 << 22,
        }
    }
}

pub struct PipelineAware {
    config: PipelineAwareConfig,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    tree: Tree,
    nodes: HashMap<RouteHint, usize>,
    order: VecDeque<RouteHint>,
}

impl PipelineAware {
    pub fn new(config: PipelineAwareConfig) -> Self {
        Self {
            config,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Only routing hints live here; a panic elsewhere does not make them wrong.
        crate::sync::lock(&self.state)
    }

    /// The estimated cost of `text` on each replica, `None` where it is unavailable.
    fn costs(&self, tree: &Tree, text: &str, replicas: &[ReplicaView]) -> Vec<Option<usize>> {
        let total = text.chars().count();
        let matches = tree.matches(text);
        replicas
            .iter()
            .enumerate()
            .map(|(index, r)| {
                r.available.then(|| {
                    let seen = matches
                        .iter()
                        .find(|m| m.tenant == index)
                        .map_or(0, |m| m.chars);
                    (total - seen).div_ceil(CHARS_PER_TOKEN)
                        + r.in_flight * self.config.in_flight_tokens
                        + r.run_in_flight * self.config.sibling_tokens
                })
            })
            .collect()
    }
}

impl Policy for PipelineAware {
    fn name(&self) -> &'static str {
        "pipeline_aware"
    }

    fn select(&self, request: &RouteRequest<'_>, replicas: &[ReplicaView]) -> Option<usize> {
        let mut state = self.state();
        let sticky = request
            .hint
            .and_then(|hint| state.nodes.get(hint).copied())
            .filter(|&index| replicas.get(index).is_some_and(|r| r.available));
        let chosen = match sticky {
            Some(index) => index,
            None => self
                .costs(&state.tree, request.text, replicas)
                .into_iter()
                .enumerate()
                .filter_map(|(index, cost)| cost.map(|c| (c, index)))
                .min()
                .map(|(_, index)| index)?,
        };
        record(
            &mut state.tree,
            request.text,
            chosen,
            self.config.max_tree_chars,
        );
        if let Some(hint) = request.hint
            && state.nodes.insert(hint.clone(), chosen).is_none()
        {
            state.order.push_back(hint.clone());
            if state.order.len() > REMEMBERED_NODES
                && let Some(old) = state.order.pop_front()
            {
                state.nodes.remove(&old);
            }
        }
        Some(chosen)
    }

    fn predicted_hit(&self, text: &str, replica: usize) -> usize {
        self.state().tree.match_len(text, replica)
    }
}

#[cfg(test)]
mod tests {
    use super::super::views;
    use super::*;

    fn hint(run: u64, node: &str) -> RouteHint {
        RouteHint {
            run,
            node: node.into(),
        }
    }

    #[test]
    fn a_nodes_steps_stay_and_a_runs_proposers_spread() {
        let policy = PipelineAware::new(PipelineAwareConfig::default());
        let system = "You are a helpful assistant who answers carefully. ".repeat(4);
        let mut replicas = views(&[0, 0]);
        let (a, b) = (hint(1, "a"), hint(1, "b"));
        let first = policy
            .select(
                &RouteRequest {
                    text: &format!("{system}Q"),
                    hint: Some(&a),
                },
                &replicas,
            )
            .unwrap();
        // Proposer a is in flight on `first`; proposer b shares the system prompt but goes
        // to the other replica to run beside it.
        replicas[first].in_flight = 1;
        replicas[first].run_in_flight = 1;
        let second = policy
            .select(
                &RouteRequest {
                    text: &format!("{system}Q"),
                    hint: Some(&b),
                },
                &replicas,
            )
            .unwrap();
        assert_ne!(first, second);
        // The SGLang policy sends b to the replica holding the system prompt.
        let baseline = super::super::CacheAware::new(Default::default());
        let rs = views(&[0, 0]);
        let x = baseline.select(
            &RouteRequest {
                text: &format!("{system}Q"),
                hint: None,
            },
            &rs,
        );
        let mut rs = rs;
        rs[0].in_flight = 1;
        let y = baseline.select(
            &RouteRequest {
                text: &format!("{system}Q"),
                hint: None,
            },
            &rs,
        );
        assert_eq!(x, y);
        // a's next step stays on its replica even though b's replica is now as loaded.
        replicas[second].in_flight = 1;
        let step = policy
            .select(
                &RouteRequest {
                    text: &format!("{system}Q partial"),
                    hint: Some(&a),
                },
                &replicas,
            )
            .unwrap();
        assert_eq!(step, first);
        // Unless that replica is unavailable.
        replicas[first].available = false;
        let moved = policy
            .select(
                &RouteRequest {
                    text: &format!("{system}Q partial"),
                    hint: Some(&a),
                },
                &replicas,
            )
            .unwrap();
        assert_eq!(moved, second);
    }

    #[test]
    fn without_hints_the_cheapest_replica_wins_by_brute_force() {
        let config = PipelineAwareConfig::default();
        let policy = PipelineAware::new(config.clone());
        let mut sent: Vec<(String, usize)> = Vec::new();
        for i in 0..200usize {
            let text = format!(
                "{}{}",
                ["head one: ", "another head: "][i % 2],
                "z".repeat(i % 9)
            );
            let loads = [i % 2, (i / 5) % 3];
            let replicas = views(&loads);
            let cost = |r: usize| {
                let seen = super::super::tree::tests::brute(&sent, &text, r);
                (text.chars().count() - seen).div_ceil(CHARS_PER_TOKEN)
                    + loads[r] * config.in_flight_tokens
            };
            let expected = (0..2).min_by_key(|&r| (cost(r), r)).unwrap_or(0);
            let got = policy.select(
                &RouteRequest {
                    text: &text,
                    hint: None,
                },
                &replicas,
            );
            assert_eq!(got, Some(expected), "request {i}");
            sent.push((text, expected));
        }
    }
}
