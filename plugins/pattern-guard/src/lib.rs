//! The pattern guard: redacts e-mail addresses, API-key shapes, Luhn-valid card numbers and
//! any operator pattern from a stream before it leaves. What may still grow into a match is
//! held: the window's last word (addresses and keys hold no whitespace), its trailing run of
//! digits and separators (a card number), a match reaching the end, and with operator
//! patterns (which may span words) the last `hold-bytes`. So a secret split across chunks is
//! redacted whole, never in part, while prose leaves a word at a time.

use regex_lite::Regex;
use staircase_sdk::{Edit, Guard, StreamInfo, Verdict, host};

/// Text held back at the end of the window when operator patterns are set: they may span
/// words, so the last word is not enough.
const PATTERN_HOLD_BYTES: usize = 64;

const EMAIL: &str = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}";
const API_KEY: &str = r"\b(?:(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|xox[abprs]-[A-Za-z0-9-]{10,})";
/// 13 to 19 digits, single spaces or dashes between them; kept only when Luhn-valid.
const CARD: &str = r"\b\d(?:[ -]?\d){12,18}\b";

struct Pattern {
    regex: Regex,
    /// Keep a match only when its digits pass the Luhn check.
    luhn: bool,
    /// One of the built-in kinds (which never span whitespace, but for a card's spaces).
    builtin: bool,
}

struct PatternGuard {
    patterns: Vec<Pattern>,
    replacement: String,
    hold_bytes: usize,
}

impl PatternGuard {
    /// Every match in `window`, sorted by start, overlapping ones merged.
    fn matches(&self, window: &str) -> Vec<(usize, usize)> {
        let mut spans: Vec<(usize, usize)> = self
            .patterns
            .iter()
            .flat_map(|p| {
                p.regex
                    .find_iter(window)
                    .filter(move |m| !p.luhn || luhn_valid(m.as_str()))
                    .map(|m| (m.start(), m.end()))
            })
            .collect();
        spans.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(spans.len());
        for (start, end) in spans {
            match merged.last_mut() {
                Some(last) if start < last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        merged
    }

    /// Redacts every match before `release` and releases up to it.
    fn verdict(&self, window: &str, release: usize) -> Verdict {
        let edits: Vec<Edit> = self
            .matches(window)
            .into_iter()
            .filter(|&(_, end)| end <= release)
            .map(|(start, end)| Edit::new(start, end, self.replacement.as_str()))
            .collect();
        if edits.is_empty() {
            return Verdict::release(release);
        }
        let removed: usize = edits.iter().map(|e| (e.end - e.start) as usize).sum();
        let added = edits.len() * self.replacement.len();
        Verdict::redact(edits, release + added - removed)
    }
}

impl Guard for PatternGuard {
    fn new(_info: StreamInfo) -> Self {
        let kinds = host::config("kinds").unwrap_or_else(|| "email,api-key,card".into());
        let mut patterns = Vec::new();
        for kind in kinds.split(',').map(str::trim).filter(|k| !k.is_empty()) {
            let (source, luhn) = match kind {
                "email" => (EMAIL, false),
                "api-key" => (API_KEY, false),
                "card" => (CARD, true),
                other => refuse(&format!("unknown kind `{other}` (known: email, api-key, card)")),
            };
            patterns.push(Pattern {
                regex: Regex::new(source).expect("the built-in patterns compile"),
                luhn,
                builtin: true,
            });
        }
        for line in host::config("patterns").unwrap_or_default().lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let regex = Regex::new(line).unwrap_or_else(|e| refuse(&format!("pattern `{line}`: {e}")));
            patterns.push(Pattern {
                regex,
                luhn: false,
                builtin: false,
            });
        }
        let custom = patterns.iter().any(|p| !p.builtin);
        let hold_bytes = match host::config("hold-bytes") {
            Some(value) => value
                .trim()
                .parse()
                .unwrap_or_else(|e| refuse(&format!("hold-bytes `{value}`: {e}"))),
            None if custom => PATTERN_HOLD_BYTES,
            None => 0,
        };
        Self {
            patterns,
            replacement: host::config("replacement").unwrap_or_else(|| "[redacted]".into()),
            hold_bytes,
        }
    }

    fn push(&mut self, window: &str, _new_bytes: usize, _tokens: u32) -> Verdict {
        let tail = floor_boundary(window, window.len().saturating_sub(self.hold_bytes));
        let held_from = tail.min(growing_from(window));
        // A match reaching into the held tail may still grow: hold all of it.
        let release = self
            .matches(window)
            .into_iter()
            .filter(|&(_, end)| end > held_from)
            .map(|(start, _)| start)
            .fold(held_from, usize::min);
        self.verdict(window, release)
    }

    fn finish(&mut self, window: &str) -> Verdict {
        self.verdict(window, window.len())
    }
}

/// A guard that cannot do what it was configured to must not pass text unguarded: it says
/// why in the host's log and traps, which fails its stream closed.
fn refuse(why: &str) -> ! {
    host::log(host::LogLevel::Error, why);
    panic!("{why}")
}

/// Where the window's last word, or its trailing run of digits and separators, starts: text
/// a built-in pattern's match may still be growing into.
fn growing_from(window: &str) -> usize {
    let word = window
        .char_indices()
        .rev()
        .find(|(_, c)| c.is_whitespace())
        .map_or(0, |(at, c)| at + c.len_utf8());
    let run = window
        .trim_end_matches(|c: char| c.is_ascii_digit() || c == ' ' || c == '-')
        .len();
    match window[run..].bytes().any(|b| b.is_ascii_digit()) {
        true => word.min(run),
        false => word,
    }
}

/// The largest character boundary of `text` at or below `at`.
fn floor_boundary(text: &str, at: usize) -> usize {
    (0..=at).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0)
}

/// The Luhn checksum over the digits of `text` (separators skipped).
fn luhn_valid(text: &str) -> bool {
    let digits: Vec<u32> = text.chars().filter_map(|c| c.to_digit(10)).collect();
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| match i % 2 {
            1 if d * 2 > 9 => d * 2 - 9,
            1 => d * 2,
            _ => d,
        })
        .sum();
    (13..=19).contains(&digits.len()) && sum % 10 == 0
}

staircase_sdk::export_guard!(PatternGuard);
