//! The host imports of `staircase:agent@0.1.0` (`host` and `model`), implemented on the
//! store state. Nothing here reaches outside the sandbox except `model.complete`, which is
//! refused unless the plugin was granted the `model` capability.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::bindings::{host, model, types};
use super::instance::StoreState;
use crate::engine::{
    ChatMessage, Engine, GenerationEvent, GenerationRequest, Prompt, Role, SamplingParams,
};

/// Log messages are cut to this length: a plugin must not flood the host's log.
const MAX_LOG_BYTES: usize = 4096;
/// The token estimate used without an engine: one token per
/// [`crate::engine::APPROX_BYTES_PER_TOKEN`] bytes, rounded up.
pub fn approximate_tokens(text: &str) -> u32 {
    crate::engine::estimate_tokens(text).get()
}

impl types::Host for StoreState {}

impl host::Host for StoreState {
    fn log(&mut self, level: host::LogLevel, message: String) {
        let mut end = message.len().min(MAX_LOG_BYTES);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let message = &message[..end];
        let plugin = &self.plugin;
        match level {
            host::LogLevel::Trace => tracing::trace!(%plugin, "{message}"),
            host::LogLevel::Debug => tracing::debug!(%plugin, "{message}"),
            host::LogLevel::Info => tracing::info!(%plugin, "{message}"),
            host::LogLevel::Warn => tracing::warn!(%plugin, "{message}"),
            host::LogLevel::Error => tracing::error!(%plugin, "{message}"),
        }
    }

    fn now_ns(&mut self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }

    fn count_tokens(&mut self, text: String) -> u32 {
        match &self.engine {
            Some(engine) => engine.token_counter().count(&text).get(),
            None => approximate_tokens(&text),
        }
    }
}

impl model::Host for StoreState {
    fn complete(
        &mut self,
        messages: Vec<types::ChatMessage>,
        params: types::GenerationParams,
    ) -> Result<String, String> {
        if !self.model_granted {
            return Err(format!(
                "plugin {} was not granted the `model` capability",
                self.plugin
            ));
        }
        let Some(engine) = self.engine.clone() else {
            return Err("the host has no model engine".into());
        };
        let request = GenerationRequest {
            prompt: Prompt::Chat {
                messages: messages.into_iter().map(chat_from_wit).collect(),
                assistant_prefix: None,
            },
            sampling: sampling_from_wit(params),
            priority: Default::default(),
            extensions: Default::default(),
        };
        complete_before(engine, request, self.deadline)
    }
}

/// Runs a request to completion, waiting at most until `deadline`. The stream is read on a
/// helper thread, so this works from inside or outside an async runtime; when the deadline
/// passes, the helper drops the stream (cancelling the request) at its next event.
fn complete_before(
    engine: Arc<dyn Engine>,
    request: GenerationRequest,
    deadline: Instant,
) -> Result<String, String> {
    let mut stream = engine.submit(request).map_err(|e| e.to_string())?;
    let (tx, rx) = std::sync::mpsc::channel();
    let cancelled = Arc::new(AtomicBool::new(false));
    let stop = cancelled.clone();
    std::thread::Builder::new()
        .name("plugin-model-call".into())
        .spawn(move || {
            let mut text = String::new();
            let outcome = loop {
                if stop.load(Ordering::Relaxed) {
                    break Err("cancelled".to_string());
                }
                match stream.blocking_next() {
                    Some(Ok(GenerationEvent::Delta { text: delta, .. })) => text.push_str(&delta),
                    Some(Ok(GenerationEvent::Finished { .. })) => break Ok(text),
                    None => break Err("the engine stopped before the answer finished".to_string()),
                    Some(Err(error)) => break Err(error.to_string()),
                }
            };
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

    #[test]
    fn the_estimate_rounds_up_to_whole_tokens() {
        assert_eq!(approximate_tokens(""), 0);
        assert_eq!(approximate_tokens("abc"), 1);
        assert_eq!(approximate_tokens("abcd"), 1);
        assert_eq!(approximate_tokens("abcde"), 2);
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
