//! The broker connection: what the publisher and rumqttc's event loop thread share (the client,
//! the outbox, the retained state), the incoming messages (judged in `incoming.rs`), and the event
//! loop thread itself, with vigil's own reconnect backoff.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rumqttc::{Client, Connection, ConnectionError, Event, Outgoing, Packet, QoS, StateError};

use crate::publish::incoming::{
    Admit, ConfigVerdict, FirstSeen, RateLimit, Rejection, Route, Topics, enable_command,
    error_reply, judge_config, shown,
};
use crate::publish::outbox::{Kind, Outbox};
use crate::shutdown::{Exits, Joinable, Shutdown};
use crate::stats::{CameraStats, GraphStats};
use crate::sync::lock;

/// A connection that stayed up this long was a good one: the next outage's backoff starts again
/// from `reconnect_min`. One that dies sooner (the broker closes it right after the login) keeps
/// the backoff growing.
pub const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// Topics whose oversized commands are each logged once; beyond, they are only counted.
const OVERSIZED_TOPICS_LOGGED: usize = 256;

/// Connection figures shared with the event loop thread.
#[derive(Debug, Default)]
pub struct MqttStats {
    pub connected: AtomicBool,
    pub connection_failures: AtomicU64,
    pub commands_accepted: AtomicU64,
    /// Every rejected command, oversized ones included (shown or not).
    pub commands_rejected: AtomicU64,
    /// Commands dropped unread for their size (over `mqtt.max_command_bytes`).
    pub commands_oversized: AtomicU64,
    /// Discovery configs under vigil's node id that another client published.
    pub foreign_discovery_configs: AtomicU64,
    /// Connections made (the first, then each reconnect).
    pub sessions: AtomicU64,
}

/// The latest payload of every retained topic vigil publishes, republished after each reconnect
/// (a broker restarted without persistence has forgotten them). Deletions (empty payloads) are
/// not kept, and at most `capacity` topics are, besides vigil's own status, which always is.
#[derive(Debug)]
pub struct Retained {
    map: BTreeMap<String, (Vec<u8>, QoS)>,
    capacity: usize,
    /// vigil's status topic (`<prefix>/status`, or a replica's).
    status: String,
    /// Topics not kept because the map was full.
    pub untracked: u64,
}

impl Retained {
    pub fn new(capacity: usize, status: &str) -> Retained {
        Retained {
            map: BTreeMap::new(),
            capacity,
            status: status.to_string(),
            untracked: 0,
        }
    }

    /// Records a retained message; false when it could not be kept (full).
    pub fn remember(&mut self, topic: &str, payload: &[u8], qos: QoS) -> bool {
        if payload.is_empty() {
            self.map.remove(topic);
            return true;
        }
        if let Some(entry) = self.map.get_mut(topic) {
            *entry = (payload.to_vec(), qos);
            return true;
        }
        if self.map.len() >= self.capacity && topic != self.status {
            self.untracked += 1;
            return false;
        }
        self.map.insert(topic.to_string(), (payload.to_vec(), qos));
        true
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn topics(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }

    /// Everything, in the order to republish it: topics outside vigil's prefix (discovery
    /// configs) first, then vigil's own, `<prefix>/status` last.
    pub fn republish_order(&self, prefix: &str) -> Vec<(String, Vec<u8>, QoS)> {
        let own = format!("{prefix}/");
        let rank = |t: &str| match t {
            t if t == self.status => 2,
            t if t.starts_with(&own) => 1,
            _ => 0,
        };
        let mut all: Vec<(String, Vec<u8>, QoS)> = self
            .map
            .iter()
            .map(|(t, (p, q))| (t.clone(), p.clone(), *q))
            .collect();
        all.sort_by_key(|(t, _, _)| rank(t));
        all
    }
}

/// Limits on what vigil reads and says.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest command payload read (`mqtt.max_command_bytes`).
    pub max_command_bytes: usize,
    /// Largest packet the client reads or sends (`mqtt.max_packet_bytes`).
    pub max_packet_bytes: usize,
}

