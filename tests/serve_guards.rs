//! Output guards in `staircase serve`, end to end: the real binary on a loopback port, the
//! real default model made to say an e-mail address (it copies the conversation's pattern),
//! and the built-in guard components. The address never reaches the client, whole or
//! streamed, from a plain model or a pipeline; the same model under a name no guard covers
//! says it (so the guard is what removed it); a stop ends the answer with `content_filter`
//! through the official OpenAI client; a guard that cannot start fails closed unless opened.

mod serve_support;

use std::time::Duration;

use serde_json::{Value, json};
use serve_support::{path, python_with, run_client_script, scratch, serve, start_server};

/// A bound on any one HTTP exchange of these tests.
const HTTP_TIMEOUT: Duration = Duration::from_secs(300);
/// A bound on the Python client's whole run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(600);
const SECRET: &str = "ada@example.org";
/// The other name the default engine is served under (its file's), which no guard covers.
const UNGUARDED: &str = "SmolLM2-135M-Instruct.Q4_1";

/// The conversation after which the model answers with [`SECRET`].
fn conversation() -> Value {
    json!([
        {"role": "user", "content": "Say: bob@example.org"},
        {"role": "assistant", "content": "bob@example.org"},
        {"role": "user", "content": format!("Say: {SECRET}")},
    ])
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// What a test reads of one answer.
struct Answer {
    status: u16,
    /// The answer's text (streamed chunks joined).
    text: String,
    finish_reason: String,
    /// The `staircase` report (the error body when the status is not 200).
    report: Value,
    /// The whole response body: every byte the client got.
    body: String,
    run_id: String,
}

async fn ask(base: &str, model: &str, stream: bool) -> Answer {
    let client = reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .build()
        .unwrap();
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({
            "model": model,
            "messages": conversation(),
            "max_tokens": 20,
            "temperature": 0,
            "stream": stream,
        }))
        .send()
        .await
        .expect("the server answers");
    let status = response.status().as_u16();
    let run_id = response
        .headers()
        .get("x-staircase-run-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = response.text().await.unwrap();
    let mut answer = Answer {
        status,
        text: String::new(),
        finish_reason: String::new(),
        report: Value::Null,
        body: String::new(),
        run_id,
    };
    if !stream {
        let whole: Value = serde_json::from_str(&body).unwrap_or_default();
        let choice = &whole["choices"][0];
        answer.text = choice["message"]["content"].as_str().unwrap_or("").into();
        answer.finish_reason = choice["finish_reason"].as_str().unwrap_or("").into();
        answer.report = match status {
            200 => whole["staircase"].clone(),
            _ => whole,
        };
    }
    for data in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if let Some(choice) = chunk["choices"].get(0) {
            answer
                .text
                .push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            if let Some(reason) = choice["finish_reason"].as_str() {
                answer.finish_reason = reason.into();
            }
        }
        if !chunk["staircase"].is_null() {
            answer.report = chunk["staircase"].clone();
        }
    }
    answer.body = body;
    answer
}

