//! The built-in proposer role: a configurable system prompt over the SDK's default message
//! building (system prompt, conversation, upstream outputs).

use staircase_sdk::{GenerationParams, Role, host};

/// Used when the operator sets no `system-prompt`.
const DEFAULT_SYSTEM_PROMPT: &str =
    "You are a helpful assistant. Answer the user's question accurately and concisely.";
/// Proposals feed an aggregator, so they stay short by default.
const DEFAULT_MAX_TOKENS: u32 = 256;
/// Some diversity between proposers is the point of Mixture-of-Agents.
const DEFAULT_TEMPERATURE: f32 = 0.7;

struct Proposer;

impl Role for Proposer {
    fn system_prompt() -> String {
        let prompt = host::config("system-prompt").unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.into());
        match host::config("role") {
            Some(role) => format!("You are {role}. {prompt}"),
            None => prompt,
        }
    }

    fn params() -> GenerationParams {
        GenerationParams {
            max_tokens: config_or("max-tokens", DEFAULT_MAX_TOKENS),
            temperature: config_or("temperature", DEFAULT_TEMPERATURE),
            ..GenerationParams::default()
        }
    }
}

fn config_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    host::config(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

staircase_sdk::export_role!(Proposer);
