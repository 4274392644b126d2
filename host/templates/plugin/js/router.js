// {{name}}: a router plugin in JavaScript (componentize-js), world `router` of
// `staircase:agent@0.2.0`. Before each step of a routed node it picks one of the offered
// models: the last (largest) for long prompts, the first otherwise.
const LONG_PROMPT_TOKENS = 512;

export const routerPolicy = {
  route(request) {
    const models = request.models;
    if (models.length === 0) {
      return { model: '', reason: 'no models offered' };
    }
    if (request.promptTokens > LONG_PROMPT_TOKENS) {
      return { model: models[models.length - 1], reason: `prompt of ${request.promptTokens} tokens` };
    }
    return { model: models[0], reason: 'short prompt' };
  },
};
