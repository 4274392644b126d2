//! `bench compress`: a multi-turn session with a growing history, answered three ways:
//! with the full history every turn (`none`), compressing it on the critical path before each
//! turn over budget (`inline`: the compressor's call is part of that turn's TTFT), and with
//! the node's background memory (`background`: the turn answers at once, with a compression
//! made during an earlier turn when one is ready). TTFT per turn, and its ratios to `none`;
//! beside it, quality: each turn's answer against the `none` answer of that turn (token F1)
//! and its own degeneration (distinct-2), since speed is never reported without quality.
//! Each variant runs on an engine of its own, so no variant is served from another's prefix
//! cache; the three sessions take turns (turn t of each, then t + 1), so load drifts alike.
//! After each turn the background session's memory finishes its work (compression and the
//! warm-up of its prompt) before the next session's turn: the client's idle time between
//! turns, which a real conversation has, and no background work overlaps another session's
//! measured turn. How long that took is reported per turn (`idle_ms`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::BenchError;
use crate::engine::local::{LocalEngine, LocalEngineConfig};
use crate::engine::{ChatMessage, Engine, Role};
use crate::eval::metrics::{distinct_n, token_f1, words};
use crate::millis::millis;
use crate::pipeline::{Models, Pipeline, RunRequest, Runner};
use crate::plugin::{HostConfig, PluginRuntime, Registry};
use crate::policy::{PolicyProvider, StreamMode};

/// What to run.
#[derive(Clone, Debug)]
pub struct CompressBenchConfig {
    pub model: std::path::PathBuf,
    pub threads: Option<usize>,
    pub turns: usize,
    /// Tokens of each answer.
    pub answer_tokens: u32,
    /// The history budget.
    pub budget_tokens: u32,
    /// The compressor plugin.
    pub compressor: String,
}

impl CompressBenchConfig {
    pub fn new(model: std::path::PathBuf) -> Self {
        Self {
            model,
            threads: None,
            turns: 20,
            answer_tokens: 24,
            budget_tokens: 160,
            compressor: "truncate-compressor".into(),
        }
    }
}

