//! The closed loop's first step: frames worth labelling saved into a head's inbox,
//! `<teach.data>/<head>/_inbox/<id>.jpg` with a JSON sidecar (camera, zone, time, why, the model
//! and head versions, the top scores). Worth labelling: frames whose top score sits in the
//! uncertainty band, the frames that start and end events, and the frames an operator flags as
//! wrong. Saved on a thread of its own (never on the frame path), at most `max_inbox` per head,
//! near duplicates (by embedding) skipped.
//!
//! A saved image is what the model saw of its region: the zone's crop (masked outside the zone,
//! as the model sees it) or the whole frame's centre crop, so that a labelled capture trains the
//! head on exactly what it will be shown.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use opencv::core::{Mat, Scalar, Vector};
use opencv::prelude::*;
use serde::{Deserialize, Serialize};
use vigil_engine::model::InputSpec;

use crate::events::{Event, EventType};
use crate::frame::{FrameResult, Pixels, Ranked, Zone};
use crate::ops::snapshots;
use crate::pipeline::preprocess::Preprocessor;
use crate::shutdown::Joinable;
pub use crate::teach::CaptureConfig;
use crate::wire::timestamp;

/// Why a frame was captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Uncertain,
    EventStart,
    EventEnd,
    Flagged,
}

/// A frame to capture.
pub struct Capture {
    pub head: Arc<str>,
    pub camera: Arc<str>,
    pub zone: Option<Arc<Zone>>,
    pub reason: Reason,
    pub wall: SystemTime,
    pub pixels: Pixels,
    pub embedding: Vec<f32>,
    pub top: Vec<Ranked>,
    /// "backbone name version", and the head's version (0: none trained yet).
    pub model: String,
    pub head_version: u32,
}

/// A capture's sidecar, `<id>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sidecar {
    pub id: String,
    pub head: String,
    pub camera: String,
    pub zone: Option<String>,
    pub reason: Reason,
    pub time: String,
    pub model: String,
    pub head_version: u32,
    pub top: Vec<(String, f32)>,
}

/// Picks the frames worth labelling out of the results of regions bound to a head and hands
/// them to the capture thread; never waits (a capture that finds the queue full is dropped).
pub struct Capturer {
    tx: Sender<Capture>,
    config: CaptureConfig,
    /// When each region (camera, zone) last had an uncertain frame captured.
    last_uncertain: HashMap<(Arc<str>, Option<Arc<str>>), Instant>,
}

impl Capturer {
    /// Starts the capture thread writing into `data` (`teach.data`), cropping as the model input
    /// `spec` is cropped. The thread ends once the capturer is dropped.
    pub fn start(
        config: CaptureConfig,
        data: PathBuf,
        spec: &InputSpec,
    ) -> std::io::Result<(Capturer, Joinable)> {
        let (tx, rx) = crossbeam_channel::bounded(16);
        let writer = Writer {
            data,
            pre: Preprocessor::new(spec),
            config: config.clone(),
            recent: HashMap::new(),
        };
        let thread = crate::shutdown::spawn("capture".into(), move || writer.run(rx))?;
        let capturer = Capturer {
            tx,
            config,
            last_uncertain: HashMap::new(),
        };
        Ok((capturer, thread))
    }

    /// Why `r` (a region bound to a head) is worth labelling, if it is: flagged wrong by an
    /// operator, starting or ending an event (in `events`, out of this frame), or uncertain (at
    /// most once per region per `interval`); with `enabled` off, only flagged frames.
    pub fn reason(&mut self, r: &FrameResult, events: &[Event], flagged: bool) -> Option<Reason> {
        if flagged {
            return Some(Reason::Flagged);
        }
        if !self.config.enabled {
            return None;
        }
        if let Some(e) = events.iter().find(|e| e.kind != EventType::Update) {
            return Some(if e.kind == EventType::Start {
                Reason::EventStart
            } else {
                Reason::EventEnd
            });
        }
        let score = r.top.first().map_or(0.0, |t| t.score);
        let [low, high] = self.config.band;
        if !(low..=high).contains(&score) {
            return None;
        }
        let key = (
            r.meta.camera.clone(),
            r.meta.zone.as_ref().map(|z| z.name.clone()),
        );
        let now = Instant::now();
        match self.last_uncertain.get(&key) {
            Some(last) if now.duration_since(*last) < self.config.interval => None,
            _ => {
                self.last_uncertain.insert(key, now);
                Some(Reason::Uncertain)
            }
        }
    }

    /// Queues `r` for its head's inbox; false when it cannot be (no pixels kept, no head, or
    /// the writer is behind).
    pub fn capture(&self, r: &FrameResult, reason: Reason) -> bool {
        let (Some(pixels), Some(head)) = (&r.pixels, &r.head) else {
            return false;
        };
        let c = Capture {
            head: Arc::from(head.name.as_str()),
            camera: r.meta.camera.clone(),
            zone: r.meta.zone.clone(),
            reason,
            wall: r.meta.wall,
            pixels: pixels.clone(),
            embedding: r.embedding.clone(),
            top: r.top.clone(),
            model: format!("{} {}", r.model.name, r.model.version),
            head_version: head.version,
        };
        !matches!(self.tx.try_send(c), Err(TrySendError::Full(_)))
    }
}

