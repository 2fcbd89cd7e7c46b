//! `/metrics`: the counters of the cameras, the stages, the model and the MQTT publisher in the
//! Prometheus (OpenMetrics) text format.
//!
//! Nothing is copied into metric objects ahead of time: a [`Collector`] reads the live counters at
//! every scrape, so cameras added or removed by a reload appear or disappear at the next scrape.
//! Names start with `vigil_`, carry their unit, and counters end in `_total`; labels are kept to
//! low cardinality (camera, stage, reason, watched label, outcome, kind, state, model).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
    LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::publish::connection::MqttStats;
use crate::publish::mqtt::MqttMonitor;
use crate::publish::outbox::{Kind, OutboxStats};
use crate::stats::{CameraStats, GraphStats, StageStats, State};

/// The `Content-Type` of [`Exporter::render`]'s output (OpenMetrics text: counters are typed
/// without their `_total` suffix and the body ends with `# EOF`).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

use vigil_engine::remote::LinkStatus;

/// What /metrics shows besides the graph's counters.
pub struct MetricsSources {
    pub graph: Arc<GraphStats>,
    pub mqtt: Option<MqttMonitor>,
    /// The execution provider in use ("cpu", "cuda"...), model name and version: a function,
    /// since a model switch changes them.
    pub model: Arc<dyn Fn() -> ModelGauge + Send + Sync>,
}

/// The model in use, for `vigil_model_info` and `vigil_execution_provider`, and the batch
/// limit (`vigil_batch_limit`, with what was measured to choose it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelGauge {
    pub name: String,
    pub version: String,
    pub variant: String,
    pub provider: String,
    pub batch_limit: usize,
    /// (batch size, images per second) measured at start; empty when not measured.
    pub batch_measured: Vec<(usize, f64)>,
}

/// Renders `/metrics`.
pub struct Exporter {
    registry: Registry,
}

impl Exporter {
    pub fn new(sources: MetricsSources) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(VigilCollector { sources }));
        Exporter { registry }
    }

    /// The whole exposition, read from the live counters now (see [`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut body = String::with_capacity(16 * 1024);
        if let Err(e) = encode(&mut body, &self.registry) {
            // Writing to a String does not fail; only a broken encoder could get here.
            tracing::error!(error = %e, "encoding /metrics failed");
        }
        body
    }
}

/// Reads every counter at scrape time.
struct VigilCollector {
    sources: MetricsSources,
}

impl fmt::Debug for VigilCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VigilCollector").finish_non_exhaustive()
    }
}

impl Collector for VigilCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let graph = &self.sources.graph;
        encode_cameras(&mut enc, &graph.cameras())?;
        encode_stages(&mut enc, graph)?;
        encode_telemetry(&mut enc, graph)?;
        encode_model(&mut enc, &(self.sources.model)())?;
        encode_remote(&mut enc, &vigil_engine::remote::links())?;
        if let Some(mqtt) = &self.sources.mqtt {
            let outbox = (mqtt.outbox(), mqtt.retained_topics());
            encode_mqtt(&mut enc, mqtt.connected(), &outbox, mqtt.stats())?;
        }
        Ok(())
    }
}

/// A label value escaped as the exposition format requires (the crate writes values verbatim).
struct Esc<'a>(&'a str);

impl EncodeLabelValue for Esc<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        use std::fmt::Write;
        let s = self.0;
        if !s.contains(['\\', '"', '\n']) {
            return encoder.write_str(s);
        }
        for c in s.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(m)
}

fn gauge<V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: V,
) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(m)
}

