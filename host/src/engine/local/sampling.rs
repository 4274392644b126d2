//! Choosing tokens from logits: llama.cpp's sampler chain for temperature sampling (top-k,
//! top-p and min-p in llama.cpp's default order), repetition penalties and DRY, our own argmax for plain greedy decoding (the lowest id wins
//! a tie, as in llama.cpp's greedy sampler). A request with none of them gets no sampler, so
//! greedy decoding with DRY off is exactly the argmax it always was.

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use crate::engine::SamplingParams;
use crate::token::TokenId;

/// llama.cpp's default DRY sequence breakers: a repeated span does not run across a newline,
/// a colon, a quote or an asterisk (list items and headings may share their openings).
const DRY_SEQUENCE_BREAKERS: [&str; 4] = ["\n", ":", "\"", "*"];

/// The sampler chain of a request; `None` for plain greedy decoding (argmax, no state).
/// A repetition penalty sees the prompt's last tokens first, so a continued answer (an
/// assistant prefix) counts against repeats too. DRY sees only the answer: the last
/// `answer_prefix` prompt tokens (the assistant prefix being continued) and what is
/// generated, never the rest of the prompt, since an aggregator quoting its proposers is its
/// job (and what speculation drafts from). `n_ctx` bounds DRY's "all tokens" (-1).
pub(super) fn build_sampler(
    sampling: &SamplingParams,
    model: &LlamaModel,
    n_ctx: usize,
    prompt: &[TokenId],
    answer_prefix: usize,
) -> Option<LlamaSampler> {
    let last_n = sampling.repeat_last_n as usize;
    let penalised = (sampling.repeat_penalty != 1.0
        || sampling.frequency_penalty != 0.0
        || sampling.presence_penalty != 0.0)
        && last_n > 0;
    let dry = sampling.dry.is_on();
    let greedy = sampling.temperature <= 0.0;
    if greedy && !penalised && !dry {
        return None;
    }
    let tokens = |slice: &[TokenId]| slice.iter().map(|t| LlamaToken(t.0)).collect::<Vec<_>>();
    let mut chain = Vec::new();
    if penalised {
        let window = i32::try_from(last_n).unwrap_or(i32::MAX);
        let mut penalties = LlamaSampler::penalties(
            model.n_vocab(),
            window,
            sampling.repeat_penalty,
            sampling.frequency_penalty,
            sampling.presence_penalty,
        );
        penalties.accept_many(tokens(&prompt[prompt.len().saturating_sub(last_n)..]));
        chain.push(penalties);
    }
    if dry {
        let all = i32::try_from(n_ctx).unwrap_or(i32::MAX);
        let window = match sampling.dry.penalty_last_n {
            -1 => all,
            n => n.min(all),
        };
        let allowed = i32::try_from(sampling.dry.allowed_length).unwrap_or(i32::MAX);
        let mut dry = LlamaSampler::dry(
            model,
            sampling.dry.multiplier,
            sampling.dry.base,
            allowed,
            window,
            DRY_SEQUENCE_BREAKERS,
        );
        dry.accept_many(tokens(
            &prompt[prompt.len().saturating_sub(answer_prefix)..],
        ));
        chain.push(dry);
    }
    if greedy {
        chain.push(LlamaSampler::greedy());
    } else {
        if sampling.top_k > 0 {
            chain.push(LlamaSampler::top_k(sampling.top_k as i32));
        }
        if sampling.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(sampling.top_p, 1));
        }
        if sampling.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(sampling.min_p, 1));
        }
        chain.push(LlamaSampler::temp(sampling.temperature));
        // llama.cpp seeds are 32-bit; fold the high half in so every bit of ours matters.
        let seed = (sampling.seed ^ (sampling.seed >> 32)) as u32;
        chain.push(LlamaSampler::dist(seed));
    }
    Some(LlamaSampler::chain_simple(chain))
}

/// Greedy choice; the lowest id wins a tie, as in llama.cpp's greedy sampler.
pub(super) fn argmax(logits: &[f32]) -> TokenId {
    let mut best = 0;
    for (index, &value) in logits.iter().enumerate() {
        if value > logits[best] {
            best = index;
        }
    }
    TokenId(best as i32)
}

/// The `k` highest logits, highest first.
pub(super) fn top_logits(logits: &[f32], k: usize) -> Vec<(TokenId, f32)> {
    let mut pairs: Vec<(TokenId, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (TokenId(i as i32), v))
        .collect();
    pairs.sort_by(|a, b| b.1.total_cmp(&a.1));
    pairs.truncate(k);
    pairs
}

/// The `k` most likely tokens of `logits` with their log-probabilities (log-softmax, with
/// the maximum subtracted so nothing overflows).
pub(super) fn top_logprobs(logits: &[f32], k: usize) -> Vec<(TokenId, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return Vec::new();
    }
    let log_sum = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    top_logits(logits, k)
        .into_iter()
        .map(|(id, logit)| (id, logit - log_sum))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_lowest_id_of_a_tie() {
        assert_eq!(argmax(&[0.5, 2.0, 2.0, -1.0]), TokenId(1));
        assert_eq!(
            top_logits(&[0.5, 2.0, 1.0], 2),
            vec![(TokenId(1), 2.0), (TokenId(2), 1.0)]
        );
    }

    #[test]
    fn top_logprobs_are_a_log_softmax() {
        // Logits ln 3, ln 1, 0 + ln 1: probabilities 3/5, 1/5, 1/5.
        let logits = [3f32.ln(), 0.0, 0.0];
        let top = top_logprobs(&logits, 2);
        assert_eq!(top[0].0, TokenId(0));
        assert!((top[0].1.exp() - 0.6).abs() < 1e-6, "{top:?}");
        assert!((top[1].1.exp() - 0.2).abs() < 1e-6, "{top:?}");
    }
}
