//! The console's System screen: the service's figures sampled every [`INTERVAL`] and kept for
//! ten minutes, so that a page opened now shows the last minutes at once. Counters become rates
//! between two samples; latency percentiles are of the frames published between them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::publish::mqtt::MqttMonitor;
use crate::stats::{GraphStats, LatencyLog, StageStats};
use crate::sync::lock;

/// How often the supervisor takes a sample.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Samples kept: ten minutes.
const KEPT: usize = 300;

/// Counters of the previous sample, to make rates of.
struct Counters {
    at: Instant,
    /// Per camera: frames decoded, analysed, dropped behind.
    cameras: BTreeMap<String, (u64, u64, u64)>,
    /// Per stage: time busy.
    stages: BTreeMap<&'static str, Duration>,
}

/// What a sample reads.
pub struct Sources<'a> {
    pub graph: &'a GraphStats,
    pub mqtt: Option<&'a MqttMonitor>,
    /// The model in service (name, version, variant, provider).
    pub model: Value,
    /// Latencies of the frames published since the last sample.
    pub latency: &'a LatencyLog,
}

#[derive(Default)]
pub struct SystemHistory {
    samples: Mutex<VecDeque<Value>>,
    last: Mutex<Option<Counters>>,
}

impl SystemHistory {
    /// Takes a sample now.
    pub fn sample(&self, src: &Sources) {
        let now = Instant::now();
        let counters = counters(src.graph, now);
        let mut last = lock(&self.last);
        let seconds = last
            .as_ref()
            .map(|l| now.duration_since(l.at).as_secs_f64())
            .filter(|s| *s > 0.0);
        let rate = |now: u64, before: Option<u64>| match (before, seconds) {
            (Some(b), Some(s)) => json!(now.saturating_sub(b) as f64 / s),
            _ => Value::Null,
        };
        let mut cameras = serde_json::Map::new();
        for (name, cam) in src.graph.cameras() {
            let (decoded, analysed, dropped) = counters.cameras[&*name];
            let before = last.as_ref().and_then(|l| l.cameras.get(&*name));
            cameras.insert(
                name.to_string(),
                json!({
                    "state": cam.state().state,
                    "enabled": cam.enabled.load(Relaxed),
                    "fps": rate(decoded, before.map(|b| b.0)),
                    "analysed_fps": rate(analysed, before.map(|b| b.1)),
                    "dropped_per_s": rate(dropped, before.map(|b| b.2)),
                }),
            );
        }
        let mut stages = serde_json::Map::new();
        for (name, stage) in stages_of(src.graph) {
            let busy = match (last.as_ref().and_then(|l| l.stages.get(name)), seconds) {
                (Some(b), Some(s)) => json!(
                    (counters.stages[name].saturating_sub(*b).as_secs_f64() / s).clamp(0.0, 1.0)
                ),
                _ => Value::Null,
            };
            let queue = stage.queue_depth.load(Relaxed);
            stages.insert(name.into(), json!({"busy": busy, "queue": queue}));
        }
        let (p50, p99) = src
            .latency
            .take_percentiles()
            .map_or((Value::Null, Value::Null), |(a, b)| {
                (json!(ms(a)), json!(ms(b)))
            });
        let mqtt = src.mqtt.map_or(Value::Null, |m| {
            let o = m.outbox();
            json!({
                "connected": m.connected(),
                "outbox": o.queued_now + o.in_flight_now,
                "delivered": o.delivered.iter().sum::<u64>(),
                "dropped": o.dropped.iter().sum::<u64>(),
            })
        });
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let sample = json!({
            "t": t,
            "model": src.model,
            "mqtt": mqtt,
            "latency_ms": {"p50": p50, "p99": p99},
            "cameras": cameras,
            "stages": stages,
        });
        *last = Some(counters);
        drop(last);
        let mut samples = lock(&self.samples);
        samples.push_back(sample);
        while samples.len() > KEPT {
            samples.pop_front();
        }
    }

    /// A camera's rates in the last sample: `fps` (decoded), `analysed_fps`, `dropped_per_s`.
    pub fn camera_rates(&self, camera: &str) -> Option<Value> {
        lock(&self.samples)
            .back()
            .and_then(|s| s["cameras"].get(camera).cloned())
    }

    /// `GET /api/system`.
    pub fn json(&self) -> Value {
        let samples: Vec<Value> = lock(&self.samples).iter().cloned().collect();
        json!({"interval_ms": INTERVAL.as_millis() as u64, "samples": samples})
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

fn stages_of(g: &GraphStats) -> [(&'static str, &StageStats); 5] {
    [
        ("preprocess", &g.preprocess),
        ("batch", &g.batch),
        ("infer", &g.infer),
        ("decide", &g.decide),
        ("sink", &g.sink),
    ]
}

fn counters(g: &GraphStats, at: Instant) -> Counters {
    let cameras = g
        .cameras()
        .iter()
        .map(|(name, c)| {
            let skipped = c.skipped_rate.load(Relaxed)
                + c.skipped_disabled.load(Relaxed)
                + c.skipped_motion.load(Relaxed);
            let dropped = c.dropped_queue.load(Relaxed);
            let decoded = c.frames.load(Relaxed);
            let analysed = decoded.saturating_sub(skipped).saturating_sub(dropped);
            (name.to_string(), (decoded, analysed, dropped))
        })
        .collect();
    let stages = stages_of(g)
        .iter()
        .map(|(n, s)| (*n, Duration::from_nanos(s.busy_ns.load(Relaxed))))
        .collect();
    Counters {
        at,
        cameras,
        stages,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::stats::CameraStats;

    #[test]
    fn rates_come_from_two_samples_and_latency_empties_between_them() {
        let graph = GraphStats::default();
        let cam = Arc::new(CameraStats::new("test".into()));
        graph.insert_camera("door".into(), cam.clone());
        let latency = LatencyLog::default();
        let history = SystemHistory::default();
        let src = Sources {
            graph: &graph,
            mqtt: None,
            model: json!({"name": "m"}),
            latency: &latency,
        };
        history.sample(&src);
        cam.frames.fetch_add(50, Relaxed);
        cam.dropped_queue.fetch_add(10, Relaxed);
        graph.infer.busy_ns.fetch_add(1, Relaxed);
        latency.record(Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(20));
        history.sample(&src);
        let v = history.json();
        let samples = v["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 2);
        assert!(samples[0]["cameras"]["door"]["analysed_fps"].is_null());
        let door = &samples[1]["cameras"]["door"];
        let (analysed, dropped) = (
            door["analysed_fps"].as_f64().unwrap(),
            door["dropped_per_s"].as_f64().unwrap(),
        );
        // 40 analysed and 10 dropped within a bit more than 20 ms.
        assert!(analysed > 0.0 && (analysed / dropped - 4.0).abs() < 1e-9);
        assert_eq!(samples[1]["latency_ms"]["p50"], json!(20.0));
        assert!(samples[0]["latency_ms"]["p99"].is_null());
        assert!(samples[1]["stages"]["infer"]["busy"].as_f64().unwrap() > 0.0);
    }

    #[test]
    fn only_the_last_ten_minutes_are_kept() {
        let graph = GraphStats::default();
        let latency = LatencyLog::default();
        let history = SystemHistory::default();
        let src = Sources {
            graph: &graph,
            mqtt: None,
            model: Value::Null,
            latency: &latency,
        };
        for _ in 0..KEPT + 5 {
            history.sample(&src);
        }
        assert_eq!(history.json()["samples"].as_array().unwrap().len(), KEPT);
    }
}
