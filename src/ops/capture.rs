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
//!
//! An operator who says an event was wrong means the picture that started it, not what the camera
//! sees when the flag comes: the capture thread keeps the crop of the frame that started each of
//! the last [`KEPT_EVENTS`] events of regions bound to a head (also with capture off, or when the
//! frame was a near duplicate), and [`EventFlags`] puts it into the head's inbox as flagged.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

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
use crate::stats::CameraStats;
use crate::sync::write_atomic;
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
    /// The event the frame starts or ends.
    pub event: Option<Arc<str>>,
    /// The frame starts `event`: its crop is kept for a later flag.
    pub starts_event: bool,
    /// Into the inbox now (false: only kept, for an event's start with capture off).
    pub save: bool,
}

/// What [`Capturer::plan`] decides for a frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub reason: Reason,
    /// The event the frame starts or ends.
    pub event: Option<Arc<str>>,
    pub starts_event: bool,
    /// Into the inbox now (false: only kept for a later flag).
    pub save: bool,
}

/// How many events' starting pictures the capture thread keeps for a later flag (a zone's crop
/// as a JPEG, some 10-30 KB each).
pub const KEPT_EVENTS: usize = 64;

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
    /// The event the frame started or ended (and, with reason "flagged", the event an operator
    /// said was wrong).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
}

/// What the capture thread is asked.
enum Job {
    Capture(Box<Capture>),
    /// Put the picture that started `event` into its head's inbox as flagged.
    Flag {
        event: String,
        reply: FlagReply,
    },
    /// The capturer is gone: the thread ends (flag handles may outlive it).
    Stop,
}

/// Who waits for a flag's outcome.
enum FlagReply {
    Wait(Sender<Result<Flagged, FlagError>>),
    /// Runs on the capture thread when the event's picture is not kept.
    Otherwise(Box<dyn FnOnce() + Send>),
}

/// An event's starting picture, put into its head's inbox as flagged wrong.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Flagged {
    pub event: String,
    pub head: String,
    /// The inbox sample's id.
    pub sample: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FlagError {
    #[error(
        "the picture that started event {0:?} is no longer kept (vigil keeps those of the last \
         {KEPT_EVENTS} events of regions bound to a head); flag the camera to capture its next \
         frames instead"
    )]
    NotKept(String),
    #[error("the capture thread is behind or stopped; try again")]
    Busy,
    #[error("cannot save the picture of event {event:?}: {message}")]
    Write { event: String, message: String },
}

/// Flags events' own pictures wrong (for the HTTP API and MQTT); a handle on the capture thread.
#[derive(Clone)]
pub struct EventFlags {
    tx: Sender<Job>,
}

impl EventFlags {
    /// Puts the picture that started `event` into its head's inbox as flagged, waiting up to
    /// `timeout` for the capture thread.
    pub fn flag(&self, event: &str, timeout: Duration) -> Result<Flagged, FlagError> {
        let (reply, outcome) = crossbeam_channel::bounded(1);
        let job = Job::Flag {
            event: event.to_string(),
            reply: FlagReply::Wait(reply),
        };
        self.tx
            .send_timeout(job, timeout)
            .map_err(|_| FlagError::Busy)?;
        outcome.recv_timeout(timeout).map_err(|_| FlagError::Busy)?
    }

    /// Like [`EventFlags::flag`] without waiting; when the picture is not kept (or the thread
    /// is behind) the camera's next frames are captured instead. Logs the outcome.
    pub fn flag_or_next_frames(&self, event: &str, camera: Arc<CameraStats>) {
        let stats = camera.clone();
        let job = Job::Flag {
            event: event.to_string(),
            reply: FlagReply::Otherwise(Box::new(move || crate::stats::flag_wrong(&stats))),
        };
        if self.tx.try_send(job).is_err() {
            tracing::warn!(
                event,
                "the capture thread is behind: the camera's next frames are captured instead of the event's picture"
            );
            crate::stats::flag_wrong(&camera);
        }
    }
}

