//! The sink: the last stage of `vigil run`. Every result goes to the publisher, through the event
//! lifecycle, into the latest-frame store and the event log; camera state changes, commands from
//! the service and a periodic tick end the events of cameras that went down, were removed or were
//! paused.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Receiver;

use crate::events::{Event, EventTracker, EventType, EventsConfig};
use crate::frame::FrameResult;
use crate::ops::capture::Capturer;
use crate::ops::shared::{SinkCommand, SinkShared};
use crate::pipeline::Recycler;
use crate::publish::Publisher;
use crate::stats::{GraphStats, LatencyLog, State};
use crate::sync::lock;

/// How long a camera that went down waits for its last frames before its events end anyway.
const DOWN_GRACE: Duration = Duration::from_secs(5);

/// How often the sink looks at silent, down and paused cameras.
const TICK: Duration = Duration::from_millis(250);

pub struct Sink<P: Publisher> {
    publisher: P,
    tracker: EventTracker,
    shared: Arc<SinkShared>,
    graph: Arc<GraphStats>,
    latency: Arc<LatencyLog>,
    /// Cameras paused by command.
    paused: HashSet<Arc<str>>,
    /// Cameras down (reconnecting or offline): the index + 1 of the last frame they queued,
    /// until it is out (then 0), and since when.
    down_since: HashMap<Arc<str>, (u64, Instant)>,
    /// Cameras removed by a reload (their frames still in flight are not published).
    removed: HashSet<Arc<str>>,
    /// Index + 1 of the last frame of each camera out of the sink.
    last_done: HashMap<Arc<str>, u64>,
    /// Saves the frames worth labelling of regions bound to a head (when any is).
    capturer: Option<Capturer>,
}

impl<P: Publisher> Sink<P> {
    pub fn new(
        publisher: P,
        events: EventsConfig,
        shared: Arc<SinkShared>,
        graph: Arc<GraphStats>,
        latency: Arc<LatencyLog>,
    ) -> Sink<P> {
        Sink {
            publisher,
            tracker: EventTracker::new(events),
            shared,
            graph,
            latency,
            paused: HashSet::new(),
            down_since: HashMap::new(),
            removed: HashSet::new(),
            last_done: HashMap::new(),
            capturer: None,
        }
    }

    /// Captures frames worth labelling for the heads' inboxes.
    pub fn with_capturer(mut self, capturer: Capturer) -> Sink<P> {
        self.capturer = Some(capturer);
        self
    }

    /// Serves the results, camera notices and commands until the results end; then every
    /// camera goes offline, every event ends and the publisher closes.
    pub fn run(
        mut self,
        results: Receiver<FrameResult>,
        notices: Receiver<Arc<str>>,
        commands: Receiver<SinkCommand>,
        recycler: Recycler,
    ) {
        let tick = crossbeam_channel::tick(TICK);
        loop {
            crossbeam_channel::select! {
                recv(results) -> r => match r {
                    Ok(r) => {
                        self.graph.sink.queue_depth.store(results.len() as u64, Relaxed);
                        recycler.recycle(self.on_result(r));
                    }
                    Err(_) => break,
                },
                recv(notices) -> n => if let Ok(name) = n {
                    self.on_notice(&name);
                },
                recv(commands) -> c => if let Ok(c) = c {
                    self.on_command(c);
                },
                recv(tick) -> _ => self.on_tick(SystemTime::now()),
            }
        }
        self.finish();
    }

