//! What Staircase needs before cargo can build and test it, how to tell whether this machine
//! has it, and the command that gets it. Checking only looks at files and asks tools for a
//! version or a list (well under a second); it never installs: `main` runs the steps.

use std::path::{Path, PathBuf};

use crate::machine::Machine;

/// The pinned componentize-py: this version makes components wasmtime 48 accepts.
pub const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
/// The pinned official OpenAI client: the server tests drive `staircase serve` with it.
pub const OPENAI_CLIENT: &str = "openai==3.51.0";
const OPENAI_CLIENT_VERSION: &str = "3.51.0";
/// The pinned Playwright: the browser test of the live view drives the system Chromium with
/// it (never `playwright install`: it downloads a browser build of its own).
pub const PLAYWRIGHT: &str = "playwright==1.63.0";
const PLAYWRIGHT_VERSION: &str = "1.63.0";
/// Builds llama.cpp's `llama-server` for the remote-backend tests into a versioned cache
/// (does nothing when it is there); its `VERSION=` line names the cache folder.
const LLAMA_SERVER_SCRIPT: &str = ".ci/llama-server.sh";
const COMPONENTIZE_PY_VERSION: &str = "0.25.1";
/// The Rust target the built-in plugins compile to.
pub const WASM_TARGET: &str = "wasm32-wasip2";
/// The JavaScript example, relative to the repository root.
const JS_EXAMPLE: &str = "examples/plugins/js";
/// The Debian/Ubuntu packages behind llama.cpp's build: `libclang1-14` is the library
/// bindgen loads, `libclang-common-14-dev` holds the compiler headers it parses with.
const LIBCLANG_PACKAGES: [&str; 2] = ["libclang1-14", "libclang-common-14-dev"];

/// What a command needs: building the host, or also running the whole test suite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Build,
    Test,
}

/// One command an install runs.
pub struct Step {
    /// Looked up on the search path when the step runs: an earlier step may install it.
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(&'static str, &'static str)>,
}

impl Step {
    fn new(program: &str, args: &[&str]) -> Step {
        Step {
            program: program.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: Vec::new(),
        }
    }
}

/// One thing this machine lacks.
pub struct Missing {
    /// What is missing and what needs it.
    pub what: String,
    /// The command a person runs to get it.
    pub fix: String,
    /// What the xtask runs to get it, or why it cannot (`Err`).
    pub steps: Result<Vec<Step>, String>,
}

/// The outcome of a check.
pub struct Check {
    pub missing: Vec<Missing>,
    /// Folders holding a needed tool that the search path lacks (an installer's `bin`).
    pub path_additions: Vec<PathBuf>,
}

/// Checks everything `scope` needs.
pub fn check(machine: &Machine, scope: Scope) -> Check {
    let mut plan = Plan {
        machine,
        apt: Vec::new(),
        missing: Vec::new(),
        path_additions: Vec::new(),
    };
    plan.build_tools();
    plan.wasm_target();
    if scope == Scope::Test {
        plan.componentize_py();
        plan.js_example();
        plan.openai_client();
        plan.browser();
        plan.llama_server();
    }
    plan.finish()
}

/// Checks in progress. System packages are collected first and installed in one `apt-get`
/// run ahead of every other step, since later steps may use what it installs (npm, pipx).
struct Plan<'a> {
    machine: &'a Machine,
    /// Debian/Ubuntu packages to install, each with what it provides and for what.
    apt: Vec<(&'static str, &'static str)>,
    missing: Vec<Missing>,
    path_additions: Vec<PathBuf>,
}

