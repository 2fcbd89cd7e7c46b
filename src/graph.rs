//! Wires the stages together, owns the channels and the shutdown.
//!
//! ```text
//! camera queues ─► preprocess workers ─► batcher ─► inference ─► decide ─► sink
//! ```
//!
//! Each camera is served by one worker (cameras are spread over the workers), so every camera's
//! frames stay in order all the way to the sink. Every arrow is a bounded channel. Shutdown goes
//! from the sources down: closing a camera queue lets each stage finish once its input is closed.
//! A stage that panics is reported and stops the graph, never a silent hang.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender, bounded};

use crate::batch::{self, BatchConfig};
use crate::decide::{Decider, FrameResult};
use crate::frame::{Frame, Prepared, Scored};
use crate::infer::Engine;
use crate::metrics::{CameraStats, StageStats, Telemetry};
use crate::model::InputSpec;
use crate::preprocess::Preprocessor;
use crate::source::FrameQueue;

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("stage {0} panicked; stopping")]
    Panicked(String),
    #[error("stages did not finish within {0:?} of the stop request: {1}")]
    Timeout(Duration, String),
}

#[derive(Debug, Clone)]
pub struct GraphConfig {
    pub workers: usize,
    pub max_batch: usize,
    pub max_wait: Duration,
    pub camera_queue: usize,
}

/// A camera as the graph sees it: a name and whether it is live (drop-oldest) or not (block).
pub struct CameraInput {
    pub name: Arc<str>,
    pub live: bool,
    /// The source for status messages, credentials removed.
    pub source: String,
}

/// Counters of every stage and camera.
#[derive(Default)]
pub struct GraphStats {
    /// The running cameras (a reload adds and removes some).
    cameras: RwLock<BTreeMap<Arc<str>, Arc<CameraStats>>>,
    pub preprocess: StageStats,
    pub batch: StageStats,
    pub infer: StageStats,
    pub decide: StageStats,
    pub sink: StageStats,
    /// Predict requests that went through the batcher (not counted in the stages above' camera
    /// figures, but in their received/sent counts).
    pub requests: StageStats,
    pub telemetry: Telemetry,
}

impl GraphStats {
    /// The running cameras, by name.
    pub fn cameras(&self) -> Vec<(Arc<str>, Arc<CameraStats>)> {
        self.cameras
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect()
    }

    pub fn camera(&self, name: &str) -> Option<Arc<CameraStats>> {
        self.cameras
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    pub(crate) fn insert_camera(&self, name: Arc<str>, stats: Arc<CameraStats>) {
        self.cameras
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, stats);
    }

    pub(crate) fn remove_camera(&self, name: &str) -> Option<Arc<CameraStats>> {
        self.cameras
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }
}

/// Reports a stage's end, also when it ends by panicking.
struct ExitGuard {
    name: String,
    tx: Sender<(String, bool)>,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let _ = self.tx.send((self.name.clone(), std::thread::panicking()));
    }
}

pub struct Graph {
    stop: Arc<AtomicBool>,
    stages: Vec<(String, JoinHandle<()>)>,
    exits: Receiver<(String, bool)>,
    exit_tx: Sender<(String, bool)>,
    pub stats: Arc<GraphStats>,
    pub queues: Vec<Arc<FrameQueue>>,
}

/// The name of the last stage: when it ends, the graph is done.
const SINK: &str = "sink";

