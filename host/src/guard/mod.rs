//! Output guards on a stream of generated text: the hold-back window and the chain of guards
//! a stream passes through (WIT 0.3.0 `guard-policy`). Text enters as the model makes it;
//! only what every guard in the chain released leaves, so a pattern split across chunks is
//! seen whole before any byte of it goes out.
//!
//! This room owns the window's rules (bounded, UTF-8 whole, edits checked) and what a failed
//! guard means (fail closed by default). It never touches wasmtime, HTTP or the engine: a
//! guard is a [`GuardSession`], and the caller feeds chunks and sends what comes out.

mod relay;

pub use relay::{GuardReport, Witness, relay, strip_texts};

use serde::{Deserialize, Serialize};

use crate::policy::{PluginConfig, PolicyError, PolicyProvider};

/// The hold-back window when a guard's manifest names none: long enough for an API key, a
/// card number or an e-mail address split over many chunks, short enough that the client
/// sees text within a few dozen tokens.
pub const DEFAULT_WINDOW_BYTES: usize = 256;

/// The largest window a guard may ask for: beyond it a stream stops being a stream.
pub const MAX_WINDOW_BYTES: usize = 64 * 1024;

/// One guard as a pipeline file or `staircase.toml` names it (`[[guards]]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardSpec {
    /// The guard plugin's name.
    pub plugin: String,
    /// What its `config` import sees.
    #[serde(default)]
    pub config: PluginConfig,
    /// A guard that fails (trap, deadline, limits) lets its stream go on unguarded by it
    /// instead of stopping it. Off by default: a broken guard must not leak.
    #[serde(default)]
    pub fail_open: bool,
    /// In `staircase.toml`: only the answers of these served models and pipelines (all
    /// when empty). Not allowed in a pipeline file, whose guards guard it alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

impl GuardSpec {
    /// Whether this guard guards the served model or pipeline `name`.
    pub fn covers(&self, name: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == name)
    }
}

/// The chain of `specs`, in order, for the stream `info` describes. A guard that cannot
/// start fails the stream (its error names it) unless it is `fail_open`, when it is left out.
pub fn open_chain(
    policies: &dyn PolicyProvider,
    specs: &[GuardSpec],
    info: &StreamInfo,
) -> Result<(GuardChain, Vec<GuardEvent>), PolicyError> {
    let mut stages = Vec::with_capacity(specs.len());
    let mut events = Vec::new();
    for spec in specs {
        match policies.guard(&spec.plugin, &spec.config, info) {
            Ok(session) => {
                let on_failure = if spec.fail_open {
                    OnFailure::Open
                } else {
                    OnFailure::Close
                };
                stages.push(Stage::new(spec.plugin.clone(), session, on_failure));
            }
            Err(error) if spec.fail_open => events.push(GuardEvent::Failed {
                guard: spec.plugin.clone(),
                error: error.to_string(),
                open: true,
            }),
            Err(error) => {
                return Err(PolicyError(format!(
                    "guard {} did not start: {error}",
                    spec.plugin
                )));
            }
        }
    }
    Ok((GuardChain::new(stages), events))
}

/// Replace `start..end` (bytes of the window) with `text`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edit {
    pub start: usize,
    pub end: usize,
    pub text: String,
}

/// A guard's answer to a push or to the end of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Release the window's first `n` bytes unchanged (0: hold).
    Release(usize),
    /// Apply the edits, then release the first `release` bytes of the edited window.
    Redact { edits: Vec<Edit>, release: usize },
    /// Nothing more leaves; the reason goes to the client.
    Stop(String),
}

/// Where a guarded stream's text comes from and goes to (WIT `stream-info`, whose window
/// size the guard's manifest adds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamInfo {
    /// The node generating it (a plain model's answer: "answer").
    pub node_id: String,
    pub model: String,
    /// True when the text goes to the client; false on an inner edge.
    pub to_client: bool,
}

impl StreamInfo {
    /// The answer of a run of `pipeline`, on its way to the client (`run`, `eval`).
    pub fn answer_of(pipeline: &crate::pipeline::Pipeline) -> Self {
        Self {
            node_id: pipeline.node(pipeline.output).id.clone(),
            model: pipeline.name.clone(),
            to_client: true,
        }
    }
}

/// One stream's guard (WIT `guard-policy.guard-stream`).
pub trait GuardSession: Send {
    /// The most text to hold back for this guard (its manifest's `window-bytes`).
    fn window_bytes(&self) -> usize {
        DEFAULT_WINDOW_BYTES
    }