impl Plan<'_> {
    fn apt(&mut self, packages: &[&'static str], what: &'static str) {
        for package in packages {
            self.apt.push((package, what));
        }
    }

    /// `apt-get install` as a person would type it here.
    fn apt_command(&self, packages: &[&str]) -> String {
        let sudo = if self.machine.root_user { "" } else { "sudo " };
        format!("{sudo}apt-get install -y {}", packages.join(" "))
    }

    /// cmake, a C++ compiler, make and libclang: what llama-cpp-sys-2's build script uses.
    fn build_tools(&mut self) {
        let m = self.machine;
        if m.which("cmake").is_none() {
            self.apt(&["cmake"], "cmake (llama.cpp's build)");
        }
        if ["c++", "g++", "clang++"]
            .iter()
            .all(|c| m.which(c).is_none())
        {
            self.apt(&["g++"], "a C++ compiler (llama.cpp's build)");
        }
        // cmake's default generator on Unix is Makefiles.
        if std::env::var_os("CMAKE_GENERATOR").is_none() && m.which("make").is_none() {
            self.apt(&["make"], "make (llama.cpp's build)");
        }
        match libclang(m) {
            Libclang::Found => {}
            Libclang::NoHeaders => self.apt(
                &[LIBCLANG_PACKAGES[1]],
                "clang's headers (llama.cpp's bindings, through bindgen)",
            ),
            Libclang::Missing => self.apt(
                &LIBCLANG_PACKAGES,
                "libclang (llama.cpp's bindings, through bindgen)",
            ),
        }
    }

    fn wasm_target(&mut self) {
        let what = format!("the Rust target {WASM_TARGET} (the built-in plugins compile to it)");
        let fix = format!("rustup target add {WASM_TARGET}");
        let m = self.machine;
        let steps = if let Some(rustup) = m.which("rustup") {
            // Asked in the repository root, so rustup answers for rust-toolchain.toml's
            // toolchain; rustup does not add that file's targets to a toolchain already
            // installed.
            let installed = m
                .ask(&rustup, &["target", "list", "--installed"])
                .is_some_and(|list| list.lines().any(|l| l.trim() == WASM_TARGET));
            if installed {
                return;
            }
            Ok(vec![Step::new("rustup", &["target", "add", WASM_TARGET])])
        } else {
            let sysroot = m
                .which("rustc")
                .and_then(|rustc| m.ask(&rustc, &["--print", "sysroot"]));
            if sysroot.is_some_and(|s| {
                Path::new(s.trim())
                    .join("lib/rustlib")
                    .join(WASM_TARGET)
                    .is_dir()
            }) {
                return;
            }
            Err(format!(
                "rustup is not on PATH: install the {WASM_TARGET} standard library for your \
                 Rust toolchain"
            ))
        };
        self.missing.push(Missing { what, fix, steps });
    }

    fn componentize_py(&mut self) {
        let m = self.machine;
        let python = ["python3", "python"].iter().find_map(|p| m.which(p));
        let facts = python.as_deref().and_then(|p| python_facts(m, p));
        let mut dirs: Vec<PathBuf> = facts.as_ref().map_or_else(Vec::new, |f| f.scripts.clone());
        dirs.push(pipx_bin_dir());
        match find_componentize_py(m, &dirs) {
            Found::OnPath => return,
            Found::In(dir) => {
                self.path_additions.push(dir);
                return;
            }
            Found::No => {}
        }
        let what = format!(
            "componentize-py {COMPONENTIZE_PY_VERSION} (builds the Python plugin example the \
             tests load)"
        );
        let pip_fix = format!("python3 -m pip install {COMPONENTIZE_PY}");
        let pipx_fix = format!("pipx install {COMPONENTIZE_PY}");
        let pipx = || Step::new("pipx", &["install", "--force", COMPONENTIZE_PY]);
        let no_pip = "this Python has no usable pip, and pipx is missing".to_string();
        let (fix, steps) = match (&python, &facts) {
            (Some(python), Some(f)) if f.pip && !f.managed => {
                let pip = [
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    COMPONENTIZE_PY,
                ];
                let step = Step::new(&python.display().to_string(), &pip);
                (pip_fix, Ok(vec![step]))
            }
            // A distribution's own Python refuses pip (PEP 668) or has none: pipx installs
            // the tool in an environment of its own.
            _ if m.which("pipx").is_some() => (pipx_fix, Ok(vec![pipx()])),
            _ if m.can_apt() => {
                self.apt(&["pipx"], "pipx (installs componentize-py)");
                (pipx_fix, Ok(vec![pipx()]))
            }
            (_, None) => (pip_fix, Err("no python3 with pip on PATH".to_string())),
            _ if m.which("apt-get").is_some() => (
                format!("{} && {pipx_fix}", self.apt_command(&["pipx"])),
                Err(no_pip),
            ),
            _ => (pipx_fix, Err(no_pip)),
        };
        self.missing.push(Missing { what, fix, steps });
    }

    /// The pinned `openai` package in the Python on PATH.
    fn openai_client(&mut self) {
        self.python_package(
            format!("the openai Python client {OPENAI_CLIENT_VERSION} (the server tests use it)"),
            OPENAI_CLIENT,
            OPENAI_CLIENT_VERSION,
            "import openai; print(openai.__version__)",
        );
    }

    /// Debian's Chromium and the pinned Playwright that drives it (the live view's test).
    fn browser(&mut self) {
        if self.machine.which("chromium").is_none() {
            self.apt(
                &["chromium"],
                "Chromium (the browser test of the live view)",
            );
        }
        self.python_package(
            format!("Playwright for Python {PLAYWRIGHT_VERSION} (the live view's browser test)"),
            PLAYWRIGHT,
            PLAYWRIGHT_VERSION,
            "from importlib.metadata import version; print(version('playwright'))",
        );
    }

    /// The package `pin` in the Python on PATH, unless `query` prints `version` there.
    fn python_package(&mut self, what: String, pin: &str, version: &str, query: &str) {
        let m = self.machine;
        let fix = format!("python3 -m pip install {pin}");
        let Some(python) = ["python3", "python"].iter().find_map(|p| m.which(p)) else {
            let steps = Err("no python3 on PATH".to_string());
            self.missing.push(Missing { what, fix, steps });
            return;
        };
        if m.ask(&python, &["-c", query])
            .is_some_and(|v| v.trim() == version)
        {
            return;
        }
        let pip = [
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            pin,
        ];
        let steps = Ok(vec![Step::new(&python.display().to_string(), &pip)]);
        self.missing.push(Missing { what, fix, steps });
    }

    /// llama.cpp's `llama-server`, built once by the repository's script into the user cache.
    fn llama_server(&mut self) {
        let m = self.machine;
        let script = m.root.join(LLAMA_SERVER_SCRIPT);
        let what = "llama.cpp's llama-server (the remote-backend tests start replicas of it)";
        let fix = format!("bash {LLAMA_SERVER_SCRIPT}");
        let version = std::fs::read_to_string(&script).ok().and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("CACHE_KEY=").map(|v| v.trim().to_string()))
        });
        let Some(version) = version else {
            let steps = Err(format!(
                "{} is missing or names no CACHE_KEY",
                script.display()
            ));
            self.missing.push(Missing {
                what: what.into(),
                fix,
                steps,
            });
            return;
        };
        let cache = std::env::var_os("STAIRCASE_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/staircase")
            });
        if cache
            .join("llama-server")
            .join(&version)
            .join("bin/llama-server")
            .is_file()
        {
            return;
        }
        let steps = Ok(vec![Step::new("bash", &[&script.display().to_string()])]);
        self.missing.push(Missing {
            what: format!("{what}; about 20 minutes to build once"),
            fix,
            steps,
        });
    }

    /// Node.js and the JavaScript example's packages (componentize-js), pinned by its lock.
    fn js_example(&mut self) {
        let m = self.machine;
        if m.which("node").is_none() {
            if m.can_apt() {
                self.apt(
                    &["nodejs"],
                    "Node.js (builds the JavaScript plugin example)",
                );
            } else {
                self.missing.push(Missing {
                    what: "Node.js (builds the JavaScript plugin example the tests load)".into(),
                    fix: if m.which("apt-get").is_some() {
                        self.apt_command(&["nodejs", "npm"])
                    } else {
                        "install Node.js 18 or newer with npm (https://nodejs.org)".into()
                    },
                    steps: Err("node is not on PATH".into()),
                });
                return;
            }
        }
        let example = m.root.join(JS_EXAMPLE);
        if packages_fresh(&example) {
            return;
        }
        let what = format!("the JavaScript example's packages ({JS_EXAMPLE}/node_modules)");
        let fix = format!("npm ci --prefix {JS_EXAMPLE}");
        let prefix = example.display().to_string();
        // `npm ci`: exactly the lock's versions, and it never rewrites the lock.
        let steps = vec![Step::new(
            "npm",
            &[
                "ci",
                "--prefix",
                &prefix,
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
            ],
        )];
        if m.which("npm").is_some() {
            self.missing.push(Missing {
                what,
                fix,
                steps: Ok(steps),
            });
        } else if m.can_apt() {
            self.apt(&["npm"], "npm (installs the JavaScript example's packages)");
            self.missing.push(Missing {
                what,
                fix,
                steps: Ok(steps),
            });
        } else {
            let fix = if m.which("apt-get").is_some() {
                format!("{} && {fix}", self.apt_command(&["npm"]))
            } else {
                format!("install npm, then: {fix}")
            };
            self.missing.push(Missing {
                what,
                fix,
                steps: Err("npm is not on PATH".into()),
            });
        }
    }

    /// The system packages go first, as one `apt-get` run.
    fn finish(mut self) -> Check {
        if !self.apt.is_empty() {
            let mut packages: Vec<&str> = Vec::new();
            let mut whats: Vec<&str> = Vec::new();
            for (package, what) in &self.apt {
                if !packages.contains(package) {
                    packages.push(package);
                }
                if !whats.contains(what) {
                    whats.push(what);
                }
            }
            let m = self.machine;
            let fix = self.apt_command(&packages);
            let steps = if m.can_apt() {
                let mut install = vec!["install", "-y", "-qq"];
                install.extend(&packages);
                let mut steps = [
                    Step::new("apt-get", &["update", "-qq"]),
                    Step::new("apt-get", &install),
                ];
                for step in &mut steps {
                    step.env.push(("DEBIAN_FRONTEND", "noninteractive"));
                }
                Ok(steps.into())
            } else if m.which("apt-get").is_some() {
                Err("installing system packages needs root".to_string())
            } else {
                Err(
                    "no apt-get here: these are the Debian/Ubuntu names; use your package \
                     manager's (for libclang, LIBCLANG_PATH may name its folder instead)"
                        .to_string(),
                )
            };
            self.missing.insert(
                0,
                Missing {
                    what: whats.join(", "),
                    fix,
                    steps,
                },
            );
        }
        Check {
            missing: self.missing,
            path_additions: self.path_additions,
        }
    }
}

