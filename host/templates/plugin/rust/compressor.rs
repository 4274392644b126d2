//! {{name}}: a compressor plugin. It shortens a conversation history to a token budget;
//! this one keeps the system messages and the most recent turns that fit.

use staircase_sdk::{ChatMessage, Compressor, Speaker, host};

struct Plugin;

impl Compressor for Plugin {
    fn compress(history: Vec<ChatMessage>, budget_tokens: u32) -> Result<Vec<ChatMessage>, String> {
        let (system, turns): (Vec<_>, Vec<_>) =
            history.into_iter().partition(|m| m.role == Speaker::System);
        let mut used: u32 = system.iter().map(|m| host::count_tokens(&m.content)).sum();
        let mut kept = Vec::new();
        for message in turns.into_iter().rev() {
            let tokens = host::count_tokens(&message.content);
            if used + tokens > budget_tokens {
                break;
            }
            used += tokens;
            kept.push(message);
        }
        kept.reverse();
        Ok(system.into_iter().chain(kept).collect())
    }
}

staircase_sdk::export_compressor!(Plugin);
