//! `staircase serve`: the OpenAI-compatible server on the host `staircase.toml` describes,
//! with the flags over it. Prints `listening on http://ADDR` once it accepts requests.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::builder::BoolishValueParser;

use crate::server::tenant::{self, TenantSpec};
use crate::server::{self, ServeOptions};

/// Arguments of `staircase serve`. Every flag falls back to an environment variable named
/// `STAIRCASE_` + the flag in capitals with `_` for `-` (`--max-tokens`: `STAIRCASE_MAX_TOKENS`;
/// lists comma-separated, switches `true`/`false`); a flag on the command line wins.
#[derive(Debug, clap::Args)]
#[command(after_help = ENVIRONMENT_RULE)]
pub struct Args {
    /// Address or host name to listen on (loopback unless you mean to expose the server); a
    /// name resolves through the system, its first IPv4 address first.
    #[arg(long, env = "STAIRCASE_HOST")]
    host: Option<String>,
    /// Port; 0 picks a free one (printed on start).
    #[arg(long, env = "STAIRCASE_PORT")]
    port: Option<u16>,
    /// A folder of pipeline files (`*.toml`), served by name and watched; repeatable.
    #[arg(
        long = "pipelines",
        value_name = "DIR",
        env = "STAIRCASE_PIPELINES",
        value_delimiter = ','
    )]
    pipeline_dirs: Vec<PathBuf>,
    /// A folder of plugins (`NAME.wasm` + `NAME.toml`), watched; repeatable.
    #[arg(
        long = "plugins",
        value_name = "DIR",
        env = "STAIRCASE_PLUGINS",
        value_delimiter = ','
    )]
    plugin_dirs: Vec<PathBuf>,
    /// A GGUF model file for the default model.
    #[arg(long, value_name = "PATH.gguf", env = "STAIRCASE_MODEL")]
    model: Option<PathBuf>,
    #[command(flatten)]
    engine: super::run::LocalEngineArgs,
    /// The API key clients must send (one tenant, `default`). Any local user can read a
    /// command line in `ps`: prefer the environment variable or --api-key-file.
    #[arg(
        long,
        value_name = "KEY",
        env = "STAIRCASE_API_KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// A file holding the API key clients must send (one tenant, `default`), as
    /// llama-server's; keep it `chmod 600`.
    #[arg(long, value_name = "FILE", env = "STAIRCASE_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// The environment variable holding the API key clients must send (one tenant,
    /// `default`).
    #[arg(long, value_name = "VAR", env = "STAIRCASE_API_KEY_ENV")]
    api_key_env: Option<String>,
    /// A TOML file of tenants and their API keys (README: Tenants); a single key above
    /// adds the tenant `default` to them.
    #[arg(long, value_name = "FILE", env = "STAIRCASE_API_KEYS_FILE")]
    api_keys_file: Option<PathBuf>,
    /// The ceiling on every request's output tokens: plain models, every pipeline node,
    /// plugin calls (a request's own `max_tokens` can only lower it).
    #[arg(long, env = "STAIRCASE_MAX_TOKENS")]
    max_tokens: Option<u32>,
    /// Runs waiting for a slot before the server answers 429.
    #[arg(long, env = "STAIRCASE_QUEUE")]
    queue: Option<usize>,
    /// Runs at once.
    #[arg(long, env = "STAIRCASE_MAX_RUNNING")]
    max_running: Option<usize>,
    /// Seconds a run may take before it is ended with an error.
    #[arg(long, value_name = "SECS", env = "STAIRCASE_REQUEST_TIMEOUT")]
    request_timeout: Option<u64>,
    /// Open connections at once; more wait to be accepted.
    #[arg(long, env = "STAIRCASE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// A Host name a server without a key answers besides addresses and loopback names
    /// (DNS-rebinding protection); repeatable, `*` for any.
    #[arg(
        long = "allowed-host",
        value_name = "NAME",
        env = "STAIRCASE_ALLOWED_HOST",
        value_delimiter = ','
    )]
    allowed_hosts: Vec<String>,
    /// Listen on a non-loopback address without an API key (anyone who can reach it can
    /// use it).
    #[arg(long, env = "STAIRCASE_ALLOW_UNAUTHENTICATED", value_parser = BoolishValueParser::new())]
    allow_unauthenticated: bool,
    /// Do not watch the plugin and pipeline folders (`POST /admin/reload` still rescans).
    #[arg(long, env = "STAIRCASE_NO_WATCH", value_parser = BoolishValueParser::new())]
    no_watch: bool,
    /// A `staircase.toml`; the flags above override it.
    #[arg(long, value_name = "staircase.toml", env = "STAIRCASE_CONFIG")]
    config: Option<PathBuf>,
}

