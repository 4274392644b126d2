//! Radix-tree prefix KV cache shared by the requests of the local engine that share a
//! [`CacheNamespace`].
//!
//! The tree maps token sequences to *entries*: llama.cpp sequence slots whose KV holds exactly
//! that token path (positions `0..len`). A new request looks up its longest cached prefix, the
//! engine copies that range from the entry's slot into the request's own slot (inside llama.cpp's
//! unified KV cache a sequence copy shares the cells, it does not duplicate them) and prefills
//! only the rest.
//!
//! This room only decides: which slot holds a prefix, which entries are redundant, which to
//! evict under the cell budget. It never calls llama.cpp; the engine executes what it returns
//! (freeing a slot's KV) so the tree can be tested without a model.
//!
//! Invariants: every entry ends at a leaf (an entry whose path is a prefix of a newer one is
//! redundant and handed back to be freed), and every token in the tree is held by at least one
//! entry, so the tree's token count is the number of KV cells the cache keeps alive.
//! A prefix a running request copied from is *locked* until that request ends; eviction never
//! removes a locked node.
//!
//! Namespaces: each [`CacheNamespace`] has its own root, so a lookup only ever matches
//! prefixes inserted in the same namespace (a server gives each tenant one: how many prompt
//! tokens were cached must not reveal another tenant's text). The cell budget and LRU
//! eviction are shared: a namespace's cells can be evicted by another's traffic, which shows
//! only that the engine is busy, not what it holds.

use std::collections::HashMap;
use std::sync::Arc;

use crate::token::TokenId;

/// Whose cached text a request may reuse: requests match cached prefixes (and past sessions'
/// speculation drafts) only within their own namespace. The CLI and the tests use the
/// default one; `staircase serve` gives each tenant its own. Opaque: nothing reads the name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheNamespace(Arc<str>);

impl CacheNamespace {
    /// The namespace named `name` (the default one is the empty name).
    pub fn new(name: &str) -> Self {
        Self(Arc::from(name))
    }
}

/// A llama.cpp sequence id, used as a slot that holds KV for one token path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqSlot(pub i32);

/// Index of a node in the tree's arena; stays valid while the node is locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeRef(usize);

/// The longest cached prefix of a token sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixMatch {
    /// Slot whose KV holds at least `len` tokens of the prefix (positions `0..len`).
    pub slot: SeqSlot,
    /// Matched tokens.
    pub len: usize,
    /// The node to lock while the KV copied from `slot` is in use.
    pub node: NodeRef,
}

/// What the engine must do after an insertion or eviction.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Slots whose KV the engine must drop: they no longer hold a cached path.
    pub slots: Vec<SeqSlot>,
}

/// Counters for tests and stats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    pub entries: usize,
    /// KV cells held alive by cached paths.
    pub cells: usize,
    /// Nodes with a lock (prefixes running requests copied from).
    pub locked_nodes: usize,
}

#[derive(Debug)]
struct Node {
    /// Tokens on the edge from the parent to this node.
    edge: Vec<TokenId>,
    children: HashMap<TokenId, usize>,
    parent: Option<usize>,
    /// The entry ending here (only leaves hold one).
    entry: Option<SeqSlot>,
    /// Logical clock of the last insert or hit through this node.
    last_used: u64,
    locks: u32,
}

impl Node {
    fn new(edge: Vec<TokenId>, parent: Option<usize>, now: u64) -> Self {
        Self {
            edge,
            children: HashMap::new(),
            parent,
            entry: None,
            last_used: now,
            locks: 0,
        }
    }
}

/// The radix tree. See the module docs.
#[derive(Debug)]
pub struct PrefixCache {
    nodes: Vec<Option<Node>>,
    free_nodes: Vec<usize>,
    /// Each namespace's root node (a root has no parent and no edge).
    roots: HashMap<CacheNamespace, usize>,
    /// Entry slot → its leaf node.
    entries: HashMap<SeqSlot, usize>,
    cells: usize,
    budget_cells: usize,
    clock: u64,
}

impl PrefixCache {
    /// An empty cache that keeps at most `budget_cells` KV cells of unlocked prefixes.
    pub fn new(budget_cells: usize) -> Self {
        Self {
            nodes: Vec::new(),
            free_nodes: Vec::new(),
            roots: HashMap::new(),
            entries: HashMap::new(),
            cells: 0,
            budget_cells,
            clock: 0,
        }
    }

    pub fn budget_cells(&self) -> usize {
        self.budget_cells
    }

    pub fn stats(&self) -> PrefixCacheStats {
        PrefixCacheStats {
            entries: self.entries.len(),
            cells: self.cells,
            locked_nodes: self
                .nodes
                .iter()
                .filter_map(Option::as_ref)
                .filter(|n| n.parent.is_some() && n.locks > 0)
                .count(),
        }
    }

