//! The OpenAI chat-completions wire format: the request as clients send it, checked into
//! what a run needs, and the response and stream-chunk objects. Only shapes live here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use crate::engine::{ChatMessage, DryOverrides, DrySampling, Role};
use crate::policy::StreamMode;

/// `POST /v1/chat/completions` as sent.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<InMessage>,
    #[serde(default)]
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
    /// DRY under llama-server's names (send them with `extra_body`); a pipeline's default
    /// is on, a model's off; `dry_multiplier: 0` turns it off.
    pub dry_multiplier: Option<f32>,
    pub dry_base: Option<f32>,
    pub dry_allowed_length: Option<u32>,
    pub dry_penalty_last_n: Option<i32>,
    /// Staircase's own field (send it with `extra_body`): `staircase` or `layered`.
    pub mode: Option<StreamMode>,
    /// Staircase's own field: the critical path this answer should fit in, for pipelines
    /// with declared variants (`tune::adaptive`).
    pub latency_budget_ms: Option<u64>,
    /// Everything else, checked against what is supported.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct InMessage {
    pub role: String,
    pub content: Option<Content>,
    /// Accepted and ignored: a participant's name changes nothing here.
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// Fields accepted and ignored: they change nothing a local run does.
const IGNORED: &[&str] = &[
    "user",
    "store",
    "metadata",
    "service_tier",
    "parallel_tool_calls",
];

/// A checked request.
#[derive(Debug)]
pub struct Chat {
    pub model: String,
    pub conversation: Vec<ChatMessage>,
    pub stream: bool,
    pub include_usage: bool,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Vec<String>>,
    /// The DRY fields the request set.
    pub dry: DryOverrides,
    pub mode: StreamMode,
    pub latency_budget_ms: Option<u64>,
}

/// The longest stop string, in bytes: stop strings are matched on every generated token.
pub const MAX_STOP_BYTES: usize = 256;

/// Refuses (400) a request over the server's per-request caps: more than `max_messages`
/// messages, more than `max_stop` stop strings or one longer than [`MAX_STOP_BYTES`].
pub fn check_caps(chat: &Chat, max_messages: usize, max_stop: usize) -> Result<(), ApiError> {
    if chat.conversation.len() > max_messages {
        return Err(ApiError::invalid(
            Some("messages"),
            format!(
                "At most {max_messages} messages per request (got {})",
                chat.conversation.len()
            ),
        ));
    }
    let stop = chat.stop.as_deref().unwrap_or_default();
    if stop.len() > max_stop {
        return Err(ApiError::invalid(
            Some("stop"),
            format!("At most {max_stop} stop strings (got {})", stop.len()),
        ));
    }
    if stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(
            Some("stop"),
            format!("A stop string may be at most {MAX_STOP_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// Parses a body; a malformed one is a 400 whose message (and `param`) names the field.
pub fn parse(body: &[u8]) -> Result<Chat, ApiError> {
    let mut json = serde_json::Deserializer::from_slice(body);
    let request: ChatRequest = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let inner = e.inner().to_string();
        let path = e.path().to_string();
        // A missing field is reported at its parent; the message names it.
        let param = inner
            .split('`')
            .nth(1)
            .filter(|_| inner.starts_with("missing field"))
            .map(|field| {
                if path == "." {
                    field.to_string()
                } else {
                    format!("{path}.{field}")
                }
            })
            .unwrap_or(path);
        ApiError::invalid(
            Some(&param),
            format!("Invalid request body at `{param}`: {inner}"),
        )
    })?;
    request.check()
}

impl ChatRequest {
    fn check(self) -> Result<Chat, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::unsupported("n", "Only n = 1 is supported"));
        }
        for (field, value) in &self.other {
            if value.is_null() || IGNORED.contains(&field.as_str()) {
                continue;
            }
            let harmless = match field.as_str() {
                "frequency_penalty" | "presence_penalty" => value.as_f64() == Some(0.0),
                "logprobs" => value.as_bool() == Some(false),
                "logit_bias" => value.as_object().is_some_and(|o| o.is_empty()),
                "response_format" => value.get("type").and_then(Value::as_str) == Some("text"),
                _ => false,
            };
            if !harmless {
                return Err(ApiError::unsupported(
                    field,
                    format!("`{field}` is not supported by this server"),
                ));
            }
        }
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                Some("messages"),
                "`messages` must hold at least one message",
            ));
        }
        let mut conversation = Vec::with_capacity(self.messages.len());
        for (i, message) in self.messages.into_iter().enumerate() {
            let role = match message.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    return Err(ApiError::unsupported(
                        &format!("messages[{i}].role"),
                        format!(
                            "Role `{other}` is not supported (system, developer, user, assistant)"
                        ),
                    ));
                }
            };
            let content = match message.content {
                None => String::new(),
                Some(Content::Text(text)) => text,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.into_iter().enumerate() {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(ApiError::unsupported(
                                    &format!("messages[{i}].content[{j}].type"),
                                    format!("Content part `{kind}` is not supported (text only)"),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            conversation.push(ChatMessage::new(role, content));
        }
        if let Some(t) = self.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(ApiError::invalid(
                Some("temperature"),
                "`temperature` must be between 0 and 2",
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(ApiError::invalid(
                Some("top_p"),
                "`top_p` must be in (0, 1]",
            ));
        }
        let dry = DryOverrides {
            dry_multiplier: self.dry_multiplier,
            dry_base: self.dry_base,
            dry_allowed_length: self.dry_allowed_length,
            dry_penalty_last_n: self.dry_penalty_last_n,
        };
        if let Err(message) = dry.over(DrySampling::RECOMMENDED).check() {
            let field = message.split(' ').next().unwrap_or("dry").to_string();
            return Err(ApiError::invalid(Some(&field), message));
        }
        let stream = self.stream.unwrap_or(false);
        Ok(Chat {
            model: self.model,
            conversation,
            stream,
            include_usage: stream && self.stream_options.is_some_and(|o| o.include_usage),
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            // OpenAI seeds are signed; the engine's are not: the bits are kept.
            seed: self.seed.map(|s| s as u64),
            stop: self.stop.map(|s| match s {
                Stop::One(s) => vec![s],
                Stop::Many(v) => v,
            }),
            dry,
            mode: self.mode.unwrap_or(StreamMode::Staircase),
            latency_budget_ms: self.latency_budget_ms,
        })
    }
}

/// `usage` of a response or of the last stream chunk.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptDetails,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PromptDetails {
    pub cached_tokens: u32,
}

impl Usage {
    pub fn new(prompt: u32, cached: u32, completion: u32) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: PromptDetails {
                cached_tokens: cached,
            },
        }
    }
}