/// How every flag's environment variable is named, shown under `serve --help`.
const ENVIRONMENT_RULE: &str = "Every flag falls back to the environment variable shown: \
STAIRCASE_ and the flag in capitals, `_` for `-` (lists comma-separated, switches true/false). \
A flag on the command line wins; both override staircase.toml.";

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut builder = args
        .engine
        .apply(super::run::open_app(
            args.config.as_deref(),
            args.model.as_deref(),
            &args.plugin_dirs,
        )?)
        .pipeline_dirs(args.pipeline_dirs.iter().cloned());
    let config = builder.config_mut();
    let limits = &mut config.limits;
    limits.max_tokens = args.max_tokens.or(limits.max_tokens);
    limits.queue = args.queue.unwrap_or(limits.queue);
    limits.max_running = args.max_running.unwrap_or(limits.max_running);
    limits.request_timeout_secs = args.request_timeout.unwrap_or(limits.request_timeout_secs);
    limits.max_connections = args.max_connections.unwrap_or(limits.max_connections);
    let host = args.host.as_deref().unwrap_or(&config.server.host);
    let addr = resolve_host(host, args.port.unwrap_or(config.server.port))?;
    let tenants = tenants(&args, &config.server)?;
    if tenants.is_empty()
        && !addr.ip().is_loopback()
        && !(args.allow_unauthenticated || config.server.allow_unauthenticated)
    {
        anyhow::bail!(
            "refusing to listen on {host} ({ip}) without an API key: anyone who can reach it \
             could run models and reload plugins. Set one with STAIRCASE_API_KEY, \
             --api-key-file FILE or --api-keys-file FILE, or pass --allow-unauthenticated if \
             that is what you mean",
            ip = addr.ip()
        );
    }
    let mut allowed_hosts = config.server.allowed_hosts.clone();
    allowed_hosts.extend(args.allowed_hosts.iter().cloned());
    // The name the operator listens on is one browsers will send as `Host`.
    if host_literal(host).parse::<IpAddr>().is_err() {
        allowed_hosts.push(host.to_string());
    }
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

