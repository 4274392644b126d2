//! Durations as milliseconds: the unit of every report, bench table and JSON field of this
//! crate, defined once so a figure means the same wherever it is shown. This room holds no
//! state and knows no other room.

use std::time::Duration;

/// `d` in milliseconds.
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Serializes a duration as milliseconds: `#[serde(serialize_with = "crate::millis::serialize")]`.
pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(millis(*d))
}

/// [`serialize`] for an optional duration (`None` stays null).
pub fn serialize_opt<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&millis(*d)),
        None => s.serialize_none(),
    }
}
