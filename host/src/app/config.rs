//! `staircase.toml`: what the composition root builds. Every field has a default, so an
//! absent file means "the default model, the built-in pipelines and plugins". Relative paths
//! are relative to the file's folder. The CLI flags override these values (see
//! [`super::AppBuilder`]).
//!
//! ```toml
//! default_model = "default"          # the model pipelines call `default`
//! [models.default]
//! kind = "local"                     # the embedded engine; `path` defaults to the default model
//! path = "models/other.gguf"
//! threads = 1
//! [models.coder]
//! kind = "local"
//! catalogue = "qwen2.5-coder-1.5b"   # a `staircase model pull` name instead of a path
//! [pipelines]
//! dirs = ["pipelines"]               # watched by `staircase serve`
//! [plugins]
//! dirs = ["plugins"]
//! user_dir = true                    # also the user's plugin folder
//! [grants]
//! my-compressor = ["model"]          # capabilities granted per plugin name
//! [limits]
//! max_running = 8                    # runs at once; more wait in the queue
//! queue = 32                         # runs waiting; past it the server answers 429
//! request_timeout_secs = 300
//! max_body_bytes = 1048576
//! recent_runs = 32                   # traces kept for /v1/runs/{id}/trace
//! max_tokens = 1024                  # ceiling on every request's output (default: none)
//! max_connections = 256              # open connections; more wait to be accepted
//! header_timeout_secs = 10           # request headers, and a kept-alive connection's idle wait
//! body_timeout_secs = 30             # a request body
//! shutdown_grace_secs = 10           # shutdown drains this long, then cuts
//! stream_write_timeout_secs = 30     # a streaming client that stops reading is cancelled
//! send_buffer_bytes = 65536          # each connection's kernel send buffer (default: the kernel's)
//! max_messages = 256                 # messages per request
//! max_stop = 4                       # stop strings per request
//! [server]
//! host = "127.0.0.1"
//! port = 8080
//! api_key_env = "STAIRCASE_API_KEY"
//! api_key_file = "api-key"           # or: the key alone in a file (llama-server's --api-key-file)
//! api_keys_file = "keys.toml"        # several tenants, one key each (README: Tenants)
//! allowed_hosts = ["box.lan"]        # Host names a key-less server answers, beyond loopback
//! metrics_require_key = false        # /metrics asks for the key too
//! allow_unauthenticated = false      # let a key-less server bind a non-loopback address
//! [[guards]]                         # output guards on every answer (README: Output guards)
//! plugin = "pattern-guard"
//! models = ["default"]               # only these served models and pipelines (default: all)
//! fail_open = false                  # a failing guard stops its stream (default)
//! config = { kinds = "email,card" }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::plugin::Capability;

/// The name of the model pipelines bind to when a node names none.
pub use crate::pipeline::spec::DEFAULT_MODEL;

/// Why `staircase.toml` cannot be used; the message names the file and, for syntax and
/// unknown fields or kinds, the line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: [models.{name}]: {reason}")]
    Model {
        path: PathBuf,
        name: String,
        reason: String,
    },
    #[error("{path}: `default_model = \"{name}\"` names no model of [models] (known: {known})")]
    UnknownDefault {
        path: PathBuf,
        name: String,
        known: String,
    },
}

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Which model of `models` pipelines call `default`; the only one when there is one.
    pub default_model: Option<String>,
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
    #[serde(default)]
    pub pipelines: PipelinesConfig,
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// Capabilities granted per plugin name (a plugin asking for one it was not granted is
    /// refused at load).
    #[serde(default)]
    pub grants: BTreeMap<String, BTreeSet<Capability>>,
    #[serde(default)]
    pub limits: Limits,
    /// Plugin sandbox maxima and per-run bounds; unset keys keep the host's defaults.
    #[serde(default)]
    pub sandbox: SandboxConfig,
    #[serde(default)]
    pub server: ServerConfig,
    /// Output guards on the server's answers (`[[guards]]`, each optionally limited to some
    /// served `models`), after a pipeline's own.
    #[serde(default)]
    pub guards: Vec<crate::guard::GuardSpec>,
}

