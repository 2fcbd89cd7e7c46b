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

use crate::source::queue::FrameQueue;
use crate::stats::{State, now_ms};
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
        }
    }

    /// The frame's continuous pts, and whether to analyse it.
    pub fn admit(&mut self, raw: Option<Duration>, started: Instant) -> (Option<Duration>, bool) {
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
    /// While analysis is paused, frames go on to the sink unanalysed (the pipeline, paused, must
    /// preroll one) instead of being dropped here.
    pass_when_paused: bool,
    /// The last frame let through: its index and continuous pts, for the appsink callback.
    admitted: Mutex<Option<(u64, Option<Duration>)>>,
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
        analyze_fps: f64,
        start: RunStart,
        pass_when_paused: bool,
    ) -> Gate {
        Gate {
            camera: queue.camera().clone(),
            queue,
            notices,
            activity,
            next_index,
            pacer: Mutex::new(Pacer::new(analyze_fps)),
            started: Instant::now(),
            start,
            pass_when_paused,
            admitted: Mutex::new(None),
        }
    }

    /// A decoded frame arrives: analyse it, skip it, or let it pass unanalysed.
    pub fn admit(&self, raw_pts: Option<Duration>) -> Verdict {
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
        let (pts, admit) = lock(&self.pacer).admit(raw_pts, self.started);
        if !stats.enabled.load(Ordering::Relaxed) {
            stats.skipped_disabled.fetch_add(1, Ordering::Relaxed);
            return if self.pass_when_paused {
                Verdict::Pass
            } else {
                Verdict::Skip
            };
        }
        if !admit {
            stats.skipped_rate.fetch_add(1, Ordering::Relaxed);
            return Verdict::Skip;
        }
        *lock(&self.admitted) = Some((index, pts));
        Verdict::Analyse
    }

    pub fn take(&self) -> Option<(u64, Option<Duration>)> {
        lock(&self.admitted).take()
    }
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
