//! What flows between the stages.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use opencv::core::Mat;

/// Where a frame came from and when.
#[derive(Debug, Clone)]
pub struct FrameMeta {
    pub camera: Arc<str>,
    /// Position of the frame in its source's output, counting every frame (also skipped ones).
    pub index: u64,
    /// Presentation time in the stream (for looped files it keeps growing across loops).
    pub pts: Option<Duration>,
    /// Wall-clock time the frame reached vigil.
    pub wall: SystemTime,
    /// Monotonic time the frame reached vigil, for latency figures.
    pub arrived: Instant,
}

/// Pixels of one frame, 8-bit BGR, top row first.
pub enum Pixels {
    /// A decoded GStreamer buffer, not copied: the preprocess worker maps it.
    Gst {
        buffer: gstreamer::Buffer,
        info: gstreamer_video::VideoInfo,
    },
    /// An image read by OpenCV (`vigil classify` on a photo).
    Mat(Mat),
}

pub struct Frame {
    pub meta: FrameMeta,
    pub pixels: Pixels,
}

/// A frame turned into the model's input: one slot of a batch.
pub struct Prepared {
    pub meta: FrameMeta,
    pub tensor: Vec<f32>,
}

/// Frames classified together.
pub struct Batch {
    /// Numbered in the order batches are made (to keep that order with several sessions).
    pub seq: u64,
    pub metas: Vec<FrameMeta>,
    /// `metas.len()` images, each `InputSpec::len()` values, in the model's layout.
    pub data: Vec<f32>,
}

/// A frame's class scores as the model gave them (logits or probabilities).
pub struct Scored {
    pub meta: FrameMeta,
    pub scores: Vec<f32>,
}
