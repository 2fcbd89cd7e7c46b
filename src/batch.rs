//! The batcher: groups prepared frames from all cameras into batches of up to `max_batch`,
//! waiting at most `max_wait` after a batch's first frame.

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Select, Sender};

use crate::frame::{Batch, Prepared};
use crate::metrics::StageStats;
use crate::serving::ModelSlot;

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
            pixels: Vec::with_capacity(max_batch),
            model: None,
            data,
        }
    }

    /// The batch emptied (frames, pixels and model dropped), its buffers kept for the next one.
    pub fn recycle(mut self) -> Batch {
        self.metas.clear();
        self.pixels.clear();
        self.data.clear();
        self.model = None;
        self.seq = 0;
        self
    }

    /// Copies a prepared frame into the next slot; returns its tensor buffer for reuse.
    pub fn push(&mut self, p: Prepared) -> Vec<f32> {
        self.data.extend_from_slice(&p.tensor);
        self.metas.push(p.meta);
        self.pixels.push(p.pixels);
        p.tensor
    }
}

/// Where a batch's frames come from: the cameras' frames first, predict requests when the
/// cameras leave room.
pub struct BatchInputs {
    pub frames: Receiver<Prepared>,
    pub requests: Receiver<Prepared>,
}

impl BatchInputs {
    /// The next frame, live frames first; None when both inputs are closed (requests alone do
    /// not keep the batcher alive once the cameras are done) or at `deadline`.
    fn next(&self, deadline: Option<Instant>) -> Result<Prepared, Ended> {
        if let Ok(p) = self.frames.try_recv() {
            return Ok(p);
        }
        if let Ok(p) = self.requests.try_recv() {
            return Ok(p);
        }
        let mut sel = Select::new();
        let frames = sel.recv(&self.frames);
        let requests = sel.recv(&self.requests);
        let op = match deadline {
            Some(d) => match sel.select_deadline(d) {
                Ok(op) => op,
                Err(_) => return Err(Ended::Timeout),
            },
            None => sel.select(),
        };
        match op.index() {
            i if i == frames => match op.recv(&self.frames) {
                Ok(p) => Ok(p),
                Err(_) => Err(Ended::Closed),
            },
            i if i == requests => match op.recv(&self.requests) {
                Ok(p) => Ok(p),
                // Requests stop when the service does; the frames decide.
                Err(_) => match deadline {
                    Some(d) => match self.frames.recv_deadline(d) {
                        Ok(p) => Ok(p),
                        Err(RecvTimeoutError::Timeout) => Err(Ended::Timeout),
                        Err(RecvTimeoutError::Disconnected) => Err(Ended::Closed),
                    },
                    None => self.frames.recv().map_err(|_| Ended::Closed),
                },
            },
            _ => unreachable!("two operations"),
        }
    }
}

/// Why no frame came.
enum Ended {
    Timeout,
    Closed,
}

/// Builds batches until the frames input is closed, each for the model current in `slot` when
/// the batch is made. Per-frame buffers go back to `recycle` for reuse, and batch buffers come
/// back from the inference stage through `batches_done`.
pub fn run(
    cfg: BatchConfig,
    input: BatchInputs,
    slot: &ModelSlot,
    output: Sender<Batch>,
    recycle: Sender<Vec<f32>>,
    batches_done: Receiver<Batch>,
    stats: &StageStats,
) {
    let mut seq = 0u64;
    loop {
        let first = match input.next(None) {
            Ok(p) => p,
            _ => return,
        };
        let started = Instant::now();
        let deadline = started + cfg.max_wait;
        let mut batch = batches_done
            .try_recv()
            .map(Batch::recycle)
            .unwrap_or_else(|_| {
                Batch::reuse(
                    Vec::with_capacity(cfg.max_batch * cfg.slot_len),
                    cfg.max_batch,
                )
            });
        batch.seq = seq;
        seq += 1;
        let add = |p: Prepared, batch: &mut Batch| {
            let _ = recycle.try_send(batch.push(p));
        };
        add(first, &mut batch);
        let mut closed = false;
        while batch.metas.len() < cfg.max_batch {
            match input.next(Some(deadline)) {
                Ok(p) => add(p, &mut batch),
                Err(Ended::Timeout) => break,
                Err(Ended::Closed) => {
                    closed = true;
                    break;
                }
            }
        }
        stats.queue_depth.store(
            input.frames.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        stats.received(batch.metas.len() as u64);
        batch.model = Some(slot.current());
        if output.send(batch).is_err() {
            return;
        }
        stats.sent(1);
        if closed {
            return;
        }
    }
}
