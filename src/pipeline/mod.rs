//! The stage graph: wires the stages together, owns the channels and the shutdown.
//!
//! ```text
//! camera queues ─► preprocess workers ─► batcher ─► inference ─► decide ─► sink
//!                  (preprocess.rs)       (batch.rs) (infer.rs)   (decide.rs)
//! ```
//!
//! Each camera is served by one worker (cameras are spread over the workers), so every camera's
//! frames stay in order all the way to the sink. Every arrow is a bounded channel. Shutdown goes
//! from the sources down: closing a camera queue lets each stage finish once its input is closed.
//! A stage that panics is reported and stops the graph, never a silent hang.

pub mod batch;
pub mod decide;
pub mod heads;
pub mod infer;
pub mod preprocess;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};
use serde::Deserialize;
use vigil_engine::model::InputSpec;
use vigil_engine::serving::ModelSlot;

use crate::frame::{Batch, FrameResult, Prepared, ResultBuffers, Scored};
use crate::shutdown::{Exit, Exits, Joinable, Shutdown};
use crate::source::zones::Regions;
use crate::source::{FrameQueue, FullPolicy};
use crate::stats::{CameraStats, GraphStats};
use crate::sync::lock;
use decide::DecideSettings;
use preprocess::WorkerInput;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct PipelineConfig {
    /// Preprocess worker threads.
    pub workers: usize,
    /// Largest batch sent to the model (an upper bound when `tune_batch` measures).
    pub max_batch: usize,
    /// Measure the model's throughput at start for batches up to `max_batch` and use the batch
    /// limit that suits this machine (the smallest within 3% of the best throughput whose batch
    /// time stays inside `batch_budget`).
    pub tune_batch: bool,
    /// Where the measures of `tune_batch` are kept per machine and model, so that later starts
    /// take them instead of measuring (`app/tuning.rs`). None (the default) or an empty path:
    /// measure at every start.
    pub tuning_cache: Option<PathBuf>,
    /// The longest one batch may take when the limit is tuned.
    #[serde(with = "humantime_serde")]
    pub batch_budget: Duration,
    /// How long the batcher waits for a batch to fill after its first frame.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// The share of their time the inference sessions spend running batches from which frames
    /// are batched (off again under half of it); below, each frame goes on alone at once
    /// (0: always batch).
    pub batch_load: f64,
    /// Capacity of each camera's frame queue (live sources drop the oldest frame when full).
    pub camera_queue: usize,
    /// A live camera's frame that waited longer than this, or that the batcher reckons would be
    /// out later than this, is skipped when a newer frame of the same camera is already queued
    /// (bounds the latency when vigil falls behind; 0 = never).
    #[serde(with = "humantime_serde")]
    pub max_frame_age: Duration,
    /// Directory holding the pipeline templates (`<template>.gst`).
    pub templates: PathBuf,
    /// How often a summary of the figures (fps, drops, batch sizes) is logged.
    #[serde(with = "humantime_serde")]
    pub log_interval: Duration,
    /// After this long without a batch, an inference session hands the working memory ONNX
    /// Runtime keeps for its runs back to the system (0: keep it).
    #[serde(with = "humantime_serde")]
    pub release_memory_after: Duration,
    /// Decoders shared by the live cameras with `decode = "keyframes"` (`source/keydec.rs`);
    /// 0: each camera decodes its own key frames. Read at start.
    pub key_frame_decoders: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .min(4),
            max_batch: 8,
            tune_batch: true,
            tuning_cache: None,
            batch_budget: Duration::from_millis(60),
            max_wait: Duration::from_millis(20),
            batch_load: 0.5,
            camera_queue: 4,
            max_frame_age: Duration::from_millis(150),
            templates: "pipelines".into(),
            log_interval: Duration::from_secs(10),
            release_memory_after: Duration::from_secs(2),
            // Half the cores: a burst of key frames (every camera seeing something at once)
            // then leaves the other half to inference instead of starving it.
            key_frame_decoders: std::thread::available_parallelism()
                .map(|n| n.get() / 2)
                .unwrap_or(1)
                .clamp(1, 8),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("the pipeline is stopping: no camera can be added")]
    Closed,
    #[error("a camera named {0:?} is already running")]
    Duplicate(String),
    #[error("thread {thread} panicked ({message}); vigil stops")]
    Panicked { thread: String, message: String },
    #[error("stages did not finish within {0:?} of the stop request: {1}")]
    Timeout(Duration, String),
}

