//! Choosing tokens from logits: llama.cpp's sampler chain for temperature sampling, our own
//! argmax for greedy decoding (the lowest id wins a tie, as in llama.cpp's greedy sampler).

use llama_cpp_2::sampling::LlamaSampler;

use crate::engine::SamplingParams;
use crate::token::TokenId;

/// The sampler chain of a request with a temperature above 0.
pub(super) fn build_sampler(sampling: &SamplingParams) -> LlamaSampler {
    let mut chain = Vec::new();
    if sampling.top_k > 0 {
        chain.push(LlamaSampler::top_k(sampling.top_k as i32));
    }
    if sampling.top_p < 1.0 {
        chain.push(LlamaSampler::top_p(sampling.top_p, 1));
    }
    chain.push(LlamaSampler::temp(sampling.temperature));
    // llama.cpp seeds are 32-bit; fold the high half in so every bit of ours matters.
    let seed = (sampling.seed ^ (sampling.seed >> 32)) as u32;
    chain.push(LlamaSampler::dist(seed));
    LlamaSampler::chain_simple(chain)
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
}
