//! Pipeline files: the TOML format, parsing with positions, and validation.
//!
//! A file becomes a [`Pipeline`]: its nodes in an order where every node comes after its
//! inputs, each incoming edge with its streaming policy. Structural checks (missing fields,
//! unknown inputs, cycles, a single output) happen while parsing; [`Pipeline::check_bindings`]
//! checks plugin names, plugin kinds and model names against what the host has. Every error
//! names the file and, where it has one, the line. This module must not run anything.
//!
//! ```toml
//! name = "moa"
//! [stream]                       # default for every edge: staircase or complete
//! policy = "staircase"
//! chunk_tokens = [2, 8, 16, 32]  # chunk sizes; the last one repeats
//!
//! [[nodes]]
//! id = "analyst"
//! kind = "agent"                 # agent | aggregator | compressor
//! plugin = "proposer"            # a role plugin
//! model = "default"
//! max_tokens = 128
//! config = { role = "a careful analyst" }
//!
//! [[nodes]]
//! id = "final"
//! kind = "aggregator"
//! plugin = "moa"
//! model = "default"
//! inputs = ["analyst"]
//!
//! [[edges]]                      # optional: the policy of one edge
//! from = "analyst"
//! to = "final"
//! stream = { policy = "complete" }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::stream::{ChunkSchedule, StreamPolicy};
use crate::engine::{DryOverrides, DrySampling, SamplingParams};
use crate::policy::{PluginConfig, PluginKind};

/// The model name pipelines use for the embedded default model.
pub const DEFAULT_MODEL: &str = "default";

/// Tokens a routed node generates between two questions to its router (`route_tokens`):
/// short enough that a confidence drop moves the answer soon, long enough that the
/// router's call and the next model's prefill of the shared prefix stay small beside it.
pub const DEFAULT_ROUTE_TOKENS: u32 = 16;

/// A pipeline file that cannot be used, with where it came from.
#[derive(Debug, thiserror::Error)]
pub struct SpecError {
    /// The file path, or `builtin:NAME` for an embedded pipeline.
    pub origin: String,
    /// 1-based line of the offending text, when known.
    pub line: Option<usize>,
    pub kind: SpecErrorKind,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.origin, line, self.kind),
            None => write!(f, "{}: {}", self.origin, self.kind),
        }
    }
}

/// What is wrong with a pipeline file.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum SpecErrorKind {
    #[error("cannot read the file: {0}")]
    Io(String),
    #[error("{0}")]
    Syntax(String),
    #[error("the pipeline has no nodes")]
    NoNodes,
    #[error("{node}: missing field `{field}`")]
    MissingField { node: String, field: &'static str },
    #[error("node id `{0}` is used twice")]
    DuplicateNode(String),
    #[error("node `{node}`: unknown input `{input}`")]
    UnknownInput { node: String, input: String },
    #[error("edge {from} -> {to}: {reason}")]
    UnknownEdge {
        from: String,
        to: String,
        reason: &'static str,
    },
    #[error("the pipeline has a cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    #[error("node `{node}`: a {kind} needs at least one input")]
    NeedsInputs { node: String, kind: &'static str },
    #[error("the pipeline has no output: every node feeds another")]
    NoOutput,
    #[error(
        "the pipeline has several outputs ({}); set `output` to the node whose answer is returned",
        .0.join(", ")
    )]
    SeveralOutputs(Vec<String>),
    #[error("`output` names unknown node `{0}`")]
    UnknownOutput(String),
    #[error("node `{node}`: {reason}")]
    BadField { node: String, reason: String },
    #[error("chunk schedule: {0}")]
    BadSchedule(String),
    #[error("node `{node}`: unknown plugin `{plugin}`")]
    UnknownPlugin { node: String, plugin: String },
    #[error(
        "node `{node}` needs {} plugin, but `{plugin}` is {} plugin",
        .expected.with_article(),
        .found.with_article()
    )]
    WrongPluginKind {
        node: String,
        plugin: String,
        expected: PluginKind,
        found: PluginKind,
    },
    #[error("node `{node}`: unknown model `{model}` (known: {})", .known.join(", "))]
    UnknownModel {
        node: String,
        model: String,
        known: Vec<String>,
    },
}

/// Position of a node in [`Pipeline::nodes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct NodeIndex(pub usize);

/// What a node does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum NodeKind {
    /// Generates with a role plugin; with inputs, it reads their outputs.
    Agent,
    /// Generates in steps decided by an aggregator plugin, on its inputs' chunks.
    Aggregator,
    /// Shortens its (complete) inputs to a token budget with a compressor plugin.
    Compressor { budget_tokens: u32 },
}

impl NodeKind {
    /// The plugin kind this node needs.
    pub fn plugin_kind(&self) -> PluginKind {
        match self {
            NodeKind::Agent => PluginKind::Role,
            NodeKind::Aggregator => PluginKind::Aggregator,
            NodeKind::Compressor { .. } => PluginKind::Compressor,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            NodeKind::Agent => "agent",
            NodeKind::Aggregator => "aggregator",
            NodeKind::Compressor { .. } => "compressor",
        }
    }
}

