//! The engine thread: owns the llama.cpp context and runs the step loop.
//!
//! Each step: take new requests and drop cancelled ones, admit queued requests by priority
//! (taking their longest cached prefix; one whose new prefix a running prompt is still
//! prefilling waits for it), build one batch with the decode input of every running
//! sequence plus a bounded slice of pending prefill, decode it, then sample, emit and retire.
//! Logits are requested only where a token is sampled. Finished sequences hand their KV to the
//! prefix cache; cancelled ones free it at once (except a prompt cancelled mid-prefill, whose
//! prefilled part is cached for the longer prompt that usually follows).
//!
//! The per-sequence decode step lives in [`Runner::decode_inputs`] (what a sequence feeds this
//! step: its last token plus any draft tokens) and [`Runner::verify`] (sample at each fed
//! position, keep drafts while they match, remove the rest from KV), so speculation plugs in
//! by proposing drafts without touching the loop.

use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc::UnboundedSender;

use super::output::OutputText;
use super::{EngineStats, RunnerSettings};
use crate::cache::{NodeRef, PrefixCache, SeqSlot};
use crate::engine::{
    EngineError, FinishReason, GenerationEvent, Priority, SamplingParams, Timings, TokenId, Usage,
};
use crate::speculate::{Draft, DraftFeed, SessionStore, SpeculationStats, Speculator};

pub(super) type EventSender = UnboundedSender<Result<GenerationEvent, EngineError>>;

/// New prefix tokens a queued request must share with a prompt still prefilling before it
/// waits for that prefill instead of repeating it: below this, waiting costs more than it saves.
const MIN_SHARED_PREFILL: usize = 16;

/// A request waiting for a sequence slot.
pub(super) struct Pending {
    pub tokens: Vec<TokenId>,
    pub sampling: SamplingParams,
    pub priority: Priority,
    pub events: EventSender,
    pub submitted: Instant,
    /// Reports the top logits after the prompt instead of generating (diagnostics).
    pub probe: Option<std::sync::mpsc::Sender<Vec<(TokenId, f32)>>>,
    /// Pipeline streams to draft from (an aggregator's proposers).
    pub draft_feed: Option<DraftFeed>,
}

pub(super) enum Command {
    Submit(Pending),
}

/// Stats shared with the engine handle; `changed` wakes waiters after every step.
#[derive(Default)]
pub(super) struct Shared {
    pub stats: Mutex<EngineStats>,
    pub changed: Condvar,
}

struct Sequence {
    slot: SeqSlot,
    order: u64,
    priority: Priority,
    events: EventSender,
    sampling: SamplingParams,
    /// `None` for greedy decoding.
    sampler: Option<LlamaSampler>,
    /// Prompt then generated tokens; the last generated one is not in KV yet.
    tokens: Vec<TokenId>,
    prompt_len: usize,
    /// Tokens whose KV is in the slot (positions `0..n_past`).
    n_past: usize,
    cached_prompt: usize,
    /// Cells this sequence shares with cached prefixes (not its own).
    shared_cells: usize,
    /// Cells reserved for this sequence when admitted (prompt + output, minus shared).
    reserved_cells: usize,
    cache_lock: Option<NodeRef>,
    /// Draft tokens to verify at the next step (filled by a speculation proposer).
    drafts: Vec<TokenId>,
    /// Drafts this sequence from its own text, its pipeline feed and past sessions;
    /// `None` when speculation is off.
    speculator: Option<Speculator>,
    /// The draft behind `drafts`, for recording its outcome.
    draft: Option<Draft>,
    output: OutputText,
    /// Text after a stop string is never sent.
    stop_string_seen: bool,
    generated: u32,
    submitted: Instant,
    started: Instant,
    prefill_done: Option<Instant>,
    first_token: Option<Instant>,
    probe: Option<std::sync::mpsc::Sender<Vec<(TokenId, f32)>>>,
}

