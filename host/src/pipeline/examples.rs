//! The example pipelines of `examples/pipelines/`, embedded in the binary so they run by
//! name (`--pipeline moa`) from anywhere. The files stay the documentation users copy from.

use std::path::Path;

use super::spec::{Pipeline, SpecError, SpecErrorKind};

/// The pipeline `staircase run` uses when none is named.
pub const DEFAULT_PIPELINE: &str = "moa";

/// Name and text of every embedded pipeline.
pub const BUILTIN: &[(&str, &str)] = &[
    ("moa", include_str!("../../../examples/pipelines/moa.toml")),
    (
        "moa-2layer",
        include_str!("../../../examples/pipelines/moa-2layer.toml"),
    ),
    (
        "debate",
        include_str!("../../../examples/pipelines/debate.toml"),
    ),
    (
        "plan-and-write",
        include_str!("../../../examples/pipelines/plan-and-write.toml"),
    ),
];

/// The embedded pipeline of that name.
pub fn builtin(name: &str) -> Option<Result<Pipeline, SpecError>> {
    BUILTIN
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, text)| Pipeline::parse(text, &format!("builtin:{n}")))
}

/// A pipeline by file path or by embedded name (a path wins when the file exists).
pub fn load(file_or_name: &str) -> Result<Pipeline, SpecError> {
    let path = Path::new(file_or_name);
    if path.exists() {
        return Pipeline::load(path);
    }
    builtin(file_or_name).unwrap_or_else(|| {
        Err(SpecError {
            origin: file_or_name.to_string(),
            line: None,
            kind: SpecErrorKind::Io(format!(
                "no such file, and no built-in pipeline of that name (built-in: {})",
                BUILTIN
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::spec::{DEFAULT_MODEL, NodeKind};
    use crate::policy::PluginKind;

    fn kinds(plugin: &str) -> Option<PluginKind> {
        match plugin {
            "proposer" => Some(PluginKind::Role),
            "moa-aggregator" => Some(PluginKind::Aggregator),
            _ => None,
        }
    }

    #[test]
    fn every_builtin_parses_and_binds_to_the_builtin_plugins() {
        for (name, _) in BUILTIN {
            let pipeline = builtin(name).unwrap().unwrap();
            pipeline
                .check_bindings(&kinds, &[DEFAULT_MODEL.to_string()])
                .unwrap();
            assert_eq!(&pipeline.name, name);
            assert_eq!(pipeline.node(pipeline.output).kind, NodeKind::Aggregator);
        }
        let moa = builtin(DEFAULT_PIPELINE).unwrap().unwrap();
        let proposers = moa
            .nodes
            .iter()
            .filter(|n| n.kind == NodeKind::Agent)
            .count();
        assert_eq!(proposers, 3);
    }

    #[test]
    fn files_and_names_load_and_unknown_names_are_explained() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/pipelines/debate.toml"
        );
        assert_eq!(load(path).unwrap().name, "debate");
        assert_eq!(load("moa-2layer").unwrap().nodes.len(), 6);
        let error = load("nonexistent").unwrap_err().to_string();
        assert!(error.contains("built-in: moa"), "{error}");
    }
}
