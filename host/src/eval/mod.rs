//! Quality: `staircase eval` and the quality columns of `bench staircase`. Speed is never
//! reported without it.
//!
//! `metrics` holds the reference-free checks (distinct-n, repeated n-gram runs, length,
//! ending, token F1), `judge` the pairwise judge and its strict verdict parser, `rating` the
//! pointwise rating (G-Eval style, probability-weighted), `stats` the
//! confidence intervals, `prompts` the prompt sets, `runner` runs variants over prompts and
//! scores them, `report` prints and draws the result. Like `bench`, this room measures
//! through public APIs (the runner, the engine trait); it must not reach into the engine or
//! plugin internals, and printing and files are the CLI's.

pub mod judge;
pub mod metrics;
pub mod prompts;
pub mod rating;
pub mod report;
pub mod runner;
pub mod stats;

pub use metrics::Quality;
pub use runner::{EvalError, EvalOptions, EvalReport, Variant, VariantKind};
