//! `staircase plugin build`: turns a plugin folder into `NAME.wasm` beside its manifest with
//! the language's own toolchain (cargo for Rust, componentize-py for Python, componentize-js
//! for JavaScript) or the manifest's `[build] command`, then checks it as `plugin check`
//! does. A missing tool is named with the command that installs it before anything runs.
//! It never edits the plugin's sources; its scratch files live in the folder's `target/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use super::templates::{self, Lang};
use crate::plugin::Manifest;
use crate::policy::PluginKind;

/// The target Rust plugins compile to.
const WASM_TARGET: &str = "wasm32-wasip2";
/// The componentize-py release whose components wasmtime 48 accepts (the repository's CI
/// pins the same).
const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
/// The module componentize-py loads from a Python plugin's folder.
const PYTHON_MODULE: &str = "app";
/// Where componentize-js is found in a JavaScript plugin's folder after `npm install`.
const COMPONENTIZE_JS: &str = "node_modules/@bytecodealliance/componentize-js/package.json";
/// A JavaScript plugin's source when its `package.json` names no `main`.
const JS_DEFAULT_SOURCE: &str = "plugin.js";
/// Scratch space inside the plugin folder: the WIT handed to the toolchain and the
/// component before it is renamed into place (a watching server never sees half a file).
const SCRATCH: &str = "target/staircase";

/// The plugin folder a command builds (`plugin build`, `plugin dev`).
#[derive(Debug, clap::Args)]
pub struct Folder {
    /// The plugin folder (default: the current folder).
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// Its manifest (default: the one `*.toml` in DIR that is a plugin manifest).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
}

/// `staircase plugin build` arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub folder: Folder,
    /// Build only; skip the check of the result.
    #[arg(long)]
    pub no_check: bool,
}

/// A tool the build needs and does not find, with the command that installs it.
#[derive(Debug, thiserror::Error)]
#[error("{tool} is not installed (needed to build a {lang} plugin); install it with: {install}")]
pub struct MissingTool {
    pub tool: String,
    pub lang: &'static str,
    pub install: String,
}

/// How a folder is built.
#[derive(Debug)]
enum Recipe {
    Known(Lang),
    Command(String),
}

/// What a build produced.
pub struct Built {
    /// `NAME.wasm` beside the manifest.
    pub wasm: PathBuf,
    pub manifest_path: PathBuf,
    pub name: String,
}

/// Builds the folder's component, then checks it.
pub fn run(args: Args) -> anyhow::Result<()> {
    let built = build(&args.folder.dir, args.folder.manifest)?;
    if args.no_check {
        return Ok(());
    }
    super::check(built.wasm, Some(built.manifest_path), None)
}

/// Builds the component of the plugin folder `dir` (its manifest found there unless given)
/// into `NAME.wasm` beside the manifest. The file is renamed into place whole.
pub fn build(dir: &Path, manifest: Option<PathBuf>) -> anyhow::Result<Built> {
    let manifest_path = match manifest {
        Some(path) => path,
        None => find_manifest(dir)?,
    };
    let manifest = crate::plugin::read_manifest(&manifest_path)?;
    // Absolute, because every tool runs in the folder and gets paths inside it.
    let folder = absolute(
        manifest_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )?;
    let recipe = recipe(&folder, &manifest)?;
    let wasm = folder.join(format!("{}.wasm", manifest.name));
    let scratch = folder.join(SCRATCH);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let staged = scratch.join(format!("{}.wasm", manifest.name));
    let _ = std::fs::remove_file(&staged);
    let wit = write_wit(&folder, manifest.kind)?;
    let world = manifest.kind.name();
    match &recipe {
        Recipe::Known(Lang::Rust) => build_rust(&folder, &staged)?,
        Recipe::Known(Lang::Python) => build_python(&folder, &wit, world, &staged)?,
        Recipe::Known(Lang::Js) => build_js(&folder, &wit, world, &staged)?,
        Recipe::Command(command) => build_command(&folder, command, &wit, world, &staged)?,
    }
    if !staged.is_file() {
        bail!(
            "the build finished but wrote no component at {}",
            staged.display()
        );
    }
    std::fs::rename(&staged, &wasm)
        .with_context(|| format!("moving the component to {}", wasm.display()))?;
    println!("built         {}", wasm.display());
    Ok(Built {
        wasm,
        manifest_path,
        name: manifest.name,
    })
}

