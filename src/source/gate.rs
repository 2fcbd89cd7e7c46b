//! Which decoded frames are analysed: the [`Gate`] counts every frame out of the decoder,
//! announces the camera online, and lets through the frames due under `analyze_fps` while the
//! camera is not paused. It runs on the sink pad of the video converter in front of the appsink,
//! so that skipped frames are never converted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app::AppSink;

use opencv::core::Mat;

use gstreamer_video::prelude::*;

use crate::frame::Due;
use crate::source::motion::{Motion, MotionConfig, MotionDetector, Schedule};
use crate::source::queue::FrameQueue;
use crate::source::zones::Regions;
use crate::stats::{RegionCounts, RegionFigures, State, now_ms};
use crate::sync::lock;

/// Per-run state of the appsink callback.
pub struct Pacer {
    /// Minimum stream time between analysed frames (`analyze_fps`).
    interval: Option<Duration>,
    next_due: Option<Duration>,
    /// Added to buffer timestamps so they keep growing across loops of a file.
    pts_offset: Duration,
    last_raw: Option<Duration>,
    last_step: Duration,
    /// A file started again since [`Pacer::started_again`] was last asked.
    looped: bool,
}

impl Pacer {
    pub fn new(analyze_fps: f64) -> Self {
        Pacer {
            // (A rate too small for a Duration, which validation refuses, analyses every frame
            // rather than panic.)
            interval: (analyze_fps > 0.0)
                .then(|| Duration::try_from_secs_f64(1.0 / analyze_fps).ok())
                .flatten(),
            next_due: None,
            pts_offset: Duration::ZERO,
            last_raw: None,
            last_step: Duration::from_millis(40),
            looped: false,
        }
    }

    /// The continuous pts a frame at `raw` would get, without taking it; None when it would
    /// start a new loop of a file.
    pub fn peek(&self, raw: Option<Duration>, started: Instant) -> Option<Duration> {
        match (raw, self.last_raw) {
            (None, _) => Some(started.elapsed()),
            (Some(raw), Some(last)) if raw < last => None,
            (Some(raw), _) => Some(raw + self.pts_offset),
        }
    }

    /// Whether a file started again since the last call.
    pub fn started_again(&mut self) -> bool {
        std::mem::take(&mut self.looped)
    }