/// One turn of one variant.
#[derive(Clone, Debug, Serialize)]
pub struct Turn {
    pub ttft_ms: f64,
    /// Tokens of the conversation the model was given (after any compression).
    pub history_tokens: u32,
    /// The turn's history was over budget.
    pub over_budget: bool,
    /// Inline: the compressor call before the turn; background: 0 (it runs beside).
    pub compress_ms: f64,
    /// Background: how long its memory worked on after the turn ended (the client's idle
    /// time it needed); 0 elsewhere.
    pub idle_ms: f64,
    /// Prompt tokens the engine's prefix cache served.
    pub cached_prompt_tokens: u32,
    pub answer: String,
    /// Token F1 of the answer with the `none` variant's answer of the same turn.
    pub f1_with_none: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Variant {
    pub name: &'static str,
    pub turns: Vec<Turn>,
    /// Mean TTFT over the turns whose history was over budget in the `none` variant.
    pub mean_ttft_over_budget_ms: f64,
    /// Over the same turns: mean token F1 with `none`'s answers, and mean distinct-2 of the
    /// answers (1.0: no bigram repeated; a degenerate loop drives it down).
    pub mean_f1_with_none: f64,
    pub mean_distinct_2: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CompressReport {
    pub turns: usize,
    pub budget_tokens: u32,
    pub compressor: String,
    pub variants: Vec<Variant>,
    /// Mean TTFT over budget, this variant / none.
    pub inline_vs_none: f64,
    pub background_vs_none: f64,
    /// Turns of the background variant that used a ready compression.
    pub background_turns_compressed: usize,
}

fn user(turn: usize) -> ChatMessage {
    ChatMessage::new(
        Role::User,
        format!(
            "Turn {turn}. Tell me one more interesting fact about the number {turn}, and how it shows up in everyday life."
        ),
    )
}

fn pipeline(config: &CompressBenchConfig, background: bool) -> Result<Pipeline, BenchError> {
    let history = if background {
        format!(
            "history_compressor = \"{}\"\nhistory_tokens = {}\n",
            config.compressor, config.budget_tokens
        )
    } else {
        String::new()
    };
    let text = format!(
        "name = \"chat\"\n[[nodes]]\nid = \"reply\"\nkind = \"agent\"\nplugin = \"proposer\"\nmodel = \"default\"\nmax_tokens = {}\n{history}",
        config.answer_tokens
    );
    Ok(Pipeline::parse(&text, "bench-compress")?)
}

/// The longest the bench waits for a session's background work between turns.
const IDLE_WAIT: Duration = Duration::from_secs(120);

/// Runs the session three ways.
pub fn run(config: &CompressBenchConfig) -> Result<CompressReport, BenchError> {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Three sessions side by side, each on its own engine; turn t of each runs right after
    // turn t of the others, so the machine's load drifts alike over all three.
    struct Session {
        name: &'static str,
        engine: Arc<dyn Engine>,
        registry: Arc<Registry>,
        runner: Runner,
        pipeline: Pipeline,
        conversation: Vec<ChatMessage>,
        turns: Vec<Turn>,
    }
    let mut sessions = Vec::new();
    for name in ["none", "inline", "background"] {
        let mut engine_config = LocalEngineConfig::new(config.model.clone());
        engine_config.threads = config.threads;
        let engine: Arc<dyn Engine> = Arc::new(LocalEngine::load(engine_config)?);
        let registry = Registry::new(PluginRuntime::new(HostConfig {
            engine: Some(engine.clone()),
            ..HostConfig::default()
        })?);
        registry.load_builtins()?;
        let runner = Runner::new(Models::with_default(engine.clone()), registry.clone());
        let pipeline = pipeline(config, name == "background")?;
        // One untimed run: plugin instantiation and the engine's first steps.
        let warm = RunRequest::prompt("Say hello.", StreamMode::Staircase);
        tokio.block_on(runner.run(&pipeline, warm, None))?;
        sessions.push(Session {
            name,
            engine,
            registry,
            runner,
            pipeline,
            conversation: Vec::new(),
            turns: Vec::new(),
        });
    }
    let mut background_turns_compressed = 0;
    for turn in 1..=config.turns {
        for session in &mut sessions {
            let engine = session.engine.clone();
            let count = |messages: &[ChatMessage]| -> u32 {
                messages
                    .iter()
                    .map(|m| engine.token_counter().count(&m.content).get())
                    .sum()
            };
            session.conversation.push(user(turn));
            let full_tokens = count(&session.conversation);
            let over_budget = full_tokens > config.budget_tokens;
            let (given, compress_ms) = if session.name == "inline" && over_budget {
                let started = Instant::now();
                let mut compressor = session
                    .registry
                    .compressor(&config.compressor)
                    .map_err(|e| BenchError::Compressor(e.to_string()))?;
                let compressed = compressor
                    .compress(&session.conversation, config.budget_tokens)
                    .map_err(|e| BenchError::Compressor(e.to_string()))?;
                (compressed, millis(started.elapsed()))
            } else {
                (session.conversation.clone(), 0.0)
            };
            let request = RunRequest {
                conversation: given.clone(),
                mode: StreamMode::Staircase,
                namespace: Default::default(),
                late_charge: None,
            };
            let report = tokio.block_on(session.runner.run(&session.pipeline, request, None))?;
            let ended = Instant::now();
            session.runner.history().wait_idle(IDLE_WAIT);
            let idle_ms = millis(ended.elapsed());
            let history_tokens = match &report.nodes[0].history {
                Some(used) => {
                    if used.replaced_messages > 0 {
                        background_turns_compressed += 1;
                    }
                    used.tokens_used
                }
                None => count(&given),
            };
            session.turns.push(Turn {
                ttft_ms: compress_ms + report.ttft_ms.map_or(0.0, millis),
                history_tokens,
                over_budget,
                compress_ms,
                idle_ms,
                cached_prompt_tokens: report.nodes[0].cached_prompt_tokens,
                answer: report.answer.clone(),
                f1_with_none: 0.0,
            });
            session
                .conversation
                .push(ChatMessage::new(Role::Assistant, report.answer));
        }
    }
    let mut variants = Vec::new();
    for session in sessions {
        // Background work must not outlive its engine.
        session.runner.history().wait_idle(IDLE_WAIT);
        variants.push(Variant {
            name: session.name,
            turns: session.turns,
            mean_ttft_over_budget_ms: 0.0,
            mean_f1_with_none: 0.0,
            mean_distinct_2: 0.0,
        });
    }
    let reference: Vec<Vec<String>> = variants[0].turns.iter().map(|t| words(&t.answer)).collect();
    // Over budget as the `none` variant's history was (the same user turns everywhere).
    let over: Vec<bool> = variants[0].turns.iter().map(|t| t.over_budget).collect();
    for variant in &mut variants {
        for (turn, reference) in variant.turns.iter_mut().zip(&reference) {
            turn.f1_with_none = token_f1(&words(&turn.answer), reference);
        }
        let mean_over = |value: &dyn Fn(&Turn) -> f64| {
            let picked: Vec<f64> = variant
                .turns
                .iter()
                .zip(&over)
                .filter(|(_, over)| **over)
                .map(|(t, _)| value(t))
                .collect();
            picked.iter().sum::<f64>() / picked.len().max(1) as f64
        };
        variant.mean_ttft_over_budget_ms = mean_over(&|t| t.ttft_ms);
        variant.mean_f1_with_none = mean_over(&|t| t.f1_with_none);
        variant.mean_distinct_2 = mean_over(&|t| distinct_n(&words(&t.answer), 2));
    }
    let ratio = |i: usize| {
        variants[i].mean_ttft_over_budget_ms / variants[0].mean_ttft_over_budget_ms.max(1e-9)
    };
    Ok(CompressReport {
        turns: config.turns,
        budget_tokens: config.budget_tokens,
        compressor: config.compressor.clone(),
        inline_vs_none: ratio(1),
        background_vs_none: ratio(2),
        background_turns_compressed,
        variants,
    })
}