/// `host` without the brackets of an IPv6 literal (`[::1]`).
fn host_literal(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// The address `--host` names: an IP address as given, a host name through the system's
/// resolver (`/etc/hosts`, DNS), its first IPv4 address first, since most clients try IPv4
/// (`localhost` is 127.0.0.1, not only `::1`).
fn resolve_host(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    let host = host_literal(host.trim());
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve the host name `{host}` to listen on"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .with_context(|| format!("the host name `{host}` resolves to no address"))
}

/// The tenants and their keys: the keys file's, plus one `default` tenant when a single key
/// is given. At most one single key source may be set; the command line (and its
/// environment variables) replaces `[server] api_key_env`.
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
    let sources: Vec<&str> = [
        args.api_key
            .as_ref()
            .map(|_| "--api-key (STAIRCASE_API_KEY)"),
        args.api_key_file
            .as_ref()
            .map(|_| "--api-key-file (STAIRCASE_API_KEY_FILE)"),
        args.api_key_env
            .as_ref()
            .map(|_| "--api-key-env (STAIRCASE_API_KEY_ENV)"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if let [first, second, ..] = sources[..] {
        anyhow::bail!(
            "{first} and {second} both give the `default` tenant's key; set one of them \
             (several tenants: --api-keys-file)"
        );
    }
    let from_var = |var: &str| {
        std::env::var(var).with_context(|| format!("--api-key-env {var}: the variable is not set"))
    };
    let key = if let Some(key) = &args.api_key {
        Some(key.clone())
    } else if let Some(path) = &args.api_key_file {
        Some(tenant::read_key_file(path)?)
    } else if let Some(var) = &args.api_key_env {
        Some(from_var(var)?)
    } else if server.api_key_file.is_some() && server.api_key_env.is_some() {
        anyhow::bail!(
            "[server] api_key_file and api_key_env both give the `default` tenant's key; keep one"
        );
    } else if let Some(path) = &server.api_key_file {
        Some(tenant::read_key_file(path)?)
    } else if let Some(var) = &server.api_key_env {
        Some(from_var(var)?)
    } else {
        None
    };
    if let Some(key) = key {
        tenants.push(TenantSpec::new(tenant::DEFAULT_TENANT, key));
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[test]
    fn host_names_resolve_and_loopback_stays_loopback() {
        let addr = resolve_host("localhost", 8080).unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
        assert!(addr.is_ipv4(), "IPv4 first: {addr}");
        assert_eq!(addr.port(), 8080);
        assert_eq!(
            resolve_host("127.0.0.1", 1).unwrap(),
            "127.0.0.1:1".parse().unwrap()
        );
        assert_eq!(
            resolve_host("[::1]", 2).unwrap(),
            "[::1]:2".parse().unwrap()
        );
        assert_eq!(resolve_host("::1", 2).unwrap(), "[::1]:2".parse().unwrap());
        let open = resolve_host("0.0.0.0", 3).unwrap();
        assert!(!open.ip().is_loopback());
        // `.invalid` never resolves (RFC 6761).
        let error = resolve_host("no-such-host.invalid", 4).unwrap_err();
        assert!(
            format!("{error:#}").contains("no-such-host.invalid"),
            "{error:#}"
        );
    }

    #[test]
    fn every_serve_flag_has_its_environment_variable() {
        let cli = crate::cli::Cli::command();
        let serve = cli.find_subcommand("serve").expect("serve is a subcommand");
        let mut checked = 0;
        for arg in serve.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let expected = format!("STAIRCASE_{}", long.to_uppercase().replace('-', "_"));
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(expected.as_str()),
                "--{long}"
            );
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} flags seen");
    }

    fn parse(argv: &[&str]) -> Args {
        let cli =
            crate::cli::Cli::try_parse_from(["staircase", "serve"].iter().chain(argv).copied())
                .unwrap();
        match cli.command {
            crate::cli::Command::Serve(args) => args,
            _ => unreachable!("parsed as serve"),
        }
    }

    #[test]
    fn two_single_keys_are_refused_naming_both() {
        let args = parse(&["--api-key", "k1", "--api-key-env", "SOME_VAR"]);
        let error = tenants(&args, &Default::default()).unwrap_err().to_string();
        assert!(
            error.contains("--api-key (") && error.contains("--api-key-env"),
            "{error}"
        );
        let args = parse(&["--api-key", "k1"]);
        let specs = tenants(&args, &Default::default()).unwrap();
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].name, tenant::DEFAULT_TENANT);
        assert_eq!(specs[0].key, "k1");
    }

    #[test]
    fn the_config_may_name_a_key_file_and_a_flag_goes_over_it() {
        let dir = std::env::temp_dir().join(format!("staircase-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("api-key");
        std::fs::write(&file, "from-config\n").unwrap();
        let server = crate::app::config::ServerConfig {
            api_key_file: Some(file),
            ..Default::default()
        };
        let specs = tenants(&parse(&[]), &server).unwrap();
        assert_eq!(specs[0].key, "from-config");
        let specs = tenants(&parse(&["--api-key", "k1"]), &server).unwrap();
        assert_eq!((specs.len(), specs[0].key.as_str()), (1, "k1"));
        let both = crate::app::config::ServerConfig {
            api_key_env: Some("SOME_VAR".into()),
            ..server
        };
        let error = tenants(&parse(&[]), &both).unwrap_err().to_string();
        assert!(error.contains("api_key_file and api_key_env"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
