//! {{name}}: a role plugin. The host asks it for the agent's system prompt, the messages
//! to send to the model, and how to generate.

use staircase_sdk::{ChatMessage, GenerationParams, Role, RoleInput, host};

/// The system prompt when the pipeline's `config` table sets no `system-prompt`.
const DEFAULT_PROMPT: &str = "You are a helpful assistant. Answer briefly.";

struct Plugin;

impl Role for Plugin {
    fn system_prompt() -> String {
        host::config("system-prompt").unwrap_or_else(|| DEFAULT_PROMPT.into())
    }

    fn build_messages(input: RoleInput) -> Vec<ChatMessage> {
        host::log(
            host::LogLevel::Debug,
            &format!("{} messages in", input.conversation.len()),
        );
        staircase_sdk::default_role_messages(Self::system_prompt(), input)
    }

    fn params() -> GenerationParams {
        GenerationParams {
            max_tokens: 256,
            ..GenerationParams::default()
        }
    }
}

staircase_sdk::export_role!(Plugin);
