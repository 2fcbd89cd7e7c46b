//! The batch stage: groups prepared frames from all cameras into batches of up to `max_batch`,
//! waiting at most `max_wait` after a batch's first frame, while the model is busy enough for
//! batches to pay (`batch_load`); below that, each frame goes on alone at once, unless frames
//! are already waiting behind it (a burst), which then go together without waiting for more.
//!
//! A batch is made only when an inference session is free to take it (each session says so on
//! `ready`), from the frames waiting then. When vigil is behind, frames wait in their camera's
//! queue, where a live camera's stale frames are skipped for fresher ones (`max_frame_age`),
//! instead of in batches made ahead. The frames the workers prepared meanwhile wait here, and the
//! same rule applies as they are taken, with the batch's fill and run time counted: a live
//! frame that would be out past `max_frame_age` is skipped when its camera has a newer one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Select, Sender};
use vigil_engine::serving::ModelSlot;

use crate::frame::{Batch, Prepared};
use crate::stats::GraphStats;
use std::sync::atomic::Ordering::Relaxed;

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub max_batch: usize,
    pub max_wait: Duration,
    /// Values per image.
    pub slot_len: usize,
    /// The share of its time the model spends on batches from which batches are made
    /// (`pipeline.batch_load`; 0: always).
    pub batch_load: f64,
    /// Inference sessions running batches side by side.
    pub sessions: usize,
}

/// How often the model's load is weighed.
const LOAD_WINDOW: Duration = Duration::from_secs(1);

/// Whether frames are batched: on while the inference sessions spend at least `threshold` of
/// their time running batches, off again when that falls under half of it (a frame alone runs
/// less efficiently, so the load it shows is higher than the same frames batched would).
/// A frame that waits for others adds `max_wait` to its latency, and a batch of n holds n
/// frames' working memory for good (10-12 MiB each for EfficientNet-Lite0): neither buys
/// anything while the model has time to spare.
#[derive(Debug)]
pub struct Batching {
    threshold: f64,
    sessions: f64,
    since: Instant,
    busy_at: Duration,
    on: bool,
}

impl Batching {
    pub fn new(threshold: f64, sessions: usize, now: Instant) -> Batching {
        Batching {
            threshold,
            sessions: sessions.max(1) as f64,
            since: now,
            busy_at: Duration::ZERO,
            on: threshold <= 0.0,
        }
    }

    pub fn on(&self) -> bool {
        self.on
    }

