//! One try of one request on one replica: the HTTP request, the SSE stream parsed by
//! `eventsource-stream`, the first-byte and idle timeouts, and every failure as a typed
//! [`EngineError`]. Whether to try again is the caller's decision ([`Failure::delivered`]
//! says whether any text already reached the caller, after which it never may).

use std::time::{Duration, Instant};

use eventsource_stream::{EventStreamError, Eventsource};
use futures_util::StreamExt;
use reqwest::StatusCode;

use super::config::Timeouts;
use super::wire::{self, Chunk, WireRequest};
use crate::engine::{EngineError, EventSender, FinishReason, GenerationEvent, TokenCounter, Usage};

/// Where the token counts of a remote answer's deltas came from (what the chunker cuts by);
/// in the extensions of its `Finished` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkTokens {
    /// Every count is the server's: vLLM's per-chunk usage or llama.cpp's per-chunk timings.
    Reported,
    /// Some counts are estimates, since the server reported none for their chunks: the
    /// configured local tokenizer's count of the chunk's text, else the byte estimate.
    Estimated,
}

/// How a try ended well.
#[derive(Debug)]
pub enum Outcome {
    /// The answer finished; the caller still needs its `Finished` event.
    Finished {
        reason: FinishReason,
        usage: Usage,
        first_token: Option<Duration>,
        chunk_tokens: ChunkTokens,
        /// The first answer token's candidates, when asked for and the server sent them.
        first_token_logprobs: Option<Vec<(String, f32)>>,
    },
    /// The caller is gone; nothing more to do.
    Cancelled,
}

/// How a try failed.
#[derive(Debug)]
pub struct Failure {
    pub error: EngineError,
    /// Text of this try already reached the caller.
    pub delivered: bool,
}

impl Failure {
    fn before(error: EngineError) -> Self {
        Self {
            error,
            delivered: false,
        }
    }
}

/// What one try needs.
pub struct Attempt<'a> {
    pub client: &'a reqwest::Client,
    pub base_url: &'a str,
    pub api_key: Option<&'a str>,
    pub request: &'a WireRequest,
    pub timeouts: &'a Timeouts,
    /// A warm-up: the caller wants the prompt cached, not the token the server generates.
    pub warm_up: bool,
    /// When the caller submitted the request (timings count from there).
    pub submitted: Instant,
    /// Counts a chunk's tokens when the server does not say.
    pub tokens: &'a dyn TokenCounter,
}

/// `url` without the parts that may carry secrets (user and password, query, fragment), for
/// messages, logs and metric labels.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url)
        .ok()
        .filter(|u| !u.cannot_be_a_base())
    {
        Some(mut parsed) => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.set_query(None);
            parsed.set_fragment(None);
            parsed.to_string().trim_end_matches('/').to_string()
        }
        // Not a URL with a host: keep what cannot hold a secret of the kind above.
        None => url
            .rsplit('@')
            .next()
            .unwrap_or(url)
            .split(['?', '#'])
            .next()
            .unwrap_or("")
            .to_string(),
    }
}

/// A transport error as ours: timeouts, refused or reset connections.
pub fn transport_error(url: &str, error: &reqwest::Error, timeout: Duration) -> EngineError {
    if error.is_timeout() {
        return EngineError::Timeout { after: timeout };
    }
    // The source chain names the cause ("connection refused"); the top level only the URL,
    // which reqwest prints whole: redacted here.
    let mut message = error.to_string();
    if let Some(full) = error.url() {
        message = message.replace(full.as_str(), &redact_url(full.as_str()));
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    EngineError::Unreachable(format!("{}: {message}", redact_url(url)))
}

/// Removes the continued prefix that llama.cpp's server sends back at the start of the
/// answer (it streams the prefilled assistant text, then the continuation) from `text`;
/// `None` when nothing of `text` is new. Text that does not match the prefix means the
/// server does not echo it: nothing is removed from then on.
fn strip_echo<'t>(echo: &mut Option<&str>, text: &'t str) -> Option<&'t str> {
    let rest = match *echo {
        None => text,
        Some(pending) => {
            if let Some(rest) = text.strip_prefix(pending) {
                *echo = None;
                rest
            } else if let Some(left) = pending.strip_prefix(text) {
                *echo = Some(left).filter(|l| !l.is_empty());
                ""
            } else {
                *echo = None;
                text
            }
        }
    };
    (!rest.is_empty()).then_some(rest)
}

