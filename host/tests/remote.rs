//! The remote engine against servers that misbehave on purpose, written here on raw TCP so
//! each failure is exact: a server that accepts and never answers, one that answers garbage
//! SSE, error statuses (500, 429), a stream cut or stalled mid-answer, a replica that is down
//! and comes back. Each must give the caller a typed error or a retry, never a hang and never
//! a duplicated token. Real servers (`llama-server`) are in `tests/remote_llama.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use staircase::engine::remote::{Continuation, RemoteConfig, RemoteEngine};
use staircase::engine::{
    ChatMessage, Engine, EngineError, GenerationEvent, GenerationRequest, GenerationStream, Role,
};
use staircase::routing::{BreakerConfig, BreakerState, PolicyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// What a fake replica does with each request.
#[derive(Clone, Copy, Debug)]
enum Behaviour {
    /// A correct stream: "Hello", " world", finish, usage, [DONE].
    Good,
    /// Accepts, reads the request, never answers.
    Silent,
    /// 200 and an event stream whose data is not JSON.
    Garbage,
    /// An error status with a small JSON body.
    Status(u16),
    /// Two deltas, then the connection closes without a finish.
    DieMidStream,
    /// Two deltas, then silence with the connection open.
    StallMidStream,
}

struct Fake {
    url: String,
    requests: Arc<AtomicUsize>,
    /// A message per connection the client closed (read returned 0) after its request.
    closed: mpsc::UnboundedReceiver<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const OK_EVENTS: &[&str] = &[
    r#"{"choices":[{"delta":{"content":"Hello"},"finish_reason":null}]}"#,
    r#"{"choices":[{"delta":{"content":" world"},"finish_reason":null}]}"#,
    r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#,
    r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":3}}}"#,
    "[DONE]",
];

async fn fake(behaviour: Behaviour) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    serve_on(listener, url, behaviour)
}

fn serve_on(listener: TcpListener, url: String, behaviour: Behaviour) -> Fake {
    let requests = Arc::new(AtomicUsize::new(0));
    let (closed_tx, closed) = mpsc::unbounded_channel();
    let count = requests.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let count = count.clone();
            let closed = closed_tx.clone();
            tokio::spawn(async move {
                let _ = answer(socket, behaviour, &count, &closed).await;
            });
        }
    });
    Fake {
        url,
        requests,
        closed,
        task,
    }
}

/// Reads one HTTP request (headers and a Content-Length body).
async fn read_request(socket: &mut TcpStream) -> std::io::Result<String> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buffer).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if buffer.len() >= end + 4 + length {
                return Ok(text);
            }
        }
    }
}

async fn answer(
    mut socket: TcpStream,
    behaviour: Behaviour,
    count: &AtomicUsize,
    closed: &mpsc::UnboundedSender<()>,
) -> std::io::Result<()> {
    let request = read_request(&mut socket).await?;
    if request.starts_with("GET /health") {
        socket
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            .await?;
        return Ok(());
    }
    count.fetch_add(1, Ordering::SeqCst);
    let sse_head =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
    let event = |data: &str| format!("data: {data}\n\n");
    match behaviour {
        Behaviour::Good => {
            let mut out = sse_head.to_string();
            for data in OK_EVENTS {
                out.push_str(&event(data));
            }
            socket.write_all(out.as_bytes()).await?;
        }
        Behaviour::Silent => {
            wait_for_close(&mut socket, closed).await;
        }
        Behaviour::Garbage => {
            let out = format!("{sse_head}{}", event("{this is not json"));
            socket.write_all(out.as_bytes()).await?;
        }
        Behaviour::Status(status) => {
            let body = r#"{"error":{"message":"nope"}}"#;
            let extra = if status == 429 {
                "retry-after: 0\r\n"
            } else {
                ""
            };
            let out = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(out.as_bytes()).await?;
        }
        Behaviour::DieMidStream | Behaviour::StallMidStream => {
            let out = format!("{sse_head}{}{}", event(OK_EVENTS[0]), event(OK_EVENTS[1]));
            socket.write_all(out.as_bytes()).await?;
            socket.flush().await?;
            if matches!(behaviour, Behaviour::StallMidStream) {
                wait_for_close(&mut socket, closed).await;
            }
            // DieMidStream: dropping the socket closes it without a finish.
        }
    }
    Ok(())
}