    /// Weighs the load once a window has passed, from the sessions' total busy time `busy`;
    /// returns the change of mode, if any.
    pub fn update(&mut self, now: Instant, busy: Duration) -> Option<bool> {
        let wall = now.saturating_duration_since(self.since);
        if self.threshold <= 0.0 || wall < LOAD_WINDOW {
            return None;
        }
        let load =
            busy.saturating_sub(self.busy_at).as_secs_f64() / (wall.as_secs_f64() * self.sessions);
        (self.since, self.busy_at) = (now, busy);
        let on = if self.on {
            load >= self.threshold / 2.0
        } else {
            load >= self.threshold
        };
        if on == self.on {
            return None;
        }
        self.on = on;
        tracing::debug!(
            load = format!("{:.0}%", load * 100.0),
            threshold = format!("{:.0}%", self.threshold * 100.0),
            "{}",
            if on {
                "the model is busy: frames are batched"
            } else {
                "the model has time to spare: frames go one by one"
            }
        );
        Some(on)
    }
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
            release_memory: false,
        }
    }

    /// The batch emptied (frames, pixels and model dropped), its buffers kept for the next one.
    pub fn recycle(mut self) -> Batch {
        self.metas.clear();
        self.pixels.clear();
        self.data.clear();
        self.model = None;
        self.seq = 0;
        self.release_memory = false;
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

/// The batch stage's ends.
pub struct Batcher {
    pub cfg: BatchConfig,
    pub input: BatchInputs,
    /// Each batch is made for the model current here when the batch is made.
    pub slot: Arc<ModelSlot>,
    pub output: Sender<Batch>,
    /// Per-frame tensor buffers go back to the preprocess workers.
    pub recycle: Sender<Vec<f32>>,
    /// Batch buffers come back from the inference stage.
    pub batches_done: Receiver<Batch>,
    /// One message each time an inference session is free for a batch.
    pub ready: Receiver<()>,
    /// `pipeline.max_frame_age` (zero: never skip).
    pub max_age: Duration,
}

impl Batcher {
    /// Builds batches until the frames input is closed.
    pub fn run(self, graph: &GraphStats) {
        let stats = &graph.batch;
        let mut seq = 0u64;
        let mut batching = Batching::new(self.cfg.batch_load, self.cfg.sessions, Instant::now());
        // Sessions still to hand back their batches' memory after batching went off.
        let mut to_release = 0usize;
        loop {
            if self.ready.recv().is_err() {
                return;
            }
            let first = match self.next(None, graph) {
                Ok(p) => p,
                _ => return,
            };
            let busy = Duration::from_nanos(graph.infer.busy_ns.load(Relaxed));
            if batching.update(Instant::now(), busy) == Some(false) {
                to_release = self.cfg.sessions;
            }
            graph.batching.store(batching.on(), Relaxed);
            // Not batching, but behind (a burst: every camera's key frame at once): the frames
            // already waiting go together, as none of them waits for more.
            let (limit, deadline) = if batching.on() {
                (self.cfg.max_batch, Instant::now() + self.cfg.max_wait)
            } else if first.meta.arrived.elapsed() >= self.behind_after() {
                (self.cfg.max_batch, Instant::now())
            } else {
                (1, Instant::now())
            };
            let mut batch = self.empty_batch(seq);
            seq += 1;
            if to_release > 0 {
                batch.release_memory = true;
                to_release -= 1;
            }
            self.add(first, &mut batch);
            let mut closed = false;
            while batch.metas.len() < limit {
                match self.next(Some(deadline), graph) {
                    Ok(p) => self.add(p, &mut batch),
                    Err(Ended::Timeout) => break,
                    Err(Ended::Closed) => {
                        closed = true;
                        break;
                    }
                }
            }
            stats.queue_depth.store(
                self.input.frames.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            stats.received(batch.metas.len() as u64);
            batch.model = Some(self.slot.current());
            if self.output.send(batch).is_err() {
                return;
            }
            stats.sent(1);
            if closed {
                return;
            }
        }
    }

    /// The next frame (see [`BatchInputs::next`]), past the live frames that would be out
    /// after `max_age` (the wait for this batch to fill and its time counted) while their camera
    /// has a newer one queued: those are skipped, and counted as dropped behind. Frames wait
    /// here for a free session (the workers prepare ahead), so this is where their age is
    /// decided.
    fn next(&self, deadline: Option<Instant>, graph: &GraphStats) -> Result<Prepared, Ended> {
        loop {
            let p = self.input.next(deadline)?;
            if !p.live
                || self.max_age.is_zero()
                || p.meta.arrived.elapsed() + self.cfg.max_wait + graph.batch_time() <= self.max_age
            {
                return Ok(p);
            }
            let camera = graph.camera(&p.meta.camera);
            let newer = camera
                .as_ref()
                .is_some_and(|c| c.last_queued.load(Relaxed) > p.meta.index + 1);
            if !newer {
                return Ok(p);
            }
            if let Some(c) = camera {
                c.dropped_queue.fetch_add(1, Relaxed);
            }
            let _ = self.recycle.try_send(p.tensor);
        }
    }

    /// How long a frame waited before the batcher took it when vigil counts as behind: a
    /// quarter of `max_frame_age` (40 ms without one).
    fn behind_after(&self) -> Duration {
        if self.max_age.is_zero() {
            Duration::from_millis(40)
        } else {
            self.max_age / 4
        }
    }

    /// A batch numbered `seq`, in the buffers of one the inference stage is done with if any.
    fn empty_batch(&self, seq: u64) -> Batch {
        let mut batch = self
            .batches_done
            .try_recv()
            .map(Batch::recycle)
            .unwrap_or_else(|_| {
                Batch::reuse(
                    Vec::with_capacity(self.cfg.max_batch * self.cfg.slot_len),
                    self.cfg.max_batch,
                )
            });
        batch.seq = seq;
        batch
    }

    /// Copies a frame into the batch and gives its tensor buffer back to the workers.
    fn add(&self, p: Prepared, batch: &mut Batch) {
        let _ = self.recycle.try_send(batch.push(p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn frames_are_batched_while_the_model_is_busy_and_go_alone_when_it_has_time() {
        let t0 = Instant::now();
        let mut b = Batching::new(0.5, 2, t0);
        assert!(!b.on(), "a model not yet busy takes frames one by one");
        // Within a window nothing is decided.
        assert_eq!(b.update(t0 + 500 * MS, 2000 * MS), None);
        // Two sessions busy 1.2 s of 2 s in 1 s: 60%, batching on.
        assert_eq!(b.update(t0 + 1000 * MS, 1200 * MS), Some(true));
        assert!(b.on());
        // 30% in the next second: above half the threshold, it stays on.
        assert_eq!(b.update(t0 + 2000 * MS, 1800 * MS), None);
        assert!(b.on());
        // 20%: off.
        assert_eq!(b.update(t0 + 3000 * MS, 2200 * MS), Some(false));
        // 40% does not turn it back on; 50% does.
        assert_eq!(b.update(t0 + 4000 * MS, 3000 * MS), None);
        assert_eq!(b.update(t0 + 5000 * MS, 4000 * MS), Some(true));
        // A long quiet spell is weighed as one window.
        assert_eq!(b.update(t0 + 65_000 * MS, 4100 * MS), Some(false));
    }

    #[test]
    fn a_zero_threshold_always_batches() {
        let t0 = Instant::now();
        let mut b = Batching::new(0.0, 1, t0);
        assert!(b.on());
        assert_eq!(b.update(t0 + 10_000 * MS, Duration::ZERO), None);
        assert!(b.on());
    }
}
