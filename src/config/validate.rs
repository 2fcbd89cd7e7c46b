//! Checks a parsed config's values and cross references, one `check_*` per section; every
//! problem names its key (`cameras.porch.url: missing`), and all are reported together.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use vigil_engine::model::Manifest;

use super::{Config, Problem};
use crate::source::{CameraConfig, SourceKind};

/// The problems found so far.
#[derive(Default)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }
}

/// Every problem of `config`.
pub fn validate(config: &Config) -> Vec<Problem> {
    let mut p = Problems::default();
    check_pipeline(config, &mut p);
    check_limits(config, &mut p);
    check_http(config, &mut p);
    check_snapshots(config, &mut p);
    check_mqtt(config, &mut p);
    check_events(config, &mut p);
    let manifest = check_model(config, &mut p);
    let head_labels = head_labels(config);
    let labels = Labels {
        model: manifest.as_ref().map(|m| m.labels.as_slice()),
        groups: &config.decide.groups,
        heads: &head_labels,
    };
    check_teach(config, &mut p);
    let replicas = config.cluster.replicas;
    if !(1..=super::MAX_REPLICAS).contains(&replicas) {
        p.push(
            "cluster.replicas",
            format!("must be 1 to {} (got {replicas})", super::MAX_REPLICAS),
        );
    }
    check_decide(config, &labels, &mut p);
    check_watch(config, &labels, &mut p);
    if config.cameras.is_empty() {
        p.push("cameras", "no camera configured");
    }
    for (name, cam) in &config.cameras {
        check_camera(config, name, cam, &labels, &mut p);
    }
    p.0
}

/// The labels a config may name: the model's classes (when the manifest could be read), the
/// configured groups and the labels of the heads it names.
struct Labels<'a> {
    model: Option<&'a [String]>,
    groups: &'a BTreeMap<String, crate::pipeline::decide::GroupConfig>,
    heads: &'a [String],
}

impl Labels<'_> {
    /// Checks a label named at `key`; nothing to say when the model's labels are unknown.
    fn check(&self, p: &mut Problems, key: &str, label: &str) {
        if let Some(labels) = self.model
            && !labels.iter().any(|l| l == label)
            && !self.groups.contains_key(label)
            && !self.heads.iter().any(|l| l == label)
        {
            p.push(key, unknown_label(label, labels));
        }
    }

    /// Checks a thresholds table: values in 0..1, labels known.
    fn check_thresholds(&self, p: &mut Problems, prefix: &str, map: &BTreeMap<String, f32>) {
        for (label, t) in map {
            let key = format!("{prefix}.{}", quote_key(label));
            check_threshold(p, &key, *t);
            self.check(p, &key, label);
        }
    }
}

/// The labels of the heads the config names: those of their versions in service and of their
/// training sets' folders (a label may be named before its first training).
fn head_labels(config: &Config) -> Vec<String> {
    let (dir, data) = (config.heads_dir(), config.teach_data());
    let mut labels = Vec::new();
    for name in config.head_names() {
        if let Some(v) = crate::pipeline::heads::current_version(&dir, &name)
            && let Ok(m) = crate::pipeline::heads::read_manifest(&dir, &name, v)
        {
            labels.extend(m.labels);
        }
        let folders = std::fs::read_dir(data.join(&name))
            .into_iter()
            .flatten()
            .flatten();
        labels.extend(
            folders
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| !n.starts_with(['_', '.'])),
        );
    }
    labels.sort();
    labels.dedup();
    labels
}

