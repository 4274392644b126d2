//! The engine thread's loop: takes commands, and each step admits queued requests
//! (`scheduler` order, `kv` slots and cached prefixes), has speculators propose drafts,
//! builds one batch after the scheduler's plan, runs it on the `executor`, then samples,
//! verifies drafts, streams and retires. Logits are requested only where a token is sampled.
//! Finished sequences hand their KV to the prefix cache; cancelled ones free it at once
//! (except a prompt cancelled mid-prefill, whose prefilled part is cached for the longer
//! prompt that usually follows). Stats are published after every step.
//!
//! The per-sequence decode step is [`Sequence::decode_inputs`] (its last token plus any
//! draft tokens) and [`EngineLoop::verify`] (sample at each fed position, keep drafts while
//! they match, remove the rest from KV), so speculation plugs in by proposing drafts.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::executor::Executor;
use super::kv::KvManager;
use super::output::OutputText;
use super::sampling::{build_sampler, top_logits, top_logprobs};
use super::scheduler::{self, Demand, Planned, Queue};
use super::sequence::{Exit, Sequence};
use super::{EngineSettings, EngineStats};
use crate::cache::CacheNamespace;
use crate::engine::{EngineError, EventSender, FinishReason, Priority, SamplingParams};
use crate::speculate::{DraftFeed, SessionStore, SpeculationStats, Speculator};
use crate::token::TokenId;

/// A request waiting for a sequence slot.
pub(super) struct Pending {
    /// Names the request in a later `Command::Cancel`.
    pub id: u64,
    pub tokens: Vec<TokenId>,
    /// How many of the last `tokens` are an assistant prefix being continued (DRY's history).
    pub answer_prefix: usize,
    pub sampling: SamplingParams,
    pub priority: Priority,
    pub events: EventSender,
    pub submitted: Instant,
    /// Reports the top logits after the prompt instead of generating (diagnostics).
    pub probe: Option<std::sync::mpsc::Sender<Vec<(TokenId, f32)>>>,
    /// Pipeline streams to draft from (an aggregator's proposers).
    pub draft_feed: Option<DraftFeed>,
    /// Whose cached prefixes and past sessions the request may reuse.
    pub namespace: CacheNamespace,
    /// The request asked for [`crate::engine::MeasureConfidence`].
    pub measure_confidence: bool,
    /// How many first-token candidates [`crate::engine::TopFirstTokens`] asked for (0: none).
    pub first_token_candidates: usize,
}

pub(super) enum Command {
    Submit(Pending),
    /// The caller dropped the request's stream before its end.
    Cancel(u64),
    /// Drop every unlocked cached prefix and the past sessions' drafts
    /// ([`crate::engine::Engine::forget_history`]); commands are handled in order, so every
    /// later submission sees the engine without them.
    ForgetHistory,
}

/// Stats shared with the engine handle; `changed` wakes waiters after every step.
#[derive(Default)]
pub(super) struct Shared {
    pub stats: Mutex<EngineStats>,
    pub changed: Condvar,
    /// The engine thread panicked and serves nothing more (`super::liveness`).
    pub crashed: AtomicBool,
}

pub(super) struct EngineLoop<'m> {
    model: &'m LlamaModel,
    executor: Executor<'m>,
    kv: KvManager,
    settings: EngineSettings,
    n_ctx: usize,
    queue: Queue<Pending>,
    running: Vec<Sequence>,
    shared: Arc<Shared>,
    steps: u64,
    finished: u64,
    /// Past requests' text, a draft source shared by all sequences of this engine.
    sessions: SessionStore,
    speculation: SpeculationStats,
}

/// A loop unwinding from a panic answers every request it holds: each client gets the
/// crash as its stream's last event instead of a stream that just ends (`super::liveness`).
impl Drop for EngineLoop<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let model = &self.settings.model_name;
        for sequence in &self.running {
            let _ = sequence.events.send(Err(super::liveness::crashed(model)));
        }
        for at in 0..self.queue.len() {
            if let Some(pending) = self.queue.get(at) {
                let _ = pending.events.send(Err(super::liveness::crashed(model)));
            }
        }
    }
}

