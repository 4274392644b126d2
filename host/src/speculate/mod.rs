//! Suffix-automaton speculative decoding: drafts from what this request, its pipeline and
//! past sessions already said, so one batched forward pass can confirm several tokens.
//!
//! The engine keeps a [`Speculator`] per sequence and a [`SessionStore`] per engine. Each
//! decode step it asks [`Speculator::draft`] for tokens, decodes them in one batch with logits
//! at every position, decides with [`verify`] which the model
//! would have produced itself, removes the rest from its KV cache, and reports the outcome
//! with [`Speculator::record`]. Drafting is lossless by construction: emitted tokens are
//! exactly those plain decoding would emit (greedy) or have exactly its distribution
//! (sampling). The draft length adapts to match length, recent acceptance and the width of
//! the step ([`DraftController`]), and drops to zero where drafting would cost more than it
//! wins. This module proposes and decides; it must not touch the model or its KV cache
//! (`crate::bench` measures it through whole engines, like any caller).

mod accept;
mod adaptive;
mod automaton;
mod linkcut;
mod sources;
mod stats;

pub use accept::{Distribution, SplitMix64, Verdict, verify, verify_sampled};
pub use adaptive::{ControllerConfig, CostModel, DraftController};
pub use automaton::{Match, StateId, SuffixAutomaton};
pub use linkcut::Occurrences;
pub use sources::{DEFAULT_SESSION_BUDGET, DraftFeed, SEPARATOR, SessionStore};
pub use stats::{DraftSource, SourceStats, SpeculationStats};

use serde::{Deserialize, Serialize};
use sources::PipelineSource;

use crate::cache::CacheNamespace;
use crate::token::TokenId;

/// Context tokens matched against the pipeline and session automata at each draft. Matches
/// longer than this are all equally "long" for choosing a continuation; 64 keeps a match
/// walk to about a microsecond.
const MATCH_WINDOW: usize = 64;

/// Engine-wide speculation settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpeculationConfig {
    pub enabled: bool,
    pub controller: ControllerConfig,
    /// Forward cost curve of the loaded model (measured by `staircase bench speculation`).
    pub cost: CostModel,
    /// Tokens of past sessions kept for drafting; 0 disables that source.
    pub session_budget: usize,
}

impl Default for SpeculationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            controller: ControllerConfig::default(),
            cost: CostModel::default(),
            session_budget: DEFAULT_SESSION_BUDGET,
        }
    }
}

/// Draft tokens proposed for one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draft {
    pub tokens: Vec<TokenId>,
    pub source: DraftSource,
    /// Length of the context suffix the draft continues.
    pub match_len: u32,
}

/// Speculation state of one sequence.
#[derive(Debug)]
pub struct Speculator {
    enabled: bool,
    request: SuffixAutomaton,
    context: Vec<TokenId>,
    pipeline: Option<PipelineSource>,
    controller: DraftController,
    stats: SpeculationStats,
    /// The draft that was on offer when the controller chose not to draft, checked token by
    /// token against what the following plain steps produce, as a real draft would have been
    /// (see `DraftController::record_shadow`). Emptied at its first miss.
    shadow: Vec<TokenId>,
    /// Match length behind the shadow's next token.
    shadow_match: u32,
    /// The past sessions this sequence drafts from and joins (its request's namespace).
    namespace: CacheNamespace,
}

impl Speculator {
    /// A speculator for a new sequence; `feed` is the request's pipeline feed, if any.
    pub fn new(config: &SpeculationConfig, feed: Option<DraftFeed>) -> Self {
        Self {
            enabled: config.enabled,
            request: SuffixAutomaton::new(),
            context: Vec::new(),
            pipeline: feed.map(PipelineSource::new),
            controller: DraftController::new(config.controller.clone(), config.cost.clone()),
            stats: SpeculationStats::default(),
            shadow: Vec::new(),
            shadow_match: 0,
            namespace: CacheNamespace::default(),
        }
    }

    /// Drafts from and joins only the past sessions of `namespace`, so one tenant's drafts
    /// (and their acceptance counters) never come from another's text.
    pub fn in_namespace(mut self, namespace: CacheNamespace) -> Self {
        self.namespace = namespace;
        self
    }

