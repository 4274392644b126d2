//! The built-in truncating compressor: keeps every system message and the newest messages
//! that fit the token budget (as the host counts them); the oldest message that only partly
//! fits keeps its end. Fails when the system messages alone exceed the budget.

use staircase_sdk::{ChatMessage, Compressor, Speaker, host};

/// Marks where a message was cut, so the model knows text is missing.
const CUT_MARK: &str = "…";

struct Truncate;

impl Compressor for Truncate {
    fn compress(history: Vec<ChatMessage>, budget_tokens: u32) -> Result<Vec<ChatMessage>, String> {
        let system_tokens: u32 = history
            .iter()
            .filter(|m| matches!(m.role, Speaker::System))
            .map(|m| host::count_tokens(&m.content))
            .sum();
        if system_tokens > budget_tokens {
            return Err(format!(
                "the system messages alone take {system_tokens} tokens, over the budget of {budget_tokens}"
            ));
        }
        let mut left = budget_tokens - system_tokens;
        // Newest first: which non-system messages survive, and how much of each.
        let mut keep = vec![None; history.len()];
        for (index, message) in history.iter().enumerate().rev() {
            if matches!(message.role, Speaker::System) || left == 0 {
                continue;
            }
            let tokens = host::count_tokens(&message.content);
            if tokens <= left {
                left -= tokens;
                keep[index] = Some(message.content.clone());
            } else {
                keep[index] = tail_within(&message.content, left);
                left = 0;
            }
        }
        Ok(history
            .into_iter()
            .zip(keep)
            .filter_map(|(message, kept)| match message.role {
                Speaker::System => Some(message),
                _ => kept.map(|content| ChatMessage::new(message.role, content)),
            })
            .collect())
    }
}

/// The longest end of `text` (plus the cut mark) within `budget` tokens, by binary search
/// over char boundaries.
fn tail_within(text: &str, budget: u32) -> Option<String> {
    let starts: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
    let (mut lo, mut hi) = (0usize, starts.len());
    let fits =
        |start: usize| host::count_tokens(&format!("{CUT_MARK}{}", &text[start..])) <= budget;
    // Find the smallest index whose tail fits; `starts.len()` means nothing fits.
    while lo < hi {
        let mid = (lo + hi) / 2;
        if fits(starts[mid]) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    (lo < starts.len()).then(|| format!("{CUT_MARK}{}", &text[starts[lo]..]))
}

staircase_sdk::export_compressor!(Truncate);
