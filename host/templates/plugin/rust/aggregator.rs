//! {{name}}: an aggregator plugin. One value per pipeline run receives the upstream agents'
//! text as it streams and decides when, and with what prompt, the aggregator model writes.

use staircase_sdk::{
    Aggregator, ChatMessage, Demand, Source, Speaker, Step, StreamMode,
};

/// The instruction of every step.
const INSTRUCTION: &str = "Combine the responses below into one accurate answer to the question.";
/// Tokens of an intermediate (staircase) step.
const STEP_TOKENS: u32 = 16;
/// Tokens of the final step.
const FINAL_TOKENS: u32 = 512;

struct Plugin {
    head: String,
    body: String,
    open: Vec<String>,
    mode: StreamMode,
    new_text: bool,
    done: bool,
}

impl Aggregator for Plugin {
    fn new(conversation: Vec<ChatMessage>, sources: Vec<Source>, mode: StreamMode) -> Self {
        let question = conversation
            .iter()
            .rev()
            .find(|m| m.role == Speaker::User)
            .map(|m| m.content.clone())
            .unwrap_or_default();
        Self {
            head: format!("{question}\n\nResponses:\n"),
            body: String::new(),
            open: sources.into_iter().map(|s| s.id).collect(),
            mode,
            new_text: false,
            done: false,
        }
    }

    fn push(&mut self, _source_id: &str, text: &str) -> Demand {
        // Text in arrival order keeps every step's prompt an extension of the last one,
        // so the host's prefix cache serves it.
        self.body.push_str(text);
        self.new_text = true;
        Demand::More
    }

    fn finish(&mut self, source_id: &str) {
        self.open.retain(|id| id != source_id);
    }

    fn next_step(&mut self) -> Option<Step> {
        let last = self.open.is_empty();
        let due = last || (self.mode == StreamMode::Staircase && self.new_text);
        if self.done || !due {
            return None;
        }
        self.done = last;
        self.new_text = false;
        Some(Step {
            messages: vec![
                ChatMessage::new(Speaker::System, INSTRUCTION),
                ChatMessage::new(Speaker::User, format!("{}{}", self.head, self.body)),
            ],
            max_tokens: if last { FINAL_TOKENS } else { STEP_TOKENS },
            final_: last,
        })
    }
}

staircase_sdk::export_aggregator!(Plugin);
