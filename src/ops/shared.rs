//! What the sink thread and the API share: the latest analysed frame of each camera, the recent
//! events, the snapshot store; and what the service tells the sink to do.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::events::{Event, EventType, EventsConfig};
use crate::frame::{FrameResult, Pixels, Zone};
use crate::ops::api::EventQuery;
use crate::ops::snapshots::{self, Annotation, SnapshotStore};
use crate::publish::CameraAnnouncement;
use crate::stats::{LatencyLog, Telemetry};
use crate::sync::lock;
use crate::wire::timestamp;

/// What the sink thread is told to do besides publishing results.
pub enum SinkCommand {
    /// A camera started at runtime: discovery and initial states.
    CameraAdded(CameraAnnouncement),
    /// A camera stopped at runtime: end its events, delete its retained topics.
    CameraRemoved { name: String },
    /// New `[events]` settings.
    Events(EventsConfig),
}

/// The latest analysed frame of a camera, for `latest.jpg`.
pub struct Latest {
    pub pixels: Pixels,
    pub label: Arc<str>,
    pub score: f32,
    pub wall: SystemTime,
    /// The zone the label is about (None: the whole frame).
    pub zone: Option<Arc<Zone>>,
}

/// Recent events in memory: the latest message of each, oldest first, at most `capacity`.
pub struct EventLog {
    capacity: usize,
    order: VecDeque<String>,
    events: HashMap<String, (SystemTime, Event)>,
}

impl EventLog {
    pub fn new(capacity: usize) -> Self {
        EventLog {
            capacity: capacity.max(1),
            order: VecDeque::new(),
            events: HashMap::new(),
        }
    }

    pub fn record(&mut self, e: &Event) {
        if self
            .events
            .insert(e.id.clone(), (SystemTime::now(), e.clone()))
            .is_none()
        {
            self.order.push_back(e.id.clone());
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.events.remove(&old);
                }
            }
        }
    }

    /// The last message of event `id`, if it is still kept.
    pub fn get(&self, id: &str) -> Option<Event> {
        self.events.get(id).map(|(_, e)| e.clone())
    }

    /// Newest first.
    pub fn query(&self, q: &EventQuery) -> Vec<Event> {
        self.order
            .iter()
            .rev()
            .filter_map(|id| self.events.get(id))
            .filter(|(changed, e)| {
                q.camera.as_ref().is_none_or(|c| *c == e.camera)
                    && q.zone.as_ref().is_none_or(|z| Some(z) == e.zone.as_ref())
                    && q.label.as_ref().is_none_or(|l| *l == e.label)
                    && q.since.is_none_or(|s| *changed >= s)
            })
            .take(q.limit)
            .map(|(_, e)| e.clone())
            .collect()
    }
}

/// Event messages as they happen, as JSON, for the console's live feeds (`/api/stream`). A
/// listener that falls behind by more than its buffer loses the oldest and is told how many.
pub struct EventFeed {
    tx: tokio::sync::broadcast::Sender<Arc<str>>,
}

impl Default for EventFeed {
    fn default() -> Self {
        EventFeed {
            tx: tokio::sync::broadcast::Sender::new(256),
        }
    }
}

impl EventFeed {
    /// Sends `e` to the listeners (serialised only when somebody listens).
    pub fn send(&self, e: &Event) {
        if self.tx.receiver_count() > 0 {
            let json = serde_json::to_string(e).expect("events serialise");
            let _ = self.tx.send(json.into());
        }
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.tx.subscribe()
    }
}

/// What the sink thread and the API share.
pub struct SinkShared {
    pub latest: Mutex<HashMap<Arc<str>, Latest>>,
    pub events: Mutex<EventLog>,
    /// The event messages for live listeners.
    pub feed: EventFeed,
    /// End-to-end latency since the console's last sample (the log summary keeps its own).
    pub recent_latency: LatencyLog,
    pub snapshots: Option<SnapshotStore>,
    /// Prefix of snapshot URLs ("" or the configured public URL).
    pub url_base: String,
}

impl SinkShared {
    pub fn snapshot_url(&self, id: &str) -> String {
        format!("{}/api/events/{id}/snapshot.jpg", self.url_base)
    }

    /// Saves the snapshot of an event's first message; sets the URL on every message of an event
    /// that has one.
    pub fn attach_snapshot(&self, e: &mut Event, r: &FrameResult, telemetry: &Telemetry) {
        let Some(store) = &self.snapshots else {
            return;
        };
        if e.kind == EventType::Start {
            let Some(pixels) = &r.pixels else {
                return;
            };
            let annotation = Annotation {
                label: e.label.clone(),
                score: e.score,
                camera: e.camera.clone(),
                time: timestamp(r.meta.wall),
                // A zone's event outlines its zone on the whole frame.
                zones: r
                    .meta
                    .zone
                    .iter()
                    .map(|z| (z.name.to_string(), z.rect))
                    .collect(),
            };
            match store.save(&e.id, pixels, &annotation) {
                Ok(_) => {
                    telemetry.snapshots_written.inc();
                    e.snapshot = Some(self.snapshot_url(&e.id));
                }
                Err(err) => {
                    telemetry.snapshots_failed.inc();
                    tracing::warn!(event = %e.id, error = %err, "cannot save the event's snapshot");
                }
            }
        } else if store.contains(&e.id) {
            e.snapshot = Some(self.snapshot_url(&e.id));
        }
    }

    /// Keeps the frame as its camera's latest, downscaled to [`snapshots::LATEST_MAX_WIDTH`]
    /// into the buffer of the camera's previous latest frame when no request holds that one.
    /// Under the lock throughout (a fraction of a millisecond), so that a request never finds
    /// the camera without a frame.
    pub fn set_latest(&self, r: &mut FrameResult) {
        let Some(frame) = r.pixels.take() else {
            return;
        };
        let (label, score) = r
            .top
            .first()
            .map(|t| (t.label.clone(), t.score))
            .unwrap_or_else(|| (Arc::from(""), 0.0));
        let mut latest = lock(&self.latest);
        let previous = latest.remove(&r.meta.camera).map(|l| l.pixels);
        let pixels = match snapshots::downscaled(&frame, snapshots::LATEST_MAX_WIDTH, previous) {
            Ok(small) => small,
            Err(e) => {
                tracing::debug!(camera = %r.meta.camera, error = %e, "latest frame kept at full size");
                frame
            }
        };
        latest.insert(
            r.meta.camera.clone(),
            Latest {
                pixels,
                label,
                score,
                wall: r.meta.wall,
                zone: r.meta.zone.clone(),
            },
        );
    }
}
