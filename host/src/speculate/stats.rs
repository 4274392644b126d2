//! Counters of what speculation did for a request (or, merged, for an engine).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where a draft came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DraftSource {
    /// This request's own prompt and output.
    Request,
    /// Streams of other agents fed through the request (an aggregator's proposers).
    Pipeline,
    /// Earlier requests served by this engine.
    Sessions,
}

/// Drafted and accepted tokens of one source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStats {
    /// Verifications of a draft from this source.
    pub drafts: u64,
    pub drafted_tokens: u64,
    pub accepted_tokens: u64,
}

impl SourceStats {
    /// Accepted share of drafted tokens (0 when nothing was drafted).
    pub fn acceptance_rate(&self) -> f64 {
        ratio(self.accepted_tokens, self.drafted_tokens)
    }
}

/// What speculation did: per request in `Usage`, or merged over many requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpeculationStats {
    /// Forward passes this request took part in while decoding (one per step).
    pub forward_passes: u64,
    /// Tokens emitted by those passes.
    pub emitted_tokens: u64,
    pub drafted_tokens: u64,
    pub accepted_tokens: u64,
    pub by_source: BTreeMap<DraftSource, SourceStats>,
}

impl SpeculationStats {
    /// Records one decode step: `drafted` draft tokens from `source` (0 and `None` for a
    /// plain step), of which `accepted` were accepted, and `emitted` tokens produced.
    pub fn record_step(
        &mut self,
        source: Option<DraftSource>,
        drafted: usize,
        accepted: usize,
        emitted: usize,
    ) {
        self.forward_passes += 1;
        self.emitted_tokens += emitted as u64;
        if let Some(source) = source.filter(|_| drafted > 0) {
            self.drafted_tokens += drafted as u64;
            self.accepted_tokens += accepted as u64;
            let s = self.by_source.entry(source).or_default();
            s.drafts += 1;
            s.drafted_tokens += drafted as u64;
            s.accepted_tokens += accepted as u64;
        }
    }

    /// Accepted share of drafted tokens.
    pub fn acceptance_rate(&self) -> f64 {
        ratio(self.accepted_tokens, self.drafted_tokens)
    }

    /// Tokens emitted per forward pass (1.0 means speculation won nothing).
    pub fn tokens_per_forward(&self) -> f64 {
        ratio(self.emitted_tokens, self.forward_passes)
    }

    /// Adds another request's counters (for engine-wide totals).
    pub fn merge(&mut self, other: &SpeculationStats) {
        self.forward_passes += other.forward_passes;
        self.emitted_tokens += other.emitted_tokens;
        self.drafted_tokens += other.drafted_tokens;
        self.accepted_tokens += other.accepted_tokens;
        for (source, s) in &other.by_source {
            let mine = self.by_source.entry(*source).or_default();
            mine.drafts += s.drafts;
            mine.drafted_tokens += s.drafted_tokens;
            mine.accepted_tokens += s.accepted_tokens;
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_merge() {
        let mut s = SpeculationStats::default();
        s.record_step(Some(DraftSource::Request), 4, 3, 4);
        s.record_step(None, 0, 0, 1);
        assert_eq!(s.tokens_per_forward(), 2.5);
        assert_eq!(s.acceptance_rate(), 0.75);
        let mut total = SpeculationStats::default();
        total.merge(&s);
        total.merge(&s);
        assert_eq!(total.by_source[&DraftSource::Request].drafted_tokens, 8);
        let json = serde_json::to_string(&total).unwrap();
        let back: SpeculationStats = serde_json::from_str(&json).unwrap();
        assert_eq!(back, total);
    }
}