#[derive(Debug, Clone)]
pub struct GraphConfig {
    pub workers: usize,
    pub max_batch: usize,
    pub max_wait: Duration,
    pub camera_queue: usize,
    /// Live frames older than this are skipped when a newer one of their camera is queued
    /// (zero: never).
    pub max_frame_age: Duration,
    /// See [`PipelineConfig::release_memory_after`].
    pub release_memory_after: Duration,
    /// See [`PipelineConfig::batch_load`].
    pub batch_load: f64,
    /// Keep each frame's pixels (a reference, not a copy) until its result is out, for snapshots.
    pub keep_pixels: bool,
}

impl GraphConfig {
    pub fn new(p: &PipelineConfig, keep_pixels: bool) -> GraphConfig {
        GraphConfig {
            workers: p.workers,
            max_batch: p.max_batch,
            max_wait: p.max_wait,
            camera_queue: p.camera_queue,
            max_frame_age: p.max_frame_age,
            release_memory_after: p.release_memory_after,
            batch_load: p.batch_load,
            keep_pixels,
        }
    }
}

impl GraphConfig {
    /// The batcher's settings: batches of up to `max_batch` images of `slot_len` values each,
    /// for `sessions` inference sessions.
    fn batching(&self, max_batch: usize, slot_len: usize, sessions: usize) -> batch::BatchConfig {
        batch::BatchConfig {
            max_batch,
            max_wait: self.max_wait,
            slot_len,
            batch_load: self.batch_load,
            sessions,
        }
    }
}

/// A camera as the graph sees it: a name, what its full queue does, and the regions of its
/// frames that are classified.
pub struct CameraInput {
    pub name: Arc<str>,
    pub policy: FullPolicy,
    /// The source for status messages, credentials removed.
    pub source: String,
    pub regions: Arc<Regions>,
}

/// Why a predict request could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue stayed full until the deadline (the cameras keep the model busy).
    Busy,
    Stopping,
}

/// Gives a result's buffers back to the stages once the sink is done with it.
pub struct Recycler {
    scores: Sender<Vec<f32>>,
    embeddings: Sender<Vec<f32>>,
    buffers: Sender<ResultBuffers>,
}

impl Recycler {
    pub fn recycle(&self, result: FrameResult) {
        let r = result.into_buffers();
        let _ = self.scores.try_send(r.scores);
        // A model without an embedding leaves it empty: nothing worth keeping.
        if r.embedding.capacity() > 0 {
            let _ = self.embeddings.try_send(r.embedding);
        }
        let _ = self.buffers.try_send(r.buffers);
    }
}

/// A running camera's ends, for removing it.
struct CameraSlot {
    queue: Arc<FrameQueue>,
    stop: Shutdown,
    worker: usize,
}

/// Changes a running graph: cameras in and out, decide settings, predict requests.
pub struct GraphControl {
    stats: Arc<GraphStats>,
    stop: Shutdown,
    camera_queue: usize,
    /// New cameras go to a worker through these; None once sealed.
    workers: Mutex<Option<Vec<Sender<WorkerInput>>>>,
    cameras: Mutex<BTreeMap<Arc<str>, CameraSlot>>,
    decide: Sender<DecideSettings>,
    requests: Mutex<Option<Sender<Prepared>>>,
    pub slot: Arc<ModelSlot>,
}

