//! An agent that reads other nodes, driven like an aggregator.
//!
//! An agent with inputs (a debate's second round, the workers after a planner) gets its
//! inputs' text as it streams. This adapter gives it the aggregator's step interface, so the
//! runtime has one loop for both: in staircase mode the agent writes a short step whenever
//! every input has shown something new, continuing its own partial answer, and finishes
//! once every input is complete; in layered mode it writes once, on complete inputs. The
//! role plugin still decides the prompt (`build_messages`) at every step.

use crate::engine::ChatMessage;
use crate::policy::{
    AggregatorSession, Demand, PolicyError, RoleInput, RolePolicy, Source, Step, StreamMode,
    UpstreamOutput,
};

/// Tokens an agent writes per step while its inputs still stream: about one small input
/// chunk's worth, so it keeps pace with its inputs without running ahead on too little.
pub const ROLE_STEP_TOKENS: u32 = 16;

/// A role plugin driven through the aggregator's step interface.
pub struct RoleSession {
    role: Box<dyn RolePolicy>,
    conversation: Vec<ChatMessage>,
    sources: Vec<Source>,
    texts: Vec<String>,
    seen: Vec<bool>,
    finished: Vec<bool>,
    mode: StreamMode,
    /// Input arrived since the last step.
    fresh: bool,
    final_given: bool,
}

impl RoleSession {
    pub fn new(
        role: Box<dyn RolePolicy>,
        conversation: Vec<ChatMessage>,
        sources: Vec<Source>,
        mode: StreamMode,
    ) -> Self {
        let n = sources.len();
        Self {
            role,
            conversation,
            sources,
            texts: vec![String::new(); n],
            seen: vec![false; n],
            finished: vec![false; n],
            mode,
            fresh: false,
            final_given: false,
        }
    }

    fn slot(&self, source_id: &str) -> Result<usize, PolicyError> {
        self.sources
            .iter()
            .position(|s| s.id == source_id)
            .ok_or_else(|| PolicyError(format!("unknown source `{source_id}`")))
    }

    fn messages(&mut self) -> Result<Vec<ChatMessage>, PolicyError> {
        let input = RoleInput {
            conversation: self.conversation.clone(),
            upstream: self
                .sources
                .iter()
                .zip(&self.texts)
                .map(|(source, text)| UpstreamOutput {
                    source: source.clone(),
                    text: text.clone(),
                })
                .collect(),
        };
        self.role.build_messages(&input)
    }
}

impl AggregatorSession for RoleSession {
    fn push(&mut self, source_id: &str, text: &str) -> Result<Demand, PolicyError> {
        let slot = self.slot(source_id)?;
        self.texts[slot].push_str(text);
        self.seen[slot] = true;
        self.fresh = true;
        Ok(Demand::More)
    }

    fn finish(&mut self, source_id: &str) -> Result<(), PolicyError> {
        let slot = self.slot(source_id)?;
        self.finished[slot] = true;
        self.fresh = true;
        Ok(())
    }

    fn answered(&mut self, _text: &str) -> Result<(), PolicyError> {
        Ok(())
    }

    fn next_step(&mut self) -> Result<Option<Step>, PolicyError> {
        if self.final_given {
            return Ok(None);
        }
        if self.finished.iter().all(|&f| f) {
            self.final_given = true;
            return Ok(Some(Step {
                messages: self.messages()?,
                // The runtime caps a final step at the node's remaining budget.
                max_tokens: u32::MAX,
                is_final: true,
            }));
        }
        let ready =
            self.mode == StreamMode::Staircase && self.fresh && self.seen.iter().all(|&s| s);
        if !ready {
            return Ok(None);
        }
        self.fresh = false;
        Ok(Some(Step {
            messages: self.messages()?,
            max_tokens: ROLE_STEP_TOKENS,
            is_final: false,
        }))
    }
}