impl Graph {
    /// Starts every stage. Frames enter through [`Graph::queues`] (one per camera, in the order
    /// given); results leave through `sink`, which runs on its own thread.
    pub fn start(
        cfg: &GraphConfig,
        cameras: Vec<CameraInput>,
        engines: Vec<Engine>,
        decider: Decider,
        sink: impl FnOnce(Receiver<FrameResult>, &StageStats) + Send + 'static,
    ) -> Graph {
        let stop = Arc::new(AtomicBool::new(false));
        let (exit_tx, exits) = crossbeam_channel::unbounded();
        let mut stats = GraphStats::default();
        let engine = engines.first().expect("at least one inference session");
        let spec: InputSpec = engine.manifest.input.clone();
        let max_batch = cfg.max_batch.min(engine.max_batch).max(1);
        if max_batch < cfg.max_batch {
            tracing::warn!(
                configured = cfg.max_batch,
                model = engine.max_batch,
                "the model has a fixed batch size; pipeline.max_batch lowered to it"
            );
        }

        let mut queues = Vec::new();
        let workers = cfg.workers.clamp(1, cameras.len().max(1));
        let mut worker_inputs: Vec<Vec<Receiver<Frame>>> = vec![Vec::new(); workers];
        for (i, cam) in cameras.into_iter().enumerate() {
            let (tx, rx) = bounded(cfg.camera_queue);
            let cam_stats = Arc::new(CameraStats::new(cam.source));
            stats.insert_camera(cam.name.clone(), cam_stats.clone());
            queues.push(Arc::new(FrameQueue::new(
                cam.name,
                tx,
                &rx,
                cam.live,
                stop.clone(),
                cam_stats,
            )));
            worker_inputs[i % workers].push(rx);
        }
        let stats = Arc::new(stats);

        let (prep_tx, prep_rx) = bounded::<Prepared>(max_batch * 2);
        let (batch_tx, batch_rx) = bounded(1);
        let (scored_tx, scored_rx) = bounded::<(u64, Vec<Scored>)>(2 * engines.len());
        let (result_tx, result_rx) = bounded::<FrameResult>(max_batch * 4);
        // Per-frame tensors go back to the workers, and batch buffers to the batcher, for reuse.
        let (pool_tx, pool_rx) = bounded::<Vec<f32>>(max_batch * 4);
        let (done_tx, done_rx) = bounded::<Vec<f32>>(4);

        let mut graph = Graph {
            stop,
            stages: Vec::new(),
            exits,
            exit_tx,
            stats: stats.clone(),
            queues,
        };

        for (w, inputs) in worker_inputs.into_iter().enumerate() {
            let (out, pool, stats, spec) = (
                prep_tx.clone(),
                pool_rx.clone(),
                stats.clone(),
                spec.clone(),
            );
            graph.spawn(format!("preprocess-{w}"), move || {
                preprocess_worker(inputs, out, pool, &spec, &stats.preprocess)
            });
        }
        drop(prep_tx);

        let bcfg = BatchConfig {
            max_batch,
            max_wait: cfg.max_wait,
            slot_len: spec.len(),
        };
        let s = stats.clone();
        graph.spawn("batch".into(), move || {
            batch::run(bcfg, prep_rx, batch_tx, pool_tx, done_rx, &s.batch)
        });

        // One thread per inference session; batches are numbered by the batcher and put back in
        // order before decide, so every camera's frames stay in order with several sessions.
        for (i, mut engine) in engines.into_iter().enumerate() {
            let (s, batch_rx, done_tx, scored_tx) = (
                stats.clone(),
                batch_rx.clone(),
                done_tx.clone(),
                scored_tx.clone(),
            );
            graph.spawn(format!("infer-{i}"), move || {
                let classes = engine.num_classes;
                for batch in batch_rx {
                    let n = batch.metas.len();
                    s.infer.received(n as u64);
                    let started = Instant::now();
                    let result = engine.run(&batch.data, n);
                    s.infer.busy_since(started);
                    let _ = done_tx.try_send(batch.data);
                    let scored = match result {
                        Ok(scores) => batch
                            .metas
                            .into_iter()
                            .zip(scores.chunks(classes))
                            .map(|(meta, chunk)| Scored {
                                meta,
                                scores: chunk.to_vec(),
                            })
                            .collect(),
                        Err(e) => {
                            s.infer.dropped(n as u64);
                            tracing::error!(error = %e, frames = n, "inference failed; batch dropped");
                            Vec::new()
                        }
                    };
                    s.infer.sent(scored.len() as u64);
                    // An empty batch still goes on, so that the order is kept.
                    if scored_tx.send((batch.seq, scored)).is_err() {
                        return;
                    }
                }
            });
        }
        drop((batch_rx, done_tx, scored_tx));

        let s = stats.clone();
        graph.spawn("decide".into(), move || {
            let mut next = 0u64;
            let mut waiting = std::collections::BTreeMap::new();
            for (seq, batch) in scored_rx {
                waiting.insert(seq, batch);
                while let Some(batch) = waiting.remove(&next) {
                    next += 1;
                    for scored in batch {
                        s.decide.received(1);
                        let started = Instant::now();
                        let result = decider.decide(scored);
                        s.decide.busy_since(started);
                        if result_tx.send(result).is_err() {
                            return;
                        }
                        s.decide.sent(1);
                    }
                }
            }
        });

        let s = stats.clone();
        graph.spawn(SINK.into(), move || sink(result_rx, &s.sink));
        graph
    }

