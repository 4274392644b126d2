//! `staircase bench speculation`: decode speed with and without speculation on the embedded
//! model, in one run, on three workloads (an aggregator synthesising given proposer answers,
//! a multi-turn agent re-emitting earlier content, novel text), whether the outputs were
//! identical, the automaton's own cost, and the cost curve of a k-token forward pass (logits
//! at every position) that bounds what speculation can win on this machine. Figures are
//! ratios within one run; runs alternate plain/speculative so machine load hits both sides
//! alike, and the best of the repeats counts.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{BenchError, median};
use crate::engine::local::probe::{Logits, ProbeModel};
use crate::engine::local::{LocalEngine, LocalEngineConfig};
use crate::engine::{
    ChatMessage, Completion, Engine, EngineError, GenerationRequest, Prompt, Role, TokenId, Usage,
};
use crate::speculate::{
    CostModel, DraftFeed, SpeculationConfig, SpeculationStats, SplitMix64, SuffixAutomaton,
};

/// What to measure.
#[derive(Clone, Debug)]
pub struct SpeculationBenchConfig {
    pub model_path: PathBuf,
    pub threads: Option<usize>,
    /// Tokens generated per workload run.
    pub max_tokens: u32,
    /// Runs per workload and engine; the fastest counts.
    pub repeats: usize,
    /// Draft lengths whose forward cost is measured.
    pub cost_points: Vec<u32>,
    /// Context already in the KV cache when the forward costs are measured (the issue's
    /// figures used 200).
    pub cost_context: usize,
    /// Flash attention in both engines (the engine default): batch-invariant kernels, so
    /// greedy outputs must be identical; off, they may differ at near-ties.
    pub flash_attention: bool,
}

impl SpeculationBenchConfig {
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        Self {
            model_path: model_path.into(),
            threads: None,
            max_tokens: 200,
            repeats: 3,
            cost_points: vec![1, 2, 3, 4, 6, 8, 12, 16, 24, 32],
            cost_context: 200,
            flash_attention: crate::engine::local::DEFAULT_FLASH_ATTENTION,
        }
    }
}

/// Everything `staircase bench speculation` reports.
#[derive(Clone, Debug, Serialize)]
pub struct SpeculationReport {
    pub model: String,
    pub threads: usize,
    pub flash_attention: bool,
    pub workloads: Vec<WorkloadReport>,
    pub cost_curve: Vec<CostPoint>,
    /// Best speedup possible with every draft token accepted, from the measured curve:
    /// `(k + 1) / cost(k + 1)` at the best k up to 32.
    pub ceiling_draft_len: usize,
    pub ceiling_speedup: f64,
    pub automaton: AutomatonCost,
}

/// Cost of one forward over `tokens` tokens with logits at every position.
#[derive(Clone, Debug, Serialize)]
pub struct CostPoint {
    pub tokens: u32,
    pub ms: f64,
    /// Relative to a single-token step.
    pub relative: f64,
}

/// Runs the whole benchmark: the cost curve first (a bare context), then the workloads on
/// two engines that differ only in speculation being on, using the measured curve.
pub fn run(config: &SpeculationBenchConfig) -> Result<SpeculationReport, BenchError> {
    let mut engine_config = LocalEngineConfig::new(&config.model_path);
    engine_config.threads = config.threads;
    // Workload prompts are short; a small context keeps two engines' KV small.
    engine_config.context_tokens = Some(2048);
    // A cached prompt prefix changes the batch shapes of the prefill, so repeats of a
    // workload could differ; decode speed does not depend on it.
    engine_config.prefix_cache = false;
    engine_config.flash_attention = config.flash_attention;
    let threads = engine_config
        .threads
        .unwrap_or_else(crate::engine::local::default_threads)
        .max(1);
    let cost_curve = measure_cost_curve(config, threads)?;
    let cost = CostModel::from_measurements(
        &cost_curve
            .iter()
            .map(|p| (p.tokens, p.ms))
            .collect::<Vec<_>>(),
    )
    .unwrap_or_default();
    let (ceiling_draft_len, ceiling_speedup) = cost.ceiling(31);

    // Past sessions would hand the second repeat of a workload its own earlier answer; keep
    // that source out so each run drafts only from what a first run could see.
    engine_config.speculation = SpeculationConfig {
        enabled: true,
        cost,
        session_budget: 0,
        ..SpeculationConfig::default()
    };
    let speculative = LocalEngine::load(engine_config.clone())?;
    engine_config.speculation.enabled = false;
    let plain = LocalEngine::load(engine_config)?;
    let workloads = compare(&plain, &speculative, config.max_tokens, config.repeats)?;
    Ok(SpeculationReport {
        model: speculative.model_info().name.clone(),
        threads,
        flash_attention: config.flash_attention,
        workloads,
        cost_curve,
        ceiling_draft_len,
        ceiling_speedup,
        automaton: automaton_cost(100_000),
    })
}

