//! The closed loop as the HTTP API serves it: the heads and their inboxes, labelling a captured
//! frame (a move into the label's folder), training jobs in the background, switching versions
//! and flagging a camera's answer as wrong. A version put in service is picked up by the
//! supervisor, which watches the heads' `current` files (so `vigil train` and `vigil heads pin`
//! run beside the service switch it too).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use vigil_engine::serving::ModelSlot;

use crate::config::Config;
use crate::ops::api::ApiError;
use crate::ops::capture::{Sidecar, inbox_dir};
use crate::pipeline::heads;
use crate::sync::lock;
use crate::teach::{self, TrainJob};

/// Images per model call while a head trains inside `vigil run`: short holds of the session the
/// cameras' batches also need.
const EMBED_BATCH: usize = 4;

/// Most inbox samples one listing returns.
const INBOX_PAGE: usize = 500;

/// A head's training job, as `GET /api/heads/<head>/train` shows it.
#[derive(Debug, Clone)]
enum Job {
    Running { since: String },
    Done(Value),
    Failed(String),
}

impl Job {
    fn json(&self) -> Value {
        match self {
            Job::Running { since } => json!({"state": "running", "since": since}),
            Job::Done(report) => json!({"state": "done", "report": report}),
            Job::Failed(error) => json!({"state": "failed", "error": error}),
        }
    }
}

/// The training jobs, one at a time per head.
#[derive(Default)]
pub struct Teaching {
    jobs: Arc<Mutex<HashMap<String, Job>>>,
}

/// A head named in a request: a valid name, else 400.
fn head_name(name: &str) -> Result<&str, ApiError> {
    heads::check_name(name)
        .map(|()| name)
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

/// A sample id named in a request: what the capture writes (letters, digits, '-', '_').
fn sample_id(id: &str) -> Result<&str, ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 200
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(id)
    } else {
        Err(ApiError::bad_request(format!(
            "{:?} is not a sample id",
            id.escape_debug().to_string()
        )))
    }
}

