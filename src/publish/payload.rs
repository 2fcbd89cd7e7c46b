//! The JSON payloads vigil publishes. The README's "Topics and payloads" documents each one.

use std::time::SystemTime;

use serde::Serialize;

use crate::decide::{Detection, FrameResult, Ranked};

#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
}

impl ModelInfo {
    pub fn of(manifest: &crate::model::Manifest) -> Self {
        ModelInfo {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
        }
    }
}

/// One class or group over its threshold in one frame: `<prefix>/<camera>/detection/<label>`.
#[derive(Debug, Serialize)]
pub struct DetectionPayload<'a> {
    pub seq: u64,
    pub camera: &'a str,
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
}

/// One frame's top-k and detections: `<prefix>/<camera>/frames` (opt-in), and `vigil classify`.
#[derive(Debug, Serialize)]
pub struct FramePayload<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub camera: &'a str,
    pub frame: u64,
    pub pts: Option<f64>,
    pub timestamp: String,
    pub model: &'a ModelInfo,
    pub top: &'a [Ranked],
    pub detections: &'a [Detection],
}

pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl<'a> FramePayload<'a> {
    pub fn new(r: &'a FrameResult, model: &'a ModelInfo, seq: Option<u64>) -> Self {
        FramePayload {
            seq,
            camera: &r.meta.camera,
            frame: r.meta.index,
            pts: r.meta.pts.map(|p| p.as_secs_f64()),
            timestamp: timestamp(r.meta.wall),
            model,
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
            label: &d.label,
            kind: d.kind,
            score: d.score,
            threshold: d.threshold,
            frame: r.meta.index,
            pts: r.meta.pts.map(|p| p.as_secs_f64()),
            timestamp: timestamp(r.meta.wall),
            model,
        }
    }
}

/// A label as one MQTT topic level: lower case, runs of anything but letters and digits become
/// one `_` ("crane (bird)" → "crane_bird", "Granny Smith" → "granny_smith").
pub fn topic_level(label: &str) -> String {
    let mut out = String::with_capacity(label.len());
    for c in label.chars() {
        if c.is_alphanumeric() || c == '-' {
            out.extend(c.to_lowercase());
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
    }
    while out.ends_with('_') {
        out.pop();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_become_clean_topic_levels() {
        assert_eq!(topic_level("crane (bird)"), "crane_bird");
        assert_eq!(topic_level("Granny Smith"), "granny_smith");
        assert_eq!(topic_level("jack-o'-lantern"), "jack-o_-lantern");
        assert_eq!(topic_level("cat/dog+#"), "cat_dog");
    }
}
