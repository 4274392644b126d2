//! The output guards on an answer, for every front end: which guards cover it (the
//! pipeline's own, then `staircase.toml`'s), each pinned to the version serving now for the
//! whole answer, and the relay that lets out only what they release.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::run::{Launcher, PreparedRun, Progress, RunOutcome};
use super::{App, PinnedPlugin, pinned::Pinned};
use crate::guard::{GuardChain, GuardEvent, GuardReport, GuardSpec, StreamInfo, Witness};
use crate::pipeline::{GuestPool, Pipeline, Recorder, RunError};
use crate::policy::PolicyError;

/// An answer's guard chain, open, with the versions it runs.
pub struct AnswerGuards {
    chain: GuardChain,
    /// Fail-open guards that could not start, reported first.
    unopened: Vec<GuardEvent>,
    versions: Vec<PinnedPlugin>,
    /// Where the guard calls run, off the async runtime.
    pool: Arc<GuestPool>,
}

/// A run whose answer went through its guards, read whole.
pub struct GuardedRun {
    /// `None` when a guard stopped the answer (the run was cancelled).
    pub outcome: Option<Result<RunOutcome, RunError>>,
    /// The answer as the guards released it.
    pub released: String,
    pub report: GuardReport,
}

impl App {
    /// The guards on an answer of the served name `name`: `pipeline`'s own, then the
    /// configuration's that cover the name.
    pub fn answer_guard_specs(&self, name: &str, pipeline: Option<&Pipeline>) -> Vec<GuardSpec> {
        let own = pipeline.map(|p| p.guards.as_slice()).unwrap_or_default();
        let served = self.config().guards.iter().filter(|g| g.covers(name));
        own.iter().chain(served).cloned().collect()
    }

    /// [`Launcher::open_guards`] on the app's models.
    pub async fn open_guards(
        &self,
        specs: &[GuardSpec],
        info: &StreamInfo,
    ) -> Result<AnswerGuards, PolicyError> {
        self.launcher().open_guards(specs, info).await
    }
}

impl Launcher {
    /// Opens `specs` on the stream `info` describes, each guard at the version serving now
    /// (waiting, without holding a thread, for any still waiting for its first compile). A
    /// guard that cannot start fails the answer, naming it, unless it is `fail_open`.
    pub async fn open_guards(
        &self,
        specs: &[GuardSpec],
        info: &StreamInfo,
    ) -> Result<AnswerGuards, PolicyError> {
        let registry = self.registry();
        let mut names: Vec<String> = specs.iter().map(|spec| spec.plugin.clone()).collect();
        names.sort();
        names.dedup();
        for name in &names {
            registry.compiled(name).await;
        }
        let pinned = Pinned::of(registry.clone(), names);
        let (chain, unopened) = crate::guard::open_chain(&pinned, specs, info)?;
        Ok(AnswerGuards {
            chain,
            unopened,
            versions: pinned.versions(),
            pool: self.runner().guest_pool().clone(),
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
    /// A `witness` is told the verdicts and the released text as they come.
    pub async fn relay<R>(
        self,
        work: impl Future<Output = R>,
        raw: mpsc::UnboundedReceiver<String>,
        reader: mpsc::UnboundedSender<String>,
        witness: Option<Witness<'_>>,
    ) -> (Option<R>, GuardReport) {
        if let Some(witness) = witness {
            witness.verdicts(&self.unopened);
        }
        let (result, mut report) =
            crate::guard::relay(self.chain, self.pool, work, raw, reader, witness).await;
        report.events.splice(0..0, self.unopened);
        (result, report)
    }

    /// Runs `prepared` to its end with its answer through the guards, for a caller that
    /// reads the answer whole (an evaluation).
    pub async fn run_whole(self, prepared: PreparedRun) -> GuardedRun {
        let (raw_tx, raw_rx) = mpsc::unbounded_channel();
        let (released_tx, mut released_rx) = mpsc::unbounded_channel();
        let work = async move {
            // Dropped when the run ends, which tells the guards the answer is whole.
            let raw = raw_tx;
            let recorder = Recorder::new();
            prepared
                .run(&recorder, |progress| {
                    if let Progress::Answer(text) = progress {
                        let _ = raw.send(text.to_owned());
                    }
                })
                .await
        };
        let (outcome, report) = self.relay(work, raw_rx, released_tx, None).await;
        let mut released = String::new();
        while let Ok(text) = released_rx.try_recv() {
            released.push_str(&text);
        }
        GuardedRun {
            outcome,
            released,
            report,
        }
    }
}
