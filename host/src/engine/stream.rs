//! The events of one request, and cancellation by dropping them: a backend registers what
//! stops its work ([`GenerationStream::on_cancel`]: a message to the engine thread, a task
//! abort that closes an HTTP request) and the stream runs it when the caller lets go early.

use tokio::sync::mpsc;

use super::{EngineError, FinishReason, GenerationEvent, Timings, TokenId, Usage};

/// The sending side an engine feeds a [`GenerationStream`] through.
pub type EventSender = mpsc::UnboundedSender<Result<GenerationEvent, EngineError>>;

type CancelFn = Box<dyn FnOnce() + Send + Sync>;

/// The events of one request. Dropping it before its last event cancels the request.
pub struct GenerationStream {
    events: mpsc::UnboundedReceiver<Result<GenerationEvent, EngineError>>,
    /// The last event (`Finished`, an error, or the end) was read: nothing to cancel.
    ended: bool,
    cancel: Option<CancelFn>,
}

impl std::fmt::Debug for GenerationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerationStream")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl GenerationStream {
    /// A stream and the sender an engine feeds it through.
    pub fn channel() -> (EventSender, Self) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            tx,
            Self {
                events: rx,
                ended: false,
                cancel: None,
            },
        )
    }

    /// Runs `cancel` once if the stream is dropped before its last event was read, so the
    /// backend stops working on a request nobody reads. Replaces an earlier one.
    pub fn on_cancel(mut self, cancel: impl FnOnce() + Send + Sync + 'static) -> Self {
        self.cancel = Some(Box::new(cancel));
        self
    }

    fn seen(
        &mut self,
        event: Option<Result<GenerationEvent, EngineError>>,
    ) -> Option<Result<GenerationEvent, EngineError>> {
        if !matches!(event, Some(Ok(GenerationEvent::Delta { .. }))) {
            self.ended = true;
        }
        event
    }

    /// The next event; `None` after `Finished` or an error.
    pub async fn next(&mut self) -> Option<Result<GenerationEvent, EngineError>> {
        let event = self.events.recv().await;
        self.seen(event)
    }

    /// The next event, for callers outside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Result<GenerationEvent, EngineError>> {
        let event = self.events.blocking_recv();
        self.seen(event)
    }

    /// The next event if one has already arrived, without waiting (`None`: none yet, or
    /// the stream ended). Lets a caller see what an engine sent before some other event.
    pub fn try_next(&mut self) -> Option<Result<GenerationEvent, EngineError>> {
        let event = self.events.try_recv().ok();
        if event.is_some() {
            return self.seen(event);
        }
        event
    }

    /// Reads the stream to its end, for callers outside an async runtime that want the
    /// whole answer rather than its deltas.
    pub fn blocking_collect(mut self) -> Result<Completion, EngineError> {
        let mut text = String::new();
        let mut token_count = 0u32;
        let mut token_ids = Some(Vec::new());
        while let Some(event) = self.blocking_next() {
            match event? {
                GenerationEvent::Delta {
                    text: delta,
                    token_count: count,
                    token_ids: ids,
                } => {
                    text.push_str(&delta);
                    token_count += count;
                    match (token_ids.as_mut(), ids) {
                        (Some(all), Some(ids)) => all.extend(ids),
                        _ => token_ids = None,
                    }
                }
                GenerationEvent::Finished {
                    reason,
                    usage,
                    timings,
                    extensions,
                } => {
                    return Ok(Completion {
                        text,
                        token_count,
                        token_ids,
                        reason,
                        usage,
                        timings,
                        extensions,
                    });
                }
            }
        }
        Err(EngineError::Stopped)
    }
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        if !self.ended
            && let Some(cancel) = self.cancel.take()
        {
            cancel();
        }
    }
}

/// A whole answer, from [`GenerationStream::blocking_collect`].
#[derive(Clone, Debug)]
pub struct Completion {
    pub text: String,
    /// Tokens of `text` (the deltas' counts).
    pub token_count: u32,
    /// Their ids, when every delta carried them.
    pub token_ids: Option<Vec<TokenId>>,
    pub reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
    /// What only some engines report (see [`GenerationEvent::Finished`]).
    pub extensions: http::Extensions,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn counted() -> (Arc<AtomicUsize>, impl FnOnce() + Send + Sync + 'static) {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        (calls, move || {
            seen.fetch_add(1, Ordering::SeqCst);
        })
    }

    #[test]
    fn dropping_an_unfinished_stream_cancels_once() {
        let (calls, cancel) = counted();
        let (tx, stream) = GenerationStream::channel();
        let mut stream = stream.on_cancel(cancel);
        let delta = GenerationEvent::Delta {
            text: "a".into(),
            token_count: 1,
            token_ids: None,
        };
        tx.send(Ok(delta)).unwrap();
        assert!(stream.blocking_next().is_some());
        drop(stream);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_finished_stream_has_nothing_to_cancel() {
        let (calls, cancel) = counted();
        let (tx, stream) = GenerationStream::channel();
        tx.send(Ok(GenerationEvent::Finished {
            reason: FinishReason::Stop,
            usage: Usage::default(),
            timings: Timings::default(),
            extensions: http::Extensions::new(),
        }))
        .unwrap();
        let completion = stream.on_cancel(cancel).blocking_collect().unwrap();
        assert_eq!(completion.token_ids, Some(Vec::new()));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
