//! vigil watches live CCTV cameras, classifies what they see with an ONNX model and publishes the
//! results to MQTT.
//!
//! The tree reads as a frame walks, bottom to top; a room imports only rooms below it.
//!
//! ```text
//! camera (rtsp/file/test)    source/          GStreamer pipeline per camera (spec.rs, template.rs,
//!        │ Frame                              pipelines/*.gst), frames gated (gate.rs) and queued
//!        ▼                                    (queue.rs: live drops the oldest, files block)
//! preprocess workers         pipeline/preprocess.rs  crop / resize / normalise into a tensor
//!        ▼
//! batcher                    pipeline/batch.rs       up to max_batch frames across cameras
//!        ▼
//! inference                  pipeline/infer.rs       ONNX Runtime (crates/vigil-engine)
//!        ▼
//! decide                     pipeline/decide.rs      softmax, top-k, groups, thresholds
//!        ▼
//! sink                       app/sink.rs             results → events → MQTT, snapshots
//!        ├─► events.rs       the event lifecycle per camera and label
//!        ├─► publish/        MQTT: publisher, connection, incoming, outbox, payloads, HA
//!        └─► ops/            HTTP API, service (reload, model switch, predict), /metrics, snapshots
//! ```
//!
//! At the bottom, imported by all: `frame.rs` (what flows between stages), `stats.rs` (every
//! stage's counters), `images.rs` (still images in and out), `wire.rs` (timestamps, topic levels), `secrets.rs`, `shutdown.rs` (one stop
//! signal), `sync.rs` (locks that survive a panic). `config/` gathers every section and checks
//! them; `pipeline/mod.rs` wires the stages; `app/` runs the commands.

pub mod app;
pub mod config;
pub mod events;
pub mod frame;
pub mod images;
pub mod ops;
pub mod pipeline;
pub mod publish;
pub mod secrets;
pub mod shutdown;
pub mod source;
pub mod stats;
pub mod sync;
pub mod teach;
pub mod wire;

pub use vigil_engine::{infer, model, serving};
