//! `staircase serve` end to end: the real binary on a loopback port, the real default model,
//! and the official `openai` Python client (`tests/serve/openai_client.py`, installed by
//! `.ci/run`) for streaming, errors, hot swap under load, disconnects, overload and a hostile
//! plugin; the live view at `/` in a headless Chromium (`tests/serve/live_view.py`); and a
//! pipeline's declared variants chosen by a latency budget, reported and counted. The
//! server is started here on port 0, with scratch plugin and pipeline folders, and killed
//! when the test ends, whatever happens.

mod serve_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serve_support::{path, python_with, scratch, start_server, wait_bounded};
use staircase::plugin::builtin::{guest_artifact, guest_manifest};

/// Runs at once and runs waiting: small, so the overload phase fills them quickly.
const MAX_RUNNING: usize = 4;
const QUEUE: usize = 4;
/// A bound on the whole client script (it takes a couple of minutes on two cores).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(900);

#[test]
fn the_openai_client_works_against_a_real_server() {
    let python = python_with("openai");

    let plugins = scratch("plugins");
    let pipelines = scratch("pipelines");
    // The one tenant may fill the whole queue (the overload phase does; by default a
    // tenant's share is half of it).
    let config = scratch("config").join("staircase.toml");
    let capacity = MAX_RUNNING + QUEUE;
    std::fs::write(
        &config,
        format!("[limits]\ntenant_max_requests = {capacity}\n"),
    )
    .unwrap();
    let key = "test-key";
    let (server, base) = start_server(
        Command::new(env!("CARGO_BIN_EXE_staircase"))
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(["--config", path(&config)])
            .args(["--plugins", path(&plugins), "--pipelines", path(&pipelines)])
            .args(["--max-tokens", "16", "--api-key-env", "STAIRCASE_TEST_KEY"])
            .args(["--max-running", &MAX_RUNNING.to_string()])
            .args(["--queue", &QUEUE.to_string()])
            .env("STAIRCASE_TEST_KEY", key),
    );

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/serve/openai_client.py"
    );
    let mut client = Command::new(&python)
        .arg(script)
        .args(["--base-url", &base, "--key", key])
        .args(["--plugins", path(&plugins), "--pipelines", path(&pipelines)])
        .args(["--v1", path(&guest_artifact("reload-v1"))])
        .args(["--v1-manifest", path(&guest_manifest("fixtures/reload-v1"))])
        .args(["--v2", path(&guest_artifact("reload-v2"))])
        .args(["--wrong", path(&guest_artifact("hostile"))])
        .args(["--hostile", path(&guest_artifact("hostile-role"))])
        .args([
            "--hostile-manifest",
            path(&guest_manifest("fixtures/hostile-role")),
        ])
        .args(["--capacity", &capacity.to_string()])
        .spawn()
        .expect("the client script starts");
    let status = wait_bounded(&mut client, CLIENT_TIMEOUT);
    drop(server);
    let _ = std::fs::remove_dir_all(&plugins);
    let _ = std::fs::remove_dir_all(&pipelines);
    if let Some(dir) = config.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "the openai client checks failed (see the output above): {status:?}"
    );
}

/// A pipeline with declared variants: two proposers and an aggregator, or one proposer alone.
const ADAPTIVE: &str = r#"
name = "adaptive"
[stream]
policy = "complete"
[[nodes]]
id = "a"
kind = "agent"
plugin = "proposer"
model = "default"
[[nodes]]
id = "b"
kind = "agent"
plugin = "proposer"
model = "default"
seed = 2
[[nodes]]
id = "agg"
kind = "aggregator"
plugin = "moa-aggregator"
model = "default"
inputs = ["a", "b"]

[[variants]]
name = "small"
quality = 0.4
[[variants.nodes]]
id = "solo"
kind = "agent"
plugin = "proposer"
model = "default"
"#;

