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

/// Builds batches until `input` is closed. Per-frame buffers go back to `recycle` for reuse.
pub fn run(
    cfg: BatchConfig,
    input: Receiver<Prepared>,
    output: Sender<Batch>,
    recycle: Sender<Vec<f32>>,
    stats: &StageStats,
) {
    loop {
        let Ok(first) = input.recv() else {
            return;
        };
        let started = Instant::now();
        let deadline = started + cfg.max_wait;
        let mut batch = Batch {
            metas: Vec::with_capacity(cfg.max_batch),
            data: Vec::with_capacity(cfg.max_batch * cfg.slot_len),
            closed: started,
        };
        let add = |p: Prepared, batch: &mut Batch| {
            batch.data.extend_from_slice(&p.tensor);
            batch.metas.push(p.meta);
            let _ = recycle.try_send(p.tensor);
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
        batch.closed = Instant::now();
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
