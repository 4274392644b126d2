//! `POST /v1/chat/completions`: a pipeline run or one model's generation, whole or as SSE;
//! and `POST /v1/completions`, raw text continued by one model, through the same checks,
//! queue, caps and streaming (only the response shapes differ). A pipeline answers chat, not
//! raw text: a text completion naming one is refused (400).
//!
//! A run lives inside its request: the non-streaming handler awaits it, the streaming one
//! drives it from a task that stops the moment the client's stream is dropped. Either way a
//! client that goes away drops the run, which cancels every node and frees its engine
//! sequences. Errors before the first byte are OpenAI-shaped HTTP errors; after streaming
//! began, a final SSE event carrying an `error` object, then the end of the stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::access::AccessNote;
use super::error::ApiError;
use super::openai::{
    self, AnyChoice, AnyChunkChoice, Chat, ChunkChoice, Delta, Endpoint, Input, TextChoice, Usage,
};
use super::runs::RunGuard;
use super::tenant::Tenant;
use super::{RUN_ID_HEADER, ServerState};
use crate::app::{PipelineVersion, Progress, RunSpec};
use crate::engine::{
    Engine, EngineError, FinishReason, GenerationEvent, GenerationRequest, Prompt, Role,
    SamplingParams,
};
use crate::pipeline::{Pipeline, RunError, RunId, RunReport, RunRequest};
use crate::policy::LateCharge;

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
    /// A pipeline run's fingerprint with its plugin versions (a plain model's is its name).
    fingerprint: Option<String>,
    /// Why an output guard stopped the answer (`finish_reason` is then `content_filter`).
    refusal: Option<String>,
    /// A pipeline run's report, for its trace endpoints.
    run_report: Option<Arc<RunReport>>,
}

/// OpenAI's prefix of a chat completion's id, and vLLM's and OpenAI's of a text
/// completion's: the run's id follows.
const CHAT_ID_PREFIX: &str = "chatcmpl-";
const TEXT_ID_PREFIX: &str = "cmpl-";

/// Identity of one response, shared by all of its chunks.
struct Meta {
    endpoint: Endpoint,
    /// The run's one id, and as the response names it (with its prefix).
    run: RunId,
    id: String,
    model: String,
    created: u64,
    fingerprint: String,
    /// Who asked: owns the run, pays its tokens, and reuses only its own cached text.
    tenant: Tenant,
    /// Where the run's tokens go for the access log.
    note: AccessNote,
}

impl Meta {
    /// The `object` of a whole answer and of a stream chunk.
    fn objects(&self) -> (&'static str, &'static str) {
        match self.endpoint {
            Endpoint::Chat => ("chat.completion", "chat.completion.chunk"),
            Endpoint::Text => ("text_completion", "text_completion"),
        }
    }

    /// A stream chunk's choice: `text` (a chat's first chunk names the role instead), or the
    /// end with its `reason`.
    fn chunk_choice<'a>(
        &self,
        text: Option<&'a str>,
        reason: Option<&'static str>,
    ) -> AnyChunkChoice<'a> {
        match self.endpoint {
            Endpoint::Chat => AnyChunkChoice::Chat(ChunkChoice {
                index: 0,
                delta: Delta {
                    role: None,
                    content: text,
                    refusal: None,
                },
                finish_reason: reason,
                logprobs: None,
            }),
            Endpoint::Text => AnyChunkChoice::Text(TextChoice {
                index: 0,
                text: text.unwrap_or_default(),
                finish_reason: reason,
                logprobs: None,
            }),
        }
    }

    /// One stream chunk with `choices`.
    fn chunk<'a>(
        &'a self,
        fingerprint: &'a str,
        choices: Vec<AnyChunkChoice<'a>>,
    ) -> openai::Chunk<'a> {
        openai::Chunk {
            id: &self.id,
            object: self.objects().1,
            created: self.created,
            model: &self.model,
            system_fingerprint: fingerprint,
            choices,
            usage: None,
            staircase: None,
        }
    }
}

/// `POST /v1/chat/completions`.
pub(crate) async fn completions(
    State(state): State<Arc<ServerState>>,
    Extension(note): Extension<AccessNote>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(state, note, headers, body, Endpoint::Chat).await
}

/// `POST /v1/completions`.
pub(crate) async fn text_completions(
    State(state): State<Arc<ServerState>>,
    Extension(note): Extension<AccessNote>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(state, note, headers, body, Endpoint::Text).await
}

