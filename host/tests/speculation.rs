//! Speculative decoding: the suffix automaton against brute force, the sampled acceptance
//! rule against the distribution of plain sampling, and, on the real default model, greedy
//! output with speculation against output without it, solo and batched, and the KV rollback
//! of rejected drafts. Model tests take a lock so engines never compete for the two cores.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use staircase::engine::local::{
    DEFAULT_FLASH_ATTENTION, LocalEngine, LocalEngineConfig, backend, context_params, load_model,
};
use staircase::engine::{
    ChatMessage, DrySampling, Engine, GenerationEvent, GenerationRequest, GenerationStream, Prompt,
    Role, TokenId, Usage,
};
use staircase::speculate::{
    ControllerConfig, CostModel, Distribution, DraftFeed, DraftSource, SpeculationConfig,
    SpeculationStats, SplitMix64, SuffixAutomaton, verify, verify_sampled,
};

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

// ---- the real model ----

/// Safety net for waits on engine signals; never reached when the engine works.
const WAIT: Duration = Duration::from_secs(120);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn model_path() -> std::path::PathBuf {
    staircase::model::default_model_path().expect("default model")
}

/// Speculation that drafts whenever anything matches, as long as possible: the harshest
/// test of verification and rollback (the adaptive controller would draft far less).
fn eager_speculation() -> SpeculationConfig {
    SpeculationConfig {
        enabled: true,
        controller: ControllerConfig {
            min_match: 1,
            ..ControllerConfig::default()
        },
        cost: CostModel {
            points: vec![(1, 1.0), (64, 1.0)],
        },
        ..SpeculationConfig::default()
    }
}

fn engine(speculation: SpeculationConfig, flash_attention: bool) -> LocalEngine {
    let mut config = LocalEngineConfig::new(model_path());
    config.context_tokens = Some(2048);
    config.speculation = speculation;
    config.flash_attention = flash_attention;
    LocalEngine::load(config).expect("engine loads")
}

fn plain_engine(flash_attention: bool) -> LocalEngine {
    engine(
        SpeculationConfig {
            enabled: false,
            ..SpeculationConfig::default()
        },
        flash_attention,
    )
}

#[derive(Debug)]
struct Answer {
    tokens: Vec<TokenId>,
    usage: Usage,
    speculation: Option<SpeculationStats>,
}

fn collect(mut stream: GenerationStream) -> Answer {
    let mut tokens = Vec::new();
    while let Some(event) = stream.blocking_next() {
        match event.expect("no engine error") {
            GenerationEvent::Delta { token_ids, .. } => {
                tokens.extend(token_ids.expect("the local engine reports token ids"))
            }
            GenerationEvent::Finished {
                usage, extensions, ..
            } => {
                return Answer {
                    tokens,
                    usage,
                    speculation: extensions.get::<SpeculationStats>().cloned(),
                };
            }
        }
    }
    panic!("stream ended without Finished");
}

const LIST: &str = "red, green, blue, yellow, orange, purple, black, white";

const CODE: &str = "```python\ndef area(width, height):\n    return width * height\n\n\
def perimeter(width, height):\n    return 2 * (width + height)\n```";

const PROPOSALS: [&str; 2] = [
    "Bicycle lanes make cycling safer because they keep cyclists away from fast cars.",
    "Bicycle lanes reduce traffic congestion and air pollution in busy city centres.",
];

