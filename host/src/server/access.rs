//! The access log: one line per HTTP request (target `staircase::access`, level info), as
//! vLLM's and llama-server's, with its request id, method, path, status, latency and, for a
//! completion, its tokens. The id goes back to the client as `x-request-id`: the client's
//! own when it sent one (as vLLM and the gateways do, so its traces and ours join), else a
//! completion's run id (`x-staircase-run-id`, also logged as `run_id`), else a fresh one; so a
//! client's complaint, the log and the run's trace name the same thing.
//!
//! The line is written when the response has been sent (the end of a stream, or the client
//! going away), so a stream's latency is the whole answer's. This room only observes: it
//! must not change a response beyond adding its id header, nor read bodies.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};

use super::RUN_ID_HEADER;
use super::openai::Usage;

/// The response header that carries the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The longest client request id kept; longer ones are replaced, so a client cannot bloat
/// every log line (vLLM and Envoy accept ids of this order).
const MAX_CLIENT_ID_BYTES: usize = 128;

/// Where a handler leaves what only it knows (a completion's tokens) for the request's
/// access line; in every request's extensions. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub(crate) struct AccessNote(Arc<Mutex<Option<(u32, u32)>>>);

impl AccessNote {
    /// The request's prompt and completion tokens.
    pub(crate) fn tokens(&self, usage: &Usage) {
        *super::lock(&self.0) = Some((usage.prompt_tokens, usage.completion_tokens));
    }
}

/// The middleware: ids the request, and logs it once its response is sent.
pub(crate) async fn log(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let note = AccessNote::default();
    request.extensions_mut().insert(note.clone());
    let client_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .filter(|id| is_loggable(id))
        .cloned();
    let mut response = next.run(request).await;
    let run = response.headers().get(RUN_ID_HEADER).cloned();
    let id = match (client_id, &run) {
        (Some(id), _) => id,
        (None, Some(run)) => run.clone(),
        (None, None) => fresh_id(),
    };
    response.headers_mut().insert(REQUEST_ID_HEADER, id.clone());
    let status = response.status().as_u16();
    response.map(|inner| {
        let line = Line {
            id,
            run,
            method,
            path,
            status,
            started,
            note,
            ended: inner.is_end_stream(),
        };
        Body::new(Logged { inner, line })
    })
}

/// A client's id is kept when it prints as one word of at most `MAX_CLIENT_ID_BYTES`
/// (visible ASCII: no spaces or control characters to forge or split a log line).
fn is_loggable(id: &HeaderValue) -> bool {
    let bytes = id.as_bytes();
    (1..=MAX_CLIENT_ID_BYTES).contains(&bytes.len()) && bytes.iter().all(u8::is_ascii_graphic)
}

/// `req-` and 64 random bits in hex: unique enough to find one request in a log, and
/// telling nothing about other requests.
fn fresh_id() -> HeaderValue {
    let mut bits = [0u8; 8];
    if getrandom::fill(&mut bits).is_err() {
        // No randomness from the OS: an id that is at least unique in this process.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        bits = NEXT
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_be_bytes();
    }
    HeaderValue::from_str(&format!("req-{}", hex::encode(bits)))
        .unwrap_or(HeaderValue::from_static("req-unknown"))
}

/// One request's access line, written when it is dropped.
struct Line {
    id: HeaderValue,
    /// The run the request started, if any.
    run: Option<HeaderValue>,
    method: Method,
    path: String,
    status: u16,
    started: Instant,
    note: AccessNote,
    /// The whole body went out (false: the client went away first).
    ended: bool,
}

impl Drop for Line {
    fn drop(&mut self) {
        let id = self.id.to_str().unwrap_or("-");
        let run_id = self.run.as_ref().and_then(|run| run.to_str().ok());
        // Whole microseconds, so the figure prints short.
        let latency_ms = self.started.elapsed().as_micros() as f64 / 1e3;
        let (method, path, status, complete) = (&self.method, &self.path, self.status, self.ended);
        match *super::lock(&self.note.0) {
            Some((prompt_tokens, completion_tokens)) => tracing::info!(
                target: "staircase::access",
                %id, run_id, %method, %path, status, latency_ms, complete, prompt_tokens,
                completion_tokens, "request"
            ),
            None => tracing::info!(
                target: "staircase::access",
                %id, %method, %path, status, latency_ms, complete,
                "request"
            ),
        }
    }
}

/// A response body that writes its request's access line once it is sent or dropped.
struct Logged {
    inner: Body,
    line: Line,
}

impl HttpBody for Logged {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // hyper stops polling a body that says it ended, so the last frame counts too.
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.line.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
