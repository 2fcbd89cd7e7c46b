//! The commands: `run`, `classify` and `check-config`, on top of the stages.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::api::Api;
use crate::config::{CameraConfig, Config, ConfigError, SourceKind};
use crate::events::EventTracker;
use crate::graph::{CameraInput, DecideSettings, Graph, GraphConfig, GraphError, GraphStats};
use crate::http::{HttpServer, HttpSetup};
use crate::metrics::State;
use crate::prometheus::{Exporter, MetricsSources, ModelGauge};
use crate::publish::mqtt::{MqttPublisher, PublisherSetup};
use crate::publish::payload::{FramePayload, ModelInfo};
use crate::service::{EventLog, Service, SinkCommand, SinkShared};
use crate::serving::{LoadedModel, ModelError, ModelSlot};
use crate::snapshots::SnapshotStore;
use crate::source::{self, SourceError, SourceSpec};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("GStreamer cannot start: {0}")]
    Gstreamer(String),
    #[error("{0}")]
    Input(String),
}

/// How long a camera that went down waits for its last frames before its events end anyway.
const DOWN_GRACE: Duration = Duration::from_secs(5);

/// How long the stages get to drain after a stop request.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

fn init_gstreamer() -> Result<(), AppError> {
    gstreamer::init().map_err(|e| AppError::Gstreamer(e.to_string()))
}

/// Loads the configured model (every session) and says which execution provider runs it.
pub fn load_model(config: &Config) -> Result<LoadedModel, AppError> {
    Ok(LoadedModel::load(config)?)
}

fn graph_config(config: &Config, keep_pixels: bool) -> GraphConfig {
    GraphConfig {
        workers: config.pipeline.workers,
        max_batch: config.pipeline.max_batch,
        max_wait: config.pipeline.max_wait,
        camera_queue: config.pipeline.camera_queue,
        max_frame_age: config.pipeline.max_frame_age,
        keep_pixels,
    }
}

/// The graph's batch size for a model.
fn batch_size(config: &Config, model: &LoadedModel) -> usize {
    let max_batch = config.pipeline.max_batch.min(model.max_batch).max(1);
    if max_batch < config.pipeline.max_batch {
        tracing::warn!(
            configured = config.pipeline.max_batch,
            model = model.max_batch,
            "the model has a fixed batch size; pipeline.max_batch lowered to it"
        );
    }
    max_batch
}

fn decide_settings(config: &Config, cameras: &[(&String, &CameraConfig)]) -> DecideSettings {
    DecideSettings {
        decide: config.decide.clone(),
        cameras: cameras
            .iter()
            .map(|(n, c)| (n.to_string(), c.thresholds.clone()))
            .collect(),
        watch: crate::decide::watched_labels(config),
    }
}