/// `[teach]`, and the heads the cameras name.
fn check_teach(config: &Config, p: &mut Problems) {
    let t = &config.teach;
    if t.min_per_label < 2 {
        p.push("teach.min_per_label", "must be at least 2");
    }
    if !(2..=20).contains(&t.folds) {
        p.push("teach.folds", "must be in 2..=20");
    }
    if !(t.regularisation > 0.0 && t.regularisation <= 1e6) {
        p.push("teach.regularisation", "must be above 0 (and at most 1e6)");
    }
    let c = &t.capture;
    if !(0.0 <= c.band[0] && c.band[0] < c.band[1] && c.band[1] <= 1.0) {
        p.push(
            "teach.capture.band",
            "must be [low, high] with 0 <= low < high <= 1",
        );
    }
    if !(1..=1_000_000).contains(&c.max_inbox) {
        p.push("teach.capture.max_inbox", "must be in 1..=1000000");
    }
    if !(0.0..=2.0).contains(&c.min_distance) {
        p.push(
            "teach.capture.min_distance",
            "must be a cosine distance, in 0..=2",
        );
    }
    if c.interval > Duration::from_secs(86_400) {
        p.push("teach.capture.interval", "must be at most 1day");
    }
    for (name, cam) in &config.cameras {
        let key = format!("cameras.{}", quote_key(name));
        let named = std::iter::once((format!("{key}.head"), cam.head.as_ref())).chain(
            cam.zones.iter().map(|(z, zc)| {
                (
                    format!("{key}.zones.{}.head", quote_key(z)),
                    zc.head.as_ref(),
                )
            }),
        );
        for (key, head) in named {
            if let Some(head) = head
                && !crate::pipeline::heads::valid_name(head)
            {
                p.push(
                    key,
                    "head names may hold only letters, digits, '-' and '_', and start with a \
                     letter or digit (they become folder names)",
                );
            }
        }
    }
}

fn check_pipeline(config: &Config, p: &mut Problems) {
    let pl = &config.pipeline;
    if pl.workers == 0 {
        p.push("pipeline.workers", "must be at least 1");
    }
    if pl.max_batch == 0 {
        p.push("pipeline.max_batch", "must be at least 1");
    }
    if pl.camera_queue == 0 {
        p.push("pipeline.camera_queue", "must be at least 1");
    }
    if !(0.0..=1.0).contains(&pl.batch_load) {
        p.push(
            "pipeline.batch_load",
            "must be from 0 (always batch) to 1 (a share of the model's time)",
        );
    }
    if pl.max_wait > Duration::from_secs(5) {
        p.push("pipeline.max_wait", "must be at most 5s (it adds latency)");
    }
    if !(1..=16).contains(&config.inference.sessions) {
        p.push("inference.sessions", "must be in 1..=16");
    }
    check_remote(&config.inference, p);
}

/// `provider = "remote"` needs `[inference.remote]` with a grpc:// url.
fn check_remote(inference: &vigil_engine::infer::InferenceConfig, p: &mut Problems) {
    use vigil_engine::infer::Provider;
    let Some(r) = &inference.remote else {
        if inference.provider == Provider::Remote {
            p.push(
                "inference.remote",
                "provider = \"remote\" needs an [inference.remote] section with the server's url, e.g. url = \"grpc://triton:8001\"",
            );
        }
        return;
    };
    if inference.provider != Provider::Remote {
        p.push(
            "inference.provider",
            "[inference.remote] is set but provider is not \"remote\": set provider = \"remote\" to use the server, or remove the section",
        );
    }
    if let Err(m) = vigil_engine::remote::check_url(r) {
        p.push("inference.remote.url", m);
    }
    if !(1..=16).contains(&r.in_flight) {
        p.push("inference.remote.in_flight", "must be in 1..=16");
    }
    if r.timeout.is_zero() || r.timeout > Duration::from_secs(60) {
        p.push("inference.remote.timeout", "must be between 1ms and 60s");
    }
    if let Some(ca) = &r.ca_file
        && !ca.is_file()
    {
        p.push(
            "inference.remote.ca_file",
            format!("{} does not exist", ca.display()),
        );
    }
}

