//! The `[inference]` section of vigil's config: which execution provider, threads, library.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Cpu,
    Cuda,
    Tensorrt,
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::Tensorrt => "tensorrt",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct InferenceConfig {
    /// Execution provider: "cpu", "cuda" or "tensorrt".
    pub provider: Provider,
    /// Fail at start-up when the provider cannot be had, instead of falling back to CPU.
    pub require_provider: bool,
    pub device_id: i32,
    /// Threads ONNX Runtime uses inside one operator; 0 = one per core.
    pub intra_threads: usize,
    /// Threads running independent operators in parallel; 0 = sequential execution.
    pub inter_threads: usize,
    /// Inference sessions running batches side by side (each a copy of the model; results
    /// stay in order). More than 1 helps on machines with many cores or several GPU streams.
    pub sessions: usize,
    /// Let idle ONNX Runtime threads spin (lower latency on a machine that does nothing else;
    /// on a box that also decodes video, the decoders need those cycles).
    pub spinning: bool,
    /// Path to `libonnxruntime.so`. Empty: `$ORT_DYLIB_PATH`, then `.deps/onnxruntime/libonnxruntime.so`.
    pub library: Option<PathBuf>,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            provider: Provider::Cpu,
            require_provider: false,
            device_id: 0,
            intra_threads: 0,
            inter_threads: 0,
            sessions: 1,
            spinning: false,
            library: None,
        }
    }
}