impl Sequence {
    fn prefilling(&self) -> bool {
        self.n_past < self.prompt_len
    }

    fn timings(&self, now: Instant) -> Timings {
        Timings {
            queued: self.started - self.submitted,
            prefill_done: self.prefill_done.unwrap_or(now) - self.submitted,
            first_token: self.first_token.map(|t| t - self.submitted),
            finished: now - self.submitted,
        }
    }
}

/// How a sequence left.
enum Exit {
    Finished(FinishReason),
    Cancelled,
    Failed(EngineError),
}

/// One sequence's share of the batch.
struct Planned {
    index: usize,
    /// Batch index of its first input.
    first: i32,
    inputs: usize,
    prefill: bool,
}

pub(super) struct Runner<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    settings: RunnerSettings,
    n_ctx: usize,
    queue: Vec<(u64, Pending)>,
    running: Vec<Sequence>,
    free_slots: Vec<SeqSlot>,
    cache: Option<PrefixCache>,
    shared: Arc<Shared>,
    next_order: u64,
    steps: u64,
    finished: u64,
    /// Past requests' text, a draft source shared by all sequences of this engine.
    sessions: SessionStore,
    speculation: SpeculationStats,
}

impl<'m> Runner<'m> {
    pub(super) fn new(
        model: &'m LlamaModel,
        ctx: LlamaContext<'m>,
        settings: RunnerSettings,
        shared: Arc<Shared>,
    ) -> Self {
        let n_ctx = ctx.n_ctx() as usize;
        let batch = LlamaBatch::new(settings.batch_tokens, 1);
        // Highest slot ids are handed out first; order does not matter to llama.cpp.
        let free_slots = (0..settings.sequence_slots as i32).map(SeqSlot).collect();
        let cache = settings
            .prefix_cache
            .then(|| PrefixCache::new(settings.cache_budget_cells));
        let sessions = SessionStore::new(settings.speculation.session_budget);
        Self {
            model,
            ctx,
            batch,
            sessions,
            speculation: SpeculationStats::default(),
            settings,
            n_ctx,
            queue: Vec::new(),
            running: Vec::new(),
            free_slots,
            cache,
            shared,
            next_order: 0,
            steps: 0,
            finished: 0,
        }
    }

