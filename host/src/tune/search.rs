//! Beam search over a [`Space`] on the critical-path model.
//!
//! The objective is the best quality whose predicted critical path meets the budget (ties:
//! the shorter path); while nothing meets it, the shortest path. Quality during the search
//! is a prior (`Prior`: proposers add with diminishing returns, a second layer adds less,
//! each node weighted by its model's quality, a staircase, shorter proposers or a tiny first
//! chunk cost a little), because a real score needs real runs; `staircase tune` re-scores
//! the shortlist with `staircase eval`. Every genome the search touched is kept, for the
//! Pareto front and the shortlist.
//! The search moves one choice at a time from the base pipeline and from the smallest
//! variant, keeps half its `width` by the objective and half by quality among variants near
//! the budget, and stops when a round finds nothing better.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Serialize;

use super::predict::{LatencyTable, Prediction, predict};
use super::space::{Genome, Space, SpaceError};
use crate::policy::StreamMode;

/// How much each further proposer adds to the prior, relative to the previous one.
const PROPOSER_DECAY: f64 = 0.5;
/// A second layer's weight relative to the first proposer.
const REFINER_WEIGHT: f64 = 0.25;
/// A proposer answering alone, relative to one proposer with an aggregator over it.
const ALONE_WEIGHT: f64 = 0.6;
/// A staircase aggregator relative to a layered one (issue 10: about equal once the first
/// chunk carries meaning).
const STAIRCASE_WEIGHT: f64 = 0.98;
/// Each halving of the proposers' token caps (issue 15's eval: 32-token proposers under a
/// staircase aggregator were rated as high as 128-token ones; complete edges lose more,
/// but the prior keeps one figure and the shortlist's eval decides).
const HALF_LENGTH_WEIGHT: f64 = 0.95;
/// First chunks below this many tokens invite degenerate starts.
const SMALL_FIRST_CHUNK: u32 = 8;
const SMALL_FIRST_CHUNK_WEIGHT: f64 = 0.9;

/// Variants up to this multiple of the budget may stay in the beam as stepping stones.
const NEAR_BUDGET: f64 = 1.5;

/// The search's quality prior: a weight per model (default 1).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Prior {
    pub model_quality: BTreeMap<String, f64>,
}

impl Prior {
    fn weight(&self, space: &Space, model: usize) -> f64 {
        self.model_quality
            .get(&space.models[model])
            .copied()
            .unwrap_or(1.0)
    }

    /// The prior quality of `g` (higher is better; the base `moa` on one model is 1.75).
    pub fn of(&self, space: &Space, g: &Genome) -> f64 {
        let decayed = |picks: &[Option<usize>]| {
            let mut weights: Vec<f64> = picks
                .iter()
                .flatten()
                .map(|&m| self.weight(space, m))
                .collect();
            weights.sort_by(|a, b| b.total_cmp(a));
            weights
                .iter()
                .enumerate()
                .map(|(k, w)| w * PROPOSER_DECAY.powi(i32::try_from(k).unwrap_or(i32::MAX)))
                .sum::<f64>()
        };
        let proposers = decayed(&g.proposers);
        match g.aggregator {
            None => ALONE_WEIGHT * proposers,
            Some(m) => {
                let mut q =
                    (proposers + REFINER_WEIGHT * decayed(&g.refiners)) * self.weight(space, m);
                q *= HALF_LENGTH_WEIGHT.powf(-space.lengths[g.length].log2());
                if g.staircase {
                    q *= STAIRCASE_WEIGHT;
                    if space.schedules[g.schedule].size(0) < SMALL_FIRST_CHUNK {
                        q *= SMALL_FIRST_CHUNK_WEIGHT;
                    }
                }
                q
            }
        }
    }
}

/// One variant the search scored.
#[derive(Clone, Debug, Serialize)]
pub struct Scored {
    pub genome: Genome,
    pub prior: f64,
    pub prediction: Prediction,
}

impl Scored {
    pub fn meets(&self, budget: Duration) -> bool {
        self.prediction.critical_path <= budget
    }
}

