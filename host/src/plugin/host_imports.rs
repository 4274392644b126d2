//! The host imports of `staircase:agent@0.1.0` (`host` and `model`, and `host` again under
//! 0.2.0), implemented on the
//! store state. Nothing here reaches outside the sandbox except `model.complete`, which is
//! refused unless the plugin was granted the `model` capability. Every import checks the
//! size of its input before working on it, and work that can take long (tokenizing,
//! generating) stops at the caller's deadline: host code is not interrupted by the epoch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::bindings::{host, model, types};
use super::error::{LimitExceeded, clip};
use super::instance::StoreState;
use super::runtime::MESSAGE_OVERHEAD_BYTES;
use crate::engine::{
    ChatMessage, Engine, GenerationEvent, GenerationRequest, Prompt, Role, SamplingParams, Usage,
};
use crate::pipeline::plugin_log::PLUGIN_LOG_TARGET as LOG;
use crate::policy::UsageMeter;

/// Text `count-tokens` tokenizes between two looks at the deadline: about 5 ms of
/// tokenizing on the default model, small against a 100 ms call deadline.
const COUNT_PIECE_BYTES: usize = 4 << 10;

/// The token estimate used without an engine: one token per
/// [`crate::engine::APPROX_BYTES_PER_TOKEN`] bytes, rounded up.
pub fn approximate_tokens(text: &str) -> u32 {
    crate::engine::estimate_tokens(text).get()
}

impl types::Host for StoreState {}

impl StoreState {
    /// Writes one line of the plugin's log, within its log budget.
    fn plugin_log(&mut self, level: host::LogLevel, message: &str) {
        let message = clip(message, self.log.line_bytes());
        if !self.log.admit(message.len()) {
            return;
        }
        let plugin = &self.plugin;
        // The target routes the line to its run too (`pipeline::plugin_log`).
        match level {
            host::LogLevel::Trace => tracing::trace!(target: LOG, %plugin, "{message}"),
            host::LogLevel::Debug => tracing::debug!(target: LOG, %plugin, "{message}"),
            host::LogLevel::Info => tracing::info!(target: LOG, %plugin, "{message}"),
            host::LogLevel::Warn => tracing::warn!(target: LOG, %plugin, "{message}"),
            host::LogLevel::Error => tracing::error!(target: LOG, %plugin, "{message}"),
        }
    }

    /// Writes what the call printed as log lines: stdout's at info, stderr's at warn.
    pub(crate) fn log_guest_output(&mut self) {
        let (stdout, stderr) = (self.stdout.take_lines(), self.stderr.take_lines());
        for line in stdout {
            self.plugin_log(host::LogLevel::Info, &format!("stdout: {line}"));
        }
        for line in stderr {
            self.plugin_log(host::LogLevel::Warn, &format!("stderr: {line}"));
        }
    }
}

impl host::Host for StoreState {
    fn log(&mut self, level: host::LogLevel, message: String) -> wasmtime::Result<()> {
        self.plugin_log(level, &message);
        Ok(())
    }

