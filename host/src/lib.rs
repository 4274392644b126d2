//! Staircase: a host that runs multi-agent LLM pipelines with staircase streaming,
//! while every agent-specific policy runs as a sandboxed WebAssembly component.
//!
//! One folder per concept: `engine/` generates tokens (the local GGUF engine and OpenAI-compatible remote servers),
//! `cache/` holds the prefix KV cache, `token` is the token id they share, `speculate/` drafts tokens, `pipeline/` runs DAGs of
//! agents, `policy` is the contract between pipelines and their policies, `plugin/` hosts the WebAssembly policies, `guard` holds back and judges streamed text for output guards, `trace/` records timelines, `eval/` scores answers, `tune/` picks pipeline variants for a latency budget, `routing/` chooses replicas, `sync` is the one poison-tolerant lock, `model/`
//! fetches and lists models, `app/` assembles them from `staircase.toml` (the one composition
//! root), `server/` serves them over an OpenAI-compatible API, and `cli/` is the command line
//! over all of them.

pub mod app;
pub mod bench;
pub mod cache;
pub mod cli;
pub mod engine;
pub mod eval;
pub mod guard;
pub mod millis;
pub mod model;
pub mod pipeline;
pub mod plugin;
pub mod policy;
pub mod routing;
pub mod server;
pub mod speculate;
pub mod sync;
pub mod token;
pub mod trace;
pub mod tune;
pub mod watch;
