//! Bare-kernel timings: llama.cpp decode calls on a context of their own, with no scheduler,
//! prefix cache, speculation or stream in between. It is the "bare llama.cpp loop" the
//! engine is measured against (same model, threads and context settings, through
//! [`context_params`]), and it measures the forward-cost curves that speculation and the
//! prefix cache trade against. The benchmarks (`crate::bench`) are its only users; it must
//! not serve requests.

use std::path::Path;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::sampling::argmax;
use super::{backend, context_params, load_model};
use crate::engine::EngineError;
use crate::token::TokenId;

fn failed(what: &str) -> impl Fn(&dyn std::fmt::Display) -> EngineError + '_ {
    move |error| EngineError::Internal(format!("probe {what}: {error}"))
}

/// A GGUF model loaded for probing (weights only, no engine thread).
pub struct ProbeModel {
    model: LlamaModel,
}

impl ProbeModel {
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        Ok(Self {
            model: load_model(path)?,
        })
    }

    /// The context the model was trained with.
    pub fn train_context(&self) -> u32 {
        self.model.n_ctx_train()
    }

    pub fn vocab_size(&self) -> usize {
        self.model.n_vocab().max(0) as usize
    }

    /// A fresh context of `n_ctx` cells for `sequences` sequences, decoding at most
    /// `batch_tokens` inputs per call, with the engine's context settings.
    pub fn probe(
        &self,
        n_ctx: u32,
        batch_tokens: usize,
        sequences: usize,
        threads: usize,
        flash_attention: bool,
    ) -> Result<KernelProbe<'_>, EngineError> {
        let params = context_params(n_ctx, batch_tokens, sequences, threads, flash_attention);
        let ctx = self
            .model
            .new_context(backend()?, params)
            .map_err(|e| failed("context")(&e))?;
        Ok(KernelProbe {
            model: &self.model,
            ctx,
            batch: LlamaBatch::new(batch_tokens, 1),
            batch_tokens,
        })
    }
}

/// Where a fed batch asks for next-token logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    /// At the last input only (a prefill).
    Last,
    /// At every input (speculative verification).
    All,
}

/// One bare context. See the module documentation.
pub struct KernelProbe<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    batch_tokens: usize,
}

impl KernelProbe<'_> {
    /// Feeds `tokens` to sequence `seq` at positions `start..`, in decode calls of at most
    /// the batch size, and returns the time it took.
    pub fn feed(
        &mut self,
        seq: i32,
        tokens: &[TokenId],
        start: usize,
        logits: Logits,
    ) -> Result<Duration, EngineError> {
        let started = Instant::now();
        for (chunk_index, chunk) in tokens.chunks(self.batch_tokens).enumerate() {
            self.batch.clear();
            for (i, token) in chunk.iter().enumerate() {
                let offset = chunk_index * self.batch_tokens + i;
                let wants = match logits {
                    Logits::None => false,
                    Logits::Last => offset + 1 == tokens.len(),
                    Logits::All => true,
                };
                self.batch
                    .add(LlamaToken(token.0), (start + offset) as i32, &[seq], wants)
                    .map_err(|e| failed("batch")(&e))?;
            }
            self.ctx
                .decode(&mut self.batch)
                .map_err(|e| failed("decode")(&e))?;
        }
        Ok(started.elapsed())
    }

    /// One decode call over `tokens` of sequence `seq` at positions `start..`, with logits
    /// at every position (what verifying a draft costs), timed until its logits are read.
    pub fn forward(
        &mut self,
        seq: i32,
        tokens: &[TokenId],
        start: usize,
    ) -> Result<Duration, EngineError> {
        let started = Instant::now();
        self.feed(seq, tokens, start, Logits::All)?;
        let _ = self.ctx.get_logits_ith(self.batch.n_tokens() - 1);
        Ok(started.elapsed())
    }

    /// The greedy next token at the last input of the last call.
    pub fn greedy_next(&self) -> TokenId {
        argmax(self.ctx.get_logits_ith(self.batch.n_tokens() - 1))
    }

    /// Greedy decoding of sequence 0 as a bare loop does it: `first` at position `start`,
    /// then `steps` single-token decode calls, each token turned into text as a stream
    /// would. Returns the time of the loop.
    pub fn greedy_decode(
        &mut self,
        first: TokenId,
        start: usize,
        steps: usize,
    ) -> Result<Duration, EngineError> {
        let vocab = self.model.vocab();
        let started = Instant::now();
        let mut token = first;
        for step in 0..steps {
            let _piece = vocab.token_to_piece(LlamaToken(token.0), false, None);
            self.feed(0, &[token], start + step, Logits::Last)?;
            token = self.greedy_next();
        }
        Ok(started.elapsed())
    }

    /// Removes positions `from..` of sequence `seq`.
    pub fn remove(&mut self, seq: i32, from: usize) -> Result<(), EngineError> {
        match self
            .ctx
            .clear_kv_cache_seq(Some(seq as u32), Some(from as u32), None)
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(failed("remove")(&"llama.cpp refused a partial removal")),
            Err(error) => Err(failed("remove")(&error)),
        }
    }
}
