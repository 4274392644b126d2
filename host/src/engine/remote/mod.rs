//! An engine over OpenAI-compatible servers (llama.cpp's `llama-server`, vLLM, SGLang, or
//! another Staircase): one or more replicas of one model, a routing policy choosing the
//! replica of each request, retries with backoff before the first token reaches the caller,
//! a circuit breaker per replica and background health checks.
//!
//! A request is streamed (`stream_options.include_usage`, so the server's prompt, completion
//! and cached-prompt counts come back). A partial assistant answer is continued the way the
//! server supports ([`Continuation`], detected at connect), declared as
//! `Capabilities::assistant_prefix`. Dropping the stream aborts its task, which drops the HTTP
//! response and so closes the connection: llama.cpp and vLLM abort the sequence. Once text has
//! reached the caller a failure is never retried (the caller would see text twice); it ends
//! the stream with a typed error, within the idle timeout at most.
//!
//! `Priority` is not sent (the API has no field for it), so a `Priority::BACKGROUND`
//! request is served like any other: the server cannot pause it for a foreground one.

mod client;
pub use client::redact_url;
pub mod config;
pub mod launch;
mod replicas;
mod tokens;
mod wire;

use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use self::client::ChunkTokens;
use self::client::{Attempt, Outcome};
pub use self::config::{Continuation, HealthConfig, RemoteConfig, RetryConfig, Timeouts};
pub use self::replicas::ReplicaStats;
use self::replicas::Replicas;
use self::tokens::{LocalTokenizer, RemoteTokens};
use self::wire::{WirePrompt, WireRequest};
use super::local::ChatTemplate;
use super::{
    Capabilities, Engine, EngineError, EventSender, FirstTokenLogprobs, GenerationEvent,
    GenerationRequest, GenerationStream, ModelInfo, Prompt, Timings, TokenCounter, TopFirstTokens,
};
use crate::routing::RouteHint;

/// Context size assumed when neither the configuration nor the server says: the smallest
/// that current chat models offer.
const FALLBACK_CONTEXT_TOKENS: usize = 4096;

/// See the module documentation.
pub struct RemoteEngine {
    shared: Arc<Shared>,
    /// What [`Engine::model_info`] says until a replica has answered.
    pending_info: ModelInfo,
    runtime: tokio::runtime::Handle,
    health: Option<tokio::task::JoinHandle<()>>,
    /// The runtime [`RemoteEngine::open`] made for it, when it was not built inside one.
    own_runtime: Option<tokio::runtime::Runtime>,
}

struct Shared {
    /// What pipelines call the model (the `model` label of its metrics).
    name: String,
    config: RemoteConfig,
    tokens: RemoteTokens,
    client: reqwest::Client,
    api_key: Option<String>,
    replicas: Arc<Replicas>,
    /// What the servers are, from the first replica that answered (or the configuration).
    /// Unset while none has: the model is unavailable, and each request and health check
    /// asks again, so a backend may come up after the host.
    server: OnceLock<Server>,
    /// One probe at a time while `server` is unset.
    probing: tokio::sync::Mutex<()>,
}

/// What is known of the servers once one has answered.
struct Server {
    kind: ServerKind,
    continuation: Continuation,
    /// The chat template, for the `completions` continuation.
    template: Option<ChatTemplate>,
    info: ModelInfo,
}

/// Which server answers, as far as the probe at connect could tell: what it may be asked
/// beyond the OpenAI API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ServerKind {
    /// llama.cpp's `llama-server` (`/props`): per-chunk timings on request.
    LlamaCpp,
    /// vLLM (`/version`): per-chunk usage on request.
    Vllm,
    /// Another Staircase (`/v1/models` owned by `staircase-*`): continues a trailing
    /// assistant message as llama.cpp does.
    Staircase,
    /// Not asked, or not known: only the OpenAI API.
    #[default]
    Other,
}

/// What the servers told us at connect.
#[derive(Default)]
struct Probe {
    kind: ServerKind,
    continuation: Option<Continuation>,
    context_tokens: Option<usize>,
    template: Option<(String, String, String)>,
}

