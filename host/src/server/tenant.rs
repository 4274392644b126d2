//! Tenants: who a request is from. Each API key names a tenant; a tenant's runs, traces and
//! events are its own, its requests reuse only its own cached prefixes and speculation
//! history (its [`CacheNamespace`]), and it has its own share of the queue and, optionally,
//! a token budget ([`super::admission::Quota`]). A server without keys has one anonymous
//! tenant.
//!
//! Keys come from a TOML file (`--api-keys-file`, `[server] api_keys_file`), one table per
//! tenant, and at most one single key (one tenant named `default`: `--api-key`, whose
//! command line any local user can read in `ps`, `STAIRCASE_API_KEY`, a file holding just
//! the key, or a named environment variable):
//!
//! ```toml
//! [tenants.alice]
//! key = "sk-alice-…"
//! max_requests = 4              # running + queued; default: [limits] tenant_max_requests
//! tokens_per_minute = 20000     # default: [limits] tenant_tokens_per_minute (none)
//! [tenants.bob]
//! key = "sk-bob-…"
//! ```
//!
//! A key is checked by comparing SHA-256 digests in constant time against every tenant's,
//! so neither the time taken nor an early exit tells how much of a guess was right. This room
//! identifies callers; it must not decide what they may run (that is `admission`'s and the
//! handlers' job).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::http::{HeaderMap, header};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use super::admission::Quota;
use super::error::ApiError;
use crate::app::config::Limits;
use crate::cache::CacheNamespace;

/// The tenant a single key (`--api-key`, `--api-key-file`, `--api-key-env`) names.
pub const DEFAULT_TENANT: &str = "default";
/// The one tenant of a server without keys.
const ANONYMOUS_TENANT: &str = "anonymous";

/// One tenant as configured: its name, its key, and its quotas where they differ from
/// `[limits]`. `Debug` never shows the key.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    #[serde(skip)]
    pub name: String,
    pub key: String,
    /// Requests running or queued at once.
    pub max_requests: Option<usize>,
    /// Tokens (prompt + completion) per minute.
    pub tokens_per_minute: Option<u64>,
}

impl std::fmt::Debug for TenantSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantSpec")
            .field("name", &self.name)
            .field("key", &"<redacted>")
            .field("max_requests", &self.max_requests)
            .field("tokens_per_minute", &self.tokens_per_minute)
            .finish()
    }
}

impl TenantSpec {
    /// A tenant with `key` and the `[limits]` quotas.
    pub fn new(name: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            key: key.into(),
            max_requests: None,
            tokens_per_minute: None,
        }
    }
}

/// Why the tenants could not be set up; the server does not start.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("cannot read the API keys file {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("API keys file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("tenant `{0}` has an empty API key")]
    EmptyKey(String),
    #[error("tenants `{0}` and `{1}` have the same API key")]
    SameKey(String, String),
    #[error("tenant `{0}` is defined twice")]
    SameName(String),
    #[error("API key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: &'static str },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    tenants: BTreeMap<String, TenantSpec>,
}