/// What the incoming side remembers: the rate limit of rejections, the oversized topics already
/// logged, whether a foreign discovery config was reported.
#[derive(Debug)]
pub struct IncomingState {
    pub rejections: RateLimit,
    pub oversized_logged: FirstSeen,
    pub foreign_reported: bool,
}

impl IncomingState {
    pub fn new(limit: u32, interval: Duration) -> IncomingState {
        IncomingState {
            rejections: RateLimit::new(limit, interval),
            oversized_logged: FirstSeen::new(OVERSIZED_TOPICS_LOGGED),
            foreign_reported: false,
        }
    }
}

/// Flags the picture that started an event (its id) wrong; with the camera's counters for when
/// the picture is no longer kept (its next frames are captured instead).
pub type EventFlagHook = Arc<dyn Fn(&str, Arc<CameraStats>) + Send + Sync>;

/// What the publisher and the event loop thread share.
pub struct Shared {
    pub client: Client,
    pub outbox: Mutex<Outbox>,
    pub retained: Mutex<Retained>,
    pub stats: MqttStats,
    /// Fired when the publisher closes: the event loop stops retrying.
    pub closing: Shutdown,
    pub prefix: String,
    /// vigil's status topic (see `MqttConfig::status_topic`).
    pub status: String,
    pub qos_state: QoS,
    /// The cameras, for the enable/disable commands (set once the graph runs).
    pub cameras: OnceLock<Arc<GraphStats>>,
    /// Flags an event's own picture wrong (set by the app when heads can be taught).
    pub event_flags: OnceLock<EventFlagHook>,
    /// Discovery configs of this run (topic → payload); retained configs of this node not in it
    /// are stale or another client's.
    pub discovery_configs: Mutex<BTreeMap<String, Vec<u8>>>,
    /// The topics vigil subscribes to.
    pub topics: Topics,
    pub limits: Limits,
    /// The Home Assistant node id, and whether it is the default (`mqtt.client_id`).
    pub node_id: (String, bool),
    pub incoming: Mutex<IncomingState>,
}

