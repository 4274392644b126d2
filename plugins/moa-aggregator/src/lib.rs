//! The built-in Mixture-of-Agents aggregator, written for staircase use.
//!
//! The prompt is a stable instruction and the user's query first, then the proposers' text.
//! Text already shown to the model in an earlier step never moves, so every step re-uses the
//! cached prefix of the previous one. By default (`layout = "arrival"`) chunks are appended
//! as they arrive, with a heading whenever the source changes; `layout = "step"` holds text
//! until the next step and appends it grouped by source (fewer, longer passages). Before any
//! text arrives it asks for a warm-up of the head, so the first step prefills only the first
//! text.
//!
//! In staircase mode, with `opening-tokens` N > 0, the warm-up is replaced by an *opening*:
//! a short step on the head alone that writes the answer's first N tokens from the question
//! while the proposers are still prefilling (on one CPU the first proposer chunk costs its
//! decode steps plus every other prompt's prefill, most of the first-token time). The steps
//! after it read the proposers' text and continue the opening.
//!
//! In staircase mode the first step comes once `first-step-chars` bytes have arrived (and,
//! with `first-step-sources = "all"`, every source has spoken or finished) and generates
//! `first-step-tokens`; later steps come each time `step-chars` new bytes have accumulated
//! and generate `step-tokens`. In layered mode it steps once, when every source is
//! complete. The final step comes when all sources have finished. The per-chunk path does
//! no host calls (sizes are estimated from bytes), since it runs once per proposer chunk.
//! Every number is a `config` key of the pipeline node, so the policy is the user's to tune;
//! the chunk schedule (the pipeline's `chunk_tokens`) decides how much a first chunk holds.

use staircase_sdk::{Aggregator, ChatMessage, Demand, Source, Speaker, Step, StreamMode, host};

const INSTRUCTION: &str = "You have been provided with a set of responses from various \
open-source models to the latest user query. Your task is to synthesize these responses into a \
single, high-quality response. Critically evaluate the information, recognizing that some of \
it may be biased or incorrect. Do not simply replicate the given answers; offer a refined, \
accurate and comprehensive reply. Responses may still be arriving: answer with what is there \
and continue as more arrives.";

/// Proposer text (bytes, ~4 per token) before the first step: 0 steps on the first text.
const DEFAULT_FIRST_STEP_CHARS: usize = 0;
/// Tokens of the opening step written from the question alone; 0: no opening, a warm-up.
const DEFAULT_OPENING_TOKENS: u32 = 0;
/// Tokens of the first step; 0 means `step-tokens`.
const DEFAULT_FIRST_STEP_TOKENS: u32 = 0;
/// New proposer text (bytes) that earns an intermediate step: small enough that the
/// aggregator starts early, large enough that each step has something new to read.
const DEFAULT_STEP_CHARS: usize = 160;
/// Tokens generated per intermediate step: the answer advances while proposers still talk.
const DEFAULT_STEP_TOKENS: u32 = 16;
/// The final step generates until the model stops, bounded by this.
const DEFAULT_FINAL_TOKENS: u32 = 512;

/// How proposer text is laid out in the prompt.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// Each chunk appended as it arrives (a heading whenever the source changes).
    Arrival,
    /// Text held until the next step, then appended grouped by source.
    Step,
}

struct SourceState {
    source: Source,
    bytes: usize,
    finished: bool,
    /// Text not yet shown to the model (`Layout::Step`).
    pending: String,
    /// Whether the model has seen a heading of this source.
    shown: bool,
}

struct Moa {
    mode: StreamMode,
    layout: Layout,
    /// System instruction and user query: never changes during the run.
    head: Vec<ChatMessage>,
    /// Proposer text as shown to the model; only ever appended to, so each step's prompt
    /// starts with the previous one's.
    body: String,
    /// The source whose text `body` ends with (`Layout::Arrival`), so consecutive chunks
    /// join one section.
    last_source: Option<usize>,
    sources: Vec<SourceState>,
    new_bytes: usize,
    steps: u32,
    warmed: bool,
    done: bool,
    first_step_chars: usize,
    /// The first step also waits until every source has spoken (`first-step-sources =
    /// "all"`; default `"any"`).
    wait_for_all: bool,
    first_step_tokens: u32,
    opening_tokens: u32,
    step_chars: usize,
    step_tokens: u32,
    final_tokens: u32,
    source_chars: Option<usize>,
}

impl Moa {
    /// Moves held text into the body, one section per source with news, in source order.
    fn flush(&mut self) {
        for state in &mut self.sources {
            if state.pending.is_empty() {
                continue;
            }
            self.body.push_str("\n\n### ");
            self.body.push_str(&state.source.label);
            if state.shown {
                self.body.push_str(" (continued)");
            }
            self.body.push('\n');
            self.body.push_str(&std::mem::take(&mut state.pending));
            state.shown = true;
        }
    }

