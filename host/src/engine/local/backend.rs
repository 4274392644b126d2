//! The process-wide llama.cpp backend. llama.cpp may be initialised once per process, so every
//! engine (and the benchmark's bare loop) shares this one, created on first use.

use std::sync::OnceLock;

use llama_cpp_2::llama_backend::LlamaBackend;

use crate::engine::EngineError;

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

/// The shared backend; the first call initialises it and routes llama.cpp's logs to `tracing`
/// (target `llama-cpp-2`, so `RUST_LOG=llama-cpp-2=info` shows them).
pub fn backend() -> Result<&'static LlamaBackend, EngineError> {
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|error| error.to_string())
        })
        .as_ref()
        .map_err(|reason| EngineError::Internal(format!("llama.cpp backend: {reason}")))
}
