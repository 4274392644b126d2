//! The variant space of a pipeline: which of its proposers run and on which model, an
//! optional second layer of refiners, the aggregator's model (or no aggregator: one
//! proposer answering alone), how long the proposers and refiners may write, `complete` or
//! `staircase` edges, and the chunk schedule. A
//! [`Genome`] is one point; [`Space::build`] turns it into pipeline-file text, which parses
//! into the [`Pipeline`] that runs and is the file `staircase tune` writes.
//! This module only describes and builds variants; searching is `search`'s.

use std::collections::BTreeMap;

use serde::Serialize;
use toml::{Table, Value};

use crate::pipeline::spec::{ModelBinding, NodeKind, ParamOverrides};
use crate::pipeline::stream::{ChunkSchedule, StreamPolicy};
use crate::pipeline::{Pipeline, SpecError};
use crate::policy::PluginConfig;

/// Roles of the refiners a one-layer pipeline can grow (as in `moa-2layer`).
const DEFAULT_REFINER_ROLES: [&str; 2] = [
    "an editor who merges the answers above into one correct answer",
    "a reviewer who keeps only what the answers above agree on",
];
/// Chunk schedules searched besides the base file's: first chunks from 8 tokens up (a first
/// chunk of 1-2 tokens gave the default model starts it could only repeat, issue 10).
pub const DEFAULT_SCHEDULES: [&[u32]; 3] = [&[8, 16, 32, 64], &[16, 32, 64], &[32, 64]];
/// Shares of the file's proposer and refiner token caps searched besides the file's own: a
/// staircase aggregator writes most of its answer while its inputs stream, so shorter
/// inputs end the streaming sooner; on 40 prompts `moa` with 32-token proposers took half
/// the time and was rated no worse than with 128 (README, Tuning).
pub const DEFAULT_LENGTHS: [f64; 3] = [1.0, 0.5, 0.25];
/// No proposer is cut below this many tokens.
const MIN_LENGTH_TOKENS: u32 = 8;

/// One node of the base pipeline, as a variant re-uses it.
#[derive(Clone, Debug, Serialize)]
pub struct Template {
    pub id: String,
    pub plugin: String,
    pub params: ParamOverrides,
    pub expected_tokens: Option<u32>,
    pub config: PluginConfig,
}

/// Why a pipeline cannot be tuned.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    #[error(
        "pipeline `{0}`: tuning needs agents without inputs (proposers) feeding one aggregator"
    )]
    Shape(String),
    #[error("pipeline `{0}`: no models to choose from")]
    NoModels(String),
    #[error("proposer length share {0} is not in (0, 1]")]
    Length(f64),
    #[error("a variant did not parse (a bug in the tuner): {0}")]
    Build(#[from] SpecError),
}

/// One variant. Model choices are indices into [`Space::models`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Genome {
    /// Per proposer of the base: dropped, or its model.
    pub proposers: Vec<Option<usize>>,
    /// Per refiner: dropped, or its model (any kept refiner makes a second layer).
    pub refiners: Vec<Option<usize>>,
    /// The aggregator's model; `None` only with one proposer and no refiner, which then
    /// answers alone.
    pub aggregator: Option<usize>,
    pub staircase: bool,
    /// Index into [`Space::schedules`].
    pub schedule: usize,
    /// Index into [`Space::lengths`]: the share of their token caps proposers and refiners
    /// keep.
    pub length: usize,
}

/// The kind of topology a variant is, whatever its node counts, models, schedule and
/// lengths: whether an aggregator answers (else one proposer alone), whether a second layer
/// refines, and with staircase edges. The shortlist takes the best of each shape, since the
/// prior cannot rank shapes the judge finds about equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Shape {
    pub aggregated: bool,
    pub refined: bool,
    pub staircase: bool,
}

impl Genome {
    /// The same variant with choices that change nothing reset (the schedule of complete
    /// edges; edges of a proposer answering alone), so the search sees one genome per variant.
    pub fn canonical(mut self) -> Self {
        if self.aggregator.is_none() {
            // A proposer answering alone writes the answer's length.
            self.staircase = true;
            self.length = 0;
        }
        if self.aggregator.is_none() || !self.staircase {
            self.schedule = 0;
        }
        self
    }