/// Times forwards of k tokens (logits at every position, as verification needs) on top of
/// `cost_context` cached tokens, removing them from the KV cache after each, best of 12.
pub fn measure_cost_curve(
    config: &SpeculationBenchConfig,
    threads: usize,
) -> Result<Vec<CostPoint>, BenchError> {
    const TRIES: usize = 12;
    let model = ProbeModel::load(&config.model_path)?;
    let max_k = config.cost_points.iter().copied().max().unwrap_or(1) as usize;
    let batch_tokens = config.cost_context.max(max_k);
    let n_ctx = (config.cost_context + max_k + 16) as u32;
    let mut probe = model.probe(n_ctx, batch_tokens, 1, threads, config.flash_attention)?;
    // Any fixed token ids do: cost does not depend on which tokens are fed.
    let vocab = model.vocab_size().max(2);
    let token = |i: usize| TokenId(((i * 7919) % (vocab - 1)) as i32 + 1);
    let context: Vec<TokenId> = (0..config.cost_context).map(token).collect();
    probe.feed(0, &context, 0, Logits::Last)?;
    // Rounds interleave the sizes, so a burst of load elsewhere hits all of them; the best
    // of the rounds counts.
    let mut best = vec![Duration::MAX; config.cost_points.len()];
    for _ in 0..TRIES {
        for (slot, &k) in config.cost_points.iter().enumerate() {
            let draft: Vec<TokenId> = (0..k as usize)
                .map(|i| token(config.cost_context + i))
                .collect();
            best[slot] = best[slot].min(probe.forward(0, &draft, config.cost_context)?);
            probe.remove(0, config.cost_context)?;
        }
    }
    // A wider forward never costs less; leftover noise must not say it does.
    let mut points: Vec<CostPoint> = Vec::new();
    for (&k, time) in config.cost_points.iter().zip(best) {
        let floor = points.last().map_or(0.0, |p| p.ms);
        points.push(CostPoint {
            tokens: k,
            ms: crate::millis::millis(time).max(floor),
            relative: 0.0,
        });
    }
    let one = points
        .iter()
        .find(|p| p.tokens == 1)
        .map_or(1.0, |p| p.ms.max(1e-9));
    for p in &mut points {
        p.relative = p.ms / one;
    }
    Ok(points)
}

/// One workload: a greedy chat request, plus proposer streams fed to the request.
#[derive(Clone, Debug)]
pub struct Workload {
    pub name: &'static str,
    pub description: &'static str,
    pub messages: Vec<ChatMessage>,
    /// A partial answer the model continues (an agent resuming its own output).
    pub assistant_prefix: Option<&'static str>,
    /// `(stream, text)` pushed into the request's draft feed before it starts.
    pub feed: Vec<(&'static str, &'static str)>,
}

/// The aggregator instruction of the built-in `moa` plugin (the Mixture-of-Agents paper's).
const MOA_INSTRUCTION: &str = "You have been provided with a set of responses from various \
open-source models to the latest user query. Your task is to synthesize these responses into a \
single, high-quality response. Critically evaluate the information, recognizing that some of \
it may be biased or incorrect. Do not simply replicate the given answers; offer a refined, \
accurate and comprehensive reply.";

const QUESTION: &str = "Why do cities build bicycle lanes?";

const PROPOSER_ANSWERS: [&str; 3] = [
    "Cities build bicycle lanes to make cycling safer. Separated lanes keep cyclists away from \
     fast cars, which reduces crashes and injuries. When people feel safe, more of them choose \
     to ride a bicycle instead of driving.",
    "Bicycle lanes reduce traffic congestion and air pollution. Every person who rides a \
     bicycle instead of driving is one less car on the road, which means less noise, cleaner \
     air and shorter travel times for everyone.",
    "Bicycle lanes are cheap compared with roads for cars, and they improve public health. \
     Regular cycling is good exercise, so cities with bicycle lanes have healthier residents \
     and lower health care costs.",
];

