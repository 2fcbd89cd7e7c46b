//! Publishing to MQTT with rumqttc. The event loop runs on its own thread with vigil's own
//! reconnect backoff; publishing never blocks the frame path (a full queue drops and counts).
//!
//! Topics (prefix `vigil` by default):
//! - `vigil/status`: retained `online` / `offline`; `offline` is also the last will.
//! - `vigil/<camera>/detection/<label>`: a class or group over its threshold in a frame.
//! - `vigil/<camera>/frames`: every frame's top-k (opt-in, `mqtt.publish_frames`).
//! - `vigil/<camera>/availability`: retained `online` / `offline`.
//! - `vigil/<camera>/status`: retained camera state and figures (JSON).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};

use crate::config::{MqttConfig, Qos};
use crate::decide::FrameResult;
use crate::metrics::{CameraStatus, State};
use crate::publish::payload::{DetectionPayload, FramePayload, ModelInfo, topic_level};

/// Counters shared with the event loop thread.
#[derive(Debug, Default)]
pub struct MqttStats {
    pub connected: AtomicBool,
    /// Messages handed to the client.
    pub queued: AtomicU64,
    /// QoS 1/2 messages handed to the client, and those the broker acknowledged.
    pub queued_reliable: AtomicU64,
    pub acked: AtomicU64,
    /// Messages dropped because the client's queue was full (broker away too long).
    pub dropped: AtomicU64,
    pub connection_failures: AtomicU64,
}

pub struct MqttPublisher {
    client: Client,
    prefix: String,
    qos: QoS,
    seq: u64,
    model: ModelInfo,
    publish_frames: bool,
    pub stats: Arc<MqttStats>,
    closing: Arc<AtomicBool>,
    event_loop: Option<JoinHandle<()>>,
    last_drop_warning: Option<Instant>,
    /// The availability last published per camera.
    availability: HashMap<String, bool>,
}

fn qos(q: Qos) -> QoS {
    match q {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
        Qos::ExactlyOnce => QoS::ExactlyOnce,
    }
}

