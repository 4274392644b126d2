//! The plugin host end to end: built-in plugins through the pipeline's traits, hostile
//! guests, hot reload, capabilities, the compiled-code cache, and the Python and JavaScript
//! examples. Every component here was compiled from source by the build (fixtures live in
//! `plugins/fixtures/`) or by the example's own toolchain.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use staircase::engine::{ChatMessage, Role};
use staircase::plugin::builtin::{guest_artifact, guest_manifest};
use staircase::plugin::{
    Capability, HostConfig, Manifest, PluginError, PluginRuntime, Registry, RegistryEvent,
};
use staircase::policy::{
    Demand, PluginConfig, PluginKind, PolicyProvider, RoleInput, RouteRequest, Source, StreamMode,
    UpstreamOutput,
};

/// Waiting for a file event longer than this means the watcher is broken (a bound on a
/// wait so a broken build fails instead of hanging, not a timing assertion).
const EVENT_TIMEOUT: Duration = Duration::from_secs(120);

/// A fresh folder under the system temp dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("staircase-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The compiled-code cache shared by the tests of this binary (the Python example takes
/// many seconds to compile; its cached copy loads in milliseconds).
fn shared_cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache")
}

fn config() -> HostConfig {
    HostConfig {
        cache_dir: Some(shared_cache()),
        ..HostConfig::default()
    }
}

fn registry_with(config: HostConfig) -> Arc<Registry> {
    let registry = Registry::new(PluginRuntime::new(config).unwrap());
    registry.load_builtins().unwrap();
    registry
}

fn user(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage::new(Role::User, text)]
}

fn sources(n: usize) -> Vec<Source> {
    (0..n)
        .map(|i| Source {
            id: format!("p{i}"),
            label: format!("proposer {i}"),
        })
        .collect()
}

fn fixture(crate_name: &str, dir: &str) -> (Vec<u8>, Manifest) {
    let wasm = std::fs::read(guest_artifact(crate_name)).unwrap();
    let manifest = Manifest::parse(&std::fs::read_to_string(guest_manifest(dir)).unwrap()).unwrap();
    (wasm, manifest)
}

#[test]
fn builtin_plugins_answer_through_the_policy_traits() {
    let registry = registry_with(config());
    let provider: &dyn PolicyProvider = registry.as_ref();
    assert_eq!(provider.kind_of("proposer"), Some(PluginKind::Role));
    assert_eq!(
        provider.kind_of("moa-aggregator"),
        Some(PluginKind::Aggregator)
    );
    assert_eq!(
        provider.kind_of("truncate-compressor"),
        Some(PluginKind::Compressor)
    );
    assert_eq!(provider.kind_of("rule-router"), Some(PluginKind::Router));
    assert_eq!(provider.kind_of("nonexistent"), None);

    let mut role = provider.role("proposer", &PluginConfig::new()).unwrap();
    let prompt = role.system_prompt().unwrap();
    assert!(prompt.contains("helpful assistant"), "{prompt}");
    let messages = role
        .build_messages(&RoleInput {
            conversation: user("Why is the sky blue?"),
            upstream: vec![UpstreamOutput {
                source: Source {
                    id: "a".into(),
                    label: "expert".into(),
                },
                text: "Rayleigh scattering.".into(),
            }],
        })
        .unwrap();
    assert_eq!(messages[0].role, Role::System);
    assert_eq!(
        messages[1],
        ChatMessage::new(Role::User, "Why is the sky blue?")
    );
    assert!(messages[2].content.contains("Rayleigh scattering."));
    assert!(role.params().unwrap().max_tokens > 0);

    // A pipeline node's settings reach the plugin's `config` import.
    let node = [("role".to_string(), "a physicist".to_string())].into();
    let mut physicist = provider.role("proposer", &node).unwrap();
    assert!(
        physicist
            .system_prompt()
            .unwrap()
            .starts_with("You are a physicist.")
    );

    let mut router = provider
        .router("rule-router", &PluginConfig::new())
        .unwrap();
    let mut request = RouteRequest {
        node_id: "n".into(),
        prompt_tokens: 20,
        query: "What is the capital of France?".into(),
        models: vec!["small".into(), "large".into()],
        ..RouteRequest::default()
    };
    assert_eq!(router.route(&request).unwrap().model, "small");
    request.query = "Prove that there are infinitely many primes.".into();
    let hard = router.route(&request).unwrap();
    assert_eq!(hard.model, "large");
    assert!(hard.reason.contains("prove"), "{}", hard.reason);
    // An unsure small model escalates the rest of the answer (0.2.0 features).
    request.query = "What is the capital of France?".into();
    request.previous_model = Some("small".into());
    request.confidence = Some(staircase::engine::Confidence {
        tokens: 16,
        mean_top_prob: 0.1,
        mean_entropy: 4.0,
    });
    let escalated = router.route(&request).unwrap();
    assert_eq!(escalated.model, "large", "{}", escalated.reason);
    assert!(
        escalated.reason.contains("escalated"),
        "{}",
        escalated.reason
    );
    request.previous_model = Some("large".into());
    request.confidence = None;
    assert_eq!(router.route(&request).unwrap().model, "large");

    let mut compressor = provider.compressor("truncate-compressor").unwrap();
    let history = vec![
        ChatMessage::new(Role::System, "Be brief."),
        ChatMessage::new(Role::User, "a".repeat(4000)),
        ChatMessage::new(Role::Assistant, "b".repeat(40)),
        ChatMessage::new(Role::User, "the latest question"),
    ];
    let short = compressor.compress(&history, 64).unwrap();
    assert_eq!(short[0], history[0], "system messages stay");
    assert_eq!(
        short.last(),
        history.last(),
        "the newest message stays whole"
    );
    let bytes: usize = short.iter().map(|m| m.content.len()).sum();
    assert!(bytes < 64 * 4 + 8, "within the budget: {bytes} bytes");
    assert!(
        compressor.compress(&history, 1).is_err(),
        "system alone is over budget"
    );
}

