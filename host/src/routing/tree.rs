//! An approximate radix tree of routed prompt text, shared by all replicas ("tenants"): each
//! node records which replicas were sent text through it and when, so the longest prefix of a
//! new prompt that a replica has seen is one walk down the tree. It stands in for the
//! replicas' real prefix caches without asking them (as the SGLang gateway's tree does): text,
//! not tokens, so routing needs no tokenizer. Eviction drops a replica's least recently used
//! leaves until its share of the tree fits a size in characters.

use std::collections::HashMap;

/// A replica, by its index in the replica set.
pub type Tenant = usize;

#[derive(Debug, Default)]
struct Node {
    /// The characters on the edge from the parent into this node.
    label: Vec<char>,
    /// Children by the first character of their label.
    children: HashMap<char, usize>,
    parent: Option<usize>,
    /// Replicas that hold this node, with the logical time they last touched it.
    tenants: HashMap<Tenant, u64>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Tree {
    /// Node 0 is the root (empty label); removed nodes are recycled through `free`.
    nodes: Vec<Node>,
    free: Vec<usize>,
    /// Characters held per replica (the sum of the labels of its nodes).
    sizes: HashMap<Tenant, usize>,
    clock: u64,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

/// How much of a text one replica has seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Match {
    pub tenant: Tenant,
    /// Characters of the text's prefix the replica was sent before.
    pub chars: usize,
}

impl Tree {
    pub fn new() -> Self {
        Self {
            nodes: vec![Node::default()],
            free: Vec::new(),
            sizes: HashMap::new(),
            clock: 0,
        }
    }

