//! The per-kind wrappers that implement the pipeline's policy traits over a plugin
//! instance, converting between the WIT types and the engine's, checking answers (size,
//! router choice) and the canary every new version must pass before it serves.

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime::component::ResourceAny;

use super::bindings::{aggregator, compressor, guard, role, router, router_v2};
use super::error::{MAX_QUOTED_BYTES, PluginError, clip};
use super::host_imports::{chat_from_wit, chat_to_wit, sampling_from_wit};
use super::instance::PluginInstance;
use super::runtime::{KindPre, LoadedPlugin, PluginRuntime};
use crate::engine::{ChatMessage, Role, SamplingParams};
use crate::policy::{
    AggregatorSession, CompressorPolicy, Demand, PluginKind, PolicyError, RoleInput, RolePolicy,
    RouteChoice, RouteRequest, RouterPolicy, Source, Step, StreamMode,
};

fn wrong_kind(plugin: &LoadedPlugin, expected: PluginKind) -> PluginError {
    PluginError::WrongKind {
        plugin: plugin.plugin.clone(),
        expected,
        actual: plugin.kind(),
    }
}

/// A role plugin instance.
pub struct RoleInstance {
    instance: PluginInstance,
    bindings: role::Role,
}

impl RoleInstance {
    pub fn new(runtime: &PluginRuntime, plugin: &Arc<LoadedPlugin>) -> Result<Self, PluginError> {
        Self::with_config(runtime, plugin, &BTreeMap::new())
    }

    /// A role instance whose `config` import also sees `config` (a pipeline node's
    /// settings, which win over the operator's).
    pub fn with_config(
        runtime: &PluginRuntime,
        plugin: &Arc<LoadedPlugin>,
        config: &BTreeMap<String, String>,
    ) -> Result<Self, PluginError> {
        if !matches!(plugin.pre, KindPre::Role(_)) {
            return Err(wrong_kind(plugin, PluginKind::Role));
        }
        let mut instance = PluginInstance::store_with(runtime, plugin, Some(config));
        let bindings = instance.instantiate(|store, pre| match pre {
            KindPre::Role(pre) => pre.instantiate(store),
            _ => Err(wasmtime::format_err!("not a role")),
        })?;
        Ok(Self { instance, bindings })
    }

    pub fn try_system_prompt(&mut self) -> Result<String, PluginError> {
        let api = self.bindings.staircase_agent_role_policy();
        let prompt = self
            .instance
            .call("system-prompt", |s| api.call_system_prompt(s))?;
        self.instance.check_output("system-prompt", prompt.len())?;
        Ok(prompt)
    }

    pub fn try_build_messages(
        &mut self,
        input: &RoleInput,
    ) -> Result<Vec<ChatMessage>, PluginError> {
        let api = self.bindings.staircase_agent_role_policy();
        let wit_input = role::exports::staircase::agent::role_policy::RoleInput {
            conversation: input.conversation.iter().map(chat_to_wit).collect(),
            upstream: input
                .upstream
                .iter()
                .map(|u| super::bindings::types::UpstreamOutput {
                    source: source_to_wit(&u.source),
                    text: u.text.clone(),
                })
                .collect(),
        };
        let messages = self
            .instance
            .call("build-messages", |s| api.call_build_messages(s, &wit_input))?;
        let messages: Vec<ChatMessage> = messages.into_iter().map(chat_from_wit).collect();
        self.instance.check_messages("build-messages", &messages)?;
        Ok(messages)
    }

    pub fn try_params(&mut self) -> Result<SamplingParams, PluginError> {
        let api = self.bindings.staircase_agent_role_policy();
        let params = self.instance.call("params", |s| api.call_params(s))?;
        Ok(sampling_from_wit(params))
    }
}

impl RolePolicy for RoleInstance {
    fn system_prompt(&mut self) -> Result<String, PolicyError> {
        Ok(self.try_system_prompt()?)
    }

    fn build_messages(&mut self, input: &RoleInput) -> Result<Vec<ChatMessage>, PolicyError> {
        Ok(self.try_build_messages(input)?)
    }

    fn params(&mut self) -> Result<SamplingParams, PolicyError> {
        Ok(self.try_params()?)
    }
}

fn source_to_wit(source: &Source) -> super::bindings::types::Source {
    super::bindings::types::Source {
        id: source.id.clone(),
        label: source.label.clone(),
    }
}

/// One aggregator session (a resource in its own instance).
pub struct AggregatorInstance {
    instance: PluginInstance,
    bindings: aggregator::Aggregator,
    session: ResourceAny,
}

