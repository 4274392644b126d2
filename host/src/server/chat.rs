//! `POST /v1/chat/completions`: a pipeline run or one model's generation, whole or as SSE.
//!
//! A run lives inside its request: the non-streaming handler awaits it, the streaming one
//! drives it from a task that stops the moment the client's stream is dropped. Either way a
//! client that goes away drops the run, which cancels every node and frees its engine
//! sequences. Errors before the first byte are OpenAI-shaped HTTP errors; after streaming
//! began, a final SSE event carrying an `error` object, then the end of the stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::openai::{self, Chat, ChunkChoice, Delta, Usage};
use super::runs::RunGuard;
use super::{RUN_ID_HEADER, ServerState};
use crate::app::PipelineVersion;
use crate::engine::{
    Engine, EngineError, FinishReason, GenerationEvent, GenerationRequest, Prompt, Role,
    SamplingParams,
};
use crate::pipeline::{Pipeline, RunError, RunEvent, RunRequest};

/// What a request runs on.
enum Target {
    Pipeline(Arc<PipelineVersion>),
    Model(Arc<dyn Engine>),
}

/// A target ready to run: a pipeline run is registered (for its events) before it starts.
enum Work {
    Pipeline(Arc<PipelineVersion>, RunGuard),
    Model(Arc<dyn Engine>),
}

/// The end of a successful run.
struct Finish {
    reason: &'static str,
    usage: Usage,
    report: Value,
}

/// Identity of one response, shared by all of its chunks.
struct Meta {
    id: String,
    model: String,
    created: u64,
    fingerprint: String,
}

pub(crate) async fn completions(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match prepare(&state, &headers, body) {
        Ok((chat, target)) => {
            let model = chat.model.clone();
            let response = start(state.clone(), chat, target).await;
            let status = response.status().as_u16().to_string();
            state.metrics.request(&model, &status);
            response
        }
        Err(error) => {
            state.metrics.request("-", &error.status_label());
            error.into_response()
        }
    }
}

/// Everything checked before any work: key, body, model, context, queue.
fn prepare(
    state: &ServerState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(Chat, Target), ApiError> {
    state.authorize(headers)?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(state.options.limits.max_body_bytes)
        } else {
            ApiError::invalid(None, rejection.body_text())
        }
    })?;
    let chat = openai::parse(&body)?;
    let target = if let Some(version) = state.app.pipelines().get(&chat.model) {
        Target::Pipeline(version)
    } else if let Some(engine) = state.app.engine(&chat.model) {
        Target::Model(engine)
    } else {
        let mut known: Vec<String> = state
            .app
            .pipelines()
            .list()
            .iter()
            .map(|v| v.name.clone())
            .collect();
        known.extend(state.app.model_names());
        return Err(ApiError::model_not_found(&chat.model, &known));
    };
    check_context(state, &chat, &target)?;
    Ok((chat, target))
}

/// A conversation the model's context cannot hold is refused before it queues.
fn check_context(state: &ServerState, chat: &Chat, target: &Target) -> Result<(), ApiError> {
    let engine = match target {
        Target::Model(engine) => engine.clone(),
        Target::Pipeline(_) => state.app.default_engine(),
    };
    let text: String = chat
        .conversation
        .iter()
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let tokens = engine.token_counter().count(&text).get() as usize;
    let context = engine.model_info().context_tokens;
    if tokens >= context {
        return Err(ApiError::context_length(format!(
            "This model's maximum context length is {context} tokens; the messages hold {tokens}"
        )));
    }
    Ok(())
}

async fn start(state: Arc<ServerState>, chat: Chat, target: Target) -> Response {
    let ticket = match state.admission.admit() {
        Ok(ticket) => ticket,
        Err(error) => return error.into_response(),
    };
    let meta = Meta {
        id: state.next_id(),
        model: chat.model.clone(),
        created: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        fingerprint: match &target {
            Target::Pipeline(v) => v.label(),
            Target::Model(e) => e.model_info().name.clone(),
        },
    };
    let run_id = HeaderValue::from_str(&meta.id).ok();
    let target = match target {
        Target::Pipeline(version) => {
            let prompt = chat
                .conversation
                .iter()
                .rev()
                .find(|m| m.role == Role::User)
                .map_or("", |m| m.content.as_str());
            let run = state.runs.start(
                &meta.id,
                &chat.model,
                chat.mode,
                prompt,
                state.options.limits.recent_runs,
            );
            Work::Pipeline(version, RunGuard(run))
        }
        Target::Model(engine) => Work::Model(engine),
    };
    let mut response = if chat.stream {
        streamed(state, chat, target, ticket, meta).into_response()
    } else {
        whole(state, chat, target, ticket, meta).await
    };
    if let Some(id) = run_id {
        response.headers_mut().insert(RUN_ID_HEADER, id);
    }
    response
}

