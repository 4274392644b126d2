//! A plugin author's three commands, end to end, outside the repository: `staircase plugin
//! new` scaffolds a role plugin into a folder under the system's temporary folder, `plugin
//! build` compiles it with the real toolchain (cargo for Rust, componentize-py for Python,
//! componentize-js for JavaScript) and checks it, and `plugin dev` installs it into a running
//! `serve`, which answers a chat request through the scaffold's sample pipeline; an edit of
//! the source is rebuilt and swapped in for the next request. A
//! missing toolchain is named with its install command, and nothing is built. The Rust SDK
//! also builds a plugin from its `cargo package`d crate. `plugin call` runs the built-in
//! plugins of every kind alone (and a hostile one, which fails naming its limit), and
//! `plugin wit` writes the WIT an author of another language needs.
//!
//! Rust plugin builds share one cargo target folder (`CARGO_TARGET_TMPDIR`), so only the
//! first compiles the SDK's dependencies.

mod serve_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serve_support::{path, start_server};

/// A bound on any one HTTP exchange of these tests.
const HTTP_TIMEOUT: Duration = Duration::from_secs(300);

/// The repository (the scaffolds must not need it; only the tests find things here).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A fresh folder outside the repository tree.
fn outside(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("staircase-authoring-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    assert!(
        !dir.starts_with(repo().canonicalize().unwrap()),
        "the scaffold must live outside the repository"
    );
    dir
}

/// The cargo target folder every Rust plugin build of these tests shares.
fn shared_cargo_target() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-authoring-cargo")
}

/// `staircase plugin ARGS...` in `cwd`, with the shared cargo target folder.
fn plugin(cwd: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_staircase"));
    command
        .current_dir(cwd)
        .arg("plugin")
        .args(args)
        .env("CARGO_TARGET_DIR", shared_cargo_target());
    command
}

/// `staircase ARGS...` in `cwd`.
fn staircase_in(cwd: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_staircase"));
    command.current_dir(cwd).args(args);
    command
}

