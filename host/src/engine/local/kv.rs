//! The local engine's KV-cache manager: which llama.cpp sequence slot holds what, how many
//! cells running sequences were promised, and the prefix cache (`crate::cache`) over the
//! slots. It decides, and has [`KvOps`] carry each decision out on the context, so its rules
//! are unit-tested without a model (a fake [`KvOps`] that can fail).
//!
//! The rule everything here keeps: a slot is in the prefix cache only while its cells hold
//! exactly the cached tokens. A copy that fails frees the target slot instead of caching it,
//! and a slot whose rejected drafts could not be removed is never cached.
//! This room must not decode, sample or schedule.

use std::collections::HashSet;

use crate::cache::{CacheNamespace, NodeRef, PrefixCache, PrefixCacheStats, Released, SeqSlot};
use crate::token::TokenId;

/// A KV operation llama.cpp refused.
#[derive(Debug, thiserror::Error)]
#[error("KV cache: {0}")]
pub(super) struct KvError(pub String);

/// What the manager needs done to the KV cells of llama.cpp sequences.
pub(super) trait KvOps {
    /// Makes `to` hold positions `0..len` of `from` (in the unified cache: shared cells).
    fn copy_prefix(&mut self, from: SeqSlot, to: SeqSlot, len: usize) -> Result<(), KvError>;
    /// Removes positions `from..` of `slot`.
    fn truncate(&mut self, slot: SeqSlot, from: usize) -> Result<(), KvError>;
    /// Removes every position of `slot` (never fails in llama.cpp).
    fn clear(&mut self, slot: SeqSlot);
}

/// A slot for an admitted prompt, with its longest cached prefix already copied in.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Admission {
    pub slot: SeqSlot,
    /// Prompt tokens whose KV came from the cache.
    pub cached: usize,
    /// Cells promised to the sequence: prompt and output, minus the cached ones.
    pub reserved_cells: usize,
    /// The cached prefix copied from, locked until the sequence ends.
    pub lock: Option<NodeRef>,
}

pub(super) struct KvManager {
    free: Vec<SeqSlot>,
    cache: Option<PrefixCache>,
    /// Slots whose cells no longer match their tokens (a failed draft removal).
    dirty: HashSet<SeqSlot>,
    n_ctx: usize,
}

impl KvManager {
    /// `slots` llama.cpp sequence ids; a prefix cache of `cache_budget_cells` when given.
    pub fn new(slots: usize, cache_budget_cells: Option<usize>, n_ctx: usize) -> Self {
        Self {
            // Highest slot ids are handed out first; order does not matter to llama.cpp.
            free: (0..slots as i32).map(SeqSlot).collect(),
            cache: cache_budget_cells.map(PrefixCache::new),
            dirty: HashSet::new(),
            n_ctx,
        }
    }

    /// The prefix cache's counters (zero without a cache).
    pub fn stats(&self) -> PrefixCacheStats {
        self.cache.as_ref().map(|c| c.stats()).unwrap_or_default()
    }

    fn cache_cells(&self) -> usize {
        self.stats().cells
    }

    #[cfg(test)]
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// The longest prefix of `tokens` cached in `namespace`, up to `max_len` tokens (0
    /// without a cache).
    pub fn cached_len(
        &mut self,
        namespace: &CacheNamespace,
        tokens: &[TokenId],
        max_len: usize,
    ) -> usize {
        self.cache
            .as_mut()
            .and_then(|c| c.lookup(namespace, tokens, max_len))
            .map_or(0, |hit| hit.len)
    }

    fn free_slot(&mut self, ops: &mut impl KvOps, slot: SeqSlot) {
        ops.clear(slot);
        self.dirty.remove(&slot);
        self.free.push(slot);
    }

    fn free_released(&mut self, ops: &mut impl KvOps, released: Released) {
        for slot in released.slots {
            self.free_slot(ops, slot);
        }
    }

    /// Evicts the least recently used unlocked entry.
    fn evict_one(&mut self, ops: &mut impl KvOps) {
        if let Some(cache) = self.cache.as_mut() {
            let cells = cache.stats().cells;
            let released = cache.evict_to(cells.saturating_sub(1));
            self.free_released(ops, released);
        }
    }

    /// A free slot, evicting the least recently used cache entry when none is free.
    fn take_slot(&mut self, ops: &mut impl KvOps) -> Option<SeqSlot> {
        if self.free.is_empty() {
            self.evict_one(ops);
        }
        self.free.pop()
    }

