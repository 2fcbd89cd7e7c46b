//! Where results go: MQTT (`vigil run`) and JSON lines on stdout (`vigil classify`).

pub mod mqtt;
pub mod payload;