/// A counter family: one sample per label set.
fn counters<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in rows {
        ConstCounter::new(value).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge family: one sample per label set.
fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        ConstGauge::new(value).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A metric owned elsewhere (a histogram, a family of counters), encoded by reference.
fn owned(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(m)
}

const STATES: [State; 4] = [
    State::Starting,
    State::Online,
    State::Reconnecting,
    State::Offline,
];

type Cameras = [(Arc<str>, Arc<CameraStats>)];

fn encode_cameras(enc: &mut DescriptorEncoder, cams: &Cameras) -> fmt::Result {
    encode_camera_frames(enc, cams)?;
    gauges(
        enc,
        "vigil_camera_fps",
        "Decoded frames per second over the last reporting interval.",
        cams.iter().map(|(n, c)| {
            (
                [("camera", Esc(n))],
                c.input_fps_x100.load(Relaxed) as f64 / 100.0,
            )
        }),
    )?;
    counters(
        enc,
        "vigil_camera_reconnects",
        "Pipeline rebuilds after a failure or a stall.",
        cams.iter()
            .map(|(n, c)| ([("camera", Esc(n))], c.restarts.load(Relaxed))),
    )?;
    gauges(
        enc,
        "vigil_camera_state",
        "1 for the camera's current state (starting, online, reconnecting, offline), 0 for the \
         others.",
        cams.iter().flat_map(|(n, c)| {
            let now = c.state().state;
            STATES.map(|s| {
                (
                    [("camera", Esc(n)), ("state", Esc(s.as_str()))],
                    i64::from(s == now),
                )
            })
        }),
    )?;
    gauges(
        enc,
        "vigil_camera_enabled",
        "1 while the camera's analysis is on, 0 while paused by command.",
        cams.iter()
            .map(|(n, c)| ([("camera", Esc(n))], i64::from(c.enabled.load(Relaxed)))),
    )?;
    gauges(
        enc,
        "vigil_camera_seconds_since_last_frame",
        "Seconds since the camera's last decoded frame (absent before the first).",
        cams.iter().filter_map(|(n, c)| {
            c.seconds_since_last_frame()
                .map(|s| ([("camera", Esc(n))], s))
        }),
    )
}

/// A camera's frame counters: received, decoded, and not analysed by reason.
fn encode_camera_frames(enc: &mut DescriptorEncoder, cams: &Cameras) -> fmt::Result {
    counters(
        enc,
        "vigil_camera_frames_received",
        "Encoded frames that reached the parser (cameras whose pipeline has a parse element only).",
        cams.iter()
            .filter(|(_, c)| c.counts_received.load(Relaxed))
            .map(|(n, c)| ([("camera", Esc(n))], c.received.load(Relaxed))),
    )?;
    counters(
        enc,
        "vigil_camera_frames_decoded",
        "Frames that came out of the camera's decoder.",
        cams.iter()
            .map(|(n, c)| ([("camera", Esc(n))], c.frames.load(Relaxed))),
    )?;
    counters(
        enc,
        "vigil_camera_frames_dropped",
        "Frames not analysed, by reason: rate (skipped to keep to analyze_fps), disabled \
         (analysis paused), keyframes (non-key frames dropped before the decoder), still \
         (key frames of a still scene, judged by their coded sizes, not decoded), motion \
         (nothing moved), behind (vigil was behind).",
        cams.iter().flat_map(|(n, c)| {
            [
                ("rate", c.skipped_rate.load(Relaxed)),
                ("disabled", c.skipped_disabled.load(Relaxed)),
                ("keyframes", c.skipped_delta.load(Relaxed)),
                ("still", c.skipped_still.load(Relaxed)),
                ("motion", c.skipped_motion.load(Relaxed)),
                ("behind", c.dropped_queue.load(Relaxed)),
            ]
            .map(|(reason, v)| ([("camera", Esc(n)), ("reason", Esc(reason))], v))
        }),
    )?;
    Ok(())
}

fn encode_stages(enc: &mut DescriptorEncoder, g: &GraphStats) -> fmt::Result {
    let stages: [(&str, &StageStats); 6] = [
        ("preprocess", &g.preprocess),
        ("batch", &g.batch),
        ("infer", &g.infer),
        ("decide", &g.decide),
        ("sink", &g.sink),
        ("requests", &g.requests),
    ];
    let each = |f: fn(&StageStats) -> u64| {
        stages
            .iter()
            .map(move |(name, s)| ([("stage", Esc(name))], f(s)))
    };
    counters(
        enc,
        "vigil_stage_items_received",
        "Items (frames, batches' frames, results) a stage received.",
        each(|s| s.received.load(Relaxed)),
    )?;
    counters(
        enc,
        "vigil_stage_items_sent",
        "Items a stage passed on.",
        each(|s| s.sent.load(Relaxed)),
    )?;
    counters(
        enc,
        "vigil_stage_items_dropped",
        "Items a stage dropped.",
        each(|s| s.dropped.load(Relaxed)),
    )?;
    let mut m = enc.encode_descriptor(
        "vigil_stage_busy_seconds",
        "Time a stage spent working, seconds.",
        None,
        MetricType::Counter,
    )?;
    for (name, s) in &stages {
        let secs = s.busy_ns.load(Relaxed) as f64 / 1e9;
        ConstCounter::new(secs).encode(m.encode_family(&[("stage", Esc(name))])?)?;
    }
    gauges(
        enc,
        "vigil_stage_queue_depth",
        "Items waiting in a stage's input channel, sampled when the stage last took one.",
        each(|s| s.queue_depth.load(Relaxed)),
    )?;
    gauge(
        enc,
        "vigil_batching",
        "1 while the model is busy enough for frames to be batched (pipeline.batch_load), 0 \
         while each frame goes to it alone.",
        i64::from(g.batching.load(Relaxed)),
    )
}

fn encode_telemetry(enc: &mut DescriptorEncoder, g: &GraphStats) -> fmt::Result {
    let t = &g.telemetry;
    owned(
        enc,
        "vigil_batch_size",
        "Frames per batch sent to the model.",
        &t.batch_size,
    )?;
    owned(
        enc,
        "vigil_inference_seconds",
        "Time one batch spends in the model, seconds.",
        &t.inference_seconds,
    )?;
    owned(
        enc,
        "vigil_latency_seconds",
        "Frame reaching vigil (out of the decoder, or reaching a shared key-frame decoder) to published, seconds.",
        &t.latency_seconds,
    )?;
    owned(
        enc,
        "vigil_events_started",
        "Events started, by watched label.",
        &t.events_started,
    )?;
    owned(
        enc,
        "vigil_predict_requests",
        "Predict requests, by outcome.",
        &t.predict_requests,
    )?;
    let plain = [
        (
            "vigil_snapshots_written",
            "Event snapshots written.",
            &t.snapshots_written,
        ),
        (
            "vigil_snapshots_failed",
            "Event snapshots that could not be written.",
            &t.snapshots_failed,
        ),
        (
            "vigil_model_switches",
            "Model switches done.",
            &t.model_switches,
        ),
        (
            "vigil_model_switches_failed",
            "Model switches refused or failed.",
            &t.model_switches_failed,
        ),
        (
            "vigil_config_reloads",
            "Config reloads applied.",
            &t.reloads,
        ),
        (
            "vigil_config_reloads_failed",
            "Config reloads refused.",
            &t.reloads_failed,
        ),
    ];
    for (name, help, c) in plain {
        counter(enc, name, help, c.get())?;
    }
    Ok(())
}

fn encode_model(enc: &mut DescriptorEncoder, m: &ModelGauge) -> fmt::Result {
    gauges(
        enc,
        "vigil_model_info",
        "The model in use: always 1, the labels say which.",
        [(
            [
                ("model", Esc(&m.name)),
                ("version", Esc(&m.version)),
                ("variant", Esc(&m.variant)),
                ("provider", Esc(&m.provider)),
            ],
            1i64,
        )],
    )?;
    gauges(
        enc,
        "vigil_execution_provider",
        "The ONNX Runtime execution provider in use (cpu, cuda, tensorrt...): always 1.",
        [([("provider", Esc(&m.provider))], 1i64)],
    )?;
    gauge(
        enc,
        "vigil_batch_limit",
        "The largest batch sent to the model: pipeline.max_batch, or the size measured at start \
         to suit this machine (pipeline.tune_batch).",
        m.batch_limit as i64,
    )?;
    if m.batch_measured.is_empty() {
        return Ok(());
    }
    let labels: Vec<[(&str, String); 1]> = m
        .batch_measured
        .iter()
        .map(|(b, _)| [("batch", b.to_string())])
        .collect();
    gauges(
        enc,
        "vigil_batch_measured_images_per_second",
        "The model's throughput per batch size, measured at start (or taken from pipeline.tuning_cache) to choose the batch limit.",
        labels
            .iter()
            .zip(&m.batch_measured)
            .map(|(l, (_, ips))| (l.clone(), *ips)),
    )
}

/// The label of an outbox kind (the outbox's counters are arrays indexed by `Kind as usize`).
/// The inference servers of `provider = "remote"`: whether each answers, its requests, frames,
/// bytes and waiting time (nothing when there is none).
fn encode_remote(enc: &mut DescriptorEncoder, links: &[LinkStatus]) -> fmt::Result {
    if links.is_empty() {
        return Ok(());
    }
    let labels = |l: &LinkStatus| [("url", l.url.clone()), ("model", l.model.clone())];
    gauges(
        enc,
        "vigil_remote_up",
        "Whether the inference server answers (1) or is down and retried with backoff (0).",
        links.iter().map(|l| (labels(l), i64::from(l.up))),
    )?;
    type Family = (&'static str, &'static str, fn(&LinkStatus) -> u64);
    let families: [Family; 7] = [
        (
            "vigil_remote_requests",
            "Inference requests sent to the server.",
            |l| l.requests,
        ),
        (
            "vigil_remote_request_failures",
            "Inference requests that failed (timeout, server error, connection lost).",
            |l| l.failures,
        ),
        (
            "vigil_remote_frames",
            "Frames the inference server classified.",
            |l| l.frames,
        ),
        (
            "vigil_remote_fallback_frames",
            "Frames classified by the local model while the server was down (fallback = \"local\").",
            |l| l.fallback_frames,
        ),
        (
            "vigil_remote_sent_bytes",
            "Bytes of inference requests sent (protobuf messages).",
            |l| l.bytes_sent,
        ),
        (
            "vigil_remote_received_bytes",
            "Bytes of inference answers received (protobuf messages).",
            |l| l.bytes_received,
        ),
        (
            "vigil_remote_recoveries",
            "Times the inference server answered again after being down.",
            |l| l.recoveries,
        ),
    ];
    for (name, help, get) in families {
        counters(enc, name, help, links.iter().map(|l| (labels(l), get(l))))?;
    }
    let mut m = enc.encode_descriptor(
        "vigil_remote_wait_seconds",
        "Time spent waiting for the inference server's answers.",
        None,
        MetricType::Counter,
    )?;
    for l in links {
        ConstCounter::new(l.wait_seconds).encode(m.encode_family(&labels(l))?)?;
    }
    Ok(())
}

fn kind_label(k: Kind) -> &'static str {
    match k {
        Kind::Result => "result",
        Kind::State => "state",
        Kind::Event => "event",
    }
}

