//! The configuration file: types, defaults and validation.
//!
//! Loading is done in two passes so that a broken file yields *all* its problems at once:
//! 1. the TOML is parsed, then each section (and each camera) is deserialised on its own, with
//!    unknown keys collected rather than fatal, so one bad section does not hide the others;
//! 2. [`Config::validate`] checks values and cross references (model files, labels named in
//!    thresholds and groups, pipeline templates).
//!
//! Every problem names its key, e.g. `cameras.porch.url: missing`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::events::EventsConfig;
pub use crate::infer::{InferenceConfig, Provider};
use crate::model::Manifest;

/// One problem found in a config file, with the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found in a config file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.file.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// Which frames a camera decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DecodeMode {
    /// Every frame.
    #[default]
    All,
    /// Only key frames: the others are dropped before the decoder, which saves most of the decode
    /// cost when a camera is analysed at a low rate.
    Keyframes,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The directory relative paths in the config are resolved against (the config file's).
    pub base_dir: PathBuf,
    pub model: ModelConfig,
    pub inference: InferenceConfig,
    pub pipeline: PipelineConfig,
    pub decide: DecideConfig,
    pub events: EventsConfig,
    pub mqtt: MqttConfig,
    pub homeassistant: HomeAssistantConfig,
    pub http: HttpConfig,
    pub snapshots: SnapshotConfig,
    pub cameras: BTreeMap<String, CameraConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// Name of the manifest: `<dir>/<name>.toml`.
    pub name: String,
    /// Directory holding manifests, model files and labels.
    pub dir: PathBuf,
    /// Which of the manifest's variants to load (e.g. "fp32").
    pub variant: String,
    /// Watch the manifest and the model file: when either changes, the new model is loaded,
    /// checked and switched to between two batches (as on a reload).
    pub watch: bool,
    /// How often the watched files are checked.
    #[serde(with = "humantime_serde")]
    pub watch_interval: Duration,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            name: "efficientnet-lite0".into(),
            dir: "models".into(),
            variant: "fp32".into(),
            watch: false,
            watch_interval: Duration::from_secs(2),
        }
    }
}

/// The HTTP server: health, metrics, the API, snapshots and the predict endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct HttpConfig {
    pub enabled: bool,
    /// Address and port to listen on. The default only accepts local clients.
    pub listen: String,
    /// Bearer token required on every endpoint but `/healthz` and `/readyz`.
    pub token: Option<String>,
    /// Read the token from this environment variable instead.
    pub token_env: Option<String>,
    /// Read the token from this file instead (its first line).
    pub token_file: Option<PathBuf>,
    /// Largest request body accepted, bytes.
    pub max_body_bytes: usize,
    /// Largest image accepted by the predict endpoint, in pixels (width x height), checked from
    /// the image's header before it is decoded.
    pub max_image_pixels: u64,
    /// Predict requests per second allowed to each client address (and the burst above it).
    pub predict_rate: u32,
    pub predict_burst: u32,
    /// How long a predict request may wait for its result.
    #[serde(with = "humantime_serde")]
    pub predict_timeout: Duration,
    /// Events kept in memory for `/api/events`.
    pub events_kept: usize,
    /// The server's address as clients reach it (e.g. "https://nvr.local:8080"), for the
    /// snapshot URLs in event payloads. Unset: the URLs are paths ("/api/events/...").
    pub public_url: Option<String>,
    pub tls: Option<HttpTlsConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:8080".into(),
            token: None,
            token_env: None,
            token_file: None,
            max_body_bytes: 16 << 20,
            max_image_pixels: 40_000_000,
            predict_rate: 10,
            predict_burst: 20,
            predict_timeout: Duration::from_secs(10),
            events_kept: 1000,
            public_url: None,
            tls: None,
        }
    }
}

impl HttpConfig {
    /// The bearer token, from the config, the environment variable or the file it names.
    pub fn resolved_token(&self) -> Result<Option<String>, String> {
        Ok(
            resolve_secret(&self.token, &self.token_env, &self.token_file)?
                .map(|t| t.trim().to_string()),
        )
    }
}