/// Whether `a` is a better answer than `b` for `budget`.
fn better(a: &Scored, b: &Scored, budget: Duration) -> bool {
    match (a.meets(budget), b.meets(budget)) {
        (true, false) => true,
        (false, true) => false,
        (true, true) => {
            a.prior > b.prior
                || (a.prior == b.prior && a.prediction.critical_path < b.prediction.critical_path)
        }
        (false, false) => a.prediction.critical_path < b.prediction.critical_path,
    }
}

/// What the search found.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// The best variant: the best prior under the budget, else the fastest.
    pub best: Scored,
    /// Whether `best` meets the budget.
    pub met_budget: bool,
    /// Non-dominated variants (higher prior, shorter path), fastest first.
    pub front: Vec<Scored>,
    /// Every genome scored on the model, fastest first.
    pub scored: Vec<Scored>,
}

/// Settings of the search.
#[derive(Clone, Debug)]
pub struct SearchOptions {
    pub budget: Duration,
    pub width: usize,
    /// Rounds without a better best before stopping.
    pub patience: usize,
    pub max_rounds: usize,
    pub prompt_tokens: u32,
}

impl Default for SearchOptions {
    fn default() -> Self {
        Self {
            budget: Duration::from_secs(10),
            width: 8,
            patience: 4,
            max_rounds: 64,
            prompt_tokens: 32,
        }
    }
}