/// Holds the connection open until the client closes it, then reports that.
async fn wait_for_close(socket: &mut TcpStream, closed: &mpsc::UnboundedSender<()>) {
    let mut byte = [0u8; 1];
    while let Ok(n) = socket.read(&mut byte).await {
        if n == 0 {
            break;
        }
    }
    let _ = closed.send(());
}

/// Timeouts short enough for a test and far above what loopback needs.
fn config(urls: Vec<String>) -> RemoteConfig {
    let mut config = RemoteConfig::new("test-model", urls);
    config.continuation = Continuation::TrailingAssistant;
    config.context_tokens = Some(2048);
    config.routing = PolicyConfig::RoundRobin;
    config.health.interval = Duration::ZERO;
    config.timeouts.first_byte = Duration::from_millis(800);
    config.timeouts.idle = Duration::from_millis(800);
    config.retry.backoff_ms = 1;
    config.retry.max_backoff_ms = 5;
    config
}

fn request() -> GenerationRequest {
    GenerationRequest::chat(vec![ChatMessage::new(Role::User, "Say hello")])
}

/// Reads a stream to its end: the text delivered and the final result.
async fn drain(
    mut stream: GenerationStream,
) -> (String, Result<staircase::engine::Usage, EngineError>) {
    let mut text = String::new();
    // A bound far above every timeout in `config`: a hang fails the test instead of the run.
    let read = async {
        while let Some(event) = stream.next().await {
            match event {
                Ok(GenerationEvent::Delta { text: t, .. }) => text.push_str(&t),
                Ok(GenerationEvent::Finished { usage, .. }) => return Ok(usage),
                Err(error) => return Err(error),
            }
        }
        Err(EngineError::Stopped)
    };
    let result = tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the stream hung");
    (text, result)
}

#[tokio::test]
async fn a_good_stream_gives_text_and_the_servers_usage() {
    let good = fake(Behaviour::Good).await;
    let engine = RemoteEngine::connect("m", config(vec![good.url.clone()]))
        .await
        .unwrap();
    let (text, usage) = drain(engine.submit(request()).unwrap()).await;
    let usage = usage.unwrap();
    assert_eq!(text, "Hello world");
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.cached_prompt_tokens,
            usage.completion_tokens
        ),
        (7, 3, 2)
    );
    assert!(engine.model_info().capabilities.assistant_prefix);
}

#[tokio::test]
async fn a_replica_that_never_answers_times_out_and_the_other_serves() {
    let silent = fake(Behaviour::Silent).await;
    let good = fake(Behaviour::Good).await;
    // Alone: a timeout error, typed.
    let mut alone = config(vec![silent.url.clone()]);
    alone.retry.attempts = 1;
    let engine = RemoteEngine::connect("m", alone).await.unwrap();
    let (_, result) = drain(engine.submit(request()).unwrap()).await;
    assert!(
        matches!(result, Err(EngineError::Timeout { .. })),
        "{result:?}"
    );
    // With a good replica beside it: round robin tries the silent one first, then retries.
    let engine = RemoteEngine::connect("m", config(vec![silent.url.clone(), good.url.clone()]))
        .await
        .unwrap();
    let (text, result) = drain(engine.submit(request()).unwrap()).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(text, "Hello world");
    assert_eq!(good.requests.load(Ordering::SeqCst), 1);
    assert_eq!(engine.replica_stats()[0].errors, 1);
}