/// An error status as ours: 429 and 503 mean "busy", other 5xx may pass on another try, 4xx
/// are the request's fault.
pub fn status_error(status: StatusCode, retry_after: Option<Duration>, body: &str) -> EngineError {
    // The body stays in the engine error for the log and for callers in this process; the
    // server shows its clients only the status (`server::chat`).
    let message = body.chars().take(500).collect::<String>();
    match status.as_u16() {
        429 | 503 => EngineError::Overloaded { retry_after },
        code => EngineError::Http {
            status: code,
            message,
            retryable: status.is_server_error(),
        },
    }
}

impl Attempt<'_> {
    pub async fn run(&self, events: &EventSender) -> Result<Outcome, Failure> {
        let url = format!("{}{}", self.base_url, self.request.path);
        let first_byte = self.timeouts.first_byte;
        let mut sends = 0;
        let response = loop {
            sends += 1;
            let mut http = self.client.post(&url).json(&self.request.body);
            if let Some(key) = self.api_key {
                http = http.bearer_auth(key);
            }
            match tokio::time::timeout(first_byte, http.send()).await {
                Err(_) => return Err(Failure::before(EngineError::Timeout { after: first_byte })),
                // A pooled connection the server closed as the request went out (llama.cpp's
                // HTTP library ends a connection after so many requests) fails before any
                // response: sent again at once, on a new connection, it is no replica fault.
                Ok(Err(error)) if !error.is_connect() && !error.is_timeout() && sends == 1 => {
                    tracing::debug!(%url, %error, "request on a closed pooled connection; sent again");
                }
                Ok(Err(error)) => {
                    let limit = if error.is_connect() {
                        self.timeouts.connect
                    } else {
                        first_byte
                    };
                    return Err(Failure::before(transport_error(&url, &error, limit)));
                }
                Ok(Ok(response)) => break response,
            }
        };
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = tokio::time::timeout(self.timeouts.idle, response.text())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            return Err(Failure::before(status_error(status, retry_after, &body)));
        }

        let mut stream = response.bytes_stream().eventsource();
        let mut delivered = false;
        let mut first_token = None;
        let mut reason = None;
        let mut usage = Usage::default();
        // Tokens the deltas so far stand for, and whether any count was estimated.
        let mut counted = 0u32;
        let mut chunk_tokens = ChunkTokens::Reported;
        let mut first_token_logprobs = None;
        // What of the continued prefix the server may still send back before the new text.
        let mut echo = self.request.echoed_prefix.as_deref();
        let fail = |error, delivered| Failure { error, delivered };
        loop {
            // Until the first event the server may still be prefilling; after it, silence
            // means a stuck or lost replica.
            let wait = if delivered || reason.is_some() {
                self.timeouts.idle
            } else {
                first_byte
            };
            let event = match tokio::time::timeout(wait, stream.next()).await {
                Err(_) => return Err(fail(EngineError::Timeout { after: wait }, delivered)),
                Ok(None) => break,
                Ok(Some(Err(EventStreamError::Transport(error)))) => {
                    return Err(fail(transport_error(&url, &error, wait), delivered));
                }
                Ok(Some(Err(error))) => {
                    return Err(fail(
                        EngineError::Internal(format!("{url}: malformed event stream: {error}")),
                        delivered,
                    ));
                }
                Ok(Some(Ok(event))) => event,
            };
            let data = event.data.trim();
            if data == "[DONE]" {
                break;
            }
            if data.is_empty() {
                continue;
            }
            let chunk: Chunk = serde_json::from_str(data).map_err(|error| {
                fail(
                    EngineError::Internal(format!("{url}: malformed chunk ({error}): {data:.200}")),
                    delivered,
                )
            })?;
            if let Some(error) = chunk.error {
                return Err(fail(
                    EngineError::Internal(format!("{url}: the server reported: {error}")),
                    delivered,
                ));
            }
            let generated = chunk.generated_so_far();
            if let Some(wire_usage) = chunk.usage {
                usage = Usage {
                    prompt_tokens: wire_usage.prompt_tokens,
                    cached_prompt_tokens: wire_usage
                        .prompt_tokens_details
                        .map_or(0, |d| d.cached_tokens),
                    completion_tokens: wire_usage.completion_tokens,
                };
            }
            for choice in &chunk.choices {
                if let Some(text) = choice.text()
                    && !self.warm_up
                    && let Some(text) = strip_echo(&mut echo, text)
                {
                    if first_token.is_none() {
                        first_token_logprobs = choice
                            .logprobs
                            .as_ref()
                            .and_then(wire::WireLogprobs::first_candidates);
                    }
                    first_token.get_or_insert_with(|| self.submitted.elapsed());
                    // A chunk may stand for several tokens (a character of several tokens,
                    // text held back while it could begin a stop string): the difference of
                    // the server's running counts says how many. A chunk of text is at
                    // least one token.
                    let count = match generated {
                        Some(total) => total.saturating_sub(counted).max(1),
                        None => {
                            chunk_tokens = ChunkTokens::Estimated;
                            self.tokens.count(text).get().max(1)
                        }
                    };
                    counted = counted.saturating_add(count);
                    let delta = GenerationEvent::Delta {
                        text: text.to_string(),
                        token_count: count,
                        token_ids: None,
                    };
                    if events.send(Ok(delta)).is_err() {
                        return Ok(Outcome::Cancelled);
                    }
                    delivered = true;
                }
                if let Some(finish) = &choice.finish_reason {
                    reason = Some(wire::finish_reason(finish));
                }
            }
        }
        match reason {
            Some(reason) => Ok(Outcome::Finished {
                reason,
                usage,
                first_token,
                chunk_tokens,
                first_token_logprobs,
            }),
            // The connection closed before the answer ended: the replica went away.
            None => Err(fail(
                EngineError::Unreachable(format!(
                    "{url}: the stream ended before the answer finished"
                )),
                delivered,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{redact_url, strip_echo};

    #[test]
    fn urls_lose_credentials_query_and_fragment() {
        assert_eq!(
            redact_url("https://user:secret@replica.example:8443/v1?key=abc#x"),
            "https://replica.example:8443/v1"
        );
        assert_eq!(redact_url("http://10.0.0.2:8080/"), "http://10.0.0.2:8080");
        assert_eq!(redact_url("user:pw@host/p?token=1"), "host/p");
    }

    #[test]
    fn an_echoed_prefix_is_removed_once_and_other_text_kept() {
        // llama.cpp: the prefix and the first new token in one chunk.
        let mut echo = Some("The sky is");
        assert_eq!(strip_echo(&mut echo, "The sky is blue"), Some(" blue"));
        assert_eq!(echo, None);
        assert_eq!(strip_echo(&mut echo, "The sky is"), Some("The sky is"));
        // The prefix over several chunks, then new text.
        let mut echo = Some("The sky is");
        assert_eq!(strip_echo(&mut echo, "The sky"), None);
        assert_eq!(strip_echo(&mut echo, " is"), None);
        assert_eq!(strip_echo(&mut echo, " blue"), Some(" blue"));
        // A server that does not echo: its first text is new and kept whole.
        let mut echo = Some("The sky is");
        assert_eq!(strip_echo(&mut echo, " because"), Some(" because"));
        assert_eq!(echo, None);
    }
}
