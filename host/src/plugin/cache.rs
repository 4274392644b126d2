//! The compiled-code cache: precompiled components on disk, keyed by the sha256 of the
//! component bytes and the engine's compatibility hash (wasmtime version and every setting
//! that changes generated code). It is the only place `.cwasm` files are ever deserialized
//! from: they are files this host wrote itself, and deserializing anything else would run
//! arbitrary machine code. Loaded files are memory-mapped, so entries are only ever
//! replaced by rename, never rewritten. The folder is created owner-only (0700) and checked
//! at start: one another user could write to would let them plant native code, so the
//! host refuses to use it.

use std::hash::Hasher;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::error::PluginError;

/// Feeds `Hash` output into sha256, so the engine hash is stable across processes (the
/// std hasher is randomly keyed).
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        // Only `write` is used; the digest is read with `finalize` below.
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// Owner-only: files in the cache are loaded as native code.
const CACHE_DIR_MODE: u32 = 0o700;

/// Refuses a cache folder that is a symlink, not ours, or open to others; narrows one of
/// ours that is merely readable by others (created by an older version) to owner-only.
fn check_private(dir: &Path) -> Result<(), PluginError> {
    let refuse = |reason: String| {
        PluginError::Runtime(format!(
            "the compiled-plugin cache {} {reason}; fix it or set another cache folder",
            dir.display()
        ))
    };
    let meta = std::fs::symlink_metadata(dir).map_err(|error| PluginError::Io {
        path: dir.to_path_buf(),
        error,
    })?;
    if !meta.file_type().is_dir() {
        return Err(refuse("is not a folder (a symlink is refused too)".into()));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(refuse(format!("belongs to user {}, not {me}", meta.uid())));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "is writable by other users (mode {:o})",
            meta.mode() & 0o777
        )));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(CACHE_DIR_MODE)).map_err(
            |error| PluginError::Io {
                path: dir.to_path_buf(),
                error,
            },
        )?;
    }
    Ok(())
}

pub(crate) struct CodeCache {
    dir: PathBuf,
    engine_hash: String,
}

impl CodeCache {
    pub(crate) fn new(dir: PathBuf, engine: &Engine) -> Result<Self, PluginError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(CACHE_DIR_MODE)
            .create(&dir)
            .map_err(|error| PluginError::Io {
                path: dir.clone(),
                error,
            })?;
        check_private(&dir)?;
        let mut hasher = Sha256Hasher(Sha256::new());
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
        let engine_hash = hex::encode(&hasher.0.finalize()[..8]);
        Ok(Self { dir, engine_hash })
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{sha256}-{}.cwasm", self.engine_hash))
    }

    /// The cached compiled component of `sha256`, if there is a usable one.
    pub(crate) fn lookup(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        let path = self.path(sha256);
        if !path.exists() {
            return None;
        }
        // SAFETY: the file is in our own cache folder, named by the sha256 of the component
        // it was compiled from and by this engine's compatibility hash, and only `store`
        // below writes there (via rename, so never half-written).
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "discarding unusable cached code");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Writes atomically (a temporary file of its own, then rename): cached files are
    /// memory-mapped by running plugins, so an existing file is never written in place.
    /// A failure only costs a recompile later.
    pub(crate) fn store(&self, sha256: &str, compiled: &[u8]) {
        let path = &self.path(sha256);
        static WRITES: AtomicU64 = AtomicU64::new(0);
        let n = WRITES.fetch_add(1, Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
        let written = std::fs::write(&tmp, compiled).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(error) = written {
            tracing::warn!(path = %path.display(), %error, "cannot cache compiled plugin");
            let _ = std::fs::remove_file(&tmp);
        }
    }
}
