//! The running service as the HTTP API and the reload see it: cameras started and stopped at
//! runtime, model switches, config reloads and predict requests; it implements [`Api`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde_json::{Value, json};
use vigil_engine::infer::Fallback;
use vigil_engine::serving::{ModelFiles, ModelSlot};

use crate::config::{CameraConfig, Config};
use crate::frame::{Frame, FrameMeta, FrameResult, Pixels};
use crate::ops::api::{Api, ApiError, EventQuery};
use crate::ops::capture::{EventFlags, FlagError};
use crate::ops::prometheus::Exporter;
use crate::ops::shared::{SinkCommand, SinkShared};
use crate::ops::snapshots::{self, Annotation};
use crate::ops::system::{self, SystemHistory};
use crate::ops::teaching::{self, Teaching};
use crate::ops::zones_edit::{self, EditError};
use crate::pipeline::preprocess::Preprocessor;
use crate::pipeline::{CameraInput, GraphControl, GraphError, SubmitError};
use crate::publish::mqtt::MqttMonitor;
use crate::shutdown::Joinable;
use crate::source::{self, SourceSpec};
use crate::stats::State;
use crate::sync::lock;
use crate::wire::timestamp;

/// The name predict requests go through the graph under (not a valid camera name).
pub const PREDICT_CAMERA: &str = "(predict)";

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
    pub sources: Mutex<BTreeMap<String, Joinable>>,
    /// One reload (or model switch) at a time.
    reloading: Mutex<()>,
    /// Model files whose switch was refused (not tried again until they change).
    refused_files: Mutex<Option<ModelFiles>>,
    predict_timeout: Duration,
    /// Heads' training jobs.
    teaching: Teaching,
    /// Each head's version in service when last looked at.
    heads_seen: Mutex<Vec<(String, Option<u32>)>>,
    /// The console's figures of the last minutes.
    system: SystemHistory,
    mqtt: Option<MqttMonitor>,
    /// Flags events' starting pictures wrong (the capture thread).
    event_flags: Option<EventFlags>,
    /// Under `[cluster]`: this process's replica (a reload keeps to its cameras).
    replica: Option<u32>,
}

/// The sections whose changes take a restart: a reload keeps their running values.
const RESTART_SECTIONS: &[&str] = &[
    "inference",
    "pipeline",
    "mqtt",
    "homeassistant",
    "http",
    "snapshots",
];

/// The sections of `RESTART_SECTIONS` that differ between two configs.
fn restart_required(old: &Config, new: &Config) -> Vec<&'static str> {
    let same = |section: &str| match section {
        "inference" => old.inference == new.inference,
        "pipeline" => old.pipeline == new.pipeline,
        "mqtt" => old.mqtt == new.mqtt,
        "homeassistant" => old.homeassistant == new.homeassistant,
        "http" => old.http == new.http,
        "snapshots" => old.snapshots == new.snapshots,
        _ => true,
    };
    RESTART_SECTIONS
        .iter()
        .copied()
        .filter(|s| !same(s))
        .collect()
}

/// `new`, with the sections that take a restart kept as they run in `old`.
fn applied(old: &Config, new: &Config) -> Config {
    Config {
        inference: old.inference.clone(),
        pipeline: old.pipeline.clone(),
        mqtt: old.mqtt.clone(),
        homeassistant: old.homeassistant.clone(),
        http: old.http.clone(),
        snapshots: old.snapshots.clone(),
        ..new.clone()
    }
}

/// What a reload does to the cameras.
struct CameraPlan {
    before: BTreeMap<String, CameraConfig>,
    after: BTreeMap<String, CameraConfig>,
    added: Vec<String>,
    removed: Vec<String>,
    /// Changed in anything but their thresholds: restarted.
    modified: Vec<String>,
}

