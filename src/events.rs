//! Frame decisions → alerts: an event lifecycle per camera and watched label, with hysteresis.
//!
//! - `start` once a label has stayed at or over its threshold for `min_frames` analysed frames
//!   and `min_duration`;
//! - `update` at most every `update_interval` while it lasts (current and top score);
//! - `end` once it has stayed under `threshold - hysteresis` for `cooldown` (or when the camera
//!   stops delivering frames, goes offline, is disabled, or vigil stops).
//!
//! Durations are measured on the stream's clock (frame pts) when frames have one, so a file
//! analysed faster than real time follows the same rules as a live camera.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use vigil_engine::model::ModelInfo;

use crate::frame::{FrameResult, HeadInfo, Watched};
use crate::wire::{ascii_id, timestamp, topic_level};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct EventsConfig {
    /// Labels (classes or groups) that make events and have ON/OFF state topics. Empty: every
    /// group, and every class named in a thresholds table.
    pub watch: Vec<String>,
    /// Consecutive analysed frames at or over the threshold before an event starts.
    pub min_frames: u32,
    /// ... and for at least this long.
    #[serde(with = "humantime_serde")]
    pub min_duration: Duration,
    /// Most frequent `update` of a running event.
    #[serde(with = "humantime_serde")]
    pub update_interval: Duration,
    /// An event ends when the score stays under `threshold - hysteresis` ...
    pub hysteresis: f32,
    /// ... for this long.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            watch: Vec::new(),
            min_frames: 3,
            min_duration: Duration::ZERO,
            update_interval: Duration::from_secs(10),
            hysteresis: 0.1,
            cooldown: Duration::from_secs(3),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Start,
    Update,
    End,
}

/// One message of an event's life, as published on `<prefix>/events`.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Grows by one with every event message vigil publishes (set by the publisher).
    pub seq: u64,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// Stable across the event's start, updates and end.
    pub id: String,
    pub camera: String,
    /// The zone it happens in; null: the whole frame.
    pub zone: Option<String>,
    pub label: String,
    /// "class" or "group".
    pub label_kind: &'static str,
    /// Wall-clock time of the first frame over the threshold.
    pub start: String,
    /// Wall-clock time of the first frame under `threshold - hysteresis` (end only).
    pub end: Option<String>,
    /// The score of the latest frame.
    pub score: f32,
    pub top_score: f32,
    pub threshold: f32,
    /// Analysed frames at or over `threshold - hysteresis` so far.
    pub frames: u64,
    /// Seconds from start (to end, or to now).
    pub duration: f64,
    /// Why it ended: "cleared", "no frames", "camera offline", "camera disabled", "shutdown".
    pub reason: Option<&'static str>,
    /// The model version that classified the event's latest frame.
    pub model: Arc<ModelInfo>,
    /// The head (and its version) that labelled the event's latest frame; null: the model's own
    /// labels.
    pub head: Option<Arc<HeadInfo>>,
    /// URL of the JPEG of the frame that started the event, when one was saved.
    pub snapshot: Option<String>,
}

struct Running {
    id: String,
    zone: Option<Arc<str>>,
    model: Arc<ModelInfo>,
    head: Option<Arc<HeadInfo>>,
    label_kind: &'static str,
    start_wall: SystemTime,
    start_clock: Duration,
    last_update: Duration,
    top_score: f32,
    score: f32,
    threshold: f32,
    frames: u64,
    /// (clock, wall) of the first frame of the current run under the hysteresis band.
    below_since: Option<(Duration, SystemTime)>,
}

/// A run of frames over the threshold long enough to start an event.
struct RunStart {
    clock: Duration,
    wall: SystemTime,
    /// The clock of the frame that completes the run.
    now: Duration,
    frames: u32,
    top: f32,
}

impl RunStart {
    /// The event this run starts, numbered `n`.
    fn begin(
        self,
        camera: &str,
        zone: Option<&str>,
        w: &Watched,
        (model, head): (&Arc<ModelInfo>, &Option<Arc<HeadInfo>>),
        n: u64,
    ) -> Running {
        let millis = self
            .wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let subject = match zone {
            Some(zone) => format!("{camera}-{zone}"),
            None => camera.to_string(),
        };
        Running {
            // ASCII, so that it names a snapshot file whatever the label.
            id: format!(
                "{subject}-{}-{millis}-{n}",
                ascii_id(&topic_level(&w.label))
            ),
            zone: zone.map(Arc::from),
            model: model.clone(),
            head: head.clone(),
            label_kind: w.kind,
            start_wall: self.wall,
            start_clock: self.clock,
            last_update: self.now,
            top_score: self.top,
            score: w.score,
            threshold: w.threshold,
            frames: self.frames as u64,
            below_since: None,
        }
    }
}