enum Libclang {
    Found,
    /// The library is there, the compiler headers it needs (`stddef.h`, ...) are not.
    NoHeaders,
    Missing,
}

/// Looks where clang-sys (bindgen's loader) looks: `LIBCLANG_PATH` if set, else
/// `llvm-config --libdir` and the usual system folders.
fn libclang(m: &Machine) -> Libclang {
    let dirs: Vec<PathBuf> = match std::env::var_os("LIBCLANG_PATH").filter(|p| !p.is_empty()) {
        Some(path) => {
            let path = PathBuf::from(path);
            // LIBCLANG_PATH may name the library itself.
            vec![if path.is_file() {
                path.parent().map(Path::to_path_buf).unwrap_or(path)
            } else {
                path
            }]
        }
        None => {
            let mut dirs: Vec<PathBuf> = m
                .which("llvm-config")
                .and_then(|c| m.ask(&c, &["--libdir"]))
                .map(|d| PathBuf::from(d.trim()))
                .into_iter()
                .collect();
            dirs.extend(subdirs(Path::new("/usr/lib"), "llvm-").map(|d| d.join("lib")));
            dirs.extend(
                [
                    "/usr/lib/x86_64-linux-gnu",
                    "/usr/lib/aarch64-linux-gnu",
                    "/usr/lib64",
                    "/usr/lib",
                    "/usr/local/lib",
                ]
                .map(PathBuf::from),
            );
            dirs
        }
    };
    let is_libclang = |name: &str| {
        name.starts_with("libclang")
            && !name.starts_with("libclang-cpp")
            && (name.starts_with("libclang.so") || name.starts_with("libclang-"))
            && name.contains(".so")
    };
    let library = dirs.iter().any(|dir| {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| is_libclang(&e.file_name().to_string_lossy()))
        })
    });
    if !library {
        return Libclang::Missing;
    }
    // The headers live in `<libdir>/clang/<version>/include`, next to the library or in
    // the distribution's LLVM folder.
    let headers = dirs
        .iter()
        .any(|dir| subdirs(&dir.join("clang"), "").any(|v| v.join("include/stddef.h").is_file()));
    if headers {
        Libclang::Found
    } else {
        Libclang::NoHeaders
    }
}

