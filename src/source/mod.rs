//! One camera: a GStreamer pipeline built from a template in `pipelines/` (`spec.rs`,
//! `template.rs`), its decoded frames gated (`gate.rs`) and queued (`queue.rs`) as [`Frame`]s, and
//! a thread that watches the bus and rebuilds the pipeline when it fails.

pub mod coded;
pub mod gate;
pub mod keydec;
pub mod lateness;
pub mod motion;
pub mod pacing;
pub mod queue;
pub mod spec;
pub mod template;
pub mod zones;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app::AppSink;

use crate::frame::{Frame, FrameMeta, Pixels};
use crate::secrets::scrub;
use crate::shutdown::{Joinable, Shutdown};
use crate::stats::{CameraState, CameraStats, State, now_ms};
use crate::sync::lock;
use coded::CodedSizes;
use gate::{Activity, FrameView, Gate, GateSetup, RunStart, Verdict, converter_sink_pad};
use lateness::Lateness;
use pacing::Pacing;
pub use queue::{FrameQueue, FullPolicy};
pub use spec::{
    CameraConfig, Codec, DecodeMode, RtspTransport, SourceError, SourceKind, SourceSpec,
};

/// Runs a camera until `stop` fires or (for a file that does not loop) its end. State changes
/// are announced with the camera's name on `notices`.
pub fn spawn(
    spec: SourceSpec,
    queue: Arc<FrameQueue>,
    stop: Shutdown,
    notices: Sender<Arc<str>>,
) -> Joinable {
    crate::shutdown::spawn(format!("cam-{}", spec.name), move || {
        // However the thread ends, the stages downstream see the camera's end.
        let _close = CloseOnDrop(&queue);
        let camera = Camera {
            spec: &spec,
            queue: &queue,
            notices: &notices,
        };
        camera.supervise(&stop);
        camera.set_state(State::Offline, 0, None);
    })
    .expect("spawning a camera thread")
}

/// Marks a segment event for a decoder fed key frames only as a key-units trick mode: the
/// decoder then outputs each picture as soon as it is decoded. Otherwise it holds each one back
/// until as many more have come in as the stream allows frames to be reordered (two for x264
/// with B-frames): with key frames only, two key-frame intervals late, and with still key frames
/// skipped (`motion.coded`), until the scene next changes.
fn key_units_only(event: &mut gst::Event) {
    if let gst::EventView::Segment(s) = event.view() {
        let mut segment = s.segment().clone();
        segment.set_flags(segment.flags() | gst::SegmentFlags::TRICKMODE_KEY_UNITS);
        *event = gst::event::Segment::builder(&segment)
            .seqnum(event.seqnum())
            .build();
    }
}

/// Turns a camera's decoded pictures into frames on its queue.
struct Delivery {
    queue: Arc<FrameQueue>,
    gate: Arc<Gate>,
    activity: Arc<Activity>,
    name: Arc<str>,
    /// The size last seen, to log changes.
    size: Option<(u32, u32)>,
}

impl Delivery {
    /// A picture with presentation time `pts`: gated (unless `admitted` upstream already),
    /// and queued if the gate takes it. `reached`: when the coded frame reached vigil, if it
    /// waited for a decoder shared with other cameras (that wait counts in its age and
    /// latency); None: now.
    fn frame(
        &mut self,
        buffer: gst::Buffer,
        caps: &gst::CapsRef,
        pts: Option<gst::ClockTime>,
        admitted: bool,
        reached: Option<Instant>,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let gate = &self.gate;
        if !admitted {
            let view = FrameView {
                buffer: &buffer,
                caps,
            };
            if gate.admit(pts.map(Duration::from), Some(view)) != Verdict::Analyse {
                return Ok(gst::FlowSuccess::Ok);
            }
        }
        let Some(admitted) = gate.take() else {
            return Ok(gst::FlowSuccess::Ok);
        };
        let info = gstreamer_video::VideoInfo::from_caps(caps)
            .map_err(|_| gst::FlowError::NotNegotiated)?;
        log_size(&self.name, &mut self.size, (info.width(), info.height()));
        let mut meta = FrameMeta::new(self.name.clone(), admitted.index, admitted.pts);
        if let Some(reached) = reached {
            meta.wall -= reached.elapsed();
            meta.arrived = reached;
        }
        let frame = Frame {
            meta: FrameMeta {
                due: admitted.due,
                ..meta
            },
            pixels: Pixels::Gst { buffer, info },
        };
        let activity = &self.activity;
        activity.pushing.store(true, Ordering::Relaxed);
        let pushed = self.queue.push(frame);
        activity.pushing.store(false, Ordering::Relaxed);
        self.alive();
        if pushed {
            Ok(gst::FlowSuccess::Ok)
        } else {
            Err(gst::FlowError::Flushing)
        }
    }