    fn spawn(&mut self, name: String, f: impl FnOnce() + Send + 'static) {
        let guard = ExitGuard {
            name: name.clone(),
            tx: self.exit_tx.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let _guard = guard;
                f()
            })
            .expect("spawning a stage thread");
        self.stages.push((name, handle));
    }

    /// The flag sources watch: set when the graph stops.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Stops the sources; the stages then drain what is queued and finish.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for q in &self.queues {
            q.close();
        }
    }

    /// Waits until every input is closed and drained (Ok), a stage panics (Err), or `shutdown`
    /// fires; then stops the sources and waits at most `deadline` for the stages to drain.
    pub fn wait(mut self, shutdown: &Receiver<()>, deadline: Duration) -> Result<(), GraphError> {
        let mut stopping_since: Option<Instant> = None;
        let mut result = Ok(());
        let mut shutdown = shutdown.clone();
        loop {
            let timeout = match stopping_since {
                Some(t) => match deadline.checked_sub(t.elapsed()) {
                    Some(left) => left,
                    None => {
                        let left: Vec<_> = self
                            .stages
                            .iter()
                            .filter(|(_, h)| !h.is_finished())
                            .map(|(n, _)| n.clone())
                            .collect();
                        return Err(GraphError::Timeout(deadline, left.join(", ")));
                    }
                },
                None => Duration::from_secs(3600),
            };
            crossbeam_channel::select! {
                recv(self.exits) -> msg => {
                    let Ok((name, panicked)) = msg else { break };
                    if panicked {
                        tracing::error!(stage = %name, "stage panicked; stopping vigil");
                        result = Err(GraphError::Panicked(name));
                        self.stop();
                        // Stages downstream of a dead one end as their inputs close; those
                        // upstream end when their output closes.
                        stopping_since.get_or_insert_with(Instant::now);
                    } else if name == SINK {
                        break;
                    }
                }
                recv(shutdown) -> msg => {
                    if msg.is_err() {
                        // Nobody can ask for a stop any more: wait for the inputs to end.
                        shutdown = crossbeam_channel::never();
                    } else if stopping_since.is_none() {
                        tracing::info!("stopping: closing the sources, draining the stages");
                        self.stop();
                        stopping_since = Some(Instant::now());
                    }
                }
                default(timeout) => {}
            }
        }
        self.stop();
        for (_, h) in self.stages.drain(..) {
            let _ = h.join();
        }
        result
    }
}

fn preprocess_worker(
    inputs: Vec<Receiver<Frame>>,
    out: Sender<Prepared>,
    pool: Receiver<Vec<f32>>,
    spec: &InputSpec,
    stats: &StageStats,
) {
    let mut pre = Preprocessor::new(spec);
    let mut select = Select::new();
    for rx in &inputs {
        select.recv(rx);
    }
    let mut open = inputs.len();
    while open > 0 {
        let op = select.select();
        let i = op.index();
        let frame = match op.recv(&inputs[i]) {
            Ok(f) => f,
            Err(_) => {
                select.remove(i);
                open -= 1;
                continue;
            }
        };
        stats.received(1);
        let started = Instant::now();
        let tensor = pool.try_recv().unwrap_or_default();
        let camera = frame.meta.camera.clone();
        let prepared = pre.prepare(frame, tensor);
        stats.busy_since(started);
        match prepared {
            Ok(p) => {
                if out.send(p).is_err() {
                    return;
                }
                stats.sent(1);
            }
            Err((e, _)) => {
                stats.dropped(1);
                tracing::warn!(camera = %camera, error = %e, "frame dropped: cannot preprocess it");
            }
        }
    }
}
