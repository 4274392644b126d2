//! The pipeline runtime on a scripted test-double engine and native test-double policies:
//! chunk order and finishes as the aggregator sees them, staircase vs layered, release of a
//! sufficient source, cancellation of a whole run, priorities, routing, compressors, traces.
//! (The real model and real plugins are exercised by the end-to-end tests in `tests/`.)

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use staircase::engine::{
    Capabilities, ChatMessage, Engine, EngineError, FinishReason, GenerationEvent,
    GenerationRequest, GenerationStream, ModelInfo, Priority, Prompt, Role, SamplingParams,
    Timings, TokenCount, TokenCounter, TokenId, Usage,
};
use staircase::pipeline::runtime::CRITICAL_PRIORITY;
use staircase::pipeline::{
    Models, Pipeline, RunBound, RunError, RunEvent, RunLimits, RunRequest, Runner,
};
use staircase::policy::{
    AggregatorSession, CompressorPolicy, Demand, PluginConfig, PluginKind, PolicyError,
    PolicyProvider, RoleInput, RolePolicy, RouteChoice, RouteRequest, RouterPolicy, Source, Step,
    StreamMode,
};
use staircase::trace::{chrome::ChromeTrace, svg};
use tokio::sync::mpsc;

// ---- a scripted engine ---------------------------------------------------------------

type Sender = mpsc::UnboundedSender<Result<GenerationEvent, EngineError>>;

/// What the engine does for a request whose system prompt starts with a given word.
#[derive(Clone, Copy)]
struct Script {
    /// Tokens to emit (capped by `max_tokens`).
    tokens: u32,
    /// Emit the tokens, then keep the request open without finishing.
    hold: bool,
}

struct ScriptedEngine {
    info: ModelInfo,
    scripts: BTreeMap<String, Script>,
    requests: Mutex<Vec<GenerationRequest>>,
    senders: Mutex<Vec<(String, Sender)>>,
}

impl ScriptedEngine {
    fn new(scripts: &[(&str, Script)]) -> Arc<Self> {
        Self::with_capabilities(scripts, Capabilities::ALL)
    }

    fn with_capabilities(scripts: &[(&str, Script)], capabilities: Capabilities) -> Arc<Self> {
        Arc::new(Self {
            info: ModelInfo {
                name: "scripted".into(),
                context_tokens: 4096,
                capabilities,
            },
            scripts: scripts.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            requests: Mutex::new(Vec::new()),
            senders: Mutex::new(Vec::new()),
        })
    }

    /// Requests whose caller still holds the stream.
    fn live(&self) -> Vec<String> {
        self.senders
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| !s.is_closed())
            .map(|(tag, _)| tag.clone())
            .collect()
    }

    fn requests_of(&self, tag: &str) -> Vec<GenerationRequest> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| tag_of(r) == tag)
            .cloned()
            .collect()
    }
}