impl RemoteEngine {
    /// Connects to the replicas of `config` under the model name `name` (what pipelines call
    /// it), asking them what they are unless the configuration says. Runs its tasks on the
    /// current tokio runtime.
    pub async fn connect(name: &str, config: RemoteConfig) -> Result<Self, EngineError> {
        let urls = config.urls();
        if urls.is_empty() {
            return Err(EngineError::InvalidRequest(format!(
                "remote model `{name}` names no server: set `base_url` or `replicas`"
            )));
        }
        let api_key = match &config.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                EngineError::InvalidRequest(format!(
                    "remote model `{name}`: the environment variable {var} (api_key_env) is not set"
                ))
            })?),
            None => None,
        };
        let client = reqwest::Client::builder()
            .connect_timeout(config.timeouts.connect)
            // Steps reuse connections; an idle one is dropped before the server's keep-alive
            // (5 s in llama.cpp's HTTP library) closes it under a request being sent.
            .pool_idle_timeout(std::time::Duration::from_secs(3))
            .build()
            .map_err(|e| EngineError::Internal(format!("HTTP client: {e}")))?;

        let replicas = Arc::new(Replicas::new(urls, config.routing.build(), &config.breaker));
        let local_tokenizer = match &config.tokenizer {
            Some(path) => Some(LocalTokenizer::load(path)?),
            None => None,
        };
        let tokens = RemoteTokens::new(
            client.clone(),
            replicas.clone(),
            config.model.clone(),
            api_key.clone(),
            config.timeouts.first_byte,
            local_tokenizer,
        );
        let pending_info = ModelInfo {
            name: name.to_string(),
            context_tokens: config.context_tokens.unwrap_or(FALLBACK_CONTEXT_TOKENS),
            // Until a replica says otherwise, what the configuration allows: a request then
            // waits for the answer of the probe it triggers rather than being refused.
            capabilities: if config.continuation == Continuation::None {
                Capabilities {
                    assistant_prefix: false,
                    token_prompts: false,
                }
            } else {
                Capabilities::ALL
            },
        };
        let shared = Arc::new(Shared {
            name: name.to_string(),
            config,
            tokens,
            client,
            api_key,
            replicas,
            server: OnceLock::new(),
            probing: tokio::sync::Mutex::new(()),
        });
        match shared.server().await {
            Ok(server) => tracing::info!(
                model = name,
                replicas = shared.replicas.count(),
                policy = shared.replicas.policy_name(),
                continuation = ?server.continuation,
                "remote model connected"
            ),
            // Not up yet (a backend started beside the host, or restarting): the model
            // answers 503 until a replica does.
            Err(error @ EngineError::Unreachable(_)) => {
                tracing::warn!(model = name, %error, "remote model not available yet")
            }
            Err(error) => return Err(error),
        }
        let health = (!shared.config.health.interval.is_zero())
            .then(|| tokio::spawn(health_loop(Arc::downgrade(&shared))));
        Ok(Self {
            shared,
            pending_info,
            runtime: tokio::runtime::Handle::current(),
            health,
            own_runtime: None,
        })
    }

    /// [`Self::connect`] from synchronous code (the composition root): the engine gets a
    /// runtime of its own, one worker thread, since its work is waiting on sockets.
    pub fn open(name: &str, config: RemoteConfig) -> Result<Self, EngineError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("remote-{name}"))
            .enable_all()
            .build()
            .map_err(|e| {
                EngineError::Internal(format!("runtime for remote model `{name}`: {e}"))
            })?;
        let handle = runtime.handle().clone();
        // On a thread of its own, so this works from inside another runtime too.
        let connected = std::thread::scope(|scope| {
            scope
                .spawn(|| handle.block_on(Self::connect(name, config)))
                .join()
        })
        .map_err(|_| EngineError::Internal(format!("connecting remote model `{name}` panicked")))?;
        let mut engine = connected?;
        engine.own_runtime = Some(runtime);
        Ok(engine)
    }

    /// How continuations are sent to these servers (`None` until a replica has answered).
    pub fn continuation(&self) -> Continuation {
        self.shared
            .server
            .get()
            .map_or(Continuation::None, |server| server.continuation)
    }

    /// Whether a replica has answered, so the model can serve.
    pub fn is_available(&self) -> bool {
        self.shared.server.get().is_some()
    }

    /// Per-replica figures: requests, errors, in flight, breaker, cache hits.
    pub fn replica_stats(&self) -> Vec<ReplicaStats> {
        self.shared.replicas.stats()
    }

    /// Checks every replica's health now (the background checks do this every
    /// `health.interval`).
    pub async fn check_health(&self) {
        self.shared.check_health().await;
    }
}