/// Which model a node generates with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelBinding {
    /// Compressors call models only through their own plugin import.
    None,
    Fixed(String),
    /// A router plugin picks one of `models` for each step; the node generates in steps of
    /// at most `step_tokens`, so the router can move its answer between models midway.
    Routed {
        router: String,
        models: Vec<String>,
        step_tokens: u32,
    },
}

/// Generation parameters a pipeline file sets over the plugin's own.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamOverrides {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Vec<String>>,
    pub repeat_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub repeat_last_n: Option<u32>,
    /// DRY over [`DrySampling::RECOMMENDED`] (`dry_multiplier = 0` turns it off).
    pub dry_multiplier: Option<f32>,
    pub dry_base: Option<f32>,
    pub dry_allowed_length: Option<u32>,
    pub dry_penalty_last_n: Option<i32>,
}

impl ParamOverrides {
    /// The DRY fields this file sets.
    pub fn dry(&self) -> DryOverrides {
        DryOverrides {
            dry_multiplier: self.dry_multiplier,
            dry_base: self.dry_base,
            dry_allowed_length: self.dry_allowed_length,
            dry_penalty_last_n: self.dry_penalty_last_n,
        }
    }

    /// These fields over `other`'s: each one set here wins.
    pub fn or(self, other: Self) -> Self {
        let dry = self.dry().or(other.dry());
        let mut merged = Self {
            max_tokens: self.max_tokens.or(other.max_tokens),
            temperature: self.temperature.or(other.temperature),
            top_p: self.top_p.or(other.top_p),
            top_k: self.top_k.or(other.top_k),
            min_p: self.min_p.or(other.min_p),
            seed: self.seed.or(other.seed),
            stop: self.stop.or(other.stop),
            repeat_penalty: self.repeat_penalty.or(other.repeat_penalty),
            frequency_penalty: self.frequency_penalty.or(other.frequency_penalty),
            presence_penalty: self.presence_penalty.or(other.presence_penalty),
            repeat_last_n: self.repeat_last_n.or(other.repeat_last_n),
            ..Self::default()
        };
        merged.set_dry(dry);
        merged
    }

    /// Sets the DRY fields of `dry` that are set, keeping the others.
    pub fn set_dry(&mut self, dry: DryOverrides) {
        let merged = dry.or(self.dry());
        self.dry_multiplier = merged.dry_multiplier;
        self.dry_base = merged.dry_base;
        self.dry_allowed_length = merged.dry_allowed_length;
        self.dry_penalty_last_n = merged.dry_penalty_last_n;
    }

    /// `base` with every field this file sets replaced. Every generating node samples with
    /// DRY: [`DrySampling::RECOMMENDED`] with the file's DRY fields over it (plugins cannot
    /// set DRY, so `base`'s is not used).
    pub fn apply(&self, mut base: SamplingParams) -> SamplingParams {
        base.dry = self.dry().over(DrySampling::RECOMMENDED);
        if let Some(v) = self.max_tokens {
            base.max_tokens = v;
        }
        if let Some(v) = self.temperature {
            base.temperature = v;
        }
        if let Some(v) = self.top_p {
            base.top_p = v;
        }
        if let Some(v) = self.top_k {
            base.top_k = v;
        }
        if let Some(v) = self.min_p {
            base.min_p = v;
        }
        if let Some(v) = self.seed {
            base.seed = v;
        }
        if let Some(v) = &self.stop {
            base.stop = v.clone();
        }
        if let Some(v) = self.repeat_penalty {
            base.repeat_penalty = v;
        }
        if let Some(v) = self.frequency_penalty {
            base.frequency_penalty = v;
        }
        if let Some(v) = self.presence_penalty {
            base.presence_penalty = v;
        }
        if let Some(v) = self.repeat_last_n {
            base.repeat_last_n = v;
        }
        base
    }
}

/// An incoming edge of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Edge {
    pub from: NodeIndex,
    pub stream: StreamPolicy,
}

/// One node of a pipeline.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Node {
    pub id: String,
    /// Shown to aggregators and in the live view; defaults to the id.
    pub label: String,
    pub kind: NodeKind,
    pub plugin: String,
    pub model: ModelBinding,
    pub inputs: Vec<Edge>,
    pub params: ParamOverrides,
    /// Output tokens expected, for the critical path; defaults to `max_tokens`.
    pub expected_tokens: Option<u32>,
    /// Settings passed to the node's plugin.
    pub config: PluginConfig,
    /// How the node keeps a long conversation within budget (`history_compressor`,
    /// `history_tokens`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryPolicy>,
    /// Guards on what this node hands to other nodes (`[[nodes.guards]]`), in order: the
    /// inner edges. The answer's own guards are the pipeline's `[[guards]]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub guards: Vec<crate::guard::GuardSpec>,
    #[serde(skip)]
    lines: NodeLines,
}

/// A node's conversation budget and the compressor that keeps it, in the background.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HistoryPolicy {
    pub compressor: String,
    pub budget_tokens: u32,
}

/// Where a node's fields are, for errors found after parsing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct NodeLines {
    node: Option<usize>,
    plugin: Option<usize>,
    model: Option<usize>,
    router: Option<usize>,
}

