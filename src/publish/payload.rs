//! The JSON payloads vigil publishes. The README's "Topics and payloads" documents each one.

use serde::Serialize;
use vigil_engine::model::ModelInfo;

use crate::frame::{Detection, FrameResult, HeadInfo, Ranked};
use crate::wire::timestamp;

/// One class or group over its threshold in one frame: `<prefix>/<camera>/detection/<label>`.
#[derive(Debug, Serialize)]
pub struct DetectionPayload<'a> {
    pub seq: u64,
    pub camera: &'a str,
    /// The zone; null for the whole frame.
    pub zone: Option<&'a str>,
    pub label: &'a str,
    pub kind: &'a str,
    pub score: f32,
    pub threshold: f32,
    pub frame: u64,
    /// Stream time of the frame, seconds.
    pub pts: Option<f64>,
    /// Wall-clock time the frame reached vigil, RFC 3339 UTC.
    pub timestamp: String,
    pub model: &'a ModelInfo,
    /// The head that labelled the region; null: the model's own labels.
    pub head: Option<&'a HeadInfo>,
}

/// One frame's top-k and detections: `<prefix>/<camera>/frames` (opt-in), and `vigil classify`.
#[derive(Debug, Serialize)]
pub struct FramePayload<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub camera: &'a str,
    /// The zone; null for the whole frame.
    pub zone: Option<&'a str>,
    pub frame: u64,
    pub pts: Option<f64>,
    pub timestamp: String,
    pub model: &'a ModelInfo,
    /// The head that labelled the region; null: the model's own labels.
    pub head: Option<&'a HeadInfo>,
    pub top: &'a [Ranked],
    pub detections: &'a [Detection],
}

impl<'a> FramePayload<'a> {
    pub fn new(r: &'a FrameResult, model: &'a ModelInfo, seq: Option<u64>) -> Self {
        FramePayload {
            seq,
            camera: &r.meta.camera,
            zone: r.meta.zone_name(),
            frame: r.meta.index,
            pts: r.meta.pts.map(|p| p.as_secs_f64()),
            timestamp: timestamp(r.meta.wall),
            model,
            head: r.head.as_deref(),
            top: &r.top,
            detections: &r.detections,
        }
    }
}

impl<'a> DetectionPayload<'a> {
    pub fn new(r: &'a FrameResult, d: &'a Detection, model: &'a ModelInfo, seq: u64) -> Self {
        DetectionPayload {
            seq,
            camera: &r.meta.camera,
            zone: r.meta.zone_name(),
            label: &d.label,
            kind: d.kind,
            score: d.score,
            threshold: d.threshold,
            frame: r.meta.index,
            pts: r.meta.pts.map(|p| p.as_secs_f64()),
            timestamp: timestamp(r.meta.wall),
            model,
            head: r.head.as_deref(),
        }
    }
}