    /// Serves until every engine handle is gone and the remaining work is done.
    pub(super) fn run(mut self, commands: Receiver<Command>) {
        let mut open = true;
        loop {
            if self.running.is_empty() && self.queue.is_empty() {
                if !open {
                    return;
                }
                self.publish();
                match commands.recv() {
                    Ok(command) => self.accept(command),
                    Err(_) => return,
                }
            }
            while open {
                match commands.try_recv() {
                    Ok(command) => self.accept(command),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            self.drop_cancelled();
            self.admit();
            if self.running.is_empty() {
                // Nothing could be admitted with the whole KV cache free: the head request
                // cannot run at all (validated at submit, so this is a bug guard).
                if !self.queue.is_empty() {
                    let (_, pending) = self.queue.remove(0);
                    let _ = pending.events.send(Err(EngineError::Backend(
                        "request does not fit the KV cache".into(),
                    )));
                }
                continue;
            }
            self.step();
            self.publish();
        }
    }

    fn accept(&mut self, command: Command) {
        match command {
            Command::Submit(pending) => {
                let order = self.next_order;
                self.next_order += 1;
                // Higher priority first, then arrival order.
                let at = self
                    .queue
                    .partition_point(|(_, p)| p.priority >= pending.priority);
                self.queue.insert(at, (order, pending));
            }
        }
    }

    fn drop_cancelled(&mut self) {
        self.queue.retain(|(_, p)| !p.events.is_closed());
        let mut index = 0;
        while index < self.running.len() {
            if self.running[index].events.is_closed() {
                let seq = self.running.swap_remove(index);
                self.retire(seq, Exit::Cancelled);
            } else {
                index += 1;
            }
        }
    }

    fn reserved_cells(&self) -> usize {
        self.running.iter().map(|s| s.reserved_cells).sum()
    }

    fn cache_cells(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.stats().cells)
    }

    /// Frees a slot's KV and returns it to the pool.
    fn free_slot(&mut self, slot: SeqSlot) {
        // Removing a whole sequence always succeeds in llama.cpp.
        let _ = self.ctx.clear_kv_cache_seq(Some(slot.0 as u32), None, None);
        self.free_slots.push(slot);
    }

    fn free_released(&mut self, slots: Vec<SeqSlot>) {
        for slot in slots {
            self.free_slot(slot);
        }
    }

    /// A free slot, evicting the least recently used cache entry when none is free.
    fn take_slot(&mut self) -> Option<SeqSlot> {
        if self.free_slots.is_empty()
            && let Some(cache) = self.cache.as_mut()
        {
            let cells = cache.stats().cells;
            let released = cache.evict_to(cells.saturating_sub(1));
            self.free_released(released.slots);
        }
        self.free_slots.pop()
    }

    /// Whether a prompt still prefilling will cache a longer prefix of `tokens` than the cache
    /// holds now. Requests that begin alike (samples of one prompt, agents given one long
    /// document) would otherwise prefill the same prefix side by side; the later one waits
    /// instead, and the prefix is cached the step that prefill completes.
    fn waits_for_shared_prefill(
        cache: Option<&mut PrefixCache>,
        running: &[Sequence],
        tokens: &[TokenId],
    ) -> bool {
        let Some(cache) = cache else {
            return false;
        };
        let usable = tokens.len().saturating_sub(1);
        let shared = running
            .iter()
            .filter(|s| s.prefilling())
            .map(|s| {
                s.tokens[..s.prompt_len]
                    .iter()
                    .zip(&tokens[..usable])
                    .take_while(|(a, b)| a == b)
                    .count()
            })
            .max()
            .unwrap_or(0);
        // The cache is only asked when a prefill could matter: the usual request costs no
        // second lookup per step (and no LRU refresh).
        shared >= MIN_SHARED_PREFILL
            && shared >= cache.lookup(tokens, usable).map_or(0, |hit| hit.len) + MIN_SHARED_PREFILL
    }

    fn admit(&mut self) {
        // Queue position: requests waiting for a shared prefill are skipped, not blocking.
        let mut at = 0;
        while at < self.queue.len() && self.running.len() < self.settings.max_running {
            let tokens = &self.queue[at].1.tokens;
            if Self::waits_for_shared_prefill(self.cache.as_mut(), &self.running, tokens) {
                at += 1;
                continue;
            }
            let Some(slot) = self.take_slot() else {
                return;
            };
            let (order, pending) = self.queue.remove(at);
            let prompt_len = pending.tokens.len();
            // At least the last prompt token is decoded: its logits give the first token.
            let hit = self
                .cache
                .as_mut()
                .and_then(|c| c.lookup(&pending.tokens, prompt_len - 1));
            let mut cached = 0;
            if let (Some(hit), Some(cache)) = (hit, self.cache.as_mut()) {
                cache.lock(hit.node);
                // Copy now, before any eviction below can free `hit.slot`. Inside the unified
                // KV cache this shares the prefix cells; no data is copied.
                let copied =
                    self.ctx
                        .copy_kv_cache_seq(hit.slot.0, slot.0, Some(0), Some(hit.len as u32));
                match copied {
                    Ok(()) => cached = hit.len,
                    Err(error) => tracing::warn!(%error, "prefix copy failed; prefilling in full"),
                }
            }
            let total = (prompt_len + pending.sampling.max_tokens as usize).min(self.n_ctx);
            let need = total - cached;
            let used = self.reserved_cells() + self.cache_cells();
            if used + need > self.n_ctx {
                let target = self.n_ctx.saturating_sub(self.reserved_cells() + need);
                if let Some(cache) = self.cache.as_mut() {
                    let released = cache.evict_to(target);
                    self.free_released(released.slots);
                }
            }
            if self.reserved_cells() + self.cache_cells() + need > self.n_ctx {
                // Wait for running sequences to finish; keep priority order.
                if let (Some(hit), Some(cache)) = (hit, self.cache.as_mut()) {
                    cache.unlock(hit.node);
                }
                self.free_slot(slot);
                self.queue.insert(at, (order, pending));
                return;
            }
            let sampler = build_sampler(&pending.sampling, self.model.n_vocab(), &pending.tokens);
            let speculator = self.settings.speculation.enabled.then(|| {
                let mut speculator =
                    Speculator::new(&self.settings.speculation, pending.draft_feed.clone());
                speculator.observe(&pending.tokens);
                speculator
            });
            let now = Instant::now();
            self.running.push(Sequence {
                slot,
                order,
                priority: pending.priority,
                events: pending.events,
                output: OutputText::new(&pending.sampling.stop),
                sampling: pending.sampling,
                sampler,
                tokens: pending.tokens,
                prompt_len,
                n_past: cached,
                cached_prompt: cached,
                shared_cells: cached,
                reserved_cells: need,
                cache_lock: hit.map(|h| h.node),
                drafts: Vec::new(),
                speculator,
                draft: None,
                stop_string_seen: false,
                generated: 0,
                submitted: pending.submitted,
                started: now,
                prefill_done: None,
                first_token: None,
                probe: pending.probe,
            });
        }
    }

    /// What a decoding sequence feeds this step: its last token, then drafts to verify.
    fn decode_inputs(seq: &Sequence, n_ctx: usize) -> Vec<TokenId> {
        let mut inputs = Vec::with_capacity(1 + seq.drafts.len());
        inputs.push(seq.tokens[seq.n_past]);
        // Every input needs a position inside the context.
        let room = n_ctx.saturating_sub(seq.n_past + 1);
        inputs.extend(seq.drafts.iter().take(room));
        inputs
    }

    /// Asks each decoding sequence's speculator for draft tokens, telling it how wide the
    /// step already is (decode tokens, drafts granted so far, prefill) so a busy step drafts
    /// less. Drafts never run past the sequence's reserved cells or the batch.
    fn propose_drafts(&mut self) {
        let decoding = self.running.iter().filter(|s| !s.prefilling()).count();
        let prefill: usize = self
            .running
            .iter()
            .filter(|s| s.prefilling())
            .map(|s| s.prompt_len - s.n_past)
            .sum::<usize>()
            .min(self.settings.prefill_chunk);
        let mut width = decoding + prefill;
        let vocab = self.model.vocab();
        let mut tokenize = |text: &str| -> Vec<TokenId> {
            vocab
                .tokenize(text.as_bytes(), false, false)
                .into_iter()
                .map(|t| TokenId(t.0))
                .collect()
        };
        for seq in &mut self.running {
            seq.drafts.clear();
            seq.draft = None;
            if seq.prefilling() {
                continue;
            }
            let Some(speculator) = seq.speculator.as_mut() else {
                continue;
            };
            speculator.sync_pipeline(&mut tokenize);
            // The last generated token is the step's own input; drafts follow it and must
            // stay inside the output budget (the cells reserved at admission) and the batch.
            let left =
                (seq.sampling.max_tokens.saturating_sub(seq.generated) as usize).saturating_sub(1);
            let room = self.n_ctx.saturating_sub(seq.n_past + 2);
            let batch_room = self.settings.batch_tokens.saturating_sub(width + 1);
            let max_len = left.min(room).min(batch_room);
            if let Some(draft) = speculator.draft(Some(&mut self.sessions), width, max_len) {
                width += draft.tokens.len();
                seq.drafts.clone_from(&draft.tokens);
                seq.draft = Some(draft);
            }
        }
    }

    fn step(&mut self) {
        // Fill `drafts` of decoding sequences before the batch is built; `decode_inputs`
        // feeds them and `verify` accepts or rolls them back.
        self.propose_drafts();
        self.batch.clear();
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| {
            let seq = &self.running[i];
            (std::cmp::Reverse(seq.priority), seq.order)
        });
        let mut budget = self.settings.batch_tokens;
        let mut plan = Vec::with_capacity(order.len());
        for &index in &order {
            let seq = &self.running[index];
            if seq.prefilling() {
                continue;
            }
            let inputs = Self::decode_inputs(seq, self.n_ctx);
            if inputs.len() > budget {
                continue;
            }
            let first = self.batch.n_tokens();
            for (offset, token) in inputs.iter().enumerate() {
                let pos = (seq.n_past + offset) as i32;
                // Capacity is `batch_tokens` and `budget` tracks it, so this cannot fail.
                let _ = self
                    .batch
                    .add(LlamaToken(token.0), pos, &[seq.slot.0], true);
            }
            budget -= inputs.len();
            plan.push(Planned {
                index,
                first,
                inputs: inputs.len(),
                prefill: false,
            });
        }
        // Chunked prefill: while others decode, a bounded slice keeps their token rate steady.
        // A prompt that outranks every decoding sequence (the critical path) takes the whole
        // remaining batch instead: the others still get their token this step.
        let top_decoding = plan.iter().map(|p| self.running[p.index].priority).max();
        let mut chunk_left = self.settings.prefill_chunk;
        for &index in &order {
            let seq = &self.running[index];
            if !seq.prefilling() {
                continue;
            }
            let outranks = top_decoding.is_none_or(|top| seq.priority > top);
            let allowance = if outranks {
                budget
            } else {
                budget.min(chunk_left)
            };
            let take = (seq.prompt_len - seq.n_past).min(allowance);
            if take == 0 {
                continue;
            }
            let first = self.batch.n_tokens();
            let completes = seq.n_past + take == seq.prompt_len;
            for offset in 0..take {
                let pos = seq.n_past + offset;
                let logits = completes && offset + 1 == take;
                let _ = self.batch.add(
                    LlamaToken(seq.tokens[pos].0),
                    pos as i32,
                    &[seq.slot.0],
                    logits,
                );
            }
            budget -= take;
            if !outranks {
                chunk_left -= take;
            }
            plan.push(Planned {
                index,
                first,
                inputs: take,
                prefill: true,
            });
        }
        if plan.is_empty() {
            return;
        }
        self.steps += 1;
        if let Err(error) = self.ctx.decode(&mut self.batch) {
            self.decode_failed(error, plan);
            return;
        }
        let now = Instant::now();
        let mut exits: Vec<(usize, Exit)> = Vec::new();
        for item in plan {
            let exit = if item.prefill {
                self.after_prefill(item, now)
            } else {
                self.verify(item, now)
            };
            if let Some(exit) = exit {
                exits.push(exit);
            }
        }
        // Remove from the back so earlier indices stay valid.
        exits.sort_by_key(|(index, _)| std::cmp::Reverse(*index));
        for (index, exit) in exits {
            let seq = self.running.swap_remove(index);
            self.retire(seq, exit);
        }
    }

