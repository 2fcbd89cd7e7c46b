//! Heads: small classifiers on the backbone's embedding, each with labels of its own (a
//! multinomial logistic regression over the standardised embedding), trained on the box by
//! `teach/` and applied in the decide stage: a matrix product per frame, no second model call.
//!
//! On disk, under `<model dir>/heads/<name>/`: a folder per version (`1/`, `2/`...) holding
//! `head.toml` (labels, backbone, training set, metrics) and `head.safetensors` (the weights), and
//! `current`, the version in service (pinned, rolled back or switched to after a training).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("head {name}: {message}")]
    Invalid { name: String, message: String },
    #[error("head {name}: {}: {source}", path.display())]
    Io {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("head {name}: no version in service (train it first: vigil train {name})")]
    NoVersion { name: String },
}

pub use crate::frame::HeadInfo;

/// The backbone a head was trained on: its embedding is only meaningful for that one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Backbone {
    pub name: String,
    pub version: String,
    /// The embedding's length.
    pub dim: usize,
}

/// How well a version did in k-fold cross-validation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub accuracy: f64,
    pub folds: usize,
    /// Per label: precision and recall.
    pub per_class: BTreeMap<String, ClassMetrics>,
    /// `confusion[true][predicted]`, in the order of the labels.
    pub confusion: Vec<Vec<usize>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub precision: f64,
    pub recall: f64,
    pub samples: usize,
}

/// `head.toml`: what a version is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadManifest {
    pub name: String,
    pub version: u32,
    pub labels: Vec<String>,
    pub backbone: Backbone,
    /// RFC 3339, UTC.
    pub created: String,
    /// The training set: its images' content hashes (sorted) and their hash.
    pub samples: Vec<String>,
    pub samples_hash: String,
    pub metrics: Metrics,
}

/// A head ready to apply.
#[derive(Debug)]
pub struct Head {
    pub info: Arc<HeadInfo>,
    pub labels: Vec<String>,
    pub backbone: Backbone,
    /// Per embedding value: `(x - mean) * scale` is what the weights read.
    mean: Vec<f32>,
    scale: Vec<f32>,
    /// `labels.len()` rows of `backbone.dim` weights.
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Head {
    /// A head from its weights; `mean`, `scale` have the embedding's length, `weight` a row of it
    /// per label, `bias` one value per label.
    pub fn new(
        manifest: &HeadManifest,
        mean: Vec<f32>,
        scale: Vec<f32>,
        weight: Vec<f32>,
        bias: Vec<f32>,
    ) -> Result<Head, HeadError> {
        let (k, d) = (manifest.labels.len(), manifest.backbone.dim);
        let invalid = |message: String| HeadError::Invalid {
            name: manifest.name.clone(),
            message,
        };
        if k < 2 {
            return Err(invalid(format!("{k} label(s); a head needs at least 2")));
        }
        if mean.len() != d || scale.len() != d || weight.len() != k * d || bias.len() != k {
            return Err(invalid(format!(
                "weights of the wrong shape for {k} labels of a {d}-value embedding"
            )));
        }
        Ok(Head {
            info: Arc::new(HeadInfo {
                name: manifest.name.clone(),
                version: manifest.version,
            }),
            labels: manifest.labels.clone(),
            backbone: manifest.backbone.clone(),
            mean,
            scale,
            weight,
            bias,
        })
    }

    /// The labels' probabilities for one embedding, into `out` (cleared first).
    pub fn apply(&self, embedding: &[f32], out: &mut Vec<f32>) {
        out.clear();
        let d = self.backbone.dim;
        if embedding.len() != d {
            // A frame of another backbone (a model switch in flight): nothing to say.
            out.resize(self.labels.len(), 1.0 / self.labels.len() as f32);
            return;
        }
        for (row, b) in self.weight.chunks_exact(d).zip(&self.bias) {
            let mut z = *b;
            for ((w, x), (m, s)) in row
                .iter()
                .zip(embedding)
                .zip(self.mean.iter().zip(&self.scale))
            {
                z += w * (x - m) * s;
            }
            out.push(z);
        }
        crate::pipeline::decide::softmax(out);
    }

    /// The head's weights, as [`Head::new`] takes them.
    pub fn weights(&self) -> (&[f32], &[f32], &[f32], &[f32]) {
        (&self.mean, &self.scale, &self.weight, &self.bias)
    }
}

/// A head's name: a folder under the heads' and the training sets' folders, so 1 to 64 letters,
/// digits, '-' and '_', starting with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Refuses a head name that is not [`valid_name`].
pub fn check_name(name: &str) -> Result<(), HeadError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(HeadError::Invalid {
            name: name.escape_debug().to_string(),
            message: "not a head name: 1 to 64 letters, digits, '-' and '_', starting with a \
                      letter or digit"
                .into(),
        })
    }
}

