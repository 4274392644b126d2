//! The phrase guard: stops a stream at a banned phrase (case-insensitive) or past a token
//! budget. The last phrase-length of text is held, so a phrase split across chunks is seen
//! whole and no part of it leaves.

use staircase_sdk::{Guard, StreamInfo, Verdict, host};

struct PhraseGuard {
    /// Lowercase phrases.
    phrases: Vec<String>,
    max_tokens: Option<u64>,
    tokens: u64,
}

impl PhraseGuard {
    fn banned(&self, window: &str) -> Option<&str> {
        let lower = window.to_lowercase();
        self.phrases
            .iter()
            .find(|p| lower.contains(p.as_str()))
            .map(String::as_str)
    }

    /// The longest phrase minus one byte: a tail that short may still become a phrase.
    fn hold_bytes(&self) -> usize {
        self.phrases.iter().map(String::len).max().unwrap_or(1) - 1
    }
}

impl Guard for PhraseGuard {
    fn new(_info: StreamInfo) -> Self {
        let phrases = host::config("phrases")
            .unwrap_or_default()
            .split([',', '\n'])
            .map(|p| p.trim().to_lowercase())
            .filter(|p| !p.is_empty())
            .collect();
        let max_tokens = host::config("max-tokens").map(|value| {
            value.trim().parse().unwrap_or_else(|e| {
                let why = format!("max-tokens `{value}`: {e}");
                host::log(host::LogLevel::Error, &why);
                panic!("{why}")
            })
        });
        Self {
            phrases,
            max_tokens,
            tokens: 0,
        }
    }

    fn push(&mut self, window: &str, _new_bytes: usize, tokens: u32) -> Verdict {
        self.tokens += u64::from(tokens);
        if let Some(phrase) = self.banned(window) {
            return Verdict::Stop(format!("the answer touched a banned phrase (`{phrase}`)"));
        }
        if let Some(max) = self.max_tokens.filter(|&max| self.tokens > max) {
            return Verdict::Stop(format!("the answer ran past {max} tokens"));
        }
        let mut release = window.len().saturating_sub(self.hold_bytes());
        while !window.is_char_boundary(release) {
            release -= 1;
        }
        Verdict::release(release)
    }

    fn finish(&mut self, window: &str) -> Verdict {
        match self.banned(window) {
            Some(phrase) => Verdict::Stop(format!("the answer touched a banned phrase (`{phrase}`)")),
            None => Verdict::release(window.len()),
        }
    }
}

staircase_sdk::export_guard!(PhraseGuard);