    fn decode_failed(&mut self, error: llama_cpp_2::DecodeError, plan: Vec<Planned>) {
        tracing::warn!(%error, "decode failed");
        let mut indices: Vec<usize> = plan.iter().map(|p| p.index).collect();
        if matches!(error, llama_cpp_2::DecodeError::NoKvCacheSlot)
            && let Some(cache) = self.cache.as_mut()
            && cache.stats().cells > 0
        {
            // Make room and let the next step retry the same work.
            let released = cache.clear();
            self.free_released(released.slots);
            return;
        }
        indices.sort_unstable_by(|a, b| b.cmp(a));
        for index in indices {
            let seq = self.running.swap_remove(index);
            self.retire(
                seq,
                Exit::Failed(EngineError::Backend(format!("llama.cpp decode: {error}"))),
            );
        }
    }

    fn after_prefill(&mut self, item: Planned, now: Instant) -> Option<(usize, Exit)> {
        let index = item.index;
        self.running[index].n_past += item.inputs;
        if self.running[index].prefilling() {
            return None;
        }
        self.running[index].prefill_done = Some(now);
        self.cache_prompt(index);
        let row = item.first + item.inputs as i32 - 1;
        if let Some(probe) = self.running[index].probe.take() {
            let _ = probe.send(top_logits(self.ctx.get_logits_ith(row), 2));
            return Some((index, Exit::Cancelled));
        }
        // A warm-up (`max_tokens` 0) ends here: its prompt is cached, nothing is sampled.
        if self.running[index].sampling.max_tokens == 0 {
            return Some((index, Exit::Finished(FinishReason::Length)));
        }
        let token = self.sample(index, row);
        self.accept_token(index, token, now)
            .map(|exit| (index, exit))
    }

