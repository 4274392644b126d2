//! What `staircase plugin new` and `plugin build` carry inside the binary: the template files
//! of each language and kind (`host/templates/plugin/`), the Rust SDK's sources and the WIT of
//! each world, so neither command needs a checkout of the repository. Text only: writing
//! files and running toolchains is the job of `new` and `build`.

use crate::policy::PluginKind;

/// A language `plugin new` scaffolds and `plugin build` builds without a `[build]` command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

impl Lang {
    /// The name messages use.
    pub fn name(self) -> &'static str {
        match self {
            Lang::Rust => "Rust",
            Lang::Python => "Python",
            Lang::Js => "JavaScript",
        }
    }
}

/// `--kind` of `plugin new`: the kinds of [`PluginKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Role,
    Aggregator,
    Compressor,
    Router,
    Guard,
}

impl From<Kind> for PluginKind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Role => PluginKind::Role,
            Kind::Aggregator => PluginKind::Aggregator,
            Kind::Compressor => PluginKind::Compressor,
            Kind::Router => PluginKind::Router,
            Kind::Guard => PluginKind::Guard,
        }
    }
}

/// The WIT package a kind's world comes from: routers export 0.2.0, guards 0.3.0, the other
/// kinds 0.1.0 (the SDK makes the same choice).
pub fn wit_of(kind: PluginKind) -> (&'static str, &'static str) {
    match kind {
        PluginKind::Router => ("v0.2.0", WIT_V0_2_0),
        PluginKind::Guard => ("v0.3.0", WIT_V0_3_0),
        _ => ("v0.1.0", WIT_V0_1_0),
    }
}

/// `staircase:agent@0.1.0`.
pub const WIT_V0_1_0: &str = include_str!("../../../../sdk/wit/v0.1.0/agent.wit");
/// `staircase:agent@0.2.0` (routers).
pub const WIT_V0_2_0: &str = include_str!("../../../../sdk/wit/v0.2.0/agent.wit");
/// `staircase:agent@0.3.0` (guards).
pub const WIT_V0_3_0: &str = include_str!("../../../../sdk/wit/v0.3.0/agent.wit");

/// Every WIT package in the binary, by its path under a WIT folder (`plugin wit` writes
/// them; the SDK's `wit/` has the same layout).
pub const WIT_FILES: &[(&str, &str)] = &[
    ("v0.1.0/agent.wit", WIT_V0_1_0),
    ("v0.2.0/agent.wit", WIT_V0_2_0),
    ("v0.3.0/agent.wit", WIT_V0_3_0),
];

/// The Rust SDK as `cargo package` ships it (manifest, source, WIT), written beside a new
/// Rust plugin because the SDK is not on crates.io.
pub const SDK_FILES: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../../../../sdk/Cargo.toml")),
    ("README.md", include_str!("../../../../sdk/README.md")),
    ("src/lib.rs", include_str!("../../../../sdk/src/lib.rs")),
    ("wit/v0.1.0/agent.wit", WIT_V0_1_0),
    ("wit/v0.2.0/agent.wit", WIT_V0_2_0),
    ("wit/v0.3.0/agent.wit", WIT_V0_3_0),
];

/// The plugin's manifest.
pub const MANIFEST: &str = include_str!("../../../templates/plugin/manifest.toml");
/// The plugin folder's README: the commands that build and run it.
pub const README: &str = include_str!("../../../templates/plugin/plugin-readme.md");
/// `.gitignore` of the plugin folder: build output stays out of version control.
pub const GITIGNORE: &str = include_str!("../../../templates/plugin/gitignore");

/// The sample pipeline that uses a plugin of `kind`.
pub fn pipeline(kind: PluginKind) -> &'static str {
    match kind {
        PluginKind::Role => include_str!("../../../templates/plugin/pipelines/role.toml"),
        PluginKind::Aggregator => {
            include_str!("../../../templates/plugin/pipelines/aggregator.toml")
        }
        PluginKind::Compressor => {
            include_str!("../../../templates/plugin/pipelines/compressor.toml")
        }
        PluginKind::Router => include_str!("../../../templates/plugin/pipelines/router.toml"),
        PluginKind::Guard => include_str!("../../../templates/plugin/pipelines/guard.toml"),
    }
}

