//! Embeddings already computed, by image content hash and backbone: retraining on a set that
//! grew by a few images embeds only those. Kept in `<data>/<head>/.cache/<backbone>.safetensors`
//! (the embeddings as one float32 matrix, the hashes in its metadata).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The cache of one head's training set for one backbone.
#[derive(Debug, Default)]
pub struct Cache {
    path: PathBuf,
    dim: usize,
    entries: HashMap<String, Vec<f32>>,
    /// Entries added since it was read.
    added: usize,
}

impl Cache {
    /// The cache at `path` for embeddings of `dim` values; empty when missing or unreadable (it
    /// is only a cache).
    pub fn open(path: &Path, dim: usize) -> Cache {
        let mut cache = Cache {
            path: path.to_path_buf(),
            dim,
            ..Default::default()
        };
        if let Ok(bytes) = std::fs::read(path) {
            cache.entries = read(&bytes, dim).unwrap_or_default();
        }
        cache
    }

    /// The file of the cache of `backbone` (name, version and variant) in a training set.
    pub fn path(dataset: &Path, backbone: &str) -> PathBuf {
        let safe: String = backbone
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || ".-_".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        dataset.join(".cache").join(format!("{safe}.safetensors"))
    }

    pub fn get(&self, hash: &str) -> Option<&Vec<f32>> {
        self.entries.get(hash)
    }

    pub fn insert(&mut self, hash: String, embedding: Vec<f32>) {
        if embedding.len() == self.dim && self.entries.insert(hash, embedding).is_none() {
            self.added += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the cache if anything was added (whole, then renamed).
    pub fn save(&mut self) -> std::io::Result<()> {
        if self.added == 0 {
            return Ok(());
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut hashes: Vec<&String> = self.entries.keys().collect();
        hashes.sort();
        let data: Vec<u8> = hashes
            .iter()
            .flat_map(|h| self.entries[*h].iter().flat_map(|x| x.to_le_bytes()))
            .collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![hashes.len(), self.dim],
            &data,
        )
        .map_err(std::io::Error::other)?;
        let metadata = BTreeMap::from([(
            "hashes".to_string(),
            hashes
                .iter()
                .map(|h| h.as_str())
                .collect::<Vec<_>>()
                .join(","),
        )]);
        let bytes =
            safetensors::serialize([("embeddings", view)], Some(metadata.into_iter().collect()))
                .map_err(std::io::Error::other)?;
        // Two trainings of one head at once (the CLI and the HTTP API) save it side by side.
        crate::sync::write_atomic(&self.path, &bytes)?;
        self.added = 0;
        Ok(())
    }
}

fn read(bytes: &[u8], dim: usize) -> Option<HashMap<String, Vec<f32>>> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).ok()?;
    let hashes: Vec<String> = meta
        .metadata()
        .as_ref()?
        .get("hashes")?
        .split(',')
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .collect();
    let tensors = safetensors::SafeTensors::deserialize(bytes).ok()?;
    let t = tensors.tensor("embeddings").ok()?;
    if t.shape() != [hashes.len(), dim] {
        return None;
    }
    let values: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Some(
        hashes
            .into_iter()
            .zip(values.chunks_exact(dim.max(1)).map(<[f32]>::to_vec))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_survive_a_restart_and_a_wrong_size_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = Cache::path(dir.path(), "efficientnet-lite0 1.1.0/fp32");
        let mut c = Cache::open(&path, 3);
        assert!(c.is_empty());
        c.insert("aa".into(), vec![1.0, 2.0, 3.0]);
        c.insert("bb".into(), vec![4.0, 5.0, 6.0]);
        c.insert("cc".into(), vec![1.0]);
        c.save().unwrap();
        let c = Cache::open(&path, 3);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("bb"), Some(&vec![4.0, 5.0, 6.0]));
        assert!(Cache::open(&path, 4).is_empty());
    }
}