async fn whole(
    state: Arc<ServerState>,
    chat: Chat,
    target: Work,
    ticket: super::admission::Ticket,
    mut meta: Meta,
) -> Response {
    let (text_tx, mut text_rx) = mpsc::unbounded_channel();
    let deadline = state.deadline();
    let work = async {
        let _running = ticket.start().await;
        execute(&state, &chat, target, &meta.id, text_tx).await
    };
    let result = match tokio::time::timeout(deadline, work).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::timeout(deadline.as_secs())),
    };
    let mut answer = String::new();
    while let Ok(text) = text_rx.try_recv() {
        answer.push_str(&text);
    }
    match result {
        Ok(finish) => {
            if let Some(fp) = finish
                .report
                .get("system_fingerprint")
                .and_then(Value::as_str)
            {
                meta.fingerprint = fp.to_string();
            }
            axum::Json(openai::Completion {
                id: &meta.id,
                object: "chat.completion",
                created: meta.created,
                model: &meta.model,
                system_fingerprint: &meta.fingerprint,
                choices: [openai::Choice {
                    index: 0,
                    message: openai::OutMessage {
                        role: "assistant",
                        content: &answer,
                    },
                    finish_reason: finish.reason,
                    logprobs: None,
                }],
                usage: finish.usage,
                staircase: finish.report,
            })
            .into_response()
        }
        Err(error) => error.into_response(),
    }
}

