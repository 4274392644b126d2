//! `staircase bench engine --against-server`: our local engine against llama.cpp's
//! `llama-server` on the same GGUF, thread count and flash-attention setting, at each of a
//! sweep of request counts (one at a time, several at once): time to first token and decode
//! rate, as ratios (ours over the server's) measured within one run. The server is reached through the remote engine, so
//! its side includes HTTP and SSE on loopback, as a user of it would have. Prompts are
//! unique per request, so neither side answers from its prefix cache beyond the chat
//! template's head, which both cache.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde::Serialize;

use super::engine::filler_text;
use super::{BenchError, median, secs};
use crate::engine::local::{LocalEngine, LocalEngineConfig, default_threads};
use crate::engine::remote::launch::{LaunchError, LaunchOptions, LlamaServer};
use crate::engine::remote::{RemoteConfig, RemoteEngine};
use crate::engine::{ChatMessage, Engine, GenerationEvent, GenerationRequest, Role};

/// How long the server may take to its first byte and between bytes: far beyond the remote
/// engine's defaults, since the server prefills a whole burst of prompts before answering.
const SERVER_FIRST_BYTE: Duration = Duration::from_secs(900);

#[derive(Clone, Debug)]
pub struct AgainstServerConfig {
    pub model: PathBuf,
    /// Threads of both; `None` is the local engine's default.
    pub threads: Option<usize>,
    /// Prompt length of each request, in tokens (roughly).
    pub prompt_tokens: usize,
    pub max_tokens: u32,
    /// Requests at once in each measurement, in order (e.g. 1, 4, 16).
    pub concurrency: Vec<usize>,
    /// Rounds of each measurement, the two sides alternating.
    pub repeats: usize,
    pub flash_attention: bool,
}

