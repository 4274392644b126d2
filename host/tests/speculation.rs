//! Speculative decoding: the suffix automaton against brute force, and the sampled
//! acceptance rule against the distribution of plain sampling.

use staircase::engine::TokenId;
use staircase::speculate::{Distribution, SplitMix64, SuffixAutomaton, verify, verify_sampled};

fn random_tokens(rng: &mut SplitMix64, len: usize, alphabet: u64) -> Vec<TokenId> {
    (0..len)
        .map(|_| TokenId((rng.next_u64() % alphabet) as i32))
        .collect()
}

/// Longest suffix of `context` that occurs in `text` followed by at least one token.
fn brute_longest(text: &[TokenId], context: &[TokenId]) -> usize {
    (0..=context.len())
        .rev()
        .find(|&l| {
            let suffix = &context[context.len() - l..];
            (l..text.len()).any(|end| &text[end - l..end] == suffix)
        })
        .unwrap_or(0)
}

/// The token that most often followed `suffix` in `text`, ties to the latest occurrence.
fn brute_continuation(text: &[TokenId], suffix: &[TokenId]) -> Option<TokenId> {
    let l = suffix.len();
    let mut seen: Vec<(TokenId, usize, usize)> = Vec::new(); // token, count, last end
    for end in l..text.len() {
        if &text[end - l..end] == suffix {
            let next = text[end];
            match seen.iter_mut().find(|(t, _, _)| *t == next) {
                Some(entry) => {
                    entry.1 += 1;
                    entry.2 = end;
                }
                None => seen.push((next, 1, end)),
            }
        }
    }
    seen.into_iter()
        .max_by_key(|&(_, count, last)| (count, last))
        .map(|(t, _, _)| t)
}

fn brute_draft(text: &[TokenId], context: &[TokenId], max_len: usize) -> Vec<TokenId> {
    let l = brute_longest(text, context);
    let mut suffix = context[context.len() - l..].to_vec();
    let mut draft = Vec::new();
    while draft.len() < max_len {
        let Some(next) = brute_continuation(text, &suffix) else {
            break;
        };
        draft.push(next);
        suffix.push(next);
    }
    draft
}

/// Every prefix of random strings over small alphabets (many repeats): the automaton's
/// longest earlier suffix, its draft and its occurrence counts equal brute force.
#[test]
fn automaton_matches_brute_force_on_its_own_text() {
    let mut rng = SplitMix64::new(0x5eed_0001);
    for (alphabet, len) in [(2, 120), (3, 160), (5, 200), (40, 200)] {
        let text = random_tokens(&mut rng, len, alphabet);
        let mut sam = SuffixAutomaton::new();
        for n in 1..=text.len() {
            sam.push(text[n - 1]);
            let prefix = &text[..n];
            let m = sam.match_own_suffix();
            let expected = brute_longest(prefix, prefix);
            assert_eq!(m.len as usize, expected, "alphabet {alphabet}, prefix {n}");
            if m.len > 0 {
                let draft = sam.draft(m, 6, |_| false);
                assert_eq!(
                    draft,
                    brute_draft(prefix, prefix, 6),
                    "alphabet {alphabet}, prefix {n}"
                );
            }
        }
        assert!(sam.state_count() <= 2 * text.len().max(1));
    }
}

/// Matching a different context against the automaton, and occurrence counts of substrings.
#[test]
fn automaton_matches_brute_force_on_other_contexts() {
    let mut rng = SplitMix64::new(0x5eed_0002);
    for alphabet in [2, 3, 4, 8] {
        let text = random_tokens(&mut rng, 300, alphabet);
        let mut sam = SuffixAutomaton::from_tokens(&text);
        for _ in 0..60 {
            let len = 1 + (rng.next_u64() % 30) as usize;
            let context = random_tokens(&mut rng, len, alphabet);
            let m = sam.with_continuation(sam.match_suffix(&context));
            assert_eq!(
                m.len as usize,
                brute_longest(&text, &context),
                "alphabet {alphabet}"
            );
            assert_eq!(sam.draft(m, 8, |_| false), brute_draft(&text, &context, 8));

            // Occurrence count and latest end of the matched suffix (all occurrences).
            let raw = sam.match_suffix(&context);
            let suffix = &context[context.len() - raw.len as usize..];
            let l = suffix.len();
            let ends: Vec<usize> = (l..=text.len())
                .filter(|&end| &text[end - l..end] == suffix)
                .collect();
            let occ = sam.occurrences(raw.state);
            assert_eq!(occ.count as usize, ends.len(), "count of {suffix:?}");
            assert_eq!(occ.last_end as usize, ends.last().copied().unwrap_or(0));
        }
    }
}