    /// The camera delivers, though no frame came of it this time: not a stall.
    fn alive(&self) {
        self.activity.last_ms.store(now_ms(), Ordering::Relaxed);
    }
}

fn is_video_decoder(element: &gst::Element) -> bool {
    element.factory().is_some_and(|f| {
        let klass = f.klass();
        klass.contains("Decoder") && klass.contains("Video")
    })
}

/// Runs `hook` on every video decoder of `pipeline`: those the template names, now, and those
/// decodebin plugs, as they come.
fn on_video_decoders(
    pipeline: &gst::Pipeline,
    hook: impl Fn(&gst::Element) + Send + Sync + 'static,
) {
    for element in pipeline.iterate_recurse().into_iter().flatten() {
        if is_video_decoder(&element) {
            hook(&element);
        }
    }
    pipeline.connect_deep_element_added(move |_, _, element| {
        if is_video_decoder(element) {
            hook(element);
        }
    });
}

/// Sets a video decoder to decode on one thread and, for libav, without direct rendering.
fn single_threaded(element: &gst::Element) {
    if element.find_property("max-threads").is_some() {
        element.set_property_from_str("max-threads", "1");
    }
    // libav's own frames, copied out: with direct rendering its reference pictures are buffers
    // of the decoder's pool, which keeps a reference set of full frames per camera although key
    // frames need none (about 1.2 MiB per 720p camera).
    if element.find_property("direct-rendering").is_some() {
        element.set_property("direct-rendering", false);
    }
}

/// What reaches a camera's video decoder with `decode = "keyframes"`: delta frames dropped,
/// still key frames dropped (`coded`), and with shared decoders the rest decoded by one of them.
struct KeyFrameFilter {
    stats: Arc<CameraStats>,
    gate: Arc<Gate>,
    delivery: Arc<Mutex<Delivery>>,
    coded: bool,
    sizes: Mutex<CodedSizes>,
    shared: Option<&'static keydec::KeyFrameDecoders>,
    /// The camera decoder's factory: the shared decoder is made by the same.
    factory: Option<gst::ElementFactory>,
    camera: Arc<str>,
    /// A shared decode failed once already in this run (said at warn once).
    warned: std::sync::atomic::AtomicBool,
    /// With shared decoders the camera's own decoder is kept from the caps too: it then never
    /// opens its codec, nor allocates any picture. They are kept here.
    caps: Mutex<Option<gst::Caps>>,
    /// Live cameras: how late the coded frames come, and `pipeline.max_frame_age` (None: a
    /// file, never skipped).
    lateness: Option<(Mutex<Lateness>, Duration)>,
    origin: Instant,
}

impl KeyFrameFilter {
    fn probe(&self, info: &mut gst::PadProbeInfo) -> gst::PadProbeReturn {
        if let Some(gst::PadProbeData::Event(event)) = &mut info.data {
            if self.shared.is_some()
                && let gst::EventView::Caps(c) = event.view()
            {
                *lock(&self.caps) = Some(c.caps_owned());
                return gst::PadProbeReturn::Drop;
            }
            key_units_only(event);
            return gst::PadProbeReturn::Ok;
        }
        let Some(b) = info.buffer() else {
            return gst::PadProbeReturn::Ok;
        };
        let wall = self.origin.elapsed();
        if b.flags().contains(gst::BufferFlags::DELTA_UNIT) {
            if let (Some((lateness, _)), Some(pts)) = (&self.lateness, b.pts()) {
                lock(lateness).frame(pts.into(), wall);
            }
            self.stats.skipped_delta.fetch_add(1, Ordering::Relaxed);
            if self.coded {
                lock(&self.sizes).delta(b.size());
            }
            return gst::PadProbeReturn::Handled;
        }
        if self.coded {
            let wish = self.gate.key_frame_wish(b.pts().map(Duration::from));
            let decode = lock(&self.sizes).key(b.size(), wish.needed, wish.still);
            if !decode {
                self.stats.skipped_still.fetch_add(1, Ordering::Relaxed);
                lock(&self.delivery).alive();
                return gst::PadProbeReturn::Handled;
            }
        }
        // Behind: the camera's next key frame has come too. Skipped before its decode, the
        // cheapest place, and counted as dropped behind like a frame skipped in a queue.
        if let (Some((lateness, max_age)), Some(pts)) = (&self.lateness, b.pts())
            && lock(lateness).skip_key(pts.into(), wall, *max_age)
        {
            self.stats.dropped_queue.fetch_add(1, Ordering::Relaxed);
            lock(&self.delivery).alive();
            return gst::PadProbeReturn::Handled;
        }
        self.decode_shared(info)
    }