impl AggregatorInstance {
    pub fn new(
        runtime: &PluginRuntime,
        plugin: &Arc<LoadedPlugin>,
        conversation: &[ChatMessage],
        sources: &[Source],
        mode: StreamMode,
    ) -> Result<Self, PluginError> {
        Self::with_config(
            runtime,
            plugin,
            &BTreeMap::new(),
            conversation,
            sources,
            mode,
        )
    }

    /// A session whose `config` import also sees `config` (the pipeline node's settings,
    /// which win over the operator's), as for roles.
    pub fn with_config(
        runtime: &PluginRuntime,
        plugin: &Arc<LoadedPlugin>,
        config: &BTreeMap<String, String>,
        conversation: &[ChatMessage],
        sources: &[Source],
        mode: StreamMode,
    ) -> Result<Self, PluginError> {
        if !matches!(plugin.pre, KindPre::Aggregator(_)) {
            return Err(wrong_kind(plugin, PluginKind::Aggregator));
        }
        let mut instance = PluginInstance::store_with(runtime, plugin, Some(config));
        let bindings = instance.instantiate(|store, pre| match pre {
            KindPre::Aggregator(pre) => pre.instantiate(store),
            _ => Err(wasmtime::format_err!("not an aggregator")),
        })?;
        let conversation: Vec<_> = conversation.iter().map(chat_to_wit).collect();
        let sources: Vec<_> = sources.iter().map(source_to_wit).collect();
        let mode = match mode {
            StreamMode::Staircase => {
                aggregator::exports::staircase::agent::aggregator_policy::StreamMode::Staircase
            }
            StreamMode::Layered => {
                aggregator::exports::staircase::agent::aggregator_policy::StreamMode::Layered
            }
        };
        let api = bindings.staircase_agent_aggregator_policy().session();
        let session = instance.call("session.constructor", |s| {
            api.call_constructor(s, &conversation, &sources, mode)
        })?;
        Ok(Self {
            instance,
            bindings,
            session,
        })
    }

    pub fn try_push(&mut self, source_id: &str, text: &str) -> Result<Demand, PluginError> {
        let api = self.bindings.staircase_agent_aggregator_policy().session();
        let session = self.session;
        let demand = self.instance.call("session.push", |s| {
            api.call_push(s, session, source_id, text)
        })?;
        Ok(match demand {
            aggregator::exports::staircase::agent::aggregator_policy::Demand::More => Demand::More,
            aggregator::exports::staircase::agent::aggregator_policy::Demand::Enough => {
                Demand::Enough
            }
        })
    }

    pub fn try_finish(&mut self, source_id: &str) -> Result<(), PluginError> {
        let api = self.bindings.staircase_agent_aggregator_policy().session();
        let session = self.session;
        self.instance
            .call("session.finish", |s| api.call_finish(s, session, source_id))
    }

    pub fn try_answered(&mut self, text: &str) -> Result<(), PluginError> {
        let api = self.bindings.staircase_agent_aggregator_policy().session();
        let session = self.session;
        self.instance
            .call("session.answered", |s| api.call_answered(s, session, text))
    }

    pub fn try_next_step(&mut self) -> Result<Option<Step>, PluginError> {
        let api = self.bindings.staircase_agent_aggregator_policy().session();
        let session = self.session;
        let step = self
            .instance
            .call("session.next-step", |s| api.call_next_step(s, session))?;
        let Some(step) = step else { return Ok(None) };
        let messages: Vec<ChatMessage> = step.messages.into_iter().map(chat_from_wit).collect();
        self.instance
            .check_messages("session.next-step", &messages)?;
        Ok(Some(Step {
            messages,
            max_tokens: step.max_tokens,
            is_final: step.final_,
        }))
    }
}

impl AggregatorSession for AggregatorInstance {
    fn push(&mut self, source_id: &str, text: &str) -> Result<Demand, PolicyError> {
        Ok(self.try_push(source_id, text)?)
    }

    fn finish(&mut self, source_id: &str) -> Result<(), PolicyError> {
        Ok(self.try_finish(source_id)?)
    }

    fn answered(&mut self, text: &str) -> Result<(), PolicyError> {
        Ok(self.try_answered(text)?)
    }

    fn next_step(&mut self) -> Result<Option<Step>, PolicyError> {
        Ok(self.try_next_step()?)
    }
}

/// A compressor plugin instance.
pub struct CompressorInstance {
    instance: PluginInstance,
    bindings: compressor::Compressor,
}

