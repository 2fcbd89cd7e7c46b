//! `vigil classify`: one JSON line per frame of each image or video, through the same stages as
//! the cameras (preprocessing, batcher, model, decide).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use crossbeam_channel::Receiver;
use vigil_engine::serving::{LoadedModel, ModelSlot};

use super::{AppError, DRAIN_DEADLINE, batch_size, init_gstreamer};
use crate::config::{Config, HeadBinding};
use crate::frame::{Frame, FrameMeta, FrameResult, Pixels};
use crate::pipeline::heads;
use crate::pipeline::{CameraInput, Graph, GraphConfig, Recycler};
use crate::publish::payload::FramePayload;
use crate::source::zones::Regions;
use crate::source::{self, CameraConfig, FrameQueue, FullPolicy, SourceKind, SourceSpec};
use crate::stats::GraphStats;

const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "pgm", "ppm",
];

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The inputs, sorted: still images (decoded by `images`), videos played by GStreamer.
struct Inputs {
    images: Vec<(Arc<str>, PathBuf)>,
    videos: Vec<SourceSpec>,
    /// Inputs that do not exist.
    missing: usize,
    /// What of each frame is classified (`--zone`).
    regions: Arc<Regions>,
}

impl Inputs {
    fn sort(config: &Config, paths: &[PathBuf], regions: Regions) -> Result<Inputs, AppError> {
        let mut inputs = Inputs {
            images: Vec::new(),
            videos: Vec::new(),
            missing: 0,
            regions: Arc::new(regions),
        };
        for (i, path) in paths.iter().enumerate() {
            if !path.is_file() {
                eprintln!("{}: no such file", path.display());
                inputs.missing += 1;
                continue;
            }
            // Inputs are named by their path; the index keeps repeated paths apart.
            let name: Arc<str> = if paths[..i].contains(path) {
                format!("{}#{i}", path.display()).into()
            } else {
                path.display().to_string().into()
            };
            if is_image(path) {
                inputs.images.push((name, path.clone()));
            } else {
                let cam = CameraConfig {
                    source: SourceKind::File,
                    path: Some(path.clone()),
                    ..Default::default()
                };
                let mut spec = config.source_spec(&name, &cam)?;
                spec.file = Some(path.clone());
                spec.regions = inputs.regions.clone();
                inputs.videos.push(spec);
            }
        }
        Ok(inputs)
    }

    /// The graph's view of every input: none is live, so nothing is dropped.
    fn cameras(&self) -> Vec<CameraInput> {
        let images = self.images.iter().map(|(n, _)| CameraInput {
            name: n.clone(),
            policy: FullPolicy::Block,
            source: n.to_string(),
            regions: self.regions.clone(),
        });
        let videos = self.videos.iter().map(|s| CameraInput {
            name: s.name.clone(),
            policy: FullPolicy::Block,
            source: s.describe(),
            regions: s.regions.clone(),
        });
        images.chain(videos).collect()
    }
}

/// Classifies `paths` (the regions of each frame in `regions`, labelled by `head` when given),
/// writing one JSON line per frame and region on `out`. Returns how many inputs failed.
pub fn classify(
    config: &Config,
    paths: &[PathBuf],
    (regions, head): (Regions, Option<&str>),
    out: &mut (dyn Write + Send),
) -> Result<usize, AppError> {
    init_gstreamer()?;
    let model = config.load_model()?;
    let mut settings = config.decide_settings([]);
    if let Some(name) = head {
        settings.heads.push(head_binding(config, &model, name)?);
    }
    let batch = batch_size(config, &model);
    let slot = Arc::new(ModelSlot::tuned(model, batch));
    let inputs = Inputs::sort(config, paths, regions)?;
    let mut failures = inputs.missing;
    let cameras = inputs.cameras();
    if cameras.is_empty() {
        return Ok(failures);
    }
    let (lines_tx, lines) = crossbeam_channel::bounded::<String>(64);
    let graph = Graph::start(
        &GraphConfig::new(&config.pipeline, false),
        slot,
        settings,
        move |results, stats, recycler| write_lines(results, stats, recycler, lines_tx),
    );
    let stats = graph.stats.clone();
    let mut queues = Vec::new();
    for camera in cameras {
        queues.push(graph.control.add_camera(camera)?);
    }
    // Every input is in: the graph ends when they do.
    graph.control.seal();
    let (image_queues, video_queues) = queues.split_at(inputs.images.len());
    let mut threads = Vec::new();
    for ((name, path), (queue, _)) in inputs.images.into_iter().zip(image_queues) {
        match read_image(name, &path, queue.clone()) {
            Some(t) => threads.push(t),
            None => failures += 1,
        }
    }
    let video_names: Vec<Arc<str>> = inputs.videos.iter().map(|s| s.name.clone()).collect();
    let mut sources = Vec::new();
    for (spec, (queue, stop)) in inputs.videos.into_iter().zip(video_queues.iter().cloned()) {
        // Nobody listens to state changes here: the receiver is gone, sends are ignored.
        let (ignored, _) = crossbeam_channel::unbounded();
        sources.push(source::spawn(spec, queue, stop, ignored));
    }
    let (_never_tx, never) = crossbeam_channel::bounded::<()>(0);
    let waiter = std::thread::spawn(move || graph.wait(&never, DRAIN_DEADLINE));
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
    for t in threads {
        let _ = t.join();
    }
    for s in sources {
        s.join();
    }
    waiter
        .join()
        .map_err(|_| AppError::Panicked("the graph's supervisor".into()))??;
    Ok(failures + undecoded(&stats, &video_names))
}

