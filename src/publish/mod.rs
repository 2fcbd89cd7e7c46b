//! Where results go: MQTT (`vigil run`): the publisher (`mqtt.rs`), its broker connection
//! (`connection.rs`, `tls.rs`), what it reads from the broker (`incoming.rs`), the outbox that
//! keeps messages across outages (`outbox.rs`), the payloads (`payload.rs`) and Home Assistant
//! discovery (`homeassistant.rs`).

pub mod connection;
pub mod homeassistant;
pub mod incoming;
pub mod mqtt;
pub mod outbox;
pub mod payload;
pub mod tls;

use std::time::Duration;

use crate::events::Event;
use crate::frame::FrameResult;
use crate::stats::CameraStatus;

/// A camera as the publisher announces it: the regions of its frames that are classified and
/// the labels watched in each.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraAnnouncement {
    pub name: String,
    /// The whole frame is classified (always without zones).
    pub whole_frame: bool,
    pub zones: Vec<String>,
    pub watched: Vec<String>,
}

impl CameraAnnouncement {
    /// The classified regions: None for the whole frame, else the zone.
    pub fn regions(&self) -> impl Iterator<Item = Option<&str>> {
        let whole = self.whole_frame.then_some(None);
        whole
            .into_iter()
            .chain(self.zones.iter().map(|z| Some(z.as_str())))
    }
}

/// The topic level a region's retained topics sit under: `<prefix>/<camera>` for the whole
/// frame, `<prefix>/<camera>/zones/<zone>` for a zone (never a label's, whatever the names).
pub fn region_base(prefix: &str, camera: &str, zone: Option<&str>) -> String {
    match zone {
        None => format!("{prefix}/{camera}"),
        Some(zone) => format!("{prefix}/{camera}/zones/{zone}"),
    }
}

/// What the sink publishes: `mqtt::MqttPublisher` does it on a broker.
pub trait Publisher {
    /// A frame's per-frame results (opt-in) and its camera's top label.
    fn publish(&mut self, r: &FrameResult);
    /// An event message, and the label's ON/OFF state when it starts or ends.
    fn publish_event(&mut self, e: &Event);
    /// A camera's status, and its availability when that changed.
    fn publish_camera(&mut self, status: &CameraStatus);
    /// A camera started at runtime: its discovery configs and initial states.
    fn add_camera(&mut self, camera: &CameraAnnouncement);
    /// A camera stopped at runtime: its retained topics and entities deleted.
    fn remove_camera(&mut self, camera: &str);
    /// Hands queued messages on (the broker may be back).
    fn flush(&mut self);
    /// vigil is stopping: mark it offline, deliver what is queued until `deadline`.
    fn close(self, deadline: Duration);
}
