//! Publishing to MQTT with rumqttc. The event loop runs on its own thread with vigil's own
//! reconnect backoff (`connection.rs`); every message goes through the [`Outbox`], so nothing on
//! the frame path blocks on the network and nothing is lost while the broker is away (see
//! outbox.rs).
//!
//! Topics (prefix `vigil` by default; README "Topics and payloads"):
//! - `vigil/status`: retained `online` / `offline`; `offline` is also the last will.
//! - `vigil/events`, `vigil/<camera>/events`: event start / update / end.
//! - `vigil/<camera>/<label>/state`: retained `ON` / `OFF` per watched label.
//! - `vigil/<camera>/top`: retained top label and score.
//! - `vigil/<camera>/availability`, `vigil/<camera>/status`: retained camera state.
//! - `vigil/<camera>/enabled`: retained `ON` / `OFF`; set with `vigil/<camera>/set/enabled`.
//! - `vigil/errors`: rejected commands (rate limited).
//! - `vigil/<camera>/detection/<label>`, `vigil/<camera>/frames`: per-frame results (opt-in).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rumqttc::{Client, LastWill, MqttOptions, QoS, TlsConfiguration, Transport};
use serde::{Deserialize, Serialize};
use vigil_engine::model::ModelInfo;

use crate::events::{Event as VigilEvent, EventType};
use crate::frame::FrameResult;
use crate::publish::connection::{
    EventFlagHook, EventLoop, IncomingState, Limits, MqttStats, Retained, Shared,
};
use crate::publish::homeassistant::{Discovery, HomeAssistantConfig};
use crate::publish::incoming::Topics;
use crate::publish::outbox::{Kind, Outbox, OutboxStats, OverflowPolicy};
use crate::publish::payload::{DetectionPayload, FramePayload};
use crate::publish::tls::TlsConfig;
use crate::publish::{CameraAnnouncement, Publisher, region_base};
use crate::shutdown::{Exits, Joinable, Shutdown};
use crate::stats::{CameraStatus, GraphStats, State};
use crate::sync::lock;
use crate::wire::topic_level;

/// A QoS level, written as a number (0, 1 or 2) in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QosValue(pub QoS);

impl<'de> Deserialize<'de> for QosValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u8::deserialize(d)? {
            0 => Ok(QosValue(QoS::AtMostOnce)),
            1 => Ok(QosValue(QoS::AtLeastOnce)),
            2 => Ok(QosValue(QoS::ExactlyOnce)),
            _ => Err(serde::de::Error::custom("must be 0, 1 or 2")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    /// First level of every topic vigil publishes.
    pub topic_prefix: String,
    /// QoS of the per-frame results (detections, frames).
    pub qos_results: QosValue,
    /// QoS of events.
    pub qos_events: QosValue,
    /// QoS of the retained state topics (availability, status, ON/OFF).
    pub qos_state: QosValue,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Read the password from this environment variable instead.
    pub password_env: Option<String>,
    /// Read the password from this file instead (its first line).
    pub password_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Start each connection with a clean session.
    pub clean_session: bool,
    /// Reconnect backoff: first delay, doubled up to `reconnect_max`.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Publish events (start/update/end) on `<prefix>/events` and `<prefix>/<camera>/events`.
    pub publish_events: bool,
    /// Publish every detection on `<prefix>/<camera>/detection/<label>` (per frame: a lot).
    pub publish_detections: bool,
    /// Publish every frame's top-k on `<prefix>/<camera>/frames` (per frame: a lot).
    pub publish_frames: bool,
    /// Messages kept while the broker is away (or slow); beyond it, `overflow` decides.
    pub outbox: usize,
    pub overflow: OverflowPolicy,
    /// Largest MQTT packet the client reads or sends. A larger incoming one makes the client
    /// close the connection (MQTT 3.1.1 cannot tell the broker a maximum).
    pub max_packet_bytes: usize,
    /// Largest command payload vigil reads; a larger one is dropped unread (counted, logged once
    /// per topic), the connection kept.
    pub max_command_bytes: usize,
    /// Rejected commands logged and answered on `<prefix>/errors` per `rejection_interval`; the
    /// others are only counted.
    pub rejection_limit: u32,
    #[serde(with = "humantime_serde")]
    pub rejection_interval: Duration,
    pub tls: Option<TlsConfig>,
    /// This process's replica index when `[cluster]` splits the cameras (set at start, never
    /// read from the file): its status topic is then `<prefix>/status/<index>`.
    #[serde(skip)]
    pub replica: Option<u32>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "localhost".into(),
            port: 1883,
            client_id: "vigil".into(),
            topic_prefix: "vigil".into(),
            qos_results: QosValue(QoS::AtMostOnce),
            qos_events: QosValue(QoS::AtLeastOnce),
            qos_state: QosValue(QoS::AtLeastOnce),
            username: None,
            password: None,
            password_env: None,
            password_file: None,
            keep_alive: Duration::from_secs(30),
            clean_session: true,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            publish_events: true,
            publish_detections: false,
            publish_frames: false,
            outbox: 10_000,
            overflow: OverflowPolicy::DropOldest,
            max_packet_bytes: 16 << 20,
            max_command_bytes: 1024,
            rejection_limit: 10,
            rejection_interval: Duration::from_secs(60),
            tls: None,
            replica: None,
        }
    }
}