    /// A slot for a prompt of `tokens` that may generate `max_tokens`, with its longest
    /// cached prefix copied in, when a slot is free and the cells fit beside the
    /// `reserved` cells of running sequences (evicting cached prefixes to make room).
    /// `None` leaves everything as it was, apart from evictions. Only prefixes cached in
    /// `namespace` are reused.
    pub fn admit(
        &mut self,
        ops: &mut impl KvOps,
        namespace: &CacheNamespace,
        tokens: &[TokenId],
        max_tokens: usize,
        reserved: usize,
    ) -> Option<Admission> {
        let slot = self.take_slot(ops)?;
        let prompt_len = tokens.len();
        // At least the last prompt token is decoded: its logits give the first token.
        let hit = self
            .cache
            .as_mut()
            .and_then(|c| c.lookup(namespace, tokens, prompt_len - 1));
        let mut cached = 0;
        let mut lock = None;
        if let (Some(hit), Some(cache)) = (hit, self.cache.as_mut()) {
            // Copy now, before any eviction below can free `hit.slot`.
            match ops.copy_prefix(hit.slot, slot, hit.len) {
                Ok(()) => {
                    cache.lock(hit.node);
                    cached = hit.len;
                    lock = Some(hit.node);
                }
                Err(error) => {
                    tracing::warn!(%error, "prefix copy failed; prefilling in full");
                    // Whatever part of the copy landed must not stay under the new prompt.
                    ops.clear(slot);
                }
            }
        }
        let mut need = (prompt_len + max_tokens).min(self.n_ctx) - cached;
        self.make_room(ops, reserved + need);
        if lock.is_some() && reserved + self.cache_cells() + need > self.n_ctx {
            // The locked entry may hold more cells than the prefix shared with it, and
            // those cells can keep a long request out even of an idle engine: prefill in
            // full rather than wait for room that never comes.
            self.unlock(lock.take());
            ops.clear(slot);
            cached = 0;
            need = (prompt_len + max_tokens).min(self.n_ctx);
            self.make_room(ops, reserved + need);
        }
        if reserved + self.cache_cells() + need > self.n_ctx {
            // Wait for running sequences to finish.
            self.unlock(lock);
            self.free_slot(ops, slot);
            return None;
        }
        Some(Admission {
            slot,
            cached,
            reserved_cells: need,
            lock,
        })
    }

    /// Evicts unlocked cached prefixes until `cells` more fit beside the cache.
    fn make_room(&mut self, ops: &mut impl KvOps, cells: usize) {
        if cells + self.cache_cells() > self.n_ctx {
            let target = self.n_ctx.saturating_sub(cells);
            if let Some(cache) = self.cache.as_mut() {
                let released = cache.evict_to(target);
                self.free_released(ops, released);
            }
        }
    }

    /// Caches a just-prefilled prompt in a slot of its own (a copy of `source`'s first
    /// `prompt.len()` positions), keeping `keep_free` slots for admissions. Returns whether
    /// the prompt is cached now; a failed copy frees the new slot and caches nothing.
    pub fn cache_prompt(
        &mut self,
        ops: &mut impl KvOps,
        namespace: &CacheNamespace,
        source: SeqSlot,
        prompt: &[TokenId],
        keep_free: usize,
    ) -> bool {
        if self.cache.is_none() {
            return false;
        }
        if self.free.len() <= keep_free {
            self.evict_one(ops);
            if self.free.len() <= keep_free {
                return false;
            }
        }
        let Some(slot) = self.free.pop() else {
            return false;
        };
        if let Err(error) = ops.copy_prefix(source, slot, prompt.len()) {
            tracing::warn!(%error, "prompt not cached");
            self.free_slot(ops, slot);
            return false;
        }
        self.insert(ops, namespace, prompt, slot);
        true
    }

    fn insert(
        &mut self,
        ops: &mut impl KvOps,
        namespace: &CacheNamespace,
        tokens: &[TokenId],
        slot: SeqSlot,
    ) {
        let Some(cache) = self.cache.as_mut() else {
            self.free_slot(ops, slot);
            return;
        };
        let mut released = cache.insert(namespace, tokens, slot);
        released.slots.extend(cache.evict_to_budget().slots);
        self.free_released(ops, released);
    }

    /// A sequence's slot, whose positions `0..tokens.len()` hold `tokens`, becomes a cached
    /// prefix of `namespace`; without a cache, or when its cells are not trusted, it is freed.
    pub fn retain(
        &mut self,
        ops: &mut impl KvOps,
        namespace: &CacheNamespace,
        slot: SeqSlot,
        tokens: &[TokenId],
    ) {
        if self.dirty.contains(&slot) {
            self.free_slot(ops, slot);
        } else {
            self.insert(ops, namespace, tokens, slot);
        }
    }

    /// Frees a sequence's slot without caching it.
    pub fn release(&mut self, ops: &mut impl KvOps, slot: SeqSlot) {
        self.free_slot(ops, slot);
    }