    /// A frame's result: published, through the event lifecycle, kept as the camera's latest.
    /// Returns it, for its buffers to be reused.
    pub fn on_result(&mut self, mut r: FrameResult) -> FrameResult {
        let graph = self.graph.clone();
        let stats = &graph.sink;
        stats.received(1);
        if self.removed.contains(&r.meta.camera) {
            // A frame of a camera removed by a reload, still in flight: its events and retained
            // topics are gone, keep them so.
            stats.sent(1);
            return r;
        }
        self.publisher.publish(&r);
        let events = self.tracker.on_frame(&r);
        self.capture(&r, &events);
        self.publish_events(events, Some(&r));
        let camera = r.meta.camera.clone();
        let done = r.meta.index + 1;
        match self.last_done.get_mut(&camera) {
            Some(d) => *d = done,
            None => {
                self.last_done.insert(camera.clone(), done);
            }
        }
        if let Some(&(last, _)) = self.down_since.get(&camera)
            && last > 0
            && done >= last
        {
            // The last frame the camera queued before going down is out.
            self.end_camera(&camera, "camera offline");
            self.down_since.insert(camera, (0, Instant::now()));
        }
        self.shared.set_latest(&mut r);
        let latency = r.meta.arrived.elapsed();
        self.latency.record(latency);
        self.shared.recent_latency.record(latency);
        self.graph
            .telemetry
            .latency_seconds
            .observe(latency.as_secs_f64());
        stats.sent(1);
        r
    }

    /// A camera's state changed (or the reporter refreshes its status).
    pub fn on_notice(&mut self, name: &Arc<str>) {
        let Some(cam) = self.graph.camera(name) else {
            return;
        };
        let status = cam.status(name);
        let down = matches!(status.state, State::Reconnecting | State::Offline);
        let was_down = self.down_since.contains_key(name);
        if down && !was_down {
            // Its events end once the frames it queued before going down have come out (or
            // after a while, if the last of them was lost).
            let mut last = cam.last_queued.load(Relaxed);
            if self.last_done.get(name).is_some_and(|d| *d >= last) {
                self.end_camera(name, "camera offline");
                last = 0;
            }
            self.down_since.insert(name.clone(), (last, Instant::now()));
        } else if !down && was_down {
            self.down_since.remove(name);
        }
        self.publisher.publish_camera(&status);
    }

    pub fn on_command(&mut self, command: SinkCommand) {
        match command {
            SinkCommand::CameraAdded(camera) => {
                self.removed.remove(camera.name.as_str());
                self.publisher.add_camera(&camera);
            }
            SinkCommand::CameraRemoved { name } => {
                self.removed.insert(Arc::from(name.as_str()));
                self.end_camera(&name, "camera removed");
                self.publisher.remove_camera(&name);
                lock(&self.shared.latest).remove(name.as_str());
                self.paused.remove(name.as_str());
                self.down_since.remove(name.as_str());
                self.last_done.remove(name.as_str());
            }
            SinkCommand::Events(cfg) => self.tracker.set_config(cfg),
        }
    }

    /// Ends the events of silent cameras, of cameras down for longer than the grace, and of
    /// cameras just paused.
    pub fn on_tick(&mut self, now: SystemTime) {
        // Cameras that deliver frames (analysed or skipped for want of motion) are alive.
        for (name, cam) in self.graph.cameras() {
            if cam.seconds_since_last_frame().is_some_and(|s| s < 2.0) {
                self.tracker.on_alive(&name, now);
            }
        }
        let events = self.tracker.on_tick(now);
        self.publish_events(events, None);
        let overdue: Vec<Arc<str>> = self
            .down_since
            .iter()
            .filter(|(_, (last, since))| *last > 0 && since.elapsed() >= DOWN_GRACE)
            .map(|(name, _)| name.clone())
            .collect();
        for name in overdue {
            self.end_camera(&name, "camera offline");
            self.down_since.insert(name, (0, Instant::now()));
        }
        for (name, cam) in self.graph.cameras() {
            if cam.enabled.load(Relaxed) {
                self.paused.remove(&name);
            } else if self.paused.insert(name.clone()) {
                self.end_camera(&name, "camera disabled");
                self.publisher.publish_camera(&cam.status(&name));
            }
        }
        self.publisher.flush();
    }