impl CompressorInstance {
    pub fn new(runtime: &PluginRuntime, plugin: &Arc<LoadedPlugin>) -> Result<Self, PluginError> {
        if !matches!(plugin.pre, KindPre::Compressor(_)) {
            return Err(wrong_kind(plugin, PluginKind::Compressor));
        }
        let mut instance = PluginInstance::store(runtime, plugin);
        let bindings = instance.instantiate(|store, pre| match pre {
            KindPre::Compressor(pre) => pre.instantiate(store),
            _ => Err(wasmtime::format_err!("not a compressor")),
        })?;
        Ok(Self { instance, bindings })
    }

    pub fn try_compress(
        &mut self,
        history: &[ChatMessage],
        budget: u32,
    ) -> Result<Vec<ChatMessage>, PluginError> {
        let api = self.bindings.staircase_agent_compressor_policy();
        let history: Vec<_> = history.iter().map(chat_to_wit).collect();
        let answer = self
            .instance
            .call("compress", |s| api.call_compress(s, &history, budget))?;
        match answer {
            Ok(messages) => {
                let messages: Vec<ChatMessage> = messages.into_iter().map(chat_from_wit).collect();
                self.instance.check_messages("compress", &messages)?;
                Ok(messages)
            }
            Err(message) => Err(PluginError::Refused {
                plugin: self.instance.plugin_ref().clone(),
                call: "compress",
                message: clip(&message, MAX_QUOTED_BYTES).into_owned(),
            }),
        }
    }
}

impl CompressorPolicy for CompressorInstance {
    fn compress(
        &mut self,
        history: &[ChatMessage],
        budget_tokens: u32,
    ) -> Result<Vec<ChatMessage>, PolicyError> {
        Ok(self.try_compress(history, budget_tokens)?)
    }

    fn run_in_background(&mut self) {
        self.instance
            .set_model_priority(crate::engine::Priority::BACKGROUND);
    }

    fn bill_to(&mut self, account: &crate::policy::ModelAccount) {
        self.instance.set_model_account(account.clone());
    }
}

/// A router plugin instance, of either WIT version.
pub struct RouterInstance {
    instance: PluginInstance,
    bindings: RouterBindings,
}

enum RouterBindings {
    V1(router::Router),
    V2(router_v2::Router),
}

impl RouterInstance {
    pub fn new(runtime: &PluginRuntime, plugin: &Arc<LoadedPlugin>) -> Result<Self, PluginError> {
        Self::with_config(runtime, plugin, &BTreeMap::new())
    }

    /// A router instance whose `config` import also sees `config` (the routed node's).
    pub fn with_config(
        runtime: &PluginRuntime,
        plugin: &Arc<LoadedPlugin>,
        config: &BTreeMap<String, String>,
    ) -> Result<Self, PluginError> {
        if !matches!(plugin.pre, KindPre::Router(_) | KindPre::RouterV2(_)) {
            return Err(wrong_kind(plugin, PluginKind::Router));
        }
        let mut instance = PluginInstance::store_with(runtime, plugin, Some(config));
        let bindings = match &plugin.pre {
            KindPre::RouterV2(_) => {
                RouterBindings::V2(instance.instantiate(|store, pre| match pre {
                    KindPre::RouterV2(pre) => pre.instantiate(store),
                    _ => Err(wasmtime::format_err!("not a 0.2.0 router")),
                })?)
            }
            _ => RouterBindings::V1(instance.instantiate(|store, pre| match pre {
                KindPre::Router(pre) => pre.instantiate(store),
                _ => Err(wasmtime::format_err!("not a router")),
            })?),
        };
        Ok(Self { instance, bindings })
    }

