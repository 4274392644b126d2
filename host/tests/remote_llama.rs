//! The remote engine on real servers: two llama.cpp `llama-server` replicas of the default
//! model on loopback ports, started and killed by the tests (each with one thread and a small
//! context, at most two at a time). `.ci/llama-server.sh` builds the server; without it
//! these tests fail, naming the script, rather than pass by skipping.
//!
//! They cover every example pipeline in both modes on a remote model, staircase steps that
//! really continue the assistant prefix (the server reports the continued prompt as cached),
//! and failover: a replica killed before the first token, one killed mid-stream, its breaker
//! opening and closing again once it is restarted and passes a health check.

use std::sync::Arc;
use std::time::{Duration, Instant};

use staircase::engine::remote::launch::LlamaServer;
use staircase::engine::remote::{Continuation, RemoteConfig, RemoteEngine};
use staircase::engine::{
    ChatMessage, Engine, EngineError, GenerationEvent, GenerationRequest, Prompt, Role,
};
use staircase::pipeline::examples::BUILTIN;
use staircase::pipeline::{Models, RunRequest, Runner};
use staircase::plugin::{HostConfig, PluginRuntime, Registry};
use staircase::policy::StreamMode;
use staircase::routing::{BreakerConfig, BreakerState, PolicyConfig};

/// One test at a time: each starts one or two servers, and more would crowd the machine.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    // A failed test poisons the lock; the next still runs alone.
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A replica on the default model; panics, naming the build script, without the binary.
fn server() -> LlamaServer {
    LlamaServer::start(&model()).unwrap_or_else(|e| panic!("{e}"))
}

fn model() -> std::path::PathBuf {
    staircase::model::pull_default_blocking(false).expect("default model")
}

fn remote_config(urls: Vec<String>) -> RemoteConfig {
    let mut config = RemoteConfig::new("default", urls);
    config.routing = PolicyConfig::PipelineAware;
    // Checks only when a test asks (no background traffic).
    config.health.interval = Duration::ZERO;
    config.timeouts.idle = Duration::from_secs(20);
    config
}

fn runner(engine: Arc<dyn Engine>) -> Runner {
    let registry = Registry::new(
        PluginRuntime::new(HostConfig {
            engine: Some(engine.clone()),
            ..HostConfig::default()
        })
        .expect("plugin runtime"),
    );
    registry.load_builtins().expect("built-in plugins");
    Runner::new(Models::with_default(engine), registry)
}

#[test]
fn every_example_pipeline_runs_both_modes_on_two_replicas() {
    let _serial = serial();
    let servers = [server(), server()];
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let config = remote_config(servers.iter().map(LlamaServer::url).collect());
        let engine = Arc::new(RemoteEngine::connect("default", config).await.unwrap());
        // Detected from llama.cpp's /props: a trailing assistant message is continued.
        assert_eq!(engine.continuation(), Continuation::TrailingAssistant);
        assert!(engine.model_info().context_tokens >= 1024);
        let runner = runner(engine.clone());
        for (name, _) in BUILTIN {
            let mut pipeline = staircase::pipeline::examples::builtin(name)
                .unwrap()
                .unwrap();
            pipeline.limit_tokens(12);
            for mode in [StreamMode::Staircase, StreamMode::Layered] {
                let request = RunRequest::prompt("Why is the sky blue?", mode);
                let report = runner
                    .run(&pipeline, request, None)
                    .await
                    .unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"));
                assert!(
                    !report.answer.trim().is_empty(),
                    "{name} {mode:?}: empty answer"
                );
                assert!(report.ttft_ms.is_some());
                let hit = report.cache.aggregator_hit_rate();
                eprintln!(
                    "{name} {mode:?}: aggregator prompt cached {:.0}%",
                    hit * 100.0
                );
                if mode == StreamMode::Staircase && name.starts_with("moa") {
                    // The aggregator's steps continue one prompt on one replica, which the
                    // server reports as cached.
                    assert!(hit > 0.3, "{name}: aggregator cache hit rate {hit}");
                }
            }
        }
        // Both replicas served: the proposers of a run were spread.
        let stats = engine.replica_stats();
        assert!(stats.iter().all(|s| s.requests > 0), "{stats:?}");
        // Every run above answered; a try that failed was retried before its first token (a
        // pooled connection the busy server closed, seen once in a loaded run), so the
        // replicas stay healthy and such failures stay rare.
        assert!(
            stats
                .iter()
                .all(|s| s.breaker == BreakerState::Closed && s.errors * 10 <= s.requests),
            "{stats:?}"
        );
    });
}

/// Reads a stream to its end: text and the usage of `Finished`.
async fn collect(
    engine: &RemoteEngine,
    request: GenerationRequest,
) -> Result<(String, staircase::engine::Usage), EngineError> {
    let mut stream = engine.submit(request)?;
    let mut text = String::new();
    while let Some(event) = stream.next().await {
        match event? {
            GenerationEvent::Delta { text: t, .. } => text.push_str(&t),
            GenerationEvent::Finished { usage, .. } => return Ok((text, usage)),
        }
    }
    Err(EngineError::Stopped)
}