/// A non-streaming answer.
#[derive(Serialize)]
pub struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub system_fingerprint: &'a str,
    pub choices: [Choice<'a>; 1],
    pub usage: Usage,
    /// The run report (`run --json`) or, for a plain model, its timings.
    pub staircase: Value,
}

#[derive(Serialize)]
pub struct Choice<'a> {
    pub index: u32,
    pub message: OutMessage<'a>,
    pub finish_reason: &'static str,
    pub logprobs: Option<()>,
}

#[derive(Serialize)]
pub struct OutMessage<'a> {
    pub role: &'static str,
    pub content: &'a str,
}

/// One `chat.completion.chunk`.
#[derive(Serialize)]
pub struct Chunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub system_fingerprint: &'a str,
    pub choices: Vec<ChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staircase: Option<Value>,
}

#[derive(Serialize)]
pub struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub finish_reason: Option<&'static str>,
    pub logprobs: Option<()>,
}

#[derive(Default, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(body: &str) -> ApiError {
        parse(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn a_missing_or_mistyped_field_is_named() {
        let e = error_of(r#"{"messages": []}"#);
        assert_eq!(e.param.as_deref(), Some("model"), "{}", e.message);
        let e = error_of(r#"{"model": "moa", "messages": [{"role": 3}]}"#);
        assert_eq!(
            e.param.as_deref(),
            Some("messages[0].role"),
            "{}",
            e.message
        );
        let e = error_of("{not json");
        assert_eq!(e.status, 400);
    }

    #[test]
    fn unsupported_parameters_are_refused_by_name() {
        let base = r#""model": "moa", "messages": [{"role": "user", "content": "hi"}]"#;
        for (extra, field) in [
            (r#""n": 2"#, "n"),
            (r#""tools": []"#, "tools"),
            (r#""presence_penalty": 1.0"#, "presence_penalty"),
        ] {
            let e = error_of(&format!("{{{base}, {extra}}}"));
            assert_eq!(e.param.as_deref(), Some(field), "{}", e.message);
        }
        let ok =
            parse(format!(r#"{{{base}, "user": "x", "presence_penalty": 0, "n": 1}}"#).as_bytes())
                .unwrap();
        assert_eq!(ok.conversation.len(), 1);
    }

    #[test]
    fn params_and_multi_turn_messages_are_kept() {
        let chat = parse(
            br#"{"model": "m", "stream": true, "stream_options": {"include_usage": true},
                "max_completion_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 7,
                "stop": "END", "messages": [
                  {"role": "system", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                  {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "again"}]}"#,
        )
        .unwrap();
        assert!(chat.stream && chat.include_usage);
        assert_eq!(chat.max_tokens, Some(5));
        assert_eq!(chat.seed, Some(7));
        assert_eq!(chat.stop, Some(vec!["END".to_string()]));
        assert_eq!(chat.conversation.len(), 4);
        assert_eq!(chat.conversation[2].role, Role::Assistant);
    }

    #[test]
    fn dry_fields_are_kept_and_bad_ones_named() {
        let base = r#""model": "m", "messages": [{"role": "user", "content": "hi"}]"#;
        let chat = parse(
            format!(r#"{{{base}, "dry_multiplier": 0, "dry_allowed_length": 3}}"#).as_bytes(),
        )
        .unwrap();
        assert_eq!(chat.dry.dry_multiplier, Some(0.0));
        assert_eq!(chat.dry.dry_allowed_length, Some(3));
        assert_eq!(chat.dry.dry_base, None);
        let e = error_of(&format!(r#"{{{base}, "dry_base": 0.5}}"#));
        assert_eq!(e.param.as_deref(), Some("dry_base"), "{}", e.message);
        let e = error_of(&format!(r#"{{{base}, "dry_multiplier": -1}}"#));
        assert_eq!(e.param.as_deref(), Some("dry_multiplier"), "{}", e.message);
    }
}
