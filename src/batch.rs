//! The batcher: groups prepared frames from all cameras into batches of up to `max_batch`,
//! waiting at most `max_wait` after a batch's first frame.

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::frame::{Batch, Prepared};
use crate::metrics::StageStats;

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub max_batch: usize,
    pub max_wait: Duration,
    /// Values per image.
    pub slot_len: usize,
}

impl Batch {
    /// An empty batch, reusing `data`'s allocation (a batch the inference stage is done with).
    pub fn reuse(mut data: Vec<f32>, max_batch: usize) -> Batch {
        data.clear();
        Batch {
            seq: 0,
            metas: Vec::with_capacity(max_batch),
            data,
        }
    }

    /// Copies a prepared frame into the next slot; returns its tensor buffer for reuse.
    pub fn push(&mut self, p: Prepared) -> Vec<f32> {
        self.data.extend_from_slice(&p.tensor);
        self.metas.push(p.meta);
        p.tensor
    }
}

/// Builds batches until `input` is closed. Per-frame buffers go back to `recycle` for reuse, and
/// batch buffers come back from the inference stage through `batches_done`.
pub fn run(
    cfg: BatchConfig,
    input: Receiver<Prepared>,
    output: Sender<Batch>,
    recycle: Sender<Vec<f32>>,
    batches_done: Receiver<Vec<f32>>,
    stats: &StageStats,
) {
    let mut seq = 0u64;
    loop {
        let Ok(first) = input.recv() else {
            return;
        };
        let started = Instant::now();
        let deadline = started + cfg.max_wait;
        let data = batches_done
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(cfg.max_batch * cfg.slot_len));
        let mut batch = Batch::reuse(data, cfg.max_batch);
        batch.seq = seq;
        seq += 1;
        let add = |p: Prepared, batch: &mut Batch| {
            let _ = recycle.try_send(batch.push(p));
        };
        add(first, &mut batch);
        let mut closed = false;
        while batch.metas.len() < cfg.max_batch {
            match input.recv_deadline(deadline) {
                Ok(p) => add(p, &mut batch),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        stats.received(batch.metas.len() as u64);
        if output.send(batch).is_err() {
            return;
        }
        stats.sent(1);
        if closed {
            return;
        }
    }
}