impl MqttConfig {
    /// vigil's own retained `online`/`offline` (and its last will): `<prefix>/status`, or
    /// `<prefix>/status/<index>` for a replica.
    pub fn status_topic(&self) -> String {
        match self.replica {
            Some(i) => format!("{}/status/{i}", self.topic_prefix),
            None => format!("{}/status", self.topic_prefix),
        }
    }

    /// The password, from the config, the environment variable or the file it names.
    pub fn resolved_password(&self) -> Result<Option<String>, String> {
        crate::secrets::resolve(&self.password, &self.password_env, &self.password_file)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("mqtt.tls: {0}")]
    Tls(String),
    #[error("mqtt password: {0}")]
    Password(String),
}

/// A camera's top label before its first analysed frame: the previous run's is cleared with it.
pub const NO_TOP: &[u8] = br#"{"label":null,"score":null}"#;

/// The retained top label of a camera, on `<prefix>/<camera>/top`.
#[derive(Serialize)]
struct Top<'a> {
    label: &'a str,
    score: f32,
    /// The head that labelled the region, where one does.
    #[serde(skip_serializing_if = "Option::is_none")]
    head: Option<&'a crate::frame::HeadInfo>,
}

/// A camera's region: its whole frame (None) or a zone.
type Region = (Arc<str>, Option<Arc<str>>);

/// Reads the publisher's figures (for the periodic log).
#[derive(Clone)]
pub struct MqttMonitor(Arc<Shared>);

impl MqttMonitor {
    pub fn connected(&self) -> bool {
        self.0.stats.connected.load(Relaxed)
    }
    pub fn outbox(&self) -> OutboxStats {
        self.0.outbox().stats()
    }
    pub fn stats(&self) -> &MqttStats {
        &self.0.stats
    }
    /// Retained topics kept to republish after a reconnect.
    pub fn retained_topics(&self) -> usize {
        lock(&self.0.retained).len()
    }
}

pub struct MqttPublisher {
    shared: Arc<Shared>,
    qos_results: QoS,
    qos_events: QoS,
    seq: u64,
    event_seq: u64,
    /// Home Assistant discovery (with discovery on).
    discovery: Option<Discovery>,
    publish_events: bool,
    publish_detections: bool,
    publish_frames: bool,
    event_loop: Option<Joinable>,
    /// The availability last published per camera.
    availability: HashMap<String, bool>,
    /// The top label last published per camera, and when.
    top: HashMap<Region, (Arc<str>, Instant)>,
    top_interval: Duration,
    last_overflow_log: (Instant, [u64; 3]),
}

/// The broker-facing names a publisher needs besides `[mqtt]`.
pub struct PublisherSetup<'a> {
    pub model: ModelInfo,
    pub homeassistant: &'a HomeAssistantConfig,
    /// Camera → watched labels, for discovery and the ON/OFF states.
    pub cameras: Vec<CameraAnnouncement>,
    /// How often the top label is refreshed when it does not change.
    pub top_interval: Duration,
    /// Where the event loop thread reports its end (a panic stops vigil).
    pub exits: Exits,
}

