//! `cargo xtask dist`: the portable release bundle.
//!
//! The everyday build compiles for this CPU (`target-cpu=native` in `.cargo/config.toml`:
//! llama.cpp's kernels follow the Rust target features), so its binary may die with an illegal
//! instruction on an older x86-64. This build targets baseline x86-64 and turns on the host's
//! `portable` feature: ggml's CPU backend is built once per x86-64 level as a loadable module,
//! and at start ggml keeps the best one the running CPU supports. The bundle holds the binary
//! and, in `lib/` (found through the binary's `$ORIGIN/lib` run path), llama.cpp's libraries
//! and those modules; `dist/` gets the folder and its tarball.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::machine::Machine;

const PLATFORM: &str = "x86_64-linux";

/// Baseline x86-64 for the Rust code; the run path lets the binary find `lib/` wherever the
/// bundle is unpacked (and the libraries beside it in cargo's own target folder).
const RUSTFLAGS: &str = "-C target-cpu=x86-64 -C link-arg=-Wl,-rpath,$ORIGIN/lib:$ORIGIN";

/// llama.cpp's libraries the binary links (`libllama-common`, for llama.cpp's own tools, is
/// left out).
const LIBRARIES: &[&str] = &["libllama", "libggml", "libggml-base"];

/// Kernel modules left out of the bundle. ggml ranks modules by CPUID alone, and a hypervisor
/// that advertises AMX without granting it (this project's CI machines) kills the AMX module's
/// first matmul with SIGILL; the AVX-512 modules serve those CPUs instead.
const LEFT_OUT: &[&str] = &["sapphirerapids"];

struct Options {
    check: bool,
    target_dir: Option<PathBuf>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut options = Options {
            check: false,
            target_dir: None,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--check" => options.check = true,
                "--target-dir" => {
                    let dir = args.next().ok_or("--target-dir needs a folder")?;
                    options.target_dir = Some(PathBuf::from(dir));
                }
                other => return Err(format!("`cargo xtask dist`: unknown argument `{other}`")),
            }
        }
        Ok(options)
    }
}

pub fn run(machine: &Machine, args: &[String]) -> Result<(), String> {
    let options = Options::parse(args)?;
    // Its own target folder: the flags differ from the everyday build's, and sharing one would
    // rebuild everything each time either is built.
    let root = machine
        .root
        .canonicalize()
        .map_err(|e| io_error("finding", &machine.root, e))?;
    let target_dir = options
        .target_dir
        .unwrap_or_else(|| root.join("target").join("dist"));
    let target = target_dir.to_string_lossy();
    crate::cargo_with_env(
        machine,
        &[
            "build",
            "--release",
            "--package",
            "staircase",
            "--features",
            "portable",
            "--target-dir",
            &target,
        ],
        // llama.cpp optimised, without the debug info the release profile's line tables
        // would otherwise add to it (RelWithDebInfo: -O2 -g, and a 60 MB libllama).
        &[("RUSTFLAGS", RUSTFLAGS), ("LLAMA_LIB_PROFILE", "Release")],
    )?;
    let release = target_dir.join("release");
    let llama = llama_install_dir(&release)?;
    let name = format!("staircase-{}-{PLATFORM}", version(&root)?);
    let out = root.join("dist");
    let bundle = out.join(&name);
    if bundle.exists() {
        std::fs::remove_dir_all(&bundle).map_err(|e| io_error("clearing", &bundle, e))?;
    }
    let lib = bundle.join("lib");
    std::fs::create_dir_all(&lib).map_err(|e| io_error("creating", &lib, e))?;
    copy(&release.join("staircase"), &bundle.join("staircase"))?;
    for library in shared_libraries(&llama.join("lib"))? {
        let library_name = file_name(&library);
        let stem = library_name.split(".so").next().unwrap_or_default();
        if LIBRARIES.contains(&stem) {
            copy(&library, &lib.join(&library_name))?;
        }
    }
    let mut modules = Vec::new();
    for module in shared_libraries(&llama.join("backends"))? {
        let module_name = file_name(&module);
        if LEFT_OUT.iter().any(|left| module_name.contains(left)) {
            continue;
        }
        copy(&module, &lib.join(&module_name))?;
        modules.push(module_name);
    }
    let tarball = out.join(format!("{name}.tar.gz"));
    run_tool(
        Command::new("tar")
            .arg("-czf")
            .arg(&tarball)
            .arg("-C")
            .arg(&out)
            .arg(&name),
    )?;
    modules.sort();
    eprintln!(
        "xtask: {} ({} CPU kernel modules: {})",
        tarball.display(),
        modules.len(),
        modules.join(", ")
    );
    if options.check {
        check(&tarball, &name)?;
    }
    Ok(())
}

