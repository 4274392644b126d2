//! The remote engine on real servers: two llama.cpp `llama-server` replicas of the default
//! model on loopback ports, started and killed by the tests (each with one thread and a small
//! context, at most two at a time). `.ci/llama-server.sh` builds the server; without it
//! these tests fail, naming the script, rather than pass by skipping.
//!
//! They cover every example pipeline in both modes on a remote model, staircase steps that
//! really continue the assistant prefix (the server reports the continued prompt as cached),
//! and failover: a replica killed before the first token, one killed mid-stream, its breaker
//! opening and closing again once it is restarted and passes a health check. And Staircase
//! itself as the server: `staircase serve` as another Staircase's remote model. And an output
//! guard in front of a llama-server, as the README configures it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use staircase::app::config::Limits;
use staircase::app::{App, AppBuilder, Config, ModelConfig};
use staircase::engine::remote::launch::LlamaServer;
use staircase::engine::remote::{ChunkTokens, Continuation, RemoteConfig, RemoteEngine};
use staircase::engine::{
    ChatMessage, Engine, EngineError, FirstTokenLogprobs, GenerationEvent, GenerationRequest,
    Prompt, Role, TopFirstTokens,
};
use staircase::pipeline::examples::BUILTIN;
use staircase::pipeline::stream::{ChunkSchedule, Chunker, StreamPolicy};
use staircase::pipeline::{Models, RunRequest, Runner};
use staircase::plugin::{HostConfig, PluginRuntime, Registry};
use staircase::policy::StreamMode;
use staircase::routing::{BreakerConfig, BreakerState, PolicyConfig};
use staircase::server::ServeOptions;
use tokio::sync::oneshot;

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
            // The answer is the steps' new text only: the server sends a continued prefix
            // back before the new text, and the engine removes it (else each step would
            // repeat the answer so far).
            let tokens = engine
                .token_counter()
                .count_exact(&answer)
                .await
                .unwrap()
                .get();
            assert!(
                tokens <= 3 * 6 + 2,
                "{continuation:?}: {tokens} tokens in three 6-token steps: {answer:?}"
            );
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

/// Reads a stream to its end: each delta's text and token count, the usage, and where the
/// counts came from.
async fn deltas(
    engine: &RemoteEngine,
    request: GenerationRequest,
) -> (
    Vec<(String, u32)>,
    staircase::engine::Usage,
    Option<ChunkTokens>,
) {
    let mut stream = engine.submit(request).unwrap();
    let mut out = Vec::new();
    while let Some(event) = stream.next().await {
        match event.unwrap() {
            GenerationEvent::Delta {
                text, token_count, ..
            } => out.push((text, token_count)),
            GenerationEvent::Finished {
                usage, extensions, ..
            } => return (out, usage, extensions.get::<ChunkTokens>().copied()),
        }
    }
    panic!("the stream ended without Finished");
}

