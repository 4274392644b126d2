//! The embedded engine: GGUF models on llama.cpp kernels under our own scheduler.