#[test]
fn a_secret_never_reaches_the_client_from_a_guarded_model_or_pipeline() {
    let dir = scratch("guards-redact");
    let pipelines = dir.join("pipelines");
    std::fs::create_dir_all(&pipelines).unwrap();
    // A pipeline guards its own answer; the server's guard covers `default` only.
    std::fs::write(
        pipelines.join("guarded.toml"),
        r#"
name = "guarded"
[[nodes]]
id = "answer"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 20
[nodes.config]
system-prompt = "Do exactly as the user says."
[[guards]]
plugin = "pattern-guard"
"#,
    )
    .unwrap();
    let config = dir.join("staircase.toml");
    std::fs::write(
        &config,
        format!(
            "[pipelines]\ndirs = [{:?}]\n[[guards]]\nplugin = \"pattern-guard\"\nmodels = [\"default\"]\n",
            path(&pipelines)
        ),
    )
    .unwrap();
    let (server, base) = start_server(&mut serve(&["--config", path(&config)]));
    runtime().block_on(async {
        // The model says it where no guard covers it: what follows is the guards' doing.
        let said = ask(&base, UNGUARDED, false).await;
        assert_eq!(said.status, 200);
        assert!(
            said.text.contains(SECRET),
            "the unguarded model says it: {}",
            said.body
        );
        for model in ["default", "guarded"] {
            for stream in [false, true] {
                let answer = ask(&base, model, stream).await;
                let case = format!("{model}, stream {stream}: {}", answer.body);
                assert_eq!(answer.status, 200, "{case}");
                // Not in the answer, nor anywhere else in the response (the report's texts).
                assert!(!answer.body.contains(SECRET), "{case}");
                assert!(!answer.text.contains("example.org"), "{case}");
                assert!(answer.text.contains("[redacted]"), "{case}");
                assert_ne!(answer.finish_reason, "content_filter", "{case}");
                // A guarded pipeline's events (the text before the guards) are not replayed.
                let events = reqwest::get(format!("{base}/v1/runs/{}/events", answer.run_id))
                    .await
                    .unwrap();
                assert_eq!(events.status().as_u16(), 404, "{case}");
                let events = answer.report["guards"]["events"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                assert!(
                    events
                        .iter()
                        .any(|e| e["verdict"] == "redacted" && e["guard"] == "pattern-guard"),
                    "{case}"
                );
            }
        }
        let metrics = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("staircase_guard_verdicts_total")
                    && l.contains("verdict=\"redacted\"")),
            "{metrics}"
        );
    });
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stop_ends_the_answer_with_content_filter_through_the_openai_client() {
    let python = python_with("openai");
    let dir = scratch("guards-stop");
    let config = dir.join("staircase.toml");
    std::fs::write(
        &config,
        "[[guards]]\nplugin = \"phrase-guard\"\nconfig = { phrases = \"example.org\" }\n",
    )
    .unwrap();
    let (server, base) = start_server(&mut serve(&["--config", path(&config)]));
    let status = run_client_script(&python, "guard_client.py", &base, CLIENT_TIMEOUT);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        status.is_some_and(|s| s.success()),
        "the guard client checks failed (see the output above): {status:?}"
    );
}

#[test]
fn a_guard_that_cannot_start_fails_closed_unless_opened() {
    let dir = scratch("guards-broken");
    let config = dir.join("staircase.toml");
    // The same broken guard: closed on `default`, open on the other name.
    std::fs::write(
        &config,
        format!(
            r#"
[[guards]]
plugin = "pattern-guard"
models = ["default"]
config = {{ patterns = "(unclosed" }}
[[guards]]
plugin = "pattern-guard"
models = ["{UNGUARDED}"]
fail_open = true
config = {{ patterns = "(unclosed" }}
"#
        ),
    )
    .unwrap();
    let (server, base) = start_server(&mut serve(&["--config", path(&config)]));
    runtime().block_on(async {
        for stream in [false, true] {
            let answer = ask(&base, "default", stream).await;
            assert!(
                !answer.body.contains(SECRET),
                "stream {stream}: {}",
                answer.body
            );
            assert!(
                answer.body.contains("pattern-guard"),
                "stream {stream}: {}",
                answer.body
            );
            if !stream {
                assert_eq!(answer.status, 500, "{}", answer.body);
            }
        }
        let open = ask(&base, UNGUARDED, false).await;
        assert_eq!(open.status, 200, "{}", open.body);
        assert!(
            open.text.contains(SECRET),
            "fail-open passes it: {}",
            open.body
        );
        let verdict = &open.report["guards"]["events"][0]["verdict"];
        assert_eq!(verdict, "failed", "{}", open.body);
        // The server still answers.
        let health = reqwest::get(format!("{base}/health")).await.unwrap();
        assert!(health.status().is_success());
    });
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
