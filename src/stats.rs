//! Counters every stage and camera keeps, for the periodic log summary, the camera status topic
//! and `/metrics`. They sit at the bottom of the house: every stage writes them, the publisher and
//! the operations read them.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;

use crate::sync::{lock, read, write};
use crate::wire::timestamp;

/// Counters of every stage and camera of the pipeline.
#[derive(Default)]
pub struct GraphStats {
    /// The running cameras (a reload adds and removes some).
    cameras: RwLock<BTreeMap<Arc<str>, Arc<CameraStats>>>,
    pub preprocess: StageStats,
    pub batch: StageStats,
    pub infer: StageStats,
    pub decide: StageStats,
    pub sink: StageStats,
    /// Predict requests that went through the batcher (not in the cameras' figures, but in the
    /// stages' received/sent counts).
    pub requests: StageStats,
    pub telemetry: Telemetry,
    /// How long a batch takes these days (µs, a running mean): the batcher skips a live frame
    /// that could not be out within `max_frame_age` when its camera has a newer one.
    pub batch_micros: AtomicU64,
    /// Whether the batcher batches frames now (the model is busy, `pipeline.batch_load`), or
    /// sends each alone.
    pub batching: AtomicBool,
}

impl GraphStats {
    /// Counts a batch's time into the running mean (weight 1/8).
    pub fn batch_took(&self, took: Duration) {
        let now = took.as_micros().min(u64::MAX as u128) as u64;
        let old = self.batch_micros.load(Relaxed);
        let mean = if old == 0 {
            now
        } else {
            old - old / 8 + now / 8
        };
        self.batch_micros.store(mean, Relaxed);
    }

    /// The running mean of a batch's time.
    pub fn batch_time(&self) -> Duration {
        Duration::from_micros(self.batch_micros.load(Relaxed))
    }

    /// The running cameras, by name.
    pub fn cameras(&self) -> Vec<(Arc<str>, Arc<CameraStats>)> {
        read(&self.cameras)
            .iter()
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect()
    }

    pub fn camera(&self, name: &str) -> Option<Arc<CameraStats>> {
        read(&self.cameras).get(name).cloned()
    }

    pub fn insert_camera(&self, name: Arc<str>, stats: Arc<CameraStats>) {
        write(&self.cameras).insert(name, stats);
    }

    pub fn remove_camera(&self, name: &str) -> Option<Arc<CameraStats>> {
        write(&self.cameras).remove(name)
    }
}

/// What one stage received, sent, dropped and how long it was busy.
#[derive(Debug, Default)]
pub struct StageStats {
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    pub busy_ns: AtomicU64,
    /// Items waiting in the stage's input channel, sampled when the stage takes one.
    pub queue_depth: AtomicU64,
}