pub(crate) fn source_spec(
    config: &Config,
    name: &str,
    cam: &CameraConfig,
) -> Result<SourceSpec, AppError> {
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

/// How `vigil run` is driven from outside: the config file (for reloads) and the signals.
pub struct RunControl {
    pub config_path: PathBuf,
    /// A message (or the channel closing) stops vigil.
    pub shutdown: Receiver<()>,
    /// A message re-reads the config file (SIGHUP).
    pub reload: Receiver<()>,
}

/// `vigil run`: every enabled camera to MQTT until `shutdown` fires (or every source has ended).
pub fn run(config: Config, control: RunControl) -> Result<(), AppError> {
    init_gstreamer()?;
    let model = load_model(&config)?;
    let cameras: Vec<(&String, &CameraConfig)> =
        config.cameras.iter().filter(|(_, c)| c.enabled).collect();
    if cameras.is_empty() {
        return Err(AppError::Input("no enabled camera in the config".into()));
    }
    let specs = cameras
        .iter()
        .map(|(name, cam)| source_spec(&config, name, cam))
        .collect::<Result<Vec<_>, _>>()?;
    let watch = crate::decide::watched_labels(&config);
    let model_info = ModelInfo::of(&model.version.manifest);
    let snapshots = if config.snapshots.enabled {
        let s = &config.snapshots;
        let dir = config.resolve(&s.dir);
        Some(
            SnapshotStore::open(&dir, s.keep, s.max_age, s.quality)
                .map_err(|e| AppError::Input(format!("snapshots.dir: {e}")))?,
        )
    } else {
        None
    };
    let http_token = if config.http.enabled {
        let mut h = config.http.clone();
        h.token_file = h.token_file.map(|p| config.resolve(&p));
        h.resolved_token().map_err(AppError::Input)?
    } else {
        None
    };
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
            model: model_info,
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
    let batch = batch_size(&config, &model);
    let slot = Arc::new(ModelSlot::new(model, batch));
    let shared = Arc::new(SinkShared {
        latest: Default::default(),
        events: std::sync::Mutex::new(EventLog::new(config.http.events_kept)),
        snapshots,
        url_base: config
            .http
            .public_url
            .clone()
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_string(),
    });
    let keep_pixels = shared.snapshots.is_some() || config.http.enabled;
    let latency = Arc::new(LatencyLog::default());
    let sink_latency = latency.clone();
    // Camera state changes (and the reporter's periodic refresh) come as the camera's name.
    let (notice_tx, notices) = crossbeam_channel::unbounded::<Arc<str>>();
    let (command_tx, commands) = crossbeam_channel::unbounded::<SinkCommand>();
    let graph_stats: Arc<std::sync::OnceLock<Arc<GraphStats>>> = Arc::default();
    let sink_stats = graph_stats.clone();
    let sink_shared = shared.clone();
    let events_cfg = config.events.clone();
    let (attach_tx, attach_rx) = std::sync::mpsc::channel::<Arc<GraphStats>>();
    let graph = Graph::start(
        &graph_config(&config, keep_pixels),
        slot.clone(),
        decide_settings(&config, &cameras),
        move |results, stats, recycler| {
            let Ok(g) = attach_rx.recv() else { return };
            publisher.attach_cameras(g.clone());
            let _ = sink_stats.set(g.clone());
            let telemetry = &g.telemetry;
            let mut tracker = EventTracker::new(events_cfg);
            let tick = crossbeam_channel::tick(Duration::from_millis(250));
            let mut paused: std::collections::HashSet<Arc<str>> = Default::default();
            // Cameras down (reconnecting or offline): the index + 1 of the last frame they
            // queued, until it is out (then 0), and since when.
            let mut down_since: std::collections::HashMap<Arc<str>, (u64, Instant)> =
                Default::default();
            // Cameras removed by a reload (their frames still in flight are not published).
            let mut removed: std::collections::HashSet<Arc<str>> = Default::default();
            // Index + 1 of the last frame of each camera out of the sink.
            let mut last_done: std::collections::HashMap<Arc<str>, u64> = Default::default();
            let publish_events = |events: Vec<crate::events::Event>,
                                  r: Option<&crate::decide::FrameResult>,
                                  publisher: &mut MqttPublisher| {
                for mut e in events {
                    if e.kind == crate::events::EventType::Start {
                        telemetry.event_started(&e.label);
                    }
                    if let Some(r) = r {
                        sink_shared.attach_snapshot(&mut e, r, telemetry);
                    } else if sink_shared
                        .snapshots
                        .as_ref()
                        .is_some_and(|s| s.contains(&e.id))
                    {
                        e.snapshot = Some(sink_shared.snapshot_url(&e.id));
                    }
                    sink_shared
                        .events
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(&e);
                    publisher.publish_event(&e);
                }
            };
            loop {
                crossbeam_channel::select! {
                    recv(results) -> r => match r {
                        Ok(r) if removed.contains(&r.meta.camera) => {
                            // A frame of a camera removed by a reload, still in flight: its
                            // events and retained topics are gone, keep them so.
                            stats.received(1);
                            stats.sent(1);
                            recycler.recycle(r);
                        }
                        Ok(mut r) => {
                            stats.received(1);
                            stats.queue_depth.store(results.len() as u64, Relaxed);
                            publisher.publish(&r);
                            let events = tracker.on_frame(&r);
                            publish_events(events, Some(&r), &mut publisher);
                            match last_done.get_mut(&r.meta.camera) {
                                Some(done) => *done = r.meta.index + 1,
                                None => {
                                    last_done.insert(r.meta.camera.clone(), r.meta.index + 1);
                                }
                            }
                            if let Some(&(last, _)) = down_since.get(&r.meta.camera)
                                && last > 0
                                && r.meta.index + 1 >= last
                            {
                                let events = tracker.end_camera(&r.meta.camera, "camera offline");
                                publish_events(events, None, &mut publisher);
                                down_since.insert(r.meta.camera.clone(), (0, Instant::now()));
                            }
                            sink_shared.set_latest(&mut r);
                            let latency = r.meta.arrived.elapsed();
                            sink_latency.record(latency);
                            telemetry.latency_seconds.observe(latency.as_secs_f64());
                            stats.sent(1);
                            recycler.recycle(r);
                        }
                        Err(_) => break,
                    },
                    recv(notices) -> n => if let Ok(name) = n
                        && let Some(cam) = g.camera(&name)
                    {
                        let status = cam.status(&name);
                        let down = matches!(status.state, State::Reconnecting | State::Offline);
                        let was_down = down_since.contains_key(&name);
                        if down && !was_down {
                            // Its events end once the frames it queued before going down have
                            // come out (or after a while, if the last of them was lost).
                            let mut last = cam.last_queued.load(Relaxed);
                            if last_done.get(&name).is_some_and(|d| *d >= last) {
                                let events = tracker.end_camera(&name, "camera offline");
                                publish_events(events, None, &mut publisher);
                                last = 0;
                            }
                            down_since.insert(name.clone(), (last, Instant::now()));
                        } else if !down && was_down {
                            down_since.remove(&name);
                        }
                        publisher.publish_camera(&status);
                    },
                    recv(commands) -> c => match c {
                        Ok(SinkCommand::CameraAdded { name, watch }) => {
                            removed.remove(name.as_str());
                            publisher.add_camera(&name, &watch);
                        }
                        Ok(SinkCommand::CameraRemoved { name }) => {
                            removed.insert(Arc::from(name.as_str()));
                            let events = tracker.end_camera(&name, "camera removed");
                            publish_events(events, None, &mut publisher);
                            publisher.remove_camera(&name);
                            sink_shared.latest.lock().unwrap_or_else(|e| e.into_inner()).remove(name.as_str());
                            paused.remove(name.as_str());
                            down_since.remove(name.as_str());
                            last_done.remove(name.as_str());
                        }
                        Ok(SinkCommand::Events(cfg)) => tracker.set_config(cfg),
                        Err(_) => {}
                    },
                    recv(tick) -> _ => {
                        let events = tracker.on_tick(std::time::SystemTime::now());
                        publish_events(events, None, &mut publisher);
                        for (name, (last, since)) in down_since.iter_mut() {
                            if *last > 0 && since.elapsed() >= DOWN_GRACE {
                                let events = tracker.end_camera(name, "camera offline");
                                publish_events(events, None, &mut publisher);
                                *last = 0;
                            }
                        }
                        for (name, cam) in &g.cameras() {
                            if cam.enabled.load(Relaxed) {
                                paused.remove(name);
                            } else if paused.insert(name.clone()) {
                                let events = tracker.end_camera(name, "camera disabled");
                                publish_events(events, None, &mut publisher);
                                publisher.publish_camera(&cam.status(name));
                            }
                        }
                        publisher.flush();
                    },
                }
            }
            // vigil is stopping: every camera is offline from here on (their threads may not
            // have said so yet).
            for (name, cam) in &g.cameras() {
                if cam.state().state != State::Offline {
                    cam.set_state(State::Offline, 0, None);
                }
                publisher.publish_camera(&cam.status(name));
            }
            let events = tracker.end_all();
            publish_events(events, None, &mut publisher);
            publisher.close(Duration::from_secs(5));
        },
    );
    let _ = attach_tx.send(graph.stats.clone());
    let exporter = Exporter::new(MetricsSources {
        graph: graph.stats.clone(),
        mqtt: Some(monitor.clone()),
        model: {
            let slot = slot.clone();
            Arc::new(move || {
                let v = slot.current().version.clone();
                ModelGauge {
                    name: v.info.name.clone(),
                    version: v.info.version.clone(),
                    variant: v.variant.clone(),
                    provider: v.provider.clone(),
                }
            })
        },
    });
    let service = Arc::new(Service::new(
        control.config_path.clone(),
        config.clone(),
        graph.control.clone(),
        exporter,
        shared.clone(),
        command_tx,
        notice_tx.clone(),
    ));
    for spec in specs {
        service.start_camera(spec)?;
    }
    let http = if config.http.enabled {
        let mut h = config.http.clone();
        if let Some(tls) = &mut h.tls {
            tls.cert_file = config.resolve(&tls.cert_file);
            tls.key_file = config.resolve(&tls.key_file);
        }
        let stats = graph.stats.clone();
        let server = HttpServer::start(
            HttpSetup {
                config: h,
                token: http_token,
                on_predict: Some(Arc::new(move |outcome: &str| {
                    stats.telemetry.predict_request(outcome)
                })),
            },
            service.clone() as Arc<dyn Api>,
        );
        match server {
            Ok(s) => Some(s),
            Err(e) => {
                graph.stop();
                service.join_sources();
                return Err(AppError::Input(e.to_string()));
            }
        }
    } else {
        None
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reporter = spawn_reporter(
        graph.stats.clone(),
        monitor,
        latency,
        config.pipeline.log_interval,
        stop.clone(),
        notice_tx,
    );
    let supervisor = spawn_supervisor(service.clone(), &config, control.reload, stop.clone());
    let result = graph.wait(&control.shutdown, DRAIN_DEADLINE);
    stop.store(true, Relaxed);
    if let Some(h) = http {
        h.stop(Duration::from_secs(2));
    }
    let _ = supervisor.join();
    service.join_sources();
    let _ = reporter.join();
    result.map_err(Into::into)
}

/// Reloads on request, switches models when their files change (model.watch), and lets the
/// graph finish once every source has ended.
fn spawn_supervisor(
    service: Arc<Service>,
    config: &Config,
    reload: Receiver<()>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let watch = if config.model.watch {
        crossbeam_channel::tick(config.model.watch_interval)
    } else {
        crossbeam_channel::never()
    };
    let prune = crossbeam_channel::tick(Duration::from_secs(60));
    std::thread::Builder::new()
        .name("supervisor".into())
        .spawn(move || {
            let poll = crossbeam_channel::tick(Duration::from_millis(100));
            let mut reload = reload;
            while !stop.load(Relaxed) {
                crossbeam_channel::select! {
                    recv(reload) -> r => match r {
                        Ok(()) => {
                            tracing::info!("reloading the config (SIGHUP)");
                            if let Err(e) = service.reload_config() {
                                tracing::warn!(error = %e, "config reload refused");
                            }
                        }
                        Err(_) => reload = crossbeam_channel::never(),
                    },
                    recv(watch) -> _ => service.check_model_files(),
                    recv(prune) -> _ => {
                        if let Some(s) = &service.shared.snapshots {
                            s.prune();
                        }
                    }
                    recv(poll) -> _ => {
                        if service.sources_finished() {
                            // Every source ended (files that do not loop): vigil is done.
                            service.control.seal();
                            return;
                        }
                    }
                }
            }
        })
        .expect("spawning the supervisor")
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
    let model = load_model(config)?;
    let batch = batch_size(config, &model);
    let slot = Arc::new(ModelSlot::new(model, batch));
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
        &graph_config(config, false),
        slot,
        decide_settings(config, &[]),
        move |results, stats, recycler| {
            let mut first: Option<Instant> = None;
            let mut frames = 0u64;
            for r in results {
                stats.received(1);
                first.get_or_insert_with(Instant::now);
                frames += 1;
                let line = serde_json::to_string(&FramePayload::new(&r, &r.model, None))
                    .expect("payloads serialise");
                recycler.recycle(r);
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
    let stats = graph.stats.clone();
    let mut threads = Vec::new();
    let mut queues = Vec::new();
    for input in inputs {
        queues.push(graph.control.add_camera(input)?);
    }
    // Every input is in: the graph ends when they do.
    graph.control.seal();
    let (image_queues, video_queues) = queues.split_at(images.len());
    for ((name, path), (queue, _)) in images.into_iter().zip(image_queues.iter().cloned()) {
        match opencv::imgcodecs::imread(&path, opencv::imgcodecs::IMREAD_COLOR) {
            Ok(m) if !opencv::prelude::MatTraitConst::empty(&m) => {
                let frame = crate::frame::Frame {
                    meta: crate::frame::FrameMeta::new(name, 0, None),
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
    for (spec, (queue, stop)) in videos.into_iter().zip(video_queues.iter().cloned()) {
        // Nobody listens to state changes here: the receiver is gone, sends are ignored.
        let (ignored, _) = crossbeam_channel::unbounded();
        threads.push(source::spawn(spec, queue, stop, ignored));
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
        if stats
            .camera(&name)
            .is_none_or(|c| c.frames.load(Relaxed) == 0)
        {
            eprintln!("{name}: no video frame could be decoded (see the log above)");
            failures += 1;
        }
    }
    Ok(failures)
}