impl GraphControl {
    /// Adds a camera. Returns its queue (for its source) and its own stop signal (fired when the
    /// camera is removed or the graph stops).
    pub fn add_camera(&self, cam: CameraInput) -> Result<(Arc<FrameQueue>, Shutdown), GraphError> {
        let workers = lock(&self.workers);
        let Some(workers) = workers.as_ref() else {
            return Err(GraphError::Closed);
        };
        let mut cameras = lock(&self.cameras);
        if cameras.contains_key(&cam.name) {
            return Err(GraphError::Duplicate(cam.name.to_string()));
        }
        // The worker serving the fewest cameras takes it.
        let mut load = vec![0usize; workers.len()];
        for c in cameras.values() {
            load[c.worker] += 1;
        }
        let worker = (0..workers.len()).min_by_key(|&w| load[w]).unwrap_or(0);
        let (tx, rx) = bounded(self.camera_queue);
        let stop = self.stop.child();
        let cam_stats = Arc::new(CameraStats::new(cam.source));
        let queue = Arc::new(FrameQueue::new(
            cam.name.clone(),
            (tx, rx.clone()),
            cam.policy,
            stop.clone(),
            cam_stats.clone(),
        ));
        let input = WorkerInput {
            frames: rx,
            policy: cam.policy,
            stats: cam_stats.clone(),
            regions: cam.regions,
        };
        if workers[worker].send(input).is_err() {
            return Err(GraphError::Closed);
        }
        self.stats.insert_camera(cam.name.clone(), cam_stats);
        cameras.insert(
            cam.name,
            CameraSlot {
                queue: queue.clone(),
                stop: stop.clone(),
                worker,
            },
        );
        Ok((queue, stop))
    }

    /// Stops a camera: its source ends, its queue closes (what is queued is still classified)
    /// and it leaves the stats. Returns whether it was there.
    pub fn remove_camera(&self, name: &str) -> bool {
        let removed = lock(&self.cameras).remove(name);
        match removed {
            Some(slot) => {
                slot.stop.stop();
                slot.queue.close();
                self.stats.remove_camera(name);
                true
            }
            None => false,
        }
    }

    /// No camera will be added any more: the graph finishes once the current ones end.
    pub fn seal(&self) {
        lock(&self.workers).take();
        lock(&self.requests).take();
    }

    /// New thresholds, groups or watched labels, from the next frame decide takes.
    pub fn set_decide(&self, settings: DecideSettings) {
        let _ = self.decide.send(settings);
    }

    /// Queues a predict request's prepared image behind the cameras' frames, waiting for room
    /// until `deadline`. Err says why it was not queued.
    pub fn submit(&self, p: Prepared, deadline: Instant) -> Result<(), SubmitError> {
        let tx = lock(&self.requests).clone().ok_or(SubmitError::Stopping)?;
        tx.send_deadline(p, deadline).map_err(|e| match e {
            crossbeam_channel::SendTimeoutError::Timeout(_) => SubmitError::Busy,
            crossbeam_channel::SendTimeoutError::Disconnected(_) => SubmitError::Stopping,
        })
    }

    pub fn stats(&self) -> &Arc<GraphStats> {
        &self.stats
    }

    /// The graph is stopping (or stopped).
    pub fn stopping(&self) -> bool {
        self.stop.is_stopped()
    }

    fn stop(&self) {
        // Every camera's own signal is a child of this one.
        self.stop.stop();
        for slot in lock(&self.cameras).values() {
            slot.queue.close();
        }
        self.seal();
    }
}

/// The batch limit (`max_batch`, or what was measured to suit this machine below it), the
/// model's input and its number of inference sessions.
fn model_shape(cfg: &GraphConfig, slot: &ModelSlot) -> (usize, InputSpec, usize) {
    let model = slot.current();
    let max_batch = cfg
        .max_batch
        .min(model.max_batch)
        .min(slot.tuning().chosen)
        .max(1);
    (max_batch, model.spec().clone(), model.sessions())
}