impl Running {
    /// A frame of the running event: over `threshold - hysteresis` it counts (and clears the
    /// cooldown), under it the cooldown runs from its first such frame.
    fn follow(
        &mut self,
        cfg: &EventsConfig,
        w: &Watched,
        (model, head): (&Arc<ModelInfo>, &Option<Arc<HeadInfo>>),
        clock: Duration,
        wall: SystemTime,
    ) {
        if !Arc::ptr_eq(&self.model, model) {
            self.model = model.clone();
        }
        if self.head != *head {
            self.head = head.clone();
        }
        self.score = w.score;
        self.threshold = w.threshold;
        if w.score >= w.threshold - cfg.hysteresis {
            self.below_since = None;
            self.frames += 1;
            self.top_score = self.top_score.max(w.score);
        } else {
            self.below_since.get_or_insert((clock, wall));
        }
    }
}

#[derive(Default)]
struct Track {
    /// Consecutive frames over the threshold, their best score, and the (clock, wall) of the first.
    run: u32,
    run_top: f32,
    run_start: Option<(Duration, SystemTime)>,
    running: Option<Running>,
}

impl Track {
    fn reset_run(&mut self) {
        self.run = 0;
        self.run_top = 0.0;
        self.run_start = None;
    }
}

/// A camera's stream clock, made monotonic (a reconnect restarts pts at 0).
#[derive(Default)]
struct Clock {
    last_raw: Option<Duration>,
    now: Duration,
    last_wall: Option<SystemTime>,
}

impl Clock {
    fn advance(&mut self, raw: Option<Duration>, wall: SystemTime) -> Duration {
        let step = match (raw, self.last_raw) {
            (Some(r), Some(l)) if r >= l => r - l,
            (Some(_), Some(_)) => Duration::ZERO,
            _ => self
                .last_wall
                .and_then(|w| wall.duration_since(w).ok())
                .unwrap_or_default(),
        };
        self.last_raw = raw;
        self.last_wall = Some(wall);
        self.now += step;
        self.now
    }
}

/// What an event is about: (camera, zone, watched label).
type Subject = (Arc<str>, Option<Arc<str>>, Arc<str>);

/// The lifecycle of every (camera, zone, watched label).
pub struct EventTracker {
    cfg: EventsConfig,
    tracks: HashMap<Subject, Track>,
    clocks: HashMap<Arc<str>, Clock>,
    /// Wall time of each camera's last analysed frame.
    last_frame: HashMap<Arc<str>, SystemTime>,
    next_id: u64,
}

impl EventTracker {
    pub fn new(cfg: EventsConfig) -> Self {
        EventTracker {
            cfg,
            tracks: HashMap::new(),
            clocks: HashMap::new(),
            last_frame: HashMap::new(),
            next_id: 0,
        }
    }

    /// New settings (a config reload); running events carry on under them.
    pub fn set_config(&mut self, cfg: EventsConfig) {
        self.cfg = cfg;
    }

    /// Feeds one frame's decisions; returns the event messages it causes.
    pub fn on_frame(&mut self, r: &FrameResult) -> Vec<Event> {
        let camera = &r.meta.camera;
        let clock = self
            .clocks
            .entry(camera.clone())
            .or_default()
            .advance(r.meta.pts, r.meta.wall);
        self.last_frame.insert(camera.clone(), r.meta.wall);
        let mut out = Vec::new();
        let zone = r.meta.zone.as_ref().map(|z| z.name.clone());
        for w in &r.watched {
            let key = (camera.clone(), zone.clone(), w.label.clone());
            let track = self.tracks.entry(key).or_default();
            let event = match &mut track.running {
                None => {
                    let start = Self::count_run(&self.cfg, track, w, clock, r.meta.wall);
                    start.map(|start| {
                        self.next_id += 1;
                        let running = start.begin(
                            camera,
                            zone.as_deref(),
                            w,
                            (&r.model, &r.head),
                            self.next_id,
                        );
                        let e = event(camera, &w.label, &running, EventType::Start, clock, None);
                        track.running = Some(running);
                        e
                    })
                }
                Some(running) => {
                    running.follow(&self.cfg, w, (&r.model, &r.head), clock, r.meta.wall);
                    Self::update_or_end(&self.cfg, track, camera, &w.label, clock)
                }
            };
            out.extend(event);
        }
        out
    }

