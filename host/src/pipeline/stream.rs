//! Streaming policy of an edge: how a node's output is cut into chunks for a consumer.
//!
//! `staircase` hands text downstream in chunks whose sizes follow a schedule (small first
//! chunks so the consumer starts early, larger later so it re-prompts less often);
//! `complete` hands the whole output over once, at the end (the classic layered behaviour).
//! This module only cuts text; it must not know about engines, plugins or channels.

use serde::Serialize;

use crate::policy::StreamMode;

/// Chunk sizes used when a pipeline names none. The first chunk is two tokens (~30 ms of
/// decoding on the default model) so an aggregator starts on a proposer's first words: in
/// `staircase bench staircase` it cut time to first token by ~20% against a first chunk of 8.
/// Sizes then grow so a 512-token proposer causes about a dozen pushes, not hundreds.
pub const DEFAULT_CHUNK_SCHEDULE: [u32; 5] = [2, 8, 16, 32, 64];

/// Successive chunk sizes in tokens; the last size repeats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChunkSchedule(Vec<u32>);

/// Why a chunk schedule is invalid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("the chunk schedule is empty; give at least one size in tokens")]
    Empty,
    #[error("chunk sizes must be at least 1 token")]
    Zero,
}

impl ChunkSchedule {
    /// A schedule from sizes in tokens (non-empty, none zero).
    pub fn new(sizes: Vec<u32>) -> Result<Self, ScheduleError> {
        if sizes.is_empty() {
            return Err(ScheduleError::Empty);
        }
        if sizes.contains(&0) {
            return Err(ScheduleError::Zero);
        }
        Ok(Self(sizes))
    }

    /// The size of chunk number `index` (from 0).
    pub fn size(&self, index: usize) -> u32 {
        // `new` guarantees at least one size, so `last` always exists.
        self.0
            .get(index)
            .or(self.0.last())
            .copied()
            .unwrap_or(DEFAULT_CHUNK_SCHEDULE[0])
    }

    pub fn sizes(&self) -> &[u32] {
        &self.0
    }
}

impl Default for ChunkSchedule {
    fn default() -> Self {
        Self(DEFAULT_CHUNK_SCHEDULE.to_vec())
    }
}

/// How an edge streams.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "policy", content = "chunk_tokens")]
pub enum StreamPolicy {
    /// Chunks as they are produced, sized by the schedule.
    Staircase(ChunkSchedule),
    /// The whole output, once it is complete.
    Complete,
}

impl Default for StreamPolicy {
    fn default() -> Self {
        Self::Staircase(ChunkSchedule::default())
    }
}

impl StreamPolicy {
    /// The policy in effect when the pipeline runs in `mode`: layered runs make every edge
    /// complete, so the same file runs both ways.
    pub fn in_mode(&self, mode: StreamMode) -> StreamPolicy {
        match mode {
            StreamMode::Staircase => self.clone(),
            StreamMode::Layered => StreamPolicy::Complete,
        }
    }
}

/// A piece of a node's output handed to one consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub text: String,
    pub tokens: u32,
    /// Position of the chunk on its edge, from 0.
    pub index: usize,
}

/// Cuts one node's output into chunks for one edge.
#[derive(Debug)]
pub struct Chunker {
    policy: StreamPolicy,
    text: String,
    tokens: u32,
    emitted: usize,
}

impl Chunker {
    pub fn new(policy: StreamPolicy) -> Self {
        Self {
            policy,
            text: String::new(),
            tokens: 0,
            emitted: 0,
        }
    }

    /// Adds generated text; returns a chunk once the schedule's next size is reached.
    pub fn push(&mut self, text: &str, tokens: u32) -> Option<Chunk> {
        self.text.push_str(text);
        self.tokens += tokens;
        match &self.policy {
            StreamPolicy::Complete => None,
            StreamPolicy::Staircase(schedule) => {
                if self.tokens >= schedule.size(self.emitted) && !self.text.is_empty() {
                    Some(self.take())
                } else {
                    None
                }
            }
        }
    }

    /// The output ended: whatever is left, if anything.
    pub fn finish(&mut self) -> Option<Chunk> {
        if self.text.is_empty() {
            None
        } else {
            Some(self.take())
        }
    }

    fn take(&mut self) -> Chunk {
        let chunk = Chunk {
            text: std::mem::take(&mut self.text),
            tokens: std::mem::take(&mut self.tokens),
            index: self.emitted,
        };
        self.emitted += 1;
        chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staircase_follows_the_schedule_then_repeats_the_last_size() {
        let schedule = ChunkSchedule::new(vec![2, 3]).unwrap();
        let mut chunker = Chunker::new(StreamPolicy::Staircase(schedule));
        let mut sizes = Vec::new();
        for i in 0..11 {
            if let Some(chunk) = chunker.push(&format!("t{i} "), 1) {
                sizes.push(chunk.tokens);
            }
        }
        sizes.extend(chunker.finish().map(|c| c.tokens));
        assert_eq!(sizes, vec![2, 3, 3, 3]);
    }

    #[test]
    fn complete_gives_one_chunk_at_the_end() {
        let mut chunker = Chunker::new(StreamPolicy::Complete);
        assert_eq!(chunker.push("a", 1), None);
        assert_eq!(chunker.push("b", 1), None);
        let chunk = chunker.finish().unwrap();
        assert_eq!(
            (chunk.text.as_str(), chunk.tokens, chunk.index),
            ("ab", 2, 0)
        );
        assert_eq!(chunker.finish(), None);
    }

    #[test]
    fn layered_mode_makes_every_edge_complete() {
        assert_eq!(
            StreamPolicy::default().in_mode(StreamMode::Layered),
            StreamPolicy::Complete
        );
        assert_eq!(
            StreamPolicy::default().in_mode(StreamMode::Staircase),
            StreamPolicy::default()
        );
    }

    #[test]
    fn bad_schedules_are_refused() {
        assert_eq!(ChunkSchedule::new(vec![]), Err(ScheduleError::Empty));
        assert_eq!(ChunkSchedule::new(vec![4, 0]), Err(ScheduleError::Zero));
    }
}
