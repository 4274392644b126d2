//! `staircase-sdk`: write a Staircase agent plugin in plain Rust.
//!
//! Enable exactly one of the features `role`, `aggregator`, `compressor`, `router` or `guard`,
//! implement the matching trait ([`Role`], [`Aggregator`], [`Compressor`], [`Router`],
//! [`Guard`]) and export it with the matching macro. The generated WIT bindings stay behind these traits; the host imports
//! (logging, clock, configuration, token counting, and the `model` import for compressors)
//! are plain functions in [`host`] and [`model`].
//!
//! ```ignore
//! use staircase_sdk::{ChatMessage, Role};
//! struct Pirate;
//! impl Role for Pirate {
//!     fn system_prompt() -> String {
//!         "You are a pirate. Answer like one.".into()
//!     }
//! }
//! staircase_sdk::export_role!(Pirate);
//! ```

#[cfg(any(
    all(
        feature = "role",
        any(
            feature = "aggregator",
            feature = "compressor",
            feature = "router",
            feature = "guard"
        )
    ),
    all(
        feature = "aggregator",
        any(feature = "compressor", feature = "router", feature = "guard")
    ),
    all(feature = "compressor", any(feature = "router", feature = "guard")),
    all(feature = "router", feature = "guard"),
))]
compile_error!(
    "staircase-sdk: enable exactly one of the features role, aggregator, compressor, router, guard"
);

// A component needs a kind; a native build without one (`cargo package`'s verification,
// `cargo doc`) compiles to an empty crate instead.
#[cfg(all(
    target_family = "wasm",
    not(any(
        feature = "role",
        feature = "aggregator",
        feature = "compressor",
        feature = "router",
        feature = "guard"
    ))
))]
compile_error!(
    "staircase-sdk: enable one of the features role, aggregator, compressor, router, guard"
);

/// The generated bindings of the world this plugin exports. Not part of the stable API: the
/// export macros use it.
#[doc(hidden)]
pub mod bindings {
    #[cfg(feature = "role")]
    wit_bindgen::generate!({
        path: "wit/v0.1.0",
        world: "role",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "staircase_sdk::bindings",
    });
    #[cfg(feature = "aggregator")]
    wit_bindgen::generate!({
        path: "wit/v0.1.0",
        world: "aggregator",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "staircase_sdk::bindings",
    });
    #[cfg(feature = "compressor")]
    wit_bindgen::generate!({
        path: "wit/v0.1.0",
        world: "compressor",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "staircase_sdk::bindings",
    });
    // Routers export 0.2.0 (the step's features and a reason); the host loads 0.1.0 ones too.
    #[cfg(feature = "router")]
    wit_bindgen::generate!({
        path: "wit/v0.2.0",
        world: "router",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "staircase_sdk::bindings",
    });
    // Guards are new in 0.3.0.
    #[cfg(feature = "guard")]
    wit_bindgen::generate!({
        path: "wit/v0.3.0",
        world: "guard",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "staircase_sdk::bindings",
    });
}

#[cfg(any(feature = "role", feature = "aggregator", feature = "compressor"))]
pub use bindings::staircase::agent::types::{
    ChatMessage, GenerationParams, Role as Speaker, Source, UpstreamOutput,
};

#[cfg(any(feature = "role", feature = "aggregator", feature = "compressor"))]
impl ChatMessage {
    /// A message from `role` with this content.
    pub fn new(role: Speaker, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

#[cfg(any(feature = "role", feature = "aggregator", feature = "compressor"))]
impl Default for GenerationParams {
    /// Greedy decoding of up to 256 tokens: the host's own default.
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            stop: Vec::new(),
        }
    }
}

/// The host imports every plugin may use.
#[cfg(any(
    feature = "role",
    feature = "aggregator",
    feature = "compressor",
    feature = "router",
    feature = "guard"
))]
pub mod host {
    use crate::bindings::staircase::agent::host as raw;
    pub use crate::bindings::staircase::agent::host::LogLevel;

    /// Writes to the host's log, tagged with this plugin's name and version.
    pub fn log(level: LogLevel, message: &str) {
        raw::log(level, message);
    }

    /// Monotonic clock in nanoseconds.
    pub fn now_ns() -> u64 {
        raw::now_ns()
    }

    /// A configuration value the operator set for this plugin.
    pub fn config(key: &str) -> Option<String> {
        raw::config(key)
    }

    /// Tokens the text takes in the served model (approximate without a tokenizer).
    pub fn count_tokens(text: &str) -> u32 {
        raw::count_tokens(text)
    }
}

/// Model access, for compressors granted the `model` capability.
#[cfg(feature = "compressor")]
pub mod model {
    use crate::{ChatMessage, GenerationParams};

    /// Runs the plugin's model to completion; fails unless the capability was granted.
    pub fn complete(messages: &[ChatMessage], params: &GenerationParams) -> Result<String, String> {
        crate::bindings::staircase::agent::model::complete(messages, params)
    }
}

