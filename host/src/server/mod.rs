//! `staircase serve`: an OpenAI-compatible HTTP server over an [`App`]. Every pipeline of the
//! app's table is a model, and so is every engine (one model, no pipeline).
//!
//! `chat` runs completions (streamed as SSE or whole), `runs` keeps recent pipeline runs and
//! streams their events, `page` serves the live view at `/`, `admin` answers the listing,
//! health, trace and reload endpoints, `openai` holds the wire format, `error` the error shape,
//! `metrics` the Prometheus exposition, `admission` the bounded queue (`bench::serve`
//! measures what HTTP adds), `guard` the browser-safety checks. This file owns the
//! connections: hyper's HTTP/1 server with a header-read and keep-alive timeout, a cap on
//! open connections, and a shutdown that drains within a deadline and then cuts. Runs go
//! through the same library calls as `staircase run`; this room only translates HTTP to
//! them. It must not assemble engines or plugins (that is `app`'s job).

mod admin;
mod admission;
mod chat;
pub mod error;
mod guard;
mod metrics;
pub mod openai;
mod page;
mod runs;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::HeaderMap;
use axum::routing::{get, post};

use crate::app::App;
use crate::app::config::Limits;
use crate::pipeline::RunReport;
use admission::Admission;
use error::ApiError;

/// The header that carries a run's id (for `/v1/runs/{id}/trace`).
pub const RUN_ID_HEADER: &str = "x-staircase-run-id";

/// How the server runs; from `staircase.toml` `[server]`/`[limits]` and the flags.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    /// Requests must carry `Authorization: Bearer KEY` when set (`/health` and `/metrics`
    /// stay open for probes and scrapers).
    pub api_key: Option<String>,
    pub limits: Limits,
    /// Watch plugin and pipeline folders and swap changes in.
    pub watch: bool,
    /// Who may reach the server from a browser, and whether `/metrics` asks for the key.
    pub access: Access,
}

/// The browser-facing rules (`[server]` in `staircase.toml`).
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// Host names a server without a key answers besides loopback names and its own
    /// address; `"*"` answers any.
    pub allowed_hosts: Vec<String>,
    /// `/metrics` asks for the key too.
    pub metrics_require_key: bool,
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    App(#[from] crate::app::AppError),
    #[error("metrics: {0}")]
    Metrics(String),
}

/// Everything the handlers share.
pub(crate) struct ServerState {
    pub(crate) app: Arc<App>,
    pub(crate) options: ServeOptions,
    pub(crate) admission: Admission,
    /// Recent pipeline runs: live events, then reports (`runs`).
    pub(crate) runs: runs::Runs,
    next_id: AtomicU64,
    /// Distinguishes ids of two server processes started in the same second.
    id_salt: u64,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) plugin_log: Arc<Mutex<metrics::PluginLog>>,
}

impl ServerState {
    fn new(app: Arc<App>, options: ServeOptions) -> Result<Arc<Self>, ServerError> {
        let metrics = metrics::Metrics::install().map_err(ServerError::Metrics)?;
        let plugin_log = Arc::new(Mutex::new(metrics::PluginLog::default()));
        metrics::count_plugin_reloads(app.registry(), plugin_log.clone());
        let id_salt = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id());
        Ok(Arc::new(Self {
            admission: Admission::new(options.limits.max_running, options.limits.queue),
            app,
            options,
            runs: runs::Runs::default(),
            next_id: AtomicU64::new(0),
            id_salt,
            metrics,
            plugin_log,
        }))
    }

    /// A fresh completion id, also the run's id.
    pub(crate) fn next_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("chatcmpl-{:012x}{n:06x}", self.id_salt & 0xffff_ffff_ffff)
    }

    /// A recent run's report, for its trace endpoints.
    pub(crate) fn run(&self, id: &str) -> Option<Arc<RunReport>> {
        self.runs.report(id)
    }

    /// The API key check; `Ok` when no key is set.
    pub(crate) fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.options.api_key else {
            return Ok(());
        };
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given == Some(key.as_str()) {
            Ok(())
        } else {
            Err(ApiError::unauthorized())
        }
    }

    /// Whether requests must carry a key (the Host allow-list guards servers without one).
    pub(crate) fn requires_key(&self) -> bool {
        self.options.api_key.is_some()
    }

    pub(crate) fn deadline(&self) -> Duration {
        Duration::from_secs(self.options.limits.request_timeout_secs.max(1))
    }
}

/// The routes over a state.
fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/models", get(admin::models))
        .route("/v1/models/{id}", get(admin::model))
        .route("/", get(page::index))
        .route("/live/{file}", get(page::asset))
        .route("/v1/runs", get(runs::list))
        .route("/v1/runs/{id}/events", get(runs::events))
        .route("/v1/runs/{id}/trace", get(admin::trace_json))
        .route("/v1/runs/{id}/trace.svg", get(admin::trace_svg))
        .route("/health", get(admin::health))
        .route("/metrics", get(admin::metrics))
        .route("/admin/status", get(admin::status))
        .route("/admin/reload", post(admin::reload))
        .fallback(admin::no_route)
        .layer(DefaultBodyLimit::max(state.options.limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::browser_safety,
        ))
        .with_state(state)
}

/// Binds, then serves until `shutdown` resolves. `on_listening` gets the bound address
/// (port 0 asks the system for a free one) before the first request is accepted.
pub async fn serve(
    app: Arc<App>,
    options: ServeOptions,
    on_listening: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    if options.watch {
        app.watch()?;
    }
    let state = ServerState::new(app, options.clone())?;
    let listener = tokio::net::TcpListener::bind(options.addr)
        .await
        .map_err(|error| ServerError::Bind {
            addr: options.addr,
            error,
        })?;
    on_listening(listener.local_addr()?);
    let limits = &options.limits;
    let router = router(state);
    let mut http = hyper::server::conn::http1::Builder::new();
    // The header-read timer runs from a connection's start and again from the end of each
    // response, so it ends both silent or trickling sockets and idle kept-alive ones.
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(limits.header_timeout_secs.max(1)));
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        // Past the cap, new connections wait in the kernel's accept queue until one closes.
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "accepting a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        // Streamed tokens go out as they come, not coalesced.
        let _ = stream.set_nodelay(true);
        let connection = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    let grace = Duration::from_secs(limits.shutdown_grace_secs);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "connections still open at the shutdown deadline are cut"
        );
    }
    Ok(())
}

/// How long accepting pauses after an error (out of file descriptors): long enough for
/// connections to close, short enough that clients barely notice.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Poisoning cannot leave these values inconsistent (each update is one push or swap).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
