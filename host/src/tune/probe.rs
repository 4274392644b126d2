//! Per-model token latencies measured on this host: one request alone, then several at
//! once, each on a prompt no earlier request had (so prefill is not served from the cache).
//! The timings are the engine's own (`Timings` of the finished request), as the runtime's
//! [`crate::pipeline::critical::LatencyModel`] reads them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::try_join_all;

use super::predict::ModelLatency;
use crate::engine::{
    ChatMessage, Engine, EngineError, GenerationEvent, GenerationRequest, Role, Timings, Usage,
};
use crate::pipeline::critical::Latencies;

/// Makes every probe prompt new to the prefix cache.
static PROBE: AtomicU64 = AtomicU64::new(0);

async fn one(engine: &dyn Engine, tokens: u32) -> Result<(Usage, Timings), EngineError> {
    let n = PROBE.fetch_add(1, Ordering::Relaxed);
    let prompt = format!(
        "Probe {n}. Explain in plain words, step by step, how a bicycle stays upright while it \
         moves, what the rider does to steer, and why it falls over when it stops."
    );
    let mut request = GenerationRequest::chat(vec![ChatMessage::new(Role::User, prompt)]);
    request.sampling.max_tokens = tokens;
    let mut stream = engine.submit(request)?;
    while let Some(event) = stream.next().await {
        if let GenerationEvent::Finished { usage, timings, .. } = event? {
            return Ok((usage, timings));
        }
    }
    Err(EngineError::Stopped)
}

fn decode_of(usage: &Usage, timings: &Timings) -> Option<Duration> {
    let first = timings.first_token?;
    (usage.completion_tokens > 1 && timings.finished > first)
        .then(|| (timings.finished - first) / (usage.completion_tokens - 1))
}

/// Measures `engine`: `tokens` per request, `concurrent` requests at once for the cost of
/// sharing it.
pub async fn measure(
    engine: &dyn Engine,
    tokens: u32,
    concurrent: usize,
) -> Result<ModelLatency, EngineError> {
    let defaults = Latencies::default();
    // An untimed request first: plugin-free, but it warms the engine's first-use costs.
    one(engine, 2).await?;
    let (usage, timings) = one(engine, tokens).await?;
    let prefilled = usage
        .prompt_tokens
        .saturating_sub(usage.cached_prompt_tokens);
    let prefill = if prefilled > 0 && timings.prefill_done > timings.queued {
        (timings.prefill_done - timings.queued) / prefilled
    } else {
        defaults.prefill_per_token
    };
    let solo = decode_of(&usage, &timings).unwrap_or(defaults.decode_per_token);
    let mut per_extra = Duration::ZERO;
    if concurrent > 1 {
        let runs = try_join_all((0..concurrent).map(|_| one(engine, tokens))).await?;
        let decodes: Vec<Duration> = runs.iter().filter_map(|(u, t)| decode_of(u, t)).collect();
        if !decodes.is_empty() {
            let mean = decodes.iter().sum::<Duration>() / u32::try_from(decodes.len()).unwrap_or(1);
            per_extra = mean.saturating_sub(solo) / u32::try_from(concurrent - 1).unwrap_or(1);
        }
    }
    Ok(ModelLatency {
        solo: Latencies {
            decode_per_token: solo,
            prefill_per_token: prefill,
        },
        per_extra_sequence: per_extra,
    })
}