/// The folders in `dir` whose names start with `prefix`.
fn subdirs(dir: &Path, prefix: &str) -> impl Iterator<Item = PathBuf> {
    let prefix = prefix.to_string();
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(move |e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .filter(|p| p.is_dir())
}

struct PythonFacts {
    /// `python -m pip` works.
    pip: bool,
    /// The distribution manages this Python and pip refuses to install into it (PEP 668).
    managed: bool,
    /// Where pip puts commands (the environment's and the user's).
    scripts: Vec<PathBuf>,
}

fn python_facts(m: &Machine, python: &Path) -> Option<PythonFacts> {
    const SCRIPT: &str = "import importlib.util, os, sys, sysconfig\n\
        print(int(importlib.util.find_spec('pip') is not None))\n\
        marker = os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')\n\
        print(int(os.path.exists(marker) and sys.prefix == sys.base_prefix))\n\
        print(sysconfig.get_path('scripts'))\n\
        print(sysconfig.get_path('scripts', os.name + '_user'))\n";
    let out = m.ask(python, &["-c", SCRIPT])?;
    let mut lines = out.lines();
    let pip = lines.next()? == "1";
    let managed = lines.next()? == "1";
    Some(PythonFacts {
        pip,
        managed,
        scripts: lines.map(PathBuf::from).collect(),
    })
}

/// Where pipx puts commands.
fn pipx_bin_dir() -> PathBuf {
    std::env::var_os("PIPX_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".local/bin")
        })
}