#[test]
fn moa_aggregator_steps_early_in_staircase_mode_and_once_in_layered_mode() {
    let registry = registry_with(config());
    let conversation = user("Why is the sky blue?");
    let srcs = sources(2);

    let mut stair = registry
        .aggregator(
            "moa-aggregator",
            &PluginConfig::new(),
            &conversation,
            &srcs,
            StreamMode::Staircase,
        )
        .unwrap();
    let warm_up = stair
        .next_step()
        .unwrap()
        .expect("a warm-up of the prompt head before any text");
    assert!(!warm_up.is_final && warm_up.max_tokens == 0);
    assert_eq!(
        stair.next_step().unwrap(),
        None,
        "nothing to say before any text"
    );
    assert_eq!(
        stair.push("p0", "Because of Rayleigh").unwrap(),
        Demand::More
    );
    let first = stair
        .next_step()
        .unwrap()
        .expect("staircase steps on the first chunk");
    assert!(!first.is_final);
    assert_eq!(first.messages[0].role, Role::System);
    assert!(
        first.messages[1]
            .content
            .starts_with("Why is the sky blue?")
    );
    assert!(first.messages[1].content.ends_with("Because of Rayleigh"));
    assert_eq!(first.messages[0], warm_up.messages[0]);
    assert!(
        first.messages[1]
            .content
            .starts_with(&warm_up.messages[1].content),
        "the first step extends the warmed-up head"
    );
    stair.push("p1", &"Light scatters. ".repeat(20)).unwrap();
    let second = stair
        .next_step()
        .unwrap()
        .expect("enough new text for a step");
    assert!(
        second.messages[1]
            .content
            .starts_with(&first.messages[1].content),
        "each step extends the previous prompt, so the cached prefix is reused"
    );
    stair.answered("The sky is blue").unwrap();
    stair.finish("p0").unwrap();
    assert_eq!(stair.next_step().unwrap(), None);
    stair.finish("p1").unwrap();
    let last = stair
        .next_step()
        .unwrap()
        .expect("a final step once all finished");
    assert!(last.is_final);
    assert_eq!(
        stair.next_step().unwrap(),
        None,
        "nothing after the final step"
    );

    let mut layered = registry
        .aggregator(
            "moa-aggregator",
            &PluginConfig::new(),
            &conversation,
            &srcs,
            StreamMode::Layered,
        )
        .unwrap();
    let warm_up = layered.next_step().unwrap().expect("layered warms up too");
    assert_eq!(warm_up.max_tokens, 0);
    layered.push("p0", &"text ".repeat(100)).unwrap();
    layered.finish("p0").unwrap();
    layered.push("p1", "more").unwrap();
    assert_eq!(
        layered.next_step().unwrap(),
        None,
        "layered waits for every source"
    );
    layered.finish("p1").unwrap();
    let only = layered.next_step().unwrap().expect("one step");
    assert!(only.is_final);
    assert!(only.messages[1].content.contains("### proposer 0"));
    assert!(only.messages[1].content.contains("### proposer 1"));
}

/// A pipeline node's `config` reaches the aggregator: with `opening-tokens` the built-in
/// aggregator's first step, in staircase mode, writes that many tokens on the prompt head
/// alone (no proposer text yet) instead of a zero-token warm-up; the next step extends the
/// head, so the prefix the opening cached is reused. Layered mode ignores the opening.
#[test]
fn moa_aggregator_opens_from_the_question_when_its_node_config_says_so() {
    let registry = registry_with(config());
    let conversation = user("Why is the sky blue?");
    let srcs = sources(2);
    let node_config =
        std::collections::BTreeMap::from([("opening-tokens".to_string(), "8".to_string())]);
    let open = |mode| {
        PolicyProvider::aggregator(
            registry.as_ref(),
            "moa-aggregator",
            &node_config,
            &conversation,
            &srcs,
            mode,
        )
        .unwrap()
    };
    let mut stair = open(StreamMode::Staircase);
    let opening = stair.next_step().unwrap().expect("the opening");
    assert!(!opening.is_final);
    assert_eq!(opening.max_tokens, 8, "the node's opening-tokens");
    assert!(
        !opening.messages[1].content.contains("###"),
        "no proposer text"
    );
    stair.answered("The sky looks blue").unwrap();
    assert_eq!(stair.next_step().unwrap(), None, "then it waits for text");
    stair.push("p0", "Because of Rayleigh").unwrap();
    let first = stair
        .next_step()
        .unwrap()
        .expect("a step on the first chunk");
    assert!(first.max_tokens > 0 && !first.is_final);
    assert!(
        first.messages[1]
            .content
            .starts_with(&opening.messages[1].content),
        "the step after the opening extends its head"
    );

    let mut layered = open(StreamMode::Layered);
    let warm_up = layered.next_step().unwrap().expect("a warm-up");
    assert_eq!(warm_up.max_tokens, 0, "layered mode has no opening");
}

/// The hostile fixture as its own registry entry, next to the built-ins.
fn hostile_registry() -> Arc<Registry> {
    let registry = registry_with(config());
    let dir = Scratch::new("hostile");
    for (from, to) in [
        (guest_artifact("hostile"), dir.0.join("hostile.wasm")),
        (
            guest_manifest("fixtures/hostile"),
            dir.0.join("hostile.toml"),
        ),
    ] {
        std::fs::copy(from, to).unwrap();
    }
    registry.load_file(&dir.0.join("hostile.wasm")).unwrap();
    registry
}

fn attack(registry: &Registry, chunk: &str) -> PluginError {
    let mut session = registry
        .open_aggregator("hostile", &user("hi"), &sources(1), StreamMode::Staircase)
        .unwrap();
    session.try_push("p0", "a harmless first chunk").unwrap();
    let error = match session.try_push("p0", chunk) {
        Err(error) => error,
        Ok(_) => session
            .try_next_step()
            .expect_err("the attack must fail by the next call"),
    };
    // The session's store was dropped: it is never entered again.
    assert!(
        matches!(
            session.try_push("p0", "again"),
            Err(PluginError::Poisoned { .. })
        ),
        "a failed instance stays failed"
    );
    error
}

/// After an attack, other plugins and a fresh run of the same plugin still work.
fn still_serving(registry: &Registry) {
    still_serving_builtin(registry);
    let mut fresh = registry
        .open_aggregator("hostile", &user("q"), &sources(1), StreamMode::Staircase)
        .unwrap();
    fresh.try_push("p0", "hello").unwrap();
    let step = fresh.try_next_step().unwrap().unwrap();
    assert_eq!(
        step.messages[0].content, "hello",
        "a fresh instance, no state of the old one"
    );
}

#[test]
fn an_infinite_loop_times_out_at_the_plugin_deadline() {
    let registry = hostile_registry();
    match attack(&registry, "loop") {
        PluginError::Timeout {
            plugin,
            deadline,
            call,
        } => {
            assert_eq!(plugin.to_string(), "hostile@1.0.0");
            assert_eq!(
                deadline,
                Duration::from_millis(100),
                "the manifest's call-ms"
            );
            assert_eq!(call, "session.push");
        }
        other => panic!("expected a timeout, got {other}"),
    }
    still_serving(&registry);
}

#[test]
fn unbounded_allocation_is_out_of_memory() {
    let registry = hostile_registry();
    match attack(&registry, "alloc") {
        PluginError::OutOfMemory {
            plugin, limit_mib, ..
        } => {
            assert_eq!(plugin.name, "hostile");
            assert_eq!(limit_mib, 64);
        }
        other => panic!("expected out of memory, got {other}"),
    }
    still_serving(&registry);
}