const EARLIER_CODE: &str = "```python\n\
def is_prime(n):\n    if n < 2:\n        return False\n    for i in range(2, int(n ** 0.5) + 1):\n        if n % i == 0:\n            return False\n    return True\n\n\
def primes_below(limit):\n    return [n for n in range(limit) if is_prime(n)]\n```";

/// The three workloads of the benchmark.
pub fn workloads() -> Vec<Workload> {
    let responses = PROPOSER_ANSWERS
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}. {a}", i + 1))
        .collect::<Vec<_>>()
        .join("\n");
    vec![
        Workload {
            name: "aggregator",
            description: "MoA aggregator (the built-in moa plugin's prompt) over three given answers",
            messages: vec![
                ChatMessage::new(Role::System, MOA_INSTRUCTION),
                ChatMessage::new(
                    Role::User,
                    format!("{QUESTION}\n\nResponses from models:\n{responses}"),
                ),
            ],
            assistant_prefix: None,
            feed: vec![
                ("proposer-1", PROPOSER_ANSWERS[0]),
                ("proposer-2", PROPOSER_ANSWERS[1]),
                ("proposer-3", PROPOSER_ANSWERS[2]),
            ],
        },
        Workload {
            name: "multi-turn",
            description: "agent re-emitting its earlier code, then explaining it",
            messages: vec![
                ChatMessage::new(
                    Role::User,
                    "Write Python functions to test for primes and list the primes below a limit.",
                ),
                ChatMessage::new(Role::Assistant, EARLIER_CODE),
                ChatMessage::new(
                    Role::User,
                    "Show the same code again with a comment on each function, then explain it.",
                ),
            ],
            assistant_prefix: Some("```python\n"),
            feed: Vec::new(),
        },
        Workload {
            name: "novel",
            description: "free writing with nothing to copy",
            messages: vec![ChatMessage::new(
                Role::User,
                "Write a short story about a lighthouse keeper who finds a strange map.",
            )],
            assistant_prefix: None,
            feed: Vec::new(),
        },
    ]
}

/// One generation's output and speed.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    pub tokens: Vec<TokenId>,
    pub text: String,
    pub usage: Usage,
    /// What speculation did, when it was on.
    pub speculation: Option<SpeculationStats>,
    /// Generated tokens after the first, per second after the first (prefill excluded).
    pub decode_tok_s: f64,
}

/// Runs one workload to the end on `engine`.
pub fn run_once(
    engine: &dyn Engine,
    workload: &Workload,
    max_tokens: u32,
) -> Result<RunOutcome, EngineError> {
    let mut request = GenerationRequest::chat(Vec::new());
    request.prompt = Prompt::Chat {
        messages: workload.messages.clone(),
        assistant_prefix: workload.assistant_prefix.map(str::to_owned),
    };
    request.sampling.max_tokens = max_tokens;
    if !workload.feed.is_empty() {
        let feed = DraftFeed::new();
        for (stream, text) in &workload.feed {
            feed.push_text(stream, text);
            feed.finish(stream);
        }
        request.extensions.insert(feed);
    }
    let Completion {
        text,
        token_ids,
        usage,
        timings,
        extensions,
        ..
    } = engine.submit(request)?.blocking_collect()?;
    let decode = timings.first_token.map_or(Duration::ZERO, |first| {
        timings.finished.saturating_sub(first)
    });
    let after_first = usage.completion_tokens.saturating_sub(1);
    let decode_tok_s = if decode.is_zero() {
        0.0
    } else {
        f64::from(after_first) / decode.as_secs_f64()
    };
    Ok(RunOutcome {
        tokens: token_ids.unwrap_or_default(),
        text,
        usage,
        speculation: extensions.get::<SpeculationStats>().cloned(),
        decode_tok_s,
    })
}

