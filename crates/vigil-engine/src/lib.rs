//! vigil's inference engine: model manifests, ONNX Runtime sessions, execution providers, and
//! remote inference servers (the Open Inference Protocol over gRPC).
//!
//! It depends on `ort` (and serde/toml for the manifest) but not on GStreamer or OpenCV, so it
//! builds and benchmarks on machines that only have a GPU and ONNX Runtime (see
//! `src/bin/engine-bench.rs` and `benches/gpu.sh`).

pub mod config;
pub mod infer;
pub mod model;
pub mod remote;
pub mod serving;