/// Reads a keys file (the format is in the module docs).
pub fn read_keys_file(path: &Path) -> Result<Vec<TenantSpec>, TenantError> {
    let text = std::fs::read_to_string(path).map_err(|error| TenantError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    warn_if_readable_by_others(path);
    let file: KeysFile = toml::from_str(&text).map_err(|e| TenantError::Syntax {
        path: path.to_path_buf(),
        message: e.message().to_string(),
    })?;
    Ok(file
        .tenants
        .into_iter()
        .map(|(name, spec)| TenantSpec { name, ..spec })
        .collect())
}

/// Reads a file holding one key (`--api-key-file`, as llama-server's): the file's one
/// non-empty line, surrounding whitespace and the final newline dropped.
pub fn read_key_file(path: &Path) -> Result<String, TenantError> {
    let text = std::fs::read_to_string(path).map_err(|error| TenantError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    warn_if_readable_by_others(path);
    let key_file = |reason| TenantError::KeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let mut lines = text.lines().map(str::trim).filter(|line| !line.is_empty());
    let key = lines.next().ok_or_else(|| key_file("the file is empty"))?;
    if lines.next().is_some() {
        return Err(key_file(
            "the file holds more than one line; it takes one key (several tenants: \
             --api-keys-file)",
        ));
    }
    Ok(key.to_string())
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), "the API key file is readable by other users; chmod 600 it");
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

/// A caller, as the handlers see it. Cheap to clone; two handles of the same tenant are
/// equal.
#[derive(Clone, Debug)]
pub(crate) struct Tenant(Arc<TenantInner>);

#[derive(Debug)]
struct TenantInner {
    name: String,
    namespace: CacheNamespace,
    quota: Quota,
    /// Live run-event subscriptions of this tenant, over all its runs.
    subscribers: Arc<Semaphore>,
}

impl PartialEq for Tenant {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Tenant {
    fn new(name: &str, quota: Quota, limits: &Limits) -> Self {
        Self(Arc::new(TenantInner {
            name: name.to_string(),
            // Prefixed, so no tenant name can be the CLI's default (empty) namespace.
            namespace: CacheNamespace::new(&format!("tenant:{name}")),
            quota,
            subscribers: Arc::new(Semaphore::new(limits.tenant_subscribers.max(1))),
        }))
    }

    pub(crate) fn name(&self) -> &str {
        &self.0.name
    }

    /// Whose cached prefixes and past sessions this tenant's requests reuse.
    pub(crate) fn namespace(&self) -> &CacheNamespace {
        &self.0.namespace
    }

    pub(crate) fn quota(&self) -> &Quota {
        &self.0.quota
    }

    pub(crate) fn subscribers(&self) -> &Arc<Semaphore> {
        &self.0.subscribers
    }
    /// A tenant with the default limits, for unit tests of the rooms that use one.
    #[cfg(test)]
    pub(crate) fn test(name: &str) -> Self {
        let limits = Limits::default();
        Self::new(
            name,
            Quota::new(limits.tenant_max_requests(), None),
            &limits,
        )
    }
}

/// Every tenant of a server, by the digest of its key.
pub(crate) struct Tenants {
    keyed: Vec<([u8; 32], Tenant)>,
    /// The one tenant of a server without keys.
    anonymous: Option<Tenant>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl Tenants {
    /// The tenants of `specs`, with `limits` where a spec sets no quota; no specs: one
    /// anonymous tenant and no key check. Empty or shared keys and twice-named tenants are
    /// refused.
    pub(crate) fn new(specs: &[TenantSpec], limits: &Limits) -> Result<Self, TenantError> {
        if specs.is_empty() {
            let quota = Quota::new(
                limits.tenant_max_requests.unwrap_or(usize::MAX >> 4),
                limits.tenant_tokens_per_minute,
            );
            return Ok(Self {
                keyed: Vec::new(),
                anonymous: Some(Tenant::new(ANONYMOUS_TENANT, quota, limits)),
            });
        }
        let mut keyed: Vec<([u8; 32], Tenant)> = Vec::new();
        for spec in specs {
            if spec.key.trim().is_empty() {
                return Err(TenantError::EmptyKey(spec.name.clone()));
            }
            if let Some((_, other)) = keyed.iter().find(|(_, t)| t.name() == spec.name) {
                return Err(TenantError::SameName(other.name().to_string()));
            }
            let digest = digest(spec.key.trim());
            if let Some((_, other)) = keyed.iter().find(|(d, _)| *d == digest) {
                return Err(TenantError::SameKey(
                    other.name().to_string(),
                    spec.name.clone(),
                ));
            }
            let quota = Quota::new(
                spec.max_requests
                    .unwrap_or_else(|| limits.tenant_max_requests()),
                spec.tokens_per_minute.or(limits.tenant_tokens_per_minute),
            );
            keyed.push((digest, Tenant::new(&spec.name, quota, limits)));
        }
        Ok(Self {
            keyed,
            anonymous: None,
        })
    }

    /// Whether requests must carry a key (false only on a server without keys).
    pub(crate) fn requires_key(&self) -> bool {
        self.anonymous.is_none()
    }

    /// The tenant whose key the request carries (`Authorization: Bearer KEY`, the scheme in
    /// any case), or 401. Without keys, the anonymous tenant.
    pub(crate) fn authorize(&self, headers: &HeaderMap) -> Result<Tenant, ApiError> {
        if let Some(anonymous) = &self.anonymous {
            return Ok(anonymous.clone());
        }
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .filter(|key| !key.is_empty())
            .ok_or_else(ApiError::unauthorized)?;
        let given = digest(given);
        // Every digest is compared, with no early exit, so the time taken does not depend
        // on which tenant (if any) matched.
        let mut found = None;
        for (digest, tenant) in &self.keyed {
            if bool::from(digest.ct_eq(&given)) {
                found = Some(tenant);
            }
        }
        found.cloned().ok_or_else(ApiError::unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    fn two() -> Tenants {
        let specs = [TenantSpec::new("a", "key-a"), TenantSpec::new("b", "key-b")];
        Tenants::new(&specs, &Limits::default()).unwrap()
    }

    #[test]
    fn each_key_names_its_tenant_and_the_scheme_is_case_insensitive() {
        let tenants = two();
        let a = tenants.authorize(&headers("Bearer key-a")).unwrap();
        assert_eq!(a.name(), "a");
        assert_eq!(
            tenants.authorize(&headers("bearer key-b")).unwrap().name(),
            "b"
        );
        assert_eq!(tenants.authorize(&headers("BEARER key-a")).unwrap(), a);
        assert_ne!(a.namespace(), &CacheNamespace::default());
        for wrong in [
            "Bearer key-c",
            "Bearer ",
            "Bearer",
            "key-a",
            "Basic key-a",
            "",
        ] {
            let headers = if wrong.is_empty() {
                HeaderMap::new()
            } else {
                headers(wrong)
            };
            assert_eq!(
                tenants.authorize(&headers).unwrap_err().status,
                401,
                "{wrong}"
            );
        }
    }

    #[test]
    fn empty_and_shared_keys_are_refused_at_start() {
        let limits = Limits::default();
        let empty = [TenantSpec::new("a", " ")];
        assert!(matches!(
            Tenants::new(&empty, &limits),
            Err(TenantError::EmptyKey(_))
        ));
        let shared = [TenantSpec::new("a", "k"), TenantSpec::new("b", "k")];
        assert!(matches!(
            Tenants::new(&shared, &limits),
            Err(TenantError::SameKey(..))
        ));
    }

    #[test]
    fn without_keys_everyone_is_the_anonymous_tenant() {
        let tenants = Tenants::new(&[], &Limits::default()).unwrap();
        let tenant = tenants.authorize(&HeaderMap::new()).unwrap();
        assert_eq!(tenant.name(), ANONYMOUS_TENANT);
    }

    #[test]
    fn a_keys_file_names_tenants_and_their_quotas() {
        let dir = std::env::temp_dir().join(format!("staircase-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        std::fs::write(
            &path,
            "[tenants.alice]\nkey = \"ka\"\nmax_requests = 2\n[tenants.bob]\nkey = \"kb\"\n",
        )
        .unwrap();
        let specs = read_keys_file(&path).unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(
            (specs[0].name.as_str(), specs[0].max_requests),
            ("alice", Some(2))
        );
        assert!(!format!("{specs:?}").contains("ka"), "Debug hides keys");
        std::fs::write(&path, "[tenants.alice]\nkee = \"ka\"\n").unwrap();
        assert!(matches!(
            read_keys_file(&path),
            Err(TenantError::Syntax { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_file_holds_one_key() {
        let dir = std::env::temp_dir().join(format!("staircase-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, "  sk-one \n").unwrap();
        assert_eq!(read_key_file(&path).unwrap(), "sk-one");
        for bad in ["", "\n \n", "sk-one\nsk-two\n"] {
            std::fs::write(&path, bad).unwrap();
            assert!(
                matches!(read_key_file(&path), Err(TenantError::KeyFile { .. })),
                "{bad:?}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