/// Through the server, a pipeline with declared variants says which ran and why in the
/// response's run report, and `/metrics` counts each: a budget nothing meets runs the
/// fastest (`small`, budget not met), a generous one the file's own nodes (`main`).
#[test]
fn the_server_reports_and_counts_the_variant_a_budget_chose() {
    let pipelines = scratch("adaptive");
    std::fs::write(pipelines.join("adaptive.toml"), ADAPTIVE).unwrap();
    let (server, base) = start_server(
        Command::new(env!("CARGO_BIN_EXE_staircase"))
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(["--pipelines", path(&pipelines), "--max-tokens", "4"]),
    );
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (tight, generous, metrics) = tokio.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .unwrap();
        let ask = |budget_ms: u64| {
            let request =
                client
                    .post(format!("{base}/v1/chat/completions"))
                    .json(&serde_json::json!({
                        "model": "adaptive",
                        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
                        "latency_budget_ms": budget_ms,
                    }));
            async move {
                let response = request.send().await.expect("the server answers");
                assert!(response.status().is_success(), "{}", response.status());
                response.json::<serde_json::Value>().await.unwrap()
            }
        };
        let tight = ask(1).await;
        let generous = ask(3_600_000).await;
        let metrics = client.get(format!("{base}/metrics")).send().await.unwrap();
        (tight, generous, metrics.text().await.unwrap())
    });
    let variant = &tight["staircase"]["variant"];
    assert_eq!(variant["variant"], "small", "{tight}");
    assert_eq!(variant["met_budget"], false, "{variant}");
    assert!(
        variant["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("no variant meets the budget of 1 ms")),
        "{variant}"
    );
    assert_eq!(
        tight["staircase"]["nodes"].as_array().map(Vec::len),
        Some(1)
    );
    let variant = &generous["staircase"]["variant"];
    assert_eq!(variant["variant"], "main", "{generous}");
    assert_eq!(variant["met_budget"], true, "{variant}");
    assert!(
        variant["models"][0]["load"]["parallel"].as_u64().is_some(),
        "{variant}"
    );
    assert_eq!(
        generous["staircase"]["nodes"].as_array().map(Vec::len),
        Some(3)
    );

    let count = |variant: &str, met: bool| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("staircase_variant_runs_total{")
                    && l.contains(r#"model="adaptive""#)
                    && l.contains(&format!(r#"variant="{variant}""#))
                    && l.contains(&format!(r#"met_budget="{met}""#))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_string)
    };
    assert_eq!(count("small", false).as_deref(), Some("1"), "{metrics}");
    assert_eq!(count("main", true).as_deref(), Some("1"), "{metrics}");
    drop(server);
    let _ = std::fs::remove_dir_all(&pipelines);
}

/// Every node's output cap in the browser test: long enough that the proposers are still
/// generating when the aggregator's first step (after their first 8-token chunks) answers.
const LIVE_VIEW_NODE_TOKENS: &str = "40";
/// A bound on the browser script (one short `moa` run, then its replay).
const BROWSER_TIMEOUT: Duration = Duration::from_secs(600);

/// The page at `/` in a real headless Chromium (`tests/serve/live_view.py`, Playwright with
/// Debian's `chromium`; `cargo xtask test` installs both): a staircase `moa` run on the
/// embedded model, watched live. The screenshot goes to `target/tmp/live-view.png`.
#[test]
fn live_view_in_a_browser() {
    let python = python_with("playwright.sync_api");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no Chromium at {chromium}: apt-get install chromium (cargo xtask test does)"
    );

    // `moa` with an inner-edge guard on its analyst that masks every word it hands on, and
    // an output guard on its answer that masks every word the client would see.
    let pipelines = scratch("live-pipelines");
    let moa = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pipelines/moa.toml"),
    )
    .unwrap();
    // TOML puts `[[nodes.guards]]` under the latest `[[nodes]]`: the guard goes before the
    // node after the analyst.
    let critic = "[[nodes]]\nid = \"critic\"";
    assert!(moa.contains(critic), "moa's critic follows its analyst");
    let guard =
        "[[nodes.guards]]\nplugin = \"pattern-guard\"\nconfig = { patterns = '[A-Za-z]+' }\n\n";
    std::fs::write(
        pipelines.join("guarded-moa.toml"),
        moa.replace("name = \"moa\"", "name = \"guarded-moa\"")
            .replace(critic, &format!("{guard}{critic}"))
            + &guard.replace("nodes.guards", "guards"),
    )
    .unwrap();
    let (server, base) = start_server(
        Command::new(env!("CARGO_BIN_EXE_staircase"))
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(["--max-tokens", LIVE_VIEW_NODE_TOKENS])
            .args(["--pipelines", path(&pipelines)]),
    );
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("live-view.png");
    let _ = std::fs::remove_file(&screenshot);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/serve/live_view.py");
    let mut client = Command::new(&python)
        .arg(script)
        .args(["--base-url", &base, "--chromium", &chromium])
        .args(["--screenshot", path(&screenshot)])
        .args(["--guarded-pipeline", "guarded-moa"])
        .spawn()
        .expect("the browser script starts");
    let status = wait_bounded(&mut client, BROWSER_TIMEOUT);
    drop(server);
    assert!(
        status.is_some_and(|s| s.success()),
        "the live view checks failed (see the output above): {status:?}"
    );
    assert!(screenshot.exists(), "the screenshot was written");
    eprintln!("screenshot: {}", screenshot.display());
}