/// A validated pipeline.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Pipeline {
    pub name: String,
    pub description: String,
    /// The file path, or `builtin:NAME`.
    pub origin: String,
    /// Every node after all of its inputs.
    pub nodes: Vec<Node>,
    /// The node whose answer the run returns.
    pub output: NodeIndex,
    /// Latency budget and declared variants (`super::variants`).
    pub adaptive: super::variants::Adaptive,
    /// The `[tune]` table, read by `staircase tune`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tune: Option<toml::Table>,
    /// Output guards on the answer (`[[guards]]`), in order, before the server's own.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub guards: Vec<crate::guard::GuardSpec>,
}

// ---- the file as written -------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    name: Option<String>,
    description: Option<String>,
    output: Option<Spanned<String>>,
    stream: Option<RawStream>,
    #[serde(default)]
    nodes: Vec<RawNode>,
    #[serde(default)]
    edges: Vec<RawEdge>,
    latency_budget_ms: Option<u64>,
    quality: Option<f64>,
    #[serde(default)]
    variants: Vec<toml::Table>,
    tune: Option<toml::Table>,
    #[serde(default)]
    guards: Vec<crate::guard::GuardSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStream {
    policy: RawPolicy,
    chunk_tokens: Option<Spanned<Vec<u32>>>,
}

#[derive(Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum RawPolicy {
    Staircase,
    Complete,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawKind {
    Agent,
    Aggregator,
    Compressor,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: Option<Spanned<String>>,
    kind: Option<Spanned<RawKind>>,
    label: Option<String>,
    plugin: Option<Spanned<String>>,
    model: Option<Spanned<String>>,
    router: Option<Spanned<String>>,
    models: Option<Vec<String>>,
    route_tokens: Option<u32>,
    history_compressor: Option<String>,
    history_tokens: Option<u32>,
    #[serde(default)]
    inputs: Vec<Spanned<String>>,
    stream: Option<RawStream>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Vec<String>>,
    repeat_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    repeat_last_n: Option<u32>,
    dry_multiplier: Option<f32>,
    dry_base: Option<f32>,
    dry_allowed_length: Option<u32>,
    dry_penalty_last_n: Option<i32>,
    expected_tokens: Option<u32>,
    budget_tokens: Option<u32>,
    #[serde(default)]
    config: BTreeMap<String, String>,
    #[serde(default)]
    guards: Vec<crate::guard::GuardSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEdge {
    from: Spanned<String>,
    to: Spanned<String>,
    stream: RawStream,
}

/// Turns byte offsets into 1-based line numbers.
struct Lines<'a>(&'a str);

impl Lines<'_> {
    fn at(&self, offset: usize) -> usize {
        let end = offset.min(self.0.len());
        self.0.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn of<T>(&self, spanned: &Spanned<T>) -> usize {
        self.at(spanned.span().start)
    }
}