    /// Verifies the fed drafts with `speculate::verify` (the model's own choice at each fed
    /// position; for a point-mass draft this is exactly the speculative acceptance rule),
    /// emits the verdict's tokens until the sequence ends, and removes the KV of the rest.
    fn verify(&mut self, item: Planned, now: Instant) -> Option<(usize, Exit)> {
        let index = item.index;
        let start = self.running[index].n_past;
        let mut drafts = std::mem::take(&mut self.running[index].drafts);
        // Only drafts that were fed have a row of logits to be checked against.
        drafts.truncate(item.inputs.saturating_sub(1));
        let emitted_from = self.running[index].tokens.len();
        let verdict = crate::speculate::verify(&drafts, |offset| {
            self.sample(index, item.first + offset as i32)
        });
        let mut kept_inputs = 0;
        let mut exit = None;
        for &token in &verdict.emitted {
            kept_inputs += 1;
            self.running[index].n_past = start + kept_inputs;
            exit = self.accept_token(index, token, now);
            if exit.is_some() {
                break;
            }
        }
        let accepted = verdict.accepted.min(kept_inputs);
        let seq = &mut self.running[index];
        if let Some(speculator) = seq.speculator.as_mut() {
            // An end-of-generation token is not pushed; the speculator sees what the sequence
            // holds.
            let emitted = &seq.tokens[emitted_from.min(seq.tokens.len())..];
            speculator.record(seq.draft.take().as_ref(), accepted, emitted);
        }
        if kept_inputs < item.inputs {
            let slot = self.running[index].slot;
            let _ = self.ctx.clear_kv_cache_seq(
                Some(slot.0 as u32),
                Some((start + kept_inputs) as u32),
                None,
            );
        }
        exit.map(|exit| (index, exit))
    }

