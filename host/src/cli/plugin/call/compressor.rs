//! A compressor alone: one `compress` of a history (`--history FILE`, or a short default
//! conversation) to a token budget, and the history it returned.

use std::path::Path;

use anyhow::Context;

use super::{Args, Target, print_input, print_messages, print_output, timed};
use crate::engine::{ChatMessage, Role, estimate_tokens};

/// The budget when `--budget` does not say: about half of the default history, so a
/// compressor has something to drop.
const DEFAULT_BUDGET_TOKENS: u32 = 48;

/// The history when `--history` does not say: a system message and a few turns, about 75
/// tokens by the host's estimate.
const DEFAULT_HISTORY: [(Role, &str); 6] = [
    (Role::System, "You are a helpful assistant."),
    (Role::User, "What is the capital of France?"),
    (
        Role::Assistant,
        "The capital of France is Paris, on the Seine in the north of the country.",
    ),
    (Role::User, "And how many people live there?"),
    (
        Role::Assistant,
        "About two million in the city proper and over twelve million in the metropolitan area.",
    ),
    (Role::User, "Which river did you say runs through it?"),
];

pub(super) fn call(target: &Target<'_>, args: &Args) -> anyhow::Result<()> {
    let history = match &args.history {
        Some(path) => read_history(path)?,
        None => DEFAULT_HISTORY
            .iter()
            .map(|(role, text)| ChatMessage::new(*role, *text))
            .collect(),
    };
    let budget = args.budget.unwrap_or(DEFAULT_BUDGET_TOKENS);
    print_input(format_args!(
        "{} message(s), about {} tokens; budget {budget} tokens",
        history.len(),
        estimated_tokens(&history)
    ));
    print_messages(&history);
    let mut compressor = target.provider.compressor(target.plugin)?;
    let compressed = timed("compress", || compressor.compress(&history, budget))?;
    print_output(format_args!(
        "{} of {} message(s), about {} tokens:",
        compressed.len(),
        history.len(),
        estimated_tokens(&compressed)
    ));
    print_messages(&compressed);
    Ok(())
}

/// The messages' tokens as the host estimates them without a model (the plugin's own
/// counts are exact under `--model`).
fn estimated_tokens(messages: &[ChatMessage]) -> u32 {
    messages
        .iter()
        .map(|m| estimate_tokens(&m.content).get())
        .sum()
}

fn read_history(path: &Path) -> anyhow::Result<Vec<ChatMessage>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the history {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a JSON list of {{\"role\", \"content\"}} messages",
            path.display()
        )
    })
}
