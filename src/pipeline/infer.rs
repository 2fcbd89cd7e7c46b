//! The inference stage: runs each batch through the model version the batcher chose for it (ONNX
//! Runtime, on the execution provider the engine picked) and hands every frame's scores on, the
//! batch numbered so that decide can put batches from several sessions back in order.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use vigil_engine::serving::{LoadedModel, ModelSlot};

use crate::frame::{Batch, Scored};
use crate::stats::GraphStats;

/// One inference session's thread.
#[derive(Clone)]
pub struct InferStage {
    /// Which of the model's sessions this thread runs.
    pub session: usize,
    pub max_batch: usize,
    pub batches: Receiver<Batch>,
    /// Batch buffers go back to the batcher.
    pub done: Sender<Batch>,
    /// (batch number, its frames' scores); an empty list when the batch failed.
    pub output: Sender<(u64, Vec<Scored>)>,
    /// Score and embedding vectors given back by the sink, and result lists given back by
    /// decide.
    pub score_pool: Receiver<Vec<f32>>,
    pub embedding_pool: Receiver<Vec<f32>>,
    pub scored_pool: Receiver<Vec<Scored>>,
    /// Tells the batcher this session is free for a batch: once at start, then after each one.
    pub ready: Sender<()>,
    /// The model whose working memory is handed back when no batch came for `release_after`
    /// (zero: never).
    pub slot: Arc<ModelSlot>,
    pub release_after: Duration,
}

impl InferStage {
    pub fn run(self, stats: &GraphStats) {
        let _ = self.ready.try_send(());
        while let Some(mut batch) = self.next_batch() {
            stats
                .infer
                .queue_depth
                .store(self.batches.len() as u64, Ordering::Relaxed);
            let n = batch.metas.len();
            let model = batch.model.take().expect("the batcher sets the model");
            stats.infer.received(n as u64);
            stats.telemetry.batch_size.observe(n as f64);
            let started = Instant::now();
            let mut scored = self
                .scored_pool
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(self.max_batch));
            let result = self.score(&model, &mut batch, &mut scored);
            stats.infer.busy_since(started);
            stats.batch_took(started.elapsed());
            stats
                .telemetry
                .inference_seconds
                .observe(started.elapsed().as_secs_f64());
            let (seq, release) = (batch.seq, batch.release_memory);
            // The batch's buffers go back to the batcher.
            let _ = self.done.try_send(batch);
            if let Err(e) = result {
                stats.infer.dropped(n as u64);
                scored.clear();
                tracing::error!(error = %e, frames = n, "inference failed; batch dropped");
            }
            if release {
                self.release_memory(&model, "frames go one by one again");
            }
            drop(model);
            stats.infer.sent(scored.len() as u64);
            // An empty batch still goes on, so that the order is kept.
            if self.output.send((seq, scored)).is_err() {
                return;
            }
            let _ = self.ready.try_send(());
        }
    }

    /// The next batch; None when the batcher is gone. When none comes for `release_after`,
    /// the memory ONNX Runtime keeps for runs goes back to the system (once per idle spell): a
    /// box whose cameras rarely see anything holds it only while they do.
    fn next_batch(&self) -> Option<Batch> {
        if self.release_after.is_zero() {
            return self.batches.recv().ok();
        }
        match self.batches.recv_timeout(self.release_after) {
            Ok(batch) => return Some(batch),
            Err(RecvTimeoutError::Disconnected) => return None,
            Err(RecvTimeoutError::Timeout) => {}
        }
        self.release_memory(&self.slot.current(), "idle");
        self.batches.recv().ok()
    }

    /// Hands the working memory ONNX Runtime keeps for runs larger than one image back to the
    /// system.
    fn release_memory(&self, model: &LoadedModel, why: &str) {
        let started = Instant::now();
        match model.release_unused_memory(self.session) {
            Ok(()) => tracing::debug!(
                session = self.session,
                took = ?started.elapsed(),
                "{why}: ONNX Runtime's working memory handed back"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "handing back ONNX Runtime's working memory failed")
            }
        }
    }

    /// Runs the batch; each frame's scores and embedding are copied into recycled vectors.
    fn score(
        &self,
        model: &Arc<LoadedModel>,
        batch: &mut Batch,
        scored: &mut Vec<Scored>,
    ) -> Result<(), vigil_engine::infer::InferError> {
        let n = batch.metas.len();
        let mut metas = batch.metas.drain(..).zip(batch.pixels.drain(..));
        model.run_each(self.session, &batch.data, n, |_, chunk, features| {
            let Some((meta, pixels)) = metas.next() else {
                return;
            };
            let mut scores = self.score_pool.try_recv().unwrap_or_default();
            scores.clear();
            scores.extend_from_slice(chunk);
            let mut embedding = if features.is_empty() {
                Vec::new()
            } else {
                self.embedding_pool.try_recv().unwrap_or_default()
            };
            embedding.clear();
            embedding.extend_from_slice(features);
            scored.push(Scored {
                meta,
                scores,
                embedding,
                pixels,
                model: model.version.clone(),
            });
        })
    }
}
