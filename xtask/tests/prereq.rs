//! The xtask on a machine made to order: a scratch `PATH` of fake tools (each records its
//! call in one log, so the order of installs and builds is visible), a scratch repository
//! root and a scratch libclang folder. Nothing real is installed or built. The fakes run
//! with only that `PATH`, so they use shell builtins and absolute paths.
#![cfg(unix)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

/// A scratch machine on which every prerequisite is present.
struct Machine {
    dir: PathBuf,
}

impl Machine {
    fn new(name: &str) -> Machine {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let machine = Machine { dir };
        for tool in ["cmake", "c++", "make", "node", "chromium"] {
            machine.tool(tool, "");
        }
        machine.tool("componentize-py", "echo componentize-py 0.25.1");
        machine.tool(
            "rustup",
            "echo x86_64-unknown-linux-gnu; echo wasm32-wasip2",
        );
        machine.tool("cargo", "");
        // Answers only the openai and playwright checks; the checks that ask it for more get
        // nothing.
        machine.tool(
            "python3",
            "case \"$*\" in *openai*) echo 3.51.0;; *playwright*) echo 1.63.0;; esac",
        );
        machine.file(
            "root/.ci/llama-server.sh",
            "VERSION=0.3.36\nCACHE_KEY=0.3.36-noamx\n",
        );
        machine.file(
            ".cache/staircase/llama-server/0.3.36-noamx/bin/llama-server",
            "",
        );
        machine.file("libclang/libclang.so.1", "");
        machine.file("libclang/clang/14.0.6/include/stddef.h", "");
        let js = "root/examples/plugins/js";
        machine.file(&format!("{js}/package.json"), "{}");
        machine.file(&format!("{js}/package-lock.json"), "{}");
        machine.file(&format!("{js}/node_modules/.package-lock.json"), "{}");
        machine
    }

    fn file(&self, path: &str, text: &str) -> PathBuf {
        let path = self.dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A fake `name` on the scratch `PATH`: it logs its arguments, then runs `script`.
    fn tool(&self, name: &str, script: &str) {
        let log = self.dir.join("calls.log");
        let path = self.file(
            &format!("bin/{name}"),
            &format!(
                // Unquoted and unglobbed, so a multi-line `-c` script logs as one line.
                "#!/bin/sh\nset -f\necho {name} $* >> '{}'\nset +f\n{script}\n",
                log.display()
            ),
        );
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.join("bin").join(name)).unwrap();
    }

    /// Runs the xtask with nothing of this process's environment.
    fn xtask(&self, args: &[&str]) -> Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(args)
            .env_clear()
            .env("PATH", self.dir.join("bin"))
            .env("HOME", &self.dir)
            .env("CARGO", self.dir.join("bin/cargo"))
            .env("LIBCLANG_PATH", self.dir.join("libclang"))
            .env("STAIRCASE_XTASK_ROOT", self.dir.join("root"))
            .output()
            .unwrap()
    }

    /// The fake tools' calls, in order.
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The calls that change something (installs, builds), without the checks' questions.
    fn actions(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| {
                c != "rustup target list --installed"
                    && !c.ends_with(" --version")
                    && !c.starts_with("python3 -c")
            })
            .collect()
    }

    fn builds(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.starts_with("cargo "))
            .collect()
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap()
}