/// The MQTT figures; `outbox`: the outbox's, and the retained topics kept to republish.
fn encode_mqtt(
    enc: &mut DescriptorEncoder,
    connected: bool,
    (outbox, retained): &(OutboxStats, usize),
    stats: &MqttStats,
) -> fmt::Result {
    let per_kind = |a: [u64; 3]| Kind::ALL.map(|k| ([("kind", Esc(kind_label(k)))], a[k as usize]));
    gauge(
        enc,
        "vigil_mqtt_connected",
        "1 while connected to the MQTT broker.",
        i64::from(connected),
    )?;
    gauge(
        enc,
        "vigil_mqtt_outbox_messages",
        "Messages waiting for the broker: queued plus in flight.",
        (outbox.queued_now + outbox.in_flight_now) as u64,
    )?;
    counters(
        enc,
        "vigil_mqtt_delivered",
        "Messages the broker has (acknowledged, or sent at QoS 0), by kind (result, state, \
         event).",
        per_kind(outbox.delivered),
    )?;
    counters(
        enc,
        "vigil_mqtt_dropped",
        "Messages dropped because the outbox was full, by kind (result, state, event).",
        per_kind(outbox.dropped),
    )?;
    counter(
        enc,
        "vigil_mqtt_resent",
        "Messages sent again after a reconnect.",
        outbox.resent,
    )?;
    counter(
        enc,
        "vigil_mqtt_connection_failures",
        "Failed or lost connections to the MQTT broker.",
        stats.connection_failures.load(Relaxed),
    )?;
    counter(
        enc,
        "vigil_mqtt_commands_accepted",
        "MQTT commands (set/enabled) applied.",
        stats.commands_accepted.load(Relaxed),
    )?;
    counter(
        enc,
        "vigil_mqtt_commands_rejected",
        "MQTT commands rejected, every one (the errors topic and the log show a rate-limited few).",
        stats.commands_rejected.load(Relaxed),
    )?;
    encode_mqtt_guards(enc, *retained, stats)
}

