//! The configuration file: its sections, defaults, loading and (in `validate.rs`) checks. Each
//! stage's own section is defined next to its code (`[pipeline]` in pipeline/, `[mqtt]` in
//! publish/, `[cameras.*]` in source/...) and gathered here; the sections of the rooms above
//! the config (`[model]`, `[snapshots]`, and `[http]` in `http.rs`) are defined here.
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
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
pub use vigil_engine::infer::{InferenceConfig, Provider};
use vigil_engine::serving::{LoadedModel, ModelError, ModelSource};

use crate::events::EventsConfig;
pub use crate::pipeline::PipelineConfig;
pub use crate::pipeline::decide::{
    DecideConfig, DecideSettings, GroupConfig, GroupMode, HeadBinding,
};
use crate::pipeline::heads::{self, Head, HeadError};
use crate::publish::CameraAnnouncement;
pub use crate::publish::homeassistant::HomeAssistantConfig;
pub use crate::publish::mqtt::MqttConfig;
pub use crate::source::{CameraConfig, DecodeMode, SourceError, SourceKind, SourceSpec};
pub use crate::teach::TeachConfig;
pub use http::{HostName, HostPattern, HttpConfig, HttpTlsConfig, parse_authority};
pub use validate::{check_rect, valid_camera_name};

mod cluster;
mod http;
mod validate;

pub use cluster::{ClusterConfig, MAX_REPLICAS, owner, replica_index};

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

#[derive(Debug, Clone, PartialEq)]
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
    pub teach: TeachConfig,
    pub cluster: ClusterConfig,
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
    "teach",
    "cluster",
    "cameras",
];