pub struct Graph {
    stages: Vec<(String, Joinable)>,
    /// Where the stages (and the threads the caller supervises with [`Graph::exits`]) report
    /// their end.
    exits: Exits,
    ended: Receiver<Exit>,
    pub stats: Arc<GraphStats>,
    pub control: Arc<GraphControl>,
}

/// The name of the last stage: when it ends, the graph is done.
const SINK: &str = "sink";

impl Graph {
    /// Starts every stage. Cameras enter with [`GraphControl::add_camera`]; results leave through
    /// `sink`, which runs on its own thread with the graph's counters (its own are `sink`). The
    /// graph ends once it is sealed (or stopped) and every camera has ended.
    pub fn start(
        cfg: &GraphConfig,
        slot: Arc<ModelSlot>,
        decide: DecideSettings,
        sink: impl FnOnce(Receiver<FrameResult>, &Arc<GraphStats>, Recycler) + Send + 'static,
    ) -> Graph {
        Self::start_supervising(cfg, slot, decide, Exits::new(), sink)
    }

    /// Like [`Graph::start`], watching also the threads that already report to `supervision`
    /// (started before the graph): a panic in one stops the graph with an error.
    pub fn start_supervising(
        cfg: &GraphConfig,
        slot: Arc<ModelSlot>,
        decide: DecideSettings,
        supervision: (Exits, Receiver<Exit>),
        sink: impl FnOnce(Receiver<FrameResult>, &Arc<GraphStats>, Recycler) + Send + 'static,
    ) -> Graph {
        let (max_batch, spec, sessions) = model_shape(cfg, &slot);
        let (prep_tx, prep_rx) = bounded::<Prepared>(max_batch);
        let (request_tx, request_rx) = bounded::<Prepared>(max_batch * 2);
        let (batch_tx, batch_rx) = bounded(1);
        let (ready_tx, ready_rx) = bounded::<()>(sessions);
        let (scored_tx, scored_rx) = bounded::<(u64, Vec<Scored>)>(2 * sessions);
        let (result_tx, result_rx) = bounded::<FrameResult>(max_batch * 4);
        let (decide_tx, decide_rx) = crossbeam_channel::unbounded::<DecideSettings>();
        // Per-frame tensors go back to the workers, and batch buffers to the batcher, for reuse.
        let (pool_tx, pool_rx) = bounded::<Vec<f32>>(max_batch * 4);
        let (done_tx, done_rx) = bounded::<Batch>(4);
        // Score and embedding vectors and result buffers come back from the sink, and batches'
        // result lists from decide, for reuse: nothing is allocated per frame in steady state.
        let (score_tx, score_pool) = bounded::<Vec<f32>>(max_batch * 8);
        let (embedding_tx, embedding_pool) = bounded::<Vec<f32>>(max_batch * 8);
        let (buffers_tx, buffers_pool) = bounded::<ResultBuffers>(max_batch * 8);
        let (scored_back, scored_pool) = bounded::<Vec<Scored>>(sessions * 4);

        let mut graph = Graph::new(cfg, slot.clone(), decide_tx, request_tx, supervision);
        graph.spawn_workers(cfg, &spec, prep_tx, pool_rx);
        let batcher = batch::Batcher {
            cfg: cfg.batching(max_batch, spec.len(), sessions),
            input: batch::BatchInputs {
                frames: prep_rx,
                requests: request_rx,
            },
            slot: slot.clone(),
            output: batch_tx,
            recycle: pool_tx,
            batches_done: done_rx,
            ready: ready_rx,
            max_age: cfg.max_frame_age,
        };
        graph.spawn_stage("batch".into(), move |s| batcher.run(s));
        graph.spawn_inference(
            sessions,
            infer::InferStage {
                session: 0,
                max_batch,
                batches: batch_rx,
                done: done_tx,
                output: scored_tx,
                score_pool: score_pool.clone(),
                embedding_pool: embedding_pool.clone(),
                scored_pool: scored_pool.clone(),
                ready: ready_tx,
                slot: slot.clone(),
                release_after: cfg.release_memory_after,
            },
        );
        let decider = decide::DecideStage {
            settings: decide,
            input: scored_rx,
            updates: decide_rx,
            output: result_tx,
            buffers_pool,
            scored_back,
        };
        graph.spawn_stage("decide".into(), move |s| decider.run(s));
        let recycler = Recycler {
            scores: score_tx,
            embeddings: embedding_tx,
            buffers: buffers_tx,
        };
        graph.spawn_stage(SINK.into(), move |s| sink(result_rx, s, recycler));
        graph
    }