async fn respond(
    state: Arc<ServerState>,
    note: AccessNote,
    headers: HeaderMap,
    body: Body,
    endpoint: Endpoint,
) -> Response {
    match prepare(&state, &headers, body, endpoint).await {
        Ok((chat, target, tenant)) => {
            let model = chat.model.clone();
            let response = start(state.clone(), chat, target, tenant, note).await;
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

/// Everything checked before any work: key (before a byte of the body is read), body, caps,
/// model.
async fn prepare(
    state: &ServerState,
    headers: &HeaderMap,
    body: Body,
    endpoint: Endpoint,
) -> Result<(Chat, Target, Tenant), ApiError> {
    let tenant = state.authorize(headers)?;
    let limits = &state.options.limits;
    let body = read_body(body, limits.max_body_bytes, limits.body_timeout_secs).await?;
    let chat = openai::parse(&body, endpoint)?;
    openai::check_caps(&chat, limits.max_messages, limits.max_stop)?;
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
    if let (Target::Pipeline(_), Input::Text(_)) = (&target, &chat.input) {
        return Err(ApiError::invalid(
            Some("model"),
            format!(
                "`{}` is a pipeline, which answers chat: send it to /v1/chat/completions \
                 (/v1/completions continues raw text on a plain model: {})",
                chat.model,
                state.app.model_names().join(", ")
            ),
        ));
    }
    Ok((chat, target, tenant))
}

/// The whole body, at most `limit` bytes, within `timeout_secs`.
async fn read_body(body: Body, limit: usize, timeout_secs: u64) -> Result<Bytes, ApiError> {
    let timeout = Duration::from_secs(timeout_secs.max(1));
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::body_timeout(timeout.as_secs())),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(error)) => {
            let too_large = std::error::Error::source(&error)
                .is_some_and(|e| e.is::<http_body_util::LengthLimitError>());
            if too_large {
                Err(ApiError::too_large(limit))
            } else {
                Err(ApiError::invalid(
                    None,
                    format!("The request body could not be read: {error}"),
                ))
            }
        }
    }
}

/// A conversation the model's context cannot hold is refused before it queues.
fn check_context(state: &ServerState, chat: &Chat, target: &Target) -> Result<(), ApiError> {
    let engine = match target {
        Target::Model(engine) => engine.clone(),
        Target::Pipeline(_) => state.app.default_engine(),
    };
    let tokens = engine.token_counter().count(&chat.input.text()).get() as usize;
    let context = engine.model_info().context_tokens;
    if tokens >= context {
        return Err(ApiError::context_length(format!(
            "This model's maximum context length is {context} tokens; the messages hold {tokens}"
        )));
    }
    Ok(())
}

async fn start(
    state: Arc<ServerState>,
    chat: Chat,
    target: Target,
    tenant: Tenant,
    note: AccessNote,
) -> Response {
    let ticket = match state.admission.admit(tenant.quota()) {
        Ok(ticket) => ticket,
        Err(error) => return error.into_response(),
    };
    let in_flight = state.metrics.admitted(&chat.model);
    // Tokenized only once the queue took it: a full queue costs a flood nothing.
    if let Err(error) = check_context(&state, &chat, &target) {
        return error.into_response();
    }
    let run = match RunId::random() {
        Ok(run) => run,
        Err(error) => {
            tracing::error!(%error, "no run id");
            return ApiError::run_failed("the server could not make a run id").into_response();
        }
    };
    let prefix = match chat.endpoint {
        Endpoint::Chat => CHAT_ID_PREFIX,
        Endpoint::Text => TEXT_ID_PREFIX,
    };
    let meta = Meta {
        endpoint: chat.endpoint,
        run,
        id: format!("{prefix}{run}"),
        tenant,
        note,
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
            let conversation = match &chat.input {
                Input::Conversation(messages) => messages.as_slice(),
                Input::Text(_) => &[],
            };
            let prompt = conversation
                .iter()
                .rev()
                .find(|m| m.role == Role::User)
                .map_or("", |m| m.content.as_str());
            let guarded = !state
                .app
                .answer_guard_specs(&chat.model, Some(&version.pipeline))
                .is_empty();
            // A guarded run is listed too: its events withhold the text before the guards
            // and carry what they released instead.
            let run = state.runs.start(
                &meta.id,
                &meta.tenant,
                &chat.model,
                chat.mode,
                prompt,
                state.options.limits.recent_runs,
                guarded,
            );
            Work::Pipeline(version, RunGuard(run))
        }
        Target::Model(engine) => Work::Model(engine),
    };
    let admitted = Admitted { ticket, in_flight };
    let mut response = if chat.stream {
        streamed(state, chat, target, admitted, meta).into_response()
    } else {
        whole(state, chat, target, admitted, meta).await
    };
    if let Some(id) = run_id {
        response.headers_mut().insert(RUN_ID_HEADER, id);
    }
    response
}

