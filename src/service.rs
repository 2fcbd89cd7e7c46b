//! The running service as the HTTP API and the reload see it: cameras started and stopped at
//! runtime, the recent events, the latest frame of each camera, snapshots, predict requests and
//! config reloads.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Sender;
use serde_json::{Value, json};

use crate::api::{Api, ApiError, EventQuery};
use crate::config::{CameraConfig, Config};
use crate::decide::FrameResult;
use crate::events::{Event, EventsConfig};
use crate::frame::{Frame, FrameMeta, Pixels};
use crate::graph::{CameraInput, DecideSettings, GraphControl, SubmitError};
use crate::metrics::State;
use crate::preprocess::Preprocessor;
use crate::prometheus::Exporter;
use crate::serving::{LoadedModel, ModelFiles, ModelSlot, model_files};
use crate::snapshots::{self, Annotation, SnapshotStore};
use crate::source::{self, SourceSpec};

/// The name predict requests go through the graph under (not a valid camera name).
pub const PREDICT_CAMERA: &str = "(predict)";

/// What the sink thread is told to do besides publishing results.
pub enum SinkCommand {
    /// A camera started at runtime: discovery and initial states.
    CameraAdded { name: String, watch: Vec<String> },
    /// A camera stopped at runtime: end its events, delete its retained topics.
    CameraRemoved { name: String },
    /// New `[events]` settings.
    Events(EventsConfig),
}

/// The latest analysed frame of a camera, for `latest.jpg`.
pub struct Latest {
    pub pixels: Pixels,
    pub label: Arc<str>,
    pub score: f32,
    pub wall: SystemTime,
}

/// Recent events in memory: the latest message of each, oldest first, at most `capacity`.
pub struct EventLog {
    capacity: usize,
    order: VecDeque<String>,
    events: HashMap<String, (SystemTime, Event)>,
}

impl EventLog {
    pub fn new(capacity: usize) -> Self {
        EventLog {
            capacity: capacity.max(1),
            order: VecDeque::new(),
            events: HashMap::new(),
        }
    }

    pub fn record(&mut self, e: &Event) {
        if self
            .events
            .insert(e.id.clone(), (SystemTime::now(), e.clone()))
            .is_none()
        {
            self.order.push_back(e.id.clone());
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.events.remove(&old);
                }
            }
        }
    }

    /// Newest first.
    pub fn query(&self, q: &EventQuery) -> Vec<Event> {
        self.order
            .iter()
            .rev()
            .filter_map(|id| self.events.get(id))
            .filter(|(changed, e)| {
                q.camera.as_ref().is_none_or(|c| *c == e.camera)
                    && q.label.as_ref().is_none_or(|l| *l == e.label)
                    && q.since.is_none_or(|s| *changed >= s)
            })
            .take(q.limit)
            .map(|(_, e)| e.clone())
            .collect()
    }
}

/// What the sink thread and the API share.
pub struct SinkShared {
    pub latest: Mutex<HashMap<Arc<str>, Latest>>,
    pub events: Mutex<EventLog>,
    pub snapshots: Option<SnapshotStore>,
    /// Prefix of snapshot URLs ("" or the configured public URL).
    pub url_base: String,
}

impl SinkShared {
    pub fn snapshot_url(&self, id: &str) -> String {
        format!("{}/api/events/{id}/snapshot.jpg", self.url_base)
    }

    /// Saves the snapshot of an event's first message; sets the URL on every message of an event
    /// that has one.
    pub fn attach_snapshot(
        &self,
        e: &mut Event,
        r: &FrameResult,
        telemetry: &crate::metrics::Telemetry,
    ) {
        let Some(store) = &self.snapshots else {
            return;
        };
        if e.kind == crate::events::EventType::Start {
            let Some(pixels) = &r.pixels else {
                return;
            };
            let annotation = Annotation {
                label: e.label.clone(),
                score: e.score,
                camera: e.camera.clone(),
                time: crate::publish::payload::timestamp(r.meta.wall),
            };
            match store.save(&e.id, pixels, &annotation) {
                Ok(_) => {
                    telemetry.snapshots_written.inc();
                    e.snapshot = Some(self.snapshot_url(&e.id));
                }
                Err(err) => {
                    telemetry.snapshots_failed.inc();
                    tracing::warn!(event = %e.id, error = %err, "cannot save the event's snapshot");
                }
            }
        } else if store.contains(&e.id) {
            e.snapshot = Some(self.snapshot_url(&e.id));
        }
    }

