//! Dual-model collaboration on the real model: the default model (Q4_1, `large`) and its
//! Q4_0 copy (`small`), routed per step by real router components compiled from
//! `plugins/fixtures/`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

mod common;

use common::Recording;
use staircase::engine::local::quantize::{Quantization, quantized_copy};
use staircase::engine::local::{LocalEngine, LocalEngineConfig, default_threads};
use staircase::engine::{Engine, GenerationRequest, GenerationStream, Prompt};
use staircase::pipeline::{Models, Pipeline, RunRequest, Runner};
use staircase::plugin::builtin::{guest_artifact, guest_manifest};
use staircase::plugin::{HostConfig, PluginRuntime, Registry};
use staircase::policy::StreamMode;

/// The pair's engines, loaded once for the whole file.
fn pair() -> &'static (Arc<dyn Engine>, Arc<dyn Engine>) {
    static PAIR: OnceLock<(Arc<dyn Engine>, Arc<dyn Engine>)> = OnceLock::new();
    PAIR.get_or_init(|| {
        let large = staircase::model::default_model_path().expect("the default model");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("models");
        let small = quantized_copy(&large, &dir, Quantization::Q4_0, default_threads())
            .expect("a Q4_0 copy of the default model");
        let load = |path: PathBuf| -> Arc<dyn Engine> {
            Arc::new(LocalEngine::load(LocalEngineConfig::new(path)).expect("engine loads"))
        };
        (load(small), load(large))
    })
}

fn registry() -> Arc<Registry> {
    let registry = Registry::new(
        PluginRuntime::new(HostConfig {
            cache_dir: Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache")),
            ..HostConfig::default()
        })
        .unwrap(),
    );
    registry.load_builtins().unwrap();
    // A folder per registry: tests run in parallel, and one test copying a plugin file while
    // another loads it reads half a file.
    static REGISTRIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = REGISTRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("staircase-collab-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["script-router", "legacy-router"] {
        std::fs::copy(guest_artifact(name), dir.join(format!("{name}.wasm"))).unwrap();
        let manifest = guest_manifest(&format!("fixtures/{name}"));
        std::fs::copy(manifest, dir.join(format!("{name}.toml"))).unwrap();
        registry
            .load_file(&dir.join(format!("{name}.wasm")))
            .unwrap();
    }
    registry
}

/// A runner on `small` and `large` (recording what each was asked).
fn runner() -> (Runner, Arc<Recording>, Arc<Recording>) {
    let (small, large) = pair();
    let (small, large) = (Recording::new(small.clone()), Recording::new(large.clone()));
    let mut models = Models::with_default(large.clone() as Arc<dyn Engine>);
    models.insert("small".into(), small.clone() as Arc<dyn Engine>);
    models.insert("large".into(), large.clone() as Arc<dyn Engine>);
    (Runner::new(models, registry()), small, large)
}

/// One routed agent: `router` with `config`, 4 tokens per step, 12 in all.
fn routed(router: &str, config: &str) -> Pipeline {
    let text = format!(
        r#"
name = "routed"
[[nodes]]
id = "solo"
kind = "agent"
plugin = "proposer"
router = "{router}"
models = ["small", "large"]
route_tokens = 4
max_tokens = 12
config = {{ {config} }}
"#
    );
    Pipeline::parse(&text, "routed.toml").unwrap()
}

const PROMPT: &str = "Describe the sea in a few sentences.";

#[tokio::test(flavor = "multi_thread")]
async fn steps_land_on_the_models_the_router_names_and_escalation_continues_the_answer() {
    let (runner, small, large) = runner();
    let pipeline = routed("script-router", r#"plan = "small,large""#);
    let report = runner
        .run(
            &pipeline,
            RunRequest::prompt(PROMPT, StreamMode::Staircase),
            None,
        )
        .await
        .unwrap();
    let routes = &report.nodes[0].routes;
    let models: Vec<&str> = routes.iter().map(|r| r.model.as_str()).collect();
    assert_eq!(models, ["small", "large", "large"], "{routes:#?}");
    assert!(routes.iter().all(|r| r.tokens <= 4), "{routes:#?}");
    // The trace shows each routed step's model and reason.
    let trace = report.trace();
    let notes: Vec<_> = trace
        .trace_events
        .iter()
        .filter(|e| e.cat == "route")
        .map(|e| e.args["model"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(notes, models, "{:#?}", trace.trace_events);

    // The local engine measured the small model's confidence, and the router was told it.
    let confidence = routes[0]
        .confidence
        .expect("the local engine reports confidence");
    assert!(confidence.tokens > 0 && confidence.mean_top_prob > 0.0);
    assert!(confidence.mean_top_prob <= 1.0 && confidence.mean_entropy >= 0.0);
    let told = format!("on small at confidence {:.3}", confidence.mean_top_prob);
    assert!(routes[1].reason.contains(&told), "{routes:#?}");

    // Escalation: the large model's first step continues the small model's text, which is
    // what the small model says alone on the same prompt and sampling.
    let small_prompts = small.prompts.lock().unwrap().clone();
    let large_prompts = large.prompts.lock().unwrap().clone();
    assert_eq!((small_prompts.len(), large_prompts.len()), (1, 2));
    let Prompt::Chat {
        messages,
        assistant_prefix: None,
    } = &small_prompts[0]
    else {
        panic!("the first step starts the answer: {:?}", small_prompts[0]);
    };
    let mut alone = GenerationRequest::chat(messages.clone());
    alone.sampling = small.sampling.lock().unwrap()[0].clone();
    let alone = text_of(small.inner.submit(alone).unwrap()).await;
    let Prompt::Chat {
        messages: large_messages,
        assistant_prefix: Some(prefix),
    } = &large_prompts[0]
    else {
        panic!(
            "the large model continues an answer: {:?}",
            large_prompts[0]
        );
    };
    assert_eq!(large_messages, messages, "the same prompt on both models");
    assert!(!alone.is_empty());
    assert!(prefix.ends_with(&alone), "{prefix:?} vs {alone:?}");
    assert!(report.answer.starts_with(prefix.as_str()));
}

/// A stream's text, read to its end.
async fn text_of(mut stream: GenerationStream) -> String {
    let mut text = String::new();
    while let Some(event) = stream.next().await {
        if let staircase::engine::GenerationEvent::Delta { text: delta, .. } = event.unwrap() {
            text.push_str(&delta);
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_the_router_was_not_offered_is_an_error_naming_the_plugin() {
    let (runner, _, _) = runner();
    let pipeline = routed("script-router", r#"plan = "small,medium""#);
    let error = runner
        .run(
            &pipeline,
            RunRequest::prompt(PROMPT, StreamMode::Staircase),
            None,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("script-router") && error.contains("\"medium\""),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_router_of_the_0_1_0_contract_still_routes() {
    let (runner, small, _) = runner();
    let pipeline = routed("legacy-router", "");
    let report = runner
        .run(
            &pipeline,
            RunRequest::prompt(PROMPT, StreamMode::Staircase),
            None,
        )
        .await
        .unwrap();
    let routes = &report.nodes[0].routes;
    assert!(!routes.is_empty());
    assert!(
        routes
            .iter()
            .all(|r| r.model == "large" && r.reason.is_empty())
    );
    assert!(small.prompts.lock().unwrap().is_empty());
}