    /// Whether the genome describes a runnable pipeline.
    pub fn valid(&self) -> bool {
        let proposers = self.proposers.iter().flatten().count();
        let refiners = self.refiners.iter().flatten().count();
        proposers > 0 && (self.aggregator.is_some() || (proposers == 1 && refiners == 0))
    }

    pub fn shape(&self) -> Shape {
        Shape {
            aggregated: self.aggregator.is_some(),
            refined: self.refiners.iter().any(Option::is_some),
            staircase: self.staircase,
        }
    }
}

/// What a pipeline may become.
#[derive(Clone, Debug, Serialize)]
pub struct Space {
    pub base: String,
    pub description: String,
    pub proposers: Vec<Template>,
    pub refiners: Vec<Template>,
    pub aggregator: Template,
    pub models: Vec<String>,
    pub schedules: Vec<ChunkSchedule>,
    /// Shares of their token caps proposers and refiners keep; the first is 1 (the file's).
    pub lengths: Vec<f64>,
}

fn template(node: &crate::pipeline::spec::Node) -> Template {
    Template {
        id: node.id.clone(),
        plugin: node.plugin.clone(),
        params: node.params.clone(),
        expected_tokens: node.expected_tokens,
        config: node.config.clone(),
    }
}

fn fixed_model(node: &crate::pipeline::spec::Node) -> Option<&str> {
    match &node.model {
        ModelBinding::Fixed(name) => Some(name),
        _ => None,
    }
}

