//! `staircase serve` as an operator who runs vLLM or llama-server configures and watches it,
//! black-box: the real binary on a loopback port with the real default model, configured
//! only by `STAIRCASE_*` environment variables (as a container or a systemd unit does);
//! contradictory key settings refused before anything loads.

mod serve_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use serve_support::{Server, path, read_address, scratch, wait_bounded};

/// Far beyond anything the server takes here; only ends a test that already failed.
const STUCK: Duration = Duration::from_secs(300);

const KEY: &str = "operator-key-0123456789";

/// A pipeline of one agent, so the pipeline folder's setting shows in `/v1/models`.
const SOLO: &str = r#"name = "env-solo"
[[nodes]]
id = "only"
kind = "agent"
plugin = "proposer"
model = "default"
"#;

/// `staircase serve` with no flags and an environment cleared of every `STAIRCASE_*`
/// variable the caller may have, so only what a test sets configures it.
fn bare_serve() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_staircase"));
    command.arg("serve");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("STAIRCASE_") {
            command.env_remove(name);
        }
    }
    command
}

/// The server's stdout (its address line) and stderr (its log), line by line.
struct Output {
    _server: Server,
    base: String,
    log: mpsc::Receiver<String>,
}

impl Output {
    fn start(command: &mut Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the staircase binary starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let server = Server(child);
        let (tx, log) = mpsc::channel();
        // Every log line is kept, so the server never writes into a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("server: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            _server: server,
            base: read_address(stdout),
            log,
        }
    }

    /// The first log line (from now on, or already logged) that satisfies `wanted`.
    fn log_line(&self, wanted: impl Fn(&str) -> bool) -> String {
        loop {
            match self.log.recv_timeout(STUCK) {
                Ok(line) if wanted(&line) => return line,
                Ok(_) => {}
                Err(error) => panic!("no such log line ({error})"),
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(STUCK).build().unwrap()
}

/// A port nobody listens on now (the system's choice, released again).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every setting an operator passes through the environment takes effect: the host name
/// (resolved, still loopback), the port, the key (from a key file), the output cap, the
/// pipeline folder, and the local engine's threads and context size.
#[test]
fn serve_takes_its_settings_from_the_environment() {
    let dir = scratch("operator-env");
    let pipelines = dir.join("pipelines");
    std::fs::create_dir_all(&pipelines).unwrap();
    std::fs::write(pipelines.join("env-solo.toml"), SOLO).unwrap();
    let key_file = dir.join("key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let port = free_port();
    let output = Output::start(
        bare_serve()
            .env("STAIRCASE_HOST", "localhost")
            .env("STAIRCASE_PORT", port.to_string())
            .env("STAIRCASE_API_KEY_FILE", path(&key_file))
            .env("STAIRCASE_MAX_TOKENS", "3")
            .env("STAIRCASE_PIPELINES", path(&pipelines))
            .env("STAIRCASE_NO_WATCH", "true")
            .env("STAIRCASE_THREADS", "1")
            .env("STAIRCASE_CTX_SIZE", "1024")
            .env("RUST_LOG", "info"),
    );
    assert_eq!(output.base, format!("http://127.0.0.1:{port}"));
    let engine = output.log_line(|l| l.contains("local engine ready"));
    assert!(
        engine.contains("n_ctx=1024") && engine.contains("threads=1"),
        "{engine}"
    );
    let base = &output.base;
    runtime().block_on(async {
        let client = client();
        let models = format!("{base}/v1/models");
        let refused = client.get(&models).send().await.unwrap();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        let listed = client.get(&models).bearer_auth(KEY).send().await.unwrap();
        let id = request_id(&listed);
        let listed: Value = listed.json().await.unwrap();
        let ids: Vec<&str> = listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["id"].as_str())
            .collect();
        assert!(ids.contains(&"env-solo"), "{ids:?}");
        // The access log (text by default): this request's line, with its id and status.
        let access = output.log_line(|l| l.contains(&format!("id={id}")));
        assert!(
            access.contains("staircase::access")
                && access.contains("method=GET")
                && access.contains("path=/v1/models")
                && access.contains("status=200"),
            "{access}"
        );
        let answer: Value = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&json!({
                "model": "default",
                "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
                "max_tokens": 50,
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["usage"]["completion_tokens"], 3, "{answer}");
        assert_eq!(answer["choices"][0]["finish_reason"], "length", "{answer}");
    });
    drop(output);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The request id a response carries.
fn request_id(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-request-id")
        .expect("every response carries x-request-id")
        .to_str()
        .unwrap()
        .to_string()
}

/// The log's JSON object for request `id` (every line of a JSON log is an object).
fn access_object(output: &Output, id: &str) -> Value {
    let line = output.log_line(|line| {
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a JSON log line is an object ({e}): {line}"));
        value["target"] == "staircase::access" && value["id"] == id
    });
    serde_json::from_str(&line).unwrap()
}

/// With `--log-format json` (here from `STAIRCASE_LOG_FORMAT`), every log line is a JSON
/// object and every request has one access line: the request id it was answered with (a
/// completion's is its run id, a client's own id wins), method, path, status, and a
/// completion's tokens, whole or streamed; a refused request is logged too.
#[test]
fn every_request_has_an_access_line_in_the_json_log() {
    let output = Output::start(
        bare_serve()
            .args(["--host", "127.0.0.1", "--port", "0", "--no-watch"])
            .env("STAIRCASE_LOG_FORMAT", "json")
            .env_remove("RUST_LOG"),
    );
    let base = &output.base;
    runtime().block_on(async {
        let client = client();
        let missing = client
            .get(format!("{base}/no-such-path"))
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        let line = access_object(&output, &request_id(&missing));
        assert_eq!(
            (&line["method"], &line["path"], &line["status"]),
            (&json!("GET"), &json!("/no-such-path"), &json!(404)),
            "{line}"
        );
        assert!(line["latency_ms"].is_number(), "{line}");
        assert!(line.get("completion_tokens").is_none(), "{line}");

        let whole = client
            .post(format!("{base}/v1/chat/completions"))
            .json(&json!({
                "model": "default",
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 4,
            }))
            .send()
            .await
            .unwrap();
        let id = request_id(&whole);
        assert_eq!(
            whole.headers()["x-staircase-run-id"].to_str().unwrap(),
            id,
            "a completion's request id is its run id"
        );
        let answer: Value = whole.json().await.unwrap();
        let line = access_object(&output, &id);
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["path"], "/v1/chat/completions", "{line}");
        assert_eq!(line["complete"], true, "{line}");
        assert_eq!(
            line["prompt_tokens"], answer["usage"]["prompt_tokens"],
            "{line}"
        );
        assert_eq!(
            line["completion_tokens"], answer["usage"]["completion_tokens"],
            "{line}"
        );

        let streamed = client
            .post(format!("{base}/v1/chat/completions"))
            .json(&json!({
                "model": "default",
                "messages": [{"role": "user", "content": "Say goodbye."}],
                "max_tokens": 4,
                "stream": true,
                "stream_options": {"include_usage": true},
            }))
            .send()
            .await
            .unwrap();
        let id = request_id(&streamed);
        let text = streamed.text().await.unwrap();
        let usage = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|data| serde_json::from_str::<Value>(data).ok())
            .find_map(|chunk| chunk.get("usage").filter(|u| !u.is_null()).cloned())
            .expect("the stream carries its usage");
        let line = access_object(&output, &id);
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(
            line["completion_tokens"], usage["completion_tokens"],
            "{line}"
        );
        assert_eq!(line["prompt_tokens"], usage["prompt_tokens"], "{line}");

        // A client's own id is echoed and logged, with the run beside it; one that could
        // split a log line is replaced.
        let traced = client
            .post(format!("{base}/v1/chat/completions"))
            .header("x-request-id", "client-trace-7")
            .json(&json!({
                "model": "default",
                "messages": [{"role": "user", "content": "Say yes."}],
                "max_tokens": 2,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(request_id(&traced), "client-trace-7");
        let run = traced.headers()["x-staircase-run-id"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(traced.status(), StatusCode::OK);
        let line = access_object(&output, "client-trace-7");
        assert_eq!(line["run_id"], run.as_str(), "{line}");
        let forged = client
            .get(format!("{base}/health"))
            .header("x-request-id", "a\tb")
            .send()
            .await
            .unwrap();
        let id = request_id(&forged);
        assert!(id.starts_with("req-"), "{id}");
        assert_eq!(access_object(&output, &id)["path"], "/health");
    });
}

/// Two single keys (the environment's `STAIRCASE_API_KEY` and a key file on the command
/// line) are a contradiction: the server refuses to start and names both, before it loads a
/// model.
#[test]
fn two_single_keys_stop_serve_naming_both() {
    let dir = scratch("operator-two-keys");
    let key_file = dir.join("key");
    std::fs::write(&key_file, "file-key\n").unwrap();
    let mut child = bare_serve()
        .args(["--port", "0", "--api-key-file", path(&key_file)])
        .env("STAIRCASE_API_KEY", "env-key")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the staircase binary starts");
    let mut stderr = child.stderr.take().unwrap();
    let status = wait_bounded(&mut child, STUCK).expect("serve exits");
    assert!(!status.success());
    let mut message = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut message).unwrap();
    assert!(
        message.contains("--api-key (STAIRCASE_API_KEY)")
            && message.contains("--api-key-file (STAIRCASE_API_KEY_FILE)"),
        "{message}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `staircase completions bash` writes a script that completes the subcommands and their
/// flags (`serve`, `--api-key`); zsh and fish scripts come from the same definition.
#[test]
fn completions_name_the_subcommands_and_flags() {
    for shell in ["bash", "zsh", "fish"] {
        let output = Command::new(env!("CARGO_BIN_EXE_staircase"))
            .args(["completions", shell])
            .output()
            .expect("the staircase binary runs");
        assert!(output.status.success(), "{shell}");
        let script = String::from_utf8(output.stdout).unwrap();
        assert!(script.contains("serve"), "{shell}: {script}");
        // fish lists a long flag by its name (`-l api-key`), the others as `--api-key`.
        assert!(script.contains("api-key"), "{shell}");
        if shell == "bash" {
            assert!(script.contains("--api-key"), "{script}");
            assert!(script.contains("--log-format"), "{script}");
        }
    }
}
