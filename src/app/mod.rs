//! The commands on top of the stages: `run` (`run.rs`: the wiring, the [`sink::Sink`], the
//! supervisor and the reporter) and `classify` (`classify.rs`).

pub mod classify;
pub mod reporter;
pub mod run;
pub mod sink;
pub mod supervisor;
pub mod train;
pub mod tuning;

use std::time::Duration;

use vigil_engine::serving::{
    BatchTuning, LoadedModel, ModelError, SHARED_CORES_DOUBLING_GAIN, choose_batch,
    choose_batch_with,
};

use crate::config::{Config, ConfigError};
use crate::ops::http::HttpError;
use crate::ops::snapshots::SnapshotError;
use crate::pipeline::GraphError;
use crate::publish::mqtt::MqttError;
use crate::source::SourceError;

pub use classify::{classify, default_jobs};
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
/// The batch limit: `max_batch`, or measured below it (`tune_batch`). With `decoding` (every
/// frame of the inputs is decoded on the cores the model runs on: `vigil classify` on the CPU
/// provider), a larger batch must buy [`SHARED_CORES_DOUBLING_GAIN`] per doubling.
fn batch_size(config: &Config, model: &LoadedModel, decoding: bool) -> BatchTuning {
    let p = &config.pipeline;
    let max_batch = p.max_batch.min(model.max_batch).max(1);
    if max_batch < p.max_batch {
        tracing::warn!(
            configured = p.max_batch,
            model = model.max_batch,
            "the model has a fixed batch size; pipeline.max_batch lowered to it"
        );
    }
    if !p.tune_batch || max_batch == 1 {
        return BatchTuning {
            chosen: max_batch,
            measures: Vec::new(),
        };
    }
    let cache = tuning::TuningCache::new(config, model, max_batch);
    let cached = cache.as_ref().and_then(|c| c.get());
    let measured = match cached {
        Some(found) => {
            tracing::info!(
                cache = %cache.as_ref().map(|c| c.path().display().to_string()).unwrap_or_default(),
                measured_at = %found.measured_at,
                "batch sizes as measured earlier on this machine (delete the cache to measure again)"
            );
            Ok(BatchTuning {
                chosen: choose_batch(&found.measures, p.batch_budget),
                measures: found.measures,
            })
        }
        None => model.tune_batch(max_batch, p.batch_budget).inspect(|t| {
            if let Some(cache) = &cache
                && let Err(e) = cache.put(&t.measures)
            {
                tracing::warn!(cache = %cache.path().display(), error = %e,
                    "the measured batch sizes could not be kept; they will be measured again at the next start");
            }
        }),
    };
    match measured {
        Ok(mut t) => {
            let shared = decoding && model.version.provider == "cpu";
            if shared {
                t.chosen =
                    choose_batch_with(&t.measures, p.batch_budget, SHARED_CORES_DOUBLING_GAIN);
            }
            let measured: Vec<String> = t
                .measures
                .iter()
                .map(|m| {
                    format!(
                        "{}: {:.0} img/s in {:.1} ms",
                        m.batch,
                        m.images_per_second,
                        m.batch_time.as_secs_f64() * 1e3
                    )
                })
                .collect();
            tracing::info!(
                batch_limit = t.chosen,
                max_batch,
                budget = ?p.batch_budget,
                measured = %measured.join(", "),
                decoders_share_the_cores = shared,
                "batch limit {} measured to suit this machine (pipeline.tune_batch)",
                t.chosen
            );
            t
        }
        Err(e) => {
            tracing::warn!(error = %e, max_batch, "measuring the batch sizes failed; using max_batch");
            BatchTuning {
                chosen: max_batch,
                measures: Vec::new(),
            }
        }
    }
}
