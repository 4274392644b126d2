//! Occurrence counts of suffix-automaton states, kept exact while the automaton grows.
//!
//! A state's occurrence count is the number of end positions of its strings: the number of
//! prefix states (non-clones) below it in the suffix-link tree. Adding a token adds one
//! position to every state on the suffix-link path of the new state, and that path can be as
//! long as the text (think `a a a a ...`). A link-cut tree over the suffix-link tree does that
//! path update in amortised O(log n) instead, and follows the tree as clones split edges.
//!
//! Each node carries `(count, most recent end position)`. Both updates are monoid actions
//! (`count += 1`, `last_end = max(last_end, n)`), so lazy tags compose in any order.
//! This file knows nothing about tokens; it must stay a plain rooted forest.

/// Occurrence data of one automaton state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Occurrences {
    /// How many end positions the state's strings have.
    pub count: u32,
    /// The largest end position (1-based: after that many tokens), 0 if none yet.
    pub last_end: u32,
}

impl Occurrences {
    fn absorb(&mut self, other: Occurrences) {
        self.count += other.count;
        self.last_end = self.last_end.max(other.last_end);
    }
}

/// Index 0 is the null node; automaton state `s` lives at index `s + 1`.
const NIL: u32 = 0;

/// A link-cut tree with a lazy "add occurrence" on root-to-node paths.
#[derive(Clone, Debug)]
pub struct OccurrenceTree {
    children: Vec<[u32; 2]>,
    /// Splay parent, or path-parent when this node is the root of its splay tree.
    parent: Vec<u32>,
    value: Vec<Occurrences>,
    pending: Vec<Occurrences>,
}

impl Default for OccurrenceTree {
    fn default() -> Self {
        Self {
            children: vec![[NIL; 2]],
            parent: vec![NIL],
            value: vec![Occurrences::default()],
            pending: vec![Occurrences::default()],
        }
    }
}

impl OccurrenceTree {
    /// Adds a detached node for automaton state `state` (states are added in order).
    pub fn add_node(&mut self, state: u32, value: Occurrences) {
        debug_assert_eq!(self.children.len(), state as usize + 1);
        self.children.push([NIL; 2]);
        self.parent.push(NIL);
        self.value.push(value);
        self.pending.push(Occurrences::default());
    }

    /// Makes detached `child` (a tree root) a child of `parent`.
    pub fn link(&mut self, child: u32, parent: u32) {
        let (c, p) = (child + 1, parent + 1);
        self.access(c);
        debug_assert_eq!(
            self.children[c as usize][0], NIL,
            "link: child is not a root"
        );
        self.parent[c as usize] = p;
    }

    /// Detaches `node` from its parent.
    pub fn cut(&mut self, node: u32) {
        let x = node + 1;
        self.access(x);
        let left = self.children[x as usize][0];
        if left != NIL {
            self.parent[left as usize] = NIL;
            self.children[x as usize][0] = NIL;
        }
    }

    /// Adds `value` to every node from `node` up to its root.
    pub fn add_to_root_path(&mut self, node: u32, value: Occurrences) {
        let x = node + 1;
        self.access(x);
        self.apply(x, value);
    }

    /// The current value of `node`.
    pub fn get(&mut self, node: u32) -> Occurrences {
        let x = node + 1;
        self.splay(x);
        self.value[x as usize]
    }

    fn apply(&mut self, x: u32, tag: Occurrences) {
        if x != NIL {
            self.value[x as usize].absorb(tag);
            self.pending[x as usize].absorb(tag);
        }
    }

    fn push_down(&mut self, x: u32) {
        let tag = std::mem::take(&mut self.pending[x as usize]);
        if tag != Occurrences::default() {
            let [l, r] = self.children[x as usize];
            self.apply(l, tag);
            self.apply(r, tag);
        }
    }

    fn is_splay_root(&self, x: u32) -> bool {
        let p = self.parent[x as usize];
        p == NIL || (self.children[p as usize][0] != x && self.children[p as usize][1] != x)
    }

    fn side(&self, x: u32) -> usize {
        let p = self.parent[x as usize];
        usize::from(self.children[p as usize][1] == x)
    }

    fn rotate(&mut self, x: u32) {
        let p = self.parent[x as usize];
        let g = self.parent[p as usize];
        let s = self.side(x);
        let inner = self.children[x as usize][1 - s];
        if !self.is_splay_root(p) {
            let ps = self.side(p);
            self.children[g as usize][ps] = x;
        }
        self.parent[x as usize] = g;
        self.children[x as usize][1 - s] = p;
        self.parent[p as usize] = x;
        self.children[p as usize][s] = inner;
        if inner != NIL {
            self.parent[inner as usize] = p;
        }
    }

    fn splay(&mut self, x: u32) {
        // Push pending tags down from the splay root to x before rotating.
        let mut path = vec![x];
        let mut y = x;
        while !self.is_splay_root(y) {
            y = self.parent[y as usize];
            path.push(y);
        }
        for &node in path.iter().rev() {
            self.push_down(node);
        }
        while !self.is_splay_root(x) {
            let p = self.parent[x as usize];
            if !self.is_splay_root(p) {
                if self.side(x) == self.side(p) {
                    self.rotate(p);
                } else {
                    self.rotate(x);
                }
            }
            self.rotate(x);
        }
    }

    /// Makes the root-to-`x` path one splay tree with `x` at its root and nothing below x.
    fn access(&mut self, x: u32) {
        let mut below = NIL;
        let mut y = x;
        while y != NIL {
            self.splay(y);
            self.children[y as usize][1] = below;
            below = y;
            y = self.parent[y as usize];
        }
        self.splay(x);
    }
}
