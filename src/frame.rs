//! What flows between the stages: a camera's [`Frame`], a [`Prepared`] tensor, a [`Batch`], the
//! model's [`Scored`] output and the [`FrameResult`] decide makes of it. It imports nothing of
//! vigil's above it (only the engine's model types).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Sender;
use opencv::core::Mat;
use serde::Serialize;
use vigil_engine::model::ModelInfo;
use vigil_engine::serving::{LoadedModel, ModelVersion};

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
    /// The zone of the frame this is about; None: the whole frame.
    pub zone: Option<Arc<Zone>>,
    /// Which of the camera's regions are due for analysis (see [`Due`]).
    pub due: Due,
}

impl FrameMeta {
    /// A frame of `camera` reaching vigil now, every region due.
    pub fn new(camera: Arc<str>, index: u64, pts: Option<Duration>) -> FrameMeta {
        FrameMeta {
            camera,
            index,
            pts,
            wall: SystemTime::now(),
            arrived: Instant::now(),
            reply: None,
            zone: None,
            due: Due::ALL,
        }
    }

    /// The name of the frame's zone, if it is about one.
    pub fn zone_name(&self) -> Option<&str> {
        self.zone.as_deref().map(|z| &*z.name)
    }
}

/// A named part of a camera's frame, classified on its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Zone {
    pub name: Arc<str>,
    /// `[x0, y0, x1, y1]` as fractions of the frame's width and height.
    pub rect: [f32; 4],
    /// Pixels outside this polygon (fractions of the frame) are masked.
    pub polygon: Option<Vec<[f32; 2]>>,
}

impl Zone {
    /// Whether a point (fractions of the frame) is part of the zone.
    pub fn contains(&self, x: f32, y: f32) -> bool {
        let [x0, y0, x1, y1] = self.rect;
        if x < x0 || x > x1 || y < y0 || y > y1 {
            return false;
        }
        let Some(polygon) = &self.polygon else {
            return true;
        };
        // Even-odd rule.
        let mut inside = false;
        let mut j = polygon.len().wrapping_sub(1);
        for (i, a) in polygon.iter().enumerate() {
            let b = polygon[j];
            if (a[1] > y) != (b[1] > y) && x < (b[0] - a[0]) * (y - a[1]) / (b[1] - a[1]) + a[0] {
                inside = !inside;
            }
            j = i;
        }
        inside
    }
}

/// Which regions of a camera's frame are due for analysis: bit 0 the whole frame, bit `i + 1`
/// its zone `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due(pub u64);

impl Due {
    pub const ALL: Due = Due(u64::MAX);
    pub const NONE: Due = Due(0);

    pub fn whole_frame(self) -> bool {
        self.0 & 1 != 0
    }

    pub fn zone(self, i: usize) -> bool {
        i < 63 && self.0 & (1 << (i + 1)) != 0
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
    /// From a live camera: skipped for the camera's newer frame when it would be out past
    /// `max_frame_age` (see the batcher).
    pub live: bool,
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
    /// After this batch, the session that ran it hands the working memory its larger batches
    /// left back to the system (the batcher went back to frames one by one).
    pub release_memory: bool,
}

/// A frame's class scores as the model gave them (logits or probabilities), and its embedding.
pub struct Scored {
    pub meta: FrameMeta,
    pub scores: Vec<f32>,
    /// The model's embedding of the frame (a recycled vector); empty when the model has none.
    pub embedding: Vec<f32>,
    pub pixels: Option<Pixels>,
    /// The version that produced the scores.
    pub model: Arc<ModelVersion>,
}

/// A class or group whose score passed its threshold in one frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    pub label: Arc<str>,
    /// "class" (a model class) or "group" (a configured set of classes).
    pub kind: &'static str,
    pub score: f32,
    pub threshold: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ranked {
    pub label: Arc<str>,
    pub score: f32,
}

/// A watched label's score in one frame, over its threshold or not (for the event lifecycle).
#[derive(Debug, Clone, PartialEq)]
pub struct Watched {
    pub label: Arc<str>,
    pub kind: &'static str,
    pub score: f32,
    pub threshold: f32,
}

/// One frame's outcome.
#[derive(Debug, Clone)]
pub struct FrameResult {
    pub meta: FrameMeta,
    /// The best `top_k` classes, best first.
    pub top: Vec<Ranked>,
    pub detections: Vec<Detection>,
    /// Probabilities of every class, model order (kept for comparisons and tests).
    pub probabilities: Vec<f32>,
    /// The model's embedding of the frame, as inference gave it; empty when the model has none.
    pub embedding: Vec<f32>,
    /// The watched labels' scores.
    pub watched: Vec<Watched>,
    /// The frame's pixels, when the graph keeps them (for snapshots).
    pub pixels: Option<Pixels>,
    /// The model version that classified the frame.
    pub model: Arc<ModelInfo>,
    /// The head its region is bound to (its labels are the result's), and its version (0: none
    /// trained yet: the backbone's labels).
    pub head: Option<Arc<HeadInfo>>,
}

/// A head and its version, as results and events name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeadInfo {
    pub name: String,
    pub version: u32,
}

/// A result's vectors, given back once the result is out so that the next frame's reuse them
/// (no allocation per frame in steady state).
#[derive(Debug, Default)]
pub struct ResultBuffers {
    pub top: Vec<Ranked>,
    pub detections: Vec<Detection>,
    pub watched: Vec<Watched>,
}

/// Everything a spent result gives back, emptied: the score and embedding vectors go back to
/// the inference stage, the other vectors to decide.
#[derive(Debug, Default)]
pub struct Reusable {
    pub scores: Vec<f32>,
    pub embedding: Vec<f32>,
    pub buffers: ResultBuffers,
}

impl FrameResult {
    /// A result of camera `meta.camera` with one watched label `cat` (threshold 0.5) at `score`,
    /// for the tests of the stages after decide.
    #[cfg(test)]
    pub fn watching_cat(meta: FrameMeta, score: f32) -> FrameResult {
        FrameResult {
            meta,
            top: Vec::new(),
            detections: Vec::new(),
            probabilities: Vec::new(),
            embedding: Vec::new(),
            watched: vec![Watched {
                label: "cat".into(),
                kind: "class",
                score,
                threshold: 0.5,
            }],
            pixels: None,
            model: Arc::new(ModelInfo {
                name: "m".into(),
                version: "1".into(),
            }),
            head: None,
        }
    }

    /// The result's probabilities, embedding and other vectors, emptied, for reuse.
    pub fn into_buffers(self) -> Reusable {
        let mut r = Reusable {
            scores: self.probabilities,
            embedding: self.embedding,
            buffers: ResultBuffers {
                top: self.top,
                detections: self.detections,
                watched: self.watched,
            },
        };
        r.scores.clear();
        r.embedding.clear();
        r.buffers.top.clear();
        r.buffers.detections.clear();
        r.buffers.watched.clear();
        r
    }
}