#[test]
fn with_everything_present_test_pulls_the_model_then_runs_the_whole_suite() {
    let machine = Machine::new("present");
    let output = machine.xtask(&["test"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        machine.builds(),
        ["cargo run --quiet -- model pull", "cargo test --workspace"]
    );
    let output = machine.xtask(&["run", "Why is the sky blue?"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        machine.builds().last().unwrap(),
        "cargo run -- run Why is the sky blue?"
    );
}

#[test]
fn a_missing_componentize_py_stops_the_tests_before_anything_is_built() {
    let machine = Machine::new("no-componentize-py");
    machine.remove("componentize-py");
    let output = machine.xtask(&["test"]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("componentize-py 0.25.1")
            && message.contains("no python3 with pip")
            && message.contains("python3 -m pip install componentize-py==0.25.1")
            && message.contains("cargo xtask test"),
        "{message}"
    );
    assert_eq!(machine.builds(), Vec::<String>::new());
    // Building and running the host does not need it.
    let output = machine.xtask(&["run", "hi"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(machine.builds(), ["cargo run -- run hi"]);
}

#[test]
fn pip_installs_componentize_py_and_the_tests_find_it_off_the_path() {
    let machine = Machine::new("pip");
    machine.remove("componentize-py");
    let scripts = machine.dir.join("python-bin");
    let installed = scripts.join("componentize-py");
    // A Python with pip that is not the distribution's, whose scripts folder is off PATH.
    machine.tool(
        "python3",
        &format!(
            "case \"$*\" in *openai*) echo 3.51.0; exit 0;; *playwright*) echo 1.63.0; exit 0;; esac\n\
             if [ \"$1\" = -c ]; then printf '1\\n0\\n{dir}\\n{dir}\\n'; exit 0; fi\n\
             /bin/mkdir -p '{dir}' && printf '#!/bin/sh\\necho componentize-py 0.25.1\\n' > '{bin}' \
             && /bin/chmod +x '{bin}'",
            dir = scripts.display(),
            bin = installed.display()
        ),
    );
    let output = machine.xtask(&["test"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("is not on your PATH"));
    let calls = machine.calls();
    let pip = calls
        .iter()
        .position(|c| c.contains("-m pip install") && c.contains("componentize-py==0.25.1"))
        .expect("pip ran");
    let build = calls.iter().position(|c| c.starts_with("cargo ")).unwrap();
    assert!(pip < build, "{calls:?}");
}

#[test]
fn a_wasm_target_rustup_cannot_add_fails_with_the_command_before_any_build() {
    let machine = Machine::new("no-wasm-target");
    // A toolchain without the target, and a rustup that cannot fetch it (offline).
    machine.tool(
        "rustup",
        "[ \"$2\" = add ] && exit 1; echo x86_64-unknown-linux-gnu",
    );
    let output = machine.xtask(&["run", "hi"]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("wasm32-wasip2") && message.contains("rustup target add wasm32-wasip2"),
        "{message}"
    );
    assert!(
        machine
            .calls()
            .contains(&"rustup target add wasm32-wasip2".to_string())
    );
    assert_eq!(machine.builds(), Vec::<String>::new());
}

#[test]
fn rustup_adds_a_missing_wasm_target_before_the_build() {
    let machine = Machine::new("wasm-target-added");
    let added = machine.dir.join("added");
    machine.tool(
        "rustup",
        &format!(
            "[ \"$2\" = add ] && echo > '{added}' && exit 0\n\
             echo x86_64-unknown-linux-gnu; [ -e '{added}' ] && echo wasm32-wasip2; exit 0",
            added = added.display()
        ),
    );
    let output = machine.xtask(&["run", "hi"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let calls = machine.calls();
    let add = calls
        .iter()
        .position(|c| c == "rustup target add wasm32-wasip2")
        .expect("rustup added the target");
    assert!(add < calls.iter().position(|c| c.starts_with("cargo ")).unwrap());
}

#[test]
fn missing_system_packages_are_named_with_their_apt_command() {
    let machine = Machine::new("no-system-packages");
    machine.remove("cmake");
    std::fs::remove_dir_all(machine.dir.join("libclang")).unwrap();
    std::fs::create_dir(machine.dir.join("libclang")).unwrap();
    let output = machine.xtask(&["run", "hi"]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("cmake")
            && message.contains("libclang")
            && message.contains("apt-get install -y cmake libclang1-14 libclang-common-14-dev"),
        "{message}"
    );
    assert_eq!(machine.builds(), Vec::<String>::new());
}

#[test]
fn as_root_apt_get_installs_the_system_packages_and_a_failed_install_stops_the_build() {
    let machine = Machine::new("apt");
    machine.remove("cmake");
    // An apt-get that succeeds but installs nothing.
    machine.tool("apt-get", "");
    let output = machine.xtask(&["run", "hi"]);
    assert!(!output.status.success());
    let message = stderr(&output);
    if is_root() {
        assert_eq!(
            machine.actions()[..2],
            ["apt-get update -qq", "apt-get install -y -qq cmake"]
        );
        assert!(
            message.contains("still missing after installing") && message.contains("cmake"),
            "{message}"
        );
    } else {
        assert!(
            message.contains("sudo apt-get install -y cmake") && message.contains("needs root"),
            "{message}"
        );
    }
    assert_eq!(machine.builds(), Vec::<String>::new());
}

#[test]
fn npm_installs_the_javascript_example_before_the_tests_and_check_installs_nothing() {
    let machine = Machine::new("npm");
    let js = machine.dir.join("root/examples/plugins/js");
    std::fs::remove_dir_all(js.join("node_modules")).unwrap();
    // npm ci --prefix DIR ...
    machine.tool(
        "npm",
        "/bin/mkdir -p \"$3/node_modules\" && echo {} > \"$3/node_modules/.package-lock.json\"",
    );
    let output = machine.xtask(&["check"]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("npm ci --prefix examples/plugins/js"),
        "{message}"
    );
    assert_eq!(machine.actions(), Vec::<String>::new());

    let output = machine.xtask(&["test"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let calls = machine.actions();
    assert!(calls[0].starts_with("npm ci --prefix"), "{calls:?}");
    assert_eq!(
        calls[1..],
        ["cargo run --quiet -- model pull", "cargo test --workspace"]
    );
}

#[test]
fn the_tests_install_the_openai_client_and_build_llama_server_before_running() {
    let machine = Machine::new("server-tools");
    std::fs::remove_file(
        machine
            .dir
            .join(".cache/staircase/llama-server/0.3.36-noamx/bin/llama-server"),
    )
    .unwrap();
    // A pip that installs the client, and a build script that leaves the binary behind.
    let marker = machine.dir.join("openai-installed");
    machine.tool(
        "python3",
        &format!(
            "case \"$*\" in *'pip install'*) : > '{m}';; *openai*) [ -e '{m}' ] && echo 3.51.0;; *playwright*) echo 1.63.0;; esac",
            m = marker.display()
        ),
    );
    let binary = machine
        .dir
        .join(".cache/staircase/llama-server/0.3.36-noamx/bin/llama-server");
    machine.tool("bash", &format!(": > '{}'", binary.display()));
    let output = machine.xtask(&["test"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let calls = machine.calls();
    let pip = calls
        .iter()
        .position(|c| c.contains("-m pip install") && c.contains("openai==3.51.0"))
        .expect("pip installed the openai client");
    let script = calls
        .iter()
        .position(|c| c.starts_with("bash ") && c.ends_with(".ci/llama-server.sh"))
        .expect("the llama-server script ran");
    let build = calls.iter().position(|c| c.starts_with("cargo ")).unwrap();
    assert!(pip < build && script < build, "{calls:?}");
}

#[test]
fn the_tests_install_chromium_and_playwright_before_running() {
    let machine = Machine::new("browser");
    machine.remove("chromium");
    // An apt-get that installs a (fake) chromium.
    let bin = machine.dir.join("bin");
    machine.tool(
        "apt-get",
        &format!(
            "case \"$*\" in *install*) /bin/cp '{b}/cmake' '{b}/chromium';; esac",
            b = bin.display()
        ),
    );
    // A pip that installs Playwright; the openai client is already there.
    let marker = machine.dir.join("playwright-installed");
    machine.tool(
        "python3",
        &format!(
            "case \"$*\" in *'pip install'*) : > '{m}';; *openai*) echo 3.51.0;; *playwright*) [ -e '{m}' ] && echo 1.63.0;; esac",
            m = marker.display()
        ),
    );
    let output = machine.xtask(&["test"]);
    if !is_root() {
        // Not root: the apt command is named and nothing is built.
        assert!(!output.status.success());
        assert!(
            stderr(&output).contains("apt-get install -y chromium"),
            "{}",
            stderr(&output)
        );
        return;
    }
    assert!(output.status.success(), "{}", stderr(&output));
    let calls = machine.calls();
    let apt = calls
        .iter()
        .position(|c| c.starts_with("apt-get install") && c.contains("chromium"))
        .expect("apt-get installed chromium");
    let pip = calls
        .iter()
        .position(|c| c.contains("-m pip install") && c.contains("playwright==1.63.0"))
        .expect("pip installed playwright");
    let build = calls.iter().position(|c| c.starts_with("cargo ")).unwrap();
    assert!(apt < build && pip < build, "{calls:?}");
}
