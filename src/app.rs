//! The commands: `run`, `classify` and `check-config`, on top of the stages.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::config::{CameraConfig, Config, ConfigError, SourceKind};
use crate::decide::Decider;
use crate::events::EventTracker;
use crate::graph::{CameraInput, Graph, GraphConfig, GraphError, GraphStats};
use crate::infer::{Engine, InferError};
use crate::metrics::State;
use crate::model::{Manifest, ManifestError};
use crate::publish::mqtt::{MqttPublisher, PublisherSetup};
use crate::publish::payload::{FramePayload, ModelInfo};
use crate::source::{self, SourceError, SourceSpec};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Infer(#[from] InferError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("GStreamer cannot start: {0}")]
    Gstreamer(String),
    #[error("{0}")]
    Input(String),
}

/// How long the stages get to drain after a stop request.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

fn init_gstreamer() -> Result<(), AppError> {
    gstreamer::init().map_err(|e| AppError::Gstreamer(e.to_string()))
}

/// Loads `inference.sessions` sessions of the configured model.
pub fn load_engines(config: &Config) -> Result<Vec<Engine>, AppError> {
    (0..config.inference.sessions.max(1))
        .map(|_| load_engine(config))
        .collect()
}

/// Loads the configured model and says which execution provider runs it.
pub fn load_engine(config: &Config) -> Result<Engine, AppError> {
    let manifest = Manifest::load(&config.manifest_path())?;
    let engine = Engine::load(
        &manifest,
        &config.model.variant,
        &config.inference,
        &config.base_dir,
    )?;
    tracing::info!(
        model = %manifest.name,
        version = %manifest.version,
        variant = %engine.variant.name,
        precision = %engine.variant.precision,
        provider = %engine.provider,
        requested = %config.inference.provider,
        "model loaded; execution provider: {}",
        engine.provider
    );
    Ok(engine)
}

fn graph_config(config: &Config) -> GraphConfig {
    GraphConfig {
        workers: config.pipeline.workers,
        max_batch: config.pipeline.max_batch,
        max_wait: config.pipeline.max_wait,
        camera_queue: config.pipeline.camera_queue,
    }
}

fn source_spec(config: &Config, name: &str, cam: &CameraConfig) -> Result<SourceSpec, AppError> {
    let (template, template_path) =
        source::load_template(&config.templates_dir(), &cam.template_name()).map_err(
            |message| SourceError::Pipeline {
                camera: name.into(),
                message,
            },
        )?;
    Ok(SourceSpec {
        name: name.into(),
        camera: cam.clone(),
        template_path,
        template,
        file: cam.path.as_ref().map(|p| config.resolve(p)),
    })
}