/// Picks the frames worth labelling out of the results of regions bound to a head and hands
/// them to the capture thread; never waits (a capture that finds the queue full is dropped).
pub struct Capturer {
    tx: Sender<Job>,
    config: CaptureConfig,
    /// When each region (camera, zone) last had an uncertain frame captured.
    last_uncertain: HashMap<(Arc<str>, Option<Arc<str>>), Instant>,
}

impl Capturer {
    /// Starts the capture thread writing into `data` (`teach.data`), cropping as the model input
    /// `spec` is cropped. The thread ends once the capturer is dropped (also while
    /// [`EventFlags`] handles remain: they then answer [`FlagError::Busy`]).
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
            kept: VecDeque::new(),
        };
        let thread = crate::shutdown::spawn("capture".into(), move || writer.run(rx))?;
        let capturer = Capturer {
            tx,
            config,
            last_uncertain: HashMap::new(),
        };
        Ok((capturer, thread))
    }

    /// A handle to flag events' pictures wrong.
    pub fn event_flags(&self) -> EventFlags {
        EventFlags {
            tx: self.tx.clone(),
        }
    }

    /// What to do with `r` (a region bound to a head), if anything: into the inbox when flagged
    /// wrong by an operator, starting or ending an event (in `events`, out of this frame), or
    /// uncertain (at most once per region per `interval`), with `enabled` off only when flagged;
    /// a frame that starts an event is kept for a later flag in any case.
    pub fn plan(&mut self, r: &FrameResult, events: &[Event], flagged: bool) -> Option<Plan> {
        let event = events.iter().find(|e| e.kind != EventType::Update);
        let starts_event = event.is_some_and(|e| e.kind == EventType::Start);
        let plan = |reason, save| Plan {
            reason,
            event: event.map(|e| Arc::from(e.id.as_str())),
            starts_event,
            save,
        };
        if let Some(reason) = self.reason(r, event, flagged) {
            return Some(plan(reason, true));
        }
        starts_event.then(|| plan(Reason::EventStart, false))
    }

    /// Why `r` is worth labelling now, if it is (see [`Capturer::plan`]).
    fn reason(&mut self, r: &FrameResult, event: Option<&Event>, flagged: bool) -> Option<Reason> {
        if flagged {
            return Some(Reason::Flagged);
        }
        if !self.config.enabled {
            return None;
        }
        if let Some(e) = event {
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

    /// Queues `r` for the capture thread as `plan` says; false when it cannot be (no pixels
    /// kept, no head, or the thread is behind).
    pub fn capture(&self, r: &FrameResult, plan: Plan) -> bool {
        let (Some(pixels), Some(head)) = (&r.pixels, &r.head) else {
            return false;
        };
        let c = Capture {
            head: Arc::from(head.name.as_str()),
            camera: r.meta.camera.clone(),
            zone: r.meta.zone.clone(),
            reason: plan.reason,
            wall: r.meta.wall,
            pixels: pixels.clone(),
            embedding: r.embedding.clone(),
            top: r.top.clone(),
            model: format!("{} {}", r.model.name, r.model.version),
            head_version: head.version,
            event: plan.event,
            starts_event: plan.starts_event,
            save: plan.save,
        };
        !matches!(
            self.tx.try_send(Job::Capture(Box::new(c))),
            Err(TrySendError::Full(_))
        )
    }
}

impl Drop for Capturer {
    fn drop(&mut self) {
        // After the captures already queued.
        let _ = self.tx.send(Job::Stop);
    }
}

/// Embeddings of the last captures of a head, for the near-duplicate check.
const RECENT: usize = 64;

struct Writer {
    data: PathBuf,
    pre: Preprocessor,
    config: CaptureConfig,
    recent: HashMap<Arc<str>, VecDeque<Vec<f32>>>,
    /// The pictures that started the last events (newest last).
    kept: VecDeque<KeptEvent>,
}

/// The picture that started an event, ready for its head's inbox.
struct KeptEvent {
    event: Arc<str>,
    sidecar: Sidecar,
    jpeg: Vec<u8>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Job>) {
        for job in rx {
            match job {
                Job::Stop => return,
                Job::Capture(c) => self.take(*c),
                Job::Flag { event, reply } => {
                    let outcome = self.flag(&event);
                    match (reply, outcome) {
                        (FlagReply::Wait(tx), outcome) => {
                            let _ = tx.send(outcome);
                        }
                        (FlagReply::Otherwise(_), Ok(_)) => {}
                        (FlagReply::Otherwise(otherwise), Err(e)) => {
                            tracing::warn!(event, error = %e, "the camera's next frames are captured instead");
                            otherwise();
                        }
                    }
                }
            }
        }
    }

    /// A capture: into the inbox unless a near duplicate (flagged ones always), and kept when
    /// it starts an event. One that fails (or panics, on a frame OpenCV cannot take) is lost
    /// alone.
    fn take(&mut self, c: Capture) {
        let save = c.save && (c.reason == Reason::Flagged || !self.duplicate(&c));
        if !save && !c.starts_event {
            return;
        }
        let taken = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let (sidecar, jpeg) = self.sample(&c)?;
            if save {
                put(&self.data, self.config.max_inbox, &sidecar, &jpeg)?;
            }
            Ok::<_, Box<dyn std::error::Error>>((sidecar, jpeg))
        }))
        .unwrap_or_else(|p| Err(crate::shutdown::panic_message(&*p).into()));
        let (sidecar, jpeg) = match taken {
            Ok(taken) => taken,
            Err(e) => {
                tracing::warn!(head = %c.head, camera = %c.camera, error = %e, "cannot save a capture");
                return;
            }
        };
        if save {
            tracing::debug!(head = %c.head, camera = %c.camera, sample = %sidecar.id, reason = ?c.reason, "captured for labelling");
            let recent = self.recent.entry(c.head.clone()).or_default();
            recent.push_back(c.embedding);
            if recent.len() > RECENT {
                recent.pop_front();
            }
        }
        if let (true, Some(event)) = (c.starts_event, c.event) {
            self.kept.push_back(KeptEvent {
                event,
                sidecar,
                jpeg,
            });
            if self.kept.len() > KEPT_EVENTS {
                self.kept.pop_front();
            }
        }
    }

    /// Puts the picture that started `event` into its head's inbox as flagged (replacing the
    /// sample it made there, if any).
    fn flag(&mut self, event: &str) -> Result<Flagged, FlagError> {
        let Some(kept) = self.kept.iter_mut().rev().find(|k| &*k.event == event) else {
            return Err(FlagError::NotKept(event.to_string()));
        };
        kept.sidecar.reason = Reason::Flagged;
        let sidecar = &kept.sidecar;
        put(&self.data, self.config.max_inbox, sidecar, &kept.jpeg).map_err(|e| {
            FlagError::Write {
                event: event.to_string(),
                message: e.to_string(),
            }
        })?;
        tracing::info!(event, head = %sidecar.head, sample = %sidecar.id, "an event flagged wrong: the picture that started it is in the inbox");
        Ok(Flagged {
            event: event.to_string(),
            head: sidecar.head.clone(),
            sample: sidecar.id.clone(),
        })
    }

    /// Whether the capture is nearly the same as one of the head's last.
    fn duplicate(&self, c: &Capture) -> bool {
        self.recent.get(&c.head).is_some_and(|recent| {
            recent
                .iter()
                .any(|e| cosine_distance(e, &c.embedding) < self.config.min_distance)
        })
    }

    /// The capture's sidecar and image.
    fn sample(&mut self, c: &Capture) -> Result<(Sidecar, Vec<u8>), Box<dyn std::error::Error>> {
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
            id,
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
            event: c.event.as_deref().map(str::to_string),
        };
        Ok((sidecar, jpeg))
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