fn run(mut command: Command) -> Output {
    let output = command.output().expect("the staircase binary runs");
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Scaffolds a role plugin `name` in `lang` into `parent` and builds it; returns its folder.
fn new_and_build(parent: &Path, name: &str, lang: &str, prepare: impl Fn(&Path)) -> PathBuf {
    new_and_build_kind(parent, name, "role", lang, prepare)
}

/// Scaffolds a plugin `name` of `kind` in `lang` into `parent` and builds it.
fn new_and_build_kind(
    parent: &Path,
    name: &str,
    kind: &str,
    lang: &str,
    prepare: impl Fn(&Path),
) -> PathBuf {
    run(plugin(
        parent,
        &["new", name, "--kind", kind, "--lang", lang],
    ));
    let folder = parent.join(name);
    prepare(&folder);
    let built = run(plugin(parent, &["build", name]));
    let stdout = String::from_utf8_lossy(&built.stdout);
    assert!(
        stdout.contains(&format!("plugin        {name} 0.1.0"))
            && stdout.contains(&format!("kind          {kind}"))
            && stdout.contains("type-checked and self-tested"),
        "the build ends with the check of the component:\n{stdout}"
    );
    assert!(folder.join(format!("{name}.wasm")).is_file());
    folder
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// What a served scaffold did: its answer, the calls its plugin served (from `/metrics`) and
/// the lines it logged in the run (from the run's events, as the live view reads them).
struct Served {
    answer: String,
    calls: u64,
    logged: Vec<String>,
}

/// A running `serve` on empty plugin and pipeline folders, and `plugin dev` building the
/// scaffold and installing each good version (and its sample pipeline) into them.
struct DevLoop {
    name: String,
    base: String,
    /// `plugin dev`'s stdout, line by line.
    lines: std::sync::mpsc::Receiver<String>,
    dev: serve_support::Server,
    server: serve_support::Server,
    served: PathBuf,
}

/// How long one build of a scaffold may take in `plugin dev` (a first Rust build compiles
/// the SDK's dependencies).
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// How long a running server may take to swap in an installed file.
const SWAP_TIMEOUT: Duration = Duration::from_secs(120);

impl DevLoop {
    fn start(folder: &Path, name: &str) -> Self {
        let served = outside(&format!("{name}-served"));
        let (plugins, pipelines) = (served.join("plugins"), served.join("pipelines"));
        std::fs::create_dir_all(&plugins).unwrap();
        std::fs::create_dir_all(&pipelines).unwrap();
        let (server, base) = start_server(
            Command::new(env!("CARGO_BIN_EXE_staircase"))
                .args(["serve", "--host", "127.0.0.1", "--port", "0"])
                .args(["--plugins", path(&plugins), "--pipelines", path(&pipelines)]),
        );
        let mut dev = plugin(
            folder.parent().unwrap(),
            &[
                "dev",
                path(folder),
                "--into",
                path(&plugins),
                "--pipelines",
                path(&pipelines),
            ],
        );
        let mut child = dev
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("plugin dev starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        DevLoop {
            name: name.to_string(),
            base,
            lines,
            dev: serve_support::Server(child),
            server,
            served,
        }
    }

    /// Reads `plugin dev`'s lines until `pick` takes one; fails the test with what it said
    /// when none comes within [`BUILD_TIMEOUT`].
    fn read_until<T>(&self, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + BUILD_TIMEOUT;
        let mut said = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("plugin dev did not say it ({e}):\n{said:#?}"));
            if let Some(picked) = pick(&line) {
                return picked;
            }
            said.push(line);
        }
    }

    /// Waits until `plugin dev` installs its next version of the component; returns the
    /// sha256 its check printed. A version it refused fails the test with what it said.
    fn next_install(&self) -> String {
        let mut sha = None;
        self.read_until(|line| {
            if let Some(value) = line.strip_prefix("sha256") {
                sha = Some(value.trim().to_string());
            }
            assert!(!line.starts_with("not installed"), "{line}");
            (line.starts_with("installed") && line.ends_with(".wasm"))
                .then(|| sha.clone().expect("the check comes before the install"))
        })
    }

    /// Waits until `plugin dev` refuses a version. An install first fails the test.
    fn next_refusal(&self) {
        self.read_until(|line| {
            assert!(!line.starts_with("installed"), "{line}");
            line.starts_with("not installed").then_some(())
        })
    }

    /// Once the server serves the component `sha` and the sample pipeline, asks the
    /// pipeline a question.
    fn ask(&self, sha: &str) -> Served {
        self.ask_once_it_serves(|plugin| plugin["sha256"] == sha)
    }

    /// Once the server's entry for the plugin satisfies `serves` and it has the sample
    /// pipeline, asks the pipeline a question.
    fn ask_once_it_serves(&self, serves: impl Fn(&serde_json::Value) -> bool) -> Served {
        let name = &self.name;
        let base = &self.base;
        runtime().block_on(async {
            let client = reqwest::Client::builder()
                .timeout(HTTP_TIMEOUT)
                .build()
                .unwrap();
            // Polls the server's own account of what it loaded; the swap is its watcher's.
            let deadline = std::time::Instant::now() + SWAP_TIMEOUT;
            loop {
                let status: serde_json::Value = client
                    .get(format!("{base}/admin/status"))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let serves_it = status["plugins"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["name"] == name.as_str() && serves(p));
                let has_pipeline = status["pipelines"]
                    .to_string()
                    .contains(&format!("\"{name}\""));
                if serves_it && has_pipeline {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the server did not swap the version in: {status:#}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            chat(&client, base, name).await
        })
    }
}

impl Drop for DevLoop {
    fn drop(&mut self) {
        // The processes first: neither may write into the folders being removed.
        for child in [&mut self.dev.0, &mut self.server.0] {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.served);
    }
}

/// Asks the pipeline `name` a question; returns what the plugin `name` did in the run.
async fn chat(client: &reqwest::Client, base: &str, name: &str) -> Served {
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": name,
            "messages": [{"role": "user", "content": "Say hi."}],
        }))
        .send()
        .await
        .expect("the server answers");
    let status = response.status();
    let run_id = response.headers()["x-staircase-run-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    assert_eq!(status, 200, "{body}");
    let events = text_of(client, format!("{base}/v1/runs/{run_id}/events")).await;
    let logged = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
        // Named with its version, as in the fingerprint.
        .filter(|e| {
            e["type"] == "plugin_log"
                && e["plugin"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(&format!("{name}@")))
        })
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect();
    let answer = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let metrics = text_of(client, format!("{base}/metrics")).await;
    let calls = metrics
        .lines()
        .filter(|l| l.starts_with("staircase_plugin_calls_total{"))
        .filter(|l| l.contains(&format!("plugin=\"{name}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64;
    Served {
        answer,
        calls,
        logged,
    }
}

/// The body of a GET.
async fn text_of(client: &reqwest::Client, url: String) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

/// The source of a scaffolded role: it logs "N messages in" in each language.
fn source_of_the_log_line(folder: &Path) -> PathBuf {
    ["src/lib.rs", "app.py", "plugin.js"]
        .into_iter()
        .map(|file| folder.join(file))
        .find(|file| std::fs::read_to_string(file).is_ok_and(|text| text.contains("messages in")))
        .expect("the role's source logs \"messages in\"")
}

/// The edit an author makes: the role's log line says more.
fn edit_the_log_line(folder: &Path) {
    let source = source_of_the_log_line(folder);
    let text = std::fs::read_to_string(&source).unwrap();
    std::fs::write(&source, text.replace("messages in", "messages in, edited")).unwrap();
}

/// The loop an author lives in: `plugin dev` installs the scaffold into a running server,
/// which answers through its sample pipeline; an edit of the source is rebuilt, checked and
/// swapped in, and the next request runs the new version. No request fails meanwhile.
fn assert_served_then_swapped(folder: &Path, name: &str) {
    let dev = DevLoop::start(folder, name);
    let first = dev.next_install();
    let served = dev.ask(&first);
    assert!(!served.answer.trim().is_empty(), "the pipeline answered");
    assert!(
        served.calls >= 2,
        "the scaffold's role was called (system prompt, messages, parameters): {}",
        served.calls
    );
    assert!(
        served.logged.iter().any(|m| m.contains("messages in")),
        "its host.log line is among the run's events: {:?}",
        served.logged
    );
    edit_the_log_line(folder);
    // While the new version builds, the old one keeps answering.
    let meanwhile = runtime().block_on(async {
        let client = reqwest::Client::new();
        chat(&client, &dev.base, name).await
    });
    assert!(!meanwhile.answer.trim().is_empty());
    let second = dev.next_install();
    assert_ne!(first, second, "the edit built a different component");
    let served = dev.ask(&second);
    assert!(
        served
            .logged
            .iter()
            .any(|m| m.contains("messages in, edited")),
        "the next request ran the edited version: {:?}",
        served.logged
    );
    // A save that does not build is reported, and the server keeps the last good version.
    let source = source_of_the_log_line(folder);
    let good = std::fs::read_to_string(&source).unwrap();
    std::fs::write(&source, format!("{good}\n%%% not code in any language\n")).unwrap();
    dev.next_refusal();
    let served = dev.ask(&second);
    assert!(
        served
            .logged
            .iter()
            .any(|m| m.contains("messages in, edited")),
        "the last good version still serves: {:?}",
        served.logged
    );
    std::fs::write(&source, good).unwrap();
}

#[test]
fn a_rust_role_plugin_goes_from_new_to_a_served_answer() {
    let parent = outside("rust");
    let folder = new_and_build(&parent, "my-rust-role", "rust", |_| {});
    assert!(
        folder.join("staircase-sdk/wit/v0.1.0/agent.wit").is_file(),
        "the SDK and its WIT are written beside the plugin"
    );
    // Alone, before any server: each call, its result, and the plugin's own log line.
    let called = run(plugin(
        &parent,
        &[
            "call",
            "my-rust-role/my-rust-role.wasm",
            "--prompt",
            "Hello there",
        ],
    ));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&called.stdout),
        String::from_utf8_lossy(&called.stderr),
    );
    for call in ["system-prompt", "params", "build-messages"] {
        assert!(
            stdout.contains(&format!("call          {call}")),
            "{stdout}"
        );
    }
    assert!(
        stdout.contains("\"Hello there\""),
        "the prompt reached the role: {stdout}"
    );
    assert!(
        stderr.contains("1 messages in"),
        "the plugin's host.log line is shown: {stderr}"
    );
    assert_served_then_swapped(&folder, "my-rust-role");
    // In a run, its log line is shown (stderr beside the answer) and kept in the report.
    let pipeline = folder.join("pipelines/my-rust-role.toml");
    let plugins = ["--plugins", path(&folder), "--pipeline", path(&pipeline)];
    let ran = run(staircase_in(
        &parent,
        &[&["run"][..], &plugins, &["Say hi."]].concat(),
    ));
    let stderr = String::from_utf8_lossy(&ran.stderr);
    assert!(
        stderr.contains("[agent] my-rust-role@0.1.0 debug: 1 messages in"),
        "{stderr}"
    );
    let ran = run(staircase_in(
        &parent,
        &[&["run", "--json"][..], &plugins, &["Say hi."]].concat(),
    ));
    let report: serde_json::Value = serde_json::from_slice(&ran.stdout).unwrap();
    let logs = &report["nodes"][0]["logs"];
    assert_eq!(logs[0]["plugin"], "my-rust-role@0.1.0", "{report}");
    // And what the role sent to its model: its system prompt, then the user's message.
    let messages = &report["nodes"][0]["prompts"][0]["messages"];
    assert_eq!(messages[0]["role"], "system", "{report}");
    assert_eq!(messages[1]["content"], "Say hi.", "{report}");
    assert!(
        logs[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("messages in")),
        "{logs}"
    );
    let _ = std::fs::remove_dir_all(&parent);
}

/// A guest component of this repository (a built-in or a fixture, by its folder under
/// `plugins/`) as `NAME.wasm` beside `NAME.toml` in a fresh folder, as an author has theirs;
/// returns the folder.
fn guest_folder(crate_dir: &str) -> PathBuf {
    let name = Path::new(crate_dir)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap();
    let parent = outside(&format!("call-{name}"));
    std::fs::copy(
        staircase::plugin::builtin::guest_artifact(name),
        parent.join(format!("{name}.wasm")),
    )
    .unwrap();
    std::fs::copy(
        staircase::plugin::builtin::guest_manifest(crate_dir),
        parent.join(format!("{name}.toml")),
    )
    .unwrap();
    parent
}

/// `staircase plugin call NAME.wasm ARGS...` on a guest from [`guest_folder`]; its output,
/// whether it succeeded or not. The folder is removed.
fn call_guest(crate_dir: &str, args: &[&str]) -> Output {
    let parent = guest_folder(crate_dir);
    let name = format!(
        "{}.wasm",
        Path::new(crate_dir).file_name().unwrap().to_string_lossy()
    );
    let output = plugin(&parent, &["call", &name])
        .args(args)
        .output()
        .expect("the staircase binary runs");
    let _ = std::fs::remove_dir_all(&parent);
    output
}

/// The stdout of a call that must succeed.
fn called(crate_dir: &str, args: &[&str]) -> String {
    let output = call_guest(crate_dir, args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "plugin call {crate_dir} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The stderr of a call that must fail.
fn refused(crate_dir: &str, args: &[&str]) -> String {
    let output = call_guest(crate_dir, args);
    assert!(
        !output.status.success(),
        "plugin call {crate_dir} {args:?} succeeded:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `plugin call` on a role that spins past its deadline ends with the limit it hit.
#[test]
fn plugin_call_reports_the_limit_a_looping_role_hits() {
    let stderr = refused("fixtures/hostile-role", &["--prompt", "attack:loop"]);
    assert!(
        stderr.contains("build-messages failed") && stderr.contains("deadline"),
        "the error names the call and the deadline it hit: {stderr}"
    );
}

/// `--model` starts the real engine for a plugin that asks it: a compressor summarising the
/// history with `model.complete` gets a summary from the default model; without `--model`
/// the same call is refused, naming why.
#[test]
fn plugin_call_with_a_model_runs_a_compressor_that_asks_the_model() {
    let parent = guest_folder("fixtures/model-compressor");
    // The fixture's 100 ms deadline is a pipeline's; a summary on two busy cores takes longer.
    let manifest = parent.join("model-compressor.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("call-ms = 100", "call-ms = 5000")).unwrap();
    let model = staircase::model::default_model_path().expect("the default model");
    let called = plugin(
        &parent,
        &["call", "model-compressor.wasm", "--budget", "16"],
    )
    .args(["--model", path(&model)])
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&called.stdout);
    assert!(
        called.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&called.stderr)
    );
    let summary = stdout
        .split_once("1 of 6 message(s)")
        .map(|(_, after)| after)
        .unwrap_or_else(|| panic!("one summary message came back: {stdout}"));
    assert!(summary.contains("System"), "{stdout}");
    let refused = plugin(
        &parent,
        &["call", "model-compressor.wasm", "--budget", "16"],
    )
    .output()
    .unwrap();
    assert!(!refused.status.success(), "no engine, no summary");
    let _ = std::fs::remove_dir_all(&parent);
}

/// `plugin call` on an aggregator that floods: its stdout ends the call with the stdio
/// limit it hit; its log is cut to the log budget and the rest counted in one line.
#[test]
fn plugin_call_reports_what_a_flooding_plugin_hit() {
    let parent = outside("floods");
    let script = |attack: &str| {
        let file = parent.join(format!("{attack}.json"));
        std::fs::write(
            &file,
            serde_json::json!({
                "prompt": "hi",
                "proposers": ["a"],
                "events": [{"push": {"from": "a", "text": attack}}],
            })
            .to_string(),
        )
        .unwrap();
        file.display().to_string()
    };
    let stdout_flood = script("stdout-flood");
    let stderr = refused("fixtures/hostile", &["--script", &stdout_flood]);
    assert!(
        stderr.contains("stdout and stderr bytes in one call") && stderr.contains("65536"),
        "the error names the stdio limit: {stderr}"
    );
    let log_flood = script("log-flood");
    let flooded = call_guest("fixtures/hostile", &["--script", &log_flood]);
    let stderr = String::from_utf8_lossy(&flooded.stderr);
    assert!(
        stderr.contains("log lines over the plugin's budget were dropped"),
        "one line counts what was dropped: {stderr}"
    );
    let shown = stderr.lines().filter(|l| l.contains("yyyy")).count() as u32;
    assert!(
        shown <= staircase::plugin::LogLimits::default().lines_per_call,
        "{shown} lines shown"
    );
    let _ = std::fs::remove_dir_all(&parent);
}

/// What a plugin prints is its log: stdout's lines at info, stderr's at warn, and a panic
/// message (on stderr) beside the trap it ends in.
#[test]
fn plugin_call_shows_what_a_plugin_printed_and_its_panic_message() {
    let printed = call_guest("fixtures/hostile-role", &["--prompt", "print: hello"]);
    let stderr = String::from_utf8_lossy(&printed.stderr);
    assert!(printed.status.success(), "{stderr}");
    assert!(
        stderr.contains("stdout: hostile-role on stdout")
            && stderr.contains("stderr: hostile-role on stderr"),
        "{stderr}"
    );
    let stderr = refused("fixtures/hostile-role", &["--prompt", "attack:panic"]);
    assert!(
        stderr.contains("stderr: ") && stderr.contains("hostile-role fixture panics on command"),
        "the panic message is shown: {stderr}"
    );
}

/// A guard alone, fed an address split over three chunks: the pushes hold its pieces, the
/// redaction replaces it whole, and no line of the output ever holds the address.
#[test]
fn plugin_call_shows_a_pattern_guard_redacting_an_address_split_over_chunks() {
    let stdout = called(
        "pattern-guard",
        &[
            "--chunk", "mail bob", "--chunk", "@example", "--chunk", ".org now",
        ],
    );
    assert_eq!(
        stdout.matches("call          push").count(),
        3,
        "one push per chunk: {stdout}"
    );
    assert!(stdout.contains("call          finish"), "{stdout}");
    assert!(
        stdout.contains("-> redact "),
        "a redaction verdict: {stdout}"
    );
    assert!(!stdout.contains("bob@example"), "{stdout}");
    let released = stdout
        .lines()
        .rev()
        .find_map(|l| l.trim_start().strip_prefix("released"))
        .unwrap_or_default()
        .trim();
    assert_eq!(released, r#""mail [redacted] now""#, "{stdout}");
}

/// A guard that stops: the stop verdict and its reason are shown, and the banned phrase
/// never leaves.
#[test]
fn plugin_call_shows_a_phrase_guard_stopping_a_stream() {
    let stdout = called(
        "phrase-guard",
        &[
            "--config",
            "phrases=stop",
            "--prompt",
            "go on, then stop here, please",
        ],
    );
    assert!(stdout.contains("-> stop: "), "a stop verdict: {stdout}");
    assert!(
        stdout.contains("stopped       guard phrase-guard"),
        "{stdout}"
    );
    for line in stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("released"))
    {
        assert!(!line.contains("stop"), "released a banned phrase: {line}");
    }
}

/// A guard that loops fails the call with the limit it hit, as the server fails it closed.
#[test]
fn plugin_call_reports_the_limit_a_looping_guard_hits() {
    let stderr = refused("fixtures/hostile-guard", &["--config", "attack=loop"]);
    assert!(
        stderr.contains("push failed") && stderr.contains("deadline"),
        "the error names the call and the deadline it hit: {stderr}"
    );
}

/// An aggregator on a short scripted run: the session opens, each push and finish is a
/// call followed by `next-step`, a warm-up comes first and the final step, once both
/// proposers finished, holds what they said. Without a script, the `--upstream` answers are
/// streamed in chunks to the same end.
#[test]
fn plugin_call_runs_the_moa_aggregator_on_a_script() {
    let dir = outside("moa-script");
    let script = dir.join("run.json");
    std::fs::write(
        &script,
        serde_json::json!({
            "prompt": "What is 2 + 2?",
            "proposers": ["a", {"id": "b", "label": "checker"}],
            "events": [
                {"push": {"from": "a", "text": "It is "}},
                {"push": {"from": "b", "text": "Four, "}},
                {"push": {"from": "a", "text": "4."}},
                {"finish": "a"},
                {"push": {"from": "b", "text": "clearly."}},
                {"finish": "b"},
            ],
        })
        .to_string(),
    )
    .unwrap();
    let stdout = called("moa-aggregator", &["--script", path(&script)]);
    for call in ["open", "push", "finish", "next-step"] {
        assert!(
            stdout.contains(&format!("call          {call}")),
            "{call}: {stdout}"
        );
    }
    // Once at the start, then after each of the six events.
    assert_eq!(
        stdout.matches("call          next-step").count(),
        7,
        "{stdout}"
    );
    assert!(stdout.contains("-> warm-up step"), "{stdout}");
    let final_step = stdout
        .split("-> final step")
        .nth(1)
        .unwrap_or_else(|| panic!("no final step: {stdout}"));
    assert!(
        ["It is ", "4.", "### checker", "Four, ", "clearly."]
            .iter()
            .all(|said| final_step.contains(said)),
        "the final prompt holds the proposers' answers: {final_step}"
    );

    let stdout = called(
        "moa-aggregator",
        &["--upstream", "solver=The sum is four.", "--mode", "layered"],
    );
    assert_eq!(stdout.matches("call          push").count(), 3, "{stdout}");
    assert!(
        stdout.contains("-> final step") && stdout.contains("The sum is four."),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A compressor on the default history and a small budget returns a shorter history that
/// keeps the system message and ends with the newest one.
#[test]
fn plugin_call_shows_the_truncate_compressor_shortening_a_history() {
    let stdout = called("truncate-compressor", &["--budget", "30"]);
    assert!(stdout.contains("call          compress"), "{stdout}");
    let answer = stdout
        .split("  -> ")
        .nth(1)
        .unwrap_or_else(|| panic!("no answer: {stdout}"));
    let kept: usize = answer
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no message count: {answer}"));
    assert!(answer.contains("of 6 message(s)") && kept < 6, "{answer}");
    assert!(
        answer.contains("helpful assistant"),
        "the system message stays: {answer}"
    );
    assert!(
        answer.contains("Which river"),
        "the newest message stays: {answer}"
    );
    assert!(
        !answer.contains("capital of France"),
        "the oldest turn goes: {answer}"
    );
}

/// A router's decision: a short easy prompt goes to the small model, a long one to the large.
#[test]
fn plugin_call_shows_the_rule_router_deciding() {
    let stdout = called(
        "rule-router",
        &["--models", "small,large", "--prompt", "Hi"],
    );
    assert!(stdout.contains("call          route"), "{stdout}");
    assert!(stdout.contains("-> small ("), "{stdout}");
    let stdout = called("rule-router", &["--prompt-tokens", "5000"]);
    assert!(stdout.contains("-> large ("), "{stdout}");
    // A flag of another kind is refused, not ignored.
    let stderr = refused("rule-router", &["--chunk", "x"]);
    assert!(stderr.contains("--chunk feeds a guard"), "{stderr}");
}

/// `plugin wit` writes the binary's WIT packages, the same as the SDK's.
#[test]
fn plugin_wit_writes_every_package() {
    let dir = outside("wit");
    let out = dir.join("wit");
    run(plugin(&dir, &["wit", "--out", path(&out)]));
    for version in ["v0.1.0", "v0.2.0", "v0.3.0"] {
        let written = std::fs::read_to_string(out.join(version).join("agent.wit")).unwrap();
        let sdk = std::fs::read_to_string(repo().join("sdk/wit").join(version).join("agent.wit"))
            .unwrap();
        assert_eq!(written, sdk, "{version}");
    }
    let guard = std::fs::read_to_string(out.join("v0.3.0/agent.wit")).unwrap();
    assert!(guard.contains("interface guard-policy"), "{guard}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_python_role_plugin_goes_from_new_to_a_served_answer() {
    let parent = outside("python");
    let folder = new_and_build(&parent, "my-python-role", "python", |_| {});
    // componentize-py's typed bindings, for the author's editor; the build used them.
    let host = std::fs::read_to_string(folder.join("wit_world/imports/host.py")).unwrap();
    assert!(
        host.contains("def log(level: LogLevel, message: str)"),
        "{host}"
    );
    let manifest = std::fs::read_to_string(folder.join("my-python-role.toml")).unwrap();
    assert!(
        manifest.contains("call-ms = 2000"),
        "an interpreter's first call gets time: {manifest}"
    );
    assert_served_then_swapped(&folder, "my-python-role");
    let _ = std::fs::remove_dir_all(&parent);
}

#[test]
fn a_javascript_role_plugin_goes_from_new_to_a_served_answer() {
    let parent = outside("js");
    let folder = new_and_build(&parent, "my-js-role", "js", link_node_modules);
    assert_served_then_swapped(&folder, "my-js-role");
    let _ = std::fs::remove_dir_all(&parent);
}

/// Every kind in every language, from `plugin new` to `plugin call` alone and to an answer
/// through `plugin dev` into a running server; then an edit of its manifest's version is
/// swapped in and answers the next request. The slow suite (15 builds, about 15 minutes
/// on two cores): `cargo test --test plugin_authoring -- --ignored`. CI runs a role in each
/// language (with an edit swapped in) and a guard in each language.
#[test]
#[ignore = "slow: 15 plugin builds; run with --ignored"]
fn every_kind_in_every_language_goes_from_new_to_a_served_answer() {
    let parent = outside("every");
    for lang in ["rust", "python", "js"] {
        for kind in ["role", "aggregator", "compressor", "router", "guard"] {
            let name = format!("{kind}-{lang}");
            let folder = new_and_build_kind(&parent, &name, kind, lang, |folder| {
                if lang == "js" {
                    link_node_modules(folder);
                }
            });
            let wasm = format!("{name}/{name}.wasm");
            let called = plugin(&parent, &["call", &wasm]).output().unwrap();
            assert!(
                called.status.success(),
                "{name} alone:\n{}\n{}",
                String::from_utf8_lossy(&called.stdout),
                String::from_utf8_lossy(&called.stderr)
            );
            let dev = DevLoop::start(&folder, &name);
            let served = dev.ask(&dev.next_install());
            assert!(!served.answer.trim().is_empty(), "{name} answered");
            // An edit any kind has: its manifest's version. The server swaps the new
            // version in and the next request runs it.
            let manifest = folder.join(format!("{name}.toml"));
            let text = std::fs::read_to_string(&manifest).unwrap();
            std::fs::write(
                &manifest,
                text.replace("version = \"0.1.0\"", "version = \"0.1.1\""),
            )
            .unwrap();
            let served = dev.ask_once_it_serves(|plugin| plugin["version"] == "0.1.1");
            assert!(!served.answer.trim().is_empty(), "{name} 0.1.1 answered");
            // A compressor is called once a history outgrows its budget, a guard's calls
            // are its stream's; the other kinds are on every request's path.
            if matches!(kind, "role" | "aggregator" | "router") {
                assert!(served.calls >= 1, "{name} was called: {}", served.calls);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&parent);
}

/// The npm types package (`sdk/js`, which the JavaScript example's packages link) types
/// every JavaScript template: each kind, scaffolded outside the repository with the
/// `tsconfig.json` of the package's README, checks clean under `tsc --checkJs`, and an
/// import used against the WIT fails the check.
#[test]
fn the_javascript_types_check_every_template_and_catch_a_misuse() {
    let parent = outside("js-types");
    let tsconfig = r#"{ "compilerOptions": { "allowJs": true, "checkJs": true, "noEmit": true, "strict": false,
    "module": "nodenext", "moduleResolution": "nodenext", "target": "es2022",
    "types": ["@staircase/agent-types"] },
  "include": ["*.js"] }"#;
    let tsc = |folder: &Path| {
        Command::new(folder.join("node_modules/.bin/tsc"))
            .args(["-p", "."])
            .current_dir(folder)
            .output()
            .expect("the example's packages hold tsc")
    };
    for kind in ["role", "aggregator", "compressor", "router", "guard"] {
        let name = format!("typed-{kind}");
        run(plugin(
            &parent,
            &["new", &name, "--kind", kind, "--lang", "js"],
        ));
        let folder = parent.join(&name);
        link_node_modules(&folder);
        std::fs::write(folder.join("tsconfig.json"), tsconfig).unwrap();
        let checked = tsc(&folder);
        assert!(
            checked.status.success(),
            "{kind}: {}",
            String::from_utf8_lossy(&checked.stdout)
        );
    }
    let folder = parent.join("typed-role");
    let source = folder.join("plugin.js");
    let text = std::fs::read_to_string(&source).unwrap();
    std::fs::write(&source, format!("{text}\nlog('loud', 'no such level');\n")).unwrap();
    let checked = tsc(&folder);
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(
        !checked.status.success() && said.contains("LogLevel"),
        "a log level the WIT does not have: {said}"
    );
    let _ = std::fs::remove_dir_all(&parent);
}

/// With a search path that lacks the toolchain, `plugin build` names the missing tool and
/// the command that installs it, and writes no component.
#[test]
fn a_missing_toolchain_is_named_with_its_install_command() {
    let parent = outside("missing");
    let empty_path = parent.join("empty-bin");
    std::fs::create_dir_all(&empty_path).unwrap();
    for (lang, tool, install) in [
        (
            "python",
            "componentize-py",
            "python3 -m pip install componentize-py==0.25.1",
        ),
        ("js", "node", "nodejs"),
        ("rust", "cargo", "rustup.rs"),
    ] {
        let name = format!("no-{lang}");
        run(plugin(
            &parent,
            &["new", &name, "--kind", "role", "--lang", lang],
        ));
        let output = plugin(&parent, &["build", &name])
            .env("PATH", &empty_path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{lang}: the build fails");
        assert!(
            stderr.contains(&format!("{tool} is not installed")) && stderr.contains(install),
            "{lang}: the error names {tool} and how to install it: {stderr}"
        );
        assert!(
            !parent.join(&name).join(format!("{name}.wasm")).exists(),
            "{lang}: nothing was built"
        );
    }
    // JavaScript with node but without the plugin's packages: `npm install` is the fix.
    let output = plugin(&parent, &["build", "no-js"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("npm install --prefix"),
        "the error says to install the plugin's packages: {stderr}"
    );
    let _ = std::fs::remove_dir_all(&parent);
}

/// `cargo package` of the SDK passes, and a plugin outside the workspace builds against the
/// packaged crate (the scaffold's SDK copy replaced by it).
#[test]
fn a_plugin_builds_against_the_packaged_sdk() {
    let target = shared_cargo_target();
    let packaged = Command::new(env!("CARGO"))
        .current_dir(repo().join("sdk"))
        .args(["package", "--allow-dirty", "--target-dir"])
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        packaged.status.success(),
        "cargo package of the SDK: {}",
        String::from_utf8_lossy(&packaged.stderr)
    );
    let crate_file = target.join("package/staircase-sdk-0.1.0.crate");
    let parent = outside("packaged");
    let unpacked = parent.join("sdk");
    std::fs::create_dir_all(&unpacked).unwrap();
    let untar = Command::new("tar")
        .arg("-xzf")
        .arg(&crate_file)
        .arg("-C")
        .arg(&unpacked)
        .status()
        .unwrap();
    assert!(untar.success(), "the packaged crate unpacks");
    run(plugin(
        &parent,
        &["new", "packaged-role", "--kind", "role", "--lang", "rust"],
    ));
    let folder = parent.join("packaged-role");
    std::fs::remove_dir_all(folder.join("staircase-sdk")).unwrap();
    let cargo_toml = std::fs::read_to_string(folder.join("Cargo.toml")).unwrap();
    let sdk = unpacked.join("staircase-sdk-0.1.0");
    std::fs::write(
        folder.join("Cargo.toml"),
        cargo_toml.replace(
            "path = \"staircase-sdk\"",
            &format!("path = {:?}", path(&sdk)),
        ),
    )
    .unwrap();
    let built = run(plugin(&parent, &["build", "packaged-role"]));
    assert!(String::from_utf8_lossy(&built.stdout).contains("type-checked and self-tested"));
    let _ = std::fs::remove_dir_all(&parent);
}

/// Any other language plugs in with the manifest's `[build] command`: it runs in the
/// plugin's folder with the kind's WIT and the output path in its environment, and its
/// component is checked like any other.
#[test]
fn a_manifest_build_command_builds_any_language() {
    let parent = outside("command");
    let folder = parent.join("other");
    std::fs::create_dir_all(&folder).unwrap();
    // A "toolchain" that needs the WIT it was given and copies a real role component.
    let role = staircase::plugin::builtin::guest_artifact("proposer");
    std::fs::write(
        folder.join("other.toml"),
        format!(
            "name = \"other\"\nversion = \"0.1.0\"\nkind = \"role\"\n\n[build]\n\
             command = \"grep -q 'world role' \\\"$STAIRCASE_WIT/agent.wit\\\" && \
             test \\\"$STAIRCASE_WORLD\\\" = role && cp {} \\\"$STAIRCASE_OUT\\\"\"\n",
            path(&role)
        ),
    )
    .unwrap();
    let built = run(plugin(&parent, &["build", "other"]));
    let stdout = String::from_utf8_lossy(&built.stdout);
    assert!(
        stdout.contains("[build] command") && stdout.contains("type-checked and self-tested"),
        "{stdout}"
    );
    assert!(folder.join("other.wasm").is_file());
    let _ = std::fs::remove_dir_all(&parent);
}

/// The JavaScript example's pinned componentize-js in `folder`: what `npm install` would
/// fetch (the tests run without the npm registry).
fn link_node_modules(folder: &Path) {
    std::os::unix::fs::symlink(
        repo().join("examples/plugins/js/node_modules"),
        folder.join("node_modules"),
    )
    .unwrap();
}

/// A guard scaffolded in each language masks the word its template masks, through its
/// sample pipeline in one running server: the same host code for all three.
#[test]
fn guard_plugins_in_rust_python_and_javascript_mask_a_served_answer() {
    let parent = outside("guards");
    let served = parent.join("served");
    let (plugins, pipelines) = (served.join("plugins"), served.join("pipelines"));
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::create_dir_all(&pipelines).unwrap();
    let names = ["guard-rust", "guard-python", "guard-js"];
    for (name, lang) in names.into_iter().zip(["rust", "python", "js"]) {
        let folder = new_and_build_kind(&parent, name, "guard", lang, |folder| {
            if lang == "js" {
                link_node_modules(folder);
            }
        });
        for (from, to) in [
            (
                folder.join(format!("{name}.wasm")),
                plugins.join(format!("{name}.wasm")),
            ),
            (
                folder.join(format!("{name}.toml")),
                plugins.join(format!("{name}.toml")),
            ),
            (
                folder.join("pipelines").join(format!("{name}.toml")),
                pipelines.join(format!("{name}.toml")),
            ),
        ] {
            std::fs::copy(from, to).unwrap();
        }
    }
    let (server, base) = start_server(
        Command::new(env!("CARGO_BIN_EXE_staircase"))
            .args(["serve", "--host", "127.0.0.1", "--port", "0", "--no-watch"])
            .args(["--plugins", path(&plugins), "--pipelines", path(&pipelines)]),
    );
    runtime().block_on(async {
        let client = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .build()
            .unwrap();
        for name in names {
            // The model copies the conversation's pattern, saying the masked word twice.
            let response = client
                .post(format!("{base}/v1/chat/completions"))
                .json(&serde_json::json!({
                    "model": name,
                    "messages": [
                        {"role": "user", "content": "Say: the password"},
                        {"role": "assistant", "content": "the password"},
                        {"role": "user", "content": "Say: my password is a password"},
                    ],
                    "max_tokens": 20,
                    "temperature": 0,
                }))
                .send()
                .await
                .expect("the server answers");
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            let answer = body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default();
            assert!(answer.contains("[hidden]"), "{name}: {body}");
            assert!(!answer.contains("password"), "{name}: {body}");
        }
    });
    drop(server);
    let _ = std::fs::remove_dir_all(&parent);
}
