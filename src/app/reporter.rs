//! The reporter: every `pipeline.log_interval`, each camera's input fps and drops and the
//! pipeline's classified fps, batch size, inference time, latency and MQTT state, in the log; and
//! each camera's status refreshed on MQTT.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::publish::mqtt::MqttMonitor;
use crate::shutdown::{Exits, Joinable, Shutdown};
use crate::stats::{GraphStats, LatencyLog, StageSnapshot};

pub struct Reporter {
    pub stats: Arc<GraphStats>,
    pub mqtt: MqttMonitor,
    pub latency: Arc<LatencyLog>,
    pub interval: Duration,
    /// The sink refreshes a camera's status when its name comes here.
    pub notices: Sender<Arc<str>>,
}

impl Reporter {
    /// Runs on a thread watched through `exits`: a panic in it stops vigil.
    pub fn spawn(self, stop: Shutdown, exits: &Exits) -> Joinable {
        exits
            .spawn("reporter".into(), move || self.run(&stop))
            .expect("spawning the reporter")
    }

    fn run(self, stop: &Shutdown) {
        let mut last_cams: HashMap<Arc<str>, [u64; 4]> = self
            .stats
            .cameras()
            .into_iter()
            .map(|(n, c)| (n, c.snapshot()))
            .collect();
        let mut last = (self.stats.infer.snapshot(), self.stats.batch.snapshot());
        let mut last_time = Instant::now();
        while !stop.stopped_within(self.interval) {
            fail::fail_point!("reporter");
            let secs = last_time.elapsed().as_secs_f64();
            last_time = Instant::now();
            self.log_cameras(&mut last_cams, secs);
            last = self.log_pipeline(last, secs);
        }
    }

    /// Each camera's figures since the last report (the cameras a reload added are counted from
    /// their start).
    fn log_cameras(&self, last_cams: &mut HashMap<Arc<str>, [u64; 4]>, secs: f64) {
        let cameras = self.stats.cameras();
        last_cams.retain(|name, _| cameras.iter().any(|(n, _)| n == name));
        for (name, cam) in &cameras {
            let last = last_cams.entry(name.clone()).or_insert([0; 4]);
            let now = cam.snapshot();
            let fps = now[0].saturating_sub(last[0]) as f64 / secs;
            cam.input_fps_x100
                .store((fps * 100.0).round() as u64, Relaxed);
            let _ = self.notices.send(name.clone());
            tracing::info!(
                camera = %name,
                state = cam.state().state.as_str(),
                input_fps = format!("{fps:.1}"),
                skipped_for_rate = now[1].saturating_sub(last[1]),
                dropped_behind = now[2].saturating_sub(last[2]),
                restarts = now[3],
                "camera figures"
            );
            *last = now;
        }
    }

    fn log_pipeline(
        &self,
        (last_infer, last_batch): (StageSnapshot, StageSnapshot),
        secs: f64,
    ) -> (StageSnapshot, StageSnapshot) {
        let infer = self.stats.infer.snapshot();
        let batch = self.stats.batch.snapshot();
        let frames = infer.received - last_infer.received;
        let batches = batch.sent - last_batch.sent;
        let busy = infer.busy - last_infer.busy;
        let mqtt = &self.mqtt;
        let outbox = mqtt.outbox();
        let (p50, p99) = self
            .latency
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
        (infer, batch)
    }
}
