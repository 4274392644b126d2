//! The tuner's tests: the search against exhaustive enumeration on a synthetic latency
//! model, predicted against measured critical paths on the simulated backend, and the
//! load-adaptive choice when no variant meets the budget (the choice under a real engine's
//! load is `host/tests/pipeline.rs`).

use std::sync::Arc;
use std::time::Duration;

use super::predict::{LatencyTable, ModelLatency};
use super::search::{self, Prior, SearchOptions};
use super::space::{Genome, Space};
use super::*;
use crate::app::Launcher;
use crate::engine::simulated::{SimulatedEngine, SimulatedLatencies};
use crate::pipeline::Models;
use crate::pipeline::critical::Latencies;
use crate::plugin::{HostConfig, PluginRuntime, Registry};

const BASE: &str = r#"
name = "base"
[stream]
policy = "staircase"
chunk_tokens = [8, 16, 32]
[[nodes]]
id = "analyst"
kind = "agent"
plugin = "proposer"
model = "slow"
max_tokens = 64
config = { role = "a careful analyst" }
[[nodes]]
id = "critic"
kind = "agent"
plugin = "proposer"
model = "slow"
max_tokens = 64
seed = 2
temperature = 0.7
config = { role = "a sceptical critic" }
[[nodes]]
id = "aggregator"
kind = "aggregator"
plugin = "moa-aggregator"
model = "slow"
max_tokens = 64
inputs = ["analyst", "critic"]
"#;

fn latency(decode_ms: f64, prefill_ms: f64) -> ModelLatency {
    ModelLatency::uniform(Latencies {
        decode_per_token: Duration::from_secs_f64(decode_ms / 1e3),
        prefill_per_token: Duration::from_secs_f64(prefill_ms / 1e3),
    })
}

/// Two models: `slow` is the better one, `fast` decodes four times as fast.
fn synthetic() -> (Space, space::Genome, LatencyTable, Prior) {
    let base = Pipeline::parse(BASE, "base.toml").unwrap();
    let schedules = [
        ChunkSchedule::new(vec![16, 32]).unwrap(),
        ChunkSchedule::new(vec![2, 8]).unwrap(),
    ];
    let (space, genome) = Space::of(&base, vec!["fast".into()], &schedules, &[0.5]).unwrap();
    let table = LatencyTable::uniform(latency(20.0, 1.0))
        .with("slow", latency(20.0, 1.0))
        .with("fast", latency(5.0, 0.25));
    let prior = Prior {
        model_quality: [("slow".to_string(), 1.0), ("fast".to_string(), 0.6)].into(),
    };
    (space, genome, table, prior)
}

/// The known optimum: the best of every valid genome, scored one by one.
fn exhaustive(
    space: &Space,
    table: &LatencyTable,
    prior: &Prior,
    budget: Duration,
) -> (search::Scored, bool) {
    let all: Vec<search::Scored> = search::enumerate(space)
        .iter()
        .map(|g| search::score(space, prior, table, 32, g).unwrap())
        .collect();
    let meeting = all.iter().filter(|s| s.prediction.critical_path <= budget);
    match meeting.max_by(|a, b| {
        a.prior
            .total_cmp(&b.prior)
            .then(b.prediction.critical_path.cmp(&a.prediction.critical_path))
    }) {
        Some(best) => (best.clone(), true),
        None => (
            all.iter()
                .min_by_key(|s| s.prediction.critical_path)
                .unwrap()
                .clone(),
            false,
        ),
    }
}