    /// Removes positions `from..` of a running sequence (rejected drafts). On failure the
    /// slot's cells no longer match its tokens: it is never cached, and the caller must end
    /// the sequence.
    pub fn truncate(
        &mut self,
        ops: &mut impl KvOps,
        slot: SeqSlot,
        from: usize,
    ) -> Result<(), KvError> {
        ops.truncate(slot, from).inspect_err(|_| {
            self.dirty.insert(slot);
        })
    }

    /// Ends the lock a sequence held on the prefix it copied.
    pub fn unlock(&mut self, lock: Option<NodeRef>) {
        if let (Some(node), Some(cache)) = (lock, self.cache.as_mut()) {
            cache.unlock(node);
        }
    }

    /// Drops every cached prefix (after llama.cpp found no room for a batch). Returns
    /// whether anything was dropped, so the step is worth retrying.
    pub fn clear_cache(&mut self, ops: &mut impl KvOps) -> bool {
        let Some(cache) = self.cache.as_mut() else {
            return false;
        };
        if cache.stats().cells == 0 {
            return false;
        }
        let released = cache.clear();
        self.free_released(ops, released);
        true
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A KV cache that records its positions per slot and fails on request.
    #[derive(Default)]
    pub(in crate::engine::local) struct FakeKv {
        held: std::collections::HashMap<SeqSlot, usize>,
        fail_copy: bool,
        fail_truncate: bool,
    }

    impl KvOps for FakeKv {
        fn copy_prefix(&mut self, from: SeqSlot, to: SeqSlot, len: usize) -> Result<(), KvError> {
            if self.fail_copy {
                // A copy that fails halfway leaves part of the range behind.
                self.held.insert(to, len / 2);
                return Err(KvError("injected copy failure".into()));
            }
            assert!(self.held.get(&from).copied().unwrap_or(0) >= len);
            self.held.insert(to, len);
            Ok(())
        }

        fn truncate(&mut self, slot: SeqSlot, from: usize) -> Result<(), KvError> {
            if self.fail_truncate {
                return Err(KvError("injected removal failure".into()));
            }
            let held = self.held.entry(slot).or_default();
            *held = (*held).min(from);
            Ok(())
        }

        fn clear(&mut self, slot: SeqSlot) {
            self.held.remove(&slot);
        }
    }

    pub(in crate::engine::local) fn ns() -> CacheNamespace {
        CacheNamespace::default()
    }

    pub(in crate::engine::local) fn tokens(n: i32) -> Vec<TokenId> {
        (0..n).map(TokenId).collect()
    }

    fn manager() -> KvManager {
        KvManager::new(4, Some(1000), 4096)
    }

    /// Admits and "prefills" a prompt: its slot then holds every prompt position.
    fn prefilled(kv: &mut KvManager, ops: &mut FakeKv, prompt: &[TokenId]) -> Admission {
        let admission = kv.admit(ops, &ns(), prompt, 8, 0).expect("room");
        ops.held.insert(admission.slot, prompt.len());
        admission
    }

    #[test]
    fn a_cached_prompt_is_copied_into_the_next_request() {
        let (mut kv, mut ops) = (manager(), FakeKv::default());
        let prompt = tokens(40);
        let first = prefilled(&mut kv, &mut ops, &prompt);
        assert!(kv.cache_prompt(&mut ops, &ns(), first.slot, &prompt, 0));
        let mut longer = prompt.clone();
        longer.extend(tokens(5));
        let second = kv
            .admit(&mut ops, &ns(), &longer, 8, first.reserved_cells)
            .unwrap();
        assert_eq!(second.cached, 40);
        assert!(second.lock.is_some());
        assert_eq!(ops.held[&second.slot], 40);
        assert_eq!(second.reserved_cells, 45 + 8 - 40);
    }

    #[test]
    fn a_failed_prompt_copy_caches_nothing_and_frees_the_slot() {
        let (mut kv, mut ops) = (manager(), FakeKv::default());
        let prompt = tokens(40);
        let first = prefilled(&mut kv, &mut ops, &prompt);
        let free_before = kv.free_slots();
        ops.fail_copy = true;
        assert!(!kv.cache_prompt(&mut ops, &ns(), first.slot, &prompt, 0));
        assert_eq!(
            kv.stats().entries,
            0,
            "no entry points at a half-copied slot"
        );
        assert_eq!(
            kv.free_slots(),
            free_before,
            "the target slot went back to the pool"
        );
        assert_eq!(
            ops.held.len(),
            1,
            "the half copy was cleared: only the source holds KV"
        );
        // And the next request prefills in full instead of copying cells that are not there.
        ops.fail_copy = false;
        let again = kv
            .admit(&mut ops, &ns(), &prompt, 8, first.reserved_cells)
            .unwrap();
        assert_eq!(again.cached, 0);
    }

    #[test]
    fn a_failed_prefix_copy_at_admission_prefills_in_full_on_a_clean_slot() {
        let (mut kv, mut ops) = (manager(), FakeKv::default());
        let prompt = tokens(40);
        let first = prefilled(&mut kv, &mut ops, &prompt);
        assert!(kv.cache_prompt(&mut ops, &ns(), first.slot, &prompt, 0));
        ops.fail_copy = true;
        let second = kv
            .admit(&mut ops, &ns(), &prompt, 8, first.reserved_cells)
            .unwrap();
        assert_eq!((second.cached, second.lock), (0, None));
        assert!(
            !ops.held.contains_key(&second.slot),
            "the partial copy was removed"
        );
        assert_eq!(second.reserved_cells, 48);
        assert_eq!(kv.stats().locked_nodes, 0);
    }

    #[test]
    fn a_slot_whose_drafts_could_not_be_removed_is_never_cached() {
        let (mut kv, mut ops) = (manager(), FakeKv::default());
        let prompt = tokens(40);
        let seq = prefilled(&mut kv, &mut ops, &prompt);
        ops.fail_truncate = true;
        assert!(kv.truncate(&mut ops, seq.slot, 30).is_err());
        kv.retain(&mut ops, &ns(), seq.slot, &prompt[..30]);
        assert_eq!(
            kv.stats().entries,
            0,
            "the slot still holds rejected drafts"
        );
        assert!(!ops.held.contains_key(&seq.slot), "its KV was freed");
        assert_eq!(kv.free_slots(), 4);
    }

    #[test]
    fn a_finished_sequence_becomes_a_cached_prefix() {
        let (mut kv, mut ops) = (manager(), FakeKv::default());
        let prompt = tokens(40);
        let seq = prefilled(&mut kv, &mut ops, &prompt);
        kv.truncate(&mut ops, seq.slot, 30).unwrap();
        kv.retain(&mut ops, &ns(), seq.slot, &prompt[..30]);
        assert_eq!((kv.stats().entries, kv.stats().cells), (1, 30));
    }

    #[test]
    fn admission_waits_when_running_sequences_hold_the_cells() {
        let (mut kv, mut ops) = (KvManager::new(4, Some(100), 200), FakeKv::default());
        let free = kv.free_slots();
        assert_eq!(kv.admit(&mut ops, &ns(), &tokens(50), 100, 100), None);
        assert_eq!(kv.free_slots(), free, "the slot it tried went back");
        assert!(kv.admit(&mut ops, &ns(), &tokens(50), 50, 100).is_some());
    }

    #[test]
    fn admission_evicts_cached_prefixes_to_make_room_but_not_locked_ones() {
        let (mut kv, mut ops) = (KvManager::new(4, Some(1000), 200), FakeKv::default());
        let prompt = tokens(100);
        let first = prefilled(&mut kv, &mut ops, &prompt);
        kv.retain(&mut ops, &ns(), first.slot, &prompt);
        assert_eq!(kv.stats().cells, 100);
        // A different prompt that needs 150 cells: the unlocked entry is evicted.
        let other: Vec<TokenId> = (1000..1100).map(TokenId).collect();
        let admitted = kv
            .admit(&mut ops, &ns(), &other, 50, 0)
            .expect("room after eviction");
        assert_eq!(kv.stats().cells, 0);
        kv.release(&mut ops, admitted.slot);
        // A locked prefix is kept even when that leaves no room.
        let second = prefilled(&mut kv, &mut ops, &prompt);
        kv.retain(&mut ops, &ns(), second.slot, &prompt);
        let reader = kv.admit(&mut ops, &ns(), &prompt, 10, 0).expect("room");
        assert!(reader.lock.is_some());
        assert_eq!(
            kv.admit(&mut ops, &ns(), &other, 90, reader.reserved_cells),
            None
        );
        assert_eq!(kv.stats().cells, 100);
    }

    #[test]
    fn a_long_request_sharing_a_short_prefix_of_a_cached_entry_is_admitted_on_an_idle_engine() {
        let (mut kv, mut ops) = (KvManager::new(4, Some(1000), 200), FakeKv::default());
        let prompt = tokens(100);
        let first = prefilled(&mut kv, &mut ops, &prompt);
        kv.retain(&mut ops, &ns(), first.slot, &prompt);
        // Shares 50 tokens with the 100-cell entry and asks for the whole context: with the
        // entry locked it would never fit, so it prefills in full instead.
        let admitted = kv
            .admit(&mut ops, &ns(), &tokens(50), 10_000, 0)
            .expect("an idle engine admits it");
        assert_eq!((admitted.cached, admitted.lock), (0, None));
        assert_eq!(admitted.reserved_cells, 200);
        assert_eq!(kv.stats().cells, 0, "the entry was evicted to make room");
    }
}
