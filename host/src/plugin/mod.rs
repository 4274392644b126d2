//! The WebAssembly plugin host: sandbox, loading, compiled-code cache and hot reload.
