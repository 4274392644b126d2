//! The compiled-code cache: precompiled components on disk, keyed by the sha256 of the
//! component bytes and the engine's compatibility hash (wasmtime version and every setting
//! that changes generated code). It is the only place `.cwasm` files are ever deserialized
//! from: they are files this host wrote itself, and deserializing anything else would run
//! arbitrary machine code. Loaded files are memory-mapped, so entries are only ever
//! replaced by rename, never rewritten.

use std::hash::Hasher;
use std::path::PathBuf;
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

pub(crate) struct CodeCache {
    dir: PathBuf,
    engine_hash: String,
}

impl CodeCache {
    pub(crate) fn new(dir: PathBuf, engine: &Engine) -> Result<Self, PluginError> {
        std::fs::create_dir_all(&dir).map_err(|error| PluginError::Io {
            path: dir.clone(),
            error,
        })?;
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