    /// Appends tokens that are now part of the sequence: the prompt, then every accepted
    /// token (never a rejected draft token).
    pub fn observe(&mut self, tokens: &[TokenId]) {
        self.request.extend(tokens);
        self.context.extend_from_slice(tokens);
    }

    /// The sequence so far, as observed.
    pub fn context(&self) -> &[TokenId] {
        &self.context
    }

    /// Reads what the pipeline fed since the last call; `tokenize` turns text into tokens of
    /// this sequence's model. Cheap when nothing is new.
    pub fn sync_pipeline(&mut self, tokenize: &mut dyn FnMut(&str) -> Vec<TokenId>) {
        if let Some(pipeline) = &mut self.pipeline {
            pipeline.sync(tokenize);
        }
    }

    /// Draft tokens for the next step, or `None` to decode plainly. `batch_tokens` is how
    /// many tokens the step holds without this draft (this sequence's own token included);
    /// `max_len` caps the draft (remaining output budget and context room).
    pub fn draft(
        &mut self,
        sessions: Option<&mut SessionStore>,
        batch_tokens: usize,
        max_len: usize,
    ) -> Option<Draft> {
        let cap = max_len.min(self.controller.config().max_draft);
        if !self.enabled || cap == 0 {
            return None;
        }
        let min_match = self.controller.config().min_match;
        let window = &self.context[self.context.len().saturating_sub(MATCH_WINDOW)..];
        // The longest match wins; on equal lengths the request's own text, then the pipeline,
        // then past sessions (closest to this sequence first).
        let mut best: Option<(Match, Vec<TokenId>, DraftSource)> = None;
        let own = self.request.match_own_suffix();
        if own.len >= min_match {
            let tokens = self.request.draft(own, cap, sources::is_separator);
            if !tokens.is_empty() {
                best = Some((own, tokens, DraftSource::Request));
            }
        }
        let better = |best: &Option<(Match, Vec<TokenId>, DraftSource)>, m: &Match| {
            best.as_ref().is_none_or(|b| m.len > b.0.len)
        };
        if let Some((m, tokens)) = self
            .pipeline
            .as_mut()
            .and_then(|p| p.best_draft(window, min_match, cap))
            && better(&best, &m)
        {
            best = Some((m, tokens, DraftSource::Pipeline));
        }
        if let Some((m, tokens)) =
            sessions.and_then(|s| s.best_draft(&self.namespace, window, min_match, cap))
            && better(&best, &m)
        {
            best = Some((m, tokens, DraftSource::Sessions));
        }
        let (m, available) = best
            .as_ref()
            .map_or((0, 0), |(m, tokens, _)| (m.len, tokens.len()));
        let k = self.controller.choose(m, available, batch_tokens);
        tracing::trace!(
            match_len = m,
            available,
            batch_tokens,
            acceptance = self.controller.acceptance(m),
            k,
            "draft decision"
        );
        if k > 0 {
            self.shadow.clear();
        } else if self.shadow.is_empty()
            && let Some((_, tokens, _)) = &best
        {
            // Reversed, so the next token to check is at the end.
            self.shadow = tokens.iter().rev().copied().collect();
            self.shadow_match = m;
        }
        let (m, mut tokens, source) = best.filter(|_| k > 0)?;
        tokens.truncate(k);
        Some(Draft {
            tokens,
            source,
            match_len: m.len,
        })
    }

    /// Records one decode step: the draft it verified (`None` for a plain step), how many of
    /// its tokens were accepted, and the tokens emitted (which are observed here).
    pub fn record(&mut self, draft: Option<&Draft>, accepted: usize, emitted: &[TokenId]) {
        if let Some(d) = draft {
            self.controller
                .record(d.match_len, d.tokens.len(), accepted);
        } else if let (Some(&expected), Some(&first)) = (self.shadow.last(), emitted.first()) {
            let hit = expected == first;
            self.controller.record_shadow(self.shadow_match, hit);
            if hit {
                self.shadow.pop();
                self.shadow_match += 1;
            } else {
                self.shadow.clear();
            }
        }
        let drafted = draft.map_or(0, |d| d.tokens.len());
        self.stats
            .record_step(draft.map(|d| d.source), drafted, accepted, emitted.len());
        self.observe(emitted);
    }