#[test]
fn infinite_recursion_is_a_stack_overflow_trap() {
    let registry = hostile_registry();
    match attack(&registry, "recurse") {
        PluginError::Trap { kind, plugin, .. } => {
            assert_eq!(plugin.version, "1.0.0");
            assert!(kind.contains("call stack exhausted"), "{kind}");
        }
        other => panic!("expected a stack overflow, got {other}"),
    }
    still_serving(&registry);
}

#[test]
fn a_host_file_is_out_of_reach() {
    let registry = hostile_registry();
    let dir = Scratch::new("secret");
    let secret = dir.0.join("secret.txt");
    std::fs::write(&secret, "the host's secret").unwrap();
    // The guest panics when the read fails (it has no preopened folder), so a refusal is a
    // trap; a successful read would have put the content in its next step.
    let error = attack(&registry, &format!("read:{}", secret.display()));
    assert!(matches!(error, PluginError::Trap { .. }), "{error}");
    assert!(!error.to_string().contains("the host's secret"));
    still_serving(&registry);
}

#[test]
fn a_huge_answer_is_refused() {
    let registry = hostile_registry();
    match attack(&registry, "huge") {
        PluginError::OutputTooLarge { bytes, limit, .. } => assert!(bytes > limit),
        other => panic!("expected output too large, got {other}"),
    }
    still_serving(&registry);
}

#[test]
fn a_panic_mid_session_is_a_trap_and_the_next_run_is_fresh() {
    let registry = hostile_registry();
    match attack(&registry, "panic") {
        PluginError::Trap { kind, call, .. } => {
            assert!(kind.contains("unreachable"), "a Rust panic aborts: {kind}");
            assert_eq!(call, "session.push");
        }
        other => panic!("expected a trap, got {other}"),
    }
    still_serving(&registry);
}

#[test]
fn an_ungranted_capability_is_refused_at_load() {
    let (wasm, manifest) = fixture("model-compressor", "fixtures/model-compressor");
    let runtime = PluginRuntime::new(config()).unwrap();
    match runtime.load(&wasm, manifest.clone()) {
        Err(PluginError::CapabilityNotGranted { plugin, capability }) => {
            assert_eq!(plugin.name, "model-compressor");
            assert_eq!(capability, Capability::Model);
            let message = PluginError::CapabilityNotGranted { plugin, capability }.to_string();
            assert!(message.contains("model-compressor") && message.contains("`model`"));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Granted, it loads; without an engine its model calls fail cleanly.
    let mut granted = config();
    granted
        .grants
        .insert("model-compressor".into(), [Capability::Model].into());
    let registry = Registry::new(PluginRuntime::new(granted).unwrap());
    let dir = Scratch::new("granted");
    std::fs::write(dir.0.join("model-compressor.wasm"), &wasm).unwrap();
    std::fs::copy(
        guest_manifest("fixtures/model-compressor"),
        dir.0.join("model-compressor.toml"),
    )
    .unwrap();
    registry
        .load_file(&dir.0.join("model-compressor.wasm"))
        .unwrap();
    let mut compressor = registry.open_compressor("model-compressor").unwrap();
    match compressor.try_compress(&user("long history"), 16) {
        Err(PluginError::Refused { message, .. }) => assert!(message.contains("no model engine")),
        other => panic!("expected the plugin's own error, got {other:?}"),
    }
}

#[test]
fn compiled_code_is_cached_by_content_and_engine() {
    let cache = Scratch::new("cache");
    let (wasm, manifest) = fixture("reload-v1", "fixtures/reload-v1");
    let runtime = PluginRuntime::new(HostConfig {
        cache_dir: Some(cache.0.clone()),
        ..HostConfig::default()
    })
    .unwrap();
    let first = runtime.load(&wasm, manifest.clone()).unwrap();
    assert!(!first.from_cache);
    let second = runtime.load(&wasm, manifest.clone()).unwrap();
    assert!(second.from_cache);
    let files: Vec<PathBuf> = std::fs::read_dir(&cache.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&first.sha256) && name.ends_with(".cwasm"),
        "{name}"
    );

    // A corrupt entry is discarded and recompiled, never trusted. (A new file: the old one
    // is memory-mapped by `second`.)
    std::fs::remove_file(&files[0]).unwrap();
    std::fs::write(&files[0], b"not machine code").unwrap();
    let third = runtime.load(&wasm, manifest).unwrap();
    assert!(!third.from_cache);
    assert_eq!(third.sha256, first.sha256);
}

#[test]
fn invalid_and_wrong_interface_components_are_typed_errors() {
    let runtime = PluginRuntime::new(config()).unwrap();
    let (wasm, manifest) = fixture("reload-v1", "fixtures/reload-v1");
    match runtime.load(&wasm[..wasm.len() / 2], manifest.clone()) {
        Err(PluginError::InvalidComponent { plugin, .. }) => {
            assert_eq!(plugin.to_string(), "reloadable@1.0.0")
        }
        other => panic!("expected an invalid component, got {other:?}"),
    }
    let (aggregator, _) = fixture("hostile", "fixtures/hostile");
    match runtime.load(&aggregator, manifest) {
        Err(PluginError::IncompatibleInterface { expected, .. }) => {
            assert_eq!(expected, PluginKind::Role)
        }
        other => panic!("expected an incompatible interface, got {other:?}"),
    }
}

/// Replaces a file atomically: written under a name the watcher ignores, then renamed.
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The next event matching `want`, skipping others.
fn wait_for(
    events: &Receiver<RegistryEvent>,
    want: impl Fn(&RegistryEvent) -> bool,
) -> RegistryEvent {
    loop {
        let event = events
            .recv_timeout(EVENT_TIMEOUT)
            .expect("the registry reports every file change");
        if want(&event) {
            return event;
        }
    }
}

fn system_prompt(registry: &Registry) -> String {
    registry
        .open_role("reloadable")
        .unwrap()
        .try_system_prompt()
        .unwrap()
}

#[test]
fn hot_reload_swaps_versions_under_load_without_a_failed_call() {
    let registry = registry_with(config());
    let dir = Scratch::new("reload");
    let wasm_path = dir.0.join("reloadable.wasm");
    let toml_path = dir.0.join("reloadable.toml");
    let read = |p: PathBuf| std::fs::read(p).unwrap();
    let v1 = (
        read(guest_artifact("reload-v1")),
        read(guest_manifest("fixtures/reload-v1")),
    );
    let v2 = (
        read(guest_artifact("reload-v2")),
        read(guest_manifest("fixtures/reload-v2")),
    );
    replace(&toml_path, &v1.1);
    replace(&wasm_path, &v1.0);
    registry
        .load_dir(&dir.0)
        .unwrap()
        .into_iter()
        .for_each(|(_, r)| {
            r.unwrap();
        });
    let events = registry.subscribe();
    registry.watch(std::slice::from_ref(&dir.0)).unwrap();

    // A caller that never stops asking, as a server would.
    let stop = Arc::new(AtomicBool::new(false));
    let caller = {
        let (registry, stop) = (registry.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut calls, mut failures, mut seen) =
                (0usize, Vec::new(), std::collections::BTreeSet::new());
            while !stop.load(Ordering::Relaxed) {
                match registry
                    .role("reloadable", &PluginConfig::new())
                    .and_then(|mut r| r.system_prompt())
                {
                    Ok(prompt) => {
                        seen.insert(prompt);
                    }
                    Err(error) => failures.push(error.to_string()),
                }
                calls += 1;
            }
            (calls, failures, seen)
        })
    };

    for round in 0..3 {
        for (version, (wasm, toml)) in [("v2", &v2), ("v1", &v1)] {
            // A run that started before the swap keeps its version to the end.
            let mut in_flight = registry.open_role("reloadable").unwrap();
            let before = in_flight.try_system_prompt().unwrap();
            replace(&toml_path, toml);
            replace(&wasm_path, wasm);
            let expected = sha256(wasm);
            wait_for(
                &events,
                |e| matches!(e, RegistryEvent::Loaded { sha256, .. } if *sha256 == expected),
            );
            assert_eq!(
                system_prompt(&registry),
                format!("reloadable {version}"),
                "round {round}"
            );
            assert_eq!(
                in_flight.try_system_prompt().unwrap(),
                before,
                "in-flight run kept its version"
            );
        }
    }

    // A truncated file and a component of the wrong kind are rejected; v1 keeps serving.
    replace(&wasm_path, &v1.0[..v1.0.len() / 3]);
    match wait_for(&events, |e| matches!(e, RegistryEvent::Rejected { .. })) {
        RegistryEvent::Rejected { error, .. } => {
            assert!(error.contains("invalid component"), "{error}")
        }
        _ => unreachable!(),
    }
    assert_eq!(system_prompt(&registry), "reloadable v1");
    replace(&wasm_path, &read(guest_artifact("hostile")));
    match wait_for(&events, |e| matches!(e, RegistryEvent::Rejected { .. })) {
        RegistryEvent::Rejected { error, .. } => {
            assert!(error.contains("incompatible interface"), "{error}")
        }
        _ => unreachable!(),
    }
    assert_eq!(system_prompt(&registry), "reloadable v1");

    stop.store(true, Ordering::Relaxed);
    let (calls, failures, seen) = caller.join().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed calls of {calls}: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(
        seen.contains("reloadable v1") && seen.contains("reloadable v2"),
        "{seen:?}"
    );

    // A plain in-place write (as `cp` does) is picked up once the file is complete.
    std::fs::write(&toml_path, &v2.1).unwrap();
    std::fs::write(&wasm_path, &v2.0).unwrap();
    let expected = sha256(&v2.0);
    wait_for(
        &events,
        |e| matches!(e, RegistryEvent::Loaded { sha256, .. } if *sha256 == expected),
    );
    assert_eq!(system_prompt(&registry), "reloadable v2");

    // Removing the file unloads the plugin; a run holding it finishes on it.
    let mut holder = registry.open_role("reloadable").unwrap();
    std::fs::remove_file(&wasm_path).unwrap();
    wait_for(&events, |e| matches!(e, RegistryEvent::Unloaded { .. }));
    assert_eq!(registry.kind_of("reloadable"), None);
    assert_eq!(holder.try_system_prompt().unwrap(), "reloadable v2");
}