    /// A key frame to decode: by a shared decoder, its picture delivered here (Handled), or by
    /// the camera's own decoder (Ok) when decoders are not shared.
    fn decode_shared(&self, info: &mut gst::PadProbeInfo) -> gst::PadProbeReturn {
        let (Some(shared), Some(factory), Some(caps)) =
            (self.shared, &self.factory, lock(&self.caps).clone())
        else {
            return gst::PadProbeReturn::Ok;
        };
        let Some(gst::PadProbeData::Buffer(buffer)) = info.data.take() else {
            return gst::PadProbeReturn::Ok;
        };
        let pts = buffer.pts();
        let reached = Instant::now();
        match shared.decode(factory, &caps, buffer) {
            Ok(Some(d)) => {
                let _ = lock(&self.delivery).frame(d.buffer, &d.caps, pts, false, Some(reached));
            }
            Ok(None) => lock(&self.delivery).alive(),
            Err(error) => {
                // Said once per run at warn: a stream the decoder cannot read fails every key
                // frame.
                let camera = &self.camera;
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(camera = %camera, %error, "key frame not decoded");
                } else {
                    tracing::debug!(camera = %camera, %error, "key frame not decoded");
                }
                lock(&self.delivery).alive();
            }
        }
        gst::PadProbeReturn::Handled
    }
}

/// Closes a camera's queue when dropped.
struct CloseOnDrop<'a>(&'a FrameQueue);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

enum Outcome {
    /// A file that does not loop reached its end.
    Finished,
    Stopped,
    Failed(String),
}

struct Camera<'a> {
    spec: &'a SourceSpec,
    queue: &'a Arc<FrameQueue>,
    notices: &'a Sender<Arc<str>>,
}

