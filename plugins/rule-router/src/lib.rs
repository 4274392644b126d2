//! The built-in rule-based router: the large model for long prompts or queries that look
//! hard, the small one otherwise. Always answers with one of the offered models.

use staircase_sdk::{RouteRequest, Router, host};

/// Beyond this prompt size the small model's quality drops and its speed edge shrinks.
const DEFAULT_MAX_SMALL_PROMPT_TOKENS: u32 = 1024;
/// Words that mark requests needing reasoning rather than recall.
const DEFAULT_HARD_WORDS: &str = "prove,derive,step by step,debug,why,compare,analyze,analyse";

struct Rules;

impl Router for Rules {
    fn route(request: RouteRequest) -> String {
        let (Some(first), Some(last)) = (request.models.first(), request.models.last()) else {
            return String::new();
        };
        let pick = |key: &str, fallback: &String| {
            host::config(key)
                .filter(|name| request.models.contains(name))
                .unwrap_or_else(|| fallback.clone())
        };
        let max_small = host::config("max-small-prompt-tokens")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_MAX_SMALL_PROMPT_TOKENS);
        let hard_words = host::config("hard-words").unwrap_or_else(|| DEFAULT_HARD_WORDS.into());
        let query = request.query.to_lowercase();
        let hard = request.prompt_tokens > max_small
            || hard_words
                .split(',')
                .map(str::trim)
                .any(|w| !w.is_empty() && query.contains(w));
        if hard {
            pick("large", last)
        } else {
            pick("small", first)
        }
    }
}

staircase_sdk::export_router!(Rules);