impl Shared {
    pub fn outbox(&self) -> MutexGuard<'_, Outbox> {
        lock(&self.outbox)
    }

    /// Queues a message and hands what it can to the client. A message larger than the client
    /// may send would close the connection at every try: it is dropped instead.
    pub fn send(&self, topic: String, payload: Vec<u8>, qos: QoS, retain: bool, kind: Kind) {
        if topic.len() + payload.len() + 8 > self.limits.max_packet_bytes {
            tracing::warn!(topic = %shown(topic.as_bytes()), bytes = payload.len(),
                "MQTT message over mqtt.max_packet_bytes: dropped");
            return;
        }
        if retain {
            let mut retained = lock(&self.retained);
            if !retained.remember(&topic, &payload, qos) && retained.untracked == 1 {
                tracing::warn!(topic = %shown(topic.as_bytes()), kept = retained.len(),
                    "more retained topics than mqtt.outbox: those beyond are not republished after a reconnect");
            }
        }
        let mut outbox = self.outbox();
        if let Some(dropped) = outbox.push(topic, payload, qos, retain, kind) {
            let stats = outbox.stats();
            tracing::debug!(kind = dropped.name(), dropped = ?stats.dropped, "MQTT outbox full: message dropped");
        }
        self.flush_locked(&mut outbox);
    }

    pub fn flush(&self) {
        let mut outbox = self.outbox();
        self.flush_locked(&mut outbox);
    }

    fn flush_locked(&self, outbox: &mut Outbox) {
        if !self.stats.connected.load(Relaxed) {
            return;
        }
        outbox.flush(|m| {
            self.client
                .try_publish(m.topic.clone(), m.qos, m.retain, m.payload.clone())
                .is_ok()
        });
    }

    /// A rejected command: always counted; logged and answered on `<prefix>/errors` within the
    /// rate limit (an oversized one is logged once per topic instead).
    fn reject(&self, topic: &str, payload: &[u8], rejection: &Rejection) {
        self.stats.commands_rejected.fetch_add(1, Relaxed);
        let oversized = matches!(rejection, Rejection::TooLarge { .. });
        let (admit, log_oversized) = {
            let mut state = lock(&self.incoming);
            let first = oversized && state.oversized_logged.first(topic);
            (state.rejections.admit(Instant::now()), first)
        };
        if oversized {
            self.stats.commands_oversized.fetch_add(1, Relaxed);
        }
        let Admit::Yes { held_back } = admit else {
            if log_oversized {
                log_rejection(topic, payload, rejection);
            }
            return;
        };
        if held_back > 0 {
            tracing::warn!(
                not_shown = held_back,
                "more MQTT commands were rejected than mqtt.rejection_limit allows to show; counted only"
            );
        }
        if log_oversized || !oversized {
            log_rejection(topic, payload, rejection);
        }
        // The lowest kind: a flood of replies never pushes state or events out of the outbox.
        self.send(
            format!("{}/errors", self.prefix),
            error_reply(topic, payload, rejection),
            QoS::AtLeastOnce,
            false,
            Kind::Result,
        );
    }

    /// Sends every discovery config of this run again (Home Assistant restarted).
    fn republish_discovery(&self) {
        let configs: Vec<(String, Vec<u8>)> = lock(&self.discovery_configs)
            .iter()
            .map(|(t, p)| (t.clone(), p.clone()))
            .collect();
        for (topic, payload) in configs {
            self.send(topic, payload, QoS::AtLeastOnce, true, Kind::State);
        }
    }

    /// A message from the broker: a command, Home Assistant coming online, or a discovery config
    /// under vigil's node id. `retained`: handed over on subscription, not published live.
    pub fn on_incoming(&self, topic: &str, payload: &[u8], retained: bool) {
        match self.topics.route(topic) {
            Route::HomeAssistantStatus => {
                if payload == b"online" {
                    tracing::info!(
                        "Home Assistant came online: sending the discovery configs again"
                    );
                    self.republish_discovery();
                }
            }
            Route::DiscoveryConfig => self.on_discovery_config(topic, payload, retained),
            Route::EnableCommand { camera } => self.on_enable_command(topic, camera, payload),
            Route::WrongCommand { camera } => self.on_wrong_command(topic, camera, payload),
            Route::Other => {}
        }
    }

    /// A discovery config under this node id: a stale one of this vigil is deleted; another
    /// client's is left alone and reported once.
    fn on_discovery_config(&self, topic: &str, payload: &[u8], retained: bool) {
        let at_start = retained && self.stats.sessions.load(Relaxed) == 1;
        let status = self.status.clone();
        let verdict = {
            let configs = lock(&self.discovery_configs);
            judge_config(
                payload,
                configs.get(topic).map(Vec::as_slice),
                at_start,
                &status,
            )
        };
        match verdict {
            ConfigVerdict::Ignore => {}
            ConfigVerdict::Stale => {
                tracing::info!(
                    topic,
                    "removing a Home Assistant entity of a camera or label no longer configured"
                );
                self.send(
                    topic.to_string(),
                    Vec::new(),
                    QoS::AtLeastOnce,
                    true,
                    Kind::State,
                );
            }
            ConfigVerdict::Foreign => self.on_foreign_config(topic),
        }
    }

    fn on_foreign_config(&self, topic: &str) {
        self.stats.foreign_discovery_configs.fetch_add(1, Relaxed);
        if std::mem::replace(&mut lock(&self.incoming).foreign_reported, true) {
            return;
        }
        let (node, default) = &self.node_id;
        tracing::warn!(
            topic = %shown(topic.as_bytes()),
            node_id = %node,
            node_id_is_default = *default,
            "another MQTT client publishes Home Assistant discovery configs under this node id \
             (another vigil?); they are left alone. Give each vigil its own homeassistant.node_id \
             (and mqtt.client_id)"
        );
    }

    /// `<prefix>/<camera>/set/enabled`: pauses or resumes a camera's analysis.
    fn on_enable_command(&self, topic: &str, camera: &str, payload: &[u8]) {
        let graph = self.cameras.get();
        let known = graph.map(|g| move |c: &str| g.camera(c).is_some());
        let known: Option<&dyn Fn(&str) -> bool> = known.as_ref().map(|f| f as _);
        let enabled = match enable_command(camera, payload, self.limits.max_command_bytes, known) {
            Ok(enabled) => enabled,
            Err(rejection) => return self.reject(topic, payload, &rejection),
        };
        let Some(stats) = graph.and_then(|g| g.camera(camera)) else {
            return;
        };
        self.stats.commands_accepted.fetch_add(1, Relaxed);
        stats.enabled.store(enabled, Relaxed);
        tracing::info!(
            camera,
            enabled,
            "camera analysis {} by MQTT command",
            if enabled { "resumed" } else { "paused" }
        );
        let state: &[u8] = if enabled { b"ON" } else { b"OFF" };
        self.send(
            format!("{}/{camera}/enabled", self.prefix),
            state.to_vec(),
            self.qos_state,
            true,
            Kind::State,
        );
    }
}

