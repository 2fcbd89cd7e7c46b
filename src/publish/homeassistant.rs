//! Home Assistant MQTT discovery: a device per camera, with a `binary_sensor` per watched label
//! (on while an event for it runs) and a `sensor` with the top label (its score as an attribute).
//! Every entity is available only while both vigil and its camera are online.
//!
//! Topics: `<discovery prefix>/<component>/<node id>/<object id>/config`, retained. Payload keys
//! are Home Assistant's documented discovery keys.
//!
//! Ids are unique by construction: an object id is `<camera>_<label>`, a unique id
//! `<node>_<camera>_<label>`, and `_` inside the node id or the camera name is doubled, so that
//! camera `front` with label `door cat` (`front_door_cat`) and camera `front_door` with label `cat`
//! (`front__door_cat`) differ. (Labels, as topic levels, never hold two `_` in a row nor start
//! with one.) Names without `_` keep the ids they always had.

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
#[derive(Debug, Clone)]
pub struct Discovery {
    pub discovery_prefix: String,
    pub node_id: String,
    /// vigil's own topic prefix.
    pub prefix: String,
    pub model: String,
    pub model_version: String,
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

/// An id part with its `_` doubled: parts joined with a single `_` never collide.
pub fn escaped_id_part(s: &str) -> String {
    id_part(s).replace('_', "__")
}

/// The object id of a camera's entity: `<camera>_<what>` (`what` a label's topic level, or `top`).
pub fn object_id(camera: &str, what: &str) -> String {
    format!("{}_{what}", escaped_id_part(camera))
}

impl Discovery {
    fn device(&self, camera: &str) -> Value {
        json!({
            "identifiers": [format!("{}_{}", escaped_id_part(&self.node_id), escaped_id_part(camera))],
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
            id_part(&self.node_id)
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
        let node = escaped_id_part(&self.node_id);
        let mut out = Vec::new();
        for label in watched {
            let object_id = object_id(camera, &topic_level(label));
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
        let object_id = object_id(camera, "top");
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
            id_part(&self.node_id)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discovery(node: &str) -> Discovery {
        Discovery {
            discovery_prefix: "homeassistant".into(),
            node_id: node.into(),
            prefix: "vigil".into(),
            model: "m".into(),
            model_version: "1".into(),
        }
    }

    fn ids(d: &Discovery, camera: &str, label: &str) -> (String, String) {
        let (topic, config) = d.configs(camera, &[label.to_string()]).remove(0);
        (topic, config["unique_id"].as_str().unwrap().to_string())
    }

    #[test]
    fn ids_of_cameras_and_labels_that_read_alike_differ() {
        let d = discovery("vigil");
        let a = ids(&d, "front", "door cat");
        let b = ids(&d, "front_door", "cat");
        assert_ne!(a, b);
        assert_eq!(
            a.0,
            "homeassistant/binary_sensor/vigil/front_door_cat/config"
        );
        assert_eq!(
            b.0,
            "homeassistant/binary_sensor/vigil/front__door_cat/config"
        );
        assert_ne!(ids(&d, "a_", "b"), ids(&d, "a", "b"));
        // Names without `_` keep their ids.
        assert_eq!(
            ids(&d, "photos", "fox squirrel").1,
            "vigil_photos_fox_squirrel"
        );
        // Node ids too.
        assert_ne!(
            ids(&discovery("a_b"), "c", "d").1,
            ids(&discovery("a"), "b_c", "d").1
        );
        let devices = |node: &str, camera: &str| {
            discovery(node).configs(camera, &[])[0].1["device"]["identifiers"].clone()
        };
        assert_ne!(devices("a_b", "c"), devices("a", "b_c"));
    }

    #[test]
    fn object_ids_decode_back_to_one_camera_and_label() {
        // A brute force over short names: no two (camera, label) pairs share an object id.
        let cameras = ["a", "b", "a_", "_a", "a_b", "a__b", "a-b", "_", "__"];
        let labels = ["a", "b", "a_b", "b_a", "top", "a-b"];
        let mut seen = std::collections::HashMap::new();
        for c in cameras {
            for l in labels {
                let id = object_id(c, &topic_level(l));
                assert_eq!(seen.insert(id.clone(), (c, l)), None, "{id}: {c} + {l}");
            }
        }
    }
}