impl StageStats {
    pub fn received(&self, n: u64) {
        self.received.fetch_add(n, Relaxed);
    }
    pub fn sent(&self, n: u64) {
        self.sent.fetch_add(n, Relaxed);
    }
    pub fn dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Relaxed);
    }
    /// Adds the time since `since` to the busy time.
    pub fn busy_since(&self, since: Instant) {
        self.busy_ns
            .fetch_add(since.elapsed().as_nanos() as u64, Relaxed);
    }
    pub fn snapshot(&self) -> StageSnapshot {
        StageSnapshot {
            received: self.received.load(Relaxed),
            sent: self.sent.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            busy: Duration::from_nanos(self.busy_ns.load(Relaxed)),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageSnapshot {
    pub received: u64,
    pub sent: u64,
    pub dropped: u64,
    pub busy: Duration,
}

/// Distributions and counters that only `/metrics` shows (the stage and camera counters above are
/// shared with the log and the status topics).
pub struct Telemetry {
    /// Frames per batch sent to the model.
    pub batch_size: Histogram,
    /// Time one batch spends in the model, seconds.
    pub inference_seconds: Histogram,
    /// Frame reaching vigil (out of the decoder, or reaching a shared key-frame decoder) to
    /// published, seconds.
    pub latency_seconds: Histogram,
    /// Events started, by label (watched labels only: low cardinality).
    pub events_started: Family<Vec<(String, String)>, Counter>,
    /// Predict requests by outcome ("ok", "bad_request", "rate_limited", ...).
    pub predict_requests: Family<Vec<(String, String)>, Counter>,
    /// Snapshots written and failed.
    pub snapshots_written: Counter,
    pub snapshots_failed: Counter,
    /// Model switches done and refused; config reloads applied and refused.
    pub model_switches: Counter,
    pub model_switches_failed: Counter,
    pub reloads: Counter,
    pub reloads_failed: Counter,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            batch_size: Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
            inference_seconds: Histogram::new([
                0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
                2.0,
            ]),
            // Fine where alerts live (tens of ms), coarse beyond a second.
            latency_seconds: Histogram::new([
                0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
                0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
            ]),
            events_started: Family::default(),
            predict_requests: Family::default(),
            snapshots_written: Counter::default(),
            snapshots_failed: Counter::default(),
            model_switches: Counter::default(),
            model_switches_failed: Counter::default(),
            reloads: Counter::default(),
            reloads_failed: Counter::default(),
        }
    }
}

impl Telemetry {
    pub fn event_started(&self, label: &str) {
        self.events_started
            .get_or_create(&vec![("label".to_string(), label.to_string())])
            .inc();
    }

    pub fn predict_request(&self, outcome: &str) {
        self.predict_requests
            .get_or_create(&vec![("outcome".to_string(), outcome.to_string())])
            .inc();
    }
}

/// End-to-end latency (frame arrival → published) of the last interval.
#[derive(Default)]
pub struct LatencyLog {
    samples: Mutex<Vec<Duration>>,
}

impl LatencyLog {
    pub fn record(&self, d: Duration) {
        let mut s = lock(&self.samples);
        if s.len() < 100_000 {
            s.push(d);
        }
    }

    /// (p50, p99) since the last call.
    pub fn take_percentiles(&self) -> Option<(Duration, Duration)> {
        let mut s = std::mem::take(&mut *lock(&self.samples));
        if s.is_empty() {
            return None;
        }
        s.sort_unstable();
        let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
        Some((at(0.5), at(0.99)))
    }
}

/// Milliseconds since the process's first call: a monotonic clock that fits an atomic.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Where a camera is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Its pipeline is being built and has not delivered a frame yet.
    Starting,
    /// Frames are arriving.
    Online,
    /// Its pipeline failed or stalled; vigil is rebuilding it (with backoff).
    Reconnecting,
    /// Stopped: vigil is shutting down, or a file ended.
    Offline,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Online => "online",
            State::Reconnecting => "reconnecting",
            State::Offline => "offline",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CameraState {
    pub state: State,
    /// Reconnect attempts since the camera was last online.
    pub attempt: u32,
    /// The last error, credentials removed.
    pub last_error: Option<String>,
    pub since: SystemTime,
}