/// `vigil run`: every enabled camera to MQTT until `shutdown` fires (or every source has ended).
pub fn run(config: &Config, shutdown: &Receiver<()>) -> Result<(), AppError> {
    init_gstreamer()?;
    let engines = load_engines(config)?;
    let engine = &engines[0];
    let model = ModelInfo::of(&engine.manifest);
    let cameras: Vec<(&String, &CameraConfig)> =
        config.cameras.iter().filter(|(_, c)| c.enabled).collect();
    if cameras.is_empty() {
        return Err(AppError::Input("no enabled camera in the config".into()));
    }
    let specs = cameras
        .iter()
        .map(|(name, cam)| source_spec(config, name, cam))
        .collect::<Result<Vec<_>, _>>()?;
    let watch = crate::decide::watched_labels(config);
    let decider = Decider::with_watch(
        &config.decide,
        &engine.manifest,
        cameras.iter().map(|(n, c)| (n.as_str(), &c.thresholds)),
        &watch,
    );
    let mut mqtt = config.mqtt.clone();
    mqtt.password_file = mqtt.password_file.map(|p| config.resolve(&p));
    if let Some(tls) = &mut mqtt.tls {
        for f in [&mut tls.ca_file, &mut tls.cert_file, &mut tls.key_file] {
            *f = f.as_ref().map(|p| config.resolve(p));
        }
    }
    let mut publisher = MqttPublisher::start(
        &mqtt,
        PublisherSetup {
            model: model.clone(),
            homeassistant: &config.homeassistant,
            cameras: cameras
                .iter()
                .map(|(n, _)| (n.to_string(), watch.clone()))
                .collect(),
            top_interval: config.events.update_interval,
        },
    )
    .map_err(|e| AppError::Input(e.to_string()))?;
    let monitor = publisher.monitor();
    tracing::info!(
        broker = %format!("{}:{}", config.mqtt.host, config.mqtt.port),
        topics = %format!("{}/#", config.mqtt.topic_prefix),
        watched = ?watch,
        "publishing to MQTT"
    );
    let latency = Arc::new(LatencyLog::default());
    let sink_latency = latency.clone();
    // Camera state changes (and the reporter's periodic refresh) come as the camera's name.
    let (notice_tx, notices) = crossbeam_channel::unbounded::<Arc<str>>();
    let camera_stats: Arc<std::sync::OnceLock<Arc<GraphStats>>> = Arc::default();
    let sink_cameras = camera_stats.clone();
    let events_cfg = config.events.clone();
    let publisher_cameras = std::sync::mpsc::channel::<Arc<GraphStats>>();
    let (attach_tx, attach_rx) = publisher_cameras;
    let graph = Graph::start(
        &graph_config(config),
        specs
            .iter()
            .map(|s| CameraInput {
                name: s.name.clone(),
                live: s.camera.is_live(),
                source: s.describe(),
            })
            .collect(),
        engines,
        decider,
        move |results, stats| {
            if let Ok(g) = attach_rx.recv() {
                publisher.attach_cameras(g);
            }
            let mut tracker = EventTracker::new(events_cfg, model);
            let tick = crossbeam_channel::tick(Duration::from_millis(250));
            let mut paused: std::collections::HashSet<Arc<str>> = Default::default();
            loop {
                crossbeam_channel::select! {
                    recv(results) -> r => match r {
                        Ok(r) => {
                            stats.received(1);
                            publisher.publish(&r);
                            for e in tracker.on_frame(&r) {
                                publisher.publish_event(&e);
                            }
                            sink_latency.record(r.meta.arrived.elapsed());
                            stats.sent(1);
                        }
                        Err(_) => break,
                    },
                    recv(notices) -> n => if let Ok(name) = n
                        && let Some(cam) = sink_cameras.get().and_then(|g| g.camera(&name))
                    {
                        let status = cam.status(&name);
                        if matches!(status.state, State::Reconnecting | State::Offline) {
                            for e in tracker.end_camera(&name, "camera offline") {
                                publisher.publish_event(&e);
                            }
                        }
                        publisher.publish_camera(&status);
                    },
                    recv(tick) -> _ => {
                        for e in tracker.on_tick(std::time::SystemTime::now()) {
                            publisher.publish_event(&e);
                        }
                        if let Some(g) = sink_cameras.get() {
                            for (name, cam) in &g.cameras() {
                                if cam.enabled.load(Relaxed) {
                                    paused.remove(name);
                                } else if paused.insert(name.clone()) {
                                    for e in tracker.end_camera(name, "camera disabled") {
                                        publisher.publish_event(&e);
                                    }
                                    publisher.publish_camera(&cam.status(name));
                                }
                            }
                        }
                        publisher.flush();
                    },
                }
            }
            // vigil is stopping: every camera is offline from here on (their threads may not
            // have said so yet).
            if let Some(g) = sink_cameras.get() {
                for (name, cam) in &g.cameras() {
                    if cam.state().state != State::Offline {
                        cam.set_state(State::Offline, 0, None);
                    }
                    publisher.publish_camera(&cam.status(name));
                }
            }
            for e in tracker.end_all() {
                publisher.publish_event(&e);
            }
            publisher.close(Duration::from_secs(5));
        },
    );
    let _ = attach_tx.send(graph.stats.clone());
    let _ = camera_stats.set(graph.stats.clone());
    let stop = graph.stop_flag();
    let mut sources = Vec::new();
    for (spec, queue) in specs.into_iter().zip(graph.queues.iter()) {
        sources.push(source::spawn(
            spec,
            queue.clone(),
            stop.clone(),
            notice_tx.clone(),
        ));
    }
    let reporter = spawn_reporter(
        graph.stats.clone(),
        monitor,
        latency,
        config.pipeline.log_interval,
        stop.clone(),
        notice_tx,
    );
    let result = graph.wait(shutdown, DRAIN_DEADLINE);
    stop.store(true, Relaxed);
    for s in sources {
        let _ = s.join();
    }
    let _ = reporter.join();
    result.map_err(Into::into)
}