impl Space {
    /// The space around `base`: its proposers (agents without inputs), its middle agents or
    /// two default refiners, its output aggregator; `models` to place on nodes, and
    /// `schedules` and length `shares` besides the base's own.
    pub fn of(
        base: &Pipeline,
        models: Vec<String>,
        schedules: &[ChunkSchedule],
        shares: &[f64],
    ) -> Result<(Self, Genome), SpaceError> {
        let shape = || SpaceError::Shape(base.name.clone());
        let output = base.node(base.output);
        if output.kind != NodeKind::Aggregator {
            return Err(shape());
        }
        let is_proposer = |n: &crate::pipeline::spec::Node| {
            n.kind == NodeKind::Agent && n.inputs.is_empty() && fixed_model(n).is_some()
        };
        let proposers: Vec<_> = base.nodes.iter().filter(|n| is_proposer(n)).collect();
        let middle: Vec<_> = base
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| *i != base.output.0 && !is_proposer(n))
            .map(|(_, n)| n)
            .collect();
        if proposers.is_empty()
            || fixed_model(output).is_none()
            || middle
                .iter()
                .any(|n| n.kind != NodeKind::Agent || fixed_model(n).is_none())
        {
            return Err(shape());
        }
        let mut models = models;
        for node in proposers.iter().chain(&middle).chain([&output]) {
            if let Some(m) = fixed_model(node)
                && !models.iter().any(|x| x == m)
            {
                models.push(m.to_string());
            }
        }
        if models.is_empty() {
            return Err(SpaceError::NoModels(base.name.clone()));
        }
        let refiners: Vec<Template> = if middle.is_empty() {
            let params = proposers[0].params.clone();
            DEFAULT_REFINER_ROLES
                .iter()
                .enumerate()
                .map(|(i, role)| Template {
                    id: format!("refiner-{}", i + 1),
                    plugin: proposers[0].plugin.clone(),
                    params: params.clone(),
                    expected_tokens: proposers[0].expected_tokens,
                    config: BTreeMap::from([("role".to_string(), (*role).to_string())]),
                })
                .collect()
        } else {
            middle.iter().map(|n| template(n)).collect()
        };
        let base_schedule = output.inputs.iter().find_map(|e| match &e.stream {
            StreamPolicy::Staircase(s) => Some(s.clone()),
            StreamPolicy::Complete => None,
        });
        let mut all_schedules: Vec<ChunkSchedule> = base_schedule.iter().cloned().collect();
        for s in schedules {
            if !all_schedules.contains(s) {
                all_schedules.push(s.clone());
            }
        }
        if all_schedules.is_empty() {
            all_schedules.push(ChunkSchedule::default());
        }
        let mut lengths = vec![1.0];
        for &share in shares {
            if !(share > 0.0 && share <= 1.0) {
                return Err(SpaceError::Length(share));
            }
            if !lengths.contains(&share) {
                lengths.push(share);
            }
        }
        let index = |name: &str| models.iter().position(|m| m == name);
        let genome = Genome {
            proposers: proposers
                .iter()
                .map(|n| fixed_model(n).and_then(index))
                .collect(),
            refiners: if middle.is_empty() {
                vec![None; refiners.len()]
            } else {
                middle
                    .iter()
                    .map(|n| fixed_model(n).and_then(index))
                    .collect()
            },
            aggregator: fixed_model(output).and_then(index),
            staircase: base_schedule.is_some(),
            schedule: 0,
            length: 0,
        };
        let space = Space {
            base: base.name.clone(),
            description: base.description.clone(),
            proposers: proposers.iter().map(|n| template(n)).collect(),
            refiners,
            aggregator: template(output),
            models,
            schedules: all_schedules,
            lengths,
        };
        Ok((space, genome))
    }

    /// How many genomes the space holds (valid or not).
    pub fn size(&self) -> u128 {
        let m = self.models.len() as u128;
        let slots = (self.proposers.len() + self.refiners.len()) as u32;
        (m + 1).pow(slots) * (m + 1) * 2 * self.schedules.len() as u128 * self.lengths.len() as u128
    }

    /// The token cap of proposer or refiner `t` in `g`, scaled by its length share.
    fn cap(&self, t: &Template, g: &Genome) -> Option<u32> {
        let share = self.lengths[g.length];
        if share >= 1.0 {
            return t.params.max_tokens;
        }
        let cap = t
            .params
            .max_tokens
            .unwrap_or(crate::pipeline::critical::DEFAULT_EXPECTED_TOKENS);
        Some(((f64::from(cap) * share).round() as u32).max(MIN_LENGTH_TOKENS.min(cap)))
    }

    /// A short name saying what the variant is.
    pub fn describe(&self, g: &Genome) -> String {
        let names = |templates: &[Template], picks: &[Option<usize>]| -> Vec<String> {
            templates
                .iter()
                .zip(picks)
                .filter_map(|(t, m)| {
                    let m = (*m)?;
                    let name = format!("{}@{}", t.id, self.models[m]);
                    Some(match self.cap(t, g) {
                        Some(cap) if self.lengths[g.length] < 1.0 => format!("{name}:{cap}"),
                        _ => name,
                    })
                })
                .collect()
        };
        let mut parts = names(&self.proposers, &g.proposers);
        let refiners = names(&self.refiners, &g.refiners);
        if !refiners.is_empty() {
            parts.push(format!("| {}", refiners.join(" ")));
        }
        match g.aggregator {
            Some(m) => parts.push(format!(
                "> {}@{} {}",
                self.aggregator.id,
                self.models[m],
                if g.staircase {
                    let sizes: Vec<String> = self.schedules[g.schedule]
                        .sizes()
                        .iter()
                        .map(u32::to_string)
                        .collect();
                    format!("staircase[{}]", sizes.join(","))
                } else {
                    "complete".to_string()
                }
            )),
            None => parts.push("(alone)".into()),
        }
        parts.join(" ")
    }

    /// The variant as the text of a pipeline file named `name`.
    pub fn toml(&self, g: &Genome, name: &str) -> Table {
        let mut file = Table::new();
        file.insert("name".into(), name.into());
        file.insert(
            "description".into(),
            format!("{} tuned: {}", self.base, self.describe(g)).into(),
        );
        let mut stream = Table::new();
        if g.staircase {
            stream.insert("policy".into(), "staircase".into());
            stream.insert(
                "chunk_tokens".into(),
                Value::Array(
                    self.schedules[g.schedule]
                        .sizes()
                        .iter()
                        .map(|&s| Value::Integer(i64::from(s)))
                        .collect(),
                ),
            );
        } else {
            stream.insert("policy".into(), "complete".into());
        }
        file.insert("stream".into(), Value::Table(stream));
        let mut nodes = Vec::new();
        let pick = |templates: &[Template], picks: &[Option<usize>]| -> Vec<(Template, usize)> {
            templates
                .iter()
                .zip(picks)
                .filter_map(|(t, m)| m.map(|m| (t.clone(), m)))
                .collect()
        };
        let proposers = pick(&self.proposers, &g.proposers);
        let refiners = pick(&self.refiners, &g.refiners);
        let ids = |nodes: &[(Template, usize)]| -> Vec<String> {
            nodes.iter().map(|(t, _)| t.id.clone()).collect()
        };
        for (t, m) in &proposers {
            nodes.push(self.node(t, "agent", *m, &[], self.cap(t, g)));
        }
        for (t, m) in &refiners {
            nodes.push(self.node(t, "agent", *m, &ids(&proposers), self.cap(t, g)));
        }
        if let Some(m) = g.aggregator {
            let inputs = if refiners.is_empty() {
                ids(&proposers)
            } else {
                ids(&refiners)
            };
            let cap = self.aggregator.params.max_tokens;
            nodes.push(self.node(&self.aggregator, "aggregator", m, &inputs, cap));
        }
        file.insert(
            "nodes".into(),
            Value::Array(nodes.into_iter().map(Value::Table).collect()),
        );
        file
    }

    fn node(
        &self,
        t: &Template,
        kind: &str,
        model: usize,
        inputs: &[String],
        max_tokens: Option<u32>,
    ) -> Table {
        let mut node = Table::new();
        node.insert("id".into(), t.id.clone().into());
        node.insert("kind".into(), kind.into());
        node.insert("plugin".into(), t.plugin.clone().into());
        node.insert("model".into(), self.models[model].clone().into());
        let p = &t.params;
        let int = |v: u32| Value::Integer(i64::from(v));
        // The f32's shortest decimal (0.7, not 0.699999988079071), as the file said it.
        let float = |v: f32| Value::Float(v.to_string().parse().unwrap_or(f64::from(v)));
        let fields: [(&str, Option<Value>); 15] = [
            ("max_tokens", max_tokens.map(int)),
            ("temperature", p.temperature.map(float)),
            ("top_p", p.top_p.map(float)),
            ("top_k", p.top_k.map(int)),
            ("min_p", p.min_p.map(float)),
            (
                "seed",
                p.seed
                    .and_then(|s| i64::try_from(s).ok())
                    .map(Value::Integer),
            ),
            (
                "stop",
                p.stop
                    .clone()
                    .map(|s| Value::Array(s.into_iter().map(Value::String).collect())),
            ),
            ("repeat_penalty", p.repeat_penalty.map(float)),
            ("frequency_penalty", p.frequency_penalty.map(float)),
            ("presence_penalty", p.presence_penalty.map(float)),
            ("repeat_last_n", p.repeat_last_n.map(int)),
            ("dry_multiplier", p.dry_multiplier.map(float)),
            ("dry_base", p.dry_base.map(float)),
            ("dry_allowed_length", p.dry_allowed_length.map(int)),
            (
                "dry_penalty_last_n",
                p.dry_penalty_last_n.map(|n| Value::Integer(n.into())),
            ),
        ];
        for (key, value) in fields {
            if let Some(value) = value {
                node.insert(key.into(), value);
            }
        }
        // A node measured to stop early stops no later with a lower cap.
        if let Some(e) = t.expected_tokens {
            node.insert(
                "expected_tokens".into(),
                int(max_tokens.map_or(e, |cap| e.min(cap))),
            );
        }
        if !inputs.is_empty() {
            node.insert(
                "inputs".into(),
                Value::Array(inputs.iter().cloned().map(Value::String).collect()),
            );
        }
        if !t.config.is_empty() {
            node.insert(
                "config".into(),
                Value::Table(
                    t.config
                        .iter()
                        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                        .collect(),
                ),
            );
        }
        node
    }

    /// The variant as a pipeline.
    pub fn build(&self, g: &Genome, name: &str) -> Result<Pipeline, SpaceError> {
        let text = toml::to_string(&self.toml(g, name)).unwrap_or_default();
        Ok(Pipeline::parse(&text, &format!("tuned:{name}"))?)
    }
}