    /// A frame of a label with no running event: counts the run over the threshold; returns the
    /// run's start once it is long enough for an event.
    fn count_run(
        cfg: &EventsConfig,
        track: &mut Track,
        w: &Watched,
        clock: Duration,
        wall: SystemTime,
    ) -> Option<RunStart> {
        if w.score < w.threshold {
            track.reset_run();
            return None;
        }
        track.run += 1;
        track.run_top = track.run_top.max(w.score);
        let (start_clock, start_wall) = *track.run_start.get_or_insert((clock, wall));
        if track.run < cfg.min_frames.max(1) || clock.saturating_sub(start_clock) < cfg.min_duration
        {
            return None;
        }
        let start = RunStart {
            clock: start_clock,
            wall: start_wall,
            now: clock,
            frames: track.run,
            top: track.run_top,
        };
        track.reset_run();
        Some(start)
    }

    /// After a running event followed a frame: its end once it stayed under the band for the
    /// cooldown, an update when one is due, else nothing.
    fn update_or_end(
        cfg: &EventsConfig,
        track: &mut Track,
        camera: &Arc<str>,
        label: &str,
        clock: Duration,
    ) -> Option<Event> {
        let running = track.running.as_mut()?;
        if let Some((since, _)) = running.below_since
            && clock.saturating_sub(since) >= cfg.cooldown
        {
            let running = track.running.take()?;
            return Some(event(
                camera,
                label,
                &running,
                EventType::End,
                clock,
                Some("cleared"),
            ));
        }
        if running.below_since.is_none()
            && clock.saturating_sub(running.last_update) >= cfg.update_interval
        {
            running.last_update = clock;
            return Some(event(
                camera,
                label,
                running,
                EventType::Update,
                clock,
                None,
            ));
        }
        None
    }

    /// Ends the events of cameras that delivered no analysed frame for `max(cooldown, 5 s)`.
    pub fn on_tick(&mut self, now: SystemTime) -> Vec<Event> {
        let silence = self.cfg.cooldown.max(Duration::from_secs(5));
        let silent: Vec<Arc<str>> = self
            .last_frame
            .iter()
            .filter(|(_, t)| now.duration_since(**t).unwrap_or_default() >= silence)
            .map(|(c, _)| c.clone())
            .collect();
        silent
            .iter()
            .flat_map(|c| self.end_camera(c, "no frames"))
            .collect()
    }

    /// The camera still delivers frames, though none was analysed (motion gating skipped them):
    /// its events hold rather than end for want of frames.
    pub fn on_alive(&mut self, camera: &str, wall: SystemTime) {
        if let Some(last) = self.last_frame.get_mut(camera) {
            *last = (*last).max(wall);
        }
    }

    /// Ends every running event of a camera (it went offline, was disabled, ...).
    pub fn end_camera(&mut self, camera: &str, reason: &'static str) -> Vec<Event> {
        let clock = self.clocks.get(camera).map(|c| c.now).unwrap_or_default();
        let mut out = Vec::new();
        for ((cam, _, label), track) in self.tracks.iter_mut() {
            if &**cam != camera {
                continue;
            }
            track.reset_run();
            if &**cam == camera
                && let Some(running) = track.running.take()
            {
                out.push(event(
                    cam,
                    label,
                    &running,
                    EventType::End,
                    clock,
                    Some(reason),
                ));
            }
        }
        self.last_frame.remove(camera);
        out
    }

    /// Ends everything (vigil is stopping).
    pub fn end_all(&mut self) -> Vec<Event> {
        let cameras: Vec<Arc<str>> = self.clocks.keys().cloned().collect();
        cameras
            .iter()
            .flat_map(|c| self.end_camera(c, "shutdown"))
            .collect()
    }
}

