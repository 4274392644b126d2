//! Token counting, apart from generation: budgets, chunk sizes and critical-path estimates
//! need counts for text no request has produced. A local engine counts with the tokenizer in
//! its GGUF; a server may offer `/tokenize`; otherwise a count is an estimate, and says so.

use std::future::Future;
use std::pin::Pin;

use super::EngineError;

/// Bytes per token when no tokenizer is available: typical of English text in BPE
/// vocabularies, and an over-estimate for most code, which keeps budgets safe.
pub const APPROX_BYTES_PER_TOKEN: usize = 4;

/// A token count, exact or estimated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenCount {
    /// What the model's own tokenizer gives.
    Exact(u32),
    /// A guess without the tokenizer ([`estimate_tokens`]).
    Estimate(u32),
}

impl TokenCount {
    /// The count, exact or not.
    pub fn get(self) -> u32 {
        match self {
            Self::Exact(n) | Self::Estimate(n) => n,
        }
    }

    pub fn is_estimate(self) -> bool {
        matches!(self, Self::Estimate(_))
    }
}

/// The estimate used without a tokenizer: one token per [`APPROX_BYTES_PER_TOKEN`] bytes,
/// rounded up.
pub fn estimate_tokens(text: &str) -> TokenCount {
    TokenCount::Estimate(
        u32::try_from(text.len().div_ceil(APPROX_BYTES_PER_TOKEN)).unwrap_or(u32::MAX),
    )
}

/// A future of a token count (the asynchronous side of [`TokenCounter`]).
pub type CountFuture<'a> =
    Pin<Box<dyn Future<Output = Result<TokenCount, EngineError>> + Send + 'a>>;

/// Counts the tokens of text as one model would.
pub trait TokenCounter: Send + Sync {
    /// A count without waiting on anything (no I/O): exact where the tokenizer is at hand,
    /// else an estimate. Callable from any thread, inside an async runtime or not.
    fn count(&self, text: &str) -> TokenCount;

    /// The best count the backend can give, which may ask a server (`/tokenize`). By
    /// default, [`Self::count`].
    fn count_exact<'a>(&'a self, text: &'a str) -> CountFuture<'a> {
        let count = self.count(text);
        Box::pin(std::future::ready(Ok(count)))
    }
}

/// A counter with no tokenizer: [`estimate_tokens`].
#[derive(Clone, Copy, Debug, Default)]
pub struct EstimatedTokens;

impl TokenCounter for EstimatedTokens {
    fn count(&self, text: &str) -> TokenCount {
        estimate_tokens(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_estimate_rounds_up_and_says_it_is_one() {
        assert_eq!(estimate_tokens(""), TokenCount::Estimate(0));
        assert_eq!(estimate_tokens("abcde").get(), 2);
        assert!(EstimatedTokens.count("abc").is_estimate());
        assert!(!TokenCount::Exact(3).is_estimate());
    }
}
