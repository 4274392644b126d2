//! `staircase plugin new`: writes a plugin folder (source, manifest, build recipe, a sample
//! pipeline) from the templates embedded in the binary. It builds nothing and never
//! overwrites a file: an existing, non-empty folder is refused.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::templates::{self, Kind, Lang};
use crate::plugin::Manifest;
use crate::policy::PluginKind;

/// Memory of a Rust policy's instance: its data plus the allocator's slack.
const RUST_MEMORY_MIB: u32 = 16;
/// A Rust policy's call: it sits on the path of every chunk (the host's default).
const RUST_CALL_MS: u32 = 100;
/// Memory of an interpreter-backed instance: CPython's or SpiderMonkey's heap and tables
/// take about 100 MiB.
const INTERPRETED_MEMORY_MIB: u32 = 128;
/// The first call of a fresh Python or JavaScript instance warms the interpreter and takes
/// far longer than the 100 ms default (measured: 0.3-1 s for componentize-py's).
const INTERPRETED_CALL_MS: u32 = 2000;

/// `staircase plugin new` arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The plugin's name: the folder, the manifest, the component and the name pipelines use
    /// (ASCII letters, digits, '-' or '_', starting with a letter).
    pub name: String,
    /// What the plugin decides.
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// The language of its source.
    #[arg(long, value_enum)]
    pub lang: Lang,
    /// Where to create the folder `NAME` (default: the current folder).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Writes the folder and says what to run next.
pub fn run(args: Args) -> anyhow::Result<()> {
    let folder = args
        .dir
        .unwrap_or_else(|| PathBuf::from("."))
        .join(&args.name);
    let kind = PluginKind::from(args.kind);
    let files = files(&args.name, kind, args.lang)?;
    write(&folder, &files)?;
    println!(
        "created {} ({} {} plugin, {} files)",
        folder.display(),
        args.lang.name(),
        kind.name(),
        files.len()
    );
    if args.lang == Lang::Python {
        // Type hints for the author's editor; the plugin builds without them.
        match super::build::python_bindings(&folder, kind) {
            Ok(()) => println!(
                "bindings      wit_world/ (componentize-py's typed bindings, for an editor or mypy)"
            ),
            Err(error) => println!("no bindings   {error:#}"),
        }
    }
    println!("next:");
    println!("  staircase plugin build {}", folder.display());
    println!(
        "  staircase serve --plugins {0} --pipelines {0}/pipelines   # model \"{1}\"",
        folder.display(),
        args.name
    );
    Ok(())
}

/// The folder's files, as (path in the folder, text).
pub fn files(name: &str, kind: PluginKind, lang: Lang) -> anyhow::Result<Vec<(PathBuf, String)>> {
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        bail!("plugin name {name:?} must start with an ASCII letter");
    }
    let (memory_mib, call_ms, memory_why, call_why) = match lang {
        Lang::Rust => (
            RUST_MEMORY_MIB,
            RUST_CALL_MS,
            "Linear memory of one instance, in MiB: plenty for a Rust policy.",
            "Wall time of one call: a policy call sits on the path of every chunk.",
        ),
        Lang::Python | Lang::Js => (
            INTERPRETED_MEMORY_MIB,
            INTERPRETED_CALL_MS,
            "The interpreter's heap and tables (about 100 MiB).",
            "The first call of a fresh instance warms the interpreter: keep this high.",
        ),
    };
    let crate_name = name.replace('-', "_");
    let (memory, call) = (memory_mib.to_string(), call_ms.to_string());
    let values = [
        ("name", name),
        ("crate", crate_name.as_str()),
        ("kind", kind.name()),
        ("lang", lang.name()),
        ("memory_mib", memory.as_str()),
        ("call_ms", call.as_str()),
        ("memory_why", memory_why),
        ("call_why", call_why),
        ("build", ""),
    ];
    let fill = |template: &str| templates::fill(template, &values);
    let manifest = fill(templates::MANIFEST);
    // The template must make a manifest the host accepts (this also checks the name).
    Manifest::parse(&manifest).with_context(|| format!("plugin name {name:?}"))?;
    let mut files = vec![
        (PathBuf::from(format!("{name}.toml")), manifest),
        (
            Path::new("pipelines").join(format!("{name}.toml")),
            fill(templates::pipeline(kind)),
        ),
        (PathBuf::from("README.md"), fill(templates::README)),
        (
            PathBuf::from(".gitignore"),
            templates::GITIGNORE.to_string(),
        ),
    ];
    files.extend(
        templates::sources(lang, kind)
            .into_iter()
            .map(|(path, text)| (PathBuf::from(path), fill(text))),
    );
    match lang {
        Lang::Rust => {
            files.push((PathBuf::from("Cargo.toml"), fill(templates::RUST_CARGO)));
            files.extend(
                templates::SDK_FILES
                    .iter()
                    .map(|(path, text)| (Path::new("staircase-sdk").join(path), text.to_string())),
            );
        }
        Lang::Js => files.push((PathBuf::from("package.json"), fill(templates::JS_PACKAGE))),
        Lang::Python => {}
    }
    Ok(files)
}

/// Creates `folder` with `files`, refusing a folder that already holds anything.
fn write(folder: &Path, files: &[(PathBuf, String)]) -> anyhow::Result<()> {
    if folder
        .read_dir()
        .is_ok_and(|mut entries| entries.next().is_some())
    {
        bail!(
            "{} already exists and is not empty; choose another name or --dir",
            folder.display()
        );
    }
    for (path, text) in files {
        let path = folder.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_language_and_kind_gets_a_valid_manifest_and_pipeline() {
        for lang in [Lang::Rust, Lang::Python, Lang::Js] {
            for kind in PluginKind::ALL {
                let files = files("my-plugin", kind, lang).unwrap();
                let manifest = Manifest::parse(&files[0].1).unwrap();
                assert_eq!((manifest.name.as_str(), manifest.kind), ("my-plugin", kind));
                let interpreted = lang != Lang::Rust;
                assert_eq!(manifest.limits.call_ms > RUST_CALL_MS, interpreted);
                assert!(files[1].1.contains("\"my-plugin\""));
                assert!(files.iter().all(|(_, text)| !text.contains("{{")));
            }
        }
    }

    #[test]
    fn a_bad_name_is_refused() {
        assert!(files("1st", PluginKind::Role, Lang::Rust).is_err());
        assert!(files("a b", PluginKind::Role, Lang::Python).is_err());
    }
}