    fn sample(&mut self, index: usize, row: i32) -> TokenId {
        let seq = &mut self.running[index];
        match seq.sampler.as_mut() {
            Some(sampler) => TokenId(sampler.sample(&self.ctx, row).0),
            None => argmax(self.ctx.get_logits_ith(row)),
        }
    }

    /// Records a sampled token, streams its text, and says whether the sequence is done.
    fn accept_token(&mut self, index: usize, token: TokenId, now: Instant) -> Option<Exit> {
        let vocab = self.model.vocab();
        let seq = &mut self.running[index];
        seq.generated += 1;
        seq.first_token.get_or_insert(now);
        if vocab.is_eog(LlamaToken(token.0)) {
            return Some(Exit::Finished(FinishReason::Stop));
        }
        seq.tokens.push(token);
        let bytes = vocab.token_to_piece(LlamaToken(token.0), false, None);
        let emitted = seq.output.push(token, &bytes);
        if !emitted.text.is_empty() || emitted.stopped {
            let delta = GenerationEvent::Delta {
                text: emitted.text,
                tokens: emitted.tokens,
            };
            if seq.events.send(Ok(delta)).is_err() {
                return Some(Exit::Cancelled);
            }
        }
        if emitted.stopped {
            seq.stop_string_seen = true;
            return Some(Exit::Finished(FinishReason::Stop));
        }
        if seq.generated >= seq.sampling.max_tokens || seq.tokens.len() >= self.n_ctx {
            return Some(Exit::Finished(FinishReason::Length));
        }
        None
    }