/// A secret given in the config, or by the environment variable or the file (its first line)
/// it names.
fn resolve_secret(
    value: &Option<String>,
    env: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<String>, String> {
    if let Some(var) = env {
        return std::env::var(var)
            .map(Some)
            .map_err(|_| format!("environment variable {var} is not set"));
    }
    if let Some(file) = file {
        return std::fs::read_to_string(file)
            .map(|t| Some(t.lines().next().unwrap_or("").to_string()))
            .map_err(|e| format!("cannot read {}: {e}", file.display()));
    }
    Ok(value.clone())
}

/// HTTPS for the HTTP server.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpTlsConfig {
    /// PEM certificate chain and private key.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// JPEG snapshots of the frame that started each event, kept on disk.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SnapshotConfig {
    pub enabled: bool,
    /// Directory the snapshots are written to (created if missing).
    pub dir: PathBuf,
    /// Most snapshots kept; the oldest are deleted beyond it.
    pub keep: usize,
    /// Snapshots older than this are deleted.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// JPEG quality, 1..=100.
    pub quality: u8,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: "snapshots".into(),
            keep: 500,
            max_age: Duration::from_secs(7 * 24 * 3600),
            quality: 85,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct PipelineConfig {
    /// Preprocess worker threads.
    pub workers: usize,
    /// Largest batch sent to the model.
    pub max_batch: usize,
    /// How long the batcher waits for a batch to fill after its first frame.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Capacity of each camera's frame queue (live sources drop the oldest frame when full).
    pub camera_queue: usize,
    /// A live camera's frame that waited longer than this is skipped when a newer frame of the
    /// same camera is already queued (bounds the latency when vigil falls behind; 0 = never).
    #[serde(with = "humantime_serde")]
    pub max_frame_age: Duration,
    /// Directory holding the pipeline templates (`<template>.gst`).
    pub templates: PathBuf,
    /// How often a summary of the figures (fps, drops, batch sizes) is logged.
    #[serde(with = "humantime_serde")]
    pub log_interval: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .min(4),
            max_batch: 8,
            max_wait: Duration::from_millis(20),
            camera_queue: 4,
            max_frame_age: Duration::from_millis(150),
            templates: "pipelines".into(),
            log_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GroupMode {
    /// The group's score is the highest of its members' scores.
    #[default]
    Max,
    /// The group's score is the sum of its members' scores (probabilities).
    Sum,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Model classes (labels) that make up the group.
    pub classes: Vec<String>,
    #[serde(default)]
    pub mode: GroupMode,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct DecideConfig {
    /// How many of the best classes each frame result lists.
    pub top_k: usize,
    /// Threshold for every class and group not named in `thresholds`.
    pub threshold: f32,
    /// Per class or group thresholds.
    pub thresholds: BTreeMap<String, f32>,
    /// Named sets of model classes, scored together.
    pub groups: BTreeMap<String, GroupConfig>,
}

impl Default for DecideConfig {
    fn default() -> Self {
        Self {
            top_k: 5,
            threshold: 0.5,
            thresholds: BTreeMap::new(),
            groups: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
    ExactlyOnce,
}

impl<'de> Deserialize<'de> for QosValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u8::deserialize(d)?;
        match n {
            0 => Ok(QosValue(Qos::AtMostOnce)),
            1 => Ok(QosValue(Qos::AtLeastOnce)),
            2 => Ok(QosValue(Qos::ExactlyOnce)),
            _ => Err(serde::de::Error::custom("must be 0, 1 or 2")),
        }
    }
}

/// A QoS level written as a number in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QosValue(pub Qos);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OverflowPolicy {
    /// Drop the oldest message of the lowest kind queued: per-frame results first, then state
    /// changes, events last.
    #[default]
    DropOldest,
    /// Refuse the new message unless it outranks a queued one (which then goes instead).
    DropNewest,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA(s) that signed the broker's certificate. Unset: the system's roots
    /// are not used; set `ca_file` (or `insecure`) to use TLS.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for brokers that require one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Accept any broker certificate (testing only: it disables the protection TLS gives).
    pub insecure: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    /// First level of every topic vigil publishes.
    pub topic_prefix: String,
    /// QoS of the per-frame results (detections, frames).
    pub qos_results: QosValue,
    /// QoS of events.
    pub qos_events: QosValue,
    /// QoS of the retained state topics (availability, status, ON/OFF).
    pub qos_state: QosValue,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Read the password from this environment variable instead.
    pub password_env: Option<String>,
    /// Read the password from this file instead (its first line).
    pub password_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Start each connection with a clean session.
    pub clean_session: bool,
    /// Reconnect backoff: first delay, doubled up to `reconnect_max`.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Publish events (start/update/end) on `<prefix>/events` and `<prefix>/<camera>/events`.
    pub publish_events: bool,
    /// Publish every detection on `<prefix>/<camera>/detection/<label>` (per frame: a lot).
    pub publish_detections: bool,
    /// Publish every frame's top-k on `<prefix>/<camera>/frames` (per frame: a lot).
    pub publish_frames: bool,
    /// Messages kept while the broker is away (or slow); beyond it, `overflow` decides.
    pub outbox: usize,
    pub overflow: OverflowPolicy,
    pub tls: Option<TlsConfig>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "localhost".into(),
            port: 1883,
            client_id: "vigil".into(),
            topic_prefix: "vigil".into(),
            qos_results: QosValue(Qos::AtMostOnce),
            qos_events: QosValue(Qos::AtLeastOnce),
            qos_state: QosValue(Qos::AtLeastOnce),
            username: None,
            password: None,
            password_env: None,
            password_file: None,
            keep_alive: Duration::from_secs(30),
            clean_session: true,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            publish_events: true,
            publish_detections: false,
            publish_frames: false,
            outbox: 10_000,
            overflow: OverflowPolicy::DropOldest,
            tls: None,
        }
    }
}