/// The one plugin manifest among the folder's `*.toml` files.
fn find_manifest(dir: &Path) -> anyhow::Result<PathBuf> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut found = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let is_toml = path.extension().is_some_and(|e| e == "toml");
        let is_cargo = path.file_name().is_some_and(|n| n == "Cargo.toml");
        if is_toml && !is_cargo && crate::plugin::read_manifest(&path).is_ok() {
            found.push(path);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!(
            "no plugin manifest (NAME.toml with name, version and kind) in {}; \
             `staircase plugin new` writes one",
            dir.display()
        ),
        _ => bail!(
            "several plugin manifests in {} ({}); name one with --manifest",
            dir.display(),
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The manifest's `[build]` command, else the language the folder's files say.
fn recipe(folder: &Path, manifest: &Manifest) -> anyhow::Result<Recipe> {
    if let Some(build) = &manifest.build {
        return Ok(Recipe::Command(build.command.clone()));
    }
    let has = |file: &str| folder.join(file).is_file();
    if has("Cargo.toml") {
        Ok(Recipe::Known(Lang::Rust))
    } else if has("package.json") {
        Ok(Recipe::Known(Lang::Js))
    } else if has(&format!("{PYTHON_MODULE}.py")) {
        Ok(Recipe::Known(Lang::Python))
    } else {
        bail!(
            "{} has no Cargo.toml, package.json or {PYTHON_MODULE}.py, and its manifest no \
             [build] command = \"...\"; nothing says how to build it",
            folder.display()
        )
    }
}

/// `program` on the search path.
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt;
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// `program`, or the error naming it and its installer.
fn require(program: &str, lang: Lang, install: &str) -> Result<PathBuf, MissingTool> {
    which(program).ok_or_else(|| MissingTool {
        tool: program.to_string(),
        lang: lang.name(),
        install: install.to_string(),
    })
}

/// Runs `command`, failing with its name when it does not succeed (its output went to the
/// terminal).
fn run_tool(mut command: Command, what: &str) -> anyhow::Result<()> {
    println!("running       {what}");
    let status = command
        .status()
        .with_context(|| format!("cannot run {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status}); see its output above");
    }
    Ok(())
}

fn build_rust(folder: &Path, staged: &Path) -> anyhow::Result<()> {
    let cargo = require(
        "cargo",
        Lang::Rust,
        "curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh   (https://rustup.rs)",
    )?;
    if !has_wasm_target(folder) {
        return Err(MissingTool {
            tool: format!("the Rust target {WASM_TARGET}"),
            lang: Lang::Rust.name(),
            install: format!("rustup target add {WASM_TARGET}"),
        }
        .into());
    }
    let what = format!("cargo build --release --target {WASM_TARGET}");
    println!("running       {what}");
    // The artifact's path comes from cargo's own messages, so a CARGO_TARGET_DIR or a
    // `[build] target-dir` elsewhere is followed.
    let output = Command::new(cargo)
        .current_dir(folder)
        .args(["build", "--release", "--target", WASM_TARGET])
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !output.status.success() {
        bail!("{what} failed ({}); see its output above", output.status);
    }
    let artifact = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == "cdylib"))
        })
        .flat_map(|m| {
            m["filenames"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|f| f.as_str().map(PathBuf::from))
                .collect::<Vec<_>>()
        })
        .find(|f| f.extension().is_some_and(|e| e == "wasm"))
        .context("cargo built no cdylib .wasm; is `crate-type = [\"cdylib\"]` in Cargo.toml?")?;
    std::fs::copy(&artifact, staged).with_context(|| format!("copying {}", artifact.display()))?;
    Ok(())
}

