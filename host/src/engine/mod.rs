//! The engine interface: one way to ask a model for tokens, whether the model runs in this
//! process (`local/`) or behind an OpenAI-compatible server (`remote/`, later).
//!
//! A caller submits a [`GenerationRequest`] and reads a [`GenerationStream`] of events;
//! dropping the stream before its end cancels the request (the backend registered how, see
//! [`GenerationStream::on_cancel`]). Submission is synchronous and works from any thread, in
//! an async runtime or not: an engine that needs a runtime holds the handle it was built
//! with. What a model can do beyond plain chat is declared in [`ModelInfo::capabilities`],
//! token counts come from [`Engine::token_counter`], and what only one backend understands
//! travels in `extensions` (the local engine's `speculate::DraftFeed` on a request, its
//! `speculate::SpeculationStats` on `Finished`), so other backends carry none of it.
//!
//! This module holds only the contract; it must not know about pipelines, plugins or any
//! one backend (it names no type of `local/` or `speculate/`).

mod capped;
mod error;
pub mod local;
pub mod remote;
pub mod simulated;
mod stream;
mod tokens;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use self::capped::capped;
pub use self::error::EngineError;
pub use self::stream::{Completion, EventSender, GenerationStream};
pub use self::tokens::{
    APPROX_BYTES_PER_TOKEN, CountFuture, EstimatedTokens, TokenCount, TokenCounter, estimate_tokens,
};
pub use crate::cache::CacheNamespace;
pub use crate::token::TokenId;

/// Who wrote a chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// What the model continues from.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Rendered with the model's chat template. `assistant_prefix`, when set, is a partial
    /// answer the model continues instead of starting a new one.
    Chat {
        messages: Vec<ChatMessage>,
        assistant_prefix: Option<String>,
    },
    /// Tokens fed to the model as they are.
    Tokens(Vec<TokenId>),
    /// Text continued as it is, without the chat template (the legacy `/v1/completions`):
    /// tokenized by the model's tokenizer, with its BOS token where the model wants one.
    Text(String),
}

/// How tokens are chosen. A temperature of 0 means greedy decoding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Nucleus sampling mass; 1.0 disables it.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables it.
    pub top_k: u32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 disables it.
    pub min_p: f32,
    pub seed: u64,
    /// 0 asks for a warm-up: the prompt is prefilled into the prefix cache and nothing is
    /// generated, so a later request that extends it prefills only what it adds.
    pub max_tokens: u32,
    /// Generation stops before any of these strings; they are not part of the output.
    pub stop: Vec<String>,
    /// Repetition penalty (llama.cpp's: logits of tokens among the last `repeat_last_n` of
    /// prompt and output are divided by it when positive, multiplied when negative); 1.0
    /// disables it. Keeps a small model's greedy continuation out of loops.
    pub repeat_penalty: f32,
    /// OpenAI's penalties, as llama.cpp applies them over the same window: a token's logit
    /// loses `frequency_penalty` per time it occurs there, and `presence_penalty` once if it
    /// does; 0 disables each.
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// How many of the latest tokens the penalties look at.
    pub repeat_last_n: u32,
    /// DRY, the penalty on repeating a span of the answer verbatim; off by default here
    /// (plain greedy decoding), on by default for pipeline nodes.
    pub dry: DrySampling,
}

/// The widest penalty window (`repeat_last_n`) a request may ask for: past the context of any
/// model served here, and bounded because llama.cpp keeps a buffer of that many tokens per
/// sequence (an unbounded window would let one request allocate gigabytes).
pub const MAX_REPEAT_LAST_N: u32 = 1 << 16;

/// DRY ("don't repeat yourself", llama.cpp's `dry` sampler): a token that would extend a span
/// of the answer already said earlier, longer than `allowed_length` tokens, has its logit
/// lowered by `multiplier * base^(length - allowed_length)`. Unlike the repetition penalty it
/// catches a repeated sentence or paragraph however far back it was said (within
/// `penalty_last_n` tokens), and it leaves single repeated words alone. Spans do not run
/// across the sequence breakers (newline, `:`, `"`, `*`, as llama.cpp's defaults).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DrySampling {
    /// Strength; 0 turns DRY off.
    pub multiplier: f32,
    /// How fast the penalty grows with the repeated span's length (> 1).
    pub base: f32,
    /// Repeated spans up to this many tokens go unpenalised (names, common phrases).
    pub allowed_length: u32,
    /// How many of the latest answer tokens are searched for repeats; -1 means all of them
    /// (the context), 0 turns DRY off.
    pub penalty_last_n: i32,
}

