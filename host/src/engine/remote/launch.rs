//! Starting llama.cpp's `llama-server` on a loopback port, for the tests and `bench routing`:
//! the binary `.ci/llama-server.sh` builds (the same version key), one thread and a small
//! context per server so a few fit beside each other on a small machine. Killed on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The cache folder of the build `.ci/llama-server.sh` makes (its `CACHE_KEY`): the
/// llama-cpp-python release whose vendored llama.cpp it builds, and how.
pub const LLAMA_SERVER_VERSION: &str = "0.3.36-noamx";

/// Longest a server may take to load the model and listen on a busy small machine.
pub const START_LIMIT: Duration = Duration::from_secs(180);

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(
        "llama-server not found at {0}: build it with `bash .ci/llama-server.sh` (CI does), or \
         set STAIRCASE_LLAMA_SERVER"
    )]
    Missing(PathBuf),
    #[error("cannot start {path}: {error}")]
    Spawn {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("llama-server on port {port} did not start within {limit:?}: {last_line}")]
    NotReady {
        port: u16,
        limit: Duration,
        last_line: String,
    },
    #[error("no free loopback port: {0}")]
    Port(std::io::Error),
}

/// Where the cached build is: `STAIRCASE_LLAMA_SERVER`, else the user cache folder.
pub fn llama_server_path() -> Result<PathBuf, LaunchError> {
    if let Some(path) = std::env::var_os("STAIRCASE_LLAMA_SERVER") {
        return Ok(PathBuf::from(path));
    }
    let cache = std::env::var_os("STAIRCASE_CACHE")
        .map(PathBuf::from)
        .or_else(|| dirs::home_dir().map(|home| home.join(".cache/staircase")))
        .unwrap_or_else(|| PathBuf::from(".cache/staircase"));
    let path = cache
        .join("llama-server")
        .join(LLAMA_SERVER_VERSION)
        .join("bin/llama-server");
    if path.is_file() {
        Ok(path)
    } else {
        Err(LaunchError::Missing(path))
    }
}

/// How a server is started.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    pub threads: usize,
    /// Requests it runs at once; the context is split between them.
    pub slots: usize,
    /// Context of all slots together, in tokens.
    pub context_tokens: usize,
    /// llama.cpp's flash attention switch; `None` leaves the server's `auto`.
    pub flash_attention: Option<bool>,
    /// The key clients must send (`--api-key`); none, an open server.
    pub api_key: Option<String>,
}

impl Default for LaunchOptions {
    /// One thread (the machine is shared), two slots of 2048 tokens.
    fn default() -> Self {
        Self {
            threads: 1,
            slots: 2,
            context_tokens: 4096,
            flash_attention: None,
            api_key: None,
        }
    }
}

/// A running `llama-server`.
pub struct LlamaServer {
    child: Child,
    pub port: u16,
}

impl LlamaServer {
    /// Starts one on a free port with `model`, and waits until it listens (after loading).
    pub fn start(model: &Path) -> Result<Self, LaunchError> {
        Self::start_with(model, &LaunchOptions::default())
    }

    /// Starts one on a free port with `options`.
    pub fn start_with(model: &Path, options: &LaunchOptions) -> Result<Self, LaunchError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(LaunchError::Port)?
            .port();
        Self::launch(model, port, options)
    }

    /// Starts one on `port` (to bring a killed replica back at the same address).
    pub fn start_on(model: &Path, port: u16) -> Result<Self, LaunchError> {
        Self::launch(model, port, &LaunchOptions::default())
    }

    /// Starts one on `port` with `options`.
    pub fn start_on_with(
        model: &Path,
        port: u16,
        options: &LaunchOptions,
    ) -> Result<Self, LaunchError> {
        Self::launch(model, port, options)
    }

    fn launch(model: &Path, port: u16, options: &LaunchOptions) -> Result<Self, LaunchError> {
        let path = llama_server_path()?;
        let threads = options.threads.max(1).to_string();
        let mut command = Command::new(&path);
        command
            .arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-t", &threads, "-tb", &threads])
            .args(["-c", &options.context_tokens.to_string()])
            .args(["-np", &options.slots.max(1).to_string(), "--no-webui"]);
        if let Some(on) = options.flash_attention {
            command.args(["-fa", if on { "on" } else { "off" }]);
        }
        if let Some(key) = &options.api_key {
            command.args(["--api-key", key]);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| LaunchError::Spawn {
                path: path.clone(),
                error,
            })?;
        // Ready when it says it listens, which it does after the model loaded. Its log goes
        // on being read so the pipe never fills.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        if let Some(stderr) = child.stderr.take() {
            std::thread::spawn(move || {
                let mut last = String::new();
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("listening on") {
                        let _ = ready_tx.send(Ok(()));
                    }
                    last = line;
                }
                let _ = ready_tx.send(Err(last));
            });
        }
        match ready_rx.recv_timeout(START_LIMIT) {
            Ok(Ok(())) => Ok(Self { child, port }),
            outcome => {
                let _ = child.kill();
                let _ = child.wait();
                Err(LaunchError::NotReady {
                    port,
                    limit: START_LIMIT,
                    last_line: match outcome {
                        Ok(Err(line)) => line,
                        _ => "no output".into(),
                    },
                })
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills it at once (SIGKILL): in-flight requests see their connection drop.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.kill();
    }
}
