//! Home Assistant MQTT discovery: a device per camera, with a `binary_sensor` per watched label
//! (on while an event for it runs) and a `sensor` with the top label (its score as an attribute).
//! Every entity is available only while both vigil and its camera are online.
//!
//! Topics: `<discovery prefix>/<component>/<node id>/<object id>/config`, retained. Payload keys
//! are Home Assistant's documented discovery keys.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::wire::topic_level;

/// Home Assistant MQTT discovery.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HomeAssistantConfig {
    /// Publish discovery configs so Home Assistant creates a device per camera.
    pub discovery: bool,
    /// Home Assistant's discovery prefix.
    pub prefix: String,
    /// The node id in discovery topics; default: `mqtt.client_id`.
    pub node_id: Option<String>,
}

impl Default for HomeAssistantConfig {
    fn default() -> Self {
        Self {
            discovery: true,
            prefix: "homeassistant".into(),
            node_id: None,
        }
    }
}

/// What the discovery configs are built from.
pub struct Discovery<'a> {
    pub discovery_prefix: &'a str,
    pub node_id: &'a str,
    /// vigil's own topic prefix.
    pub prefix: &'a str,
    pub model: &'a str,
    pub model_version: &'a str,
}

/// A node id / object id: letters, digits, `_` and `-` only.
pub fn id_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Discovery<'_> {
    fn device(&self, camera: &str) -> Value {
        json!({
            "identifiers": [format!("{}_{}", id_part(self.node_id), id_part(camera))],
            "name": format!("vigil {camera}"),
            "manufacturer": "vigil",
            "model": format!("{} {}", self.model, self.model_version),
            "sw_version": env!("CARGO_PKG_VERSION"),
        })
    }

    fn availability(&self, camera: &str) -> Value {
        json!([
            {"topic": format!("{}/status", self.prefix), "payload_available": "online", "payload_not_available": "offline"},
            {"topic": format!("{}/{camera}/availability", self.prefix), "payload_available": "online", "payload_not_available": "offline"},
        ])
    }

    fn topic(&self, component: &str, object_id: &str) -> String {
        format!(
            "{}/{component}/{}/{object_id}/config",
            self.discovery_prefix,
            id_part(self.node_id)
        )
    }

    /// The retained state topic of a watched label: `ON` while an event runs, else `OFF`.
    pub fn state_topic(&self, camera: &str, label: &str) -> String {
        format!("{}/{camera}/{}/state", self.prefix, topic_level(label))
    }

    /// The retained top-label topic: `{"label": ..., "score": ...}`.
    pub fn top_topic(&self, camera: &str) -> String {
        format!("{}/{camera}/top", self.prefix)
    }

    /// Every (topic, payload) for a camera and its watched labels.
    pub fn configs(&self, camera: &str, watched: &[String]) -> Vec<(String, Value)> {
        let node = id_part(self.node_id);
        let mut out = Vec::new();
        for label in watched {
            let object_id = format!("{}_{}", id_part(camera), topic_level(label));
            out.push((
                self.topic("binary_sensor", &object_id),
                json!({
                    "name": label,
                    "unique_id": format!("{node}_{object_id}"),
                    "state_topic": self.state_topic(camera, label),
                    "payload_on": "ON",
                    "payload_off": "OFF",
                    "device_class": "occupancy",
                    "availability": self.availability(camera),
                    "availability_mode": "all",
                    "device": self.device(camera),
                    "origin": {"name": "vigil", "sw_version": env!("CARGO_PKG_VERSION")},
                }),
            ));
        }
        let object_id = format!("{}_top", id_part(camera));
        out.push((
            self.topic("sensor", &object_id),
            json!({
                "name": "Top label",
                "unique_id": format!("{node}_{object_id}"),
                "state_topic": self.top_topic(camera),
                "value_template": "{{ value_json.label }}",
                "json_attributes_topic": self.top_topic(camera),
                "icon": "mdi:cctv",
                "availability": self.availability(camera),
                "availability_mode": "all",
                "device": self.device(camera),
                "origin": {"name": "vigil", "sw_version": env!("CARGO_PKG_VERSION")},
            }),
        ));
        out
    }

    /// The filter matching every discovery config of this node (to find stale ones).
    pub fn all_configs_filter(&self) -> String {
        format!(
            "{}/+/{}/+/config",
            self.discovery_prefix,
            id_part(self.node_id)
        )
    }
}
