//! `staircase serve` under untrusted clients, black-box: the real binary on a loopback port,
//! the real default model, raw sockets for what a well-behaved client never does (silent,
//! trickling and stalled connections, foreign `Origin` and `Host` headers). Each test holds
//! one promise of the server section's "Limits": a client or web page wastes only its own
//! share.

mod serve_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use serve_support::{Server, scratch, serve, start_server, wait_bounded};

/// How long a raw socket waits for the server before the test calls it stuck: far beyond
/// every timeout the tests configure, so it only ends a test that already failed.
const STUCK: Duration = Duration::from_secs(120);

fn addr(base: &str) -> SocketAddr {
    base.strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("not an address: {base}"))
}

fn connect(base: &str) -> TcpStream {
    let stream = TcpStream::connect(addr(base)).expect("the server accepts");
    stream.set_read_timeout(Some(STUCK)).unwrap();
    stream
}

/// Sends one request (`Connection: close`) and returns its status and body.
fn request(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut stream = connect(base);
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        head.push_str(&format!("Host: {}\r\n", addr(base)));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("the server answers");
    let answer = String::from_utf8_lossy(&answer).to_string();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

const JSON: (&str, &str) = ("Content-Type", "application/json");

fn chat(base: &str, body: &Value) -> (u16, Value) {
    let (status, text) = request(
        base,
        "POST",
        "/v1/chat/completions",
        &[JSON],
        &body.to_string(),
    );
    let value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, value)
}

/// A `staircase.toml` holding `[limits]` `limits` (lines of `key = value`).
fn config_with(dir: &Path, limits: &str) -> String {
    let file = dir.join("staircase.toml");
    std::fs::write(&file, format!("[limits]\n{limits}\n")).unwrap();
    file.to_str().expect("scratch paths are UTF-8").to_string()
}

/// Whether the server has closed `stream` (its read end is at EOF), without waiting.
fn closed_by_server(stream: &mut TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut byte = [0; 1];
    let closed = matches!(stream.read(&mut byte), Ok(0));
    stream.set_nonblocking(false).unwrap();
    closed
}