    pub fn set_latest(&self, r: &mut FrameResult) {
        let Some(pixels) = r.pixels.take() else {
            return;
        };
        let (label, score) = r
            .top
            .first()
            .map(|t| (t.label.clone(), t.score))
            .unwrap_or_else(|| (Arc::from(""), 0.0));
        self.latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                r.meta.camera.clone(),
                Latest {
                    pixels,
                    label,
                    score,
                    wall: r.meta.wall,
                },
            );
    }
}

/// The running service.
pub struct Service {
    pub config_path: PathBuf,
    /// The config in force (sections that need a restart keep their values from the start).
    pub config: Mutex<Config>,
    pub control: Arc<GraphControl>,
    pub slot: Arc<ModelSlot>,
    pub exporter: Exporter,
    pub shared: Arc<SinkShared>,
    pub sink: Sender<SinkCommand>,
    pub notices: Sender<Arc<str>>,
    pub sources: Mutex<BTreeMap<String, JoinHandle<()>>>,
    /// One reload (or model switch) at a time.
    reloading: Mutex<()>,
    /// Model files whose switch was refused (not tried again until they change).
    refused_files: Mutex<Option<ModelFiles>>,
    predict_timeout: Duration,
}

impl Service {
    pub fn new(
        config_path: PathBuf,
        config: Config,
        control: Arc<GraphControl>,
        exporter: Exporter,
        shared: Arc<SinkShared>,
        sink: Sender<SinkCommand>,
        notices: Sender<Arc<str>>,
    ) -> Service {
        Service {
            config_path,
            predict_timeout: config.http.predict_timeout,
            config: Mutex::new(config),
            slot: control.slot.clone(),
            control,
            exporter,
            shared,
            sink,
            notices,
            sources: Mutex::new(BTreeMap::new()),
            reloading: Mutex::new(()),
            refused_files: Mutex::new(None),
        }
    }

    fn config(&self) -> Config {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts a camera's source feeding the graph.
    pub fn start_camera(&self, spec: SourceSpec) -> Result<(), crate::graph::GraphError> {
        let name = spec.name.to_string();
        let (queue, stop) = self.control.add_camera(CameraInput {
            name: spec.name.clone(),
            live: spec.camera.is_live(),
            source: spec.describe(),
        })?;
        let handle = source::spawn(spec, queue, stop, self.notices.clone());
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, handle);
        Ok(())
    }

