//! What flows between the stages.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Sender;
use opencv::core::Mat;

use crate::decide::FrameResult;
use crate::serving::{LoadedModel, ModelVersion};

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
    /// Set for a predict request: its result goes here instead of to the cameras' sink.
    pub reply: Option<Sender<FrameResult>>,
}

impl FrameMeta {
    /// A frame of `camera` reaching vigil now.
    pub fn new(camera: Arc<str>, index: u64, pts: Option<Duration>) -> FrameMeta {
        FrameMeta {
            camera,
            index,
            pts,
            wall: SystemTime::now(),
            arrived: Instant::now(),
            reply: None,
        }
    }
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

impl Clone for Pixels {
    /// A GStreamer buffer is shared (reference counted); a Mat is copied.
    fn clone(&self) -> Self {
        match self {
            Pixels::Gst { buffer, info } => Pixels::Gst {
                buffer: buffer.clone(),
                info: info.clone(),
            },
            Pixels::Mat(m) => Pixels::Mat(m.clone()),
        }
    }
}

impl std::fmt::Debug for Pixels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pixels::Gst { info, .. } => write!(
                f,
                "Pixels::Gst({}x{} {:?})",
                info.width(),
                info.height(),
                info.format()
            ),
            Pixels::Mat(m) => write!(
                f,
                "Pixels::Mat({:?})",
                opencv::prelude::MatTraitConst::size(m)
            ),
        }
    }
}

pub struct Frame {
    pub meta: FrameMeta,
    pub pixels: Pixels,
}

/// A frame turned into the model's input: one slot of a batch.
pub struct Prepared {
    pub meta: FrameMeta,
    pub tensor: Vec<f32>,
    /// The frame's pixels, kept (not copied) for snapshots when the graph is asked to.
    pub pixels: Option<Pixels>,
}

/// Frames classified together.
pub struct Batch {
    /// Numbered in the order batches are made (to keep that order with several sessions).
    pub seq: u64,
    pub metas: Vec<FrameMeta>,
    /// Each frame's pixels, when kept.
    pub pixels: Vec<Option<Pixels>>,
    /// The model version that classifies this batch (taken when the batch is made).
    pub model: Option<Arc<LoadedModel>>,
    /// `metas.len()` images, each `InputSpec::len()` values, in the model's layout.
    pub data: Vec<f32>,
}

/// A frame's class scores as the model gave them (logits or probabilities).
pub struct Scored {
    pub meta: FrameMeta,
    pub scores: Vec<f32>,
    pub pixels: Option<Pixels>,
    /// The version that produced the scores.
    pub model: Arc<ModelVersion>,
}
