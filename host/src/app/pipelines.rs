//! The pipeline table: every pipeline the host serves, by name, parsed and checked once.
//!
//! The built-in pipelines and the `*.toml` files of the pipeline folders are read when the
//! table is built; a file that changes is read again, checked (syntax, graph, plugin and model
//! bindings), and only then swapped in (`arc-swap`). A run holds the `Arc` of the version it
//! started on, so a swap never disturbs it. A broken file is rejected with its file-and-line
//! error, logged and counted, and the version before it keeps serving. This room never runs
//! a pipeline.
//!
//! A file is known by its path, not by the name it declares: a file declaring a built-in's
//! name is refused unless the operator lists the name in `[sandbox] pipeline_overrides`, and a
//! file declaring a name another file serves is refused, both with a message naming the two.
//! Files are read as regular files within [`MAX_PIPELINE_BYTES`] (never through a symlink or
//! from a FIFO), and a changed file is read only once it stayed the same for [`SETTLE`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::pipeline::examples::BUILTIN;
use crate::pipeline::{Pipeline, SpecError};
use crate::sync::lock;

/// Quiet time after the last file event before reading a pipeline file again: editors write
/// a file in several events, and a half-written file must not be judged.
pub const DEBOUNCE: Duration = Duration::from_millis(20);
/// How long a changed file must stay unchanged before it is judged: a file written slowly in
/// place would otherwise be served as the valid prefix on disk at the moment of reading.
pub const SETTLE: Duration = Duration::from_millis(100);
/// Largest pipeline file read: the shipped ones are a few KiB.
pub const MAX_PIPELINE_BYTES: u64 = 1 << 20;

/// Checks a parsed pipeline against what the host has (plugins and models).
pub type Check = dyn Fn(&Pipeline) -> Result<(), SpecError> + Send + Sync;

/// One version of a pipeline.
#[derive(Debug, Serialize)]
pub struct PipelineVersion {
    #[serde(skip)]
    pub pipeline: Arc<Pipeline>,
    pub name: String,
    /// The file, or `None` for a built-in.
    pub path: Option<PathBuf>,
    /// sha256 of the file's text, hex.
    pub sha256: String,
    /// Counts every version the table accepted; a newer version has a larger one.
    pub generation: u64,
}

impl PipelineVersion {
    /// A short label for responses: `name@generation:sha-prefix`.
    pub fn label(&self) -> String {
        format!("{}@{}:{}", self.name, self.generation, &self.sha256[..12])
    }
}

/// The last file the table refused.
#[derive(Clone, Debug, Serialize)]
pub struct Rejection {
    pub path: PathBuf,
    pub error: String,
    pub at_unix_ms: u128,
}

/// Pipelines by name, swappable while serving.
pub struct PipelineTable {
    table: ArcSwap<BTreeMap<String, Arc<PipelineVersion>>>,
    check: Box<Check>,
    dirs: Vec<PathBuf>,
    /// Serialises updates (readers never wait).
    update: Mutex<()>,
    generation: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    last_rejection: Mutex<Option<Rejection>>,
    watcher: Mutex<Option<crate::watch::Watch>>,
    /// Built-in names a file may take over.
    overrides: BTreeSet<String>,
}

impl PipelineTable {
    /// The built-ins, then every `*.toml` of `dirs` (a file wins over a built-in of its name).
    /// Built-ins must pass `check`; a broken file is rejected and logged, not fatal.
    pub fn new(dirs: Vec<PathBuf>, check: Box<Check>) -> Result<Arc<Self>, SpecError> {
        Self::with_overrides(dirs, check, BTreeSet::new())
    }