    /// `window` is the text not yet released, ending with the `new_bytes` just generated
    /// (`tokens` tokens of the model).
    fn push(&mut self, window: &str, new_bytes: usize, tokens: u32)
    -> Result<Verdict, PolicyError>;
    /// The stream ended with `window` still held.
    fn finish(&mut self, window: &str) -> Result<Verdict, PolicyError>;
}

/// What happened in a guard, for run events, traces and metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum GuardEvent {
    /// The guard replaced `spans` spans, `bytes` bytes of generated text in all.
    Redacted {
        guard: String,
        spans: usize,
        bytes: usize,
    },
    /// The guard ended the stream.
    Stopped { guard: String, reason: String },
    /// The guard failed (trap, deadline, a malformed verdict). `open`: the operator let the
    /// stream go on unguarded by it; otherwise the stream stopped.
    Failed {
        guard: String,
        error: String,
        open: bool,
    },
    /// The guard held a full window; its oldest `bytes` left without its verdict.
    Overflowed { guard: String, bytes: usize },
}

impl GuardEvent {
    /// One line for a trace or a log: the guard and its verdict.
    pub fn summary(&self) -> String {
        match self {
            GuardEvent::Redacted { guard, spans, .. } => {
                format!("{guard} redacted {spans} span(s)")
            }
            GuardEvent::Stopped { guard, reason } => format!("{guard} stopped: {reason}"),
            GuardEvent::Failed { guard, open, .. } => {
                format!("{guard} failed {}", if *open { "open" } else { "closed" })
            }
            GuardEvent::Overflowed { guard, bytes } => {
                format!("{guard} overflowed by {bytes} bytes")
            }
        }
    }
}

/// How a failing guard ends: closed (the stream stops) unless its operator opened it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnFailure {
    #[default]
    Close,
    Open,
}

/// One guard in a chain, with its window.
pub struct Stage {
    name: String,
    session: Box<dyn GuardSession>,
    window: String,
    window_bytes: usize,
    on_failure: OnFailure,
    /// Failed open: text passes this stage untouched from now on.
    bypassed: bool,
    /// Bytes of replacement text this stage's redactions put in.
    inserted_bytes: usize,
}

impl Stage {
    /// The window is the session's, clamped to `1..=MAX_WINDOW_BYTES`.
    pub fn new(
        name: impl Into<String>,
        session: Box<dyn GuardSession>,
        on_failure: OnFailure,
    ) -> Self {
        let window_bytes = session.window_bytes();
        Self {
            name: name.into(),
            session,
            window: String::new(),
            window_bytes: window_bytes.clamp(1, MAX_WINDOW_BYTES),
            on_failure,
            bypassed: false,
            inserted_bytes: 0,
        }
    }

    /// Feeds `text` (may be empty) and returns what this stage releases, or why it stopped.
    fn push(
        &mut self,
        text: &str,
        tokens: u32,
        events: &mut Vec<GuardEvent>,
    ) -> Result<String, String> {
        if self.bypassed {
            return Ok(text.to_string());
        }
        self.window.push_str(text);
        let verdict = self.session.push(&self.window, text.len(), tokens);
        let mut released = self.apply(verdict, false, events)?;
        // A guard holding a full window: the oldest text leaves without its verdict, so a
        // guard cannot stall its stream.
        if self.window.len() > self.window_bytes {
            let over = floor_boundary(&self.window, self.window.len() - self.window_bytes);
            if over > 0 {
                released.extend(self.window.drain(..over));
                events.push(GuardEvent::Overflowed {
                    guard: self.name.clone(),
                    bytes: over,
                });
            }
        }
        Ok(released)
    }

    /// The end of the stream: everything still held is judged and released (or stopped).
    fn finish(&mut self, events: &mut Vec<GuardEvent>) -> Result<String, String> {
        if self.bypassed {
            return Ok(std::mem::take(&mut self.window));
        }
        let verdict = self.session.finish(&self.window);
        self.apply(verdict, true, events)
    }

