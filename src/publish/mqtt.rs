//! Publishing to MQTT with rumqttc. The event loop runs on its own thread with vigil's own
//! reconnect backoff; every message goes through the [`Outbox`], so nothing on the frame path
//! blocks on the network and nothing is lost while the broker is away (see outbox.rs).
//!
//! Topics (prefix `vigil` by default; README "Topics and payloads"):
//! - `vigil/status`: retained `online` / `offline`; `offline` is also the last will.
//! - `vigil/events`, `vigil/<camera>/events`: event start / update / end.
//! - `vigil/<camera>/<label>/state`: retained `ON` / `OFF` per watched label.
//! - `vigil/<camera>/top`: retained top label and score.
//! - `vigil/<camera>/availability`, `vigil/<camera>/status`: retained camera state.
//! - `vigil/<camera>/enabled`: retained `ON` / `OFF`; set with `vigil/<camera>/set/enabled`.
//! - `vigil/errors`: rejected commands.
//! - `vigil/<camera>/detection/<label>`, `vigil/<camera>/frames`: per-frame results (opt-in).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttc::{
    Client, ConnectionError, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration,
    Transport,
};
use serde::Serialize;

use crate::config::{HomeAssistantConfig, MqttConfig, Qos, TlsConfig};
use crate::decide::FrameResult;
use crate::events::{Event as VigilEvent, EventType};
use crate::graph::GraphStats;
use crate::metrics::{CameraStatus, State};
use crate::publish::homeassistant::Discovery;
use crate::publish::outbox::{Kind, Outbox, OutboxStats};
use crate::publish::payload::{DetectionPayload, FramePayload, ModelInfo, topic_level};

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("mqtt.tls: {0}")]
    Tls(String),
    #[error("mqtt password: {0}")]
    Password(String),
}

/// Connection figures shared with the event loop thread.
#[derive(Debug, Default)]
pub struct MqttStats {
    pub connected: AtomicBool,
    pub connection_failures: AtomicU64,
    pub commands_accepted: AtomicU64,
    pub commands_rejected: AtomicU64,
}