impl MqttPublisher {
    /// Starts the client; the connection is made (and remade) in the background.
    pub fn start(cfg: &MqttConfig, setup: PublisherSetup<'_>) -> Result<MqttPublisher, MqttError> {
        let (client, connection) = Client::new(options(cfg)?, 64);
        let ha = setup.homeassistant;
        let discovery = Discovery {
            discovery_prefix: ha.prefix.clone(),
            node_id: ha.node_id.clone().unwrap_or_else(|| cfg.client_id.clone()),
            prefix: cfg.topic_prefix.clone(),
            status: cfg.status_topic(),
            model: setup.model.name.clone(),
            model_version: setup.model.version.clone(),
        };
        let shared = Arc::new(shared(cfg, ha, &discovery, client));
        let mut publisher = MqttPublisher {
            shared: shared.clone(),
            qos_results: cfg.qos_results.0,
            qos_events: cfg.qos_events.0,
            seq: 0,
            event_seq: 0,
            discovery: ha.discovery.then_some(discovery),
            publish_events: cfg.publish_events,
            publish_detections: cfg.publish_detections,
            publish_frames: cfg.publish_frames,
            event_loop: None,
            availability: HashMap::new(),
            top: HashMap::new(),
            top_interval: setup.top_interval,
            last_overflow_log: (Instant::now(), [0; 3]),
        };
        publisher.announce(&setup.cameras);
        publisher.event_loop = Some(
            EventLoop {
                shared,
                connection,
                backoff: (cfg.reconnect_min, cfg.reconnect_max),
                broker: format!("{}:{}", cfg.host, cfg.port),
            }
            .spawn(&setup.exits),
        );
        Ok(publisher)
    }

    /// The retained state every integration can read from the start, in an order that never
    /// shows the previous run's state as live (after a crash the broker still holds it): first
    /// each camera `offline` with its labels `OFF` and its top label cleared, then the discovery
    /// configs, and only then vigil `online`.
    fn announce(&mut self, cameras: &[CameraAnnouncement]) {
        for camera in cameras {
            self.announce_camera(camera);
        }
        for camera in cameras {
            self.publish_discovery(camera);
        }
        self.send(
            self.shared.status.clone(),
            b"online".to_vec(),
            QoS::AtLeastOnce,
            true,
            Kind::State,
        );
    }

    /// A camera's retained state before its first frame: `offline`, in every region every
    /// watched label `OFF` and no top label, enabled.
    fn announce_camera(&mut self, cam: &CameraAnnouncement) {
        let prefix = self.shared.prefix.clone();
        let q = self.shared.qos_state;
        let camera = &cam.name;
        self.availability.insert(camera.to_string(), false);
        let state = |topic: String, payload: &[u8]| {
            self.shared
                .send(topic, payload.to_vec(), q, true, Kind::State)
        };
        state(format!("{prefix}/{camera}/availability"), b"offline");
        for zone in cam.regions() {
            let base = region_base(&prefix, camera, zone);
            for label in &cam.watched {
                state(format!("{base}/{}/state", topic_level(label)), b"OFF");
            }
            // Not a deletion: Home Assistant shows its sensor `unknown` for this, and keeps (and
            // complains about) its last state for an empty payload.
            state(format!("{base}/top"), NO_TOP);
        }
        state(format!("{prefix}/{camera}/enabled"), b"ON");
    }

    /// A camera's Home Assistant discovery configs (with discovery on).
    fn publish_discovery(&mut self, camera: &CameraAnnouncement) {
        let Some(d) = &self.discovery else {
            return;
        };
        for (topic, payload) in d.configs(camera) {
            let payload = payload.to_string().into_bytes();
            lock(&self.shared.discovery_configs).insert(topic.clone(), payload.clone());
            self.shared
                .send(topic, payload, QoS::AtLeastOnce, true, Kind::State);
        }
    }

    /// Lets the command topics reach the cameras.
    pub fn attach_cameras(&self, graph: Arc<GraphStats>) {
        let _ = self.shared.cameras.set(graph);
    }

    /// How `<prefix>/<camera>/set/wrong` with an event id flags that event's picture.
    pub fn attach_event_flags(&self, hook: EventFlagHook) {
        let _ = self.shared.event_flags.set(hook);
    }

    /// A handle to read the connection and outbox figures from another thread.
    pub fn monitor(&self) -> MqttMonitor {
        MqttMonitor(self.shared.clone())
    }

    pub fn outbox_stats(&self) -> OutboxStats {
        self.shared.outbox().stats()
    }

    fn send(&mut self, topic: String, payload: Vec<u8>, qos: QoS, retain: bool, kind: Kind) {
        self.shared.send(topic, payload, qos, retain, kind);
        self.log_overflow();
    }

    /// Logs drops at most every 10 s (they are counted in any case).
    fn log_overflow(&mut self) {
        if self.last_overflow_log.0.elapsed() < Duration::from_secs(10) {
            return;
        }
        let stats = self.outbox_stats();
        if stats.dropped != self.last_overflow_log.1 {
            tracing::warn!(
                dropped_results = stats.dropped[0],
                dropped_state = stats.dropped[1],
                dropped_events = stats.dropped[2],
                queued = stats.queued_now,
                "MQTT outbox full: messages dropped (per-frame results first, events last)"
            );
        }
        self.last_overflow_log = (Instant::now(), stats.dropped);
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }
}

