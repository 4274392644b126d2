//! {{name}}: an output guard. It sees an answer's text before the client does; this one
//! replaces every "password" with "[hidden]". The host shows it the whole window of text not
//! yet released, so a word split across chunks is seen whole; it holds back a tail that could
//! still become the word.

use staircase_sdk::{Edit, Guard, StreamInfo, Verdict};

const WORD: &str = "password";
const MASK: &str = "[hidden]";

struct Plugin;

/// Masks every whole word and releases up to the tail that may still grow into one.
fn judge(window: &str, last: bool) -> Verdict {
    let edits: Vec<Edit> = window
        .match_indices(WORD)
        .map(|(at, word)| Edit::new(at, at + word.len(), MASK))
        .collect();
    let edited = window.len() + edits.len() * MASK.len() - edits.len() * WORD.len();
    let hold = match last {
        true => 0,
        false => (1..WORD.len())
            .rev()
            .find(|&n| window.ends_with(&WORD[..n]))
            .unwrap_or(0),
    };
    Verdict::redact(edits, edited - hold)
}

impl Guard for Plugin {
    fn new(_info: StreamInfo) -> Self {
        Plugin
    }

    fn push(&mut self, window: &str, _new_bytes: usize, _tokens: u32) -> Verdict {
        judge(window, false)
    }

    fn finish(&mut self, window: &str) -> Verdict {
        judge(window, true)
    }
}

staircase_sdk::export_guard!(Plugin);
