//! Operations: what runs beside the frame path. The HTTP server (`http/`) serving the API
//! (`api.rs`) that the running service (`service.rs`) implements: cameras started and stopped at
//! runtime, reloads, model switches, predict; what the sink and the API share (`shared.rs`:
//! latest frames, recent events); `/metrics` (`prometheus.rs`) and event snapshots
//! (`snapshots.rs`); the closed loop of teaching: frames captured for labelling (`capture.rs`),
//! labelling, training and version switches through the API (`teaching.rs`); for the console,
//! the figures of the last minutes (`system.rs`) and zones written into the config file with its
//! comments kept (`zones_edit.rs`).

pub mod api;
pub mod capture;
pub mod http;
pub mod prometheus;
pub mod service;
pub mod shared;
pub mod snapshots;
pub mod system;
pub mod teaching;
pub mod zones_edit;