/// One workload, plain against speculative.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadReport {
    pub name: &'static str,
    pub description: &'static str,
    pub completion_tokens: u32,
    pub plain_tok_s: f64,
    pub speculative_tok_s: f64,
    /// Median over repeats of speculative / plain, each pair run back to back so a change
    /// of machine load hits both (more robust than the ratio of the best rates).
    pub ratio: f64,
    /// Greedy outputs token for token equal.
    pub identical: bool,
    /// First token index where they differ, if they do.
    pub first_difference: Option<usize>,
    pub speculation: SpeculationStats,
    /// The beginning of the speculative output, to see what was measured.
    pub sample: String,
}

/// Runs every workload `repeats` times on both engines, alternating, best run counting.
pub fn compare(
    plain: &dyn Engine,
    speculative: &dyn Engine,
    max_tokens: u32,
    repeats: usize,
) -> Result<Vec<WorkloadReport>, EngineError> {
    let mut reports = Vec::new();
    for workload in workloads() {
        let mut best_plain: Option<RunOutcome> = None;
        let mut best_spec: Option<RunOutcome> = None;
        let mut paired = Vec::new();
        for _ in 0..repeats.max(1) {
            let p = run_once(plain, &workload, max_tokens)?;
            let s = run_once(speculative, &workload, max_tokens)?;
            if p.decode_tok_s > 0.0 {
                paired.push(s.decode_tok_s / p.decode_tok_s);
            }
            if best_plain
                .as_ref()
                .is_none_or(|b| p.decode_tok_s > b.decode_tok_s)
            {
                best_plain = Some(p);
            }
            if best_spec
                .as_ref()
                .is_none_or(|b| s.decode_tok_s > b.decode_tok_s)
            {
                best_spec = Some(s);
            }
        }
        let (Some(p), Some(s)) = (best_plain, best_spec) else {
            return Err(EngineError::Stopped);
        };
        let first_difference = p
            .tokens
            .iter()
            .zip(&s.tokens)
            .position(|(a, b)| a != b)
            .or_else(|| {
                (p.tokens.len() != s.tokens.len()).then(|| p.tokens.len().min(s.tokens.len()))
            });
        reports.push(WorkloadReport {
            name: workload.name,
            description: workload.description,
            completion_tokens: s.usage.completion_tokens,
            plain_tok_s: p.decode_tok_s,
            speculative_tok_s: s.decode_tok_s,
            ratio: median(&mut paired),
            identical: first_difference.is_none(),
            first_difference,
            speculation: s.speculation.clone().unwrap_or_default(),
            sample: s.text.chars().take(160).collect(),
        });
    }
    Ok(reports)
}

/// What the automaton itself costs (so its share of a ~30 ms step is visible).
#[derive(Clone, Debug, Serialize)]
pub struct AutomatonCost {
    pub tokens: usize,
    /// Extension cost per token, occurrence counts included.
    pub extend_ns_per_token: f64,
    /// One longest-match lookup plus a 16-token draft.
    pub draft_us: f64,
}

/// Measures the automaton on text shaped like agent output (phrases recurring with
/// variation), generated from a fixed seed.
pub fn automaton_cost(tokens: usize) -> AutomatonCost {
    let mut rng = SplitMix64::new(0x00c0_ffee);
    let phrases: Vec<Vec<TokenId>> = (0..200)
        .map(|_| {
            (0..8 + rng.next_u64() % 24)
                .map(|_| TokenId((rng.next_u64() % 32_000) as i32))
                .collect()
        })
        .collect();
    let mut text = Vec::with_capacity(tokens);
    while text.len() < tokens {
        let phrase = &phrases[(rng.next_u64() % phrases.len() as u64) as usize];
        text.extend_from_slice(phrase);
        text.push(TokenId((rng.next_u64() % 32_000) as i32));
    }
    text.truncate(tokens);
    let started = Instant::now();
    let mut sam = SuffixAutomaton::from_tokens(&text);
    let extend = started.elapsed();
    let lookups = 1000;
    let started = Instant::now();
    for i in 0..lookups {
        let end = tokens - (i * 37) % (tokens / 2);
        let window = &text[end.saturating_sub(64)..end];
        let m = sam.with_continuation(sam.match_suffix(window));
        std::hint::black_box(sam.draft(m, 16, |_| false));
    }
    let draft = started.elapsed();
    AutomatonCost {
        tokens,
        extend_ns_per_token: extend.as_nanos() as f64 / tokens as f64,
        draft_us: draft.as_secs_f64() * 1e6 / lookups as f64,
    }
}
