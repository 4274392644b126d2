//! The built-in rule-based router: the large model for long prompts or queries that look
//! hard, the small one otherwise; a step the small model was unsure of (its mean top-token
//! probability below `min-confidence`) escalates the rest of the answer to the large model.
//! Always answers with one of the offered models.

use staircase_sdk::{RouteChoice, RouteRequest, Router, host};

/// Beyond this prompt size the small model's quality drops and its speed edge shrinks.
const DEFAULT_MAX_SMALL_PROMPT_TOKENS: u32 = 1024;
/// Words that mark requests needing reasoning rather than recall.
const DEFAULT_HARD_WORDS: &str = "prove,derive,step by step,debug,why,compare,analyze,analyse";
/// Below this mean top-token probability the small model is guessing: escalate. Greedy
/// steps of the 135M default model average 0.5-0.8 on plain prose and drop under 0.4 where
/// it starts to wander (measured with `staircase bench collab`).
const DEFAULT_MIN_CONFIDENCE: f32 = 0.4;

struct Rules;

impl Router for Rules {
    fn route(request: RouteRequest) -> RouteChoice {
        let (Some(first), Some(last)) = (request.models.first(), request.models.last()) else {
            return RouteChoice::new("", "no models offered");
        };
        let pick = |key: &str, fallback: &String| {
            host::config(key)
                .filter(|name| request.models.contains(name))
                .unwrap_or_else(|| fallback.clone())
        };
        let (small, large) = (pick("small", first), pick("large", last));
        let number = |key: &str| host::config(key).and_then(|v| v.parse::<f32>().ok());
        let max_small = number("max-small-prompt-tokens")
            .map_or(DEFAULT_MAX_SMALL_PROMPT_TOKENS, |v| v as u32);
        let min_confidence = number("min-confidence").unwrap_or(DEFAULT_MIN_CONFIDENCE);
        let sticky = host::config("sticky").is_none_or(|v| v != "false");
        let hard_words = host::config("hard-words").unwrap_or_else(|| DEFAULT_HARD_WORDS.into());
        let query = request.query.to_lowercase();

        if request.prompt_tokens > max_small {
            return RouteChoice::new(large, format!("prompt of {} tokens", request.prompt_tokens));
        }
        if let Some(word) = hard_words
            .split(',')
            .map(str::trim)
            .find(|w| !w.is_empty() && query.contains(w))
        {
            return RouteChoice::new(large, format!("hard query ({word:?})"));
        }
        if sticky && request.previous_model.as_ref() == Some(&large) {
            return RouteChoice::new(large, "escalated earlier");
        }
        if let Some(confidence) = &request.confidence
            && confidence.model == small
            && confidence.mean_top_prob < min_confidence
        {
            return RouteChoice::new(
                large,
                format!(
                    "escalated: {small} confidence {:.2} < {min_confidence}",
                    confidence.mean_top_prob
                ),
            );
        }
        RouteChoice::new(small, "easy so far")
    }
}

staircase_sdk::export_router!(Rules);