/// A request the queue took: its place, and its count in the waiting and running gauges.
struct Admitted {
    ticket: super::admission::Ticket,
    in_flight: super::metrics::InFlight,
}

async fn whole(
    state: Arc<ServerState>,
    chat: Chat,
    target: Work,
    admitted: Admitted,
    mut meta: Meta,
) -> Response {
    let (text_tx, mut text_rx) = mpsc::unbounded_channel();
    let deadline = state.deadline();
    let Admitted {
        ticket,
        mut in_flight,
    } = admitted;
    let work = async {
        let _running = ticket.start().await;
        in_flight.running();
        execute(&state, &chat, target, &meta, text_tx).await
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
            meta.note.tokens(&finish.usage);
            if let Some(fp) = finish.fingerprint {
                meta.fingerprint = fp;
            }
            let choice = match meta.endpoint {
                Endpoint::Chat => AnyChoice::Chat(openai::Choice {
                    index: 0,
                    message: openai::OutMessage {
                        role: "assistant",
                        content: &answer,
                        refusal: finish.refusal.as_deref(),
                    },
                    finish_reason: finish.reason,
                    logprobs: None,
                }),
                Endpoint::Text => AnyChoice::Text(TextChoice {
                    index: 0,
                    text: &answer,
                    finish_reason: Some(finish.reason),
                    logprobs: None,
                }),
            };
            axum::Json(openai::Completion {
                id: &meta.id,
                object: meta.objects().0,
                created: meta.created,
                model: &meta.model,
                system_fingerprint: &meta.fingerprint,
                choices: [choice],
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
    admitted: Admitted,
    meta: Meta,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let (sse_tx, sse_rx) = mpsc::channel::<Event>(SSE_BUFFER);
    let write_timeout = Duration::from_secs(state.options.limits.stream_write_timeout_secs.max(1));
    tokio::spawn(async move {
        let sse = Writer {
            tx: sse_tx,
            timeout: write_timeout,
        };
        let text_event = |text: &str| {
            json_event(&meta.chunk(&meta.fingerprint, vec![meta.chunk_choice(Some(text), None)]))
        };
        // A client that stops reading: the run is dropped (every node cancelled, its engine
        // sequences freed) and counted.
        let stalled = || {
            tracing::info!(id = %meta.id, "a streaming client stopped reading; run cancelled");
            state.metrics.cancelled(&meta.model);
            state.metrics.stalled(&meta.model);
        };
        let (text_tx, mut text_rx) = mpsc::unbounded_channel::<String>();
        let deadline = state.deadline();
        let Admitted {
            ticket,
            mut in_flight,
        } = admitted;
        let work = tokio::time::timeout(deadline, async {
            let _running = ticket.start().await;
            in_flight.running();
            execute(&state, &chat, target, &meta, text_tx).await
        });
        tokio::pin!(work);
        // A chat stream names the role first, as OpenAI's does; a text stream has none.
        if meta.endpoint == Endpoint::Chat {
            let role = AnyChunkChoice::Chat(ChunkChoice {
                index: 0,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(""),
                    refusal: None,
                },
                finish_reason: None,
                logprobs: None,
            });
            let first = json_event(&meta.chunk(&meta.fingerprint, vec![role]));
            if let Err(gone) = sse.send(first).await {
                return gone.count(&state, &meta.model, stalled);
            }
        }
        let result = loop {
            tokio::select! {
                biased;
                // The client is gone: dropping `work` drops the run and cancels every node.
                () = sse.tx.closed() => {
                    state.metrics.cancelled(&meta.model);
                    return;
                }
                Some(text) = text_rx.recv() => {
                    // While the client takes no more, the run is not driven (backpressure).
                    if let Err(gone) = sse.send(text_event(&text)).await {
                        return gone.count(&state, &meta.model, stalled);
                    }
                }
                result = &mut work => break result,
            }
        };
        while let Ok(text) = text_rx.try_recv() {
            if let Err(gone) = sse.send(text_event(&text)).await {
                return gone.count(&state, &meta.model, stalled);
            }
        }
        let finish = match result {
            Ok(Ok(finish)) => finish,
            Ok(Err(error)) => return sse.error(&error).await,
            Err(_) => return sse.error(&ApiError::timeout(deadline.as_secs())).await,
        };
        meta.note.tokens(&finish.usage);
        let fp = finish
            .fingerprint
            .clone()
            .unwrap_or_else(|| meta.fingerprint.clone());
        let mut end = meta.chunk_choice(None, Some(finish.reason));
        if let AnyChunkChoice::Chat(choice) = &mut end {
            choice.delta.refusal = finish.refusal.as_deref();
        }
        let mut last = meta.chunk(&fp, vec![end]);
        if chat.include_usage {
            let _ = sse.send(json_event(&last)).await;
            last.choices.clear();
            last.usage = Some(finish.usage);
        }
        last.staircase = Some(finish.report);
        let _ = sse.send(json_event(&last)).await;
        let _ = sse.send(Event::default().data("[DONE]")).await;
    });
    let events = stream::unfold(sse_rx, |mut rx| async move {
        rx.recv().await.map(|event| (Ok(event), rx))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// Events waiting between a run and the client's socket. Enough to smooth a burst (a
/// pipeline's answer node streams a chunk at a time); past it the run waits for the client.
const SSE_BUFFER: usize = 64;

/// The run's side of a stream: each event waits for room at most `timeout`.
struct Writer {
    tx: mpsc::Sender<Event>,
    timeout: Duration,
}

/// Why an event could not be sent.
enum Gone {
    /// The client closed the stream.
    Closed,
    /// The client stopped reading for the write timeout.
    Stalled,
}

impl Gone {
    fn count(self, state: &ServerState, model: &str, stalled: impl FnOnce()) {
        match self {
            Gone::Closed => state.metrics.cancelled(model),
            Gone::Stalled => stalled(),
        }
    }
}

impl Writer {
    async fn send(&self, event: Event) -> Result<(), Gone> {
        match tokio::time::timeout(self.timeout, self.tx.send(event)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Gone::Closed),
            Err(_) => Err(Gone::Stalled),
        }
    }

    /// A failure after streaming began: one event with the error object; the stream then
    /// ends.
    async fn error(&self, error: &ApiError) {
        let _ = self
            .send(json_event(&json!({ "error": error.object() })))
            .await;
    }
}

fn json_event(value: &impl serde::Serialize) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_default())
}

/// Runs the request in its span (every log line of it, its run's and its plugins' carries
/// the request id), sending answer text to `text` as it is generated.
async fn execute(
    state: &ServerState,
    chat: &Chat,
    target: Work,
    meta: &Meta,
    text: mpsc::UnboundedSender<String>,
) -> Result<Finish, ApiError> {
    let span = tracing::info_span!("request", id = %meta.id, model = %chat.model);
    let result = execute_guarded(state, chat, &target, meta, text)
        .instrument(span)
        .await;
    // A pipeline run ends here, after its guards let out their last text: its live view
    // sees everything the client saw before its outcome.
    if let Work::Pipeline(_, run) = &target {
        match &result {
            Ok(finish) => match &finish.run_report {
                Some(report) => run.0.finished(report.clone(), finish.report.clone()),
                None => run.0.stopped(finish.refusal.as_deref().unwrap_or_default()),
            },
            Err(error) => run.0.failed(error),
        }
    }
    result
}

/// [`execute`], through the output guards that cover the answer: the pipeline's own, then
/// `staircase.toml`'s.
async fn execute_guarded(
    state: &ServerState,
    chat: &Chat,
    target: &Work,
    meta: &Meta,
    text: mpsc::UnboundedSender<String>,
) -> Result<Finish, ApiError> {
    let (specs, answering, witness) = match target {
        Work::Pipeline(version, run) => {
            let pipeline = &version.pipeline;
            (
                state.app.answer_guard_specs(&chat.model, Some(pipeline)),
                pipeline.node(pipeline.output).id.clone(),
                Some(crate::guard::Witness {
                    recorder: run.0.recorder(),
                    node: pipeline.output,
                }),
            )
        }
        Work::Model(_) => (
            state.app.answer_guard_specs(&chat.model, None),
            "answer".into(),
            None,
        ),
    };
    if specs.is_empty() {
        return execute_unguarded(state, chat, target, meta, text).await;
    }
    let info = crate::guard::StreamInfo {
        node_id: answering,
        model: chat.model.clone(),
        to_client: true,
    };
    let guards = state
        .app
        .open_guards(&specs, &info)
        .await
        .map_err(|error| {
            tracing::error!(request_id = %meta.id, %error, "an output guard did not start");
            ApiError::run_failed(error.to_string())
        })?;
    let labels = guards.labels();
    let (raw_tx, raw_rx) = mpsc::unbounded_channel();
    let work = execute_unguarded(state, chat, target, meta, raw_tx);
    let (result, report) = guards.relay(work, raw_rx, text, witness).await;
    for event in &report.events {
        state.metrics.guard_event(&chat.model, event);
    }
    let mut finish = match result {
        Some(result) => result?,
        // Stopped mid-answer: the run was cancelled before its usage came; the chunks it sent
        // are its usage, and the tenant's quota is charged for them.
        None => {
            meta.tenant.quota().charge(u64::from(report.chunks));
            Finish {
                reason: "content_filter",
                usage: Usage::new(0, 0, report.chunks),
                report: json!({ "run_id": meta.id }),
                fingerprint: None,
                refusal: None,
                run_report: None,
            }
        }
    };
    if let Some(reason) = &report.stopped {
        finish.reason = "content_filter";
        finish.refusal = Some(reason.clone());
    }
    // The guards' versions served this answer whole, even if new ones came meanwhile.
    let run = finish
        .fingerprint
        .take()
        .unwrap_or_else(|| meta.fingerprint.clone());
    finish.fingerprint = Some(
        std::iter::once(run)
            .chain(labels)
            .collect::<Vec<_>>()
            .join(";"),
    );
    crate::guard::strip_texts(&mut finish.report);
    if let Value::Object(map) = &mut finish.report {
        map.insert(
            "guards".into(),
            serde_json::to_value(&report).unwrap_or_default(),
        );
    }
    Ok(finish)
}

/// [`execute_guarded`] without guards.
async fn execute_unguarded(
    state: &ServerState,
    chat: &Chat,
    target: &Work,
    meta: &Meta,
    text: mpsc::UnboundedSender<String>,
) -> Result<Finish, ApiError> {
    let (id, tenant) = (meta.id.as_str(), &meta.tenant);
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
            run_pipeline(state, chat, version.clone(), run, meta, &mut send).await
        }
        Work::Model(engine) => {
            let cap = state.options.limits.max_tokens;
            generate(chat, cap, engine.as_ref(), id, tenant, &mut send).await
        }
    };
    if let Ok(finish) = &result {
        tenant.quota().charge(u64::from(finish.usage.total_tokens));
        state.metrics.finished(
            &chat.model,
            finish.reason,
            first_text,
            started.elapsed(),
            &finish.usage,
        );
    }
    result
}