    fn now_ns(&mut self) -> wasmtime::Result<u64> {
        Ok(u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    fn config(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.config.get(&key).cloned())
    }

    fn count_tokens(&mut self, text: String) -> wasmtime::Result<u32> {
        if text.len() > self.max_count_bytes {
            return Err(LimitExceeded {
                what: "count-tokens text bytes",
                limit: self.max_count_bytes as u64,
                asked: text.len() as u64,
            }
            .into());
        }
        let Some(engine) = &self.engine else {
            return Ok(approximate_tokens(&text));
        };
        let counter = engine.token_counter();
        let mut total = 0u32;
        for piece in pieces(&text, COUNT_PIECE_BYTES) {
            if Instant::now() >= self.deadline {
                // Reported like an epoch interruption: the call ran out of time.
                return Err(wasmtime::Trap::Interrupt.into());
            }
            total = total.saturating_add(counter.count(piece).get());
        }
        Ok(total)
    }
}

/// The same imports under a later package version (0.2.0's router, 0.3.0's guard): the
/// same functions, delegating to 0.1.0's.
macro_rules! host_imports_of_version {
    ($host:ident in $($module:ident)::+) => {
        impl $($module)::+::$host::Host for StoreState {
            fn log(
                &mut self,
                level: $($module)::+::$host::LogLevel,
                message: String,
            ) -> wasmtime::Result<()> {
                use $($module)::+::$host::LogLevel as Later;
                let level = match level {
                    Later::Trace => host::LogLevel::Trace,
                    Later::Debug => host::LogLevel::Debug,
                    Later::Info => host::LogLevel::Info,
                    Later::Warn => host::LogLevel::Warn,
                    Later::Error => host::LogLevel::Error,
                };
                host::Host::log(self, level, message)
            }

            fn now_ns(&mut self) -> wasmtime::Result<u64> {
                host::Host::now_ns(self)
            }

            fn config(&mut self, key: String) -> wasmtime::Result<Option<String>> {
                host::Host::config(self, key)
            }

            fn count_tokens(&mut self, text: String) -> wasmtime::Result<u32> {
                host::Host::count_tokens(self, text)
            }
        }
    };
}

host_imports_of_version!(host in super::bindings::router_v2::staircase::agent);
host_imports_of_version!(host in super::bindings::guard::staircase::agent);

/// `text` in pieces of at most about `size` bytes, each cut before a whitespace character
/// where there is one: BPE vocabularies attach a space to the word after it, so the counts
/// of the pieces add up to the count of the whole.
fn pieces(text: &str, size: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() <= size {
            return Some(std::mem::take(&mut rest));
        }
        let mut end = size;
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let cut = match rest[..end].rfind(char::is_whitespace) {
            Some(at) if at > 0 => at,
            _ if end > 0 => end,
            // A first character longer than `size` (never, for sizes above 4).
            _ => rest.char_indices().nth(1).map_or(rest.len(), |(i, _)| i),
        };
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

impl model::Host for StoreState {
    fn complete(
        &mut self,
        messages: Vec<types::ChatMessage>,
        params: types::GenerationParams,
    ) -> wasmtime::Result<Result<String, String>> {
        if !self.model_granted {
            return Ok(Err(format!(
                "plugin {} was not granted the `model` capability",
                self.plugin
            )));
        }
        // The prompt costs the host rendering and prefill: bounded like an answer.
        if messages.len() > self.max_messages {
            return Err(LimitExceeded {
                what: "model.complete messages",
                limit: self.max_messages as u64,
                asked: messages.len() as u64,
            }
            .into());
        }
        let bytes: usize = messages
            .iter()
            .map(|m| m.content.len() + MESSAGE_OVERHEAD_BYTES)
            .chain(params.stop.iter().map(|s| s.len() + MESSAGE_OVERHEAD_BYTES))
            .sum();
        if bytes > self.max_count_bytes {
            return Err(LimitExceeded {
                what: "model.complete prompt bytes",
                limit: self.max_count_bytes as u64,
                asked: bytes as u64,
            }
            .into());
        }
        let Some(engine) = self.engine.clone() else {
            return Ok(Err("the host has no model engine".into()));
        };
        let mut sampling = sampling_from_wit(params);
        // 0 asks "until the model stops": capped like any other ask.
        if sampling.max_tokens == 0 || sampling.max_tokens > self.max_model_tokens {
            sampling.max_tokens = self.max_model_tokens;
        }
        let request = GenerationRequest {
            prompt: Prompt::Chat {
                messages: messages.into_iter().map(chat_from_wit).collect(),
                assistant_prefix: None,
            },
            sampling,
            priority: self.model_priority,
            extensions: Default::default(),
            // The caller's namespace: a tenant's compression reuses and leaves only its own
            // cached prefixes (the shared one until a run bills the instance).
            namespace: self.model_account.namespace.clone(),
        };
        let tokens = metrics::counter!(
            "staircase_plugin_model_tokens_total",
            "plugin" => self.plugin.name.clone()
        );
        Ok(complete_before(
            engine,
            request,
            self.deadline,
            tokens,
            self.model_account.meter.clone(),
        ))
    }
}

/// Runs a request to completion, waiting at most until `deadline`. The stream is read on a
/// helper thread, so this works from inside or outside an async runtime; when the deadline
/// passes, the helper drops the stream (cancelling the request) at its next event. The
/// tokens go on `meter` (the caller's run, or its tenant): the engine's usage when the
/// answer finished, else the tokens generated before it stopped.
fn complete_before(
    engine: Arc<dyn Engine>,
    request: GenerationRequest,
    deadline: Instant,
    tokens: metrics::Counter,
    meter: UsageMeter,
) -> Result<String, String> {
    let mut stream = engine.submit(request).map_err(|e| e.to_string())?;
    let (tx, rx) = std::sync::mpsc::channel();
    let cancelled = Arc::new(AtomicBool::new(false));
    let stop = cancelled.clone();
    std::thread::Builder::new()
        .name("plugin-model-call".into())
        .spawn(move || {
            let mut text = String::new();
            let mut generated = 0u32;
            let outcome = loop {
                if stop.load(Ordering::Relaxed) {
                    break Err("cancelled".to_string());
                }
                match stream.blocking_next() {
                    Some(Ok(GenerationEvent::Delta {
                        text: delta,
                        token_count,
                        ..
                    })) => {
                        tokens.increment(u64::from(token_count));
                        generated = generated.saturating_add(token_count);
                        text.push_str(&delta);
                    }
                    Some(Ok(GenerationEvent::Finished { usage, .. })) => {
                        meter.record(&usage);
                        generated = 0;
                        break Ok(text);
                    }
                    None => break Err("the engine stopped before the answer finished".to_string()),
                    Some(Err(error)) => break Err(error.to_string()),
                }
            };
            if generated > 0 {
                meter.record(&Usage {
                    completion_tokens: generated,
                    ..Usage::default()
                });
            }
            let _ = tx.send(outcome);
        })
        .map_err(|e| format!("cannot start the model call: {e}"))?;
    let wait = deadline.saturating_duration_since(Instant::now());
    match rx.recv_timeout(wait) {
        Ok(outcome) => outcome,
        Err(_) => {
            cancelled.store(true, Ordering::Relaxed);
            Err("the model call did not finish before the plugin's call deadline".into())
        }
    }
}

pub(crate) fn chat_from_wit(message: types::ChatMessage) -> ChatMessage {
    ChatMessage {
        role: match message.role {
            types::Role::System => Role::System,
            types::Role::User => Role::User,
            types::Role::Assistant => Role::Assistant,
        },
        content: message.content,
    }
}

pub(crate) fn chat_to_wit(message: &ChatMessage) -> types::ChatMessage {
    types::ChatMessage {
        role: match message.role {
            Role::System => types::Role::System,
            Role::User => types::Role::User,
            Role::Assistant => types::Role::Assistant,
        },
        content: message.content.clone(),
    }
}

pub(crate) fn sampling_from_wit(params: types::GenerationParams) -> SamplingParams {
    SamplingParams {
        temperature: params.temperature,
        top_p: params.top_p,
        top_k: params.top_k,
        max_tokens: params.max_tokens,
        stop: params.stop,
        ..SamplingParams::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{
        Capabilities, EngineError, FinishReason, GenerationStream, ModelInfo, TokenCount,
        TokenCounter,
    };

    /// Answers every request with two tokens, then (when `finishes`) its usage.
    struct Canned {
        info: ModelInfo,
        finishes: bool,
    }

    impl TokenCounter for Canned {
        fn count(&self, text: &str) -> TokenCount {
            crate::engine::estimate_tokens(text)
        }
    }

    impl Engine for Canned {
        fn submit(&self, _request: GenerationRequest) -> Result<GenerationStream, EngineError> {
            let (events, stream) = GenerationStream::channel();
            let _ = events.send(Ok(GenerationEvent::Delta {
                text: "two words".into(),
                token_count: 2,
                token_ids: None,
            }));
            if self.finishes {
                let _ = events.send(Ok(GenerationEvent::Finished {
                    reason: FinishReason::Stop,
                    usage: Usage {
                        prompt_tokens: 7,
                        cached_prompt_tokens: 3,
                        completion_tokens: 2,
                    },
                    timings: Default::default(),
                    extensions: Default::default(),
                }));
            }
            Ok(stream)
        }

        fn model_info(&self) -> &ModelInfo {
            &self.info
        }

        fn token_counter(&self) -> &dyn TokenCounter {
            self
        }
    }

    fn call(finishes: bool) -> (Result<String, String>, Usage) {
        let engine = Arc::new(Canned {
            info: ModelInfo {
                name: "canned".into(),
                context_tokens: 64,
                capabilities: Capabilities::ALL,
            },
            finishes,
        });
        let meter = UsageMeter::new(None);
        let answer = complete_before(
            engine,
            GenerationRequest::chat(vec![ChatMessage::new(Role::User, "hi")]),
            Instant::now() + std::time::Duration::from_secs(60),
            metrics::counter!("test_plugin_model_tokens_total"),
            meter.clone(),
        );
        (answer, meter.close())
    }

    #[test]
    fn a_model_call_counts_its_tokens_on_the_callers_meter() {
        let (answer, usage) = call(true);
        assert_eq!(answer.as_deref(), Ok("two words"));
        assert_eq!(
            usage,
            Usage {
                prompt_tokens: 7,
                cached_prompt_tokens: 3,
                completion_tokens: 2,
            }
        );
        // An answer cut short still counts what it generated.
        let (answer, usage) = call(false);
        assert!(answer.is_err());
        assert_eq!(usage.completion_tokens, 2);
    }

    #[test]
    fn the_estimate_rounds_up_to_whole_tokens() {
        assert_eq!(approximate_tokens(""), 0);
        assert_eq!(approximate_tokens("abc"), 1);
        assert_eq!(approximate_tokens("abcd"), 1);
        assert_eq!(approximate_tokens("abcde"), 2);
    }

    #[test]
    fn pieces_cut_before_whitespace_and_cover_the_text() {
        let text = "one two three four five six";
        let parts: Vec<&str> = pieces(text, 8).collect();
        assert_eq!(parts.concat(), text);
        assert!(parts.iter().all(|p| p.len() <= 8), "{parts:?}");
        assert!(parts[1..].iter().all(|p| p.starts_with(' ')), "{parts:?}");
        let unbroken = "é".repeat(10);
        let parts: Vec<&str> = pieces(&unbroken, 5).collect();
        assert_eq!(parts.concat(), unbroken);
        assert_eq!(pieces("", 8).count(), 0);
    }

    #[test]
    fn wit_and_engine_messages_convert_both_ways() {
        let message = ChatMessage::new(Role::Assistant, "hi");
        assert_eq!(chat_from_wit(chat_to_wit(&message)), message);
        let params = sampling_from_wit(types::GenerationParams {
            max_tokens: 7,
            temperature: 0.5,
            top_p: 0.9,
            top_k: 40,
            stop: vec!["\n".into()],
        });
        assert_eq!(params.max_tokens, 7);
        assert_eq!(params.top_k, 40);
        assert_eq!(params.stop, vec!["\n".to_string()]);
        assert_eq!(params.seed, SamplingParams::default().seed);
    }
}