/// The figures of what vigil refuses to let the broker's other clients do to it.
fn encode_mqtt_guards(
    enc: &mut DescriptorEncoder,
    retained: usize,
    stats: &MqttStats,
) -> fmt::Result {
    counter(
        enc,
        "vigil_mqtt_commands_oversized",
        "MQTT commands dropped unread for their size (over mqtt.max_command_bytes).",
        stats.commands_oversized.load(Relaxed),
    )?;
    counter(
        enc,
        "vigil_mqtt_foreign_discovery_configs",
        "Discovery configs under this node id that another client published (left alone).",
        stats.foreign_discovery_configs.load(Relaxed),
    )?;
    gauge(
        enc,
        "vigil_mqtt_retained_topics",
        "Retained topics kept to republish after a reconnect (at most mqtt.outbox).",
        retained as u64,
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Instant;

    use prometheus_parse::{Sample, Scrape, Value};

    use super::*;
    use crate::stats::now_ms;

    fn sources(graph: Arc<GraphStats>) -> MetricsSources {
        MetricsSources {
            graph,
            mqtt: None,
            model: Arc::new(|| ModelGauge {
                name: "efficientnet-lite0".into(),
                version: "1.0.0".into(),
                variant: "fp32".into(),
                provider: "cpu".into(),
                batch_limit: 4,
                batch_measured: vec![(1, 225.0), (2, 230.0), (4, 236.0)],
            }),
        }
    }

    fn parse(body: &str) -> Scrape {
        Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parses")
    }

    fn number(s: &Sample) -> f64 {
        match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{} is not a number: {other:?}", s.metric),
        }
    }

    /// The value of the one sample named `metric` whose labels include `labels`.
    fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == metric)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .collect();
        assert!(found.len() <= 1, "{metric} {labels:?} matches {found:?}");
        found.first().map(|s| number(s))
    }

    fn graph_with(cameras: &[&str]) -> Arc<GraphStats> {
        let g = GraphStats::default();
        for name in cameras {
            g.insert_camera(
                Arc::from(*name),
                Arc::new(CameraStats::new(format!("test://{name}"))),
            );
        }
        Arc::new(g)
    }

    #[test]
    fn camera_counters_stage_counters_and_histograms_agree() {
        let g = graph_with(&["gate", "yard"]);
        let gate = g.camera("gate").unwrap();
        gate.frames.store(120, Relaxed);
        gate.skipped_rate.store(90, Relaxed);
        gate.skipped_disabled.store(3, Relaxed);
        gate.skipped_delta.store(4, Relaxed);
        gate.dropped_queue.store(5, Relaxed);
        gate.restarts.store(2, Relaxed);
        gate.input_fps_x100.store(2497, Relaxed);
        gate.counts_received.store(true, Relaxed);
        gate.received.store(130, Relaxed);
        gate.last_frame_ms.store(now_ms(), Relaxed);
        gate.set_state(State::Online, 0, None);
        let yard = g.camera("yard").unwrap();
        yard.frames.store(7, Relaxed);
        yard.enabled.store(false, Relaxed);
        yard.set_state(State::Reconnecting, 3, Some("eos".into()));

        g.infer.received(40);
        g.infer.sent(38);
        g.infer.dropped(2);
        g.infer.busy_ns.store(1_500_000_000, Relaxed);
        g.batch.queue_depth.store(6, Relaxed);
        g.batching.store(true, Relaxed);
        for n in [1.0, 4.0, 8.0] {
            g.telemetry.batch_size.observe(n);
        }
        g.telemetry.inference_seconds.observe(0.012);
        g.telemetry.latency_seconds.observe(0.08);
        g.telemetry.latency_seconds.observe(0.3);
        g.telemetry.event_started("person");
        g.telemetry.event_started("person");
        g.telemetry.event_started("dog");
        g.telemetry.predict_request("ok");
        g.telemetry.snapshots_written.inc();
        g.telemetry.reloads_failed.inc();

        let body = Exporter::new(sources(g.clone())).render();
        assert!(body.ends_with("# EOF\n"), "{body}");
        let s = parse(&body);
        let cam = |m: &str, c: &str| value(&s, m, &[("camera", c)]);

        assert_eq!(
            cam("vigil_camera_frames_decoded_total", "gate"),
            Some(120.0)
        );
        assert_eq!(cam("vigil_camera_frames_decoded_total", "yard"), Some(7.0));
        assert_eq!(
            cam("vigil_camera_frames_received_total", "gate"),
            Some(130.0)
        );
        // yard's pipeline has no parse element: no received figure at all.
        assert_eq!(cam("vigil_camera_frames_received_total", "yard"), None);
        for (reason, n) in [
            ("rate", 90.0),
            ("disabled", 3.0),
            ("keyframes", 4.0),
            ("behind", 5.0),
        ] {
            assert_eq!(
                value(
                    &s,
                    "vigil_camera_frames_dropped_total",
                    &[("camera", "gate"), ("reason", reason)]
                ),
                Some(n),
                "{reason}"
            );
        }
        assert_eq!(cam("vigil_camera_fps", "gate"), Some(24.97));
        assert_eq!(cam("vigil_camera_reconnects_total", "gate"), Some(2.0));
        assert_eq!(cam("vigil_camera_enabled", "gate"), Some(1.0));
        assert_eq!(cam("vigil_camera_enabled", "yard"), Some(0.0));
        let since = cam("vigil_camera_seconds_since_last_frame", "gate").unwrap();
        assert!((0.0..5.0).contains(&since), "{since}");
        assert_eq!(cam("vigil_camera_seconds_since_last_frame", "yard"), None);
        for (camera, current) in [("gate", "online"), ("yard", "reconnecting")] {
            for state in ["starting", "online", "reconnecting", "offline"] {
                assert_eq!(
                    value(
                        &s,
                        "vigil_camera_state",
                        &[("camera", camera), ("state", state)]
                    ),
                    Some(if state == current { 1.0 } else { 0.0 }),
                    "{camera} {state}"
                );
            }
        }

        let stage = |m: &str, st: &str| value(&s, m, &[("stage", st)]);
        assert_eq!(
            stage("vigil_stage_items_received_total", "infer"),
            Some(40.0)
        );
        assert_eq!(stage("vigil_stage_items_sent_total", "infer"), Some(38.0));
        assert_eq!(stage("vigil_stage_items_dropped_total", "infer"), Some(2.0));
        assert_eq!(stage("vigil_stage_busy_seconds_total", "infer"), Some(1.5));
        assert_eq!(stage("vigil_stage_queue_depth", "batch"), Some(6.0));
        assert_eq!(value(&s, "vigil_batching", &[]), Some(1.0));
        for st in ["preprocess", "batch", "infer", "decide", "sink", "requests"] {
            assert!(
                stage("vigil_stage_items_received_total", st).is_some(),
                "{st}"
            );
        }

        assert_eq!(value(&s, "vigil_batch_size_count", &[]), Some(3.0));
        assert_eq!(value(&s, "vigil_batch_size_sum", &[]), Some(13.0));
        let Some(Value::Histogram(buckets)) = s
            .samples
            .iter()
            .find(|x| x.metric == "vigil_batch_size")
            .map(|x| x.value.clone())
        else {
            panic!("no vigil_batch_size histogram in {body}")
        };
        let le4 = buckets.iter().find(|b| b.less_than == 4.0).unwrap();
        assert_eq!(le4.count, 2.0);
        assert_eq!(value(&s, "vigil_inference_seconds_count", &[]), Some(1.0));
        assert_eq!(value(&s, "vigil_latency_seconds_count", &[]), Some(2.0));
        let events = |l: &str| value(&s, "vigil_events_started_total", &[("label", l)]);
        assert_eq!(events("person"), Some(2.0));
        assert_eq!(events("dog"), Some(1.0));
        assert_eq!(
            value(&s, "vigil_predict_requests_total", &[("outcome", "ok")]),
            Some(1.0)
        );
        assert_eq!(value(&s, "vigil_snapshots_written_total", &[]), Some(1.0));
        assert_eq!(
            value(&s, "vigil_config_reloads_failed_total", &[]),
            Some(1.0)
        );
        assert_eq!(value(&s, "vigil_model_switches_total", &[]), Some(0.0));

        assert_eq!(
            value(
                &s,
                "vigil_model_info",
                &[
                    ("model", "efficientnet-lite0"),
                    ("version", "1.0.0"),
                    ("variant", "fp32"),
                    ("provider", "cpu")
                ]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&s, "vigil_execution_provider", &[("provider", "cpu")]),
            Some(1.0)
        );
        assert_eq!(value(&s, "vigil_batch_limit", &[]), Some(4.0));
        assert_eq!(
            value(
                &s,
                "vigil_batch_measured_images_per_second",
                &[("batch", "2")]
            ),
            Some(230.0)
        );
        // No publisher, no MQTT figures.
        assert!(!body.contains("vigil_mqtt_"));
    }

    #[test]
    fn every_metric_has_help_and_a_vigil_name() {
        let g = graph_with(&["gate"]);
        g.telemetry.event_started("person");
        g.telemetry.predict_request("ok");
        let body = Exporter::new(sources(g)).render();
        let mut helped = BTreeSet::new();
        let mut typed = BTreeSet::new();
        for line in body.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["#", "HELP", name, help @ ..] => {
                    assert!(!help.is_empty(), "{line}");
                    helped.insert(name.to_string());
                }
                ["#", "TYPE", name, _] => {
                    typed.insert(name.to_string());
                }
                ["#", "EOF"] => {}
                [name_and_labels, ..] => {
                    assert!(name_and_labels.starts_with("vigil_"), "{line}");
                    assert!(!name_and_labels.starts_with('#'), "{line}");
                }
                [] => {}
            }
        }
        assert_eq!(helped, typed);
        assert!(helped.len() > 25, "{helped:?}");
        assert!(helped.iter().all(|n| n.starts_with("vigil_")));
        // Counters are typed without their suffix, and their samples end in _total.
        assert!(body.contains("# TYPE vigil_camera_frames_decoded counter\n"));
        assert!(body.contains("vigil_camera_frames_decoded_total{camera=\"gate\"} 0\n"));
    }

    #[test]
    fn cameras_come_and_go_between_scrapes() {
        let g = graph_with(&["gate", "yard"]);
        let exporter = Exporter::new(sources(g.clone()));
        let cams = |body: &str| {
            parse(body)
                .samples
                .iter()
                .filter(|s| s.metric == "vigil_camera_frames_decoded_total")
                .map(|s| s.labels.get("camera").unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(cams(&exporter.render()), ["gate", "yard"]);

        g.remove_camera("yard");
        let body = exporter.render();
        assert_eq!(cams(&body), ["gate"]);
        assert!(!body.contains("\"yard\""), "{body}");

        g.insert_camera("porch".into(), Arc::new(CameraStats::new("test".into())));
        g.camera("porch").unwrap().frames.store(9, Relaxed);
        let body = exporter.render();
        assert_eq!(cams(&body), ["gate", "porch"]);
        assert_eq!(
            value(
                &parse(&body),
                "vigil_camera_frames_decoded_total",
                &[("camera", "porch")]
            ),
            Some(9.0)
        );
    }

    #[test]
    fn model_changes_show_at_the_next_scrape_and_labels_are_escaped() {
        let g = graph_with(&[]);
        let provider = Arc::new(std::sync::Mutex::new("cpu".to_string()));
        let p = provider.clone();
        let exporter = Exporter::new(MetricsSources {
            graph: g,
            mqtt: None,
            model: Arc::new(move || ModelGauge {
                name: "my \"best\" model\\v2".into(),
                version: "2".into(),
                variant: String::new(),
                provider: p.lock().unwrap().clone(),
                ..ModelGauge::default()
            }),
        });
        let body = exporter.render();
        assert!(body.contains(r#"model="my \"best\" model\\v2""#), "{body}");
        assert_eq!(
            value(
                &parse(&body),
                "vigil_execution_provider",
                &[("provider", "cpu")]
            ),
            Some(1.0)
        );
        *provider.lock().unwrap() = "cuda".into();
        let s = parse(&exporter.render());
        assert_eq!(
            value(&s, "vigil_execution_provider", &[("provider", "cuda")]),
            Some(1.0)
        );
        assert_eq!(
            value(&s, "vigil_execution_provider", &[("provider", "cpu")]),
            None
        );
    }

    /// The MQTT figures as a publisher would show them (no broker needed).
    #[derive(Debug)]
    struct Mqtt(bool, (OutboxStats, usize), MqttStats);

    impl Collector for Mqtt {
        fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
            encode_mqtt(&mut enc, self.0, &self.1, &self.2)
        }
    }

    #[test]
    fn mqtt_figures_by_kind() {
        let stats = MqttStats::default();
        stats.connection_failures.store(3, Relaxed);
        stats.commands_rejected.store(2, Relaxed);
        stats.commands_accepted.store(5, Relaxed);
        stats.commands_oversized.store(1, Relaxed);
        let outbox = OutboxStats {
            queued_now: 7,
            in_flight_now: 2,
            peak: 40,
            accepted: [100, 20, 4],
            delivered: [90, 19, 4],
            dropped: [10, 1, 0],
            resent: 6,
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Mqtt(true, (outbox, 12), stats)));
        let mut body = String::new();
        encode(&mut body, &registry).unwrap();
        let s = parse(&body);
        let kind = |m: &str, k: &str| value(&s, m, &[("kind", k)]);
        assert_eq!(value(&s, "vigil_mqtt_connected", &[]), Some(1.0));
        assert_eq!(value(&s, "vigil_mqtt_outbox_messages", &[]), Some(9.0));
        for (k, delivered, dropped) in [
            ("result", 90.0, 10.0),
            ("state", 19.0, 1.0),
            ("event", 4.0, 0.0),
        ] {
            assert_eq!(
                kind("vigil_mqtt_delivered_total", k),
                Some(delivered),
                "{k}"
            );
            assert_eq!(kind("vigil_mqtt_dropped_total", k), Some(dropped), "{k}");
        }
        assert_eq!(value(&s, "vigil_mqtt_resent_total", &[]), Some(6.0));
        assert_eq!(
            value(&s, "vigil_mqtt_connection_failures_total", &[]),
            Some(3.0)
        );
        assert_eq!(
            value(&s, "vigil_mqtt_commands_accepted_total", &[]),
            Some(5.0)
        );
        assert_eq!(
            value(&s, "vigil_mqtt_commands_rejected_total", &[]),
            Some(2.0)
        );
        assert_eq!(
            value(&s, "vigil_mqtt_commands_oversized_total", &[]),
            Some(1.0)
        );
        assert_eq!(value(&s, "vigil_mqtt_retained_topics", &[]), Some(12.0));
        assert_eq!(body.matches("# HELP vigil_mqtt_").count(), 11);
    }

    #[test]
    fn kind_labels_follow_the_outbox_order() {
        for (i, k) in Kind::ALL.into_iter().enumerate() {
            assert_eq!(k as usize, i);
        }
        assert_eq!(Kind::ALL.map(kind_label), ["result", "state", "event"]);
    }

    #[test]
    fn render_is_cheap_enough_for_many_cameras() {
        let names: Vec<String> = (0..200).map(|i| format!("cam{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let exporter = Exporter::new(sources(graph_with(&refs)));
        let started = Instant::now();
        let body = exporter.render();
        assert!(started.elapsed().as_secs() < 2);
        assert_eq!(
            parse(&body)
                .samples
                .iter()
                .filter(|s| s.metric == "vigil_camera_state")
                .count(),
            200 * 4
        );
    }
}