// ---------------------------------------------------------------------------------------
// role

#[cfg(feature = "role")]
pub use bindings::exports::staircase::agent::role_policy::RoleInput;

/// An agent's role. Only the system prompt is required; the defaults build
/// `[system, conversation..., upstream outputs as one user message]` and greedy parameters.
#[cfg(feature = "role")]
pub trait Role {
    fn system_prompt() -> String;

    fn build_messages(input: RoleInput) -> Vec<ChatMessage> {
        default_role_messages(Self::system_prompt(), input)
    }

    fn params() -> GenerationParams {
        GenerationParams::default()
    }
}

/// The default message building of [`Role::build_messages`], for roles that only add to it.
#[cfg(feature = "role")]
pub fn default_role_messages(system_prompt: String, input: RoleInput) -> Vec<ChatMessage> {
    let mut messages = Vec::with_capacity(input.conversation.len() + 2);
    messages.push(ChatMessage::new(Speaker::System, system_prompt));
    messages.extend(input.conversation);
    if !input.upstream.is_empty() {
        let mut context = String::from("Responses from other agents:\n");
        for output in &input.upstream {
            context.push_str("\n### ");
            context.push_str(&output.source.label);
            context.push('\n');
            context.push_str(&output.text);
            context.push('\n');
        }
        messages.push(ChatMessage::new(Speaker::User, context));
    }
    messages
}

/// Exports a type implementing [`Role`] as this component's `role-policy`.
#[cfg(feature = "role")]
#[macro_export]
macro_rules! export_role {
    ($t:ty) => {
        #[doc(hidden)]
        pub struct __StaircaseRole;
        impl $crate::bindings::exports::staircase::agent::role_policy::Guest for __StaircaseRole {
            fn system_prompt() -> String {
                <$t as $crate::Role>::system_prompt()
            }
            fn build_messages(input: $crate::RoleInput) -> Vec<$crate::ChatMessage> {
                <$t as $crate::Role>::build_messages(input)
            }
            fn params() -> $crate::GenerationParams {
                <$t as $crate::Role>::params()
            }
        }
        $crate::bindings::__export_world!(__StaircaseRole with_types_in $crate::bindings);
    };
}

// ---------------------------------------------------------------------------------------
// aggregator

#[cfg(feature = "aggregator")]
pub use bindings::exports::staircase::agent::aggregator_policy::{Demand, Step, StreamMode};

/// A staircase policy: one value per pipeline run.
#[cfg(feature = "aggregator")]
pub trait Aggregator: 'static {
    fn new(conversation: Vec<ChatMessage>, sources: Vec<Source>, mode: StreamMode) -> Self;
    fn push(&mut self, source_id: &str, text: &str) -> Demand;
    fn finish(&mut self, source_id: &str);
    fn answered(&mut self, _text: &str) {}
    fn next_step(&mut self) -> Option<Step>;
}

/// Exports a type implementing [`Aggregator`] as this component's `aggregator-policy`.
#[cfg(feature = "aggregator")]
#[macro_export]
macro_rules! export_aggregator {
    ($t:ty) => {
        #[doc(hidden)]
        pub struct __StaircaseAggregator;
        /// Adapts the aggregator to the generated resource, whose methods take `&self`.
        #[doc(hidden)]
        pub struct __StaircaseSession(core::cell::RefCell<$t>);
        impl $crate::bindings::exports::staircase::agent::aggregator_policy::Guest
            for __StaircaseAggregator
        {
            type Session = __StaircaseSession;
        }
        impl $crate::bindings::exports::staircase::agent::aggregator_policy::GuestSession
            for __StaircaseSession
        {
            fn new(
                conversation: Vec<$crate::ChatMessage>,
                sources: Vec<$crate::Source>,
                mode: $crate::StreamMode,
            ) -> Self {
                __StaircaseSession(core::cell::RefCell::new(
                    <$t as $crate::Aggregator>::new(conversation, sources, mode),
                ))
            }
            fn push(&self, source_id: String, text: String) -> $crate::Demand {
                <$t as $crate::Aggregator>::push(&mut self.0.borrow_mut(), &source_id, &text)
            }
            fn finish(&self, source_id: String) {
                <$t as $crate::Aggregator>::finish(&mut self.0.borrow_mut(), &source_id)
            }
            fn answered(&self, text: String) {
                <$t as $crate::Aggregator>::answered(&mut self.0.borrow_mut(), &text)
            }
            fn next_step(&self) -> Option<$crate::Step> {
                <$t as $crate::Aggregator>::next_step(&mut self.0.borrow_mut())
            }
        }
        $crate::bindings::__export_world!(__StaircaseAggregator with_types_in $crate::bindings);
    };
}

// ---------------------------------------------------------------------------------------
// compressor

/// Shortens a history to a token budget (count with [`host::count_tokens`]).
#[cfg(feature = "compressor")]
pub trait Compressor {
    fn compress(history: Vec<ChatMessage>, budget_tokens: u32) -> Result<Vec<ChatMessage>, String>;
}

