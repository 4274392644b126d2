//! Radix-tree prefix KV cache shared by every request of the local engine.
