//! The `[inference]` section of vigil's config: which execution provider, threads, library, and
//! the inference server for `provider = "remote"`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Cpu,
    Cuda,
    Tensorrt,
    /// An inference server speaking the Open Inference Protocol (`[inference.remote]`).
    Remote,
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::Tensorrt => "tensorrt",
            Provider::Remote => "remote",
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
    /// The inference server, for `provider = "remote"`.
    pub remote: Option<RemoteConfig>,
}

impl InferenceConfig {
    /// How many engines run batches side by side: `sessions`, or for a remote provider the
    /// requests kept in flight.
    pub fn engines(&self) -> usize {
        match (&self.provider, &self.remote) {
            (Provider::Remote, Some(r)) => r.in_flight.max(1),
            _ => self.sessions.max(1),
        }
    }
}

/// What to do with frames while the inference server cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Count them as dropped.
    None,
    /// Classify them with the local model (the manifest's variant, on the CPU).
    Local,
}

/// `[inference.remote]`: an inference server speaking the Open Inference Protocol (KServe v2)
/// over gRPC, such as NVIDIA Triton.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct RemoteConfig {
    /// `grpc://host:port`, or `grpcs://host:port` for TLS.
    pub url: String,
    /// The model's name on the server; empty: the manifest's name.
    pub model: String,
    /// The model's version on the server; empty: the server's choice.
    pub version: String,
    /// The longest a request (or a connection attempt) may take before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Requests sent without waiting for the previous one's answer; results stay in order.
    pub in_flight: usize,
    /// The longest wait between two attempts to reach a server that is down.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// PEM file of the certificate authority that signed the server's certificate (grpcs://);
    /// empty: the system's store.
    pub ca_file: Option<PathBuf>,
    pub fallback: Fallback,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            model: String::new(),
            version: String::new(),
            timeout: Duration::from_secs(2),
            in_flight: 2,
            max_backoff: Duration::from_secs(30),
            ca_file: None,
            fallback: Fallback::None,
        }
    }
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
            remote: None,
        }
    }
}