/// Long runs stress the suffix-link paths the occurrence tree exists for.
#[test]
fn automaton_counts_on_long_repetitive_text() {
    let mut sam = SuffixAutomaton::new();
    let unit = [TokenId(1), TokenId(2), TokenId(1), TokenId(3)];
    for _ in 0..5000 {
        sam.extend(&unit);
    }
    let m = sam.match_suffix(&[TokenId(1), TokenId(2), TokenId(1)]);
    assert_eq!(sam.occurrences(m.state).count, 5000);
    let own = sam.match_own_suffix();
    assert_eq!(own.len, 4 * 5000 - 4);
    // The longest earlier occurrence ends one period back, so its continuation runs into the
    // end of the text after one period.
    assert_eq!(sam.draft(own, 8, |_| false), unit.to_vec());
}

// ---- acceptance rule ----

const VOCAB: usize = 4;

/// Position-dependent target distributions: p0, then p1 given the first token, then p2
/// given the first two (skewed so that every rule mistake shows).
fn target(prefix: &[TokenId]) -> Vec<f64> {
    let base = [0.1, 0.45, 0.3, 0.15];
    let shift: usize = prefix.iter().map(|t| t.0 as usize + 1).sum();
    (0..VOCAB).map(|i| base[(i + shift) % VOCAB]).collect()
}

fn dist(p: &[f64]) -> Distribution {
    Distribution::from_weights(p.iter().enumerate().map(|(i, &w)| (TokenId(i as i32), w))).unwrap()
}

fn sample(p: &[f64], u: f64) -> TokenId {
    let mut acc = 0.0;
    for (i, &w) in p.iter().enumerate() {
        acc += w;
        if u < acc {
            return TokenId(i as i32);
        }
    }
    TokenId(VOCAB as i32 - 1)
}

/// A rule to test: given the draft and the target at each position, the emitted tokens.
type Rule = fn(&[TokenId], &mut SplitMix64) -> Vec<TokenId>;

fn library_rule(draft: &[TokenId], rng: &mut SplitMix64) -> Vec<TokenId> {
    verify_sampled(draft, |i| dist(&target(&draft[..i])), rng).emitted
}

/// The engine's form: the model's choice is a fresh sample at each position.
fn sample_and_compare_rule(draft: &[TokenId], rng: &mut SplitMix64) -> Vec<TokenId> {
    verify(draft, |i| dist(&target(&draft[..i])).sample(rng)).emitted
}

/// Wrong: on rejection, resamples from the full target (the rejected token keeps its mass).
fn resample_from_target(draft: &[TokenId], rng: &mut SplitMix64) -> Vec<TokenId> {
    let mut out = Vec::new();
    for (i, &x) in draft.iter().enumerate() {
        let p = target(&draft[..i]);
        if rng.next_f64() < p[x.0 as usize] {
            out.push(x);
        } else {
            out.push(sample(&p, rng.next_f64()));
            return out;
        }
    }
    out.push(sample(&target(draft), rng.next_f64()));
    out
}

/// Wrong: accepts with probability sqrt(p(x)) (too eager), residual done right.
fn eager_accept(draft: &[TokenId], rng: &mut SplitMix64) -> Vec<TokenId> {
    let mut out = Vec::new();
    for (i, &x) in draft.iter().enumerate() {
        let mut p = target(&draft[..i]);
        if rng.next_f64() < p[x.0 as usize].sqrt() {
            out.push(x);
        } else {
            p[x.0 as usize] = 0.0;
            let total: f64 = p.iter().sum();
            p.iter_mut().for_each(|w| *w /= total);
            out.push(sample(&p, rng.next_f64()));
            return out;
        }
    }
    out.push(sample(&target(draft), rng.next_f64()));
    out
}