impl Camera<'_> {
    fn stats(&self) -> &CameraStats {
        &self.queue.stats
    }

    fn set_state(&self, state: State, attempt: u32, error: Option<String>) -> CameraState {
        let previous = self.stats().set_state(state, attempt, error);
        let _ = self.notices.send(self.spec.name.clone());
        previous
    }

    /// The message with the camera's credentials removed.
    fn scrubbed(&self, message: &str) -> String {
        let secrets = self.spec.secrets();
        scrub(
            message,
            &secrets.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        )
    }

    /// Runs the camera; a panic in its thread is not the end of it: the camera is restarted with
    /// backoff, `reconnecting` with the panic as its last error.
    fn supervise(&self, stop: &Shutdown) {
        let cam = &self.spec.camera;
        let mut delay = cam.retry_min;
        let mut attempt = 0;
        loop {
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(stop)));
            let Err(payload) = run else {
                return;
            };
            attempt += 1;
            let message = format!(
                "panicked: {}",
                self.scrubbed(&crate::shutdown::panic_message(payload.as_ref()))
            );
            self.stats().restarts.fetch_add(1, Ordering::Relaxed);
            let retry_in = jitter(delay);
            tracing::error!(camera = %self.spec.name, error = %message, retry_in = ?retry_in,
                "the camera's thread panicked; restarting it");
            self.set_state(State::Reconnecting, attempt, Some(message));
            if stop.stopped_within(retry_in) {
                return;
            }
            delay = (delay * 2).min(cam.retry_max);
        }
    }

    fn run(&self, stop: &Shutdown) {
        let spec = self.spec;
        let cam = &spec.camera;
        let retries = cam.source != SourceKind::File || cam.looping;
        let mut delay = cam.retry_min;
        let mut index = 0u64;
        let mut start = RunStart {
            attempt: 0,
            offline_since: None,
        };
        let mut transport = cam.transport.first();
        tracing::info!(camera = %spec.name, source = %spec.describe(), "starting camera");
        self.set_state(State::Starting, 0, None);
        loop {
            let activity = Arc::new(Activity::default());
            if cam.source == SourceKind::Rtsp {
                *lock(&self.stats().transport) = Some(transport.as_str());
            }
            let outcome = self.run_once(stop, &mut index, &activity, &start, transport);
            if activity.started.load(Ordering::Relaxed) {
                // It was online: the next failure starts a fresh backoff.
                delay = cam.retry_min;
                start.attempt = 0;
                start.offline_since = None;
            } else if cam.source == SourceKind::Rtsp {
                let next = transport.after_failure(cam.transport);
                if next != transport {
                    tracing::info!(camera = %spec.name, from = transport.as_str(), to = next.as_str(),
                        "no frame over this RTSP transport; trying the other");
                }
                transport = next;
            }
            let message = match outcome {
                Outcome::Finished => {
                    tracing::info!(camera = %spec.name, frames = index, "end of file");
                    return;
                }
                Outcome::Stopped => return,
                Outcome::Failed(message) => self.scrubbed(&message),
            };
            if !retries {
                tracing::error!(camera = %spec.name, error = %message, "camera failed");
                self.set_state(State::Offline, start.attempt, Some(message));
                return;
            }
            let retry_in = jitter(delay);
            self.reconnecting(&mut start, message, retry_in);
            if stop.stopped_within(retry_in) {
                return;
            }
            delay = (delay * 2).min(cam.retry_max);
        }
    }

    /// Counts a failed run and says so: loudly the first time, at debug while it goes on.
    fn reconnecting(&self, start: &mut RunStart, message: String, retry_in: Duration) {
        let name = &self.spec.name;
        start.attempt += 1;
        self.stats().restarts.fetch_add(1, Ordering::Relaxed);
        let previous = self.set_state(State::Reconnecting, start.attempt, Some(message.clone()));
        if previous.state != State::Reconnecting {
            start.offline_since.get_or_insert_with(Instant::now);
            tracing::warn!(camera = %name, error = %message, retry_in = ?retry_in,
                "camera lost; reconnecting (retries continue with backoff, logged at debug)");
        } else {
            tracing::debug!(camera = %name, attempt = start.attempt, error = %message,
                retry_in = ?retry_in, "camera still unreachable");
        }
    }

    /// Builds the pipeline, plays it until it ends, fails or `stop` fires, and tears it down.
    fn run_once(
        &self,
        stop: &Shutdown,
        index: &mut u64,
        activity: &Arc<Activity>,
        start: &RunStart,
        transport: RtspTransport,
    ) -> Outcome {
        fail::fail_point!("camera-run");
        let (pipeline, sink) = match self.spec.build(transport) {
            Ok(p) => p,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        self.count_received(&pipeline);
        let next_index = Arc::new(AtomicU64::new(*index));
        activity.last_ms.store(now_ms(), Ordering::Relaxed);
        let gate = Arc::new(Gate::new(
            self.queue.clone(),
            self.notices.clone(),
            activity.clone(),
            next_index.clone(),
            GateSetup {
                analyze_fps: self.spec.camera.analyze_fps,
                start: *start,
                prerolls: self.pauses_pipeline(),
                regions: self.spec.regions.clone(),
                motion: self.spec.camera.motion.clone(),
            },
        ));
        let delivery = Arc::new(Mutex::new(Delivery {
            queue: self.queue.clone(),
            gate: gate.clone(),
            activity: activity.clone(),
            name: self.spec.name.clone(),
            size: None,
        }));
        // First, so that it sees every coded frame before the probes that skip some.
        let pacing = self.pace(&pipeline);
        if self.spec.camera.decode == DecodeMode::Keyframes {
            self.drop_delta_frames(&pipeline, &gate, &delivery);
        } else {
            self.set_up_decoders(&pipeline);
        }
        let gated_upstream = gate_upstream(&sink, &gate);
        sink.set_callbacks(
            gstreamer_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    let buffer = sample.buffer_owned().ok_or(gst::FlowError::Error)?;
                    let caps = sample.caps().ok_or(gst::FlowError::NotNegotiated)?;
                    let pts = buffer.pts();
                    lock(&delivery).frame(buffer, caps, pts, gated_upstream, None)
                })
                .build(),
        );
        let outcome = self.watch(&pipeline, stop, activity);
        if let Some(pacing) = pacing {
            pacing.stop();
        }
        let _ = pipeline.set_state(gst::State::Null);
        *index = next_index.load(Ordering::Relaxed);
        outcome
    }

    /// A file played in real time is paced at its decoders' input (`pacing.rs`).
    fn pace(&self, pipeline: &gst::Pipeline) -> Option<Arc<Pacing>> {
        let cam = &self.spec.camera;
        if cam.source != SourceKind::File || !cam.realtime {
            return None;
        }
        let pacing = Arc::new(Pacing::default());
        let attached = pacing.clone();
        on_video_decoders(pipeline, move |decoder| {
            if let Some(pad) = decoder.static_pad("sink") {
                attached.attach(&pad);
            }
        });
        Some(pacing)
    }

    /// Counts the encoded frames reaching the element named `parse`, when the template has one.
    fn count_received(&self, pipeline: &gst::Pipeline) {
        let Some(pad) = pipeline
            .by_name("parse")
            .and_then(|parse| parse.static_pad("src"))
        else {
            return;
        };
        let stats = self.queue.stats.clone();
        stats.counts_received.store(true, Ordering::Relaxed);
        pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
            stats.received.fetch_add(1, Ordering::Relaxed);
            gst::PadProbeReturn::Ok
        });
    }

    /// `decode = "keyframes"`: drops non-key frames before whatever video decoder the pipeline
    /// ends up with (also one plugged inside decodebin), and decodes on one thread: a
    /// frame-threaded decoder holds a frame per extra thread before it outputs one (with key
    /// frames only, a key-frame interval or more each) and keeps their buffers (8 cameras at
    /// 720p: 471 MiB RSS and 64 threads with the default, 397 MiB and 48 threads with one).
    /// With motion gating and `motion.coded`, the key frames of a still scene are dropped too
    /// (`coded.rs`): a camera alive but not delivering anything to decode is not stalled.
    fn drop_delta_frames(
        &self,
        pipeline: &gst::Pipeline,
        gate: &Arc<Gate>,
        delivery: &Arc<Mutex<Delivery>>,
    ) {
        let motion = &self.spec.camera.motion;
        let coded = motion.enabled && motion.coded;
        // Files keep their own decoder, in their own pipeline, which paces (`pacing.rs`) and
        // prerolls them: only live cameras share.
        let shared = keydec::shared().filter(|_| self.spec.camera.source == SourceKind::Rtsp);
        let (stats, gate, delivery) = (self.queue.stats.clone(), gate.clone(), delivery.clone());
        let camera = self.spec.name.clone();
        let live = self.spec.camera.source == SourceKind::Rtsp;
        let max_frame_age = self.spec.max_frame_age;
        on_video_decoders(pipeline, move |element| {
            single_threaded(element);
            let Some(pad) = element.static_pad("sink") else {
                return;
            };
            let filter = KeyFrameFilter {
                stats: stats.clone(),
                gate: gate.clone(),
                delivery: delivery.clone(),
                coded,
                sizes: Mutex::new(CodedSizes::default()),
                shared,
                factory: element.factory(),
                camera: camera.clone(),
                warned: std::sync::atomic::AtomicBool::new(false),
                caps: Mutex::new(None),
                lateness: live.then(|| (Mutex::new(Lateness::default()), max_frame_age)),
                origin: Instant::now(),
            };
            let probed = gst::PadProbeType::BUFFER | gst::PadProbeType::EVENT_DOWNSTREAM;
            pad.add_probe(probed, move |_, info| filter.probe(info));
        });
    }

    /// Every frame decoded: a video decoder whose thread count the template leaves automatic
    /// gets the spec's `decoder_threads`, and the coded frames reaching it are counted
    /// (`decoder_in`: `vigil classify` says how many of a file's frames could not be decoded).
    /// GStreamer's libav decoder counts every core online, whatever vigil may use (pinned to
    /// one core with `taskset` it still took 2 here; a container's CPU quota is not seen by
    /// that count either, untested here), and each frame thread of a 1080p H.264 decoder
    /// holds 12-19 MiB (`gst-launch-1.0` decoding the 1080p bench clip peaked at 87 MiB with
    /// 1 thread, 106-109 with 2, 199 with 8, 303 with 16).
    fn set_up_decoders(&self, pipeline: &gst::Pipeline) {
        let threads = self.spec.decoder_threads.max(1) as i32;
        let camera = self.spec.name.clone();
        let stats = self.queue.stats.clone();
        on_video_decoders(pipeline, move |element| {
            if element.find_property("max-threads").is_some()
                && element.property::<i32>("max-threads") == 0
            {
                element.set_property("max-threads", threads);
                tracing::debug!(camera = %camera, decoder = %element.name(), threads, "video decoder threads");
            }
            if let Some(pad) = element.static_pad("sink") {
                let stats = stats.clone();
                let coded = gst::PadProbeType::BUFFER | gst::PadProbeType::BUFFER_LIST;
                pad.add_probe(coded, move |_, info| {
                    let n = match &info.data {
                        Some(gst::PadProbeData::BufferList(list)) => list.len() as u64,
                        _ => 1,
                    };
                    stats.decoder_in.fetch_add(n, Ordering::Relaxed);
                    gst::PadProbeReturn::Ok
                });
            }
        });
    }

    /// Plays the pipeline and follows its bus until it ends, fails, stalls or `stop` fires.
    fn watch(&self, pipeline: &gst::Pipeline, stop: &Shutdown, activity: &Activity) -> Outcome {
        let spec = self.spec;
        let bus = pipeline.bus().expect("a pipeline has a bus");
        if let Err(e) = pipeline.set_state(gst::State::Playing) {
            // The reason, if any, is on the bus.
            let reason = bus
                .timed_pop_filtered(
                    gst::ClockTime::from_mseconds(500),
                    &[gst::MessageType::Error],
                )
                .and_then(|m| match m.view() {
                    gst::MessageView::Error(err) => Some(error_text(err)),
                    _ => None,
                })
                .unwrap_or_else(|| e.to_string());
            return Outcome::Failed(reason);
        }
        let mut paused = false;
        loop {
            if stop.is_stopped() {
                return Outcome::Stopped;
            }
            if self.pauses_pipeline() {
                self.follow_pause(pipeline, activity, &mut paused);
            }
            if !paused && let Some(stalled) = self.stalled(activity) {
                return Outcome::Failed(stalled);
            }
            let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else {
                continue;
            };
            match msg.view() {
                gst::MessageView::Eos(_) => {
                    if let Some(outcome) = self.at_end(pipeline, activity) {
                        return outcome;
                    }
                }
                gst::MessageView::Error(err) => return Outcome::Failed(error_text(err)),
                gst::MessageView::Warning(w) => {
                    tracing::debug!(camera = %spec.name, warning = %w.error(), "pipeline warning");
                }
                _ => {}
            }
        }
    }

    /// Files are paused (their pipeline waits: nothing is decoded, and a paced file keeps its
    /// pace) while their analysis is; live cameras keep streaming, their frames skipped before
    /// any conversion.
    fn pauses_pipeline(&self) -> bool {
        self.spec.camera.source == SourceKind::File
    }

    /// Pauses or resumes the pipeline with the camera's analysis. Resuming restarts the
    /// watchdog's count: a pause is not a stall. A change asked while the pipeline was still
    /// changing state (a pause right as it starts playing, or as a looping file's seek back
    /// makes it preroll again) can be lost; where the pipeline is heading (its pending state,
    /// else its state) is compared with the wish on every look and asked again when they differ.
    fn follow_pause(&self, pipeline: &gst::Pipeline, activity: &Activity, paused: &mut bool) {
        let want_paused = !self.stats().enabled.load(Ordering::Relaxed);
        let target = if want_paused {
            gst::State::Paused
        } else {
            gst::State::Playing
        };
        let asked = want_paused != *paused;
        if !asked {
            let (_, current, pending) = pipeline.state(gst::ClockTime::ZERO);
            let heading = if pending == gst::State::VoidPending {
                current
            } else {
                pending
            };
            if current < gst::State::Paused || heading == target {
                return;
            }
            tracing::debug!(camera = %self.spec.name, current = ?current, wanted = ?target,
                "the pipeline missed a pause or resume; asking again");
        }
        if !want_paused {
            activity.last_ms.store(now_ms(), Ordering::Relaxed);
        }
        let _ = pipeline.set_state(target);
        *paused = want_paused;
        if asked {
            let what = if want_paused {
                "analysis paused: the file's pipeline waits"
            } else {
                "analysis resumed: the file plays on"
            };
            tracing::debug!(camera = %self.spec.name, "{what}");
        }
    }

    /// The watchdog: a pipeline that claims to play but delivers nothing is dead.
    fn stalled(&self, activity: &Activity) -> Option<String> {
        let cam = &self.spec.camera;
        let started = activity.started.load(Ordering::Relaxed);
        let limit = if started {
            cam.stall_timeout
        } else {
            cam.start_timeout
        };
        let quiet = now_ms().saturating_sub(activity.last_ms.load(Ordering::Relaxed));
        if activity.pushing.load(Ordering::Relaxed) || quiet <= limit.as_millis() as u64 {
            return None;
        }
        let secs = quiet as f64 / 1000.0;
        Some(if started {
            format!("stalled: no frame for {secs:.1} s (stall_timeout)")
        } else {
            format!("no frame within {secs:.1} s of starting (start_timeout)")
        })
    }

    /// End of stream: a looping file starts again (None), a file is finished, a live stream that
    /// ends has failed.
    fn at_end(&self, pipeline: &gst::Pipeline, activity: &Activity) -> Option<Outcome> {
        let cam = &self.spec.camera;
        if cam.source != SourceKind::File {
            return Some(Outcome::Failed("the stream ended".into()));
        }
        if !cam.looping {
            return Some(Outcome::Finished);
        }
        if let Err(e) = pipeline.seek_simple(
            gst::SeekFlags::FLUSH | gst::SeekFlags::KEY_UNIT,
            gst::ClockTime::ZERO,
        ) {
            return Some(Outcome::Failed(format!(
                "cannot seek back to the start: {e}"
            )));
        }
        activity.last_ms.store(now_ms(), Ordering::Relaxed);
        tracing::debug!(camera = %self.spec.name, "looping");
        None
    }
}