/// One named model. `kind` selects the backend (`local` or `remote`); any other kind is a
/// configuration error naming the line.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ModelConfig {
    /// The embedded engine on a GGUF file.
    Local {
        /// The GGUF; the default model (fetched on first use) when absent.
        path: Option<PathBuf>,
        /// A catalogue model (`staircase model list`) instead of a path, pulled on first use.
        catalogue: Option<String>,
        /// llama.cpp threads; the engine's own choice when absent.
        threads: Option<usize>,
        /// Context size in tokens; the engine's default when absent.
        context_tokens: Option<u32>,
    },
    /// One or more OpenAI-compatible servers (vLLM, SGLang, llama.cpp's `llama-server`, another
    /// Staircase) behind the routing policy of [`crate::engine::remote::RemoteConfig`].
    Remote(Box<crate::engine::remote::RemoteConfig>),
}

/// Pipeline folders: every `*.toml` in them is a pipeline, served by its name.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelinesConfig {
    #[serde(default)]
    pub dirs: Vec<PathBuf>,
}

/// Plugin folders: `NAME.wasm` with `NAME.toml` beside it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    #[serde(default)]
    pub dirs: Vec<PathBuf>,
    /// Also load the user's plugin folder (`~/.local/share/staircase/plugins`) when it exists.
    #[serde(default = "yes")]
    pub user_dir: bool,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            dirs: Vec::new(),
            user_dir: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// Runs admitted at once by the server: the engine batches them; more only lengthen each
/// one's wait for a step.
pub const DEFAULT_MAX_RUNNING: usize = 8;
/// Runs waiting for a slot before the server answers 429: a few seconds of work on a small
/// CPU, so a client is told to come back rather than left waiting minutes.
pub const DEFAULT_QUEUE: usize = 32;
/// A run that takes longer is ended with an error: long answers on a CPU take minutes, but
/// never this long unless something is stuck.
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 300;
/// Request bodies above this are refused (413): a long conversation is far smaller.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;
/// Finished runs whose traces the server keeps; older ones are dropped.
pub const DEFAULT_RECENT_RUNS: usize = 32;
/// Open connections at once; more wait in the kernel's accept queue until one closes. Far
/// above the runs a CPU server can serve at once (`max_running` + `queue`), so a client is
/// refused by the queue's 429, not left unaccepted, while idle or slow sockets cannot hold
/// the process's file descriptors.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// A connection has this long to send a request's line and headers, and a kept-alive one
/// this long to start its next request: a real client sends its headers in one packet, so
/// this only ends sockets that send nothing or trickle.
pub const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 10;
/// A request body (at most `max_body_bytes`) must arrive within this: a megabyte takes well
/// under a second on any link a client of this server uses.
pub const DEFAULT_BODY_TIMEOUT_SECS: u64 = 30;
/// At shutdown, runs in flight get this long to finish; then their connections are cut.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 10;
/// A streaming client that takes no more of the answer for this long is cancelled and its
/// run dropped (its engine slot freed): longer than any pause of a client that is reading.
pub const DEFAULT_STREAM_WRITE_TIMEOUT_SECS: u64 = 30;
/// Messages in one request: a long conversation is a few dozen; more is a mistake or an
/// attempt to make the server tokenize and template a flood.
pub const DEFAULT_MAX_MESSAGES: usize = 256;
/// Stop strings in one request, OpenAI's own limit (each is matched on every token).
pub const DEFAULT_MAX_STOP: usize = 4;

