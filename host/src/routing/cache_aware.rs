//! The SGLang model gateway's cache-aware policy, our baseline. When the replicas' loads are
//! balanced, a request goes to the replica whose tree holds the longest prefix of its text if
//! that match covers more than `cache_threshold` of it, else to the replica holding the least
//! text (the most room in its cache). When the loads are imbalanced (the gap exceeds
//! `balance_abs_threshold` *and* the largest exceeds `balance_rel_threshold` times the
//! smallest), it goes to the least loaded replica. Either way the tree records where the text
//! went. The tree is evicted by size (LRU leaves first) once a replica holds more than
//! `max_tree_chars`.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::tree::Tree;
use super::{Policy, ReplicaView, RouteRequest, least_loaded};

/// The gateway's defaults (its CLI's `--cache-threshold 0.3 --balance-abs-threshold 64
/// --balance-rel-threshold 1.5`); the tree cap is smaller than its 2^26 characters because
/// our replicas' caches hold far less than a GPU server's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheAwareConfig {
    pub cache_threshold: f32,
    pub balance_abs_threshold: usize,
    pub balance_rel_threshold: f32,
    pub max_tree_chars: usize,
}

impl Default for CacheAwareConfig {
    fn default() -> Self {
        Self {
            cache_threshold: 0.3,
            balance_abs_threshold: 64,
            balance_rel_threshold: 1.5,
            max_tree_chars: 1 << 22,
        }
    }
}

impl CacheAwareConfig {
    /// Whether the available replicas' loads count as imbalanced (both gates).
    pub fn imbalanced(&self, replicas: &[ReplicaView]) -> bool {
        let loads = replicas.iter().filter(|r| r.available).map(|r| r.in_flight);
        let (min, max) = loads.fold((usize::MAX, 0), |(lo, hi), l| (lo.min(l), hi.max(l)));
        if min == usize::MAX {
            return false;
        }
        max - min > self.balance_abs_threshold
            && max as f32 > min as f32 * self.balance_rel_threshold
    }
}

pub struct CacheAware {
    config: CacheAwareConfig,
    tree: Mutex<Tree>,
}

impl CacheAware {
    pub fn new(config: CacheAwareConfig) -> Self {
        Self {
            config,
            tree: Mutex::new(Tree::new()),
        }
    }

    fn tree(&self) -> std::sync::MutexGuard<'_, Tree> {
        // A panic elsewhere cannot leave the tree unusable for routing: it only holds hints.
        crate::sync::lock(&self.tree)
    }
}

/// Records `text` on `replica` and keeps the tree within its size.
pub(crate) fn record(tree: &mut Tree, text: &str, replica: usize, max_chars: usize) {
    tree.insert(text, replica);
    // Evicting down to 3/4 of the cap keeps eviction (a walk of the tree) rare.
    if tree.size(replica) > max_chars {
        tree.evict_by_size(max_chars / 4 * 3);
    }
}

impl Policy for CacheAware {
    fn name(&self) -> &'static str {
        "cache_aware"
    }

    fn select(&self, request: &RouteRequest<'_>, replicas: &[ReplicaView]) -> Option<usize> {
        let mut tree = self.tree();
        let chosen = if self.config.imbalanced(replicas) {
            least_loaded(replicas)?
        } else {
            let best = tree
                .matches(request.text)
                .into_iter()
                .filter(|m| replicas.get(m.tenant).is_some_and(|r| r.available))
                .max_by_key(|m| (m.chars, std::cmp::Reverse(m.tenant)));
            let total = request.text.chars().count();
            match best {
                Some(m)
                    if total > 0 && m.chars as f32 / total as f32 > self.config.cache_threshold =>
                {
                    m.tenant
                }
                _ => replicas
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.available)
                    .min_by_key(|(index, _)| (tree.size(*index), *index))
                    .map(|(index, _)| index)?,
            }
        };
        record(&mut tree, request.text, chosen, self.config.max_tree_chars);
        Some(chosen)
    }

    fn predicted_hit(&self, text: &str, replica: usize) -> usize {
        self.tree().match_len(text, replica)
    }
}

#[cfg(test)]
mod tests {
    use super::super::views;
    use super::*;