/// Upper bounds of durations and sizes: a value past them is a typo, and would overflow a clock
/// or an allocation at run time.
fn check_limits(config: &Config, p: &mut Problems) {
    const DAY: Duration = Duration::from_secs(86_400);
    let (m, pl, h, e, mq) = (
        &config.model,
        &config.pipeline,
        &config.http,
        &config.events,
        &config.mqtt,
    );
    let mut durations = vec![
        ("model.watch_interval".to_string(), m.watch_interval, DAY),
        (
            "pipeline.max_frame_age".into(),
            pl.max_frame_age,
            Duration::from_secs(60),
        ),
        ("pipeline.log_interval".into(), pl.log_interval, DAY),
        (
            "http.predict_timeout".into(),
            h.predict_timeout,
            Duration::from_secs(600),
        ),
        (
            "snapshots.max_age".into(),
            config.snapshots.max_age,
            3650 * DAY,
        ),
        (
            "mqtt.keep_alive".into(),
            mq.keep_alive,
            Duration::from_secs(65_535),
        ),
        ("mqtt.reconnect_max".into(), mq.reconnect_max, DAY),
        ("events.min_duration".into(), e.min_duration, DAY),
        ("events.update_interval".into(), e.update_interval, DAY),
        ("events.cooldown".into(), e.cooldown, DAY),
    ];
    for (name, cam) in &config.cameras {
        let key = format!("cameras.{}", quote_key(name));
        durations.extend([
            (
                format!("{key}.latency"),
                cam.latency,
                Duration::from_secs(60),
            ),
            (format!("{key}.retry_max"), cam.retry_max, DAY),
            (format!("{key}.stall_timeout"), cam.stall_timeout, DAY),
            (format!("{key}.start_timeout"), cam.start_timeout, DAY),
        ]);
    }
    for (key, value, max) in durations {
        if value > max {
            p.push(
                key,
                format!("must be at most {}", humantime::format_duration(max)),
            );
        }
    }
    check_size_limits(config, p);
    if pl.log_interval < Duration::from_secs(1) {
        p.push("pipeline.log_interval", "must be at least 1s");
    }
}

/// Upper bounds of counts and sizes.
fn check_size_limits(config: &Config, p: &mut Problems) {
    let (pl, h, mq) = (&config.pipeline, &config.http, &config.mqtt);
    let sizes: [(&str, u64, u64); 9] = [
        ("pipeline.workers", pl.workers as u64, 64),
        (
            "pipeline.key_frame_decoders",
            pl.key_frame_decoders as u64,
            64,
        ),
        ("pipeline.max_batch", pl.max_batch as u64, 1024),
        ("pipeline.camera_queue", pl.camera_queue as u64, 1000),
        ("decide.top_k", config.decide.top_k as u64, 1000),
        ("mqtt.outbox", mq.outbox as u64, 10_000_000),
        ("http.events_kept", h.events_kept as u64, 1_000_000),
        ("http.max_body_bytes", h.max_body_bytes as u64, 1 << 30),
        ("snapshots.keep", config.snapshots.keep as u64, 10_000_000),
    ];
    for (key, value, max) in sizes {
        if value > max {
            p.push(key, format!("must be at most {max}"));
        }
    }
}

/// The manifest and the variant's file; returns the manifest when it could be read.
fn check_model(config: &Config, p: &mut Problems) -> Option<Manifest> {
    let m = &config.model;
    if m.watch && m.watch_interval < Duration::from_millis(100) {
        p.push("model.watch_interval", "must be at least 100ms");
    }
    match Manifest::load(&config.manifest_path()) {
        Ok(man) => {
            match man.variant(&m.variant) {
                Ok(v) if !v.file.is_file() => p.push(
                    "model.variant",
                    format!("model file {} does not exist", v.file.display()),
                ),
                Ok(_) => {}
                Err(e) => p.push("model.variant", e.to_string()),
            }
            Some(man)
        }
        Err(e) => {
            p.push("model.name", e.to_string());
            None
        }
    }
}

/// A secret given at most one way (`x`, `x_env`, `x_file`), and readable from where it is.
fn check_secret(
    p: &mut Problems,
    key: &str,
    (value, env, file): (&Option<String>, &Option<String>, &Option<PathBuf>),
) -> Option<String> {
    let given = [value.is_some(), env.is_some(), file.is_some()];
    if given.iter().filter(|b| **b).count() > 1 {
        let short = key.rsplit('.').next().unwrap_or(key);
        p.push(
            key,
            format!("set one of {short}, {short}_env and {short}_file"),
        );
    }
    match crate::secrets::resolve(value, env, file) {
        Ok(secret) => secret,
        Err(e) => {
            let which = if env.is_some() { "_env" } else { "_file" };
            p.push(format!("{key}{which}"), e);
            None
        }
    }
}