impl MqttConfig {
    /// The password, from the config, the environment variable or the file it names.
    pub fn resolved_password(&self) -> Result<Option<String>, String> {
        resolve_secret(&self.password, &self.password_env, &self.password_file)
    }
}

/// Home Assistant MQTT discovery.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HomeAssistantConfig {
    /// Publish discovery configs so Home Assistant creates a device per camera.
    pub discovery: bool,
    /// Home Assistant's discovery prefix.
    pub prefix: String,
    /// The node id in discovery topics; default: `mqtt.client_id`.
    pub node_id: Option<String>,
}

impl Default for HomeAssistantConfig {
    fn default() -> Self {
        Self {
            discovery: true,
            prefix: "homeassistant".into(),
            node_id: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Rtsp,
    File,
    Test,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    #[default]
    H264,
    H265,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RtspTransport {
    #[default]
    Tcp,
    Udp,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct CameraConfig {
    pub enabled: bool,
    pub source: SourceKind,
    /// rtsp: `rtsp://[user:pass@]host[:port]/path`.
    pub url: Option<String>,
    /// rtsp: credentials kept out of the URL (so they never show in logs).
    pub username: Option<String>,
    pub password: Option<String>,
    pub codec: Codec,
    pub transport: RtspTransport,
    /// rtsp: jitter buffer latency.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// file: path of the video file.
    pub path: Option<PathBuf>,
    /// file: start again at the end.
    #[serde(rename = "loop")]
    pub looping: bool,
    /// file: pace frames to real time, like a live camera (and drop frames when behind, like one).
    pub realtime: bool,
    /// test: videotestsrc pattern.
    pub pattern: String,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// Frames per second to analyse; the rest are dropped before any copy. 0 = all.
    pub analyze_fps: f64,
    /// "all" or "keyframes" (drop the other frames before the decoder).
    pub decode: DecodeMode,
    /// Pipeline template name (`pipelines/<template>.gst`); default from the source kind.
    pub template: Option<String>,
    /// Extra element properties, `"element.property" = "value"`, set after the template is parsed.
    pub properties: BTreeMap<String, String>,
    /// Per class or group thresholds for this camera, over `decide.thresholds`.
    pub thresholds: BTreeMap<String, f32>,
    /// Reconnect backoff after a pipeline error (doubling, with +-20% jitter).
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Watchdog: a camera that delivers no frame for this long while playing is reconnected.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// Watchdog before the first frame (connecting, waiting for a key frame).
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
}

impl Default for CameraConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            source: SourceKind::Test,
            url: None,
            username: None,
            password: None,
            codec: Codec::H264,
            transport: RtspTransport::Tcp,
            latency: Duration::from_millis(200),
            path: None,
            looping: false,
            realtime: false,
            pattern: "smpte".into(),
            width: 640,
            height: 480,
            fps: 25,
            analyze_fps: 0.0,
            decode: DecodeMode::All,
            template: None,
            properties: BTreeMap::new(),
            thresholds: BTreeMap::new(),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(5),
            start_timeout: Duration::from_secs(20),
        }
    }
}

impl CameraConfig {
    /// The template this camera's pipeline is built from.
    pub fn template_name(&self) -> String {
        if let Some(t) = &self.template {
            return t.clone();
        }
        match (self.source, self.codec) {
            (SourceKind::Rtsp, Codec::H264) => "rtsp-h264".into(),
            (SourceKind::Rtsp, Codec::H265) => "rtsp-h265".into(),
            (SourceKind::File, _) => "file".into(),
            (SourceKind::Test, _) => "test".into(),
        }
    }

