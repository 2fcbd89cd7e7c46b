//! The commands on top of the stages: `run` (`run.rs`: the wiring, the [`sink::Sink`], the
//! supervisor and the reporter) and `classify` (`classify.rs`).

pub mod classify;
pub mod reporter;
pub mod run;
pub mod sink;
pub mod supervisor;
pub mod train;

use std::time::Duration;

use vigil_engine::serving::{LoadedModel, ModelError};

use crate::config::{Config, ConfigError};
use crate::ops::http::HttpError;
use crate::ops::snapshots::SnapshotError;
use crate::pipeline::GraphError;
use crate::publish::mqtt::MqttError;
use crate::source::SourceError;

pub use classify::classify;
pub use run::{RunControl, run};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("snapshots.dir: {0}")]
    Snapshots(#[from] SnapshotError),
    #[error("GStreamer cannot start: {0}")]
    Gstreamer(String),
    #[error("no enabled camera in the config")]
    NoCamera,
    #[error("{key}: {message}")]
    Secret { key: &'static str, message: String },
    #[error("{0} panicked")]
    Panicked(String),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Teach(#[from] crate::teach::TeachError),
    #[error(transparent)]
    Head(#[from] crate::pipeline::heads::HeadError),
}

/// How long the stages get to drain after a stop request.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

fn init_gstreamer() -> Result<(), AppError> {
    gstreamer::init().map_err(|e| AppError::Gstreamer(e.to_string()))
}

/// Loads the configured model (every session) and says which execution provider runs it.
pub fn load_model(config: &Config) -> Result<LoadedModel, AppError> {
    Ok(config.load_model()?)
}

/// The graph's batch size for a model.
fn batch_size(config: &Config, model: &LoadedModel) -> usize {
    let max_batch = config.pipeline.max_batch.min(model.max_batch).max(1);
    if max_batch < config.pipeline.max_batch {
        tracing::warn!(
            configured = config.pipeline.max_batch,
            model = model.max_batch,
            "the model has a fixed batch size; pipeline.max_batch lowered to it"
        );
    }
    max_batch
}
