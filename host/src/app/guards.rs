//! The output guards on an answer, for every front end: which guards cover it (the
//! pipeline's own, then `staircase.toml`'s), each pinned to the version serving now for the
//! whole answer, and the relay that lets out only what they release.

use std::future::Future;

use tokio::sync::mpsc;

use super::{App, PinnedPlugin, pinned::Pinned};
use crate::guard::{GuardChain, GuardEvent, GuardReport, GuardSpec, StreamInfo};
use crate::pipeline::Pipeline;
use crate::policy::PolicyError;

/// An answer's guard chain, open, with the versions it runs.
pub struct AnswerGuards {
    chain: GuardChain,
    /// Fail-open guards that could not start, reported first.
    unopened: Vec<GuardEvent>,
    versions: Vec<PinnedPlugin>,
}

impl App {
    /// The guards on an answer of the served name `name`: `pipeline`'s own, then the
    /// configuration's that cover the name.
    pub fn answer_guard_specs(&self, name: &str, pipeline: Option<&Pipeline>) -> Vec<GuardSpec> {
        let own = pipeline.map(|p| p.guards.as_slice()).unwrap_or_default();
        let served = self.config().guards.iter().filter(|g| g.covers(name));
        own.iter().chain(served).cloned().collect()
    }

    /// Opens `specs` on the stream `info` describes, each guard at the version serving now
    /// (waiting, without holding a thread, for any still waiting for its first compile). A
    /// guard that cannot start fails the answer, naming it, unless it is `fail_open`.
    pub async fn open_guards(
        &self,
        specs: &[GuardSpec],
        info: &StreamInfo,
    ) -> Result<AnswerGuards, PolicyError> {
        let mut names: Vec<String> = specs.iter().map(|spec| spec.plugin.clone()).collect();
        names.sort();
        names.dedup();
        for name in &names {
            self.registry.compiled(name).await;
        }
        let pinned = Pinned::of(self.registry.clone(), names);
        let (chain, unopened) = crate::guard::open_chain(&pinned, specs, info)?;
        Ok(AnswerGuards {
            chain,
            unopened,
            versions: pinned.versions(),
        })
    }
}

impl AnswerGuards {
    /// `name@version:sha-prefix` of each guard, for a fingerprint.
    pub fn labels(&self) -> Vec<String> {
        self.versions.iter().map(PinnedPlugin::label).collect()
    }

    /// Runs `work`, which sends the answer's text to `raw`, and sends `reader` only what the
    /// guards release ([`crate::guard::relay`]); `None` when a guard stopped the answer first.
    pub async fn relay<R>(
        self,
        app: &App,
        work: impl Future<Output = R>,
        raw: mpsc::UnboundedReceiver<String>,
        reader: mpsc::UnboundedSender<String>,
    ) -> (Option<R>, GuardReport) {
        let pool = app.runner().guest_pool().clone();
        let (result, mut report) = crate::guard::relay(self.chain, pool, work, raw, reader).await;
        report.events.splice(0..0, self.unopened);
        (result, report)
    }
}