impl CameraPlan {
    fn new(old: &Config, new: &Config) -> Result<CameraPlan, ApiError> {
        let (before, after) = (old.enabled_cameras(), new.enabled_cameras());
        if after.is_empty() {
            return Err(invalid_config(
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
        let names = |from: &BTreeMap<String, CameraConfig>, not_in: &BTreeMap<String, _>| {
            from.keys()
                .filter(|n| !not_in.contains_key(*n))
                .cloned()
                .collect()
        };
        Ok(CameraPlan {
            removed: names(&before, &after),
            added: names(&after, &before),
            modified: after
                .iter()
                .filter(|(n, c)| before.get(*n).is_some_and(|b| source_changed(b, c)))
                .map(|(n, _)| n.clone())
                .collect(),
            before,
            after,
        })
    }

    /// Every camera to start: a bad template refuses the reload before anything changes.
    fn specs(&self, new: &Config) -> Result<Vec<SourceSpec>, ApiError> {
        self.added
            .iter()
            .chain(&self.modified)
            .map(|name| {
                new.source_spec(name, &self.after[name])
                    .map_err(|e| invalid_config(e.to_string()))
            })
            .collect()
    }

    fn thresholds_changed(&self) -> bool {
        self.before.iter().any(|(n, c)| {
            self.after
                .get(n)
                .is_some_and(|a| a.thresholds != c.thresholds)
        })
    }
}

fn invalid_config(message: impl Into<String>) -> ApiError {
    ApiError::new(422, "invalid_config", message)
}

/// An f32 as the short decimal it was written as (0.4, not 0.4000000059604645).
fn round4(v: f32) -> f64 {
    (f64::from(v) * 1e4).round() / 1e4
}

fn rounded(thresholds: &BTreeMap<String, f32>) -> Value {
    thresholds
        .iter()
        .map(|(k, v)| (k.clone(), json!(round4(*v))))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// A config edit refused, each problem with its key.
fn refused(problems: Vec<crate::ops::api::FieldProblem>) -> ApiError {
    let list: Vec<String> = problems
        .iter()
        .map(|p| format!("{}: {}", p.key, p.message))
        .collect();
    let mut e = invalid_config(format!(
        "not saved, {} problem(s): {}",
        problems.len(),
        list.join("; ")
    ));
    e.problems = problems;
    e
}

/// Replaces `path` with `text` at once (a temporary file beside it, renamed over it), keeping
/// the file's permissions (it may hold passwords).
fn write_keeping_mode(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let permissions = std::fs::metadata(path)?.permissions();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{}.saving", name.unwrap_or_default()));
    std::fs::write(&tmp, text)?;
    std::fs::set_permissions(&tmp, permissions)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
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
            heads_seen: Mutex::new(teaching::in_service(&config)),
            teaching: Teaching::default(),
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
            system: SystemHistory::default(),
            mqtt: None,
            event_flags: None,
            replica: None,
        }
    }

    /// This process's replica under `[cluster]`.
    pub fn with_replica(mut self, replica: Option<u32>) -> Service {
        self.replica = replica;
        self
    }

    /// The capture thread's handle, for `POST /api/events/<id>/wrong`.
    pub fn with_event_flags(mut self, flags: EventFlags) -> Service {
        self.event_flags = Some(flags);
        self
    }

    /// The publisher's connection, for the console's figures.
    pub fn with_mqtt(mut self, mqtt: MqttMonitor) -> Service {
        self.mqtt = Some(mqtt);
        self
    }

    /// Takes a sample of the figures the console's System screen charts (every
    /// [`system::INTERVAL`], by the supervisor).
    pub fn sample_system(&self) {
        self.system.sample(&system::Sources {
            graph: self.control.stats(),
            mqtt: self.mqtt.as_ref(),
            model: self.model_json(),
            latency: &self.shared.recent_latency,
        });
    }

    /// A camera's status with what the console shows beside it: its latest answer, its zones
    /// and its head.
    /// A camera's status; `inference` is [`Service::inference_json`], the same for every camera.
    fn camera_json(
        &self,
        name: &str,
        stats: &crate::stats::CameraStats,
        inference: &Value,
    ) -> Value {
        let mut v = serde_json::to_value(stats.status(name)).expect("statuses serialise");
        // Rates of the last couple of seconds (the status's input_fps is the log interval's).
        if let Some(r) = self.system.camera_rates(name) {
            for key in ["analysed_fps", "dropped_per_s"] {
                v[key] = r[key].clone();
            }
            if r["fps"].is_number() {
                v["input_fps"] = r["fps"].clone();
            }
        }
        v["latest"] = lock(&self.shared.latest)
            .get(name)
            .map_or(Value::Null, |l| {
                json!({
                    "label": &*l.label,
                    "score": round4(l.score),
                    "zone": l.zone.as_ref().map(|z| z.name.to_string()),
                    "time": timestamp(l.wall),
                })
            });
        if let Some(c) = lock(&self.config).cameras.get(name) {
            let zones: Vec<Value> = c
                .zones
                .iter()
                .map(|(zone, z)| {
                    json!({
                        "name": zone,
                        "rect": z.rect.or_else(|| z.bounds()),
                        "polygon": z.polygon,
                        "thresholds": rounded(&z.thresholds),
                        "head": z.head,
                    })
                })
                .collect();
            v["zones"] = zones.into();
            v["head"] = json!(c.head);
            v["analyze_fps"] = json!(c.analyze_fps);
            v["thresholds"] = rounded(&c.thresholds);
        }
        v["inference"] = inference.clone();
        v
    }

    /// Writes a camera's zones into the config file and reloads; see [`Api::save_zones`].
    fn save_zones_file(&self, camera: &str, zones: &Value) -> Result<Value, ApiError> {
        let _guard = lock(&self.reloading);
        let path = &self.config_path;
        let text = std::fs::read_to_string(path)
            .map_err(|e| ApiError::new(500, "config_file", format!("{}: {e}", path.display())))?;
        let edited = zones_edit::set_zones(&text, camera, zones).map_err(|e| match e {
            EditError::NoCamera => {
                ApiError::not_found(format!("no camera named {camera:?} in {}", path.display()))
            }
            EditError::File(m) => invalid_config(format!("{}: {m}", path.display())),
            EditError::Zones(problems) => refused(problems),
        })?;
        let base = path.parent().filter(|p| !p.as_os_str().is_empty());
        let base = base.unwrap_or(std::path::Path::new(".")).to_path_buf();
        let problems = match crate::config::Config::parse(&edited, base) {
            Ok(c) => c.validate(),
            Err(p) => p,
        };
        if !problems.is_empty() {
            let problems = problems
                .into_iter()
                .map(|p| crate::ops::api::FieldProblem {
                    key: p.key,
                    message: p.message,
                })
                .collect();
            return Err(refused(problems));
        }
        write_keeping_mode(path, &edited).map_err(|e| {
            ApiError::new(
                500,
                "config_file",
                format!("cannot write {}: {e}", path.display()),
            )
        })?;
        tracing::info!(camera, file = %path.display(), "zones saved from the console");
        let telemetry = &self.control.stats().telemetry;
        match self.reload_locked() {
            Ok(reload) => {
                telemetry.reloads.inc();
                Ok(json!({"camera": camera, "saved": true, "reload": reload}))
            }
            Err(mut e) => {
                telemetry.reloads_failed.inc();
                e.message = format!(
                    "saved in {}, but not applied: {}",
                    path.display(),
                    e.message
                );
                Err(e)
            }
        }
    }

    fn config(&self) -> Config {
        lock(&self.config).clone()
    }

    /// Puts the heads' versions in service when their `current` changed (a training here or
    /// with `vigil train`, `vigil heads pin`, an activation): decide gets its new deciders
    /// between two frames, and the cameras bound to a head are announced again (their labels
    /// may have changed). Called by the supervisor.
    pub fn check_heads(&self) {
        // Cheap look first (every second); the work runs under the reload guard on a fresh view.
        let quick = teaching::in_service(&lock(&self.config));
        if *lock(&self.heads_seen) == quick {
            return;
        }
        let _guard = lock(&self.reloading);
        let config = self.config();
        let now = teaching::in_service(&config);
        let mut seen = lock(&self.heads_seen);
        let changed: Vec<String> = now
            .iter()
            .filter(|h| !seen.contains(h))
            .map(|(name, v)| format!("{name} v{}", v.unwrap_or(0)))
            .collect();
        *seen = now;
        drop(seen);
        let cameras = config.enabled_cameras();
        self.control.set_decide(config.decide_settings(&cameras));
        for (name, cam) in &cameras {
            if teaching::has_head(&config, name) {
                let _ = self
                    .sink
                    .send(SinkCommand::CameraAdded(config.announcement(name, cam)));
            }
        }
        tracing::info!(heads = ?changed, "head versions put in service");
    }

    /// Starts a camera's source feeding the graph.
    pub fn start_camera(&self, spec: SourceSpec) -> Result<(), GraphError> {
        let name = spec.name.to_string();
        let (queue, stop) = self.control.add_camera(CameraInput {
            name: spec.name.clone(),
            policy: spec.camera.full_policy(),
            source: spec.describe(),
            regions: spec.regions.clone(),
        })?;
        let handle = source::spawn(spec, queue, stop, self.notices.clone());
        lock(&self.sources).insert(name, handle);
        Ok(())
    }

    /// Stops a camera and waits (at most `deadline`) for its source to end.
    pub fn stop_camera(&self, name: &str, deadline: Duration) {
        self.control.remove_camera(name);
        let handle = lock(&self.sources).remove(name);
        if let Some(h) = handle
            && h.join_within(deadline).is_err()
        {
            tracing::warn!(
                camera = name,
                "the camera's source is slow to stop; left to finish on its own"
            );
        }
    }

    /// Whether every camera's source has ended (files that do not loop).
    pub fn sources_finished(&self) -> bool {
        let sources = lock(&self.sources);
        !sources.is_empty() && sources.values().all(|h| h.is_finished())
    }

    /// Joins every source (after the graph stopped).
    pub fn join_sources(&self) {
        let sources = std::mem::take(&mut *lock(&self.sources));
        for (_, h) in sources {
            h.join();
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
        let model = config.load_model().map_err(|e| refuse(e.to_string()))?;
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
        let files = config.model_source().files();
        if files == self.slot.current().version.files {
            return;
        }
        let mut refused = lock(&self.refused_files);
        if refused.as_ref() == Some(&files) {
            return;
        }
        let _guard = lock(&self.reloading);
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
        let _guard = lock(&self.reloading);
        let telemetry = &self.control.stats().telemetry;
        let result = self.reload_locked();
        match &result {
            Ok(_) => telemetry.reloads.inc(),
            Err(_) => telemetry.reloads_failed.inc(),
        };
        result
    }

    fn reload_locked(&self) -> Result<Value, ApiError> {
        let new = Config::load(&self.config_path).map(|c| c.for_replica(self.replica).for_live());
        let new = new.map_err(|e| {
            let problems: Vec<String> = e.problems.iter().map(|p| p.to_string()).collect();
            tracing::warn!(file = %self.config_path.display(), problems = %problems.join("; "),
                "config reload refused; the running config stays");
            invalid_config(format!("{e}").replace("\n  ", "\n"))
        })?;
        let old = self.config();
        let plan = CameraPlan::new(&old, &new)?;
        let specs = plan.specs(&new)?;
        let restart = restart_required(&old, &new);
        // The model: a changed [model] section or changed files load a new version first.
        let model_changed = old.model != new.model
            || new.model_source().files() != self.slot.current().version.files;
        let model = if model_changed {
            Some(self.switch_model(&new, "config reload")?)
        } else {
            None
        };
        // From here on nothing can fail.
        self.apply(&plan, specs, &old, &new);
        *lock(&self.config) = applied(&old, &new);
        if !restart.is_empty() {
            tracing::warn!(sections = ?restart, "config reloaded, but these sections only change on a restart");
        }
        let thresholds_changed = old.decide != new.decide || plan.thresholds_changed();
        tracing::info!(added = ?plan.added, removed = ?plan.removed, restarted = ?plan.modified,
            thresholds_changed, model_switched = model.is_some(), "config reloaded");
        Ok(json!({
            "applied": true,
            "cameras": {"added": plan.added, "removed": plan.removed, "restarted": plan.modified},
            "thresholds_changed": thresholds_changed,
            "events_changed": old.events != new.events,
            "model": model,
            "restart_required": restart,
        }))
    }

    /// Stops the removed and restarted cameras, sends decide and the sink their new settings,
    /// and starts the added and restarted cameras.
    fn apply(&self, plan: &CameraPlan, specs: Vec<SourceSpec>, old: &Config, new: &Config) {
        for name in plan.removed.iter().chain(&plan.modified) {
            self.stop_camera(name, Duration::from_secs(5));
            let _ = self
                .sink
                .send(SinkCommand::CameraRemoved { name: name.clone() });
        }
        let settings = new.decide_settings(&plan.after);
        self.control.set_decide(settings);
        if old.events != new.events {
            let _ = self.sink.send(SinkCommand::Events(new.events.clone()));
        }
        for spec in specs {
            let name = spec.name.to_string();
            let _ = self.sink.send(SinkCommand::CameraAdded(
                new.announcement(&name, &spec.camera),
            ));
            if let Err(e) = self.start_camera(spec) {
                tracing::warn!(camera = %name, error = %e, "cannot start the camera");
            }
        }
    }

    /// A camera's zones, to outline on its latest frame.
    fn zone_outlines(&self, camera: &str) -> Vec<(String, [f32; 4])> {
        let config = lock(&self.config);
        let Some(cam) = config.cameras.get(camera) else {
            return Vec::new();
        };
        cam.regions()
            .zones
            .iter()
            .map(|z| (z.name.to_string(), z.rect))
            .collect()
    }

    fn model_json(&self) -> Value {
        let v = self.slot.current().version.clone();
        json!({
            "name": v.info.name,
            "version": v.info.version,
            "variant": v.variant,
            "precision": v.precision,
            "provider": v.provider,
            "inference": self.inference_json(),
        })
    }

    /// The inference server of a remote provider: "up", or "down" with why and what happens to
    /// the frames meanwhile; null for a local provider.
    fn inference_json(&self) -> Value {
        if self.slot.current().version.provider != "remote" {
            return Value::Null;
        }
        let links: Vec<Value> = vigil_engine::remote::links()
            .iter()
            .map(|l| {
                json!({
                    "url": l.url,
                    "model": l.model,
                    "state": if l.up { "up" } else { "down" },
                    "since": timestamp(l.since),
                    "error": (!l.up).then_some(&l.last_error),
                    "frames": match (l.up, l.fallback) {
                        (true, _) => "sent to the server",
                        (false, Fallback::Local) => "classified by the local model",
                        (false, Fallback::None) => "dropped",
                    },
                })
            })
            .collect();
        match links.len() {
            1 => links.into_iter().next().unwrap_or_default(),
            _ => links.into(),
        }
    }

    /// Why frames cannot be classified now: a remote server down with no local fallback.
    fn inference_down(&self) -> Option<String> {
        if self.slot.current().version.provider != "remote" {
            return None;
        }
        vigil_engine::remote::links()
            .iter()
            .find(|l| !l.up && l.fallback == Fallback::None)
            .map(|l| {
                format!(
                    "inference server {} is down ({}); frames are dropped until it answers",
                    l.url, l.last_error
                )
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

    /// Decodes and prepares each image and queues it behind the cameras' frames; its result
    /// comes back on `reply`.
    fn submit_images(
        &self,
        images: Vec<Vec<u8>>,
        reply: &Sender<FrameResult>,
        deadline: Instant,
    ) -> Result<(), ApiError> {
        let spec = self.slot.current().spec().clone();
        let mut pre = Preprocessor::new(&spec);
        for (i, bytes) in images.into_iter().enumerate() {
            // Past the deadline the client has had its 504: decode nothing more.
            if Instant::now() >= deadline {
                return Err(self.timed_out());
            }
            let mat = crate::images::decode(&bytes)
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
                    reply: Some(reply.clone()),
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
        Ok(())
    }

    fn timed_out(&self) -> ApiError {
        ApiError::new(
            504,
            "timeout",
            format!("no result within {:?}", self.predict_timeout),
        )
    }

    /// The `n` results, in the order of the images, by `deadline`.
    fn collect_results(
        &self,
        n: usize,
        rx: &Receiver<FrameResult>,
        deadline: Instant,
    ) -> Result<Vec<Option<FrameResult>>, ApiError> {
        let mut results: Vec<Option<FrameResult>> = (0..n).map(|_| None).collect();
        for _ in 0..n {
            match rx.recv_deadline(deadline) {
                Ok(r) => {
                    let i = r.meta.index as usize;
                    results[i] = Some(r);
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    return Err(self.timed_out());
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
        Ok(results)
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
        if let Some(reason) = self.inference_down() {
            return Err(reason);
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
        let inference = self.inference_json();
        let list: Vec<Value> = self
            .control
            .stats()
            .cameras()
            .iter()
            .map(|(n, c)| self.camera_json(n, c, &inference))
            .collect();
        json!({ "cameras": list })
    }

    fn camera(&self, id: &str) -> Result<Value, ApiError> {
        let cam = self
            .control
            .stats()
            .camera(id)
            .ok_or_else(|| ApiError::not_found(format!("no camera named {id:?}")))?;
        let mut status = self.camera_json(id, &cam, &self.inference_json());
        status["latest_jpg"] = json!(format!(
            "{}/api/cameras/{id}/latest.jpg",
            self.shared.url_base
        ));
        Ok(status)
    }

    fn events(&self, query: &EventQuery) -> Value {
        let events = lock(&self.shared.events).query(query);
        json!({ "events": events })
    }

    fn latest_jpeg(&self, camera: &str, outline: bool) -> Result<Vec<u8>, ApiError> {
        if self.control.stats().camera(camera).is_none() {
            return Err(ApiError::not_found(format!("no camera named {camera:?}")));
        }
        let (pixels, annotation) = {
            let latest = lock(&self.shared.latest);
            let l = latest.get(camera).ok_or_else(|| {
                ApiError::new(
                    404,
                    "no_frame",
                    format!("camera {camera:?} has no analysed frame yet"),
                )
            })?;
            let label = match &l.zone {
                Some(z) => format!("{}: {}", z.name, l.label),
                None => l.label.to_string(),
            };
            (
                l.pixels.clone(),
                Annotation {
                    label,
                    score: l.score,
                    camera: camera.to_string(),
                    time: timestamp(l.wall),
                    zones: self.zone_outlines(camera),
                },
            )
        };
        let quality = lock(&self.config).snapshots.quality;
        let annotation = outline.then_some(annotation);
        snapshots::to_bgr(&pixels)
            .and_then(|m| snapshots::encode_jpeg(&m, annotation.as_ref(), quality))
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
                    "loaded_at": timestamp(r.loaded_at),
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
        deadline: Instant,
    ) -> Result<Value, ApiError> {
        self.check_model(name, version)?;
        let n = images.len();
        let (tx, rx) = crossbeam_channel::unbounded::<FrameResult>();
        self.submit_images(images, &tx, deadline)?;
        drop(tx);
        let results = self.collect_results(n, &rx, deadline)?;
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

    fn subscribe_events(&self) -> Option<tokio::sync::broadcast::Receiver<Arc<str>>> {
        Some(self.shared.feed.subscribe())
    }

    fn system(&self) -> Value {
        self.system.json()
    }

    fn save_zones(&self, camera: &str, zones: Value) -> Result<Value, ApiError> {
        self.save_zones_file(camera, &zones)
    }

    fn heads(&self) -> Value {
        self.teaching.heads(&self.config())
    }

    fn head_inbox(&self, head: &str) -> Result<Value, ApiError> {
        self.teaching.inbox(&self.config(), head)
    }

    fn head_sample(&self, head: &str, id: &str) -> Result<Vec<u8>, ApiError> {
        self.teaching.sample_jpeg(&self.config(), head, id)
    }

    fn label_sample(&self, head: &str, id: &str, label: Option<&str>) -> Result<Value, ApiError> {
        self.teaching.label(&self.config(), head, id, label)
    }

    fn train_head(&self, head: &str, force: bool) -> Result<Value, ApiError> {
        self.teaching.train(&self.config(), &self.slot, head, force)
    }

    fn train_status(&self, head: &str) -> Result<Value, ApiError> {
        self.teaching.job(head)
    }

    fn activate_head(&self, head: &str, version: u32) -> Result<Value, ApiError> {
        self.teaching.activate(&self.config(), head, version)
    }

    fn flag_wrong(&self, camera: &str) -> Result<Value, ApiError> {
        let config = self.config();
        let Some(stats) = self.control.stats().camera(camera) else {
            return Err(ApiError::not_found(format!("no camera named {camera:?}")));
        };
        if !teaching::has_head(&config, camera) {
            return Err(ApiError::new(
                409,
                "no_head",
                format!(
                    "camera {camera} has no head: bind one (cameras.{camera}.head) to capture \
                     frames for labelling"
                ),
            ));
        }
        crate::stats::flag_wrong(&stats);
        tracing::info!(
            camera,
            "answer flagged wrong by API request: the next frames are captured for labelling"
        );
        Ok(json!({"camera": camera, "flagged": true}))
    }

    fn flag_event(&self, id: &str) -> Result<Value, ApiError> {
        let Some(event) = lock(&self.shared.events).get(id) else {
            return Err(ApiError::not_found(format!(
                "no event {id:?} (the API keeps the last {} events: http.events_kept)",
                self.config().http.events_kept
            )));
        };
        let Some(head) = &event.head else {
            let region = match &event.zone {
                Some(zone) => format!("zone {zone} of camera {}", event.camera),
                None => format!("camera {}", event.camera),
            };
            return Err(ApiError::new(
                409,
                "no_head",
                format!(
                    "event {id} was labelled by the model's own classes: there is no head to \
                     teach; bind one to {region} to teach it your own"
                ),
            ));
        };
        let flags = self
            .event_flags
            .as_ref()
            .ok_or_else(|| ApiError::unavailable("vigil is starting: try again"))?;
        match flags.flag(id, FLAG_TIMEOUT) {
            Ok(f) => Ok(json!({
                "event": f.event, "camera": event.camera, "zone": event.zone,
                "head": head.name, "sample": f.sample, "flagged": true,
            })),
            Err(e @ FlagError::NotKept(_)) => Err(ApiError::new(410, "not_kept", e.to_string())),
            Err(e @ FlagError::Busy) => Err(ApiError::unavailable(e.to_string())),
            Err(e @ FlagError::Write { .. }) => {
                Err(ApiError::new(500, "write_failed", e.to_string()))
            }
        }
    }
}

/// How long an event flag waits for the capture thread.
const FLAG_TIMEOUT: Duration = Duration::from_secs(5);