/// Prompts with repetitive and with novel text. Each is `(name, request)`.
fn corpus(max_tokens: u32) -> Vec<(&'static str, GenerationRequest)> {
    let chat = |messages: Vec<ChatMessage>, prefix: Option<&str>| {
        let mut request = GenerationRequest::chat(messages);
        request.prompt = Prompt::Chat {
            messages: match request.prompt {
                Prompt::Chat { messages, .. } => messages,
                Prompt::Tokens(_) | Prompt::Text(_) => {
                    unreachable!("chat() builds a chat prompt")
                }
            },
            assistant_prefix: prefix.map(str::to_owned),
        };
        request.sampling.max_tokens = max_tokens;
        request
    };
    let feed = DraftFeed::new();
    for (i, text) in PROPOSALS.iter().enumerate() {
        let name = format!("proposer-{i}");
        feed.push_text(&name, text);
        feed.finish(&name);
    }
    let mut aggregator = chat(
        vec![ChatMessage::new(
            Role::User,
            format!(
                "Combine these answers into one: 1. {} 2. {}",
                PROPOSALS[0], PROPOSALS[1]
            ),
        )],
        None,
    );
    aggregator.extensions.insert(feed.clone());
    // Staircase: the proposers' text reaches the aggregator only through the feed.
    let mut staircase = chat(
        vec![ChatMessage::new(
            Role::User,
            "In two sentences, why do cities build bicycle lanes?",
        )],
        None,
    );
    staircase.extensions.insert(feed);
    vec![
        (
            "list",
            chat(
                vec![ChatMessage::new(
                    Role::User,
                    format!("Repeat this list three times: {LIST}"),
                )],
                None,
            ),
        ),
        (
            "code",
            chat(
                vec![
                    ChatMessage::new(
                        Role::User,
                        "Write functions for a rectangle's area and perimeter.",
                    ),
                    ChatMessage::new(Role::Assistant, CODE),
                    ChatMessage::new(Role::User, "Show the same code again."),
                ],
                Some("```python\ndef"),
            ),
        ),
        ("aggregator", aggregator),
        ("staircase", staircase),
        (
            "novel",
            chat(
                vec![ChatMessage::new(
                    Role::User,
                    "Write a short story about a lighthouse keeper who finds a strange map.",
                )],
                None,
            ),
        ),
    ]
}

/// Greedy decoding of one sequence at a time gives the same tokens with speculation (eager,
/// so every step verifies a long draft) as without, on repetitive and novel text; and the
/// KV the speculative engine keeps afterwards (in its prefix cache) has exactly as many
/// positions as the plain engine's, so no rejected draft token stayed behind.
///
/// Both engines use flash attention, whose kernels are batch-invariant (measured: a token's
/// logits are bit-identical whether it was decoded alone or in a batch of 12). Without it,
/// llama.cpp's attention takes another kernel for one query than for several, logits move by
/// up to ~0.4, and near-ties can flip: see the next test.
#[test]
fn greedy_with_speculation_is_token_identical_for_a_sequence_alone() {
    let _guard = serial();
    let plain = plain_engine(true);
    let expected: Vec<Answer> = corpus(96)
        .into_iter()
        .map(|(_, r)| collect(plain.submit(r).unwrap()))
        .collect();
    let plain_kv = plain
        .wait_for_stats(WAIT, |s| s.live_sequences == 0)
        .expect("plain engine idle");
    drop(plain);

    let speculative = engine(eager_speculation(), true);
    for ((name, request), expected) in corpus(96).into_iter().zip(&expected) {
        let answer = collect(speculative.submit(request).unwrap());
        assert_eq!(
            answer.tokens, expected.tokens,
            "{name}: speculation changed the output"
        );
        let stats = answer.speculation.expect("speculation stats in usage");
        eprintln!(
            "{name}: {} tokens, {}/{} draft tokens accepted, {:.2} tokens per forward",
            answer.usage.completion_tokens,
            stats.accepted_tokens,
            stats.drafted_tokens,
            stats.tokens_per_forward()
        );
        assert!(
            stats.drafted_tokens > 0,
            "{name}: eager speculation drafted nothing"
        );
    }
    let spec_kv = speculative
        .wait_for_stats(WAIT, |s| s.live_sequences == 0)
        .expect("speculative engine idle");
    eprintln!("engine totals: {:?}", spec_kv.speculation);
    assert!(spec_kv.speculation.accepted_tokens > 0);
    assert!(
        spec_kv
            .speculation
            .by_source
            .get(&DraftSource::Pipeline)
            .is_some_and(|s| s.drafted_tokens > 0),
        "the pipeline feed was drafted from"
    );
    assert!(
        spec_kv.speculation.accepted_tokens < spec_kv.speculation.drafted_tokens,
        "some drafts were rejected, so rollback was exercised"
    );
    assert_eq!(spec_kv.cache_cells, plain_kv.cache_cells);
    assert_eq!(
        spec_kv.kv_sequence_positions, plain_kv.kv_sequence_positions,
        "llama.cpp holds exactly the positions plain decoding left"
    );
}

