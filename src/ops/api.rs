//! What the HTTP server asks of the running service: `ops::http` serves it, `ops::service`
//! implements it.
//!
//! Every call but `ready` may block (a predict waits for its batch, a reload loads a model): the
//! server calls them off its async threads.

use std::time::{Instant, SystemTime};

use serde::Serialize;
use serde_json::Value;

/// A request the service refuses, with the HTTP status it maps to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    #[serde(skip)]
    pub status: u16,
    /// Stable machine-readable reason, e.g. "not_found", "bad_image", "unavailable".
    pub code: &'static str,
    pub message: String,
    /// A refused config: each problem with the key it is about (the console shows it beside
    /// the field).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<FieldProblem>,
}

/// A problem of a config key, e.g. `cameras.porch.zones.steps.rect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldProblem {
    pub key: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            problems: Vec::new(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "not_found", message)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "bad_request", message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "unavailable", message)
    }
}

/// `GET /api/events?camera=&label=&since=&limit=`.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub camera: Option<String>,
    pub zone: Option<String>,
    pub label: Option<String>,
    /// Events that started (or changed) at or after this time.
    pub since: Option<SystemTime>,
    pub limit: usize,
}

pub trait Api: Send + Sync + 'static {
    /// `GET /readyz`: Ok with details when the model is loaded and a camera is online, else the
    /// reason. Called on the server's async threads (so that it never waits behind predicts):
    /// it must only read, taking no lock for long.
    fn ready(&self) -> Result<Value, String>;
    /// `GET /metrics`: Prometheus text format.
    fn metrics(&self) -> String;
    /// `GET /api/cameras`: every camera's status.
    fn cameras(&self) -> Value;
    /// `GET /api/cameras/<id>`.
    fn camera(&self, id: &str) -> Result<Value, ApiError>;
    /// `GET /api/events`: recent events, newest first.
    fn events(&self, query: &EventQuery) -> Value;
    /// `GET /api/cameras/<id>/latest.jpg`: the latest analysed frame, JPEG; `outline`: with
    /// its zones, label and time drawn on it.
    fn latest_jpeg(&self, camera: &str, outline: bool) -> Result<Vec<u8>, ApiError>;
    /// `GET /api/events/<id>/snapshot.jpg`: JPEG.
    fn event_snapshot(&self, id: &str) -> Result<Vec<u8>, ApiError>;
    /// `GET /v1/models/<name>[/versions/<v>]`: TensorFlow Serving's model status.
    fn model_status(&self, name: &str, version: Option<&str>) -> Result<Value, ApiError>;
    /// `POST /v1/models/<name>[/versions/<v>]:predict`: one prediction per encoded image (JPEG,
    /// PNG...), through the cameras' preprocessing, batcher and model. The images were checked
    /// against the size limits already. Returns TensorFlow Serving's `{"predictions": [...]}`.
    /// At `deadline` the client has had its 504: decode nothing more, wait no longer.
    fn predict(
        &self,
        name: &str,
        version: Option<&str>,
        images: Vec<Vec<u8>>,
        deadline: Instant,
    ) -> Result<Value, ApiError>;
    /// `POST /api/reload`: re-reads the config file and applies it (or refuses it, listing the
    /// problems).
    fn reload(&self) -> Result<Value, ApiError>;

    /// `GET /api/stream`: the event messages as they are published, as JSON (None: no feed).
    fn subscribe_events(&self) -> Option<tokio::sync::broadcast::Receiver<std::sync::Arc<str>>> {
        None
    }
    /// `GET /api/system`: the figures of the last minutes, oldest first.
    fn system(&self) -> Value {
        serde_json::json!({"interval_ms": 0, "samples": []})
    }
    /// `PUT /api/cameras/<id>/zones`: replaces a camera's zones in the config file (its
    /// comments kept) and reloads; a config with problems is refused (422, each problem with
    /// its key) and the file is not touched.
    fn save_zones(&self, camera: &str, _zones: Value) -> Result<Value, ApiError> {
        Err(ApiError::not_found(format!(
            "{camera:?}: no config file to edit"
        )))
    }

    /// `GET /api/heads`: the heads, their versions, training sets, inboxes and jobs.
    fn heads(&self) -> Value {
        serde_json::json!({"heads": []})
    }
    /// `GET /api/heads/<head>/inbox`.
    fn head_inbox(&self, head: &str) -> Result<Value, ApiError> {
        Err(no_teaching(head))
    }
    /// `GET /api/heads/<head>/inbox/<id>.jpg`.
    fn head_sample(&self, head: &str, _id: &str) -> Result<Vec<u8>, ApiError> {
        Err(no_teaching(head))
    }
    /// Labels an inbox sample (`label`), or discards it (None).
    fn label_sample(&self, head: &str, _id: &str, _label: Option<&str>) -> Result<Value, ApiError> {
        Err(no_teaching(head))
    }
    /// `POST /api/heads/<head>/train`: starts a training job.
    fn train_head(&self, head: &str, _force: bool) -> Result<Value, ApiError> {
        Err(no_teaching(head))
    }
    /// `GET /api/heads/<head>/train`: the last job's state (and report).
    fn train_status(&self, head: &str) -> Result<Value, ApiError> {
        Err(no_teaching(head))
    }
    /// `POST /api/heads/<head>/versions/<v>/activate`.
    fn activate_head(&self, head: &str, _version: u32) -> Result<Value, ApiError> {
        Err(no_teaching(head))
    }
    /// `POST /api/cameras/<id>/wrong`: the camera's next frames go to its heads' inboxes.
    fn flag_wrong(&self, camera: &str) -> Result<Value, ApiError> {
        Err(no_teaching(camera))
    }
    /// `POST /api/events/<id>/wrong`: the picture that started the event goes to its head's
    /// inbox as flagged.
    fn flag_event(&self, event: &str) -> Result<Value, ApiError> {
        Err(no_teaching(event))
    }
}

fn no_teaching(what: &str) -> ApiError {
    ApiError::not_found(format!("{what:?}: no heads here"))
}