/// One camera's frame counters and state.
#[derive(Debug)]
pub struct CameraStats {
    /// The source, credentials removed (URL, path or test pattern).
    pub source: String,
    /// Encoded frames that reached the parser (when the template names one `parse`).
    pub received: AtomicU64,
    /// Frames that came out of the decoder.
    pub frames: AtomicU64,
    /// Coded frames that reached a video decoder when every frame is decoded: at the end of a
    /// file, those beyond `frames` are the ones it could not decode.
    pub decoder_in: AtomicU64,
    /// Frames skipped to keep to `analyze_fps`.
    pub skipped_rate: AtomicU64,
    /// Frames dropped because vigil was behind (live sources: oldest first).
    pub dropped_queue: AtomicU64,
    /// Pipeline rebuilds after a failure or a stall.
    pub restarts: AtomicU64,
    /// `now_ms()` of the last decoded frame; 0 = none yet.
    pub last_frame_ms: AtomicU64,
    /// Decoded frames per second over the last reporting interval, x100.
    pub input_fps_x100: AtomicU64,
    /// Whether the template has a `parse` element whose buffers are counted in `received`.
    pub counts_received: AtomicBool,
    /// Analysis on (the MQTT command `<prefix>/<camera>/set/enabled` turns it off and on).
    pub enabled: AtomicBool,
    /// Frames skipped while analysis was off.
    pub skipped_disabled: AtomicU64,
    /// Encoded non-key frames dropped before the decoder (`decode = "keyframes"`).
    pub skipped_delta: AtomicU64,
    /// Key frames not decoded because their coded sizes said the scene was still
    /// (`motion.coded`).
    pub skipped_still: AtomicU64,
    /// Index + 1 of the last frame queued for analysis (0: none yet), so that the sink knows
    /// when a camera's frames in flight have all come out.
    pub last_queued: AtomicU64,
    pub state: Mutex<CameraState>,
    /// RTSP cameras: the transport of the current (or last) connection, "tcp" or "udp".
    pub transport: Mutex<Option<&'static str>>,
    /// Frames due for analysis skipped because nothing moved.
    pub skipped_motion: AtomicU64,
    /// Per region (the whole frame and each zone): frames analysed and skipped, and what motion
    /// saw last.
    pub regions: Mutex<RegionFigures>,
    /// "Wrong" flags from operators (`<prefix>/<camera>/set/wrong`, `POST
    /// /api/cameras/<id>/wrong`) not yet served: the sink captures the camera's next analysed
    /// frames for labelling.
    pub flags: AtomicU64,
    /// Frames saved for labelling, and captures dropped (the writer was behind).
    pub captured: AtomicU64,
}

/// Pending "wrong" flags a camera keeps at most (more are the same request).
pub const MAX_FLAGS: u64 = 8;

/// An operator says `cam`'s answer is wrong: its next analysed frames are captured.
pub fn flag_wrong(cam: &CameraStats) {
    let _ = cam
        .flags
        .fetch_update(Relaxed, Relaxed, |n| Some((n + 1).min(MAX_FLAGS)));
}

/// What a camera's regions have seen, for tuning zones and motion.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RegionFigures {
    pub regions: Vec<RegionCounts>,
    /// The moving blobs of the last frame motion looked at, `[x0, y0, x1, y1]` as fractions.
    pub motion_boxes: Vec<[f32; 4]>,
    /// Fraction of that frame that changed.
    pub motion_changed: f32,
    /// Times the background was taken again (changes of light).
    pub recalibrations: u64,
}

/// One region's counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RegionCounts {
    /// The zone; null for the whole frame.
    pub zone: Option<Arc<str>>,
    pub analysed: u64,
    pub skipped_motion: u64,
    /// Whether motion was seen in it in the last frame motion looked at.
    pub moving: bool,
}

impl CameraStats {
    pub fn new(source: String) -> Self {
        CameraStats {
            source,
            received: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            decoder_in: AtomicU64::new(0),
            skipped_rate: AtomicU64::new(0),
            dropped_queue: AtomicU64::new(0),
            flags: AtomicU64::new(0),
            captured: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            last_frame_ms: AtomicU64::new(0),
            input_fps_x100: AtomicU64::new(0),
            counts_received: AtomicBool::new(false),
            enabled: AtomicBool::new(true),
            skipped_disabled: AtomicU64::new(0),
            skipped_delta: AtomicU64::new(0),
            skipped_still: AtomicU64::new(0),
            last_queued: AtomicU64::new(0),
            transport: Mutex::new(None),
            skipped_motion: AtomicU64::new(0),
            regions: Mutex::new(RegionFigures::default()),
            state: Mutex::new(CameraState {
                state: State::Starting,
                attempt: 0,
                last_error: None,
                since: SystemTime::now(),
            }),
        }
    }