    pub fn stats(&self) -> &SpeculationStats {
        &self.stats
    }

    /// Ends the sequence: its text joins the past sessions; returns its counters.
    pub fn finish(self, sessions: Option<&mut SessionStore>) -> SpeculationStats {
        if let Some(store) = sessions {
            store.add_session(&self.namespace, &self.context);
        }
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<TokenId> {
        s.bytes().map(|b| TokenId(i32::from(b))).collect()
    }

    #[test]
    fn drafts_from_the_longest_source() {
        // A cheap verifier, so the prior alone makes drafting worthwhile.
        let config = SpeculationConfig {
            cost: CostModel {
                points: vec![(1, 1.0), (32, 2.0)],
            },
            ..SpeculationConfig::default()
        };
        let feed = DraftFeed::new();
        feed.push_tokens("p1", &toks("the answer is forty two because"));
        let mut spec = Speculator::new(&config, Some(feed));
        spec.sync_pipeline(&mut |s: &str| toks(s));
        spec.observe(&toks("so: the answer is"));
        let d = spec.draft(None, 1, 16).unwrap();
        assert_eq!(d.source, DraftSource::Pipeline);
        // The controller picks the length (bounded by what the expected acceptance pays for).
        assert!(d.tokens.len() >= 3, "{:?}", d.tokens);
        assert!(toks(" forty two because").starts_with(&d.tokens));
        spec.record(Some(&d), 2, &d.tokens[..3]);
        assert_eq!(
            spec.stats().by_source[&DraftSource::Pipeline].accepted_tokens,
            2
        );
    }

    #[test]
    fn shadow_hits_switch_drafting_on_while_copying() {
        let mut spec = Speculator::new(&SpeculationConfig::default(), None);
        let phrase = toks(" the quick brown fox jumps over the lazy dog");
        spec.observe(&toks("intro:"));
        spec.observe(&phrase);
        spec.observe(&toks(" and then"));
        // Plain steps copy the phrase; each offers a draft the controller declines at first.
        let mut drafted_at = None;
        for (i, &token) in phrase.iter().enumerate() {
            if let Some(d) = spec.draft(None, 1, 16) {
                assert_eq!(d.source, DraftSource::Request);
                assert!(phrase[i..].starts_with(&d.tokens));
                drafted_at = Some(i);
                break;
            }
            spec.record(None, 0, &[token]);
        }
        let at = drafted_at.expect("copying switched drafting on");
        assert!(at >= 2, "the prior alone never drafts (drafted at {at})");
        assert!(at < 12, "a few free hits suffice (drafted at {at})");
    }

    /// Free writing over a small vocabulary: short chance matches everywhere, longer ones now
    /// and then, and none continues. Each step drafts only if the controller says so, and
    /// a draft is checked against what the text really does next.
    #[test]
    fn never_drafts_on_text_that_never_repeats() {
        let mut rng = SplitMix64::new(0x0dd5_eed5);
        let mut text = |n: usize| -> Vec<TokenId> {
            (0..n)
                .map(|_| TokenId((rng.next_u64() % 40) as i32))
                .collect()
        };
        let prompt = text(300);
        let output = text(3000);
        let mut spec = Speculator::new(&SpeculationConfig::default(), None);
        spec.observe(&prompt);
        let mut at = 0;
        let mut decisions = 0;
        while at < output.len() {
            decisions += 1;
            let draft = spec.draft(None, 1, 32);
            let accepted = draft.as_ref().map_or(0, |d| {
                d.tokens
                    .iter()
                    .zip(&output[at..])
                    .take_while(|(a, b)| a == b)
                    .count()
            });
            let end = (at + accepted + 1).min(output.len());
            spec.record(draft.as_ref(), accepted, &output[at..end]);
            at = end;
        }
        assert_eq!(decisions, output.len());
        assert_eq!(spec.stats().drafted_tokens, 0, "{:?}", spec.stats());
    }

    #[test]
    fn disabled_never_drafts() {
        let config = SpeculationConfig {
            enabled: false,
            ..SpeculationConfig::default()
        };
        let mut spec = Speculator::new(&config, None);
        spec.observe(&toks("abcdefgh abcdefgh abcdefgh"));
        assert!(spec.draft(None, 1, 16).is_none());
    }
}
