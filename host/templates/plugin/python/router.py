"""{{name}}: a router plugin in Python (componentize-py), world `router` of
`staircase:agent@0.2.0`. Before each step of a routed node it picks one of the offered
models: the last (largest) for long prompts, the first otherwise."""

from wit_world import exports
from wit_world.exports.router_policy import RouteChoice, RouteRequest

LONG_PROMPT_TOKENS = 512


class RouterPolicy(exports.RouterPolicy):
    def route(self, request: RouteRequest) -> RouteChoice:
        if not request.models:
            return RouteChoice(model="", reason="no models offered")
        if request.prompt_tokens > LONG_PROMPT_TOKENS:
            return RouteChoice(model=request.models[-1], reason=f"prompt of {request.prompt_tokens} tokens")
        return RouteChoice(model=request.models[0], reason="short prompt")
