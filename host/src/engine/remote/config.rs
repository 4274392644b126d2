//! How a remote model is configured: `[models.NAME]` with `kind = "remote"` in
//! `staircase.toml`. Every reliability knob is a named setting with a default that says why.
//!
//! ```toml
//! [models.large]
//! kind = "remote"
//! model = "smollm2"                    # the name the server knows the model by
//! replicas = ["http://127.0.0.1:8081", "http://127.0.0.1:8082"]   # or base_url = "..."
//! api_key_env = "LARGE_API_KEY"        # sent as a bearer token when set
//! tokenizer = "models/smollm2.gguf"    # counts tokens locally where /tokenize is missing
//! continuation = "auto"                # auto | trailing_assistant | continue_final_message | completions | none
//! routing = { policy = "pipeline_aware" }  # or cache_aware (with its thresholds), round_robin, least_load
//! timeouts = { connect_secs = 5, first_byte_secs = 120, idle_secs = 30 }
//! retry = { attempts = 3, backoff_ms = 100, max_backoff_ms = 2000 }
//! breaker = { failure_threshold = 3, open_for = 5 }
//! health = { interval_secs = 5 }
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::routing::{BreakerConfig, PolicyConfig};

/// A model behind one or more OpenAI-compatible servers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// The model name sent in requests.
    pub model: String,
    /// One server; shorthand for a single replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Servers of the same model; requests are routed among them.
    #[serde(default)]
    pub replicas: Vec<String>,
    /// The environment variable holding the API key; none, no `Authorization` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub continuation: Continuation,
    /// Context size in tokens; asked from the server (`/props`, `/v1/models`) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_tokens: Option<usize>,
    /// A GGUF of the same model whose tokenizer counts tokens when the server has no
    /// `/tokenize` (only its vocabulary is loaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<std::path::PathBuf>,
    #[serde(default)]
    pub routing: PolicyConfig,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub breaker: BreakerConfig,
    #[serde(default)]
    pub health: HealthConfig,
}

impl RemoteConfig {
    /// A model on `replicas` with every other setting at its default.
    pub fn new(model: impl Into<String>, replicas: Vec<String>) -> Self {
        Self {
            model: model.into(),
            base_url: None,
            replicas,
            api_key_env: None,
            continuation: Continuation::default(),
            context_tokens: None,
            tokenizer: None,
            routing: PolicyConfig::default(),
            timeouts: Timeouts::default(),
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
            health: HealthConfig::default(),
        }
    }

    /// Every replica's server root: `base_url` first, then `replicas`, each without a trailing
    /// slash or `/v1`. Both `http://host:8080` and the OpenAI SDK's `http://host:8080/v1` name
    /// the same server; the engine adds `/v1/...` and the root paths (`/health`, `/props`,
    /// `/tokenize`) itself.
    pub fn urls(&self) -> Vec<String> {
        self.base_url
            .iter()
            .chain(&self.replicas)
            .map(|url| {
                let url = url.trim_end_matches('/');
                url.strip_suffix("/v1").unwrap_or(url).to_string()
            })
            .collect()
    }
}

/// How a partial assistant answer is continued, which differs between servers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Continuation {
    /// Ask the server: llama.cpp's `/props` means `trailing_assistant`, vLLM's `/version`
    /// means `continue_final_message`, anything else `none`.
    #[default]
    Auto,
    /// The prefix as a trailing assistant message, which llama.cpp's server continues.
    TrailingAssistant,
    /// vLLM's `continue_final_message: true` with `add_generation_prompt: false`.
    ContinueFinalMessage,
    /// `/v1/completions` with the prompt rendered here from the chat template the server
    /// reports (`/props`), for servers that continue neither way.
    Completions,
    /// The server cannot continue a prefix; requests that need it are refused.
    None,
}

/// Default time to open a TCP connection: a loopback or LAN server answers in milliseconds;
/// more means it is down.
pub const DEFAULT_CONNECT: Duration = Duration::from_secs(5);
/// Default time until the first event of an answer: a busy server queues the request and then
/// prefills the whole prompt before it sends anything, which on a CPU takes tens of seconds.
pub const DEFAULT_FIRST_BYTE: Duration = Duration::from_secs(120);
/// Default time between two events once an answer streams: a token takes milliseconds even on
/// a CPU; a silence this long is a stuck or lost replica.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    #[serde(rename = "connect_secs", with = "crate::routing::breaker::secs")]
    pub connect: Duration,
    #[serde(rename = "first_byte_secs", with = "crate::routing::breaker::secs")]
    pub first_byte: Duration,
    #[serde(rename = "idle_secs", with = "crate::routing::breaker::secs")]
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: DEFAULT_CONNECT,
            first_byte: DEFAULT_FIRST_BYTE,
            idle: DEFAULT_IDLE,
        }
    }
}