    /// Adds the just-prefilled prompt to the prefix cache (a sequence copy: shared cells).
    fn cache_prompt(&mut self, index: usize) {
        if self.cache.is_none() {
            return;
        }
        // Keep enough slots for the sequences that may still be admitted.
        let reserve = self.settings.max_running - self.running.len();
        if self.free_slots.len() <= reserve {
            let Some(cache) = self.cache.as_mut() else {
                return;
            };
            let cells = cache.stats().cells;
            let released = cache.evict_to(cells.saturating_sub(1));
            self.free_released(released.slots);
            if self.free_slots.len() <= reserve {
                return;
            }
        }
        let Some(slot) = self.free_slots.pop() else {
            return;
        };
        let seq = &self.running[index];
        let (source, len) = (seq.slot, seq.prompt_len);
        let _ = self
            .ctx
            .copy_kv_cache_seq(source.0, slot.0, Some(0), Some(len as u32));
        let tokens = seq.tokens[..len].to_vec();
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        let mut released = cache.insert(&tokens, slot);
        released.slots.extend(cache.evict_to_budget().slots);
        self.free_released(released.slots);
        self.running[index].shared_cells = len;
    }

    fn retire(&mut self, mut seq: Sequence, exit: Exit) {
        let now = Instant::now();
        if let (Some(node), Some(cache)) = (seq.cache_lock.take(), self.cache.as_mut()) {
            cache.unlock(node);
        }
        match exit {
            Exit::Finished(reason) => {
                if !seq.stop_string_seen {
                    let rest = seq.output.finish();
                    if !rest.text.is_empty() {
                        let _ = seq.events.send(Ok(GenerationEvent::Delta {
                            text: rest.text,
                            tokens: rest.tokens,
                        }));
                    }
                }
                let speculation = seq
                    .speculator
                    .take()
                    .map(|s| s.finish(Some(&mut self.sessions)));
                if let Some(stats) = &speculation {
                    self.speculation.merge(stats);
                }
                let usage = Usage {
                    prompt_tokens: seq.prompt_len as u32,
                    cached_prompt_tokens: seq.cached_prompt as u32,
                    completion_tokens: seq.generated,
                    speculation,
                };
                let _ = seq.events.send(Ok(GenerationEvent::Finished {
                    reason,
                    usage,
                    timings: seq.timings(now),
                }));
                self.finished += 1;
                // The KV (prompt and output) becomes a cached prefix for later requests.
                if let Some(cache) = self.cache.as_mut() {
                    let tokens = &seq.tokens[..seq.n_past];
                    let mut released = cache.insert(tokens, seq.slot);
                    released.slots.extend(cache.evict_to_budget().slots);
                    self.free_released(released.slots);
                    return;
                }
            }
            Exit::Cancelled => {
                tracing::debug!(slot = seq.slot.0, "sequence cancelled");
                // A prompt cancelled mid-prefill keeps what was prefilled: a staircase
                // aggregator re-issues a longer prompt with the same start and resumes there.
                // Output of a cancelled request is not kept (nobody will read it).
                if seq.prefilling()
                    && seq.n_past > seq.cached_prompt
                    && let Some(cache) = self.cache.as_mut()
                {
                    let mut released = cache.insert(&seq.tokens[..seq.n_past], seq.slot);
                    released.slots.extend(cache.evict_to_budget().slots);
                    self.free_released(released.slots);
                    return;
                }
            }
            Exit::Failed(error) => {
                let _ = seq.events.send(Err(error));
            }
        }
        self.free_slot(seq.slot);
    }