impl Shared {
    /// `<prefix>/<camera>/set/wrong`: with the id of one of the camera's events as payload,
    /// the picture that started it goes to its head's inbox as flagged; with anything else (or
    /// when that picture is no longer kept), the camera's next analysed frames go to its heads'
    /// inboxes.
    fn on_wrong_command(&self, topic: &str, camera: &str, payload: &[u8]) {
        if payload.len() > self.limits.max_command_bytes {
            let rejection = Rejection::TooLarge {
                bytes: payload.len(),
                limit: self.limits.max_command_bytes,
            };
            return self.reject(topic, payload, &rejection);
        }
        let Some(graph) = self.cameras.get() else {
            return self.reject(topic, payload, &Rejection::Starting);
        };
        let Some(stats) = graph.camera(camera) else {
            let rejection = Rejection::UnknownCamera(shown(camera.as_bytes()));
            return self.reject(topic, payload, &rejection);
        };
        self.stats.commands_accepted.fetch_add(1, Relaxed);
        let event = std::str::from_utf8(payload)
            .map(str::trim)
            .ok()
            .filter(|id| {
                id.len() > camera.len()
                    && id.starts_with(camera)
                    && id[camera.len()..].starts_with('-')
            });
        if let (Some(event), Some(flag)) = (event, self.event_flags.get()) {
            tracing::info!(camera, event, "event flagged wrong by MQTT command");
            return flag(event, stats);
        }
        crate::stats::flag_wrong(&stats);
        tracing::info!(camera, note = %shown(payload), "answer flagged wrong by MQTT command: the next frames are captured for labelling");
    }
}

fn log_rejection(topic: &str, payload: &[u8], rejection: &Rejection) {
    let topic = shown(topic.as_bytes());
    match rejection {
        Rejection::TooLarge { bytes, .. } => {
            tracing::warn!(%topic, bytes, error = %rejection, "MQTT command rejected")
        }
        _ => tracing::warn!(%topic, payload = %shown(payload), error = %rejection,
            "MQTT command rejected"),
    }
}

/// Describes a connection error for an operator.
fn explain(e: &ConnectionError, limits: &Limits) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            format!(
                "the broker refused the connection: {code:?} (check mqtt.username / password / client_id)"
            )
        }
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size),
        )) => format!(
            "an incoming MQTT packet of {size} bytes is over mqtt.max_packet_bytes ({}): the client \
             closes the connection (the broker sends a retained one again on every reconnect)",
            limits.max_packet_bytes
        ),
        other => other.to_string(),
    }
}

