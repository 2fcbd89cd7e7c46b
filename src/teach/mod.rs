//! Teach vigil your own classes: a head per camera or zone, trained on the box on the backbone's
//! embeddings of a folder of labelled images (`dataset.rs`, `embed.rs`, `cache.rs`, `train.rs`),
//! versioned and compared before it goes live (`pipeline/heads.rs`), fed by the frames worth
//! labelling that vigil captures as it runs (`capture.rs`).

pub mod cache;
pub mod dataset;
pub mod embed;
pub mod train;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vigil_engine::serving::LoadedModel;

use crate::pipeline::heads::{self, Backbone, HeadError, HeadManifest, Metrics};
use cache::Cache;
use dataset::{Dataset, DatasetError};
use embed::{EmbedError, Embedder};
use train::{Examples, TrainError, TrainSettings};

/// `[teach]`: where the training sets are and how heads are trained.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TeachConfig {
    /// The training sets: `<data>/<head>/<label>/*.jpg`, and each head's `_inbox/`.
    pub data: PathBuf,
    /// Where the heads' versions are kept (default: `heads/` in `model.dir`).
    pub heads: Option<PathBuf>,
    /// Images each label needs at least.
    pub min_per_label: usize,
    /// Folds of the cross-validation.
    pub folds: usize,
    /// L2 regularisation of the logistic regression.
    pub regularisation: f64,
    /// Labels that mean "nothing to see here": a head's result with one of them raises no event.
    pub background: Vec<String>,
    /// Which frames vigil saves into the heads' inboxes for labelling.
    pub capture: CaptureConfig,
}

impl Default for TeachConfig {
    fn default() -> Self {
        TeachConfig {
            data: "dataset".into(),
            heads: None,
            min_per_label: 5,
            folds: 5,
            regularisation: 1.0,
            background: ["nothing", "background", "none", "empty", "other"]
                .map(String::from)
                .to_vec(),
            capture: CaptureConfig::default(),
        }
    }
}

/// `[teach.capture]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaptureConfig {
    pub enabled: bool,
    /// A frame whose top score is in `[low, high]` is uncertain: worth a label.
    pub band: [f32; 2],
    /// Most samples waiting in a head's inbox; the oldest go beyond it.
    pub max_inbox: usize,
    /// A sample closer than this (cosine distance of embeddings) to one of the last saved is a
    /// near duplicate, skipped.
    pub min_distance: f32,
    /// At most one uncertain frame per region this often (event and flagged frames always).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            enabled: true,
            band: [0.3, 0.7],
            max_inbox: 500,
            min_distance: 0.05,
            interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TeachError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Head(#[from] HeadError),
}

/// What a training did, printed as one JSON line by `vigil train` and answered by the API.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub head: String,
    pub version: u32,
    pub labels: Vec<String>,
    pub samples: usize,
    /// Images whose embedding was computed (the others came from the cache).
    pub embedded: usize,
    pub metrics: Metrics,
    /// The version in service before, and its accuracy on the same examples.
    pub previous: Option<Previous>,
    /// Whether the new version is now in service.
    pub live: bool,
    /// Why (or why not).
    pub decision: String,
    pub seconds: Seconds,
}

#[derive(Debug, Clone, Serialize)]
pub struct Previous {
    pub version: u32,
    pub accuracy: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Seconds {
    pub embedding: f64,
    pub training: f64,
    pub total: f64,
}

/// What to train, and where.
pub struct TrainJob<'a> {
    pub head: &'a str,
    /// The training sets (`teach.data`).
    pub data: &'a Path,
    /// The heads' versions (`<model dir>/heads`).
    pub heads_dir: &'a Path,
    /// Put the new version in service even if it is worse than the one in service.
    pub force: bool,
    /// Images per model call while embedding.
    pub batch: usize,
}

