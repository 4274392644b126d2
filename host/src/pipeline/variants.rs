//! Variants a pipeline file declares for load-adaptive runs, and its latency budget.
//!
//! ```toml
//! latency_budget_ms = 4000        # the answer's critical path should fit in this
//! quality = 0.55                  # what the file's own nodes scored (`staircase tune`)
//! [[variants]]                    # a cheaper alternative, best first
//! name = "2 proposers"
//! quality = 0.5
//! [variants.stream]
//! policy = "staircase"
//! [[variants.nodes]]              # a whole pipeline body, as at the top level
//! id = "analyst"
//! ...
//! ```
//! Each variant is parsed as a pipeline of its own (named `FILE#NAME` in errors). Which one
//! runs is decided per request by `tune::adaptive`; this module only reads the file.

use std::time::Duration;

use serde::Serialize;

use super::spec::{Pipeline, SpecError, SpecErrorKind};

/// One declared alternative.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeclaredVariant {
    pub name: String,
    /// The quality it scored (higher is better), if known.
    pub quality: Option<f64>,
    #[serde(skip)]
    pub pipeline: Pipeline,
}

/// What a file says about choosing between its variants.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Adaptive {
    /// The pipeline's latency budget (a request may bring its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_budget: Option<Duration>,
    /// The quality of the file's own nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quality: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<DeclaredVariant>,
}

/// Parses the `[[variants]]` tables of the file `origin`.
pub(super) fn parse(
    tables: &[toml::Table],
    origin: &str,
) -> Result<Vec<DeclaredVariant>, SpecError> {
    let mut out: Vec<DeclaredVariant> = Vec::new();
    for (i, table) in tables.iter().enumerate() {
        let bad = |reason: String| SpecError {
            origin: origin.to_string(),
            line: None,
            kind: SpecErrorKind::BadField {
                node: format!("variants #{}", i + 1),
                reason,
            },
        };
        let mut table = table.clone();
        let name = match table.remove("name") {
            Some(toml::Value::String(name)) => name,
            _ => return Err(bad("a variant needs `name = \"...\"`".into())),
        };
        if out.iter().any(|v| v.name == name) {
            return Err(bad(format!("variant `{name}` is declared twice")));
        }
        let quality = match table.remove("quality") {
            None => None,
            Some(toml::Value::Float(q)) => Some(q),
            Some(toml::Value::Integer(q)) => Some(q as f64),
            Some(_) => return Err(bad("`quality` must be a number".into())),
        };
        if table.contains_key("variants") || table.contains_key("latency_budget_ms") {
            return Err(bad("a variant cannot declare variants or a budget".into()));
        }
        table
            .entry("name")
            .or_insert_with(|| toml::Value::String(name.clone()));
        let text = toml::to_string(&table).map_err(|e| bad(e.to_string()))?;
        let pipeline = Pipeline::parse(&text, &format!("{origin}#{name}"))?;
        out.push(DeclaredVariant {
            name,
            quality,
            pipeline,
        });
    }
    Ok(out)
}