/// Frames are counted and skipped (analyze_fps, paused) before the colour conversion when the
/// template has one in front of the appsink: skipped frames are never converted. Returns whether
/// the gate sits there (else the appsink callback gates).
///
/// Skipped buffers are returned as Handled, not Drop: gstreamer-rs takes the buffer out of the
/// probe info, and GStreamer 1.22 would then unref a NULL for Drop.
fn gate_upstream(sink: &AppSink, gate: &Arc<Gate>) -> bool {
    let Some(pad) = converter_sink_pad(sink) else {
        return false;
    };
    let gate = gate.clone();
    pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
        let Some(buffer) = info.buffer() else {
            return gst::PadProbeReturn::Ok;
        };
        let caps = pad.current_caps();
        let view = caps.as_ref().map(|caps| FrameView { buffer, caps });
        match gate.admit(buffer.pts().map(Duration::from), view) {
            Verdict::Skip => gst::PadProbeReturn::Handled,
            _ => gst::PadProbeReturn::Ok,
        }
    });
    true
}

/// Logs the first frame's size and every change of it.
fn log_size(camera: &str, size: &mut Option<(u32, u32)>, now: (u32, u32)) {
    if *size == Some(now) {
        return;
    }
    match *size {
        None => tracing::info!(camera, width = now.0, height = now.1, "receiving frames"),
        Some((w, h)) => tracing::info!(camera, from = %format!("{w}x{h}"),
            to = %format!("{}x{}", now.0, now.1), "resolution changed"),
    }
    *size = Some(now);
}

/// `d` +- 20%, so that cameras that failed together do not all retry at the same instant.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.8 + 0.4 * fastrand::f64())
}

fn error_text(err: &gst::message::Error) -> String {
    let src = err
        .src()
        .map(|s| s.path_string().to_string())
        .unwrap_or_default();
    match err.debug() {
        Some(d) => format!("{src}: {} ({d})", err.error()),
        None => format!("{src}: {}", err.error()),
    }
}
