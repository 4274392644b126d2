//! Conversation memory on the real model: a node over its history budget answers at once
//! and its compressor plugin (real components: the built-in `truncate-compressor`, the
//! `model-compressor` fixture) shortens the history in the background for the next turn.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

mod common;

use common::Recording;
use staircase::engine::local::{LocalEngine, LocalEngineConfig};
use staircase::engine::{ChatMessage, Engine, Prompt, Role};
use staircase::pipeline::history::HistoryEventKind;
use staircase::pipeline::report::COMPRESSION_LANE;
use staircase::pipeline::{Models, Pipeline, RunRequest, Runner};
use staircase::plugin::builtin::{guest_artifact, guest_manifest};
use staircase::plugin::{Capability, HostConfig, PluginRuntime, Registry};
use staircase::policy::StreamMode;
use staircase::trace::EventKind;

/// A runner on the default model with the built-ins and the model-compressor fixture
/// (granted the model; `call_ms` its deadline per call).
fn runner(call_ms: u64) -> (Runner, Arc<Recording>) {
    let path = staircase::model::default_model_path().expect("the default model");
    let engine: Arc<dyn Engine> =
        Arc::new(LocalEngine::load(LocalEngineConfig::new(path)).expect("engine loads"));
    let recording = Recording::new(engine.clone());
    let registry = Registry::new(
        PluginRuntime::new(HostConfig {
            cache_dir: Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache")),
            engine: Some(engine),
            grants: [("model-compressor".to_string(), [Capability::Model].into())].into(),
            // The compressor summarises with a whole generation inside one call.
            max_call_ms: 60_000,
            ..HostConfig::default()
        })
        .unwrap(),
    );
    registry.load_builtins().unwrap();
    // One folder per runner: tests running at once must not rewrite each other's files.
    static RUNNERS: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "staircase-history-{}-{call_ms}-{}",
        std::process::id(),
        RUNNERS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        guest_artifact("model-compressor"),
        dir.join("model-compressor.wasm"),
    )
    .unwrap();
    let manifest = std::fs::read_to_string(guest_manifest("fixtures/model-compressor")).unwrap();
    let manifest = manifest.replace("call-ms = 100", &format!("call-ms = {call_ms}"));
    std::fs::write(dir.join("model-compressor.toml"), manifest).unwrap();
    registry
        .load_file(&dir.join("model-compressor.wasm"))
        .unwrap();
    let runner = Runner::new(
        Models::with_default(recording.clone() as Arc<dyn Engine>),
        registry,
    );
    (runner, recording)
}

fn chat(compressor: &str, budget: u32) -> Pipeline {
    let text = format!(
        r#"
name = "chat"
[[nodes]]
id = "reply"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 4
history_compressor = "{compressor}"
history_tokens = {budget}
"#
    );
    Pipeline::parse(&text, "chat.toml").unwrap()
}

fn user(turn: usize) -> ChatMessage {
    ChatMessage::new(
        Role::User,
        format!("Turn {turn}: name one thing that has the number {turn} in it."),
    )
}

fn request(conversation: &[ChatMessage]) -> RunRequest {
    RunRequest {
        conversation: conversation.to_vec(),
        mode: StreamMode::Staircase,
        namespace: Default::default(),
        late_charge: None,
    }
}

/// The messages of the engine's prompt number `index`.
fn messages_at(engine: &Recording, index: usize) -> Vec<ChatMessage> {
    match engine.prompts.lock().unwrap().get(index) {
        Some(Prompt::Chat { messages, .. }) => messages.clone(),
        other => panic!("a chat prompt: {other:?}"),
    }
}

