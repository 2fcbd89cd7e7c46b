//! The model manifest (`models/<name>.toml`): what a model expects as input, what it outputs,
//! its labels and its variants (precisions). See README, "Your own model".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("model manifest {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model manifest {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("labels file {path}: {source}")]
    Labels {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model manifest {path}: no variant {name:?} (it has: {available})")]
    NoVariant {
        path: PathBuf,
        name: String,
        available: String,
    },
}

/// A model's name and version, as every result and event names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
}

impl ModelInfo {
    pub fn of(manifest: &Manifest) -> Self {
        ModelInfo {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Nchw,
    Nhwc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColorOrder {
    Rgb,
    Bgr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// Raw scores: vigil applies softmax.
    Logits,
    /// Already probabilities.
    Probabilities,
}

/// How a frame becomes the model's input tensor.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub name: String,
    pub layout: Layout,
    pub color: ColorOrder,
    pub width: u32,
    pub height: u32,
    /// Centre crop: the fraction of the short side kept (a square), before resizing. 1.0 = no crop.
    #[serde(default = "one")]
    pub crop: f32,
    /// Per channel, in the model's colour order, on 0..255 values: `(x - mean) / std`.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

fn one() -> f32 {
    1.0
}

impl InputSpec {
    /// Number of f32 values of one image in the input tensor.
    pub fn len(&self) -> usize {
        3 * self.width as usize * self.height as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tensor shape of a batch of `n` images.
    pub fn shape(&self, n: usize) -> [usize; 4] {
        let (h, w) = (self.height as usize, self.width as usize);
        match self.layout {
            Layout::Nchw => [n, 3, h, w],
            Layout::Nhwc => [n, h, w, 3],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputTensor {
    name: String,
    /// The model's embedding output, if it has one: one feature vector per image.
    #[serde(default)]
    embedding: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariant {
    file: PathBuf,
    precision: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    version: String,
    #[serde(default)]
    description: String,
    labels: PathBuf,
    output: OutputKind,
    input: InputSpec,
    output_tensor: OutputTensor,
    variants: BTreeMap<String, RawVariant>,
}

impl RawManifest {
    /// What the types cannot say: sizes above 0, a crop in (0, 1], no zero std, a variant, and an
    /// embedding output other than the scores'.
    fn check(&self) -> Result<(), String> {
        let i = &self.input;
        if i.width == 0 || i.height == 0 {
            return Err("input.width and input.height must be above 0".into());
        }
        if !(i.crop > 0.0 && i.crop <= 1.0) {
            return Err("input.crop must be in (0, 1]".into());
        }
        if i.std.contains(&0.0) {
            return Err("input.std must not contain 0".into());
        }
        if self.variants.is_empty() {
            return Err("no [variants.<name>] section".into());
        }
        let out = &self.output_tensor;
        if let Some(e) = &out.embedding
            && (e.is_empty() || *e == out.name)
        {
            return Err(format!(
                "output_tensor.embedding {e:?} must name another output than output_tensor.name {:?}",
                out.name
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    pub name: String,
    /// Absolute or relative to the working directory (resolved against the manifest).
    pub file: PathBuf,
    pub precision: String,
}

/// A loaded manifest, with its labels read and its paths resolved.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    pub description: String,
    pub output: OutputKind,
    pub output_name: String,
    /// The output holding each image's embedding (`[batch, D]` float32), if the model has one.
    pub embedding_name: Option<String>,
    pub input: InputSpec,
    pub labels: Vec<String>,
    pub variants: BTreeMap<String, Variant>,
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let invalid = |message: String| ManifestError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: RawManifest =
            toml::from_str(&text).map_err(|e| invalid(e.to_string().trim().replace('\n', " ")))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let labels_path = dir.join(&raw.labels);
        let labels: Vec<String> = std::fs::read_to_string(&labels_path)
            .map_err(|source| ManifestError::Labels {
                path: labels_path.clone(),
                source,
            })?
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        if labels.is_empty() {
            return Err(invalid(format!(
                "labels file {} is empty",
                labels_path.display()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = labels.iter().find(|l| !seen.insert(l.as_str())) {
            return Err(invalid(format!(
                "labels file {}: label {dup:?} appears twice (labels must be unique)",
                labels_path.display()
            )));
        }
        raw.check().map_err(invalid)?;
        let variants = raw
            .variants
            .into_iter()
            .map(|(name, v)| {
                let variant = Variant {
                    name: name.clone(),
                    file: dir.join(v.file),
                    precision: v.precision,
                };
                (name, variant)
            })
            .collect();
        Ok(Manifest {
            path: path.to_path_buf(),
            name: raw.name,
            version: raw.version,
            description: raw.description,
            output: raw.output,
            output_name: raw.output_tensor.name,
            embedding_name: raw.output_tensor.embedding,
            input: raw.input,
            labels,
            variants,
        })
    }

    pub fn variant(&self, name: &str) -> Result<&Variant, ManifestError> {
        self.variants
            .get(name)
            .ok_or_else(|| ManifestError::NoVariant {
                path: self.path.clone(),
                name: name.to_string(),
                available: self.variants.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    pub fn label_index(&self, label: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == label)
    }
}