/// Exports a type implementing [`Compressor`] as this component's `compressor-policy`.
#[cfg(feature = "compressor")]
#[macro_export]
macro_rules! export_compressor {
    ($t:ty) => {
        #[doc(hidden)]
        pub struct __StaircaseCompressor;
        impl $crate::bindings::exports::staircase::agent::compressor_policy::Guest
            for __StaircaseCompressor
        {
            fn compress(
                history: Vec<$crate::ChatMessage>,
                budget_tokens: u32,
            ) -> Result<Vec<$crate::ChatMessage>, String> {
                <$t as $crate::Compressor>::compress(history, budget_tokens)
            }
        }
        $crate::bindings::__export_world!(__StaircaseCompressor with_types_in $crate::bindings);
    };
}

// ---------------------------------------------------------------------------------------
// router

#[cfg(feature = "router")]
pub use bindings::exports::staircase::agent::router_policy::{
    Confidence, RouteChoice, RouteRequest,
};

#[cfg(feature = "router")]
impl RouteChoice {
    /// `model`, for `reason`.
    pub fn new(model: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            reason: reason.into(),
        }
    }
}

/// Chooses a model per step; the answer must be one of `request.models`.
#[cfg(feature = "router")]
pub trait Router {
    fn route(request: RouteRequest) -> RouteChoice;
}

/// Exports a type implementing [`Router`] as this component's `router-policy`.
#[cfg(feature = "router")]
#[macro_export]
macro_rules! export_router {
    ($t:ty) => {
        #[doc(hidden)]
        pub struct __StaircaseRouter;
        impl $crate::bindings::exports::staircase::agent::router_policy::Guest for __StaircaseRouter {
            fn route(request: $crate::RouteRequest) -> $crate::RouteChoice {
                <$t as $crate::Router>::route(request)
            }
        }
        $crate::bindings::__export_world!(__StaircaseRouter with_types_in $crate::bindings);
    };
}

// ---------------------------------------------------------------------------------------
// guard

#[cfg(feature = "guard")]
pub use bindings::exports::staircase::agent::guard_policy::{Edit, Redaction, StreamInfo, Verdict};

#[cfg(feature = "guard")]
impl Edit {
    /// Replace the window's bytes `start..end` with `text`.
    pub fn new(start: usize, end: usize, text: impl Into<String>) -> Self {
        Self {
            start: start as u32,
            end: end as u32,
            text: text.into(),
        }
    }
}

#[cfg(feature = "guard")]
impl Verdict {
    /// Release the window's first `bytes` bytes unchanged (0: hold everything).
    pub fn release(bytes: usize) -> Self {
        Verdict::Release(bytes as u32)
    }

    /// Apply `edits` (in order, not overlapping), then release the edited window's first
    /// `release` bytes.
    pub fn redact(edits: Vec<Edit>, release: usize) -> Self {
        Verdict::Redact(Redaction {
            edits,
            release: release as u32,
        })
    }
}

/// An output guard: one value per stream. `push` sees the whole window (the text not yet
/// released, ending with the new chunk), so a pattern split across chunks is seen whole.
#[cfg(feature = "guard")]
pub trait Guard: 'static {
    fn new(info: StreamInfo) -> Self;
    fn push(&mut self, window: &str, new_bytes: usize, tokens: u32) -> Verdict;
    /// The end of the stream; releases whatever it does not stop or redact.
    fn finish(&mut self, window: &str) -> Verdict {
        self.push(window, 0, 0)
    }
}

/// Exports a type implementing [`Guard`] as this component's `guard-policy`.
#[cfg(feature = "guard")]
#[macro_export]
macro_rules! export_guard {
    ($t:ty) => {
        #[doc(hidden)]
        pub struct __StaircaseGuard;
        /// Adapts the guard to the generated resource, whose methods take `&self`.
        #[doc(hidden)]
        pub struct __StaircaseGuardStream(core::cell::RefCell<$t>);
        impl $crate::bindings::exports::staircase::agent::guard_policy::Guest for __StaircaseGuard {
            type GuardStream = __StaircaseGuardStream;
        }
        impl $crate::bindings::exports::staircase::agent::guard_policy::GuestGuardStream
            for __StaircaseGuardStream
        {
            fn new(info: $crate::StreamInfo) -> Self {
                __StaircaseGuardStream(core::cell::RefCell::new(<$t as $crate::Guard>::new(info)))
            }
            fn push(&self, window: String, new_bytes: u32, tokens: u32) -> $crate::Verdict {
                <$t as $crate::Guard>::push(
                    &mut self.0.borrow_mut(),
                    &window,
                    new_bytes as usize,
                    tokens,
                )
            }
            fn finish(&self, window: String) -> $crate::Verdict {
                <$t as $crate::Guard>::finish(&mut self.0.borrow_mut(), &window)
            }
        }
        $crate::bindings::__export_world!(__StaircaseGuard with_types_in $crate::bindings);
    };
}