    /// Live cameras drop the oldest frame when vigil falls behind; non-realtime files block instead.
    pub fn is_live(&self) -> bool {
        match self.source {
            SourceKind::Rtsp | SourceKind::Test => true,
            SourceKind::File => self.realtime,
        }
    }
}

/// The top-level sections, as raw TOML before each is deserialised on its own.
const SECTIONS: &[&str] = &[
    "model",
    "inference",
    "pipeline",
    "decide",
    "events",
    "mqtt",
    "homeassistant",
    "http",
    "snapshots",
    "cameras",
];

impl Config {
    /// Reads, parses and validates a config file; every problem is reported together.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            file: path.to_path_buf(),
            problems,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            fail(vec![Problem {
                key: "(file)".into(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        let base_dir = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let config = Config::parse(&text, base_dir).map_err(fail)?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(problems))
        }
    }

    /// Like [`Config::load`], but cameras are neither needed nor checked (for `vigil classify`).
    pub fn load_without_cameras(path: &Path) -> Result<Config, ConfigError> {
        match Config::load(path) {
            Ok(c) => Ok(c),
            Err(mut e) => {
                e.problems.retain(|p| !p.key.starts_with("cameras"));
                if e.problems.is_empty() {
                    let text = std::fs::read_to_string(path).unwrap_or_default();
                    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
                    let mut c = Config::parse(&text, base).map_err(|problems| ConfigError {
                        file: path.to_path_buf(),
                        problems,
                    })?;
                    c.cameras.clear();
                    Ok(c)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Parses config text; structural problems (syntax, unknown keys, wrong types) of every
    /// section are collected. Does not check values; see [`Config::validate`].
    pub fn parse(text: &str, base_dir: PathBuf) -> Result<Config, Vec<Problem>> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            vec![Problem {
                key: "(syntax)".into(),
                message: e.to_string().trim().replace('\n', " "),
            }]
        })?;
        let mut problems = Vec::new();
        for key in table.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                problems.push(Problem {
                    key: key.clone(),
                    message: format!("unknown section (expected one of: {})", SECTIONS.join(", ")),
                });
            }
        }
        let model = section(&table, "model", &mut problems);
        let inference = section(&table, "inference", &mut problems);
        let pipeline = section(&table, "pipeline", &mut problems);
        let decide = section(&table, "decide", &mut problems);
        let events = section(&table, "events", &mut problems);
        let mqtt = section(&table, "mqtt", &mut problems);
        let homeassistant = section(&table, "homeassistant", &mut problems);
        let http = section(&table, "http", &mut problems);
        let snapshots = section(&table, "snapshots", &mut problems);
        let mut cameras = BTreeMap::new();
        match table.get("cameras") {
            None => {}
            Some(toml::Value::Table(t)) => {
                for (name, value) in t {
                    let key = format!("cameras.{name}");
                    if let Some(cam) =
                        from_value::<CameraConfig>(value.clone(), &key, &mut problems)
                    {
                        cameras.insert(name.clone(), cam);
                    }
                }
            }
            Some(_) => problems.push(Problem {
                key: "cameras".into(),
                message: "must be a table of cameras, e.g. [cameras.porch]".into(),
            }),
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Config {
            base_dir,
            model: model.unwrap_or_default(),
            inference: inference.unwrap_or_default(),
            pipeline: pipeline.unwrap_or_default(),
            decide: decide.unwrap_or_default(),
            events: events.unwrap_or_default(),
            mqtt: mqtt.unwrap_or_default(),
            homeassistant: homeassistant.unwrap_or_default(),
            http: http.unwrap_or_default(),
            snapshots: snapshots.unwrap_or_default(),
            cameras,
        })
    }