/// Server limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_running: usize,
    pub queue: usize,
    pub request_timeout_secs: u64,
    pub max_body_bytes: usize,
    pub recent_runs: usize,
    /// The ceiling on every request's output: plain models, every pipeline node, what
    /// plugins ask for; a request's own `max_tokens` can only lower it.
    pub max_tokens: Option<u32>,
    // Per-tenant shares (`server::tenant`); a keys file can set the first two per tenant.
    /// Requests of one tenant running or queued at once; `None`: half of `max_running +
    /// queue` ([`tenant_max_requests`]).
    pub tenant_max_requests: Option<usize>,
    /// Tokens (prompt + completion) one tenant may spend per minute; `None`: no budget.
    pub tenant_tokens_per_minute: Option<u64>,
    /// Live subscribers of one run's events (`/v1/runs/{id}/events`).
    pub run_subscribers: usize,
    /// Live run-event subscribers of one tenant, over all its runs.
    pub tenant_subscribers: usize,
    pub max_connections: usize,
    pub header_timeout_secs: u64,
    pub body_timeout_secs: u64,
    pub shutdown_grace_secs: u64,
    pub stream_write_timeout_secs: u64,
    /// Each connection's kernel send buffer; `None`: the kernel's, autotuned (up to
    /// `net.ipv4.tcp_wmem`'s maximum, 4 MiB on Linux by default).
    pub send_buffer_bytes: Option<usize>,
    pub max_messages: usize,
    pub max_stop: usize,
}

/// Run-event subscribers per run: the live page and a few tools watching one run.
pub const DEFAULT_RUN_SUBSCRIBERS: usize = 8;
/// Run-event subscribers per tenant: a few runs watched at once by a few tools.
pub const DEFAULT_TENANT_SUBSCRIBERS: usize = 32;
/// A tenant's default share of the queue is `1 / TENANT_SHARE_DIVISOR` of it: with two
/// tenants or more, none can take the whole queue.
pub const TENANT_SHARE_DIVISOR: usize = 2;

impl Limits {
    /// Requests of one tenant running or queued at once, unless its keys-file entry says.
    pub fn tenant_max_requests(&self) -> usize {
        self.tenant_max_requests
            .unwrap_or((self.max_running.max(1) + self.queue) / TENANT_SHARE_DIVISOR)
            .max(1)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_running: DEFAULT_MAX_RUNNING,
            queue: DEFAULT_QUEUE,
            request_timeout_secs: DEFAULT_REQUEST_TIMEOUT_SECS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            recent_runs: DEFAULT_RECENT_RUNS,
            max_tokens: None,
            tenant_max_requests: None,
            tenant_tokens_per_minute: None,
            run_subscribers: DEFAULT_RUN_SUBSCRIBERS,
            tenant_subscribers: DEFAULT_TENANT_SUBSCRIBERS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout_secs: DEFAULT_HEADER_TIMEOUT_SECS,
            body_timeout_secs: DEFAULT_BODY_TIMEOUT_SECS,
            shutdown_grace_secs: DEFAULT_SHUTDOWN_GRACE_SECS,
            stream_write_timeout_secs: DEFAULT_STREAM_WRITE_TIMEOUT_SECS,
            send_buffer_bytes: None,
            max_messages: DEFAULT_MAX_MESSAGES,
            max_stop: DEFAULT_MAX_STOP,
        }
    }
}

/// The `[sandbox]` table: the plugin host's maxima ([`crate::plugin::HostConfig`]) and the
/// bounds of every run ([`crate::pipeline::RunLimits`]). Each key left out keeps its default
/// (docs/plugins.md, "Sandbox limits", lists them).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    pub max_memory_mib: Option<u32>,
    pub max_call_ms: Option<u32>,
    pub max_output_bytes: Option<usize>,
    pub max_messages: Option<usize>,
    pub max_stdio_bytes_per_call: Option<u64>,
    pub max_component_bytes: Option<usize>,
    pub max_model_tokens: Option<u32>,
    /// Built-in plugin names a user plugin may take over.
    #[serde(default)]
    pub overrides: BTreeSet<String>,
    /// Built-in pipeline names a pipeline file may take over.
    #[serde(default)]
    pub pipeline_overrides: BTreeSet<String>,
    pub run_plugin_time_ms: Option<u64>,
    pub run_steps_per_node: Option<u32>,
    pub run_idle_steps: Option<u32>,
    /// Policy calls running at once, on threads of their own (`pipeline::GuestPool`).
    pub guest_threads: Option<usize>,
    /// History compressions running at once, in the background.
    pub compression_threads: Option<usize>,
}

