//! Suffix-automaton speculative decoding: drafts from what this request, its pipeline and past sessions already said.