fn streamed(
    state: Arc<ServerState>,
    chat: Chat,
    target: Work,
    ticket: super::admission::Ticket,
    meta: Meta,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let (sse_tx, sse_rx) = mpsc::unbounded_channel::<Event>();
    tokio::spawn(async move {
        let chunk = |delta: Delta<'_>, reason: Option<&'static str>, fp: &str| {
            json_event(&openai::Chunk {
                id: &meta.id,
                object: "chat.completion.chunk",
                created: meta.created,
                model: &meta.model,
                system_fingerprint: fp,
                choices: vec![ChunkChoice {
                    index: 0,
                    delta,
                    finish_reason: reason,
                    logprobs: None,
                }],
                usage: None,
                staircase: None,
            })
        };
        let (text_tx, mut text_rx) = mpsc::unbounded_channel::<String>();
        let deadline = state.deadline();
        let work = tokio::time::timeout(deadline, async {
            let _running = ticket.start().await;
            execute(&state, &chat, target, &meta.id, text_tx).await
        });
        tokio::pin!(work);
        let _ = sse_tx.send(chunk(
            Delta {
                role: Some("assistant"),
                content: Some(""),
            },
            None,
            &meta.fingerprint,
        ));
        let result = loop {
            tokio::select! {
                biased;
                // The client is gone: dropping `work` drops the run and cancels every node.
                () = sse_tx.closed() => {
                    state.metrics.cancelled(&meta.model);
                    return;
                }
                Some(text) = text_rx.recv() => {
                    let _ = sse_tx.send(chunk(Delta { role: None, content: Some(&text) }, None, &meta.fingerprint));
                }
                result = &mut work => break result,
            }
        };
        while let Ok(text) = text_rx.try_recv() {
            let _ = sse_tx.send(chunk(
                Delta {
                    role: None,
                    content: Some(&text),
                },
                None,
                &meta.fingerprint,
            ));
        }
        let finish = match result {
            Ok(Ok(finish)) => finish,
            Ok(Err(error)) => return send_error(&sse_tx, &error),
            Err(_) => return send_error(&sse_tx, &ApiError::timeout(deadline.as_secs())),
        };
        let fp = finish
            .report
            .get("system_fingerprint")
            .and_then(Value::as_str)
            .unwrap_or(&meta.fingerprint)
            .to_string();
        let mut last = openai::Chunk {
            id: &meta.id,
            object: "chat.completion.chunk",
            created: meta.created,
            model: &meta.model,
            system_fingerprint: &fp,
            choices: vec![ChunkChoice {
                index: 0,
                delta: Delta::default(),
                finish_reason: Some(finish.reason),
                logprobs: None,
            }],
            usage: None,
            staircase: None,
        };
        if chat.include_usage {
            let _ = sse_tx.send(json_event(&last));
            last.choices.clear();
            last.usage = Some(finish.usage);
        }
        last.staircase = Some(finish.report);
        let _ = sse_tx.send(json_event(&last));
        let _ = sse_tx.send(Event::default().data("[DONE]"));
    });
    let events = stream::unfold(sse_rx, |mut rx| async move {
        rx.recv().await.map(|event| (Ok(event), rx))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

fn json_event(value: &impl serde::Serialize) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_default())
}

/// A failure after streaming began: one event with the error object; the stream then ends.
fn send_error(tx: &mpsc::UnboundedSender<Event>, error: &ApiError) {
    let _ = tx.send(json_event(&json!({ "error": error.object() })));
}

/// Runs the request, sending answer text to `text` as it is generated.
async fn execute(
    state: &ServerState,
    chat: &Chat,
    target: Work,
    id: &str,
    text: mpsc::UnboundedSender<String>,
) -> Result<Finish, ApiError> {
    let started = Instant::now();
    let mut first_text = None;
    let mut send = |t: String| {
        if first_text.is_none() && !t.is_empty() {
            first_text = Some(started.elapsed());
        }
        let _ = text.send(t);
    };
    let result = match target {
        Work::Pipeline(version, run) => {
            let result = run_pipeline(state, chat, &version, &run, id, &mut send).await;
            if let Err(error) = &result {
                run.0.failed(error);
            }
            result
        }
        Work::Model(engine) => generate(chat, engine.as_ref(), id, &mut send).await,
    };
    if let Ok(finish) = &result {
        state
            .metrics
            .finished(&chat.model, first_text, started.elapsed(), &finish.usage);
    }
    result
}

/// The request's pipeline: the served version with the server's cap on every node, then the
/// request's parameters on the node that gives the answer.
fn shaped(state: &ServerState, chat: &Chat, pipeline: &Pipeline) -> Pipeline {
    let mut pipeline = pipeline.clone();
    // The server's cap bounds what the file asks for; the request then sets its answer.
    if let Some(max) = state.options.limits.max_tokens {
        pipeline.limit_tokens(max);
    }
    let output = pipeline.output.0;
    let params = &mut pipeline.nodes[output].params;
    if let Some(max) = chat.max_tokens {
        params.max_tokens = Some(max);
    }
    params.temperature = chat.temperature.or(params.temperature);
    params.top_p = chat.top_p.or(params.top_p);
    params.seed = chat.seed.or(params.seed);
    params.set_dry(chat.dry);
    if let Some(stop) = &chat.stop {
        params.stop = Some(stop.clone());
    }
    pipeline
}

async fn run_pipeline(
    state: &ServerState,
    chat: &Chat,
    version: &PipelineVersion,
    live: &RunGuard,
    id: &str,
    send: &mut impl FnMut(String),
) -> Result<Finish, ApiError> {
    let request = RunRequest {
        conversation: chat.conversation.clone(),
        mode: chat.mode,
    };
    // A pipeline with declared variants runs the best one that fits the budget under the
    // load its engines report now (runs admitted before this one are on them already).
    let budget = chat.latency_budget_ms.map(std::time::Duration::from_millis);
    let (chosen, choice) =
        crate::tune::adaptive::choose(state.app.runner(), &version.pipeline, &request, budget);
    if let Some(choice) = &choice {
        state
            .metrics
            .variant(&chat.model, &choice.variant, choice.met_budget);
    }
    let pipeline = shaped(state, chat, &chosen);
    let (runner, plugins) = state.app.pinned_runner(&pipeline);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let recorder = live.0.recorder();
    recorder.forward(events_tx);
    let run = runner.run_recorded(&pipeline, request, recorder);
    tokio::pin!(run);
    let mut on_event = |event: RunEvent| {
        if let RunEvent::NodeDelta { node, text, .. } = event
            && node == pipeline.output
        {
            send(text);
        }
    };
    let result = loop {
        tokio::select! {
            result = &mut run => break result,
            Some(event) = events.recv() => on_event(event),
        }
    };
    while let Ok(event) = events.try_recv() {
        on_event(event);
    }
    let mut report = result.map_err(|error| run_error(state, &pipeline, error))?;
    report.variant = choice.and_then(|c| serde_json::to_value(c).ok());
    let output = &report.nodes[pipeline.output.0];
    let cap = pipeline.node(pipeline.output).params.max_tokens;
    let reason = if cap.is_some_and(|cap| output.output_tokens >= cap) {
        "length"
    } else {
        "stop"
    };
    let completion: u32 = report.nodes.iter().map(|n| n.output_tokens).sum();
    let usage = Usage::new(
        report.cache.prompt_tokens,
        report.cache.cached_prompt_tokens,
        completion,
    );
    let fingerprint = std::iter::once(version.label())
        .chain(
            plugins
                .iter()
                .map(|p| format!("{}@{}:{}", p.name, p.version, &p.sha256[..12])),
        )
        .collect::<Vec<_>>()
        .join(";");
    let mut value = serde_json::to_value(&report).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        map.remove("answer");
        map.insert("run_id".into(), json!(id));
        map.insert("pipeline_version".into(), json!(version));
        map.insert("plugins".into(), json!(plugins));
        map.insert("system_fingerprint".into(), json!(fingerprint));
    }
    live.0.finished(Arc::new(report), value.clone());
    Ok(Finish {
        reason,
        usage,
        report: value,
    })
}

