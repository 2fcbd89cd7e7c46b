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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender, bounded};

use crate::batch::{self, BatchConfig};
use crate::config::DecideConfig;
use crate::decide::{Decider, FrameResult, ResultBuffers};
use crate::frame::{Frame, Prepared, Scored};
use crate::metrics::{CameraStats, StageStats, Telemetry};
use crate::model::InputSpec;
use crate::preprocess::Preprocessor;
use crate::serving::ModelSlot;
use crate::source::FrameQueue;

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("the pipeline is stopping: no camera can be added")]
    Closed,
    #[error("a camera named {0:?} is already running")]
    Duplicate(String),
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
    /// Live frames older than this are skipped when a newer one of their camera is queued
    /// (zero: never).
    pub max_frame_age: Duration,
    /// Keep each frame's pixels (a reference, not a copy) until its result is out, for snapshots.
    pub keep_pixels: bool,
}

/// A camera as the graph sees it: a name and whether it is live (drop-oldest) or not (block).
pub struct CameraInput {
    pub name: Arc<str>,
    pub live: bool,
    /// The source for status messages, credentials removed.
    pub source: String,
}

/// What decide needs besides the model: thresholds, groups and watched labels. Sent again on a
/// reload; the decider is rebuilt for each model version.
#[derive(Debug, Clone)]
pub struct DecideSettings {
    pub decide: DecideConfig,
    /// Each camera's threshold overrides.
    pub cameras: Vec<(String, BTreeMap<String, f32>)>,
    pub watch: Vec<String>,
}

impl DecideSettings {
    pub fn decider(&self, manifest: &crate::model::Manifest) -> Decider {
        Decider::with_watch(
            &self.decide,
            manifest,
            self.cameras.iter().map(|(n, t)| (n.as_str(), t)),
            &self.watch,
        )
    }
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
    buffers: Sender<ResultBuffers>,
}

impl Recycler {
    pub fn recycle(&self, result: FrameResult) {
        let (scores, buffers) = result.into_buffers();
        let _ = self.scores.try_send(scores);
        let _ = self.buffers.try_send(buffers);
    }
}

/// A running camera's ends, for removing it.
struct CameraSlot {
    queue: Arc<FrameQueue>,
    stop: Arc<AtomicBool>,
    worker: usize,
}

/// Changes a running graph: cameras in and out, decide settings, predict requests.
pub struct GraphControl {
    stats: Arc<GraphStats>,
    stop: Arc<AtomicBool>,
    camera_queue: usize,
    /// New cameras go to a worker through these; None once sealed.
    workers: Mutex<Option<Vec<Sender<WorkerInput>>>>,
    cameras: Mutex<BTreeMap<Arc<str>, CameraSlot>>,
    decide: Sender<DecideSettings>,
    requests: Mutex<Option<Sender<Prepared>>>,
    pub slot: Arc<ModelSlot>,
}