/// Unpacks the tarball outside the tree and runs `generate` with the bundled binary and no
/// library path: it must answer, and say which CPU kernels llama.cpp chose.
fn check(tarball: &Path, name: &str) -> Result<(), String> {
    let place = std::env::temp_dir().join(format!("staircase-dist-check-{}", std::process::id()));
    std::fs::create_dir_all(&place).map_err(|e| io_error("creating", &place, e))?;
    let result = (|| {
        run_tool(
            Command::new("tar")
                .arg("-xzf")
                .arg(tarball)
                .arg("-C")
                .arg(&place),
        )?;
        let binary = place.join(name).join("staircase");
        let output = Command::new(&binary)
            .args(["generate", "--json", "--max-tokens", "8", "Say hello."])
            .env_remove("LD_LIBRARY_PATH")
            .env_remove("STAIRCASE_GGML_BACKENDS")
            .current_dir(&place)
            .output()
            .map_err(|e| format!("{} did not start: {e}", binary.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            return Err(format!(
                "the bundled binary failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let system_info = stdout
            .lines()
            .find_map(|line| line.trim().strip_prefix("\"system_info\": "))
            .map(|info| info.trim_end_matches(',').trim_matches('"'))
            .ok_or_else(|| format!("no system_info in the answer:\n{stdout}"))?;
        if !system_info.contains("CPU :") {
            return Err(format!(
                "llama.cpp loaded no CPU kernel module: {system_info}"
            ));
        }
        if !stdout.contains("\"completion_tokens\"") {
            return Err(format!("no answer from the bundled binary:\n{stdout}"));
        }
        eprintln!("xtask: the bundled binary answers; llama.cpp chose {system_info}");
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&place);
    result
}

/// The host's version, from its manifest.
fn version(root: &Path) -> Result<String, String> {
    let manifest = root.join("host").join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).map_err(|e| io_error("reading", &manifest, e))?;
    text.lines()
        .find_map(|line| {
            let value = line.strip_prefix("version = ")?;
            Some(value.trim_matches('"').to_owned())
        })
        .ok_or_else(|| format!("no version in {}", manifest.display()))
}

/// The `lib*.so*` files and links directly in `dir`.
fn shared_libraries(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_error("reading", dir, e))?;
    let mut libraries = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = file_name(&path);
        if name.starts_with("lib") && name.contains(".so") {
            libraries.push(path);
        }
    }
    Ok(libraries)
}

/// Where llama-cpp-sys-2's build installed llama.cpp (`lib/`, `backends/`): its newest
/// `out` folder with kernel modules.
fn llama_install_dir(release: &Path) -> Result<PathBuf, String> {
    let build = release.join("build");
    let entries = std::fs::read_dir(&build).map_err(|e| io_error("reading", &build, e))?;
    entries
        .flatten()
        .filter(|entry| file_name(&entry.path()).starts_with("llama-cpp-sys-2-"))
        .map(|entry| entry.path().join("out"))
        .filter(|out| out.join("backends").is_dir())
        .max_by_key(|out| out.metadata().and_then(|m| m.modified()).ok())
        .ok_or_else(|| format!("no llama.cpp kernel modules under {}", build.display()))
}

/// Copies a file, or recreates a symbolic link (the libraries' version links) as it is.
fn copy(from: &Path, to: &Path) -> Result<(), String> {
    let copied = match std::fs::read_link(from) {
        Ok(target) => std::os::unix::fs::symlink(target, to),
        Err(_) => std::fs::copy(from, to).map(|_| ()),
    };
    copied.map_err(|e| io_error("copying", from, e))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn run_tool(command: &mut Command) -> Result<(), String> {
    let shown = format!("{command:?}");
    let status = command
        .status()
        .map_err(|e| format!("{shown} did not start: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed ({status})"))
    }
}

fn io_error(doing: &str, path: &Path, error: std::io::Error) -> String {
    format!("{doing} {}: {error}", path.display())
}
