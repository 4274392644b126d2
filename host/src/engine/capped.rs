//! An engine whose requests generate at most a ceiling of tokens: how `[limits] max_tokens`
//! bounds every request a served host makes, whoever chose its `max_tokens` (a client, a
//! pipeline file, a role plugin, a plugin's `model.complete` call). Wrapping the engine is
//! the one place all of them pass. This room only lowers `max_tokens`; it must not change
//! anything else about a request or its stream.

use std::sync::Arc;

use super::{
    Engine, EngineError, EngineLoad, GenerationRequest, GenerationStream, ModelInfo, TokenCounter,
};

/// `inner` with every request's `max_tokens` lowered to `max_tokens` at most.
pub fn capped(inner: Arc<dyn Engine>, max_tokens: u32) -> Arc<dyn Engine> {
    Arc::new(Capped { inner, max_tokens })
}

struct Capped {
    inner: Arc<dyn Engine>,
    max_tokens: u32,
}

impl Engine for Capped {
    fn submit(&self, mut request: GenerationRequest) -> Result<GenerationStream, EngineError> {
        request.sampling.max_tokens = request.sampling.max_tokens.min(self.max_tokens);
        self.inner.submit(request)
    }

    fn model_info(&self) -> &ModelInfo {
        self.inner.model_info()
    }

    fn token_counter(&self) -> &dyn TokenCounter {
        self.inner.token_counter()
    }

    fn load(&self) -> Option<EngineLoad> {
        self.inner.load()
    }

    fn forget_history(&self) {
        self.inner.forget_history()
    }
}
