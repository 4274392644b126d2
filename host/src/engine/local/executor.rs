//! The model runner of the local engine: owns the llama.cpp context and its batch, and only
//! executes: add inputs, decode, read logits, sample, and the KV operations the KV-cache
//! manager decides ([`KvOps`]). It must not decide what runs or what is cached.

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use super::kv::{KvError, KvOps};
use super::sampling::argmax;
use crate::cache::SeqSlot;
use crate::token::TokenId;

pub(super) struct Executor<'m> {
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
}

impl<'m> Executor<'m> {
    pub fn new(ctx: LlamaContext<'m>, batch_tokens: usize) -> Self {
        Self {
            ctx,
            batch: LlamaBatch::new(batch_tokens, 1),
        }
    }

    /// Context size in tokens (KV cells shared by all sequences).
    pub fn n_ctx(&self) -> usize {
        self.ctx.n_ctx() as usize
    }

    /// Starts a new batch.
    pub fn clear_batch(&mut self) {
        self.batch.clear();
    }

    /// Adds one input of `slot` at `pos`; `logits` asks for its next-token logits.
    pub fn add(&mut self, token: TokenId, pos: usize, slot: SeqSlot, logits: bool) {
        // The engine loop plans at most `batch_tokens` inputs, the batch's capacity, so this
        // cannot fail.
        let _ = self
            .batch
            .add(LlamaToken(token.0), pos as i32, &[slot.0], logits);
    }

    /// Runs the batch through the model.
    pub fn decode(&mut self) -> Result<(), llama_cpp_2::DecodeError> {
        self.ctx.decode(&mut self.batch)
    }

    /// Next-token logits of batch row `row` (one that asked for them).
    pub fn logits(&self, row: i32) -> &[f32] {
        self.ctx.get_logits_ith(row)
    }

    /// The token at batch row `row`: sampled with `sampler`, or greedy without one.
    pub fn sample(&self, sampler: Option<&mut LlamaSampler>, row: i32) -> TokenId {
        match sampler {
            Some(sampler) => TokenId(sampler.sample(&self.ctx, row).0),
            None => argmax(self.logits(row)),
        }
    }

    /// Positions llama.cpp holds for `slot` (cells shared with a copy count for both).
    pub fn positions(&self, slot: SeqSlot) -> usize {
        let max = self.ctx.kv_cache_seq_pos_max(slot.0);
        if max < 0 {
            0
        } else {
            (max - self.ctx.kv_cache_seq_pos_min(slot.0) + 1) as usize
        }
    }
}

impl KvOps for Executor<'_> {
    fn copy_prefix(&mut self, from: SeqSlot, to: SeqSlot, len: usize) -> Result<(), KvError> {
        self.ctx
            .copy_kv_cache_seq(from.0, to.0, Some(0), Some(len as u32))
            .map_err(|error| KvError(format!("copying {len} positions: {error}")))
    }

    fn truncate(&mut self, slot: SeqSlot, from: usize) -> Result<(), KvError> {
        match self
            .ctx
            .clear_kv_cache_seq(Some(slot.0 as u32), Some(from as u32), None)
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(KvError(format!(
                "llama.cpp refused to remove positions {from}.. of sequence {}",
                slot.0
            ))),
            Err(error) => Err(KvError(format!("removing positions {from}..: {error}"))),
        }
    }

    fn clear(&mut self, slot: SeqSlot) {
        // Removing a whole sequence always succeeds in llama.cpp.
        let _ = self.ctx.clear_kv_cache_seq(Some(slot.0 as u32), None, None);
    }
}