#[test]
fn the_search_finds_the_known_optimum_for_each_budget() {
    let (space, base, table, prior) = synthetic();
    let enumerated = search::enumerate(&space).len();
    // Budgets from generous to tight: each has its own optimum.
    for budget_ms in [20_000, 4_000, 3_000, 2_000, 1_200, 800] {
        let budget = Duration::from_millis(budget_ms);
        let (known, met) = exhaustive(&space, &table, &prior, budget);
        let options = SearchOptions {
            budget,
            ..SearchOptions::default()
        };
        let found = search::search(&space, &base, &prior, &table, &options).unwrap();
        assert!(met, "budget {budget_ms} ms should be met by something");
        assert!(found.met_budget, "budget {budget_ms} ms");
        assert!(
            (found.best.prior - known.prior).abs() < 1e-9,
            "budget {budget_ms} ms: found {:?} (prior {:.3}, {:?}), known optimum {:?} (prior {:.3}, {:?})",
            space.describe(&found.best.genome),
            found.best.prior,
            found.best.prediction.critical_path,
            space.describe(&known.genome),
            known.prior,
            known.prediction.critical_path
        );
        // A real search: it scored a fraction of the space.
        assert!(
            found.scored.len() < enumerated,
            "{} of {enumerated}",
            found.scored.len()
        );
        // The front is non-dominated, fastest first.
        for pair in found.front.windows(2) {
            assert!(pair[0].prediction.critical_path <= pair[1].prediction.critical_path);
            assert!(pair[0].prior < pair[1].prior);
        }
    }
}

#[test]
fn under_a_budget_nothing_meets_the_search_says_so_and_returns_the_fastest() {
    let (space, base, table, prior) = synthetic();
    let budget = Duration::from_millis(1);
    let (fastest, met) = exhaustive(&space, &table, &prior, budget);
    assert!(!met);
    let options = SearchOptions {
        budget,
        ..SearchOptions::default()
    };
    let found = search::search(&space, &base, &prior, &table, &options).unwrap();
    assert!(!found.met_budget);
    assert_eq!(
        found.best.prediction.critical_path,
        fastest.prediction.critical_path
    );
}

#[test]
fn a_variant_builds_into_a_file_that_parses_back_with_its_variants() {
    let (space, base, _, _) = synthetic();
    let mut table = space.toml(&base, "tuned");
    table.insert("latency_budget_ms".into(), toml::Value::Integer(900));
    let mut small = space.toml(&search::enumerate(&space)[0], "small");
    small.insert("quality".into(), toml::Value::Float(0.25));
    table.insert(
        "variants".into(),
        toml::Value::Array(vec![toml::Value::Table(small)]),
    );
    let text = toml::to_string(&table).unwrap();
    // Written as the file said it, not as the f32 widens (0.699999988079071).
    assert!(text.contains("temperature = 0.7\n"), "{text}");
    let parsed = Pipeline::parse(&text, "tuned.toml").unwrap();
    assert_eq!(parsed.nodes.len(), 3);
    assert_eq!(
        parsed.adaptive.latency_budget,
        Some(Duration::from_millis(900))
    );
    assert_eq!(parsed.adaptive.variants.len(), 1);
    assert_eq!(parsed.adaptive.variants[0].name, "small");
    assert_eq!(parsed.adaptive.variants[0].quality, Some(0.25));
    // A broken variant is refused with the file and the variant named.
    let broken = text.replace("kind = \"agent\"", "kind = \"wizard\"");
    let e = Pipeline::parse(&broken, "tuned.toml").unwrap_err();
    assert!(e.to_string().starts_with("tuned.toml"), "{e}");
}

#[test]
fn a_length_share_cuts_every_proposer_cap_and_its_expected_length_but_not_the_answer() {
    let (mut space, base, _, _) = synthetic();
    // The critic was measured to stop after 40 tokens of its 64.
    space.proposers[1].expected_tokens = Some(40);
    let half = space.lengths.iter().position(|&l| l == 0.5).unwrap();
    let g = Genome {
        length: half,
        ..base.clone()
    };
    let pipeline = space.build(&g, "half").unwrap();
    let node = |id: &str| pipeline.nodes.iter().find(|n| n.id == id).unwrap();
    assert_eq!(node("analyst").params.max_tokens, Some(32));
    assert_eq!(node("critic").params.max_tokens, Some(32));
    assert_eq!(node("critic").expected_tokens, Some(32));
    assert_eq!(node("aggregator").params.max_tokens, Some(64));
    assert!(
        space.describe(&g).contains("analyst@slow:32"),
        "{}",
        space.describe(&g)
    );
    // The file's own lengths are written as they were.
    let full = space.build(&base, "full").unwrap();
    assert_eq!(full.nodes[1].expected_tokens, Some(40));
    assert!(!space.describe(&base).contains(':'));
    // A share outside (0, 1] is refused.
    let file = Pipeline::parse(BASE, "base.toml").unwrap();
    assert!(matches!(
        Space::of(&file, Vec::new(), &[], &[1.5]),
        Err(SpaceError::Length(_))
    ));
}