/// `Cargo.toml` of a Rust plugin.
pub const RUST_CARGO: &str = include_str!("../../../templates/plugin/rust/Cargo.toml");
/// `package.json` of a JavaScript plugin (componentize-js, pinned).
pub const JS_PACKAGE: &str = include_str!("../../../templates/plugin/js/package.json");
/// The node script `plugin build` runs in a JavaScript plugin's folder.
pub const JS_BUILD: &str = include_str!("../../../templates/plugin/js/build.mjs");

/// The source files of a plugin of `kind` in `lang`, as (path in the folder, text).
pub fn sources(lang: Lang, kind: PluginKind) -> Vec<(&'static str, &'static str)> {
    match (lang, kind) {
        (Lang::Rust, PluginKind::Role) => {
            vec![(
                "src/lib.rs",
                include_str!("../../../templates/plugin/rust/role.rs"),
            )]
        }
        (Lang::Rust, PluginKind::Aggregator) => vec![(
            "src/lib.rs",
            include_str!("../../../templates/plugin/rust/aggregator.rs"),
        )],
        (Lang::Rust, PluginKind::Compressor) => vec![(
            "src/lib.rs",
            include_str!("../../../templates/plugin/rust/compressor.rs"),
        )],
        (Lang::Rust, PluginKind::Router) => vec![(
            "src/lib.rs",
            include_str!("../../../templates/plugin/rust/router.rs"),
        )],
        (Lang::Python, PluginKind::Role) => {
            vec![(
                "app.py",
                include_str!("../../../templates/plugin/python/role.py"),
            )]
        }
        (Lang::Python, PluginKind::Aggregator) => vec![
            (
                "app.py",
                include_str!("../../../templates/plugin/python/aggregator.py"),
            ),
            (
                "aggregator_policy.py",
                include_str!("../../../templates/plugin/python/aggregator_policy.py"),
            ),
        ],
        (Lang::Python, PluginKind::Compressor) => vec![(
            "app.py",
            include_str!("../../../templates/plugin/python/compressor.py"),
        )],
        (Lang::Python, PluginKind::Router) => vec![(
            "app.py",
            include_str!("../../../templates/plugin/python/router.py"),
        )],
        (Lang::Js, PluginKind::Role) => {
            vec![(
                "plugin.js",
                include_str!("../../../templates/plugin/js/role.js"),
            )]
        }
        (Lang::Js, PluginKind::Aggregator) => vec![(
            "plugin.js",
            include_str!("../../../templates/plugin/js/aggregator.js"),
        )],
        (Lang::Js, PluginKind::Compressor) => vec![(
            "plugin.js",
            include_str!("../../../templates/plugin/js/compressor.js"),
        )],
        (Lang::Js, PluginKind::Router) => vec![(
            "plugin.js",
            include_str!("../../../templates/plugin/js/router.js"),
        )],
        (Lang::Rust, PluginKind::Guard) => vec![(
            "src/lib.rs",
            include_str!("../../../templates/plugin/rust/guard.rs"),
        )],
        (Lang::Python, PluginKind::Guard) => vec![
            (
                "app.py",
                include_str!("../../../templates/plugin/python/guard.py"),
            ),
            (
                "guard_policy.py",
                include_str!("../../../templates/plugin/python/guard_policy.py"),
            ),
        ],
        (Lang::Js, PluginKind::Guard) => vec![(
            "plugin.js",
            include_str!("../../../templates/plugin/js/guard.js"),
        )],
    }
}

/// `template` with every `{{key}}` replaced by its value.
pub fn fill(template: &str, values: &[(&str, &str)]) -> String {
    values
        .iter()
        .fold(template.to_string(), |text, (key, value)| {
            text.replace(&format!("{{{{{key}}}}}", key = key), value)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_replaces_every_placeholder() {
        assert_eq!(
            fill(
                "{{name}} is a {{kind}}; {{name}}",
                &[("name", "x"), ("kind", "role")]
            ),
            "x is a role; x"
        );
    }

    #[test]
    fn the_embedded_sdk_is_the_packaged_one() {
        // The SDK's manifest names no workspace and no path outside the crate, so the copy
        // `plugin new` writes builds on its own.
        let manifest = SDK_FILES[0].1;
        assert!(!manifest.contains("workspace = true") && !manifest.contains("path ="));
        let lib = SDK_FILES[2].1;
        assert!(lib.contains("path: \"wit/v0.1.0\"") && !lib.contains("../wit"));
    }
}