/// The repository's root folder.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds an example with its language's toolchain, once per content of its sources (the
/// build output is kept in the test scratch folder), and installs it with its manifest in
/// `dir`. Fails, never skips, when the toolchain (`tool`, with files it installs in the
/// example's folder, `tool_files`) is missing, naming it and the command that installs it
/// (which `cargo xtask test`, the README's test command, runs).
fn build_example(
    lang: &str,
    sources: &[&str],
    name: &str,
    dir: &Path,
    (tool, tool_files, install): (&str, &[&str], &str),
    build: impl Fn(&Path) -> std::process::Command,
) -> PathBuf {
    use sha2::Digest;
    let example = repo().join("examples/plugins").join(lang);
    let mut hasher = sha2::Sha256::new();
    for file in sources
        .iter()
        .copied()
        .chain(["../../../wit/v0.1.0/agent.wit"])
    {
        hasher.update(std::fs::read(example.join(file)).unwrap());
    }
    let built = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("examples")
        .join(format!(
            "{name}-{}.wasm",
            hex::encode(&hasher.finalize()[..8])
        ));
    if !built.exists() {
        std::fs::create_dir_all(built.parent().unwrap()).unwrap();
        let partial = built.with_extension("partial.wasm");
        let mut command = build(&partial);
        let missing = format!(
            "{tool} is missing: `cargo xtask test` installs it before the tests, or run \
             `{install}`"
        );
        for file in tool_files {
            assert!(example.join(file).exists(), "{missing}");
        }
        let output = command.output().unwrap_or_else(|e| {
            panic!("cannot run the {lang} example's build ({command:?}): {e}. {missing}")
        });
        assert!(
            output.status.success(),
            "building the {lang} example failed ({command:?}):\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::rename(&partial, &built).unwrap();
    }
    let wasm = dir.join(format!("{name}.wasm"));
    std::fs::copy(&built, &wasm).unwrap();
    std::fs::copy(
        example.join(format!("{name}.toml")),
        dir.join(format!("{name}.toml")),
    )
    .unwrap();
    wasm
}

#[test]
fn the_python_example_aggregates_through_the_same_host_code() {
    let dir = Scratch::new("python");
    let wasm = build_example(
        "python",
        &["app.py", "aggregator_policy.py"],
        "py-relay",
        &dir.0,
        (
            "componentize-py 0.25.1",
            &[],
            "python3 -m pip install componentize-py==0.25.1",
        ),
        |out| {
            let mut command = std::process::Command::new("componentize-py");
            command
                .arg("-d")
                .arg(repo().join("wit/v0.1.0"))
                .args(["-w", "aggregator", "componentize", "-p"])
                .arg(repo().join("examples/plugins/python"))
                .arg("app")
                .arg("-o")
                .arg(out);
            command
        },
    );
    let registry = registry_with(config());
    registry.load_file(&wasm).unwrap();
    let provider: &dyn PolicyProvider = registry.as_ref();
    assert_eq!(provider.kind_of("py-relay"), Some(PluginKind::Aggregator));
    let mut session = provider
        .aggregator(
            "py-relay",
            &PluginConfig::new(),
            &user("Why is the sky blue?"),
            &sources(2),
            StreamMode::Staircase,
        )
        .unwrap();
    assert_eq!(
        session.push("p0", "Rayleigh scattering").unwrap(),
        Demand::More
    );
    let first = session
        .next_step()
        .unwrap()
        .expect("steps on the first text");
    assert!(!first.is_final);
    assert!(
        first.messages[1]
            .content
            .starts_with("Why is the sky blue?")
    );
    assert!(first.messages[1].content.ends_with("Rayleigh scattering"));
    session.finish("p0").unwrap();
    session.push("p1", "of sunlight").unwrap();
    session.finish("p1").unwrap();
    let last = session.next_step().unwrap().expect("final step");
    assert!(last.is_final);
    assert!(
        last.messages[1]
            .content
            .starts_with(&first.messages[1].content)
    );
    assert_eq!(session.next_step().unwrap(), None);
}

#[test]
fn the_javascript_example_answers_through_the_same_host_code() {
    let dir = Scratch::new("js");
    let wasm = build_example(
        "js",
        &["role.js", "build.mjs", "package.json"],
        "js-reviewer",
        &dir.0,
        (
            "componentize-js (examples/plugins/js/node_modules)",
            &["node_modules/@bytecodealliance/componentize-js/package.json"],
            "npm ci --prefix examples/plugins/js",
        ),
        |out| {
            let mut command = std::process::Command::new("node");
            command
                .arg(repo().join("examples/plugins/js/build.mjs"))
                .arg(out);
            command
        },
    );
    let registry = registry_with(config());
    registry.load_file(&wasm).unwrap();
    let mut role = registry.role("js-reviewer", &PluginConfig::new()).unwrap();
    assert!(role.system_prompt().unwrap().contains("careful reviewer"));
    let messages = role
        .build_messages(&RoleInput {
            conversation: user("2 + 2?"),
            upstream: vec![UpstreamOutput {
                source: Source {
                    id: "a".into(),
                    label: "solver".into(),
                },
                text: "5".into(),
            }],
        })
        .unwrap();
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[0].role, Role::System);
    assert_eq!(messages[1], ChatMessage::new(Role::User, "2 + 2?"));
    assert!(messages[2].content.contains("### solver\n5"));
    let params = role.params().unwrap();
    assert_eq!(params.max_tokens, 256);
    assert!((params.temperature - 0.2).abs() < 1e-6);
}

