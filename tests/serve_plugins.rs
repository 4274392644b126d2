//! `staircase serve` shared with hostile plugins, end to end: the real binary on a loopback
//! port, the real default model and real components. A plugin spinning until its deadline
//! on more requests than the machine has cores leaves the health check and other requests
//! answered; a background history compression runs under the server; a storm of reloads
//! compiles a changed plugin once, and a FIFO or `/dev/zero` behind a plugin file's name
//! never blocks a reload. Assertions are about order and counts, never about a clock.

mod serve_support;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serve_support::{install_plugin, path, scratch, start_server};
use staircase::plugin::builtin::guest_manifest;

/// The looping plugin's call deadline, and the server's maximum: long enough that every
/// other request of the test is answered well within it on a loaded two-core machine.
const LOOP_CALL_MS: u32 = 20_000;
/// A bound on any one HTTP exchange of these tests.
const HTTP_TIMEOUT: Duration = Duration::from_secs(300);
/// How many times a test asks the server again before giving up on a condition.
const POLLS: usize = 600;
/// The pause between two polls of the server's state.
const POLL_EVERY: Duration = Duration::from_millis(100);

const LOOPING: &str = r#"
name = "looping"
[[nodes]]
id = "a"
kind = "agent"
plugin = "hostile-role"
model = "default"
max_tokens = 2
"#;

const SOLO: &str = r#"
name = "solo"
[[nodes]]
id = "a"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 2
"#;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .build()
        .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A chat completion of `model` with one user message.
