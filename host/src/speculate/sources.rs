//! The two draft sources that outlive a single token stream: past sessions of the engine and
//! the pipeline feed (other agents' output handed to a request while it runs).
//!
//! Neither touches the model: text from the pipeline is tokenised through a closure the
//! engine supplies. Past sessions are kept per [`CacheNamespace`] (a server's tenant): a
//! sequence drafts only from its own namespace's sessions, so no draft, acceptance or speed
//! reflects another tenant's text.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use super::automaton::{Match, SuffixAutomaton};
use crate::cache::CacheNamespace;
use crate::token::TokenId;

/// Separates sessions inside one automaton. Real token ids are never negative, so no context
/// matches across it, and drafts stop at it.
pub const SEPARATOR: TokenId = TokenId(-1);

/// Number of automata the session budget is split into. Eviction drops the oldest one whole
/// (a suffix automaton cannot forget a prefix); four keeps the overshoot at a quarter of the
/// budget and the per-draft matching cost at four short walks.
const SESSION_SEGMENTS: usize = 4;

/// Default token budget for past sessions: ~130k tokens is about 25 MB of automaton and
/// covers hours of agent traffic on this CPU (~30 tokens/s).
pub const DEFAULT_SESSION_BUDGET: usize = 131_072;

/// Past requests' prompts and outputs, bounded by a token budget, oldest evicted.
/// Owned by the engine thread (one per engine); queries take `&mut` because they update the
/// automata's occurrence trees. Each segment belongs to one namespace; the budget is shared
/// (the oldest segment goes, whoever it belongs to).
#[derive(Debug)]
pub struct SessionStore {
    /// Oldest first.
    segments: VecDeque<(CacheNamespace, SuffixAutomaton)>,
    budget: usize,
}

impl Default for SessionStore {
    fn default() -> Self {
        Self::new(DEFAULT_SESSION_BUDGET)
    }
}

impl SessionStore {
    /// A store holding about `budget` tokens (within one segment, a quarter of it).
    pub fn new(budget: usize) -> Self {
        Self {
            segments: VecDeque::new(),
            budget,
        }
    }

    /// Tokens held (separators included).
    pub fn tokens(&self) -> usize {
        self.segments.iter().map(|(_, a)| a.len()).sum()
    }

    /// Remembers one finished session (its prompt and output) of `namespace`.
    pub fn add_session(&mut self, namespace: &CacheNamespace, tokens: &[TokenId]) {
        if self.budget == 0 || tokens.is_empty() {
            return;
        }
        let tokens = &tokens[tokens.len().saturating_sub(self.budget)..];
        let segment_budget = (self.budget / SESSION_SEGMENTS).max(1);
        // The namespace's newest segment while it has room, else a new one.
        let open = self
            .segments
            .iter()
            .rposition(|(ns, _)| ns == namespace)
            .filter(|&i| self.segments[i].1.len() < segment_budget);
        let open = match open {
            Some(i) => i,
            None => {
                self.segments
                    .push_back((namespace.clone(), SuffixAutomaton::new()));
                self.segments.len() - 1
            }
        };
        let automaton = &mut self.segments[open].1;
        automaton.push(SEPARATOR);
        automaton.extend(tokens);
        while self.tokens() > self.budget && self.segments.len() > 1 {
            self.segments.pop_front();
        }
    }

    /// The longest match (at least `min_len`) of a suffix of `window` over the segments of
    /// `namespace`, with a draft of up to `max_len` tokens from it.
    pub(super) fn best_draft(
        &mut self,
        namespace: &CacheNamespace,
        window: &[TokenId],
        min_len: u32,
        max_len: usize,
    ) -> Option<(Match, Vec<TokenId>)> {
        // Newest first, so equal matches prefer recent sessions.
        let own = self
            .segments
            .iter_mut()
            .rev()
            .filter(|(ns, _)| ns == namespace)
            .map(|(_, a)| a);
        best_draft_of(own, window, min_len, max_len)
    }
}

pub(super) fn is_separator(token: TokenId) -> bool {
    token.0 < 0
}

