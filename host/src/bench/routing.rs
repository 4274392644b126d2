//! `staircase bench routing`: a multi-agent trace replayed on real replicas once per routing
//! policy. The trace is what pipelines send: Mixture-of-Agents runs (three proposers with
//! role prompts side by side, then an aggregator that steps twice, continuing its answer),
//! debates (two debaters, two rounds each continuing their own conversation) and multi-turn
//! chat sessions, all sharing system prompts across runs. Each request carries its run and
//! node ([`RouteHint`]), as a pipeline's do. Every policy gets freshly started servers, so
//! no policy inherits another's cache. Figures: the prompt tokens the servers report cached,
//! TTFT percentiles, total time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::engine::remote::launch::{LaunchError, LlamaServer};
use crate::engine::remote::{RemoteConfig, RemoteEngine};
use crate::engine::{
    ChatMessage, Engine, EngineError, GenerationEvent, GenerationRequest, Prompt, Role,
};
use crate::routing::{PolicyConfig, RouteHint};

#[derive(Clone, Debug)]
pub struct RoutingBenchConfig {
    pub model: PathBuf,
    /// Replicas started per policy (each one llama.cpp thread).
    pub replicas: usize,
    /// Runs of each kind (MoA, debate, session).
    pub runs: usize,
    /// Runs in flight at once.
    pub concurrency: usize,
    pub max_tokens: u32,
    pub policies: Vec<PolicyConfig>,
}

