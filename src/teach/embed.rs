//! The backbone's embeddings of images: each image as a zone covering it would be cropped (so
//! that captured crops and live zones read alike), through the model in batches, cached by
//! content hash.

use std::sync::Arc;

use opencv::core::Mat;
use opencv::prelude::*;
use vigil_engine::serving::LoadedModel;

use crate::frame::Zone;
use crate::pipeline::preprocess::Preprocessor;
use crate::teach::cache::Cache;
use crate::teach::dataset::Sample;

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(
        "model {0} has no embedding output: a head needs one (name it in the manifest's \
         [output_tensor] embedding)"
    )]
    NoEmbedding(String),
    #[error("{path}: cannot be read as an image")]
    Unreadable { path: String },
    #[error("{0}")]
    Failed(String),
}

/// Images per model call.
const BATCH: usize = 16;

pub struct Embedder<'a> {
    model: &'a LoadedModel,
    /// Images per model call: fewer inside `vigil run`, where each call holds a session that
    /// the cameras' frames wait for.
    batch: usize,
    pre: Preprocessor,
    dim: usize,
    /// The whole image, as a zone.
    whole: Arc<Zone>,
}

impl<'a> Embedder<'a> {
    pub fn new(model: &'a LoadedModel) -> Result<Embedder<'a>, EmbedError> {
        let dim = model
            .embedding_dim
            .ok_or_else(|| EmbedError::NoEmbedding(model.version.info.name.clone()))?;
        Ok(Embedder {
            model,
            batch: BATCH,
            pre: Preprocessor::new(model.spec()),
            dim,
            whole: Arc::new(Zone {
                name: "image".into(),
                rect: [0.0, 0.0, 1.0, 1.0],
                polygon: None,
            }),
        })
    }

    /// Images per model call (at least 1).
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// What identifies the embeddings' space: the model, its version and variant.
    pub fn backbone_key(&self) -> String {
        let v = &self.model.version;
        format!("{}-{}-{}", v.info.name, v.info.version, v.variant)
    }

    /// Every sample's embedding, in order: from the cache, else computed (and cached).
    pub fn embed_samples(
        &mut self,
        samples: &[Sample],
        cache: &mut Cache,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let missing: Vec<&Sample> = samples
            .iter()
            .filter(|s| cache.get(&s.hash).is_none())
            .collect();
        for chunk in missing.chunks(self.batch) {
            let images = chunk
                .iter()
                .map(|s| read(&s.path.to_string_lossy()))
                .collect::<Result<Vec<_>, _>>()?;
            for (s, e) in chunk.iter().zip(self.embed_images(&images)?) {
                cache.insert(s.hash.clone(), e);
            }
        }
        samples
            .iter()
            .map(|s| {
                cache.get(&s.hash).cloned().ok_or_else(|| {
                    EmbedError::Failed(format!("no embedding for {}", s.path.display()))
                })
            })
            .collect()
    }

    /// The embeddings of 8-bit BGR images.
    pub fn embed_images(&mut self, images: &[Mat]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let len = self.model.spec().len();
        let mut out = Vec::with_capacity(images.len());
        // The last session: with several, the first ones serve the cameras' batches first.
        let session = self.model.sessions().saturating_sub(1);
        for chunk in images.chunks(self.batch) {
            let mut data = vec![0f32; len * chunk.len()];
            for (image, slot) in chunk.iter().zip(data.chunks_exact_mut(len)) {
                self.pre
                    .image_into(image, Some(&self.whole), slot)
                    .map_err(|e| EmbedError::Failed(e.to_string()))?;
            }
            self.model
                .run_each(session, &data, chunk.len(), |_, _, embedding| {
                    out.push(embedding.to_vec())
                })
                .map_err(|e| EmbedError::Failed(e.to_string()))?;
        }
        Ok(out)
    }
}

/// Reads an image file as 8-bit BGR.
pub fn read(path: &str) -> Result<Mat, EmbedError> {
    crate::images::read(std::path::Path::new(path))
        .ok()
        .filter(|m| !m.empty())
        .ok_or_else(|| EmbedError::Unreadable {
            path: path.to_string(),
        })
}
