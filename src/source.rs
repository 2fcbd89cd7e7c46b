//! One camera: a GStreamer pipeline built from a template in `pipelines/`, its appsink turned into
//! [`Frame`]s, and a thread that watches the bus and rebuilds the pipeline when it fails.
//!
//! Templates are gst-launch descriptions. The only text substituted into them is integers
//! (`{width}`, `{height}`, `{fps}`, `{latency_ms}`); strings from the config (URLs, paths,
//! credentials, `properties`) are set as properties on named elements after the description is
//! parsed, so a value can never add elements or properties to the pipeline.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TrySendError};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app::AppSink;

use crate::config::{CameraConfig, DecodeMode, RtspTransport, SourceKind};
use crate::frame::{Frame, FrameMeta, Pixels};
use crate::metrics::{CameraState, CameraStats, State, now_ms};
use crate::redact::{redact_url, scrub};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("camera {camera}: template {template}: {message}")]
    Template {
        camera: String,
        template: PathBuf,
        message: String,
    },
    #[error("camera {camera}: {message}")]
    Pipeline { camera: String, message: String },
}

/// The values a template may use, all integers.
const PLACEHOLDERS: &[&str] = &["width", "height", "fps", "latency_ms"];

/// Fills a template's `{placeholders}` with integers and drops `#` comment lines.
pub fn render_template(text: &str, values: &[(&str, u64)]) -> Result<String, String> {
    let body: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join(" ");
    let mut out = String::with_capacity(body.len());
    let mut rest = body.as_str();
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| "unclosed '{'".to_string())?;
        let name = &rest[open + 1..open + close];
        let value = values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                format!(
                    "unknown placeholder {{{name}}} (known: {})",
                    PLACEHOLDERS
                        .iter()
                        .map(|p| format!("{{{p}}}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            })?;
        out.push_str(&value.to_string());
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    Ok(out.trim().to_string())
}

/// Where a camera's frames go: a bounded queue that, when full, drops the oldest frame (live
/// sources) or waits (files that are not paced to real time).
pub struct FrameQueue {
    camera: Arc<str>,
    tx: Mutex<Option<Sender<Frame>>>,
    /// Live queues keep a receiver to drop the oldest frame.
    oldest: Option<Receiver<Frame>>,
    stop: Arc<AtomicBool>,
    pub stats: Arc<CameraStats>,
}

impl FrameQueue {
    pub fn new(
        camera: Arc<str>,
        tx: Sender<Frame>,
        rx: &Receiver<Frame>,
        live: bool,
        stop: Arc<AtomicBool>,
        stats: Arc<CameraStats>,
    ) -> FrameQueue {
        FrameQueue {
            camera,
            tx: Mutex::new(Some(tx)),
            oldest: live.then(|| rx.clone()),
            stop,
            stats,
        }
    }

    pub fn camera(&self) -> &Arc<str> {
        &self.camera
    }

    /// Queues a frame. Returns false once the queue is closed or the graph is stopping.
    pub fn push(&self, frame: Frame) -> bool {
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = guard.as_ref() else {
            return false;
        };
        let queued = frame.meta.index + 1;
        let pushed = self.send(tx, frame);
        if pushed {
            self.stats.last_queued.store(queued, Ordering::Relaxed);
        }
        pushed
    }

    fn send(&self, tx: &Sender<Frame>, mut frame: Frame) -> bool {
        match &self.oldest {
            Some(oldest) => loop {
                match tx.try_send(frame) {
                    Ok(()) => return true,
                    Err(TrySendError::Full(f)) => {
                        if oldest.try_recv().is_ok() {
                            self.stats.dropped_queue.fetch_add(1, Ordering::Relaxed);
                        }
                        frame = f;
                    }
                    Err(TrySendError::Disconnected(_)) => return false,
                }
            },
            None => loop {
                if self.stop.load(Ordering::Relaxed) {
                    return false;
                }
                match tx.send_timeout(frame, Duration::from_millis(100)) {
                    Ok(()) => return true,
                    Err(SendTimeoutError::Timeout(f)) => frame = f,
                    Err(SendTimeoutError::Disconnected(_)) => return false,
                }
            },
        }
    }

    /// No more frames: lets the stages downstream finish.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// The templates shipped in `pipelines/`, built in so that vigil runs from any directory; a file
/// `pipelines/<name>.gst` takes precedence.
const BUILTIN_TEMPLATES: &[(&str, &str)] = &[
    ("rtsp-h264", include_str!("../pipelines/rtsp-h264.gst")),
    ("rtsp-h265", include_str!("../pipelines/rtsp-h265.gst")),
    ("file", include_str!("../pipelines/file.gst")),
    ("test", include_str!("../pipelines/test.gst")),
];

/// Reads template `name` from `dir`, or the built-in one of that name.
pub fn load_template(dir: &Path, name: &str) -> Result<(String, PathBuf), String> {
    let path = dir.join(format!("{name}.gst"));
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok((text, path)),
        Err(e) => match BUILTIN_TEMPLATES.iter().find(|(n, _)| *n == name) {
            Some((_, text)) => Ok((
                text.to_string(),
                PathBuf::from(format!("(built-in) {name}.gst")),
            )),
            None => Err(format!("template {} cannot be read: {e}", path.display())),
        },
    }
}

/// Everything needed to build one camera's pipeline.
#[derive(Clone)]
pub struct SourceSpec {
    pub name: Arc<str>,
    pub camera: CameraConfig,
    /// Where the template came from (for messages) and its text.
    pub template_path: PathBuf,
    pub template: String,
    /// The file path, resolved against the config's directory.
    pub file: Option<PathBuf>,
}

impl SourceSpec {
    /// Secrets that must never appear in a log line.
    fn secrets(&self) -> Vec<String> {
        let mut s = Vec::new();
        if let Some(p) = &self.camera.password {
            s.push(p.clone());
        }
        if let Some(url) = &self.camera.url
            && let Some(userinfo) = url
                .split_once("://")
                .and_then(|(_, r)| r.split(['/', '?', '#']).next())
                .and_then(|a| a.rsplit_once('@'))
                .map(|(u, _)| u)
            && let Some((_, pw)) = userinfo.split_once(':')
            && !pw.is_empty()
        {
            s.push(pw.to_string());
        }
        s
    }

    /// A description of the source for logs: redacted URL, or path, or pattern.
    pub fn describe(&self) -> String {
        match self.camera.source {
            SourceKind::Rtsp => redact_url(self.camera.url.as_deref().unwrap_or("")),
            SourceKind::File => self
                .file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            SourceKind::Test => format!("videotestsrc pattern={}", self.camera.pattern),
        }
    }

    /// Parses the template and configures its elements; the pipeline is left in Null.
    pub fn build(&self) -> Result<(gst::Pipeline, AppSink), SourceError> {
        let cam = &self.camera;
        let template_err = |message: String| SourceError::Template {
            camera: self.name.to_string(),
            template: self.template_path.clone(),
            message,
        };
        let desc = render_template(
            &self.template,
            &[
                ("width", cam.width as u64),
                ("height", cam.height as u64),
                ("fps", cam.fps as u64),
                ("latency_ms", cam.latency.as_millis() as u64),
            ],
        )
        .map_err(template_err)?;
        let element = gst::parse::launch(&desc).map_err(|e| template_err(e.to_string()))?;
        let pipeline = match element.downcast::<gst::Pipeline>() {
            Ok(p) => p,
            Err(element) => {
                let p = gst::Pipeline::new();
                p.add(&element).map_err(|e| template_err(e.to_string()))?;
                p
            }
        };
        let named = |name: &str| {
            pipeline.by_name(name).ok_or_else(|| {
                template_err(format!(
                    "has no element named {name:?} (name=... in the template)"
                ))
            })
        };
        match cam.source {
            SourceKind::Rtsp => {
                let src = named("src")?;
                set_str(&src, "location", cam.url.as_deref().unwrap_or(""))
                    .map_err(template_err)?;
                if let Some(u) = &cam.username {
                    set_str(&src, "user-id", u).map_err(template_err)?;
                }
                if let Some(p) = &cam.password {
                    set_str(&src, "user-pw", p).map_err(template_err)?;
                }
                let protocols = match cam.transport {
                    RtspTransport::Tcp => "tcp",
                    RtspTransport::Udp => "udp",
                };
                set_str(&src, "protocols", protocols).map_err(template_err)?;
            }
            SourceKind::File => {
                let src = named("src")?;
                let path = self.file.as_ref().expect("file sources have a path");
                set_str(&src, "location", &path.to_string_lossy()).map_err(template_err)?;
            }
            SourceKind::Test => {
                let src = named("src")?;
                set_str(&src, "pattern", &cam.pattern).map_err(|e| SourceError::Pipeline {
                    camera: self.name.to_string(),
                    message: format!("pattern: {e}"),
                })?;
            }
        }
        for (key, value) in &cam.properties {
            let (element, property) = key.split_once('.').unwrap_or((key, ""));
            let e = named(element)?;
            set_str(&e, property, value).map_err(|m| SourceError::Pipeline {
                camera: self.name.to_string(),
                message: format!("properties.{key:?}: {m}"),
            })?;
        }
        let sink = named("sink")?
            .downcast::<AppSink>()
            .map_err(|_| template_err("the element named \"sink\" must be an appsink".into()))?;
        // I420 first: the workers crop and scale it plane by plane and convert only the small
        // result, so no full-size colour conversion happens (and videoconvert passes decoders'
        // usual I420 through untouched). BGR is accepted too.
        sink.set_caps(Some(
            &gst::Caps::builder("video/x-raw")
                .field("format", gst::List::new(["I420", "BGR"]))
                .build(),
        ));
        let live = cam.is_live();
        sink.set_max_buffers(2);
        sink.set_drop(live);
        // Files paced to real time are synchronised on the clock; everything else runs as fast as
        // frames come.
        sink.set_sync(cam.source == SourceKind::File && cam.realtime);
        sink.set_property("enable-last-sample", false);
        Ok((pipeline, sink))
    }
}

/// Sets a property from its string form, with an error (not a panic) for a wrong name or value.
fn set_str(element: &gst::Element, property: &str, value: &str) -> Result<(), String> {
    use gst::prelude::GstValueExt;
    let pspec = element.find_property(property).ok_or_else(|| {
        format!(
            "element {} ({}) has no property {property:?}",
            element.name(),
            element
                .factory()
                .map(|f| f.name().to_string())
                .unwrap_or_default()
        )
    })?;
    if !pspec.flags().contains(gst::glib::ParamFlags::WRITABLE) {
        return Err(format!("property {property:?} is read-only"));
    }
    let v = if pspec.value_type() == gst::glib::Type::STRING {
        value.to_value()
    } else {
        gst::glib::Value::deserialize(value, pspec.value_type())
            .map_err(|_| format!("{value:?} is not a valid value for {property:?}"))?
    };
    element.set_property_from_value(property, &v);
    Ok(())
}

/// Per-run state of the appsink callback.
struct Pacer {
    /// Minimum stream time between analysed frames (`analyze_fps`).
    interval: Option<Duration>,
    next_due: Option<Duration>,
    /// Added to buffer timestamps so they keep growing across loops of a file.
    pts_offset: Duration,
    last_raw: Option<Duration>,
    last_step: Duration,
}

impl Pacer {
    fn new(analyze_fps: f64) -> Self {
        Pacer {
            interval: (analyze_fps > 0.0).then(|| Duration::from_secs_f64(1.0 / analyze_fps)),
            next_due: None,
            pts_offset: Duration::ZERO,
            last_raw: None,
            last_step: Duration::from_millis(40),
        }
    }

    /// The frame's continuous pts, and whether to analyse it.
    fn admit(&mut self, raw: Option<Duration>, started: Instant) -> (Option<Duration>, bool) {
        let pts = raw.map(|raw| {
            if let Some(last) = self.last_raw {
                if raw < last {
                    // The file started again: continue from where the last loop ended.
                    self.pts_offset += last + self.last_step - raw;
                } else if raw > last {
                    self.last_step = raw - last;
                }
            }
            self.last_raw = Some(raw);
            raw + self.pts_offset
        });
        let Some(interval) = self.interval else {
            return (pts, true);
        };
        let t = pts.unwrap_or_else(|| started.elapsed());
        match self.next_due {
            Some(due) if t < due => (pts, false),
            due => {
                // Keep the cadence, but never owe more than one frame when frames came late.
                let next = due.map_or(t + interval, |d| d + interval);
                self.next_due = Some(if next > t { next } else { t + interval });
                (pts, true)
            }
        }
    }
}

/// Runs a camera until `stop` is set or (for a file that does not loop) its end. State changes
/// are announced with the camera's name on `notices`.
pub fn spawn(
    spec: SourceSpec,
    queue: Arc<FrameQueue>,
    stop: Arc<AtomicBool>,
    notices: Sender<Arc<str>>,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(format!("cam-{}", spec.name))
        .spawn(move || {
            let camera = Camera {
                spec: &spec,
                queue: &queue,
                notices: &notices,
            };
            camera.run(&stop);
            camera.set_state(State::Offline, 0, None);
            queue.close();
        })
        .expect("spawning a camera thread")
}

enum Outcome {
    /// A file that does not loop reached its end.
    Finished,
    Stopped,
    Failed(String),
}

/// What the appsink callback shares with the thread watching the pipeline.
#[derive(Default)]
struct Activity {
    /// `now_ms()` of the last frame out of the decoder, or of the pipeline's start.
    last_ms: AtomicU64,
    /// The callback is waiting for room in a (blocking) queue: not a stall.
    pushing: AtomicBool,
    /// At least one frame arrived in this run.
    started: AtomicBool,
}

struct Camera<'a> {
    spec: &'a SourceSpec,
    queue: &'a Arc<FrameQueue>,
    notices: &'a Sender<Arc<str>>,
}

impl Camera<'_> {
    fn stats(&self) -> &CameraStats {
        &self.queue.stats
    }

    fn set_state(&self, state: State, attempt: u32, error: Option<String>) -> CameraState {
        let previous = self.stats().set_state(state, attempt, error);
        let _ = self.notices.send(self.spec.name.clone());
        previous
    }

    fn secrets(&self) -> Vec<String> {
        self.spec.secrets()
    }

    fn run(&self, stop: &AtomicBool) {
        let spec = self.spec;
        let cam = &spec.camera;
        let retries = cam.source != SourceKind::File || cam.looping;
        let mut delay = cam.retry_min;
        let mut index = 0u64;
        let mut attempt = 0u32;
        let mut offline_since: Option<Instant> = None;
        tracing::info!(camera = %spec.name, source = %spec.describe(), "starting camera");
        self.set_state(State::Starting, 0, None);
        loop {
            let activity = Arc::new(Activity::default());
            let outcome = self.run_once(stop, &mut index, &activity, attempt, offline_since);
            if activity.started.load(Ordering::Relaxed) {
                // It was online: the next failure starts a fresh backoff.
                delay = cam.retry_min;
                attempt = 0;
                offline_since = None;
            }
            let message = match outcome {
                Outcome::Finished => {
                    tracing::info!(camera = %spec.name, frames = index, "end of file");
                    return;
                }
                Outcome::Stopped => return,
                Outcome::Failed(message) => {
                    let secrets = self.secrets();
                    scrub(
                        &message,
                        &secrets.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                    )
                }
            };
            if !retries {
                tracing::error!(camera = %spec.name, error = %message, "camera failed");
                self.set_state(State::Offline, attempt, Some(message));
                return;
            }
            attempt += 1;
            self.stats().restarts.fetch_add(1, Ordering::Relaxed);
            let jittered = jitter(delay);
            let previous = self.set_state(State::Reconnecting, attempt, Some(message.clone()));
            if previous.state != State::Reconnecting {
                offline_since.get_or_insert_with(Instant::now);
                tracing::warn!(camera = %spec.name, error = %message, retry_in = ?jittered,
                    "camera lost; reconnecting (retries continue with backoff, logged at debug)");
            } else {
                tracing::debug!(camera = %spec.name, attempt, error = %message, retry_in = ?jittered,
                    "camera still unreachable");
            }
            let until = Instant::now() + jittered;
            while Instant::now() < until {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
            }
            delay = (delay * 2).min(cam.retry_max);
        }
    }

    fn run_once(
        &self,
        stop: &AtomicBool,
        index: &mut u64,
        activity: &Arc<Activity>,
        attempt: u32,
        offline_since: Option<Instant>,
    ) -> Outcome {
        let spec = self.spec;
        let (pipeline, sink) = match spec.build() {
            Ok(p) => p,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        if let Some(parse) = pipeline.by_name("parse")
            && let Some(pad) = parse.static_pad("src")
        {
            let stats = self.queue.stats.clone();
            stats.counts_received.store(true, Ordering::Relaxed);
            pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
                stats.received.fetch_add(1, Ordering::Relaxed);
                gst::PadProbeReturn::Ok
            });
        }
        if spec.camera.decode == DecodeMode::Keyframes {
            // Drop non-key frames before whatever video decoder the pipeline ends up with
            // (also one plugged inside decodebin).
            let stats = self.queue.stats.clone();
            pipeline.connect_deep_element_added(move |_, _, element| {
                let is_video_decoder = element.factory().is_some_and(|f| {
                    let klass = f.klass();
                    klass.contains("Decoder") && klass.contains("Video")
                });
                if let (true, Some(pad)) = (is_video_decoder, element.static_pad("sink")) {
                    let stats = stats.clone();
                    pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
                        match info.buffer() {
                            Some(b) if b.flags().contains(gst::BufferFlags::DELTA_UNIT) => {
                                stats.skipped_delta.fetch_add(1, Ordering::Relaxed);
                                gst::PadProbeReturn::Handled
                            }
                            _ => gst::PadProbeReturn::Ok,
                        }
                    });
                }
            });
        }
        let next_index = Arc::new(AtomicU64::new(*index));
        activity.last_ms.store(now_ms(), Ordering::Relaxed);
        let gate = Arc::new(Gate {
            camera: spec.name.clone(),
            queue: self.queue.clone(),
            notices: self.notices.clone(),
            activity: activity.clone(),
            next_index: next_index.clone(),
            pacer: Mutex::new(Pacer::new(spec.camera.analyze_fps)),
            started: Instant::now(),
            attempt,
            offline_since,
            admitted: Mutex::new(None),
        });
        // Frames are counted and skipped (analyze_fps, paused) before the colour conversion when
        // the template has one in front of the appsink: skipped frames are never converted.
        // (Skipped buffers are returned as Handled, not Drop: gstreamer-rs takes the buffer out
        // of the probe info, and GStreamer 1.22 would then unref a NULL for Drop.)
        let gated_upstream = match converter_sink_pad(&sink) {
            Some(pad) => {
                let gate = gate.clone();
                pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
                    match info.buffer() {
                        Some(b) if !gate.admit(b.pts().map(Duration::from)) => {
                            gst::PadProbeReturn::Handled
                        }
                        _ => gst::PadProbeReturn::Ok,
                    }
                });
                true
            }
            None => false,
        };
        {
            let queue = self.queue.clone();
            let activity = activity.clone();
            let mut size: Option<(u32, u32)> = None;
            let name = spec.name.clone();
            sink.set_callbacks(
                gstreamer_app::AppSinkCallbacks::builder()
                    .new_sample(move |sink| {
                        let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                        let buffer = sample.buffer_owned().ok_or(gst::FlowError::Error)?;
                        if !gated_upstream && !gate.admit(buffer.pts().map(Duration::from)) {
                            return Ok(gst::FlowSuccess::Ok);
                        }
                        let Some((index, pts)) = gate.take() else {
                            return Ok(gst::FlowSuccess::Ok);
                        };
                        let caps = sample.caps().ok_or(gst::FlowError::NotNegotiated)?;
                        let info = gstreamer_video::VideoInfo::from_caps(caps)
                            .map_err(|_| gst::FlowError::NotNegotiated)?;
                        let now_size = (info.width(), info.height());
                        if size != Some(now_size) {
                            match size {
                                None => tracing::info!(camera = %name, width = now_size.0, height = now_size.1, "receiving frames"),
                                Some((w, h)) => tracing::info!(camera = %name, from = %format!("{w}x{h}"),
                                    to = %format!("{}x{}", now_size.0, now_size.1), "resolution changed"),
                            }
                            size = Some(now_size);
                        }
                        let frame = Frame {
                            meta: FrameMeta::new(name.clone(), index, pts),
                            pixels: Pixels::Gst { buffer, info },
                        };
                        activity.pushing.store(true, Ordering::Relaxed);
                        let pushed = queue.push(frame);
                        activity.pushing.store(false, Ordering::Relaxed);
                        activity.last_ms.store(now_ms(), Ordering::Relaxed);
                        if pushed {
                            Ok(gst::FlowSuccess::Ok)
                        } else {
                            Err(gst::FlowError::Flushing)
                        }
                    })
                    .build(),
            );
        }
        let outcome = self.watch(&pipeline, stop, activity);
        let _ = pipeline.set_state(gst::State::Null);
        *index = next_index.load(Ordering::Relaxed);
        outcome
    }

    fn watch(&self, pipeline: &gst::Pipeline, stop: &AtomicBool, activity: &Activity) -> Outcome {
        let spec = self.spec;
        let bus = pipeline.bus().expect("a pipeline has a bus");
        if let Err(e) = pipeline.set_state(gst::State::Playing) {
            // The reason, if any, is on the bus.
            let reason = bus
                .timed_pop_filtered(
                    gst::ClockTime::from_mseconds(500),
                    &[gst::MessageType::Error],
                )
                .and_then(|m| match m.view() {
                    gst::MessageView::Error(err) => Some(error_text(err)),
                    _ => None,
                })
                .unwrap_or_else(|| e.to_string());
            return Outcome::Failed(reason);
        }
        loop {
            if stop.load(Ordering::Relaxed) {
                return Outcome::Stopped;
            }
            // The watchdog: a pipeline that claims to play but delivers nothing is dead.
            let limit = if activity.started.load(Ordering::Relaxed) {
                spec.camera.stall_timeout
            } else {
                spec.camera.start_timeout
            };
            let quiet = now_ms().saturating_sub(activity.last_ms.load(Ordering::Relaxed));
            if !activity.pushing.load(Ordering::Relaxed) && quiet > limit.as_millis() as u64 {
                return Outcome::Failed(if activity.started.load(Ordering::Relaxed) {
                    format!(
                        "stalled: no frame for {:.1} s (stall_timeout)",
                        quiet as f64 / 1000.0
                    )
                } else {
                    format!(
                        "no frame within {:.1} s of starting (start_timeout)",
                        quiet as f64 / 1000.0
                    )
                });
            }
            let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else {
                continue;
            };
            match msg.view() {
                gst::MessageView::Eos(_) => {
                    if spec.camera.source == SourceKind::File && spec.camera.looping {
                        if let Err(e) = pipeline.seek_simple(
                            gst::SeekFlags::FLUSH | gst::SeekFlags::KEY_UNIT,
                            gst::ClockTime::ZERO,
                        ) {
                            return Outcome::Failed(format!("cannot seek back to the start: {e}"));
                        }
                        activity.last_ms.store(now_ms(), Ordering::Relaxed);
                        tracing::debug!(camera = %spec.name, "looping");
                    } else if spec.camera.source == SourceKind::File {
                        return Outcome::Finished;
                    } else {
                        return Outcome::Failed("the stream ended".into());
                    }
                }
                gst::MessageView::Error(err) => return Outcome::Failed(error_text(err)),
                gst::MessageView::Warning(w) => {
                    tracing::debug!(camera = %spec.name, warning = %w.error(), "pipeline warning");
                }
                _ => {}
            }
        }
    }
}

