//! A router alone: one `route` of the prompt as a node's first step (or a later one, with
//! `--previous-model` and `--confidence`), and the model it chose with its reason.

use super::{Args, Target, print_input, print_output, timed};
use crate::engine::{Confidence, estimate_tokens};
use crate::policy::RouteRequest;

/// The models offered when `--models` does not say: the small-and-large pair routers are
/// written for.
const DEFAULT_MODELS: [&str; 2] = ["small", "large"];

/// The node's answer budget in the request: a typical agent node's `max_tokens`.
const NODE_MAX_TOKENS: u32 = 512;

/// Tokens the previous step measured its confidence over: one routed step of a node.
const PREVIOUS_STEP_TOKENS: u32 = 16;

pub(super) fn call(target: &Target<'_>, args: &Args) -> anyhow::Result<()> {
    let models = if args.models.is_empty() {
        DEFAULT_MODELS.iter().map(|m| m.to_string()).collect()
    } else {
        args.models.clone()
    };
    let later_step = args.previous_model.is_some();
    let request = RouteRequest {
        node_id: "call".into(),
        prompt_tokens: args
            .prompt_tokens
            .unwrap_or_else(|| estimate_tokens(&args.prompt).get()),
        query: args.prompt.clone(),
        models,
        role: "agent".into(),
        // A later step has an answer under way: one step's worth.
        answer_tokens: if later_step { PREVIOUS_STEP_TOKENS } else { 0 },
        max_tokens: NODE_MAX_TOKENS,
        previous_model: args.previous_model.clone(),
        confidence: args.confidence.map(|mean_top_prob| Confidence {
            tokens: PREVIOUS_STEP_TOKENS,
            mean_top_prob,
            // Not asked for: the routers here read the probability.
            mean_entropy: 0.0,
        }),
    };
    print_input(format_args!(
        "query {:?}, {} prompt tokens, models {}",
        request.query,
        request.prompt_tokens,
        request.models.join(", ")
    ));
    if let Some(previous) = &request.previous_model {
        print_input(format_args!(
            "previous step on {previous}{}",
            request
                .confidence
                .map(|c| format!(", mean top-token probability {}", c.mean_top_prob))
                .unwrap_or_default()
        ));
    }
    let mut router = target.provider.router(target.plugin, target.config)?;
    let choice = timed("route", || router.route(&request))?;
    if choice.reason.is_empty() {
        print_output(&choice.model);
    } else {
        print_output(format_args!("{} ({})", choice.model, choice.reason));
    }
    Ok(())
}