    pub fn snapshot(&self) -> [u64; 4] {
        [
            self.frames.load(Relaxed),
            self.skipped_rate.load(Relaxed),
            self.dropped_queue.load(Relaxed),
            self.restarts.load(Relaxed),
        ]
    }

    pub fn state(&self) -> CameraState {
        lock(&self.state).clone()
    }

    /// Changes the state; returns the previous one.
    pub fn set_state(&self, state: State, attempt: u32, last_error: Option<String>) -> CameraState {
        let mut s = lock(&self.state);
        let previous = s.clone();
        let last_error = last_error.or_else(|| s.last_error.clone());
        *s = CameraState {
            state,
            attempt,
            last_error,
            since: if previous.state == state {
                previous.since
            } else {
                SystemTime::now()
            },
        };
        previous
    }

    /// Seconds since the last decoded frame (None before the first).
    pub fn seconds_since_last_frame(&self) -> Option<f64> {
        match self.last_frame_ms.load(Relaxed) {
            0 => None,
            t => Some(now_ms().saturating_sub(t) as f64 / 1000.0),
        }
    }

    pub fn status(&self, camera: &str) -> CameraStatus {
        let s = self.state();
        CameraStatus {
            camera: camera.to_string(),
            state: s.state,
            since: timestamp(s.since),
            attempt: s.attempt,
            last_error: s.last_error,
            source: self.source.clone(),
            frames: FrameCounts {
                received: self
                    .counts_received
                    .load(Relaxed)
                    .then(|| self.received.load(Relaxed)),
                decoded: self.frames.load(Relaxed),
                skipped_rate: self.skipped_rate.load(Relaxed),
                skipped_disabled: self.skipped_disabled.load(Relaxed),
                skipped_delta: self.skipped_delta.load(Relaxed),
                skipped_still: self.skipped_still.load(Relaxed),
                skipped_motion: self.skipped_motion.load(Relaxed),
                dropped_behind: self.dropped_queue.load(Relaxed),
            },
            enabled: self.enabled.load(Relaxed),
            input_fps: self.input_fps_x100.load(Relaxed) as f64 / 100.0,
            reconnects: self.restarts.load(Relaxed),
            seconds_since_last_frame: self.seconds_since_last_frame(),
            transport: *lock(&self.transport),
            regions: {
                let r = lock(&self.regions);
                // Worth showing with zones or motion: more than the whole frame's count.
                (r.regions.len() > 1
                    || r.regions.iter().any(|c| c.skipped_motion > 0)
                    || r.recalibrations > 0)
                    .then(|| r.clone())
            },
        }
    }
}

/// A camera's state and figures, as published on `<prefix>/<camera>/status`.
#[derive(Debug, Clone, Serialize)]
pub struct CameraStatus {
    pub camera: String,
    pub state: State,
    /// When the camera entered this state.
    pub since: String,
    pub attempt: u32,
    pub last_error: Option<String>,
    pub source: String,
    pub frames: FrameCounts,
    pub input_fps: f64,
    pub reconnects: u64,
    pub seconds_since_last_frame: Option<f64>,
    /// Analysis on or paused (by command).
    pub enabled: bool,
    /// RTSP cameras: the transport of the current (or last) connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<&'static str>,
    /// With zones or motion gating: each region's figures and what motion saw last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regions: Option<RegionFigures>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FrameCounts {
    /// Encoded frames received (null when the template has no `parse` element).
    pub received: Option<u64>,
    pub decoded: u64,
    pub skipped_rate: u64,
    pub skipped_disabled: u64,
    /// Non-key frames dropped before the decoder (`decode = "keyframes"`).
    pub skipped_delta: u64,
    /// Key frames not decoded: their coded sizes said the scene was still (`motion.coded`).
    pub skipped_still: u64,
    /// Frames due for analysis skipped because nothing moved.
    pub skipped_motion: u64,
    pub dropped_behind: u64,
}
