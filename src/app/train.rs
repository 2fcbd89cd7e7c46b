//! `vigil train` and `vigil heads`: a head's next version from its training set; the versions
//! of every head, and which is in service.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::{AppError, init_gstreamer};
use crate::config::Config;
use crate::pipeline::heads;
use crate::teach::{self, TrainReport};

/// Trains head `head` (training set in `data`, default `teach.data`) into its next version.
pub fn train(
    config: &Config,
    data: Option<PathBuf>,
    head: &str,
    force: bool,
) -> Result<TrainReport, AppError> {
    init_gstreamer()?;
    let model = config.load_model()?;
    let data = data.unwrap_or_else(|| config.teach_data());
    let job = teach::TrainJob {
        head,
        data: &data,
        heads_dir: &config.heads_dir(),
        force,
        batch: 16,
    };
    Ok(teach::train_head(&config.teach, &model, &job)?)
}

/// Every head (with versions, or named by the config): its versions with their figures, the
/// version in service, its training set and inbox.
pub fn list(config: &Config) -> Value {
    let (dir, data) = (config.heads_dir(), config.teach_data());
    let heads: Vec<Value> = teach::head_names(&dir, config.head_names())
        .iter()
        .map(|name| teach::describe(&dir, &data, name))
        .collect();
    json!({ "heads": heads })
}

/// Puts version `version` of head `head` in service.
pub fn pin(config: &Config, head: &str, version: u32) -> Result<(), AppError> {
    heads::check_name(head)?;
    Ok(heads::set_current(&config.heads_dir(), head, version)?)
}

/// Puts the version before the one in service back in service.
pub fn rollback(config: &Config, head: &str) -> Result<u32, AppError> {
    heads::check_name(head)?;
    let dir = config.heads_dir();
    let current =
        heads::current_version(&dir, head).ok_or_else(|| heads::HeadError::NoVersion {
            name: head.to_string(),
        })?;
    let earlier = heads::versions(&dir, head)
        .into_iter()
        .filter(|v| *v < current)
        .max()
        .ok_or_else(|| heads::HeadError::Invalid {
            name: head.to_string(),
            message: format!("version {current} is the first: nothing to roll back to"),
        })?;
    heads::set_current(&dir, head, earlier)?;
    Ok(earlier)
}