    fn step(&mut self, is_final: bool) -> Step {
        self.flush();
        self.new_bytes = 0;
        self.steps += 1;
        let mut messages = self.head.clone();
        let last = messages.len() - 1;
        messages[last].content.push_str(&self.body);
        let max_tokens = if is_final {
            self.final_tokens
        } else if self.steps == 1 && self.first_step_tokens > 0 {
            self.first_step_tokens
        } else {
            self.step_tokens
        };
        Step {
            messages,
            max_tokens,
            final_: is_final,
        }
    }

    /// Whether the first staircase step may come: every source has spoken or finished,
    /// and enough text is there to carry meaning.
    fn first_step_due(&self) -> bool {
        self.new_bytes > 0
            && self.new_bytes >= self.first_step_chars
            && (!self.wait_for_all || self.sources.iter().all(|s| s.finished || s.bytes > 0))
    }
}

impl Aggregator for Moa {
    fn new(conversation: Vec<ChatMessage>, sources: Vec<Source>, mode: StreamMode) -> Self {
        let query = conversation
            .iter()
            .rev()
            .find(|m| matches!(m.role, Speaker::User))
            .map(|m| m.content.clone())
            .unwrap_or_default();
        let head = vec![
            ChatMessage::new(Speaker::System, INSTRUCTION),
            ChatMessage::new(Speaker::User, format!("{query}\n\nResponses from models:")),
        ];
        let layout = match host::config("layout").as_deref() {
            Some("step") => Layout::Step,
            _ => Layout::Arrival,
        };
        let opening_tokens = config_or("opening-tokens", DEFAULT_OPENING_TOKENS);
        Moa {
            mode,
            layout,
            head,
            body: String::new(),
            last_source: None,
            sources: sources
                .into_iter()
                .map(|source| SourceState {
                    source,
                    bytes: 0,
                    finished: false,
                    pending: String::new(),
                    shown: false,
                })
                .collect(),
            new_bytes: 0,
            steps: 0,
            warmed: !config_or("warm-up", true) && opening_tokens == 0,
            done: false,
            first_step_chars: config_or("first-step-chars", DEFAULT_FIRST_STEP_CHARS),
            wait_for_all: host::config("first-step-sources").as_deref() == Some("all"),
            first_step_tokens: config_or("first-step-tokens", DEFAULT_FIRST_STEP_TOKENS),
            opening_tokens,
            step_chars: config_or("step-chars", DEFAULT_STEP_CHARS),
            step_tokens: config_or("step-tokens", DEFAULT_STEP_TOKENS),
            final_tokens: config_or("final-tokens", DEFAULT_FINAL_TOKENS),
            source_chars: host::config("source-chars").and_then(|v| v.parse().ok()),
        }
    }

    fn push(&mut self, source_id: &str, text: &str) -> Demand {
        let Some(index) = self.sources.iter().position(|s| s.source.id == source_id) else {
            host::log(
                host::LogLevel::Warn,
                &format!("chunk from unknown source {source_id}"),
            );
            return Demand::Enough;
        };
        match self.layout {
            Layout::Step => self.sources[index].pending.push_str(text),
            Layout::Arrival => {
                if self.last_source != Some(index) {
                    self.body.push_str("\n\n### ");
                    self.body.push_str(&self.sources[index].source.label);
                    self.body.push('\n');
                    self.last_source = Some(index);
                }
                self.body.push_str(text);
            }
        }
        self.new_bytes += text.len();
        let state = &mut self.sources[index];
        state.bytes += text.len();
        match self.source_chars {
            Some(limit) if state.bytes >= limit => Demand::Enough,
            _ => Demand::More,
        }
    }

    fn finish(&mut self, source_id: &str) {
        if let Some(state) = self.sources.iter_mut().find(|s| s.source.id == source_id) {
            state.finished = true;
        }
    }

    fn next_step(&mut self) -> Option<Step> {
        if self.done {
            return None;
        }
        if !self.warmed {
            // The head is known before any proposer speaks: have the host prefill it while
            // they do (a non-final step of 0 tokens is a warm-up), or write the opening from
            // it. The opening does not count as a step: the first-step rules apply after it.
            self.warmed = true;
            let opening = matches!(self.mode, StreamMode::Staircase) && self.opening_tokens > 0;
            return Some(Step {
                messages: self.head.clone(),
                max_tokens: if opening { self.opening_tokens } else { 0 },
                final_: false,
            });
        }
        if self.sources.iter().all(|s| s.finished) {
            self.done = true;
            return Some(self.step(true));
        }
        let due = match self.mode {
            StreamMode::Layered => false,
            StreamMode::Staircase if self.steps == 0 => self.first_step_due(),
            StreamMode::Staircase => self.new_bytes >= self.step_chars,
        };
        due.then(|| self.step(false))
    }
}

fn config_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    host::config(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

staircase_sdk::export_aggregator!(Moa);
