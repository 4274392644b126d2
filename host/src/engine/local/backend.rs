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
            #[cfg(feature = "portable")]
            load_cpu_kernels();
            let backend = LlamaBackend::init().map_err(|error| error.to_string())?;
            tracing::info!(kernels = %system_info(), "llama.cpp backend ready");
            Ok(backend)
        })
        .as_ref()
        .map_err(|reason| EngineError::Internal(format!("llama.cpp backend: {reason}")))
}

/// What llama.cpp runs on, as it reports it: each backend and the CPU features its kernels
/// were built for (`CPU : SSE3 = 1 | AVX2 = 1 | ...`), so a portable build shows the variant
/// it chose.
pub fn system_info() -> String {
    // SAFETY: llama_print_system_info returns a pointer to a static buffer that stays valid
    // until the next call; it is copied out at once, and calls only happen after the backend
    // has been initialised.
    let info = unsafe { std::ffi::CStr::from_ptr(llama_cpp_sys_2::llama_print_system_info()) };
    info.to_string_lossy()
        .trim()
        .trim_end_matches('|')
        .trim()
        .to_owned()
}

/// Loads the CPU kernel modules of a portable build; ggml keeps the best-scoring one this CPU
/// can run. They sit in `lib/` beside the binary (`STAIRCASE_GGML_BACKENDS` overrides).
#[cfg(feature = "portable")]
fn load_cpu_kernels() {
    let dir = std::env::var_os("STAIRCASE_GGML_BACKENDS")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.join("lib"))
        });
    match dir {
        Some(dir) if dir.is_dir() && dir.to_str().is_some() => {
            llama_cpp_2::llama_backend::load_backends_from_path(&dir)
        }
        // A development build run from target/: the kernels stay where cargo built them.
        _ => llama_cpp_2::llama_backend::load_backends(),
    }
}