impl DrySampling {
    /// Off (llama.cpp's and llama-server's default).
    pub const OFF: Self = Self {
        multiplier: 0.0,
        ..Self::RECOMMENDED
    };
    /// The DRY author's recommended setting, llama.cpp's suggested values: strong enough to
    /// stop a 135M model repeating a paragraph, weak on spans of two or three tokens.
    pub const RECOMMENDED: Self = Self {
        multiplier: 0.8,
        base: 1.75,
        allowed_length: 2,
        penalty_last_n: -1,
    };

    /// Whether the sampler changes anything.
    pub fn is_on(&self) -> bool {
        self.multiplier > 0.0 && self.penalty_last_n != 0
    }

    /// Why these values cannot be used, naming the field as the OpenAI extra fields do.
    pub fn check(&self) -> Result<(), String> {
        if !(self.multiplier >= 0.0 && self.multiplier.is_finite()) {
            return Err(format!(
                "dry_multiplier must be a finite number >= 0 (0 turns DRY off), got {}",
                self.multiplier
            ));
        }
        if !(self.base >= 1.0 && self.base.is_finite()) {
            return Err(format!(
                "dry_base must be a finite number >= 1, got {}",
                self.base
            ));
        }
        if self.penalty_last_n < -1 {
            return Err(format!(
                "dry_penalty_last_n must be -1 (all), 0 (off) or a count, got {}",
                self.penalty_last_n
            ));
        }
        Ok(())
    }
}

impl Default for DrySampling {
    fn default() -> Self {
        Self::OFF
    }
}

/// DRY fields a pipeline node or a request sets over a [`DrySampling`] (llama-server's
/// names: `dry_multiplier`, `dry_base`, `dry_allowed_length`, `dry_penalty_last_n`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DryOverrides {
    pub dry_multiplier: Option<f32>,
    pub dry_base: Option<f32>,
    pub dry_allowed_length: Option<u32>,
    pub dry_penalty_last_n: Option<i32>,
}

impl DryOverrides {
    /// `base` with every field set here replaced.
    pub fn over(&self, base: DrySampling) -> DrySampling {
        DrySampling {
            multiplier: self.dry_multiplier.unwrap_or(base.multiplier),
            base: self.dry_base.unwrap_or(base.base),
            allowed_length: self.dry_allowed_length.unwrap_or(base.allowed_length),
            penalty_last_n: self.dry_penalty_last_n.unwrap_or(base.penalty_last_n),
        }
    }

    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// These fields over `other`'s: each one set here wins.
    pub fn or(self, other: Self) -> Self {
        Self {
            dry_multiplier: self.dry_multiplier.or(other.dry_multiplier),
            dry_base: self.dry_base.or(other.dry_base),
            dry_allowed_length: self.dry_allowed_length.or(other.dry_allowed_length),
            dry_penalty_last_n: self.dry_penalty_last_n.or(other.dry_penalty_last_n),
        }
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: 0,
            max_tokens: 256,
            stop: Vec::new(),
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repeat_last_n: 64,
            dry: DrySampling::OFF,
        }
    }
}

/// Scheduling priority: when more sequences want a step than fit, higher goes first.
/// Pipelines give critical-path nodes a higher priority. [`Priority::BACKGROUND`] is a class
/// of its own: work nobody waits for (a conversation's compression for a later turn).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Priority(pub i32);

impl Priority {
    /// The background class: the local engine steps such a request only while no other
    /// (foreground) request is queued or running, pausing it (its KV kept, never cancelled)
    /// as soon as one arrives, so it adds nothing to a foreground request's time to first
    /// token. A remote engine cannot pause a server's sequence; it sends the request as any
    /// other (an OpenAI-compatible API has no priority to pass on).
    pub const BACKGROUND: Self = Self(i32::MIN);

    pub fn is_background(self) -> bool {
        self == Self::BACKGROUND
    }
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub priority: Priority,
    /// Hints only some engines use, by type; an engine ignores the ones it does not know.
    /// The local engine drafts speculative tokens from a `speculate::DraftFeed` here (an
    /// aggregator's proposers, streamed to it while it runs).
    pub extensions: http::Extensions,
    /// Whose cached prefixes and past sessions this request may reuse (and add to): the
    /// server sets its tenant's, so `cached_prompt_tokens` and speculation never reflect
    /// another tenant's text. A remote engine sends nothing for it (the remote server's own
    /// cache is outside our control).
    pub namespace: CacheNamespace,
}