    pub fn try_route(&mut self, request: &RouteRequest) -> Result<RouteChoice, PluginError> {
        let choice = match &self.bindings {
            RouterBindings::V1(bindings) => {
                let api = bindings.staircase_agent_router_policy();
                let wit = router::exports::staircase::agent::router_policy::RouteRequest {
                    node_id: request.node_id.clone(),
                    prompt_tokens: request.prompt_tokens,
                    query: request.query.clone(),
                    models: request.models.clone(),
                };
                let model = self.instance.call("route", |s| api.call_route(s, &wit))?;
                RouteChoice {
                    model,
                    reason: String::new(),
                }
            }
            RouterBindings::V2(bindings) => {
                use router_v2::exports::staircase::agent::router_policy as v2;
                let api = bindings.staircase_agent_router_policy();
                let wit = v2::RouteRequest {
                    node_id: request.node_id.clone(),
                    role: request.role.clone(),
                    prompt_tokens: request.prompt_tokens,
                    query: request.query.clone(),
                    models: request.models.clone(),
                    answer_tokens: request.answer_tokens,
                    max_tokens: request.max_tokens,
                    previous_model: request.previous_model.clone(),
                    confidence: request.confidence.map(|c| v2::Confidence {
                        model: request.previous_model.clone().unwrap_or_default(),
                        tokens: c.tokens,
                        mean_top_prob: c.mean_top_prob,
                        mean_entropy: c.mean_entropy,
                    }),
                };
                let choice = self.instance.call("route", |s| api.call_route(s, &wit))?;
                self.instance.check_output("route", choice.reason.len())?;
                RouteChoice {
                    model: choice.model,
                    // A reason is for reports and logs: a line, not a document.
                    reason: clip(&choice.reason, MAX_QUOTED_BYTES).into_owned(),
                }
            }
        };
        if !request.models.contains(&choice.model) {
            let error = PluginError::InvalidOutput {
                plugin: self.instance.plugin_ref().clone(),
                call: "route",
                reason: format!(
                    "model {:?} is not one of {:?}",
                    clip(&choice.model, MAX_QUOTED_BYTES),
                    request.models
                ),
            };
            return Err(self.instance.reject(error));
        }
        Ok(choice)
    }
}

impl RouterPolicy for RouterInstance {
    fn route(&mut self, request: &RouteRequest) -> Result<RouteChoice, PolicyError> {
        Ok(self.try_route(request)?)
    }
}

/// The canary: a fresh instance of a new version must answer a typical call of its kind
/// before the version may serve. A canary that runs out of time runs once more on a fresh
/// instance: on a loaded host a first call can miss a deadline of tens of milliseconds (the
/// server would then refuse to start over a built-in), while a plugin that loops misses it
/// again.
pub(crate) fn self_test(
    runtime: &PluginRuntime,
    plugin: &Arc<LoadedPlugin>,
) -> Result<(), PluginError> {
    let result = match canary(runtime, plugin) {
        Err(PluginError::Timeout { .. }) => canary(runtime, plugin),
        other => other,
    };
    result.map_err(|error| PluginError::SelfTest {
        plugin: plugin.plugin.clone(),
        reason: error.to_string(),
    })
}

/// One canary call sequence of the plugin's kind on a fresh instance.
fn canary(runtime: &PluginRuntime, plugin: &Arc<LoadedPlugin>) -> Result<(), PluginError> {
    let conversation = [ChatMessage::new(Role::User, "What is 2 + 2?")];
    match plugin.kind() {
        PluginKind::Role => {
            let mut role = RoleInstance::new(runtime, plugin)?;
            role.try_system_prompt()?;
            role.try_params()?;
            role.try_build_messages(&RoleInput {
                conversation: conversation.to_vec(),
                upstream: Vec::new(),
            })?;
        }
        PluginKind::Aggregator => {
            let sources = [Source {
                id: "canary".into(),
                label: "canary".into(),
            }];
            let mut session = AggregatorInstance::new(
                runtime,
                plugin,
                &conversation,
                &sources,
                StreamMode::Staircase,
            )?;
            session.try_push("canary", "4")?;
            session.try_next_step()?;
            session.try_finish("canary")?;
            session.try_next_step()?;
        }
        PluginKind::Compressor => {
            let mut compressor = CompressorInstance::new(runtime, plugin)?;
            // A compressor may refuse (e.g. its model is absent); only traps fail the canary.
            // One that calls the model spends the model's time, not its own: on a loaded
            // host its deadline may pass mid-generation, which says nothing of the build.
            match compressor.try_compress(&conversation, 1024) {
                Ok(_) | Err(PluginError::Refused { .. }) => {}
                Err(PluginError::Timeout { .. }) if plugin.model_granted => {}
                Err(error) => return Err(error),
            }
        }
        PluginKind::Router => {
            let mut router = RouterInstance::new(runtime, plugin)?;
            router.try_route(&RouteRequest {
                node_id: "canary".into(),
                prompt_tokens: 16,
                query: "What is 2 + 2?".into(),
                models: vec!["small".into(), "large".into()],
                role: "canary".into(),
                answer_tokens: 0,
                max_tokens: 64,
                previous_model: None,
                confidence: None,
            })?;
        }
        PluginKind::Guard => {
            let info = crate::guard::StreamInfo {
                node_id: "canary".into(),
                model: "canary".into(),
                to_client: true,
            };
            let mut guard = GuardInstance::with_config(runtime, plugin, &BTreeMap::new(), &info)?;
            guard.try_push("The answer is", 13, 3)?;
            guard.try_finish("The answer is 4.")?;
        }
    }
    Ok(())
}