    /// [`PipelineTable::new`] where files may take over the built-ins named in `overrides`.
    pub fn with_overrides(
        dirs: Vec<PathBuf>,
        check: Box<Check>,
        overrides: BTreeSet<String>,
    ) -> Result<Arc<Self>, SpecError> {
        let table = Arc::new(Self {
            table: ArcSwap::from_pointee(BTreeMap::new()),
            check,
            dirs,
            update: Mutex::new(()),
            generation: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            last_rejection: Mutex::new(None),
            watcher: Mutex::new(None),
            overrides,
        });
        for (name, text) in BUILTIN {
            let pipeline = Pipeline::parse(text, &format!("builtin:{name}"))?;
            (table.check)(&pipeline)?;
            table.install(pipeline, None, text);
        }
        table.rescan();
        Ok(table)
    }

    /// The version now serving `name`.
    pub fn get(&self, name: &str) -> Option<Arc<PipelineVersion>> {
        self.table.load().get(name).cloned()
    }

    /// Every pipeline now served, by name.
    pub fn list(&self) -> Vec<Arc<PipelineVersion>> {
        self.table.load().values().cloned().collect()
    }

    /// Versions accepted and files rejected since the table was built.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.accepted.load(Ordering::Relaxed),
            self.rejected.load(Ordering::Relaxed),
        )
    }

    pub fn last_rejection(&self) -> Option<Rejection> {
        lock(&self.last_rejection).clone()
    }

    /// The folders this table reads.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Reads a file, checks it and makes it serve its name; on error the previous version
    /// (if any) keeps serving and the rejection is logged and counted.
    pub fn load_file(&self, path: &Path) -> Result<Arc<PipelineVersion>, SpecError> {
        let result = read_pipeline_file(path).and_then(|text| {
            let pipeline = Pipeline::parse(&text, &path.display().to_string())?;
            self.check_claim(&pipeline, path)?;
            (self.check)(&pipeline)?;
            Ok((pipeline, text))
        });
        match result {
            Ok((pipeline, text)) => {
                let version = self.install(pipeline, Some(path.to_path_buf()), &text);
                tracing::info!(pipeline = %version.label(), path = %path.display(), "pipeline loaded");
                Ok(version)
            }
            Err(error) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "pipeline rejected; the previous version keeps serving");
                *lock(&self.last_rejection) = Some(Rejection {
                    path: path.to_path_buf(),
                    error: error.to_string(),
                    at_unix_ms: SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis()),
                });
                Err(error)
            }
        }
    }

    /// Refuses a file declaring a name a built-in (not listed in the overrides) or another
    /// file serves: a pipeline is its file.
    fn check_claim(&self, pipeline: &Pipeline, path: &Path) -> Result<(), SpecError> {
        let name = &pipeline.name;
        let claimed = |reason: String| SpecError {
            origin: path.display().to_string(),
            line: None,
            kind: crate::pipeline::SpecErrorKind::Io(reason),
        };
        let builtin = BUILTIN.iter().any(|(n, _)| n == name);
        match self.table.load().get(name).map(|v| v.path.clone()) {
            Some(Some(other)) if other != path => Err(claimed(format!(
                "declares the name `{name}`, which {} serves; the first file keeps it (rename one of them)",
                other.display()
            ))),
            _ if builtin && !self.overrides.contains(name) => Err(claimed(format!(
                "declares the name `{name}` of a built-in pipeline; list `{name}` in `[sandbox] pipeline_overrides` to replace the built-in"
            ))),
            _ => Ok(()),
        }
    }

    /// Reads every file of the folders again (what `POST /admin/reload` does); a file whose
    /// text has not changed keeps its version. Returns the files rejected.
    pub fn rescan(&self) -> Vec<SpecError> {
        let mut errors = Vec::new();
        for dir in &self.dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                tracing::warn!(dir = %dir.display(), "pipeline folder cannot be read");
                continue;
            };
            let mut paths: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_pipeline_file(p))
                .collect();
            paths.sort();
            for path in paths {
                if self.unchanged(&path) {
                    continue;
                }
                if let Err(error) = self.load_file(&path) {
                    errors.push(error);
                }
            }
        }
        errors
    }

    /// Watches the folders: a changed file is read again after [`DEBOUNCE`], a removed one
    /// stops serving (its built-in, if any, serves again). Stops when the table is dropped.
    pub fn watch(self: &Arc<Self>) -> Result<(), notify::Error> {
        let table = Arc::downgrade(self);
        let watch = crate::watch::watch(
            &crate::watch::flat(&self.dirs),
            DEBOUNCE,
            "pipeline-reload",
            move |batch| reload_batch(&table, batch),
        )?;
        *lock(&self.watcher) = Some(watch);
        Ok(())
    }

    fn unchanged(&self, path: &Path) -> bool {
        let Ok(text) = read_pipeline_file(path) else {
            return false;
        };
        let sha = sha256(&text);
        self.table
            .load()
            .values()
            .any(|v| v.path.as_deref() == Some(path) && v.sha256 == sha)
    }

    fn install(
        &self,
        pipeline: Pipeline,
        path: Option<PathBuf>,
        text: &str,
    ) -> Arc<PipelineVersion> {
        let _guard = lock(&self.update);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.accepted.fetch_add(1, Ordering::Relaxed);
        let version = Arc::new(PipelineVersion {
            name: pipeline.name.clone(),
            pipeline: Arc::new(pipeline),
            path: path.clone(),
            sha256: sha256(text),
            generation,
        });
        let mut table = BTreeMap::clone(&self.table.load());
        // A file that now declares another name stops serving its old one.
        if let Some(path) = &path {
            table.retain(|name, v| v.path.as_ref() != Some(path) || *name == version.name);
        }
        table.insert(version.name.clone(), version.clone());
        self.table.store(Arc::new(table));
        version
    }

    fn remove(&self, path: &Path) {
        let _guard = lock(&self.update);
        let mut table = BTreeMap::clone(&self.table.load());
        let names: Vec<String> = table
            .iter()
            .filter(|(_, v)| v.path.as_deref() == Some(path))
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            table.remove(&name);
            if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name)
                && let Ok(pipeline) = Pipeline::parse(text, &format!("builtin:{name}"))
            {
                let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
                table.insert(
                    name.clone(),
                    Arc::new(PipelineVersion {
                        name: name.clone(),
                        pipeline: Arc::new(pipeline),
                        path: None,
                        sha256: sha256(text),
                        generation,
                    }),
                );
            }
            tracing::info!(pipeline = name, path = %path.display(), "pipeline file removed");
        }
        self.table.store(Arc::new(table));
    }
}