/// The same, as one text.
fn prompt_at(engine: &Recording, index: usize) -> String {
    messages_at(engine, index)
        .iter()
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether the run's timeline has the compression lane with a `name...` note on it.
fn compression_lane_notes(report: &staircase::pipeline::RunReport, name: &str) -> bool {
    let lanes = report.timeline.lanes();
    let Some(lane) = lanes.iter().position(|l| l == COMPRESSION_LANE) else {
        return false;
    };
    report.timeline.events().iter().any(|e| {
        e.lane == lane && matches!(&e.kind, EventKind::Note { name: n, .. } if n.starts_with(name))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_turns_keep_one_compressed_block_and_its_prompt_prefix_stays_cached() {
    let budget = 48;
    let (runner, engine) = runner(100);
    let pipeline = chat("truncate-compressor", budget);
    let mut conversation = Vec::new();
    // The number of messages whose compression started in the turn before, if one did.
    let mut compressed_before: Option<usize> = None;
    // The compression in use (messages it replaced), and the last turn's prompt.
    let mut block: Option<usize> = None;
    let mut previous: Option<(Vec<ChatMessage>, u32)> = None;
    let (mut used_turns, mut kept_turns) = (0, 0);
    for turn in 1..=20 {
        conversation.push(user(turn));
        // The node's step is the turn's first request: the memory's warm-up of a compressed
        // prompt comes only after the node's first token.
        let step = engine.prompts.lock().unwrap().len();
        let report = runner
            .run(&pipeline, request(&conversation), None)
            .await
            .unwrap();
        let used = report.nodes[0].history.clone().expect("a history budget");
        let messages = messages_at(&engine, step);
        if let Some(messages) = compressed_before {
            // A compression started in the turn before: this turn uses it.
            assert_eq!(used.replaced_messages, messages, "turn {turn}: {used:?}");
            assert!(used.tokens_used < used.tokens_full, "turn {turn}: {used:?}");
            // The prompt the model got is the compressed one: the first turn is gone.
            assert!(!prompt_at(&engine, step).contains("Turn 1:"), "turn {turn}");
            // The trace shows it on the node's lane.
            assert!(
                report
                    .trace()
                    .trace_events
                    .iter()
                    .any(|e| e.cat == "history" && e.name.starts_with("compressed history")),
                "turn {turn}"
            );
            used_turns += 1;
        } else if let Some(replaced) = block {
            // No newer compression: the same block, this turn's messages appended raw behind
            // it, so the prompt begins exactly as the last one and the prefix cache serves
            // all of it (recompressing every turn would leave only the system prompt cached).
            assert_eq!(used.replaced_messages, replaced, "turn {turn}: {used:?}");
            let (last, last_tokens) = previous.as_ref().unwrap();
            assert_eq!(&messages[..last.len()], &last[..], "turn {turn}");
            let cached = report.nodes[0].cached_prompt_tokens;
            assert!(
                cached + 4 >= *last_tokens,
                "turn {turn}: {cached} cached of the last prompt's {last_tokens}"
            );
            used_turns += 1;
            kept_turns += 1;
        } else {
            assert_eq!(used.replaced_messages, 0, "turn {turn}: {used:?}");
            assert!(prompt_at(&engine, step).contains("Turn 1:"), "turn {turn}");
        }
        if used.replaced_messages > 0 {
            block = Some(used.replaced_messages);
        }
        // Over budget, a compression of this turn's history starts for the next turn, and
        // the timeline shows it on its own lane.
        assert_eq!(
            used.started,
            used.tokens_used > budget,
            "turn {turn}: {used:?}"
        );
        if used.started {
            assert!(
                compression_lane_notes(&report, "compression started"),
                "turn {turn}"
            );
        }
        compressed_before = used.started.then_some(conversation.len());
        previous = Some((messages, report.nodes[0].prompt_tokens));
        conversation.push(ChatMessage::new(Role::Assistant, report.answer.clone()));
        // The client is idle between turns; the test waits for the background work.
        assert!(runner.history().wait_idle(Duration::from_secs(60)));
    }
    assert!(
        used_turns >= 15,
        "only {used_turns} turns used a compression"
    );
    assert!(
        kept_turns >= 5,
        "only {kept_turns} turns kept the block they had"
    );
    let events = runner.history().events();
    assert!(
        events
            .iter()
            .all(|e| !matches!(e.kind, HistoryEventKind::Failed { .. })),
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_token_does_not_wait_for_a_compression() {
    // The model-compressor summarises with the same engine, so it takes many decode steps.
    let (runner, _) = runner(60_000);
    let pipeline = chat("model-compressor", 24);
    let conversation: Vec<ChatMessage> = (1..=4)
        .flat_map(|turn| {
            [
                user(turn),
                ChatMessage::new(Role::Assistant, "Something with that number."),
            ]
        })
        .chain([user(5)])
        .collect();
    let report = runner
        .run(&pipeline, request(&conversation), None)
        .await
        .unwrap();
    let used = report.nodes[0].history.clone().unwrap();
    assert!(used.started, "{used:?}");
    let first_token = used.first_token_seq.expect("the node answered");
    // The timeline shows the compression on its own lane, beside the answer.
    assert!(compression_lane_notes(&report, "compression started"));
    assert!(runner.history().wait_idle(Duration::from_secs(120)));
    let events = runner.history().events();
    let (started, finished) = match events.as_slice() {
        [
            started @ staircase::pipeline::history::HistoryEvent {
                kind: HistoryEventKind::Started { .. },
                ..
            },
            finished @ staircase::pipeline::history::HistoryEvent {
                kind: HistoryEventKind::Finished { .. },
                ..
            },
        ] => (started.seq, finished.seq),
        other => panic!("one compression, started then finished: {other:#?}"),
    };
    // In the memory's order of events: the compression started, the first token went out,
    // and only then did the compression finish.
    assert!(
        started < first_token && first_token < finished,
        "{events:#?} {used:?}"
    );
    // The next turn uses it.
    let mut next = conversation.clone();
    next.push(ChatMessage::new(Role::Assistant, report.answer.clone()));
    next.push(user(6));
    let report = runner.run(&pipeline, request(&next), None).await.unwrap();
    let used = report.nodes[0].history.clone().unwrap();
    assert_eq!(used.replaced_messages, conversation.len(), "{used:?}");
    assert_eq!(used.compression_seq, Some(finished));
    // That turn may have started the next compression: it must not outlive the engine
    // (exiting under it tears the model down beneath it).
    assert!(runner.history().wait_idle(Duration::from_secs(120)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_or_timed_out_compressor_leaves_the_full_history_and_says_why() {
    // truncate-compressor refuses when the system messages alone exceed the budget; the
    // model-compressor with its 100 ms deadline runs out of time generating a summary.
    for (compressor, expected) in [
        ("truncate-compressor", "system messages alone"),
        ("model-compressor", "model-compressor"),
    ] {
        let (runner, _) = runner(100);
        let pipeline = chat(compressor, 16);
        let mut conversation = vec![
            ChatMessage::new(Role::System, "Be brief and kind. ".repeat(8)),
            user(1),
        ];
        let report = runner
            .run(&pipeline, request(&conversation), None)
            .await
            .unwrap();
        assert!(!report.answer.is_empty());
        assert!(report.nodes[0].history.as_ref().unwrap().started);
        assert!(runner.history().wait_idle(Duration::from_secs(60)));
        let events = runner.history().events();
        let reason = events
            .iter()
            .find_map(|e| match &e.kind {
                HistoryEventKind::Failed { reason } => Some(reason.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{compressor}: a failure is logged: {events:#?}"));
        assert!(reason.contains(expected), "{compressor}: {reason}");
        // The next turn answers with the full history.
        conversation.push(ChatMessage::new(Role::Assistant, report.answer));
        conversation.push(user(2));
        let report = runner
            .run(&pipeline, request(&conversation), None)
            .await
            .unwrap();
        let used = report.nodes[0].history.clone().unwrap();
        assert_eq!(used.replaced_messages, 0, "{compressor}: {used:?}");
        assert_eq!(used.tokens_used, used.tokens_full);
        assert!(!report.answer.is_empty());
    }
}
