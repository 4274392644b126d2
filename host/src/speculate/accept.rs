//! Deciding which drafted tokens the model would have produced itself.
//!
//! The model's outputs at every draft position come from one batched forward pass: position
//! `i` holds the prediction after the context plus `draft[..i]`. Greedy requests accept the
//! longest prefix equal to the argmax and then take the model's own next token. Sampled
//! requests use the speculative-sampling rule for a point-mass draft (Leviathan et al. 2023,
//! Chen et al. 2023 with `q = δ(x)`): accept `x` with probability `p(x)`; on rejection sample
//! from `p` with `x` removed and renormalised. Either way the emitted tokens have exactly the
//! distribution of plain decoding. This file decides; it must not touch the model or KV cache.

use crate::engine::SamplingParams;
use crate::token::TokenId;

/// The outcome of verifying one draft.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// How many draft tokens were accepted (a prefix of the draft).
    pub accepted: usize,
    /// The tokens to emit: the accepted draft tokens then one token of the model's own
    /// (the correction after a rejection, or the next token when all were accepted).
    pub emitted: Vec<TokenId>,
}

/// Verification by the model's own choice. `choose(i)` is the token plain decoding would
/// emit at position `i` (for `i` in `0..=draft.len()`; called only for positions reached):
/// the argmax for greedy requests, a fresh sample from the target distribution for sampled
/// ones. Draft tokens are kept while they equal that choice; the first differing choice is
/// emitted as the correction, and after a fully accepted draft the choice at the last
/// position is the bonus token.
///
/// For sampling this *is* the point-mass speculative rule: a sample `y ~ p` equals the draft
/// `x` with probability `p(x)` (accept), and given `y != x` it is distributed as `p` without
/// `x`, renormalised (the residual). So the engine can use llama.cpp's own sampler chain.
pub fn verify(draft: &[TokenId], mut choose: impl FnMut(usize) -> TokenId) -> Verdict {
    let mut emitted = Vec::with_capacity(draft.len() + 1);
    for (i, &token) in draft.iter().enumerate() {
        let choice = choose(i);
        emitted.push(choice);
        if choice != token {
            return Verdict {
                accepted: i,
                emitted,
            };
        }
    }
    emitted.push(choose(draft.len()));
    Verdict {
        accepted: draft.len(),
        emitted,
    }
}

/// A probability distribution over the tokens with non-zero mass, after temperature, top-k
/// and top-p. Probabilities sum to 1.
#[derive(Clone, Debug, PartialEq)]
pub struct Distribution {
    entries: Vec<(TokenId, f64)>,
}

impl Distribution {
    /// From `(token, probability)` pairs with non-negative weights (normalised here).
    /// `None` if the weights do not sum to a positive finite number.
    pub fn from_weights(weights: impl IntoIterator<Item = (TokenId, f64)>) -> Option<Self> {
        let entries: Vec<(TokenId, f64)> = weights.into_iter().filter(|&(_, w)| w > 0.0).collect();
        let total: f64 = entries.iter().map(|&(_, w)| w).sum();
        if !(total.is_finite() && total > 0.0) {
            return None;
        }
        Some(Self {
            entries: entries.into_iter().map(|(t, w)| (t, w / total)).collect(),
        })
    }

    /// The distribution plain sampling draws from, given raw logits indexed by token id.
    /// Same order as llama.cpp's default sampler chain: top-k, then top-p on the softmax of
    /// the raw logits (the smallest set reaching `top_p`), then temperature on the survivors.
    /// `None` for a temperature of 0 (greedy has no distribution) or all-invalid logits.
    pub fn from_logits(logits: &[f32], params: &SamplingParams) -> Option<Self> {
        if params.temperature <= 0.0 {
            return None;
        }
        let mut scored: Vec<(TokenId, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (TokenId(i32::try_from(i).unwrap_or(i32::MAX)), f64::from(l)))
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if params.top_k > 0 {
            scored.truncate(params.top_k as usize);
        }
        let max = scored.first()?.1;
        if params.top_p < 1.0 {
            let weights: Vec<f64> = scored.iter().map(|&(_, s)| (s - max).exp()).collect();
            let target = f64::from(params.top_p) * weights.iter().sum::<f64>();
            let mut acc = 0.0;
            let keep = weights
                .iter()
                .position(|w| {
                    acc += w;
                    acc >= target
                })
                .map_or(weights.len(), |i| i + 1);
            scored.truncate(keep);
        }
        let temperature = f64::from(params.temperature);
        Self::from_weights(
            scored
                .into_iter()
                .map(|(t, s)| (t, ((s - max) / temperature).exp())),
        )
    }

