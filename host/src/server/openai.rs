//! The OpenAI wire format of chat completions and legacy text completions: the request as
//! clients send it, checked into what a run needs, and the response and stream-chunk
//! objects. Both endpoints share one request shape and one check, so a sampling field means
//! the same on either. Only shapes live here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use crate::engine::{ChatMessage, DryOverrides, DrySampling, MAX_REPEAT_LAST_N, Role};
use crate::pipeline::spec::ParamOverrides;
use crate::policy::StreamMode;

/// Which endpoint a body was sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`: `messages`, answered through the chat template.
    Chat,
    /// `POST /v1/completions`: a `prompt` continued as raw text (plain models only).
    Text,
}

/// `POST /v1/chat/completions` or `POST /v1/completions` as sent: one shape, so the fields
/// both take are read and checked once; [`Endpoint`] says which of `messages` and `prompt`
/// must be there.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Option<Vec<InMessage>>,
    /// The text completions' prompt: a string, or an array of one string.
    pub prompt: Option<TextPrompt>,
    /// Text completions: repeat the prompt before the answer (only `false` is served).
    pub echo: Option<bool>,
    #[serde(default)]
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM's and llama-server's extra sampling fields: -1 or 0 turns top-k off.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    /// vLLM's name; llama-server's `repeat_penalty` is taken as the same field.
    pub repetition_penalty: Option<f32>,
    pub repeat_penalty: Option<f32>,
    /// The penalties' window (llama-server's name; -1: the largest).
    pub repeat_last_n: Option<i64>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
    /// Text completions: candidates generated server-side (only 1 is served).
    pub best_of: Option<u32>,
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
pub enum TextPrompt {
    One(String),
    Many(Vec<String>),
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

/// What a checked request asks the model to continue.
#[derive(Debug)]
pub enum Input {
    /// A conversation, rendered with the chat template (or a pipeline's prompt).
    Conversation(Vec<ChatMessage>),
    /// Raw text, continued as it is (`/v1/completions`).
    Text(String),
}

impl Input {
    /// How many messages it holds (raw text is one).
    pub fn messages(&self) -> usize {
        match self {
            Input::Conversation(messages) => messages.len(),
            Input::Text(_) => 1,
        }
    }