/// A guard plugin's stream (WIT 0.3.0 `guard-stream`).
pub struct GuardInstance {
    instance: PluginInstance,
    bindings: guard::Guard,
    stream: ResourceAny,
    window_bytes: usize,
}

impl GuardInstance {
    /// A guard on the stream `info` describes, whose `config` import also sees `config`
    /// (the guarding pipeline's or model's settings, which win over the operator's).
    pub fn with_config(
        runtime: &PluginRuntime,
        plugin: &Arc<LoadedPlugin>,
        config: &BTreeMap<String, String>,
        info: &crate::guard::StreamInfo,
    ) -> Result<Self, PluginError> {
        if !matches!(plugin.pre, KindPre::Guard(_)) {
            return Err(wrong_kind(plugin, PluginKind::Guard));
        }
        let window_bytes = plugin.manifest.limits.window_bytes as usize;
        let mut instance = PluginInstance::store_with(runtime, plugin, Some(config));
        let bindings = instance.instantiate(|store, pre| match pre {
            KindPre::Guard(pre) => pre.instantiate(store),
            _ => Err(wasmtime::format_err!("not a guard")),
        })?;
        let wit_info = guard::exports::staircase::agent::guard_policy::StreamInfo {
            node_id: info.node_id.clone(),
            model: info.model.clone(),
            to_client: info.to_client,
            window_bytes: plugin.manifest.limits.window_bytes,
        };
        let api = bindings.staircase_agent_guard_policy().guard_stream();
        let stream = instance.call("guard-stream.constructor", |s| {
            api.call_constructor(s, &wit_info)
        })?;
        Ok(Self {
            instance,
            bindings,
            stream,
            window_bytes,
        })
    }

    pub fn try_push(
        &mut self,
        window: &str,
        new_bytes: usize,
        tokens: u32,
    ) -> Result<crate::guard::Verdict, PluginError> {
        let api = self.bindings.staircase_agent_guard_policy().guard_stream();
        let stream = self.stream;
        let new_bytes = u32::try_from(new_bytes).unwrap_or(u32::MAX);
        let verdict = self.instance.call("guard-stream.push", |s| {
            api.call_push(s, stream, window, new_bytes, tokens)
        })?;
        self.verdict_from_wit("guard-stream.push", verdict)
    }

    pub fn try_finish(&mut self, window: &str) -> Result<crate::guard::Verdict, PluginError> {
        let api = self.bindings.staircase_agent_guard_policy().guard_stream();
        let stream = self.stream;
        let verdict = self.instance.call("guard-stream.finish", |s| {
            api.call_finish(s, stream, window)
        })?;
        self.verdict_from_wit("guard-stream.finish", verdict)
    }

    /// The host's verdict, after checking its size (the window's own rules are checked by
    /// the chain, which knows the window).
    fn verdict_from_wit(
        &mut self,
        call: &'static str,
        verdict: guard::exports::staircase::agent::guard_policy::Verdict,
    ) -> Result<crate::guard::Verdict, PluginError> {
        use crate::guard::{Edit, Verdict};
        use guard::exports::staircase::agent::guard_policy::Verdict as Wit;
        let bytes = match &verdict {
            Wit::Release(_) => 0,
            Wit::Redact(redaction) => redaction.edits.iter().map(|e| e.text.len()).sum(),
            Wit::Stop(reason) => reason.len(),
        };
        self.instance.check_output(call, bytes)?;
        Ok(match verdict {
            Wit::Release(n) => Verdict::Release(n as usize),
            Wit::Redact(redaction) => Verdict::Redact {
                edits: redaction
                    .edits
                    .into_iter()
                    .map(|e| Edit {
                        start: e.start as usize,
                        end: e.end as usize,
                        text: e.text,
                    })
                    .collect(),
                release: redaction.release as usize,
            },
            // A reason is for the client and the log: a line, not a document.
            Wit::Stop(reason) => Verdict::Stop(clip(&reason, MAX_QUOTED_BYTES).into_owned()),
        })
    }
}

impl crate::guard::GuardSession for GuardInstance {
    fn window_bytes(&self) -> usize {
        self.window_bytes
    }

    fn push(
        &mut self,
        window: &str,
        new_bytes: usize,
        tokens: u32,
    ) -> Result<crate::guard::Verdict, PolicyError> {
        Ok(self.try_push(window, new_bytes, tokens)?)
    }

    fn finish(&mut self, window: &str) -> Result<crate::guard::Verdict, PolicyError> {
        Ok(self.try_finish(window)?)
    }
}