impl SandboxConfig {
    /// `host` with this table's keys set over it.
    pub fn apply_to_host(&self, host: &mut crate::plugin::HostConfig) {
        if let Some(v) = self.max_memory_mib {
            host.max_memory_mib = v;
        }
        if let Some(v) = self.max_call_ms {
            host.max_call_ms = v;
        }
        if let Some(v) = self.max_output_bytes {
            host.max_output_bytes = v;
        }
        if let Some(v) = self.max_messages {
            host.max_messages = v;
        }
        if let Some(v) = self.max_stdio_bytes_per_call {
            host.max_stdio_bytes_per_call = v;
        }
        if let Some(v) = self.max_component_bytes {
            host.max_component_bytes = v;
        }
        if let Some(v) = self.max_model_tokens {
            host.max_model_tokens = v;
        }
        host.overrides.extend(self.overrides.iter().cloned());
    }

    /// The pool every policy call runs on: `guest_threads` or its default.
    pub fn guest_pool(&self) -> crate::pipeline::GuestPool {
        crate::pipeline::GuestPool::new(
            self.guest_threads
                .unwrap_or(crate::pipeline::DEFAULT_GUEST_THREADS),
        )
    }

    /// History compressions at once: `compression_threads` or its default.
    pub fn compression_threads(&self) -> usize {
        self.compression_threads
            .unwrap_or(crate::pipeline::history::DEFAULT_COMPRESSION_THREADS)
    }

    /// The per-run bounds: the defaults with this table's keys set over them.
    pub fn run_limits(&self) -> crate::pipeline::RunLimits {
        let mut limits = crate::pipeline::RunLimits::default();
        if let Some(ms) = self.run_plugin_time_ms {
            limits.plugin_time = std::time::Duration::from_millis(ms);
        }
        if let Some(v) = self.run_steps_per_node {
            limits.steps_per_node = v;
        }
        if let Some(v) = self.run_idle_steps {
            limits.idle_steps = v;
        }
        limits
    }
}

/// Where `staircase serve` listens; loopback unless the operator says otherwise.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// The environment variable holding the API key; no key, no check.
    pub api_key_env: Option<String>,
    /// A TOML file of tenants and their keys (`server::tenant` describes it).
    pub api_keys_file: Option<PathBuf>,
    /// A file holding the `default` tenant's key alone (as `--api-key-file`).
    pub api_key_file: Option<PathBuf>,
    /// Host names (or addresses) a server without a key answers besides loopback names and
    /// the address it is bound to; `"*"` answers any (DNS rebinding protection off).
    pub allowed_hosts: Vec<String>,
    /// `/metrics` asks for the key too (off: scrapers usually have none).
    pub metrics_require_key: bool,
    /// Lets a server without a key listen on a non-loopback address.
    pub allow_unauthenticated: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key_env: None,
            api_keys_file: None,
            api_key_file: None,
            allowed_hosts: Vec::new(),
            metrics_require_key: false,
            allow_unauthenticated: false,
        }
    }
}