/// A chat request through the one way in ([`crate::app::App::prepare`]): the served
/// version with the server's cap on every node and the request's parameters on the node
/// that gives the answer.
async fn run_pipeline(
    state: &ServerState,
    chat: &Chat,
    version: Arc<PipelineVersion>,
    live: &RunGuard,
    meta: &Meta,
    send: &mut impl FnMut(String),
) -> Result<Finish, ApiError> {
    let Input::Conversation(conversation) = &chat.input else {
        return Err(ApiError::invalid(
            Some("prompt"),
            "a pipeline answers chat only",
        ));
    };
    let request = RunRequest {
        conversation: conversation.clone(),
        mode: chat.mode,
        namespace: meta.tenant.namespace().clone(),
        // Plugin model calls that end after the run (a background compression): the
        // tenant's quota; those during the run are in its usage, charged below.
        late_charge: Some({
            let tenant = meta.tenant.clone();
            LateCharge::new(move |tokens| tenant.quota().charge(tokens))
        }),
    };
    let mut spec = RunSpec::served(meta.run, version, request);
    spec.answer_params = Some(chat.params.clone());
    spec.max_tokens = state.options.limits.max_tokens;
    spec.latency_budget = chat.latency_budget_ms.map(Duration::from_millis);
    // The variant is chosen under the load its engines report now: runs admitted before
    // this one are on them already.
    let prepared = state.app.prepare(spec).await;
    if let Some(choice) = prepared.variant() {
        state
            .metrics
            .variant(&chat.model, &choice.variant, choice.met_budget);
    }
    let pipeline = prepared.pipeline().clone();
    let outcome = prepared
        .run(live.0.recorder(), |progress| {
            if let Progress::Answer(text) = progress {
                send(text.to_string());
            }
        })
        .await
        .map_err(|error| run_error(state, &pipeline, &meta.id, error))?;
    let usage = outcome.usage();
    let usage = Usage::new(
        usage.prompt_tokens,
        usage.cached_prompt_tokens,
        usage.completion_tokens,
    );
    let mut value =
        serde_json::to_value(outcome.full_report(CHAT_ID_PREFIX)).unwrap_or(Value::Null);
    // The answer is the completion's message.
    if let Value::Object(map) = &mut value {
        map.remove("answer");
    }
    let fingerprint = outcome.fingerprint.as_str().to_string();
    let reason = if outcome.hit_cap { "length" } else { "stop" };
    Ok(Finish {
        reason,
        usage,
        report: value,
        fingerprint: Some(fingerprint),
        refusal: None,
        run_report: Some(Arc::new(outcome.report)),
    })
}

