//! Output guards in `staircase serve`, end to end: the real binary on a loopback port, the
//! real default model made to say an e-mail address (it copies the conversation's pattern),
//! and the built-in guard components. The address never reaches the client, whole or
//! streamed, from a plain model or a pipeline; the same model under a name no guard covers
//! says it (so the guard is what removed it); a guarded run's replay shows only what was
//! released; a stop ends the answer with `content_filter`
//! through the official OpenAI client; a guard that cannot start fails closed unless opened;
//! a guard that spins, hoards memory or traps fails its own stream closed (open where the
//! operator says so) while an answer asked beside it comes back whole; a guard swapped under
//! load fails no request and guards each answer with exactly one version.

mod serve_support;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use serve_support::{
    install_plugin, path, python_with, run_client_script, scratch, serve, start_server,
};
use staircase::plugin::builtin::guest_manifest;

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
    /// `system_fingerprint` (a stream's last).
    fingerprint: String,
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
        fingerprint: String::new(),
    };
    if !stream {
        let whole: Value = serde_json::from_str(&body).unwrap_or_default();
        let choice = &whole["choices"][0];
        answer.fingerprint = whole["system_fingerprint"].as_str().unwrap_or("").into();
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
        if let Some(fingerprint) = chunk["system_fingerprint"].as_str() {
            answer.fingerprint = fingerprint.into();
        }
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
                if model == "guarded" {
                    replayed_without_the_secret(&base, &answer, &case).await;
                }
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

/// A guarded pipeline run, replayed after its answer: listed as guarded; its events, report
/// and traces hold no text from before the guards; its `released` events are the answer the
/// client got, and its verdicts are on the output node.
async fn replayed_without_the_secret(base: &str, answer: &Answer, case: &str) {
    let get = |path: String| async move {
        let response = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path}");
        response.text().await.unwrap()
    };
    let listed: Value = serde_json::from_str(&get("/v1/runs".into()).await).unwrap();
    let run = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == answer.run_id.as_str())
        .unwrap_or_else(|| panic!("{case}: listed in {listed}"));
    assert_eq!(run["guarded"], true, "{case}");
    let events = get(format!("/v1/runs/{}/events", answer.run_id)).await;
    assert!(!events.contains(SECRET), "{case}: {events}");
    let events: Vec<Value> = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    let released: String = events
        .iter()
        .filter(|e| e["type"] == "released")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(released, answer.text, "{case}: the answer the client got");
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "guard" && e["event"]["verdict"] == "redacted"),
        "{case}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "node_delta" && e["tokens"].as_u64() > Some(0)),
        "{case}: token counts stay"
    );
    let last = events.last().unwrap();
    assert_eq!(last["type"], "run_finished", "{case}");
    for trace in ["trace", "trace.svg"] {
        let trace = get(format!("/v1/runs/{}/{trace}", answer.run_id)).await;
        assert!(!trace.contains(SECRET), "{case}: {trace}");
    }
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

/// A pipeline answering with the default model under the hostile guard fixture, which attacks
/// with `attack` on its first chunk.
fn hostile_pipeline(name: &str, attack: &str, fail_open: bool) -> String {
    format!(
        r#"
name = "{name}"
[[nodes]]
id = "answer"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 8
[[guards]]
plugin = "hostile-guard"
fail_open = {fail_open}
config = {{ attack = "{attack}" }}
"#
    )
}

