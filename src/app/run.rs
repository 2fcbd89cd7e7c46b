//! `vigil run`: the wiring of every piece, from the cameras to MQTT and the HTTP server, until a
//! stop signal (or every source has ended).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::Receiver;
use vigil_engine::model::ModelInfo;
use vigil_engine::serving::{LoadedModel, ModelSlot};

use super::reporter::Reporter;
use super::sink::Sink;
use super::{AppError, DRAIN_DEADLINE, batch_size, init_gstreamer};
use crate::config::{CameraConfig, Config, SourceSpec};
use crate::ops::api::Api;
use crate::ops::capture::{Capturer, EventFlags};
use crate::ops::http::{HttpServer, HttpSetup};
use crate::ops::prometheus::{Exporter, MetricsSources, ModelGauge};
use crate::ops::service::Service;
use crate::ops::shared::{EventLog, SinkShared};
use crate::ops::snapshots::SnapshotStore;
use crate::pipeline::{Graph, GraphConfig};
use crate::publish::mqtt::{MqttMonitor, MqttPublisher, PublisherSetup};
use crate::shutdown::{Exits, Joinable, Shutdown};
use crate::stats::LatencyLog;

/// How `vigil run` is driven from outside: the config file (for reloads) and the signals.
pub struct RunControl {
    pub config_path: PathBuf,
    /// A message (or the channel closing) stops vigil.
    pub shutdown: Receiver<()>,
    /// A message re-reads the config file (SIGHUP).
    pub reload: Receiver<()>,
    /// This process's replica under `[cluster]`: a reload keeps to its cameras.
    pub replica: Option<u32>,
}

/// Every enabled camera to MQTT until `shutdown` fires (or every source has ended).
pub fn run(config: Config, control: RunControl) -> Result<(), AppError> {
    init_gstreamer()?;
    crate::source::keydec::configure(config.pipeline.key_frame_decoders);
    let model = config.load_model()?;
    let cameras = config.enabled_cameras();
    let specs = camera_specs(&config, &cameras, control.replica)?;
    let shared = Arc::new(sink_shared(&config)?);
    let http_token = http_token(&config)?;
    // Every core thread reports its end here, those started before the graph too.
    let supervision = Exits::new();
    let publisher = start_publisher(&config, &model, &cameras, &supervision.0)?;
    let monitor = publisher.monitor();
    let batch = batch_size(&config, &model, false);
    let slot = Arc::new(ModelSlot::tuned(model, batch));
    let latency = Arc::new(LatencyLog::default());
    // Camera state changes (and the reporter's periodic refresh) come as the camera's name.
    let (notice_tx, notices) = crossbeam_channel::unbounded();
    let (command_tx, commands) = crossbeam_channel::unbounded();
    let keep_pixels = keeps_pixels(&config, &shared);
    let (capturer, capture_thread, event_flags) = start_capture(&config, &slot, &publisher)?;
    let (sink_shared, sink_latency, events) =
        (shared.clone(), latency.clone(), config.events.clone());
    let graph = Graph::start_supervising(
        &GraphConfig::new(&config.pipeline, keep_pixels),
        slot.clone(),
        config.decide_settings(&cameras),
        supervision,
        move |results, stats, recycler| {
            publisher.attach_cameras(stats.clone());
            let sink = Sink::new(publisher, events, sink_shared, stats.clone(), sink_latency)
                .with_capturer(capturer);
            sink.run(results, notices, commands, recycler)
        },
    );
    let service = Arc::new(
        Service::new(
            control.config_path.clone(),
            config.clone(),
            graph.control.clone(),
            exporter(&graph, &monitor, &slot),
            shared,
            command_tx,
            notice_tx.clone(),
        )
        .with_mqtt(monitor.clone())
        .with_event_flags(event_flags)
        .with_replica(control.replica),
    );
    for spec in specs {
        service.start_camera(spec)?;
    }
    let http = start_http(&config, http_token, &graph, &service).inspect_err(|_| {
        graph.stop();
        service.join_sources();
    })?;
    let stop = Shutdown::new();
    let reporter = Reporter {
        stats: graph.stats.clone(),
        mqtt: monitor,
        latency,
        interval: config.pipeline.log_interval,
        notices: notice_tx,
    }
    .spawn(stop.clone(), &graph.exits());
    let supervisor = supervise(&config, &graph, &service, control.reload, &stop);
    let result = graph.wait(&control.shutdown, DRAIN_DEADLINE);
    stop.stop();
    if let Some(h) = http {
        h.stop(Duration::from_secs(2));
    }
    supervisor.join();
    service.join_sources();
    reporter.join();
    join_capture(capture_thread);
    result.map_err(Into::into)
}

fn join_capture(thread: Joinable) {
    if thread.join_within(Duration::from_secs(5)).is_err() {
        tracing::warn!("the capture thread did not end in time");
    }
}

/// Frames keep their pixels for snapshots, the latest-frame view and the heads' inboxes.
/// The capture thread (frames for the heads' inboxes), and its handle for flagging events wrong,
/// also given to the publisher for `<prefix>/<camera>/set/wrong`.
fn start_capture(
    config: &Config,
    slot: &ModelSlot,
    publisher: &MqttPublisher,
) -> Result<(Capturer, Joinable, EventFlags), AppError> {
    let (capturer, thread) = Capturer::start(
        config.teach.capture.clone(),
        config.teach_data(),
        slot.current().spec(),
    )
    .map_err(AppError::Thread)?;
    let flags = capturer.event_flags();
    let mqtt_flags = flags.clone();
    publisher.attach_event_flags(Arc::new(move |event, camera| {
        mqtt_flags.flag_or_next_frames(event, camera)
    }));
    Ok((capturer, thread, flags))
}

