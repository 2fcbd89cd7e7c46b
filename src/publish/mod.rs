//! Where results go: MQTT (`vigil run`) and JSON lines on stdout (`vigil classify`).

pub mod homeassistant;
pub mod mqtt;
pub mod outbox;
pub mod payload;