/// Reads each pipeline file a batch of changes touched, once (a removed one stops serving);
/// `false` once the table is gone.
fn reload_batch(table: &Weak<PipelineTable>, batch: crate::watch::Batch) -> bool {
    let Some(table) = table.upgrade() else {
        return false;
    };
    for path in batch.into_keys().filter(|p| is_pipeline_file(p)) {
        if path.symlink_metadata().is_err() {
            table.remove(&path);
        } else if settled(&path) && !table.unchanged(&path) {
            let _ = table.load_file(&path);
        }
    }
    true
}

/// Whether `path` stays the same for [`SETTLE`] (then it is judged; otherwise its writer's
/// next event brings it back here). Waits on the reload thread, never a request's.
fn settled(path: &Path) -> bool {
    let before = read_pipeline_file(path).ok();
    std::thread::sleep(SETTLE);
    before.is_some() && read_pipeline_file(path).ok() == before
}

/// A pipeline file's text: a regular file (no symlink, FIFO or device) within
/// [`MAX_PIPELINE_BYTES`].
fn read_pipeline_file(path: &Path) -> Result<String, SpecError> {
    crate::plugin::folder::read_regular_text(path, MAX_PIPELINE_BYTES).map_err(|e| SpecError {
        origin: path.display().to_string(),
        line: None,
        kind: crate::pipeline::SpecErrorKind::Io(e.to_string()),
    })
}

fn is_pipeline_file(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "toml")
}