    fn apply(
        &mut self,
        verdict: Result<Verdict, PolicyError>,
        last: bool,
        events: &mut Vec<GuardEvent>,
    ) -> Result<String, String> {
        let verdict = verdict
            .map_err(|e| e.to_string())
            .and_then(|v| self.checked(v));
        let release = match verdict {
            Ok(Verdict::Release(n)) => n,
            Ok(Verdict::Redact { edits, release }) => {
                let (spans, bytes) = (edits.len(), edits.iter().map(|e| e.end - e.start).sum());
                // Back to front, so each edit's offsets still hold.
                for edit in edits.iter().rev() {
                    self.window.replace_range(edit.start..edit.end, &edit.text);
                    self.inserted_bytes += edit.text.len();
                }
                events.push(GuardEvent::Redacted {
                    guard: self.name.clone(),
                    spans,
                    bytes,
                });
                release
            }
            Ok(Verdict::Stop(reason)) => {
                events.push(GuardEvent::Stopped {
                    guard: self.name.clone(),
                    reason: reason.clone(),
                });
                self.window.clear();
                return Err(format!("guard {} stopped the stream: {reason}", self.name));
            }
            Err(error) => {
                let open = self.on_failure == OnFailure::Open;
                events.push(GuardEvent::Failed {
                    guard: self.name.clone(),
                    error: error.clone(),
                    open,
                });
                if !open {
                    self.window.clear();
                    return Err(format!("guard {} failed: {error}", self.name));
                }
                self.bypassed = true;
                self.window.len()
            }
        };
        let release = if last {
            self.window.len()
        } else {
            floor_boundary(&self.window, release.min(self.window.len()))
        };
        Ok(self.window.drain(..release).collect())
    }

    /// The verdict, if its edits fit the window: in order, not overlapping, on character
    /// boundaries. A malformed verdict is the guard's failure, not a reason to guess.
    fn checked(&self, verdict: Verdict) -> Result<Verdict, String> {
        if let Verdict::Redact { edits, .. } = &verdict {
            let mut from = 0;
            for edit in edits {
                let fits = from <= edit.start
                    && edit.start <= edit.end
                    && edit.end <= self.window.len()
                    && self.window.is_char_boundary(edit.start)
                    && self.window.is_char_boundary(edit.end);
                if !fits {
                    return Err(format!(
                        "edit {}..{} does not fit a window of {} bytes after {from}",
                        edit.start,
                        edit.end,
                        self.window.len()
                    ));
                }
                from = edit.end;
            }
        }
        Ok(verdict)
    }
}

/// The largest character boundary of `text` at or below `at`.
fn floor_boundary(text: &str, at: usize) -> usize {
    (0..=at.min(text.len()))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0)
}

/// What a chain did with one push or the end of a stream.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Text every guard released, to send on.
    pub released: String,
    /// Set when a guard stopped the stream or failed closed: send nothing more.
    pub stopped: Option<String>,
    pub events: Vec<GuardEvent>,
}

/// Several guards in order: each one's released text is the next one's input.
#[derive(Default)]
pub struct GuardChain {
    stages: Vec<Stage>,
    stopped: bool,
    /// Bytes generated, and released, so far: the difference was withheld.
    generated_bytes: usize,
    released_bytes: usize,
}