impl GenerationRequest {
    /// A greedy chat request with default limits.
    pub fn chat(messages: Vec<ChatMessage>) -> Self {
        Self {
            prompt: Prompt::Chat {
                messages,
                assistant_prefix: None,
            },
            sampling: SamplingParams::default(),
            priority: Priority::default(),
            extensions: http::Extensions::new(),
            namespace: CacheNamespace::default(),
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End of sequence or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// Token counts of a finished request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    /// Prompt tokens served from the prefix cache instead of being prefilled.
    pub cached_prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// When things happened, measured from submission.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Waiting before the engine first worked on the request.
    pub queued: Duration,
    /// Until the whole prompt was in the KV cache.
    pub prefill_done: Duration,
    /// Until the first generated token was sent.
    pub first_token: Option<Duration>,
    pub finished: Duration,
}

impl Timings {
    /// In milliseconds, as `generate --json` and the server's `timings_ms` show them.
    pub fn millis_json(&self) -> serde_json::Value {
        use crate::millis::millis;
        serde_json::json!({
            "queued": millis(self.queued),
            "prefill_done": millis(self.prefill_done),
            "first_token": self.first_token.map(millis),
            "finished": millis(self.finished),
        })
    }
}

/// What a [`GenerationStream`] yields.
#[derive(Clone, Debug)]
pub enum GenerationEvent {
    /// Newly generated text and how many tokens produced it. Text is only sent once it is
    /// valid UTF-8 and cannot be the start of a stop string. Callers count tokens with
    /// `token_count`: a backend that streams text (an OpenAI-compatible server) has no ids.
    Delta {
        text: String,
        token_count: u32,
        /// The ids of those tokens, where the backend reports them (the local engine does).
        token_ids: Option<Vec<TokenId>>,
    },
    /// The last event of a request.
    Finished {
        reason: FinishReason,
        usage: Usage,
        timings: Timings,
        /// What only some engines report, by type (the local engine: the request's
        /// `speculate::SpeculationStats` when speculation was on).
        extensions: http::Extensions,
    },
}

/// Asks an engine to measure how sure the model is of the tokens it generates (put it in
/// [`GenerationRequest::extensions`]). Optional: an engine that cannot (a remote server that
/// sends no log-probabilities) ignores it and its `Finished` carries no [`Confidence`].
#[derive(Clone, Copy, Debug, Default)]
pub struct MeasureConfidence;

/// How sure the model was of a request's generated tokens, on `Finished`'s `extensions` of a
/// request that asked with [`MeasureConfidence`]. Measured on the model's next-token
/// distribution before sampling (so a repetition penalty does not change it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Confidence {
    /// Tokens measured.
    pub tokens: u32,
    /// Mean probability of the most likely next token (1.0: certain).
    pub mean_top_prob: f32,
    /// Mean entropy of the next-token distribution, in nats (0.0: certain).
    pub mean_entropy: f32,
}

impl Confidence {
    /// The top-token probability and entropy of one distribution given as logits, in one
    /// pass over the vocabulary (softmax with the maximum subtracted, so nothing overflows).
    pub fn of_logits(logits: &[f32]) -> (f32, f32) {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return (0.0, 0.0);
        }
        let (mut sum, mut weighted) = (0.0f32, 0.0f32);
        for &logit in logits {
            let shifted = logit - max;
            // Below e^-30 a token adds nothing a f32 sum keeps; skipping its `exp` makes the
            // pass cheap next to a decode step (most of a vocabulary is far below the top).
            if shifted > -30.0 {
                let e = shifted.exp();
                sum += e;
                weighted += shifted * e;
            }
        }
        // p_max = 1 / sum; H = ln(sum) - sum(shifted * e) / sum.
        (1.0 / sum, sum.ln() - weighted / sum)
    }

    /// Adds one token's measurement to the running means.
    pub fn add(&mut self, top_prob: f32, entropy: f32) {
        let n = self.tokens as f32;
        self.mean_top_prob = (self.mean_top_prob * n + top_prob) / (n + 1.0);
        self.mean_entropy = (self.mean_entropy * n + entropy) / (n + 1.0);
        self.tokens += 1;
    }
}

