//! A latency model of a backend that serves concurrent requests in parallel, as a GPU server
//! does for a handful of them. A request's first forward pass takes `decode_per_token` plus
//! `prefill_per_token` for each prompt token no earlier request had as a prefix, and yields
//! the first token; every further token takes `decode_per_token`, however many other
//! requests run. Its words are filler, not language, and a token is a word.
//!
//! It exists for `staircase bench staircase --simulated`: the pipeline runtime's own
//! behaviour (does a run take as long as its critical path? what does staircase streaming
//! save when nodes do not share one CPU?) measured apart from the CPU the local engine shares
//! between all nodes. It is never a default and never stands in for a model.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

use super::{
    Capabilities, Engine, EngineError, FinishReason, GenerationEvent, GenerationRequest,
    GenerationStream, ModelInfo, Prompt, Timings, TokenCount, TokenCounter, TokenId, Usage,
};

/// Words the simulated model says, in a loop.
const WORDS: &[&str] = &[
    "light",
    "from",
    "the",
    "sun",
    "is",
    "scattered",
    "by",
    "molecules",
    "of",
    "air",
    "and",
    "shorter",
    "waves",
    "scatter",
    "more",
    "so",
    "we",
    "see",
    "blue",
    "overhead",
];

/// Prompts remembered for the prefix-cache model.
const REMEMBERED_PROMPTS: usize = 256;

/// Per-token costs of the simulated backend.
#[derive(Clone, Copy, Debug)]
pub struct SimulatedLatencies {
    pub prefill_per_token: Duration,
    pub decode_per_token: Duration,
}

/// See the module documentation.
pub struct SimulatedEngine {
    info: ModelInfo,
    latencies: SimulatedLatencies,
    /// Where each request's timed answer runs, so submission works from any thread.
    runtime: Handle,
    /// Earlier prompts, newest last: the longest common prefix with one of them is cached.
    seen: Mutex<Vec<Vec<String>>>,
}

impl SimulatedEngine {
    /// A simulated backend whose answers run as tasks on `runtime`.
    pub fn new(latencies: SimulatedLatencies, runtime: Handle) -> Self {
        Self {
            info: ModelInfo {
                name: "simulated".into(),
                context_tokens: 1 << 20,
                capabilities: Capabilities::ALL,
            },
            latencies,
            runtime,
            seen: Mutex::new(Vec::new()),
        }
    }

    /// The prompt's words and how many of them an earlier prompt already had.
    fn admit(&self, prompt: &Prompt) -> (Vec<String>, usize) {
        let words: Vec<String> = match prompt {
            Prompt::Chat {
                messages,
                assistant_prefix,
            } => messages
                .iter()
                .flat_map(|m| std::iter::once(format!("<{:?}>", m.role)).chain(words(&m.content)))
                .chain(assistant_prefix.iter().flat_map(|p| words(p)))
                .collect(),
            Prompt::Tokens(tokens) => tokens.iter().map(|t| t.0.to_string()).collect(),
            Prompt::Text(text) => words(text).collect(),
        };
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let cached = seen
            .iter()
            .map(|old| old.iter().zip(&words).take_while(|(a, b)| a == b).count())
            .max()
            .unwrap_or(0)
            // As in a real engine, the last prompt token is always computed.
            .min(words.len().saturating_sub(1));
        if seen.len() == REMEMBERED_PROMPTS {
            seen.remove(0);
        }
        seen.push(words.clone());
        (words, cached)
    }
}

fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split_whitespace().map(str::to_string)
}