    /// Whether `slot` is held by the cache.
    pub fn holds(&self, slot: SeqSlot) -> bool {
        self.entries.contains_key(&slot)
    }

    fn node(&self, index: usize) -> &Node {
        // Invariant: indices reachable from the root or held in `entries`/locks are live.
        self.nodes[index].as_ref().expect("live node index")
    }

    fn node_mut(&mut self, index: usize) -> &mut Node {
        // Same invariant as `node`.
        self.nodes[index].as_mut().expect("live node index")
    }

    fn alloc(&mut self, node: Node) -> usize {
        if let Some(index) = self.free_nodes.pop() {
            self.nodes[index] = Some(node);
            index
        } else {
            self.nodes.push(Some(node));
            self.nodes.len() - 1
        }
    }

    /// The root of `namespace`, created on first use.
    fn root(&mut self, namespace: &CacheNamespace) -> usize {
        if let Some(&root) = self.roots.get(namespace) {
            return root;
        }
        let root = self.alloc(Node::new(Vec::new(), None, self.clock));
        self.roots.insert(namespace.clone(), root);
        root
    }

    /// The longest prefix of `tokens` cached in `namespace`, at most `max_len` long. Marks
    /// the path as used.
    pub fn lookup(
        &mut self,
        namespace: &CacheNamespace,
        tokens: &[TokenId],
        max_len: usize,
    ) -> Option<PrefixMatch> {
        let tokens = &tokens[..tokens.len().min(max_len)];
        self.clock += 1;
        let now = self.clock;
        let mut current = *self.roots.get(namespace)?;
        let mut matched = 0;
        let mut deepest = None;
        while matched < tokens.len() {
            let Some(&child) = self.node(current).children.get(&tokens[matched]) else {
                break;
            };
            let edge = &self.node(child).edge;
            let common = edge
                .iter()
                .zip(&tokens[matched..])
                .take_while(|(a, b)| a == b)
                .count();
            matched += common;
            self.node_mut(child).last_used = now;
            deepest = Some(child);
            if common < self.node(child).edge.len() {
                break;
            }
            current = child;
        }
        let node = deepest?;
        let leaf = self.any_leaf_below(node);
        let slot = self.node(leaf).entry?;
        // Refresh the entry the copy will come from, so LRU keeps popular prefixes.
        let mut up = Some(leaf);
        while let Some(index) = up {
            if index == node {
                break;
            }
            self.node_mut(index).last_used = now;
            up = self.node(index).parent;
        }
        Some(PrefixMatch {
            slot,
            len: matched,
            node: NodeRef(node),
        })
    }

    /// Most recently used leaf in the subtree of `index`.
    fn any_leaf_below(&self, mut index: usize) -> usize {
        loop {
            let node = self.node(index);
            match node
                .children
                .values()
                .max_by_key(|&&child| self.node(child).last_used)
            {
                Some(&child) => index = child,
                None => return index,
            }
        }
    }

    /// Keeps `node` and its ancestors (the copied prefix) from eviction until
    /// [`Self::unlock`]. Locks count along the whole path, so a later edge split can give the
    /// new middle node its child's count and unlocking still balances.
    pub fn lock(&mut self, node: NodeRef) {
        let mut up = Some(node.0);
        while let Some(index) = up {
            let node = self.node_mut(index);
            node.locks += 1;
            up = node.parent;
        }
    }

    pub fn unlock(&mut self, node: NodeRef) {
        let mut up = Some(node.0);
        while let Some(index) = up {
            let node = self.node_mut(index);
            node.locks = node.locks.saturating_sub(1);
            up = node.parent;
        }
    }

    /// Records that `slot`'s KV holds exactly `tokens`, in `namespace`. The cache takes
    /// ownership of the slot. Returns the slots to free: entries made redundant by this one,
    /// or `slot` itself when its path is already cached.
    pub fn insert(
        &mut self,
        namespace: &CacheNamespace,
        tokens: &[TokenId],
        slot: SeqSlot,
    ) -> Released {
        let mut released = Released::default();
        self.clock += 1;
        let now = self.clock;
        if tokens.is_empty() || self.entries.contains_key(&slot) {
            if !self.entries.contains_key(&slot) {
                released.slots.push(slot);
            }
            return released;
        }
        let mut current = self.root(namespace);
        let mut matched = 0;
        loop {
            self.node_mut(current).last_used = now;
            if matched == tokens.len() {
                // The whole path exists already: a longer or equal entry covers it.
                released.slots.push(slot);
                return released;
            }
            let next = self.node(current).children.get(&tokens[matched]).copied();
            let Some(child) = next else {
                // A redundant entry ends here: the new path extends it.
                if let Some(old) = self.node_mut(current).entry.take() {
                    self.entries.remove(&old);
                    released.slots.push(old);
                }
                let rest = tokens[matched..].to_vec();
                self.cells += rest.len();
                let mut leaf = Node::new(rest, Some(current), now);
                leaf.entry = Some(slot);
                let leaf = self.alloc(leaf);
                self.node_mut(current)
                    .children
                    .insert(tokens[matched], leaf);
                self.entries.insert(slot, leaf);
                return released;
            };
            let edge_len = self.node(child).edge.len();
            let common = self
                .node(child)
                .edge
                .iter()
                .zip(&tokens[matched..])
                .take_while(|(a, b)| a == b)
                .count();
            if common < edge_len {
                if matched + common == tokens.len() {
                    // The new path ends inside an existing edge: already cached.
                    self.node_mut(child).last_used = now;
                    released.slots.push(slot);
                    return released;
                }
                self.split(current, child, common, now);
                // Continue from the new middle node, which has a free branch for us.
                current = self.node(current).children[&tokens[matched]];
                matched += common;
                continue;
            }
            matched += edge_len;
            current = child;
        }
    }