/// Every genome one choice away from `g`.
pub fn neighbours(space: &Space, g: &Genome) -> Vec<Genome> {
    let m = space.models.len();
    let mut out = Vec::new();
    let mut slot_moves = |picks: fn(&mut Genome) -> &mut Vec<Option<usize>>, len: usize| {
        for i in 0..len {
            for choice in std::iter::once(None).chain((0..m).map(Some)) {
                let mut n = g.clone();
                if picks(&mut n)[i] != choice {
                    picks(&mut n)[i] = choice;
                    out.push(n);
                }
            }
        }
    };
    slot_moves(|g| &mut g.proposers, g.proposers.len());
    slot_moves(|g| &mut g.refiners, g.refiners.len());
    for choice in std::iter::once(None).chain((0..m).map(Some)) {
        if g.aggregator != choice {
            out.push(Genome {
                aggregator: choice,
                ..g.clone()
            });
        }
    }
    out.push(Genome {
        staircase: !g.staircase,
        ..g.clone()
    });
    for s in 0..space.schedules.len() {
        if s != g.schedule {
            out.push(Genome {
                schedule: s,
                ..g.clone()
            });
        }
    }
    for length in 0..space.lengths.len() {
        if length != g.length {
            out.push(Genome {
                length,
                ..g.clone()
            });
        }
    }
    let mut out: Vec<Genome> = out
        .into_iter()
        .filter(Genome::valid)
        .map(Genome::canonical)
        .filter(|n| n != g)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The smallest variant: the first proposer alone on the fastest model for `table`.
fn smallest(space: &Space, table: &LatencyTable) -> Genome {
    let fastest = (0..space.models.len())
        .min_by_key(|&m| table.of(&space.models[m]).solo.decode_per_token)
        .unwrap_or(0);
    let mut proposers = vec![None; space.proposers.len()];
    proposers[0] = Some(fastest);
    Genome {
        proposers,
        refiners: vec![None; space.refiners.len()],
        aggregator: None,
        staircase: true,
        schedule: 0,
        length: 0,
    }
}

/// Scores one genome on the model.
pub fn score(
    space: &Space,
    prior: &Prior,
    table: &LatencyTable,
    prompt_tokens: u32,
    g: &Genome,
) -> Result<Scored, SpaceError> {
    let pipeline = space.build(g, "candidate")?;
    Ok(Scored {
        genome: g.clone(),
        prior: prior.of(space, g),
        prediction: predict(&pipeline, StreamMode::Staircase, prompt_tokens, table),
    })
}

/// Searches `space` from `base`.
pub fn search(
    space: &Space,
    base: &Genome,
    prior: &Prior,
    table: &LatencyTable,
    options: &SearchOptions,
) -> Result<Outcome, SpaceError> {
    let budget = options.budget;
    let mut seen: HashMap<Genome, Scored> = HashMap::new();
    let eval = |g: &Genome, seen: &mut HashMap<Genome, Scored>| -> Result<Scored, SpaceError> {
        if let Some(s) = seen.get(g) {
            return Ok(s.clone());
        }
        let s = score(space, prior, table, options.prompt_tokens, g)?;
        seen.insert(g.clone(), s.clone());
        Ok(s)
    };
    let mut beam = vec![
        eval(&base.clone().canonical(), &mut seen)?,
        eval(&smallest(space, table), &mut seen)?,
    ];
    let mut best = pick_best(&beam, budget).clone();
    let (mut stale, mut rounds) = (0, 0);
    while stale < options.patience && rounds < options.max_rounds {
        rounds += 1;
        let mut next: Vec<Scored> = beam.clone();
        for member in &beam {
            for n in neighbours(space, &member.genome) {
                if !next.iter().any(|s| s.genome == n) {
                    next.push(eval(&n, &mut seen)?);
                }
            }
        }
        // Sort best first by the objective: a total order (meets, then prior or path).
        next.sort_by(|a, b| {
            if better(a, b, budget) {
                std::cmp::Ordering::Less
            } else if better(b, a, budget) {
                std::cmp::Ordering::Greater
            } else {
                a.genome.cmp(&b.genome)
            }
        });
        // Half the beam by the objective; the rest by prior among variants near the budget,
        // so the search can cross an infeasible step (a refiner added before the schedule
        // that pays for it).
        let width = options.width.max(2);
        let near = budget.mul_f64(NEAR_BUDGET);
        let mut kept: Vec<Scored> = next.iter().take(width / 2).cloned().collect();
        let mut rest: Vec<&Scored> = next[kept.len()..]
            .iter()
            .filter(|s| s.prediction.critical_path <= near)
            .collect();
        rest.sort_by(|a, b| b.prior.total_cmp(&a.prior).then(a.genome.cmp(&b.genome)));
        kept.extend(rest.into_iter().take(width - kept.len()).cloned());
        beam = kept;
        let round_best = pick_best(&beam, budget);
        if better(round_best, &best, budget) {
            best = round_best.clone();
            stale = 0;
        } else {
            stale += 1;
        }
    }
    let mut all: Vec<Scored> = seen.into_values().collect();
    all.sort_by(|a, b| {
        a.prediction
            .critical_path
            .cmp(&b.prediction.critical_path)
            .then(b.prior.total_cmp(&a.prior))
            .then(a.genome.cmp(&b.genome))
    });
    let mut front: Vec<Scored> = Vec::new();
    for s in &all {
        if front.last().is_none_or(|f| s.prior > f.prior) {
            front.push(s.clone());
        }
    }
    Ok(Outcome {
        met_budget: best.meets(budget),
        best,
        front,
        scored: all,
    })
}

fn pick_best(candidates: &[Scored], budget: Duration) -> &Scored {
    let mut best = &candidates[0];
    for c in &candidates[1..] {
        if better(c, best, budget) {
            best = c;
        }
    }
    best
}

/// Every valid genome of `space` (tests compare the search with this on small spaces).
pub fn enumerate(space: &Space) -> Vec<Genome> {
    let m = space.models.len();
    let slots = space.proposers.len() + space.refiners.len();
    let choices: Vec<Option<usize>> = std::iter::once(None).chain((0..m).map(Some)).collect();
    let mut picks: Vec<Vec<Option<usize>>> = vec![Vec::new()];
    for _ in 0..slots {
        picks = picks
            .into_iter()
            .flat_map(|p| {
                choices.iter().map(move |&c| {
                    let mut p = p.clone();
                    p.push(c);
                    p
                })
            })
            .collect();
    }
    let mut out = Vec::new();
    for p in &picks {
        for &aggregator in &choices {
            for staircase in [false, true] {
                for schedule in 0..space.schedules.len() {
                    for length in 0..space.lengths.len() {
                        let g = Genome {
                            proposers: p[..space.proposers.len()].to_vec(),
                            refiners: p[space.proposers.len()..].to_vec(),
                            aggregator,
                            staircase,
                            schedule,
                            length,
                        };
                        if g.valid() && g == g.clone().canonical() {
                            out.push(g);
                        }
                    }
                }
            }
        }
    }
    out
}