fn tag_of(request: &GenerationRequest) -> String {
    match &request.prompt {
        Prompt::Chat { messages, .. } => messages
            .first()
            .map(|m| {
                m.content
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default(),
        Prompt::Tokens(_) | Prompt::Text(_) => String::new(),
    }
}

impl Engine for ScriptedEngine {
    fn submit(&self, request: GenerationRequest) -> Result<GenerationStream, EngineError> {
        let tag = tag_of(&request);
        let script = self.scripts.get(&tag).copied().unwrap_or(Script {
            tokens: 6,
            hold: false,
        });
        let already = match &request.prompt {
            Prompt::Chat {
                assistant_prefix: Some(prefix),
                ..
            } => prefix.split_whitespace().count() as u32,
            _ => 0,
        };
        let n = script.tokens.min(request.sampling.max_tokens);
        let (tx, stream) = GenerationStream::channel();
        for i in 0..n {
            let index = already + i;
            let _ = tx.send(Ok(GenerationEvent::Delta {
                text: format!("{tag}{index} "),
                token_count: 1,
                token_ids: Some(vec![TokenId(index as i32)]),
            }));
        }
        if !script.hold {
            let reason = if n == request.sampling.max_tokens {
                FinishReason::Length
            } else {
                FinishReason::Stop
            };
            // `..default()` keeps this compiling when other branches add usage fields.
            #[allow(clippy::needless_update)]
            let usage = Usage {
                prompt_tokens: 10,
                cached_prompt_tokens: 4,
                completion_tokens: n,
                ..Usage::default()
            };
            let _ = tx.send(Ok(GenerationEvent::Finished {
                reason,
                usage,
                timings: Timings::default(),
                extensions: Default::default(),
            }));
        }
        self.senders.lock().unwrap().push((tag, tx));
        self.requests.lock().unwrap().push(request);
        Ok(stream)
    }

    fn model_info(&self) -> &ModelInfo {
        &self.info
    }

    fn token_counter(&self) -> &dyn TokenCounter {
        self
    }
}

impl TokenCounter for ScriptedEngine {
    fn count(&self, text: &str) -> TokenCount {
        TokenCount::Exact(text.split_whitespace().count() as u32)
    }
}

// ---- native test-double policies ------------------------------------------------------

/// A role whose system prompt starts with its persona (the scripted engine's tag).
struct TestRole {
    persona: String,
}

impl RolePolicy for TestRole {
    fn system_prompt(&mut self) -> Result<String, PolicyError> {
        Ok(format!("{} agent", self.persona))
    }

    fn build_messages(&mut self, input: &RoleInput) -> Result<Vec<ChatMessage>, PolicyError> {
        let mut user = input
            .conversation
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default();
        for upstream in &input.upstream {
            user.push_str(&format!("\n[{}] {}", upstream.source.id, upstream.text));
        }
        Ok(vec![
            ChatMessage::new(Role::System, self.system_prompt()?),
            ChatMessage::new(Role::User, user),
        ])
    }

    fn params(&mut self) -> Result<SamplingParams, PolicyError> {
        Ok(SamplingParams::default())
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Seen {
    Push(String, String),
    Finish(String),
}

/// An aggregator that logs what it sees; steps once every source has shown a chunk
/// (staircase) and finally once all have finished.
struct RecordingSession {
    log: Arc<Mutex<Vec<Seen>>>,
    sources: Vec<String>,
    seen: Vec<bool>,
    finished: Vec<bool>,
    mode: StreamMode,
    enough_after_first: Option<String>,
    stepped: bool,
    final_given: bool,
    never_final: bool,
}

impl AggregatorSession for RecordingSession {
    fn push(&mut self, source_id: &str, text: &str) -> Result<Demand, PolicyError> {
        self.log
            .lock()
            .unwrap()
            .push(Seen::Push(source_id.into(), text.into()));
        let i = self.sources.iter().position(|s| s == source_id).unwrap();
        self.seen[i] = true;
        if self.enough_after_first.as_deref() == Some(source_id) {
            return Ok(Demand::Enough);
        }
        Ok(Demand::More)
    }

    fn finish(&mut self, source_id: &str) -> Result<(), PolicyError> {
        self.log
            .lock()
            .unwrap()
            .push(Seen::Finish(source_id.into()));
        let i = self.sources.iter().position(|s| s == source_id).unwrap();
        self.finished[i] = true;
        Ok(())
    }

    fn answered(&mut self, _text: &str) -> Result<(), PolicyError> {
        Ok(())
    }

    fn next_step(&mut self) -> Result<Option<Step>, PolicyError> {
        let messages = vec![
            ChatMessage::new(Role::System, "agg instruction"),
            ChatMessage::new(Role::User, "question"),
        ];
        if self.final_given || self.never_final && self.finished.iter().all(|f| *f) {
            return Ok(None);
        }
        if self.finished.iter().all(|f| *f) {
            self.final_given = true;
            return Ok(Some(Step {
                messages,
                max_tokens: 1000,
                is_final: true,
            }));
        }
        if self.mode == StreamMode::Staircase && !self.stepped && self.seen.iter().all(|s| *s) {
            self.stepped = true;
            return Ok(Some(Step {
                messages,
                max_tokens: 3,
                is_final: false,
            }));
        }
        Ok(None)
    }
}

struct Truncate;

impl CompressorPolicy for Truncate {
    fn compress(
        &mut self,
        history: &[ChatMessage],
        budget_tokens: u32,
    ) -> Result<Vec<ChatMessage>, PolicyError> {
        let words: Vec<&str> = history
            .iter()
            .flat_map(|m| m.content.split_whitespace())
            .take(budget_tokens as usize)
            .collect();
        Ok(vec![ChatMessage::new(Role::Assistant, words.join(" "))])
    }
}

struct LastModel;

impl RouterPolicy for LastModel {
    fn route(&mut self, request: &RouteRequest) -> Result<RouteChoice, PolicyError> {
        Ok(RouteChoice {
            model: request.models.last().cloned().unwrap_or_default(),
            reason: "the last".into(),
        })
    }
}

/// A guard that masks `word` with `[x]`, or stops at it. The scripted engine's deltas are
/// whole words, so a window never ends inside one.
struct WordGuard {
    word: String,
    stop: bool,
}

impl staircase::guard::GuardSession for WordGuard {
    fn push(
        &mut self,
        window: &str,
        _new_bytes: usize,
        _tokens: u32,
    ) -> Result<staircase::guard::Verdict, PolicyError> {
        self.finish(window)
    }

    fn finish(&mut self, window: &str) -> Result<staircase::guard::Verdict, PolicyError> {
        use staircase::guard::{Edit, Verdict};
        Ok(match window.find(&self.word) {
            None => Verdict::Release(window.len()),
            Some(_) if self.stop => {
                Verdict::Stop(format!("`{}` is not for the aggregator", self.word))
            }
            Some(start) => Verdict::Redact {
                edits: vec![Edit {
                    start,
                    end: start + self.word.len(),
                    text: "[x]".into(),
                }],
                release: window.len() - self.word.len() + "[x]".len(),
            },
        })
    }
}

#[derive(Default)]
struct TestPolicies {
    log: Arc<Mutex<Vec<Seen>>>,
    enough_after_first: Option<String>,
    never_final: bool,
}

impl PolicyProvider for TestPolicies {
    fn role(
        &self,
        plugin: &str,
        config: &PluginConfig,
    ) -> Result<Box<dyn RolePolicy>, PolicyError> {
        if plugin == "broken" {
            return Err(PolicyError("plugin `broken` trapped: unreachable".into()));
        }
        Ok(Box::new(TestRole {
            persona: config.get("role").cloned().unwrap_or_else(|| plugin.into()),
        }))
    }

    fn aggregator(
        &self,
        _plugin: &str,
        _config: &PluginConfig,
        _conversation: &[ChatMessage],
        sources: &[Source],
        mode: StreamMode,
    ) -> Result<Box<dyn AggregatorSession>, PolicyError> {
        Ok(Box::new(RecordingSession {
            log: self.log.clone(),
            sources: sources.iter().map(|s| s.id.clone()).collect(),
            seen: vec![false; sources.len()],
            finished: vec![false; sources.len()],
            mode,
            enough_after_first: self.enough_after_first.clone(),
            stepped: false,
            final_given: false,
            never_final: self.never_final,
        }))
    }

    fn compressor(&self, _plugin: &str) -> Result<Box<dyn CompressorPolicy>, PolicyError> {
        Ok(Box::new(Truncate))
    }

    fn router(
        &self,
        _plugin: &str,
        _config: &PluginConfig,
    ) -> Result<Box<dyn RouterPolicy>, PolicyError> {
        Ok(Box::new(LastModel))
    }

    fn guard(
        &self,
        plugin: &str,
        config: &PluginConfig,
        _info: &staircase::guard::StreamInfo,
    ) -> Result<Box<dyn staircase::guard::GuardSession>, PolicyError> {
        let word = config.get("word").cloned().unwrap_or_default();
        match plugin {
            "mask" => Ok(Box::new(WordGuard { word, stop: false })),
            "stop" => Ok(Box::new(WordGuard { word, stop: true })),
            _ => Err(PolicyError(format!("no guard `{plugin}` in these tests"))),
        }
    }

    fn kind_of(&self, plugin: &str) -> Option<PluginKind> {
        match plugin {
            "proposer" | "broken" => Some(PluginKind::Role),
            "moa" => Some(PluginKind::Aggregator),
            "truncate" => Some(PluginKind::Compressor),
            "router" => Some(PluginKind::Router),
            "mask" | "stop" => Some(PluginKind::Guard),
            _ => None,
        }
    }
}

// ---- helpers --------------------------------------------------------------------------

const MOA: &str = r#"
name = "test-moa"
[stream]
policy = "staircase"
chunk_tokens = [2, 3]

[[nodes]]
id = "a"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 12
config = { role = "a" }

[[nodes]]
id = "b"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 7
config = { role = "b" }

[[nodes]]
id = "c"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 9
config = { role = "c" }

[[nodes]]
id = "final"
kind = "aggregator"
plugin = "moa"
model = "default"
max_tokens = 20
inputs = ["a", "b", "c"]
"#;

fn runner(engine: &Arc<ScriptedEngine>, policies: TestPolicies) -> Runner {
    Runner::new(
        Models::with_default(engine.clone() as Arc<dyn Engine>),
        Arc::new(policies),
    )
}

fn plain(tokens: u32) -> Script {
    Script {
        tokens,
        hold: false,
    }
}

fn held(tokens: u32) -> Script {
    Script { tokens, hold: true }
}

/// The text each source's chunks add up to, and where its finish came, per source.
fn per_source(log: &[Seen]) -> BTreeMap<String, (Vec<String>, Option<usize>)> {
    let mut out: BTreeMap<String, (Vec<String>, Option<usize>)> = BTreeMap::new();
    for (i, seen) in log.iter().enumerate() {
        match seen {
            Seen::Push(source, text) => {
                let entry = out.entry(source.clone()).or_default();
                assert!(entry.1.is_none(), "{source} pushed after its finish");
                entry.0.push(text.clone());
            }
            Seen::Finish(source) => {
                let entry = out.entry(source.clone()).or_default();
                assert!(entry.1.is_none(), "{source} finished twice");
                entry.1 = Some(i);
            }
        }
    }
    out
}

fn expected_output(tag: &str, n: u32) -> String {
    (0..n).map(|i| format!("{tag}{i} ")).collect()
}

// ---- tests ----------------------------------------------------------------------------

#[tokio::test]
async fn aggregator_sees_every_chunk_in_order_and_every_finish() {
    let engine = ScriptedEngine::new(&[("a", plain(100)), ("b", plain(100)), ("c", plain(100))]);
    let policies = TestPolicies::default();
    let log = policies.log.clone();
    let runner = runner(&engine, policies);
    let pipeline = Pipeline::parse(MOA, "moa.toml").unwrap();
    let report = runner
        .run(
            &pipeline,
            RunRequest::prompt("q", StreamMode::Staircase),
            None,
        )
        .await
        .unwrap();

    let seen = per_source(&log.lock().unwrap());
    for (source, tokens) in [("a", 12), ("b", 7), ("c", 9)] {
        let (chunks, finish) = &seen[source];
        assert_eq!(chunks.concat(), expected_output(source, tokens), "{source}");
        assert!(finish.is_some(), "{source} never finished");
        let sizes: Vec<usize> = chunks
            .iter()
            .map(|c| c.split_whitespace().count())
            .collect();
        // Schedule [2, 3]: 2, then 3s, then the rest.
        assert_eq!(sizes[0], 2, "{source}: {sizes:?}");
        assert!(
            sizes[1..sizes.len() - 1].iter().all(|&s| s == 3),
            "{source}: {sizes:?}"
        );
    }
    assert!(!report.answer.is_empty());
    assert!(report.ttft_ms.is_some());
    assert!(report.nodes.iter().all(|n| !n.cancelled));
    // The final step continued the first step's partial answer.
    let steps = engine.requests_of("agg");
    assert_eq!(steps.len(), 2);
    match &steps[1].prompt {
        Prompt::Chat {
            assistant_prefix, ..
        } => assert_eq!(assistant_prefix.as_deref(), Some("agg0 agg1 agg2 ")),
        other => panic!("{other:?}"),
    }
    // Step 1 wrote 3 tokens; the final step (6 tokens scripted) continued from there.
    assert_eq!(report.answer, expected_output("agg", 9));
    assert!(engine.live().is_empty(), "a finished run holds no stream");
}

#[tokio::test]
async fn layered_mode_pushes_each_source_whole_and_steps_once() {
    let engine = ScriptedEngine::new(&[]);
    let policies = TestPolicies::default();
    let log = policies.log.clone();
    let runner = runner(&engine, policies);
    let pipeline = Pipeline::parse(MOA, "moa.toml").unwrap();
    let report = runner
        .run(
            &pipeline,
            RunRequest::prompt("q", StreamMode::Layered),
            None,
        )
        .await
        .unwrap();
    let log = log.lock().unwrap();
    let seen = per_source(&log);
    for source in ["a", "b", "c"] {
        assert_eq!(seen[source].0.len(), 1, "{source}: one complete chunk");
    }
    assert_eq!(engine.requests_of("agg").len(), 1);
    assert!(matches!(log.last(), Some(Seen::Finish(_))));
    assert!(!report.answer.is_empty());
    assert_eq!(report.mode, StreamMode::Layered);
}

/// A model that cannot continue a partial answer is refused when a staircase run binds the
/// pipeline to it, before any node starts; layered mode, which steps once, still runs.
#[tokio::test]
async fn a_staircase_run_needs_models_that_continue_an_answer() {
    let engine = ScriptedEngine::with_capabilities(
        &[],
        Capabilities {
            assistant_prefix: false,
            token_prompts: false,
        },
    );
    let runner = runner(&engine, TestPolicies::default());
    let pipeline = Pipeline::parse(MOA, "moa.toml").unwrap();
    let error = runner
        .run(
            &pipeline,
            RunRequest::prompt("q", StreamMode::Staircase),
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            &error,
            RunError::Engine {
                node,
                source: EngineError::Unsupported { .. },
            } if node == "final"
        ),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("cannot continue a partial assistant answer")
    );
    assert!(engine.requests_of("a").is_empty(), "no node started");
    let layered = runner
        .run(
            &pipeline,
            RunRequest::prompt("q", StreamMode::Layered),
            None,
        )
        .await;
    assert!(layered.is_ok(), "{layered:?}");
}

#[tokio::test]
async fn staircase_answers_while_sources_still_run_and_cancelling_frees_every_stream() {
    // Every proposer emits 5 tokens and then stays open; only staircase can answer.
    let engine = ScriptedEngine::new(&[("a", held(5)), ("b", held(5)), ("c", held(5))]);
    let runner = runner(&engine, TestPolicies::default());
    let pipeline = Pipeline::parse(MOA, "moa.toml").unwrap();
    let output = pipeline.output;
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut run = Box::pin(runner.run(
        &pipeline,
        RunRequest::prompt("q", StreamMode::Staircase),
        Some(tx),
    ));
    let first_answer = loop {
        tokio::select! {
            result = &mut run => panic!("the run ended before answering: {:?}", result.map(|r| r.answer)),
            event = events.recv() => match event {
                Some(RunEvent::NodeDelta { node, text, .. }) if node == output => break text,
                Some(_) => {}
                None => panic!("events ended"),
            },
        }
    };
    assert_eq!(first_answer, "agg0 ");
    let live = engine.live();
    for proposer in ["a", "b", "c"] {
        assert!(
            live.iter().any(|t| t == proposer),
            "{proposer} still streaming: {live:?}"
        );
    }

    // The caller goes away: dropping the run must drop every engine stream.
    drop(run);
    assert_eq!(engine.live(), Vec::<String>::new());
}

#[tokio::test]
async fn a_source_the_aggregator_has_enough_of_is_cancelled() {
    let engine = ScriptedEngine::new(&[("b", held(30))]);
    let policies = TestPolicies {
        enough_after_first: Some("b".into()),
        ..TestPolicies::default()
    };
    let log = policies.log.clone();
    let runner = runner(&engine, policies);
    let pipeline = Pipeline::parse(MOA, "moa.toml").unwrap();
    let report = runner
        .run(
            &pipeline,
            RunRequest::prompt("q", StreamMode::Staircase),
            None,
        )
        .await
        .unwrap();
    let b = report.nodes.iter().find(|n| n.id == "b").unwrap();
    assert!(b.cancelled, "{b:?}");
    assert!(!engine.live().contains(&"b".to_string()));
    let seen = per_source(&log.lock().unwrap());
    assert_eq!(seen["b"].0.len(), 1, "no chunk after `enough`");
    assert!(
        seen["b"].1.is_some(),
        "a released source is reported finished"
    );
    let trace = report.trace();
    assert!(
        trace.trace_events.iter().any(|e| e.cat == "cancel"),
        "the trace shows the cancellation"
    );
}

#[tokio::test]
async fn critical_path_nodes_get_the_engine_first() {
    let engine = ScriptedEngine::new(&[]);
    let runner = runner(&engine, TestPolicies::default());
    let pipeline = Pipeline::parse(MOA, "moa.toml").unwrap();
    let request = RunRequest::prompt("q", StreamMode::Staircase);
    let estimate = runner.estimate(&pipeline, &request);
    let path: Vec<&str> = estimate
        .nodes
        .iter()
        .map(|&i| pipeline.node(i).id.as_str())
        .collect();
    // `a` expects the most tokens (12), so the path is a -> final.
    assert_eq!(path, vec!["a", "final"]);
    let report = runner.run(&pipeline, request, None).await.unwrap();
    assert_eq!(report.critical_path_estimated.nodes, vec!["a", "final"]);
    assert_eq!(engine.requests_of("a")[0].priority, CRITICAL_PRIORITY);
    assert_eq!(engine.requests_of("b")[0].priority, Priority::default());
    assert!(
        engine
            .requests_of("agg")
            .iter()
            .all(|r| r.priority == CRITICAL_PRIORITY)
    );
}

#[tokio::test]
async fn agents_with_inputs_step_on_streaming_inputs_and_continue_their_answer() {
    let debate = r#"
[stream]
policy = "staircase"
chunk_tokens = [2]
[[nodes]]
id = "pro"
kind = "agent"
plugin = "proposer"
model = "default"
config = { role = "pro" }
[[nodes]]
id = "con"
kind = "agent"
plugin = "proposer"
model = "default"
config = { role = "con" }
[[nodes]]
id = "pro2"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 100
inputs = ["pro", "con"]
config = { role = "pro2" }
[[nodes]]
id = "judge"
kind = "aggregator"
plugin = "moa"
model = "default"
inputs = ["pro2"]
"#;
    let engine =
        ScriptedEngine::new(&[("pro", plain(8)), ("con", plain(8)), ("pro2", plain(1000))]);
    let runner = runner(&engine, TestPolicies::default());
    let pipeline = Pipeline::parse(debate, "debate.toml").unwrap();
    for mode in [StreamMode::Staircase, StreamMode::Layered] {
        let before = engine.requests_of("pro2").len();
        let report = runner
            .run(&pipeline, RunRequest::prompt("q", mode), None)
            .await
            .unwrap();
        assert!(!report.answer.is_empty());
        let requests = engine.requests_of("pro2")[before..].to_vec();
        let last = requests.last().unwrap();
        match &last.prompt {
            Prompt::Chat { messages, .. } => {
                let user = &messages[1].content;
                assert!(
                    user.contains(&format!("[pro] {}", expected_output("pro", 8))),
                    "{user}"
                );
                assert!(
                    user.contains(&format!("[con] {}", expected_output("con", 8))),
                    "{user}"
                );
            }
            other => panic!("{other:?}"),
        }
        let pro2 = report.nodes.iter().find(|n| n.id == "pro2").unwrap();
        assert_eq!(pro2.output_tokens, 100);
        if mode == StreamMode::Layered {
            assert_eq!(requests.len(), 1);
        } else {
            // Each later step continues exactly the text written so far.
            let mut written = String::new();
            for r in &requests {
                let Prompt::Chat {
                    assistant_prefix, ..
                } = &r.prompt
                else {
                    panic!()
                };
                assert_eq!(assistant_prefix.clone().unwrap_or_default(), written);
                written = expected_output(
                    "pro2",
                    written.split_whitespace().count() as u32 + r.sampling.max_tokens.min(1000),
                );
            }
            assert!(requests.len() > 1);
        }
    }
}

#[tokio::test]
async fn compressors_and_routers_take_part() {
    let text = r#"
[[nodes]]
id = "a"
kind = "agent"
plugin = "proposer"
model = "default"
config = { role = "a" }
[[nodes]]
id = "short"
kind = "compressor"
plugin = "truncate"
budget_tokens = 3
inputs = ["a"]
[[nodes]]
id = "final"
kind = "aggregator"
plugin = "moa"
router = "router"
models = ["default", "scripted"]
inputs = ["short"]
"#;
    let engine = ScriptedEngine::new(&[("a", plain(10))]);
    let policies = TestPolicies::default();
    let log = policies.log.clone();
    let runner = runner(&engine, policies);
    let pipeline = Pipeline::parse(text, "c.toml").unwrap();
    let report = runner
        .run(
            &pipeline,
            RunRequest::prompt("q", StreamMode::Staircase),
            None,
        )
        .await
        .unwrap();
    let seen = per_source(&log.lock().unwrap());
    // The label and two words fit the budget of three.
    assert_eq!(seen["short"].0.concat(), "a: a0 a1");
    assert!(!report.answer.is_empty());
}

#[tokio::test]
async fn policy_failures_name_the_node_and_a_policy_that_never_ends_is_an_error() {
    let engine = ScriptedEngine::new(&[]);
    let runner_broken = runner(&engine, TestPolicies::default());
    let broken = Pipeline::parse(
        &MOA.replacen("plugin = \"proposer\"", "plugin = \"broken\"", 1),
        "m.toml",
    )
    .unwrap();
    let error = runner_broken
        .run(
            &broken,
            RunRequest::prompt("q", StreamMode::Staircase),
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, RunError::Policy { ref node, .. } if node == "a"),
        "{error}"
    );
    assert!(error.to_string().contains("trapped"), "{error}");

    let never = runner(
        &engine,
        TestPolicies {
            never_final: true,
            ..TestPolicies::default()
        },
    );
    let pipeline = Pipeline::parse(MOA, "moa.toml").unwrap();
    let error = never
        .run(
            &pipeline,
            RunRequest::prompt("q", StreamMode::Layered),
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, RunError::NoFinalStep { ref node, .. } if node == "final"),
        "{error}"
    );
    assert!(
        engine.live().is_empty(),
        "a failed run leaves no stream behind"
    );

    let unknown = Pipeline::parse(
        &MOA.replace("plugin = \"moa\"", "plugin = \"nope\""),
        "m.toml",
    )
    .unwrap();
    let error = never
        .run(&unknown, RunRequest::prompt("q", StreamMode::Layered), None)
        .await
        .unwrap_err();
    assert!(error.to_string().starts_with("m.toml:"), "{error}");
}

#[tokio::test]
async fn a_run_trace_is_chrome_json_and_renders_as_a_staircase() {
    let engine = ScriptedEngine::new(&[("a", plain(12))]);
    let runner = runner(&engine, TestPolicies::default());
    let pipeline = Pipeline::parse(MOA, "moa.toml").unwrap();
    let report = runner
        .run(
            &pipeline,
            RunRequest::prompt("q", StreamMode::Staircase),
            None,
        )
        .await
        .unwrap();
    let json = report.trace().to_json();
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    let events = value["traceEvents"].as_array().unwrap();
    let lanes: Vec<&str> = events
        .iter()
        .filter(|e| e["name"] == "thread_name")
        .map(|e| e["args"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(lanes.len(), 4);
    for lane in ["a", "b", "c", "final"] {
        assert!(lanes.contains(&lane));
    }
    assert!(events.iter().any(|e| e["cat"] == "step" && e["ph"] == "X"));
    assert!(events.iter().any(|e| e["cat"] == "chunk" && e["ph"] == "i"));
    assert!(
        events
            .iter()
            .any(|e| e["cat"] == "node" && e["args"]["critical"] == true)
    );
    let chart = svg::render(&ChromeTrace::from_json(&json).unwrap()).unwrap();
    assert!(chart.contains("<polyline"));
    assert_eq!(
        chart.matches("<polyline").count(),
        4,
        "one staircase per proposer, and the answer's own (two steps)"
    );
    // The report serializes for `--json`.
    let report_json = serde_json::to_value(&report).unwrap();
    assert!(report_json["ttft_ms"].is_number());
    assert_eq!(report_json["nodes"].as_array().unwrap().len(), 4);
}

// ---- the real model and the built-in plugins -----------------------------------------

/// Every example pipeline, in both modes, on the embedded model with the built-in plugins:
/// each run ends with a non-empty answer from its output node, nothing left streaming.
/// Every `moa-aggregator` node warmed its prompt head up before its first step, and that
/// step found the head in the prefix cache: all of it but the few template tokens that close
/// the warm-up's user message. A node with an opening (`opening-tokens`, staircase mode)
/// writes it on the head instead of a warm-up, and its next step finds the head the same way.
fn assert_warm_up_served_the_first_step(
    pipeline: &Pipeline,
    report: &staircase::pipeline::RunReport,
    name: &str,
) {
    use staircase::trace::EventKind;
    const CLOSING_TOKENS: u32 = 8;
    let events = report.timeline.events();
    for (lane, node) in pipeline.nodes.iter().enumerate() {
        if node.plugin != "moa-aggregator" {
            continue;
        }
        let on_lane = || events.iter().filter(|e| e.lane == lane);
        let opens = report.mode == StreamMode::Staircase
            && node
                .config
                .get("opening-tokens")
                .is_some_and(|t| t.as_str() != "0");
        if opens {
            let steps: Vec<(u32, u32)> = on_lane()
                .filter_map(|e| match e.kind {
                    EventKind::Step {
                        prompt_tokens,
                        cached_prompt_tokens,
                        ..
                    } => Some((prompt_tokens, cached_prompt_tokens)),
                    _ => None,
                })
                .collect();
            assert!(
                on_lane().all(|e| !matches!(e.kind, EventKind::WarmUp { .. })),
                "{name}: `{}` opens instead of warming up",
                node.id
            );
            let [(opening, _), (_, cached), ..] = steps[..] else {
                panic!("{name}: `{}` stepped {} times", node.id, steps.len());
            };
            assert!(
                cached + CLOSING_TOKENS >= opening,
                "{name}: `{}`'s step after the opening had {cached} cached prompt tokens, the \
                 opening {opening}",
                node.id
            );
            continue;
        }
        let warm = on_lane()
            .find_map(|e| match e.kind {
                EventKind::WarmUp { prompt_tokens, .. } => Some((e.at, prompt_tokens)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{name}: `{}` did not warm up", node.id));
        let (started, cached) = on_lane()
            .find_map(|e| match e.kind {
                EventKind::Step {
                    started,
                    cached_prompt_tokens,
                    ..
                } => Some((started, cached_prompt_tokens)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{name}: `{}` never stepped", node.id));
        assert!(
            warm.0 <= started,
            "{name}: the warm-up ended after the first step began"
        );
        assert!(
            cached + CLOSING_TOKENS >= warm.1,
            "{name}: `{}`'s first step had {cached} cached prompt tokens, its warm-up {} tokens",
            node.id,
            warm.1
        );
    }
}

#[test]
fn every_example_pipeline_answers_in_both_modes_and_a_cancelled_run_frees_the_engine() {
    use staircase::pipeline::examples::BUILTIN;
    let app = staircase::app::AppBuilder::new()
        .build()
        .expect("the default model and built-in plugins load");
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    for (name, _) in BUILTIN {
        let mut pipeline = (*app.pipeline(name).unwrap().pipeline).clone();
        // Short outputs keep CI quick on two cores.
        pipeline.limit_tokens(12);
        for mode in [StreamMode::Staircase, StreamMode::Layered] {
            let request = RunRequest::prompt("Name one planet of the solar system.", mode);
            let report = tokio
                .block_on(app.runner().run(&pipeline, request, None))
                .unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"));
            assert!(
                !report.answer.trim().is_empty(),
                "{name} {mode:?}: empty answer"
            );
            assert!(report.ttft_ms.is_some(), "{name} {mode:?}");
            let output = &report.nodes[pipeline.output.0];
            assert!(
                !output.cancelled && output.finished_ms.is_some(),
                "{name} {mode:?}"
            );
            assert!(output.steps >= 1, "{name} {mode:?}");
            assert_warm_up_served_the_first_step(&pipeline, &report, name);
            let measured = &report.critical_path_measured;
            assert_eq!(
                measured.nodes.last(),
                Some(&output.id),
                "{name} {mode:?}: the measured critical path ends at the answer"
            );
            assert!(
                measured.length_ms <= report.total_ms,
                "{name} {mode:?}: a critical path of {:?} in a run of {:?}",
                measured.length_ms,
                report.total_ms
            );
            if mode == StreamMode::Layered {
                assert_eq!(output.steps, 1, "{name}: layered aggregators step once");
                assert!(
                    report.nodes.iter().all(|n| !n.cancelled),
                    "{name}: layered reads all"
                );
            }
        }
    }

    // Cancelling a run mid-answer (dropping its future) frees every engine sequence.
    let pipeline = app.pipeline("moa").unwrap().pipeline.clone();
    let request = RunRequest::prompt("Describe the sea in detail.", StreamMode::Staircase);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    tokio.block_on(async {
        let run = app.runner().run(&pipeline, request, Some(events_tx));
        tokio::pin!(run);
        loop {
            tokio::select! {
                result = &mut run => panic!("the run ended before it was cancelled: {:?}", result.map(|r| r.answer)),
                Some(event) = events.recv() => {
                    if matches!(event, RunEvent::NodeDelta { .. }) {
                        break;
                    }
                }
            }
        }
    });
    if let Err(busy) = app.wait_idle(std::time::Duration::from_secs(120)) {
        panic!("engine sequences outlived the cancelled run: {busy:?}");
    }
}

// ---- run bounds, with the hostile plugin fixture ------------------------------------------

/// A proposer feeding the hostile fixture, whose steps are never final.
const HOSTILE: &str = r#"
name = "test-hostile"
[stream]
policy = "staircase"
chunk_tokens = [2, 3]

[[nodes]]
id = "a"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 6

[[nodes]]
id = "final"
kind = "aggregator"
plugin = "hostile"
model = "default"
max_tokens = 100000
inputs = ["a"]
"#;

/// The plugin registry with the built-ins and the hostile fixture (real components).
fn hostile_plugins() -> Arc<staircase::plugin::Registry> {
    use staircase::plugin::builtin::{guest_artifact, guest_manifest};
    use staircase::plugin::{HostConfig, PluginRuntime, Registry};
    let registry = Registry::new(
        PluginRuntime::new(HostConfig {
            cache_dir: Some(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache")),
            ..HostConfig::default()
        })
        .unwrap(),
    );
    registry.load_builtins().unwrap();
    let dir =
        std::env::temp_dir().join(format!("staircase-pipeline-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(guest_artifact("hostile"), dir.join("hostile.wasm")).unwrap();
    std::fs::copy(guest_manifest("fixtures/hostile"), dir.join("hostile.toml")).unwrap();
    registry.load_file(&dir.join("hostile.wasm")).unwrap();
    registry
}

/// Runs the hostile pipeline on `prompt` under `limits`; it must fail. The runner is
/// returned for a run after it.
async fn run_hostile(
    engine: &Arc<ScriptedEngine>,
    limits: RunLimits,
    prompt: &str,
) -> (Runner, RunError) {
    let runner = Runner::new(
        Models::with_default(engine.clone() as Arc<dyn Engine>),
        hostile_plugins(),
    )
    .with_limits(limits);
    let pipeline = Pipeline::parse(HOSTILE, "hostile.toml").unwrap();
    let error = runner
        .run(
            &pipeline,
            RunRequest::prompt(prompt, StreamMode::Staircase),
            None,
        )
        .await
        .unwrap_err();
    (runner, error)
}

/// The engine requests of the hostile aggregator's steps (one message each; an agent's
/// have a system prompt and a user message).
fn hostile_steps(engine: &ScriptedEngine) -> usize {
    engine
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|r| matches!(&r.prompt, Prompt::Chat { messages, .. } if messages.len() == 1))
        .count()
}

/// After a bounded run, the same runner serves a normal one.
async fn a_normal_run_follows(runner: &Runner) {
    // The hostile pipeline with the built-in aggregator.
    let builtin = HOSTILE
        .replace("plugin = \"hostile\"", "plugin = \"moa-aggregator\"")
        .replace("max_tokens = 100000", "max_tokens = 6");
    let pipeline = Pipeline::parse(&builtin, "moa.toml").unwrap();
    let report = runner
        .run(
            &pipeline,
            RunRequest::prompt("q", StreamMode::Staircase),
            None,
        )
        .await
        .unwrap();
    assert!(!report.answer.is_empty());
}

fn bound_of(error: RunError) -> RunBound {
    match error {
        RunError::Bound {
            node,
            plugin,
            bound,
        } => {
            assert_eq!((node.as_str(), plugin.as_str()), ("final", "hostile"));
            bound
        }
        other => panic!("expected a run bound, got {other}"),
    }
}

#[tokio::test]
async fn an_aggregator_that_never_finishes_ends_at_the_step_bound() {
    let engine = ScriptedEngine::new(&[]);
    let limits = RunLimits {
        steps_per_node: 16,
        ..RunLimits::default()
    };
    let (runner, error) = run_hostile(&engine, limits, "q").await;
    assert!(error.to_string().contains("steps_per_node"), "{error}");
    assert_eq!(
        bound_of(error),
        RunBound::Steps {
            steps: 17,
            limit: 16
        }
    );
    assert_eq!(hostile_steps(&engine), 16, "no step beyond the bound ran");
    assert!(engine.live().is_empty(), "the ended run left no stream");
    a_normal_run_follows(&runner).await;
}

#[tokio::test]
async fn steps_that_generate_nothing_end_the_run_at_the_idle_bound() {
    // The hostile steps' prompts start with nothing or with the proposer's first word.
    let engine = ScriptedEngine::new(&[("", plain(0)), ("You0", plain(0))]);
    let limits = RunLimits {
        idle_steps: 3,
        ..RunLimits::default()
    };
    let (runner, error) = run_hostile(&engine, limits, "q").await;
    assert_eq!(bound_of(error), RunBound::IdleSteps { steps: 4, limit: 3 });
    a_normal_run_follows(&runner).await;
}

#[tokio::test]
async fn many_calls_each_under_the_deadline_end_at_the_runs_plugin_time() {
    let engine = ScriptedEngine::new(&[]);
    let limit = Duration::from_millis(300);
    // Every call of the hostile session spins 20 ms, a fifth of its deadline.
    let limits = RunLimits {
        plugin_time: limit,
        ..RunLimits::default()
    };
    let (runner, error) = run_hostile(&engine, limits, "hostile:spin:20").await;
    match bound_of(error) {
        RunBound::PluginTime {
            spent,
            limit: bound,
        } => {
            assert_eq!(bound, limit);
            assert!(spent > limit, "{spent:?}");
        }
        other => panic!("expected the plugin-time bound, got {other}"),
    }
    a_normal_run_follows(&runner).await;
}

// ---- load-adaptive choice on the real engine -------------------------------------------

/// Two proposers and an aggregator, layered, and a one-node variant writing a few tokens.
const ADAPTIVE: &str = r#"
name = "adaptive"
[stream]
policy = "complete"
[[nodes]]
id = "a"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 24
[[nodes]]
id = "b"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 24
seed = 2
[[nodes]]
id = "agg"
kind = "aggregator"
plugin = "moa-aggregator"
model = "default"
max_tokens = 24
inputs = ["a", "b"]

[[variants]]
name = "small"
quality = 0.4
[[variants.nodes]]
id = "solo"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 4
"#;

/// Requests that hold the engine while the tight run chooses.
const HELD: usize = 3;

/// With the local engine busy with other real requests, a pipeline whose budget only its
/// full variant meets on an idle engine runs its small variant; once those requests are
/// cancelled and the engine's stats show it idle, the full one again. The load comes from
/// the engine itself (`Engine::load`): a choice that ignored it would run the full variant
/// both times.
#[test]
fn a_tight_budget_runs_the_small_variant_while_the_engine_is_busy_and_the_full_one_once_idle() {
    use staircase::tune::adaptive::{OWN_VARIANT, choose};
    let app = staircase::app::AppBuilder::new()
        .build()
        .expect("the default model and built-in plugins load");
    let local = app
        .models()
        .iter()
        .find_map(|m| m.local().cloned())
        .expect("the default model is local");
    let runner = app.runner();
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut pipeline = Pipeline::parse(ADAPTIVE, "adaptive.toml").unwrap();
    runner.check(&pipeline).unwrap();
    let request = || RunRequest::prompt("Why is the sky blue?", StreamMode::Layered);
    // The runner learns this host's latencies first, as a serving host has.
    tokio
        .block_on(runner.run(&pipeline, request(), None))
        .unwrap();
    if let Err(busy) = app.wait_idle(Duration::from_secs(120)) {
        panic!("the warm-up run left the engine busy: {busy:?}");
    }
    // The budget: 2.5x the full variant's prediction on the idle engine. With HELD
    // requests ahead on one CPU its tokens are predicted 4x slower, so only the small one
    // (a few tokens after one prefill) meets it.
    let (_, idle) = choose(
        runner,
        &pipeline,
        &request(),
        Some(Duration::from_secs(3600)),
    );
    let idle = idle.expect("the pipeline declares variants");
    assert_eq!(idle.variant, OWN_VARIANT, "{idle:?}");
    assert_eq!(idle.models[0].stretch, 1.0, "{idle:?}");
    pipeline.adaptive.latency_budget = Some(Duration::from_secs_f64(
        idle.predicted_critical_path_ms * 2.5 / 1e3,
    ));

    let held: Vec<GenerationStream> = (0..HELD)
        .map(|i| {
            let mut r = GenerationRequest::chat(vec![ChatMessage::new(
                Role::User,
                format!("Story {i}: tell a long story about a lighthouse keeper."),
            )]);
            // Bounded: the test cancels them long before they end.
            r.sampling.max_tokens = 512;
            app.default_engine().submit(r).unwrap()
        })
        .collect();
    local
        .wait_for_stats(Duration::from_secs(120), |s| {
            s.live_sequences + s.queued >= HELD
        })
        .expect("the held requests reach the engine");
    let (chosen, busy) = choose(runner, &pipeline, &request(), None);
    let busy = busy.unwrap();
    assert_eq!(busy.variant, "small", "{busy:?}");
    assert!(busy.met_budget, "{busy:?}");
    assert!(busy.reason.contains("under load"), "{}", busy.reason);
    let load = busy.models[0]
        .load
        .expect("the local engine reports its load");
    assert!(load.running + load.queued >= HELD, "{load:?}");
    let report = tokio
        .block_on(runner.run(&chosen, request(), None))
        .unwrap();
    assert_eq!(report.nodes.len(), 1);

    // The engine drains: dropping the streams cancels the held requests.
    drop(held);
    if let Err(busy) = app.wait_idle(Duration::from_secs(120)) {
        panic!("the cancelled requests outlived their streams: {busy:?}");
    }
    let (chosen, drained) = choose(runner, &pipeline, &request(), None);
    let drained = drained.unwrap();
    assert_eq!(drained.variant, OWN_VARIANT, "{drained:?}");
    assert!(drained.met_budget, "{drained:?}");
    let report = tokio
        .block_on(runner.run(&chosen, request(), None))
        .unwrap();
    assert_eq!(report.nodes.len(), 3);
}

/// The heterogeneous pipelines of `examples/mixed/` parse, and every model they name is in
/// the models table beside them (catalogue models, pulled on first use).
#[test]
fn the_mixed_pipelines_name_models_of_the_table_beside_them() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mixed");
    let config = staircase::app::config::Config::load(&dir.join("staircase.toml")).unwrap();
    let models: Vec<String> = config.models.keys().cloned().collect();
    assert_eq!(models, ["large", "medium", "small"]);
    let kind_of = |plugin: &str| match plugin {
        "proposer" => Some(PluginKind::Role),
        "moa-aggregator" => Some(PluginKind::Aggregator),
        _ => None,
    };
    for (file, named) in [
        ("moa-mixed.toml", vec!["large", "medium", "small"]),
        ("self-moa.toml", vec!["large"]),
    ] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let pipeline = Pipeline::parse(&text, file).unwrap();
        pipeline.check_bindings(&kind_of, &models).unwrap();
        let mut used: Vec<String> = pipeline
            .nodes
            .iter()
            .filter_map(|node| match &node.model {
                staircase::pipeline::spec::ModelBinding::Fixed(model) => Some(model.clone()),
                _ => None,
            })
            .collect();
        used.sort();
        used.dedup();
        assert_eq!(used, named, "{file}");
        // A table without one of them is refused, naming it.
        let without_large = ["small".to_string(), "medium".to_string()];
        let error = pipeline
            .check_bindings(&kind_of, &without_large)
            .unwrap_err();
        assert!(
            error.to_string().contains("unknown model `large`"),
            "{error}"
        );
    }
}

/// Inner-edge guards (`[[nodes.guards]]`): the aggregator gets proposer `a`'s text with `a3`
/// masked and proposer `b`'s only up to the word its guard stops at (then `b`'s end), while
/// `c` is untouched; the verdicts are run events and trace notes.
#[tokio::test]
async fn inner_edge_guards_keep_a_proposers_text_out_of_the_aggregator() {
    let engine = ScriptedEngine::new(&[("a", plain(100)), ("b", plain(100)), ("c", plain(100))]);
    let policies = TestPolicies::default();
    let log = policies.log.clone();
    let runner = runner(&engine, policies);
    let guarded = MOA
        .replace(
            "config = { role = \"a\" }",
            "config = { role = \"a\" }\n[[nodes.guards]]\nplugin = \"mask\"\nconfig = { word = \"a3\" }",
        )
        .replace(
            "config = { role = \"b\" }",
            "config = { role = \"b\" }\n[[nodes.guards]]\nplugin = \"stop\"\nconfig = { word = \"b4\" }",
        );
    let pipeline = Pipeline::parse(&guarded, "moa.toml").unwrap();
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let report = runner
        .run(
            &pipeline,
            RunRequest::prompt("q", StreamMode::Staircase),
            Some(events_tx),
        )
        .await
        .unwrap();

    let seen = per_source(&log.lock().unwrap());
    let a = seen["a"].0.concat();
    assert_eq!(a, expected_output("a", 12).replace("a3 ", "[x] "));
    let (b_chunks, b_finish) = &seen["b"];
    let b = b_chunks.concat();
    assert!(!b.contains("b4"), "{b}");
    assert!(expected_output("b", 7).starts_with(&b), "{b}");
    assert!(b_finish.is_some(), "b's edge was ended");
    assert_eq!(seen["c"].0.concat(), expected_output("c", 9));
    assert!(!report.answer.is_empty());

    let mut verdicts = Vec::new();
    while let Ok(event) = events_rx.try_recv() {
        if let RunEvent::Guard { node, event } = event {
            verdicts.push((pipeline.node(node).id.clone(), event));
        }
    }
    assert!(
        verdicts.iter().any(|(node, e)| node == "a"
            && matches!(e, staircase::guard::GuardEvent::Redacted { guard, .. } if guard == "mask")),
        "{verdicts:?}"
    );
    assert!(
        verdicts.iter().any(|(node, e)| node == "b"
            && matches!(e, staircase::guard::GuardEvent::Stopped { guard, .. } if guard == "stop")),
        "{verdicts:?}"
    );
    let trace = report.trace().to_json();
    assert!(trace.contains("mask redacted 1 span(s)"), "{trace}");
}

/// The guarded example is `moa` with three output guards on its answer, in order.
#[test]
fn the_guarded_example_is_moa_with_three_answer_guards() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let parse = |file: &str| {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        Pipeline::parse(&text, file).unwrap()
    };
    let (moa, guarded) = (
        parse("pipelines/moa.toml"),
        parse("guards/moa-guarded.toml"),
    );
    let plugins: Vec<&str> = guarded.guards.iter().map(|g| g.plugin.as_str()).collect();
    assert_eq!(plugins, ["pattern-guard", "phrase-guard", "pattern-guard"]);
    let ids = |p: &Pipeline| p.nodes.iter().map(|n| n.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&guarded), ids(&moa), "the same nodes as moa");
}