/// `--head`: the head's version in service, bound to every region, if it was trained on the
/// model in use.
fn head_binding(config: &Config, model: &LoadedModel, name: &str) -> Result<HeadBinding, AppError> {
    heads::check_name(name)?;
    let head = heads::load_current(&config.heads_dir(), name)?;
    let fits = head.backbone.name == model.version.info.name
        && head.backbone.version == model.version.info.version;
    if !fits {
        return Err(heads::HeadError::Invalid {
            name: name.to_string(),
            message: format!(
                "version {} was trained on {} {}, not on the model in use ({} {}): train it again",
                head.info.version,
                head.backbone.name,
                head.backbone.version,
                model.version.info.name,
                model.version.info.version
            ),
        }
        .into());
    }
    Ok(HeadBinding {
        camera: None,
        zone: None,
        name: name.to_string(),
        head: Some(Arc::new(head)),
    })
}

/// The sink of `classify`: each result as a JSON line.
fn write_lines(
    results: Receiver<FrameResult>,
    stats: &Arc<GraphStats>,
    recycler: Recycler,
    lines: crossbeam_channel::Sender<String>,
) {
    let mut first: Option<Instant> = None;
    let mut frames = 0u64;
    for r in results {
        stats.sink.received(1);
        first.get_or_insert_with(Instant::now);
        frames += 1;
        let line = serde_json::to_string(&FramePayload::new(&r, &r.model, None))
            .expect("payloads serialise");
        recycler.recycle(r);
        if lines.send(line).is_err() {
            return;
        }
    }
    if let Some(first) = first {
        let secs = first.elapsed().as_secs_f64();
        tracing::info!(
            frames,
            seconds = format!("{secs:.2}"),
            fps = format!("{:.1}", frames.saturating_sub(1) as f64 / secs.max(1e-9)),
            "classified"
        );
    }
}

/// Reads an image and queues it on its own thread; None (the queue closed) when it cannot be
/// decoded.
fn read_image(
    name: Arc<str>,
    path: &Path,
    queue: Arc<FrameQueue>,
) -> Option<std::thread::JoinHandle<()>> {
    match crate::images::read(path) {
        Ok(m) if !opencv::prelude::MatTraitConst::empty(&m) => {
            let frame = Frame {
                meta: FrameMeta::new(name, 0, None),
                pixels: Pixels::Mat(m),
            };
            Some(std::thread::spawn(move || {
                queue.push(frame);
                queue.close();
            }))
        }
        _ => {
            eprintln!("{}: cannot decode this image", path.display());
            queue.close();
            None
        }
    }
}

/// How many of the videos gave no frame at all (each said so on stderr).
fn undecoded(stats: &GraphStats, videos: &[Arc<str>]) -> usize {
    videos
        .iter()
        .filter(|name| {
            let none = stats
                .camera(name)
                .is_none_or(|c| c.frames.load(Relaxed) == 0);
            if none {
                eprintln!("{name}: no video frame could be decoded (see the log above)");
            }
            none
        })
        .count()
}