    /// The frame's continuous pts, and whether to analyse it.
    pub fn admit(&mut self, raw: Option<Duration>, started: Instant) -> (Option<Duration>, bool) {
        let pts = raw.map(|raw| {
            if let Some(last) = self.last_raw {
                if raw < last {
                    // The file started again: continue from where the last loop ended.
                    self.pts_offset += last + self.last_step - raw;
                    self.looped = true;
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
        // The frame nearest the due time is taken, not the first after it: with frames as far
        // apart as the interval (key frames only, one a second, at analyze_fps = 1), one arriving
        // a hair early would otherwise be skipped and leave a gap of two intervals.
        match self.next_due {
            Some(due) if t + self.last_step / 2 < due => (pts, false),
            due => {
                // Keep the cadence, but never owe more than one frame when frames came late.
                let next = due.map_or(t + interval, |d| d + interval);
                self.next_due = Some(if next > t { next } else { t + interval });
                (pts, true)
            }
        }
    }
}

/// What the appsink callback shares with the thread watching the pipeline.
#[derive(Default)]
pub struct Activity {
    /// `now_ms()` of the last frame out of the decoder, or of the pipeline's start.
    pub last_ms: AtomicU64,
    /// The callback is waiting for room in a (blocking) queue: not a stall.
    pub pushing: std::sync::atomic::AtomicBool,
    /// At least one frame arrived in this run.
    pub started: std::sync::atomic::AtomicBool,
}

/// Counts decoded frames, announces the camera online, and decides which frames are analysed
/// (`analyze_fps`, paused by command). It runs on the sink pad of the video converter in front
/// of the appsink, so that skipped frames are never converted; without one, in the appsink.
pub struct Gate {
    camera: Arc<str>,
    queue: Arc<FrameQueue>,
    notices: Sender<Arc<str>>,
    activity: Arc<Activity>,
    next_index: Arc<AtomicU64>,
    pacer: Mutex<Pacer>,
    started: Instant,
    start: RunStart,
    /// Files: a frame the pipeline must preroll goes on to the sink unanalysed instead of being
    /// dropped here: every frame while analysis is paused (the pipeline, paused, waits for one),
    /// and the first after a loop's flushing seek (the pipeline plays again once its sink has
    /// one; with motion gating on a still scene, none would come).
    prerolls: bool,
    regions: Arc<Regions>,
    /// Motion gating, when enabled.
    motion: Option<Mutex<MotionGate>>,
    /// The last frame let through: its index, continuous pts and due regions, for the appsink
    /// callback.
    admitted: Mutex<Option<Admitted>>,
}

/// A frame let through for analysis.
#[derive(Debug, Clone, Copy)]
pub struct Admitted {
    pub index: u64,
    pub pts: Option<Duration>,
    pub due: Due,
}

/// How a gate runs: the analysis rate, the regions, motion, and which run of the camera it is.
pub struct GateSetup {
    pub analyze_fps: f64,
    pub start: RunStart,
    /// Files: see [`Gate`]'s `prerolls`.
    pub prerolls: bool,
    pub regions: Arc<Regions>,
    pub motion: MotionConfig,
}

/// A decoded frame as the gate may look at it (for motion).
pub struct FrameView<'a> {
    pub buffer: &'a gst::BufferRef,
    pub caps: &'a gst::CapsRef,
}

/// One run's motion detector and zone schedule.
struct MotionGate {
    detector: MotionDetector,
    /// Region 0 is the whole frame, region `i + 1` zone `i`.
    schedule: Schedule,
    /// The frames' format has no luma plane motion can read: said once, then every frame due.
    unsupported: bool,
    /// Motion saw nothing anywhere in the last frame it looked at.
    still: bool,
}

/// What motion gating says of a key frame before it is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyFrameWish {
    /// Decode it whatever the coded sizes say.
    pub needed: bool,
    /// The scene was still at the last decoded frame, and nothing is settling.
    pub still: bool,
}

/// Which run of a camera's pipeline this is: the reconnection attempt, and since when the camera
/// has been offline (for the log).
#[derive(Debug, Clone, Copy)]
pub struct RunStart {
    pub attempt: u32,
    pub offline_since: Option<Instant>,
}

/// What becomes of a decoded frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Analyse,
    /// Dropped before any conversion.
    Skip,
    /// On to the sink, but not analysed.
    Pass,
}

impl Gate {
    /// A gate for one run of a camera's pipeline, numbering frames from `next_index`.
    pub fn new(
        queue: Arc<FrameQueue>,
        notices: Sender<Arc<str>>,
        activity: Arc<Activity>,
        next_index: Arc<AtomicU64>,
        setup: GateSetup,
    ) -> Gate {
        let motion = setup.motion.enabled.then(|| {
            Mutex::new(MotionGate {
                detector: MotionDetector::new(&setup.motion),
                schedule: Schedule::new(&setup.motion, setup.regions.zones.len() + 1),
                unsupported: false,
                still: false,
            })
        });
        let figures = RegionFigures {
            regions: std::iter::once(None)
                .filter(|_| setup.regions.whole_frame)
                .chain(setup.regions.zones.iter().map(|z| Some(z.name.clone())))
                .map(|zone| RegionCounts {
                    zone,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        *lock(&queue.stats.regions) = figures;
        Gate {
            camera: queue.camera().clone(),
            queue,
            notices,
            activity,
            next_index,
            pacer: Mutex::new(Pacer::new(setup.analyze_fps)),
            started: Instant::now(),
            start: setup.start,
            prerolls: setup.prerolls,
            regions: setup.regions,
            motion,
            admitted: Mutex::new(None),
        }
    }

    /// A decoded frame arrives: analyse it (the regions due), skip it, or let it pass
    /// unanalysed. `view` lets motion look at it.
    pub fn admit(&self, raw_pts: Option<Duration>, view: Option<FrameView<'_>>) -> Verdict {
        let stats = &self.queue.stats;
        let now = now_ms();
        self.activity.last_ms.store(now, Ordering::Relaxed);
        stats.last_frame_ms.store(now, Ordering::Relaxed);
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        stats.frames.fetch_add(1, Ordering::Relaxed);
        if !self.activity.started.swap(true, Ordering::Relaxed) {
            stats.set_state(State::Online, 0, None);
            let _ = self.notices.send(self.camera.clone());
            match self.start.offline_since {
                Some(t) => tracing::info!(camera = %self.camera, attempts = self.start.attempt,
                    offline_for = ?t.elapsed(), "camera back online"),
                None => tracing::info!(camera = %self.camera, "camera online"),
            }
        }
        let ((pts, admit), looped) = {
            let mut pacer = lock(&self.pacer);
            (pacer.admit(raw_pts, self.started), pacer.started_again())
        };
        // Not analysed: dropped here, or on to the sink when the pipeline must preroll it.
        let skip = |prerolled: bool| {
            if self.prerolls && prerolled {
                Verdict::Pass
            } else {
                Verdict::Skip
            }
        };
        if !stats.enabled.load(Ordering::Relaxed) {
            stats.skipped_disabled.fetch_add(1, Ordering::Relaxed);
            return skip(true);
        }
        if !admit {
            stats.skipped_rate.fetch_add(1, Ordering::Relaxed);
            return skip(looped);
        }
        let now = pts.unwrap_or_else(|| self.started.elapsed());
        let due = self.due(now, view);
        if due == Due::NONE {
            stats.skipped_motion.fetch_add(1, Ordering::Relaxed);
            return skip(looped);
        }
        *lock(&self.admitted) = Some(Admitted { index, pts, due });
        Verdict::Analyse
    }

    /// Before a key frame at `raw_pts` is decoded (`decode = "keyframes"`, `motion.coded`):
    /// whether motion needs it anyway (a zone never analysed, settling or due for its
    /// heartbeat; motion unable to read the frames; analysis paused; a file that started
    /// again), and whether the scene is still.
    pub fn key_frame_wish(&self, raw_pts: Option<Duration>) -> KeyFrameWish {
        let needed = KeyFrameWish {
            needed: true,
            still: false,
        };
        let Some(motion) = &self.motion else {
            return needed;
        };
        if !self.queue.stats.enabled.load(Ordering::Relaxed) {
            return needed;
        }
        let Some(now) = lock(&self.pacer).peek(raw_pts, self.started) else {
            return needed;
        };
        let gate = lock(motion);
        if gate.unsupported {
            return needed;
        }
        let first = usize::from(!self.regions.whole_frame);
        let (stale, settling) = gate.schedule.wants(first, now);
        KeyFrameWish {
            needed: stale || settling,
            still: gate.still && !settling,
        }
    }

    pub fn take(&self) -> Option<Admitted> {
        lock(&self.admitted).take()
    }

    /// The regions due at stream time `now`: all of them without motion gating; with it, those
    /// where something moves, settles, or that were not analysed for `max_interval`.
    fn due(&self, now: Duration, view: Option<FrameView<'_>>) -> Due {
        let all = self.regions.all();
        let Some(motion) = &self.motion else {
            self.count(all, None);
            return all;
        };
        let mut gate = lock(motion);
        let seen = match view {
            Some(view) if !gate.unsupported => {
                let seen = with_luma(view, |luma| gate.detector.detect(luma));
                if seen.is_none() {
                    gate.unsupported = true;
                    tracing::warn!(camera = %self.camera,
                        "motion gating needs frames with a luma plane (I420, NV12, ...): every frame is analysed");
                }
                seen.and_then(|r| {
                    r.inspect_err(
                        |e| tracing::debug!(camera = %self.camera, error = %e, "motion failed"),
                    )
                    .ok()
                })
            }
            _ => None,
        };
        let Some(seen) = seen else {
            self.count(all, None);
            return all;
        };
        gate.still = seen.boxes.is_empty();
        let mut due = 0u64;
        if self.regions.whole_frame && gate.schedule.due(0, now, !seen.boxes.is_empty()) {
            due |= 1;
        }
        for (i, zone) in self.regions.zones.iter().enumerate() {
            if gate.schedule.due(i + 1, now, seen.in_rect(zone.rect)) {
                due |= 1 << (i + 1);
            }
        }
        drop(gate);
        self.count(Due(due), Some(&seen));
        Due(due)
    }

    /// Counts each region analysed or skipped, and keeps what motion saw.
    fn count(&self, due: Due, seen: Option<&Motion>) {
        let mut figures = lock(&self.queue.stats.regions);
        for r in figures.regions.iter_mut() {
            let (is_due, moving) = match &r.zone {
                None => (due.whole_frame(), seen.is_some_and(|m| !m.boxes.is_empty())),
                Some(name) => {
                    let Some(i) = self.regions.zones.iter().position(|z| z.name == *name) else {
                        continue;
                    };
                    let rect = self.regions.zones[i].rect;
                    (due.zone(i), seen.is_some_and(|m| m.in_rect(rect)))
                }
            };
            if is_due {
                r.analysed += 1;
            } else {
                r.skipped_motion += 1;
            }
            r.moving = moving;
        }
        if let Some(m) = seen {
            figures.motion_boxes.clone_from(&m.boxes);
            figures.motion_changed = m.changed;
            figures.recalibrations += u64::from(m.recalibrated);
        }
    }
}

/// Runs `f` on the frame's luma plane (a header over the mapped buffer, no copy); None when the
/// format has none.
fn with_luma<T>(view: FrameView<'_>, f: impl FnOnce(&Mat) -> T) -> Option<T> {
    use gstreamer_video::VideoFormat as F;
    let info = gstreamer_video::VideoInfo::from_caps(view.caps).ok()?;
    let planar = [
        F::I420,
        F::Yv12,
        F::Nv12,
        F::Nv21,
        F::Nv16,
        F::Nv24,
        F::Y42b,
        F::Y444,
        F::Y41b,
        F::Gray8,
    ];
    if !planar.contains(&info.format()) {
        return None;
    }
    let frame =
        gstreamer_video::VideoFrameRef::from_buffer_ref_readable(view.buffer, &info).ok()?;
    let data = frame.plane_data(0).ok()?;
    let stride = frame.plane_stride()[0] as usize;
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    if h == 0 || data.len() < stride * (h - 1) + w {
        return None;
    }
    // SAFETY: the header borrows the mapped plane, which outlives it (the frame is mapped until
    // the end of this function); the check above keeps every row inside it; it is only read.
    let luma = unsafe {
        Mat::new_rows_cols_with_data_unsafe(
            h as i32,
            w as i32,
            opencv::core::CV_8UC1,
            data.as_ptr() as *mut std::ffi::c_void,
            stride,
        )
    }
    .ok()?;
    Some(f(&luma))
}

/// The sink pad of the first of the video converters (videoconvert, videoscale, ...) directly in
/// front of the appsink, if any.
pub fn converter_sink_pad(sink: &AppSink) -> Option<gst::Pad> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn frames_as_far_apart_as_the_interval_are_all_taken_despite_jitter() {
        let mut p = Pacer::new(1.0);
        let start = Instant::now();
        let jitter = [0i64, -30, 20, -10, 30, -25, 5, -5, 15, -20];
        let admitted = (0..60i64)
            .filter(|i| {
                let ms = 1000 * i + jitter[*i as usize % jitter.len()] + 40;
                p.admit(Some(Duration::from_millis(ms as u64)), start).1
            })
            .count();
        assert_eq!(admitted, 60, "one key frame a second at analyze_fps = 1");
    }

    #[test]
    fn pts_keep_growing_across_loops() {
        let mut p = Pacer::new(0.0);
        let start = Instant::now();
        let a = p.admit(Some(Duration::from_millis(0)), start).0.unwrap();
        let b = p.admit(Some(Duration::from_millis(40)), start).0.unwrap();
        assert!(!p.started_again());
        let c = p.admit(Some(Duration::from_millis(0)), start).0.unwrap();
        assert!(a < b && b < c, "{a:?} {b:?} {c:?}");
        assert_eq!(c, Duration::from_millis(80));
        // Said once, for the first frame of the new loop.
        assert!(p.started_again());
        p.admit(Some(Duration::from_millis(40)), start);
        assert!(!p.started_again());
    }
}
