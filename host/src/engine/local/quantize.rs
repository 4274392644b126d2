//! Converting a GGUF to another quantization with llama.cpp's own quantizer (the safe
//! `llama-cpp-2` API does not wrap it). Used to measure, and optionally provide, a variant of
//! the default model whose kernels are faster on this CPU.

use std::ffi::CString;
use std::path::Path;

use crate::engine::EngineError;

/// Target weight formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Quantization {
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q8_0")]
    Q8_0,
}

impl Quantization {
    fn ftype(self) -> llama_cpp_sys_2::llama_ftype {
        match self {
            Self::Q4_0 => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_Q4_0,
            Self::Q8_0 => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_Q8_0,
        }
    }

    /// File-name tag, as in `SmolLM2-135M-Instruct.Q8_0.gguf`.
    pub fn tag(self) -> &'static str {
        match self {
            Self::Q4_0 => "Q4_0",
            Self::Q8_0 => "Q8_0",
        }
    }
}

/// Writes `input` requantized to `to` at `output`.
pub fn quantize(
    input: &Path,
    output: &Path,
    to: Quantization,
    threads: usize,
) -> Result<(), EngineError> {
    if !input.is_file() {
        return Err(EngineError::ModelNotFound {
            path: input.to_path_buf(),
        });
    }
    super::backend()?;
    let c_path = |path: &Path| {
        CString::new(path.to_string_lossy().as_bytes()).map_err(|_| {
            EngineError::InvalidRequest(format!("path {} contains a NUL byte", path.display()))
        })
    };
    let (c_input, c_output) = (c_path(input)?, c_path(output)?);
    // SAFETY: plain C call; `params` is a value from llama.cpp's own defaults with scalar
    // fields changed, the strings outlive the call, and the pointers in `params` stay null.
    let status = unsafe {
        let mut params = llama_cpp_sys_2::llama_model_quantize_default_params();
        params.ftype = to.ftype();
        params.nthread = threads as i32;
        params.allow_requantize = true;
        llama_cpp_sys_2::llama_model_quantize(c_input.as_ptr(), c_output.as_ptr(), &params)
    };
    if status != 0 {
        return Err(EngineError::InvalidModel {
            path: input.to_path_buf(),
            reason: format!(
                "llama.cpp could not quantize it to {} (status {status})",
                to.tag()
            ),
        });
    }
    Ok(())
}

/// Where the `to` copy of `input` goes in `dir`: `Name.Q4_1.gguf` becomes `Name.Q8_0.gguf`
/// (a name without a tag gets one).
pub fn tagged_path(input: &Path, dir: &Path, to: Quantization) -> std::path::PathBuf {
    let stem = input
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let base = stem
        .rsplit_once('.')
        .map_or(stem.as_str(), |(base, _)| base);
    dir.join(format!("{base}.{}.gguf", to.tag()))
}

/// The `to` copy of `input` in `dir`, quantized now unless it is there already (a dual-model
/// pair of one model at two quantizations: the tests and `bench collab`). Written to a
/// temporary name first, so a reader never sees half a file.
pub fn quantized_copy(
    input: &Path,
    dir: &Path,
    to: Quantization,
    threads: usize,
) -> Result<std::path::PathBuf, EngineError> {
    let output = tagged_path(input, dir, to);
    if output.is_file() {
        return Ok(output);
    }
    let io = |e: std::io::Error| EngineError::Internal(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let partial = output.with_extension(format!("partial-{}", std::process::id()));
    quantize(input, &partial, to, threads)?;
    std::fs::rename(&partial, &output).map_err(io)?;
    Ok(output)
}