fn event(
    camera: &str,
    label: &str,
    r: &Running,
    kind: EventType,
    clock: Duration,
    reason: Option<&'static str>,
) -> Event {
    let end_clock = match (kind, r.below_since) {
        (EventType::End, Some((c, _))) => c,
        _ => clock,
    };
    Event {
        seq: 0,
        kind,
        id: r.id.clone(),
        camera: camera.to_string(),
        zone: r.zone.as_deref().map(str::to_string),
        label: label.to_string(),
        label_kind: r.label_kind,
        start: timestamp(r.start_wall),
        end: (kind == EventType::End).then(|| {
            timestamp(
                r.below_since
                    .map(|(_, w)| w)
                    .unwrap_or_else(SystemTime::now),
            )
        }),
        score: r.score,
        top_score: r.top_score,
        threshold: r.threshold,
        frames: r.frames,
        duration: end_clock.saturating_sub(r.start_clock).as_secs_f64(),
        reason,
        model: r.model.clone(),
        head: r.head.clone(),
        snapshot: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameMeta;

    fn frame(t_ms: u64, score: f32) -> FrameResult {
        let meta = FrameMeta {
            wall: SystemTime::UNIX_EPOCH + Duration::from_millis(t_ms),
            ..FrameMeta::new("cam".into(), t_ms / 100, Some(Duration::from_millis(t_ms)))
        };
        FrameResult::watching_cat(meta, score)
    }

    fn tracker() -> EventTracker {
        EventTracker::new(EventsConfig {
            min_frames: 3,
            update_interval: Duration::from_secs(1),
            cooldown: Duration::from_millis(500),
            hysteresis: 0.1,
            ..Default::default()
        })
    }

    /// Frames every 100 ms with the given scores; returns (time, type) of every event.
    fn run(scores: &[f32]) -> Vec<(u64, EventType)> {
        let mut t = tracker();
        let mut out = Vec::new();
        for (i, s) in scores.iter().enumerate() {
            for e in t.on_frame(&frame(i as u64 * 100, *s)) {
                out.push((i as u64 * 100, e.kind));
            }
        }
        out
    }

    #[test]
    fn flicker_shorter_than_min_frames_makes_no_event() {
        let scores = [0.9, 0.9, 0.1, 0.9, 0.9, 0.1, 0.9, 0.1, 0.9, 0.9];
        assert!(run(&scores).is_empty());
    }

    #[test]
    fn one_start_bounded_updates_and_one_end() {
        // 3 s present, then gone.
        let mut scores = vec![0.9; 30];
        scores.extend(vec![0.1; 20]);
        let events = run(&scores);
        assert_eq!(events.first(), Some(&(200, EventType::Start)), "{events:?}");
        let updates = events.iter().filter(|e| e.1 == EventType::Update).count();
        assert_eq!(updates, 2, "{events:?}");
        // Under the band from 3.0 s; cooldown 0.5 s.
        assert_eq!(events.last(), Some(&(3500, EventType::End)), "{events:?}");
        assert_eq!(events.len(), 4);
    }

    #[test]
    fn scores_inside_the_hysteresis_band_keep_the_event_alive() {
        // 0.45 is under the threshold (0.5) but over threshold - hysteresis (0.4).
        let mut scores = vec![0.9; 5];
        scores.extend(vec![0.45; 20]);
        scores.extend(vec![0.3; 10]);
        let events = run(&scores);
        let kinds: Vec<_> = events.iter().map(|e| e.1).collect();
        assert_eq!(
            kinds,
            vec![
                EventType::Start,
                EventType::Update,
                EventType::Update,
                EventType::End
            ]
        );
        assert_eq!(events.last().unwrap().0, 3000);
    }

    #[test]
    fn the_end_carries_the_start_the_top_score_and_the_reason() {
        let mut t = tracker();
        let mut all = Vec::new();
        for (i, s) in [0.6, 0.95, 0.7, 0.7, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
            .iter()
            .enumerate()
        {
            all.extend(t.on_frame(&frame(i as u64 * 100, *s)));
        }
        let start = &all[0];
        let end = all.last().unwrap();
        assert_eq!(start.id, end.id);
        assert_eq!(end.kind, EventType::End);
        assert_eq!(end.reason, Some("cleared"));
        assert_eq!(end.top_score, 0.95);
        assert_eq!(end.start, timestamp(SystemTime::UNIX_EPOCH));
        assert!((end.duration - 0.4).abs() < 1e-9, "{}", end.duration);
    }

    #[test]
    fn a_silent_camera_ends_its_events() {
        let mut t = tracker();
        for i in 0..5 {
            t.on_frame(&frame(i * 100, 0.9));
        }
        assert!(
            t.on_tick(SystemTime::UNIX_EPOCH + Duration::from_secs(2))
                .is_empty()
        );
        let ended = t.on_tick(SystemTime::UNIX_EPOCH + Duration::from_secs(6));
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].reason, Some("no frames"));
    }
}