impl Pipeline {
    /// Reads and validates a pipeline file.
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| SpecError {
            origin: origin.clone(),
            line: None,
            kind: SpecErrorKind::Io(e.to_string()),
        })?;
        Self::parse(&text, &origin)
    }

    /// Parses and validates pipeline text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, SpecError> {
        let lines = Lines(text);
        let err = |line: Option<usize>, kind| SpecError {
            origin: origin.to_string(),
            line,
            kind,
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            err(
                e.span().map(|s| lines.at(s.start)),
                SpecErrorKind::Syntax(e.message().trim().to_string()),
            )
        })?;
        if raw.nodes.is_empty() {
            return Err(err(None, SpecErrorKind::NoNodes));
        }
        let default_stream = match &raw.stream {
            Some(stream) => stream_policy(stream, &lines).map_err(|(l, k)| err(l, k))?,
            None => StreamPolicy::default(),
        };

        // Ids first, so inputs can refer to nodes declared later.
        let mut index_of: HashMap<String, usize> = HashMap::new();
        for (i, node) in raw.nodes.iter().enumerate() {
            let Some(id) = &node.id else {
                return Err(err(
                    node.kind.as_ref().map(|k| lines.of(k)),
                    SpecErrorKind::MissingField {
                        node: format!("node #{}", i + 1),
                        field: "id",
                    },
                ));
            };
            if index_of.insert(id.get_ref().clone(), i).is_some() {
                return Err(err(
                    Some(lines.of(id)),
                    SpecErrorKind::DuplicateNode(id.get_ref().clone()),
                ));
            }
        }

        let mut nodes = Vec::with_capacity(raw.nodes.len());
        for raw_node in &raw.nodes {
            nodes.push(
                build_node(raw_node, &index_of, &default_stream, &lines)
                    .map_err(|(l, k)| err(l, k))?,
            );
        }

        for edge in &raw.edges {
            let from = edge.from.get_ref();
            let to = edge.to.get_ref();
            let line = Some(lines.of(&edge.from));
            let Some(&to_index) = index_of.get(to) else {
                return Err(err(
                    line,
                    SpecErrorKind::UnknownEdge {
                        from: from.clone(),
                        to: to.clone(),
                        reason: "the target node does not exist",
                    },
                ));
            };
            let Some(input) = raw.nodes[to_index]
                .inputs
                .iter()
                .position(|input| input.get_ref() == from)
            else {
                return Err(err(
                    line,
                    SpecErrorKind::UnknownEdge {
                        from: from.clone(),
                        to: to.clone(),
                        reason: "the target node does not list it in `inputs`",
                    },
                ));
            };
            nodes[to_index].inputs[input].stream =
                stream_policy(&edge.stream, &lines).map_err(|(l, k)| err(l, k))?;
        }

        let order = topological_order(&nodes).map_err(|cycle| {
            let line = index_of.get(&cycle[0]).and_then(|&i| nodes[i].lines.node);
            err(line, SpecErrorKind::Cycle(cycle))
        })?;

        let output = match &raw.output {
            Some(name) => *index_of.get(name.get_ref()).ok_or_else(|| {
                err(
                    Some(lines.of(name)),
                    SpecErrorKind::UnknownOutput(name.get_ref().clone()),
                )
            })?,
            None => {
                let fed: Vec<bool> = (0..nodes.len())
                    .map(|i| nodes.iter().any(|n| n.inputs.iter().any(|e| e.from.0 == i)))
                    .collect();
                let sinks: Vec<usize> = (0..nodes.len()).filter(|&i| !fed[i]).collect();
                match sinks.as_slice() {
                    [] => return Err(err(None, SpecErrorKind::NoOutput)),
                    [one] => *one,
                    many => {
                        return Err(err(
                            None,
                            SpecErrorKind::SeveralOutputs(
                                many.iter().map(|&i| nodes[i].id.clone()).collect(),
                            ),
                        ));
                    }
                }
            }
        };

        // Reorder so inputs come first, and renumber edges accordingly.
        let mut new_index = vec![0; nodes.len()];
        for (new, &old) in order.iter().enumerate() {
            new_index[old] = new;
        }
        let mut slots: Vec<Option<Node>> = nodes.into_iter().map(Some).collect();
        let mut ordered = Vec::with_capacity(slots.len());
        for &old in &order {
            // Each old index appears exactly once in a topological order.
            if let Some(mut node) = slots[old].take() {
                for edge in &mut node.inputs {
                    edge.from = NodeIndex(new_index[edge.from.0]);
                }
                ordered.push(node);
            }
        }

        let adaptive = super::variants::Adaptive {
            latency_budget: raw.latency_budget_ms.map(std::time::Duration::from_millis),
            quality: raw.quality,
            variants: super::variants::parse(&raw.variants, origin)?,
        };
        if let Some(guard) = raw.guards.iter().find(|g| !g.models.is_empty()) {
            return Err(err(
                None,
                SpecErrorKind::BadField {
                    node: format!("guards ({})", guard.plugin),
                    reason:
                        "`models` belongs in staircase.toml; a pipeline's guards guard it alone"
                            .into(),
                },
            ));
        }
        Ok(Pipeline {
            adaptive,
            tune: raw.tune,
            guards: raw.guards,
            name: raw.name.unwrap_or_else(|| {
                Path::new(origin)
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| origin.to_string())
            }),
            description: raw.description.unwrap_or_default(),
            origin: origin.to_string(),
            nodes: ordered,
            output: NodeIndex(new_index[output]),
        })
    }

    /// Checks plugin names and kinds (`kind_of`, usually [`crate::policy::PolicyProvider::kind_of`])
    /// and model names (`models`) against what the host has.
    pub fn check_bindings(
        &self,
        kind_of: &dyn Fn(&str) -> Option<PluginKind>,
        models: &[String],
    ) -> Result<(), SpecError> {
        let err = |line: Option<usize>, kind| SpecError {
            origin: self.origin.clone(),
            line,
            kind,
        };
        let check_plugin = |node: &Node,
                            plugin: &str,
                            expected: PluginKind,
                            line: Option<usize>| match kind_of(plugin) {
            None => Err(err(
                line,
                SpecErrorKind::UnknownPlugin {
                    node: node.id.clone(),
                    plugin: plugin.to_string(),
                },
            )),
            Some(found) if found != expected => Err(err(
                line,
                SpecErrorKind::WrongPluginKind {
                    node: node.id.clone(),
                    plugin: plugin.to_string(),
                    expected,
                    found,
                },
            )),
            Some(_) => Ok(()),
        };
        let check_model = |node: &Node, model: &str| {
            if models.iter().any(|m| m == model) {
                Ok(())
            } else {
                Err(err(
                    node.lines.model.or(node.lines.node),
                    SpecErrorKind::UnknownModel {
                        node: node.id.clone(),
                        model: model.to_string(),
                        known: models.to_vec(),
                    },
                ))
            }
        };
        for node in &self.nodes {
            check_plugin(
                node,
                &node.plugin,
                node.kind.plugin_kind(),
                node.lines.plugin,
            )?;
            match &node.model {
                ModelBinding::None => {}
                ModelBinding::Fixed(model) => check_model(node, model)?,
                ModelBinding::Routed { router, models, .. } => {
                    check_plugin(node, router, PluginKind::Router, node.lines.router)?;
                    for model in models {
                        check_model(node, model)?;
                    }
                }
            }
            if let Some(history) = &node.history {
                check_plugin(
                    node,
                    &history.compressor,
                    PluginKind::Compressor,
                    node.lines.node,
                )?;
            }
        }
        for node in &self.nodes {
            for guard in &node.guards {
                check_plugin(node, &guard.plugin, PluginKind::Guard, node.lines.node)?;
            }
        }
        let answering = self.node(self.output);
        for guard in &self.guards {
            check_plugin(answering, &guard.plugin, PluginKind::Guard, None)?;
        }
        for variant in &self.adaptive.variants {
            variant.pipeline.check_bindings(kind_of, models)?;
        }
        Ok(())
    }

    pub fn node(&self, index: NodeIndex) -> &Node {
        &self.nodes[index.0]
    }

    /// The index of the node with that id.
    pub fn find(&self, id: &str) -> Option<NodeIndex> {
        self.nodes.iter().position(|n| n.id == id).map(NodeIndex)
    }

    /// The edges leaving `from`: (consumer, position in the consumer's inputs).
    pub fn consumers(&self, from: NodeIndex) -> Vec<(NodeIndex, usize)> {
        let mut out = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            for (slot, edge) in node.inputs.iter().enumerate() {
                if edge.from == from {
                    out.push((NodeIndex(i), slot));
                }
            }
        }
        out
    }

    /// Caps every node's output at `max_tokens` (short runs for tests and quick checks).
    pub fn limit_tokens(&mut self, max_tokens: u32) {
        for node in &mut self.nodes {
            let capped = node
                .params
                .max_tokens
                .map_or(max_tokens, |m| m.min(max_tokens));
            node.params.max_tokens = Some(capped);
            node.expected_tokens = node.expected_tokens.map(|e| e.min(capped));
        }
    }

    /// Gives every staircase edge `schedule` (complete edges stay complete), so one file
    /// can be compared over chunk schedules.
    pub fn set_chunk_schedule(&mut self, schedule: &ChunkSchedule) {
        for node in &mut self.nodes {
            for edge in &mut node.inputs {
                if let StreamPolicy::Staircase(s) = &mut edge.stream {
                    s.clone_from(schedule);
                }
            }
        }
    }

    /// Shifts every node's sampling seed by `offset` (a node without one counts from 0):
    /// the same pipeline with other random choices, for the noise floor of a comparison.
    pub fn offset_seeds(&mut self, offset: u64) {
        for node in &mut self.nodes {
            node.params.seed = Some(node.params.seed.unwrap_or(0).wrapping_add(offset));
        }
    }

    /// Sets the output length of every agent without inputs (the proposers), as the
    /// benchmark does to compare pipelines at a fixed proposer length.
    pub fn set_proposer_tokens(&mut self, tokens: u32) {
        for node in &mut self.nodes {
            if node.kind == NodeKind::Agent && node.inputs.is_empty() {
                node.params.max_tokens = Some(tokens);
                node.expected_tokens = Some(tokens);
            }
        }
    }
}