impl MqttPublisher {
    /// Starts the client; the connection is made (and remade) in the background.
    pub fn start(cfg: &MqttConfig, model: ModelInfo) -> MqttPublisher {
        let status_topic = format!("{}/status", cfg.topic_prefix);
        let mut opts = MqttOptions::new(&cfg.client_id, &cfg.host, cfg.port);
        opts.set_keep_alive(cfg.keep_alive);
        opts.set_clean_session(true);
        opts.set_last_will(LastWill::new(
            &status_topic,
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
        if let Some(user) = &cfg.username {
            opts.set_credentials(user, cfg.resolved_password().unwrap_or_default());
        }
        let (client, mut connection) = Client::new(opts, cfg.queue);
        let stats = Arc::new(MqttStats::default());
        let closing = Arc::new(AtomicBool::new(false));
        let event_loop = {
            let (stats, closing, client) = (stats.clone(), closing.clone(), client.clone());
            let (min, max) = (cfg.reconnect_min, cfg.reconnect_max);
            let broker = format!("{}:{}", cfg.host, cfg.port);
            std::thread::Builder::new()
                .name("mqtt".into())
                .spawn(move || {
                    let mut delay = min;
                    let mut failures_in_a_row = 0u32;
                    for event in connection.iter() {
                        match event {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                tracing::info!(broker = %broker, "connected to the MQTT broker");
                                stats.connected.store(true, Relaxed);
                                delay = min;
                                failures_in_a_row = 0;
                                let _ = client.try_publish(
                                    &status_topic,
                                    QoS::AtLeastOnce,
                                    true,
                                    "online",
                                );
                            }
                            Ok(Event::Incoming(Packet::PubAck(_)))
                            | Ok(Event::Incoming(Packet::PubComp(_))) => {
                                stats.acked.fetch_add(1, Relaxed);
                            }
                            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                            Ok(_) => {}
                            Err(e) => {
                                stats.connection_failures.fetch_add(1, Relaxed);
                                if closing.load(Relaxed) {
                                    break;
                                }
                                let was_connected = stats.connected.swap(false, Relaxed);
                                failures_in_a_row += 1;
                                if was_connected || failures_in_a_row == 1 {
                                    tracing::warn!(broker = %broker, error = %e, retry_in = ?delay,
                                        "MQTT broker unreachable; vigil keeps running and retries");
                                } else {
                                    tracing::debug!(broker = %broker, error = %e, retry_in = ?delay, attempt = failures_in_a_row,
                                        "MQTT broker still unreachable");
                                }
                                let until = Instant::now() + delay;
                                while Instant::now() < until && !closing.load(Relaxed) {
                                    std::thread::sleep(Duration::from_millis(50));
                                }
                                delay = (delay * 2).min(max);
                            }
                        }
                    }
                })
                .expect("spawning the mqtt thread")
        };
        MqttPublisher {
            client,
            prefix: cfg.topic_prefix.clone(),
            qos: qos(cfg.qos.0),
            seq: 0,
            model,
            publish_frames: cfg.publish_frames,
            stats,
            closing,
            event_loop: Some(event_loop),
            last_drop_warning: None,
            availability: HashMap::new(),
        }
    }

    fn send(&mut self, topic: String, payload: Vec<u8>) {
        self.send_with(topic, payload, self.qos, false)
    }

    fn send_with(&mut self, topic: String, payload: Vec<u8>, qos: QoS, retain: bool) {
        match self.client.try_publish(topic, qos, retain, payload) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Relaxed);
                if qos != QoS::AtMostOnce {
                    self.stats.queued_reliable.fetch_add(1, Relaxed);
                }
            }
            Err(_) => {
                let dropped = self.stats.dropped.fetch_add(1, Relaxed) + 1;
                if self
                    .last_drop_warning
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
                {
                    self.last_drop_warning = Some(Instant::now());
                    tracing::warn!(
                        dropped_total = dropped,
                        "MQTT queue full (broker away?): messages dropped"
                    );
                }
            }
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Publishes a frame's detections (and its top-k when `publish_frames` is on).
    pub fn publish(&mut self, r: &FrameResult) {
        for d in &r.detections {
            let seq = self.next_seq();
            let payload = serde_json::to_vec(&DetectionPayload::new(r, d, &self.model, seq))
                .expect("payloads serialise");
            let topic = format!(
                "{}/{}/detection/{}",
                self.prefix,
                r.meta.camera,
                topic_level(&d.label)
            );
            self.send(topic, payload);
        }
        if self.publish_frames {
            let seq = self.next_seq();
            let payload = serde_json::to_vec(&FramePayload::new(r, &self.model, Some(seq)))
                .expect("payloads serialise");
            let topic = format!("{}/{}/frames", self.prefix, r.meta.camera);
            self.send(topic, payload);
        }
    }

    /// Publishes a camera's retained status JSON, and its availability when that changed.
    pub fn publish_camera(&mut self, status: &CameraStatus) {
        let online = status.state == State::Online;
        if self.availability.get(&status.camera) != Some(&online) {
            self.availability.insert(status.camera.clone(), online);
            let topic = format!("{}/{}/availability", self.prefix, status.camera);
            let payload = if online { "online" } else { "offline" };
            self.send_with(topic, payload.into(), QoS::AtLeastOnce, true);
        }
        let topic = format!("{}/{}/status", self.prefix, status.camera);
        let payload = serde_json::to_vec(status).expect("payloads serialise");
        self.send_with(topic, payload, QoS::AtLeastOnce, true);
    }

    /// Waits (at most `deadline`) for the broker to acknowledge what was published, marks vigil
    /// `offline`, and disconnects.
    pub fn close(mut self, deadline: Duration) {
        let until = Instant::now() + deadline;
        let _ = self.client.try_publish(
            format!("{}/status", self.prefix),
            QoS::AtLeastOnce,
            true,
            "offline",
        );
        self.stats.queued_reliable.fetch_add(1, Relaxed);
        while self.stats.connected.load(Relaxed)
            && self.stats.acked.load(Relaxed) < self.stats.queued_reliable.load(Relaxed)
            && Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let unacked = self
            .stats
            .queued_reliable
            .load(Relaxed)
            .saturating_sub(self.stats.acked.load(Relaxed));
        if unacked > 0 {
            tracing::warn!(
                unacknowledged = unacked,
                "closing MQTT with messages the broker has not acknowledged"
            );
        }
        self.closing.store(true, Relaxed);
        let _ = self.client.try_disconnect();
        drop(self.client);
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
