//! `staircase serve`: the OpenAI-compatible server on the host `staircase.toml` describes,
//! with the flags over it. Prints `listening on http://ADDR` once it accepts requests.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::server::tenant::{self, TenantSpec};
use crate::server::{self, ServeOptions};

/// Arguments of `staircase serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on (loopback unless you mean to expose the server).
    #[arg(long)]
    host: Option<IpAddr>,
    /// Port; 0 picks a free one (printed on start).
    #[arg(long)]
    port: Option<u16>,
    /// A folder of pipeline files (`*.toml`), served by name and watched; repeatable.
    #[arg(long = "pipelines", value_name = "DIR")]
    pipeline_dirs: Vec<PathBuf>,
    /// A folder of plugins (`NAME.wasm` + `NAME.toml`), watched; repeatable.
    #[arg(long = "plugins", value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    /// A GGUF model file for the default model.
    #[arg(long, value_name = "PATH.gguf")]
    model: Option<PathBuf>,
    /// The environment variable holding the API key clients must send (one tenant,
    /// `default`); without it and a keys file, `STAIRCASE_API_KEY` when set.
    #[arg(long, value_name = "VAR")]
    api_key_env: Option<String>,
    /// A TOML file of tenants and their API keys (README: Tenants); keys never go on the
    /// command line.
    #[arg(long, value_name = "FILE")]
    api_keys_file: Option<PathBuf>,
    /// The ceiling on every request's output tokens: plain models, every pipeline node,
    /// plugin calls (a request's own `max_tokens` can only lower it).
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Runs waiting for a slot before the server answers 429.
    #[arg(long)]
    queue: Option<usize>,
    /// Runs at once.
    #[arg(long)]
    max_running: Option<usize>,
    /// Seconds a run may take before it is ended with an error.
    #[arg(long, value_name = "SECS")]
    request_timeout: Option<u64>,
    /// Open connections at once; more wait to be accepted.
    #[arg(long)]
    max_connections: Option<usize>,
    /// A Host name a server without a key answers besides addresses and loopback names
    /// (DNS-rebinding protection); repeatable, `*` for any.
    #[arg(long = "allowed-host", value_name = "NAME")]
    allowed_hosts: Vec<String>,
    /// Listen on a non-loopback address without an API key (anyone who can reach it can
    /// use it).
    #[arg(long)]
    allow_unauthenticated: bool,
    /// Do not watch the plugin and pipeline folders (`POST /admin/reload` still rescans).
    #[arg(long)]
    no_watch: bool,
    /// A `staircase.toml`; the flags above override it.
    #[arg(long, value_name = "staircase.toml")]
    config: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut builder = super::run::open_app(
        args.config.as_deref(),
        args.model.as_deref(),
        &args.plugin_dirs,
    )?
    .pipeline_dirs(args.pipeline_dirs.iter().cloned());
    let config = builder.config_mut();
    let limits = &mut config.limits;
    limits.max_tokens = args.max_tokens.or(limits.max_tokens);
    limits.queue = args.queue.unwrap_or(limits.queue);
    limits.max_running = args.max_running.unwrap_or(limits.max_running);
    limits.request_timeout_secs = args.request_timeout.unwrap_or(limits.request_timeout_secs);
    limits.max_connections = args.max_connections.unwrap_or(limits.max_connections);
    let host = match args.host {
        Some(host) => host,
        None => config.server.host.parse().with_context(|| {
            format!(
                "[server] host `{}` is not an IP address",
                config.server.host
            )
        })?,
    };
    let addr = SocketAddr::new(host, args.port.unwrap_or(config.server.port));
    let tenants = tenants(&args, &config.server)?;
    if tenants.is_empty()
        && !host.is_loopback()
        && !(args.allow_unauthenticated || config.server.allow_unauthenticated)
    {
        anyhow::bail!(
            "refusing to listen on {host} without an API key: anyone who can reach it could \
             run models and reload plugins. Set one with --api-key-env VAR or --api-keys-file \
             FILE, or pass --allow-unauthenticated if that is what you mean"
        );
    }
    let mut allowed_hosts = config.server.allowed_hosts.clone();
    allowed_hosts.extend(args.allowed_hosts.iter().cloned());
    let options = ServeOptions {
        addr,
        tenants,
        limits: config.limits.clone(),
        watch: !args.no_watch,
        access: server::Access {
            allowed_hosts,
            metrics_require_key: config.server.metrics_require_key,
        },
    };
    let app = Arc::new(builder.build()?);
    super::runtime()?.block_on(server::serve(
        app.clone(),
        options,
        |addr| {
            println!("listening on http://{addr}");
        },
        shutdown_signal(),
    ))?;
    // A conversation's compression runs on a thread of its own, on the engines; exiting under
    // it would tear the model down beneath it.
    if !app.runner().history().wait_idle(SHUTDOWN_HISTORY_WAIT) {
        tracing::warn!("exiting with a conversation compression still running");
    }
    Ok(())
}

/// The tenants and their keys: from the keys file, plus one `default` tenant whose key is in
/// `--api-key-env`'s variable (or `STAIRCASE_API_KEY` when neither names one).
fn tenants(
    args: &Args,
    server: &crate::app::config::ServerConfig,
) -> anyhow::Result<Vec<TenantSpec>> {
    let mut tenants = match args
        .api_keys_file
        .as_ref()
        .or(server.api_keys_file.as_ref())
    {
        Some(path) => tenant::read_keys_file(path)?,
        None => Vec::new(),
    };
    match args.api_key_env.as_ref().or(server.api_key_env.as_ref()) {
        Some(var) => {
            let key = std::env::var(var)
                .with_context(|| format!("--api-key-env {var}: the variable is not set"))?;
            tenants.push(TenantSpec::new(tenant::DEFAULT_TENANT, key));
        }
        None if tenants.is_empty() => {
            if let Ok(key) = std::env::var(tenant::API_KEY_ENV) {
                tenants.push(TenantSpec::new(tenant::DEFAULT_TENANT, key));
            }
        }
        None => {}
    }
    Ok(tenants)
}

/// Resolves on Ctrl-C or SIGTERM (what `kill`, systemd and container runtimes send).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; Ctrl-C still stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down: draining connections");
}

/// The longest `serve` waits at shutdown for background compressions to finish.
const SHUTDOWN_HISTORY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