    /// Stops a camera and waits (at most `deadline`) for its source to end.
    pub fn stop_camera(&self, name: &str, deadline: Duration) {
        self.control.remove_camera(name);
        let handle = self
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(h) = handle {
            let until = Instant::now() + deadline;
            while !h.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                tracing::warn!(
                    camera = name,
                    "the camera's source is slow to stop; left to finish on its own"
                );
            }
        }
    }

    /// Whether every camera's source has ended (files that do not loop).
    pub fn sources_finished(&self) -> bool {
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        !sources.is_empty() && sources.values().all(|h| h.is_finished())
    }

    /// Joins every source (after the graph stopped).
    pub fn join_sources(&self) {
        let sources = std::mem::take(&mut *self.sources.lock().unwrap_or_else(|e| e.into_inner()));
        for (_, h) in sources {
            let _ = h.join();
        }
    }

    /// Loads the model the config names, checks it and switches to it between two batches. The
    /// running model keeps serving if anything fails.
    fn switch_model(&self, config: &Config, why: &str) -> Result<Value, ApiError> {
        let old = self.slot.current().version.clone();
        let started = Instant::now();
        let refuse = |e: String| {
            self.control.stats().telemetry.model_switches_failed.inc();
            tracing::warn!(reason = why, error = %e, "new model refused; the running model keeps serving");
            ApiError::new(422, "model_refused", e)
        };
        let model = LoadedModel::load(config).map_err(|e| refuse(e.to_string()))?;
        let held = self.slot.switch(model).map_err(|e| refuse(e.to_string()))?;
        self.control.stats().telemetry.model_switches.inc();
        let new = self.slot.current().version.clone();
        tracing::info!(
            version = %new.info.version,
            prepare_ms = started.elapsed().as_millis() as u64,
            reason = why,
            "model switch done: loaded, checked and warmed up beside the running version, which served meanwhile"
        );
        Ok(json!({
            "from": {"version": old.info.version, "variant": old.variant},
            "to": {"version": new.info.version, "variant": new.variant, "provider": new.provider},
            "load_ms": started.elapsed().as_secs_f64() * 1000.0,
            "swap_us": held.as_secs_f64() * 1e6,
        }))
    }

    /// The model files changed on disk (model.watch): switch to them. A change that is refused
    /// is not tried again until the files change again.
    pub fn check_model_files(&self) {
        let config = self.config();
        let files = model_files(&config);
        if files == self.slot.current().version.files {
            return;
        }
        let mut refused = self.refused_files.lock().unwrap_or_else(|e| e.into_inner());
        if refused.as_ref() == Some(&files) {
            return;
        }
        let _guard = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        // The config's labels (thresholds, groups) must exist in the new manifest too.
        let problems = config.validate();
        let result = if problems.is_empty() {
            self.switch_model(&config, "model files changed")
                .map(|_| ())
        } else {
            let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
            tracing::warn!(problems = %list.join("; "),
                "the changed model does not fit the config; the running model keeps serving");
            self.control.stats().telemetry.model_switches_failed.inc();
            Err(ApiError::new(422, "model_refused", list.join("; ")))
        };
        *refused = result.is_err().then_some(files);
    }

    /// Re-reads the config file and applies what changed; a config with any problem is refused
    /// whole and nothing changes.
    pub fn reload_config(&self) -> Result<Value, ApiError> {
        let _guard = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let telemetry = &self.control.stats().telemetry;
        let new = match Config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                telemetry.reloads_failed.inc();
                let problems: Vec<String> = e.problems.iter().map(|p| p.to_string()).collect();
                tracing::warn!(file = %self.config_path.display(), problems = %problems.join("; "),
                    "config reload refused; the running config stays");
                return Err(ApiError::new(
                    422,
                    "invalid_config",
                    format!("{e}").replace("\n  ", "\n"),
                ));
            }
        };
        let old = self.config();
        let enabled = |c: &Config| -> BTreeMap<String, CameraConfig> {
            c.cameras
                .iter()
                .filter(|(_, cam)| cam.enabled)
                .map(|(n, cam)| (n.clone(), cam.clone()))
                .collect()
        };
        let (before, after) = (enabled(&old), enabled(&new));
        if after.is_empty() {
            telemetry.reloads_failed.inc();
            return Err(ApiError::new(
                422,
                "invalid_config",
                "no enabled camera in the new config (vigil would stop)",
            ));
        }
        // Cameras whose source changed restart; a change of thresholds alone does not.
        let source_changed = |a: &CameraConfig, b: &CameraConfig| {
            let (mut a, mut b) = (a.clone(), b.clone());
            a.thresholds.clear();
            b.thresholds.clear();
            a != b
        };
        let removed: Vec<String> = before
            .keys()
            .filter(|n| !after.contains_key(*n))
            .cloned()
            .collect();
        let added: Vec<String> = after
            .keys()
            .filter(|n| !before.contains_key(*n))
            .cloned()
            .collect();
        let modified: Vec<String> = after
            .iter()
            .filter(|(n, c)| before.get(*n).is_some_and(|b| source_changed(b, c)))
            .map(|(n, _)| n.clone())
            .collect();
        // Build every new source before touching anything: a bad template refuses the reload.
        let mut specs = Vec::new();
        for name in added.iter().chain(&modified) {
            match crate::app::source_spec(&new, name, &after[name]) {
                Ok(s) => specs.push(s),
                Err(e) => {
                    telemetry.reloads_failed.inc();
                    return Err(ApiError::new(422, "invalid_config", e.to_string()));
                }
            }
        }
        let mut restart = Vec::new();
        for (section, same) in [
            ("inference", old.inference == new.inference),
            ("pipeline", old.pipeline == new.pipeline),
            ("mqtt", old.mqtt == new.mqtt),
            ("homeassistant", old.homeassistant == new.homeassistant),
            ("http", old.http == new.http),
            ("snapshots", old.snapshots == new.snapshots),
        ] {
            if !same {
                restart.push(section);
            }
        }
        // The model: a changed [model] section or changed files load a new version first.
        let model_changed =
            old.model != new.model || model_files(&new) != self.slot.current().version.files;
        let model = if model_changed {
            Some(self.switch_model(&new, "config reload").inspect_err(|_| {
                telemetry.reloads_failed.inc();
            })?)
        } else {
            None
        };
        // From here on nothing can fail.
        for name in removed.iter().chain(&modified) {
            self.stop_camera(name, Duration::from_secs(5));
            let _ = self
                .sink
                .send(SinkCommand::CameraRemoved { name: name.clone() });
        }
        let watch = crate::decide::watched_labels(&new);
        self.control.set_decide(DecideSettings {
            decide: new.decide.clone(),
            cameras: after
                .iter()
                .map(|(n, c)| (n.clone(), c.thresholds.clone()))
                .collect(),
            watch: watch.clone(),
        });
        if old.events != new.events {
            let _ = self.sink.send(SinkCommand::Events(new.events.clone()));
        }
        for spec in specs {
            let name = spec.name.to_string();
            let _ = self.sink.send(SinkCommand::CameraAdded {
                name: name.clone(),
                watch: watch.clone(),
            });
            if let Err(e) = self.start_camera(spec) {
                tracing::warn!(camera = %name, error = %e, "cannot start the camera");
            }
        }
        let thresholds_changed = old.decide != new.decide
            || before
                .iter()
                .any(|(n, c)| after.get(n).is_some_and(|a| a.thresholds != c.thresholds));
        let mut applied = new.clone();
        applied.inference = old.inference.clone();
        applied.pipeline = old.pipeline.clone();
        applied.mqtt = old.mqtt.clone();
        applied.homeassistant = old.homeassistant.clone();
        applied.http = old.http.clone();
        applied.snapshots = old.snapshots.clone();
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = applied;
        telemetry.reloads.inc();
        if !restart.is_empty() {
            tracing::warn!(sections = ?restart, "config reloaded, but these sections only change on a restart");
        }
        tracing::info!(added = ?added, removed = ?removed, restarted = ?modified,
            thresholds_changed, model_switched = model.is_some(), "config reloaded");
        Ok(json!({
            "applied": true,
            "cameras": {"added": added, "removed": removed, "restarted": modified},
            "thresholds_changed": thresholds_changed,
            "events_changed": old.events != new.events,
            "model": model,
            "restart_required": restart,
        }))
    }

    fn model_json(&self) -> Value {
        let v = self.slot.current().version.clone();
        json!({
            "name": v.info.name,
            "version": v.info.version,
            "variant": v.variant,
            "precision": v.precision,
            "provider": v.provider,
        })
    }

    fn check_model(&self, name: &str, version: Option<&str>) -> Result<(), ApiError> {
        let v = self.slot.current().version.clone();
        if name != v.info.name {
            return Err(ApiError::not_found(format!(
                "no model named {name:?} (serving {:?})",
                v.info.name
            )));
        }
        if let Some(ver) = version
            && ver != v.info.version
        {
            return Err(ApiError::not_found(format!(
                "model {name} has no version {ver:?} being served (serving version {:?})",
                v.info.version
            )));
        }
        Ok(())
    }
}