/// Silent and half-header sockets fill the connection cap; a normal client is served once
/// the header timeout has ended them (so at least one is closed when its answer comes), and
/// every one of them is closed by the server.
#[test]
fn sockets_that_send_no_request_fill_the_cap_only_until_their_header_timeout() {
    let dir = scratch("cap");
    let config = config_with(&dir, "header_timeout_secs = 1\nmax_connections = 4");
    let (_server, base) = start_server(&mut serve(&["--config", &config]));
    let mut held: Vec<TcpStream> = (0..4)
        .map(|i| {
            let mut stream = connect(&base);
            if i % 2 == 1 {
                stream
                    .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                    .unwrap();
            }
            stream
        })
        .collect();
    let (status, body) = request(&base, "GET", "/health", &[], "");
    assert_eq!(status, 200, "{body}");
    let closed = held.iter_mut().map(closed_by_server).filter(|&c| c).count();
    assert!(
        closed >= 1,
        "the cap held the fifth connection until one was ended"
    );
    for stream in &mut held {
        let mut rest = Vec::new();
        // EOF (or a reset): the server ended the socket; the read timeout would fail here.
        let ended = match stream.read_to_end(&mut rest) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        assert!(ended, "a held socket was ended by the server");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without the key, a request is refused as soon as its headers are in: the server does not
/// wait for (or read) the megabyte its `Content-Length` announces.
#[test]
fn the_key_is_checked_before_the_body_is_read() {
    let dir = scratch("key-first");
    let config = config_with(&dir, "body_timeout_secs = 600");
    let (_server, base) = start_server(
        serve(&["--config", &config, "--api-key-env", "STAIRCASE_LIMITS_KEY"])
            .env("STAIRCASE_LIMITS_KEY", "secret"),
    );
    let mut stream = connect(&base);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{{\"model\":",
        addr(&base)
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut answer = [0; 12];
    stream
        .read_exact(&mut answer)
        .expect("an answer before the body");
    assert_eq!(&answer, b"HTTP/1.1 401");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--max-tokens` is a ceiling: a request's own larger `max_tokens` cannot raise it, for a
/// plain model and for every node of a pipeline.
#[test]
fn max_tokens_caps_a_plain_model_and_every_pipeline_node() {
    let (_server, base) = start_server(&mut serve(&["--max-tokens", "8"]));
    let ask = |model: &str| {
        json!({
            "model": model,
            "max_tokens": 48,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}],
        })
    };
    let (status, plain) = chat(&base, &ask("default"));
    assert_eq!(status, 200, "{plain}");
    let tokens = plain["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&tokens), "plain model: {tokens} tokens");
    let (status, moa) = chat(&base, &ask("moa"));
    assert_eq!(status, 200, "{moa}");
    let nodes = moa["staircase"]["nodes"]
        .as_array()
        .expect("the run report's nodes");
    assert!(nodes.len() > 1);
    for node in nodes {
        let tokens = node["output_tokens"].as_u64().unwrap();
        assert!(tokens <= 8, "pipeline node over the cap: {node}");
    }
}

/// A `max_tokens` far past the context is clamped to the room left, not a failure, even
/// when the prefix cache holds a longer prompt that shares the chat template's start.
#[test]
fn a_max_tokens_past_the_context_is_clamped_not_refused() {
    let (_server, base) = start_server(&mut serve(&[]));
    let (status, warm) = chat(
        &base,
        &json!({
            "model": "default",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "Name three rivers of Europe and the seas they flow into, please."}],
        }),
    );
    assert_eq!(status, 200, "{warm}");
    let (status, big) = chat(
        &base,
        &json!({
            "model": "default",
            "max_tokens": 10000,
            "temperature": 0,
            "stop": ["\n", "."],
            "messages": [{"role": "user", "content": "Say hello."}],
        }),
    );
    assert_eq!(status, 200, "{big}");
}

/// A web page cannot drive a key-less server: a `text/plain` POST (no CORS preflight) is
/// refused, as is any state-changing request from a foreign `Origin`, and a foreign `Host`
/// (DNS rebinding) cannot read it.
#[test]
fn a_web_page_cannot_use_a_key_less_server() {
    let (_server, base) = start_server(&mut serve(&[]));
    let body = json!({"model": "default", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let plain = ("Content-Type", "text/plain");
    let foreign = ("Origin", "http://evil.example");
    let (status, text) = request(&base, "POST", "/v1/chat/completions", &[plain], &body);
    assert_eq!(status, 415, "{text}");
    let (status, text) = request(
        &base,
        "POST",
        "/v1/chat/completions",
        &[plain, foreign],
        &body,
    );
    assert_eq!(status, 403, "{text}");
    let (status, text) = request(
        &base,
        "POST",
        "/v1/chat/completions",
        &[JSON, foreign],
        &body,
    );
    assert_eq!(status, 403, "{text}");
    let (status, text) = request(&base, "POST", "/admin/reload", &[foreign], "");
    assert_eq!(status, 403, "{text}");
    let rebound = ("Host", "evil.example:8080");
    for path in ["/v1/runs", "/admin/status", "/v1/models"] {
        let (status, text) = request(&base, "GET", path, &[rebound], "");
        assert_eq!(status, 403, "{path}: {text}");
    }
    // The server's own origin and loopback names still get through (to the model lookup:
    // 404 for a model that does not exist, so nothing is generated).
    let own = format!("http://{}", addr(&base));
    let unknown = body.replace("\"default\"", "\"no-such-model\"");
    let (status, text) = request(
        &base,
        "POST",
        "/v1/chat/completions",
        &[JSON, ("Origin", &own)],
        &unknown,
    );
    assert_eq!(status, 404, "{text}");
    let port = addr(&base).port();
    let (status, text) = request(
        &base,
        "GET",
        "/v1/runs",
        &[("Host", &format!("localhost:{port}"))],
        "",
    );
    assert_eq!(status, 200, "{text}");
}

/// A key-less server does not listen beyond loopback unless told to.
#[test]
fn a_key_less_server_refuses_a_public_address() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_staircase"))
        .args(["serve", "--host", "0.0.0.0", "--port", "0", "--no-watch"])
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "it must refuse: {stderr}");
    assert!(stderr.contains("--allow-unauthenticated"), "{stderr}");
}

/// Too many messages or stop strings are the request's fault (400 naming the field).
#[test]
fn per_request_caps_are_400s() {
    let dir = scratch("caps");
    let config = config_with(&dir, "max_messages = 8");
    let (_server, base) = start_server(&mut serve(&["--config", &config]));
    let messages: Vec<Value> = (0..9)
        .map(|_| json!({"role": "user", "content": "hi"}))
        .collect();
    let (status, error) = chat(&base, &json!({"model": "moa", "messages": messages}));
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["param"], "messages");
    let stops: Vec<String> = (0..5).map(|i| format!("s{i}")).collect();
    let (status, error) = chat(
        &base,
        &json!({"model": "default", "stop": stops, "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["param"], "stop");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The value of the counter `name` with the model label `model` in `/metrics` (0 when absent).
fn counter(base: &str, name: &str, model: &str) -> f64 {
    let (_, text) = request(base, "GET", "/metrics", &[], "");
    let prefix = format!("{name}{{model=\"{model}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A streaming client that stops reading is cancelled once its socket and the server's
/// bounded buffer are full: its run is dropped and counted, instead of generating on.
#[test]
fn a_streaming_client_that_stops_reading_is_cancelled() {
    let dir = scratch("stall");
    // A small send buffer: the kernel's own grows to megabytes, which a whole answer of the
    // 135M model (about 50 KB of events) fits in, so the stream would never back up.
    let config = config_with(
        &dir,
        "stream_write_timeout_secs = 1\nsend_buffer_bytes = 4096",
    );
    let (_server, base) = start_server(&mut serve(&["--config", &config]));
    let body = json!({
        "model": "default",
        "stream": true,
        "max_tokens": 100000,
        "temperature": 1.0,
        "seed": 7,
        "messages": [{"role": "user", "content": "Write a very long story about a city of stairs, chapter after chapter."}],
    })
    .to_string();
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A small receive window, so the server's writes back up after a few events.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(addr(&base)).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            addr(&base),
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut first = [0; 12];
        stream.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        // Read nothing more; wait (bounded) for the server to count the stall.
        let deadline = std::time::Instant::now() + STUCK;
        while counter(&base, "staircase_requests_stalled_total", "default") < 1.0 {
            assert!(std::time::Instant::now() < deadline, "the stalled stream was never cancelled");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drop(stream);
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM stops the server: new connections end, and one still trickling a body is cut at
/// the shutdown deadline; the process exits cleanly rather than being killed by the signal.
#[cfg(unix)]
#[test]
fn sigterm_drains_and_exits() {
    let dir = scratch("sigterm");
    let config = config_with(
        &dir,
        "shutdown_grace_secs = 1\nbody_timeout_secs = 600\nheader_timeout_secs = 600",
    );
    let (mut server, base) = start_server(&mut serve(&["--config", &config]));
    let mut trickle = connect(&base);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{",
        addr(&base)
    );
    trickle.write_all(head.as_bytes()).unwrap();
    let _idle = connect(&base);
    let pid = server.0.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = wait_bounded(&mut server.0, STUCK);
    assert!(
        status.is_some_and(|s| s.success()),
        "the server drained and exited on SIGTERM: {status:?}"
    );
    let _: &Server = &server;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `[server] metrics_require_key` puts `/metrics` behind the key; `/health` stays open.
#[test]
fn metrics_can_require_the_key() {
    let dir = scratch("metrics-key");
    let file = dir.join("staircase.toml");
    std::fs::write(&file, "[server]\nmetrics_require_key = true\n").unwrap();
    let (_server, base) = start_server(
        serve(&["--config", file.to_str().unwrap()])
            .args(["--api-key-env", "STAIRCASE_LIMITS_KEY"])
            .env("STAIRCASE_LIMITS_KEY", "secret"),
    );
    assert_eq!(request(&base, "GET", "/metrics", &[], "").0, 401);
    let bearer = ("Authorization", "Bearer secret");
    let (status, text) = request(&base, "GET", "/metrics", &[bearer], "");
    assert_eq!(status, 200, "{text}");
    assert_eq!(request(&base, "GET", "/health", &[], "").0, 200);
    let _ = std::fs::remove_dir_all(&dir);
}