    /// Resolves a path from the config against the config file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.resolve(&self.model.dir)
            .join(format!("{}.toml", self.model.name))
    }

    pub fn templates_dir(&self) -> PathBuf {
        self.resolve(&self.pipeline.templates)
    }

    fn validate_http(&self, p: &mut Problems) {
        let h = &self.http;
        if !h.enabled {
            return;
        }
        if h.listen.parse::<std::net::SocketAddr>().is_err() {
            p.push(
                "http.listen",
                format!(
                    "{:?} is not an address and port, e.g. \"127.0.0.1:8080\"",
                    h.listen
                ),
            );
        }
        let sources = [
            h.token.is_some(),
            h.token_env.is_some(),
            h.token_file.is_some(),
        ];
        if sources.iter().filter(|b| **b).count() > 1 {
            p.push("http.token", "set one of token, token_env and token_file");
        }
        let mut resolved = h.clone();
        resolved.token_file = h.token_file.as_ref().map(|f| self.resolve(f));
        match resolved.resolved_token() {
            Err(e) => p.push(
                if h.token_env.is_some() {
                    "http.token_env"
                } else {
                    "http.token_file"
                },
                e,
            ),
            Ok(Some(t)) if t.is_empty() => p.push("http.token", "must not be empty"),
            Ok(_) => {}
        }
        if h.max_body_bytes < 1024 {
            p.push("http.max_body_bytes", "must be at least 1024");
        }
        if h.max_image_pixels == 0 {
            p.push("http.max_image_pixels", "must be at least 1");
        }
        if h.predict_rate == 0 || h.predict_burst == 0 {
            p.push(
                "http.predict_rate",
                "predict_rate and predict_burst must be at least 1",
            );
        }
        if h.predict_timeout.is_zero() {
            p.push("http.predict_timeout", "must be above 0");
        }
        if h.events_kept == 0 {
            p.push("http.events_kept", "must be at least 1");
        }
        if let Some(tls) = &h.tls {
            for (key, f) in [("cert_file", &tls.cert_file), ("key_file", &tls.key_file)] {
                if !self.resolve(f).is_file() {
                    p.push(
                        format!("http.tls.{key}"),
                        format!("{} is not a file", f.display()),
                    );
                }
            }
        }
    }