/// End-to-end latency (frame arrival → published) of the last interval.
#[derive(Default)]
struct LatencyLog {
    samples: std::sync::Mutex<Vec<Duration>>,
}

impl LatencyLog {
    fn record(&self, d: Duration) {
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() < 100_000 {
            s.push(d);
        }
    }

    /// (p50, p99) since the last call.
    fn take_percentiles(&self) -> Option<(Duration, Duration)> {
        let mut s = std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()));
        if s.is_empty() {
            return None;
        }
        s.sort_unstable();
        let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
        Some((at(0.5), at(0.99)))
    }
}

/// Logs the figures every `interval`: per camera input fps and drops, classified fps, batch
/// size, inference time, latency and MQTT state.
fn spawn_reporter(
    stats: Arc<GraphStats>,
    mqtt: crate::publish::mqtt::MqttMonitor,
    latency: Arc<LatencyLog>,
    interval: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
    notices: crossbeam_channel::Sender<Arc<str>>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("reporter".into())
        .spawn(move || {
            let mut last_cams: Vec<[u64; 4]> =
                stats.cameras().iter().map(|(_, c)| c.snapshot()).collect();
            let mut last_infer = stats.infer.snapshot();
            let mut last_batch = stats.batch.snapshot();
            let mut last_time = Instant::now();
            loop {
                let until = Instant::now() + interval;
                while Instant::now() < until {
                    if stop.load(Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let secs = last_time.elapsed().as_secs_f64();
                last_time = Instant::now();
                for ((name, cam), last) in stats.cameras().iter().zip(last_cams.iter_mut()) {
                    let now = cam.snapshot();
                    let fps = (now[0] - last[0]) as f64 / secs;
                    cam.input_fps_x100.store((fps * 100.0).round() as u64, Relaxed);
                    let _ = notices.send(name.clone());
                    tracing::info!(
                        camera = %name,
                        state = cam.state().state.as_str(),
                        input_fps = format!("{fps:.1}"),
                        skipped_for_rate = now[1] - last[1],
                        dropped_behind = now[2] - last[2],
                        restarts = now[3],
                        "camera figures"
                    );
                    *last = now;
                }
                let infer = stats.infer.snapshot();
                let batch = stats.batch.snapshot();
                let frames = infer.received - last_infer.received;
                let batches = batch.sent - last_batch.sent;
                let busy = infer.busy - last_infer.busy;
                let outbox = mqtt.outbox();
                let (p50, p99) = latency
                    .take_percentiles()
                    .map(|(a, b)| (format!("{a:.1?}"), format!("{b:.1?}")))
                    .unwrap_or_default();
                tracing::info!(
                    classified_fps = format!("{:.1}", frames as f64 / secs),
                    mean_batch = format!("{:.2}", frames as f64 / batches.max(1) as f64),
                    inference_busy = format!("{:.0}%", 100.0 * busy.as_secs_f64() / secs),
                    ms_per_frame = format!("{:.2}", busy.as_secs_f64() * 1000.0 / frames.max(1) as f64),
                    latency_p50 = %p50,
                    latency_p99 = %p99,
                    mqtt_connected = mqtt.connected(),
                    mqtt_queued = outbox.queued_now + outbox.in_flight_now,
                    mqtt_delivered = outbox.delivered.iter().sum::<u64>(),
                    mqtt_dropped = outbox.dropped.iter().sum::<u64>(),
                    mqtt_connection_failures = mqtt.stats().connection_failures.load(Relaxed),
                    mqtt_commands_rejected = mqtt.stats().commands_rejected.load(Relaxed),
                    "pipeline figures"
                );
                last_infer = infer;
                last_batch = batch;
            }
        })
        .expect("spawning the reporter")
}

const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "pgm", "ppm",
];

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// `vigil classify`: one JSON line per frame of each image or video on `out`, through the same
/// stages as the cameras. Returns how many inputs failed.
pub fn classify(
    config: &Config,
    paths: &[PathBuf],
    out: &mut (dyn Write + Send),
) -> Result<usize, AppError> {
    init_gstreamer()?;
    let engines = load_engines(config)?;
    let engine = &engines[0];
    let model = ModelInfo::of(&engine.manifest);
    let decider = Decider::new(&config.decide, &engine.manifest, []);
    let mut failures = 0;
    let mut images = Vec::new();
    let mut videos = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        if !path.is_file() {
            eprintln!("{}: no such file", path.display());
            failures += 1;
            continue;
        }
        // Inputs are named by their path; the index keeps repeated paths apart.
        let name: Arc<str> = if paths[..i].contains(path) {
            format!("{}#{i}", path.display()).into()
        } else {
            path.display().to_string().into()
        };
        if is_image(path) {
            images.push((name, path.clone()));
        } else {
            let cam = CameraConfig {
                source: SourceKind::File,
                path: Some(path.clone()),
                ..Default::default()
            };
            let mut spec = source_spec(config, &name, &cam)?;
            spec.file = Some(path.clone());
            videos.push(spec);
        }
    }
    let mut inputs: Vec<CameraInput> = images
        .iter()
        .map(|(n, _)| CameraInput {
            name: n.clone(),
            live: false,
            source: n.to_string(),
        })
        .collect();
    inputs.extend(videos.iter().map(|s| CameraInput {
        name: s.name.clone(),
        live: false,
        source: s.describe(),
    }));
    if inputs.is_empty() {
        return Ok(failures);
    }
    let (lines_tx, lines_rx) = crossbeam_channel::bounded::<String>(64);
    let graph = Graph::start(
        &graph_config(config),
        inputs,
        engines,
        decider,
        move |results, stats| {
            let mut first: Option<Instant> = None;
            let mut frames = 0u64;
            for r in results {
                stats.received(1);
                first.get_or_insert_with(Instant::now);
                frames += 1;
                let line = serde_json::to_string(&FramePayload::new(&r, &model, None))
                    .expect("payloads serialise");
                if lines_tx.send(line).is_err() {
                    return;
                }
            }
            if let Some(first) = first {
                let secs = first.elapsed().as_secs_f64();
                tracing::info!(
                    frames,
                    seconds = format!("{secs:.2}"),
                    fps = format!("{:.1}", frames.saturating_sub(1) as f64 / secs.max(1e-9)),
                    "classified"
                );
            }
        },
    );
    let stop = graph.stop_flag();
    let stats = graph.stats.clone();
    let mut threads = Vec::new();
    let (image_queues, video_queues) = graph.queues.split_at(images.len());
    for ((name, path), queue) in images.into_iter().zip(image_queues.iter().cloned()) {
        match opencv::imgcodecs::imread(&path, opencv::imgcodecs::IMREAD_COLOR) {
            Ok(m) if !opencv::prelude::MatTraitConst::empty(&m) => {
                let frame = crate::frame::Frame {
                    meta: crate::frame::FrameMeta {
                        camera: name,
                        index: 0,
                        pts: None,
                        wall: std::time::SystemTime::now(),
                        arrived: Instant::now(),
                    },
                    pixels: crate::frame::Pixels::Mat(m),
                };
                threads.push(std::thread::spawn(move || {
                    queue.push(frame);
                    queue.close();
                }));
            }
            _ => {
                eprintln!("{}: cannot decode this image", path.display());
                failures += 1;
                queue.close();
            }
        }
    }
    let video_names: Vec<Arc<str>> = videos.iter().map(|s| s.name.clone()).collect();
    for (spec, queue) in videos.into_iter().zip(video_queues.iter().cloned()) {
        // Nobody listens to state changes here: the receiver is gone, sends are ignored.
        let (ignored, _) = crossbeam_channel::unbounded();
        threads.push(source::spawn(spec, queue, stop.clone(), ignored));
    }
    let (_never_tx, never) = crossbeam_channel::bounded::<()>(0);
    let waiter = std::thread::spawn(move || graph.wait(&never, DRAIN_DEADLINE));
    for line in lines_rx {
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
    for t in threads {
        let _ = t.join();
    }
    waiter
        .join()
        .map_err(|_| AppError::Input("the graph's supervisor panicked".into()))??;
    for name in video_names {
        if stats.camera(&name).is_none_or(|c| c.frames.load(Relaxed) == 0) {
            eprintln!("{name}: no video frame could be decoded (see the log above)");
            failures += 1;
        }
    }
    Ok(failures)
}
