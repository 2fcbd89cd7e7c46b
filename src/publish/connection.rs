//! The broker connection: what the publisher and rumqttc's event loop thread share (the client,
//! the outbox, the retained state), the incoming commands, and the event loop thread itself, with
//! vigil's own reconnect backoff.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rumqttc::{Client, Connection, ConnectionError, Event, Outgoing, Packet, QoS};

use crate::publish::outbox::{Kind, Outbox};
use crate::shutdown::{Joinable, Shutdown};
use crate::stats::GraphStats;
use crate::sync::lock;

/// Connection figures shared with the event loop thread.
#[derive(Debug, Default)]
pub struct MqttStats {
    pub connected: AtomicBool,
    pub connection_failures: AtomicU64,
    pub commands_accepted: AtomicU64,
    pub commands_rejected: AtomicU64,
}

/// What the publisher and the event loop thread share.
pub struct Shared {
    pub client: Client,
    pub outbox: Mutex<Outbox>,
    /// The latest payload of every retained topic, republished after each reconnect (a broker
    /// restarted without persistence has forgotten them).
    pub retained: Mutex<BTreeMap<String, (Vec<u8>, QoS)>>,
    pub stats: MqttStats,
    /// Fired when the publisher closes: the event loop stops retrying.
    pub closing: Shutdown,
    pub prefix: String,
    pub qos_state: QoS,
    /// The cameras, for the enable/disable commands (set once the graph runs).
    pub cameras: OnceLock<Arc<GraphStats>>,
    /// Discovery configs of this run (topic → payload); retained configs of this node not in it
    /// are stale.
    pub discovery_configs: Mutex<BTreeMap<String, Vec<u8>>>,
    pub discovery_filter: Option<String>,
    pub ha_status_topic: Option<String>,
}

impl Shared {
    pub fn outbox(&self) -> MutexGuard<'_, Outbox> {
        lock(&self.outbox)
    }

    /// Queues a message and hands what it can to the client.
    pub fn send(&self, topic: String, payload: Vec<u8>, qos: QoS, retain: bool, kind: Kind) {
        if retain {
            lock(&self.retained).insert(topic.clone(), (payload.clone(), qos));
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

    /// A message from the broker: a command, Home Assistant coming online, or a stale
    /// discovery config of ours.
    fn on_incoming(&self, topic: &str, payload: &[u8]) {
        if self.ha_status_topic.as_deref() == Some(topic) {
            if payload == b"online" {
                tracing::info!("Home Assistant came online: sending the discovery configs again");
                self.republish_discovery();
            }
            return;
        }
        if self.discovery_filter.is_some() && topic.ends_with("/config") {
            self.on_discovery_config(topic, payload);
            return;
        }
        if let Some(camera) = topic
            .strip_prefix(&format!("{}/", self.prefix))
            .and_then(|t| t.strip_suffix("/set/enabled"))
        {
            self.on_enable_command(topic, camera, payload);
        }
    }

    /// A retained discovery config of this node that this run did not publish is stale: deleted.
    fn on_discovery_config(&self, topic: &str, payload: &[u8]) {
        let ours = lock(&self.discovery_configs).contains_key(topic);
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
    }

    /// `<prefix>/<camera>/set/enabled`: pauses or resumes a camera's analysis.
    fn on_enable_command(&self, topic: &str, camera: &str, payload: &[u8]) {
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

/// rumqttc's event loop, driven on its own thread.
pub struct EventLoop {
    pub shared: Arc<Shared>,
    pub connection: Connection,
    /// Reconnect backoff: first delay, doubled up to the second.
    pub backoff: (Duration, Duration),
    /// host:port, for the log.
    pub broker: String,
}

/// Where the event loop stands between connections.
struct Backoff {
    delay: Duration,
    failures_in_a_row: u32,
    outage_started: Option<Instant>,
    ever_connected: bool,
}

impl EventLoop {
    pub fn spawn(self) -> Joinable {
        crate::shutdown::spawn("mqtt".into(), move || self.run()).expect("spawning the mqtt thread")
    }

    fn run(mut self) {
        let shared = self.shared.clone();
        let mut state = Backoff {
            delay: self.backoff.0,
            failures_in_a_row: 0,
            outage_started: None,
            ever_connected: false,
        };
        loop {
            let Ok(event) = self.connection.recv() else {
                break;
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => self.on_connected(&mut state),
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => shared.outbox().on_sent(pkid),
                Ok(Event::Incoming(Packet::PubAck(ack))) => shared.outbox().on_acked(ack.pkid),
                Ok(Event::Incoming(Packet::PubComp(ack))) => shared.outbox().on_acked(ack.pkid),
                Ok(Event::Incoming(Packet::Publish(p))) => shared.on_incoming(&p.topic, &p.payload),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(e) => {
                    if !self.on_error(&e, &mut state) {
                        break;
                    }
                }
            }
        }
    }

    /// Connected: subscribe, republish the retained state, deliver what was queued.
    fn on_connected(&self, state: &mut Backoff) {
        let shared = &self.shared;
        let waiting = shared.outbox().waiting();
        match state.outage_started.take() {
            Some(t) => {
                tracing::info!(broker = %self.broker, away_for = ?t.elapsed(), queued = waiting,
                "connected to the MQTT broker again; delivering what was queued")
            }
            None => tracing::info!(broker = %self.broker, "connected to the MQTT broker"),
        }
        state.delay = self.backoff.0;
        state.failures_in_a_row = 0;
        let mut filters = vec![format!("{}/+/set/enabled", shared.prefix)];
        filters.extend(shared.ha_status_topic.clone());
        filters.extend(shared.discovery_filter.clone());
        for f in filters {
            let _ = shared.client.try_subscribe(f, QoS::AtLeastOnce);
        }
        // Republish the retained state first: a broker restarted without persistence has lost
        // it. Newer changes queued since follow.
        let mut outbox = shared.outbox();
        if state.ever_connected {
            let retained: Vec<(String, Vec<u8>, QoS)> = lock(&shared.retained)
                .iter()
                .map(|(t, (p, q))| (t.clone(), p.clone(), *q))
                .collect();
            outbox.push_front_state(retained);
        }
        state.ever_connected = true;
        shared.stats.connected.store(true, Relaxed);
        shared.flush_locked(&mut outbox);
    }

    /// The connection failed: says so (once per outage), waits out the backoff. False when the
    /// publisher is closing.
    fn on_error(&mut self, e: &ConnectionError, state: &mut Backoff) -> bool {
        let shared = &self.shared;
        shared.stats.connection_failures.fetch_add(1, Relaxed);
        let was_connected = shared.stats.connected.swap(false, Relaxed);
        // rumqttc would forget these with a new session: vigil's outbox sends them again
        // instead (and only it, to keep the order).
        self.connection.eventloop.pending.clear();
        shared.outbox().on_disconnected();
        if shared.closing.is_stopped() {
            return false;
        }
        state.failures_in_a_row += 1;
        let delay = state.delay;
        if was_connected || state.failures_in_a_row == 1 {
            state.outage_started.get_or_insert_with(Instant::now);
            tracing::warn!(broker = %self.broker, error = %explain(e), retry_in = ?delay,
                "MQTT broker unreachable; vigil keeps running, queues its messages and retries");
        } else {
            tracing::debug!(broker = %self.broker, error = %explain(e), retry_in = ?delay,
                attempt = state.failures_in_a_row, "MQTT broker still unreachable");
        }
        if shared.closing.stopped_within(delay) {
            return false;
        }
        state.delay = (delay * 2).min(self.backoff.1);
        true
    }
}
