//! What a camera is: its `[cameras.<name>]` config, and the [`SourceSpec`] its pipeline is built
//! from (template text, resolved paths, properties set on named elements).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app::AppSink;
use serde::Deserialize;

use crate::secrets::{redact_url, url_secrets};
use crate::source::motion::MotionConfig;
use crate::source::queue::FullPolicy;
use crate::source::template::{load_template, render_template};
use crate::source::zones::{Regions, ZoneConfig};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("camera {camera}: template {template}: {message}")]
    Template {
        camera: String,
        template: PathBuf,
        message: String,
    },
    #[error("camera {camera}: {message}")]
    Pipeline { camera: String, message: String },
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

/// How RTSP media reach vigil.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RtspTransport {
    /// TCP (interleaved in the RTSP connection) first, for it loses nothing and crosses NATs;
    /// UDP when a connection over TCP gets no frame (cameras and servers that only do UDP).
    #[default]
    Auto,
    Tcp,
    Udp,
}

impl RtspTransport {
    /// The transport of the first try.
    pub fn first(self) -> RtspTransport {
        match self {
            RtspTransport::Auto => RtspTransport::Tcp,
            t => t,
        }
    }

    /// The transport to try after `self` failed before any frame came, under this setting.
    pub fn after_failure(self, setting: RtspTransport) -> RtspTransport {
        match (setting, self) {
            (RtspTransport::Auto, RtspTransport::Tcp) => RtspTransport::Udp,
            (RtspTransport::Auto, _) => RtspTransport::Tcp,
            (fixed, _) => fixed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RtspTransport::Auto => "auto",
            RtspTransport::Tcp => "tcp",
            RtspTransport::Udp => "udp",
        }
    }
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
    /// Named parts of the frame, each classified on its own.
    pub zones: BTreeMap<String, ZoneConfig>,
    /// Classify the whole frame too when there are zones (default: no, only the zones; without
    /// zones the whole frame is classified).
    pub whole_frame: Option<bool>,
    /// Analyse only where something changed.
    pub motion: MotionConfig,
    /// The head (trained with `vigil train`) that labels this camera's whole frame and its zones
    /// that name none of their own.
    pub head: Option<String>,
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
            transport: RtspTransport::Auto,
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
            zones: BTreeMap::new(),
            whole_frame: None,
            motion: MotionConfig::default(),
            head: None,
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

    /// The regions of this camera's frames that are classified.
    pub fn regions(&self) -> Regions {
        Regions::new(&self.zones, self.whole_frame)
    }

    /// Live cameras drop the oldest frame when vigil falls behind; non-realtime files wait.
    pub fn full_policy(&self) -> FullPolicy {
        match self.source {
            SourceKind::Rtsp | SourceKind::Test => FullPolicy::DropOldest,
            SourceKind::File if self.realtime => FullPolicy::DropOldest,
            SourceKind::File => FullPolicy::Block,
        }
    }
}

/// Everything needed to build one camera's pipeline.
#[derive(Clone)]
pub struct SourceSpec {
    pub name: Arc<str>,
    pub camera: CameraConfig,
    /// Where the template came from (for messages) and its text.
    pub template_path: PathBuf,
    pub template: String,
    /// The file path, resolved against the config's directory.
    pub file: Option<PathBuf>,
    /// The regions of its frames that are classified: motion looks at them in the gate, the
    /// preprocess workers crop them.
    pub regions: Arc<Regions>,
    /// Threads each of its video decoders may use when every frame is decoded (the template's
    /// own `max-threads`, if it sets one, wins): by default the cores vigil may use.
    pub decoder_threads: usize,
    /// `pipeline.max_frame_age`: a live camera's key frame that reaches its decoder later than
    /// this, and than the camera's key-frame interval (its next key frame is then here too), is
    /// skipped undecoded (zero: never).
    pub max_frame_age: Duration,
}