fn run_error(state: &ServerState, pipeline: &Pipeline, error: RunError) -> ApiError {
    match &error {
        RunError::Engine {
            source: EngineError::PromptTooLong { .. },
            ..
        } => ApiError::context_length(error.to_string()),
        RunError::Policy { node, .. } => {
            if let Some(index) = pipeline.find(node) {
                state
                    .metrics
                    .plugin_failure(&pipeline.node(index).plugin, &error.to_string());
            }
            ApiError::run_failed(error.to_string())
        }
        _ => ApiError::run_failed(error.to_string()),
    }
}

async fn generate(
    chat: &Chat,
    engine: &dyn Engine,
    id: &str,
    send: &mut impl FnMut(String),
) -> Result<Finish, ApiError> {
    let defaults = SamplingParams::default();
    let max_tokens = chat.max_tokens.unwrap_or(defaults.max_tokens);
    let mut request = GenerationRequest::chat(chat.conversation.clone());
    // A trailing assistant message is continued, as llama.cpp's server does: how another
    // Staircase (or any client) has a model continue a partial answer.
    if let Prompt::Chat {
        messages,
        assistant_prefix,
    } = &mut request.prompt
        && messages.len() > 1
        && messages.last().is_some_and(|m| m.role == Role::Assistant)
    {
        *assistant_prefix = messages.pop().map(|m| m.content);
    }
    request.sampling = SamplingParams {
        temperature: chat.temperature.unwrap_or(defaults.temperature),
        top_p: chat.top_p.unwrap_or(defaults.top_p),
        seed: chat.seed.unwrap_or(defaults.seed),
        stop: chat.stop.clone().unwrap_or_default(),
        // A model answers without DRY unless asked, as llama-server does.
        dry: chat.dry.over(defaults.dry),
        // 0 would be a warm-up; a client asking for no tokens gets one.
        max_tokens: max_tokens.max(1),
        ..defaults
    };
    let engine_error = |error: EngineError| match error {
        EngineError::PromptTooLong { .. } => ApiError::context_length(error.to_string()),
        EngineError::InvalidRequest(_) => ApiError::invalid(None, error.to_string()),
        _ => ApiError::run_failed(error.to_string()),
    };
    let mut stream = engine.submit(request).map_err(engine_error)?;
    while let Some(event) = stream.next().await {
        match event.map_err(engine_error)? {
            GenerationEvent::Delta { text, .. } => send(text),
            GenerationEvent::Finished {
                reason,
                usage,
                timings,
                ..
            } => {
                return Ok(Finish {
                    reason: match reason {
                        FinishReason::Stop => "stop",
                        FinishReason::Length => "length",
                    },
                    usage: Usage::new(
                        usage.prompt_tokens,
                        usage.cached_prompt_tokens,
                        usage.completion_tokens,
                    ),
                    report: json!({
                        "run_id": id,
                        "model": engine.model_info().name,
                        "usage": usage,
                        "timings_ms": {
                            "queued": timings.queued.as_secs_f64() * 1e3,
                            "prefill_done": timings.prefill_done.as_secs_f64() * 1e3,
                            "first_token": timings.first_token.map(|t| t.as_secs_f64() * 1e3),
                            "finished": timings.finished.as_secs_f64() * 1e3,
                        },
                    }),
                });
            }
        }
    }
    Err(ApiError::run_failed(
        "the engine stopped before the answer ended",
    ))
}
