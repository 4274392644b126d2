//! A run's one id: minted once by whoever starts the run, then the same in the server's
//! response, its run registry, the report and the routing hint every engine request of the
//! run carries. Random (128 bits from the OS), so ids never repeat across processes or
//! restarts and reveal nothing about other runs. This room only names runs.

use std::fmt;

/// One run's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RunId([u8; 16]);

/// The OS gave no random bytes (it never does on a working Linux).
#[derive(Debug, thiserror::Error)]
#[error("the OS gave no random bytes for a run id: {0}")]
pub struct RunIdError(String);

impl RunId {
    /// A new id, random.
    pub fn random() -> Result<Self, RunIdError> {
        let mut bits = [0u8; 16];
        getrandom::fill(&mut bits).map_err(|e| RunIdError(e.to_string()))?;
        Ok(Self(bits))
    }

    /// The id as the routing hint's number ([`crate::routing::RouteHint`]): its first 64
    /// bits, as unique among runs in flight as the whole id.
    pub fn routing_key(&self) -> u64 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(first)
    }
}

impl fmt::Display for RunId {
    /// 32 hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl serde::Serialize for RunId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_print_as_hex() {
        let (a, b) = (RunId::random().unwrap(), RunId::random().unwrap());
        assert_ne!(a, b);
        assert_ne!(a.routing_key(), b.routing_key());
        let text = a.to_string();
        assert_eq!(text.len(), 32);
        assert!(text.chars().all(|c| c.is_ascii_hexdigit()), "{text}");
        assert!(text.starts_with(&format!("{:016x}", a.routing_key())));
    }
}
