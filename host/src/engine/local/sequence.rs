//! One running request of the local engine: its tokens and positions, sampler, speculator,
//! and its side of the stream (text deltas as tokens arrive, the final event).
//! It must not touch the KV cache or decide what runs.

use std::time::Instant;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use super::output::OutputText;
use crate::cache::{NodeRef, SeqSlot};
use crate::engine::{
    Confidence, EngineError, EventSender, FinishReason, GenerationEvent, Priority, SamplingParams,
    Timings, Usage,
};
use crate::speculate::{Draft, SessionStore, SpeculationStats, Speculator};
use crate::token::TokenId;

/// How a sequence left.
pub(super) enum Exit {
    Finished(FinishReason),
    Cancelled,
    Failed(EngineError),
}

pub(super) struct Sequence {
    pub id: u64,
    pub slot: SeqSlot,
    pub order: u64,
    pub priority: Priority,
    pub events: EventSender,
    pub sampling: SamplingParams,
    /// `None` for greedy decoding.
    pub sampler: Option<LlamaSampler>,
    /// Prompt then generated tokens; the last generated one is not in KV yet.
    pub tokens: Vec<TokenId>,
    pub prompt_len: usize,
    /// Tokens whose KV is in the slot (positions `0..n_past`).
    pub n_past: usize,
    pub cached_prompt: usize,
    /// Cells this sequence shares with cached prefixes (not its own).
    pub shared_cells: usize,
    /// Cells reserved for this sequence when admitted (prompt + output, minus shared).
    pub reserved_cells: usize,
    pub cache_lock: Option<NodeRef>,
    /// Draft tokens to verify at the next step (filled by a speculation proposer).
    pub drafts: Vec<TokenId>,
    /// Drafts this sequence from its own text, its pipeline feed and past sessions;
    /// `None` when speculation is off.
    pub speculator: Option<Speculator>,
    /// The draft behind `drafts`, for recording its outcome.
    pub draft: Option<Draft>,
    pub output: OutputText,
    /// Text after a stop string is never sent.
    pub stop_string_seen: bool,
    pub generated: u32,
    pub submitted: Instant,
    pub started: Instant,
    pub prefill_done: Option<Instant>,
    pub first_token: Option<Instant>,
    /// Reports the top logits after the prompt instead of generating (diagnostics).
    pub probe: Option<std::sync::mpsc::Sender<Vec<(TokenId, f32)>>>,
    /// How sure the model was of each sampled token, when the request asked.
    pub confidence: Option<Confidence>,
    /// First-token candidates to report (0: none), and the report once measured.
    pub first_token_candidates: usize,
    pub first_token_logprobs: Option<crate::engine::FirstTokenLogprobs>,
    /// Whose cached prefixes this sequence reads and joins.
    pub namespace: crate::cache::CacheNamespace,
}

impl Sequence {
    pub fn prefilling(&self) -> bool {
        self.n_past < self.prompt_len
    }

    /// What a decoding sequence feeds this step: its last token, then drafts to verify.
    pub fn decode_inputs(&self, n_ctx: usize) -> Vec<TokenId> {
        let mut inputs = Vec::with_capacity(1 + self.drafts.len());
        inputs.push(self.tokens[self.n_past]);
        // Every input needs a position inside the context.
        let room = n_ctx.saturating_sub(self.n_past + 1);
        inputs.extend(self.drafts.iter().take(room));
        inputs
    }

    fn timings(&self, now: Instant) -> Timings {
        Timings {
            queued: self.started - self.submitted,
            prefill_done: self.prefill_done.unwrap_or(now) - self.submitted,
            first_token: self.first_token.map(|t| t - self.submitted),
            finished: now - self.submitted,
        }
    }

    /// Records a sampled token, streams its text, and says whether the sequence is done.
    pub fn accept(
        &mut self,
        model: &LlamaModel,
        token: TokenId,
        now: Instant,
        n_ctx: usize,
    ) -> Option<Exit> {
        let vocab = model.vocab();
        self.generated += 1;
        self.first_token.get_or_insert(now);
        if vocab.is_eog(LlamaToken(token.0)) {
            return Some(Exit::Finished(FinishReason::Stop));
        }
        self.tokens.push(token);
        let bytes = vocab.token_to_piece(LlamaToken(token.0), false, None);
        let emitted = self.output.push(token, &bytes);
        if (!emitted.text.is_empty() || emitted.stopped)
            && !self.send_delta(emitted.text, emitted.tokens)
        {
            return Some(Exit::Cancelled);
        }
        if emitted.stopped {
            self.stop_string_seen = true;
            return Some(Exit::Finished(FinishReason::Stop));
        }
        if self.generated >= self.sampling.max_tokens || self.tokens.len() >= n_ctx {
            return Some(Exit::Finished(FinishReason::Length));
        }
        None
    }

    /// Sends a delta; false when nobody reads the stream any more.
    fn send_delta(&self, text: String, ids: Vec<TokenId>) -> bool {
        let delta = GenerationEvent::Delta {
            text,
            token_count: u32::try_from(ids.len()).unwrap_or(u32::MAX),
            token_ids: Some(ids),
        };
        self.events.send(Ok(delta)).is_ok()
    }

    /// Sends the held-back text and the `Finished` event; returns the request's
    /// speculation stats for the engine totals.
    pub fn finish(
        &mut self,
        reason: FinishReason,
        sessions: &mut SessionStore,
        now: Instant,
    ) -> Option<SpeculationStats> {
        if !self.stop_string_seen {
            let rest = self.output.finish();
            if !rest.text.is_empty() {
                self.send_delta(rest.text, rest.tokens);
            }
        }
        let speculation = self.speculator.take().map(|s| s.finish(Some(sessions)));
        let mut extensions = http::Extensions::new();
        if let Some(stats) = &speculation {
            extensions.insert(stats.clone());
        }
        if let Some(confidence) = self.confidence {
            extensions.insert(confidence);
        }
        if let Some(candidates) = self.first_token_logprobs.take() {
            extensions.insert(candidates);
        }
        let usage = Usage {
            prompt_tokens: self.prompt_len as u32,
            cached_prompt_tokens: self.cached_prompt as u32,
            completion_tokens: self.generated,
        };
        let _ = self.events.send(Ok(GenerationEvent::Finished {
            reason,
            usage,
            timings: self.timings(now),
            extensions,
        }));
        speculation
    }
}