/// ONNX Runtime threads per operator for live cameras on a machine of `cores` cores.
pub fn live_intra_threads(cores: usize) -> usize {
    (cores / 2).max(1)
}

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
                message: syntax_problem(text, &e),
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
        let teach = section(&table, "teach", &mut problems);
        let cluster = section(&table, "cluster", &mut problems);
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
        let mut inference: InferenceConfig = inference.unwrap_or_default();
        if let Some(ca) = inference.remote.as_mut().and_then(|r| r.ca_file.as_mut())
            && ca.is_relative()
        {
            *ca = base_dir.join(&*ca);
        }
        Ok(Config {
            base_dir,
            model: model.unwrap_or_default(),
            inference,
            pipeline: pipeline.unwrap_or_default(),
            decide: decide.unwrap_or_default(),
            events: events.unwrap_or_default(),
            mqtt: mqtt.unwrap_or_default(),
            homeassistant: homeassistant.unwrap_or_default(),
            http: http.unwrap_or_default(),
            snapshots: snapshots.unwrap_or_default(),
            teach: teach.unwrap_or_default(),
            cluster: cluster.unwrap_or_default(),
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

    /// Checks values and cross references. Returns every problem found.
    pub fn validate(&self) -> Vec<Problem> {
        validate::validate(self)
    }

    /// The labels the event lifecycle follows: `events.watch` when given, else every group and
    /// every class named in a thresholds table (the config's own or a camera's).
    pub fn watched_labels(&self) -> Vec<String> {
        if !self.events.watch.is_empty() {
            return self.events.watch.clone();
        }
        let mut labels: Vec<String> = self.decide.groups.keys().cloned().collect();
        let named = self
            .decide
            .thresholds
            .keys()
            .chain(self.cameras.values().flat_map(|c| c.thresholds.keys()))
            .chain(
                self.cameras
                    .values()
                    .flat_map(|c| c.zones.values().flat_map(|z| z.thresholds.keys())),
            );
        for l in named {
            if !labels.contains(l) {
                labels.push(l.clone());
            }
        }
        labels
    }

    /// What decide needs of this config for `cameras`: thresholds, groups, watched labels.
    pub fn decide_settings<'a>(
        &self,
        cameras: impl IntoIterator<Item = (&'a String, &'a CameraConfig)>,
    ) -> DecideSettings {
        let cameras: Vec<(&String, &CameraConfig)> = cameras.into_iter().collect();
        DecideSettings {
            decide: self.decide.clone(),
            cameras: cameras
                .iter()
                .map(|(n, c)| (n.to_string(), c.thresholds.clone()))
                .collect(),
            zones: cameras
                .iter()
                .flat_map(|(n, c)| {
                    c.zones
                        .iter()
                        .map(|(z, zc)| (n.to_string(), z.clone(), zc.thresholds.clone()))
                })
                .collect(),
            watch: self.watched_labels(),
            heads: self.head_bindings(&cameras),
            background: self.teach.background.clone(),
        }
    }

    /// The heads `cameras` and their zones name, each with its version in service when it has
    /// one (an untrained head leaves its regions the backbone's labels; a head that cannot be
    /// read, too, with a warning).
    pub fn head_bindings(&self, cameras: &[(&String, &CameraConfig)]) -> Vec<HeadBinding> {
        let dir = self.heads_dir();
        let mut loaded: BTreeMap<String, Option<Arc<Head>>> = BTreeMap::new();
        let mut load = |name: &str| {
            loaded
                .entry(name.to_string())
                .or_insert_with(|| match heads::load_current(&dir, name) {
                    Ok(h) => Some(Arc::new(h)),
                    Err(HeadError::NoVersion { .. }) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot load the head; its regions keep the model's labels");
                        None
                    }
                })
                .clone()
        };
        let mut bindings = Vec::new();
        for (camera, c) in cameras {
            if let Some(name) = &c.head {
                bindings.push(HeadBinding {
                    camera: Some(camera.to_string()),
                    zone: None,
                    name: name.clone(),
                    head: load(name),
                });
            }
            for (zone, z) in &c.zones {
                if let Some(name) = &z.head {
                    bindings.push(HeadBinding {
                        camera: Some(camera.to_string()),
                        zone: Some(zone.clone()),
                        name: name.clone(),
                        head: load(name),
                    });
                }
            }
        }
        bindings
    }

    /// Every head the cameras and zones name.
    pub fn head_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .cameras
            .values()
            .flat_map(|c| {
                c.head
                    .iter()
                    .chain(c.zones.values().flat_map(|z| z.head.iter()))
            })
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// How the publisher announces camera `name`: its regions and the labels watched in them.
    pub fn announcement(&self, name: &str, cam: &CameraConfig) -> CameraAnnouncement {
        let regions = cam.regions();
        let mut watched = self.watched_labels();
        // The labels of the heads in service on the camera's regions, but background ones.
        let dir = self.heads_dir();
        for head in cam
            .head
            .iter()
            .chain(cam.zones.values().flat_map(|z| z.head.iter()))
        {
            let labels = heads::current_version(&dir, head)
                .and_then(|v| heads::read_manifest(&dir, head, v).ok())
                .map(|m| m.labels)
                .unwrap_or_default();
            for l in labels {
                if !self.teach.background.contains(&l) && !watched.contains(&l) {
                    watched.push(l);
                }
            }
        }
        CameraAnnouncement {
            name: name.to_string(),
            whole_frame: regions.whole_frame,
            zones: regions.zones.iter().map(|z| z.name.to_string()).collect(),
            watched,
        }
    }

    /// The enabled cameras, by name.
    pub fn enabled_cameras(&self) -> BTreeMap<String, CameraConfig> {
        self.cameras
            .iter()
            .filter(|(_, c)| c.enabled)
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect()
    }

    /// Camera `name`'s pipeline spec, its template read and its file resolved.
    pub fn source_spec(&self, name: &str, cam: &CameraConfig) -> Result<SourceSpec, SourceError> {
        let mut spec = SourceSpec::new(name, cam, &self.templates_dir(), &self.base_dir)?;
        spec.max_frame_age = self.pipeline.max_frame_age;
        Ok(spec)
    }

    /// Where the heads' versions are: `teach.heads`, else `<model dir>/heads`.
    pub fn heads_dir(&self) -> PathBuf {
        match &self.teach.heads {
            Some(dir) => self.resolve(dir),
            None => self.resolve(&self.model.dir).join("heads"),
        }
    }

    /// Where the measured batch sizes are kept (`pipeline.tuning_cache`); None when it is not
    /// set, or set to "" (measured at every start).
    pub fn tuning_cache(&self) -> Option<PathBuf> {
        self.pipeline
            .tuning_cache
            .as_ref()
            .filter(|path| !path.as_os_str().is_empty())
            .map(|path| self.resolve(path))
    }

    /// Where the training sets are (`teach.data`).
    pub fn teach_data(&self) -> PathBuf {
        self.resolve(&self.teach.data)
    }

    /// The config as `vigil run` uses it. `inference.intra_threads = 0` becomes half this
    /// machine's cores (at least one): live cameras decode on the other half all the time, and
    /// ONNX Runtime's threads, one per core by default, wait for each other at every operator
    /// while a decoder holds one of those cores. On two cores, with 64 live cameras seeing an
    /// object at once, one thread per operator ran a frame in 10-13 ms where two took 12-23 ms,
    /// for less CPU (benches/density.py). `vigil classify` and `vigil train` keep one per core:
    /// their files and images are read flat out, not paced.
    pub fn for_live(mut self) -> Config {
        if self.inference.intra_threads == 0 {
            self.inference.intra_threads = live_intra_threads(crate::source::spec::cores());
        }
        self
    }

    /// The model this config names, and how to run it.
    pub fn model_source(&self) -> ModelSource {
        ModelSource {
            manifest: self.manifest_path(),
            variant: self.model.variant.clone(),
            inference: self.inference.clone(),
            base_dir: self.base_dir.clone(),
        }
    }

    /// Loads the configured model (every session); the log says which execution provider runs it.
    pub fn load_model(&self) -> Result<LoadedModel, ModelError> {
        LoadedModel::load(&self.model_source())
    }
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

