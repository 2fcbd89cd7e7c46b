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
//! with one.) Names without `_` keep the ids they always had. A zone's entities are
//! `<camera>_<zone>__<label>`, the zone's `_` doubled too (a zone name starts and ends with a
//! letter or digit): the double `_` before the label, after the camera's single one, is found in
//! no whole-frame id (whose runs of `_` after the camera are all single), and the camera, the zone
//! and the label read back from it alone.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::publish::CameraAnnouncement;
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
    /// vigil's status topic (its availability).
    pub status: String,
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
            {"topic": self.status, "payload_available": "online", "payload_not_available": "offline"},
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
    pub fn state_topic(&self, camera: &str, zone: Option<&str>, label: &str) -> String {
        let base = crate::publish::region_base(&self.prefix, camera, zone);
        format!("{base}/{}/state", topic_level(label))
    }

    /// The retained top-label topic: `{"label": ..., "score": ...}`.
    pub fn top_topic(&self, camera: &str, zone: Option<&str>) -> String {
        format!(
            "{}/top",
            crate::publish::region_base(&self.prefix, camera, zone)
        )
    }

    /// Every (topic, payload) for a camera, its regions and their watched labels.
    pub fn configs(&self, cam: &CameraAnnouncement) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for zone in cam.regions() {
            out.extend(self.region_configs(&cam.name, zone, &cam.watched));
        }
        out
    }

    /// A region's entities: a binary sensor per watched label and the top label's sensor.
    fn region_configs(
        &self,
        camera: &str,
        zone: Option<&str>,
        watched: &[String],
    ) -> Vec<(String, Value)> {
        let node = escaped_id_part(&self.node_id);
        let id = |what: &str| match zone {
            None => object_id(camera, what),
            Some(z) => format!("{}_{}__{what}", escaped_id_part(camera), escaped_id_part(z)),
        };
        let named = |what: &str| match zone {
            None => what.to_string(),
            Some(z) => format!("{z} {what}"),
        };
        let mut out = Vec::new();
        for label in watched {
            let object_id = id(&topic_level(label));
            out.push((
                self.topic("binary_sensor", &object_id),
                json!({
                    "name": named(label),
                    "unique_id": format!("{node}_{object_id}"),
                    "state_topic": self.state_topic(camera, zone, label),
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
        let object_id = id("top");
        out.push((
            self.topic("sensor", &object_id),
            json!({
                "name": named("Top label"),
                "unique_id": format!("{node}_{object_id}"),
                "state_topic": self.top_topic(camera, zone),
                "value_template": "{{ value_json.label }}",
                "json_attributes_topic": self.top_topic(camera, zone),
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
            status: "vigil/status".into(),
            model: "m".into(),
            model_version: "1".into(),
        }
    }

    fn camera(name: &str, zones: &[&str], watched: &[&str]) -> CameraAnnouncement {
        CameraAnnouncement {
            name: name.into(),
            whole_frame: zones.is_empty(),
            zones: zones.iter().map(|z| z.to_string()).collect(),
            watched: watched.iter().map(|l| l.to_string()).collect(),
        }
    }

    fn ids(d: &Discovery, camera_name: &str, label: &str) -> (String, String) {
        let (topic, config) = d.configs(&camera(camera_name, &[], &[label])).remove(0);
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
            discovery(node).configs(&self::camera(camera, &[], &[]))[0].1["device"]["identifiers"]
                .clone()
        };
        assert_ne!(devices("a_b", "c"), devices("a", "b_c"));
    }

    #[test]
    fn object_ids_decode_back_to_one_camera_zone_and_label() {
        // A brute force over short names: no two (camera, zone, label) share an object id.
        let names = ["a", "b", "a_", "_a", "a_b", "a__b", "a-b", "_", "__", "b_a"];
        // Zone names start and end with a letter or digit (check-config says so).
        let zones = ["a", "b", "a_b", "a__b", "a-b", "b_a", "a_b_a"];
        let labels = ["a", "b", "a_b", "b_a", "top", "a-b", "a_b_a"];
        let d = discovery("vigil");
        let mut seen = std::collections::HashMap::new();
        for c in names {
            for l in labels {
                let whole = d.configs(&camera(c, &[], &[l]));
                let id = whole[0].0.clone();
                assert_eq!(
                    seen.insert(id.clone(), (c, None, l)),
                    None,
                    "{id}: {c} + {l}"
                );
                for z in zones {
                    let zoned = d.configs(&camera(c, &[z], &[l]));
                    let id = zoned[0].0.clone();
                    assert_eq!(
                        seen.insert(id.clone(), (c, Some(z), l)),
                        None,
                        "{id}: {c} + {z} + {l}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_zones_entities_name_the_zone_and_read_its_topics() {
        let d = discovery("vigil");
        let configs = d.configs(&camera("porch", &["steps"], &["carton"]));
        let (topic, sensor) = &configs[0];
        assert_eq!(
            topic,
            "homeassistant/binary_sensor/vigil/porch_steps__carton/config"
        );
        assert_eq!(sensor["name"], "steps carton");
        assert_eq!(
            sensor["state_topic"],
            "vigil/porch/zones/steps/carton/state"
        );
        assert_eq!(configs[1].1["state_topic"], "vigil/porch/zones/steps/top");
        assert_eq!(
            configs.len(),
            2,
            "no whole-frame entity when only zones are classified"
        );
    }
}