    /// Characters of the tree held by `tenant`.
    pub fn size(&self, tenant: Tenant) -> usize {
        self.sizes.get(&tenant).copied().unwrap_or(0)
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn alloc(&mut self, node: Node) -> usize {
        if let Some(index) = self.free.pop() {
            self.nodes[index] = node;
            index
        } else {
            self.nodes.push(node);
            self.nodes.len() - 1
        }
    }

    /// Records that `text` was sent to `tenant`.
    pub fn insert(&mut self, text: &str, tenant: Tenant) {
        let now = self.tick();
        let chars: Vec<char> = text.chars().collect();
        let mut node = 0;
        let mut at = 0;
        self.touch(node, tenant, now);
        while at < chars.len() {
            let Some(&child) = self.nodes[node].children.get(&chars[at]) else {
                let label = chars[at..].to_vec();
                let leaf = self.alloc(Node {
                    label,
                    parent: Some(node),
                    ..Node::default()
                });
                self.nodes[node].children.insert(chars[at], leaf);
                self.touch(leaf, tenant, now);
                return;
            };
            let common = common_prefix(&self.nodes[child].label, &chars[at..]);
            let child = if common < self.nodes[child].label.len() {
                self.split(child, common)
            } else {
                child
            };
            self.touch(child, tenant, now);
            node = child;
            at += common;
        }
    }

    /// Marks `node` as held by `tenant` at `now`, counting its label the first time.
    fn touch(&mut self, node: usize, tenant: Tenant, now: u64) {
        if self.nodes[node].tenants.insert(tenant, now).is_none() {
            *self.sizes.entry(tenant).or_default() += self.nodes[node].label.len();
        }
    }

    /// Splits `node`'s label after `at` characters; returns the new upper node.
    fn split(&mut self, node: usize, at: usize) -> usize {
        let parent = self.nodes[node].parent.unwrap_or(0);
        let lower_label = self.nodes[node].label.split_off(at);
        let upper_label = std::mem::replace(&mut self.nodes[node].label, lower_label);
        let upper = self.alloc(Node {
            label: upper_label,
            parent: Some(parent),
            tenants: self.nodes[node].tenants.clone(),
            ..Node::default()
        });
        let (upper_first, lower_first) = (self.nodes[upper].label[0], self.nodes[node].label[0]);
        self.nodes[parent].children.insert(upper_first, upper);
        self.nodes[upper].children.insert(lower_first, node);
        self.nodes[node].parent = Some(upper);
        // Sizes are unchanged: each tenant holds both halves, which add up to the old label.
        upper
    }

    /// For every tenant holding any of `text`'s path, how many of its leading characters it
    /// has seen. A tenant that holds the node where a partial edge match ends has seen those
    /// characters too (its text went through the whole edge).
    pub fn matches(&self, text: &str) -> Vec<Match> {
        let chars: Vec<char> = text.chars().collect();
        let mut best: HashMap<Tenant, usize> = HashMap::new();
        let mut node = 0;
        let mut at = 0;
        while at < chars.len() {
            let Some(&child) = self.nodes[node].children.get(&chars[at]) else {
                break;
            };
            let common = common_prefix(&self.nodes[child].label, &chars[at..]);
            at += common;
            // Deeper nodes hold a subset of their parent's tenants, so overwriting is right.
            for &tenant in self.nodes[child].tenants.keys() {
                best.insert(tenant, at);
            }
            if common < self.nodes[child].label.len() {
                break;
            }
            node = child;
        }
        let mut out: Vec<Match> = best
            .into_iter()
            .map(|(tenant, chars)| Match { tenant, chars })
            .collect();
        out.sort_by_key(|m| m.tenant);
        out
    }

    /// Characters of `text`'s prefix that `tenant` has seen.
    pub fn match_len(&self, text: &str, tenant: Tenant) -> usize {
        self.matches(text)
            .into_iter()
            .find(|m| m.tenant == tenant)
            .map_or(0, |m| m.chars)
    }

    /// Forgets a replica entirely (it was removed from the set).
    pub fn remove_tenant(&mut self, tenant: Tenant) {
        for index in 0..self.nodes.len() {
            self.nodes[index].tenants.remove(&tenant);
        }
        self.sizes.remove(&tenant);
        self.prune();
    }

    /// Evicts each tenant's least recently used leaves until it holds at most `max_chars`.
    pub fn evict_by_size(&mut self, max_chars: usize) {
        let tenants: Vec<Tenant> = self.sizes.keys().copied().collect();
        for tenant in tenants {
            self.evict_tenant(tenant, max_chars);
        }
        self.prune();
    }

    fn evict_tenant(&mut self, tenant: Tenant, max_chars: usize) {
        // Leaves for this tenant: nodes it holds none of whose children it holds.
        let mut heap: std::collections::BinaryHeap<std::cmp::Reverse<(u64, usize)>> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(index, node)| *index != 0 && self.is_tenant_leaf(*index, tenant, node))
            .filter_map(|(index, node)| {
                node.tenants
                    .get(&tenant)
                    .map(|&t| std::cmp::Reverse((t, index)))
            })
            .collect();
        while self.size(tenant) > max_chars {
            let Some(std::cmp::Reverse((_, index))) = heap.pop() else {
                break;
            };
            self.nodes[index].tenants.remove(&tenant);
            if let Some(size) = self.sizes.get_mut(&tenant) {
                *size -= self.nodes[index].label.len();
            }
            if let Some(parent) = self.nodes[index].parent
                && parent != 0
                && self.is_tenant_leaf(parent, tenant, &self.nodes[parent])
                && let Some(&t) = self.nodes[parent].tenants.get(&tenant)
            {
                heap.push(std::cmp::Reverse((t, parent)));
            }
        }
    }

    fn is_tenant_leaf(&self, _index: usize, tenant: Tenant, node: &Node) -> bool {
        node.tenants.contains_key(&tenant)
            && node
                .children
                .values()
                .all(|&c| !self.nodes[c].tenants.contains_key(&tenant))
    }

    /// Removes nodes no tenant holds (their subtrees are empty too).
    fn prune(&mut self) {
        let mut stack = vec![0];
        let mut dead = Vec::new();
        while let Some(index) = stack.pop() {
            for &child in self.nodes[index].children.values() {
                if self.nodes[child].tenants.is_empty() {
                    dead.push((index, child));
                } else {
                    stack.push(child);
                }
            }
        }
        for (parent, child) in dead {
            let first = self.nodes[child].label[0];
            self.nodes[parent].children.remove(&first);
            self.release(child);
        }
    }

