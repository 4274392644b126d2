//! `staircase plugin dev`: the edit-build-swap loop. It builds a plugin folder, checks the
//! component, and installs it into the plugin folder a running `serve` watches, which swaps
//! it in for the next request; then it rebuilds on every saved change of the sources. A
//! version that fails to build or to check is reported and not installed, so the server
//! keeps serving the last good one.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use anyhow::{Context, bail};
use notify::RecursiveMode;

use super::build::{self, MissingTool};

/// How long the sources must stay quiet before a rebuild: an editor's save is several
/// events (write a temporary file, rename it, touch the folder).
const QUIET: Duration = Duration::from_millis(300);

/// What a build writes or a toolchain keeps inside the folder: never a reason to rebuild.
const IGNORED: &[&str] = &[
    "target",
    "node_modules",
    "__pycache__",
    "Cargo.lock",
    "package-lock.json",
];

/// `staircase plugin dev` arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub folder: build::Folder,
    /// The plugin folder of the running server, where each good build is installed
    /// (default: the user's plugin folder, which `serve` loads and watches).
    #[arg(long, value_name = "DIR")]
    pub into: Option<PathBuf>,
    /// Also install the folder's sample pipelines (`pipelines/*.toml`) into this pipeline
    /// folder of the server.
    #[arg(long, value_name = "DIR")]
    pub pipelines: Option<PathBuf>,
    /// Build, check and install once, then exit instead of watching.
    #[arg(long)]
    pub once: bool,
}

/// Where good builds go.
struct Targets {
    plugins: PathBuf,
    pipelines: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let plugins = match args.into {
        Some(dir) => dir,
        None => crate::plugin::default_plugin_dir()
            .context("no user data folder to install into; name one with --into")?,
    };
    std::fs::create_dir_all(&plugins).with_context(|| format!("creating {}", plugins.display()))?;
    if let Some(dir) = &args.pipelines {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let targets = Targets {
        plugins,
        pipelines: args.pipelines,
    };
    if args.once {
        return cycle(&args.folder, &targets);
    }
    let folder = std::path::absolute(&args.folder.dir)
        .with_context(|| format!("resolving {}", args.folder.dir.display()))?;
    let (tx, changes) = mpsc::channel::<PathBuf>();
    let source_folder = folder.clone();
    let _watch = crate::watch::watch(
        &watched_folders(&folder)?,
        QUIET,
        "plugin-dev",
        move |batch| {
            let first_source = batch
                .into_iter()
                .filter(|(path, _)| is_source(&source_folder, path))
                .min_by_key(|(_, at)| *at);
            first_source.is_none_or(|(path, _)| tx.send(path).is_ok())
        },
    )
    .with_context(|| format!("watching {}", folder.display()))?;
    let mut version = 1u64;
    loop {
        println!("version       {version}");
        match cycle(&args.folder, &targets) {
            Ok(()) => {}
            // Nothing an edit of the sources could fix.
            Err(error) if error.downcast_ref::<MissingTool>().is_some() => return Err(error),
            Err(error) => println!(
                "not installed {error:#}\n              \
                 the server keeps the last good version; waiting for a change"
            ),
        }
        println!("watching      {} (Ctrl-C ends)", folder.display());
        let Some(changed) = next_change(&changes) else {
            bail!("the file watcher stopped");
        };
        println!("changed       {}", changed.display());
        version += 1;
    }
}

/// Builds, checks and installs one version.
fn cycle(folder: &build::Folder, targets: &Targets) -> anyhow::Result<()> {
    let built = build::build(&folder.dir, folder.manifest.clone())?;
    super::check(built.wasm.clone(), Some(built.manifest_path.clone()), None)?;
    // Both files land within the server's debounce and load as one version; a reload that
    // falls between them is followed by another for the second file.
    let manifest_name = format!("{}.toml", built.name);
    let wasm_name = format!("{}.wasm", built.name);
    let dest = targets.plugins.join(&wasm_name);
    // A server watching the plugin's own folder took the build when it was renamed in.
    let in_place = std::fs::canonicalize(&dest).ok() == std::fs::canonicalize(&built.wasm).ok();
    let manifest_dest = targets.plugins.join(manifest_name);
    if install(&built.manifest_path, &manifest_dest)? {
        println!("installed     {}", manifest_dest.display());
    }
    if in_place || install(&built.wasm, &dest)? {
        println!("installed     {}", dest.display());
    } else {
        println!("unchanged     the same component is already installed");
    }
    if let Some(pipelines) = &targets.pipelines {
        let samples = built
            .manifest_path
            .parent()
            .unwrap_or(Path::new("."))
            .join("pipelines");
        for sample in toml_files(&samples)? {
            let Some(file_name) = sample.file_name() else {
                continue;
            };
            let dest = pipelines.join(file_name);
            if install(&sample, &dest)? {
                println!("installed     {}", dest.display());
            }
        }
    }
    Ok(())
}

/// Copies `from` to `to` unless `to` already holds the same bytes; the copy is written
/// beside `to` under a name no watcher takes for a plugin or a pipeline, then renamed, so
/// a watching server never reads half a file. Returns whether it copied.
fn install(from: &Path, to: &Path) -> anyhow::Result<bool> {
    let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    if std::fs::read(to).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    let file_name = to
        .file_name()
        .and_then(|n| n.to_str())
        .context("an installed file has a name")?;
    let partial = to.with_file_name(format!(".{file_name}.partial"));
    std::fs::write(&partial, &bytes).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, to).with_context(|| format!("installing {}", to.display()))?;
    Ok(true)
}