fn sha256(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept_all() -> Box<Check> {
        Box::new(|_| Ok(()))
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("staircase-pipelines-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const ONE_NODE: &str = "name = \"solo\"\n[[nodes]]\nid = \"a\"\nkind = \"agent\"\nplugin = \"proposer\"\nmodel = \"default\"\n[[nodes]]\nid = \"agg\"\nkind = \"aggregator\"\nplugin = \"moa-aggregator\"\nmodel = \"default\"\ninputs = [\"a\"]\n";

    #[test]
    fn a_broken_file_is_rejected_with_its_line_and_the_old_version_keeps_serving() {
        let dir = scratch("broken");
        let file = dir.join("solo.toml");
        std::fs::write(&file, ONE_NODE).unwrap();
        let table = PipelineTable::new(vec![dir.clone()], accept_all()).unwrap();
        let first = table.get("solo").expect("the file's pipeline is served");
        assert!(table.get("moa").is_some(), "built-ins are served too");

        std::fs::write(&file, format!("{ONE_NODE}\n[[nodes]]\nid = 3\n")).unwrap();
        let error = table.load_file(&file).unwrap_err();
        assert!(error.line.is_some(), "{error}");
        assert!(error.to_string().contains("solo.toml:"), "{error}");
        assert_eq!(table.get("solo").unwrap().generation, first.generation);
        assert_eq!(table.counts().1, 1);
        assert!(table.last_rejection().unwrap().error.contains("solo.toml"));

        // A cycle is refused the same way.
        let cycle = ONE_NODE.replace("id = \"a\"\n", "id = \"a\"\ninputs = [\"agg\"]\n");
        std::fs::write(&file, cycle).unwrap();
        assert!(table.load_file(&file).is_err());
        assert_eq!(table.get("solo").unwrap().generation, first.generation);

        std::fs::write(&file, ONE_NODE).unwrap();
        assert!(table.rescan().is_empty());
        let same = table.get("solo").unwrap();
        assert_eq!(
            same.generation, first.generation,
            "unchanged text keeps its version"
        );
        std::fs::write(&file, format!("{ONE_NODE}# edited\n")).unwrap();
        assert!(table.rescan().is_empty());
        assert!(table.get("solo").unwrap().generation > first.generation);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_claiming_a_builtins_or_another_files_name_is_refused_naming_both() {
        let dir = scratch("claims");
        std::fs::write(dir.join("a.toml"), ONE_NODE).unwrap();
        std::fs::write(dir.join("b.toml"), ONE_NODE).unwrap();
        let squat = ONE_NODE.replace("name = \"solo\"", "name = \"moa\"");
        std::fs::write(dir.join("moa.toml"), &squat).unwrap();
        let table = PipelineTable::new(vec![dir.clone()], accept_all()).unwrap();
        let solo = table.get("solo").unwrap();
        assert_eq!(solo.path.as_deref(), Some(dir.join("a.toml").as_path()));
        let error = table
            .load_file(&dir.join("b.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("b.toml") && error.contains("a.toml"),
            "{error}"
        );
        assert_eq!(
            table.get("moa").unwrap().path,
            None,
            "the built-in keeps its name"
        );
        let error = table
            .load_file(&dir.join("moa.toml"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("pipeline_overrides"), "{error}");

        let allowing = PipelineTable::with_overrides(
            vec![dir.clone()],
            accept_all(),
            ["moa".to_string()].into(),
        )
        .unwrap();
        assert_eq!(
            allowing.get("moa").unwrap().path.as_deref(),
            Some(dir.join("moa.toml").as_path()),
            "a listed override serves"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_check_failure_is_a_rejection() {
        let dir = scratch("check");
        std::fs::write(dir.join("solo.toml"), ONE_NODE).unwrap();
        let check: Box<Check> = Box::new(|p: &Pipeline| {
            if p.name == "solo" {
                Err(SpecError {
                    origin: p.origin.clone(),
                    line: Some(3),
                    kind: crate::pipeline::SpecErrorKind::NoNodes,
                })
            } else {
                Ok(())
            }
        });
        let table = PipelineTable::new(vec![dir.clone()], check).unwrap();
        assert!(table.get("solo").is_none());
        assert_eq!(table.counts().1, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
