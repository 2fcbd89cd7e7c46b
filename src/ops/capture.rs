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
use opencv::core::{Mat, Scalar};
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
        Ok(crate::images::encode_jpeg(&crop, 92)?)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use opencv::core::CV_8UC3;
    use vigil_engine::model::{ColorOrder, Layout};

    use super::*;
    use crate::events::{EventTracker, EventsConfig};
    use crate::frame::{FrameMeta, HeadInfo};

    fn spec() -> InputSpec {
        InputSpec {
            name: "in".into(),
            layout: Layout::Nchw,
            color: ColorOrder::Rgb,
            width: 224,
            height: 224,
            crop: 1.0,
            mean: [0.0; 3],
            std: [1.0; 3],
        }
    }

    /// Frame `index` of camera "cam", 100 ms apart, bound to head "door", its top score `top`
    /// and its watched "cat" at `cat`.
    fn result(index: u64, top: f32, cat: f32) -> FrameResult {
        let pts = Some(Duration::from_millis(100 * index));
        let mut r = FrameResult::watching_cat(FrameMeta::new("cam".into(), index, pts), cat);
        r.top.push(Ranked {
            label: "cat".into(),
            score: top,
        });
        r.head = Some(Arc::new(HeadInfo {
            name: "door".into(),
            version: 2,
        }));
        r.embedding = vec![index as f32, 1.0];
        let frame = Mat::new_rows_cols_with_default(120, 160, CV_8UC3, Scalar::all(90.0)).unwrap();
        r.pixels = Some(Pixels::Mat(frame));
        r
    }

    #[test]
    fn flags_events_and_uncertain_frames_are_captured_uncertain_ones_at_most_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let config = CaptureConfig {
            interval: Duration::from_secs(3600),
            ..CaptureConfig::default()
        };
        let (mut c, thread) = Capturer::start(config, dir.path().into(), &spec()).unwrap();
        let sure = result(0, 0.95, 0.1);
        assert_eq!(c.reason(&sure, &[], false), None, "a sure frame is not");
        assert_eq!(c.reason(&sure, &[], true), Some(Reason::Flagged));
        let unsure = result(1, 0.5, 0.1);
        assert_eq!(c.reason(&unsure, &[], false), Some(Reason::Uncertain));
        assert_eq!(
            c.reason(&unsure, &[], false),
            None,
            "the region's next uncertain frame waits for the interval"
        );
        let mut tracker = EventTracker::new(EventsConfig::default());
        let events: Vec<Event> = (2..12)
            .flat_map(|i| tracker.on_frame(&result(i, 0.95, 0.9)))
            .collect();
        let start = events.iter().find(|e| e.kind == EventType::Start).unwrap();
        assert_eq!(
            c.reason(&result(12, 0.95, 0.9), std::slice::from_ref(start), false),
            Some(Reason::EventStart)
        );
        // A capture lands in the head's inbox with its sidecar.
        assert!(c.capture(&unsure, Reason::Flagged));
        drop(c);
        thread.join();
        let inbox = inbox_dir(dir.path(), "door");
        let sidecars: Vec<Sidecar> = std::fs::read_dir(&inbox)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .map(|e| serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap())
            .collect();
        assert_eq!(sidecars.len(), 1);
        let s = &sidecars[0];
        assert_eq!((s.camera.as_str(), s.head_version), ("cam", 2));
        assert_eq!(s.reason, Reason::Flagged);
        let jpeg = std::fs::read(inbox.join(format!("{}.jpg", s.id))).unwrap();
        assert_eq!(&jpeg[..2], &[0xff, 0xd8]);
    }

    #[test]
    fn the_inbox_keeps_the_newest_samples() {
        let dir = tempfile::tempdir().unwrap();
        for id in ["1-a", "2-a", "3-a", "4-a"] {
            std::fs::write(dir.path().join(format!("{id}.jpg")), b"x").unwrap();
            std::fs::write(dir.path().join(format!("{id}.json")), b"{}").unwrap();
        }
        prune(dir.path(), 2).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(left, ["3-a.jpg", "3-a.json", "4-a.jpg", "4-a.json"]);
    }
}