#[test]
fn staircase_steps_continue_the_assistant_prefix_and_the_server_caches_it() {
    let _serial = serial();
    let server = server();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Every way of continuing that llama.cpp's server understands: a trailing assistant
        // message (detected), vLLM's flag, and a completions prompt rendered here.
        for continuation in [
            Continuation::Auto,
            Continuation::ContinueFinalMessage,
            Continuation::Completions,
        ] {
            let mut config = remote_config(vec![server.url()]);
            config.continuation = continuation;
            let engine = RemoteEngine::connect("default", config).await.unwrap();
            if continuation == Continuation::Auto {
                assert_eq!(engine.continuation(), Continuation::TrailingAssistant);
            }
            // A question per mode, so no mode finds another's prompt cached.
            let messages = vec![
                ChatMessage::new(Role::System, "You answer in plain sentences."),
                ChatMessage::new(
                    Role::User,
                    format!("Describe the colour of the sky on a clear day ({continuation:?})."),
                ),
            ];
            // Step by step, each continuing the answer so far, as an aggregator's steps do.
            let mut answer = String::new();
            let (mut cached, mut prompts) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                let mut request = GenerationRequest::chat(Vec::new());
                request.prompt = Prompt::Chat {
                    messages: messages.clone(),
                    assistant_prefix: (!answer.is_empty()).then(|| answer.clone()),
                };
                request.sampling.max_tokens = 6;
                let (text, usage) = collect(&engine, request).await.unwrap();
                assert!(!text.is_empty(), "{continuation:?}");
                answer.push_str(&text);
                cached.push(usage.cached_prompt_tokens);
                prompts.push(usage.prompt_tokens);
            }
            // Each step's prompt is the previous one plus what it generated, so the server
            // finds more of it cached each time: the prefix was continued, not restarted.
            let context = format!("{continuation:?}: cached {cached:?} prompts {prompts:?}");
            assert!(cached[1] > cached[0] && cached[2] > cached[1], "{context}");
            assert!(
                prompts[1] > prompts[0] && prompts[2] > prompts[1],
                "{context}"
            );
            // Almost all of a step's prompt was the previous step's prompt and output.
            assert!(cached[2] + 4 >= prompts[1], "{context}");
            if continuation == Continuation::Auto {
                // The server's /tokenize counts exactly.
                let count = engine
                    .token_counter()
                    .count_exact("Hello world")
                    .await
                    .unwrap();
                assert!(!count.is_estimate());
            }
        }
    });
}

#[test]
fn failover_before_the_first_token_and_a_clear_error_mid_stream() {
    let _serial = serial();
    let mut servers = [server(), server()];
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut config = remote_config(servers.iter().map(LlamaServer::url).collect());
        config.routing = PolicyConfig::RoundRobin;
        config.breaker = BreakerConfig {
            failure_threshold: 1,
            open_for: Duration::from_secs(3600),
        };
        let engine = RemoteEngine::connect("default", config).await.unwrap();
        let question = || {
            let mut r =
                GenerationRequest::chat(vec![ChatMessage::new(Role::User, "Count to fifty.")]);
            r.sampling.max_tokens = 8;
            r
        };

        // Killed before the first token: round robin picks replica 0 first, the connection
        // is refused, and the request succeeds on replica 1.
        servers[0].kill();
        let (text, _) = collect(&engine, question()).await.unwrap();
        assert!(!text.is_empty());
        let stats = engine.replica_stats();
        assert_eq!(stats[0].breaker, BreakerState::Open);
        assert_eq!((stats[0].errors, stats[1].requests), (1, 1));

        // Killed mid-stream: the text so far arrives once, then an error, well within the
        // idle timeout, and the request is not repeated elsewhere.
        let mut long = question();
        long.sampling.max_tokens = 400;
        let mut stream = engine.submit(long).unwrap();
        let mut text = String::new();
        match stream.next().await {
            Some(Ok(GenerationEvent::Delta { text: t, .. })) => text.push_str(&t),
            other => panic!("expected a first delta, got {other:?}"),
        }
        servers[1].kill();
        let started = Instant::now();
        let error = loop {
            match stream.next().await {
                Some(Ok(GenerationEvent::Delta { text: t, .. })) => text.push_str(&t),
                Some(Ok(GenerationEvent::Finished { .. })) => panic!("finished after the kill"),
                Some(Err(error)) => break error,
                None => panic!("the stream ended without an error"),
            }
        };
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no error within the idle timeout"
        );
        assert!(matches!(error, EngineError::Unreachable(_)), "{error}");
        assert!(!text.is_empty());
        let stats = engine.replica_stats();
        assert_eq!(stats[1].breaker, BreakerState::Open);
        assert_eq!(stats[1].requests, 2);

        // Both down: a typed error at once, not a hang.
        let error = collect(&engine, question()).await.unwrap_err();
        assert!(matches!(error, EngineError::Unreachable(_)), "{error}");

        // Health checks see both down; replica 0 restarts on its port and passes the next
        // one: its breaker closes before the cool-down and it serves again.
        engine.check_health().await;
        let port = servers[0].port;
        servers[0] = LlamaServer::start_on(&model(), port).unwrap_or_else(|e| panic!("{e}"));
        engine.check_health().await;
        let stats = engine.replica_stats();
        assert!(stats[0].healthy && !stats[1].healthy, "{stats:?}");
        assert_eq!(stats[0].breaker, BreakerState::Closed);
        let (text, _) = collect(&engine, question()).await.unwrap();
        assert!(!text.is_empty());
    });
}
