//! What the server tests share: a `staircase serve` started on a loopback port and killed
//! when its handle drops, and scratch folders. Included by every `serve*.rs` test file as a
//! module (`mod serve_support;`); it holds no test of its own, and not every file uses every
//! helper.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

/// Kills the server when dropped, so a failing assertion never leaves it running.
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh scratch folder for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("staircase-serve-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("scratch paths are UTF-8")
}

/// The Python to run a client script with (`$PYTHON`, else python3), which must have `module`.
pub fn python_with(module: &str) -> String {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .status()
        .expect("python3 runs (the server tests need it)");
    assert!(
        probe.success(),
        "the Python package of `{module}` is missing: cargo xtask test installs it (pinned)"
    );
    python
}

/// Starts the server `command` describes and reads its address from its first line.
pub fn start_server(command: &mut Command) -> (Server, String) {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .expect("the staircase binary starts");
    let stdout = child.stdout.take().expect("stdout is piped");
    let server = Server(child);
    (server, read_address(stdout))
}

/// The server's address from its first line of `stdout`; the rest is drained, so the
/// server never writes into a closed pipe.
pub fn read_address(stdout: ChildStdout) -> String {
    let mut stdout = BufReader::new(stdout);
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("the server prints its address");
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    line.trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line from the server: {line:?}"))
        .to_string()
}

/// Installs the guest component `artifact` in the plugin folder `dir` as `name`, with
/// `manifest`: the manifest first, then the component under a temporary name the watcher
/// ignores and a rename, so a watching server never sees half a file.
pub fn install_plugin(dir: &Path, name: &str, artifact: &str, manifest: &str) {
    std::fs::write(dir.join(format!("{name}.toml")), manifest).unwrap();
    let tmp = dir.join(format!("{name}.partial"));
    std::fs::copy(staircase::plugin::builtin::guest_artifact(artifact), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{name}.wasm"))).unwrap();
}

/// `staircase serve` on a free loopback port with `args` after it.
pub fn serve(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_staircase"));
    command
        .args(["serve", "--host", "127.0.0.1", "--port", "0", "--no-watch"])
        .args(args);
    command
}

/// Runs the Python client script `tests/serve/NAME` with `python` against the server at
/// `base`: its exit status, or `None` (after killing it) when it outlives `limit`.
pub fn run_client_script(
    python: &str,
    name: &str,
    base: &str,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/serve")
        .join(name);
    let mut client = Command::new(python)
        .arg(script)
        .args(["--base-url", base])
        .spawn()
        .expect("the client script starts");
    wait_bounded(&mut client, limit)
}

/// The child's exit status, or `None` (after killing it) when it outlives `limit`.
pub fn wait_bounded(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
