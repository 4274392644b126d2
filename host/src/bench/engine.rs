//! `staircase bench engine`: the local engine against a bare llama.cpp loop (the kernel
//! probe: same model, threads and context settings), aggregate token rate by batch size, and
//! time to first token with a cached versus a cold 1k-token prefix. Every figure is a ratio
//! measured within one run, so machine load affects both sides alike.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::{BenchError, secs};
use crate::engine::local::probe::{Logits, ProbeModel};
use crate::engine::local::{
    DEFAULT_BATCH_TOKENS, DEFAULT_CONTEXT_TOKENS, LocalEngine, LocalEngineConfig, default_threads,
};
use crate::engine::{
    ChatMessage, Completion, Engine, GenerationRequest, Prompt, Role, SamplingParams, TokenId,
    Usage,
};

/// What to measure.
#[derive(Clone, Debug)]
pub struct EngineBenchConfig {
    pub model_path: std::path::PathBuf,
    pub threads: Option<usize>,
    /// Prompt length for the prefill comparison.
    pub prefill_tokens: usize,
    /// Generated tokens for the decode comparison.
    pub decode_tokens: u32,
    pub batch_sizes: Vec<usize>,
    /// Tokens per request in the batch measurement.
    pub batch_decode_tokens: u32,
    /// Length of the shared prefix for the warm/cold TTFT measurement.
    pub prefix_tokens: usize,
    /// Each comparison runs this many times; the best run counts (least disturbed by load).
    pub repeats: usize,
    /// Flash attention in the engine and in the bare loop alike.
    pub flash_attention: bool,
}

impl EngineBenchConfig {
    pub fn new(model_path: impl Into<std::path::PathBuf>) -> Self {
        Self {
            model_path: model_path.into(),
            threads: None,
            prefill_tokens: 512,
            decode_tokens: 128,
            batch_sizes: vec![1, 2, 4, 8],
            batch_decode_tokens: 48,
            prefix_tokens: 1000,
            repeats: 3,
            flash_attention: crate::engine::local::DEFAULT_FLASH_ATTENTION,
        }
    }
}

