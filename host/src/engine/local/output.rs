//! Turns generated token bytes into text deltas: only valid UTF-8 leaves, stop strings end the
//! text (and are not part of it), and text that might be the start of a stop string is held
//! back until it is known not to be one.

use crate::engine::TokenId;

/// What a new token produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Emitted {
    /// Text that can be sent now (may be empty).
    pub text: String,
    /// Tokens that produced text since the last non-empty delta.
    pub tokens: Vec<TokenId>,
    /// A stop string was reached; nothing more must be emitted.
    pub stopped: bool,
}

/// Text state of one generation.
#[derive(Debug, Default)]
pub struct OutputText {
    stops: Vec<String>,
    /// Bytes not yet valid UTF-8 (a character split across tokens).
    pending_bytes: Vec<u8>,
    text: String,
    /// Byte offset in `text` up to which text was emitted.
    emitted: usize,
    pending_tokens: Vec<TokenId>,
}

impl OutputText {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..Self::default()
        }
    }

    /// Adds one token's bytes.
    pub fn push(&mut self, token: TokenId, bytes: &[u8]) -> Emitted {
        self.pending_tokens.push(token);
        self.pending_bytes.extend_from_slice(bytes);
        self.decode_pending(false);
        self.take(false)
    }

    /// The rest of the text at the end of generation (held-back text included).
    pub fn finish(&mut self) -> Emitted {
        self.decode_pending(true);
        self.take(true)
    }

    fn decode_pending(&mut self, at_end: bool) {
        loop {
            match std::str::from_utf8(&self.pending_bytes) {
                Ok(valid) => {
                    self.text.push_str(valid);
                    self.pending_bytes.clear();
                    return;
                }
                Err(error) => {
                    let valid = error.valid_up_to();
                    // Safe: `valid_up_to` bytes are valid UTF-8 by definition.
                    self.text
                        .push_str(&String::from_utf8_lossy(&self.pending_bytes[..valid]));
                    match error.error_len() {
                        Some(bad) => {
                            self.text.push(char::REPLACEMENT_CHARACTER);
                            self.pending_bytes.drain(..valid + bad);
                        }
                        None if at_end => {
                            self.text.push(char::REPLACEMENT_CHARACTER);
                            self.pending_bytes.clear();
                            return;
                        }
                        None => {
                            // An incomplete character: wait for the next token.
                            self.pending_bytes.drain(..valid);
                            return;
                        }
                    }
                }
            }
        }
    }

    fn take(&mut self, at_end: bool) -> Emitted {
        let unsent = &self.text[self.emitted..];
        let stop_at = self
            .stops
            .iter()
            .filter_map(|stop| unsent.find(stop.as_str()))
            .min();
        let (end, stopped) = match stop_at {
            Some(at) => (self.emitted + at, true),
            None if at_end => (self.text.len(), false),
            None => (self.text.len() - self.held_back(unsent), false),
        };
        let text = self.text[self.emitted..end].to_owned();
        self.emitted = end;
        let tokens = if text.is_empty() && !stopped && !at_end {
            Vec::new()
        } else {
            std::mem::take(&mut self.pending_tokens)
        };
        Emitted {
            text,
            tokens,
            stopped,
        }
    }

    /// Length of the longest suffix of `unsent` that is a proper prefix of a stop string.
    fn held_back(&self, unsent: &str) -> usize {
        self.stops
            .iter()
            .flat_map(|stop| {
                (1..stop.len().min(unsent.len() + 1))
                    .rev()
                    .filter(|&n| stop.is_char_boundary(n))
                    .find(|&n| unsent.ends_with(&stop[..n]))
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(output: &mut OutputText, pieces: &[&[u8]]) -> (String, bool) {
        let mut text = String::new();
        for (i, piece) in pieces.iter().enumerate() {
            let emitted = output.push(TokenId(i as i32), piece);
            text.push_str(&emitted.text);
            if emitted.stopped {
                return (text, true);
            }
        }
        text.push_str(&output.finish().text);
        (text, false)
    }

    #[test]
    fn stop_string_across_tokens_is_cut_and_held_back() {
        let mut output = OutputText::new(&["\nUser:".to_owned()]);
        let first = output.push(TokenId(0), b"Hello");
        assert_eq!(first.text, "Hello");
        let held = output.push(TokenId(1), b"\nUs");
        assert_eq!(held.text, "", "a possible stop start is held back");
        let done = output.push(TokenId(2), b"er: next");
        assert!(done.stopped);
        assert_eq!(done.text, "");
        assert_eq!(done.tokens, vec![TokenId(1), TokenId(2)]);
    }

    #[test]
    fn held_text_is_released_when_it_is_not_a_stop() {
        let mut output = OutputText::new(&["STOP".to_owned()]);
        assert_eq!(
            feed(&mut output, &[b"a ST", b"ar"]),
            ("a STar".to_owned(), false)
        );
        let mut output = OutputText::new(&["STOP".to_owned()]);
        assert_eq!(feed(&mut output, &[b"a ST"]), ("a ST".to_owned(), false));
    }

    #[test]
    fn utf8_split_across_tokens() {
        let snowman = "☃".as_bytes();
        let mut output = OutputText::new(&[]);
        let first = output.push(TokenId(0), &snowman[..1]);
        assert_eq!(first.text, "");
        let second = output.push(TokenId(1), &snowman[1..]);
        assert_eq!(second.text, "☃");
        assert_eq!(second.tokens, vec![TokenId(0), TokenId(1)]);
    }
}