    fn publish(&mut self) {
        let cache = self.cache.as_ref().map(|c| c.stats()).unwrap_or_default();
        let own: usize = self
            .running
            .iter()
            .map(|s| s.n_past.saturating_sub(s.shared_cells))
            .sum();
        let positions = (0..self.settings.sequence_slots as i32)
            .map(|slot| {
                let max = self.ctx.kv_cache_seq_pos_max(slot);
                if max < 0 {
                    0
                } else {
                    (max - self.ctx.kv_cache_seq_pos_min(slot) + 1) as usize
                }
            })
            .sum();
        let stats = EngineStats {
            live_sequences: self.running.len(),
            queued: self.queue.len(),
            kv_cells_used: cache.cells + own,
            kv_sequence_positions: positions,
            cache_entries: cache.entries,
            cache_cells: cache.cells,
            locked_prefixes: cache.locked_nodes,
            steps: self.steps,
            finished_requests: self.finished,
            speculation: self.speculation.clone(),
        };
        if let Ok(mut shared) = self.shared.stats.lock() {
            *shared = stats;
        }
        self.shared.changed.notify_all();
    }
}

/// The sampler chain of a request; `None` for plain greedy decoding (argmax, no state).
/// A repetition penalty sees the prompt's last tokens first, so a continued answer (an
/// assistant prefix) counts against repeats too.
fn build_sampler(
    sampling: &SamplingParams,
    n_vocab: i32,
    prompt: &[TokenId],
) -> Option<LlamaSampler> {
    let last_n = sampling.repeat_last_n as usize;
    let penalised = sampling.repeat_penalty != 1.0 && last_n > 0;
    let greedy = sampling.temperature <= 0.0;
    if greedy && !penalised {
        return None;
    }
    let mut chain = Vec::new();
    if penalised {
        let window = i32::try_from(last_n).unwrap_or(i32::MAX);
        chain.push(LlamaSampler::penalties(
            n_vocab,
            window,
            sampling.repeat_penalty,
            0.0,
            0.0,
        ));
    }
    if greedy {
        chain.push(LlamaSampler::greedy());
    } else {
        if sampling.top_k > 0 {
            chain.push(LlamaSampler::top_k(sampling.top_k as i32));
        }
        if sampling.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(sampling.top_p, 1));
        }
        chain.push(LlamaSampler::temp(sampling.temperature));
        // llama.cpp seeds are 32-bit; fold the high half in so every bit of ours matters.
        let seed = (sampling.seed ^ (sampling.seed >> 32)) as u32;
        chain.push(LlamaSampler::dist(seed));
    }
    let mut sampler = LlamaSampler::chain_simple(chain);
    if penalised {
        let tail = &prompt[prompt.len().saturating_sub(last_n)..];
        sampler.accept_many(tail.iter().map(|t| LlamaToken(t.0)));
    }
    Some(sampler)
}

/// Greedy choice; the lowest id wins a tie, as in llama.cpp's greedy sampler.
pub(super) fn argmax(logits: &[f32]) -> TokenId {
    let mut best = 0;
    for (index, &value) in logits.iter().enumerate() {
        if value > logits[best] {
            best = index;
        }
    }
    TokenId(best as i32)
}

fn top_logits(logits: &[f32], k: usize) -> Vec<(TokenId, f32)> {
    let mut pairs: Vec<(TokenId, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (TokenId(i as i32), v))
        .collect();
    pairs.sort_by(|a, b| b.1.total_cmp(&a.1));
    pairs.truncate(k);
    pairs
}