impl Api for Service {
    fn ready(&self) -> Result<Value, String> {
        let cameras = self.control.stats().cameras();
        let online = cameras
            .iter()
            .filter(|(_, c)| c.state().state == State::Online)
            .count();
        if self.control.stopping() {
            return Err("vigil is stopping".into());
        }
        if online == 0 {
            let states: Vec<String> = cameras
                .iter()
                .map(|(n, c)| format!("{n} {}", c.state().state.as_str()))
                .collect();
            return Err(format!("no camera is online ({})", states.join(", ")));
        }
        Ok(json!({
            "status": "ready",
            "model": self.model_json(),
            "cameras": cameras.len(),
            "cameras_online": online,
        }))
    }

    fn metrics(&self) -> String {
        self.exporter.render()
    }

    fn cameras(&self) -> Value {
        let list: Vec<Value> = self
            .control
            .stats()
            .cameras()
            .iter()
            .map(|(n, c)| serde_json::to_value(c.status(n)).expect("statuses serialise"))
            .collect();
        json!({ "cameras": list })
    }

    fn camera(&self, id: &str) -> Result<Value, ApiError> {
        let cam = self
            .control
            .stats()
            .camera(id)
            .ok_or_else(|| ApiError::not_found(format!("no camera named {id:?}")))?;
        let mut status = serde_json::to_value(cam.status(id)).expect("statuses serialise");
        if let Some(c) = self
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cameras
            .get(id)
        {
            status["analyze_fps"] = json!(c.analyze_fps);
            status["thresholds"] = json!(c.thresholds);
        }
        status["latest_jpg"] = json!(format!(
            "{}/api/cameras/{id}/latest.jpg",
            self.shared.url_base
        ));
        Ok(status)
    }

    fn events(&self, query: &EventQuery) -> Value {
        let events = self
            .shared
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .query(query);
        json!({ "events": events })
    }