    fn release(&mut self, index: usize) {
        let children: Vec<usize> = self.nodes[index].children.values().copied().collect();
        for child in children {
            self.release(child);
        }
        self.nodes[index] = Node::default();
        self.free.push(index);
    }
}

fn common_prefix(a: &[char], b: &[char]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Brute force: the longest common prefix with any text sent to the tenant.
    pub(crate) fn brute(sent: &[(String, Tenant)], text: &str, tenant: Tenant) -> usize {
        sent.iter()
            .filter(|(_, t)| *t == tenant)
            .map(|(s, _)| {
                s.chars()
                    .zip(text.chars())
                    .take_while(|(a, b)| a == b)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    /// A small deterministic generator (no dependency for a test).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
        fn text(&mut self) -> String {
            // A few shared heads, so prefixes overlap the way system prompts do.
            let heads = ["You are a helpful", "You are a critic", "Sum", ""];
            let mut s = heads[self.next(4) as usize].to_string();
            for _ in 0..self.next(12) {
                s.push(['a', 'b', 'c', 'é'][self.next(4) as usize]);
            }
            s
        }
    }

    #[test]
    fn match_lengths_equal_brute_force() {
        let mut rng = Lcg(7);
        let mut tree = Tree::new();
        let mut sent = Vec::new();
        for _ in 0..400 {
            let text = rng.text();
            let tenant = rng.next(3) as usize;
            tree.insert(&text, tenant);
            sent.push((text, tenant));
            let probe = rng.text();
            for tenant in 0..3 {
                assert_eq!(
                    tree.match_len(&probe, tenant),
                    brute(&sent, &probe, tenant),
                    "probe {probe:?} tenant {tenant}"
                );
            }
        }
    }

    #[test]
    fn sizes_count_each_character_a_tenant_holds_once() {
        let mut tree = Tree::new();
        tree.insert("hello world", 0);
        tree.insert("hello there", 0);
        tree.insert("hello", 1);
        // "hello " + "world" + "there" for tenant 0; "hello" for tenant 1.
        assert_eq!(tree.size(0), 16);
        assert_eq!(tree.size(1), 5);
    }

    #[test]
    fn eviction_drops_least_recent_leaves_down_to_the_size() {
        let mut tree = Tree::new();
        tree.insert("system: be brief. question one", 0);
        tree.insert("system: be brief. question two", 0);
        tree.insert("system: be brief. question three", 1);
        // Touch "one" again: "two" is now the least recent.
        tree.insert("system: be brief. question one", 0);
        let before_other = tree.size(1);
        // Tenant 0 holds 33 characters: "system: be brief. question " + "one" + "t" + "wo".
        tree.evict_by_size(32);
        assert!(tree.size(0) <= 32);
        assert_eq!(tree.match_len("system: be brief. question one", 0), 30);
        assert_eq!(tree.match_len("system: be brief. question two", 0), 28);
        // The other tenant fit already and keeps everything.
        assert_eq!(tree.size(1), before_other);
        assert_eq!(tree.match_len("system: be brief. question three", 1), 32);
        // Matching still agrees with what is left.
        tree.evict_by_size(0);
        assert_eq!(tree.size(0), 0);
        assert_eq!(tree.size(1), 0);
        assert!(tree.matches("system").is_empty());
    }

    #[test]
    fn eviction_keeps_sizes_consistent_with_a_recount() {
        let mut rng = Lcg(11);
        let mut tree = Tree::new();
        for round in 0..50 {
            for _ in 0..20 {
                let text = rng.text();
                tree.insert(&text, rng.next(2) as usize);
            }
            tree.evict_by_size(40 - round % 30);
            for tenant in 0..2 {
                let recount: usize = tree
                    .nodes
                    .iter()
                    .filter(|n| n.tenants.contains_key(&tenant))
                    .map(|n| n.label.len())
                    .sum();
                assert_eq!(tree.size(tenant), recount);
                assert!(tree.size(tenant) <= 40);
            }
        }
    }

    #[test]
    fn a_removed_tenant_matches_nothing() {
        let mut tree = Tree::new();
        tree.insert("abc", 0);
        tree.insert("abd", 1);
        tree.remove_tenant(0);
        assert_eq!(tree.match_len("abc", 0), 0);
        assert_eq!(tree.match_len("abc", 1), 2);
    }
}