impl Drop for RemoteEngine {
    fn drop(&mut self) {
        if let Some(task) = self.health.take() {
            task.abort();
        }
        // Not a blocking shutdown: the engine may be dropped inside another runtime.
        if let Some(runtime) = self.own_runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Shared {
    /// One try's latencies on its replica, as histograms through the `metrics` facade (a
    /// no-op unless a recorder is installed, as `staircase serve` does for `/metrics`).
    fn record_latency(&self, index: usize, first_token: Option<Duration>, total: Duration) {
        let labels = [
            ("model", self.name.clone()),
            ("replica", self.replicas.url(index).to_string()),
        ];
        if let Some(first_token) = first_token {
            metrics::histogram!("staircase_replica_ttft_seconds", &labels)
                .record(first_token.as_secs_f64());
        }
        metrics::histogram!("staircase_replica_request_duration_seconds", &labels)
            .record(total.as_secs_f64());
    }

    async fn check_health(&self) {
        if self.server.get().is_none() {
            // Still unavailable: asking what the servers are is the health check.
            let _ = self.server().await;
            return;
        }
        replicas::check_health(
            &self.replicas,
            &self.client,
            self.api_key.as_deref(),
            &self.config.health.path,
            self.config.timeouts.connect,
        )
        .await;
    }

    /// What the servers are: known once one has answered; until then asked again (one probe
    /// at a time). `Unreachable`, naming the model, while no replica answers.
    async fn server(&self) -> Result<&Server, EngineError> {
        if let Some(server) = self.server.get() {
            return Ok(server);
        }
        let _probing = self.probing.lock().await;
        if let Some(server) = self.server.get() {
            return Ok(server);
        }
        let server = self.ask_server().await?;
        Ok(self.server.get_or_init(|| server))
    }

    /// Probes the replicas unless the configuration already says all a probe would.
    async fn ask_server(&self) -> Result<Server, EngineError> {
        let config = &self.config;
        let needs_probe = config.continuation == Continuation::Auto
            || config.continuation == Continuation::Completions
            || config.context_tokens.is_none();
        let probe = if needs_probe {
            probe(
                &self.client,
                self.api_key.as_deref(),
                self.replicas.urls(),
                config,
            )
            .await
            .map_err(|error| match error {
                EngineError::Unreachable(why) => EngineError::Unreachable(format!(
                    "model `{}` is not available yet: {why}",
                    self.name
                )),
                other => other,
            })?
        } else {
            Probe::default()
        };
        let continuation = match config.continuation {
            Continuation::Auto => probe.continuation.unwrap_or(Continuation::None),
            explicit => explicit,
        };
        let template = match continuation {
            Continuation::Completions => {
                let (source, bos, eos) = probe.template.ok_or_else(|| {
                    EngineError::Template(format!(
                        "remote model `{}`: the `completions` continuation needs the chat \
                         template, and no replica reports one at /props",
                        self.name
                    ))
                })?;
                Some(ChatTemplate::new(&source, &bos, &eos)?)
            }
            _ => None,
        };
        let context_tokens = config
            .context_tokens
            .or(probe.context_tokens)
            .unwrap_or(FALLBACK_CONTEXT_TOKENS);
        let known_server = continuation != Continuation::None;
        Ok(Server {
            kind: probe.kind,
            continuation,
            template,
            info: ModelInfo {
                name: self.name.clone(),
                context_tokens,
                capabilities: Capabilities {
                    assistant_prefix: known_server,
                    // llama.cpp and vLLM take token ids as a completions prompt.
                    token_prompts: known_server,
                },
            },
        })
    }

    /// The request as the servers take it.
    fn wire(
        &self,
        server: &Server,
        request: &GenerationRequest,
    ) -> Result<WireRequest, EngineError> {
        let prompt = match &request.prompt {
            Prompt::Chat {
                messages,
                assistant_prefix,
            } => match (&server.template, assistant_prefix) {
                (Some(template), Some(prefix)) => {
                    WirePrompt::Text(template.render(messages, Some(prefix))?)
                }
                _ => WirePrompt::Chat {
                    messages,
                    assistant_prefix: assistant_prefix.as_deref(),
                    continuation: server.continuation,
                },
            },
            Prompt::Tokens(tokens) => WirePrompt::Tokens(tokens),
        };
        // llama.cpp's server streams a continued prefix back before the new text; an
        // unprobed server continued that way is taken to be one.
        let echoes = server.kind == ServerKind::LlamaCpp
            || (server.kind == ServerKind::Other
                && server.continuation == Continuation::TrailingAssistant);
        let echoed_prefix = match (&prompt, echoes) {
            (
                WirePrompt::Chat {
                    assistant_prefix: Some(prefix),
                    ..
                },
                true,
            ) => Some(prefix.to_string()),
            _ => None,
        };
        let mut wire = wire::request(&self.config.model, prompt, &request.sampling);
        wire.echoed_prefix = echoed_prefix;
        server_extras(server.kind, &request.sampling, &mut wire.body);
        if let Some(k) = request.extensions.get::<TopFirstTokens>() {
            wire::ask_top_logprobs(&mut wire, k.0);
        }
        Ok(wire)
    }
}

/// What a known server is asked beyond the OpenAI API: running token counts in every chunk,
/// so the chunker cuts by real counts ([`ChunkTokens`]), and the repetition penalty
/// (aggregators use it) and DRY (every pipeline node) under the server's own names, since
/// the OpenAI API has neither. (llama-server's DRY also sees the prompt; ours only the answer.)
fn server_extras(kind: ServerKind, sampling: &super::SamplingParams, body: &mut Value) {
    let penalty = sampling.repeat_penalty != 1.0;
    match kind {
        ServerKind::LlamaCpp => {
            body["timings_per_token"] = Value::Bool(true);
            if penalty {
                body["repeat_penalty"] = serde_json::json!(sampling.repeat_penalty);
                body["repeat_last_n"] = serde_json::json!(sampling.repeat_last_n);
            }
            wire::ask_dry(body, &sampling.dry);
        }
        ServerKind::Vllm => {
            body["stream_options"]["continuous_usage_stats"] = Value::Bool(true);
            if penalty {
                body["repetition_penalty"] = serde_json::json!(sampling.repeat_penalty);
            }
        }
        ServerKind::Staircase => wire::ask_dry(body, &sampling.dry),
        ServerKind::Other => {}
    }
}

/// The prompt as routing text: what a replica's prefix cache would hold, in order.
fn routing_text(prompt: &Prompt) -> String {
    match prompt {
        Prompt::Chat {
            messages,
            assistant_prefix,
        } => {
            let mut text = String::new();
            for message in messages {
                text.push_str(match message.role {
                    super::Role::System => "\u{1}s",
                    super::Role::User => "\u{1}u",
                    super::Role::Assistant => "\u{1}a",
                });
                text.push_str(&message.content);
            }
            if let Some(prefix) = assistant_prefix {
                text.push_str("\u{1}a");
                text.push_str(prefix);
            }
            text
        }
        Prompt::Tokens(tokens) => tokens.iter().map(|t| format!("{} ", t.0)).collect(),
    }
}

impl Engine for RemoteEngine {
    fn submit(&self, request: GenerationRequest) -> Result<GenerationStream, EngineError> {
        let (events, stream) = GenerationStream::channel();
        let wire = match self.shared.server.get() {
            Some(server) => {
                server.info.check_prompt(&request.prompt)?;
                Some(self.shared.wire(server, &request)?)
            }
            // Built once a replica answers, in the task.
            None => None,
        };
        let shared = self.shared.clone();
        let task = self.runtime.spawn(async move {
            let wire = match wire {
                Some(wire) => wire,
                None => match ready_wire(&shared, &request).await {
                    Ok(wire) => wire,
                    Err(error) => {
                        let _ = events.send(Err(error));
                        return;
                    }
                },
            };
            let text = routing_text(&request.prompt);
            let hint = request.extensions.get::<RouteHint>().cloned();
            let warm_up = request.sampling.max_tokens == 0;
            serve(shared, wire, text, hint, warm_up, events).await;
        });
        Ok(stream.on_cancel(move || task.abort()))
    }

    fn model_info(&self) -> &ModelInfo {
        self.shared
            .server
            .get()
            .map_or(&self.pending_info, |server| &server.info)
    }

    fn token_counter(&self) -> &dyn TokenCounter {
        &self.shared.tokens
    }

    /// What the replicas have in flight from this host (a server says nothing of its own
    /// queue); each healthy replica serves in parallel with the others.
    fn load(&self) -> Option<crate::engine::EngineLoad> {
        let replicas = self.shared.replicas.stats();
        Some(crate::engine::EngineLoad {
            running: replicas.iter().map(|r| r.in_flight).sum(),
            queued: 0,
            parallel: replicas.iter().filter(|r| r.healthy).count().max(1),
        })
    }
}

/// A request to a model no replica had answered for at submit: asks again now.
async fn ready_wire(
    shared: &Shared,
    request: &GenerationRequest,
) -> Result<WireRequest, EngineError> {
    let server = shared.server().await?;
    server.info.check_prompt(&request.prompt)?;
    shared.wire(server, request)
}

/// One request: tries replicas until one answers or the retries run out.
async fn serve(
    shared: Arc<Shared>,
    wire: WireRequest,
    text: String,
    hint: Option<RouteHint>,
    warm_up: bool,
    events: EventSender,
) {
    let submitted = Instant::now();
    let retry = &shared.config.retry;
    let mut tried = vec![false; shared.replicas.count()];
    let mut attempt = 0;
    let mut last_error = None;
    loop {
        attempt += 1;
        if tried.iter().all(|&t| t) {
            // Every replica failed once: the next round may find one back.
            tried.iter_mut().for_each(|t| *t = false);
        }
        let Some(lease) = shared.replicas.choose(&text, hint.as_ref(), &tried) else {
            let error = last_error.unwrap_or_else(|| {
                EngineError::Unreachable(format!(
                    "no replica of `{}` is available (all unhealthy or open)",
                    shared.config.model
                ))
            });
            let _ = events.send(Err(error));
            return;
        };
        let index = lease.index;
        let tried_at = submitted.elapsed();
        let try_once = Attempt {
            client: &shared.client,
            base_url: shared.replicas.url(index),
            api_key: shared.api_key.as_deref(),
            request: &wire,
            timeouts: &shared.config.timeouts,
            warm_up,
            submitted,
            tokens: &shared.tokens,
        };
        let failure = match try_once.run(&events).await {
            Ok(Outcome::Cancelled) => return,
            Ok(Outcome::Finished {
                reason,
                usage,
                first_token,
                chunk_tokens,
                first_token_logprobs,
            }) => {
                shared
                    .replicas
                    .succeeded(index, usage.prompt_tokens, usage.cached_prompt_tokens);
                let finished = submitted.elapsed();
                shared.record_latency(
                    index,
                    first_token.map(|t| t.saturating_sub(tried_at)),
                    finished.saturating_sub(tried_at),
                );
                let mut extensions = http::Extensions::new();
                extensions.insert(chunk_tokens);
                if let Some(candidates) = first_token_logprobs {
                    extensions.insert(FirstTokenLogprobs(candidates));
                }
                let timings = Timings {
                    queued: std::time::Duration::ZERO,
                    prefill_done: first_token.unwrap_or(finished),
                    first_token,
                    finished,
                };
                let _ = events.send(Ok(GenerationEvent::Finished {
                    reason,
                    usage,
                    timings,
                    extensions,
                }));
                return;
            }
            Err(failure) => failure,
        };
        drop(lease);
        let replica_fault = match &failure.error {
            EngineError::Http { status, .. } => *status >= 500,
            EngineError::Overloaded { .. } => false,
            _ => true,
        };
        shared.replicas.failed(index, replica_fault);
        tracing::warn!(
            replica = shared.replicas.url(index),
            attempt,
            delivered = failure.delivered,
            error = %failure.error,
            "remote try failed"
        );
        if failure.delivered || !failure.error.is_retryable() || attempt >= retry.attempts {
            let _ = events.send(Err(failure.error));
            return;
        }
        tried[index] = true;
        let wait = match &failure.error {
            EngineError::Overloaded {
                retry_after: Some(after),
            } => (*after).min(std::time::Duration::from_millis(retry.max_backoff_ms)),
            _ => retry.backoff(attempt),
        };
        last_error = Some(failure.error);
        tokio::time::sleep(wait).await;
    }
}

async fn health_loop(shared: Weak<Shared>) {
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let interval = strong.config.health.interval;
        strong.check_health().await;
        drop(strong);
        tokio::time::sleep(interval).await;
    }
}

/// Asks the replicas what server they are: llama.cpp's `/props` (context, chat template),
/// else vLLM's `/version` and `/v1/models`. The first replica that answers decides.
async fn probe(
    client: &reqwest::Client,
    api_key: Option<&str>,
    urls: &[String],
    config: &RemoteConfig,
) -> Result<Probe, EngineError> {
    let timeout = config.timeouts.connect;
    let get = |url: String| {
        let mut request = client.get(url);
        if let Some(key) = api_key {
            request = request.bearer_auth(key);
        }
        async move {
            match tokio::time::timeout(timeout, request.send()).await {
                Ok(Ok(response)) if response.status().is_success() => {
                    response.json::<Value>().await.ok().map(Ok)
                }
                Ok(Ok(_)) => None,
                Ok(Err(error)) => Some(Err(client::transport_error("", &error, timeout))),
                Err(_) => Some(Err(EngineError::Timeout { after: timeout })),
            }
        }
    };
    let mut errors = Vec::new();
    for url in urls {
        match get(format!("{url}/props")).await {
            Some(Ok(props)) => {
                let str_of = |key: &str| props[key].as_str().unwrap_or_default().to_string();
                let template = str_of("chat_template");
                return Ok(Probe {
                    kind: ServerKind::LlamaCpp,
                    continuation: Some(Continuation::TrailingAssistant),
                    context_tokens: props["default_generation_settings"]["n_ctx"]
                        .as_u64()
                        .map(|n| n as usize),
                    template: (!template.is_empty())
                        .then(|| (template, str_of("bos_token"), str_of("eos_token"))),
                });
            }
            Some(Err(error)) => {
                errors.push(format!("{url}: {error}"));
                continue;
            }
            None => {}
        }
        let version = get(format!("{url}/version")).await;
        let models = get(format!("{url}/v1/models")).await;
        let (context_tokens, staircase) = match &models {
            Some(Ok(models)) => (
                models["data"][0]["max_model_len"]
                    .as_u64()
                    .map(|n| n as usize),
                models["data"][0]["owned_by"]
                    .as_str()
                    .is_some_and(|owner| owner.starts_with("staircase")),
            ),
            _ => (None, false),
        };
        let (kind, continuation) = match version {
            Some(Ok(_)) => (ServerKind::Vllm, Some(Continuation::ContinueFinalMessage)),
            _ if staircase => (ServerKind::Staircase, Some(Continuation::TrailingAssistant)),
            _ => (ServerKind::Other, None),
        };
        return Ok(Probe {
            kind,
            continuation,
            context_tokens,
            template: None,
        });
    }
    Err(EngineError::Unreachable(format!(
        "no replica answered, so the server kind is unknown (set `continuation` and \
         `context_tokens` to serve without asking): {}",
        errors.join("; ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SamplingParams;

    #[test]
    fn known_servers_are_asked_for_chunk_counts_and_get_the_penalty_by_their_name() {
        let sampling = SamplingParams {
            repeat_penalty: 1.2,
            ..SamplingParams::default()
        };
        let body = |kind| {
            let mut body = serde_json::json!({ "stream_options": { "include_usage": true } });
            server_extras(kind, &sampling, &mut body);
            body
        };
        let llama = body(ServerKind::LlamaCpp);
        assert_eq!(llama["timings_per_token"], true);
        assert!((llama["repeat_penalty"].as_f64().unwrap() - 1.2).abs() < 1e-6);
        assert_eq!(llama["repeat_last_n"], 64);
        let vllm = body(ServerKind::Vllm);
        assert_eq!(vllm["stream_options"]["continuous_usage_stats"], true);
        assert!(vllm["repetition_penalty"].as_f64().is_some());
        // Others get the OpenAI API only (OpenAI refuses fields it does not know).
        for kind in [ServerKind::Staircase, ServerKind::Other] {
            assert_eq!(
                body(kind),
                serde_json::json!({ "stream_options": { "include_usage": true } })
            );
        }
        let mut plain = serde_json::json!({});
        server_extras(ServerKind::LlamaCpp, &SamplingParams::default(), &mut plain);
        assert!(plain.get("repeat_penalty").is_none());
        assert!(
            plain.get("dry_multiplier").is_none(),
            "DRY off sends nothing"
        );
    }

    #[test]
    fn dry_goes_to_servers_that_know_it_under_llama_servers_names() {
        let sampling = SamplingParams {
            dry: crate::engine::DrySampling::RECOMMENDED,
            ..SamplingParams::default()
        };
        for kind in [ServerKind::LlamaCpp, ServerKind::Staircase] {
            let mut body = serde_json::json!({});
            server_extras(kind, &sampling, &mut body);
            assert!((body["dry_multiplier"].as_f64().unwrap() - 0.8).abs() < 1e-6);
            assert!((body["dry_base"].as_f64().unwrap() - 1.75).abs() < 1e-6);
            assert_eq!(body["dry_allowed_length"], 2);
            assert_eq!(body["dry_penalty_last_n"], -1);
        }
        let mut body = serde_json::json!({});
        server_extras(ServerKind::Other, &sampling, &mut body);
        assert!(body.get("dry_multiplier").is_none());
    }
}