impl GraphControl {
    /// Adds a camera. Returns its queue (for its source) and its own stop flag (set when the
    /// camera is removed or the graph stops).
    pub fn add_camera(
        &self,
        cam: CameraInput,
    ) -> Result<(Arc<FrameQueue>, Arc<AtomicBool>), GraphError> {
        let workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        let Some(workers) = workers.as_ref() else {
            return Err(GraphError::Closed);
        };
        let mut cameras = self.cameras.lock().unwrap_or_else(|e| e.into_inner());
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
        let stop = Arc::new(AtomicBool::new(self.stop.load(Ordering::Relaxed)));
        let cam_stats = Arc::new(CameraStats::new(cam.source));
        let queue = Arc::new(FrameQueue::new(
            cam.name.clone(),
            tx,
            &rx,
            cam.live,
            stop.clone(),
            cam_stats.clone(),
        ));
        let input = WorkerInput {
            frames: rx,
            live: cam.live,
            stats: cam_stats.clone(),
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
        let removed = self
            .cameras
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        match removed {
            Some(slot) => {
                slot.stop.store(true, Ordering::Relaxed);
                slot.queue.close();
                self.stats.remove_camera(name);
                true
            }
            None => false,
        }
    }

    /// No camera will be added any more: the graph finishes once the current ones end.
    pub fn seal(&self) {
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// New thresholds, groups or watched labels, from the next frame decide takes.
    pub fn set_decide(&self, settings: DecideSettings) {
        let _ = self.decide.send(settings);
    }

    /// Queues a predict request's prepared image behind the cameras' frames, waiting for room
    /// until `deadline`. Err says why it was not queued.
    pub fn submit(&self, p: Prepared, deadline: Instant) -> Result<(), SubmitError> {
        let tx = self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(SubmitError::Stopping)?;
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
        self.stop.load(Ordering::Relaxed)
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for slot in self
            .cameras
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            slot.stop.store(true, Ordering::Relaxed);
            slot.queue.close();
        }
        self.seal();
    }
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
    stages: Vec<(String, JoinHandle<()>)>,
    exits: Receiver<(String, bool)>,
    exit_tx: Sender<(String, bool)>,
    pub stats: Arc<GraphStats>,
    pub control: Arc<GraphControl>,
}

/// The name of the last stage: when it ends, the graph is done.
const SINK: &str = "sink";

impl Graph {
    /// Starts every stage. Cameras enter with [`GraphControl::add_camera`]; results leave through
    /// `sink`, which runs on its own thread. The graph ends once it is sealed (or stopped) and
    /// every camera has ended.
    pub fn start(
        cfg: &GraphConfig,
        slot: Arc<ModelSlot>,
        decide: DecideSettings,
        sink: impl FnOnce(Receiver<FrameResult>, &StageStats, Recycler) + Send + 'static,
    ) -> Graph {
        let (exit_tx, exits) = crossbeam_channel::unbounded();
        let stats = Arc::new(GraphStats::default());
        let model = slot.current();
        let spec: InputSpec = model.spec().clone();
        let max_batch = cfg.max_batch.min(model.max_batch).max(1);
        let sessions = model.sessions();
        drop(model);

        let workers = cfg.workers.max(1);
        let (prep_tx, prep_rx) = bounded::<Prepared>(max_batch);
        let (request_tx, request_rx) = bounded::<Prepared>(max_batch * 2);
        let (batch_tx, batch_rx) = bounded(1);
        let (scored_tx, scored_rx) = bounded::<(u64, Vec<Scored>)>(2 * sessions);
        let (result_tx, result_rx) = bounded::<FrameResult>(max_batch * 4);
        let (decide_tx, decide_rx) = crossbeam_channel::unbounded::<DecideSettings>();
        // Per-frame tensors go back to the workers, and batch buffers to the batcher, for reuse.
        let (pool_tx, pool_rx) = bounded::<Vec<f32>>(max_batch * 4);
        let (done_tx, done_rx) = bounded::<crate::frame::Batch>(4);
        // Score vectors and result buffers come back from the sink, and batches' result lists
        // from decide, for reuse: nothing is allocated per frame in steady state.
        let (score_tx, score_pool) = bounded::<Vec<f32>>(max_batch * 8);
        let (buffers_tx, buffers_pool) = bounded::<ResultBuffers>(max_batch * 8);
        let (scored_back, scored_pool) = bounded::<Vec<Scored>>(sessions * 4);
        let recycler = Recycler {
            scores: score_tx,
            buffers: buffers_tx,
        };

        let mut worker_tx = Vec::new();
        let mut graph = Graph {
            stages: Vec::new(),
            exits,
            exit_tx,
            stats: stats.clone(),
            control: Arc::new(GraphControl {
                stats: stats.clone(),
                stop: Arc::new(AtomicBool::new(false)),
                camera_queue: cfg.camera_queue,
                workers: Mutex::new(None),
                cameras: Mutex::new(BTreeMap::new()),
                decide: decide_tx,
                requests: Mutex::new(Some(request_tx)),
                slot: slot.clone(),
            }),
        };

        for w in 0..workers {
            let (tx, cameras) = crossbeam_channel::unbounded();
            worker_tx.push(tx);
            let (out, pool, stats, spec) = (
                prep_tx.clone(),
                pool_rx.clone(),
                stats.clone(),
                spec.clone(),
            );
            let (keep, max_age) = (cfg.keep_pixels, cfg.max_frame_age);
            graph.spawn(format!("preprocess-{w}"), move || {
                preprocess_worker(cameras, out, pool, &spec, &stats.preprocess, keep, max_age)
            });
        }
        drop(prep_tx);
        *graph
            .control
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(worker_tx);

        let bcfg = BatchConfig {
            max_batch,
            max_wait: cfg.max_wait,
            slot_len: spec.len(),
        };
        let s = stats.clone();
        let batch_slot = slot.clone();
        graph.spawn("batch".into(), move || {
            let inputs = batch::BatchInputs {
                frames: prep_rx,
                requests: request_rx,
            };
            batch::run(
                bcfg,
                inputs,
                &batch_slot,
                batch_tx,
                pool_tx,
                done_rx,
                &s.batch,
            )
        });

        // One thread per inference session; batches are numbered by the batcher and put back in
        // order before decide, so every camera's frames stay in order with several sessions.
        for i in 0..sessions {
            let (s, batch_rx, done_tx, scored_tx, score_pool, scored_pool) = (
                stats.clone(),
                batch_rx.clone(),
                done_tx.clone(),
                scored_tx.clone(),
                score_pool.clone(),
                scored_pool.clone(),
            );
            graph.spawn(format!("infer-{i}"), move || {
                while let Ok(mut batch) = batch_rx.recv() {
                    s.infer
                        .queue_depth
                        .store(batch_rx.len() as u64, Ordering::Relaxed);
                    let n = batch.metas.len();
                    let model = batch.model.take().expect("the batcher sets the model");
                    s.infer.received(n as u64);
                    s.telemetry.batch_size.observe(n as f64);
                    let started = Instant::now();
                    let mut scored = scored_pool
                        .try_recv()
                        .unwrap_or_else(|_| Vec::with_capacity(max_batch));
                    let mut metas = batch.metas.drain(..).zip(batch.pixels.drain(..));
                    let result = model.run_each(i, &batch.data, n, |_, chunk| {
                        let Some((meta, pixels)) = metas.next() else {
                            return;
                        };
                        let mut scores = score_pool.try_recv().unwrap_or_default();
                        scores.clear();
                        scores.extend_from_slice(chunk);
                        scored.push(Scored {
                            meta,
                            scores,
                            pixels,
                            model: model.version.clone(),
                        });
                    });
                    drop(metas);
                    s.infer.busy_since(started);
                    s.telemetry
                        .inference_seconds
                        .observe(started.elapsed().as_secs_f64());
                    let seq = batch.seq;
                    // The batch's buffers go back to the batcher.
                    let _ = done_tx.try_send(batch);
                    if let Err(e) = result {
                        s.infer.dropped(n as u64);
                        scored.clear();
                        tracing::error!(error = %e, frames = n, "inference failed; batch dropped");
                    }
                    drop(model);
                    s.infer.sent(scored.len() as u64);
                    // An empty batch still goes on, so that the order is kept.
                    if scored_tx.send((seq, scored)).is_err() {
                        return;
                    }
                }
            });
        }
        drop((batch_rx, done_tx, scored_tx));

        let s = stats.clone();
        graph.spawn("decide".into(), move || {
            let mut settings = decide;
            // The decider of the model version last seen (labels can change with a version).
            let mut current: Option<(Arc<crate::serving::ModelVersion>, Decider)> = None;
            let mut next = 0u64;
            let mut waiting = std::collections::BTreeMap::new();
            while let Ok((seq, batch)) = scored_rx.recv() {
                s.decide
                    .queue_depth
                    .store(scored_rx.len() as u64, Ordering::Relaxed);
                waiting.insert(seq, batch);
                while let Some(mut batch) = waiting.remove(&next) {
                    next += 1;
                    for scored in batch.drain(..) {
                        if let Some(new) = decide_rx.try_iter().last() {
                            settings = new;
                            current = None;
                        }
                        if !current
                            .as_ref()
                            .is_some_and(|(m, _)| Arc::ptr_eq(m, &scored.model))
                        {
                            let decider = settings.decider(&scored.model.manifest);
                            current = Some((scored.model.clone(), decider));
                        }
                        let decider = &current.as_ref().expect("set above").1;
                        let request = scored.meta.reply.is_some();
                        let stage = if request { &s.requests } else { &s.decide };
                        stage.received(1);
                        let started = Instant::now();
                        let buffers = buffers_pool.try_recv().unwrap_or_default();
                        let mut result = decider.decide_into(scored, buffers);
                        stage.busy_since(started);
                        if let Some(reply) = result.meta.reply.take() {
                            let _ = reply.send(result);
                            stage.sent(1);
                            continue;
                        }
                        if result_tx.send(result).is_err() {
                            return;
                        }
                        stage.sent(1);
                    }
                    let _ = scored_back.try_send(batch);
                }
            }
        });

        let s = stats.clone();
        graph.spawn(SINK.into(), move || sink(result_rx, &s.sink, recycler));
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

/// A camera as a preprocess worker serves it.
struct WorkerInput {
    frames: Receiver<Frame>,
    live: bool,
    stats: Arc<CameraStats>,
}

/// What changes a worker's set of cameras.
enum Change {
    Add(WorkerInput),
    Ended(usize),
    NoMoreCameras,
}

/// Serves the cameras it is given (through `cameras`) until every one has ended and no more
/// can come.
fn preprocess_worker(
    cameras: Receiver<WorkerInput>,
    out: Sender<Prepared>,
    pool: Receiver<Vec<f32>>,
    spec: &InputSpec,
    stats: &StageStats,
    keep_pixels: bool,
    max_age: Duration,
) {
    let mut pre = Preprocessor::new(spec);
    let mut inputs: Vec<WorkerInput> = Vec::new();
    let mut more = true;
    while more || !inputs.is_empty() {
        let change = {
            let mut select = Select::new();
            for input in &inputs {
                select.recv(&input.frames);
            }
            let control = more.then(|| select.recv(&cameras));
            loop {
                let op = select.select();
                let i = op.index();
                if Some(i) == control {
                    break match op.recv(&cameras) {
                        Ok(rx) => Change::Add(rx),
                        Err(_) => Change::NoMoreCameras,
                    };
                }
                let input = &inputs[i];
                let frame = match op.recv(&input.frames) {
                    Ok(f) => f,
                    Err(_) => break Change::Ended(i),
                };
                let queued = input.frames.len();
                stats.queue_depth.store(queued as u64, Ordering::Relaxed);
                // Behind on a live camera: skip to its newer frame rather than add latency.
                if input.live
                    && queued > 0
                    && !max_age.is_zero()
                    && frame.meta.arrived.elapsed() > max_age
                {
                    input.stats.dropped_queue.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if !prepare(&mut pre, frame, &out, &pool, stats, keep_pixels) {
                    return;
                }
            }
        };
        match change {
            Change::Add(rx) => inputs.push(rx),
            Change::Ended(i) => {
                inputs.remove(i);
            }
            Change::NoMoreCameras => more = false,
        }
    }
}

/// One frame through the preprocessor; false once the output is closed.
fn prepare(
    pre: &mut Preprocessor,
    frame: Frame,
    out: &Sender<Prepared>,
    pool: &Receiver<Vec<f32>>,
    stats: &StageStats,
    keep_pixels: bool,
) -> bool {
    stats.received(1);
    let started = Instant::now();
    let tensor = pool.try_recv().unwrap_or_default();
    let camera = frame.meta.camera.clone();
    let prepared = pre.prepare(frame, tensor, keep_pixels);
    stats.busy_since(started);
    match prepared {
        Ok(p) => {
            if out.send(p).is_err() {
                return false;
            }
            stats.sent(1);
        }
        Err((e, _)) => {
            stats.dropped(1);
            tracing::warn!(camera = %camera, error = %e, "frame dropped: cannot preprocess it");
        }
    }
    true
}