    /// All of its text, for a token count.
    pub fn text(&self) -> String {
        match self {
            Input::Conversation(messages) => messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            Input::Text(text) => text.clone(),
        }
    }
}

/// A checked request of either endpoint.
#[derive(Debug)]
pub struct Chat {
    pub endpoint: Endpoint,
    pub model: String,
    pub input: Input,
    pub stream: bool,
    pub include_usage: bool,
    /// The sampling fields the request set (`max_tokens` among them), over the model's
    /// defaults or the answering pipeline node's parameters.
    pub params: ParamOverrides,
    pub mode: StreamMode,
    pub latency_budget_ms: Option<u64>,
}

/// The longest stop string, in bytes: stop strings are matched on every generated token.
pub const MAX_STOP_BYTES: usize = 256;

/// Refuses (400) a request over the server's per-request caps: more than `max_messages`
/// messages, more than `max_stop` stop strings or one longer than [`MAX_STOP_BYTES`].
pub fn check_caps(chat: &Chat, max_messages: usize, max_stop: usize) -> Result<(), ApiError> {
    if chat.input.messages() > max_messages {
        return Err(ApiError::invalid(
            Some("messages"),
            format!(
                "At most {max_messages} messages per request (got {})",
                chat.input.messages()
            ),
        ));
    }
    let stop = chat.params.stop.as_deref().unwrap_or_default();
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

/// Parses a body sent to `endpoint`; a malformed one is a 400 whose message (and `param`)
/// names the field.
pub fn parse(body: &[u8], endpoint: Endpoint) -> Result<Chat, ApiError> {
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
    request.check(endpoint)
}

/// The largest `top_k` taken: past any vocabulary, and small enough for every engine.
const MAX_TOP_K: i64 = i32::MAX as i64;

impl ChatRequest {
    fn check(self, endpoint: Endpoint) -> Result<Chat, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::unsupported("n", "Only n = 1 is supported"));
        }
        if let Some(n) = self.best_of
            && n != 1
        {
            return Err(ApiError::unsupported(
                "best_of",
                "Only best_of = 1 is supported",
            ));
        }
        let text_only = [
            ("echo", self.echo.is_some()),
            ("best_of", self.best_of.is_some()),
        ];
        if endpoint == Endpoint::Chat
            && let Some((field, _)) = text_only.iter().find(|(_, set)| *set)
        {
            return Err(ApiError::unsupported(
                field,
                format!("`{field}` is not supported by this server"),
            ));
        }
        if self.echo == Some(true) {
            return Err(ApiError::unsupported(
                "echo",
                "`echo` is not supported: the answer holds the new text only",
            ));
        }
        for (field, value) in &self.other {
            if value.is_null() || IGNORED.contains(&field.as_str()) {
                continue;
            }
            let harmless = match field.as_str() {
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
        let params = self.params()?;
        let input = match (endpoint, self.messages, self.prompt) {
            (Endpoint::Chat, Some(messages), None) => Input::Conversation(conversation(messages)?),
            (Endpoint::Text, None, Some(TextPrompt::One(text))) => Input::Text(text),
            (Endpoint::Text, None, Some(TextPrompt::Many(texts))) if texts.len() == 1 => {
                Input::Text(texts.into_iter().collect())
            }
            (Endpoint::Text, None, Some(TextPrompt::Many(_))) => {
                return Err(ApiError::unsupported(
                    "prompt",
                    "Only one prompt per request is supported (a string or an array of one)",
                ));
            }
            (Endpoint::Chat, _, Some(_)) => {
                return Err(ApiError::unsupported(
                    "prompt",
                    "`prompt` belongs to /v1/completions; chat completions take `messages`",
                ));
            }
            (Endpoint::Text, Some(_), _) => {
                return Err(ApiError::unsupported(
                    "messages",
                    "`messages` belongs to /v1/chat/completions; completions take `prompt`",
                ));
            }
            (Endpoint::Chat, None, None) => {
                return Err(ApiError::invalid(
                    Some("messages"),
                    "`messages` is required",
                ));
            }
            (Endpoint::Text, None, None) => {
                return Err(ApiError::invalid(Some("prompt"), "`prompt` is required"));
            }
        };
        let stream = self.stream.unwrap_or(false);
        Ok(Chat {
            endpoint,
            model: self.model,
            input,
            stream,
            include_usage: stream && self.stream_options.is_some_and(|o| o.include_usage),
            params,
            mode: self.mode.unwrap_or(StreamMode::Staircase),
            latency_budget_ms: self.latency_budget_ms,
        })
    }

    /// The sampling fields, range-checked: a value no sampler can use is a 400 naming it.
    fn params(&self) -> Result<ParamOverrides, ApiError> {
        let bad = |field: &str, message: &str| Err(ApiError::invalid(Some(field), message));
        if let Some(t) = self.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return bad("temperature", "`temperature` must be between 0 and 2");
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return bad("top_p", "`top_p` must be in (0, 1]");
        }
        let top_k = match self.top_k {
            None => None,
            // vLLM's "off" is -1, llama-server's 0.
            Some(-1 | 0) => Some(0),
            Some(k) if (1..=MAX_TOP_K).contains(&k) => u32::try_from(k).ok(),
            Some(_) => {
                return bad(
                    "top_k",
                    "`top_k` must be a positive count of tokens (-1 or 0 turns it off)",
                );
            }
        };
        if let Some(p) = self.min_p
            && !(0.0..=1.0).contains(&p)
        {
            return bad("min_p", "`min_p` must be in [0, 1] (0 turns it off)");
        }
        let repeat_penalty = match (self.repetition_penalty, self.repeat_penalty) {
            (Some(a), Some(b)) if a != b => {
                return bad(
                    "repeat_penalty",
                    "`repetition_penalty` and `repeat_penalty` are one field: send one",
                );
            }
            (a, b) => a.or(b),
        };
        if let Some(p) = repeat_penalty
            && !(p > 0.0 && p.is_finite())
        {
            let field = if self.repetition_penalty.is_some() {
                "repetition_penalty"
            } else {
                "repeat_penalty"
            };
            return bad(
                field,
                &format!("`{field}` must be a number > 0 (1 turns it off)"),
            );
        }
        for (field, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if let Some(v) = value
                && !(-2.0..=2.0).contains(&v)
            {
                return bad(field, &format!("`{field}` must be between -2 and 2"));
            }
        }
        let max_window = i64::from(MAX_REPEAT_LAST_N);
        let repeat_last_n = match self.repeat_last_n {
            None => None,
            Some(-1) => Some(MAX_REPEAT_LAST_N),
            Some(n) if (0..=max_window).contains(&n) => u32::try_from(n).ok(),
            Some(_) => {
                return bad(
                    "repeat_last_n",
                    &format!("`repeat_last_n` must be -1 (all) or 0 to {max_window}"),
                );
            }
        };
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
        let mut params = ParamOverrides {
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k,
            min_p: self.min_p,
            // OpenAI seeds are signed; the engine's are not: the bits are kept.
            seed: self.seed.map(|s| s as u64),
            stop: self.stop.as_ref().map(|s| match s {
                Stop::One(s) => vec![s.clone()],
                Stop::Many(v) => v.clone(),
            }),
            repeat_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            repeat_last_n,
            ..ParamOverrides::default()
        };
        params.set_dry(dry);
        Ok(params)
    }
}