/// Guards that spin to their deadline, allocate to their memory limit or trap, each on the
/// first chunk of its stream, asked at once with an unguarded answer: each hostile stream
/// stops (`content_filter`, the refusal naming the guard, a `failed` event) with none of the
/// model's text after the failure, streamed or whole; the fail-open one passes the answer on;
/// the unguarded answer and `/health` are unharmed.
#[test]
fn a_looping_hungry_or_trapping_guard_fails_its_stream_closed_and_harms_no_other() {
    let dir = scratch("guards-hostile");
    let plugins = dir.join("plugins");
    let pipelines = dir.join("pipelines");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::create_dir_all(&pipelines).unwrap();
    let manifest = std::fs::read_to_string(guest_manifest("fixtures/hostile-guard")).unwrap();
    install_plugin(&plugins, "hostile-guard", "hostile-guard", &manifest);
    let attacks = ["loop", "grow", "trap"];
    for attack in attacks {
        std::fs::write(
            pipelines.join(format!("{attack}.toml")),
            hostile_pipeline(attack, attack, false),
        )
        .unwrap();
    }
    std::fs::write(
        pipelines.join("open.toml"),
        hostile_pipeline("open", "trap", true),
    )
    .unwrap();
    let (server, base) = start_server(&mut serve(&[
        "--plugins",
        path(&plugins),
        "--pipelines",
        path(&pipelines),
    ]));
    runtime().block_on(async {
        for stream in [false, true] {
            let (hostile, open, unguarded) = tokio::join!(
                futures_util::future::join_all(attacks.map(|attack| ask(&base, attack, stream))),
                ask(&base, "open", stream),
                ask(&base, UNGUARDED, stream),
            );
            for (attack, answer) in attacks.iter().zip(hostile) {
                let case = format!("{attack}, stream {stream}: {}", answer.body);
                assert_eq!(answer.status, 200, "{case}");
                assert_eq!(answer.finish_reason, "content_filter", "{case}");
                assert!(answer.text.is_empty(), "{case}");
                assert!(answer.body.contains("guard hostile-guard failed"), "{case}");
                let events = &answer.report["guards"]["events"];
                assert_eq!(events[0]["verdict"], "failed", "{case}");
                assert_eq!(events[0]["open"], false, "{case}");
            }
            let case = format!("open, stream {stream}: {}", open.body);
            assert_eq!(open.status, 200, "{case}");
            assert_ne!(open.finish_reason, "content_filter", "{case}");
            assert!(!open.text.is_empty(), "{case}");
            assert_eq!(open.report["guards"]["events"][0]["open"], true, "{case}");
            let case = format!("unguarded, stream {stream}: {}", unguarded.body);
            assert_eq!(unguarded.status, 200, "{case}");
            assert!(unguarded.text.contains(SECRET), "{case}");
        }
        let health = reqwest::get(format!("{base}/health")).await.unwrap();
        assert!(health.status().is_success());
    });
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Answers each client asks for at most in the swap test (a bound, should the new version
/// never arrive).
const SWAP_MAX_ANSWERS: usize = 150;
/// Answers stopped by the new version the swap test waits for.
const SWAP_NEW_ANSWERS: usize = 6;

/// The built-in guard `artifact` as the user plugin `swap-guard` at `version`.
fn swap_guard(plugins: &std::path::Path, artifact: &str, version: &str) {
    let manifest = std::fs::read_to_string(guest_manifest(artifact))
        .unwrap()
        .replace(&format!("name = \"{artifact}\""), "name = \"swap-guard\"")
        .replace("version = \"0.1.0\"", &format!("version = \"{version}\""));
    install_plugin(plugins, "swap-guard", artifact, &manifest);
}

/// Three clients ask for the secret, streamed and whole, while `swap-guard` 1.0.0 (the
/// pattern guard: redacts) is replaced by 2.0.0 (the phrase guard: stops) in the watched
/// plugin folder. No request fails; each answer's fingerprint names exactly one version, and
/// the answer is that version's doing alone (redacted and finished, or stopped); both
/// versions served.
#[test]
fn a_guard_swapped_under_load_fails_no_request_and_guards_each_answer_with_one_version() {
    let dir = scratch("guards-swap");
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    swap_guard(&plugins, "pattern-guard", "1.0.0");
    let config = dir.join("staircase.toml");
    std::fs::write(
        &config,
        "[[guards]]\nplugin = \"swap-guard\"\nmodels = [\"default\"]\nconfig = { phrases = \"example.org\" }\n",
    )
    .unwrap();
    // Watching: no `--no-watch`.
    let (server, base) = start_server(
        Command::new(env!("CARGO_BIN_EXE_staircase"))
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(["--plugins", path(&plugins), "--config", path(&config)]),
    );
    let answers = runtime().block_on(async {
        let new_answers = Arc::new(AtomicUsize::new(0));
        let clients = (0..3).map(|client| {
            let (base, plugins) = (base.clone(), plugins.clone());
            let new_answers = new_answers.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while answers.len() < SWAP_MAX_ANSWERS
                    && new_answers.load(Ordering::SeqCst) < SWAP_NEW_ANSWERS
                {
                    let answer = ask(&base, "default", answers.len() % 2 == 1).await;
                    if answer.finish_reason == "content_filter" {
                        new_answers.fetch_add(1, Ordering::SeqCst);
                    }
                    answers.push(answer);
                    // The swap, once every client is under way.
                    if client == 0 && answers.len() == 3 {
                        swap_guard(&plugins, "phrase-guard", "2.0.0");
                    }
                }
                answers
            })
        });
        let mut answers = Vec::new();
        for client in futures_util::future::join_all(clients).await {
            answers.extend(client.unwrap());
        }
        answers
    });
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    // Each answer names one version of the guard (a name, version and hash: a version
    // caught between its manifest and its component counts as its own), and every answer
    // of one version was treated alike.
    let mut behaviour_by_version = std::collections::BTreeMap::new();
    for answer in &answers {
        let case = format!("{}: {}", answer.fingerprint, answer.body);
        assert_eq!(answer.status, 200, "{case}");
        assert!(!answer.body.contains(SECRET), "{case}");
        let versions: Vec<&str> = answer
            .fingerprint
            .split(';')
            .filter(|part| part.starts_with("swap-guard@"))
            .collect();
        assert_eq!(versions.len(), 1, "{case}");
        let redacted = answer.text.contains("[redacted]");
        let stopped = answer.finish_reason == "content_filter";
        assert!(redacted != stopped, "one guard's doing: {case}");
        let behaviour = if redacted { "redacts" } else { "stops" };
        let first = behaviour_by_version
            .entry(versions[0].to_string())
            .or_insert(behaviour);
        assert_eq!(*first, behaviour, "{case}");
    }
    let old = behaviour_by_version
        .iter()
        .filter(|(v, _)| v.starts_with("swap-guard@1.0.0"));
    assert!(
        old.clone().count() == 1 && old.clone().all(|(_, b)| *b == "redacts"),
        "{behaviour_by_version:?}"
    );
    assert!(
        behaviour_by_version
            .iter()
            .any(|(v, b)| v.starts_with("swap-guard@2.0.0") && *b == "stops"),
        "{behaviour_by_version:?}"
    );
}
