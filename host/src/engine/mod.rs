//! The engine interface: one way to ask a model for tokens, whether the model runs in this
//! process (`local/`) or behind an OpenAI-compatible server (`remote/`, later).
//!
//! A caller submits a [`GenerationRequest`] and reads a [`GenerationStream`] of events.
//! Dropping the stream cancels the request; the engine frees its sequence at its next step.
//! This module holds only the contract; it must not know about pipelines or plugins.

pub mod local;
pub mod simulated;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// A token id in a model's vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TokenId(pub i32);

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
    /// How many of the latest tokens the penalty looks at.
    pub repeat_last_n: u32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            max_tokens: 256,
            stop: Vec::new(),
            repeat_penalty: 1.0,
            repeat_last_n: 64,
        }
    }
}

/// Scheduling priority: when more sequences want a step than fit, higher goes first.
/// Pipelines give critical-path nodes a higher priority.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Priority(pub i32);

/// One generation request.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub priority: Priority,
    /// Other agents' output streamed to this request while it runs (an aggregator's
    /// proposers), so the engine can draft speculative tokens from it. `None` for most
    /// requests.
    pub draft_feed: Option<crate::speculate::DraftFeed>,
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
            draft_feed: None,
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
    /// What speculative decoding did for this request; `None` when it was off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculation: Option<crate::speculate::SpeculationStats>,
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

/// What a [`GenerationStream`] yields.
#[derive(Clone, Debug, PartialEq)]
pub enum GenerationEvent {
    /// Newly generated text and the tokens that produced it. Text is only sent once it is
    /// valid UTF-8 and cannot be the start of a stop string.
    Delta { text: String, tokens: Vec<TokenId> },
    /// The last event of a request.
    Finished {
        reason: FinishReason,
        usage: Usage,
        timings: Timings,
    },
}

/// Errors of any engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file {path} not found")]
    ModelNotFound { path: std::path::PathBuf },
    #[error("cannot load model {path}: {reason}")]
    InvalidModel {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("chat template: {0}")]
    Template(String),
    #[error("prompt of {tokens} tokens does not fit the context of {context} tokens")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the engine has stopped")]
    Stopped,
    #[error("backend error: {0}")]
    Backend(String),
}

/// The events of one request. Dropping it cancels the request.
#[derive(Debug)]
pub struct GenerationStream {
    events: mpsc::UnboundedReceiver<Result<GenerationEvent, EngineError>>,
}

impl GenerationStream {
    /// A stream and the sender an engine feeds it through. An engine sees the caller is gone
    /// when `sender.is_closed()`.
    pub fn channel() -> (
        mpsc::UnboundedSender<Result<GenerationEvent, EngineError>>,
        Self,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Self { events: rx })
    }

    /// The next event; `None` after `Finished` or an error.
    pub async fn next(&mut self) -> Option<Result<GenerationEvent, EngineError>> {
        self.events.recv().await
    }

    /// The next event, for callers outside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Result<GenerationEvent, EngineError>> {
        self.events.blocking_recv()
    }

    /// Reads the stream to its end, for callers outside an async runtime that want the
    /// whole answer rather than its deltas.
    pub fn blocking_collect(mut self) -> Result<Completion, EngineError> {
        let (mut text, mut tokens) = (String::new(), Vec::new());
        while let Some(event) = self.blocking_next() {
            match event? {
                GenerationEvent::Delta {
                    text: delta,
                    tokens: ids,
                } => {
                    text.push_str(&delta);
                    tokens.extend(ids);
                }
                GenerationEvent::Finished {
                    reason,
                    usage,
                    timings,
                } => {
                    return Ok(Completion {
                        text,
                        tokens,
                        reason,
                        usage,
                        timings,
                    });
                }
            }
        }
        Err(EngineError::Stopped)
    }
}

/// A whole answer, from [`GenerationStream::blocking_collect`].
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<TokenId>,
    pub reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
}

/// What the model is.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    /// The name requests and pipelines use for it.
    pub name: String,
    /// Maximum tokens of prompt plus output.
    pub context_tokens: usize,
}

/// A model that generates tokens: the embedded engine or a remote server.
pub trait Engine: Send + Sync {
    /// Queues a request. Errors that are known before any work (a prompt too long for the
    /// context, a bad template) are returned here; later ones arrive on the stream.
    fn submit(&self, request: GenerationRequest) -> Result<GenerationStream, EngineError>;

    /// The model behind this engine.
    fn model_info(&self) -> &ModelInfo;

    /// Token count of a text, for budgets and chunk sizes.
    fn count_tokens(&self, text: &str) -> Result<usize, EngineError>;
}