#[test]
fn sleeping_in_a_host_call_times_out_at_the_plugin_deadline() {
    // Epoch interruption only stops wasm code; a guest blocked on a pollable is bounded by
    // the host's I/O, which waits no longer than the call's deadline.
    let registry = hostile_registry();
    match attack(&registry, "sleep") {
        PluginError::Timeout { deadline, .. } => assert_eq!(deadline, Duration::from_millis(100)),
        other => panic!("expected a timeout, got {other}"),
    }
    still_serving(&registry);
}

#[test]
fn hostile_guests_fail_the_same_way_inside_an_async_task() {
    // Pipelines call policies from tokio tasks, where blocking WASI I/O (a Rust panic
    // message written to the discarded stderr, a sleep) must neither panic the host nor
    // escape the deadline.
    let registry = hostile_registry();
    let runtime = worker_runtime();
    let (panic, sleep) = runtime.block_on(async move {
        tokio::spawn(async move {
            let panic = attack(&registry, "panic");
            let sleep = attack(&registry, "sleep");
            still_serving(&registry);
            (panic, sleep)
        })
        .await
        .expect("the task completes")
    });
    match panic {
        PluginError::Trap { kind, .. } => assert!(kind.contains("unreachable"), "{kind}"),
        other => panic!("expected a trap, got {other}"),
    }
    assert!(matches!(sleep, PluginError::Timeout { .. }), "{sleep}");
}

/// A runtime whose tasks run on a worker thread, as a server's do.
fn worker_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// `staircase plugin check` as a user runs it.
fn plugin_check(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_staircase"))
        .args(["plugin", "check"])
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn plugin_check_describes_a_component_and_fails_clearly_on_a_bad_one() {
    let dir = Scratch::new("check");
    let wasm = dir.0.join("model-compressor.wasm");
    let bytes = std::fs::read(guest_artifact("model-compressor")).unwrap();
    std::fs::write(&wasm, &bytes).unwrap();
    let manifest = guest_manifest("fixtures/model-compressor");
    std::fs::copy(&manifest, dir.0.join("model-compressor.toml")).unwrap();
    let (ok, stdout, stderr) = plugin_check(&[wasm.as_os_str()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("model-compressor 0.1.0"), "{stdout}");
    assert!(stdout.contains("kind          compressor"), "{stdout}");
    assert!(
        stdout.contains("staircase:agent/compressor-policy@0.1.0"),
        "{stdout}"
    );
    assert!(stdout.contains("capabilities  model"), "{stdout}");

    // Without the capability it asks for, it is refused, naming both.
    let (ok, _, stderr) = plugin_check(&[wasm.as_os_str(), "--no-grant".as_ref()]);
    assert!(!ok);
    assert!(
        stderr.contains("model-compressor@0.1.0") && stderr.contains("`model`"),
        "{stderr}"
    );

    // A truncated component.
    let truncated = dir.0.join("truncated.wasm");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::copy(&manifest, dir.0.join("truncated.toml")).unwrap();
    let (ok, _, stderr) = plugin_check(&[truncated.as_os_str()]);
    assert!(!ok);
    assert!(
        stderr.contains("invalid component") && stderr.contains("model-compressor@0.1.0"),
        "{stderr}"
    );

    // A missing manifest.
    let missing = dir.0.join("missing.toml");
    let (ok, _, stderr) =
        plugin_check(&[wasm.as_os_str(), "--manifest".as_ref(), missing.as_os_str()]);
    assert!(!ok);
    assert!(
        stderr.contains("missing.toml") && stderr.contains("not found"),
        "{stderr}"
    );
}

// ---- bounds: every byte and second a plugin causes is accounted to it ----------------------

/// Host memory a test allows above the plugin's own cap: the copy of what the plugin hands
/// the host in one call (at most the 16 MiB hostcall limit) plus the allocator's slack.
const MEMORY_MARGIN_MIB: u64 = 32;

/// A field of `/proc/self/status`, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Runs `body` in a process of its own (this test binary, filtered to `test`), so the peak
/// resident memory it measures is its own and not that of tests running beside it.
fn isolated(test: &str, body: impl FnOnce()) {
    const MARK: &str = "STAIRCASE_ISOLATED_TEST";
    if std::env::var(MARK).as_deref() == Ok(test) {
        body();
        return;
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--test-threads=1", "--nocapture"])
        .env(MARK, test)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{test} in its own process failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("1 passed"),
        "the filter ran the test"
    );
    // What the child measured, for `--nocapture`.
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
}

/// Peak resident memory while `f` runs, above what was resident before, in MiB.
fn peak_growth_mib(f: impl FnOnce()) -> u64 {
    // Writing 5 to clear_refs resets the peak (VmHWM) to the current RSS.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_kib("VmRSS:");
    f();
    let growth = (status_kib("VmHWM:").saturating_sub(before)) >> 10;
    eprintln!("peak host memory growth: {growth} MiB");
    growth
}

fn hostile_cap_mib() -> u64 {
    let (_, manifest) = fixture("hostile", "fixtures/hostile");
    u64::from(manifest.limits.memory_mib)
}

fn limit_of(error: &PluginError) -> &staircase::plugin::LimitExceeded {
    match error {
        PluginError::LimitExceeded { plugin, limit, .. } => {
            assert_eq!(plugin.to_string(), "hostile@1.0.0");
            limit
        }
        other => panic!("expected a host limit, got {other}"),
    }
}

#[test]
fn an_output_stream_bomb_is_refused_before_the_host_allocates() {
    isolated(
        "an_output_stream_bomb_is_refused_before_the_host_allocates",
        || {
            let registry = hostile_registry();
            let mut error = None;
            let growth = peak_growth_mib(|| error = Some(attack(&registry, "zeroes")));
            let error = error.unwrap();
            let limit = limit_of(&error);
            assert_eq!(limit.what, "bytes in one stream write");
            assert_eq!((limit.limit, limit.asked), (4096, 64 << 30));
            assert!(
                error.to_string().contains("hostile@1.0.0") && error.to_string().contains("4096"),
                "{error}"
            );
            assert!(
                growth < hostile_cap_mib() + MEMORY_MARGIN_MIB,
                "host memory grew {growth} MiB"
            );
            // Writes within the per-operation limit stop at the per-call budget.
            let flood = attack(&registry, "stdout-flood");
            let limit = limit_of(&flood);
            assert_eq!(limit.what, "stdout and stderr bytes in one call");
            assert_eq!(limit.limit, 64 << 10);
            still_serving(&registry);
        },
    );
}

#[test]
fn an_answer_of_many_messages_is_refused_before_the_host_works_on_it() {
    let registry = hostile_registry();
    let error = attack(&registry, "many-messages");
    let limit = limit_of(&error);
    assert_eq!(limit.what, "messages in an answer");
    assert_eq!((limit.limit, limit.asked), (1024, 50_000));
    still_serving(&registry);
}

/// Counts what a test's log subscriber writes.
#[derive(Clone, Default)]
struct LogCapture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_log_flood_is_dropped_and_counted_in_one_summary_line() {
    let registry = hostile_registry();
    let capture = LogCapture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let mut session = registry
            .open_aggregator("hostile", &user("hi"), &sources(1), StreamMode::Staircase)
            .unwrap();
        // 10,000 lines of 4 KiB in one call; whether it ends in time does not matter.
        let _ = session.try_push("p0", "log-flood");
        drop(session);
    });
    let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let plugin_lines = text.lines().filter(|l| l.contains("yyyy")).count();
    let limits = staircase::plugin::LogLimits::default();
    assert_eq!(
        plugin_lines,
        (limits.bytes_per_call / 4096).min(limits.lines_per_call as usize),
        "lines within the per-call budget"
    );
    let summaries: Vec<&str> = text.lines().filter(|l| l.contains("dropped")).collect();
    assert_eq!(summaries.len(), 1, "{summaries:?}");
    assert!(
        summaries[0].contains("hostile@1.0.0") && summaries[0].contains("per call"),
        "{}",
        summaries[0]
    );
    assert!(
        text.len() < limits.bytes_per_call + (64 << 10),
        "{} bytes of log",
        text.len()
    );
    still_serving(&registry);
}