/// With DRY on, speculation still gives exactly the tokens plain decoding gives: the verify
/// path samples each fed position through the request's sampler chain, which has accepted
/// exactly the tokens emitted before it (verification stops at the first mismatch).
#[test]
fn greedy_with_dry_and_speculation_is_token_identical() {
    let _guard = serial();
    let with_dry = || {
        corpus(64).into_iter().map(|(name, mut r)| {
            r.sampling.dry = DrySampling::RECOMMENDED;
            (name, r)
        })
    };
    let plain = plain_engine(true);
    let expected: Vec<Answer> = with_dry()
        .map(|(_, r)| collect(plain.submit(r).unwrap()))
        .collect();
    drop(plain);
    let speculative = engine(eager_speculation(), true);
    let mut accepted = 0;
    for ((name, request), expected) in with_dry().zip(&expected) {
        let answer = collect(speculative.submit(request).unwrap());
        assert_eq!(
            answer.tokens, expected.tokens,
            "{name}: speculation changed the output under DRY"
        );
        accepted += answer.speculation.map_or(0, |s| s.accepted_tokens);
    }
    assert!(
        accepted > 0,
        "drafts were accepted, so verification ran under DRY"
    );
}

/// Largest top-2 logit margin at which a divergence still counts as a near-tie. Batch shape
/// changes llama.cpp's attention kernel (flash attention off) and so the rounding of
/// activations before their 8-bit quantisation; measured logit shifts are up to ~0.4.
const NEAR_TIE: f32 = 0.5;

/// Checks that every divergence of `got` from `expected` (plain, solo) is at a near-tie of
/// the plain model's top two logits, and that the token taken there is the other of the two.
/// Returns how many outputs diverged.
fn assert_divergences_at_near_ties(
    plain: &LocalEngine,
    expected: &[Answer],
    got: &[Answer],
    max_tokens: u32,
) -> usize {
    let mut divergences = 0;
    for (((name, request), expected), got) in corpus(max_tokens).into_iter().zip(expected).zip(got)
    {
        let Some(at) = expected
            .tokens
            .iter()
            .zip(&got.tokens)
            .position(|(a, b)| a != b)
        else {
            assert_eq!(
                expected.tokens.len(),
                got.tokens.len(),
                "{name}: one output stops early without a differing token"
            );
            continue;
        };
        divergences += 1;
        let mut context = plain.prompt_tokens(&request.prompt).unwrap();
        context.extend_from_slice(&expected.tokens[..at]);
        let top = plain.next_token_logits(&context, 2).unwrap();
        let margin = top[0].1 - top[1].1;
        eprintln!("{name}: diverges at token {at}, top-2 margin {margin:.4}");
        assert!(
            margin < NEAR_TIE,
            "{name}: diverged at token {at} where the top-2 margin is {margin}"
        );
        assert!(
            [top[0].0, top[1].0].contains(&got.tokens[at]),
            "{name}: the token taken is not one of the two near-tied ones"
        );
    }
    eprintln!("{divergences} of {} outputs diverged", got.len());
    divergences
}

/// On the default (fastest) kernels, speculation may change a greedy token only where the
/// top two logits nearly tie, like batching does.
#[test]
fn greedy_with_speculation_on_default_kernels_diverges_only_at_near_ties() {
    let _guard = serial();
    let plain = plain_engine(false);
    let expected: Vec<Answer> = corpus(96)
        .into_iter()
        .map(|(_, r)| collect(plain.submit(r).unwrap()))
        .collect();
    let speculative = engine(eager_speculation(), false);
    let got: Vec<Answer> = corpus(96)
        .into_iter()
        .map(|(_, r)| collect(speculative.submit(r).unwrap()))
        .collect();
    assert_divergences_at_near_ties(&plain, &expected, &got, 96);
}

/// With sequences batched alongside (default kernels), every divergence from the solo plain
/// output is at a near-tie.
#[test]
fn batched_speculation_diverges_only_at_near_ties() {
    let _guard = serial();
    let plain = plain_engine(false);
    let solo: Vec<Answer> = corpus(64)
        .into_iter()
        .map(|(_, r)| collect(plain.submit(r).unwrap()))
        .collect();
    let speculative = engine(eager_speculation(), false);
    let streams: Vec<GenerationStream> = corpus(64)
        .into_iter()
        .map(|(_, r)| speculative.submit(r).unwrap())
        .collect();
    let batched: Vec<Answer> = streams.into_iter().map(collect).collect();
    assert_divergences_at_near_ties(&plain, &solo, &batched, 64);
    let stats = speculative
        .wait_for_stats(WAIT, |s| s.live_sequences == 0)
        .expect("idle");
    assert!(
        stats.speculation.drafted_tokens > 0,
        "drafts were verified in batches"
    );
}

