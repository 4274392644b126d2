//! Reference-free checks of one answer: how varied its words are (distinct-n), the longest
//! run of one n-gram repeated back to back, the longest span said twice verbatim (a repeated
//! sentence or paragraph, anywhere), its length, how it ended, and its word overlap (token
//! F1) with another answer. These need no judge and catch degeneration ("1. 1. 1.", a
//! paragraph said again) on their own. Words are lowercased runs of letters and digits; punctuation is a word of
//! its own, so "1. 1. 1." repeats the bigram ("1", ".") and a list stays varied.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// An answer is degenerate below this distinct-2 (the threshold).
pub const DEGENERATE_DISTINCT_2: f64 = 0.5;
/// An answer is degenerate when one bigram repeats back to back more than this many times
/// (the threshold). The same limit applies to 3- and 4-grams, so a looping phrase
/// counts too, which makes the check stricter than the issue's, never looser.
pub const DEGENERATE_RUN: usize = 8;
/// An answer is degenerate when it says a span of this many words (punctuation counts as a
/// word) twice verbatim: a repeated sentence. Shorter repeats are set phrases ("the speed
/// of light", "on the other hand"); a 16-word sentence said twice is not one.
pub const DEGENERATE_SPAN: usize = 16;
/// Fewer words than this and the answer is empty for every purpose (nothing was said).
pub const MIN_WORDS: usize = 2;