#[test]
fn the_shortlist_takes_the_best_of_each_shape_that_meets_the_budget() {
    let (space, base, table, prior) = synthetic();
    let budget = Duration::from_millis(3_000);
    let options = SearchOptions {
        budget,
        ..SearchOptions::default()
    };
    let found = search::search(&space, &base, &prior, &table, &options).unwrap();
    let picked = shortlist(&found, budget, 4);
    assert_eq!(picked.len(), 4);
    assert_eq!(picked[0], found.best.genome);
    let shapes: std::collections::BTreeSet<_> = picked.iter().map(Genome::shape).collect();
    assert_eq!(shapes.len(), picked.len(), "one variant per shape");
    let scored = |g: &Genome| found.scored.iter().find(|s| &s.genome == g).unwrap();
    for g in &picked {
        let s = scored(g);
        assert!(s.prediction.critical_path <= budget);
        // No variant of the same shape that meets the budget has a better prior.
        assert!(
            found
                .scored
                .iter()
                .filter(|o| o.genome.shape() == g.shape() && o.prediction.critical_path <= budget)
                .all(|o| o.prior <= s.prior),
            "{}",
            space.describe(g)
        );
    }
    // Best first.
    for pair in picked.windows(2) {
        assert!(scored(&pair[0]).prior >= scored(&pair[1]).prior);
    }
}

fn registry() -> Arc<Registry> {
    let registry = Registry::new(PluginRuntime::new(HostConfig::default()).unwrap());
    registry.load_builtins().unwrap();
    registry
}

fn simulated(decode_ms: f64, prefill_ms: f64) -> Arc<dyn Engine> {
    Arc::new(SimulatedEngine::new(
        SimulatedLatencies {
            decode_per_token: Duration::from_secs_f64(decode_ms / 1e3),
            prefill_per_token: Duration::from_secs_f64(prefill_ms / 1e3),
        },
        tokio::runtime::Handle::current(),
    ))
}

/// Predicted over measured critical path of every shortlisted variant stays within this
/// ratio on the simulated backend (the model ignores the plugin's exact step boundaries).
const PREDICTION_TOLERANCE: (f64, f64) = (0.75, 1.33);

/// Runs on the two simulated models `slow` (also the default) and `fast`.
fn simulated_runner() -> (Launcher, Arc<dyn Engine>) {
    let slow = simulated(8.0, 0.2);
    let mut models = Models::with_default(slow.clone());
    models.insert("slow".into(), slow.clone());
    models.insert("fast".into(), simulated(3.0, 0.1));
    let registry = registry();
    let runner = Arc::new(Runner::new(models, registry.clone()));
    (Launcher::new(runner, registry, None), slow)
}