/// The longest match (at least `min_len`, earlier automata winning ties) of a suffix of
/// `window` in any of `automata` that has a non-empty draft, with that draft.
fn best_draft_of<'a>(
    automata: impl Iterator<Item = &'a mut SuffixAutomaton>,
    window: &[TokenId],
    min_len: u32,
    max_len: usize,
) -> Option<(Match, Vec<TokenId>)> {
    let mut best: Option<(Match, Vec<TokenId>)> = None;
    for automaton in automata {
        let m = automaton.with_continuation(automaton.match_suffix(window));
        if best.as_ref().is_some_and(|(b, _)| b.len >= m.len) || m.len < min_len.max(1) {
            continue;
        }
        let draft = automaton.draft(m, max_len, is_separator);
        if !draft.is_empty() {
            best = Some((m, draft));
        }
    }
    best
}

/// One piece a pipeline pushed into a stream.
#[derive(Clone, Debug)]
enum Piece {
    Text(String),
    Tokens(Vec<TokenId>),
    End,
}

/// A handle through which a pipeline hands other agents' output to a running request, so the
/// request can draft from it (an aggregator copying its proposers). Cheap to clone; every
/// clone sees the same streams. Streams are named (one per proposer) and kept whole, so
/// several requests (successive aggregator steps) can each read them from the start.
#[derive(Clone, Debug, Default)]
pub struct DraftFeed {
    streams: Arc<Mutex<HashMap<String, Vec<Piece>>>>,
}

impl DraftFeed {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<Piece>>> {
        // The map is append-only, so a panic elsewhere cannot leave it inconsistent.
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends text generated by `stream` (tokenised by the reading engine).
    pub fn push_text(&self, stream: &str, text: &str) {
        if !text.is_empty() {
            self.push(stream, Piece::Text(text.to_owned()));
        }
    }

    /// Appends tokens generated by `stream` (ids of the reading model's vocabulary).
    pub fn push_tokens(&self, stream: &str, tokens: &[TokenId]) {
        if !tokens.is_empty() {
            self.push(stream, Piece::Tokens(tokens.to_vec()));
        }
    }

    /// Marks `stream` complete, so its last partial word is tokenised too.
    pub fn finish(&self, stream: &str) {
        self.push(stream, Piece::End);
    }

    fn push(&self, stream: &str, piece: Piece) {
        self.lock()
            .entry(stream.to_owned())
            .or_default()
            .push(piece);
    }

    /// Pieces of each stream from `read[stream]` on, advancing `read`.
    fn take_new(&self, read: &mut HashMap<String, usize>) -> Vec<(String, Vec<Piece>)> {
        let streams = self.lock();
        let mut out = Vec::new();
        for (name, pieces) in streams.iter() {
            let done = read.entry(name.clone()).or_insert(0);
            if *done < pieces.len() {
                out.push((name.clone(), pieces[*done..].to_vec()));
                *done = pieces.len();
            }
        }
        out
    }
}

/// One request's view of a [`DraftFeed`]: an automaton per stream, fed as pieces arrive.
#[derive(Debug)]
pub(super) struct PipelineSource {
    feed: DraftFeed,
    read: HashMap<String, usize>,
    streams: HashMap<String, StreamState>,
}

#[derive(Debug, Default)]
struct StreamState {
    automaton: SuffixAutomaton,
    /// Text not yet tokenised: the tail after the last whitespace, which may still grow
    /// into a longer word (tokenising it now would split a token the model would not split).
    pending: String,
}

impl PipelineSource {
    pub(super) fn new(feed: DraftFeed) -> Self {
        Self {
            feed,
            read: HashMap::new(),
            streams: HashMap::new(),
        }
    }

    /// Brings the automata up to date with the feed.
    pub(super) fn sync(&mut self, tokenize: &mut dyn FnMut(&str) -> Vec<TokenId>) {
        for (name, pieces) in self.feed.take_new(&mut self.read) {
            let state = self.streams.entry(name).or_default();
            for piece in pieces {
                match piece {
                    Piece::Text(text) => {
                        state.pending.push_str(&text);
                        // Cut before the last whitespace: GPT-2 style and SentencePiece
                        // vocabularies start words with their leading space.
                        if let Some(cut) =
                            state.pending.rfind(char::is_whitespace).filter(|&c| c > 0)
                        {
                            let rest = state.pending.split_off(cut);
                            let ready = std::mem::replace(&mut state.pending, rest);
                            state.automaton.extend(&tokenize(&ready));
                        }
                    }
                    Piece::Tokens(tokens) => {
                        state.flush(tokenize);
                        state.automaton.extend(&tokens);
                    }
                    Piece::End => state.flush(tokenize),
                }
            }
        }
    }

