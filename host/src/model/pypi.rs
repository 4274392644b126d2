//! A package registry speaking PyPI's JSON API: which wheel a package (at a version) has,
//! with the sha256 the registry publishes for it, and downloading a wheel so that a file
//! appears under its final name only once its digest matched. This room knows nothing of
//! models or GGUF; it must not keep a file whose digest it did not check.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use indicatif::ProgressBar;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{ModelError, io_error};

/// Overrides the registry's JSON API root, as pip's `PIP_INDEX_URL` overrides its index: a
/// mirror, or a local index in tests. `{index}/{package}/json` is a package's metadata.
pub const INDEX_ENV: &str = "STAIRCASE_PYPI_INDEX";
/// PyPI's JSON API root.
pub const DEFAULT_INDEX: &str = "https://pypi.org/pypi";
/// A registry that accepts no connection within this long is down, not slow.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// One wheel as the registry lists it.
#[derive(Clone, Debug, Deserialize)]
pub struct WheelFile {
    pub filename: String,
    pub url: String,
    packagetype: String,
    pub digests: Digests,
    /// Bytes, as the registry publishes them (for the progress bar only).
    #[serde(default)]
    pub size: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Digests {
    pub sha256: String,
}

#[derive(Deserialize)]
struct Project {
    info: Info,
    #[serde(default)]
    urls: Vec<WheelFile>,
    #[serde(default)]
    releases: std::collections::BTreeMap<String, Vec<WheelFile>>,
}

#[derive(Deserialize)]
struct Info {
    version: String,
}

/// A registry client.
pub struct Registry {
    client: reqwest::Client,
    index: String,
}

impl Registry {
    /// The registry at `index` (a JSON API root such as [`DEFAULT_INDEX`]).
    pub fn new(index: &str) -> Result<Self, ModelError> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("staircase/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|source| ModelError::Http {
                url: index.to_string(),
                source,
            })?;
        Ok(Self {
            client,
            index: index.trim_end_matches('/').to_string(),
        })
    }

    /// The registry named by [`INDEX_ENV`], else PyPI.
    pub fn from_env() -> Result<Self, ModelError> {
        let index = std::env::var(INDEX_ENV)
            .ok()
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| DEFAULT_INDEX.to_string());
        Self::new(&index)
    }

    /// The wheel of `package` at `version` (the newest release when `None`).
    pub async fn wheel(
        &self,
        package: &str,
        version: Option<&str>,
    ) -> Result<WheelFile, ModelError> {
        let url = format!("{}/{package}/json", self.index);
        let registry = |reason: String| ModelError::Registry {
            package: package.to_string(),
            reason,
        };
        let response = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|source| ModelError::Http {
                url: url.clone(),
                source,
            })?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Err(registry(format!("not found in the index {}", self.index)));
        }
        let project: Project = response
            .error_for_status()
            .map_err(|source| ModelError::Http {
                url: url.clone(),
                source,
            })?
            .json()
            .await
            .map_err(|source| ModelError::Http {
                url: url.clone(),
                source,
            })?;
        let files = match version {
            None => project.urls,
            Some(v) if project.info.version == v && !project.urls.is_empty() => project.urls,
            Some(v) => project
                .releases
                .get(v)
                .cloned()
                .ok_or_else(|| registry(format!("has no release {v}")))?,
        };
        files
            .into_iter()
            .find(|f| f.packagetype == "bdist_wheel")
            .ok_or_else(|| {
                registry(format!(
                    "release {} has no wheel",
                    version.unwrap_or(&project.info.version)
                ))
            })
    }

    /// Downloads `wheel` to `dest`, advancing `progress` by each chunk: the bytes go to a
    /// temporary file beside `dest`, which is renamed to `dest` only if its sha256 is the one
    /// the registry published (and removed otherwise).
    pub async fn download(
        &self,
        wheel: &WheelFile,
        dest: &Path,
        progress: &ProgressBar,
    ) -> Result<(), ModelError> {
        let partial = temporary_beside(dest);
        let result = self.download_to(wheel, &partial, progress).await;
        match result {
            Ok(()) => std::fs::rename(&partial, dest).map_err(io_error(dest)),
            Err(error) => {
                let _ = std::fs::remove_file(&partial);
                Err(error)
            }
        }
    }

    async fn download_to(
        &self,
        wheel: &WheelFile,
        path: &Path,
        progress: &ProgressBar,
    ) -> Result<(), ModelError> {
        let http = |source| ModelError::Http {
            url: wheel.url.clone(),
            source,
        };
        let response = self
            .client
            .get(&wheel.url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(http)?;
        let mut file = std::fs::File::create(path).map_err(io_error(path))?;
        let mut hasher = Sha256::new();
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(http)?;
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(io_error(path))?;
            progress.inc(chunk.len() as u64);
        }
        file.flush().map_err(io_error(path))?;
        let actual = hex::encode(hasher.finalize());
        check_digest(wheel, &actual)
    }
}

/// Whether the file at `path` is `wheel` as published (its sha256 matches).
pub fn is_verified(wheel: &WheelFile, path: &Path) -> Result<bool, ModelError> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(io_error(path)(error)),
    };
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = file.read(&mut buffer).map_err(io_error(path))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(check_digest(wheel, &hex::encode(hasher.finalize())).is_ok())
}

fn check_digest(wheel: &WheelFile, actual: &str) -> Result<(), ModelError> {
    if actual.eq_ignore_ascii_case(&wheel.digests.sha256) {
        Ok(())
    } else {
        Err(ModelError::Checksum {
            file: wheel.filename.clone(),
            expected: wheel.digests.sha256.clone(),
            actual: actual.to_string(),
        })
    }
}

/// A unique hidden name beside `path`: concurrent pulls must not write into each other's
/// files, and a listing of the folder skips hidden ones.
pub fn temporary_beside(path: &Path) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.{}.{nanos}.part", std::process::id()))
}