impl Config {
    /// Reads and checks a file; relative paths become relative to its folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        let mut config = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        config.pipelines.dirs.iter_mut().for_each(resolve);
        config.plugins.dirs.iter_mut().for_each(resolve);
        config.server.api_keys_file.iter_mut().for_each(resolve);
        config.server.api_key_file.iter_mut().for_each(resolve);
        for model in config.models.values_mut() {
            if let ModelConfig::Local { path: Some(p), .. } = model {
                resolve(p);
            }
        }
        Ok(config)
    }

    /// Parses file text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            line: e.span().map_or(1, |s| {
                text[..s.start.min(text.len())].lines().count().max(1)
            }),
            message: e.message().to_string(),
        })?;
        for (name, model) in &config.models {
            let ModelConfig::Local {
                path: file,
                catalogue: Some(catalogue),
                ..
            } = model
            else {
                continue;
            };
            let reason = if file.is_some() {
                "`path` and `catalogue` both name the model; keep one".to_string()
            } else if let Err(error) = crate::model::find(catalogue) {
                error.to_string()
            } else {
                continue;
            };
            return Err(ConfigError::Model {
                path: path.to_path_buf(),
                name: name.clone(),
                reason,
            });
        }
        if let Some(name) = &config.default_model
            && !config.models.contains_key(name)
        {
            return Err(ConfigError::UnknownDefault {
                path: path.to_path_buf(),
                name: name.clone(),
                known: config.models.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        }
        Ok(config)
    }

    /// The model pipelines call `default`: the named one, else the one called `default`,
    /// else the only one.
    pub fn default_model_name(&self) -> Option<&str> {
        if let Some(name) = &self.default_model {
            return Some(name);
        }
        if self.models.contains_key(DEFAULT_MODEL) {
            return Some(DEFAULT_MODEL);
        }
        match self.models.len() {
            1 => self.models.keys().next().map(String::as_str),
            _ => None,
        }
    }

    /// The table's name for catalogue model `catalogue`: an entry that already names it, else
    /// a new local entry called `catalogue`. Which model pipelines call `default` stays as it
    /// was (an empty table gets its implicit `default` entry first).
    pub fn add_catalogue_model(&mut self, catalogue: &str) -> String {
        let existing = self.models.iter().find_map(|(name, model)| match model {
            ModelConfig::Local {
                catalogue: Some(c), ..
            } if c == catalogue => Some(name.clone()),
            _ => None,
        });
        if let Some(name) = existing {
            return name;
        }
        let local = |catalogue: Option<String>| ModelConfig::Local {
            path: None,
            catalogue,
            threads: None,
            context_tokens: None,
        };
        if self.models.is_empty() {
            self.models.insert(DEFAULT_MODEL.to_string(), local(None));
        }
        if self.default_model.is_none() {
            self.default_model = self
                .default_model_name()
                .or_else(|| self.models.keys().next().map(String::as_str))
                .map(str::to_string);
        }
        self.models
            .insert(catalogue.to_string(), local(Some(catalogue.to_string())));
        catalogue.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_catalogue_model_added_for_a_job_leaves_the_default_where_it_was() {
        let mut empty = Config::parse("", Path::new("staircase.toml")).unwrap();
        assert_eq!(
            empty.add_catalogue_model("qwen2.5-coder-1.5b"),
            "qwen2.5-coder-1.5b"
        );
        assert_eq!(empty.default_model_name(), Some(DEFAULT_MODEL));
        assert_eq!(empty.models.len(), 2);
        // "a" sorts before the new name and would become the first key; it stays the default.
        let mut two = Config::parse(
            "[models.a]\nkind = \"local\"\n[models.z]\nkind = \"local\"\n",
            Path::new("staircase.toml"),
        )
        .unwrap();
        two.add_catalogue_model("qwen2.5-coder-0.5b");
        assert_eq!(two.default_model_name(), Some("a"));
        // An entry that already names the catalogue model is reused, not loaded twice.
        let mut named = Config::parse(
            "[models.big]\nkind = \"local\"\ncatalogue = \"qwen2.5-coder-1.5b\"\n",
            Path::new("staircase.toml"),
        )
        .unwrap();
        assert_eq!(named.add_catalogue_model("qwen2.5-coder-1.5b"), "big");
        assert_eq!(named.models.len(), 1);
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        let config = Config::parse("", Path::new("staircase.toml")).unwrap();
        assert!(config.models.is_empty());
        assert_eq!(config.server.host, "127.0.0.1");
        assert_eq!(config.limits.queue, DEFAULT_QUEUE);
        assert!(config.plugins.user_dir);
    }

    #[test]
    fn models_grants_and_limits_parse() {
        let text = r#"
            default_model = "big"
            [models.big]
            kind = "local"
            path = "/m/big.gguf"
            [models.small]
            kind = "local"
            [grants]
            summariser = ["model"]
            [limits]
            queue = 2
        "#;
        let config = Config::parse(text, Path::new("s.toml")).unwrap();
        assert_eq!(config.default_model_name(), Some("big"));
        assert_eq!(config.models.len(), 2);
        assert!(config.grants["summariser"].contains(&Capability::Model));
        assert_eq!(config.limits.queue, 2);
        assert_eq!(config.limits.max_running, DEFAULT_MAX_RUNNING);
    }

    #[test]
    fn an_unknown_model_kind_is_an_error_naming_the_line() {
        let text = "[models.far]\nkind = \"cloud\"\nurl = \"http://127.0.0.1:1\"\n";
        let error = Config::parse(text, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("s.toml:2:"), "{error}");
        assert!(error.contains("cloud"), "{error}");
        assert!(error.contains("local"), "{error}");
        assert!(error.contains("remote"), "{error}");
    }

    #[test]
    fn a_remote_model_parses_with_its_replicas_and_refuses_unknown_fields() {
        let text = "[models.large]\nkind = \"remote\"\nmodel = \"m\"\nreplicas = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\"]\n";
        let config = Config::parse(text, Path::new("s.toml")).unwrap();
        let ModelConfig::Remote(remote) = &config.models["large"] else {
            panic!("a remote model: {:?}", config.models["large"]);
        };
        assert_eq!(remote.model, "m");
        assert_eq!(remote.urls().len(), 2);
        let text =
            "[models.large]\nkind = \"remote\"\nmodel = \"m\"\nurl = \"http://127.0.0.1:1\"\n";
        let error = Config::parse(text, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("url"), "{error}");
    }

    #[test]
    fn the_sandbox_table_sets_host_maxima_and_run_bounds_and_keeps_the_rest() {
        let text =
            "[sandbox]\nmax_call_ms = 500\noverrides = [\"proposer\"]\nrun_steps_per_node = 7\n";
        let config = Config::parse(text, Path::new("s.toml")).unwrap();
        let mut host = crate::plugin::HostConfig::default();
        config.sandbox.apply_to_host(&mut host);
        assert_eq!(host.max_call_ms, 500);
        assert!(host.overrides.contains("proposer"));
        let defaults = crate::plugin::HostConfig::default();
        assert_eq!(host.max_memory_mib, defaults.max_memory_mib);
        let limits = config.sandbox.run_limits();
        assert_eq!(limits.steps_per_node, 7);
        assert_eq!(
            limits.idle_steps,
            crate::pipeline::RunLimits::default().idle_steps
        );
        let error = Config::parse("[sandbox]\nmax_cal_ms = 1\n", Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("max_cal_ms"), "{error}");
    }

    #[test]
    fn a_default_model_that_is_not_in_the_table_is_an_error() {
        let text = "default_model = \"x\"\n[models.y]\nkind = \"local\"\n";
        let error = Config::parse(text, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("known: y"), "{error}");
    }

    #[test]
    fn a_local_model_may_name_a_catalogue_model_but_not_an_unknown_one_or_a_path_too() {
        let parse = |body: &str| {
            Config::parse(
                &format!("[models.coder]\nkind = \"local\"\n{body}"),
                Path::new("s.toml"),
            )
        };
        let config = parse("catalogue = \"qwen2.5-coder-1.5b\"\n").unwrap();
        assert!(matches!(
            &config.models["coder"],
            ModelConfig::Local { catalogue: Some(c), .. } if c == "qwen2.5-coder-1.5b"
        ));
        let unknown = parse("catalogue = \"gpt-9\"\n").unwrap_err().to_string();
        assert!(
            unknown.contains("[models.coder]") && unknown.contains("qwen2.5-coder-0.5b"),
            "{unknown}"
        );
        let both = parse("catalogue = \"qwen2.5-coder-1.5b\"\npath = \"m.gguf\"\n")
            .unwrap_err()
            .to_string();
        assert!(both.contains("keep one"), "{both}");
    }
}