/// Tuning `BASE` on the simulated runner for a budget of 1.2 s, without `eval`.
fn simulated_options() -> TuneOptions {
    TuneOptions {
        budget: Budget::Fixed(Duration::from_millis(1200)),
        models: vec!["fast".into()],
        schedules: vec![ChunkSchedule::new(vec![16, 32]).unwrap()],
        lengths: vec![0.5],
        prior: Prior::default(),
        width: 4,
        shortlist: 3,
        check_prompts: vec!["Why is the sky blue?".into()],
        eval: None,
        holdout: None,
        name: "base-tuned".into(),
        proposer_tokens: None,
        answer_tokens: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predicted_critical_paths_of_the_shortlist_match_simulated_runs() {
    let (runner, slow) = simulated_runner();
    let base = Pipeline::parse(BASE, "base.toml").unwrap();
    let options = simulated_options();
    let report = tune(&runner, &slow, &base, &options).await.unwrap();
    assert!(report.checked.len() >= 2, "{}", report.table());
    for c in &report.checked {
        assert!(
            c.prediction_ratio >= PREDICTION_TOLERANCE.0
                && c.prediction_ratio <= PREDICTION_TOLERANCE.1,
            "{}: predicted {:.0} ms, measured {:.0} ms\n{}",
            c.name,
            c.predicted_critical_path_ms,
            c.measured_critical_path_ms,
            report.table()
        );
    }
    // The written file loads, with the budget it was tuned for.
    let written = Pipeline::parse(&report.file, "written.toml").unwrap();
    runner.runner().check(&written).unwrap();
    assert_eq!(
        written.adaptive.latency_budget,
        Some(Duration::from_millis(1200))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variants_are_scored_against_the_hand_written_one_and_the_choice_on_held_out_prompts() {
    let (runner, slow) = simulated_runner();
    let base = Pipeline::parse(BASE, "base.toml").unwrap();
    let sample = |prompt: &str| EvalSample {
        prompts: vec![prompt.into()],
        answer_tokens: 16,
        judge: true,
    };
    let options = TuneOptions {
        shortlist: 2,
        eval: Some(sample("Why is the sky blue?")),
        holdout: Some(sample("Why do cats purr?")),
        proposer_tokens: Some(16),
        answer_tokens: Some(16),
        ..simulated_options()
    };
    let report = tune(&runner, &slow, &base, &options).await.unwrap();
    let table = report.table();
    // Every shortlisted variant found its figures in `eval`'s report (looked up by name);
    // the hand-written one is the baseline, equal to itself.
    for c in &report.checked {
        assert!(c.eval.is_some(), "{}: no eval figures\n{table}", c.name);
        if c.hand_written {
            assert_eq!(c.quality, Some(0.5), "{table}");
        } else {
            assert!(
                c.eval.as_ref().and_then(|s| s.rated.as_ref()).is_some(),
                "{}: not rated against the baseline",
                c.name
            );
        }
    }
    let holdout = report.holdout.as_ref().expect("held-out figures");
    assert_eq!(holdout.prompts, 1);
    assert_eq!(holdout.tuned.variant, report.chosen);
    assert_eq!(holdout.tuned.answers, 1);
    assert_eq!(holdout.hand_written.variant, "base/staircase");
    assert!(holdout.tuned.ttft_over_layered.is_some(), "{table}");
    assert!(table.contains("held out: 1 prompts"), "{table}");
}

const ADAPTIVE: &str = r#"
name = "adaptive"
[stream]
policy = "complete"
[[nodes]]
id = "a"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 40
[[nodes]]
id = "b"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 40
[[nodes]]
id = "agg"
kind = "aggregator"
plugin = "moa-aggregator"
model = "default"
max_tokens = 40
inputs = ["a", "b"]

[[variants]]
name = "small"
quality = 0.4
[[variants.nodes]]
id = "solo"
kind = "agent"
plugin = "proposer"
model = "default"
max_tokens = 8
"#;

#[test]
fn no_variant_meeting_the_budget_runs_the_fastest_and_says_so() {
    let pipeline = Pipeline::parse(ADAPTIVE, "adaptive.toml").unwrap();
    let engine: Arc<dyn Engine> = Arc::new(SimulatedEngine::new(
        SimulatedLatencies {
            decode_per_token: Duration::from_millis(10),
            prefill_per_token: Duration::from_millis(5),
        },
        tokio::runtime::Runtime::new().unwrap().handle().clone(),
    ));
    let runner = Runner::new(Models::with_default(engine), registry());
    let request = RunRequest::prompt("hi", StreamMode::Layered);
    let (chosen, choice) =
        adaptive::choose(&runner, &pipeline, &request, Some(Duration::from_millis(1)));
    let choice = choice.unwrap();
    assert_eq!(choice.variant, "small");
    assert!(!choice.met_budget);
    assert!(
        choice.reason.starts_with("no variant meets"),
        "{}",
        choice.reason
    );
    assert_eq!(chosen.nodes.len(), 1);
    assert_eq!(chosen.name, "adaptive");
}

#[test]
fn calibration_takes_the_runs_sharing_cost_and_the_lengths_of_nodes_that_stopped_early() {
    let base = Pipeline::parse(BASE, "base.toml").unwrap();
    let probed = LatencyTable::uniform(latency(10.0, 1.0)).with(
        "slow",
        ModelLatency {
            solo: latency(10.0, 1.0).solo,
            per_extra_sequence: Duration::from_millis(5),
        },
    );
    let node = |id: &str, tokens: u32, per_token_ms: u64, cancelled: bool| NodeReport {
        id: id.into(),
        first_token_ms: Some(Duration::from_millis(100)),
        finished_ms: Some(Duration::from_millis(
            100 + per_token_ms * u64::from(tokens - 1),
        )),
        output_tokens: tokens,
        cancelled,
        ..NodeReport::default()
    };
    // The aggregator's steps (it has inputs) and a cancelled proposer must not count.
    let first = [
        node("analyst", 64, 30, false),
        node("critic", 20, 30, false),
        node("aggregator", 64, 12, false),
    ];
    let second = [
        node("analyst", 5, 90, true),
        node("critic", 20, 30, false),
        node("aggregator", 64, 12, false),
    ];
    let calibration = Calibration::of(&base, &[&first, &second], &probed);
    // `slow` decodes the two proposers and their staircase consumer at once: 30 ms a token
    // over the probed 10 ms alone is two other sequences at 10 ms each, twice the probes' 5.
    assert_eq!(sharing(&base, "slow"), 3);
    assert!(
        (calibration.decode_scale["slow"] - 2.0).abs() < 1e-9,
        "{:?}",
        calibration.decode_scale
    );
    assert_eq!(calibration.lengths, [("critic".to_string(), 20)].into());
    let table = calibration.table(&base, &probed);
    let extra_ms = crate::millis::millis(table.of("slow").per_extra_sequence);
    assert!((extra_ms - 10.0).abs() < 1e-6, "{extra_ms}");
    assert_eq!(
        table.of("slow").solo.decode_per_token,
        Duration::from_millis(10)
    );
    let expected = calibration.lengths(base);
    let tokens: Vec<u32> = expected
        .nodes
        .iter()
        .map(crate::pipeline::critical::expected_tokens)
        .collect();
    assert_eq!(tokens, [64, 20, 64]);
}

#[test]
fn a_variant_is_predicted_at_the_mean_drift_of_the_probes_around_its_runs() {
    let probed = LatencyTable::uniform(latency(10.0, 1.0)).with(
        "slow",
        ModelLatency {
            solo: latency(10.0, 1.0).solo,
            per_extra_sequence: Duration::from_millis(4),
        },
    );
    // The host slowed down by half before the runs and to 2.5x after them: 2x on average.
    let before = vec![("slow".to_string(), latency(15.0, 1.0))];
    let after = vec![("slow".to_string(), latency(25.0, 3.0))];
    let table = rescaled(&probed, &probed, &[before, after]);
    let ms = crate::millis::millis;
    let slow = table.of("slow");
    assert!(
        (ms(slow.solo.decode_per_token) - 20.0).abs() < 1e-6,
        "{slow:?}"
    );
    assert!((ms(slow.per_extra_sequence) - 8.0).abs() < 1e-6, "{slow:?}");
    assert!(
        (ms(slow.solo.prefill_per_token) - 2.0).abs() < 1e-6,
        "{slow:?}"
    );
    // A model no probe saw keeps its figures.
    assert_eq!(table.of("fast"), probed.of("fast"));
}

#[test]
fn a_budget_is_milliseconds_or_a_share_of_the_hand_written_critical_path() {
    assert_eq!(
        "4000".parse::<Budget>(),
        Ok(Budget::Fixed(Duration::from_millis(4000)))
    );
    let share: Budget = "70%".parse().unwrap();
    assert_eq!(share, Budget::OfHandWritten(0.7));
    assert_eq!(share.resolve(10_000.0), Duration::from_millis(7000));
    for bad in ["-5%", "0%", "fast", "4 s"] {
        assert!(bad.parse::<Budget>().is_err(), "{bad}");
    }
}
