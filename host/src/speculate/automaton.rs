//! A suffix automaton over token ids, extended online, that answers "what is the longest
//! suffix of this context seen before, and what usually came next?".
//!
//! Construction is the classic online algorithm (amortised O(1) states and transitions per
//! token). Occurrence counts and the most recent end position of every state are kept exact by
//! [`OccurrenceTree`] in amortised O(log n) per token, so a draft can follow the most frequent
//! continuation and break ties towards the most recent one. The automaton never forgets;
//! bounded memory is the caller's job (see `sources::SessionStore`).

use std::collections::HashMap;

use super::linkcut::{OccurrenceTree, Occurrences};
use crate::token::TokenId;

/// Index of a state; 0 is the root (the empty string).
pub type StateId = u32;

const ROOT: StateId = 0;
const NO_LINK: StateId = StateId::MAX;

/// Out-degree above which a state's transitions move from a scanned list to a hash map.
/// Most states have one or two continuations; the root and a few hubs have thousands.
const SMALL_TRANSITIONS: usize = 8;

#[derive(Clone, Debug)]
enum Transitions {
    Small(Vec<(TokenId, StateId)>),
    Large(HashMap<TokenId, StateId>),
}

impl Transitions {
    fn get(&self, token: TokenId) -> Option<StateId> {
        match self {
            Self::Small(list) => list.iter().find(|(t, _)| *t == token).map(|&(_, s)| s),
            Self::Large(map) => map.get(&token).copied(),
        }
    }

    fn set(&mut self, token: TokenId, state: StateId) {
        match self {
            Self::Small(list) => {
                if let Some(entry) = list.iter_mut().find(|(t, _)| *t == token) {
                    entry.1 = state;
                } else if list.len() < SMALL_TRANSITIONS {
                    list.push((token, state));
                } else {
                    let mut map: HashMap<TokenId, StateId> = list.drain(..).collect();
                    map.insert(token, state);
                    *self = Self::Large(map);
                }
            }
            Self::Large(map) => {
                map.insert(token, state);
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Self::Small(list) => list.is_empty(),
            Self::Large(map) => map.is_empty(),
        }
    }

    fn for_each(&self, mut f: impl FnMut(TokenId, StateId)) {
        match self {
            Self::Small(list) => list.iter().for_each(|&(t, s)| f(t, s)),
            Self::Large(map) => map.iter().for_each(|(&t, &s)| f(t, s)),
        }
    }
}

#[derive(Clone, Debug)]
struct State {
    /// Length of the longest string of this state.
    len: u32,
    /// Suffix link: the state of the longest suffix with a different set of end positions.
    link: StateId,
    next: Transitions,
}

/// Where a context's suffix currently sits in an automaton.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Match {
    pub state: StateId,
    /// Length of the matched suffix of the context.
    pub len: u32,
}

impl Match {
    /// The empty match (the root).
    pub const EMPTY: Match = Match {
        state: ROOT,
        len: 0,
    };
}

/// A suffix automaton over one token string that grows at its end.
#[derive(Clone, Debug)]
pub struct SuffixAutomaton {
    states: Vec<State>,
    last: StateId,
    tokens: usize,
    occurrences: OccurrenceTree,
}

impl Default for SuffixAutomaton {
    fn default() -> Self {
        let mut occurrences = OccurrenceTree::default();
        occurrences.add_node(ROOT, Occurrences::default());
        Self {
            states: vec![State {
                len: 0,
                link: NO_LINK,
                next: Transitions::Small(Vec::new()),
            }],
            last: ROOT,
            tokens: 0,
            occurrences,
        }
    }
}

impl SuffixAutomaton {
    pub fn new() -> Self {
        Self::default()
    }

    /// An automaton over `tokens`.
    pub fn from_tokens(tokens: &[TokenId]) -> Self {
        let mut automaton = Self::new();
        automaton.extend(tokens);
        automaton
    }

    /// Number of tokens seen.
    pub fn len(&self) -> usize {
        self.tokens
    }

    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    pub fn extend(&mut self, tokens: &[TokenId]) {
        for &token in tokens {
            self.push(token);
        }
    }

    /// Appends one token (the classic online construction).
    pub fn push(&mut self, token: TokenId) {
        self.tokens += 1;
        let end = u32::try_from(self.tokens).unwrap_or(u32::MAX);
        let cur = self.add_state(
            self.states[self.last as usize].len + 1,
            Transitions::Small(Vec::new()),
            Occurrences::default(),
        );
        let mut p = self.last;
        while p != NO_LINK && self.states[p as usize].next.get(token).is_none() {
            self.states[p as usize].next.set(token, cur);
            p = self.states[p as usize].link;
        }
        let link = if p == NO_LINK {
            ROOT
        } else {
            // `p` had a transition on `token` by the loop's exit condition.
            let q = self.states[p as usize].next.get(token).unwrap_or(ROOT);
            if self.states[p as usize].len + 1 == self.states[q as usize].len {
                q
            } else {
                let clone = self.split(p, q, token);
                self.states[q as usize].link = clone;
                clone
            }
        };
        self.states[cur as usize].link = link;
        self.occurrences.link(cur, link);
        self.occurrences.add_to_root_path(
            cur,
            Occurrences {
                count: 1,
                last_end: end,
            },
        );
        self.last = cur;
    }