/// A TOML syntax error as its line, column and message, without the line itself: the line may
/// hold a secret (an unterminated password string, say).
fn syntax_problem(text: &str, e: &toml::de::Error) -> String {
    let mut at = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    format!(
        "TOML parse error at line {line}, column {column}: {}",
        without_values(e.message())
    )
}

/// A deserialisation message without the value it complains about (`invalid type: string
/// "hunter2", expected u16` → `invalid type: string, expected u16`): the value may be a secret
/// written under the wrong key.
fn without_values(message: &str) -> String {
    let mut out = message.to_string();
    for marker in ["invalid type: ", "invalid value: ", "invalid length "] {
        let Some(start) = out.find(marker).map(|i| i + marker.len()) else {
            continue;
        };
        let end = out[start..]
            .find(", expected")
            .map_or(out.len(), |i| start + i);
        let kind = out[start..end]
            .split(['"', '`'])
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        out.replace_range(start..end, &kind);
    }
    out
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
                message: without_values(e.to_string().trim()).replace('\n', " "),
            });
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::validate::unknown_label;
    use super::*;

    #[test]
    fn live_runs_give_inference_half_the_cores_unless_the_config_says() {
        assert_eq!(
            [1, 2, 3, 4, 8, 16].map(live_intra_threads),
            [1, 1, 1, 2, 4, 8]
        );
        let auto = Config::parse("", PathBuf::from(".")).unwrap();
        assert_eq!(auto.inference.intra_threads, 0);
        assert_eq!(
            auto.for_live().inference.intra_threads,
            live_intra_threads(crate::source::spec::cores())
        );
        let set = Config::parse("[inference]\nintra_threads = 3\n", PathBuf::from(".")).unwrap();
        assert_eq!(set.for_live().inference.intra_threads, 3);
    }

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
    fn errors_name_the_place_but_never_quote_the_value() {
        for text in [
            "[mqtt]\npassword = \"hunter2secret\nport = 1",
            "[mqtt]\npassword = hunter2secret",
            "[mqtt]\nport = \"hunter2secret\"",
            "[http]\ntoken = [\"hunter2secret\"]",
            "[cameras.a]\nsource = \"rtsp\"\npassword = 12345678901",
        ] {
            let problems = Config::parse(text, ".".into()).unwrap_err();
            let shown = format!("{problems:?}");
            assert!(!shown.contains("hunter2secret"), "{shown}");
            assert!(!shown.contains("12345678901"), "{shown}");
        }
        let problems = Config::parse("[mqtt]\nport = \"x\"", ".".into()).unwrap_err();
        assert_eq!(
            problems[0].message,
            "invalid type: string, expected u16 in `port`"
        );
        let problems = Config::parse("[mqtt]\npassword = \"x\n", ".".into()).unwrap_err();
        assert!(
            problems[0]
                .message
                .starts_with("TOML parse error at line 2, column"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_remote_provider_needs_a_grpc_url_and_says_how_to_write_it() {
        let problems = |text: &str| -> Vec<(String, String)> {
            Config::parse(text, ".".into())
                .unwrap()
                .validate()
                .into_iter()
                .filter(|p| p.key.starts_with("inference"))
                .map(|p| (p.key, p.message))
                .collect()
        };
        let p = problems("[inference]\nprovider = \"remote\"");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "inference.remote");
        assert!(p[0].1.contains("url = \"grpc://"), "{p:?}");
        let p = problems(
            "[inference]\nprovider = \"remote\"\n[inference.remote]\nurl = \"http://triton:8000\"\nin_flight = 0\ntimeout = \"0s\"",
        );
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "inference.remote.url",
                "inference.remote.in_flight",
                "inference.remote.timeout"
            ],
            "{p:?}"
        );
        assert!(p[0].1.contains("gRPC binding"), "{p:?}");
        let p = problems("[inference.remote]\nurl = \"grpc://triton:8001\"");
        assert_eq!(p[0].0, "inference.provider", "{p:?}");
        let c = Config::parse(
            "[inference]\nprovider = \"remote\"\n[inference.remote]\nurl = \"grpc://triton:8001\"\nfallback = \"local\"\nca_file = \"ca.pem\"",
            "/etc/vigil".into(),
        )
        .unwrap();
        let r = c.inference.remote.as_ref().unwrap();
        assert_eq!(r.timeout, Duration::from_secs(2));
        assert_eq!(r.in_flight, 2);
        assert_eq!(c.inference.engines(), 2);
        assert_eq!(r.ca_file.as_deref(), Some(Path::new("/etc/vigil/ca.pem")));
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
    fn mqtt_limits_node_ids_and_watched_labels_are_checked() {
        let text = r#"
            [mqtt]
            max_packet_bytes = 100
            max_command_bytes = 2
            rejection_interval = "0s"
            [homeassistant]
            node_id = "a/b"
            [events]
            watch = ["Granny Smith", "granny smith"]
            [cameras.a]
            source = "test"
        "#;
        let problems = Config::parse(text, ".".into()).unwrap().validate();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "mqtt.max_packet_bytes",
            "mqtt.max_command_bytes",
            "mqtt.rejection_interval",
            "homeassistant.node_id",
            "events.watch",
        ] {
            assert!(keys.contains(&key), "{key}: {problems:?}");
        }
        assert!(
            problems
                .iter()
                .any(|p| p.message.contains("share the topic level \"granny_smith\"")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_near_miss_label_gets_a_suggestion() {
        let labels = vec!["fox squirrel".to_string(), "orange".to_string()];
        assert!(unknown_label("fox squirel", &labels).contains("did you mean \"fox squirrel\""));
        assert!(!unknown_label("zebra", &labels).contains("did you mean"));
    }
}
