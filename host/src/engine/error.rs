//! Errors of any engine, typed so that a caller (a router choosing a replica, the server
//! choosing an HTTP status) can act on them without reading messages.

use std::path::PathBuf;
use std::time::Duration;

use super::Capability;

/// Why an engine could not serve a request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file {path} not found")]
    ModelNotFound { path: PathBuf },
    #[error("cannot load model {path}: {reason}")]
    InvalidModel { path: PathBuf, reason: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("prompt of {tokens} tokens does not fit the context of {context} tokens")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The request needs something the model does not offer (see [`super::Capabilities`]).
    #[error("model `{model}` cannot {capability}")]
    Unsupported {
        model: String,
        capability: Capability,
    },
    /// The engine is gone: the local engine thread ended, or a stream closed before its
    /// last event.
    #[error("the engine has stopped")]
    Stopped,
    /// The engine failed inside and serves nothing more (a local engine thread that
    /// panicked): every later request gets this until the process is restarted.
    #[error(
        "the engine of model `{model}` stopped after an internal failure and serves nothing until the server restarts"
    )]
    Crashed { model: String },
    /// A remote backend answered with an error status.
    #[error("HTTP {status}: {message}")]
    Http {
        status: u16,
        message: String,
        /// Whether the same request may succeed when sent again (429, 5xx, ...).
        retryable: bool,
    },
    /// No answer (or no next event) within the allowed time.
    #[error("no answer within {after:?}")]
    Timeout { after: Duration },
    /// The backend refuses work for now (a full queue, a 429 or 503).
    #[error("the backend is overloaded{}", .retry_after.map(|d| format!("; retry after {d:?}")).unwrap_or_default())]
    Overloaded { retry_after: Option<Duration> },
    /// The backend cannot be reached (connection refused or reset, DNS, TLS).
    #[error("backend unreachable: {0}")]
    Unreachable(String),
    /// The backend failed inside (a llama.cpp decode or context error, a malformed answer
    /// from a server): nothing the caller can change about the request fixes it.
    #[error("backend failure: {0}")]
    Internal(String),
}

impl EngineError {
    /// Whether sending the same request again (later, or to another replica) may succeed.
    /// A router retries or fails over on these; the rest are answers.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Http { retryable, .. } => *retryable,
            Self::Timeout { .. } | Self::Overloaded { .. } | Self::Unreachable(_) => true,
            Self::ModelNotFound { .. }
            | Self::InvalidModel { .. }
            | Self::Template(_)
            | Self::PromptTooLong { .. }
            | Self::InvalidRequest(_)
            | Self::Unsupported { .. }
            | Self::Stopped
            | Self::Crashed { .. }
            | Self::Internal(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_router_retries_transient_failures_only() {
        let http = |status, retryable| EngineError::Http {
            status,
            message: String::new(),
            retryable,
        };
        assert!(http(503, true).is_retryable());
        assert!(!http(400, false).is_retryable());
        assert!(
            EngineError::Overloaded {
                retry_after: Some(Duration::from_secs(1))
            }
            .is_retryable()
        );
        assert!(
            EngineError::Timeout {
                after: Duration::from_secs(5)
            }
            .is_retryable()
        );
        assert!(EngineError::Unreachable("refused".into()).is_retryable());
        assert!(!EngineError::InvalidRequest("bad".into()).is_retryable());
        assert!(!EngineError::Internal("decode".into()).is_retryable());
    }
}