/// Ours against the bare loop.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub tokens: usize,
    pub bare_tok_s: f64,
    pub engine_tok_s: f64,
    /// engine / bare rate, median over back-to-back pairs; 0.95 means the scheduler costs 5%.
    pub ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BatchPoint {
    pub batch: usize,
    pub generated_tokens: u32,
    pub wall_s: f64,
    pub aggregate_tok_s: f64,
    /// Aggregate rate relative to batch 1.
    pub speedup: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TtftPoint {
    pub prompt_tokens: u32,
    pub cached_prompt_tokens: u32,
    pub cold_ms: f64,
    pub warm_ms: f64,
    /// cold / warm.
    pub speedup: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EngineBenchReport {
    pub model: String,
    pub threads: usize,
    pub prefill: Comparison,
    pub decode: Comparison,
    pub batches: Vec<BatchPoint>,
    pub ttft: TtftPoint,
    /// Decode rate with the prefix cache holding `cached_cells` cells, relative to the
    /// cache-off engine's: in llama.cpp's unified KV cache every cell in use widens attention.
    pub decode_with_cache: CacheCost,
}

#[derive(Clone, Debug, Serialize)]
pub struct CacheCost {
    pub cached_cells: usize,
    pub decode_tok_s: f64,
    /// Against the decode comparison's `engine_tok_s`.
    pub ratio: f64,
}

/// Filler text of roughly `tokens` tokens; `variant` changes its first words so different
/// variants share no cached prefix.
pub fn filler_text(engine: &LocalEngine, tokens: usize, variant: usize) -> String {
    const SENTENCES: [&str; 6] = [
        "The river town kept its records in a stone hall by the bridge.",
        "Every spring the clerks copied the ledgers before the floods arrived.",
        "Merchants argued about the price of salt, wool and dried fish.",
        "A lighthouse keeper wrote letters about the ships that never came back.",
        "Children learned to count with beads strung on copper wire.",
        "At night the bells rang once for each boat still out on the water.",
    ];
    let mut text = format!("Archive volume {variant}. ");
    let mut i = 0;
    while engine.tokenize(&text).len() < tokens {
        text.push_str(SENTENCES[i % SENTENCES.len()]);
        text.push(' ');
        i += 1;
    }
    text
}

/// When the first token came; a benchmark request without one cannot be timed.
fn first_token(outcome: &Completion) -> Result<Duration, BenchError> {
    outcome.timings.first_token.ok_or(BenchError::Untimed)
}

/// The bare loop on the probe: one context, prefill in batch-size chunks with logits at
/// the end, then greedy decoding of `decode` tokens one call each. Returns (prefill time,
/// decode time).
fn bare_loop(
    model: &ProbeModel,
    prompt: &[TokenId],
    decode: usize,
    n_ctx: u32,
    threads: usize,
    flash_attention: bool,
) -> Result<(Duration, Duration), BenchError> {
    let mut probe = model.probe(n_ctx, DEFAULT_BATCH_TOKENS, 1, threads, flash_attention)?;
    let started = Instant::now();
    probe.feed(0, prompt, 0, Logits::Last)?;
    let token = probe.greedy_next();
    let prefill = started.elapsed();
    let decode = probe.greedy_decode(token, prompt.len(), decode)?;
    Ok((prefill, decode))
}

fn chat(system: Option<&str>, user: &str, max_tokens: u32) -> GenerationRequest {
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(ChatMessage::new(Role::System, system));
    }
    messages.push(ChatMessage::new(Role::User, user));
    let mut request = GenerationRequest::chat(messages);
    request.sampling = SamplingParams {
        max_tokens,
        ..SamplingParams::default()
    };
    request
}

/// Runs the whole benchmark. Progress goes to `tracing`; the caller prints the report.
pub fn run(config: &EngineBenchConfig) -> Result<EngineBenchReport, BenchError> {
    let mut engine_config = LocalEngineConfig::new(&config.model_path);
    engine_config.threads = config.threads;
    engine_config.flash_attention = config.flash_attention;
    // Without the prefix cache, repeated prompts cost the same as the bare loop's.
    engine_config.prefix_cache = false;
    // The bare loop decodes one token per call; speculation is measured by `bench speculation`.
    engine_config.speculation.enabled = false;
    let engine = LocalEngine::load(engine_config.clone())?;
    let threads = engine.threads();
    let n_ctx = engine.model_info().context_tokens as u32;
    let bare_model = ProbeModel::load(&config.model_path)?;

    // Prefill.
    let prompt = engine.tokenize(&filler_text(&engine, config.prefill_tokens, 0));
    let prompt = prompt[..config.prefill_tokens.min(prompt.len())].to_vec();
    let mut pairs = Vec::new();
    for _ in 0..config.repeats.max(1) {
        let (bare, _) = bare_loop(
            &bare_model,
            &prompt,
            0,
            n_ctx,
            threads,
            config.flash_attention,
        )?;
        let mut request = GenerationRequest::chat(Vec::new());
        request.prompt = Prompt::Tokens(prompt.clone());
        request.sampling.max_tokens = 1;
        let outcome = engine.submit(request)?.blocking_collect()?;
        pairs.push((bare, outcome.timings.prefill_done - outcome.timings.queued));
    }
    let prefill = comparison(prompt.len(), &pairs);
    tracing::info!(?prefill, "prefill measured");

    // Decode: ours first, so the bare loop decodes exactly as many tokens.
    let request = chat(
        None,
        "Write a long, detailed story about a lighthouse keeper and a storm.",
        config.decode_tokens,
    );
    let decode_prompt = engine.prompt_tokens(&request.prompt)?;
    let mut pairs = Vec::new();
    let mut steps = 0;
    for _ in 0..config.repeats.max(1) {
        let outcome = engine.submit(request.clone())?.blocking_collect()?;
        // Decode steps after the first token (which prefill produced).
        steps = outcome.usage.completion_tokens.saturating_sub(1) as usize;
        let first = outcome.timings.first_token.unwrap_or_default();
        let (_, bare) = bare_loop(
            &bare_model,
            &decode_prompt,
            steps,
            n_ctx,
            threads,
            config.flash_attention,
        )?;
        pairs.push((bare, outcome.timings.finished - first));
    }
    let decode = comparison(steps, &pairs);
    tracing::info!(?decode, "decode measured");
    drop(engine);
    drop(bare_model);

    // Aggregate rate by batch size, prefix cache on (the shared template prefix is cached).
    engine_config.prefix_cache = true;
    let engine = LocalEngine::load(engine_config)?;
    let questions = [
        "Describe a busy harbour at dawn.",
        "Explain how a bicycle gear works.",
        "Write a short poem about snow.",
        "List some uses of copper.",
        "Tell a story about a lost key.",
        "Describe the taste of fresh bread.",
        "Explain why the sky looks blue.",
        "Write a letter to a distant friend.",
    ];
    engine.submit(chat(None, "Hello", 1))?.blocking_collect()?;
    let mut batches = Vec::new();
    let mut base_rate = None;
    for &size in &config.batch_sizes {
        let start = Instant::now();
        let streams = (0..size)
            .map(|i| {
                let question = questions[i % questions.len()];
                engine.submit(chat(None, question, config.batch_decode_tokens))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut generated = 0;
        for stream in streams {
            generated += stream.blocking_collect()?.usage.completion_tokens;
        }
        let wall = start.elapsed();
        let rate = f64::from(generated) / secs(wall);
        let base = *base_rate.get_or_insert(rate);
        batches.push(BatchPoint {
            batch: size,
            generated_tokens: generated,
            wall_s: wall.as_secs_f64(),
            aggregate_tok_s: rate,
            speedup: rate / base,
        });
        tracing::info!(size, rate, "batch measured");
    }

    // TTFT: a fresh 1k-token prefix (cold), then the same prefix with another question (warm).
    let mut best_cold = Duration::MAX;
    let mut best_warm = Duration::MAX;
    let mut ttft_usage = Usage::default();
    for variant in 0..config.repeats.max(1) {
        let prefix = filler_text(&engine, config.prefix_tokens, variant + 1);
        let cold = engine
            .submit(chat(Some(&prefix), "What is kept in the hall?", 1))?
            .blocking_collect()?;
        let warm = engine
            .submit(chat(Some(&prefix), "Who rang the bells?", 1))?
            .blocking_collect()?;
        best_cold = best_cold.min(first_token(&cold)?);
        best_warm = best_warm.min(first_token(&warm)?);
        ttft_usage = warm.usage;
    }
    let mut best_cached = Duration::MAX;
    let mut cached_steps = 0;
    for _ in 0..config.repeats.max(1) {
        let outcome = engine.submit(request.clone())?.blocking_collect()?;
        cached_steps = outcome.usage.completion_tokens.saturating_sub(1) as usize;
        let first = first_token(&outcome)?;
        best_cached = best_cached.min(outcome.timings.finished - first);
    }
    let cached_rate = cached_steps as f64 / secs(best_cached);
    let decode_with_cache = CacheCost {
        cached_cells: engine.stats().cache_cells,
        decode_tok_s: cached_rate,
        ratio: cached_rate / decode.engine_tok_s,
    };
    let ttft = TtftPoint {
        prompt_tokens: ttft_usage.prompt_tokens,
        cached_prompt_tokens: ttft_usage.cached_prompt_tokens,
        cold_ms: crate::millis::millis(best_cold),
        warm_ms: crate::millis::millis(best_warm),
        speedup: secs(best_cold) / secs(best_warm),
    };
    Ok(EngineBenchReport {
        model: engine.model_info().name.clone(),
        threads,
        prefill,
        decode,
        batches,
        ttft,
        decode_with_cache,
    })
}

/// Rates from the best run of each side; the ratio is the median over back-to-back pairs,
/// which a burst of load on a shared machine disturbs least.
fn comparison(tokens: usize, pairs: &[(Duration, Duration)]) -> Comparison {
    let bare = pairs.iter().map(|p| p.0).min().unwrap_or_default();
    let engine = pairs.iter().map(|p| p.1).min().unwrap_or_default();
    let mut ratios: Vec<f64> = pairs.iter().map(|(b, e)| secs(*b) / secs(*e)).collect();
    ratios.sort_by(f64::total_cmp);
    let ratio = ratios.get(ratios.len() / 2).copied().unwrap_or(0.0);
    Comparison {
        tokens,
        bare_tok_s: tokens as f64 / secs(bare),
        engine_tok_s: tokens as f64 / secs(engine),
        ratio,
    }
}

/// One model file in the quantization comparison.
#[derive(Clone, Debug, Serialize)]
pub struct QuantPoint {
    pub model: String,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// One forward pass over 8 tokens of a sequence (speculative verification), in single
    /// decode steps: 8.0 means no gain over decoding them one by one.
    pub verify8_in_steps: f64,
    /// Greedy answers identical to the first model's, of `prompts`.
    pub identical_answers: usize,
    pub prompts: usize,
    /// Per prompt, the first generated token where the answer differs from the first model's.
    pub divergence: Vec<Option<usize>>,
}

/// The greedy test corpus for the quantization comparison.
const CORPUS: [&str; 6] = [
    "What is the capital of France?",
    "Name three colours.",
    "Write a sentence about the sea.",
    "Explain why the sky is blue in one sentence.",
    "Give me a word that rhymes with cat.",
    "Count from one to five.",
];

/// Speed and greedy agreement of several GGUF files of one model, the first being the
/// reference.
pub fn compare_quantizations(
    models: &[std::path::PathBuf],
    threads: Option<usize>,
    repeats: usize,
) -> Result<Vec<QuantPoint>, BenchError> {
    let mut points = Vec::new();
    let mut reference: Option<Vec<Vec<TokenId>>> = None;
    for path in models {
        let mut config = LocalEngineConfig::new(path);
        config.threads = threads;
        config.prefix_cache = false;
        let flash_attention = config.flash_attention;
        let engine = LocalEngine::load(config)?;
        let threads = engine.threads();
        let n_ctx = engine.model_info().context_tokens as u32;
        let answers = CORPUS
            .iter()
            .map(|q| {
                let answer = engine.submit(chat(None, q, 32))?.blocking_collect()?;
                Ok(answer.token_ids.unwrap_or_default())
            })
            .collect::<Result<Vec<_>, BenchError>>()?;
        let prompt = engine.tokenize(&filler_text(&engine, 256, 0));
        drop(engine);
        let model = ProbeModel::load(path)?;
        let (mut prefill, mut decode, mut verify, mut step) =
            (Duration::MAX, Duration::MAX, Duration::MAX, Duration::MAX);
        for _ in 0..repeats.max(1) {
            let (p, d) = bare_loop(&model, &prompt, 32, n_ctx, threads, flash_attention)?;
            prefill = prefill.min(p);
            decode = decode.min(d);
            let (one, eight) = forward_costs(&model, &prompt, n_ctx, threads, flash_attention)?;
            step = step.min(one);
            verify = verify.min(eight);
        }
        let divergence: Vec<Option<usize>> = match &reference {
            None => vec![None; answers.len()],
            Some(reference) => reference
                .iter()
                .zip(&answers)
                .map(|(a, b)| {
                    a.iter()
                        .zip(b)
                        .position(|(x, y)| x != y)
                        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
                })
                .collect(),
        };
        points.push(QuantPoint {
            model: path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            prefill_tok_s: prompt.len() as f64 / secs(prefill),
            decode_tok_s: 32.0 / secs(decode),
            verify8_in_steps: secs(verify) / secs(step),
            identical_answers: divergence.iter().filter(|d| d.is_none()).count(),
            prompts: answers.len(),
            divergence,
        });
        reference.get_or_insert(answers);
    }
    Ok(points)
}

/// After prefilling `prompt`: the time of a 1-token forward and of an 8-token forward with
/// logits at every position (speculative verification), each removed from KV again.
fn forward_costs(
    model: &ProbeModel,
    prompt: &[TokenId],
    n_ctx: u32,
    threads: usize,
    flash_attention: bool,
) -> Result<(Duration, Duration), BenchError> {
    const ROUNDS: usize = 5;
    let mut probe = model.probe(n_ctx, DEFAULT_BATCH_TOKENS, 1, threads, flash_attention)?;
    probe.feed(0, prompt, 0, Logits::None)?;
    let mut timed = |n: usize| -> Result<Duration, BenchError> {
        let mut best = Duration::MAX;
        for _ in 0..ROUNDS {
            best = best.min(probe.forward(0, &prompt[..n], prompt.len())?);
            probe.remove(0, prompt.len())?;
        }
        Ok(best)
    };
    let one = timed(1)?;
    let eight = timed(8)?;
    Ok((one, eight))
}

/// One point of the attention-width cost curve.
#[derive(Clone, Debug, Serialize)]
pub struct WidthPoint {
    /// Cells other sequences hold in the unified KV cache.
    pub other_cells: usize,
    pub step_ms: f64,
    /// Step time relative to an empty cache.
    pub relative: f64,
}

/// Decode-step time of one short sequence while another sequence holds `other_cells` cells
/// of the unified KV cache: llama.cpp attends over every used cell (masked), so cached
/// prefixes slow every step. This is what the prefix cache's cell budget trades against.
pub fn kv_width_costs(
    model_path: &std::path::Path,
    threads: Option<usize>,
    widths: &[usize],
    flash_attention: bool,
) -> Result<Vec<WidthPoint>, BenchError> {
    const ROUNDS: usize = 8;
    let threads = threads.unwrap_or_else(default_threads);
    let model = ProbeModel::load(model_path)?;
    let n_ctx = model.train_context().min(DEFAULT_CONTEXT_TOKENS);
    let mut points: Vec<WidthPoint> = Vec::new();
    for &width in widths {
        let mut probe = model.probe(n_ctx, DEFAULT_BATCH_TOKENS, 2, threads, flash_attention)?;
        // Sequence 1 fills `width` cells; its content does not matter.
        let filler: Vec<TokenId> = (0..width).map(|i| TokenId(1 + (i % 100) as i32)).collect();
        probe.feed(1, &filler, 0, Logits::None)?;
        // Sequence 0: a short prompt, then timed single-token steps.
        let prompt: Vec<TokenId> = (1..=16).map(TokenId).collect();
        probe.feed(0, &prompt, 0, Logits::Last)?;
        let mut best = Duration::MAX;
        for round in 0..ROUNDS {
            best = best.min(probe.forward(0, &[TokenId(42)], 16 + round)?);
        }
        let step_ms = crate::millis::millis(best);
        let base = points.first().map_or(step_ms, |p| p.step_ms);
        points.push(WidthPoint {
            other_cells: width,
            step_ms,
            relative: step_ms / base,
        });
    }
    Ok(points)
}