/// The reconnect backoff: doubles with every failure up to its maximum, and starts again from
/// its minimum only after a connection that stayed up for [`STABLE_CONNECTION`].
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    delay: Duration,
    connected_at: Option<Instant>,
    failures_in_a_row: u32,
    outage_started: Option<Instant>,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            delay: min,
            connected_at: None,
            failures_in_a_row: 0,
            outage_started: None,
        }
    }

    /// Connected at `now`; returns when the outage that ended began, if there was one.
    pub fn on_connected(&mut self, now: Instant) -> Option<Instant> {
        self.connected_at = Some(now);
        self.failures_in_a_row = 0;
        self.outage_started.take()
    }

    /// A connection failed or was lost at `now`: how long to wait before the next try, and how
    /// long the connection that was lost had lasted (None when there was none).
    pub fn on_failure(&mut self, now: Instant) -> (Duration, Option<Duration>) {
        let lasted = self
            .connected_at
            .take()
            .map(|t| now.saturating_duration_since(t));
        if lasted.is_some_and(|l| l >= STABLE_CONNECTION) {
            self.delay = self.min;
        }
        self.failures_in_a_row += 1;
        self.outage_started.get_or_insert(now);
        let delay = self.delay;
        self.delay = (delay * 2).min(self.max);
        (delay, lasted)
    }
}

/// rumqttc's event loop, driven on its own thread.
pub struct EventLoop {
    pub shared: Arc<Shared>,
    pub connection: Connection,
    /// Reconnect backoff: first delay, doubled up to the second.
    pub backoff: (Duration, Duration),
    /// host:port, for the log.
    pub broker: String,
}

impl EventLoop {
    /// Runs on a thread that reports its end to `exits`.
    pub fn spawn(self, exits: &Exits) -> Joinable {
        exits
            .spawn("mqtt".into(), move || self.run())
            .expect("spawning the mqtt thread")
    }

