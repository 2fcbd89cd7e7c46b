//! A head's training set on disk: `<data>/<head>/<label>/*.jpg` (the layout Keras'
//! `image_dataset_from_directory` reads), folders starting with `_` (the inbox) or `.` left out.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The image files a training set may hold.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "webp"];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DatasetError {
    #[error("{}: no such folder (make <data>/<head>/<label>/ with images in it)", .0.display())]
    Missing(PathBuf),
    #[error(
        "{dir}: {found} label folder(s); a head needs at least 2 (e.g. `package` and `nothing`)"
    )]
    TooFewLabels { dir: String, found: usize },
    #[error("label {label:?} has {found} image(s); at least {needed} each are needed ({dir})")]
    TooFewImages {
        label: String,
        found: usize,
        needed: usize,
        dir: String,
    },
    #[error("{}: cannot read it: {message}", path.display())]
    Unreadable { path: PathBuf, message: String },
}

/// One image of the training set.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub path: PathBuf,
    /// Index into [`Dataset::labels`].
    pub label: usize,
    /// SHA-256 of the file's bytes, hex: the embedding cache's key.
    pub hash: String,
}

/// A head's training set.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub dir: PathBuf,
    /// The label folders' names, sorted.
    pub labels: Vec<String>,
    pub samples: Vec<Sample>,
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn hidden(name: &str) -> bool {
    name.starts_with('_') || name.starts_with('.')
}

impl Dataset {
    /// Reads the training set of head `head` in `data`, refusing one a head cannot be trained on
    /// (fewer than two labels, a label with fewer than `min_per_label` images, an unreadable
    /// file), naming the reason.
    pub fn read(data: &Path, head: &str, min_per_label: usize) -> Result<Dataset, DatasetError> {
        let dir = data.join(head);
        let entries = std::fs::read_dir(&dir).map_err(|_| DatasetError::Missing(dir.clone()))?;
        let mut labels: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| !hidden(n))
            .collect();
        labels.sort();
        if labels.len() < 2 {
            return Err(DatasetError::TooFewLabels {
                dir: dir.display().to_string(),
                found: labels.len(),
            });
        }
        let mut samples = Vec::new();
        for (i, label) in labels.iter().enumerate() {
            let found = Self::label_samples(&dir.join(label), i)?;
            if found.len() < min_per_label {
                return Err(DatasetError::TooFewImages {
                    label: label.clone(),
                    found: found.len(),
                    needed: min_per_label,
                    dir: dir.join(label).display().to_string(),
                });
            }
            samples.extend(found);
        }
        Ok(Dataset {
            dir,
            labels,
            samples,
        })
    }

    /// The images of one label folder, sorted by name, with their hashes.
    fn label_samples(dir: &Path, label: usize) -> Result<Vec<Sample>, DatasetError> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| DatasetError::Unreadable {
                path: dir.to_path_buf(),
                message: e.to_string(),
            })?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && is_image(p))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !hidden(n))
            })
            .collect();
        paths.sort();
        paths
            .into_iter()
            .map(|path| {
                let bytes = std::fs::read(&path).map_err(|e| DatasetError::Unreadable {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                Ok(Sample {
                    hash: hex(&Sha256::digest(&bytes)),
                    path,
                    label,
                })
            })
            .collect()
    }

    /// The training set's identity: the hash of its (label, image hash) pairs, sorted.
    pub fn hash(&self) -> String {
        let mut pairs: Vec<String> = self
            .samples
            .iter()
            .map(|s| format!("{}/{}", self.labels[s.label], s.hash))
            .collect();
        pairs.sort();
        hex(&Sha256::digest(pairs.join("\n").as_bytes()))
    }

    /// How many images each label has, in the order of the labels.
    pub fn counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.labels.len()];
        for s in &self.samples {
            counts[s.label] += 1;
        }
        counts
    }
}

/// Bytes as lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, files: &[(&str, &[u8])]) {
        for (name, bytes) in files {
            let p = dir.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        }
    }

    #[test]
    fn labels_are_the_folders_and_the_inbox_is_left_out() {
        let tmp = tempfile::tempdir().unwrap();
        write(
            tmp.path(),
            &[
                ("porch/package/a.jpg", b"1"),
                ("porch/package/b.png", b"2"),
                ("porch/nothing/c.jpg", b"3"),
                ("porch/nothing/d.jpg", b"4"),
                ("porch/nothing/notes.txt", b"x"),
                ("porch/_inbox/e.jpg", b"5"),
            ],
        );
        let d = Dataset::read(tmp.path(), "porch", 2).unwrap();
        assert_eq!(d.labels, ["nothing", "package"]);
        assert_eq!(d.counts(), [2, 2]);
        let before = d.hash();
        write(tmp.path(), &[("porch/nothing/d.jpg", b"changed")]);
        assert_ne!(
            Dataset::read(tmp.path(), "porch", 2).unwrap().hash(),
            before
        );
    }

    #[test]
    fn a_set_a_head_cannot_learn_from_is_refused_saying_why() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(
            Dataset::read(tmp.path(), "porch", 5),
            Err(DatasetError::Missing(_))
        ));
        write(tmp.path(), &[("porch/package/a.jpg", b"1")]);
        assert!(matches!(
            Dataset::read(tmp.path(), "porch", 1),
            Err(DatasetError::TooFewLabels { found: 1, .. })
        ));
        write(
            tmp.path(),
            &[("porch/nothing/b.jpg", b"2"), ("porch/nothing/c.jpg", b"3")],
        );
        let e = Dataset::read(tmp.path(), "porch", 2).unwrap_err();
        assert_eq!(
            e.to_string().split(" (").next().unwrap(),
            "label \"package\" has 1 image(s); at least 2 each are needed"
        );
    }
}
