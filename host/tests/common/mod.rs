//! What several test files share.

use std::sync::{Arc, Mutex};

use staircase::engine::{
    Engine, EngineError, EngineLoad, GenerationRequest, GenerationStream, ModelInfo, Prompt,
    SamplingParams, TokenCounter,
};

/// Forwards to a real engine and keeps every prompt and sampling it was given (to check
/// what a model was asked).
pub struct Recording {
    pub inner: Arc<dyn Engine>,
    pub prompts: Mutex<Vec<Prompt>>,
    pub sampling: Mutex<Vec<SamplingParams>>,
}

impl Recording {
    pub fn new(inner: Arc<dyn Engine>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            prompts: Mutex::new(Vec::new()),
            sampling: Mutex::new(Vec::new()),
        })
    }
}

impl Engine for Recording {
    fn submit(&self, request: GenerationRequest) -> Result<GenerationStream, EngineError> {
        self.prompts.lock().unwrap().push(request.prompt.clone());
        self.sampling.lock().unwrap().push(request.sampling.clone());
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
}
