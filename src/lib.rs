//! vigil watches live CCTV cameras, classifies what they see with an ONNX model and publishes the
//! results to MQTT.
//!
//! ```text
//! camera (rtsp/file/test) ─► GStreamer pipeline per camera (source.rs, pipelines/*.gst)
//!        │ Frame (decoded BGR buffer, not copied)     bounded queue per camera:
//!        ▼                                             live drops the oldest, files block
//! preprocess workers (preprocess.rs)   crop / resize / normalise into a tensor slot (OpenCV)
//!        ▼
//! batcher (batch.rs)                   up to max_batch frames across cameras, or max_wait
//!        ▼
//! inference (infer.rs)                 ONNX Runtime session; provider cpu / cuda / tensorrt
//!        ▼
//! decide (decide.rs)                   softmax, top-k, class groups, per-class thresholds
//!        ▼
//! publish (publish/)                   MQTT (rumqttc, own thread) or JSON lines (classify)
//! ```
//!
//! Layout: `config.rs` (config types and validation), `model.rs` (model manifest), `graph.rs`
//! (wiring, cameras added and removed at runtime, shutdown), `serving.rs` (the model in service
//! and its switches), `metrics.rs` (counters), `prometheus.rs` (`/metrics`), `http.rs` (the HTTP
//! server) serving `api.rs` (its contract), implemented by `service.rs` (reload, predict, events,
//! snapshots), `snapshots.rs` (JPEGs), `app.rs` (the commands), `redact.rs` (secrets out of
//! logs).

pub mod api;
pub mod app;
pub use vigil_engine::{infer, model};
pub mod batch;
pub mod config;
pub mod decide;
pub mod events;
pub mod frame;
pub mod graph;
pub mod http;
pub mod metrics;
pub mod preprocess;
pub mod prometheus;
pub mod publish;
pub mod redact;
pub mod service;
pub mod serving;
pub mod snapshots;
pub mod source;