    /// The longest match (at least `min_len`) of a suffix of `window` over all streams, with
    /// its draft.
    pub(super) fn best_draft(
        &mut self,
        window: &[TokenId],
        min_len: u32,
        max_len: usize,
    ) -> Option<(Match, Vec<TokenId>)> {
        let automata = self.streams.values_mut().map(|s| &mut s.automaton);
        best_draft_of(automata, window, min_len, max_len)
    }
}

impl StreamState {
    fn flush(&mut self, tokenize: &mut dyn FnMut(&str) -> Vec<TokenId>) {
        if !self.pending.is_empty() {
            let text = std::mem::take(&mut self.pending);
            self.automaton.extend(&tokenize(&text));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<TokenId> {
        s.bytes().map(|b| TokenId(i32::from(b))).collect()
    }

    #[test]
    fn sessions_are_bounded_and_evict_the_oldest() {
        let ns = CacheNamespace::default();
        let mut store = SessionStore::new(100);
        store.add_session(&ns, &toks("the quick brown fox"));
        assert!(store.best_draft(&ns, &toks("the quick"), 1, 6).is_some());
        for i in 0..20 {
            store.add_session(&ns, &toks(&format!("filler session number {i:03}")));
        }
        assert!(store.tokens() <= 100 + 100 / SESSION_SEGMENTS + 30);
        let m = store.best_draft(&ns, &toks("the quick"), 1, 6);
        assert!(m.is_none_or(|(m, _)| m.len < 5), "oldest session evicted");
        let (m, draft) = store
            .best_draft(&ns, &toks("session number 01"), 1, 4)
            .unwrap();
        assert_eq!(m.len, 17);
        assert_eq!(
            draft.len(),
            1,
            "the newest session ends after one more digit"
        );
    }

    #[test]
    fn drafts_stop_at_session_boundaries() {
        let ns = CacheNamespace::default();
        let mut store = SessionStore::new(1000);
        store.add_session(&ns, &toks("abc xyz"));
        store.add_session(&ns, &toks("abc def"));
        let (m, draft) = store.best_draft(&ns, &toks("abc"), 1, 8).unwrap();
        assert_eq!(
            (m.len, draft),
            (3, toks(" def")),
            "ties go to the most recent session"
        );
        assert!(
            store.best_draft(&ns, &toks("xyz"), 1, 8).is_none(),
            "nothing follows xyz but a boundary"
        );
    }

    #[test]
    fn feed_text_is_tokenised_at_word_boundaries() {
        let feed = DraftFeed::new();
        let mut source = PipelineSource::new(feed.clone());
        let mut calls = Vec::new();
        let mut tokenize = |s: &str| {
            calls.push(s.to_owned());
            toks(s)
        };
        feed.push_text("a", "hello wor");
        source.sync(&mut tokenize);
        feed.push_text("a", "ld and more");
        feed.finish("a");
        source.sync(&mut tokenize);
        assert_eq!(calls, vec!["hello", " world and", " more"]);
        let (m, draft) = source.best_draft(&toks("xx world"), 1, 4).unwrap();
        assert_eq!(m.len, 6);
        assert_eq!(draft, toks(" and"));
    }

    #[test]
    fn a_namespace_drafts_only_from_its_own_sessions() {
        let (a, b) = (CacheNamespace::new("a"), CacheNamespace::new("b"));
        let mut store = SessionStore::new(1000);
        store.add_session(&a, &toks("the secret pin is 4711"));
        assert!(
            store
                .best_draft(&b, &toks("the secret pin is"), 1, 8)
                .is_none(),
            "another namespace's session never drafts"
        );
        let (m, draft) = store
            .best_draft(&a, &toks("the secret pin is"), 1, 8)
            .unwrap();
        assert_eq!((m.len, draft), (17, toks(" 4711")));
        store.add_session(&b, &toks("the secret pin is 0000"));
        let (_, draft) = store
            .best_draft(&b, &toks("the secret pin is"), 1, 8)
            .unwrap();
        assert_eq!(draft, toks(" 0000"));
        let (_, draft) = store
            .best_draft(&a, &toks("the secret pin is"), 1, 8)
            .unwrap();
        assert_eq!(
            draft,
            toks(" 4711"),
            "b's newer session does not shadow a's"
        );
    }
}