#[test]
fn chunks_count_the_tokens_the_server_reports_and_the_chunker_cuts_by_them() {
    let _serial = serial();
    let server = server();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let engine = RemoteEngine::connect("default", remote_config(vec![server.url()]))
            .await
            .unwrap();
        let greedy = |stop: Vec<String>| {
            let mut request = GenerationRequest::chat(vec![ChatMessage::new(Role::User, "Say hi")]);
            request.sampling.temperature = 0.0;
            request.sampling.max_tokens = 10;
            request.sampling.stop = stop;
            request
        };
        let (plain, usage, source) = deltas(&engine, greedy(Vec::new())).await;
        assert_eq!(source, Some(ChunkTokens::Reported));
        assert!(plain.len() >= 4, "{plain:?}");
        // A stop string that the second and third tokens begin but the fourth does not: the
        // server holds those tokens back while they could still be a stop and then sends
        // them in one chunk, which is several tokens (the old count said 1).
        let stop = format!("{}{}\u{7}", plain[1].0, plain[2].0);
        let (held, held_usage, source) = deltas(&engine, greedy(vec![stop.clone()])).await;
        assert_eq!(source, Some(ChunkTokens::Reported));
        let context = format!("stop {stop:?}: {held:?}, usage {held_usage:?}; plain {plain:?}");
        assert!(held.iter().any(|(_, n)| *n >= 3), "{context}");
        assert!(held.len() < plain.len(), "{context}");
        // The counts add up to what the server generated, in both answers.
        for (answer, usage) in [(&plain, &usage), (&held, &held_usage)] {
            let sum: u32 = answer.iter().map(|(_, n)| n).sum();
            assert_eq!(sum, usage.completion_tokens, "{context}");
        }
        // The chunker cuts by those counts: 4-token chunks of 10 tokens are 3 chunks,
        // whatever the number of deltas.
        let schedule = ChunkSchedule::new(vec![4]).unwrap();
        let mut chunker = Chunker::new(StreamPolicy::Staircase(schedule));
        let mut chunks: Vec<_> = held
            .iter()
            .filter_map(|(text, n)| chunker.push(text, *n))
            .collect();
        chunks.extend(chunker.finish());
        assert!(
            chunks.iter().rev().skip(1).all(|c| c.tokens >= 4),
            "{chunks:?}"
        );
        let total: u32 = chunks.iter().map(|c| c.tokens).sum();
        assert_eq!(total, held_usage.completion_tokens, "{chunks:?}");

        // The first token's log-probabilities, on request (a judge's weighted verdict).
        let mut asked = greedy(Vec::new());
        asked.extensions.insert(TopFirstTokens(5));
        let mut stream = engine.submit(asked).unwrap();
        let (mut first, mut candidates) = (None, None);
        while let Some(event) = stream.next().await {
            match event.unwrap() {
                GenerationEvent::Delta { text, .. } => {
                    first.get_or_insert(text);
                }
                GenerationEvent::Finished { extensions, .. } => {
                    candidates = extensions.get::<FirstTokenLogprobs>().cloned();
                }
            }
        }
        let candidates = candidates.expect("llama-server sends top_logprobs when asked");
        assert!((1..=5).contains(&candidates.0.len()), "{candidates:?}");
        assert!(
            candidates.0.iter().all(|(_, lp)| *lp <= 0.0),
            "{candidates:?}"
        );
        let first = first.expect("some text");
        assert!(
            first.starts_with(&candidates.0[0].0),
            "greedy takes the top candidate: {first:?} {candidates:?}"
        );
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

// Staircase as another Staircase's backend: `staircase serve` A on the local engine and the
// default model, and a second host B whose `default` model is remote, on A. B runs example
// pipelines in both modes through A, its `/metrics` names A as a replica, and the token
// counts of A's chunks (A reports none per chunk) are labelled estimates.

/// Serves `app` (`staircase serve`) on a free loopback port until the returned sender is dropped.
fn serve(rt: &tokio::runtime::Runtime, app: Arc<App>) -> (SocketAddr, oneshot::Sender<()>) {
    let options = ServeOptions {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        tenants: Vec::new(),
        limits: Limits::default(),
        watch: false,
        access: Default::default(),
    };
    let (addr_tx, addr_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    rt.spawn(staircase::server::serve(
        app,
        options,
        move |addr| {
            let _ = addr_tx.send(addr);
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    let addr = rt.block_on(addr_rx).expect("the server did not start");
    (addr, stop_tx)
}

#[test]
fn a_staircase_serves_another_staircase_pipelines_and_metrics() {
    let _serial = serial();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let front = Arc::new(AppBuilder::new().build().expect("host A"));
    let a_engine = front.default_engine();
    let (a_addr, _stop_a) = serve(&rt, front);
    let a_url = format!("http://{a_addr}");

    let mut remote = RemoteConfig::new("default", vec![a_url.clone()]);
    // Checks only when asked (no background traffic).
    remote.health.interval = Duration::ZERO;
    let mut config = Config::default();
    config
        .models
        .insert("default".into(), ModelConfig::Remote(Box::new(remote)));
    let back = Arc::new(AppBuilder::from_config(config).build().expect("host B"));
    let (b_addr, _stop_b) = serve(&rt, back.clone());

    rt.block_on(async {
        let engine = back.engine("default").unwrap();
        // Detected as a Staircase (its /v1/models), which continues a trailing assistant
        // message: staircase steps can run on it.
        assert!(engine.model_info().capabilities.assistant_prefix);
        // And A really continues it: B's request with a partial answer reaches A's engine as
        // the same prompt as that partial answer continued on A's engine directly (a new
        // assistant turn after it would be longer).
        let continued = || {
            let mut request = GenerationRequest::chat(Vec::new());
            request.prompt = Prompt::Chat {
                messages: vec![ChatMessage::new(Role::User, "Why is the sky blue?")],
                assistant_prefix: Some("The sky is blue because".into()),
            };
            request.sampling.max_tokens = 4;
            request
        };
        let prompt_tokens = |mut stream: staircase::engine::GenerationStream| async move {
            while let Some(event) = stream.next().await {
                if let GenerationEvent::Finished { usage, .. } = event.unwrap() {
                    return usage.prompt_tokens;
                }
            }
            panic!("no Finished event");
        };
        let direct = prompt_tokens(a_engine.submit(continued()).unwrap()).await;
        let through_b = prompt_tokens(engine.submit(continued()).unwrap()).await;
        assert_eq!(
            through_b, direct,
            "a continuation through B is A's continuation"
        );

        for name in ["moa", "debate"] {
            let mut pipeline = (*back.pipeline(name).unwrap().pipeline).clone();
            // B counts A's tokens by estimate (A reports no per-chunk counts), which can
            // count a short opening step as the whole of a tiny budget; 32 tokens leave
            // room for the later steps whose cache reuse is checked below.
            pipeline.limit_tokens(32);
            for mode in [StreamMode::Staircase, StreamMode::Layered] {
                let request = RunRequest::prompt("Why is the sky blue?", mode);
                let report = back
                    .runner()
                    .run(&pipeline, request, None)
                    .await
                    .unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"));
                assert!(!report.answer.trim().is_empty(), "{name} {mode:?}");
                if name == "moa" && mode == StreamMode::Staircase {
                    // The aggregator's steps continue one prompt on A, whose prefix cache
                    // serves it and says so in the usage B reads.
                    let hit = report.cache.aggregator_hit_rate();
                    assert!(
                        hit > 0.3,
                        "aggregator cache hit rate {hit}: {:?}",
                        report
                            .nodes
                            .iter()
                            .map(|n| (&n.id, n.steps, n.prompt_tokens, n.cached_prompt_tokens))
                            .collect::<Vec<_>>()
                    );
                }
            }
        }

        // A reports no per-chunk counts, so B's counts are estimates, and say so.
        let mut request = GenerationRequest::chat(vec![ChatMessage::new(Role::User, "Say hello.")]);
        request.sampling.max_tokens = 6;
        let mut stream = engine.submit(request).unwrap();
        let mut label = None;
        while let Some(event) = stream.next().await {
            if let GenerationEvent::Finished { extensions, .. } = event.unwrap() {
                label = extensions.get::<ChunkTokens>().copied();
            }
        }
        assert_eq!(label, Some(ChunkTokens::Estimated));

        // B's /metrics: A as a replica of `default`, with its requests, no errors, a
        // closed breaker, nothing in flight, and latency histograms.
        let metrics = reqwest::get(format!("http://{b_addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let labels = format!("model=\"default\",replica=\"{a_url}\"");
        let value = |name: &str| -> f64 {
            let prefix = format!("{name}{{{labels}}} ");
            metrics
                .lines()
                .find_map(|line| line.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no {prefix} in:\n{metrics}"))
                .trim()
                .parse()
                .unwrap()
        };
        assert!(value("staircase_replica_requests_total") > 4.0);
        assert_eq!(value("staircase_replica_errors_total"), 0.0);
        assert_eq!(value("staircase_replica_breaker_state"), 0.0);
        assert_eq!(value("staircase_replica_in_flight"), 0.0);
        assert_eq!(value("staircase_replica_healthy"), 1.0);
        assert!(value("staircase_replica_cached_prompt_tokens_total") > 0.0);
        assert!(value("staircase_replica_ttft_seconds_count") > 4.0);
        assert!(value("staircase_replica_request_duration_seconds_count") > 4.0);
    });
}

// An operator's keyed llama-server, configured as the OpenAI SDK would name it (`.../v1`),
// started after the host: the model answers 503 naming itself until the server is up, then
// serves; every call (probe, health check, `/tokenize`, completions) carries the key.

#[test]
fn a_keyed_backend_behind_a_v1_url_may_start_after_serve_and_stays_healthy() {
    let _serial = serial();
    const KEY_VAR: &str = "STAIRCASE_TEST_LATE_BACKEND_KEY";
    const KEY: &str = "sk-late-backend";
    // SAFETY: set before any thread of this test reads it, under the serial lock; no other
    // test reads this variable.
    unsafe { std::env::set_var(KEY_VAR, KEY) };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let mut remote = RemoteConfig::new("default", vec![format!("http://127.0.0.1:{port}/v1/")]);
    remote.api_key_env = Some(KEY_VAR.into());
    remote.health.interval = Duration::ZERO;
    // llama-server answers `/health` without a key but `/props` only with it: checking
    // there shows the checks send it.
    remote.health.path = "/props".into();
    let mut config = Config::default();
    config
        .models
        .insert("late".into(), ModelConfig::Remote(Box::new(remote)));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = Arc::new(
        AppBuilder::from_config(config)
            .build()
            .expect("serve starts before its backend"),
    );
    let (addr, _stop) = serve(&rt, app.clone());
    let ask = || async {
        reqwest::Client::new()
            .post(format!("http://{addr}/v1/chat/completions"))
            .json(&serde_json::json!({
                "model": "late",
                "messages": [{ "role": "user", "content": "Say hello." }],
                "max_tokens": 4
            }))
            .send()
            .await
            .unwrap()
    };
    rt.block_on(async {
        let response = ask().await;
        assert_eq!(response.status(), 503);
        let body: serde_json::Value = response.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("`late`"), "{message}");
        assert!(
            !message.contains("127.0.0.1"),
            "addresses stay in the log: {message}"
        );
    });

    let options = staircase::engine::remote::launch::LaunchOptions {
        api_key: Some(KEY.into()),
        ..Default::default()
    };
    let _server =
        LlamaServer::start_on_with(&model(), port, &options).unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(async {
        let response = ask().await;
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
        let engine = app.engine("late").unwrap();
        assert!(engine.model_info().capabilities.assistant_prefix);
        let count = engine
            .token_counter()
            .count_exact("Say hello.")
            .await
            .unwrap();
        assert!(
            matches!(count, staircase::engine::TokenCount::Exact(_)),
            "/tokenize with the key: {count:?}"
        );
    });
    let engine = app
        .models()
        .iter()
        .find(|m| m.name == "late")
        .and_then(|m| m.remote().cloned())
        .expect("the remote engine of `late`");
    rt.block_on(engine.check_health());
    let stats = engine.replica_stats();
    assert!(stats[0].healthy, "a keyed health check passes: {stats:?}");
}

/// A request's `top_k`, `min_p` and repetition penalty reach a real llama-server: `top_k = 1`
/// or `min_p = 1` at a temperature of 2 is its greedy answer (which the temperature alone
/// leaves), and the penalty changes a greedy answer. A text prompt goes to its
/// `/v1/completions` and comes back continued.
#[test]
fn extra_sampling_fields_and_text_prompts_reach_a_llama_server() {
    let _serial = serial();
    let server = server();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let engine = RemoteEngine::connect("default", remote_config(vec![server.url()]))
            .await
            .unwrap();
        let ask = |set: &dyn Fn(&mut staircase::engine::SamplingParams)| {
            let mut request = GenerationRequest::chat(vec![ChatMessage::new(
                Role::User,
                "Tell me a story about a fox.",
            )]);
            request.sampling.max_tokens = 16;
            set(&mut request.sampling);
            request
        };
        let (greedy, _) = collect(&engine, ask(&|_| {})).await.unwrap();
        let mut hot_differs = false;
        for seed in 1..=3u64 {
            let hot = |s: &mut staircase::engine::SamplingParams| {
                s.temperature = 2.0;
                s.seed = seed;
            };
            let (alone, _) = collect(&engine, ask(&hot)).await.unwrap();
            hot_differs |= alone != greedy;
            let top_k = |s: &mut staircase::engine::SamplingParams| {
                hot(s);
                s.top_k = 1;
            };
            let (text, _) = collect(&engine, ask(&top_k)).await.unwrap();
            assert_eq!(text, greedy, "top_k = 1 at seed {seed}");
            let min_p = |s: &mut staircase::engine::SamplingParams| {
                hot(s);
                s.min_p = 1.0;
            };
            let (text, _) = collect(&engine, ask(&min_p)).await.unwrap();
            assert_eq!(text, greedy, "min_p = 1 at seed {seed}");
        }
        assert!(
            hot_differs,
            "a temperature of 2 alone leaves the greedy answer"
        );
        let (penalised, _) = collect(&engine, ask(&|s| s.repeat_penalty = 1.8))
            .await
            .unwrap();
        assert_ne!(
            penalised, greedy,
            "the repetition penalty changes the answer"
        );
        let (penalised, _) = collect(&engine, ask(&|s| s.presence_penalty = 1.5))
            .await
            .unwrap();
        assert_ne!(penalised, greedy, "the presence penalty changes the answer");

        let mut text = GenerationRequest::chat(Vec::new());
        text.prompt = Prompt::Text("The capital of France is".into());
        text.sampling.max_tokens = 6;
        let (continued, usage) = collect(&engine, text).await.unwrap();
        assert!(!continued.is_empty(), "{usage:?}");
        assert!(
            usage.prompt_tokens > 0 && usage.prompt_tokens < 12,
            "raw text, no template: {usage:?}"
        );
    });
}

/// The README's guarding proxy, for real: `staircase serve` in front of a llama-server, a
/// `pattern-guard` on the remote model. The model is made to say an address (it copies the
/// conversation's pattern); under a second name with no guard it does, and through the
/// guarded name no byte of it reaches the client, streamed or whole.
#[test]
fn an_output_guard_in_front_of_a_llama_server_keeps_a_secret_out() {
    const SECRET: &str = "ada@example.org";
    let _serial = serial();
    let llama = server();
    let config = Config::parse(
        &format!(
            r#"
[models.upstream]
kind = "remote"
model = "default"
base_url = "{url}/v1"

[models.raw]
kind = "remote"
model = "default"
base_url = "{url}/v1"

[[guards]]
plugin = "pattern-guard"
models = ["upstream"]
"#,
            url = llama.url()
        ),
        std::path::Path::new("staircase.toml"),
    )
    .expect("the README's configuration parses");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = Arc::new(AppBuilder::from_config(config).build().expect("serve"));
    let (addr, _stop) = serve(&rt, app);
    let ask = |model: &'static str, stream: bool| async move {
        let response = reqwest::Client::new()
            .post(format!("http://{addr}/v1/chat/completions"))
            .json(&serde_json::json!({
                "model": model,
                "messages": [
                    {"role": "user", "content": "Say: bob@example.org"},
                    {"role": "assistant", "content": "bob@example.org"},
                    {"role": "user", "content": format!("Say: {SECRET}")},
                ],
                "max_tokens": 20,
                "temperature": 0,
                "stream": stream,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{model}");
        response.text().await.unwrap()
    };
    rt.block_on(async {
        let said = ask("raw", false).await;
        assert!(
            said.contains(SECRET),
            "unguarded, the model says it: {said}"
        );
        for stream in [false, true] {
            let body = ask("upstream", stream).await;
            assert!(!body.contains(SECRET), "stream {stream}: {body}");
            // The answer's text: the message, or the stream's deltas joined.
            let text: String = if stream {
                body.lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
                    .filter_map(|c| {
                        c["choices"][0]["delta"]["content"]
                            .as_str()
                            .map(String::from)
                    })
                    .collect()
            } else {
                let whole: serde_json::Value = serde_json::from_str(&body).unwrap();
                whole["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .into()
            };
            assert!(text.contains("[redacted]"), "stream {stream}: {body}");
            assert!(!text.contains("example.org"), "stream {stream}: {text}");
        }
    });
}