fn keeps_pixels(config: &Config, shared: &SinkShared) -> bool {
    shared.snapshots.is_some() || config.http.enabled || !config.head_names().is_empty()
}

/// The supervisor: reloads, model files, heads, figures, snapshot pruning.
fn supervise(
    config: &Config,
    graph: &Graph,
    service: &Arc<Service>,
    reload: Receiver<()>,
    stop: &Shutdown,
) -> Joinable {
    let watch = config.model.watch.then_some(config.model.watch_interval);
    super::supervisor::spawn(service.clone(), watch, reload, stop.clone(), &graph.exits())
}

/// What the sink and the API share: the snapshot store (opened now: a bad directory stops the
/// start), the event log and the snapshot URLs' base.
fn sink_shared(config: &Config) -> Result<SinkShared, AppError> {
    let snapshots = if config.snapshots.enabled {
        let s = &config.snapshots;
        Some(SnapshotStore::open(
            &config.resolve(&s.dir),
            s.keep,
            s.max_age,
            s.quality,
        )?)
    } else {
        None
    };
    Ok(SinkShared {
        latest: Default::default(),
        events: Mutex::new(EventLog::new(config.http.events_kept)),
        feed: Default::default(),
        recent_latency: Default::default(),
        snapshots,
        url_base: config
            .http
            .public_url
            .clone()
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_string(),
    })
}

/// The enabled cameras' sources; none is an error, but for a replica (more replicas than
/// cameras), which stands by for a reload that gives it one.
fn camera_specs(
    config: &Config,
    cameras: &BTreeMap<String, CameraConfig>,
    replica: Option<u32>,
) -> Result<Vec<SourceSpec>, AppError> {
    if cameras.is_empty() {
        if replica.is_none() {
            return Err(AppError::NoCamera);
        }
        tracing::warn!(
            "this replica owns no enabled camera; it waits for a reload that gives it one"
        );
    }
    Ok(cameras
        .iter()
        .map(|(name, cam)| config.source_spec(name, cam))
        .collect::<Result<Vec<_>, _>>()?)
}

/// The HTTP bearer token, resolved (from the config, its variable or its file).
fn http_token(config: &Config) -> Result<Option<String>, AppError> {
    if !config.http.enabled {
        return Ok(None);
    }
    let mut h = config.http.clone();
    h.token_file = h.token_file.map(|p| config.resolve(&p));
    h.resolved_token().map_err(|message| AppError::Secret {
        key: "http.token",
        message,
    })
}

/// Connects to the broker (in the background) with `[mqtt]`'s paths resolved, announcing the
/// cameras and their watched labels.
fn start_publisher(
    config: &Config,
    model: &LoadedModel,
    cameras: &BTreeMap<String, CameraConfig>,
    exits: &Exits,
) -> Result<MqttPublisher, AppError> {
    let mut mqtt = config.mqtt.clone();
    mqtt.password_file = mqtt.password_file.map(|p| config.resolve(&p));
    if let Some(tls) = &mut mqtt.tls {
        for f in [&mut tls.ca_file, &mut tls.cert_file, &mut tls.key_file] {
            *f = f.as_ref().map(|p| config.resolve(p));
        }
    }
    let watch = config.watched_labels();
    let publisher = MqttPublisher::start(
        &mqtt,
        PublisherSetup {
            model: ModelInfo::of(&model.version.manifest),
            homeassistant: &config.homeassistant,
            cameras: cameras
                .iter()
                .map(|(n, c)| config.announcement(n, c))
                .collect(),
            top_interval: config.events.update_interval,
            exits: exits.clone(),
        },
    )?;
    tracing::info!(
        broker = %format!("{}:{}", config.mqtt.host, config.mqtt.port),
        topics = %format!("{}/#", config.mqtt.topic_prefix),
        watched = ?watch,
        "publishing to MQTT"
    );
    Ok(publisher)
}

/// `/metrics`: the graph's and MQTT's figures and the model in service.
fn exporter(graph: &Graph, monitor: &MqttMonitor, slot: &Arc<ModelSlot>) -> Exporter {
    let slot = slot.clone();
    Exporter::new(MetricsSources {
        graph: graph.stats.clone(),
        mqtt: Some(monitor.clone()),
        model: Arc::new(move || {
            let v = slot.current().version.clone();
            let tuning = slot.tuning();
            ModelGauge {
                name: v.info.name.clone(),
                version: v.info.version.clone(),
                variant: v.variant.clone(),
                provider: v.provider.clone(),
                batch_limit: tuning.chosen,
                batch_measured: tuning
                    .measures
                    .iter()
                    .map(|m| (m.batch, m.images_per_second))
                    .collect(),
            }
        }),
    })
}

/// The HTTP server, when enabled, with `[http]`'s paths resolved.
fn start_http(
    config: &Config,
    token: Option<String>,
    graph: &Graph,
    service: &Arc<Service>,
) -> Result<Option<HttpServer>, AppError> {
    if !config.http.enabled {
        return Ok(None);
    }
    let mut h = config.http.clone();
    if let Some(tls) = &mut h.tls {
        tls.cert_file = config.resolve(&tls.cert_file);
        tls.key_file = config.resolve(&tls.key_file);
    }
    let stats = graph.stats.clone();
    let server = HttpServer::start(
        HttpSetup {
            config: h,
            token,
            on_predict: Some(Arc::new(move |outcome: &str| {
                stats.telemetry.predict_request(outcome)
            })),
            exits: Some(graph.exits()),
        },
        service.clone() as Arc<dyn Api>,
    )?;
    Ok(Some(server))
}