    fn run(mut self) {
        let shared = self.shared.clone();
        let mut backoff = Backoff::new(self.backoff.0, self.backoff.1);
        loop {
            let Ok(event) = self.connection.recv() else {
                break;
            };
            fail::fail_point!("mqtt-event");
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => self.on_connected(&mut backoff),
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => shared.outbox().on_sent(pkid),
                Ok(Event::Incoming(Packet::PubAck(ack))) => shared.outbox().on_acked(ack.pkid),
                Ok(Event::Incoming(Packet::PubComp(ack))) => shared.outbox().on_acked(ack.pkid),
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    shared.on_incoming(&p.topic, &p.payload, p.retain)
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(e) => {
                    if !self.on_error(&e, &mut backoff) {
                        break;
                    }
                }
            }
        }
        // Its thread is supervised: an end before the publisher closes stops vigil.
        assert!(
            shared.closing.is_stopped(),
            "the MQTT connection's event loop ended before vigil stopped"
        );
    }

    /// Connected: subscribe, republish the retained state, deliver what was queued.
    fn on_connected(&self, backoff: &mut Backoff) {
        let shared = &self.shared;
        let waiting = shared.outbox().waiting();
        match backoff.on_connected(Instant::now()) {
            Some(t) => {
                tracing::info!(broker = %self.broker, away_for = ?t.elapsed(), queued = waiting,
                "connected to the MQTT broker again; delivering what was queued")
            }
            None => tracing::info!(broker = %self.broker, "connected to the MQTT broker"),
        }
        let sessions = shared.stats.sessions.fetch_add(1, Relaxed) + 1;
        for f in shared.topics.filters() {
            let _ = shared.client.try_subscribe(f, QoS::AtLeastOnce);
        }
        // Republish the retained state first (vigil's status last): a broker restarted without
        // persistence has lost it. Newer changes queued since follow.
        let mut outbox = shared.outbox();
        if sessions > 1 {
            let retained = lock(&shared.retained).republish_order(&shared.prefix);
            let dropped = outbox.push_front_state(retained);
            if dropped > 0 {
                tracing::warn!(
                    dropped,
                    "MQTT outbox full: retained state not republished after the reconnect"
                );
            }
        }
        shared.stats.connected.store(true, Relaxed);
        shared.flush_locked(&mut outbox);
    }

    /// The connection failed: says so (once per outage), waits out the backoff. False when the
    /// publisher is closing.
    fn on_error(&mut self, e: &ConnectionError, backoff: &mut Backoff) -> bool {
        let shared = &self.shared;
        shared.stats.connection_failures.fetch_add(1, Relaxed);
        shared.stats.connected.store(false, Relaxed);
        // rumqttc would forget these with a new session: vigil's outbox sends them again
        // instead (and only it, to keep the order).
        self.connection.eventloop.pending.clear();
        shared.outbox().on_disconnected();
        if shared.closing.is_stopped() {
            return false;
        }
        let (delay, lasted) = backoff.on_failure(Instant::now());
        let error = explain(e, &shared.limits);
        match lasted {
            Some(lasted) if lasted < STABLE_CONNECTION => {
                tracing::warn!(broker = %self.broker, %error, connected_for = ?lasted, retry_in = ?delay,
                    "MQTT broker unreachable soon after connecting (another client with the same \
                     mqtt.client_id, or a broker limit?); vigil keeps running, queues its messages \
                     and retries with a growing backoff")
            }
            Some(_) => {
                tracing::warn!(broker = %self.broker, %error, retry_in = ?delay,
                    "MQTT broker unreachable; vigil keeps running, queues its messages and retries")
            }
            None if backoff.failures_in_a_row == 1 => {
                tracing::warn!(broker = %self.broker, %error, retry_in = ?delay,
                    "MQTT broker unreachable; vigil keeps running, queues its messages and retries")
            }
            None => {
                tracing::debug!(broker = %self.broker, %error, retry_in = ?delay,
                    attempt = backoff.failures_in_a_row, "MQTT broker still unreachable")
            }
        }
        !shared.closing.stopped_within(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_resets_only_after_a_stable_connection() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(500), ms(8000));
        let t = Instant::now();
        assert_eq!(b.on_failure(t), (ms(500), None));
        assert_eq!(b.on_failure(t), (ms(1000), None));
        // Connections that the broker closes right away: the backoff keeps growing.
        for expected in [2000, 4000, 8000, 8000] {
            b.on_connected(t);
            let (delay, lasted) = b.on_failure(t + Duration::from_secs(1));
            assert_eq!(
                (delay, lasted),
                (ms(expected), Some(Duration::from_secs(1)))
            );
        }
        // A connection that lasted: back to the minimum.
        b.on_connected(t);
        let (delay, _) = b.on_failure(t + STABLE_CONNECTION);
        assert_eq!(delay, ms(500));
    }

    #[test]
    fn retained_bookkeeping_keeps_no_deletions_and_has_a_bound() {
        let q = QoS::AtLeastOnce;
        let mut r = Retained::new(3, "vigil/status");
        assert!(r.remember("vigil/a/top", b"x", q));
        assert!(r.remember("vigil/a/top", b"", q), "a deletion");
        assert!(r.is_empty());
        for i in 0..1000 {
            r.remember(&format!("homeassistant/x/vigil/{i}/config"), b"", q);
        }
        assert!(r.is_empty(), "deletions are not kept");
        assert!(r.remember("homeassistant/b/config", b"c", q));
        assert!(r.remember("vigil/a/availability", b"offline", q));
        assert!(r.remember("vigil/a/enabled", b"ON", q));
        assert!(!r.remember("vigil/b/availability", b"offline", q), "full");
        assert!(
            r.remember("vigil/a/availability", b"online", q),
            "known topic"
        );
        assert!(
            r.remember("vigil/status", b"online", q),
            "vigil's status always"
        );
        assert_eq!((r.len(), r.untracked), (4, 1));
        let order: Vec<String> = r
            .republish_order("vigil")
            .into_iter()
            .map(|(t, _, _)| t)
            .collect();
        assert_eq!(
            order,
            [
                "homeassistant/b/config",
                "vigil/a/availability",
                "vigil/a/enabled",
                "vigil/status"
            ]
        );
    }
}