/// What a client may read of an engine failure: a remote backend's answer body and its
/// address (which may carry credentials) go to the log only, under the request id.
fn backend_failure(
    id: &str,
    model: &str,
    error: &EngineError,
    full: &dyn std::fmt::Display,
) -> Option<ApiError> {
    let summary = match error {
        EngineError::Http { status, .. } => format!("the model's backend answered HTTP {status}"),
        EngineError::Unreachable(_) => {
            tracing::warn!(request_id = id, model, error = %full, "model unreachable");
            return Some(ApiError::unavailable(model));
        }
        EngineError::Crashed { .. } => {
            tracing::error!(request_id = id, model, error = %full, "model engine crashed");
            return Some(ApiError::engine_crashed(model));
        }
        _ => return None,
    };
    tracing::warn!(request_id = id, error = %full, "backend failure");
    Some(ApiError::run_failed(format!(
        "{summary} (request {id}; the server log has the details)"
    )))
}

fn run_error(state: &ServerState, pipeline: &Pipeline, id: &str, error: RunError) -> ApiError {
    if let RunError::Engine { source, .. } = &error
        && let Some(api) = backend_failure(id, &pipeline.name, source, &error)
    {
        return api;
    }
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

/// One model's answer, at most the server's `cap` tokens (the engine also ends it at the
/// end of its context).
async fn generate(
    chat: &Chat,
    cap: Option<u32>,
    engine: &dyn Engine,
    id: &str,
    tenant: &Tenant,
    send: &mut impl FnMut(String),
) -> Result<Finish, ApiError> {
    let defaults = SamplingParams::default();
    let asked = chat.params.max_tokens.unwrap_or(defaults.max_tokens);
    let max_tokens = cap.map_or(asked, |cap| asked.min(cap));
    let mut request = match &chat.input {
        Input::Conversation(messages) => GenerationRequest::chat(messages.clone()),
        Input::Text(text) => GenerationRequest {
            prompt: Prompt::Text(text.clone()),
            ..GenerationRequest::chat(Vec::new())
        },
    };
    request.namespace = tenant.namespace().clone();
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
        // A model answers without DRY unless asked, as llama-server does.
        dry: chat.params.dry().over(defaults.dry),
        // 0 would be a warm-up; a client asking for no tokens gets one.
        max_tokens: max_tokens.max(1),
        ..chat.params.apply(defaults)
    };
    let engine_error = |error: EngineError| match error {
        EngineError::PromptTooLong { .. } => ApiError::context_length(error.to_string()),
        EngineError::InvalidRequest(_) => ApiError::invalid(None, error.to_string()),
        _ => backend_failure(id, &chat.model, &error, &error)
            .unwrap_or_else(|| ApiError::run_failed(error.to_string())),
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
                    fingerprint: None,
                    refusal: None,
                    run_report: None,
                    report: json!({
                        "run_id": id,
                        "model": engine.model_info().name,
                        "usage": usage,
                        "timings_ms": timings.millis_json(),
                    }),
                });
            }
        }
    }
    Err(ApiError::run_failed(
        "the engine stopped before the answer ended",
    ))
}
