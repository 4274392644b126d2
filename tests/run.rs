//! End-to-end tests of `staircase run` and `staircase trace render`: the real binary, the
//! real default model and the built-in plugins, with short outputs to keep CI quick.

use std::path::PathBuf;
use std::process::{Command, Output};

fn staircase(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_staircase"))
        .args(args)
        .output()
        .expect("the staircase binary runs")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("staircase-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn run_reports_json_and_its_trace_renders() {
    let trace = scratch("moa.json");
    let out = staircase(&[
        "run",
        "--json",
        "--max-tokens",
        "12",
        "--trace",
        trace.to_str().unwrap(),
        "Why is the sky blue?",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["pipeline"], "moa");
    assert_eq!(report["mode"], "staircase");
    assert!(!report["answer"].as_str().unwrap().trim().is_empty());
    assert!(report["ttft_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(report["nodes"].as_array().unwrap().len(), 4);
    assert!(
        !report["critical_path_measured"]["nodes"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(
        report["cache"]["aggregator_prompt_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );

    let svg = scratch("moa.svg");
    let out = staircase(&[
        "trace",
        "render",
        trace.to_str().unwrap(),
        "-o",
        svg.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.contains("aggregator"));
}

#[test]
fn run_prints_plain_text_when_not_a_terminal() {
    let out = staircase(&[
        "run",
        "--pipeline",
        "debate",
        "--mode",
        "layered",
        "--max-tokens",
        "8",
        "Is a tomato a fruit?",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.trim().is_empty());
    assert!(
        !text.contains('\x1b'),
        "no terminal control codes in plain output"
    );
}

#[test]
fn bad_pipeline_files_are_refused_with_file_and_line() {
    let file = scratch("cycle.toml");
    std::fs::write(
        &file,
        "[[nodes]]\nid = \"a\"\nkind = \"agent\"\nplugin = \"proposer\"\nmodel = \"default\"\ninputs = [\"b\"]\n\n[[nodes]]\nid = \"b\"\nkind = \"aggregator\"\nplugin = \"moa-aggregator\"\nmodel = \"default\"\ninputs = [\"a\"]\n",
    )
    .unwrap();
    let out = staircase(&["run", "--pipeline", file.to_str().unwrap(), "hi"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cycle.toml:2: the pipeline has a cycle"),
        "{stderr}"
    );

    let file = scratch("plugin.toml");
    std::fs::write(
        &file,
        "[[nodes]]\nid = \"a\"\nkind = \"agent\"\nplugin = \"moa-aggregator\"\nmodel = \"default\"\n",
    )
    .unwrap();
    let out = staircase(&["run", "--pipeline", file.to_str().unwrap(), "hi"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("plugin.toml:4:"), "{stderr}");
    assert!(stderr.contains("is an aggregator plugin"), "{stderr}");
}

/// The hostile test fixture installed in `dir` under another name.
fn install_hostile(dir: &std::path::Path, name: &str) {
    use staircase::plugin::builtin::{guest_artifact, guest_manifest};
    std::fs::copy(guest_artifact("hostile"), dir.join(format!("{name}.wasm"))).unwrap();
    let manifest = std::fs::read_to_string(guest_manifest("fixtures/hostile"))
        .unwrap()
        .replace("name = \"hostile\"", &format!("name = \"{name}\""));
    std::fs::write(dir.join(format!("{name}.toml")), manifest).unwrap();
}

#[test]
fn a_plugin_folder_cannot_take_a_builtins_name_and_its_unused_plugins_never_compile() {
    let dir = scratch("squatting-plugins");
    std::fs::create_dir_all(&dir).unwrap();
    // A plugin claiming the built-in aggregator's name (the `moa` pipeline's), and one the
    // pipeline does not use.
    install_hostile(&dir, "moa-aggregator");
    install_hostile(&dir, "unused-hostile");
    let out = Command::new(env!("CARGO_BIN_EXE_staircase"))
        .args(["run", "--max-tokens", "6", "--plugins"])
        .arg(&dir)
        .arg("Why is the sky blue?")
        .env("RUST_LOG", "staircase=info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    let refusal = stderr
        .lines()
        .find(|l| l.contains("may not take a built-in's name"))
        .unwrap_or_else(|| panic!("a refusal is logged: {stderr}"));
    assert!(
        refusal.contains("WARN")
            && refusal.contains("moa-aggregator@1.0.0")
            && refusal.contains("squatting-plugins"),
        "{refusal}"
    );
    assert!(
        !stderr
            .lines()
            .any(|l| l.contains("plugin loaded") && l.contains("hostile")),
        "no folder plugin was compiled: {stderr}"
    );
}

mod serve_support;

/// A chain of two nodes, seeded and greedy, edges complete: one run has one answer whatever
/// the timing (no batch of concurrent sequences whose composition could move a near-tie).
const CHAIN: &str = r#"
name = "chain"
[stream]
policy = "complete"

[[nodes]]
id = "analyst"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 20
temperature = 0.7
seed = 7
config = { role = "a careful analyst who explains the facts step by step" }

[[nodes]]
id = "writer"
kind = "aggregator"
plugin = "moa-aggregator"
model = "default"
max_tokens = 20
inputs = ["analyst"]
"#;

/// `run`, `serve` and `eval` run a request through the one way in (`App::prepare`): for the
/// same request and seed they give the same answer, and `run` and `serve` the same nodes,
/// fingerprint and report shape.
#[test]
fn run_serve_and_eval_give_the_same_report() {
    use serde_json::{Value, json};
    use serve_support::{path, scratch, serve, start_server};

    let dir = scratch("one-way");
    std::fs::create_dir_all(dir.join("pipelines")).unwrap();
    std::fs::write(dir.join("pipelines/chain.toml"), CHAIN).unwrap();
    let config = dir.join("staircase.toml");
    std::fs::write(
        &config,
        "[models.default]\nkind = \"local\"\nthreads = 1\n[pipelines]\ndirs = [\"pipelines\"]\n",
    )
    .unwrap();
    let config = path(&config);
    let prompt = "Why is the sky blue?";

    let out = staircase(&[
        "run",
        "--config",
        config,
        "--pipeline",
        "chain",
        "--mode",
        "layered",
        "--json",
        prompt,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();

    let served = {
        let (_server, base) = start_server(&mut serve(&["--config", config]));
        let body = json!({
            "model": "chain",
            "mode": "layered",
            "messages": [{"role": "user", "content": prompt}],
        })
        .to_string();
        let url = format!("{base}/v1/chat/completions");
        let response = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let response = reqwest::Client::new()
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                let header = response.headers()["x-staircase-run-id"]
                    .to_str()
                    .unwrap()
                    .to_string();
                (header, response.json::<Value>().await.unwrap())
            });
        let (header, completion) = response;
        // One id: the response's, its header's and its report's.
        assert_eq!(completion["id"], header.as_str());
        assert_eq!(completion["staircase"]["run_id"], header.as_str());
        completion
    };

    let prompts = dir.join("prompts.jsonl");
    std::fs::write(&prompts, format!("{}\n", json!({ "instruction": prompt }))).unwrap();
    let out_dir = dir.join("eval");
    let out = staircase(&[
        "eval",
        "--config",
        config,
        "--prompts",
        path(&prompts),
        "--pipeline",
        "chain",
        "--baseline-mode",
        "layered",
        "--variant",
        "chain:layered",
        "--answer-tokens",
        "20",
        "--no-judge",
        "--no-noise-floor",
        "--out",
        path(&out_dir),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let evaluated: Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("eval.json")).unwrap()).unwrap();
    let eval_answer = evaluated["prompts"][0]["answers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["variant"] == "chain/layered")
        .expect("the pipeline's answer in eval.json")["text"]
        .clone();

    let answer = run["answer"].as_str().unwrap();
    assert!(!answer.trim().is_empty(), "{run}");
    assert_eq!(served["choices"][0]["message"]["content"], answer);
    assert_eq!(eval_answer, answer);
    let report = &served["staircase"];
    let nodes = |report: &Value| -> Vec<(Value, Value, Value)> {
        report["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["id"].clone(),
                    n["text"].clone(),
                    n["output_tokens"].clone(),
                )
            })
            .collect()
    };
    assert_eq!(nodes(&run).len(), 2);
    assert_eq!(nodes(&run), nodes(report));
    // The same pipeline version and plugin versions, named the same way.
    assert_eq!(run["system_fingerprint"], report["system_fingerprint"]);
    assert_eq!(run["plugins"], report["plugins"]);
    assert!(
        report["system_fingerprint"]
            .as_str()
            .unwrap()
            .contains(";moa-aggregator@"),
        "{report}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tune` and `bench staircase` build their runners through the app, so the configured run
/// limits hold on the simulated backend as on the models: a `[sandbox]` bound of one step per
/// node ends the staircase aggregator's run (it steps once per chunk) with the bound's error.
#[test]
fn tune_and_bench_staircase_keep_the_configured_run_limits() {
    let dir = serve_support::scratch("run-limits");
    let config = dir.join("staircase.toml");
    std::fs::write(&config, "[sandbox]\nrun_steps_per_node = 1\n").unwrap();
    let (config, out) = (
        serve_support::path(&config),
        serve_support::path(&dir).to_string(),
    );
    let tokens = ["--proposer-tokens", "32", "--answer-tokens", "48"];
    let bench = staircase(
        &[
            &["bench", "staircase", "--simulated", "--prompts", "1"][..],
            &tokens,
            &["--config", config, "--out", &out],
        ]
        .concat(),
    );
    let tune = staircase(
        &[
            &[
                "tune",
                "--simulated",
                "--no-eval",
                "--latency-budget",
                "1000",
            ][..],
            &tokens,
            &["--config", config, "--out", &out],
        ]
        .concat(),
    );
    for (command, output) in [("bench staircase", bench), ("tune", tune)] {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{command} ran past the bound");
        assert!(
            stderr.contains("over the limit of 1 per node"),
            "{command}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pipeline answering exactly as told (the default model copies the history's pattern, so
/// it says the address it is asked to say), under `guards` (TOML `[[guards]]` tables).
fn say_pipeline(name: &str, guards: &str) -> PathBuf {
    let file = scratch(&format!("{name}.toml"));
    std::fs::write(
        &file,
        format!(
            r#"
name = "{name}"
[[nodes]]
id = "answer"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 20
[nodes.config]
system-prompt = "Do exactly as the user says."
{guards}
"#
        ),
    )
    .unwrap();
    file
}

/// A conversation in which the model said the address it was asked to say: it then says
/// the next one it is asked for.
fn say_history() -> PathBuf {
    let history = scratch("say-history.json");
    std::fs::write(
        &history,
        r#"[{"role": "user", "content": "Say: bob@example.org"},
            {"role": "assistant", "content": "bob@example.org"}]"#,
    )
    .unwrap();
    history
}

/// `staircase run` of `pipeline` asked to say `ada@example.org` after saying another address.
fn say_secret(pipeline: &std::path::Path, json: bool) -> Output {
    let history = say_history();
    let mut args = vec!["run", "--pipeline", pipeline.to_str().unwrap()];
    args.extend(["--history", history.to_str().unwrap()]);
    if json {
        args.push("--json");
    }
    args.push("Say: ada@example.org");
    staircase(&args)
}

/// `run` applies a pipeline's output guards as `serve` does: unguarded the model says the
/// address; with the pattern guard it never reaches stdout (plain or `--json`, whose report
/// keeps no pre-guard text and lists the redaction); a stop ends the run with an error naming
/// the reason, and the address is not printed.
#[test]
fn run_applies_the_pipelines_output_guards() {
    const SECRET: &str = "ada@example.org";
    let said = say_secret(&say_pipeline("say-plain", ""), false);
    assert!(said.status.success());
    assert!(
        String::from_utf8_lossy(&said.stdout).contains(SECRET),
        "the unguarded pipeline says it: {}",
        String::from_utf8_lossy(&said.stdout)
    );

    let redacting = say_pipeline("say-redacted", "[[guards]]\nplugin = \"pattern-guard\"\n");
    let plain = say_secret(&redacting, false);
    let stdout = String::from_utf8_lossy(&plain.stdout);
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    assert!(!stdout.contains(SECRET), "{stdout}");
    assert!(stdout.contains("[redacted]"), "{stdout}");
    let json = say_secret(&redacting, true);
    let stdout = String::from_utf8_lossy(&json.stdout);
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    assert!(!stdout.contains(SECRET), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        report["answer"].as_str().unwrap().contains("[redacted]"),
        "{stdout}"
    );
    assert_eq!(
        report["guards"]["events"][0]["verdict"], "redacted",
        "{stdout}"
    );

    let stopping = say_pipeline(
        "say-stopped",
        "[[guards]]\nplugin = \"phrase-guard\"\nconfig = { phrases = \"example.org\" }\n",
    );
    let stopped = say_secret(&stopping, false);
    assert!(!stopped.status.success());
    assert!(!String::from_utf8_lossy(&stopped.stdout).contains(SECRET));
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(
        stderr.contains("an output guard stopped the answer") && stderr.contains("example.org"),
        "{stderr}"
    );
}

/// Log lines carry the run they happened in: an inner-edge guard's stop, logged inside a
/// node, names in its JSON `spans` the run (with the id the report gives) and the node.
#[test]
fn a_nodes_log_line_names_its_run_and_node() {
    let pipeline = scratch("say-then-answer.toml");
    std::fs::write(
        &pipeline,
        r#"
name = "say-then-answer"
[[nodes]]
id = "say"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 20
[nodes.config]
system-prompt = "Do exactly as the user says."
[[nodes.guards]]
plugin = "phrase-guard"
config = { phrases = "example.org" }

[[nodes]]
id = "answer"
kind = "agent"
plugin = "proposer"
model = "default"
inputs = ["say"]
max_tokens = 4
"#,
    )
    .unwrap();
    let history = say_history();
    let out = Command::new(env!("CARGO_BIN_EXE_staircase"))
        .args(["--log-format", "json", "run", "--json"])
        .args(["--pipeline", pipeline.to_str().unwrap()])
        .args(["--history", history.to_str().unwrap()])
        .arg("Say: ada@example.org")
        .env("RUST_LOG", "staircase=info")
        .output()
        .expect("the staircase binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let run_id = report["run_id"].as_str().unwrap();
    let line: serde_json::Value = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "an inner-edge guard stopped the output")
        .unwrap_or_else(|| panic!("no guard stop logged: {stderr}"));
    let spans = line["spans"].as_array().unwrap();
    assert!(
        spans
            .iter()
            .any(|s| s["name"] == "run" && s["run_id"] == run_id),
        "{line}"
    );
    assert!(
        spans
            .iter()
            .any(|s| s["name"] == "node" && s["id"] == "say"),
        "{line}"
    );
}
