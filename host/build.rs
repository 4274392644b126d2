//! Builds the guest workspace (`plugins/`, with the SDK from `sdk/`) for `wasm32-wasip2` and
//! embeds the built-in plugins in the host.
//!
//! The guest build is a separate cargo run with its own target folder under the host's
//! (so it never waits on the outer build's lock), with the outer build's environment
//! removed: `.cargo/config.toml` gives x86_64 `-C target-cpu=native` flags that would be
//! passed to the wasm target, and the outer target folder or target triple must not leak.
//! Each plugin kind is built in its own cargo run because cargo unifies the SDK's features
//! across the packages of one run, and a component must export exactly one world.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Guest crates that are built-in plugins; the others in the guest workspace are test
/// fixtures, built but not embedded.
const BUILTINS: &[&str] = &[
    "proposer",
    "moa-aggregator",
    "truncate-compressor",
    "rule-router",
    "pattern-guard",
    "phrase-guard",
];

/// The target the guest crates compile to.
const WASM_TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("host/ has a parent")
        .to_path_buf();
    let guests = root.join("plugins");
    for path in ["plugins", "sdk", "wit"] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
    let out_dir = PathBuf::from(env("OUT_DIR"));
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .expect("OUT_DIR lies inside the target folder")
        .join("wasm-guests");

    ensure_wasm_target();
    let crates = guest_crates(&guests);
    let mut by_kind: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, (_, kind)) in &crates {
        by_kind.entry(kind.clone()).or_default().push(name.clone());
    }
    for (kind, names) in &by_kind {
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo
            .current_dir(&guests)
            .args([
                "build",
                "--release",
                "--target",
                WASM_TARGET,
                "--target-dir",
            ])
            .arg(&target_dir);
        for name in names {
            cargo.args(["-p", name]);
        }
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            let keep = [
                "CARGO_HOME",
                "CARGO_MAKEFLAGS",
                "CARGO_NET_OFFLINE",
                "CARGO_HTTP_PROXY",
            ];
            let outer = (key.starts_with("CARGO_") && !keep.contains(&key.as_str()))
                || [
                    "RUSTFLAGS",
                    "RUSTDOCFLAGS",
                    "RUSTC",
                    "RUSTC_WRAPPER",
                    "RUSTC_WORKSPACE_WRAPPER",
                    "RUSTDOC",
                    "CLIPPY_ARGS",
                    "TARGET",
                    "HOST",
                    "OUT_DIR",
                    "PROFILE",
                    "OPT_LEVEL",
                    "DEBUG",
                    "NUM_JOBS",
                    "RUSTC_LINKER",
                ]
                .contains(&key.as_str());
            if outer {
                cargo.env_remove(&key);
            }
        }
        let status = cargo
            .status()
            .unwrap_or_else(|e| panic!("cannot run cargo for the guest workspace: {e}"));
        if !status.success() {
            panic!(
                "building the {kind} plugins ({}) for {WASM_TARGET} failed; see the output above",
                names.join(", ")
            );
        }
    }

    let artifacts = target_dir.join(WASM_TARGET).join("release");
    let mut code =
        String::from("/// Plugins embedded in the binary.\npub static BUILTINS: &[Builtin] = &[\n");
    for name in BUILTINS {
        let (dir, _) = crates
            .get(*name)
            .unwrap_or_else(|| panic!("built-in plugin {name} is not in the guest workspace"));
        let wasm = artifacts.join(format!("{}.wasm", name.replace('-', "_")));
        code.push_str(&format!(
            "    Builtin {{ name: {name:?}, wasm: include_bytes!({:?}), manifest: include_str!({:?}) }},\n",
            wasm.display().to_string(),
            dir.join("plugin.toml").display().to_string(),
        ));
    }
    code.push_str("];\n");
    code.push_str(&format!(
        "/// Where the guest build put every component (built-ins and test fixtures).\npub const GUEST_ARTIFACTS: &str = {:?};\n",
        artifacts.display().to_string()
    ));
    std::fs::write(out_dir.join("builtin_plugins.rs"), code).expect("OUT_DIR is writable");
}

/// Adds the wasm target when this toolchain lacks it: `rust-toolchain.toml` lists it, but
/// rustup adds a toolchain file's targets only when it installs the toolchain, not to one
/// already installed. Cargo runs this script only after llama-cpp-sys-2's (a `links`
/// dependency, whose cmake build takes minutes), so `cargo xtask` checks the target before
/// any build; this covers plain `cargo build`.
fn ensure_wasm_target() {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let has_target = || {
        let output = Command::new(&rustc)
            .args(["--print", "sysroot"])
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        Some(sysroot.join("lib/rustlib").join(WASM_TARGET).is_dir())
    };
    // An unknown answer leaves the error, if any, to the guest build.
    if has_target() != Some(false) {
        return;
    }
    let fix = format!("rustup target add {WASM_TARGET}");
    println!("cargo:warning=the {WASM_TARGET} target is missing; running `{fix}`");
    // rustup adds it to the toolchain building this (RUSTUP_TOOLCHAIN is inherited).
    let added = Command::new("rustup")
        .args(["target", "add", WASM_TARGET])
        // A build script's stdout is for cargo's directives.
        .stdout(std::io::stderr())
        .status()
        .is_ok_and(|s| s.success());
    if !added || has_target() != Some(true) {
        panic!(
            "the {WASM_TARGET} target (the built-in plugins compile to it) is missing and \
             `{fix}` did not add it; run it yourself (without rustup: install the \
             {WASM_TARGET} standard library for this toolchain)"
        );
    }
}

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("cargo sets {key} for build scripts"))
}

/// Guest crates by package name: their folder and the kind their `plugin.toml` declares.
fn guest_crates(guests: &Path) -> BTreeMap<String, (PathBuf, String)> {
    let mut crates = BTreeMap::new();
    let mut dirs = vec![guests.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_dir()
                || path
                    .file_name()
                    .is_some_and(|n| n == "target" || n == "src")
            {
                continue;
            }
            let manifest = path.join("plugin.toml");
            match std::fs::read_to_string(&manifest) {
                Ok(text) => {
                    let kind = toml_string(&text, "kind")
                        .unwrap_or_else(|| panic!("{} has no kind", manifest.display()));
                    let name = path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .expect("a folder has a name");
                    crates.insert(name, (path, kind));
                }
                Err(_) => dirs.push(path),
            }
        }
    }
    crates
}

/// The value of a top-level `key = "value"` line (the build script has no TOML parser, and
/// the manifests of this workspace are plain).
fn toml_string(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
    })
}