/// Decoding a rejected draft and removing it leaves the KV cache as if it had never been
/// decoded: the next token's logits equal those of a context that never saw the draft.
/// Without the removal they differ, so the comparison can fail.
#[test]
fn kv_rollback_leaves_the_cache_as_if_rejected_tokens_were_never_decoded() {
    let _guard = serial();
    let model = load_model(&model_path()).unwrap();
    let vocab = model.vocab();
    let prompt: Vec<LlamaToken> = vocab.tokenize(
        b"The lighthouse keeper climbed the stairs and looked out over the sea.",
        false,
        false,
    );
    let next = vocab.tokenize(b" Then", false, false)[0];
    let draft: Vec<LlamaToken> = vocab.tokenize(b" purple elephants sang loudly", false, false);
    let n = prompt.len();

    let new_context = || {
        model
            .new_context(
                backend().unwrap(),
                context_params(512, 64, 1, 1, DEFAULT_FLASH_ATTENTION),
            )
            .unwrap()
    };
    let decode =
        |ctx: &mut llama_cpp_2::context::LlamaContext, tokens: &[LlamaToken], start: usize| {
            let mut batch = LlamaBatch::new(64, 1);
            for (i, &t) in tokens.iter().enumerate() {
                batch.add(t, (start + i) as i32, &[0], true).unwrap();
            }
            ctx.decode(&mut batch).unwrap();
            ctx.get_logits_ith(tokens.len() as i32 - 1).to_vec()
        };
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };

    // Reference: the prompt, then the next token.
    let mut reference = new_context();
    decode(&mut reference, &prompt, 0);
    let expected = decode(&mut reference, &[next], n);

    // Speculative: the prompt's last token with a draft verified in one batch, the draft
    // rejected and removed, then the next token at the draft's first position.
    let mut rolled_back = new_context();
    decode(&mut rolled_back, &prompt[..n - 1], 0);
    let mut verify_inputs = vec![prompt[n - 1]];
    verify_inputs.extend(&draft);
    decode(&mut rolled_back, &verify_inputs, n - 1);
    assert!(
        rolled_back
            .clear_kv_cache_seq(Some(0), Some(n as u32), None)
            .unwrap()
    );
    assert_eq!(rolled_back.kv_cache_seq_pos_max(0), n as i32 - 1);
    let got = decode(&mut rolled_back, &[next], n);
    let diff = max_diff(&expected, &got);
    eprintln!("rolled back vs never decoded: max logit difference {diff:e}");
    assert!(diff < 1e-3, "rolled-back cache differs: {diff}");

    // Control: without the removal the next token (placed after the stale draft, since
    // positions must grow) attends to the draft, and the logits differ.
    let mut not_rolled_back = new_context();
    decode(&mut not_rolled_back, &prompt[..n - 1], 0);
    decode(&mut not_rolled_back, &verify_inputs, n - 1);
    let stale = decode(&mut not_rolled_back, &[next], n + draft.len());
    let stale_diff = max_diff(&expected, &stale);
    eprintln!("draft left in the cache: max logit difference {stale_diff:e}");
    assert!(stale_diff > 1e-2, "the control should see the stale draft");
}

/// Sampled requests go through the same verification (a draft token is kept when the
/// sampled token equals it) and finish normally with speculation counted.
#[test]
fn sampled_requests_speculate_and_finish() {
    let _guard = serial();
    let speculative = engine(eager_speculation(), false);
    let (_, mut request) = corpus(48).into_iter().next().expect("corpus");
    request.sampling.temperature = 0.7;
    request.sampling.seed = 7;
    let answer = collect(speculative.submit(request).unwrap());
    assert!(!answer.tokens.is_empty());
    let stats = answer.speculation.expect("speculation stats");
    assert!(stats.drafted_tokens > 0);
}
