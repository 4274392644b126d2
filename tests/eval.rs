//! Quality on the real default model: `staircase eval` end to end (the binary, a small
//! prompt file, short answers), and a regression test that the staircase answer of the
//! default pipeline does not degenerate ("1. 1. 1. ...") where the layered one does not.

use std::path::PathBuf;
use std::process::Command;

use staircase::eval::Quality;
use staircase::eval::runner::pipeline_hit_limit;
use staircase::pipeline::RunRequest;
use staircase::policy::StreamMode;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("staircase-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn eval_on_three_prompts_writes_the_table_json_and_chart() {
    let prompts = scratch("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"instruction\": \"Give three tips for a job interview.\"}\n\
         {\"instruction\": \"Why is the sky blue?\"}\n\
         {\"instruction\": \"Write a haiku about autumn leaves.\"}\n",
    )
    .unwrap();
    let out_dir = scratch("out");
    let out = Command::new(env!("CARGO_BIN_EXE_staircase"))
        .args([
            "eval",
            "--prompts",
            prompts.to_str().unwrap(),
            "--answer-tokens",
            "24",
            "--proposer-tokens",
            "24",
            "--no-noise-floor",
            // The 135M model judges, whatever catalogue models this machine has pulled.
            "--judge",
            "default",
            "--out",
            out_dir.to_str().unwrap(),
        ])
        .output()
        .expect("the staircase binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The table names every variant: single model, the layered baseline, the staircase.
    for name in ["single", "moa/layered", "moa/staircase"] {
        assert!(stdout.contains(name), "{name} missing from\n{stdout}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("eval.json")).unwrap()).unwrap();
    assert_eq!(json["prompts"].as_array().unwrap().len(), 3);
    let summaries = json["summaries"].as_array().unwrap();
    assert_eq!(summaries.len(), 3);
    let staircase = summaries
        .iter()
        .find(|s| s["variant"] == "moa/staircase")
        .expect("the staircase variant");
    assert_eq!(staircase["answers"], 3);
    // Judged in both orders on every prompt: each verdict either read or counted unread.
    let t = &staircase["tally"];
    let counted = ["wins", "ties", "losses", "unparseable"]
        .iter()
        .map(|k| t[k].as_u64().unwrap())
        .sum::<u64>();
    assert_eq!(counted, 3, "{t}");
    assert!(staircase["ttft_over_layered"].as_f64().unwrap() > 0.0);
    // The judge's figures say how often the two orders agreed, and score those pairs alone.
    let judged = &staircase["judged"];
    let consistent = t["consistent"].as_u64().unwrap();
    assert!(consistent <= judged["judged"].as_u64().unwrap(), "{judged}");
    for key in ["score", "consistent", "consistent_score"] {
        let v = judged[key]["value"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{key}: {judged}");
    }
    // The local judge reports its verdict letter's probabilities: a weighted score, per
    // pair and per variant.
    let weighted = staircase["weighted_score"]["value"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&weighted), "{staircase}");
    // The judge check: the baseline's answer against a looped copy, on every prompt.
    let check = &json["judge_check"];
    let c = &check["tally"];
    let checked = ["wins", "ties", "losses", "unparseable"]
        .iter()
        .map(|k| c[k].as_u64().unwrap())
        .sum::<u64>();
    assert_eq!(checked, 3, "{check}");
    assert!(
        check["weighted_score"]["value"].as_f64().is_some(),
        "{check}"
    );
    assert!(stdout.contains("Judge check"), "{stdout}");
    assert_eq!(check["rated"], 3, "every prompt's check is rated: {check}");
    // Every answer is rated on its own, and compared with the baseline's rating.
    let rating = staircase["mean_rating"]["value"].as_f64().unwrap();
    assert!((1.0..=9.0).contains(&rating), "{staircase}");
    let rated = &staircase["rated"];
    let compared = ["higher", "ties", "lower", "unrated"]
        .iter()
        .map(|k| rated[k].as_u64().unwrap())
        .sum::<u64>();
    assert_eq!(compared, 3, "{rated}");
    // Where the first token went: a proposer's first token, then the aggregator's first step.
    let first_in = staircase["mean_first_input_token_ms"].as_f64().unwrap();
    let first_step = staircase["mean_first_step_ms"].as_f64().unwrap();
    assert!(first_in > 0.0 && first_step > 0.0, "{staircase}");
    assert!(stdout.contains("orders agreed"), "{stdout}");
    let answer = &json["prompts"][0]["answers"][1];
    assert_eq!(answer["judged"]["replies"].as_array().unwrap().len(), 2);
    let svg = std::fs::read_to_string(out_dir.join("eval.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("moa/staircase"));

    // The saved answers scored again, here without a judge: the same answers and figures
    // of the reference-free checks, the verdicts gone.
    let rescored_dir = scratch("rescored");
    let out = Command::new(env!("CARGO_BIN_EXE_staircase"))
        .args([
            "eval",
            "--no-judge",
            "--out",
            rescored_dir.to_str().unwrap(),
            "--answers",
        ])
        .arg(out_dir.join("eval.json"))
        .output()
        .expect("the staircase binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rescored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rescored_dir.join("eval.json")).unwrap()).unwrap();
    for (before, after) in json["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(rescored["prompts"].as_array().unwrap())
    {
        for (a, b) in before["answers"]
            .as_array()
            .unwrap()
            .iter()
            .zip(after["answers"].as_array().unwrap())
        {
            assert_eq!(a["text"], b["text"]);
            assert_eq!(a["quality"], b["quality"]);
            assert!(
                b.get("judged").is_none() && b.get("rating").is_none(),
                "{b}"
            );
        }
    }
    assert_eq!(rescored["summaries"].as_array().unwrap().len(), 3);
    assert!(rescored.get("judge_check").is_none());
}

/// The reproduction, and prompts of other shapes (lists, explanations, how-tos):
/// the default pipeline's staircase answer must not degenerate.
#[test]
fn the_staircase_answer_does_not_degenerate() {
    let app = staircase::app::AppBuilder::new()
        .build()
        .expect("the default model and built-in plugins load");
    let mut pipeline = staircase::pipeline::load("moa").unwrap();
    // Short, as CI needs, but long enough for a loop to show (the old policy looped from
    // its first tokens).
    pipeline.set_proposer_tokens(64);
    let output = pipeline.output.0;
    pipeline.nodes[output].params.max_tokens = Some(64);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut failures = Vec::new();
    for prompt in [
        "Give three tips for a job interview.",
        "List five fruits that are high in vitamin C.",
        "How do I make a cup of tea?",
        "Why is the sky blue?",
    ] {
        let report = runtime
            .block_on(app.runner().run(
                &pipeline,
                RunRequest::prompt(prompt, StreamMode::Staircase),
                None,
            ))
            .expect("the run");
        let hit = pipeline_hit_limit(&pipeline, report.nodes[output].output_tokens);
        let quality = Quality::of(&report.answer, hit);
        if quality.degenerate {
            failures.push(format!("{prompt}: {quality:?}\n{}", report.answer));
        }
    }
    assert!(
        failures.is_empty(),
        "degenerate answers:\n{}",
        failures.join("\n\n")
    );
}

/// The engine's repetition penalty (`SamplingParams::repeat_penalty`, set per node in a
/// pipeline file) counts the continued answer: a greedy continuation of a loop stays in the
/// loop without it and leaves it with it. A penalty of 0 is refused, not run.
#[test]
fn the_repetition_penalty_breaks_a_greedy_loop() {
    use staircase::engine::{ChatMessage, GenerationRequest, Prompt, Role};
    use staircase::eval::metrics::{longest_repeat_run, words};

    let app = staircase::app::AppBuilder::new()
        .build()
        .expect("the default model and built-in plugins load");
    let looping = "1. 1. 1. 1. 1. 1. 1. 1. 1. 1.";
    let run = |penalty: f32| {
        let mut request = GenerationRequest::chat(Vec::new());
        request.prompt = Prompt::Chat {
            messages: vec![ChatMessage::new(
                Role::User,
                "Give three tips for a job interview.",
            )],
            assistant_prefix: Some(looping.to_string()),
        };
        request.sampling.max_tokens = 24;
        request.sampling.repeat_penalty = penalty;
        app.default_engine()
            .submit(request)
            .map(|s| s.blocking_collect())
    };
    let plain = run(1.0).unwrap().unwrap().text;
    let penalised = run(1.5).unwrap().unwrap().text;
    let repeats = |text: &str| longest_repeat_run(&words(&format!("{looping}{text}")), 2);
    assert!(
        repeats(&plain) > repeats(&penalised),
        "without: {plain:?}\nwith: {penalised:?}"
    );
    assert!(run(0.0).is_err(), "a zero penalty is an invalid request");
}

/// A pipeline's own output guards hold in `eval`: what is scored is what its client would
/// read. The guard masks every word, so a guarded answer has no letters but its masks, while
/// the single model's (unguarded) answer is plain text.
#[test]
fn eval_scores_a_guarded_pipeline_by_what_its_guards_release() {
    let moa = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pipelines/moa.toml"),
    )
    .unwrap();
    let pipeline = scratch("guarded-moa.toml");
    std::fs::write(
        &pipeline,
        moa.replace("name = \"moa\"", "name = \"guarded-moa\"")
            + "\n[[guards]]\nplugin = \"pattern-guard\"\nconfig = { patterns = '[A-Za-z]+' }\n",
    )
    .unwrap();
    let prompts = scratch("guarded-prompts.jsonl");
    std::fs::write(&prompts, "{\"instruction\": \"Why is the sky blue?\"}\n").unwrap();
    let out_dir = scratch("guarded-out");
    let out = Command::new(env!("CARGO_BIN_EXE_staircase"))
        .args(["eval", "--prompts", prompts.to_str().unwrap()])
        .args(["--pipeline", pipeline.to_str().unwrap()])
        .args(["--answer-tokens", "16", "--proposer-tokens", "16"])
        .args(["--no-judge", "--no-noise-floor"])
        .args(["--out", out_dir.to_str().unwrap()])
        .output()
        .expect("the staircase binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("eval.json")).unwrap()).unwrap();
    let answers = json["prompts"][0]["answers"].as_array().unwrap();
    let letters = |text: &str| {
        text.replace("[redacted]", "")
            .chars()
            .filter(char::is_ascii_alphabetic)
            .count()
    };
    let mut guarded = 0;
    for answer in answers {
        let (variant, text) = (
            answer["variant"].as_str().unwrap(),
            answer["text"].as_str().unwrap(),
        );
        if variant.starts_with("guarded-moa/") {
            guarded += 1;
            assert!(text.contains("[redacted]"), "{variant}: {text:?}");
            assert_eq!(letters(text), 0, "{variant} leaked a word: {text:?}");
        } else if variant == "single" {
            assert!(letters(text) > 0, "the single model is unguarded: {text:?}");
        }
    }
    assert_eq!(guarded, 2, "layered and staircase: {json}");
}