    /// Checks values and cross references. Returns every problem found.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Problems::default();
        let pl = &self.pipeline;
        if pl.workers == 0 {
            p.push("pipeline.workers", "must be at least 1");
        }
        if pl.max_batch == 0 {
            p.push("pipeline.max_batch", "must be at least 1");
        }
        if pl.camera_queue == 0 {
            p.push("pipeline.camera_queue", "must be at least 1");
        }
        if pl.max_wait > Duration::from_secs(5) {
            p.push("pipeline.max_wait", "must be at most 5s (it adds latency)");
        }
        if !(1..=16).contains(&self.inference.sessions) {
            p.push("inference.sessions", "must be in 1..=16");
        }
        if self.model.watch && self.model.watch_interval < Duration::from_millis(100) {
            p.push("model.watch_interval", "must be at least 100ms");
        }
        self.validate_http(&mut p);
        let s = &self.snapshots;
        if s.enabled {
            if s.keep == 0 {
                p.push(
                    "snapshots.keep",
                    "must be at least 1 (or set enabled = false)",
                );
            }
            if !(1..=100).contains(&s.quality) {
                p.push("snapshots.quality", "must be in 1..=100");
            }
            if s.max_age.is_zero() {
                p.push("snapshots.max_age", "must be above 0");
            }
        }
        let d = &self.decide;
        if d.top_k == 0 {
            p.push("decide.top_k", "must be at least 1");
        }
        check_threshold(&mut p, "decide.threshold", d.threshold);
        let m = &self.mqtt;
        if m.host.trim().is_empty() {
            p.push("mqtt.host", "must not be empty");
        }
        if m.port == 0 {
            p.push("mqtt.port", "must not be 0");
        }
        if m.client_id.is_empty() {
            p.push("mqtt.client_id", "must not be empty");
        }
        if !valid_topic_level_path(&m.topic_prefix) {
            p.push(
                "mqtt.topic_prefix",
                "must be non-empty and free of '+', '#' and empty levels",
            );
        }
        if m.reconnect_min.is_zero() || m.reconnect_min > m.reconnect_max {
            p.push(
                "mqtt.reconnect_min",
                "must be above 0 and at most mqtt.reconnect_max",
            );
        }
        if m.keep_alive < Duration::from_secs(1) {
            p.push("mqtt.keep_alive", "must be at least 1s");
        }
        if m.outbox == 0 {
            p.push("mqtt.outbox", "must be at least 1");
        }
        let password_sources = [
            m.password.is_some(),
            m.password_env.is_some(),
            m.password_file.is_some(),
        ];
        if password_sources.iter().filter(|b| **b).count() > 1 {
            p.push(
                "mqtt.password",
                "set one of password, password_env and password_file",
            );
        }
        let mut resolved = m.clone();
        if let Some(f) = &m.password_file {
            resolved.password_file = Some(self.resolve(f));
        }
        if let Err(e) = resolved.resolved_password() {
            p.push(
                if m.password_env.is_some() {
                    "mqtt.password_env"
                } else {
                    "mqtt.password_file"
                },
                e,
            );
        }
        if password_sources.iter().any(|b| *b) && m.username.is_none() {
            p.push("mqtt.username", "required when a password is set");
        }
        if let Some(tls) = &m.tls {
            for (key, file) in [
                ("ca_file", &tls.ca_file),
                ("cert_file", &tls.cert_file),
                ("key_file", &tls.key_file),
            ] {
                if let Some(f) = file
                    && !self.resolve(f).is_file()
                {
                    p.push(
                        format!("mqtt.tls.{key}"),
                        format!("{} does not exist", self.resolve(f).display()),
                    );
                }
            }
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                p.push("mqtt.tls.cert_file", "cert_file and key_file go together");
            }
            if tls.ca_file.is_none() && !tls.insecure {
                p.push(
                    "mqtt.tls.ca_file",
                    "required (the CA that signed the broker's certificate), unless insecure = true",
                );
            }
        }
        let e = &self.events;
        if !(0.0..=1.0).contains(&e.hysteresis) {
            p.push("events.hysteresis", "must be in 0..1");
        }
        if e.update_interval < Duration::from_millis(100) {
            p.push("events.update_interval", "must be at least 100ms");
        }
        if !valid_topic_level_path(&self.homeassistant.prefix) {
            p.push("homeassistant.prefix", "must be a valid topic prefix");
        }

        // The model: manifest, files, labels.
        let manifest = match Manifest::load(&self.manifest_path()) {
            Ok(man) => {
                match man.variant(&self.model.variant) {
                    Ok(v) => {
                        if !v.file.is_file() {
                            p.push(
                                "model.variant",
                                format!("model file {} does not exist", v.file.display()),
                            );
                        }
                    }
                    Err(e) => p.push("model.variant", e.to_string()),
                }
                Some(man)
            }
            Err(e) => {
                p.push("model.name", e.to_string());
                None
            }
        };
        let labels = manifest.as_ref().map(|m| m.labels.as_slice());

        for (name, g) in &d.groups {
            let key = format!("decide.groups.{}", quote_key(name));
            if g.classes.is_empty() {
                p.push(format!("{key}.classes"), "must name at least one class");
            }
            if let Some(labels) = labels {
                if labels.iter().any(|l| l == name) {
                    p.push(key.clone(), "a group cannot have the name of a model class");
                }
                for c in &g.classes {
                    if !labels.iter().any(|l| l == c) {
                        p.push(format!("{key}.classes"), unknown_label(c, labels));
                    }
                }
            }
        }
        let check_thresholds = |p: &mut Problems, prefix: &str, map: &BTreeMap<String, f32>| {
            for (label, t) in map {
                let key = format!("{prefix}.{}", quote_key(label));
                check_threshold(p, &key, *t);
                if let Some(labels) = labels
                    && !labels.iter().any(|l| l == label)
                    && !d.groups.contains_key(label)
                {
                    p.push(key, unknown_label(label, labels));
                }
            }
        };
        check_thresholds(&mut p, "decide.thresholds", &d.thresholds);
        if let Some(labels) = labels {
            for w in &self.events.watch {
                if !labels.iter().any(|l| l == w) && !d.groups.contains_key(w) {
                    p.push("events.watch", unknown_label(w, labels));
                }
            }
        }

        if self.cameras.is_empty() {
            p.push("cameras", "no camera configured");
        }
        for (name, cam) in &self.cameras {
            let key = format!("cameras.{}", quote_key(name));
            if !valid_camera_name(name) {
                p.push(
                    key.clone(),
                    "camera names may hold only letters, digits, '-' and '_' (they become MQTT topic levels)",
                );
            }
            check_thresholds(&mut p, &format!("{key}.thresholds"), &cam.thresholds);
            match cam.source {
                SourceKind::Rtsp => match &cam.url {
                    None => p.push(
                        format!("{key}.url"),
                        "missing (required for an rtsp source)",
                    ),
                    Some(u) => {
                        if let Err(e) = crate::redact::check_rtsp_url(u) {
                            p.push(format!("{key}.url"), e);
                        }
                    }
                },
                SourceKind::File => match &cam.path {
                    None => p.push(
                        format!("{key}.path"),
                        "missing (required for a file source)",
                    ),
                    Some(path) => {
                        let full = self.resolve(path);
                        if !full.is_file() {
                            p.push(
                                format!("{key}.path"),
                                format!("{} does not exist", full.display()),
                            );
                        }
                    }
                },
                SourceKind::Test => {}
            }
            if cam.source != SourceKind::Rtsp && cam.url.is_some() {
                p.push(format!("{key}.url"), "only used by rtsp sources");
            }
            if cam.source != SourceKind::File && cam.path.is_some() {
                p.push(format!("{key}.path"), "only used by file sources");
            }
            if cam.width == 0 || cam.height == 0 || cam.width > 7680 || cam.height > 4320 {
                p.push(
                    format!("{key}.width"),
                    "width and height must be in 1..=7680 x 1..=4320",
                );
            }
            if cam.fps == 0 || cam.fps > 240 {
                p.push(format!("{key}.fps"), "must be in 1..=240");
            }
            if !(cam.analyze_fps >= 0.0 && cam.analyze_fps.is_finite()) {
                p.push(
                    format!("{key}.analyze_fps"),
                    "must be 0 (all frames) or positive",
                );
            }
            if cam.retry_min.is_zero() || cam.retry_min > cam.retry_max {
                p.push(
                    format!("{key}.retry_min"),
                    "must be above 0 and at most retry_max",
                );
            }
            if cam.stall_timeout < Duration::from_millis(500) {
                p.push(format!("{key}.stall_timeout"), "must be at least 500ms");
            }
            if cam.start_timeout < Duration::from_secs(1) {
                p.push(format!("{key}.start_timeout"), "must be at least 1s");
            }
            let template = cam.template_name();
            if !valid_camera_name(&template) {
                p.push(
                    format!("{key}.template"),
                    "must be a plain name like rtsp-h264",
                );
            } else if let Err(e) = crate::source::load_template(&self.templates_dir(), &template) {
                p.push(format!("{key}.template"), e);
            }
            for prop in cam.properties.keys() {
                if prop
                    .split_once('.')
                    .is_none_or(|(e, p)| e.is_empty() || p.is_empty())
                {
                    p.push(
                        format!("{key}.properties.{}", quote_key(prop)),
                        "must be written \"element.property\"",
                    );
                }
            }
        }
        p.0
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }
}