/// Chi-square of the first three tokens (completed by plain sampling where a verification
/// emitted fewer) against the exact joint p0(a) p1(b|a) p2(c|a,b).
///
/// The draft is fixed per call: averaging a biased rule over drafts drawn uniformly from the
/// vocabulary can cancel its bias (it does for "resample from the full target").
fn chi_square(rule: Rule, seed: u64, trials: usize, draft: [TokenId; 2]) -> f64 {
    let mut rng = SplitMix64::new(seed);
    let mut counts = vec![0usize; VOCAB * VOCAB * VOCAB];
    for _ in 0..trials {
        let mut out = rule(&draft, &mut rng);
        while out.len() < 3 {
            let p = target(&out);
            out.push(sample(&p, rng.next_f64()));
        }
        let cell = (out[0].0 as usize * VOCAB + out[1].0 as usize) * VOCAB + out[2].0 as usize;
        counts[cell] += 1;
    }
    let mut chi2 = 0.0;
    for a in 0..VOCAB {
        for b in 0..VOCAB {
            for c in 0..VOCAB {
                let (ta, tb) = (TokenId(a as i32), TokenId(b as i32));
                let p = target(&[])[a] * target(&[ta])[b] * target(&[ta, tb])[c];
                let expected = p * trials as f64;
                let observed = counts[(a * VOCAB + b) * VOCAB + c] as f64;
                chi2 += (observed - expected).powi(2) / expected;
            }
        }
    }
    chi2
}

/// 63 degrees of freedom: P(chi2 > 140) is about 1e-7 for a correct rule, so the test cannot
/// fail by chance in practice, and the two wrong rules (which land in the thousands) cannot
/// pass by chance.
const CHI2_LIMIT: f64 = 140.0;
const TRIALS: usize = 400_000;

/// Drafts with likely, middling and unlikely tokens, so acceptance, correction and the bonus
/// token are all exercised.
const DRAFTS: [[TokenId; 2]; 3] = [
    [TokenId(1), TokenId(2)],
    [TokenId(2), TokenId(0)],
    [TokenId(0), TokenId(3)],
];

#[test]
fn sampled_acceptance_preserves_the_target_distribution() {
    for (i, draft) in DRAFTS.into_iter().enumerate() {
        let chi2 = chi_square(library_rule, 0xacce_0001 + i as u64, TRIALS, draft);
        eprintln!("library rule, draft {draft:?}: chi2 = {chi2:.1}");
        assert!(
            chi2 < CHI2_LIMIT,
            "library rule, draft {draft:?}: chi2 = {chi2:.1}"
        );
        let chi2 = chi_square(
            sample_and_compare_rule,
            0xacce_0011 + i as u64,
            TRIALS,
            draft,
        );
        assert!(
            chi2 < CHI2_LIMIT,
            "sample-and-compare, draft {draft:?}: chi2 = {chi2:.1}"
        );
    }
}

#[test]
fn the_distribution_test_rejects_wrong_rules() {
    for (i, draft) in DRAFTS.into_iter().enumerate() {
        let chi2 = chi_square(resample_from_target, 0xacce_0021 + i as u64, TRIALS, draft);
        eprintln!("full-target resampling, draft {draft:?}: chi2 = {chi2:.1}");
        assert!(
            chi2 > CHI2_LIMIT,
            "full-target resampling passed, draft {draft:?}: chi2 = {chi2:.1}"
        );
        let chi2 = chi_square(eager_accept, 0xacce_0031 + i as u64, TRIALS, draft);
        eprintln!("eager acceptance, draft {draft:?}: chi2 = {chi2:.1}");
        assert!(
            chi2 > CHI2_LIMIT,
            "eager acceptance passed, draft {draft:?}: chi2 = {chi2:.1}"
        );
    }
}