    /// Splits `child`'s edge after `at` tokens, inserting a middle node under `parent`.
    fn split(&mut self, parent: usize, child: usize, at: usize, now: u64) {
        let tail = self.node_mut(child).edge.split_off(at);
        let head = std::mem::replace(&mut self.node_mut(child).edge, tail);
        let first = head[0];
        let mut middle = Node::new(head, Some(parent), now);
        middle.children.insert(self.node(child).edge[0], child);
        // Locks count along paths, so the middle node carries its only child's count.
        middle.locks = self.node(child).locks;
        let middle = self.alloc(middle);
        self.node_mut(child).parent = Some(middle);
        self.node_mut(parent).children.insert(first, middle);
    }

    /// Nodes removed if the entry at `leaf` goes: up to the first node shared with another
    /// path. `None` when one of them is locked.
    fn exclusive_path(&self, leaf: usize) -> Option<Vec<usize>> {
        let mut path = Vec::new();
        let mut index = leaf;
        loop {
            let node = self.node(index);
            if node.locks > 0 {
                return None;
            }
            path.push(index);
            let parent = node.parent?;
            // A root stays (its namespace's next insert reuses it).
            let parent_node = self.node(parent);
            let shared = parent_node.parent.is_none() || parent_node.children.len() > 1;
            if shared {
                return Some(path);
            }
            index = parent;
        }
    }

    /// Evicts least-recently-used unlocked entries until at most `target_cells` remain or
    /// nothing more can go. Returns the slots whose KV the engine must free.
    pub fn evict_to(&mut self, target_cells: usize) -> Released {
        let mut released = Released::default();
        while self.cells > target_cells {
            let victim = self
                .entries
                .iter()
                .filter_map(|(&slot, &leaf)| {
                    self.exclusive_path(leaf)
                        .map(|path| (self.node(leaf).last_used, slot, path))
                })
                .min_by_key(|(used, slot, _)| (*used, *slot));
            let Some((_, slot, path)) = victim else {
                break;
            };
            self.entries.remove(&slot);
            for &index in &path {
                // `exclusive_path` walked these nodes just now, so they are live.
                let node = self.nodes[index].take().expect("live node index");
                self.cells -= node.edge.len();
                if let Some(parent) = node.parent
                    && let Some(first) = node.edge.first()
                    && let Some(parent_node) = self.nodes[parent].as_mut()
                    && parent_node.children.get(first) == Some(&index)
                {
                    parent_node.children.remove(first);
                }
                self.free_nodes.push(index);
            }
            released.slots.push(slot);
        }
        released
    }

    /// Evicts down to the configured budget.
    pub fn evict_to_budget(&mut self) -> Released {
        self.evict_to(self.budget_cells)
    }

