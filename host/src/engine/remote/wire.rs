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
/// seed, top-k and min-p, which llama.cpp, vLLM and SGLang accept beside them (top-k and min-p
/// only when set, so a server that knows neither sees them only when a request asked).
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
    if sampling.min_p > 0.0 {
        body["min_p"] = json!(sampling.min_p);
    }
    // OpenAI's own fields: every server takes them.
    if sampling.frequency_penalty != 0.0 {
        body["frequency_penalty"] = json!(sampling.frequency_penalty);
    }
    if sampling.presence_penalty != 0.0 {
        body["presence_penalty"] = json!(sampling.presence_penalty);
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

/// Asks for the first answer token's `k` most likely candidates: chat completions take
/// `logprobs: true` and `top_logprobs` (at most 20 in OpenAI's API), completions a number.
pub fn ask_top_logprobs(wire: &mut WireRequest, k: usize) {
    let k = k.min(20);
    if wire.path == "/v1/chat/completions" {
        wire.body["logprobs"] = json!(true);
        wire.body["top_logprobs"] = json!(k);
    } else {
        wire.body["logprobs"] = json!(k);
    }
}

/// Asks for DRY under llama-server's names when it is on (off is every server's default, so
/// nothing is sent for it). A negative window ("the whole answer") is left out: it is
/// llama-server's default, and its request check refuses a negative value.
pub fn ask_dry(body: &mut Value, dry: &crate::engine::DrySampling) {
    if dry.is_on() {
        body["dry_multiplier"] = json!(dry.multiplier);
        body["dry_base"] = json!(dry.base);
        body["dry_allowed_length"] = json!(dry.allowed_length);
        if dry.penalty_last_n >= 0 {
            body["dry_penalty_last_n"] = json!(dry.penalty_last_n);
        }
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
    #[serde(default)]
    pub logprobs: Option<WireLogprobs>,
}

/// Log-probabilities of a chunk's tokens: chat completions' `content` list, or completions'
/// legacy `top_logprobs` (a token-to-log-probability map per token).
#[derive(Debug, Default, Deserialize)]
pub struct WireLogprobs {
    #[serde(default)]
    pub content: Option<Vec<TokenLogprob>>,
    #[serde(default)]
    pub top_logprobs: Option<Vec<std::collections::BTreeMap<String, f32>>>,
}

#[derive(Debug, Deserialize)]
pub struct TokenLogprob {
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
}

impl WireLogprobs {
    /// The chunk's first token's candidates, most likely first; `None` when it has none.
    pub fn first_candidates(&self) -> Option<Vec<(String, f32)>> {
        let mut candidates: Vec<(String, f32)> = match (&self.content, &self.top_logprobs) {
            (Some(content), _) => content
                .first()?
                .top_logprobs
                .iter()
                .map(|t| (t.token.clone(), t.logprob))
                .collect(),
            (None, Some(top)) => top
                .first()?
                .iter()
                .map(|(t, &lp)| (t.clone(), lp))
                .collect(),
            (None, None) => return None,
        };
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
        (!candidates.is_empty()).then_some(candidates)
    }
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
    fn the_body_carries_top_k_min_p_and_openais_penalties_when_set() {
        let sampling = SamplingParams {
            top_k: 1,
            min_p: 0.05,
            temperature: 1.5,
            frequency_penalty: 0.5,
            presence_penalty: -0.5,
            ..SamplingParams::default()
        };
        let wire = request("m", WirePrompt::Text("Once".into()), &sampling);
        assert_eq!(wire.path, "/v1/completions");
        assert_eq!(wire.body["prompt"], "Once");
        assert_eq!(wire.body["top_k"], 1);
        assert!((wire.body["min_p"].as_f64().unwrap() - 0.05).abs() < 1e-6);
        assert_eq!(wire.body["frequency_penalty"], 0.5);
        assert_eq!(wire.body["presence_penalty"], -0.5);
        let plain = request(
            "m",
            WirePrompt::Text("Once".into()),
            &SamplingParams::default(),
        );
        for field in ["top_k", "min_p", "frequency_penalty", "presence_penalty"] {
            assert!(plain.body.get(field).is_none(), "{field}");
        }
    }

    #[test]
    fn first_token_candidates_are_read_from_both_endpoints() {
        let chat: Chunk = serde_json::from_str(
            r#"{"choices":[{"delta":{"content":"A"},"logprobs":{"content":[{"token":"A",
            "logprob":-0.1,"top_logprobs":[{"token":"B","logprob":-2.5},{"token":"A",
            "logprob":-0.1}]}]}}]}"#,
        )
        .unwrap();
        let candidates = chat.choices[0]
            .logprobs
            .as_ref()
            .unwrap()
            .first_candidates();
        assert_eq!(
            candidates,
            Some(vec![("A".to_string(), -0.1), ("B".to_string(), -2.5)])
        );
        let legacy: Chunk = serde_json::from_str(
            r#"{"choices":[{"text":" B","logprobs":{"top_logprobs":[{" B":-0.3," A":-1.5}]}}]}"#,
        )
        .unwrap();
        let candidates = legacy.choices[0]
            .logprobs
            .as_ref()
            .unwrap()
            .first_candidates();
        assert_eq!(
            candidates,
            Some(vec![(" B".to_string(), -0.3), (" A".to_string(), -1.5)])
        );
        let plain: Chunk = serde_json::from_str(r#"{"choices":[{"text":"x"}]}"#).unwrap();
        assert!(plain.choices[0].logprobs.is_none());

        let messages = [ChatMessage::new(Role::User, "hi")];
        let mut wire = request(
            "m",
            WirePrompt::Chat {
                messages: &messages,
                assistant_prefix: None,
                continuation: Continuation::TrailingAssistant,
            },
            &SamplingParams::default(),
        );
        ask_top_logprobs(&mut wire, 50);
        assert_eq!(wire.body["logprobs"], true);
        assert_eq!(wire.body["top_logprobs"], 20);
        let mut wire = request(
            "m",
            WirePrompt::Text("hi".into()),
            &SamplingParams::default(),
        );
        ask_top_logprobs(&mut wire, 5);
        assert_eq!(wire.body["logprobs"], 5);
    }

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
