//! Token counts for a remote model: the server's `/tokenize` where it has one (llama.cpp and
//! vLLM do), else the tokenizer of a local GGUF of the same model when one is configured,
//! else an estimate that says it is one. Counting without I/O uses the local tokenizer or the
//! estimate; only [`TokenCounter::count_exact`] asks the server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use serde_json::{Value, json};

use super::replicas::Replicas;
use crate::engine::{CountFuture, EngineError, TokenCount, TokenCounter, estimate_tokens};

const UNKNOWN: u8 = 0;
const AVAILABLE: u8 = 1;
const MISSING: u8 = 2;

pub struct RemoteTokens {
    pub(super) client: reqwest::Client,
    pub(super) replicas: Arc<Replicas>,
    pub(super) model: String,
    /// Sent as a bearer token: a keyed server refuses `/tokenize` without it.
    api_key: Option<String>,
    pub(super) timeout: std::time::Duration,
    /// Whether the server has `/tokenize`, once known: a 404 is not asked again.
    tokenize: AtomicU8,
    local: Option<LocalTokenizer>,
}

/// The vocabulary of a GGUF, loaded without its weights.
pub struct LocalTokenizer {
    model: llama_cpp_2::model::LlamaModel,
}

impl LocalTokenizer {
    pub fn load(path: &std::path::Path) -> Result<Self, EngineError> {
        if !path.is_file() {
            return Err(EngineError::ModelNotFound {
                path: path.to_path_buf(),
            });
        }
        let backend = crate::engine::local::backend()?;
        let params = llama_cpp_2::model::params::LlamaModelParams::default().with_vocab_only(true);
        let model = llama_cpp_2::model::LlamaModel::load_from_file(backend, path, &params)
            .map_err(|error| EngineError::InvalidModel {
                path: path.to_path_buf(),
                reason: error.to_string(),
            })?;
        Ok(Self { model })
    }

    fn count(&self, text: &str) -> TokenCount {
        let tokens = self.model.vocab().tokenize(text.as_bytes(), false, false);
        TokenCount::Exact(u32::try_from(tokens.len()).unwrap_or(u32::MAX))
    }
}

impl RemoteTokens {
    pub(super) fn new(
        client: reqwest::Client,
        replicas: Arc<Replicas>,
        model: String,
        api_key: Option<String>,
        timeout: std::time::Duration,
        local: Option<LocalTokenizer>,
    ) -> Self {
        Self {
            client,
            api_key,
            replicas,
            model,
            timeout,
            tokenize: AtomicU8::new(UNKNOWN),
            local,
        }
    }

    /// Without the server: the local tokenizer, else the estimate.
    fn offline(&self, text: &str) -> TokenCount {
        match &self.local {
            Some(local) => local.count(text),
            None => estimate_tokens(text),
        }
    }

    async fn tokenize(&self, text: &str) -> Result<Option<u32>, EngineError> {
        // Any replica: they serve one model. The first that answers.
        let mut last = None;
        for index in 0..self.replicas.count() {
            let url = format!("{}/tokenize", self.replicas.url(index));
            // llama.cpp reads `content`, vLLM `prompt`; each ignores the other's field.
            let body = json!({ "model": self.model, "content": text, "prompt": text,
                               "add_special": false, "add_special_tokens": false });
            let mut request = self.client.post(&url).json(&body);
            if let Some(key) = &self.api_key {
                request = request.bearer_auth(key);
            }
            let response = match tokio::time::timeout(self.timeout, request.send()).await {
                Ok(Ok(response)) => response,
                Ok(Err(error)) => {
                    last = Some(super::client::transport_error(&url, &error, self.timeout));
                    continue;
                }
                Err(_) => {
                    last = Some(EngineError::Timeout {
                        after: self.timeout,
                    });
                    continue;
                }
            };
            if matches!(response.status().as_u16(), 404 | 405 | 501) {
                return Ok(None);
            }
            if !response.status().is_success() {
                last = Some(super::client::status_error(response.status(), None, ""));
                continue;
            }
            let value: Value = response
                .json()
                .await
                .map_err(|e| EngineError::Internal(format!("{url}: malformed answer: {e}")))?;
            let count = value["count"]
                .as_u64()
                .or_else(|| value["tokens"].as_array().map(|t| t.len() as u64));
            return match count {
                Some(n) => Ok(Some(u32::try_from(n).unwrap_or(u32::MAX))),
                None => Err(EngineError::Internal(format!(
                    "{url}: /tokenize answered without tokens"
                ))),
            };
        }
        Err(last.unwrap_or_else(|| EngineError::Unreachable("no replica".into())))
    }
}

impl TokenCounter for RemoteTokens {
    fn count(&self, text: &str) -> TokenCount {
        self.offline(text)
    }

    fn count_exact<'a>(&'a self, text: &'a str) -> CountFuture<'a> {
        Box::pin(async move {
            if self.tokenize.load(Ordering::Relaxed) == MISSING {
                return Ok(self.offline(text));
            }
            match self.tokenize(text).await {
                Ok(Some(n)) => {
                    self.tokenize.store(AVAILABLE, Ordering::Relaxed);
                    Ok(TokenCount::Exact(n))
                }
                Ok(None) => {
                    self.tokenize.store(MISSING, Ordering::Relaxed);
                    Ok(self.offline(text))
                }
                // A count is never worth failing a request over: the offline one says
                // whether it is exact.
                Err(error) => {
                    tracing::warn!(%error, "/tokenize failed; counting offline");
                    Ok(self.offline(text))
                }
            }
        })
    }
}