    fn request(text: &str) -> RouteRequest<'_> {
        RouteRequest { text, hint: None }
    }

    #[test]
    fn a_match_above_the_threshold_wins_and_below_it_the_emptiest_tree_does() {
        let policy = CacheAware::new(CacheAwareConfig::default());
        let replicas = views(&[0, 0]);
        // Empty trees: the lowest index holds least.
        assert_eq!(
            policy.select(&request("You are terse. Q1"), &replicas),
            Some(0)
        );
        // 15 of 17 characters match replica 0: above 0.3.
        assert_eq!(
            policy.select(&request("You are terse. Q2"), &replicas),
            Some(0)
        );
        // No match: replica 1 holds less text.
        assert_eq!(
            policy.select(&request("Different prompt"), &replicas),
            Some(1)
        );
        // "You" of a long text is under the threshold: the emptier tree (replica 1) again.
        let long = "You know what, this is a long unrelated question";
        assert_eq!(policy.select(&request(long), &replicas), Some(1));
    }

    #[test]
    fn imbalance_needs_both_gates() {
        let config = CacheAwareConfig {
            balance_abs_threshold: 2,
            balance_rel_threshold: 1.5,
            ..CacheAwareConfig::default()
        };
        // Gap 3 > 2 and 10 > 7 * 1.5? No: relative gate closed, so not imbalanced.
        assert!(!config.imbalanced(&views(&[10, 7])));
        // Gap 3 > 2 and 4 > 1 * 1.5: imbalanced.
        assert!(config.imbalanced(&views(&[4, 1])));
        // Gap 2 is not above 2.
        assert!(!config.imbalanced(&views(&[3, 1])));
        let policy = CacheAware::new(config);
        let balanced = views(&[0, 0]);
        assert_eq!(
            policy.select(&request("shared head, a"), &balanced),
            Some(0)
        );
        // Replica 0 holds the text, but it is far busier: the least loaded wins.
        assert_eq!(
            policy.select(&request("shared head, b"), &views(&[4, 1])),
            Some(1)
        );
        // Balanced again: the longest match wins (both now hold "shared head, ").
        assert_eq!(
            policy.select(&request("shared head, a!"), &views(&[1, 1])),
            Some(0)
        );
    }

    #[test]
    fn brute_force_agrees_on_every_choice() {
        // The policy's choice against a brute-force model of the same rules over the list of
        // texts routed so far.
        let config = CacheAwareConfig {
            balance_abs_threshold: 1,
            balance_rel_threshold: 1.2,
            ..CacheAwareConfig::default()
        };
        let policy = CacheAware::new(config.clone());
        let mut sent: Vec<(String, usize)> = Vec::new();
        let heads = ["sys A: ", "sys B: ", "sys C long head: "];
        for i in 0..300usize {
            let text = format!("{}{}", heads[i % 7 % 3], "xy".repeat(i % 5));
            let loads = [i % 3, (i / 3) % 4, (i / 2) % 2];
            let replicas = views(&loads);
            let lcp = |r: usize| super::super::tree::tests::brute(&sent, &text, r);
            let held = |r: usize| {
                // Characters of the tree a replica holds: the distinct prefixes' union.
                let mut prefixes = std::collections::HashSet::new();
                for (s, _) in sent.iter().filter(|(_, t)| *t == r) {
                    let chars: Vec<char> = s.chars().collect();
                    for k in 1..=chars.len() {
                        prefixes.insert(chars[..k].to_vec());
                    }
                }
                prefixes.len()
            };
            let expected = if config.imbalanced(&replicas) {
                (0..3).min_by_key(|&r| (loads[r], r)).unwrap_or(0)
            } else {
                let (best, chars) = (0..3)
                    .map(|r| (r, lcp(r)))
                    .max_by_key(|&(r, c)| (c, std::cmp::Reverse(r)))
                    .unwrap_or((0, 0));
                if chars > 0 && chars as f32 / text.chars().count() as f32 > config.cache_threshold
                {
                    best
                } else {
                    (0..3).min_by_key(|&r| (held(r), r)).unwrap_or(0)
                }
            };
            assert_eq!(
                policy.select(&request(&text), &replicas),
                Some(expected),
                "request {i}"
            );
            sent.push((text, expected));
        }
    }
}