    fn latest_jpeg(&self, camera: &str) -> Result<Vec<u8>, ApiError> {
        if self.control.stats().camera(camera).is_none() {
            return Err(ApiError::not_found(format!("no camera named {camera:?}")));
        }
        let (pixels, annotation) = {
            let latest = self.shared.latest.lock().unwrap_or_else(|e| e.into_inner());
            let l = latest.get(camera).ok_or_else(|| {
                ApiError::new(
                    404,
                    "no_frame",
                    format!("camera {camera:?} has no analysed frame yet"),
                )
            })?;
            (
                l.pixels.clone(),
                Annotation {
                    label: l.label.to_string(),
                    score: l.score,
                    camera: camera.to_string(),
                    time: crate::publish::payload::timestamp(l.wall),
                },
            )
        };
        let quality = self
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshots
            .quality;
        snapshots::to_bgr(&pixels)
            .and_then(|m| snapshots::encode_jpeg(&m, Some(&annotation), quality))
            .map_err(|e| ApiError::new(500, "encode_failed", e.to_string()))
    }

    fn event_snapshot(&self, id: &str) -> Result<Vec<u8>, ApiError> {
        let Some(store) = &self.shared.snapshots else {
            return Err(ApiError::not_found(
                "snapshots are disabled ([snapshots] enabled = false)",
            ));
        };
        store.load(id).ok_or_else(|| {
            ApiError::not_found(format!(
                "no snapshot for event {id:?} (never made, or deleted by the retention limits)"
            ))
        })
    }

    fn model_status(&self, name: &str, version: Option<&str>) -> Result<Value, ApiError> {
        self.check_model(name, version)?;
        let history = self.slot.history();
        let list: Vec<Value> = history
            .iter()
            .filter(|r| version.is_none_or(|v| v == r.version))
            .map(|r| {
                json!({
                    "version": r.version,
                    "state": r.state,
                    "status": {"error_code": "OK", "error_message": ""},
                    "variant": r.variant,
                    "provider": r.provider,
                    "loaded_at": r.loaded_at,
                })
            })
            .collect();
        Ok(json!({ "model_version_status": list }))
    }

    fn predict(
        &self,
        name: &str,
        version: Option<&str>,
        images: Vec<Vec<u8>>,
    ) -> Result<Value, ApiError> {
        self.check_model(name, version)?;
        let spec = self.slot.current().spec().clone();
        let mut pre = Preprocessor::new(&spec);
        let (tx, rx) = crossbeam_channel::unbounded::<FrameResult>();
        let n = images.len();
        let deadline = Instant::now() + self.predict_timeout;
        for (i, bytes) in images.into_iter().enumerate() {
            let buf = opencv::core::Vector::<u8>::from_slice(&bytes);
            let mat = opencv::imgcodecs::imdecode(&buf, opencv::imgcodecs::IMREAD_COLOR)
                .ok()
                .filter(|m| !opencv::prelude::MatTraitConst::empty(m))
                .ok_or_else(|| {
                    ApiError::new(
                        400,
                        "bad_image",
                        format!("instance {i}: the bytes are not an image vigil can decode"),
                    )
                })?;
            let frame = Frame {
                meta: FrameMeta {
                    reply: Some(tx.clone()),
                    ..FrameMeta::new(PREDICT_CAMERA.into(), i as u64, None)
                },
                pixels: Pixels::Mat(mat),
            };
            let prepared = pre
                .prepare(frame, Vec::new(), false)
                .map_err(|(e, _)| ApiError::new(400, "bad_image", format!("instance {i}: {e}")))?;
            match self.control.submit(prepared, deadline) {
                Ok(()) => {}
                Err(SubmitError::Busy) => {
                    return Err(ApiError::unavailable(format!(
                        "the model is busy with the cameras' frames (no room within {:?}); try again",
                        self.predict_timeout
                    )));
                }
                Err(SubmitError::Stopping) => {
                    return Err(ApiError::unavailable("vigil is stopping"));
                }
            }
        }
        drop(tx);
        let mut results: Vec<Option<FrameResult>> = (0..n).map(|_| None).collect();
        for _ in 0..n {
            match rx.recv_deadline(deadline) {
                Ok(r) => {
                    let i = r.meta.index as usize;
                    results[i] = Some(r);
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    return Err(ApiError::new(
                        504,
                        "timeout",
                        format!("no result within {:?}", self.predict_timeout),
                    ));
                }
                Err(_) => {
                    return Err(ApiError::new(
                        500,
                        "inference_failed",
                        "the model could not classify the images (see vigil's log)",
                    ));
                }
            }
        }
        let predictions: Vec<Value> = results
            .into_iter()
            .flatten()
            .map(|r| {
                let best = r.top.first();
                json!({
                    "label": best.map(|b| b.label.to_string()),
                    "score": best.map(|b| b.score),
                    "top": r.top,
                    "detections": r.detections,
                    "model_version": r.model.version,
                })
            })
            .collect();
        Ok(json!({ "predictions": predictions, "model": self.model_json() }))
    }

    fn reload(&self) -> Result<Value, ApiError> {
        self.reload_config()
    }
}