type Located = (Option<usize>, SpecErrorKind);

fn stream_policy(raw: &RawStream, lines: &Lines) -> Result<StreamPolicy, Located> {
    match raw.policy {
        RawPolicy::Complete => Ok(StreamPolicy::Complete),
        RawPolicy::Staircase => match &raw.chunk_tokens {
            None => Ok(StreamPolicy::Staircase(ChunkSchedule::default())),
            Some(sizes) => ChunkSchedule::new(sizes.get_ref().clone())
                .map(StreamPolicy::Staircase)
                .map_err(|e| {
                    (
                        Some(lines.of(sizes)),
                        SpecErrorKind::BadSchedule(e.to_string()),
                    )
                }),
        },
    }
}

fn build_node(
    raw: &RawNode,
    index_of: &HashMap<String, usize>,
    default_stream: &StreamPolicy,
    lines: &Lines,
) -> Result<Node, Located> {
    // `parse` checked every node has an id before calling this.
    let id_spanned = raw.id.as_ref().ok_or((
        None,
        SpecErrorKind::MissingField {
            node: "node".into(),
            field: "id",
        },
    ))?;
    let id = id_spanned.get_ref().clone();
    let node_line = Some(lines.of(id_spanned));
    let missing = |field: &'static str| {
        (
            node_line,
            SpecErrorKind::MissingField {
                node: format!("node `{id}`"),
                field,
            },
        )
    };
    let bad = |line: Option<usize>, reason: String| {
        (
            line,
            SpecErrorKind::BadField {
                node: id.clone(),
                reason,
            },
        )
    };

    let kind = match raw.kind.as_ref().ok_or_else(|| missing("kind"))?.get_ref() {
        RawKind::Agent => NodeKind::Agent,
        RawKind::Aggregator => NodeKind::Aggregator,
        RawKind::Compressor => NodeKind::Compressor {
            budget_tokens: raw.budget_tokens.ok_or_else(|| missing("budget_tokens"))?,
        },
    };
    if raw.budget_tokens.is_some() && !matches!(kind, NodeKind::Compressor { .. }) {
        return Err(bad(
            node_line,
            "`budget_tokens` is only for compressor nodes".into(),
        ));
    }
    let plugin = raw.plugin.as_ref().ok_or_else(|| missing("plugin"))?;

    let model = match (&kind, &raw.model, &raw.router) {
        (NodeKind::Compressor { .. }, None, None) => ModelBinding::None,
        (NodeKind::Compressor { .. }, _, _) => {
            return Err(bad(
                node_line,
                "a compressor calls models through its plugin; remove `model`/`router`".into(),
            ));
        }
        (_, Some(_), Some(router)) => {
            return Err(bad(
                Some(lines.of(router)),
                "give either `model` or `router` with `models`, not both".into(),
            ));
        }
        (_, Some(model), None) => ModelBinding::Fixed(model.get_ref().clone()),
        (_, None, Some(router)) => match &raw.models {
            Some(models) if !models.is_empty() => ModelBinding::Routed {
                router: router.get_ref().clone(),
                models: models.clone(),
                step_tokens: match raw.route_tokens {
                    Some(0) => {
                        return Err(bad(node_line, "`route_tokens` must be at least 1".into()));
                    }
                    Some(n) => n,
                    None => DEFAULT_ROUTE_TOKENS,
                },
            },
            _ => return Err(missing("models")),
        },
        (_, None, None) => return Err(missing("model")),
    };
    if raw.models.is_some() && raw.router.is_none() {
        return Err(bad(node_line, "`models` needs a `router`".into()));
    }
    if raw.route_tokens.is_some() && raw.router.is_none() {
        return Err(bad(node_line, "`route_tokens` needs a `router`".into()));
    }

    let history = match (&raw.history_compressor, raw.history_tokens) {
        (None, None) => None,
        (Some(compressor), Some(budget_tokens)) if !matches!(kind, NodeKind::Compressor { .. }) => {
            Some(HistoryPolicy {
                compressor: compressor.clone(),
                budget_tokens,
            })
        }
        (Some(_), Some(_)) => {
            return Err(bad(
                node_line,
                "a compressor node has no conversation to keep short".into(),
            ));
        }
        _ => {
            return Err(bad(
                node_line,
                "give `history_compressor` and `history_tokens` together".into(),
            ));
        }
    };
    let node_stream = match &raw.stream {
        Some(stream) => stream_policy(stream, lines)?,
        None => default_stream.clone(),
    };
    let mut inputs = Vec::with_capacity(raw.inputs.len());
    for input in &raw.inputs {
        let Some(&from) = index_of.get(input.get_ref()) else {
            return Err((
                Some(lines.of(input)),
                SpecErrorKind::UnknownInput {
                    node: id.clone(),
                    input: input.get_ref().clone(),
                },
            ));
        };
        if inputs.iter().any(|e: &Edge| e.from.0 == from) {
            return Err(bad(
                Some(lines.of(input)),
                format!("input `{}` is listed twice", input.get_ref()),
            ));
        }
        inputs.push(Edge {
            from: NodeIndex(from),
            stream: node_stream.clone(),
        });
    }
    if inputs.is_empty() && kind != NodeKind::Agent {
        return Err((
            node_line,
            SpecErrorKind::NeedsInputs {
                node: id.clone(),
                kind: kind.name(),
            },
        ));
    }
    if let Some(guard) = raw.guards.iter().find(|g| !g.models.is_empty()) {
        return Err((
            node_line,
            SpecErrorKind::BadField {
                node: id.clone(),
                reason: format!(
                    "guard {}: `models` belongs in staircase.toml; a node's guards guard its \
                     output alone",
                    guard.plugin
                ),
            },
        ));
    }

    Ok(Node {
        label: raw.label.clone().unwrap_or_else(|| id.clone()),
        id,
        kind,
        plugin: plugin.get_ref().clone(),
        model,
        inputs,
        params: ParamOverrides {
            max_tokens: raw.max_tokens,
            temperature: raw.temperature,
            top_p: raw.top_p,
            top_k: raw.top_k,
            min_p: raw.min_p,
            seed: raw.seed,
            stop: raw.stop.clone(),
            repeat_penalty: raw.repeat_penalty,
            frequency_penalty: raw.frequency_penalty,
            presence_penalty: raw.presence_penalty,
            repeat_last_n: raw.repeat_last_n,
            dry_multiplier: raw.dry_multiplier,
            dry_base: raw.dry_base,
            dry_allowed_length: raw.dry_allowed_length,
            dry_penalty_last_n: raw.dry_penalty_last_n,
        },
        expected_tokens: raw.expected_tokens,
        config: raw.config.clone(),
        history,
        guards: raw.guards.clone(),
        lines: NodeLines {
            node: node_line,
            plugin: Some(lines.of(plugin)),
            model: raw.model.as_ref().map(|m| lines.of(m)),
            router: raw.router.as_ref().map(|r| lines.of(r)),
        },
    })
}