/// The words of `text` for every metric here.
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in text.chars() {
        if c.is_alphanumeric() {
            word.extend(c.to_lowercase());
            continue;
        }
        if !word.is_empty() {
            out.push(std::mem::take(&mut word));
        }
        if !c.is_whitespace() {
            out.push(c.to_string());
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// Distinct n-grams over all n-grams (1.0 for fewer than `n` words: nothing repeats).
pub fn distinct_n(words: &[String], n: usize) -> f64 {
    if n == 0 || words.len() < n {
        return 1.0;
    }
    let grams: Vec<&[String]> = words.windows(n).collect();
    let distinct: std::collections::HashSet<&[String]> = grams.iter().copied().collect();
    distinct.len() as f64 / grams.len() as f64
}

/// The most times one n-gram occurs back to back ("a b a b a b" is the bigram "a b" 3 times).
/// 1 for any text with at least `n` words and no repeat, 0 for shorter texts.
pub fn longest_repeat_run(words: &[String], n: usize) -> usize {
    if n == 0 || words.len() < n {
        return 0;
    }
    let mut best = 1;
    for start in 0..n {
        // Walk the n-grams that start at `start`, `start + n`, ...: a run is a stretch of
        // equal neighbours.
        let mut run = 1;
        let mut i = start;
        while i + 2 * n <= words.len() {
            if words[i..i + n] == words[i + n..i + 2 * n] {
                run += 1;
                best = best.max(run);
            } else {
                run = 1;
            }
            i += n;
        }
    }
    best
}

/// The length of the longest span of words said twice without overlapping itself ("a b c x
/// a b c" has "a b c" twice: 3), 0 when no word repeats. Quadratic in the words, linear in
/// memory (longest common suffixes along each diagonal, one row at a time); answers are
/// hundreds of words.
pub fn longest_repeated_span(words: &[String]) -> usize {
    // Compare ids, not strings.
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let w: Vec<usize> = words
        .iter()
        .map(|word| {
            let next = ids.len();
            *ids.entry(word.as_str()).or_insert(next)
        })
        .collect();
    let n = w.len();
    // row[j]: the longest common suffix of w[..i] and w[..j] no longer than j - i, for the
    // current i < j. Along a diagonal a suffix reaching j - i is reset; a longer suffix on
    // it means a non-overlapping repeat of length j - i was already counted.
    let mut row = vec![0usize; n + 1];
    let mut best = 0;
    for i in 1..=n {
        for j in (i + 1..=n).rev() {
            row[j] = if w[i - 1] == w[j - 1] && row[j - 1] < j - i {
                row[j - 1] + 1
            } else {
                0
            };
            best = best.max(row[j]);
        }
    }
    best
}

/// How an answer ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// The model stopped on its own.
    Stopped,
    /// The token limit cut it after a finished sentence.
    Limit,
    /// The token limit cut it mid-sentence.
    LimitMidSentence,
}

impl Ending {
    /// `hit_limit`: generation ended because the token budget ran out.
    pub fn of(text: &str, hit_limit: bool) -> Self {
        if !hit_limit {
            return Ending::Stopped;
        }
        let last = text.trim_end().chars().last();
        let sentence_end = matches!(
            last,
            Some('.' | '!' | '?' | ':' | ')' | '"' | '\'' | '*' | '`')
        );
        if sentence_end {
            Ending::Limit
        } else {
            Ending::LimitMidSentence
        }
    }
}

/// Token F1 between two texts (SQuAD-style: multiset overlap of words). 1.0 for two empty
/// texts, 0.0 when only one is empty.
pub fn token_f1(a: &[String], b: &[String]) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for w in b {
        *counts.entry(w.as_str()).or_default() += 1;
    }
    let mut common = 0usize;
    for w in a {
        if let Some(c) = counts.get_mut(w.as_str())
            && *c > 0
        {
            *c -= 1;
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / a.len() as f64;
    let recall = common as f64 / b.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// The reference-free checks of one answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    pub words: usize,
    pub distinct_1: f64,
    pub distinct_2: f64,
    /// Longest back-to-back run of one bigram.
    pub bigram_run: usize,
    /// Longest back-to-back run of any 2- to 4-gram (a looping phrase).
    pub repeat_run: usize,
    /// Longest span of words said twice verbatim, anywhere ([`longest_repeated_span`]).
    #[serde(default)]
    pub repeated_span: usize,
    pub ending: Ending,
    /// Distinct-2 below [`DEGENERATE_DISTINCT_2`], a 2- to 4-gram run over
    /// [`DEGENERATE_RUN`], a span of [`DEGENERATE_SPAN`] words said twice, or (next to)
    /// nothing said.
    pub degenerate: bool,
}

impl Quality {
    pub fn of(text: &str, hit_limit: bool) -> Self {
        let w = words(text);
        let distinct_2 = distinct_n(&w, 2);
        let bigram_run = longest_repeat_run(&w, 2);
        let repeat_run = (2..=4)
            .map(|n| longest_repeat_run(&w, n))
            .max()
            .unwrap_or(0);
        let repeated_span = longest_repeated_span(&w);
        Self {
            words: w.len(),
            distinct_1: distinct_n(&w, 1),
            distinct_2,
            bigram_run,
            repeat_run,
            repeated_span,
            ending: Ending::of(text, hit_limit),
            degenerate: w.len() < MIN_WORDS
                || distinct_2 < DEGENERATE_DISTINCT_2
                || repeat_run > DEGENERATE_RUN
                || repeated_span >= DEGENERATE_SPAN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARAGRAPH: &str = "The sky looks blue because air molecules scatter short \
        wavelengths of sunlight more strongly than long ones. This is Rayleigh scattering: \
        blue light is scattered in every direction, so it reaches our eyes from all over the \
        sky, while red and yellow light pass more directly. At sunset the light travels \
        through more air, the blue is scattered away, and the sky turns orange.";

    #[test]
    fn words_split_punctuation_and_lowercase() {
        assert_eq!(words("1. Be ready!"), ["1", ".", "be", "ready", "!"]);
        assert!(words("  \n").is_empty());
    }

    #[test]
    fn a_normal_paragraph_is_not_degenerate() {
        let q = Quality::of(PARAGRAPH, false);
        assert!(q.distinct_2 > 0.9, "{q:?}");
        assert!(q.bigram_run <= 1, "{q:?}");
        assert!(!q.degenerate);
        assert_eq!(q.ending, Ending::Stopped);
    }

    #[test]
    fn a_numbered_list_is_not_degenerate() {
        let list = "1. **Research the company.** Know what they do.\n2. **Practice answers.** \
            Rehearse common questions.\n3. **Arrive early.** Plan your route.";
        assert!(!Quality::of(list, false).degenerate);
    }

    #[test]
    fn a_repeated_token_is_degenerate() {
        let text = "1. ".repeat(40);
        let q = Quality::of(&text, true);
        assert!(q.degenerate, "{q:?}");
        assert!(q.distinct_2 < 0.1);
        assert_eq!(q.bigram_run, 40);
    }

    #[test]
    fn a_repeated_phrase_is_degenerate_by_its_run() {
        // A good start, then a loop: distinct-2 alone might pass a long enough start.
        let text = format!("{PARAGRAPH} {}", "be confident and ".repeat(12));
        let w = words(&text);
        assert_eq!(longest_repeat_run(&w, 3), 12);
        let q = Quality::of(&text, true);
        assert!(q.repeat_run >= 12);
        assert!(q.degenerate, "{q:?}");
    }

    #[test]
    fn a_span_said_twice_is_degenerate_and_a_varied_text_is_not() {
        // 20 words (punctuation counts), then other words, then the same 20 again.
        let span = "Blue light is scattered in every direction by the molecules of the air, \
            so the whole blue sky glows";
        assert_eq!(words(span).len(), 20);
        let text = format!("{span}. At noon the sun is high and white. {span}.");
        let q = Quality::of(&text, false);
        assert_eq!(q.repeated_span, 21, "the span and its full stop: {q:?}");
        assert_eq!(
            q.repeat_run, 1,
            "not back to back, so the run check misses it"
        );
        assert!(q.distinct_2 > DEGENERATE_DISTINCT_2, "nor does distinct-2");
        assert!(q.degenerate, "{q:?}");

        let varied = Quality::of(PARAGRAPH, false);
        assert!(varied.repeated_span < 4, "{varied:?}");
        assert!(!varied.degenerate);
    }

    #[test]
    fn repeated_spans_do_not_overlap_themselves() {
        assert_eq!(longest_repeated_span(&words("a b c x a b c")), 3);
        // "a a a a": "a a" twice, not "a a a" overlapping.
        assert_eq!(longest_repeated_span(&words("a a a a")), 2);
        assert_eq!(longest_repeated_span(&words("a a a a a")), 2);
        assert_eq!(longest_repeated_span(&words("a b a b a b")), 2);
        assert_eq!(longest_repeated_span(&words("a b c d")), 0);
        assert_eq!(longest_repeated_span(&[]), 0);
    }

    #[test]
    fn runs_count_back_to_back_repeats_only() {
        let w = words("a b a b a b c a b");
        assert_eq!(longest_repeat_run(&w, 2), 3);
        assert_eq!(longest_repeat_run(&words("a b c d"), 2), 1);
        assert_eq!(longest_repeat_run(&words("a"), 2), 0);
        // The run may start at an odd offset.
        assert_eq!(longest_repeat_run(&words("x a b a b a b"), 2), 3);
    }

    #[test]
    fn distinct_n_counts_unique_grams() {
        let w = words("a b a b");
        assert!((distinct_n(&w, 1) - 0.5).abs() < 1e-12);
        // Bigrams: ab, ba, ab.
        assert!((distinct_n(&w, 2) - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn empty_answers_are_degenerate() {
        assert!(Quality::of("", false).degenerate);
        assert!(Quality::of("Hi", false).degenerate);
    }

    #[test]
    fn endings_tell_the_limit_apart_from_a_stop() {
        assert_eq!(Ending::of("It ends here", false), Ending::Stopped);
        assert_eq!(Ending::of("It ends here.", true), Ending::Limit);
        assert_eq!(Ending::of("It ends mid", true), Ending::LimitMidSentence);
    }

    #[test]
    fn token_f1_matches_hand_computation() {
        let a = words("the cat sat");
        let b = words("the cat ran away");
        // common 2, precision 2/3, recall 2/4: F1 = 2 * (2/3 * 1/2) / (2/3 + 1/2) = 4/7.
        assert!((token_f1(&a, &b) - 4.0 / 7.0).abs() < 1e-12);
        assert!((token_f1(&a, &a) - 1.0).abs() < 1e-12);
        assert_eq!(token_f1(&a, &[]), 0.0);
        assert_eq!(token_f1(&[], &[]), 1.0);
    }
}