impl Publisher for MqttPublisher {
    /// Hands queued messages to the client (call it now and then: the broker may be back).
    fn flush(&mut self) {
        self.shared.flush();
    }

    /// A frame's per-frame results (opt-in) and its camera's top label (on change, or every
    /// `top_interval`).
    fn publish(&mut self, r: &FrameResult) {
        // Shared, not copied: nothing is allocated for a frame that publishes nothing.
        let shared = self.shared.clone();
        let prefix = &shared.prefix;
        if self.publish_detections {
            for d in &r.detections {
                let seq = self.next_seq();
                let payload = serde_json::to_vec(&DetectionPayload::new(r, d, &r.model, seq))
                    .expect("payloads serialise");
                let base = region_base(prefix, &r.meta.camera, r.meta.zone_name());
                let topic = format!("{base}/detection/{}", topic_level(&d.label));
                self.send(topic, payload, self.qos_results, false, Kind::Result);
            }
        }
        if self.publish_frames {
            let seq = self.next_seq();
            let payload = serde_json::to_vec(&FramePayload::new(r, &r.model, Some(seq)))
                .expect("payloads serialise");
            let topic = format!("{prefix}/{}/frames", r.meta.camera);
            self.send(topic, payload, self.qos_results, false, Kind::Result);
        }
        if let Some(best) = r.top.first() {
            let region = (
                r.meta.camera.clone(),
                r.meta.zone.as_ref().map(|z| z.name.clone()),
            );
            let due = match self.top.get(&region) {
                Some((label, at)) => *label != best.label || at.elapsed() >= self.top_interval,
                None => true,
            };
            if due {
                self.top
                    .insert(region, (best.label.clone(), Instant::now()));
                let payload = serde_json::to_vec(&Top {
                    label: &best.label,
                    score: best.score,
                    head: r.head.as_deref(),
                })
                .expect("payloads serialise");
                let base = region_base(prefix, &r.meta.camera, r.meta.zone_name());
                let topic = format!("{base}/top");
                let q = self.shared.qos_state;
                self.send(topic, payload, q, true, Kind::State);
            }
        }
    }

    /// An event message, and the label's ON/OFF state when it starts or ends.
    fn publish_event(&mut self, e: &VigilEvent) {
        let prefix = self.shared.prefix.clone();
        if self.publish_events {
            self.event_seq += 1;
            let e = VigilEvent {
                seq: self.event_seq,
                ..e.clone()
            };
            let payload = serde_json::to_vec(&e).expect("payloads serialise");
            self.send(
                format!("{prefix}/events"),
                payload.clone(),
                self.qos_events,
                false,
                Kind::Event,
            );
            self.send(
                format!("{prefix}/{}/events", e.camera),
                payload,
                self.qos_events,
                false,
                Kind::Event,
            );
        }
        let state = match e.kind {
            EventType::Start => "ON",
            EventType::End => "OFF",
            EventType::Update => return,
        };
        let base = region_base(&prefix, &e.camera, e.zone.as_deref());
        let topic = format!("{base}/{}/state", topic_level(&e.label));
        let q = self.shared.qos_state;
        self.send(topic, state.into(), q, true, Kind::State);
    }

    /// A camera added at runtime: its initial retained state, then its discovery configs.
    fn add_camera(&mut self, camera: &CameraAnnouncement) {
        self.announce_camera(camera);
        self.publish_discovery(camera);
    }

    /// A camera removed at runtime: its availability goes `offline`, then its retained topics
    /// and Home Assistant entities are deleted.
    fn remove_camera(&mut self, camera: &str) {
        let prefix = self.shared.prefix.clone();
        let q = self.shared.qos_state;
        self.send(
            format!("{prefix}/{camera}/availability"),
            b"offline".to_vec(),
            q,
            true,
            Kind::State,
        );
        self.availability.remove(camera);
        self.top.retain(|(c, _), _| &**c != camera);
        let own = format!("{prefix}/{camera}/");
        let retained: Vec<String> = lock(&self.shared.retained)
            .topics()
            .filter(|t| t.starts_with(&own) && !t.ends_with("/availability"))
            .cloned()
            .collect();
        let discovery: Vec<String> = {
            let mut configs = lock(&self.shared.discovery_configs);
            let mine: Vec<String> = configs
                .iter()
                .filter(|(_, p)| {
                    serde_json::from_slice::<serde_json::Value>(p).is_ok_and(|v| {
                        v["availability"][1]["topic"] == format!("{prefix}/{camera}/availability")
                    })
                })
                .map(|(t, _)| t.clone())
                .collect();
            for t in &mine {
                configs.remove(t);
            }
            mine
        };
        for topic in discovery.into_iter().chain(retained) {
            self.send(topic, Vec::new(), QoS::AtLeastOnce, true, Kind::State);
        }
    }