enum Found {
    OnPath,
    /// In this folder, which the search path lacks.
    In(PathBuf),
    No,
}

/// The pinned componentize-py on the search path, else in one of `dirs`.
fn find_componentize_py(m: &Machine, dirs: &[PathBuf]) -> Found {
    let pinned = |program: &Path| {
        m.ask(program, &["--version"])
            .is_some_and(|v| v.split_whitespace().any(|w| w == COMPONENTIZE_PY_VERSION))
    };
    if m.which("componentize-py").is_some_and(|p| pinned(&p)) {
        return Found::OnPath;
    }
    dirs.iter()
        .find(|dir| {
            let program = dir.join("componentize-py");
            program.is_file() && pinned(&program)
        })
        .map_or(Found::No, |dir| Found::In(dir.clone()))
}

/// Whether `npm ci` already ran for the example's current lock: npm writes its hidden
/// lockfile `node_modules/.package-lock.json` on every install.
fn packages_fresh(example: &Path) -> bool {
    let modified = |path: PathBuf| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let installed = modified(example.join("node_modules/.package-lock.json"));
    let wanted = [
        modified(example.join("package.json")),
        modified(example.join("package-lock.json")),
    ];
    installed.is_some_and(|installed| wanted.iter().flatten().all(|w| *w <= installed))
}