/// A label named in a request: it becomes a folder, so a head's name rules apply.
fn label_name(label: &str) -> Result<&str, ApiError> {
    if heads::valid_name(label) {
        Ok(label)
    } else {
        Err(ApiError::bad_request(format!(
            "label {:?}: 1 to 64 letters, digits, '-' and '_', starting with a letter or digit",
            label.escape_debug().to_string()
        )))
    }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> ApiError {
    if e.kind() == std::io::ErrorKind::NotFound {
        ApiError::not_found(format!("{what}: not found"))
    } else {
        tracing::warn!(path = %path.display(), error = %e, "teach API: {what}");
        ApiError::new(500, "io", format!("{what}: {e}"))
    }
}

impl Teaching {
    /// `GET /api/heads`: every head, the regions bound to it and its training job.
    pub fn heads(&self, config: &Config) -> Value {
        let (dir, data) = (config.heads_dir(), config.teach_data());
        let jobs = lock(&self.jobs).clone();
        let heads: Vec<Value> = teach::head_names(&dir, config.head_names())
            .iter()
            .map(|name| {
                let mut v = teach::describe(&dir, &data, name);
                v["regions"] = bound_regions(config, name).into();
                v["job"] = jobs.get(name).map_or(Value::Null, Job::json);
                v
            })
            .collect();
        json!({ "heads": heads })
    }

    /// `GET /api/heads/<head>/inbox`: the captured samples waiting for a label, newest first.
    pub fn inbox(&self, config: &Config, head: &str) -> Result<Value, ApiError> {
        let dir = inbox_dir(&config.teach_data(), head_name(head)?);
        let mut sidecars: Vec<Sidecar> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .filter(|s: &Sidecar| dir.join(format!("{}.jpg", s.id)).is_file())
            .collect();
        sidecars.sort_by(|a, b| b.id.cmp(&a.id));
        let total = sidecars.len();
        sidecars.truncate(INBOX_PAGE);
        Ok(json!({"head": head, "total": total, "samples": sidecars}))
    }

    /// `GET /api/heads/<head>/inbox/<id>.jpg`.
    pub fn sample_jpeg(&self, config: &Config, head: &str, id: &str) -> Result<Vec<u8>, ApiError> {
        let path = inbox_dir(&config.teach_data(), head_name(head)?)
            .join(format!("{}.jpg", sample_id(id)?));
        std::fs::read(&path).map_err(|e| io_error("sample", &path, e))
    }

    /// `POST /api/heads/<head>/inbox/<id>/label` (`label`: into that label's folder) or `DELETE
    /// /api/heads/<head>/inbox/<id>` (`label` None: discarded).
    pub fn label(
        &self,
        config: &Config,
        head: &str,
        id: &str,
        label: Option<&str>,
    ) -> Result<Value, ApiError> {
        let data = config.teach_data();
        let inbox = inbox_dir(&data, head_name(head)?);
        let id = sample_id(id)?;
        if let Some(label) = label {
            label_name(label)?;
        }
        let (jpg, sidecar) = (
            inbox.join(format!("{id}.jpg")),
            inbox.join(format!("{id}.json")),
        );
        if !jpg.is_file() {
            return Err(ApiError::not_found(format!(
                "no sample {id:?} in the inbox of head {head:?} (labelled or discarded already?)"
            )));
        }
        let Some(label) = label else {
            std::fs::remove_file(&jpg).map_err(|e| io_error("sample", &jpg, e))?;
            let _ = std::fs::remove_file(&sidecar);
            return Ok(json!({"head": head, "sample": id, "discarded": true}));
        };
        let folder = data.join(head).join(label_name(label)?);
        std::fs::create_dir_all(&folder).map_err(|e| io_error("label folder", &folder, e))?;
        let target = folder.join(format!("{id}.jpg"));
        std::fs::rename(&jpg, &target).map_err(|e| io_error("sample", &jpg, e))?;
        // The sidecar goes along (the training set reads only images), for the record.
        let _ = std::fs::rename(&sidecar, folder.join(format!("{id}.json")));
        Ok(json!({"head": head, "sample": id, "label": label}))
    }

    /// `POST /api/heads/<head>/train`: starts training in the background (409 while one runs).
    pub fn train(
        &self,
        config: &Config,
        slot: &Arc<ModelSlot>,
        head: &str,
        force: bool,
    ) -> Result<Value, ApiError> {
        let head = head_name(head)?.to_string();
        let mut jobs = lock(&self.jobs);
        if let Some(job @ Job::Running { .. }) = jobs.get(&head) {
            return Err(ApiError::new(
                409,
                "training",
                format!("head {head} is training already ({})", job.json()),
            ));
        }
        let since = crate::wire::timestamp(std::time::SystemTime::now());
        jobs.insert(
            head.clone(),
            Job::Running {
                since: since.clone(),
            },
        );
        drop(jobs);
        let (cfg, data, heads_dir) = (
            config.teach.clone(),
            config.teach_data(),
            config.heads_dir(),
        );
        let (model, all) = (slot.current(), self.jobs.clone());
        let name = head.clone();
        let spawned = crate::shutdown::spawn(format!("train {head}"), move || {
            let job = TrainJob {
                head: &name,
                data: &data,
                heads_dir: &heads_dir,
                force,
                batch: EMBED_BATCH,
            };
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                teach::train_head(&cfg, &model, &job)
            }));
            let job = match outcome {
                Ok(Ok(report)) => {
                    tracing::info!(head = %name, version = report.version, live = report.live,
                        accuracy = report.metrics.accuracy, decision = %report.decision, "head trained");
                    Job::Done(serde_json::to_value(&report).unwrap_or_default())
                }
                Ok(Err(e)) => {
                    tracing::warn!(head = %name, error = %e, "training failed");
                    Job::Failed(e.to_string())
                }
                Err(p) => Job::Failed(format!(
                    "training panicked: {}",
                    crate::shutdown::panic_message(&*p)
                )),
            };
            lock(&all).insert(name, job);
        });
        if let Err(e) = spawned {
            lock(&self.jobs).insert(head.clone(), Job::Failed(e.to_string()));
            return Err(ApiError::new(
                500,
                "internal",
                format!("cannot start training: {e}"),
            ));
        }
        Ok(json!({"head": head, "state": "running", "since": since}))
    }

    /// `GET /api/heads/<head>/train`: the last training job of the head.
    pub fn job(&self, head: &str) -> Result<Value, ApiError> {
        let head = head_name(head)?;
        lock(&self.jobs).get(head).map(Job::json).ok_or_else(|| {
            ApiError::not_found(format!("head {head} has not trained since the start"))
        })
    }

    /// `POST /api/heads/<head>/versions/<v>/activate`: puts a version in service.
    pub fn activate(&self, config: &Config, head: &str, version: u32) -> Result<Value, ApiError> {
        let head = head_name(head)?;
        let dir = config.heads_dir();
        heads::set_current(&dir, head, version).map_err(|e| match e {
            heads::HeadError::Invalid { .. } => ApiError::not_found(e.to_string()),
            e => ApiError::new(500, "io", e.to_string()),
        })?;
        tracing::info!(head, version, "head version put in service by API request");
        Ok(json!({"head": head, "current": version}))
    }
}

/// The regions bound to head `name`: `camera` or `camera/zone`.
fn bound_regions(config: &Config, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (camera, c) in &config.cameras {
        if c.head.as_deref() == Some(name) {
            out.push(camera.clone());
        }
        for (zone, z) in &c.zones {
            if z.head.as_deref() == Some(name) {
                out.push(format!("{camera}/{zone}"));
            }
        }
    }
    out
}

/// Whether camera `camera` has a region bound to a head.
pub fn has_head(config: &Config, camera: &str) -> bool {
    config
        .cameras
        .get(camera)
        .is_some_and(|c| c.head.is_some() || c.zones.values().any(|z| z.head.is_some()))
}

/// What the supervisor compares to notice a version switch: each head's version in service.
pub fn in_service(config: &Config) -> Vec<(String, Option<u32>)> {
    let dir: PathBuf = config.heads_dir();
    config
        .head_names()
        .into_iter()
        .map(|n| {
            let v = heads::current_version(&dir, &n);
            (n, v)
        })
        .collect()
}
