//! Whether the engine thread still serves. The thread runs the engine loop under
//! `catch_unwind`: a panic (a broken invariant in our scheduler, cache or sampling code)
//! marks the engine crashed, answers every request it held or that still waited in its inbox
//! with [`EngineError::Crashed`], and logs at error level. Later submissions get the same
//! error at once, and the server's `/health` answers 503 naming the model (`/metrics`:
//! `staircase_engine_up` 0).
//!
//! The engine is not restarted in-process, on purpose: after a panic the KV accounting, the
//! prefix tree and the llama.cpp context may disagree, and a panic a request triggers would
//! repeat on a new thread, a crash loop behind a server that looks alive. A fresh process is
//! the only state known to be right; the operator's supervisor (systemd, Kubernetes) starts
//! one when `/health` fails. This room must not know about HTTP.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;

use super::engine_loop::{Command, Shared};
use crate::engine::EngineError;

/// The error every request of a crashed engine gets.
pub(super) fn crashed(model: &str) -> EngineError {
    EngineError::Crashed {
        model: model.to_owned(),
    }
}

/// Runs `serve` (the engine loop over `commands`) on this thread. When it panics, marks
/// `shared` crashed before anything else (so a submission that finds the inbox closed sees
/// why), wakes stats waiters, logs, and answers the submissions still in the inbox.
pub(super) fn serve_guarded(
    model: &str,
    shared: &Shared,
    commands: Receiver<Command>,
    serve: impl FnOnce(&Receiver<Command>),
) {
    let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| serve(&commands))) else {
        return;
    };
    shared.crashed.store(true, Ordering::SeqCst);
    shared.changed.notify_all();
    let reason = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    tracing::error!(
        model,
        %reason,
        "the engine thread panicked: this model serves nothing until the server restarts \
         (/health answers 503 so a supervisor can restart it)"
    );
    while let Ok(command) = commands.try_recv() {
        if let Command::Submit(pending) = command {
            let _ = pending.events.send(Err(crashed(model)));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Instant;

    use super::super::engine_loop::Pending;
    use super::*;
    use crate::engine::{GenerationStream, TokenId};

    fn submit(commands: &mpsc::Sender<Command>) -> GenerationStream {
        let (events, stream) = GenerationStream::channel();
        let pending = Pending {
            id: 7,
            tokens: vec![TokenId(1)],
            answer_prefix: 0,
            sampling: Default::default(),
            priority: Default::default(),
            events,
            submitted: Instant::now(),
            probe: None,
            draft_feed: None,
            namespace: Default::default(),
            measure_confidence: false,
            first_token_candidates: 0,
        };
        commands.send(Command::Submit(pending)).unwrap();
        stream
    }

    #[test]
    fn a_panicking_loop_marks_the_engine_crashed_and_answers_what_waited() {
        let shared = Shared::default();
        let (commands, inbox) = mpsc::channel();
        let mut waiting = submit(&commands);
        serve_guarded("tiny", &shared, inbox, |_| panic!("a broken invariant"));
        assert!(shared.crashed.load(Ordering::SeqCst));
        match waiting.blocking_next() {
            Some(Err(EngineError::Crashed { model })) => assert_eq!(model, "tiny"),
            other => panic!("expected the crash, got {other:?}"),
        }
        // The inbox is gone with the thread: a later submission cannot be queued.
        assert!(commands.send(Command::ForgetHistory).is_err());
    }

    #[test]
    fn a_loop_that_ends_normally_leaves_the_engine_serving() {
        let shared = Shared::default();
        let (commands, inbox) = mpsc::channel();
        let _waiting = submit(&commands);
        serve_guarded("tiny", &shared, inbox, |inbox| {
            let _ = inbox.try_recv();
        });
        assert!(!shared.crashed.load(Ordering::SeqCst));
    }
}