    /// Removes every unlocked entry.
    pub fn clear(&mut self) -> Released {
        self.evict_to(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ids: &[i32]) -> Vec<TokenId> {
        ids.iter().map(|&i| TokenId(i)).collect()
    }

    #[test]
    fn longest_prefix_and_redundant_entries() {
        let ns = CacheNamespace::default();
        let mut cache = PrefixCache::new(100);
        assert!(
            cache
                .insert(&ns, &t(&[1, 2, 3]), SeqSlot(1))
                .slots
                .is_empty()
        );
        // Extending an entry makes the shorter one redundant.
        assert_eq!(
            cache.insert(&ns, &t(&[1, 2, 3, 4, 5]), SeqSlot(2)).slots,
            vec![SeqSlot(1)]
        );
        // A prefix of a cached path is already cached.
        assert_eq!(
            cache.insert(&ns, &t(&[1, 2]), SeqSlot(3)).slots,
            vec![SeqSlot(3)]
        );
        // A branch splits the edge.
        assert!(
            cache
                .insert(&ns, &t(&[1, 2, 9]), SeqSlot(4))
                .slots
                .is_empty()
        );
        assert_eq!(cache.stats().cells, 6);
        assert_eq!(cache.stats().entries, 2);

        let hit = cache.lookup(&ns, &t(&[1, 2, 3, 4, 7]), usize::MAX).unwrap();
        assert_eq!((hit.slot, hit.len), (SeqSlot(2), 4));
        let hit = cache.lookup(&ns, &t(&[1, 2, 9, 9]), usize::MAX).unwrap();
        assert_eq!((hit.slot, hit.len), (SeqSlot(4), 3));
        let hit = cache.lookup(&ns, &t(&[1, 2, 3, 4, 5]), 4).unwrap();
        assert_eq!(hit.len, 4);
        assert!(cache.lookup(&ns, &t(&[7]), usize::MAX).is_none());
    }

    #[test]
    fn lru_eviction_frees_only_exclusive_cells() {
        let ns = CacheNamespace::default();
        let mut cache = PrefixCache::new(100);
        cache.insert(&ns, &t(&[1, 2, 3, 4]), SeqSlot(1));
        cache.insert(&ns, &t(&[1, 2, 5, 6]), SeqSlot(2));
        assert_eq!(cache.stats().cells, 6);
        // Touch entry 1 so entry 2 is the least recently used.
        cache.lookup(&ns, &t(&[1, 2, 3]), usize::MAX);
        let released = cache.evict_to(5);
        assert_eq!(released.slots, vec![SeqSlot(2)]);
        assert_eq!(cache.stats().cells, 4);
        assert_eq!(
            cache.lookup(&ns, &t(&[1, 2, 5]), usize::MAX).unwrap().len,
            2
        );
        cache.evict_to(0);
        assert_eq!(cache.stats(), PrefixCacheStats::default());
    }

    #[test]
    fn eviction_under_tiny_budget_never_evicts_a_locked_prefix() {
        let ns = CacheNamespace::default();
        let mut cache = PrefixCache::new(1);
        cache.insert(&ns, &t(&[1, 2, 3, 4]), SeqSlot(1));
        cache.insert(&ns, &t(&[7, 8, 9]), SeqSlot(2));
        let hit = cache.lookup(&ns, &t(&[1, 2, 3, 0]), usize::MAX).unwrap();
        cache.lock(hit.node);
        let released = cache.evict_to_budget();
        assert_eq!(released.slots, vec![SeqSlot(2)]);
        assert!(cache.holds(SeqSlot(1)));
        // Splitting the locked edge keeps the copied prefix locked.
        cache.insert(&ns, &t(&[1, 5]), SeqSlot(3));
        let released = cache.evict_to_budget();
        assert_eq!(released.slots, vec![SeqSlot(3)]);
        assert!(cache.holds(SeqSlot(1)));
        assert_eq!(
            cache.lookup(&ns, &t(&[1, 2, 3]), usize::MAX).unwrap().len,
            3
        );
        cache.unlock(hit.node);
        assert_eq!(cache.evict_to_budget().slots, vec![SeqSlot(1)]);
        assert_eq!(cache.stats().cells, 0);
    }

    #[test]
    fn a_namespace_matches_only_its_own_prefixes() {
        let (a, b) = (CacheNamespace::new("a"), CacheNamespace::new("b"));
        let mut cache = PrefixCache::new(100);
        cache.insert(&a, &t(&[1, 2, 3, 4]), SeqSlot(1));
        assert!(cache.lookup(&b, &t(&[1, 2, 3, 4]), usize::MAX).is_none());
        assert_eq!(
            cache.lookup(&a, &t(&[1, 2, 3, 9]), usize::MAX).unwrap().len,
            3
        );
        // The same path in another namespace is another entry, not redundant with the first.
        assert!(
            cache
                .insert(&b, &t(&[1, 2, 3, 4]), SeqSlot(2))
                .slots
                .is_empty()
        );
        let hit = cache.lookup(&b, &t(&[1, 2, 3, 4]), usize::MAX).unwrap();
        assert_eq!((hit.slot, hit.len), (SeqSlot(2), 4));
        assert_eq!(cache.stats().entries, 2);
        assert_eq!(cache.stats().cells, 8);
        // Eviction is shared: the least recently used entry goes, whichever namespace.
        assert_eq!(cache.evict_to(4).slots, vec![SeqSlot(1)]);
        assert!(cache.lookup(&a, &t(&[1, 2]), usize::MAX).is_none());
        assert_eq!(cache.lookup(&b, &t(&[1, 2]), usize::MAX).unwrap().len, 2);
        cache.clear();
        assert_eq!(cache.stats(), PrefixCacheStats::default());
    }
}