fn check_http(config: &Config, p: &mut Problems) {
    let h = &config.http;
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
    let file = h.token_file.as_ref().map(|f| config.resolve(f));
    let token = check_secret(p, "http.token", (&h.token, &h.token_env, &file));
    if token.is_some_and(|t| t.trim().is_empty()) {
        p.push("http.token", "must not be empty");
    }
    if let Some(problem) = h.unauthenticated_network_listen(h.has_token()) {
        p.push("http.listen", problem);
    }
    for (i, entry) in h.allowed_hosts.iter().flatten().enumerate() {
        if entry.trim() != "*"
            && let Err(e) = super::parse_authority(entry)
        {
            p.push(format!("http.allowed_hosts[{i}]"), e);
        }
    }
    check_http_limits(h, p);
    if let Some(tls) = &h.tls {
        for (key, f) in [("cert_file", &tls.cert_file), ("key_file", &tls.key_file)] {
            if !config.resolve(f).is_file() {
                p.push(
                    format!("http.tls.{key}"),
                    format!("{} is not a file", f.display()),
                );
            }
        }
    }
}

/// Sizes, rates, timeouts and caps of `[http]`.
fn check_http_limits(h: &super::HttpConfig, p: &mut Problems) {
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
    let (least, most) = (Duration::from_millis(100), Duration::from_secs(3600));
    for (key, d) in [
        ("http.header_timeout", h.header_timeout),
        ("http.idle_timeout", h.idle_timeout),
    ] {
        if !(least..=most).contains(&d) {
            p.push(key, "must be in 100ms..=1h");
        }
    }
    if !(1..=65536).contains(&h.max_connections) {
        p.push("http.max_connections", "must be in 1..=65536");
    }
    if !(1..=MAX_CONCURRENT_PREDICTS).contains(&h.max_concurrent_predicts) {
        p.push(
            "http.max_concurrent_predicts",
            format!("must be in 1..={MAX_CONCURRENT_PREDICTS}"),
        );
    }
}

/// Highest `http.max_concurrent_predicts`: each holds one of the HTTP server's blocking threads
/// (64), and the other endpoints need some too.
pub const MAX_CONCURRENT_PREDICTS: usize = 32;

