//! What the xtask asks of the machine it runs on: programs on `PATH`, whether it may install
//! system packages, and running a tool to read its answer. Nothing here changes the machine.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The machine as the checks see it: the search path and the repository root.
pub struct Machine {
    /// The folders searched for programs, in order (the process's `PATH`, plus folders an
    /// installer put a tool in that `PATH` lacks).
    pub path: Vec<PathBuf>,
    /// The repository root (the folder holding `rust-toolchain.toml`).
    pub root: PathBuf,
    /// Whether this process may run `apt-get install` (it runs as root).
    pub root_user: bool,
}

impl Machine {
    /// This process's machine: its `PATH` and user, and the repository this xtask was built
    /// from (or `STAIRCASE_XTASK_ROOT`, which the xtask's own tests point at a scratch tree).
    pub fn current() -> Machine {
        let path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        let root = std::env::var_os("STAIRCASE_XTASK_ROOT")
            .filter(|r| !r.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
        // Commands run in the root, so nothing may be relative to where this started.
        let root = std::path::absolute(&root).unwrap_or(root);
        Machine {
            path,
            root,
            root_user: is_root(),
        }
    }

    /// The first executable called `name` on the search path.
    pub fn which(&self, name: &str) -> Option<PathBuf> {
        self.path
            .iter()
            .map(|dir| dir.join(name))
            .find(|candidate| is_executable(candidate))
            .map(|found| std::path::absolute(&found).unwrap_or(found))
    }

    /// Whether `apt-get install` can run here without asking anyone.
    pub fn can_apt(&self) -> bool {
        self.root_user && self.which("apt-get").is_some()
    }

    /// The search path as a `PATH` value, for the commands the xtask runs.
    pub fn path_var(&self) -> OsString {
        std::env::join_paths(&self.path).unwrap_or_default()
    }

    /// Runs `program args` in the repository root and returns its stdout when it succeeds.
    /// Used for quick questions (a version, a list of installed targets).
    pub fn ask(&self, program: &Path, args: &[&str]) -> Option<String> {
        let output = Command::new(program)
            .args(args)
            .current_dir(&self.root)
            .env("PATH", self.path_var())
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        path.is_file()
    }
}

#[cfg(unix)]
fn is_root() -> bool {
    // The C library is always linked on Unix; geteuid has no preconditions and cannot fail.
    unsafe extern "C" {
        safe fn geteuid() -> u32;
    }
    geteuid() == 0
}

#[cfg(not(unix))]
fn is_root() -> bool {
    false
}