/// Trains head `job.head` on its training set and installs the result as its next version; puts
/// it in service unless it is worse than the version in service on the same examples (or always,
/// with `force`).
pub fn train_head(
    cfg: &TeachConfig,
    model: &LoadedModel,
    job: &TrainJob<'_>,
) -> Result<TrainReport, TeachError> {
    let (name, data, heads_dir, force) = (job.head, job.data, job.heads_dir, job.force);
    heads::check_name(name)?;
    let started = Instant::now();
    let set = Dataset::read(data, name, cfg.min_per_label.max(1))?;
    let mut embedder = Embedder::new(model)?.with_batch(job.batch);
    let (embeddings, embedded) = embed_cached(&mut embedder, &set, name)?;
    let embedding_done = started.elapsed();
    let labels: Vec<usize> = set.samples.iter().map(|s| s.label).collect();
    let examples = Examples {
        embeddings: &embeddings,
        labels: &labels,
        classes: set.labels.len(),
    };
    let settings = TrainSettings {
        alpha: cfg.regularisation,
        folds: cfg.folds,
        ..Default::default()
    };
    let metrics = train::cross_validate(&examples, &set.labels, &settings)?;
    let weights = train::fit(&examples, &settings)?;
    let training_done = started.elapsed();
    // Another training of the same head (the CLI beside the HTTP API) may take the number
    // between the look and the save: the next one is taken then.
    let mut tries = 0;
    let version = loop {
        let version = heads::next_version(heads_dir, name);
        let manifest = manifest_of(name, version, &set, model, embedder.dim(), &metrics);
        let head = heads::Head::new(
            &manifest,
            weights.mean.clone(),
            weights.scale.clone(),
            weights.weight.clone(),
            weights.bias.clone(),
        )?;
        match heads::save(heads_dir, &manifest, &head) {
            Err(heads::HeadError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists && tries < 8 =>
            {
                tries += 1;
            }
            saved => {
                saved?;
                break version;
            }
        }
    };
    let previous = previous(heads_dir, name, &set, &embeddings);
    let (live, decision) = decide(&metrics, previous.as_ref(), force);
    if live {
        heads::set_current(heads_dir, name, version)?;
    }
    Ok(TrainReport {
        head: name.to_string(),
        version,
        labels: set.labels,
        samples: set.samples.len(),
        embedded,
        metrics,
        previous,
        live,
        decision,
        seconds: Seconds {
            embedding: embedding_done.as_secs_f64(),
            training: (training_done - embedding_done).as_secs_f64(),
            total: started.elapsed().as_secs_f64(),
        },
    })
}

/// The training set's embeddings, those already computed from the cache; how many were new.
fn embed_cached(
    embedder: &mut Embedder,
    set: &Dataset,
    name: &str,
) -> Result<(Vec<Vec<f32>>, usize), TeachError> {
    let mut cache = Cache::open(
        &Cache::path(&set.dir, &embedder.backbone_key()),
        embedder.dim(),
    );
    let before = cache.len();
    let embeddings = embedder.embed_samples(&set.samples, &mut cache)?;
    let embedded = cache.len() - before;
    if let Err(e) = cache.save() {
        tracing::warn!(head = name, error = %e, "cannot save the embedding cache");
    }
    Ok((embeddings, embedded))
}

/// The manifest of a new version: its labels, backbone, training set and figures.
fn manifest_of(
    name: &str,
    version: u32,
    set: &Dataset,
    model: &LoadedModel,
    dim: usize,
    metrics: &heads::Metrics,
) -> HeadManifest {
    let mut samples: Vec<String> = set.samples.iter().map(|s| s.hash.clone()).collect();
    samples.sort();
    HeadManifest {
        name: name.to_string(),
        version,
        labels: set.labels.clone(),
        backbone: Backbone {
            name: model.version.info.name.clone(),
            version: model.version.info.version.clone(),
            dim,
        },
        created: crate::wire::timestamp(std::time::SystemTime::now()),
        samples,
        samples_hash: set.hash(),
        metrics: metrics.clone(),
    }
}

/// The version in service and its accuracy, judged fairly: on the examples it was not trained
/// on, or (when there are none, the set unchanged) its own cross-validated accuracy.
fn previous(
    heads_dir: &Path,
    name: &str,
    set: &Dataset,
    embeddings: &[Vec<f32>],
) -> Option<Previous> {
    let head = heads::load_current(heads_dir, name).ok()?;
    let manifest = heads::read_manifest(heads_dir, name, head.info.version).ok()?;
    let seen: std::collections::HashSet<&str> =
        manifest.samples.iter().map(String::as_str).collect();
    let unseen: Vec<usize> = (0..set.samples.len())
        .filter(|&i| !seen.contains(set.samples[i].hash.as_str()))
        .collect();
    let accuracy = if unseen.is_empty() {
        manifest.metrics.accuracy
    } else {
        let e: Vec<Vec<f32>> = unseen.iter().map(|&i| embeddings[i].clone()).collect();
        let l: Vec<usize> = unseen.iter().map(|&i| set.samples[i].label).collect();
        let examples = Examples {
            embeddings: &e,
            labels: &l,
            classes: set.labels.len(),
        };
        train::accuracy_of(&head, &examples, &set.labels)
    };
    Some(Previous {
        version: head.info.version,
        accuracy,
    })
}

/// Whether a new version goes live: not worse than the one in service on the same examples
/// (its cross-validated accuracy against the old one's), or forced.
fn decide(metrics: &Metrics, previous: Option<&Previous>, force: bool) -> (bool, String) {
    match previous {
        _ if force => (true, "forced".into()),
        None => (true, "the first version".into()),
        Some(p) if metrics.accuracy >= p.accuracy => (
            true,
            format!(
                "not worse than version {} ({:.3} against {:.3})",
                p.version, metrics.accuracy, p.accuracy
            ),
        ),
        Some(p) => (
            false,
            format!(
                "worse than version {} ({:.3} against {:.3}): kept, not put in service \
                 (force it, or switch to it, if you want it)",
                p.version, metrics.accuracy, p.accuracy
            ),
        ),
    }
}

/// A head as `vigil heads` and `GET /api/heads` show it: its versions with their figures, the
/// version in service, its training set's label counts and the samples waiting in its inbox.
pub fn describe(heads_dir: &Path, data: &Path, name: &str) -> serde_json::Value {
    let versions: Vec<serde_json::Value> = heads::versions(heads_dir, name)
        .into_iter()
        .filter_map(|v| heads::read_manifest(heads_dir, name, v).ok())
        .map(|m| {
            serde_json::json!({
                "version": m.version,
                "created": m.created,
                "labels": m.labels,
                "samples": m.samples.len(),
                "accuracy": m.metrics.accuracy,
                "per_class": m.metrics.per_class,
                "backbone": m.backbone,
            })
        })
        .collect();
    let dir = data.join(name);
    let mut labels = serde_json::Map::new();
    let mut folders: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| Some((e.file_name().to_str()?.to_string(), e.path())))
        .filter(|(n, _)| !n.starts_with(['_', '.']))
        .collect();
    folders.sort();
    for (label, path) in folders {
        labels.insert(label, count_images(&path).into());
    }
    serde_json::json!({
        "head": name,
        "current": heads::current_version(heads_dir, name),
        "versions": versions,
        "labels": labels,
        "inbox": count_images(&dir.join("_inbox")),
    })
}

/// Image files in a folder.
fn count_images(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.path()
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| {
                    dataset::IMAGE_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str())
                })
        })
        .count()
}

/// The heads with versions under `heads_dir`, and `named` (those the config names), sorted.
pub fn head_names(heads_dir: &Path, named: Vec<String>) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(heads_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| heads::valid_name(n))
        .chain(named)
        .collect();
    names.sort();
    names.dedup();
    names
}
