//! The OpenAI-compatible wire format: request bodies for `/v1/chat/completions` and
//! `/v1/completions`, and the streamed chunks they answer with. Only the fields we use.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::config::Continuation;
use crate::engine::{ChatMessage, FinishReason, Role, SamplingParams, TokenId};

/// Which endpoint a request goes to and what it sends.
#[derive(Clone, Debug, PartialEq)]
pub struct WireRequest {
    /// `/v1/chat/completions` or `/v1/completions`.
    pub path: &'static str,
    pub body: Value,
    /// The continued assistant prefix, when the server sends it back before the new text
    /// (llama.cpp's server does): the client removes it.
    pub echoed_prefix: Option<String>,
}

/// What the prompt is, once the continuation mode is applied.
pub enum WirePrompt<'a> {
    Chat {
        messages: &'a [ChatMessage],
        assistant_prefix: Option<&'a str>,
        continuation: Continuation,
    },
    /// Rendered text (the `completions` continuation) or token ids, for `/v1/completions`.
    Text(String),
    Tokens(&'a [TokenId]),
}

fn role(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

/// The request body: streaming with usage, the sampling parameters OpenAI servers share, and
/// top-k and seed, which llama.cpp and vLLM accept beside them.
pub fn request(model: &str, prompt: WirePrompt<'_>, sampling: &SamplingParams) -> WireRequest {
    let mut body = json!({
        "model": model,
        "stream": true,
        "stream_options": { "include_usage": true },
        // A warm-up (0) becomes one token: servers differ on 0 and the caller discards it.
        "max_tokens": sampling.max_tokens.max(1),
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
    });
    if sampling.top_k > 0 {
        body["top_k"] = json!(sampling.top_k);
    }
    if !sampling.stop.is_empty() {
        body["stop"] = json!(sampling.stop);
    }
    let path = match prompt {
        WirePrompt::Chat {
            messages,
            assistant_prefix,
            continuation,
        } => {
            let mut list: Vec<Value> = messages
                .iter()
                .map(|m| json!({ "role": role(m.role), "content": m.content }))
                .collect();
            if let Some(prefix) = assistant_prefix {
                list.push(json!({ "role": "assistant", "content": prefix }));
                if continuation == Continuation::ContinueFinalMessage {
                    body["continue_final_message"] = json!(true);
                    body["add_generation_prompt"] = json!(false);
                }
            }
            body["messages"] = Value::Array(list);
            "/v1/chat/completions"
        }
        WirePrompt::Text(text) => {
            body["prompt"] = json!(text);
            "/v1/completions"
        }
        WirePrompt::Tokens(tokens) => {
            body["prompt"] = json!(tokens.iter().map(|t| t.0).collect::<Vec<_>>());
            "/v1/completions"
        }
    };
    WireRequest {
        path,
        body,
        echoed_prefix: None,
    }
}

/// One streamed chunk of either endpoint, or an error object some servers send in-stream.
#[derive(Debug, Default, Deserialize)]
pub struct Chunk {
    #[serde(default)]
    pub choices: Vec<Choice>,
    #[serde(default)]
    pub usage: Option<WireUsage>,
    /// llama.cpp's figures, in every chunk when asked with `timings_per_token`.
    #[serde(default)]
    pub timings: Option<WireTimings>,
    #[serde(default)]
    pub error: Option<Value>,
}

/// The part of llama.cpp's `timings` we read.
#[derive(Debug, Default, Deserialize)]
pub struct WireTimings {
    /// Tokens generated so far.
    #[serde(default)]
    pub predicted_n: Option<u32>,
}

impl Chunk {
    /// Tokens generated so far, when this chunk says: vLLM's per-chunk usage
    /// (`continuous_usage_stats`) or llama.cpp's per-chunk timings.
    pub fn generated_so_far(&self) -> Option<u32> {
        self.usage
            .as_ref()
            .map(|u| u.completion_tokens)
            .or_else(|| self.timings.as_ref().and_then(|t| t.predicted_n))
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct Choice {
    /// Chat completions put text here.
    #[serde(default)]
    pub delta: Option<Delta>,
    /// Completions put it here.
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Delta {
    #[serde(default)]
    pub content: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct WireUsage {
    #[serde(default)]
    pub prompt_tokens: u32,
    #[serde(default)]
    pub completion_tokens: u32,
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct PromptTokensDetails {
    #[serde(default)]
    pub cached_tokens: u32,
}

impl Choice {
    /// The text this chunk adds, if any.
    pub fn text(&self) -> Option<&str> {
        self.delta
            .as_ref()
            .and_then(|d| d.content.as_deref())
            .or(self.text.as_deref())
            .filter(|t| !t.is_empty())
    }
}

/// OpenAI's finish reasons as ours: everything but a length limit is a stop.
pub fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "length" => FinishReason::Length,
        _ => FinishReason::Stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_a_trailing_assistant_message_and_vllm_gets_its_flags() {
        let messages = [ChatMessage::new(Role::User, "hi")];
        let sampling = SamplingParams::default();
        let chat = |continuation| {
            request(
                "m",
                WirePrompt::Chat {
                    messages: &messages,
                    assistant_prefix: Some("Hel"),
                    continuation,
                },
                &sampling,
            )
        };
        let llama = chat(Continuation::TrailingAssistant);
        assert_eq!(llama.path, "/v1/chat/completions");
        assert_eq!(
            llama.body["messages"][1],
            json!({"role": "assistant", "content": "Hel"})
        );
        assert!(llama.body.get("continue_final_message").is_none());
        assert_eq!(llama.body["stream_options"]["include_usage"], json!(true));
        let vllm = chat(Continuation::ContinueFinalMessage);
        assert_eq!(vllm.body["continue_final_message"], json!(true));
        assert_eq!(vllm.body["add_generation_prompt"], json!(false));
        let tokens = request(
            "m",
            WirePrompt::Tokens(&[TokenId(5), TokenId(7)]),
            &sampling,
        );
        assert_eq!(tokens.path, "/v1/completions");
        assert_eq!(tokens.body["prompt"], json!([5, 7]));
    }

    #[test]
    fn chunks_of_both_endpoints_parse() {
        let chat: Chunk = serde_json::from_str(
            r#"{"choices":[{"delta":{"content":"Hi"},"finish_reason":null}]}"#,
        )
        .unwrap();
        assert_eq!(chat.choices[0].text(), Some("Hi"));
        let completion: Chunk =
            serde_json::from_str(r#"{"choices":[{"text":" there","finish_reason":"length"}]}"#)
                .unwrap();
        assert_eq!(completion.choices[0].text(), Some(" there"));
        let usage: Chunk = serde_json::from_str(
            r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":4}}}"#,
        )
        .unwrap();
        assert_eq!(usage.generated_so_far(), Some(2));
        let usage = usage.usage.unwrap();
        assert_eq!(usage.prompt_tokens_details.unwrap().cached_tokens, 4);
        let llama: Chunk = serde_json::from_str(
            r#"{"choices":[{"delta":{"content":"'m glad"}}],"timings":{"prompt_n":3,"predicted_n":4}}"#,
        )
        .unwrap();
        assert_eq!(llama.generated_so_far(), Some(4));
        assert_eq!(chat.generated_so_far(), None);
    }
}