/// The folder of a head's version.
pub fn version_dir(heads: &Path, name: &str, version: u32) -> PathBuf {
    heads.join(name).join(version.to_string())
}

/// Every version of a head on disk, oldest first.
pub fn versions(heads: &Path, name: &str) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_dir(heads.join(name))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("head.toml").is_file())
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    out.sort_unstable();
    out
}

/// The number a new version takes: after every version folder, also one still being written by
/// another training.
pub fn next_version(heads: &Path, name: &str) -> u32 {
    std::fs::read_dir(heads.join(name))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .unwrap_or(0)
        + 1
}

/// The version in service: `current` if set, else none.
pub fn current_version(heads: &Path, name: &str) -> Option<u32> {
    std::fs::read_to_string(heads.join(name).join("current"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Puts `version` in service (written whole, then renamed: a reader never sees half of it).
pub fn set_current(heads: &Path, name: &str, version: u32) -> Result<(), HeadError> {
    let dir = heads.join(name);
    let io = |path: &Path, source| HeadError::Io {
        name: name.to_string(),
        path: path.to_path_buf(),
        source,
    };
    if !version_dir(heads, name, version)
        .join("head.toml")
        .is_file()
    {
        return Err(HeadError::Invalid {
            name: name.to_string(),
            message: format!("no version {version} (it has {:?})", versions(heads, name)),
        });
    }
    let current = dir.join("current");
    crate::sync::write_atomic(&current, format!("{version}\n").as_bytes())
        .map_err(|e| io(&current, e))
}

/// A version's manifest.
pub fn read_manifest(heads: &Path, name: &str, version: u32) -> Result<HeadManifest, HeadError> {
    let path = version_dir(heads, name, version).join("head.toml");
    let text = std::fs::read_to_string(&path).map_err(|source| HeadError::Io {
        name: name.to_string(),
        path: path.clone(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| HeadError::Invalid {
        name: name.to_string(),
        message: format!("{}: {}", path.display(), e.message()),
    })
}

/// Loads a version.
pub fn load(heads: &Path, name: &str, version: u32) -> Result<Head, HeadError> {
    let manifest = read_manifest(heads, name, version)?;
    let path = version_dir(heads, name, version).join("head.safetensors");
    let bytes = std::fs::read(&path).map_err(|source| HeadError::Io {
        name: name.to_string(),
        path: path.clone(),
        source,
    })?;
    let invalid = |message: String| HeadError::Invalid {
        name: name.to_string(),
        message: format!("{}: {message}", path.display()),
    };
    let tensors =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| invalid(e.to_string()))?;
    let read = |key: &str| -> Result<Vec<f32>, HeadError> {
        let t = tensors
            .tensor(key)
            .map_err(|_| invalid(format!("no tensor {key:?}")))?;
        if t.dtype() != safetensors::Dtype::F32 {
            return Err(invalid(format!("tensor {key:?} is not float32")));
        }
        Ok(t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    };
    Head::new(
        &manifest,
        read("mean")?,
        read("scale")?,
        read("weight")?,
        read("bias")?,
    )
}

/// Loads the version in service.
pub fn load_current(heads: &Path, name: &str) -> Result<Head, HeadError> {
    let version = current_version(heads, name).ok_or_else(|| HeadError::NoVersion {
        name: name.to_string(),
    })?;
    load(heads, name, version)
}

/// Writes a new version's folder (manifest and weights); it is not put in service.
pub fn save(heads: &Path, manifest: &HeadManifest, head: &Head) -> Result<PathBuf, HeadError> {
    let dir = version_dir(heads, &manifest.name, manifest.version);
    let io = |path: &Path, source| HeadError::Io {
        name: manifest.name.clone(),
        path: path.to_path_buf(),
        source,
    };
    let parent = heads.join(&manifest.name);
    std::fs::create_dir_all(&parent).map_err(|e| io(&parent, e))?;
    // Not create_dir_all: a version folder that exists already (another training took the
    // number) is an error, never overwritten.
    std::fs::create_dir(&dir).map_err(|e| io(&dir, e))?;
    let (mean, scale, weight, bias) = head.weights();
    let (k, d) = (head.labels.len(), head.backbone.dim);
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let data = [
        ("mean", bytes(mean), vec![d]),
        ("scale", bytes(scale), vec![d]),
        ("weight", bytes(weight), vec![k, d]),
        ("bias", bytes(bias), vec![k]),
    ];
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(name, b, shape)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                    .expect("shapes match the data");
            (*name, view)
        })
        .collect();
    let path = dir.join("head.safetensors");
    let serialised = safetensors::serialize(views, None).map_err(|e| HeadError::Invalid {
        name: manifest.name.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&path, serialised).map_err(|e| io(&path, e))?;
    let path = dir.join("head.toml");
    let text = toml::to_string(manifest).expect("a manifest serialises");
    std::fs::write(&path, text).map_err(|e| io(&path, e))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(version: u32) -> HeadManifest {
        HeadManifest {
            name: "porch".into(),
            version,
            labels: vec!["package".into(), "nothing".into()],
            backbone: Backbone {
                name: "m".into(),
                version: "1".into(),
                dim: 3,
            },
            created: "2026-11-30T00:00:00Z".into(),
            samples: vec!["a".into(), "b".into()],
            samples_hash: "ab".into(),
            metrics: Metrics::default(),
        }
    }

    fn head(version: u32) -> Head {
        Head::new(
            &manifest(version),
            vec![0.0; 3],
            vec![1.0; 3],
            vec![1.0, 0.0, 0.0, -1.0, 0.0, 0.0],
            vec![0.0, 0.0],
        )
        .unwrap()
    }

    #[test]
    fn a_head_scores_its_labels_from_the_embedding() {
        let h = head(1);
        let mut p = Vec::new();
        h.apply(&[2.0, 5.0, -3.0], &mut p);
        assert_eq!(p.len(), 2);
        assert!(
            p[0] > 0.98 && (p.iter().sum::<f32>() - 1.0).abs() < 1e-6,
            "{p:?}"
        );
        h.apply(&[-2.0, 0.0, 0.0], &mut p);
        assert!(p[1] > 0.98, "{p:?}");
        // An embedding of another length (another backbone) says nothing.
        h.apply(&[1.0; 7], &mut p);
        assert_eq!(p, [0.5, 0.5]);
    }

    #[test]
    fn versions_are_saved_loaded_and_put_in_service() {
        let dir = tempfile::tempdir().unwrap();
        for v in [1, 2] {
            save(dir.path(), &manifest(v), &head(v)).unwrap();
        }
        assert_eq!(versions(dir.path(), "porch"), [1, 2]);
        assert!(matches!(
            load_current(dir.path(), "porch"),
            Err(HeadError::NoVersion { .. })
        ));
        set_current(dir.path(), "porch", 2).unwrap();
        let h = load_current(dir.path(), "porch").unwrap();
        assert_eq!(
            *h.info,
            HeadInfo {
                name: "porch".into(),
                version: 2
            }
        );
        assert_eq!(h.weights().2, head(2).weights().2);
        assert!(set_current(dir.path(), "porch", 9).is_err());
        assert_eq!(current_version(dir.path(), "porch"), Some(2));
    }
}