/// The messages of a chat request, checked.
fn conversation(messages: Vec<InMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages"),
            "`messages` must hold at least one message",
        ));
    }
    let mut conversation = Vec::with_capacity(messages.len());
    for (i, message) in messages.into_iter().enumerate() {
        let role = match message.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::unsupported(
                    &format!("messages[{i}].role"),
                    format!("Role `{other}` is not supported (system, developer, user, assistant)"),
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
    Ok(conversation)
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

/// A non-streaming answer of either endpoint (`object` says which).
#[derive(Serialize)]
pub struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub system_fingerprint: &'a str,
    pub choices: [AnyChoice<'a>; 1],
    pub usage: Usage,
    /// The run report (`run --json`) or, for a plain model, its timings.
    pub staircase: Value,
}

/// A choice of a chat answer or of a text completion.
#[derive(Serialize)]
#[serde(untagged)]
pub enum AnyChoice<'a> {
    Chat(Choice<'a>),
    Text(TextChoice<'a>),
}

/// A stream chunk's choice of either endpoint.
#[derive(Serialize)]
#[serde(untagged)]
pub enum AnyChunkChoice<'a> {
    Chat(ChunkChoice<'a>),
    Text(TextChoice<'a>),
}

/// A text completion's choice, whole or streamed: the new text only (no `echo`).
#[derive(Serialize)]
pub struct TextChoice<'a> {
    pub index: u32,
    pub text: &'a str,
    pub finish_reason: Option<&'static str>,
    pub logprobs: Option<()>,
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
    /// Why an output guard stopped the answer (OpenAI's field for a refusal).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<&'a str>,
}

/// One `chat.completion.chunk` or streamed `text_completion`.
#[derive(Serialize)]
pub struct Chunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub system_fingerprint: &'a str,
    pub choices: Vec<AnyChunkChoice<'a>>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(body: &str) -> ApiError {
        parse(body.as_bytes(), Endpoint::Chat).unwrap_err()
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
            (r#""logprobs": true"#, "logprobs"),
        ] {
            let e = error_of(&format!("{{{base}, {extra}}}"));
            assert_eq!(e.param.as_deref(), Some(field), "{}", e.message);
        }
        let ok = parse(
            format!(r#"{{{base}, "user": "x", "presence_penalty": 0, "n": 1}}"#).as_bytes(),
            Endpoint::Chat,
        )
        .unwrap();
        assert_eq!(ok.input.messages(), 1);
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
            Endpoint::Chat,
        )
        .unwrap();
        assert!(chat.stream && chat.include_usage);
        assert_eq!(chat.params.max_tokens, Some(5));
        assert_eq!(chat.params.seed, Some(7));
        assert_eq!(chat.params.stop, Some(vec!["END".to_string()]));
        let Input::Conversation(conversation) = &chat.input else {
            panic!("a chat request holds a conversation")
        };
        assert_eq!(conversation.len(), 4);
        assert_eq!(conversation[2].role, Role::Assistant);
    }

    #[test]
    fn dry_fields_are_kept_and_bad_ones_named() {
        let base = r#""model": "m", "messages": [{"role": "user", "content": "hi"}]"#;
        let chat = parse(
            format!(r#"{{{base}, "dry_multiplier": 0, "dry_allowed_length": 3}}"#).as_bytes(),
            Endpoint::Chat,
        )
        .unwrap();
        assert_eq!(chat.params.dry_multiplier, Some(0.0));
        assert_eq!(chat.params.dry_allowed_length, Some(3));
        assert_eq!(chat.params.dry_base, None);
        let e = error_of(&format!(r#"{{{base}, "dry_base": 0.5}}"#));
        assert_eq!(e.param.as_deref(), Some("dry_base"), "{}", e.message);
        let e = error_of(&format!(r#"{{{base}, "dry_multiplier": -1}}"#));
        assert_eq!(e.param.as_deref(), Some("dry_multiplier"), "{}", e.message);
    }

    #[test]
    fn extra_sampling_fields_are_kept_and_nonsense_named() {
        let base = r#""model": "m", "messages": [{"role": "user", "content": "hi"}]"#;
        let chat = parse(
            format!(r#"{{{base}, "top_k": 1, "min_p": 0.05, "repetition_penalty": 1.1}}"#)
                .as_bytes(),
            Endpoint::Chat,
        )
        .unwrap();
        assert_eq!(chat.params.top_k, Some(1));
        assert_eq!(chat.params.min_p, Some(0.05));
        assert_eq!(chat.params.repeat_penalty, Some(1.1));
        // llama-server's name for the penalty, and vLLM's "off" for top-k.
        let chat = parse(
            format!(r#"{{{base}, "repeat_penalty": 1.3, "top_k": -1}}"#).as_bytes(),
            Endpoint::Chat,
        )
        .unwrap();
        assert_eq!(chat.params.repeat_penalty, Some(1.3));
        assert_eq!(chat.params.top_k, Some(0));
        // OpenAI's penalties, and the window llama-server's clients send with them.
        let chat = parse(
            format!(
                r#"{{{base}, "presence_penalty": 0.5, "frequency_penalty": -0.5,
                "repeat_last_n": -1}}"#
            )
            .as_bytes(),
            Endpoint::Chat,
        )
        .unwrap();
        assert_eq!(chat.params.presence_penalty, Some(0.5));
        assert_eq!(chat.params.frequency_penalty, Some(-0.5));
        assert_eq!(chat.params.repeat_last_n, Some(MAX_REPEAT_LAST_N));
        for (extra, field) in [
            (r#""top_k": -2"#, "top_k"),
            (r#""top_k": 1.5"#, "top_k"),
            (r#""min_p": 1.5"#, "min_p"),
            (r#""min_p": -0.1"#, "min_p"),
            (r#""repetition_penalty": 0"#, "repetition_penalty"),
            (r#""repeat_penalty": -1"#, "repeat_penalty"),
            (r#""presence_penalty": 2.5"#, "presence_penalty"),
            (r#""frequency_penalty": -3"#, "frequency_penalty"),
            (r#""repeat_last_n": -2"#, "repeat_last_n"),
            (r#""repeat_last_n": 100000"#, "repeat_last_n"),
            (
                r#""repetition_penalty": 1.1, "repeat_penalty": 1.2"#,
                "repeat_penalty",
            ),
        ] {
            let e = error_of(&format!("{{{base}, {extra}}}"));
            assert_eq!(e.status, 400);
            assert_eq!(e.param.as_deref(), Some(field), "{extra}: {}", e.message);
        }
    }

    #[test]
    fn a_text_completion_takes_one_prompt_and_no_chat_fields() {
        let text = |body: &str| parse(body.as_bytes(), Endpoint::Text);
        let ok = text(r#"{"model": "m", "prompt": "Once", "max_tokens": 3, "top_k": 2}"#).unwrap();
        assert!(matches!(&ok.input, Input::Text(t) if t == "Once"));
        assert_eq!(ok.params.max_tokens, Some(3));
        assert_eq!(ok.params.top_k, Some(2));
        let ok =
            text(r#"{"model": "m", "prompt": ["Once"], "echo": false, "best_of": 1}"#).unwrap();
        assert!(matches!(&ok.input, Input::Text(t) if t == "Once"));
        for (body, field) in [
            (r#"{"model": "m", "prompt": ["a", "b"]}"#, "prompt"),
            (r#"{"model": "m", "prompt": "a", "echo": true}"#, "echo"),
            (r#"{"model": "m", "prompt": "a", "n": 2}"#, "n"),
            (r#"{"model": "m", "prompt": "a", "best_of": 3}"#, "best_of"),
            (r#"{"model": "m"}"#, "prompt"),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}]}"#,
                "messages",
            ),
        ] {
            let e = text(body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {}", e.message);
        }
        let e = error_of(r#"{"model": "m", "prompt": "a"}"#);
        assert_eq!(e.param.as_deref(), Some("prompt"), "{}", e.message);
        let e = error_of(
            r#"{"model": "m", "messages": [{"role": "user", "content": "a"}], "echo": false}"#,
        );
        assert_eq!(e.param.as_deref(), Some("echo"), "{}", e.message);
    }
}