/// The cores vigil may use: those of its CPU affinity and its cgroup's quota (a container's CPU
/// limit), not every core the machine has.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl SourceSpec {
    /// The spec of camera `name`: its template read from `templates_dir` (or built in), its file
    /// path resolved against `base_dir`.
    pub fn new(
        name: &str,
        camera: &CameraConfig,
        templates_dir: &Path,
        base_dir: &Path,
    ) -> Result<SourceSpec, SourceError> {
        let (template, template_path) = load_template(templates_dir, &camera.template_name())
            .map_err(|message| SourceError::Pipeline {
                camera: name.into(),
                message,
            })?;
        Ok(SourceSpec {
            name: name.into(),
            camera: camera.clone(),
            template_path,
            template,
            file: camera.path.as_ref().map(|p| base_dir.join(p)),
            regions: Arc::new(camera.regions()),
            decoder_threads: cores(),
            // Config::source_spec sets `pipeline.max_frame_age`.
            max_frame_age: Duration::ZERO,
        })
    }

    /// Secrets that must never appear in a log line.
    pub fn secrets(&self) -> Vec<String> {
        let mut s = Vec::new();
        if let Some(p) = &self.camera.password {
            s.push(p.clone());
        }
        s.extend(
            self.camera
                .url
                .as_deref()
                .map(url_secrets)
                .unwrap_or_default(),
        );
        s
    }

    /// A description of the source for logs: redacted URL, or path, or pattern.
    pub fn describe(&self) -> String {
        match self.camera.source {
            SourceKind::Rtsp => redact_url(self.camera.url.as_deref().unwrap_or("")),
            SourceKind::File => self
                .file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            SourceKind::Test => format!("videotestsrc pattern={}", self.camera.pattern),
        }
    }

    fn template_error(&self, message: String) -> SourceError {
        SourceError::Template {
            camera: self.name.to_string(),
            template: self.template_path.clone(),
            message,
        }
    }

    fn named(&self, pipeline: &gst::Pipeline, name: &str) -> Result<gst::Element, SourceError> {
        pipeline.by_name(name).ok_or_else(|| {
            self.template_error(format!(
                "has no element named {name:?} (name=... in the template)"
            ))
        })
    }

    /// Parses the template and configures its elements (an RTSP source over `transport`, `tcp`
    /// or `udp`); the pipeline is left in Null.
    pub fn build(&self, transport: RtspTransport) -> Result<(gst::Pipeline, AppSink), SourceError> {
        let pipeline = self.parse()?;
        self.configure_source(&pipeline, transport)?;
        for (key, value) in &self.camera.properties {
            let (element, property) = key.split_once('.').unwrap_or((key, ""));
            let e = self.named(&pipeline, element)?;
            set_str(&e, property, value).map_err(|m| SourceError::Pipeline {
                camera: self.name.to_string(),
                message: format!("properties.{key:?}: {m}"),
            })?;
        }
        let sink = self.configure_sink(&pipeline)?;
        Ok((pipeline, sink))
    }

    /// The template with its integers filled in, parsed into a pipeline.
    fn parse(&self) -> Result<gst::Pipeline, SourceError> {
        let cam = &self.camera;
        let desc = render_template(
            &self.template,
            &[
                ("width", cam.width as u64),
                ("height", cam.height as u64),
                ("fps", cam.fps as u64),
                ("latency_ms", cam.latency.as_millis() as u64),
            ],
        )
        .map_err(|e| self.template_error(e))?;
        let element = gst::parse::launch(&desc).map_err(|e| self.template_error(e.to_string()))?;
        match element.downcast::<gst::Pipeline>() {
            Ok(p) => Ok(p),
            Err(element) => {
                let p = gst::Pipeline::new();
                p.add(&element)
                    .map_err(|e| self.template_error(e.to_string()))?;
                Ok(p)
            }
        }
    }

    /// The element named `src`: the URL and credentials, the file, or the test pattern.
    fn configure_source(
        &self,
        pipeline: &gst::Pipeline,
        transport: RtspTransport,
    ) -> Result<(), SourceError> {
        let cam = &self.camera;
        let src = self.named(pipeline, "src")?;
        let set = |property: &str, value: &str| {
            set_str(&src, property, value).map_err(|e| self.template_error(e))
        };
        match cam.source {
            SourceKind::Rtsp => {
                set("location", cam.url.as_deref().unwrap_or(""))?;
                if let Some(u) = &cam.username {
                    set("user-id", u)?;
                }
                if let Some(p) = &cam.password {
                    set("user-pw", p)?;
                }
                set("protocols", transport.first().as_str())?;
            }
            SourceKind::File => {
                let path = self.file.as_ref().expect("file sources have a path");
                set("location", &path.to_string_lossy())?;
            }
            SourceKind::Test => {
                set_str(&src, "pattern", &cam.pattern).map_err(|e| SourceError::Pipeline {
                    camera: self.name.to_string(),
                    message: format!("pattern: {e}"),
                })?;
            }
        }
        Ok(())
    }

    /// The appsink named `sink`: the formats the workers take, its queue and its clock.
    fn configure_sink(&self, pipeline: &gst::Pipeline) -> Result<AppSink, SourceError> {
        let cam = &self.camera;
        let sink = self
            .named(pipeline, "sink")?
            .downcast::<AppSink>()
            .map_err(|_| {
                self.template_error("the element named \"sink\" must be an appsink".into())
            })?;
        // I420 first: the workers crop and scale it plane by plane and convert only the small
        // result, so no full-size colour conversion happens (and videoconvert passes decoders'
        // usual I420 through untouched). BGR is accepted too.
        sink.set_caps(Some(
            &gst::Caps::builder("video/x-raw")
                .field("format", gst::List::new(["I420", "BGR"]))
                .build(),
        ));
        sink.set_max_buffers(2);
        sink.set_drop(cam.full_policy() == FullPolicy::DropOldest);
        // Files paced to real time are synchronised on the clock (their coded frames are paced
        // at the decoder too, `pacing.rs`: the sink sees only what is analysed); everything else
        // runs as fast as frames come.
        sink.set_sync(cam.source == SourceKind::File && cam.realtime);
        sink.set_property("enable-last-sample", false);
        Ok(sink)
    }
}

/// Sets a property from its string form, with an error (not a panic) for a wrong name or value.
fn set_str(element: &gst::Element, property: &str, value: &str) -> Result<(), String> {
    use gst::prelude::GstValueExt;
    let pspec = element.find_property(property).ok_or_else(|| {
        format!(
            "element {} ({}) has no property {property:?}",
            element.name(),
            element
                .factory()
                .map(|f| f.name().to_string())
                .unwrap_or_default()
        )
    })?;
    if !pspec.flags().contains(gst::glib::ParamFlags::WRITABLE) {
        return Err(format!("property {property:?} is read-only"));
    }
    let v = if pspec.value_type() == gst::glib::Type::STRING {
        value.to_value()
    } else {
        gst::glib::Value::deserialize(value, pspec.value_type())
            .map_err(|_| format!("{value:?} is not a valid value for {property:?}"))?
    };
    element.set_property_from_value(property, &v);
    Ok(())
}