    /// vigil is stopping: every camera is offline from here on (their threads may not have said
    /// so yet), every event ends, the publisher closes.
    pub fn finish(mut self) {
        for (name, cam) in self.graph.cameras() {
            if cam.state().state != State::Offline {
                cam.set_state(State::Offline, 0, None);
            }
            self.publisher.publish_camera(&cam.status(&name));
        }
        let events = self.tracker.end_all();
        self.publish_events(events, None);
        self.publisher.close(Duration::from_secs(5));
    }

    /// Saves `r` for labelling when its region is bound to a head and the frame is worth it
    /// (flagged wrong, starting or ending an event, uncertain); a frame that starts an event is
    /// kept for a later flag of the event.
    fn capture(&mut self, r: &FrameResult, events: &[Event]) {
        let Some(capturer) = &mut self.capturer else {
            return;
        };
        if r.head.is_none() {
            return;
        }
        let Some(cam) = self.graph.camera(&r.meta.camera) else {
            return;
        };
        let flagged = cam
            .flags
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if let Some(plan) = capturer.plan(r, events, flagged) {
            let saved = plan.save;
            if capturer.capture(r, plan) && saved {
                cam.captured.fetch_add(1, Relaxed);
            }
        }
    }

    fn end_camera(&mut self, camera: &str, reason: &'static str) {
        let events = self.tracker.end_camera(camera, reason);
        self.publish_events(events, None);
    }

    /// Records and publishes event messages; a start saves its snapshot from `r`'s pixels.
    fn publish_events(&mut self, events: Vec<Event>, r: Option<&FrameResult>) {
        for mut e in events {
            if e.kind == EventType::Start {
                self.graph.telemetry.event_started(&e.label);
            }
            match r {
                Some(r) => self
                    .shared
                    .attach_snapshot(&mut e, r, &self.graph.telemetry),
                None => {
                    if self
                        .shared
                        .snapshots
                        .as_ref()
                        .is_some_and(|s| s.contains(&e.id))
                    {
                        e.snapshot = Some(self.shared.snapshot_url(&e.id));
                    }
                }
            }
            lock(&self.shared.events).record(&e);
            self.publisher.publish_event(&e);
            self.shared.feed.send(&e);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::frame::FrameMeta;
    use crate::ops::shared::EventLog;
    use crate::publish::CameraAnnouncement;
    use crate::stats::{CameraStats, CameraStatus};

    /// A publisher that writes down what it is asked to publish.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl Recorder {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *lock(&self.0))
        }
        fn push(&self, line: String) {
            lock(&self.0).push(line);
        }
    }

    impl Publisher for Recorder {
        fn publish(&mut self, r: &FrameResult) {
            self.push(format!("frame {} {}", r.meta.camera, r.meta.index));
        }
        fn publish_event(&mut self, e: &Event) {
            let kind = serde_json::to_value(e.kind).unwrap();
            let reason = e.reason.unwrap_or("-");
            self.push(format!(
                "event {} {} {} {reason}",
                kind.as_str().unwrap(),
                e.camera,
                e.label
            ));
        }
        fn publish_camera(&mut self, status: &CameraStatus) {
            self.push(format!(
                "status {} {}",
                status.camera,
                status.state.as_str()
            ));
        }
        fn add_camera(&mut self, camera: &CameraAnnouncement) {
            self.push(format!("add {}", camera.name));
        }
        fn remove_camera(&mut self, camera: &str) {
            self.push(format!("remove {camera}"));
        }
        fn flush(&mut self) {}
        fn close(self, _: Duration) {
            self.push("close".into());
        }
    }

    fn sink() -> (Sink<Recorder>, Recorder, Arc<CameraStats>) {
        let graph = Arc::new(GraphStats::default());
        let cam = Arc::new(CameraStats::new("test".into()));
        graph.insert_camera("cam".into(), cam.clone());
        let shared = Arc::new(SinkShared {
            latest: Default::default(),
            events: Mutex::new(EventLog::new(100)),
            feed: Default::default(),
            recent_latency: Default::default(),
            snapshots: None,
            url_base: String::new(),
        });
        let recorder = Recorder::default();
        let sink = Sink::new(
            recorder.clone(),
            EventsConfig::default(),
            shared,
            graph,
            Arc::default(),
        );
        (sink, recorder, cam)
    }