#[tokio::test]
async fn garbage_sse_is_a_typed_error() {
    let garbage = fake(Behaviour::Garbage).await;
    let engine = RemoteEngine::connect("m", config(vec![garbage.url.clone()]))
        .await
        .unwrap();
    let (text, result) = drain(engine.submit(request()).unwrap()).await;
    assert!(text.is_empty());
    match result {
        Err(EngineError::Internal(message)) => assert!(message.contains("malformed"), "{message}"),
        other => panic!("expected a malformed-stream error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_500_is_retried_on_another_replica_and_reported_when_all_fail() {
    let broken = fake(Behaviour::Status(500)).await;
    let good = fake(Behaviour::Good).await;
    let engine = RemoteEngine::connect("m", config(vec![broken.url.clone(), good.url.clone()]))
        .await
        .unwrap();
    let (text, result) = drain(engine.submit(request()).unwrap()).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(text, "Hello world");

    let engine = RemoteEngine::connect("m", config(vec![broken.url.clone()]))
        .await
        .unwrap();
    let (_, result) = drain(engine.submit(request()).unwrap()).await;
    match result {
        Err(EngineError::Http {
            status: 500,
            retryable: true,
            ..
        }) => {}
        other => panic!("expected HTTP 500, got {other:?}"),
    }
    // Three attempts in all (the default), one request each.
    assert_eq!(broken.requests.load(Ordering::SeqCst), 1 + 3);
}

#[tokio::test]
async fn a_429_is_overloaded_retried_and_does_not_open_the_breaker() {
    let busy = fake(Behaviour::Status(429)).await;
    let mut only_busy = config(vec![busy.url.clone()]);
    only_busy.breaker = BreakerConfig {
        failure_threshold: 1,
        open_for: Duration::from_secs(60),
    };
    let engine = RemoteEngine::connect("m", only_busy).await.unwrap();
    let (_, result) = drain(engine.submit(request()).unwrap()).await;
    assert!(
        matches!(result, Err(EngineError::Overloaded { .. })),
        "{result:?}"
    );
    assert_eq!(busy.requests.load(Ordering::SeqCst), 3);
    assert_eq!(engine.replica_stats()[0].breaker, BreakerState::Closed);

    let good = fake(Behaviour::Good).await;
    let engine = RemoteEngine::connect("m", config(vec![busy.url.clone(), good.url.clone()]))
        .await
        .unwrap();
    let (text, result) = drain(engine.submit(request()).unwrap()).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(text, "Hello world");
}

#[tokio::test]
async fn a_replica_lost_mid_stream_is_an_error_with_no_retry_and_no_duplicate() {
    let dying = fake(Behaviour::DieMidStream).await;
    let good = fake(Behaviour::Good).await;
    let engine = RemoteEngine::connect("m", config(vec![dying.url.clone(), good.url.clone()]))
        .await
        .unwrap();
    let (text, result) = drain(engine.submit(request()).unwrap()).await;
    // The text delivered before the loss, exactly once, then a clear error.
    assert_eq!(text, "Hello world");
    match result {
        Err(EngineError::Unreachable(message)) => {
            assert!(
                message.contains("ended before the answer finished"),
                "{message}"
            )
        }
        other => panic!("expected a lost-stream error, got {other:?}"),
    }
    // Not retried elsewhere: that would have sent "Hello world" again.
    assert_eq!(good.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_replica_that_stalls_mid_stream_times_out_within_the_idle_timeout() {
    let stalling = fake(Behaviour::StallMidStream).await;
    let engine = RemoteEngine::connect("m", config(vec![stalling.url.clone()]))
        .await
        .unwrap();
    let (text, result) = drain(engine.submit(request()).unwrap()).await;
    assert_eq!(text, "Hello world");
    assert!(
        matches!(result, Err(EngineError::Timeout { after }) if after == Duration::from_millis(800)),
        "{result:?}"
    );
}

#[tokio::test]
async fn dropping_the_stream_closes_the_http_request() {
    let mut stalling = fake(Behaviour::StallMidStream).await;
    let mut long = config(vec![stalling.url.clone()]);
    long.timeouts.idle = Duration::from_secs(600);
    let engine = RemoteEngine::connect("m", long).await.unwrap();
    let mut stream = engine.submit(request()).unwrap();
    assert!(matches!(
        stream.next().await,
        Some(Ok(GenerationEvent::Delta { .. }))
    ));
    drop(stream);
    // The server sees its connection closed long before the idle timeout could end it.
    tokio::time::timeout(Duration::from_secs(30), stalling.closed.recv())
        .await
        .expect("the connection stayed open after the stream was dropped");
}

#[tokio::test]
async fn a_down_replica_opens_its_breaker_and_comes_back_after_a_health_check() {
    // A port with nothing listening: connections are refused.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let down_url = format!("http://{address}");
    let good = fake(Behaviour::Good).await;
    let mut config = config(vec![down_url.clone(), good.url.clone()]);
    // A cool-down far longer than the test: the breaker stays open throughout.
    config.breaker = BreakerConfig {
        failure_threshold: 2,
        open_for: Duration::from_secs(3600),
    };
    let engine = RemoteEngine::connect("m", config).await.unwrap();
    for _ in 0..2 {
        let (text, result) = drain(engine.submit(request()).unwrap()).await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(text, "Hello world");
    }
    // Round robin sent tries 1 and 3 to the down replica: two failures in a row.
    assert_eq!(engine.replica_stats()[0].breaker, BreakerState::Open);
    assert_eq!(engine.replica_stats()[0].errors, 2);
    // While open, it gets nothing: every request goes straight to the good replica.
    let before = good.requests.load(Ordering::SeqCst);
    for _ in 0..3 {
        let (_, result) = drain(engine.submit(request()).unwrap()).await;
        assert!(result.is_ok());
    }
    assert_eq!(good.requests.load(Ordering::SeqCst), before + 3);
    assert_eq!(engine.replica_stats()[0].errors, 2);
    // A health check fails while it is down.
    engine.check_health().await;
    assert!(!engine.replica_stats()[0].healthy);

    // The replica comes back on the same port and passes a check: having seen it down, the
    // check closes its breaker before the cool-down, and it serves again.
    let listener = TcpListener::bind(address).await.unwrap();
    let back = serve_on(listener, down_url, Behaviour::Good);
    engine.check_health().await;
    let stats = &engine.replica_stats()[0];
    assert!(stats.healthy);
    assert_eq!(stats.breaker, BreakerState::Closed);
    for _ in 0..2 {
        let (_, result) = drain(engine.submit(request()).unwrap()).await;
        assert!(result.is_ok());
    }
    assert_eq!(back.requests.load(Ordering::SeqCst), 1);
    drop(back);
}

#[tokio::test]
async fn after_the_cool_down_a_passing_health_check_closes_the_breaker() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let down_url = format!("http://{address}");
    let mut config = config(vec![down_url.clone()]);
    config.retry.attempts = 1;
    // No cool-down: open, then half-open at once; a request or a passing check decides.
    config.breaker = BreakerConfig {
        failure_threshold: 1,
        open_for: Duration::ZERO,
    };
    let engine = RemoteEngine::connect("m", config).await.unwrap();
    let (_, result) = drain(engine.submit(request()).unwrap()).await;
    assert!(
        matches!(result, Err(EngineError::Unreachable(_))),
        "{result:?}"
    );
    assert_eq!(engine.replica_stats()[0].breaker, BreakerState::HalfOpen);
    let listener = TcpListener::bind(address).await.unwrap();
    let back = serve_on(listener, down_url, Behaviour::Good);
    engine.check_health().await;
    assert_eq!(engine.replica_stats()[0].breaker, BreakerState::Closed);
    let (text, result) = drain(engine.submit(request()).unwrap()).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(text, "Hello world");
    drop(back);
}