/// Whether the toolchain that builds in `folder` has the wasm target's standard library.
/// An unknown answer (no rustc to ask) is left to cargo's own error.
fn has_wasm_target(folder: &Path) -> bool {
    let Ok(output) = Command::new("rustc")
        .current_dir(folder)
        .args(["--print", "sysroot"])
        .output()
    else {
        return true;
    };
    if !output.status.success() {
        return true;
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    sysroot.join("lib/rustlib").join(WASM_TARGET).is_dir()
}

fn componentize_py() -> Result<PathBuf, MissingTool> {
    require(
        "componentize-py",
        Lang::Python,
        &format!("python3 -m pip install {COMPONENTIZE_PY}"),
    )
}

/// Writes the WIT of `kind`'s world into the folder's scratch space, for the toolchain;
/// returns its folder.
fn write_wit(folder: &Path, kind: PluginKind) -> anyhow::Result<PathBuf> {
    let (wit_version, wit_text) = templates::wit_of(kind);
    let wit = folder.join(SCRATCH).join("wit").join(wit_version);
    std::fs::create_dir_all(&wit).with_context(|| format!("creating {}", wit.display()))?;
    let file = wit.join("agent.wit");
    std::fs::write(&file, wit_text).with_context(|| format!("writing {}", file.display()))?;
    Ok(wit)
}

/// Writes componentize-py's typed bindings of the kind's world into a Python plugin's folder
/// (`wit_world/` and the runtime's modules), where an editor or mypy finds them, as
/// componentize-py's own tutorial does; its build then uses them as it would its own.
pub fn python_bindings(folder: &Path, kind: PluginKind) -> anyhow::Result<()> {
    let tool = componentize_py()?;
    // Absolute: the tool runs in the folder.
    let folder = absolute(folder)?;
    let wit = write_wit(&folder, kind)?;
    let world = kind.name();
    let output = Command::new(tool)
        .current_dir(&folder)
        .arg("-d")
        .arg(&wit)
        .args(["-w", world, "bindings", "."])
        .output()
        .context("cannot run componentize-py")?;
    if !output.status.success() {
        bail!(
            "componentize-py -w {world} bindings failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn build_python(folder: &Path, wit: &Path, world: &str, staged: &Path) -> anyhow::Result<()> {
    let tool = componentize_py()?;
    let mut command = Command::new(tool);
    command
        .current_dir(folder)
        .arg("-d")
        .arg(wit)
        .args(["-w", world, "componentize", "-p"])
        .arg(folder)
        .arg(PYTHON_MODULE)
        .arg("-o")
        .arg(staged);
    run_tool(
        command,
        &format!("componentize-py -w {world} componentize {PYTHON_MODULE}"),
    )
}

fn build_js(folder: &Path, wit: &Path, world: &str, staged: &Path) -> anyhow::Result<()> {
    let node = require(
        "node",
        Lang::Js,
        "your system's package manager (e.g. `apt install nodejs npm`) or https://nodejs.org",
    )?;
    if !folder.join(COMPONENTIZE_JS).is_file() {
        return Err(MissingTool {
            tool: format!("componentize-js (in {}/node_modules)", folder.display()),
            lang: Lang::Js.name(),
            install: format!("npm install --prefix {}", folder.display()),
        }
        .into());
    }
    let source = std::fs::read_to_string(folder.join("package.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|package| package["main"].as_str().map(str::to_string))
        .unwrap_or_else(|| JS_DEFAULT_SOURCE.to_string());
    let mut command = Command::new(node);
    // `--eval` resolves the script's imports from the working folder, so componentize-js
    // comes from the plugin's own node_modules.
    command
        .current_dir(folder)
        .args(["--input-type=module", "--eval", templates::JS_BUILD])
        .env("STAIRCASE_SOURCE", absolute(&folder.join(&source))?)
        .env("STAIRCASE_WIT", absolute(wit)?)
        .env("STAIRCASE_WORLD", world)
        .env("STAIRCASE_OUT", absolute(staged)?);
    run_tool(
        command,
        &format!("componentize-js {source} (world {world})"),
    )
}

fn build_command(
    folder: &Path,
    script: &str,
    wit: &Path,
    world: &str,
    staged: &Path,
) -> anyhow::Result<()> {
    let mut command = Command::new("sh");
    command
        .current_dir(folder)
        .args(["-c", script])
        .env("STAIRCASE_WIT", absolute(wit)?)
        .env("STAIRCASE_WORLD", world)
        .env("STAIRCASE_OUT", absolute(staged)?);
    run_tool(command, &format!("[build] command `{script}`"))
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}