/// Embeddings of the last captures of a head, for the near-duplicate check.
const RECENT: usize = 64;

struct Writer {
    data: PathBuf,
    pre: Preprocessor,
    config: CaptureConfig,
    recent: HashMap<Arc<str>, VecDeque<Vec<f32>>>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Capture>) {
        for c in rx {
            if self.duplicate(&c) && c.reason != Reason::Flagged {
                continue;
            }
            // A capture that fails (or panics, on a frame OpenCV cannot take) is lost alone.
            let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.write(&c)))
                .unwrap_or_else(|p| Err(crate::shutdown::panic_message(&*p).into()));
            match written {
                Ok(id) => {
                    tracing::debug!(head = %c.head, camera = %c.camera, sample = %id, reason = ?c.reason, "captured for labelling");
                    let recent = self.recent.entry(c.head.clone()).or_default();
                    recent.push_back(c.embedding);
                    if recent.len() > RECENT {
                        recent.pop_front();
                    }
                }
                Err(e) => {
                    tracing::warn!(head = %c.head, camera = %c.camera, error = %e, "cannot save a capture")
                }
            }
        }
    }

    /// Whether the capture is nearly the same as one of the head's last.
    fn duplicate(&self, c: &Capture) -> bool {
        self.recent.get(&c.head).is_some_and(|recent| {
            recent
                .iter()
                .any(|e| cosine_distance(e, &c.embedding) < self.config.min_distance)
        })
    }

    /// Saves the image and its sidecar; keeps the inbox within `max_inbox`.
    fn write(&mut self, c: &Capture) -> Result<String, Box<dyn std::error::Error>> {
        let inbox = inbox_dir(&self.data, &c.head);
        std::fs::create_dir_all(&inbox)?;
        let millis = c
            .wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let zone = c.zone.as_ref().map(|z| z.name.to_string());
        let id = format!(
            "{millis}-{}-{}",
            c.camera,
            zone.as_deref().unwrap_or("frame")
        );
        let jpeg = self.crop_jpeg(c)?;
        let sidecar = Sidecar {
            id: id.clone(),
            head: c.head.to_string(),
            camera: c.camera.to_string(),
            zone,
            reason: c.reason,
            time: timestamp(c.wall),
            model: c.model.clone(),
            head_version: c.head_version,
            top: c
                .top
                .iter()
                .map(|r| (r.label.to_string(), r.score))
                .collect(),
        };
        write_atomic(
            &inbox.join(format!("{id}.json")),
            &serde_json::to_vec(&sidecar)?,
        )?;
        write_atomic(&inbox.join(format!("{id}.jpg")), &jpeg)?;
        prune(&inbox, self.config.max_inbox)?;
        Ok(id)
    }

    /// What the model saw of the capture's region, as a JPEG.
    fn crop_jpeg(&mut self, c: &Capture) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        let frame = snapshots::to_bgr(&c.pixels)?;
        let (w, h) = (frame.cols() as u32, frame.rows() as u32);
        let rect = match &c.zone {
            Some(z) => self.pre.zone_rect(w, h, z),
            None => self.pre.crop_rect(w, h),
        };
        let mut crop = Mat::roi(&frame, rect)?.try_clone()?;
        if let Some(zone) = &c.zone {
            mask_outside(&mut crop, rect, (w, h), zone)?;
        }
        let mut buf = Vector::<u8>::new();
        let params = Vector::<i32>::from_slice(&[opencv::imgcodecs::IMWRITE_JPEG_QUALITY, 92]);
        opencv::imgcodecs::imencode(".jpg", &crop, &mut buf, &params)?;
        Ok(buf.to_vec())
    }
}

/// Gives the pixels of a zone's crop outside the zone the mean grey the model reads as nothing.
fn mask_outside(
    crop: &mut Mat,
    rect: opencv::core::Rect,
    (w, h): (u32, u32),
    zone: &Zone,
) -> opencv::Result<()> {
    let grey = Scalar::all(127.0);
    for y in 0..crop.rows() {
        let fy = (rect.y + y) as f32 / h as f32;
        for x in 0..crop.cols() {
            let fx = (rect.x + x) as f32 / w as f32;
            if !zone.contains(fx, fy) {
                let px = crop.at_2d_mut::<opencv::core::Vec3b>(y, x)?;
                *px = opencv::core::Vec3b::from([grey[0] as u8, grey[1] as u8, grey[2] as u8]);
            }
        }
    }
    Ok(())
}

/// A head's inbox folder.
pub fn inbox_dir(data: &Path, head: &str) -> PathBuf {
    data.join(head).join("_inbox")
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Deletes the oldest samples (by name: they start with their time) beyond `max`.
fn prune(inbox: &Path, max: usize) -> std::io::Result<()> {
    let mut ids: Vec<String> = std::fs::read_dir(inbox)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            name.strip_suffix(".jpg").map(str::to_string)
        })
        .collect();
    if ids.len() <= max {
        return Ok(());
    }
    ids.sort();
    for id in &ids[..ids.len() - max] {
        let _ = std::fs::remove_file(inbox.join(format!("{id}.jpg")));
        let _ = std::fs::remove_file(inbox.join(format!("{id}.json")));
    }
    Ok(())
}

fn cosine_distance(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() || a.is_empty() {
        return 1.0;
    }
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    1.0 - dot / (na * nb).max(1e-12)
}