/// Asks an engine for the `k` most likely first tokens of the answer with their
/// log-probabilities (OpenAI's `top_logprobs`, on the first generated token only): a judge
/// reads its verdict as probabilities instead of one sampled letter. Optional like
/// [`MeasureConfidence`]: an engine that can answers with [`FirstTokenLogprobs`] on `Finished`.
#[derive(Clone, Copy, Debug)]
pub struct TopFirstTokens(pub usize);

/// The answer's most likely first tokens, most likely first: text and natural-log
/// probability under the model's distribution (before sampling settings apply).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FirstTokenLogprobs(pub Vec<(String, f32)>);

/// Something a request may need that not every backend offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    /// Continue a partial assistant answer (`Prompt::Chat::assistant_prefix`): every step of
    /// a staircase node after its first.
    AssistantPrefix,
    /// Take a prompt of raw token ids (`Prompt::Tokens`).
    TokenPrompts,
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::AssistantPrefix => "continue a partial assistant answer",
            Self::TokenPrompts => "take a prompt of token ids",
        })
    }
}

/// What a model offers beyond plain chat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    pub assistant_prefix: bool,
    pub token_prompts: bool,
}

impl Capabilities {
    /// Everything: the local engine.
    pub const ALL: Self = Self {
        assistant_prefix: true,
        token_prompts: true,
    };

    pub fn has(self, capability: Capability) -> bool {
        match capability {
            Capability::AssistantPrefix => self.assistant_prefix,
            Capability::TokenPrompts => self.token_prompts,
        }
    }
}

/// What the model is.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    /// The name requests and pipelines use for it.
    pub name: String,
    /// Maximum tokens of prompt plus output.
    pub context_tokens: usize,
    pub capabilities: Capabilities,
}

impl ModelInfo {
    /// An error naming the model unless it offers `capability`.
    pub fn require(&self, capability: Capability) -> Result<(), EngineError> {
        if self.capabilities.has(capability) {
            Ok(())
        } else {
            Err(EngineError::Unsupported {
                model: self.name.clone(),
                capability,
            })
        }
    }

    /// Checks that the model can take `prompt` (engines call this at submission).
    pub fn check_prompt(&self, prompt: &Prompt) -> Result<(), EngineError> {
        match prompt {
            Prompt::Chat {
                assistant_prefix: Some(_),
                ..
            } => self.require(Capability::AssistantPrefix),
            Prompt::Chat { .. } | Prompt::Text(_) => Ok(()),
            Prompt::Tokens(_) => self.require(Capability::TokenPrompts),
        }
    }
}

/// How busy an engine is now, as the backend itself counts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EngineLoad {
    /// Requests generating now (the local engine: sequences it steps; a remote one: requests
    /// in flight to its replicas).
    pub running: usize,
    /// Requests waiting for a place.
    pub queued: usize,
    /// Requests it serves at once at full speed: 1 for one CPU's kernels, where every
    /// sequence of a batch takes a share of the same cores; a remote engine's replicas.
    pub parallel: usize,
}

impl EngineLoad {
    /// How much longer than alone a new request's tokens take under this load: each
    /// request ahead takes a share of the engine's parallel places.
    pub fn stretch(&self) -> f64 {
        1.0 + (self.running + self.queued) as f64 / self.parallel.max(1) as f64
    }
}

/// A model that generates tokens: the embedded engine or a remote server.
pub trait Engine: Send + Sync {
    /// Queues a request; callable from any thread, inside an async runtime or not. Errors
    /// known before any work (a prompt too long for the context, a bad template, a missing
    /// capability) are returned here; later ones arrive on the stream.
    fn submit(&self, request: GenerationRequest) -> Result<GenerationStream, EngineError>;

    /// The model behind this engine.
    fn model_info(&self) -> &ModelInfo;

    /// Counts tokens as this model does, for budgets and chunk sizes.
    fn token_counter(&self) -> &dyn TokenCounter;

    /// How busy it is now; `None` where the backend cannot tell.
    fn load(&self) -> Option<EngineLoad> {
        None
    }

    /// Forgets what earlier requests left behind to speed up later ones (cached prefixes,
    /// past sessions' text as speculation drafts), so requests submitted after this call
    /// run as on a fresh engine. Measurements use it: one variant's run must not warm
    /// another's. Requests in flight keep what they hold. A backend with no such memory,
    /// or no way to reach it, does nothing.
    fn forget_history(&self) {}
}