/// Counts decoded frames, announces the camera online, and decides which frames are analysed
/// (`analyze_fps`, paused by command). It runs on the sink pad of the video converter in front
/// of the appsink, so that skipped frames are never converted; without one, in the appsink.
struct Gate {
    camera: Arc<str>,
    queue: Arc<FrameQueue>,
    notices: Sender<Arc<str>>,
    activity: Arc<Activity>,
    next_index: Arc<AtomicU64>,
    pacer: Mutex<Pacer>,
    started: Instant,
    attempt: u32,
    offline_since: Option<Instant>,
    /// The last frame let through: its index and continuous pts, for the appsink callback.
    admitted: Mutex<Option<(u64, Option<Duration>)>>,
}

impl Gate {
    /// A decoded frame arrives: true to analyse it.
    fn admit(&self, raw_pts: Option<Duration>) -> bool {
        let stats = &self.queue.stats;
        let now = now_ms();
        self.activity.last_ms.store(now, Ordering::Relaxed);
        stats.last_frame_ms.store(now, Ordering::Relaxed);
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        stats.frames.fetch_add(1, Ordering::Relaxed);
        if !self.activity.started.swap(true, Ordering::Relaxed) {
            stats.set_state(State::Online, 0, None);
            let _ = self.notices.send(self.camera.clone());
            match self.offline_since {
                Some(t) => tracing::info!(camera = %self.camera, attempts = self.attempt,
                    offline_for = ?t.elapsed(), "camera back online"),
                None => tracing::info!(camera = %self.camera, "camera online"),
            }
        }
        let (pts, admit) = self
            .pacer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(raw_pts, self.started);
        if !stats.enabled.load(Ordering::Relaxed) {
            stats.skipped_disabled.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if !admit {
            stats.skipped_rate.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        *self.admitted.lock().unwrap_or_else(|e| e.into_inner()) = Some((index, pts));
        true
    }

    fn take(&self) -> Option<(u64, Option<Duration>)> {
        self.admitted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// The sink pad of the first of the video converters (videoconvert, videoscale, ...) directly in
/// front of the appsink, if any.
fn converter_sink_pad(sink: &AppSink) -> Option<gst::Pad> {
    let mut found = None;
    let mut pad = sink.static_pad("sink")?;
    while let Some(element) = pad.peer().and_then(|p| p.parent_element()) {
        let converter = element
            .factory()
            .is_some_and(|f| f.klass().contains("Converter") && f.klass().contains("Video"));
        let Some(input) = element.static_pad("sink").filter(|_| converter) else {
            break;
        };
        found = Some(input.clone());
        pad = input;
    }
    found
}

/// `d` +- 20%, so that cameras that failed together do not all retry at the same instant.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.8 + 0.4 * fastrand::f64())
}

fn error_text(err: &gst::message::Error) -> String {
    let src = err
        .src()
        .map(|s| s.path_string().to_string())
        .unwrap_or_default();
    match err.debug() {
        Some(d) => format!("{src}: {} ({d})", err.error()),
        None => format!("{src}: {}", err.error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_take_integers_and_reject_unknown_placeholders() {
        let t = "# comment\nvideotestsrc name=src ! video/x-raw,width={width},height={height} !\n appsink name=sink";
        let out = render_template(t, &[("width", 640), ("height", 480)]).unwrap();
        assert_eq!(
            out,
            "videotestsrc name=src ! video/x-raw,width=640,height=480 !  appsink name=sink"
        );
        let e = render_template("filesrc location={path}", &[("width", 1)]).unwrap_err();
        assert!(e.contains("unknown placeholder {path}"), "{e}");
        assert!(render_template("a {width", &[("width", 1)]).is_err());
    }

    #[test]
    fn analyze_fps_keeps_the_cadence() {
        let mut p = Pacer::new(5.0);
        let start = Instant::now();
        let admitted = (0..250)
            .filter(|i| p.admit(Some(Duration::from_millis(40 * i)), start).1)
            .count();
        // 10 s of 25 fps at 5 fps: 50 frames.
        assert_eq!(admitted, 50);
    }

    #[test]
    fn pts_keep_growing_across_loops() {
        let mut p = Pacer::new(0.0);
        let start = Instant::now();
        let a = p.admit(Some(Duration::from_millis(0)), start).0.unwrap();
        let b = p.admit(Some(Duration::from_millis(40)), start).0.unwrap();
        let c = p.admit(Some(Duration::from_millis(0)), start).0.unwrap();
        assert!(a < b && b < c, "{a:?} {b:?} {c:?}");
        assert_eq!(c, Duration::from_millis(80));
    }
}