    /// Probability of `token`.
    pub fn prob(&self, token: TokenId) -> f64 {
        self.entries
            .iter()
            .find(|&&(t, _)| t == token)
            .map_or(0.0, |&(_, p)| p)
    }

    /// Draws a token with `u` uniform in [0, 1), skipping `exclude` (whose mass is removed
    /// and the rest renormalised). `None` only if nothing else has mass.
    fn sample_excluding(&self, u: f64, exclude: Option<TokenId>) -> Option<TokenId> {
        let mass: f64 = self
            .entries
            .iter()
            .filter(|&&(t, _)| Some(t) != exclude)
            .map(|&(_, p)| p)
            .sum();
        if mass <= 0.0 {
            return None;
        }
        let target = u * mass;
        let mut acc = 0.0;
        let mut chosen = None;
        for &(t, p) in self.entries.iter().filter(|&&(t, _)| Some(t) != exclude) {
            acc += p;
            chosen = Some(t);
            if acc > target {
                break;
            }
        }
        chosen
    }

    /// Draws a token (plain sampling).
    pub fn sample(&self, rng: &mut SplitMix64) -> TokenId {
        // Entries are non-empty by construction, so the draw always finds a token.
        self.sample_excluding(rng.next_f64(), None)
            .unwrap_or(self.entries[0].0)
    }
}

/// Sampled verification with explicit probabilities (the textbook form of the rule [`verify`]
/// applies by sampling): accept `x` with probability `p(x)`, else sample the residual.
/// `target(i)` is the distribution at position `i` (after the context
/// and `draft[..i]`), for `i` in `0..=draft.len()`; it is called only for positions reached.
pub fn verify_sampled(
    draft: &[TokenId],
    mut target: impl FnMut(usize) -> Distribution,
    rng: &mut SplitMix64,
) -> Verdict {
    let mut emitted = Vec::with_capacity(draft.len() + 1);
    for (i, &token) in draft.iter().enumerate() {
        let p = target(i);
        if rng.next_f64() < p.prob(token) {
            emitted.push(token);
            continue;
        }
        // Rejected: the residual max(0, p - δ(x)) is p without x. If x held all the mass it
        // cannot be rejected (u < 1 = p(x)), so the residual is never empty here.
        let correction = p
            .sample_excluding(rng.next_f64(), Some(token))
            .unwrap_or(token);
        emitted.push(correction);
        return Verdict {
            accepted: i,
            emitted,
        };
    }
    emitted.push(target(draft.len()).sample(rng));
    Verdict {
        accepted: draft.len(),
        emitted,
    }
}

/// A small seeded generator (SplitMix64, Steele et al. 2014): the acceptance rule needs
/// uniform draws reproducible from the request's seed, and the tree has no `rand`.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(i: i32) -> TokenId {
        TokenId(i)
    }

    #[test]
    fn accepts_matching_prefix_plus_correction() {
        let model = [t(1), t(2), t(9), t(4)];
        let v = verify(&[t(1), t(2), t(3)], |i| model[i]);
        assert_eq!(v.accepted, 2);
        assert_eq!(v.emitted, vec![t(1), t(2), t(9)]);
        let v = verify(&[t(1), t(2), t(9)], |i| model[i]);
        assert_eq!(v.accepted, 3);
        assert_eq!(v.emitted, model.to_vec());
        let v = verify(&[], |i| model[i]);
        assert_eq!(v.emitted, vec![t(1)]);
    }

    #[test]
    fn logits_respect_top_k_and_top_p() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            ..SamplingParams::default()
        };
        let d = Distribution::from_logits(&[0.0, 3.0, 2.0, 1.0], &params).unwrap();
        assert_eq!(d.prob(t(0)), 0.0);
        assert_eq!(d.prob(t(3)), 0.0);
        assert!((d.prob(t(1)) + d.prob(t(2)) - 1.0).abs() < 1e-12);
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..SamplingParams::default()
        };
        let d = Distribution::from_logits(&[0.0, 3.0, 2.0, 1.0], &params).unwrap();
        assert_eq!(d.prob(t(1)), 1.0);
        assert!(Distribution::from_logits(&[1.0], &SamplingParams::default()).is_none());
    }
}