    /// A graph with no stage running yet, and its control.
    fn new(
        cfg: &GraphConfig,
        slot: Arc<ModelSlot>,
        decide: Sender<DecideSettings>,
        requests: Sender<Prepared>,
        (exits, ended): (Exits, Receiver<Exit>),
    ) -> Graph {
        let stats = Arc::new(GraphStats::default());
        Graph {
            stages: Vec::new(),
            exits,
            ended,
            stats: stats.clone(),
            control: Arc::new(GraphControl {
                stats,
                stop: Shutdown::new(),
                camera_queue: cfg.camera_queue,
                workers: Mutex::new(None),
                cameras: Mutex::new(BTreeMap::new()),
                decide,
                requests: Mutex::new(Some(requests)),
                slot,
            }),
        }
    }

    /// One thread per inference session, each `stage` with its own session number. Batches
    /// are numbered by the batcher and put back in order before decide, so every camera's
    /// frames stay in order with several sessions.
    fn spawn_inference(&mut self, sessions: usize, stage: infer::InferStage) {
        for session in 0..sessions {
            let stage = infer::InferStage {
                session,
                ..stage.clone()
            };
            self.spawn_stage(format!("infer-{session}"), move |s| stage.run(s));
        }
    }

    /// The preprocess workers; cameras reach them through the control.
    fn spawn_workers(
        &mut self,
        cfg: &GraphConfig,
        spec: &InputSpec,
        out: Sender<Prepared>,
        pool: Receiver<Vec<f32>>,
    ) {
        let workers = (0..cfg.workers.max(1))
            .map(|w| {
                let (tx, cameras) = crossbeam_channel::unbounded();
                let worker = preprocess::Worker {
                    cameras,
                    out: out.clone(),
                    pool: pool.clone(),
                    spec: spec.clone(),
                    keep_pixels: cfg.keep_pixels,
                    max_age: cfg.max_frame_age,
                };
                self.spawn_stage(format!("preprocess-{w}"), move |s| {
                    worker.run(&s.preprocess)
                });
                tx
            })
            .collect();
        *lock(&self.control.workers) = Some(workers);
    }

    /// Runs a stage on its own thread with the graph's counters.
    fn spawn_stage(&mut self, name: String, f: impl FnOnce(&Arc<GraphStats>) + Send + 'static) {
        let stats = self.stats.clone();
        self.spawn(name, move || f(&stats));
    }

    fn spawn(&mut self, name: String, f: impl FnOnce() + Send + 'static) {
        let handle = self
            .exits
            .spawn(name.clone(), f)
            .expect("spawning a stage thread");
        self.stages.push((name, handle));
    }

    /// Threads spawned through this are watched like the stages: a panic in one stops the graph
    /// with an error.
    pub fn exits(&self) -> Exits {
        self.exits.clone()
    }

    /// Stops the sources; the stages then drain what is queued and finish.
    pub fn stop(&self) {
        self.control.stop();
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
                recv(self.ended) -> msg => {
                    let Ok(Exit { name, panic }) = msg else { break };
                    if let Some(message) = panic {
                        tracing::error!(thread = %name, panic = %message, "a core thread panicked; stopping vigil");
                        result = Err(GraphError::Panicked { thread: name, message });
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
            h.join();
        }
        result
    }
}