/// Retries before the first token reaches the caller (never after: text already delivered
/// cannot be taken back, so a later failure is the caller's error).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Tries in all, the first included: one per replica of a pair and one more.
    pub attempts: u32,
    /// The wait before the second try; it doubles each time, up to `max_backoff_ms`.
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff_ms: 100,
            max_backoff_ms: 2000,
        }
    }
}

impl RetryConfig {
    /// The wait before try `attempt + 1` (`attempt` counts from 1).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u64 << attempt.saturating_sub(1).min(20);
        Duration::from_millis(
            self.backoff_ms
                .saturating_mul(factor)
                .min(self.max_backoff_ms),
        )
    }
}

/// Health checks: `GET {replica}/health` (llama.cpp and vLLM both serve it; 200 when ready),
/// sent with the API key, since a keyed llama-server or vLLM may refuse it without one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Seconds between checks; 0 turns the background checks off.
    #[serde(rename = "interval_secs", with = "crate::routing::breaker::secs")]
    pub interval: Duration,
    /// The path asked; empty for a server without a health endpoint (a replica's health
    /// then comes from its answers alone).
    pub path: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            path: "/health".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_table_gets_defaults_and_unknown_fields_are_refused() {
        let config: RemoteConfig = toml::from_str(
            r#"model = "m"
            base_url = "http://127.0.0.1:1/"
            replicas = ["http://127.0.0.1:2", "http://127.0.0.1:3/v1", "http://h:4/v1/"]
            routing = { policy = "cache_aware", cache_threshold = 0.5 }
            timeouts = { idle_secs = 0.5 }"#,
        )
        .unwrap();
        assert_eq!(
            config.urls(),
            vec![
                "http://127.0.0.1:1",
                "http://127.0.0.1:2",
                "http://127.0.0.1:3",
                "http://h:4"
            ]
        );
        assert_eq!(config.timeouts.idle, Duration::from_millis(500));
        assert_eq!(config.timeouts.connect, DEFAULT_CONNECT);
        assert!(matches!(config.routing, PolicyConfig::CacheAware(c) if c.cache_threshold == 0.5));
        let error = toml::from_str::<RemoteConfig>("model = \"m\"\nreplica = []").unwrap_err();
        assert!(error.to_string().contains("replica"), "{error}");
    }

    /// The shape `staircase.toml`'s models table embeds it in (`app::config::ModelConfig`):
    /// an internally tagged enum, one variant per kind.
    #[test]
    fn it_embeds_as_the_remote_kind_of_a_tagged_models_table() {
        #[derive(Debug, Deserialize)]
        #[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
        enum Kind {
            Local { path: Option<String> },
            Remote(Box<RemoteConfig>),
        }
        let table: std::collections::BTreeMap<String, Kind> = toml::from_str(
            r#"[small]
            kind = "local"
            [large]
            kind = "remote"
            model = "smollm2"
            replicas = ["http://127.0.0.1:8081", "http://127.0.0.1:8082"]
            api_key_env = "KEY""#,
        )
        .unwrap();
        assert!(matches!(&table["small"], Kind::Local { path: None }));
        let Kind::Remote(large) = &table["large"] else {
            panic!("not remote: {:?}", table["large"]);
        };
        assert_eq!(large.urls().len(), 2);
        assert_eq!(large.api_key_env.as_deref(), Some("KEY"));
        let typo = toml::from_str::<std::collections::BTreeMap<String, Kind>>(
            "[large]\nkind = \"remote\"\nmodel = \"m\"\nreplica = []",
        );
        assert!(typo.is_err());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let retry = RetryConfig::default();
        assert_eq!(retry.backoff(1), Duration::from_millis(100));
        assert_eq!(retry.backoff(2), Duration::from_millis(200));
        assert_eq!(retry.backoff(10), Duration::from_millis(2000));
    }
}
