//! `staircase generate`: one model, no pipeline; streams the answer. The single-model
//! baseline the pipeline benchmarks compare against.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use crate::engine::local::{LocalEngine, LocalEngineConfig};
use crate::engine::{
    ChatMessage, Engine, GenerationEvent, GenerationRequest, Prompt, Role, SamplingParams,
};
use crate::speculate::SpeculationStats;

/// Arguments of `staircase generate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The user message.
    prompt: String,
    /// A GGUF file to run instead of the default model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A system message.
    #[arg(long)]
    system: Option<String>,
    /// A partial answer for the model to continue.
    #[arg(long)]
    continue_from: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// llama.cpp threads (default: measured per machine, see docs/models.md).
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object with the text, timings, usage and llama.cpp's `system_info` (the
    /// CPU kernels it runs) instead of streaming.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model_path = match args.model {
        Some(path) => path,
        None => crate::model::default_model_path().context("getting the default model")?,
    };
    let mut config = LocalEngineConfig::new(model_path);
    config.threads = args.threads;
    let engine = LocalEngine::load(config)?;
    let mut messages = Vec::new();
    if let Some(system) = args.system {
        messages.push(ChatMessage::new(Role::System, system));
    }
    messages.push(ChatMessage::new(Role::User, args.prompt));
    let mut request = GenerationRequest::chat(messages);
    if let Prompt::Chat {
        assistant_prefix, ..
    } = &mut request.prompt
    {
        assistant_prefix.clone_from(&args.continue_from);
    }
    let sampling: &mut SamplingParams = &mut request.sampling;
    sampling.temperature = args.temperature;
    sampling.top_p = args.top_p;
    sampling.top_k = args.top_k;
    sampling.seed = args.seed;
    sampling.max_tokens = args.max_tokens;
    sampling.stop = args.stop;
    let mut stream = engine.submit(request)?;
    let mut text = String::new();
    let mut stdout = std::io::stdout().lock();
    if !args.json
        && let Some(prefix) = &args.continue_from
    {
        write!(stdout, "{prefix}")?;
    }
    while let Some(event) = stream.blocking_next() {
        match event? {
            GenerationEvent::Delta { text: delta, .. } => {
                if args.json {
                    text.push_str(&delta);
                } else {
                    write!(stdout, "{delta}")?;
                    stdout.flush()?;
                }
            }
            GenerationEvent::Finished {
                reason,
                usage,
                timings,
                extensions,
            } => {
                if args.json {
                    let mut usage_json = serde_json::to_value(&usage)?;
                    if let Some(stats) = extensions.get::<SpeculationStats>() {
                        usage_json["speculation"] = serde_json::to_value(stats)?;
                    }
                    let report = json!({
                        "model": engine.model_info().name,
                        "text": text,
                        "finish_reason": reason,
                        "usage": usage_json,
                        "timings_ms": timings.millis_json(),
                        "decode_tok_s": decode_rate(usage.completion_tokens, &timings),
                        "system_info": crate::engine::local::system_info(),
                    });
                    writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?)?;
                } else {
                    writeln!(stdout)?;
                }
                return Ok(());
            }
        }
    }
    anyhow::bail!("the engine stopped before the answer finished")
}

fn decode_rate(tokens: u32, timings: &crate::engine::Timings) -> Option<f64> {
    let first = timings.first_token?;
    let span = timings.finished.checked_sub(first)?.as_secs_f64();
    (tokens > 1 && span > 0.0).then(|| f64::from(tokens - 1) / span)
}