/// The `*.toml` files of `dir`, sorted; none when it does not exist.
fn toml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Waits for the next batch of changed sources; returns its first changed file, or `None`
/// when the watcher is gone. Changes saved during a build make one more batch, so the
/// last save is always built.
fn next_change(changes: &Receiver<PathBuf>) -> Option<PathBuf> {
    let first = changes.recv().ok()?;
    // Batches that queued up during the build are one change.
    while changes.try_recv().is_ok() {}
    Some(first)
}

/// The plugin folder itself and, with their subfolders, its subfolders that hold sources:
/// a build's `target/` or `node_modules/` can hold tens of thousands of folders, each a
/// watch of its own.
fn watched_folders(folder: &Path) -> anyhow::Result<Vec<(PathBuf, RecursiveMode)>> {
    let mut watched = vec![(folder.to_path_buf(), RecursiveMode::NonRecursive)];
    let entries =
        std::fs::read_dir(folder).with_context(|| format!("reading {}", folder.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() && is_source(folder, &path) {
            watched.push((path, RecursiveMode::Recursive));
        }
    }
    Ok(watched)
}

/// Whether a changed path is one of the plugin's sources: not a build product, a
/// toolchain's cache, a hidden file (editors' swap files) or the component itself.
fn is_source(folder: &Path, path: &Path) -> bool {
    let Ok(relative) = path.strip_prefix(folder) else {
        return false;
    };
    let hidden_or_ignored = relative.components().any(|part| {
        let part = part.as_os_str().to_string_lossy();
        part.starts_with('.') || part.ends_with('~') || IGNORED.contains(&part.as_ref())
    });
    let is_component =
        relative.components().count() == 1 && relative.extension().is_some_and(|e| e == "wasm");
    !hidden_or_ignored && !is_component
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_what_an_author_edits_not_what_a_build_writes() {
        let folder = Path::new("/p/my-role");
        for source in [
            "app.py",
            "src/lib.rs",
            "plugin.js",
            "my-role.toml",
            "pipelines/my-role.toml",
        ] {
            assert!(is_source(folder, &folder.join(source)), "{source}");
        }
        for product in [
            "my-role.wasm",
            "target/staircase/my-role.wasm",
            "node_modules/x/index.js",
            "__pycache__/app.cpython-312.pyc",
            "Cargo.lock",
            ".app.py.swp",
            "app.py~",
        ] {
            assert!(!is_source(folder, &folder.join(product)), "{product}");
        }
        assert!(!is_source(folder, Path::new("/elsewhere/app.py")));
    }

    #[test]
    fn build_folders_are_not_watched() {
        let dir =
            std::env::temp_dir().join(format!("staircase-dev-watched-{}", std::process::id()));
        for sub in [
            "src/inner",
            "pipelines",
            "target/debug",
            "node_modules/x",
            ".git",
        ] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let watched = watched_folders(&dir).unwrap();
        let mut names: Vec<_> = watched
            .iter()
            .map(|(path, mode)| {
                (
                    path.strip_prefix(&dir).unwrap().display().to_string(),
                    *mode,
                )
            })
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            names,
            [
                (String::new(), RecursiveMode::NonRecursive),
                ("pipelines".to_string(), RecursiveMode::Recursive),
                ("src".to_string(), RecursiveMode::Recursive),
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn install_copies_only_what_changed() {
        let dir =
            std::env::temp_dir().join(format!("staircase-dev-install-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (from, to) = (dir.join("a.wasm"), dir.join("out.wasm"));
        std::fs::write(&from, b"one").unwrap();
        assert!(install(&from, &to).unwrap());
        assert!(
            !install(&from, &to).unwrap(),
            "the same bytes are not written again"
        );
        std::fs::write(&from, b"two").unwrap();
        assert!(install(&from, &to).unwrap());
        assert_eq!(std::fs::read(&to).unwrap(), b"two");
        assert!(!dir.join(".out.wasm.partial").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