    /// Clones `q` into a state of length `len(p) + 1` and redirects `p`'s suffix path to it.
    fn split(&mut self, mut p: StateId, q: StateId, token: TokenId) -> StateId {
        let q_state = &self.states[q as usize];
        let (next, q_link) = (q_state.next.clone(), q_state.link);
        let occurrences = self.occurrences.get(q);
        let clone = self.add_state(self.states[p as usize].len + 1, next, occurrences);
        self.states[clone as usize].link = q_link;
        self.occurrences.link(clone, q_link);
        self.occurrences.cut(q);
        self.occurrences.link(q, clone);
        while p != NO_LINK && self.states[p as usize].next.get(token) == Some(q) {
            self.states[p as usize].next.set(token, clone);
            p = self.states[p as usize].link;
        }
        clone
    }

    fn add_state(&mut self, len: u32, next: Transitions, occurrences: Occurrences) -> StateId {
        // State count is at most 2n; n is bounded by memory long before u32::MAX.
        let id = StateId::try_from(self.states.len()).unwrap_or(StateId::MAX - 1);
        self.states.push(State {
            len,
            link: NO_LINK,
            next,
        });
        self.occurrences.add_node(id, occurrences);
        id
    }

    /// Moves `m` one token further along a context (standard matching statistics).
    pub fn advance(&self, m: &mut Match, token: TokenId) {
        loop {
            if let Some(next) = self.states[m.state as usize].next.get(token) {
                m.state = next;
                m.len += 1;
                return;
            }
            if m.state == ROOT {
                *m = Match::EMPTY;
                return;
            }
            m.state = self.states[m.state as usize].link;
            m.len = self.states[m.state as usize].len;
        }
    }

    /// The match of the longest suffix of `context` that occurs in this automaton's text.
    pub fn match_suffix(&self, context: &[TokenId]) -> Match {
        let mut m = Match::EMPTY;
        for &token in context {
            self.advance(&mut m, token);
        }
        m
    }

    /// The match of the longest suffix of this automaton's own text that occurred before
    /// (ending earlier), i.e. that has a continuation.
    pub fn match_own_suffix(&self) -> Match {
        self.with_continuation(Match {
            state: self.last,
            len: u32::try_from(self.tokens).unwrap_or(u32::MAX),
        })
    }

    /// Shortens `m` until its state has at least one continuation. Only the state of the
    /// whole text has none, so this is at most one step.
    pub fn with_continuation(&self, mut m: Match) -> Match {
        while m.state != ROOT && self.states[m.state as usize].next.is_empty() {
            m.state = self.states[m.state as usize].link;
            m.len = self.states[m.state as usize].len;
        }
        m
    }

    /// The continuation of `m`: the token that most often followed it, ties to the one seen
    /// most recently, with the state after it. `None` when nothing ever followed it.
    pub fn best_continuation(&mut self, m: Match) -> Option<(TokenId, StateId)> {
        let mut targets = Vec::new();
        self.states[m.state as usize]
            .next
            .for_each(|token, state| targets.push((token, state)));
        let mut best: Option<(Occurrences, TokenId, StateId)> = None;
        for (token, state) in targets {
            let occ = self.occurrences.get(state);
            let better = match &best {
                None => true,
                Some((b, _, _)) => (occ.count, occ.last_end) > (b.count, b.last_end),
            };
            if better {
                best = Some((occ, token, state));
            }
        }
        best.map(|(_, token, state)| (token, state))
    }

    /// Up to `max_len` tokens following `m`, each the best continuation of the string so far.
    /// Stops at `stop` tokens (session separators) or where the text never continued.
    pub fn draft(
        &mut self,
        m: Match,
        max_len: usize,
        stop: impl Fn(TokenId) -> bool,
    ) -> Vec<TokenId> {
        let mut draft = Vec::with_capacity(max_len);
        let mut m = m;
        while draft.len() < max_len {
            let Some((token, state)) = self.best_continuation(m) else {
                break;
            };
            if stop(token) {
                break;
            }
            draft.push(token);
            m = Match {
                state,
                len: m.len + 1,
            };
        }
        draft
    }

    /// Occurrence count and most recent end of the strings of `state` (for tests and stats).
    pub fn occurrences(&mut self, state: StateId) -> Occurrences {
        self.occurrences.get(state)
    }

    /// Number of states (at most twice the tokens).
    pub fn state_count(&self) -> usize {
        self.states.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<TokenId> {
        s.bytes().map(|b| TokenId(i32::from(b))).collect()
    }

    #[test]
    fn own_suffix_and_continuation() {
        // "abcab": longest earlier suffix is "ab", followed once by 'c'.
        let mut sam = SuffixAutomaton::from_tokens(&toks("abcab"));
        let m = sam.match_own_suffix();
        assert_eq!(m.len, 2);
        assert_eq!(sam.draft(m, 3, |_| false), toks("cab"));
    }

    #[test]
    fn most_frequent_then_most_recent() {
        // After "x": 'a' twice, 'b' once -> 'a'. After "y": 'c' and 'd' once each -> 'd' (recent).
        let mut sam = SuffixAutomaton::from_tokens(&toks("xa.xb.xa.yc.yd."));
        let m = sam.match_suffix(&toks("x"));
        assert_eq!(
            sam.best_continuation(m).map(|c| c.0),
            Some(TokenId(i32::from(b'a')))
        );
        let m = sam.match_suffix(&toks("y"));
        assert_eq!(
            sam.best_continuation(m).map(|c| c.0),
            Some(TokenId(i32::from(b'd')))
        );
    }

    #[test]
    fn counts_on_repetitive_text() {
        let mut sam = SuffixAutomaton::from_tokens(&toks(&"a".repeat(50)));
        let m = sam.match_suffix(&toks("aaa"));
        assert_eq!(sam.occurrences(m.state).count, 48);
        assert_eq!(sam.occurrences(m.state).last_end, 50);
    }
}