impl Engine for SimulatedEngine {
    fn submit(&self, request: GenerationRequest) -> Result<GenerationStream, EngineError> {
        let submitted = Instant::now();
        self.info.check_prompt(&request.prompt)?;
        let (words, cached) = self.admit(&request.prompt);
        let prefilled = u32::try_from(words.len() - cached).unwrap_or(u32::MAX);
        let usage = Usage {
            prompt_tokens: u32::try_from(words.len()).unwrap_or(u32::MAX),
            cached_prompt_tokens: u32::try_from(cached).unwrap_or(u32::MAX),
            ..Usage::default()
        };
        let latencies = self.latencies;
        let max_tokens = request.sampling.max_tokens;
        let (events, stream) = GenerationStream::channel();
        let task = self.runtime.spawn(async move {
            let first_pass = latencies.decode_per_token + latencies.prefill_per_token * prefilled;
            tokio::time::sleep(first_pass).await;
            let mut timings = Timings {
                prefill_done: submitted.elapsed(),
                ..Timings::default()
            };
            let mut usage = usage;
            for i in 0..max_tokens {
                if i > 0 {
                    tokio::time::sleep(latencies.decode_per_token).await;
                }
                let word = WORDS[i as usize % WORDS.len()];
                let delta = GenerationEvent::Delta {
                    text: format!(" {word}"),
                    token_count: 1,
                    token_ids: Some(vec![TokenId(i as i32)]),
                };
                timings
                    .first_token
                    .get_or_insert_with(|| submitted.elapsed());
                usage.completion_tokens += 1;
                if events.send(Ok(delta)).is_err() {
                    return;
                }
            }
            timings.finished = submitted.elapsed();
            let _ = events.send(Ok(GenerationEvent::Finished {
                reason: FinishReason::Length,
                usage,
                timings,
                extensions: http::Extensions::new(),
            }));
        });
        Ok(stream.on_cancel(move || task.abort()))
    }

    fn model_info(&self) -> &ModelInfo {
        &self.info
    }

    fn token_counter(&self) -> &dyn TokenCounter {
        self
    }
}

/// A token is a word.
impl TokenCounter for SimulatedEngine {
    fn count(&self, text: &str) -> TokenCount {
        TokenCount::Exact(u32::try_from(text.split_whitespace().count()).unwrap_or(u32::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ChatMessage, Role};

    fn request(user: &str, max_tokens: u32) -> GenerationRequest {
        let mut request = GenerationRequest::chat(vec![
            ChatMessage::new(Role::System, "a stable instruction"),
            ChatMessage::new(Role::User, user),
        ]);
        request.sampling.max_tokens = max_tokens;
        request
    }

    async fn finish(mut stream: GenerationStream) -> (String, Usage) {
        let mut text = String::new();
        while let Some(event) = stream.next().await {
            match event.unwrap() {
                GenerationEvent::Delta { text: delta, .. } => text.push_str(&delta),
                GenerationEvent::Finished { usage, .. } => return (text, usage),
            }
        }
        panic!("no Finished event");
    }

    #[tokio::test]
    async fn a_warm_up_caches_the_head_and_a_step_generates_max_tokens() {
        let engine = SimulatedEngine::new(
            SimulatedLatencies {
                prefill_per_token: Duration::ZERO,
                decode_per_token: Duration::ZERO,
            },
            Handle::current(),
        );
        let (text, warm) = finish(engine.submit(request("why blue", 0)).unwrap()).await;
        assert_eq!(
            (text.as_str(), warm.prompt_tokens, warm.cached_prompt_tokens),
            ("", 7, 0)
        );
        let (text, step) = finish(engine.submit(request("why blue ### a", 5)).unwrap()).await;
        assert_eq!(step.cached_prompt_tokens, 7);
        assert_eq!(step.completion_tokens, 5);
        assert_eq!(text.split_whitespace().count(), 5);
    }

    #[test]
    fn submission_works_outside_the_runtime() {
        // Its worker runs the tasks; this thread never enters the runtime.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        assert!(Handle::try_current().is_err());
        let engine = SimulatedEngine::new(
            SimulatedLatencies {
                prefill_per_token: Duration::ZERO,
                decode_per_token: Duration::ZERO,
            },
            handle,
        );
        let answer = engine.submit(request("hi", 3)).unwrap().blocking_collect();
        assert_eq!(answer.unwrap().token_count, 3);
    }
}