impl<'m> EngineLoop<'m> {
    pub(super) fn new(
        model: &'m LlamaModel,
        executor: Executor<'m>,
        settings: EngineSettings,
        shared: Arc<Shared>,
    ) -> Self {
        let n_ctx = executor.n_ctx();
        let kv = KvManager::new(
            settings.sequence_slots,
            settings.prefix_cache.then_some(settings.cache_budget_cells),
            n_ctx,
        );
        let sessions = SessionStore::new(settings.speculation.session_budget);
        Self {
            model,
            executor,
            kv,
            sessions,
            speculation: SpeculationStats::default(),
            settings,
            n_ctx,
            queue: Queue::default(),
            running: Vec::new(),
            shared,
            steps: 0,
            finished: 0,
        }
    }

    /// Serves until every engine handle is gone and the remaining work is done.
    pub(super) fn run(mut self, commands: &Receiver<Command>) {
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
            self.admit();
            if self.running.is_empty() {
                // Nothing could be admitted with the whole KV cache free: the head request
                // cannot run at all (validated at submit, so this is a bug guard).
                if !self.queue.is_empty() {
                    let (_, pending) = self.queue.remove(0);
                    let _ = pending.events.send(Err(EngineError::Internal(
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
                self.queue.push(pending.priority, pending, |p| p.priority);
            }
            Command::Cancel(id) => {
                self.queue.retain(|p| p.id != id);
                if let Some(index) = self.running.iter().position(|s| s.id == id) {
                    let seq = self.running.swap_remove(index);
                    self.retire(seq, Exit::Cancelled);
                }
            }
            Command::ForgetHistory => {
                self.kv.clear_cache(&mut self.executor);
                self.sessions = SessionStore::new(self.settings.speculation.session_budget);
            }
        }
    }

    fn reserved_cells(&self) -> usize {
        self.running.iter().map(|s| s.reserved_cells).sum()
    }

    fn admit(&mut self) {
        // Requests waiting for a shared prefill are skipped, not blocking; so are requests
        // the KV cache has no room for yet, a bounded number of times (`Admitting`).
        let mut pass = scheduler::Admitting::default();
        while let Some(pending) = self.queue.get(pass.at)
            && self.running.len() < self.settings.max_running
        {
            // The queue is in priority order: from the first background request on, all are.
            if pending.priority.is_background() {
                let foreground_running = self.running.iter().any(|s| !s.priority.is_background());
                let foreground_queued = (0..self.queue.len())
                    .filter_map(|i| self.queue.get(i))
                    .any(|p| !p.priority.is_background());
                if !scheduler::admits_background(foreground_running, foreground_queued) {
                    return;
                }
            }
            let prefilling = self
                .running
                .iter()
                // Only a prefill this request may reuse is worth waiting for (and waiting for
                // another namespace's would time its text).
                .filter(|s| s.prefilling() && s.namespace == pending.namespace)
                .map(|s| &s.tokens[..s.prompt_len]);
            let kv = &mut self.kv;
            if self.settings.prefix_cache
                && scheduler::waits_for_shared_prefill(prefilling, &pending.tokens, |usable| {
                    kv.cached_len(&pending.namespace, &pending.tokens, usable)
                })
            {
                pass.skip();
                continue;
            }
            let reserved = self.reserved_cells();
            // Generation ends at the context's end: more than that is never reserved.
            let max_tokens = (pending.sampling.max_tokens as usize)
                .min(self.n_ctx.saturating_sub(pending.tokens.len()));
            let Some(admission) = self.kv.admit(
                &mut self.executor,
                &pending.namespace,
                &pending.tokens,
                max_tokens,
                reserved,
            ) else {
                // No slot or no room: later requests that fit may go first, a bounded
                // number of times; then everything waits for running sequences to finish.
                if pass.no_room(&self.queue) {
                    continue;
                }
                return;
            };
            let (order, pending) = pass.take(&mut self.queue);
            let sampler = build_sampler(
                &pending.sampling,
                self.model,
                self.n_ctx,
                &pending.tokens,
                pending.answer_prefix,
            );
            let speculator = self.settings.speculation.enabled.then(|| {
                let mut speculator =
                    Speculator::new(&self.settings.speculation, pending.draft_feed.clone())
                        .in_namespace(pending.namespace.clone());
                speculator.observe(&pending.tokens);
                speculator
            });
            let now = Instant::now();
            self.running.push(Sequence {
                id: pending.id,
                slot: admission.slot,
                order,
                priority: pending.priority,
                events: pending.events,
                output: OutputText::new(&pending.sampling.stop),
                sampling: pending.sampling,
                sampler,
                prompt_len: pending.tokens.len(),
                tokens: pending.tokens,
                n_past: admission.cached,
                cached_prompt: admission.cached,
                shared_cells: admission.cached,
                reserved_cells: admission.reserved_cells,
                cache_lock: admission.lock,
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
                confidence: pending
                    .measure_confidence
                    .then(crate::engine::Confidence::default),
                first_token_candidates: pending.first_token_candidates,
                first_token_logprobs: None,
                namespace: pending.namespace,
            });
        }
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
        // Fill `drafts` of decoding sequences before the batch is planned; `decode_inputs`
        // feeds them and `verify` accepts or rolls them back.
        self.propose_drafts();
        let inputs: Vec<Option<Vec<TokenId>>> = self
            .running
            .iter()
            .map(|s| (!s.prefilling()).then(|| s.decode_inputs(self.n_ctx)))
            .collect();
        let demands: Vec<Demand> = self
            .running
            .iter()
            .zip(&inputs)
            .map(|(seq, inputs)| Demand {
                priority: seq.priority,
                order: seq.order,
                prefill_left: seq.prompt_len.saturating_sub(seq.n_past),
                decode_inputs: inputs.as_ref().map_or(0, Vec::len),
            })
            .collect();
        let plan = scheduler::plan_step(
            &demands,
            self.settings.batch_tokens,
            self.settings.prefill_chunk,
        );
        if plan.is_empty() {
            return;
        }
        self.executor.clear_batch();
        for item in &plan {
            let seq = &self.running[item.index];
            if item.prefill {
                let completes = seq.n_past + item.inputs == seq.prompt_len;
                for offset in 0..item.inputs {
                    let pos = seq.n_past + offset;
                    let logits = completes && offset + 1 == item.inputs;
                    self.executor.add(seq.tokens[pos], pos, seq.slot, logits);
                }
            } else if let Some(inputs) = &inputs[item.index] {
                for (offset, &token) in inputs.iter().enumerate() {
                    self.executor
                        .add(token, seq.n_past + offset, seq.slot, true);
                }
            }
        }
        self.steps += 1;
        if let Err(error) = self.executor.decode() {
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
        if matches!(error, llama_cpp_2::DecodeError::NoKvCacheSlot)
            && self.kv.clear_cache(&mut self.executor)
        {
            // Room was made: the next step retries the same work.
            return;
        }
        let mut indices: Vec<usize> = plan.iter().map(|p| p.index).collect();
        indices.sort_unstable_by(|a, b| b.cmp(a));
        for index in indices {
            let seq = self.running.swap_remove(index);
            self.retire(
                seq,
                Exit::Failed(EngineError::Internal(format!("llama.cpp decode: {error}"))),
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
            let _ = probe.send(top_logits(self.executor.logits(row), 2));
            return Some((index, Exit::Cancelled));
        }
        // A warm-up (`max_tokens` 0) ends here: its prompt is cached, nothing is sampled.
        if self.running[index].sampling.max_tokens == 0 {
            return Some((index, Exit::Finished(FinishReason::Length)));
        }
        let token = self.sample(index, row);
        self.running[index]
            .accept(self.model, token, now, self.n_ctx)
            .map(|exit| (index, exit))
    }

    /// Verifies the fed drafts with `speculate::verify` (the model's own choice at each fed
    /// position; for a point-mass draft this is exactly the speculative acceptance rule),
    /// emits the verdict's tokens until the sequence ends, and removes the KV of the rest.
    /// A removal llama.cpp refuses fails the sequence: its cells no longer match its tokens.
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
            exit = self.running[index].accept(self.model, token, now, self.n_ctx);
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
            if let Err(error) = self
                .kv
                .truncate(&mut self.executor, slot, start + kept_inputs)
            {
                // The slot is never cached now; a sequence that would go on decoding over
                // the stale drafts fails instead.
                tracing::warn!(%error, "rejected drafts stay in the KV cache");
                if exit.is_none() {
                    exit = Some(Exit::Failed(EngineError::Internal(error.to_string())));
                }
            }
        }
        exit.map(|exit| (index, exit))
    }

    fn sample(&mut self, index: usize, row: i32) -> TokenId {
        if let Some(confidence) = self.running[index].confidence.as_mut() {
            let (top, entropy) = crate::engine::Confidence::of_logits(self.executor.logits(row));
            confidence.add(top, entropy);
        }
        let seq = &self.running[index];
        if seq.generated == 0 && seq.first_token_candidates > 0 {
            let vocab = self.model.vocab();
            let candidates = top_logprobs(self.executor.logits(row), seq.first_token_candidates)
                .into_iter()
                .map(|(id, logprob)| {
                    let piece = vocab.token_to_piece(LlamaToken(id.0), false, None);
                    (String::from_utf8_lossy(&piece).into_owned(), logprob)
                })
                .collect();
            self.running[index].first_token_logprobs =
                Some(crate::engine::FirstTokenLogprobs(candidates));
        }
        let sampler = self.running[index].sampler.as_mut();
        self.executor.sample(sampler, row)
    }

    /// Adds the just-prefilled prompt to the prefix cache (a sequence copy: shared cells).
    fn cache_prompt(&mut self, index: usize) {
        // Keep enough slots for the sequences that may still be admitted.
        let keep_free = self.settings.max_running - self.running.len();
        let seq = &self.running[index];
        let prompt = &seq.tokens[..seq.prompt_len];
        if self.kv.cache_prompt(
            &mut self.executor,
            &seq.namespace,
            seq.slot,
            prompt,
            keep_free,
        ) {
            self.running[index].shared_cells = self.running[index].prompt_len;
        }
    }

    fn retire(&mut self, mut seq: Sequence, exit: Exit) {
        let now = Instant::now();
        self.kv.unlock(seq.cache_lock.take());
        match exit {
            Exit::Finished(reason) => {
                if let Some(stats) = seq.finish(reason, &mut self.sessions, now) {
                    self.speculation.merge(&stats);
                }
                self.finished += 1;
                // The KV (prompt and output) becomes a cached prefix for later requests.
                self.kv.retain(
                    &mut self.executor,
                    &seq.namespace,
                    seq.slot,
                    &seq.tokens[..seq.n_past],
                );
            }
            Exit::Cancelled => {
                tracing::debug!(slot = seq.slot.0, "sequence cancelled");
                // A prompt cancelled mid-prefill keeps what was prefilled: a staircase
                // aggregator re-issues a longer prompt with the same start and resumes there.
                // Output of a cancelled request is not kept (nobody will read it).
                if seq.prefilling() && seq.n_past > seq.cached_prompt {
                    self.kv.retain(
                        &mut self.executor,
                        &seq.namespace,
                        seq.slot,
                        &seq.tokens[..seq.n_past],
                    );
                } else {
                    self.kv.release(&mut self.executor, seq.slot);
                }
            }
            Exit::Failed(error) => {
                let _ = seq.events.send(Err(error));
                self.kv.release(&mut self.executor, seq.slot);
            }
        }
    }

    fn publish(&mut self) {
        let cache = self.kv.stats();
        let own: usize = self
            .running
            .iter()
            .map(|s| s.n_past.saturating_sub(s.shared_cells))
            .sum();
        let positions = (0..self.settings.sequence_slots as i32)
            .map(|slot| self.executor.positions(crate::cache::SeqSlot(slot)))
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
