//! `staircase serve`: an OpenAI-compatible HTTP server over an [`App`]. Every pipeline of the
//! app's table is a model, and so is every engine (one model, no pipeline).
//!
//! `chat` runs completions (streamed as SSE or whole), `runs` keeps recent pipeline runs and
//! streams their events, `page` serves the live view at `/`, `admin` answers the listing,
//! health, trace and reload endpoints, `openai` holds the wire format, `error` the error shape,
//! `metrics` the Prometheus exposition, `admission` the bounded queue and each tenant's share
//! of it, `tenant` who a request is from, `guard` the browser-safety checks (`bench::serve`
//! measures what HTTP adds), `access` the access log and request ids. This file owns the connections: hyper's HTTP/1 server with a
//! header-read and keep-alive timeout, a cap on open connections, and a shutdown that drains
//! within a deadline and then cuts. Runs go through the same library calls as `staircase run`;
//! this room only translates HTTP to them. It must not assemble engines or plugins (that is
//! `app`'s job).

mod access;
mod admin;
mod admission;
mod chat;
pub mod error;
mod guard;
mod metrics;
pub mod openai;
mod page;
mod runs;
pub mod tenant;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
pub(crate) use crate::sync::lock;
use admission::Admission;
use error::ApiError;
use tenant::{Tenant, TenantSpec, Tenants};

/// The header that carries a run's id (for `/v1/runs/{id}/trace`).
pub const RUN_ID_HEADER: &str = "x-staircase-run-id";
pub use access::REQUEST_ID_HEADER;

/// How the server runs; from `staircase.toml` `[server]`/`[limits]` and the flags.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    /// The tenants and their keys; requests must carry `Authorization: Bearer KEY` of one
    /// when any is set (`/health` and `/metrics` stay open for probes and scrapers). None:
    /// one anonymous tenant, no key check.
    pub tenants: Vec<TenantSpec>,
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
    #[error(transparent)]
    Tenants(#[from] tenant::TenantError),
}

/// Everything the handlers share.
pub(crate) struct ServerState {
    pub(crate) app: Arc<App>,
    pub(crate) options: ServeOptions,
    pub(crate) admission: Admission,
    /// Recent pipeline runs: live events, then reports (`runs`).
    pub(crate) runs: runs::Runs,
    tenants: Tenants,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) plugin_log: Arc<Mutex<metrics::PluginLog>>,
}

impl ServerState {
    fn new(app: Arc<App>, options: ServeOptions) -> Result<Arc<Self>, ServerError> {
        let metrics = metrics::Metrics::install().map_err(ServerError::Metrics)?;
        let plugin_log = Arc::new(Mutex::new(metrics::PluginLog::default()));
        metrics::count_plugin_reloads(app.registry(), plugin_log.clone());
        let tenants = Tenants::new(&options.tenants, &options.limits)?;
        Ok(Arc::new(Self {
            admission: Admission::new(options.limits.max_running, options.limits.queue),
            runs: runs::Runs::new(options.limits.run_subscribers),
            app,
            options,
            tenants,
            metrics,
            plugin_log,
        }))
    }

    /// A recent run's report, for its trace endpoints, when `tenant` owns it.
    pub(crate) fn run(&self, id: &str, tenant: &Tenant) -> Option<Arc<RunReport>> {
        self.runs.report(id, tenant)
    }

    /// The one check of who a request is from: the tenant whose key it carries, or 401
    /// (the anonymous tenant when the server has no keys).
    pub(crate) fn authorize(&self, headers: &HeaderMap) -> Result<Tenant, ApiError> {
        self.tenants.authorize(headers)
    }

    /// Whether requests must carry a key (the Host allow-list guards servers without one).
    pub(crate) fn requires_key(&self) -> bool {
        self.tenants.requires_key()
    }

    pub(crate) fn deadline(&self) -> Duration {
        Duration::from_secs(self.options.limits.request_timeout_secs.max(1))
    }
}

/// The routes over a state.
fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/completions", post(chat::text_completions))
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
        // Outermost, so refused requests are logged too.
        .layer(axum::middleware::from_fn(access::log))
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
        if let Some(bytes) = limits.send_buffer_bytes {
            // Bounds the kernel memory a client that stops reading holds, and how soon its
            // stream backs up into the write timeout.
            if let Err(error) = socket2::SockRef::from(&stream).set_send_buffer_size(bytes) {
                tracing::warn!(%error, bytes, "setting a connection's send buffer");
            }
        }
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
