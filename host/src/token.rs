//! Token ids: the one type `engine/`, `speculate/` and `cache/` all speak. It lives in this
//! leaf module so none of those rooms depends on another just to name a token. It must not
//! grow anything else (vocabularies and tokenizers belong to the engines).

use serde::{Deserialize, Serialize};

/// A token id in a model's vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TokenId(pub i32);