impl AgainstServerConfig {
    pub fn new(model: PathBuf) -> Self {
        Self {
            model,
            threads: None,
            prompt_tokens: 200,
            max_tokens: 64,
            concurrency: vec![1, 4],
            repeats: 3,
            flash_attention: crate::engine::local::DEFAULT_FLASH_ATTENTION,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgainstServerError {
    #[error(transparent)]
    Bench(#[from] BenchError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
}

/// One side in one measurement: medians over the rounds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Side {
    /// Mean time to first token of a round's requests.
    pub ttft_ms: f64,
    /// Generated tokens after the first, per second of a request's decoding, summed over
    /// the requests running at once (the aggregate rate).
    pub decode_tok_s: f64,
}

/// One request alone, or several at once.
#[derive(Clone, Debug, Serialize)]
pub struct Scenario {
    pub requests: usize,
    pub ours: Side,
    pub server: Side,
    /// Ours over the server's: below 1 our first token comes sooner.
    pub ttft_ratio: f64,
    /// Ours over the server's: above 1 we decode faster.
    pub decode_ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct AgainstServerReport {
    pub model: String,
    pub threads: usize,
    pub flash_attention: bool,
    pub scenarios: Vec<Scenario>,
}

/// One request's figures: first token, and decode rate over the tokens after it.
struct Timed {
    ttft: Duration,
    decode_tok_s: f64,
}

async fn timed(engine: &dyn Engine, request: GenerationRequest) -> Result<Timed, BenchError> {
    let started = Instant::now();
    let mut stream = engine.submit(request)?;
    let mut first = None;
    while let Some(event) = stream.next().await {
        match event? {
            GenerationEvent::Delta { .. } => {
                first.get_or_insert_with(|| started.elapsed());
            }
            GenerationEvent::Finished { usage, .. } => {
                let ttft = first.ok_or(BenchError::Untimed)?;
                let decoding = started.elapsed().saturating_sub(ttft);
                let after_first = usage.completion_tokens.saturating_sub(1);
                return Ok(Timed {
                    ttft,
                    decode_tok_s: f64::from(after_first) / secs(decoding),
                });
            }
        }
    }
    Err(BenchError::Untimed)
}

/// `n` requests at once on `engine`: mean TTFT and summed decode rate.
async fn round(
    engine: &dyn Engine,
    prompts: Vec<String>,
    max_tokens: u32,
) -> Result<Side, BenchError> {
    let n = prompts.len().max(1) as f64;
    let results = join_all(prompts.into_iter().map(|prompt| {
        let mut request = GenerationRequest::chat(vec![ChatMessage::new(Role::User, prompt)]);
        request.sampling.max_tokens = max_tokens;
        request.sampling.temperature = 0.0;
        timed(engine, request)
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    Ok(Side {
        ttft_ms: results
            .iter()
            .map(|t| crate::millis::millis(t.ttft))
            .sum::<f64>()
            / n,
        decode_tok_s: results.iter().map(|t| t.decode_tok_s).sum(),
    })
}

fn medians(sides: &[Side]) -> Side {
    let mut ttft: Vec<f64> = sides.iter().map(|s| s.ttft_ms).collect();
    let mut decode: Vec<f64> = sides.iter().map(|s| s.decode_tok_s).collect();
    Side {
        ttft_ms: median(&mut ttft),
        decode_tok_s: median(&mut decode),
    }
}

/// Runs both measurements. Call from a tokio runtime.
pub async fn run(config: &AgainstServerConfig) -> Result<AgainstServerReport, AgainstServerError> {
    let threads = config.threads.unwrap_or_else(default_threads);
    let mut levels: Vec<usize> = config.concurrency.iter().map(|&n| n.max(1)).collect();
    if levels.is_empty() {
        levels.push(1);
    }
    let concurrency = levels.iter().copied().max().unwrap_or(1);
    let mut local_config = LocalEngineConfig::new(&config.model);
    local_config.threads = Some(threads);
    local_config.flash_attention = config.flash_attention;
    let ours = Arc::new(LocalEngine::load(local_config).map_err(BenchError::from)?);
    let server = LlamaServer::start_with(
        &config.model,
        &LaunchOptions {
            threads,
            slots: concurrency,
            context_tokens: concurrency * (config.prompt_tokens + config.max_tokens as usize + 256),
            flash_attention: Some(config.flash_attention),
            ..LaunchOptions::default()
        },
    )?;
    let mut remote = RemoteConfig::new("bench", vec![server.url()]);
    remote.health.interval = Duration::ZERO;
    // Sixteen prompts on one busy core can take the server minutes before its first byte;
    // a retry would submit the request again and time something else.
    remote.timeouts.first_byte = SERVER_FIRST_BYTE;
    remote.timeouts.idle = SERVER_FIRST_BYTE;
    remote.retry.attempts = 1;
    let theirs = RemoteEngine::connect("bench", remote)
        .await
        .map_err(BenchError::from)?;

    let mut variant = 0;
    let mut prompts = |n: usize| -> Vec<String> {
        (0..n)
            .map(|_| {
                variant += 1;
                format!(
                    "Summarise this record in two sentences.\n\n{}",
                    filler_text(&ours, config.prompt_tokens, variant)
                )
            })
            .collect()
    };
    // Untimed: loads both sides' caches with the chat template's head and warms the server's
    // connection.
    round(ours.as_ref(), prompts(1), 4).await?;
    round(&theirs, prompts(1), 4).await?;

    let mut scenarios = Vec::new();
    for requests in levels {
        let (mut our_rounds, mut their_rounds) = (Vec::new(), Vec::new());
        for _ in 0..config.repeats.max(1) {
            tracing::info!(requests, "bench: ours");
            our_rounds.push(round(ours.as_ref(), prompts(requests), config.max_tokens).await?);
            tracing::info!(requests, "bench: llama-server");
            their_rounds.push(round(&theirs, prompts(requests), config.max_tokens).await?);
        }
        let (ours_side, server_side) = (medians(&our_rounds), medians(&their_rounds));
        scenarios.push(Scenario {
            requests,
            ttft_ratio: ours_side.ttft_ms / server_side.ttft_ms.max(1e-9),
            decode_ratio: ours_side.decode_tok_s / server_side.decode_tok_s.max(1e-9),
            ours: ours_side,
            server: server_side,
        });
    }
    drop(server);
    Ok(AgainstServerReport {
        model: config.model.display().to_string(),
        threads,
        flash_attention: config.flash_attention,
        scenarios,
    })
}
