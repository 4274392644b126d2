//! {{name}}: a router plugin. Before each step of a routed node it picks one of the
//! offered models; this one takes the last (largest) for long prompts, the first otherwise.

use staircase_sdk::{RouteChoice, RouteRequest, Router};

/// Prompts longer than this go to the last model offered.
const LONG_PROMPT_TOKENS: u32 = 512;

struct Plugin;

impl Router for Plugin {
    fn route(request: RouteRequest) -> RouteChoice {
        let (Some(first), Some(last)) = (request.models.first(), request.models.last()) else {
            return RouteChoice::new("", "no models offered");
        };
        if request.prompt_tokens > LONG_PROMPT_TOKENS {
            RouteChoice::new(last.clone(), format!("prompt of {} tokens", request.prompt_tokens))
        } else {
            RouteChoice::new(first.clone(), "short prompt")
        }
    }
}

staircase_sdk::export_router!(Plugin);