#[test]
fn a_huge_router_answer_is_refused_with_a_short_error() {
    let registry = registry_with(config());
    let dir = Scratch::new("hostile-router");
    std::fs::copy(
        guest_artifact("hostile-router"),
        dir.0.join("hostile-router.wasm"),
    )
    .unwrap();
    std::fs::copy(
        guest_manifest("fixtures/hostile-router"),
        dir.0.join("hostile-router.toml"),
    )
    .unwrap();
    registry
        .load_file(&dir.0.join("hostile-router.wasm"))
        .unwrap();
    let mut request = RouteRequest {
        node_id: "n".into(),
        prompt_tokens: 1,
        query: "huge-name".into(),
        models: vec!["small".into(), "large".into()],
        ..RouteRequest::default()
    };
    let mut router = registry.open_router("hostile-router").unwrap();
    let error = router.try_route(&request).unwrap_err();
    assert!(
        matches!(error, PluginError::InvalidOutput { .. }),
        "{error}"
    );
    let message = error.to_string();
    assert!(message.len() < 1024, "{} bytes of error", message.len());
    assert!(
        message.contains("hostile-router@1.0.0") && message.contains("15728640 bytes in all"),
        "{message}"
    );
    request.query = "fine".into();
    let mut fresh = registry.open_router("hostile-router").unwrap();
    assert_eq!(fresh.try_route(&request).unwrap().model, "small");
}

/// The hostile fixture under another name, in a folder of its own.
fn renamed_hostile(name: &str) -> (Scratch, PathBuf) {
    let dir = Scratch::new(name);
    let wasm = dir.0.join(format!("{name}.wasm"));
    std::fs::copy(guest_artifact("hostile"), &wasm).unwrap();
    let manifest = std::fs::read_to_string(guest_manifest("fixtures/hostile"))
        .unwrap()
        .replace("name = \"hostile\"", &format!("name = \"{name}\""));
    std::fs::write(dir.0.join(format!("{name}.toml")), manifest).unwrap();
    (dir, wasm)
}

