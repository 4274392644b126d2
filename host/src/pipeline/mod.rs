//! Pipelines: DAGs of agents with staircase streaming along edges.
//!
//! `spec` reads and validates pipeline files, `examples` embeds the shipped ones, `stream`
//! cuts outputs into chunks per edge, `critical` computes critical paths, `runtime` runs a
//! pipeline on engines and policies, `run_id` names a run, `record` keeps a run's one event stream and `report`
//! derives a finished run's figures from it, `role_session` drives agents that read other
//! nodes, `budget` bounds a run whatever its plugins do, `guest` runs every policy call on a
//! bounded pool off the async runtime, `variants` reads the alternatives a
//! file declares for load-adaptive runs, `predict` models a pipeline's critical path before it
//! runs and `adaptive` chooses which declared variant a request runs under the load now. Policies come in through the traits of
//! [`crate::policy`], which the plugin host implements; nothing here touches wasmtime or
//! llama.cpp directly.

pub mod adaptive;
pub mod budget;
pub mod critical;
pub mod examples;
pub mod guest;
pub mod history;
pub mod plugin_log;
pub mod predict;
pub mod record;
pub mod report;
pub mod role_session;
pub mod run_id;
pub mod runtime;
pub mod spec;
pub mod stream;
pub mod variants;

pub use budget::{RunBound, RunLimits};
pub use examples::{DEFAULT_PIPELINE, load};
pub use guest::{DEFAULT_GUEST_THREADS, Guest, GuestPool};
pub use record::{Recorded, Recorder, RunEvent};
pub use report::RunReport;
pub use run_id::RunId;
pub use runtime::{Models, RunError, RunRequest, Runner};
pub use spec::{NodeIndex, Pipeline, SpecError, SpecErrorKind};