impl GuardChain {
    pub fn new(stages: Vec<Stage>) -> Self {
        Self {
            stages,
            ..Self::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// Bytes the model generated that did not (yet, or ever) reach the far end: held,
    /// redacted away or cut off by a stop (a redaction's replacement is not generated text).
    pub fn withheld_bytes(&self) -> usize {
        let inserted: usize = self.stages.iter().map(|s| s.inserted_bytes).sum();
        (self.generated_bytes + inserted).saturating_sub(self.released_bytes)
    }

    /// A chunk the model generated (`tokens` of its tokens).
    pub fn push(&mut self, chunk: &str, tokens: u32) -> Outcome {
        let mut outcome = Outcome::default();
        self.generated_bytes += chunk.len();
        if self.stopped {
            return outcome;
        }
        outcome.released = self.pass(0, chunk.to_string(), tokens, &mut outcome);
        self.released_bytes += outcome.released.len();
        outcome
    }

    /// The end of the stream: flushes every stage in order, each flush passing the stages
    /// after it.
    pub fn finish(&mut self) -> Outcome {
        let mut outcome = Outcome::default();
        for at in 0..self.stages.len() {
            if self.stopped {
                break;
            }
            match self.stages[at].finish(&mut outcome.events) {
                Ok(flushed) => {
                    let rest = self.pass(at + 1, flushed, 0, &mut outcome);
                    outcome.released.push_str(&rest);
                }
                Err(reason) => self.stop(&mut outcome, reason),
            }
        }
        self.released_bytes += outcome.released.len();
        outcome
    }

    /// Passes `text` through the stages from `from` on; what the last one releases.
    fn pass(
        &mut self,
        from: usize,
        mut text: String,
        tokens: u32,
        outcome: &mut Outcome,
    ) -> String {
        for at in from..self.stages.len() {
            match self.stages[at].push(&text, tokens, &mut outcome.events) {
                Ok(released) => text = released,
                Err(reason) => {
                    self.stop(outcome, reason);
                    return String::new();
                }
            }
        }
        text
    }

    fn stop(&mut self, outcome: &mut Outcome, reason: String) {
        self.stopped = true;
        outcome.stopped = Some(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Redacts every whole occurrence of `secret` in its window and holds a tail that could
    /// still become one: what a pattern guard does.
    struct Redactor {
        secret: &'static str,
    }

    impl Redactor {
        fn verdict(&self, window: &str, last: bool) -> Verdict {
            let edits: Vec<Edit> = window
                .match_indices(self.secret)
                .map(|(start, found)| Edit {
                    start,
                    end: start + found.len(),
                    text: "[redacted]".into(),
                })
                .collect();
            // Keep back a tail that is a prefix of the secret.
            let edited_len = window.len() + edits.iter().map(|e| e.text.len()).sum::<usize>()
                - edits.iter().map(|e| e.end - e.start).sum::<usize>();
            let tail = (1..self.secret.len())
                .rev()
                .find(|&n| window.ends_with(&self.secret[..n]))
                .unwrap_or(0);
            let release = if last { edited_len } else { edited_len - tail };
            if edits.is_empty() {
                Verdict::Release(release)
            } else {
                Verdict::Redact { edits, release }
            }
        }
    }

    impl GuardSession for Redactor {
        fn push(&mut self, window: &str, _: usize, _: u32) -> Result<Verdict, PolicyError> {
            Ok(self.verdict(window, false))
        }
        fn finish(&mut self, window: &str) -> Result<Verdict, PolicyError> {
            Ok(self.verdict(window, true))
        }
    }

    /// Answers with a fixed verdict or error on every push.
    struct Scripted(Result<Verdict, &'static str>);

    /// A session with a window of its own size.
    struct Windowed<G>(G, usize);

    impl<G: GuardSession> GuardSession for Windowed<G> {
        fn window_bytes(&self) -> usize {
            self.1
        }
        fn push(&mut self, window: &str, new: usize, tokens: u32) -> Result<Verdict, PolicyError> {
            self.0.push(window, new, tokens)
        }
        fn finish(&mut self, window: &str) -> Result<Verdict, PolicyError> {
            self.0.finish(window)
        }
    }

    fn stage(
        name: &str,
        session: impl GuardSession + 'static,
        window: usize,
        on_failure: OnFailure,
    ) -> Stage {
        Stage::new(name, Box::new(Windowed(session, window)), on_failure)
    }

    impl GuardSession for Scripted {
        fn push(&mut self, _: &str, _: usize, _: u32) -> Result<Verdict, PolicyError> {
            self.0.clone().map_err(|e| PolicyError(e.into()))
        }
        fn finish(&mut self, _: &str) -> Result<Verdict, PolicyError> {
            self.0.clone().map_err(|e| PolicyError(e.into()))
        }
    }

    fn redactor_chain(window: usize) -> GuardChain {
        GuardChain::new(vec![stage(
            "redactor",
            Redactor {
                secret: "sk-SECRET42",
            },
            window,
            OnFailure::Close,
        )])
    }

    /// Feeds `chunks` and returns all that left, and whether the stream stopped.
    fn feed(chain: &mut GuardChain, chunks: &[&str]) -> (String, Option<String>) {
        let mut out = String::new();
        let mut stopped = None;
        for chunk in chunks {
            let outcome = chain.push(chunk, 1);
            out.push_str(&outcome.released);
            stopped = stopped.or(outcome.stopped);
        }
        let outcome = chain.finish();
        out.push_str(&outcome.released);
        (out, stopped.or(outcome.stopped))
    }

    /// Every way of cutting the text into chunks, up to one byte each.
    fn cuts(text: &str, size: usize) -> Vec<&str> {
        let mut chunks = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let at = floor_boundary(rest, size.min(rest.len())).max(1);
            let at = (at..=rest.len())
                .find(|&i| rest.is_char_boundary(i))
                .unwrap_or(rest.len());
            chunks.push(&rest[..at]);
            rest = &rest[at..];
        }
        chunks
    }

    #[test]
    fn a_secret_split_across_any_chunks_never_leaves() {
        let text = "Your key is sk-SECRET42, keep it — and sk-SECRET42 again. Ünïcode ok.";
        for size in 1..=text.len() {
            let mut chain = redactor_chain(DEFAULT_WINDOW_BYTES);
            let (out, stopped) = feed(&mut chain, &cuts(text, size));
            assert_eq!(stopped, None);
            assert_eq!(
                out, "Your key is [redacted], keep it — and [redacted] again. Ünïcode ok.",
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn a_holding_guard_cannot_stall_its_stream_beyond_its_window() {
        let mut chain = GuardChain::new(vec![stage(
            "hold",
            Scripted(Ok(Verdict::Release(0))),
            8,
            OnFailure::Close,
        )]);
        let first = chain.push("0123456789ab", 3);
        assert_eq!(first.released, "0123");
        assert_eq!(
            first.events,
            [GuardEvent::Overflowed {
                guard: "hold".into(),
                bytes: 4
            }]
        );
        assert_eq!(chain.withheld_bytes(), 8);
        assert_eq!(chain.finish().released, "456789ab");
        assert_eq!(chain.withheld_bytes(), 0);
    }

    #[test]
    fn the_window_releases_whole_characters_only() {
        // 2 falls inside "é" (bytes 1..3).
        let mut chain = GuardChain::new(vec![stage(
            "mid-char",
            Scripted(Ok(Verdict::Release(2))),
            64,
            OnFailure::Close,
        )]);
        assert_eq!(chain.push("aé", 1).released, "a");
        assert_eq!(chain.finish().released, "é");
    }

    #[test]
    fn a_stop_ends_the_stream_and_nothing_more_leaves() {
        let mut chain = GuardChain::new(vec![stage(
            "stopper",
            Scripted(Ok(Verdict::Stop("banned topic".into()))),
            64,
            OnFailure::Close,
        )]);
        let outcome = chain.push("how to make", 2);
        assert_eq!(outcome.released, "");
        assert!(outcome.stopped.unwrap().contains("banned topic"));
        assert_eq!(chain.push(" more", 1), Outcome::default());
        assert_eq!(chain.finish(), Outcome::default());
        assert_eq!(chain.withheld_bytes(), "how to make more".len());
    }

    #[test]
    fn a_failing_guard_fails_closed_unless_opened() {
        for (on_failure, leaves) in [(OnFailure::Close, ""), (OnFailure::Open, "text")] {
            let mut chain = GuardChain::new(vec![stage(
                "broken",
                Scripted(Err("trapped")),
                64,
                on_failure,
            )]);
            let mut outcome = chain.push("te", 1);
            let more = chain.push("xt", 1);
            outcome.released.push_str(&more.released);
            outcome.released.push_str(&chain.finish().released);
            assert_eq!(outcome.released, leaves, "{on_failure:?}");
            assert_eq!(
                outcome.stopped.is_some(),
                on_failure == OnFailure::Close,
                "{on_failure:?}"
            );
            assert!(matches!(
                &outcome.events[..],
                [GuardEvent::Failed { open, .. }] if *open == (on_failure == OnFailure::Open)
            ));
        }
    }

    #[test]
    fn a_malformed_redaction_is_the_guards_failure() {
        for edits in [
            // Past the window's end.
            vec![Edit {
                start: 0,
                end: 99,
                text: String::new(),
            }],
            // Overlapping.
            vec![
                Edit {
                    start: 0,
                    end: 3,
                    text: String::new(),
                },
                Edit {
                    start: 2,
                    end: 4,
                    text: String::new(),
                },
            ],
            // Inside a character ("é" is bytes 1..3).
            vec![Edit {
                start: 2,
                end: 3,
                text: String::new(),
            }],
        ] {
            let mut chain = GuardChain::new(vec![stage(
                "sloppy",
                Scripted(Ok(Verdict::Redact { edits, release: 0 })),
                64,
                OnFailure::Close,
            )]);
            let outcome = chain.push("aéxyz", 1);
            assert!(outcome.stopped.unwrap().contains("does not fit"));
        }
    }

    #[test]
    fn chained_guards_see_only_what_the_guard_before_released() {
        let mut chain = GuardChain::new(vec![
            stage(
                "first",
                Redactor {
                    secret: "sk-SECRET42",
                },
                64,
                OnFailure::Close,
            ),
            // Had the second seen the raw secret, "sk-[redacted]42" would leave.
            stage(
                "second",
                Redactor { secret: "SECRET" },
                64,
                OnFailure::Close,
            ),
        ]);
        let (out, stopped) = feed(&mut chain, &["a sk-SEC", "RET42 b"]);
        assert_eq!(stopped, None);
        assert_eq!(out, "a [redacted] b");
        assert_eq!(chain.withheld_bytes(), "sk-SECRET42".len());
    }
}