#[test]
fn a_user_plugin_may_not_take_a_builtins_name_unless_the_host_allows_it() {
    let registry = registry_with(config());
    let (dir, wasm) = renamed_hostile("moa-aggregator");
    match registry.load_file(&wasm) {
        Err(PluginError::ReservedName { plugin, path }) => {
            assert_eq!(plugin.to_string(), "moa-aggregator@1.0.0");
            assert_eq!(path, wasm);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let lazy = registry.load_dir_lazy(&dir.0).unwrap();
    assert!(
        matches!(lazy[0].1, Err(PluginError::ReservedName { .. })),
        "{:?}",
        lazy[0].1
    );
    let serving = |registry: &Registry| {
        registry
            .list()
            .into_iter()
            .find(|p| p.name == "moa-aggregator")
            .unwrap()
            .path
    };
    assert_eq!(serving(&registry), None, "the built-in keeps its name");

    let mut allowing = config();
    allowing.overrides.insert("moa-aggregator".into());
    let registry = registry_with(allowing);
    registry.load_file(&wasm).unwrap();
    assert_eq!(
        serving(&registry),
        Some(wasm.clone()),
        "an allowed override serves"
    );

    // The file renames itself: the built-in it replaced serves again, never dropped.
    let manifest = dir.0.join("moa-aggregator.toml");
    let renamed = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("name = \"moa-aggregator\"", "name = \"renamed\"");
    std::fs::write(&manifest, renamed).unwrap();
    registry.load_file(&wasm).unwrap();
    assert_eq!(
        serving(&registry),
        None,
        "the built-in serves its name again"
    );
    still_serving_builtin(&registry);
}

/// A plugin is its file: a second file declaring the name another file serves is refused
/// with a message naming both, and the first keeps the name and its grants; once the first
/// is gone, a file may take the name.
#[test]
fn a_second_file_claiming_a_served_name_is_refused_and_the_first_keeps_its_grants() {
    let mut granting = config();
    granting
        .grants
        .insert("granted".into(), [Capability::Model].into());
    let registry = registry_with(granting);
    let dir = Scratch::new("squat");
    let install = |file: &str| {
        let wasm = dir.0.join(format!("{file}.wasm"));
        std::fs::copy(guest_artifact("model-compressor"), &wasm).unwrap();
        let manifest = std::fs::read_to_string(guest_manifest("fixtures/model-compressor"))
            .unwrap()
            .replace("name = \"model-compressor\"", "name = \"granted\"");
        std::fs::write(dir.0.join(format!("{file}.toml")), manifest).unwrap();
        wasm
    };
    let original = install("original");
    let squatter = install("squatter");
    let first = registry.load_file(&original).unwrap();
    match registry.load_file(&squatter) {
        Err(error @ PluginError::NameTaken { .. }) => {
            let message = error.to_string();
            assert!(
                message.contains("squatter.wasm") && message.contains("original.wasm"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let serving = registry
        .list()
        .into_iter()
        .find(|p| p.name == "granted")
        .unwrap();
    assert_eq!(
        serving.path,
        Some(original.clone()),
        "the first file keeps the name"
    );
    assert_eq!(serving.sha256, first.sha256);
    assert!(
        registry.open_compressor("granted").is_ok(),
        "the first file still serves with its grants"
    );
    // Registered lazily, the squatter is refused the same way.
    let lazy = registry.load_dir_lazy(&dir.0).unwrap();
    let squatted = lazy.iter().find(|(p, _)| *p == squatter).unwrap();
    assert!(
        matches!(squatted.1, Err(PluginError::NameTaken { .. })),
        "{:?}",
        squatted.1
    );
}

#[test]
fn compiling_is_bounded_and_a_folder_plugin_compiles_only_when_used() {
    let cache = Scratch::new("compile-cache");
    let (dir, _) = renamed_hostile("lazy-hostile");

    // A registry with the built-ins, and a folder registered lazily: nothing of the folder
    // compiles until a run asks for it, so a run of a built-in never waits on it.
    let registry = registry_with(config());
    let loads = registry.load_dir_lazy(&dir.0).unwrap();
    assert!(loads.iter().all(|(_, r)| r.is_ok()));
    assert_eq!(registry.pending(), vec!["lazy-hostile".to_string()]);
    assert_eq!(
        registry.kind_of("lazy-hostile"),
        Some(PluginKind::Aggregator)
    );
    still_serving_builtin(&registry);
    assert_eq!(
        registry.pending(),
        vec!["lazy-hostile".to_string()],
        "using a built-in compiled nothing of the folder"
    );

    // A compile over its budget is refused, naming the plugin and the budget.
    let budget = staircase::plugin::CompileBudget {
        base: Duration::from_millis(1),
        per_mib: Duration::ZERO,
    };
    let strict = Registry::new(
        PluginRuntime::new(HostConfig {
            cache_dir: Some(cache.0.clone()),
            compile_budget: budget,
            ..HostConfig::default()
        })
        .unwrap(),
    );
    strict.load_dir_lazy(&dir.0).unwrap();
    match strict.open_aggregator(
        "lazy-hostile",
        &user("q"),
        &sources(1),
        StreamMode::Staircase,
    ) {
        Err(PluginError::CompileTimeout {
            plugin,
            budget,
            bytes,
        }) => {
            assert_eq!(plugin.to_string(), "lazy-hostile@1.0.0");
            assert_eq!(budget, Duration::from_millis(1));
            assert!(bytes > 0);
        }
        Err(other) => panic!("expected a compile timeout, got {other}"),
        Ok(_) => panic!("expected a compile timeout"),
    }
    assert!(strict.pending().is_empty());
    assert_eq!(
        std::fs::read_dir(&cache.0).unwrap().count(),
        0,
        "an abandoned compile is never cached"
    );

    // Over the size budget.
    let small = PluginRuntime::new(HostConfig {
        cache_dir: None,
        max_component_bytes: 1000,
        ..HostConfig::default()
    })
    .unwrap();
    let (wasm, manifest) = fixture("hostile", "fixtures/hostile");
    match small.load(&wasm, manifest.clone()) {
        Err(PluginError::ComponentTooLarge { limit, bytes, .. }) => {
            assert_eq!(limit, 1000);
            assert_eq!(bytes, wasm.len());
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Within its budget it compiles, and the cache makes the next load skip compiling.
    let normal = PluginRuntime::new(HostConfig {
        cache_dir: Some(cache.0.clone()),
        ..HostConfig::default()
    })
    .unwrap();
    assert!(!normal.load(&wasm, manifest.clone()).unwrap().from_cache);
    assert!(normal.load(&wasm, manifest).unwrap().from_cache);
}

/// The built-in aggregator answers.
fn still_serving_builtin(registry: &Registry) {
    let mut moa = registry
        .open_aggregator(
            "moa-aggregator",
            &user("q"),
            &sources(1),
            StreamMode::Staircase,
        )
        .unwrap();
    moa.try_push("p0", "fine").unwrap();
    assert!(moa.try_next_step().unwrap().is_some());
}

/// Every probe of the hostile fixture: each calls one WASI import with hostile arguments.
const PROBES: &[&str] = &[
    "write-zeroes-64g",
    "write-zeroes-max",
    "blocking-write-zeroes-max",
    "check-write",
    "write-64k",
    "blocking-write-64k",
    "splice-max",
    "blocking-splice-max",
    "flush",
    "stderr-zeroes-max",
    "read-max",
    "blocking-read-max",
    "skip-max",
    "poll-empty",
    "poll-many",
    "sleep-forever",
    "sleep-until-max",
    "clocks",
    "random-max",
    "random-u64",
    "insecure-random-max",
    "insecure-seed",
    "environment",
    "terminals",
    "preopens",
    "udp-v4",
    "udp-v6",
    "tcp-v4",
    "tcp-v6",
    "dns",
];

#[test]
fn every_wasi_import_with_hostile_arguments_fails_typed_inside_an_async_task() {
    // Pipelines call plugins on tokio worker threads, where wasmtime-wasi's calls that nest
    // a runtime would panic; no call may panic the host, whatever its arguments.
    let registry = hostile_registry();
    let runtime = worker_runtime();
    let outcomes = runtime.block_on(async move {
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for probe in PROBES
                .iter()
                .map(|p| format!("probe:{p}"))
                .chain(["udp".into()])
            {
                let mut session = registry
                    .open_aggregator("hostile", &user("hi"), &sources(1), StreamMode::Staircase)
                    .unwrap();
                let outcome = session
                    .try_push("p0", &probe)
                    .and_then(|_| session.try_next_step())
                    .map(|step| step.unwrap().messages[0].content.clone());
                outcomes.push((probe, outcome));
            }
            still_serving(&registry);
            outcomes
        })
        .await
        .expect("the task completes")
    });
    for (probe, outcome) in &outcomes {
        match outcome {
            Ok(answer) => assert!(!answer.starts_with("no probe"), "{probe}: {answer}"),
            Err(error) => {
                let message = error.to_string();
                assert!(!message.contains("panicked"), "{probe}: {message}");
                assert!(message.contains("hostile@1.0.0"), "{probe}: {message}");
            }
        }
    }
    let by_name = |name: &str| &outcomes.iter().find(|(p, _)| p == name).unwrap().1;
    assert!(
        matches!(
            by_name("probe:sleep-forever"),
            Err(PluginError::Timeout { .. })
        ),
        "{:?}",
        by_name("probe:sleep-forever")
    );
    assert!(matches!(
        by_name("probe:write-zeroes-max"),
        Err(PluginError::LimitExceeded { .. })
    ));
    match by_name("probe:udp-v4") {
        Ok(answer) => assert!(answer.contains("access-denied"), "{answer}"),
        Err(error) => panic!("creating a UDP socket is refused, not failed: {error}"),
    }
    match by_name("udp") {
        Ok(answer) => assert!(answer.starts_with("udp: Some("), "{answer}"),
        Err(error) => panic!("a guest's UDP bind is refused, not failed: {error}"),
    }
}

#[test]
fn count_tokens_is_bounded_in_size_and_by_the_call_deadline() {
    isolated(
        "count_tokens_is_bounded_in_size_and_by_the_call_deadline",
        || {
            // The real tokenizer: without a model `count-tokens` only estimates.
            let model = staircase::model::default_model_path().unwrap();
            let engine = staircase::engine::local::LocalEngine::load(
                staircase::engine::local::LocalEngineConfig::new(model),
            )
            .unwrap();
            let registry = registry_with(HostConfig {
                engine: Some(Arc::new(engine)),
                ..config()
            });
            let dir = Scratch::new("hostile-counting");
            std::fs::copy(guest_artifact("hostile"), dir.0.join("hostile.wasm")).unwrap();
            std::fs::copy(
                guest_manifest("fixtures/hostile"),
                dir.0.join("hostile.toml"),
            )
            .unwrap();
            registry.load_file(&dir.0.join("hostile.wasm")).unwrap();

            // 15 MiB: refused before any tokenizing.
            let mut error = None;
            let growth = peak_growth_mib(|| error = Some(attack(&registry, "count-huge")));
            let error = error.unwrap();
            let limit = limit_of(&error);
            assert_eq!(limit.what, "count-tokens text bytes");
            assert_eq!((limit.limit, limit.asked), (1 << 20, 15 << 20));
            assert!(
                growth < hostile_cap_mib() + MEMORY_MARGIN_MIB,
                "host memory grew {growth} MiB"
            );

            // 1 MiB, within the size limit, takes the tokenizer about a second: the call ends at
            // its deadline instead.
            match attack(&registry, "count-big") {
                PluginError::Timeout { deadline, call, .. } => {
                    assert_eq!(deadline, Duration::from_millis(100));
                    assert_eq!(call, "session.push");
                }
                other => panic!("expected a timeout, got {other}"),
            }
            still_serving(&registry);
        },
    );
}

/// The pattern guard's chain over `chunks`: all that left, and whether it stopped.
fn guarded(registry: &Registry, config: &PluginConfig, chunks: &[&str]) -> (String, bool) {
    use staircase::guard::{GuardChain, OnFailure, Stage, StreamInfo};
    let info = StreamInfo {
        node_id: "answer".into(),
        model: "default".into(),
        to_client: true,
    };
    let session = registry.guard("pattern-guard", config, &info).unwrap();
    let mut chain = GuardChain::new(vec![Stage::new("pattern-guard", session, OnFailure::Close)]);
    let mut out = String::new();
    let mut stopped = false;
    for chunk in chunks {
        let outcome = chain.push(chunk, 1);
        out.push_str(&outcome.released);
        stopped |= outcome.stopped.is_some();
    }
    let outcome = chain.finish();
    out.push_str(&outcome.released);
    (out, stopped || outcome.stopped.is_some())
}

/// `text` cut into chunks of `size` bytes (on character boundaries).
fn chunks_of(text: &str, size: usize) -> Vec<&str> {
    let mut chunks = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut at = size.min(rest.len());
        while !rest.is_char_boundary(at) {
            at += 1;
        }
        let (chunk, tail) = rest.split_at(at);
        chunks.push(chunk);
        rest = tail;
    }
    chunks
}

#[test]
fn the_pattern_guard_redacts_secrets_split_across_any_chunks() {
    let registry = registry_with(config());
    assert_eq!(registry.kind_of("pattern-guard"), Some(PluginKind::Guard));
    let text = "Mail ada@example.org, key sk-proj-4fGh8Jk2Lm9Np3Qr7St, card 4111 1111 1111 1111 \
                (not 4111 1111 1111 1112), AWS AKIAIOSFODNN7EXAMPLE. Done — ok.";
    let redacted = "Mail [redacted], key [redacted], card [redacted] \
                    (not 4111 1111 1111 1112), AWS [redacted]. Done — ok.";
    // One chunk, two, three, and every size down to one byte a chunk.
    for size in [text.len(), text.len() / 2 + 1, text.len() / 3 + 1, 7, 3, 1] {
        let (out, stopped) = guarded(&registry, &PluginConfig::new(), &chunks_of(text, size));
        assert!(!stopped);
        assert_eq!(out, redacted, "chunks of {size} bytes");
    }
    // An operator pattern and replacement, from the node's config.
    let config: PluginConfig = [
        ("kinds".to_string(), "email".to_string()),
        ("patterns".to_string(), r"PIN \d{4}".to_string()),
        ("replacement".to_string(), "***".to_string()),
    ]
    .into();
    let (out, _) = guarded(&registry, &config, &chunks_of("a@b.co said PIN 1234.", 2));
    assert_eq!(out, "*** said ***.");
}

#[test]
fn a_guard_with_a_broken_pattern_does_not_start() {
    let registry = registry_with(config());
    let config: PluginConfig = [("patterns".to_string(), "(unclosed".to_string())].into();
    let info = staircase::guard::StreamInfo {
        node_id: "answer".into(),
        model: "default".into(),
        to_client: true,
    };
    // The constructor traps (saying why in the log): no session, so no text can pass
    // unguarded.
    let error = registry
        .guard("pattern-guard", &config, &info)
        .err()
        .expect("a guard that cannot compile its pattern does not start");
    assert!(
        error.to_string().contains("guard-stream.constructor"),
        "{error}"
    );
}