/// Saves a sample's image and sidecar into its head's inbox under `data`; keeps the inbox
/// within `max_inbox`.
fn put(data: &Path, max_inbox: usize, sidecar: &Sidecar, jpeg: &[u8]) -> std::io::Result<()> {
    let inbox = inbox_dir(data, &sidecar.head);
    std::fs::create_dir_all(&inbox)?;
    let id = &sidecar.id;
    write_atomic(
        &inbox.join(format!("{id}.json")),
        &serde_json::to_vec(sidecar).map_err(std::io::Error::other)?,
    )?;
    write_atomic(&inbox.join(format!("{id}.jpg")), jpeg)?;
    prune(&inbox, max_inbox)
}

/// A head's inbox folder.
pub fn inbox_dir(data: &Path, head: &str) -> PathBuf {
    data.join(head).join("_inbox")
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
    // Never below 0 (rounding): `min_distance = 0` then skips nothing.
    (1.0 - dot / (na * nb).max(1e-12)).max(0.0)
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

    /// The event that frames 2..12 of [`result`] start.
    fn started_event() -> Event {
        let mut tracker = EventTracker::new(EventsConfig::default());
        let events: Vec<Event> = (2..12)
            .flat_map(|i| tracker.on_frame(&result(i, 0.95, 0.9)))
            .collect();
        events
            .into_iter()
            .find(|e| e.kind == EventType::Start)
            .unwrap()
    }

    /// The sidecars in head "door"'s inbox under `data`.
    fn sidecars(data: &Path) -> Vec<Sidecar> {
        let inbox = inbox_dir(data, "door");
        let Ok(dir) = std::fs::read_dir(&inbox) else {
            return Vec::new();
        };
        dir.flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .map(|e| serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap())
            .collect()
    }

    /// The mean grey of sample `id`'s image in head "door"'s inbox under `data`.
    fn sample_grey(data: &Path, id: &str) -> f64 {
        let path = inbox_dir(data, "door").join(format!("{id}.jpg"));
        let jpeg = std::fs::read(path).unwrap();
        let image = crate::images::decode(&jpeg).unwrap();
        opencv::core::mean(&image, &opencv::core::no_array()).unwrap()[0]
    }

    /// `r` with its whole picture at grey level `grey`.
    fn painted(mut r: FrameResult, grey: f64) -> FrameResult {
        let frame = Mat::new_rows_cols_with_default(120, 160, CV_8UC3, Scalar::all(grey)).unwrap();
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
        let reason = |c: &mut Capturer, r: &FrameResult, events: &[Event], flagged: bool| {
            c.plan(r, events, flagged).map(|p| (p.reason, p.save))
        };
        let sure = result(0, 0.95, 0.1);
        assert_eq!(
            reason(&mut c, &sure, &[], false),
            None,
            "a sure frame is not"
        );
        assert_eq!(
            reason(&mut c, &sure, &[], true),
            Some((Reason::Flagged, true))
        );
        let unsure = result(1, 0.5, 0.1);
        assert_eq!(
            reason(&mut c, &unsure, &[], false),
            Some((Reason::Uncertain, true))
        );
        assert_eq!(
            reason(&mut c, &unsure, &[], false),
            None,
            "the region's next uncertain frame waits for the interval"
        );
        let start = started_event();
        let plan = c
            .plan(&result(12, 0.95, 0.9), std::slice::from_ref(&start), false)
            .unwrap();
        assert_eq!((plan.reason, plan.save), (Reason::EventStart, true));
        assert_eq!(plan.event.as_deref(), Some(start.id.as_str()));
        // A capture lands in the head's inbox with its sidecar.
        let flagged = c.plan(&unsure, &[], true).unwrap();
        assert!(c.capture(&unsure, flagged));
        drop(c);
        thread.join();
        let sidecars = sidecars(dir.path());
        assert_eq!(sidecars.len(), 1);
        let s = &sidecars[0];
        assert_eq!((s.camera.as_str(), s.head_version), ("cam", 2));
        assert_eq!((s.reason, s.event.as_deref()), (Reason::Flagged, None));
        let inbox = inbox_dir(dir.path(), "door");
        let jpeg = std::fs::read(inbox.join(format!("{}.jpg", s.id))).unwrap();
        assert_eq!(&jpeg[..2], &[0xff, 0xd8]);
    }

    #[test]
    fn an_event_flagged_wrong_puts_the_picture_that_started_it_in_the_inbox_also_with_capture_off()
    {
        let dir = tempfile::tempdir().unwrap();
        let config = CaptureConfig {
            enabled: false,
            ..CaptureConfig::default()
        };
        let (mut c, thread) = Capturer::start(config, dir.path().into(), &spec()).unwrap();
        let flags = c.event_flags();
        let start = started_event();
        // The frame that starts the event is dark; what the camera sees afterwards is bright.
        let first = painted(result(12, 0.95, 0.9), 40.0);
        let plan = c.plan(&first, std::slice::from_ref(&start), false).unwrap();
        assert_eq!((plan.reason, plan.save), (Reason::EventStart, false));
        assert!(c.capture(&first, plan));
        for i in 13..20 {
            let later = painted(result(i, 0.95, 0.9), 220.0);
            assert!(c.plan(&later, &[], false).is_none(), "capture is off");
        }
        let wait = Duration::from_secs(10);
        // Kept, not saved: the inbox is empty until the flag.
        let other = flags.flag("cam-nothing-0-1", wait).unwrap_err();
        assert!(
            matches!(&other, FlagError::NotKept(id) if id == "cam-nothing-0-1"),
            "{other}"
        );
        assert!(sidecars(dir.path()).is_empty());
        let flagged = flags.flag(&start.id, wait).unwrap();
        assert_eq!(
            (flagged.event.as_str(), flagged.head.as_str()),
            (start.id.as_str(), "door")
        );
        let saved = sidecars(dir.path());
        assert_eq!(saved.len(), 1);
        assert_eq!(saved[0].id, flagged.sample);
        assert_eq!(saved[0].reason, Reason::Flagged);
        assert_eq!(saved[0].event.as_deref(), Some(start.id.as_str()));
        let grey = sample_grey(dir.path(), &flagged.sample);
        assert!(
            (grey - 40.0).abs() < 8.0,
            "the starting picture, not a later one: grey {grey}"
        );
        drop(c);
        thread.join();
    }

    #[test]
    fn flagging_an_event_already_in_the_inbox_marks_its_sample_and_only_the_last_events_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let config = CaptureConfig {
            min_distance: 0.0,
            ..CaptureConfig::default()
        };
        let (mut c, thread) = Capturer::start(config, dir.path().into(), &spec()).unwrap();
        let flags = c.event_flags();
        let start = started_event();
        let mut ids = Vec::new();
        for n in 0..=KEPT_EVENTS as u64 {
            let mut e = start.clone();
            e.id = format!("{}-{n}", start.id);
            let mut r = result(100 + n, 0.95, 0.9);
            // Samples are named by their time: one second apart.
            r.meta.wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + n);
            let plan = c.plan(&r, std::slice::from_ref(&e), false).unwrap();
            assert_eq!((plan.reason, plan.save), (Reason::EventStart, true));
            assert!(c.capture(&r, plan));
            ids.push(e.id);
            // Jobs run in order: this answer means the capture is taken (the queue is short).
            let _ = flags.flag("none", Duration::from_secs(10));
        }
        let wait = Duration::from_secs(10);
        let last = ids.last().unwrap();
        let flagged = flags.flag(last, wait).unwrap();
        let saved = sidecars(dir.path());
        assert_eq!(
            saved.len(),
            KEPT_EVENTS + 1,
            "one sample per event, none added by the flag"
        );
        let sample = saved.iter().find(|s| s.id == flagged.sample).unwrap();
        assert_eq!(sample.reason, Reason::Flagged);
        assert_eq!(sample.event.as_deref(), Some(last.as_str()));
        let others = saved
            .iter()
            .filter(|s| s.reason == Reason::EventStart)
            .count();
        assert_eq!(others, KEPT_EVENTS);
        // The oldest event's picture is no longer kept; the one after it still is.
        assert!(matches!(
            flags.flag(&ids[0], wait),
            Err(FlagError::NotKept(_))
        ));
        assert!(flags.flag(&ids[1], wait).is_ok());
        drop(c);
        thread.join();
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