fn qos(q: Qos) -> QoS {
    match q {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
        Qos::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// What the publisher and the event loop thread share.
struct Shared {
    client: Client,
    outbox: Mutex<Outbox>,
    /// The latest payload of every retained topic, republished after each reconnect (a broker
    /// restarted without persistence has forgotten them).
    retained: Mutex<BTreeMap<String, (Vec<u8>, QoS)>>,
    stats: MqttStats,
    closing: AtomicBool,
    prefix: String,
    qos_state: QoS,
    /// The cameras, for the enable/disable commands (set once the graph runs).
    cameras: OnceLock<Arc<GraphStats>>,
    /// Discovery configs of this run (topic → payload); retained configs of this node not in it
    /// are stale.
    discovery_configs: Mutex<BTreeMap<String, Vec<u8>>>,
    discovery_filter: Option<String>,
    ha_status_topic: Option<String>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a message and hands what it can to the client.
    fn send(&self, topic: String, payload: Vec<u8>, qos: QoS, retain: bool, kind: Kind) {
        if retain {
            self.retained
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(topic.clone(), (payload.clone(), qos));
        }
        let mut outbox = self.lock();
        if let Some(dropped) = outbox.push(topic, payload, qos, retain, kind) {
            let stats = outbox.stats();
            tracing::debug!(kind = dropped.name(), dropped = ?stats.dropped, "MQTT outbox full: message dropped");
        }
        self.flush_locked(&mut outbox);
    }

    fn flush(&self) {
        let mut outbox = self.lock();
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

    fn error(&self, topic: &str, payload: &[u8], error: &str) {
        self.stats.commands_rejected.fetch_add(1, Relaxed);
        let shown: String = String::from_utf8_lossy(payload).chars().take(100).collect();
        tracing::warn!(topic, payload = %shown, error, "MQTT command rejected");
        let body = serde_json::json!({"topic": topic, "payload": shown, "error": error});
        self.send(
            format!("{}/errors", self.prefix),
            body.to_string().into_bytes(),
            QoS::AtLeastOnce,
            false,
            Kind::State,
        );
    }

    /// A message from the broker: a command, Home Assistant coming online, or a stale
    /// discovery config of ours.
    fn on_incoming(&self, topic: &str, payload: &[u8], republish_discovery: &dyn Fn()) {
        if self.ha_status_topic.as_deref() == Some(topic) {
            if payload == b"online" {
                tracing::info!("Home Assistant came online: sending the discovery configs again");
                republish_discovery();
            }
            return;
        }
        if self.discovery_filter.is_some() && topic.ends_with("/config") {
            let ours = self
                .discovery_configs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(topic);
            if !payload.is_empty() && !ours {
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
            return;
        }
        let Some(camera) = topic
            .strip_prefix(&format!("{}/", self.prefix))
            .and_then(|t| t.strip_suffix("/set/enabled"))
        else {
            return;
        };
        let Some(cameras) = self.cameras.get() else {
            return self.error(topic, payload, "vigil is still starting");
        };
        let Some(stats) = cameras.camera(camera) else {
            return self.error(topic, payload, &format!("no camera named {camera:?}"));
        };
        let enabled = match payload {
            b"ON" | b"on" => true,
            b"OFF" | b"off" => false,
            _ => return self.error(topic, payload, "payload must be ON or OFF"),
        };
        self.stats.commands_accepted.fetch_add(1, Relaxed);
        stats.enabled.store(enabled, Relaxed);
        tracing::info!(
            camera,
            enabled,
            "camera analysis {} by MQTT command",
            if enabled { "resumed" } else { "paused" }
        );
        self.send(
            format!("{}/{camera}/enabled", self.prefix),
            if enabled {
                b"ON".to_vec()
            } else {
                b"OFF".to_vec()
            },
            self.qos_state,
            true,
            Kind::State,
        );
    }
}

/// Builds the rustls configuration from `[mqtt.tls]`.
fn tls_config(tls: &TlsConfig) -> Result<Arc<rustls::ClientConfig>, MqttError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Tls(e.to_string()))?;
    let builder = if tls.insecure {
        tracing::warn!("mqtt.tls.insecure = true: the broker's certificate is NOT verified");
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
    } else {
        let ca = tls
            .ca_file
            .as_ref()
            .expect("validated: ca_file or insecure");
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca)
            .map_err(|e| MqttError::Tls(format!("ca_file {}: {e}", ca.display())))?
        {
            let cert =
                cert.map_err(|e| MqttError::Tls(format!("ca_file {}: {e}", ca.display())))?;
            roots
                .add(cert)
                .map_err(|e| MqttError::Tls(format!("ca_file {}: {e}", ca.display())))?;
        }
        builder.with_root_certificates(roots)
    };
    let config = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| MqttError::Tls(format!("cert_file {}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| MqttError::Tls(format!("key_file {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| MqttError::Tls(format!("client certificate: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// `mqtt.tls.insecure`: accepts any certificate, still checking the handshake signatures.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Describes a connection error for an operator.
fn explain(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            format!(
                "the broker refused the connection: {code:?} (check mqtt.username / password / client_id)"
            )
        }
        other => other.to_string(),
    }
}

/// The retained top label of a camera, on `<prefix>/<camera>/top`.
#[derive(Serialize)]
struct Top<'a> {
    label: &'a str,
    score: f32,
}

/// Reads the publisher's figures (for the periodic log).
#[derive(Clone)]
pub struct MqttMonitor(Arc<Shared>);

impl MqttMonitor {
    pub fn connected(&self) -> bool {
        self.0.stats.connected.load(Relaxed)
    }
    pub fn outbox(&self) -> OutboxStats {
        self.0.lock().stats()
    }
    pub fn stats(&self) -> &MqttStats {
        &self.0.stats
    }
}

pub struct MqttPublisher {
    shared: Arc<Shared>,
    qos_results: QoS,
    qos_events: QoS,
    seq: u64,
    event_seq: u64,
    /// Home Assistant discovery: (discovery prefix, node id, model name, model version).
    discovery: Option<(String, String, String, String)>,
    publish_events: bool,
    publish_detections: bool,
    publish_frames: bool,
    event_loop: Option<JoinHandle<()>>,
    /// The availability last published per camera.
    availability: HashMap<String, bool>,
    /// The top label last published per camera, and when.
    top: HashMap<Arc<str>, (Arc<str>, Instant)>,
    top_interval: Duration,
    last_overflow_log: (Instant, [u64; 3]),
}

/// The broker-facing names a publisher needs besides `[mqtt]`.
pub struct PublisherSetup<'a> {
    pub model: ModelInfo,
    pub homeassistant: &'a HomeAssistantConfig,
    /// Camera → watched labels, for discovery and the ON/OFF states.
    pub cameras: Vec<(String, Vec<String>)>,
    /// How often the top label is refreshed when it does not change.
    pub top_interval: Duration,
}

impl MqttPublisher {
    /// Starts the client; the connection is made (and remade) in the background.
    pub fn start(cfg: &MqttConfig, setup: PublisherSetup<'_>) -> Result<MqttPublisher, MqttError> {
        let prefix = cfg.topic_prefix.clone();
        let status_topic = format!("{prefix}/status");
        let mut opts = MqttOptions::new(&cfg.client_id, &cfg.host, cfg.port);
        opts.set_keep_alive(cfg.keep_alive);
        opts.set_clean_session(cfg.clean_session);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts.set_last_will(LastWill::new(
            &status_topic,
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
        if let Some(user) = &cfg.username {
            let password = cfg.resolved_password().map_err(MqttError::Password)?;
            opts.set_credentials(user, password.unwrap_or_default());
        }
        if let Some(tls) = &cfg.tls {
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                tls_config(tls)?,
            )));
        }
        let (client, mut connection) = Client::new(opts, 64);

        let ha = setup.homeassistant;
        let node_id = ha.node_id.clone().unwrap_or_else(|| cfg.client_id.clone());
        let discovery = Discovery {
            discovery_prefix: &ha.prefix,
            node_id: &node_id,
            prefix: &prefix,
            model: &setup.model.name,
            model_version: &setup.model.version,
        };
        let configs: Vec<(String, Vec<u8>)> = if ha.discovery {
            setup
                .cameras
                .iter()
                .flat_map(|(camera, watched)| discovery.configs(camera, watched))
                .map(|(topic, payload)| (topic, payload.to_string().into_bytes()))
                .collect()
        } else {
            Vec::new()
        };
        let shared = Arc::new(Shared {
            client: client.clone(),
            outbox: Mutex::new(Outbox::new(cfg.outbox, cfg.overflow)),
            retained: Mutex::new(BTreeMap::new()),
            stats: MqttStats::default(),
            closing: AtomicBool::new(false),
            prefix: prefix.clone(),
            qos_state: qos(cfg.qos_state.0),
            cameras: OnceLock::new(),
            discovery_configs: Mutex::new(configs.iter().cloned().collect()),
            discovery_filter: ha.discovery.then(|| discovery.all_configs_filter()),
            ha_status_topic: ha.discovery.then(|| format!("{}/status", ha.prefix)),
        });
        // The retained state every integration can read at any time, from the start.
        shared.send(
            status_topic.clone(),
            b"online".to_vec(),
            QoS::AtLeastOnce,
            true,
            Kind::State,
        );
        for (topic, payload) in &configs {
            shared.send(
                topic.clone(),
                payload.clone(),
                QoS::AtLeastOnce,
                true,
                Kind::State,
            );
        }
        for (camera, watched) in &setup.cameras {
            for label in watched {
                shared.send(
                    discovery.state_topic(camera, label),
                    b"OFF".to_vec(),
                    shared.qos_state,
                    true,
                    Kind::State,
                );
            }
            shared.send(
                format!("{prefix}/{camera}/enabled"),
                b"ON".to_vec(),
                shared.qos_state,
                true,
                Kind::State,
            );
        }

        let event_loop = {
            let shared = shared.clone();
            let (min, max) = (cfg.reconnect_min, cfg.reconnect_max);
            let broker = format!("{}:{}", cfg.host, cfg.port);
            std::thread::Builder::new()
                .name("mqtt".into())
                .spawn(move || {
                    let mut delay = min;
                    let mut failures_in_a_row = 0u32;
                    let mut outage_started: Option<Instant> = None;
                    let mut ever_connected = false;
                    let republish_discovery = || {
                        let configs: Vec<(String, Vec<u8>)> = shared.discovery_configs.lock()
                            .unwrap_or_else(|e| e.into_inner()).iter()
                            .map(|(t, p)| (t.clone(), p.clone())).collect();
                        for (topic, payload) in configs {
                            shared.send(topic, payload, QoS::AtLeastOnce, true, Kind::State);
                        }
                    };
                    loop {
                        let Ok(event) = connection.recv() else { break };
                        match event {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                let waiting = shared.lock().waiting();
                                match outage_started.take() {
                                    Some(t) => tracing::info!(broker = %broker, away_for = ?t.elapsed(), queued = waiting,
                                        "connected to the MQTT broker again; delivering what was queued"),
                                    None => tracing::info!(broker = %broker, "connected to the MQTT broker"),
                                }
                                delay = min;
                                failures_in_a_row = 0;
                                let mut filters = vec![format!("{}/+/set/enabled", shared.prefix)];
                                filters.extend(shared.ha_status_topic.clone());
                                filters.extend(shared.discovery_filter.clone());
                                for f in filters {
                                    let _ = shared.client.try_subscribe(f, QoS::AtLeastOnce);
                                }
                                // Republish the retained state first: a broker restarted without
                                // persistence has lost it. Newer changes queued since follow.
                                let mut outbox = shared.lock();
                                if ever_connected {
                                    let retained: Vec<(String, Vec<u8>, QoS)> = shared
                                        .retained
                                        .lock()
                                        .unwrap_or_else(|e| e.into_inner())
                                        .iter()
                                        .map(|(t, (p, q))| (t.clone(), p.clone(), *q))
                                        .collect();
                                    outbox.push_front_state(retained);
                                }
                                ever_connected = true;
                                shared.stats.connected.store(true, Relaxed);
                                shared.flush_locked(&mut outbox);
                            }
                            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => shared.lock().on_sent(pkid),
                            Ok(Event::Incoming(Packet::PubAck(ack))) => shared.lock().on_acked(ack.pkid),
                            Ok(Event::Incoming(Packet::PubComp(ack))) => shared.lock().on_acked(ack.pkid),
                            Ok(Event::Incoming(Packet::Publish(p))) => {
                                shared.on_incoming(&p.topic, &p.payload, &republish_discovery);
                            }
                            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                            Ok(_) => {}
                            Err(e) => {
                                shared.stats.connection_failures.fetch_add(1, Relaxed);
                                let was_connected = shared.stats.connected.swap(false, Relaxed);
                                // rumqttc would forget these with a new session: vigil's outbox
                                // sends them again instead (and only it, to keep the order).
                                connection.eventloop.pending.clear();
                                shared.lock().on_disconnected();
                                if shared.closing.load(Relaxed) {
                                    break;
                                }
                                failures_in_a_row += 1;
                                if was_connected || failures_in_a_row == 1 {
                                    outage_started.get_or_insert_with(Instant::now);
                                    tracing::warn!(broker = %broker, error = %explain(&e), retry_in = ?delay,
                                        "MQTT broker unreachable; vigil keeps running, queues its messages and retries");
                                } else {
                                    tracing::debug!(broker = %broker, error = %explain(&e), retry_in = ?delay,
                                        attempt = failures_in_a_row, "MQTT broker still unreachable");
                                }
                                let until = Instant::now() + delay;
                                while Instant::now() < until && !shared.closing.load(Relaxed) {
                                    std::thread::sleep(Duration::from_millis(50));
                                }
                                delay = (delay * 2).min(max);
                            }
                        }
                    }
                })
                .expect("spawning the mqtt thread")
        };
        Ok(MqttPublisher {
            shared,
            qos_results: qos(cfg.qos_results.0),
            qos_events: qos(cfg.qos_events.0),
            seq: 0,
            event_seq: 0,
            discovery: ha.discovery.then(|| {
                (
                    ha.prefix.clone(),
                    node_id.clone(),
                    setup.model.name.clone(),
                    setup.model.version.clone(),
                )
            }),
            publish_events: cfg.publish_events,
            publish_detections: cfg.publish_detections,
            publish_frames: cfg.publish_frames,
            event_loop: Some(event_loop),
            availability: HashMap::new(),
            top: HashMap::new(),
            top_interval: setup.top_interval,
            last_overflow_log: (Instant::now(), [0; 3]),
        })
    }

    /// Lets the command topics reach the cameras.
    pub fn attach_cameras(&self, graph: Arc<GraphStats>) {
        let _ = self.shared.cameras.set(graph);
    }

    /// A handle to read the connection and outbox figures from another thread.
    pub fn monitor(&self) -> MqttMonitor {
        MqttMonitor(self.shared.clone())
    }

    pub fn outbox_stats(&self) -> OutboxStats {
        self.shared.lock().stats()
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

    /// Hands queued messages to the client (call it now and then: the broker may be back).
    pub fn flush(&self) {
        self.shared.flush();
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// A frame's per-frame results (opt-in) and its camera's top label (on change, or every
    /// `top_interval`).
    pub fn publish(&mut self, r: &FrameResult) {
        // Shared, not copied: nothing is allocated for a frame that publishes nothing.
        let shared = self.shared.clone();
        let prefix = &shared.prefix;
        if self.publish_detections {
            for d in &r.detections {
                let seq = self.next_seq();
                let payload = serde_json::to_vec(&DetectionPayload::new(r, d, &r.model, seq))
                    .expect("payloads serialise");
                let topic = format!(
                    "{prefix}/{}/detection/{}",
                    r.meta.camera,
                    topic_level(&d.label)
                );
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
            let due = match self.top.get(&r.meta.camera) {
                Some((label, at)) => *label != best.label || at.elapsed() >= self.top_interval,
                None => true,
            };
            if due {
                self.top
                    .insert(r.meta.camera.clone(), (best.label.clone(), Instant::now()));
                let payload = serde_json::to_vec(&Top {
                    label: &best.label,
                    score: best.score,
                })
                .expect("payloads serialise");
                let topic = format!("{prefix}/{}/top", r.meta.camera);
                let q = self.shared.qos_state;
                self.send(topic, payload, q, true, Kind::State);
            }
        }
    }

    /// An event message, and the label's ON/OFF state when it starts or ends.
    pub fn publish_event(&mut self, e: &VigilEvent) {
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
        let topic = format!("{prefix}/{}/{}/state", e.camera, topic_level(&e.label));
        let q = self.shared.qos_state;
        self.send(topic, state.into(), q, true, Kind::State);
    }

    /// A camera added at runtime: its discovery configs and initial retained states.
    pub fn add_camera(&mut self, camera: &str, watched: &[String]) {
        let prefix = self.shared.prefix.clone();
        let q = self.shared.qos_state;
        if let Some((dp, node, model, version)) = &self.discovery {
            let d = Discovery {
                discovery_prefix: dp,
                node_id: node,
                prefix: &prefix,
                model,
                model_version: version,
            };
            for (topic, payload) in d.configs(camera, watched) {
                let payload = payload.to_string().into_bytes();
                self.shared
                    .discovery_configs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(topic.clone(), payload.clone());
                self.send(topic, payload, QoS::AtLeastOnce, true, Kind::State);
            }
        }
        for label in watched {
            let topic = format!("{prefix}/{camera}/{}/state", topic_level(label));
            self.send(topic, b"OFF".to_vec(), q, true, Kind::State);
        }
        self.send(
            format!("{prefix}/{camera}/enabled"),
            b"ON".to_vec(),
            q,
            true,
            Kind::State,
        );
    }

    /// A camera removed at runtime: its availability goes `offline`, then its retained topics
    /// and Home Assistant entities are deleted.
    pub fn remove_camera(&mut self, camera: &str) {
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
        self.top.remove(camera);
        let own = format!("{prefix}/{camera}/");
        let retained: Vec<String> = self
            .shared
            .retained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|t| t.starts_with(&own) && !t.ends_with("/availability"))
            .cloned()
            .collect();
        let discovery: Vec<String> = {
            let mut configs = self
                .shared
                .discovery_configs
                .lock()
                .unwrap_or_else(|e| e.into_inner());
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
    pub fn publish_camera(&mut self, status: &CameraStatus) {
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
    pub fn close(mut self, deadline: Duration) {
        let until = Instant::now() + deadline;
        let prefix = self.shared.prefix.clone();
        self.send(
            format!("{prefix}/status"),
            b"offline".to_vec(),
            QoS::AtLeastOnce,
            true,
            Kind::State,
        );
        while self.shared.lock().waiting() > 0 && Instant::now() < until {
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
        self.shared.closing.store(true, Relaxed);
        let _ = self.shared.client.try_disconnect();
        if let Some(h) = self.event_loop.take() {
            while !h.is_finished() && Instant::now() < until + Duration::from_secs(1) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}