impl RoutingBenchConfig {
    pub fn new(model: PathBuf) -> Self {
        Self {
            model,
            replicas: 2,
            runs: 3,
            concurrency: 2,
            max_tokens: 12,
            policies: PolicyConfig::all(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RoutingBenchError {
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("policy {policy}: {source}")]
    Engine {
        policy: String,
        #[source]
        source: EngineError,
    },
}

/// One policy's figures.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyFigures {
    pub policy: String,
    pub requests: usize,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    /// Cached over prompt tokens, as the servers reported them.
    pub hit_rate: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub total_ms: f64,
    /// Requests per replica.
    pub spread: Vec<u64>,
}

const ROLES: [&str; 3] = [
    "You are a careful scientist. Explain causes and mechanisms precisely, name the physical \
     principles involved, and avoid speculation that the evidence does not support.",
    "You are a patient teacher. Explain ideas step by step with a simple everyday example, \
     define every term you use, and check that each step follows from the one before.",
    "You are a sharp critic. Look for what a quick answer would miss or get wrong, point out \
     common misconceptions, and say what would change the conclusion.",
];
const AGGREGATOR: &str = "You have been given answers from several assistants to the user's \
     question. Combine them into one answer that is correct, complete and concise; drop what \
     is wrong and keep what is best.";
const DEBATER: &str = "You are in a debate. State your position clearly, answer your \
     opponent's strongest point directly, and keep each turn short.";
const ASSISTANT: &str = "You are a helpful assistant. Answer briefly and ask a question back \
     when the request is unclear.";
const QUESTIONS: [&str; 6] = [
    "Why is the sky blue?",
    "How do vaccines train the immune system?",
    "Why do we have seasons?",
    "What makes a bridge stable?",
    "How does a refrigerator move heat?",
    "Why does ice float on water?",
];

fn chat(messages: Vec<ChatMessage>, prefix: Option<String>, max_tokens: u32) -> GenerationRequest {
    let mut request = GenerationRequest::chat(Vec::new());
    request.prompt = Prompt::Chat {
        messages,
        assistant_prefix: prefix,
    };
    request.sampling.max_tokens = max_tokens;
    request
}

struct Recorder {
    ttft: std::sync::Mutex<Vec<Duration>>,
}

impl Recorder {
    /// Sends one request with its hint and returns its text.
    async fn send(
        &self,
        engine: &RemoteEngine,
        mut request: GenerationRequest,
        hint: RouteHint,
    ) -> Result<String, EngineError> {
        request.extensions.insert(hint);
        let started = Instant::now();
        let mut stream = engine.submit(request)?;
        let mut text = String::new();
        let mut first = None;
        while let Some(event) = stream.next().await {
            match event? {
                GenerationEvent::Delta { text: t, .. } => {
                    first.get_or_insert_with(|| started.elapsed());
                    text.push_str(&t);
                }
                GenerationEvent::Finished { .. } => break,
            }
        }
        if let (Some(first), Ok(mut all)) = (first, self.ttft.lock()) {
            all.push(first);
        }
        Ok(text)
    }
}

async fn moa(e: &RemoteEngine, r: &Recorder, run: u64, q: &str, n: u32) -> Result<(), EngineError> {
    let hint = |node: &str| RouteHint {
        run,
        node: node.into(),
    };
    let proposals = join_all(ROLES.iter().enumerate().map(|(i, role)| {
        let messages = vec![
            ChatMessage::new(Role::System, *role),
            ChatMessage::new(Role::User, q),
        ];
        r.send(e, chat(messages, None, n), hint(&format!("proposer{i}")))
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    // Two steps, as a staircase aggregator takes: the second sees every proposal and
    // continues the first step's answer.
    let mut answer = String::new();
    for seen in [1, proposals.len()] {
        let mut user = format!("Question: {q}\n");
        for (i, p) in proposals[..seen].iter().enumerate() {
            user.push_str(&format!("Answer {}: {p}\n", i + 1));
        }
        let messages = vec![
            ChatMessage::new(Role::System, AGGREGATOR),
            ChatMessage::new(Role::User, user),
        ];
        let prefix = (!answer.is_empty()).then(|| answer.clone());
        answer.push_str(
            &r.send(e, chat(messages, prefix, n), hint("aggregator"))
                .await?,
        );
    }
    Ok(())
}

async fn debate(
    e: &RemoteEngine,
    r: &Recorder,
    run: u64,
    q: &str,
    n: u32,
) -> Result<(), EngineError> {
    let mut conversations: Vec<Vec<ChatMessage>> = (0..2)
        .map(|side| {
            vec![
                ChatMessage::new(Role::System, DEBATER),
                ChatMessage::new(
                    Role::User,
                    format!("Argue {} on: {q}", ["for", "against"][side]),
                ),
            ]
        })
        .collect();
    for _round in 0..2 {
        let said = join_all(conversations.iter().enumerate().map(|(side, messages)| {
            let hint = RouteHint {
                run,
                node: format!("debater{side}"),
            };
            r.send(e, chat(messages.clone(), None, n), hint)
        }))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
        for side in 0..2 {
            conversations[side].push(ChatMessage::new(Role::Assistant, said[side].clone()));
            conversations[side].push(ChatMessage::new(
                Role::User,
                format!("Your opponent said: {}", said[1 - side]),
            ));
        }
    }
    Ok(())
}

async fn session(
    e: &RemoteEngine,
    r: &Recorder,
    run: u64,
    q: &str,
    n: u32,
) -> Result<(), EngineError> {
    let mut messages = vec![ChatMessage::new(Role::System, ASSISTANT)];
    for turn in [q, "Can you say that more simply?", "Give one example."] {
        messages.push(ChatMessage::new(Role::User, turn));
        let hint = RouteHint {
            run,
            node: "chat".into(),
        };
        let reply = r.send(e, chat(messages.clone(), None, n), hint).await?;
        messages.push(ChatMessage::new(Role::Assistant, reply));
    }
    Ok(())
}

/// Runs the trace once per policy. Call from a tokio runtime.
pub async fn run(config: &RoutingBenchConfig) -> Result<Vec<PolicyFigures>, RoutingBenchError> {
    let mut out = Vec::new();
    for policy in &config.policies {
        let servers = (0..config.replicas)
            .map(|_| LlamaServer::start(&config.model))
            .collect::<Result<Vec<_>, _>>()?;
        let mut remote = RemoteConfig::new("bench", servers.iter().map(LlamaServer::url).collect());
        remote.routing = policy.clone();
        remote.health.interval = Duration::ZERO;
        let name = policy.build().name().to_string();
        let fail = |source| RoutingBenchError::Engine {
            policy: name.clone(),
            source,
        };
        let engine = Arc::new(RemoteEngine::connect("bench", remote).await.map_err(fail)?);
        let recorder = Arc::new(Recorder {
            ttft: std::sync::Mutex::new(Vec::new()),
        });
        let gate = Arc::new(Semaphore::new(config.concurrency.max(1)));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..config.runs * 3 {
            let (engine, recorder, gate) = (engine.clone(), recorder.clone(), gate.clone());
            let q = QUESTIONS[i % QUESTIONS.len()];
            let n = config.max_tokens;
            tasks.push(async move {
                let _permit = gate.acquire().await;
                let run = i as u64;
                match i % 3 {
                    0 => moa(&engine, &recorder, run, q, n).await,
                    1 => debate(&engine, &recorder, run, q, n).await,
                    _ => session(&engine, &recorder, run, q, n).await,
                }
            });
        }
        for result in join_all(tasks).await {
            result.map_err(fail)?;
        }
        let total = started.elapsed();
        let stats = engine.replica_stats();
        let mut ttft: Vec<f64> = recorder
            .ttft
            .lock()
            .map(|t| t.iter().copied().map(crate::millis::millis).collect())
            .unwrap_or_default();
        let prompt: u64 = stats.iter().map(|s| s.prompt_tokens).sum();
        let cached: u64 = stats.iter().map(|s| s.cached_prompt_tokens).sum();
        out.push(PolicyFigures {
            policy: name,
            requests: ttft.len(),
            prompt_tokens: prompt,
            cached_prompt_tokens: cached,
            hit_rate: if prompt == 0 {
                0.0
            } else {
                cached as f64 / prompt as f64
            },
            ttft_p50_ms: super::percentile(&mut ttft, 0.5),
            ttft_p99_ms: super::percentile(&mut ttft, 0.99),
            total_ms: crate::millis::millis(total),
            spread: stats.iter().map(|s| s.requests).collect(),
        });
        drop(servers);
    }
    Ok(out)
}