fn check_snapshots(config: &Config, p: &mut Problems) {
    let s = &config.snapshots;
    if !s.enabled {
        return;
    }
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

fn check_decide(config: &Config, labels: &Labels<'_>, p: &mut Problems) {
    let d = &config.decide;
    if d.top_k == 0 {
        p.push("decide.top_k", "must be at least 1");
    }
    check_threshold(p, "decide.threshold", d.threshold);
    for (name, g) in &d.groups {
        let key = format!("decide.groups.{}", quote_key(name));
        if g.classes.is_empty() {
            p.push(format!("{key}.classes"), "must name at least one class");
        }
        if let Some(model) = labels.model {
            if model.iter().any(|l| l == name) {
                p.push(key.clone(), "a group cannot have the name of a model class");
            }
            for c in &g.classes {
                if !model.iter().any(|l| l == c) && !labels.heads.contains(c) {
                    p.push(format!("{key}.classes"), unknown_label(c, model));
                }
            }
        }
    }
    labels.check_thresholds(p, "decide.thresholds", &d.thresholds);
}

fn check_mqtt(config: &Config, p: &mut Problems) {
    let m = &config.mqtt;
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
    check_mqtt_limits(m, p);
    let file = m.password_file.as_ref().map(|f| config.resolve(f));
    check_secret(p, "mqtt.password", (&m.password, &m.password_env, &file));
    let has_password = m.password.is_some() || m.password_env.is_some() || file.is_some();
    if has_password && m.username.is_none() {
        p.push("mqtt.username", "required when a password is set");
    }
    if let Some(tls) = &m.tls {
        check_mqtt_tls(config, tls, p);
    }
}

/// The largest packet MQTT 3.1.1 can carry (its remaining length is at most 268435455 bytes).
const MQTT_MAX_PACKET: usize = 268_435_455 + 5;

fn check_mqtt_limits(m: &crate::publish::mqtt::MqttConfig, p: &mut Problems) {
    if !(4096..=MQTT_MAX_PACKET).contains(&m.max_packet_bytes) {
        p.push(
            "mqtt.max_packet_bytes",
            format!("must be in 4096..{MQTT_MAX_PACKET}"),
        );
    }
    if m.max_command_bytes < 3 || m.max_command_bytes > m.max_packet_bytes {
        p.push(
            "mqtt.max_command_bytes",
            "must be at least 3 (OFF) and at most mqtt.max_packet_bytes",
        );
    }
    if m.rejection_interval.is_zero() {
        p.push("mqtt.rejection_interval", "must be above 0");
    }
}

fn check_mqtt_tls(config: &Config, tls: &crate::publish::tls::TlsConfig, p: &mut Problems) {
    for (key, file) in [
        ("ca_file", &tls.ca_file),
        ("cert_file", &tls.cert_file),
        ("key_file", &tls.key_file),
    ] {
        if let Some(f) = file
            && !config.resolve(f).is_file()
        {
            p.push(
                format!("mqtt.tls.{key}"),
                format!("{} does not exist", config.resolve(f).display()),
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

fn check_events(config: &Config, p: &mut Problems) {
    let e = &config.events;
    if !(0.0..=1.0).contains(&e.hysteresis) {
        p.push("events.hysteresis", "must be in 0..1");
    }
    if e.update_interval < Duration::from_millis(100) {
        p.push("events.update_interval", "must be at least 100ms");
    }
    if !valid_topic_level_path(&config.homeassistant.prefix) {
        p.push("homeassistant.prefix", "must be a valid topic prefix");
    }
    if let Some(node) = &config.homeassistant.node_id
        && !valid_camera_name(node)
    {
        p.push(
            "homeassistant.node_id",
            "must be 1 to 64 letters, digits, '-' or '_'",
        );
    }
}

fn check_watch(config: &Config, labels: &Labels<'_>, p: &mut Problems) {
    let mut levels: BTreeMap<String, &str> = BTreeMap::new();
    for w in &config.events.watch {
        labels.check(p, "events.watch", w);
        let level = crate::wire::topic_level(w);
        if let Some(other) = levels.insert(level.clone(), w) {
            p.push(
                "events.watch",
                format!("{other:?} and {w:?} share the topic level {level:?} (and the Home Assistant ids)"),
            );
        }
    }
}

fn check_camera(
    config: &Config,
    name: &str,
    cam: &CameraConfig,
    labels: &Labels<'_>,
    p: &mut Problems,
) {
    let key = format!("cameras.{}", quote_key(name));
    if !valid_camera_name(name) {
        p.push(
            key.clone(),
            "camera names may hold only letters, digits, '-' and '_' (they become MQTT topic levels)",
        );
    }
    labels.check_thresholds(p, &format!("{key}.thresholds"), &cam.thresholds);
    check_zones(&key, cam, labels, p);
    check_motion(&format!("{key}.motion"), &cam.motion, p);
    check_camera_source(config, &key, cam, p);
    check_camera_timing(&key, cam, p);
    let template = cam.template_name();
    if !valid_camera_name(&template) {
        p.push(
            format!("{key}.template"),
            "must be a plain name like rtsp-h264",
        );
    } else if let Err(e) =
        crate::source::template::load_template(&config.templates_dir(), &template)
    {
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

/// A zone's rectangle: four fractions of the frame, not empty nor inverted.
pub fn check_rect(r: [f64; 4]) -> Result<(), String> {
    if !r.iter().all(|v| (0.0..=1.0).contains(v)) {
        return Err(format!(
            "{r:?}: x0, y0, x1, y1 must be fractions of the frame, in 0..1 (the zone is outside the frame)"
        ));
    }
    if r[2] - r[0] < 0.01 || r[3] - r[1] < 0.01 {
        return Err(format!(
            "{r:?}: empty or inverted (x0 < x1 and y0 < y1, at least 1% of the frame each way)"
        ));
    }
    Ok(())
}

fn check_zones(key: &str, cam: &CameraConfig, labels: &Labels<'_>, p: &mut Problems) {
    if cam.zones.len() > crate::source::zones::MAX_ZONES {
        p.push(
            format!("{key}.zones"),
            format!(
                "at most {} zones per camera",
                crate::source::zones::MAX_ZONES
            ),
        );
    }
    if cam.whole_frame == Some(false) && cam.zones.is_empty() {
        p.push(
            format!("{key}.whole_frame"),
            "false needs zones (without zones the whole frame is what is classified)",
        );
    }
    let mut seen = std::collections::HashSet::new();
    for (name, zone) in &cam.zones {
        let zkey = format!("{key}.zones.{}", quote_key(name));
        let ends_ok = name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !valid_camera_name(name) || !ends_ok {
            p.push(
                zkey.clone(),
                "zone names may hold only letters, digits, '-' and '_', and start and end with a \
                 letter or digit (they become MQTT topic levels and Home Assistant ids)",
            );
        }
        if !seen.insert(name.to_lowercase()) {
            p.push(
                zkey.clone(),
                "another zone of this camera has the same name but for case",
            );
        }
        if let Some(r) = zone.rect
            && let Err(e) = check_rect(r)
        {
            p.push(format!("{zkey}.rect"), e);
        }
        match &zone.polygon {
            Some(points) if points.len() < 3 => {
                p.push(format!("{zkey}.polygon"), "needs at least 3 points")
            }
            Some(points) if points.iter().flatten().any(|v| !(0.0..=1.0).contains(v)) => p.push(
                format!("{zkey}.polygon"),
                "points must be fractions of the frame, in 0..1",
            ),
            Some(_) => {}
            None if zone.rect.is_none() => p.push(zkey.clone(), "needs a rect or a polygon"),
            None => {}
        }
        labels.check_thresholds(p, &format!("{zkey}.thresholds"), &zone.thresholds);
    }
}

fn check_motion(key: &str, m: &crate::source::motion::MotionConfig, p: &mut Problems) {
    let checks: [(&str, bool, &str); 7] = [
        (
            "height",
            (16..=1080).contains(&m.height),
            "must be in 16..=1080",
        ),
        (
            "threshold",
            (1..=254).contains(&m.threshold),
            "must be in 1..=254",
        ),
        (
            "min_area",
            (0.0..1.0).contains(&m.min_area),
            "must be in 0..1",
        ),
        (
            "alpha",
            m.alpha > 0.0 && m.alpha <= 1.0,
            "must be in (0, 1]",
        ),
        (
            "recalibrate_above",
            m.recalibrate_above > 0.0 && m.recalibrate_above <= 1.0,
            "must be in (0, 1]",
        ),
        (
            "settle",
            m.settle <= Duration::from_secs(3600),
            "must be at most 1h",
        ),
        (
            "max_interval",
            (Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&m.max_interval),
            "must be between 1s and 1day",
        ),
    ];
    for (name, ok, message) in checks {
        if !ok {
            p.push(format!("{key}.{name}"), message);
        }
    }
}

/// The source's own keys: an rtsp URL, a file that exists, nothing of another kind's.
fn check_camera_source(config: &Config, key: &str, cam: &CameraConfig, p: &mut Problems) {
    match cam.source {
        SourceKind::Rtsp => match &cam.url {
            None => p.push(
                format!("{key}.url"),
                "missing (required for an rtsp source)",
            ),
            Some(u) => {
                if let Err(e) = crate::secrets::check_rtsp_url(u) {
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
                let full = config.resolve(path);
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
}

/// The lowest analysis rate: one frame an hour.
const MIN_ANALYZE_FPS: f64 = 0.001;

/// Sizes, rates and the watchdog's and backoff's durations.
fn check_camera_timing(key: &str, cam: &CameraConfig, p: &mut Problems) {
    if cam.width == 0 || cam.height == 0 || cam.width > 7680 || cam.height > 4320 {
        p.push(
            format!("{key}.width"),
            "width and height must be in 1..=7680 x 1..=4320",
        );
    }
    if cam.fps == 0 || cam.fps > 240 {
        p.push(format!("{key}.fps"), "must be in 1..=240");
    }
    if !(cam.analyze_fps == 0.0 || (MIN_ANALYZE_FPS..=240.0).contains(&cam.analyze_fps)) {
        p.push(
            format!("{key}.analyze_fps"),
            format!("must be 0 (all frames) or between {MIN_ANALYZE_FPS} and 240"),
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
}

fn check_threshold(p: &mut Problems, key: &str, t: f32) {
    if !(0.0..=1.0).contains(&t) {
        p.push(key, format!("must be in 0..1 (got {t})"));
    }
}

pub(super) fn unknown_label(label: &str, labels: &[String]) -> String {
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