fn check_threshold(p: &mut Problems, key: &str, t: f32) {
    if !(0.0..=1.0).contains(&t) {
        p.push(key, format!("must be in 0..1 (got {t})"));
    }
}

fn unknown_label(label: &str, labels: &[String]) -> String {
    let best = labels
        .iter()
        .map(|l| (strsim::jaro_winkler(label, l), l))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((score, l)) if score > 0.85 => {
            format!("unknown label {label:?} (did you mean {l:?}?)")
        }
        _ => format!("unknown label {label:?}: not a class of the model, nor a group"),
    }
}

fn quote_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        format!("{k:?}")
    }
}

pub fn valid_camera_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn valid_topic_level_path(s: &str) -> bool {
    !s.is_empty()
        && s.split('/')
            .all(|l| !l.is_empty() && !l.contains(['+', '#']))
}

fn section<T: DeserializeOwned + Default>(
    table: &toml::Table,
    name: &str,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    match table.get(name) {
        None => Some(T::default()),
        Some(v @ toml::Value::Table(_)) => from_value(v.clone(), name, problems),
        Some(_) => {
            problems.push(Problem {
                key: name.into(),
                message: format!("must be a table, e.g. [{name}]"),
            });
            None
        }
    }
}

/// Deserialises one section, collecting unknown keys and the first type error as problems.
fn from_value<T: DeserializeOwned>(
    value: toml::Value,
    key: &str,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    let mut unknown = Vec::new();
    let result: Result<T, _> = serde_ignored::deserialize(value, |path| {
        unknown.push(path.to_string());
    });
    for u in unknown {
        problems.push(Problem {
            key: format!("{key}.{u}"),
            message: "unknown key".into(),
        });
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            problems.push(Problem {
                key: key.into(),
                message: e.to_string().trim().replace('\n', " "),
            });
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_structural_problem_of_every_section_is_reported_together() {
        let text = r#"
            [pipeline]
            max_batch = "eight"
            [mqtt]
            prot = 1883
            [cameras.a]
            source = "webcam"
            [cameras.b]
            source = "test"
            colour = "red"
            [bogus]
        "#;
        let problems = Config::parse(text, ".".into()).unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"bogus"), "{problems:?}");
        assert!(keys.contains(&"pipeline"), "{problems:?}");
        assert!(keys.contains(&"mqtt.prot"), "{problems:?}");
        assert!(keys.contains(&"cameras.a"), "{problems:?}");
        assert!(keys.contains(&"cameras.b.colour"), "{problems:?}");
    }

    #[test]
    fn a_syntax_error_names_the_line() {
        let problems = Config::parse("[mqtt\nhost=1", ".".into()).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].message.contains("line 1"), "{problems:?}");
    }

    #[test]
    fn durations_are_written_in_human_units() {
        let c = Config::parse(
            "[pipeline]\nmax_wait = \"35ms\"\n[mqtt]\nkeep_alive = \"1m\"",
            ".".into(),
        )
        .unwrap();
        assert_eq!(c.pipeline.max_wait, Duration::from_millis(35));
        assert_eq!(c.mqtt.keep_alive, Duration::from_secs(60));
    }

    #[test]
    fn qos_must_be_0_1_or_2() {
        let problems = Config::parse("[mqtt]\nqos_events = 3", ".".into()).unwrap_err();
        assert!(problems[0].message.contains("0, 1 or 2"), "{problems:?}");
    }

    #[test]
    fn a_near_miss_label_gets_a_suggestion() {
        let labels = vec!["fox squirrel".to_string(), "orange".to_string()];
        assert!(unknown_label("fox squirel", &labels).contains("did you mean \"fox squirrel\""));
        assert!(!unknown_label("zebra", &labels).contains("did you mean"));
    }
}