/// Node indices with every node after its inputs, or the ids along a cycle.
fn topological_order(nodes: &[Node]) -> Result<Vec<usize>, Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        i: usize,
        nodes: &[Node],
        marks: &mut [Mark],
        stack: &mut Vec<usize>,
        order: &mut Vec<usize>,
    ) -> Result<(), Vec<String>> {
        match marks[i] {
            Mark::Done => return Ok(()),
            Mark::Active => {
                // The cycle is the part of the stack from the first visit of `i`.
                let start = stack.iter().position(|&s| s == i).unwrap_or(0);
                let mut cycle: Vec<String> = stack[start..]
                    .iter()
                    .map(|&s| nodes[s].id.clone())
                    .collect();
                cycle.push(nodes[i].id.clone());
                return Err(cycle);
            }
            Mark::New => {}
        }
        marks[i] = Mark::Active;
        stack.push(i);
        for edge in &nodes[i].inputs {
            visit(edge.from.0, nodes, marks, stack, order)?;
        }
        stack.pop();
        marks[i] = Mark::Done;
        order.push(i);
        Ok(())
    }
    let mut marks = vec![Mark::New; nodes.len()];
    let mut order = Vec::with_capacity(nodes.len());
    for i in 0..nodes.len() {
        visit(i, nodes, &mut marks, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
[stream]
policy = "staircase"
chunk_tokens = [4, 8]

[[nodes]]
id = "final"
kind = "aggregator"
plugin = "moa"
model = "default"
inputs = ["a", "b"]

[[nodes]]
id = "a"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 32

[[nodes]]
id = "b"
kind = "agent"
plugin = "proposer"
model = "default"

[[edges]]
from = "b"
to = "final"
stream = { policy = "complete" }
"#;

    fn kinds(plugin: &str) -> Option<PluginKind> {
        match plugin {
            "proposer" => Some(PluginKind::Role),
            "moa" => Some(PluginKind::Aggregator),
            "truncate" => Some(PluginKind::Compressor),
            "rule-router" => Some(PluginKind::Router),
            _ => None,
        }
    }

    fn models() -> Vec<String> {
        vec![DEFAULT_MODEL.to_string()]
    }

    fn error(text: &str) -> SpecError {
        let pipeline = match Pipeline::parse(text, "bad.toml") {
            Err(e) => return e,
            Ok(p) => p,
        };
        match pipeline.check_bindings(&kinds, &models()) {
            Err(e) => e,
            Ok(()) => panic!("expected an error for:\n{text}"),
        }
    }

    #[test]
    fn a_good_file_is_ordered_with_edge_policies() {
        let p = Pipeline::parse(GOOD, "good.toml").unwrap();
        p.check_bindings(&kinds, &models()).unwrap();
        let ids: Vec<&str> = p.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids.last(), Some(&"final"));
        assert_eq!(p.node(p.output).id, "final");
        let final_node = p.node(p.output);
        let a = final_node
            .inputs
            .iter()
            .find(|e| p.node(e.from).id == "a")
            .unwrap();
        let b = final_node
            .inputs
            .iter()
            .find(|e| p.node(e.from).id == "b")
            .unwrap();
        assert_eq!(
            a.stream,
            StreamPolicy::Staircase(ChunkSchedule::new(vec![4, 8]).unwrap())
        );
        assert_eq!(b.stream, StreamPolicy::Complete);
        assert_eq!(p.node(p.find("a").unwrap()).params.max_tokens, Some(32));
    }

    #[test]
    fn cycle_is_reported_with_its_path_and_line() {
        let e = error(
            r#"
[[nodes]]
id = "a"
kind = "agent"
plugin = "proposer"
model = "default"
inputs = ["b"]

[[nodes]]
id = "b"
kind = "agent"
plugin = "proposer"
model = "default"
inputs = ["a"]
"#,
        );
        assert!(
            matches!(e.kind, SpecErrorKind::Cycle(ref c) if c.len() == 3),
            "{e}"
        );
        assert_eq!(e.line, Some(3));
        assert!(
            e.to_string()
                .starts_with("bad.toml:3: the pipeline has a cycle: a -> b -> a"),
            "{e}"
        );
    }

    #[test]
    fn unknown_input_names_node_and_line() {
        let e = error(
            r#"
[[nodes]]
id = "a"
kind = "aggregator"
plugin = "moa"
model = "default"
inputs = ["ghost"]
"#,
        );
        assert_eq!(
            e.kind,
            SpecErrorKind::UnknownInput {
                node: "a".into(),
                input: "ghost".into()
            }
        );
        assert_eq!(e.line, Some(7));
    }

    #[test]
    fn unknown_plugin_and_wrong_kind_and_unknown_model() {
        let base = GOOD.replace("plugin = \"moa\"", "plugin = \"nope\"");
        let e = error(&base);
        assert!(
            matches!(e.kind, SpecErrorKind::UnknownPlugin { ref plugin, .. } if plugin == "nope")
        );
        assert_eq!(e.line, Some(10));

        let wrong = GOOD.replace("plugin = \"moa\"", "plugin = \"proposer\"");
        let e = error(&wrong);
        assert_eq!(
            e.kind,
            SpecErrorKind::WrongPluginKind {
                node: "final".into(),
                plugin: "proposer".into(),
                expected: PluginKind::Aggregator,
                found: PluginKind::Role
            }
        );
        assert_eq!(e.line, Some(10));

        let model = GOOD.replacen("model = \"default\"", "model = \"gpt-9\"", 1);
        let e = error(&model);
        assert!(
            matches!(e.kind, SpecErrorKind::UnknownModel { ref model, .. } if model == "gpt-9")
        );
        assert_eq!(e.line, Some(11));
        assert!(e.to_string().contains("known: default"), "{e}");
    }

    #[test]
    fn missing_fields_are_named() {
        let no_model = GOOD.replacen("model = \"default\"\ninputs", "inputs", 1);
        let e = error(&no_model);
        assert_eq!(
            e.kind,
            SpecErrorKind::MissingField {
                node: "node `final`".into(),
                field: "model"
            }
        );
        assert_eq!(e.line, Some(8));

        let no_plugin = GOOD.replacen("plugin = \"moa\"\n", "", 1);
        assert!(matches!(
            error(&no_plugin).kind,
            SpecErrorKind::MissingField {
                field: "plugin",
                ..
            }
        ));

        let no_id = GOOD.replacen("id = \"final\"\n", "", 1);
        let e = error(&no_id);
        assert!(
            matches!(e.kind, SpecErrorKind::MissingField { field: "id", .. }),
            "{e}"
        );
        assert_eq!(e.line, Some(8));

        let no_budget = r#"
[[nodes]]
id = "a"
kind = "agent"
plugin = "proposer"
model = "default"
[[nodes]]
id = "c"
kind = "compressor"
plugin = "truncate"
inputs = ["a"]
"#;
        assert!(matches!(
            error(no_budget).kind,
            SpecErrorKind::MissingField {
                field: "budget_tokens",
                ..
            }
        ));
    }

    #[test]
    fn syntax_errors_and_typos_carry_the_line() {
        let e = error("[[nodes]]\nid = \"a\"\nkind = \"agent\"\nmodle = \"default\"\n");
        assert!(
            matches!(e.kind, SpecErrorKind::Syntax(ref m) if m.contains("modle")),
            "{e}"
        );
        assert_eq!(e.line, Some(4));

        let e = error("[[nodes]]\nid = \"a\"\nkind = \"wizard\"\n");
        assert!(matches!(e.kind, SpecErrorKind::Syntax(_)), "{e}");
        assert_eq!(e.line, Some(3));

        let e = error("[[nodes]\n");
        assert!(matches!(e.kind, SpecErrorKind::Syntax(_)), "{e}");
        assert_eq!(e.line, Some(1));
    }

    #[test]
    fn several_outputs_duplicates_and_bad_edges_are_refused() {
        let two = GOOD
            .replace("inputs = [\"a\", \"b\"]", "inputs = [\"a\"]")
            .replace(
                "[[edges]]\nfrom = \"b\"\nto = \"final\"\nstream = { policy = \"complete\" }\n",
                "",
            );
        assert!(matches!(error(&two).kind, SpecErrorKind::SeveralOutputs(_)));

        let dup = GOOD.replace("id = \"b\"", "id = \"a\"");
        assert!(matches!(error(&dup).kind, SpecErrorKind::DuplicateNode(_)));

        let edge = GOOD.replace(
            "from = \"b\"\nto = \"final\"",
            "from = \"final\"\nto = \"a\"",
        );
        assert!(matches!(
            error(&edge).kind,
            SpecErrorKind::UnknownEdge { .. }
        ));

        let schedule = GOOD.replace("[4, 8]", "[]");
        let e = error(&schedule);
        assert!(matches!(e.kind, SpecErrorKind::BadSchedule(_)), "{e}");
        assert_eq!(e.line, Some(5));

        let no_inputs =
            "[[nodes]]\nid = \"x\"\nkind = \"aggregator\"\nplugin = \"moa\"\nmodel = \"default\"\n";
        assert!(matches!(
            error(no_inputs).kind,
            SpecErrorKind::NeedsInputs { .. }
        ));
    }

    #[test]
    fn token_limits_cap_nodes_and_proposer_lengths_apply_to_sources_only() {
        let mut p = Pipeline::parse(GOOD, "good.toml").unwrap();
        p.limit_tokens(16);
        assert!(p.nodes.iter().all(|n| n.params.max_tokens == Some(16)));
        p.set_proposer_tokens(512);
        let final_node = p.node(p.output);
        assert_eq!(final_node.params.max_tokens, Some(16));
        let a = p.node(p.find("a").unwrap());
        assert_eq!(
            (a.params.max_tokens, a.expected_tokens),
            (Some(512), Some(512))
        );
    }

    #[test]
    fn every_node_samples_with_dry_unless_its_file_turns_it_off() {
        let text = GOOD.replacen(
            "max_tokens = 32",
            "dry_multiplier = 0\ndry_allowed_length = 3",
            1,
        );
        let mut p = Pipeline::parse(&text, "dry.toml").unwrap();
        let sampling = |p: &Pipeline, id: &str| {
            p.node(p.find(id).unwrap())
                .params
                .apply(SamplingParams::default())
                .dry
        };
        assert_eq!(sampling(&p, "b"), DrySampling::RECOMMENDED);
        let a = sampling(&p, "a");
        assert!(!a.is_on());
        assert_eq!(a.allowed_length, 3);
        // A request's fields go over the file's.
        let output = p.output.0;
        p.nodes[output].params.set_dry(DryOverrides {
            dry_base: Some(2.0),
            ..DryOverrides::default()
        });
        let answer = sampling(&p, "final");
        assert_eq!((answer.multiplier, answer.base), (0.8, 2.0));
    }

    #[test]
    fn routed_nodes_check_the_router_and_every_model() {
        let routed = GOOD.replacen(
            "model = \"default\"\nmax_tokens",
            "router = \"rule-router\"\nmodels = [\"default\", \"big\"]\nmax_tokens",
            1,
        );
        let e = error(&routed);
        assert!(
            matches!(e.kind, SpecErrorKind::UnknownModel { ref model, .. } if model == "big"),
            "{e}"
        );
        let wrong_router = routed.replace("rule-router", "moa");
        assert!(matches!(
            error(&wrong_router).kind,
            SpecErrorKind::WrongPluginKind {
                expected: PluginKind::Router,
                ..
            }
        ));
    }
}