async fn chat(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    messages: serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&serde_json::json!({ "model": model, "messages": messages }))
        .send()
        .await
        .expect("the server answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// The sum of a Prometheus counter's series whose labels contain every one of `labels`.
async fn counter(client: &reqwest::Client, base: &str, name: &str, labels: &[&str]) -> u64 {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("/metrics answers")
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Requests whose role plugin spins until its deadline, more of them than the machine has
/// cores (so before the fix they held every async worker): while they spin, `/health` and a
/// request of another pipeline are answered, and each looping request then fails with the
/// plugin's timeout. The order of those events is the assertion.
#[test]
fn a_looping_plugin_leaves_health_and_other_requests_answered() {
    let plugins = scratch("loop-plugins");
    let pipelines = scratch("loop-pipelines");
    let manifest = std::fs::read_to_string(guest_manifest("fixtures/hostile-role"))
        .unwrap()
        .replace("call-ms = 100", &format!("call-ms = {LOOP_CALL_MS}"));
    install_plugin(&plugins, "hostile-role", "hostile-role", &manifest);
    std::fs::write(pipelines.join("looping.toml"), LOOPING).unwrap();
    std::fs::write(pipelines.join("solo.toml"), SOLO).unwrap();
    let config = plugins.join("staircase.toml");
    std::fs::write(
        &config,
        format!("[sandbox]\nmax_call_ms = {LOOP_CALL_MS}\n"),
    )
    .unwrap();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let loopers = cores + 1;
    let (server, base) = start_server(
        Command::new(env!("CARGO_BIN_EXE_staircase"))
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(["--plugins", path(&plugins), "--pipelines", path(&pipelines)])
            .args(["--config", path(&config)])
            .args(["--max-running", &(loopers + 2).to_string()]),
    );

    let order: Arc<Mutex<Vec<String>>> = Arc::default();
    let note = |order: &Arc<Mutex<Vec<String>>>, event: String| order.lock().unwrap().push(event);
    let looping_statuses = runtime().block_on(async {
        let client = client();
        let loops: Vec<_> = (0..loopers)
            .map(|i| {
                let (client, base, order) = (client.clone(), base.clone(), order.clone());
                tokio::spawn(async move {
                    let messages = serde_json::json!([{"role": "user", "content": "attack:loop"}]);
                    let (status, body) = chat(&client, &base, "looping", messages).await;
                    note(&order, format!("loop {i} done"));
                    (status, body)
                })
            })
            .collect();
        // Every looping request is inside the plugin's looping call: each has made its
        // three calls (open, params, build-messages). Asking this is already an answer the
        // server gives while they spin.
        let mut inside = false;
        for _ in 0..POLLS {
            let calls = counter(
                &client,
                &base,
                "staircase_plugin_calls_total",
                &[r#"plugin="hostile-role""#],
            )
            .await;
            if calls >= 3 * loopers as u64 {
                inside = true;
                break;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        assert!(inside, "the looping requests never reached the plugin");
        note(&order, "loops running".into());

        let health = client.get(format!("{base}/health")).send().await.unwrap();
        assert!(health.status().is_success(), "{}", health.status());
        note(&order, "health".into());
        let messages = serde_json::json!([{"role": "user", "content": "Say hi."}]);
        let (status, body) = chat(&client, &base, "solo", messages).await;
        assert_eq!(status, 200, "{body}");
        note(&order, "other".into());

        let mut statuses = Vec::new();
        for handle in loops {
            statuses.push(handle.await.unwrap());
        }
        statuses
    });
    drop(server);

    let order = order.lock().unwrap().clone();
    let position = |event: &str| order.iter().position(|e| e == event).unwrap();
    let first_loop_done = order
        .iter()
        .position(|e| e.starts_with("loop "))
        .expect("the looping requests ended");
    assert!(
        position("loops running") < first_loop_done
            && position("health") < first_loop_done
            && position("other") < first_loop_done,
        "health and another request were answered before the looping requests ended: {order:?}"
    );
    for (status, body) in looping_statuses {
        assert!(status >= 400, "a looping request failed: {status} {body}");
        assert!(
            body.to_string().contains("deadline"),
            "the failure names the plugin's deadline: {body}"
        );
    }
    let _ = std::fs::remove_dir_all(&plugins);
    let _ = std::fs::remove_dir_all(&pipelines);
}

const CHAT: &str = r#"
name = "chat"
[[nodes]]
id = "reply"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 2
history_compressor = "truncate-compressor"
history_tokens = 24
"#;

/// A conversation over its history budget starts a background compression under the
/// server (with the run's plugins pinned, the compressor among them), and a later turn
/// answers with the compressed history.
#[test]
fn a_history_compression_runs_under_the_server() {
    let pipelines = scratch("history-pipelines");
    std::fs::write(pipelines.join("chat.toml"), CHAT).unwrap();
    let (server, base) = start_server(
        Command::new(env!("CARGO_BIN_EXE_staircase"))
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(["--pipelines", path(&pipelines)]),
    );
    let turn = |n: usize| -> Vec<serde_json::Value> {
        (1..=n)
            .flat_map(|i| {
                [
                    serde_json::json!({"role": "user", "content": format!("Remember the number {i}, please, it matters a lot to me.")}),
                    serde_json::json!({"role": "assistant", "content": "I will remember that number for you."}),
                ]
            })
            .collect()
    };
    let replaced = runtime().block_on(async {
        let client = client();
        let mut first = turn(4);
        first.push(serde_json::json!({"role": "user", "content": "Which numbers?"}));
        let (status, body) = chat(&client, &base, "chat", first.into()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["staircase"]["nodes"][0]["history"]["started"], true,
            "the first turn starts a compression: {body}"
        );
        // A later turn (the same conversation, one exchange longer) uses the compression
        // once it is ready; ask until it does.
        let mut later = turn(4);
        later.push(serde_json::json!({"role": "user", "content": "Which numbers?"}));
        later.push(serde_json::json!({"role": "assistant", "content": "Some."}));
        later.push(serde_json::json!({"role": "user", "content": "And now?"}));
        for _ in 0..POLLS / 20 {
            let (status, body) = chat(&client, &base, "chat", later.clone().into()).await;
            assert_eq!(status, 200, "{body}");
            let replaced = body["staircase"]["nodes"][0]["history"]["replaced_messages"]
                .as_u64()
                .unwrap_or(0);
            if replaced > 0 {
                return replaced;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        0
    });
    drop(server);
    assert!(
        replaced > 0,
        "no later turn answered with a compressed history: the compression never finished under serve"
    );
    let _ = std::fs::remove_dir_all(&pipelines);
}

/// Two hundred `POST /admin/reload` at once after a plugin file appeared compile it once
/// (counted by `/metrics`), although the folder also holds plugin names that are a symlink
/// to a FIFO and one to `/dev/zero`: those are refused without blocking a reload, and a
/// reload still works after them.
#[test]
fn a_reload_storm_compiles_once_and_hostile_files_never_block_it() {
    let plugins = scratch("storm-plugins");
    let hostile = scratch("storm-outside");
    let fifo = hostile.join("fifo");
    let c_path = std::ffi::CString::new(path(&fifo)).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let manifest_of = |name: &str| {
        std::fs::read_to_string(guest_manifest("fixtures/reload-v1"))
            .unwrap()
            .replace("name = \"reloadable\"", &format!("name = \"{name}\""))
    };
    for (name, target) in [("fifo", fifo.as_path()), ("zero", Path::new("/dev/zero"))] {
        std::fs::write(plugins.join(format!("{name}.toml")), manifest_of(name)).unwrap();
        std::os::unix::fs::symlink(target, plugins.join(format!("{name}.wasm"))).unwrap();
    }
    let (server, base) = start_server(
        Command::new(env!("CARGO_BIN_EXE_staircase"))
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(["--plugins", path(&plugins)]),
    );
    let (before, after, rejected, listed) = runtime().block_on(async {
        let client = client();
        let reload = |client: reqwest::Client, base: String| async move {
            let response = client
                .post(format!("{base}/admin/reload"))
                .send()
                .await
                .expect("a reload answers");
            assert!(response.status().is_success(), "{}", response.status());
            response.json::<serde_json::Value>().await.unwrap()
        };
        // The hostile names are refused, and the reload returns.
        let first = reload(client.clone(), base.clone()).await;
        let compiles = || counter(&client, &base, "staircase_plugin_compiles_total", &[]);
        let before = compiles().await;
        install_plugin(
            &plugins,
            "reloadable",
            "reload-v1",
            &manifest_of("reloadable"),
        );
        let storm: Vec<_> = (0..200)
            .map(|_| tokio::spawn(reload(client.clone(), base.clone())))
            .collect();
        let mut last = serde_json::Value::Null;
        for reload in storm {
            last = reload.await.unwrap();
        }
        let after = compiles().await;
        (
            before,
            after,
            first["reload"]["plugins_rejected"].clone(),
            last["plugins"].clone(),
        )
    });
    drop(server);
    let rejected = rejected.to_string();
    assert!(
        rejected.contains("fifo.wasm") && rejected.contains("zero.wasm"),
        "both hostile files are refused: {rejected}"
    );
    assert!(
        rejected.contains("not a regular file"),
        "refused as not regular files: {rejected}"
    );
    assert!(
        listed.to_string().contains("reloadable"),
        "the plugin serves after the storm: {listed}"
    );
    assert_eq!(after - before, 1, "the storm compiled the new plugin once");
    let _ = std::fs::remove_dir_all(&plugins);
    let _ = std::fs::remove_dir_all(&hostile);
}