    /// Frame `index` of "cam" 100 ms apart on the stream clock, the label "cat" at `score`.
    fn result(index: u64, score: f32) -> FrameResult {
        let pts = Some(Duration::from_millis(100 * index));
        FrameResult::watching_cat(FrameMeta::new("cam".into(), index, pts), score)
    }

    fn events(lines: &[String]) -> Vec<&str> {
        lines
            .iter()
            .filter(|l| l.starts_with("event"))
            .map(|l| l.as_str())
            .collect()
    }

    #[test]
    fn a_camera_that_goes_down_ends_its_events_once_its_last_queued_frame_is_out() {
        let (mut sink, rec, cam) = sink();
        for i in 0..5 {
            sink.on_result(result(i, 0.9));
        }
        assert_eq!(events(&rec.take()), ["event start cam cat -"]);
        // The camera queued frames up to 9, then went down.
        cam.last_queued.store(10, Relaxed);
        cam.set_state(State::Reconnecting, 1, Some("lost".into()));
        sink.on_notice(&Arc::from("cam"));
        let lines = rec.take();
        assert_eq!(
            lines,
            ["status cam reconnecting"],
            "no end while frames are in flight"
        );
        for i in 5..9 {
            sink.on_result(result(i, 0.9));
        }
        assert!(events(&rec.take()).is_empty());
        sink.on_result(result(9, 0.9));
        assert_eq!(events(&rec.take()), ["event end cam cat camera offline"]);
    }

    #[test]
    fn frames_of_a_removed_camera_still_in_flight_are_not_published() {
        let (mut sink, rec, _) = sink();
        for i in 0..4 {
            sink.on_result(result(i, 0.9));
        }
        assert_eq!(events(&rec.take()), ["event start cam cat -"]);
        sink.on_command(SinkCommand::CameraRemoved { name: "cam".into() });
        assert_eq!(
            rec.take(),
            ["event end cam cat camera removed", "remove cam"]
        );
        for i in 4..8 {
            let back = sink.on_result(result(i, 0.9));
            assert_eq!(back.meta.index, i, "the result comes back for its buffers");
        }
        assert!(rec.take().is_empty());
        // Added again by a later reload: published again.
        sink.on_command(SinkCommand::CameraAdded(CameraAnnouncement {
            name: "cam".into(),
            whole_frame: true,
            zones: Vec::new(),
            watched: vec!["cat".into()],
        }));
        sink.on_result(result(8, 0.1));
        assert_eq!(rec.take(), ["add cam", "frame cam 8"]);
    }

    #[test]
    fn a_paused_camera_ends_its_events_at_the_next_tick_and_says_so_once() {
        let (mut sink, rec, cam) = sink();
        for i in 0..4 {
            sink.on_result(result(i, 0.9));
        }
        rec.take();
        cam.enabled.store(false, Relaxed);
        sink.on_tick(SystemTime::now());
        let lines = rec.take();
        assert_eq!(
            lines,
            ["event end cam cat camera disabled", "status cam starting"]
        );
        sink.on_tick(SystemTime::now());
        assert!(rec.take().is_empty(), "nothing more while it stays paused");
    }

    #[test]
    fn finishing_marks_every_camera_offline_ends_every_event_and_closes() {
        let (mut sink, rec, cam) = sink();
        for i in 0..4 {
            sink.on_result(result(i, 0.9));
        }
        rec.take();
        sink.finish();
        assert_eq!(
            rec.take(),
            ["status cam offline", "event end cam cat shutdown", "close"]
        );
        assert_eq!(cam.state().state, State::Offline);
    }
}
