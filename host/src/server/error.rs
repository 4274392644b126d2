//! Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the
//! status the official clients map to their exception types (400 `BadRequestError`, 401
//! `AuthenticationError`, 403 `PermissionDeniedError`, 404 `NotFoundError`, 408, 413, 415,
//! 429 `RateLimitError`, 5xx).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Seconds a client told 429 should wait: about one short run on a small CPU.
pub const RETRY_AFTER_SECS: u64 = 1;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: ErrorObject<'a>,
}

/// The `error` object, also sent as the last event of a stream that failed.
#[derive(Serialize)]
pub struct ErrorObject<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// 400: a malformed or unsupported request; `param` names the field.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            param: param.map(str::to_string),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        Self {
            code: Some("unsupported_parameter"),
            ..Self::invalid(Some(param), message)
        }
    }

    pub fn context_length(message: impl Into<String>) -> Self {
        Self {
            code: Some("context_length_exceeded"),
            ..Self::invalid(Some("messages"), message)
        }
    }

    pub fn model_not_found(model: &str, known: &[String]) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "The model `{model}` does not exist (pipelines and models: {})",
                    known.join(", ")
                ),
            )
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }

    pub fn unauthorized() -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "Missing or incorrect API key: send `Authorization: Bearer KEY`",
            )
        }
    }

    /// 403: refused for where it came from (a foreign `Origin` or `Host`).
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            code: Some("forbidden"),
            ..Self::new(StatusCode::FORBIDDEN, "invalid_request_error", message)
        }
    }

    /// 415: a JSON endpoint sent something else.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            format!("Send the body as `Content-Type: application/json` (got `{content_type}`)"),
        )
    }

    /// 408: the body did not arrive in time.
    pub fn body_timeout(secs: u64) -> Self {
        Self {
            code: Some("timeout"),
            ..Self::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!("The request body did not arrive within {secs} s"),
            )
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The request body is larger than {limit} bytes"),
        )
    }

    pub fn overloaded() -> Self {
        Self {
            code: Some("rate_limit_exceeded"),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "The server's queue is full; retry later",
            )
        }
    }

    /// A tenant over one of its own quotas (429): other tenants are unaffected.
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self {
            code: Some("rate_limit_exceeded"),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
        }
    }

    /// 503: a model's backend cannot be reached (not up yet, or every replica down). The
    /// client gets the model's name; the replicas' addresses and errors go to the log.
    pub fn unavailable(model: &str) -> Self {
        Self::model_unavailable(model, "none of its servers answers; retry later")
    }

    /// 503: the model's engine failed inside (a local engine thread panicked) and serves
    /// nothing until the server restarts; the panic goes to the log.
    pub fn engine_crashed(model: &str) -> Self {
        Self::model_unavailable(
            model,
            "its engine stopped after an internal failure and serves nothing until the server \
             restarts",
        )
    }

    /// 503 `model_unavailable`: `model` cannot answer, for `why`.
    fn model_unavailable(model: &str, why: &str) -> Self {
        Self {
            code: Some("model_unavailable"),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!("The model `{model}` is not available: {why}"),
            )
        }
    }

    pub fn timeout(secs: u64) -> Self {
        Self {
            code: Some("timeout"),
            ..Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                format!("The run exceeded the request deadline of {secs} s and was cancelled"),
            )
        }
    }

    /// 500: the run failed (a plugin trapped, the engine stopped); the message says where.
    pub fn run_failed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The `error` object on its own, for a stream's last event.
    pub fn object(&self) -> ErrorObject<'_> {
        ErrorObject {
            message: &self.message,
            kind: self.kind,
            param: self.param.as_deref(),
            code: self.code,
        }
    }

    /// The label metrics count it under.
    pub fn status_label(&self) -> String {
        self.status.as_u16().to_string()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = axum::Json(Body {
            error: self.object(),
        });
        let mut response = (self.status, body).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}