    /// Publishes a camera's retained status JSON, and its availability when that changed.
    fn publish_camera(&mut self, status: &CameraStatus) {
        let prefix = self.shared.prefix.clone();
        let q = self.shared.qos_state;
        let online = status.state == State::Online;
        if self.availability.get(&status.camera) != Some(&online) {
            self.availability.insert(status.camera.clone(), online);
            let topic = format!("{prefix}/{}/availability", status.camera);
            let payload = if online { "online" } else { "offline" };
            self.send(topic, payload.into(), q, true, Kind::State);
        }
        let topic = format!("{prefix}/{}/status", status.camera);
        let payload = serde_json::to_vec(status).expect("payloads serialise");
        self.send(topic, payload, q, true, Kind::State);
    }

    /// Marks vigil `offline`, waits (at most `deadline`) for the broker to have everything, and
    /// disconnects.
    fn close(mut self, deadline: Duration) {
        let until = Instant::now() + deadline;
        self.send(
            self.shared.status.clone(),
            b"offline".to_vec(),
            QoS::AtLeastOnce,
            true,
            Kind::State,
        );
        while self.shared.outbox().waiting() > 0 && Instant::now() < until {
            self.flush();
            std::thread::sleep(Duration::from_millis(20));
        }
        let stats = self.outbox_stats();
        if stats.queued_now + stats.in_flight_now > 0 {
            tracing::warn!(
                undelivered = stats.queued_now + stats.in_flight_now,
                "closing MQTT with messages the broker does not have (it is unreachable)"
            );
        }
        tracing::info!(
            delivered = ?stats.delivered,
            dropped = ?stats.dropped,
            resent = stats.resent,
            peak_queued = stats.peak,
            "MQTT outbox totals [results, state, events]"
        );
        self.shared.closing.stop();
        let _ = self.shared.client.try_disconnect();
        if let Some(h) = self.event_loop.take() {
            let left = until.saturating_duration_since(Instant::now());
            let _ = h.join_within(left + Duration::from_secs(1));
        }
    }
}

/// The client's options: identity, keep-alive, the last will, credentials and TLS.
fn options(cfg: &MqttConfig) -> Result<MqttOptions, MqttError> {
    let mut opts = MqttOptions::new(&cfg.client_id, &cfg.host, cfg.port);
    opts.set_keep_alive(cfg.keep_alive);
    opts.set_clean_session(cfg.clean_session);
    opts.set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes);
    opts.set_last_will(LastWill::new(
        cfg.status_topic(),
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    if let Some(user) = &cfg.username {
        let password = cfg.resolved_password().map_err(MqttError::Password)?;
        opts.set_credentials(user, password.unwrap_or_default());
    }
    if let Some(tls) = &cfg.tls {
        let config = crate::publish::tls::client_config(tls).map_err(MqttError::Tls)?;
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    }
    Ok(opts)
}

/// What the publisher and the event loop thread share, as `[mqtt]` and `[homeassistant]` say.
fn shared(
    cfg: &MqttConfig,
    ha: &HomeAssistantConfig,
    discovery: &Discovery,
    client: Client,
) -> Shared {
    Shared {
        client,
        outbox: Mutex::new(Outbox::new(cfg.outbox, cfg.overflow)),
        // The retained set is republished into the outbox after a reconnect: no more than fits.
        retained: Mutex::new(Retained::new(cfg.outbox, &cfg.status_topic())),
        stats: MqttStats::default(),
        closing: Shutdown::new(),
        prefix: cfg.topic_prefix.clone(),
        status: cfg.status_topic(),
        qos_state: cfg.qos_state.0,
        cameras: OnceLock::new(),
        event_flags: OnceLock::new(),
        discovery_configs: Mutex::new(BTreeMap::new()),
        topics: Topics {
            prefix: cfg.topic_prefix.clone(),
            ha_status: ha.discovery.then(|| format!("{}/status", ha.prefix)),
            discovery_filter: ha.discovery.then(|| discovery.all_configs_filter()),
        },
        limits: Limits {
            max_command_bytes: cfg.max_command_bytes,
            max_packet_bytes: cfg.max_packet_bytes,
        },
        node_id: (discovery.node_id.clone(), ha.node_id.is_none()),
        incoming: Mutex::new(IncomingState::new(
            cfg.rejection_limit,
            cfg.rejection_interval,
        )),
    }
}
