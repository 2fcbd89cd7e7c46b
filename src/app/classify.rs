//! `vigil classify`: one JSON line per frame of each image or video, through the same stages as
//! the cameras (preprocessing, batcher, model, decide).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use crossbeam_channel::Receiver;
use vigil_engine::serving::{LoadedModel, ModelSlot};

use super::{AppError, DRAIN_DEADLINE, batch_size, init_gstreamer};
use crate::config::{Config, HeadBinding};
use crate::frame::{Frame, FrameMeta, FrameResult, Pixels};
use crate::pipeline::heads;
use crate::pipeline::{CameraInput, Graph, GraphConfig, GraphControl, Recycler};
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

/// One input: a still image (decoded by `images`) or a video played by GStreamer.
enum Input {
    Image(PathBuf),
    Video(Box<SourceSpec>),
}

/// The inputs in the order given, each under its name.
struct Inputs {
    inputs: Vec<(Arc<str>, Input)>,
    /// Inputs that do not exist.
    missing: usize,
    /// What of each frame is classified (`--zone`).
    regions: Arc<Regions>,
}

impl Inputs {
    /// The inputs of `paths`, `jobs` videos of them to be decoded at once.
    fn sort(
        config: &Config,
        paths: &[PathBuf],
        regions: Regions,
        jobs: usize,
    ) -> Result<Inputs, AppError> {
        let mut inputs = Inputs {
            inputs: Vec::new(),
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
            let input = if is_image(path) {
                Input::Image(path.clone())
            } else {
                let cam = CameraConfig {
                    source: SourceKind::File,
                    path: Some(path.clone()),
                    ..Default::default()
                };
                let mut spec = config.source_spec(&name, &cam)?;
                spec.file = Some(path.clone());
                spec.regions = inputs.regions.clone();
                spec.decoder_threads = decoder_threads(source::spec::cores(), jobs);
                Input::Video(Box::new(spec))
            };
            inputs.inputs.push((name, input));
        }
        Ok(inputs)
    }
}

/// The threads of each video's decoder, with `jobs` decoded at once on `cores`: half the cores
/// decode (the model takes the other half: at 1080p one frame costs about as much to decode as
/// to classify), shared by the decoders, one thread at least. A frame thread more than the
/// cores can keep busy only holds memory: on two cores the bench clips (1080p, then 720p) took
/// 12.4-13.0 s with one thread against 13.3-14.0 s with two, and peaked at 164 MiB against 181.
fn decoder_threads(cores: usize, jobs: usize) -> usize {
    (cores / (2 * jobs.max(1))).max(1)
}

/// How many inputs `vigil classify` decodes at once by default: half the cores, at least one.
/// A folder of thousands of files then holds a few decoders and their frames, not all of them.
/// On two cores the two bench clips side by side took 6% less time than one after the other,
/// and peaked 30-40 MiB higher (224 against 182-194 MiB).
pub fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() / 2)
        .unwrap_or(1)
        .max(1)
}

/// Classifies `paths` (the regions of each frame in `regions`, labelled by `head` when given),
/// `jobs` of them decoded at once, taken in the order given, writing one JSON line per frame
/// and region on `out`. Returns how many inputs failed.
pub fn classify(
    config: &Config,
    paths: &[PathBuf],
    (regions, head): (Regions, Option<&str>),
    jobs: usize,
    out: &mut (dyn Write + Send),
) -> Result<usize, AppError> {
    init_gstreamer()?;
    let model = config.load_model()?;
    let mut settings = config.decide_settings([]);
    if let Some(name) = head {
        settings.heads.push(head_binding(config, &model, name)?);
    }
    let batch = batch_size(config, &model, true);
    let slot = Arc::new(ModelSlot::tuned(model, batch));
    let inputs = Inputs::sort(config, paths, regions, jobs)?;
    if inputs.inputs.is_empty() {
        return Ok(inputs.missing);
    }
    let (lines_tx, lines) = crossbeam_channel::bounded::<String>(64);
    let graph = Graph::start(
        &GraphConfig::new(&config.pipeline, false),
        slot,
        settings,
        move |results, stats, recycler| write_lines(results, stats, recycler, lines_tx),
    );
    let stats = graph.stats.clone();
    let control = graph.control.clone();
    let (_never_tx, never) = crossbeam_channel::bounded::<()>(0);
    let waiter = std::thread::spawn(move || graph.wait(&never, DRAIN_DEADLINE));
    let videos: Vec<Arc<str>> = inputs
        .inputs
        .iter()
        .filter(|(_, i)| matches!(i, Input::Video(_)))
        .map(|(n, _)| n.clone())
        .collect();
    let missing = inputs.missing;
    let feeder = std::thread::spawn(move || feed(&control, inputs, jobs.max(1)));
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
    let unreadable = feeder
        .join()
        .map_err(|_| AppError::Panicked("the classify feeder".into()))??;
    waiter
        .join()
        .map_err(|_| AppError::Panicked("the graph's supervisor".into()))??;
    Ok(missing + unreadable + undecoded(&stats, &videos))
}

/// Adds the inputs to the graph in order, at most `jobs` of them open at once (each decoded on
/// a thread of its own), and seals the graph after the last. Returns how many images could not
/// be decoded.
fn feed(control: &GraphControl, inputs: Inputs, jobs: usize) -> Result<usize, AppError> {
    // A slot is taken by sending, given back by receiving: at most `jobs` are out.
    let (take, give_back) = crossbeam_channel::bounded::<()>(jobs);
    let unreadable = Arc::new(AtomicUsize::new(0));
    let mut running = Vec::new();
    for (name, input) in inputs.inputs {
        let _ = take.send(());
        let (source, regions) = match &input {
            Input::Image(_) => (name.to_string(), inputs.regions.clone()),
            Input::Video(spec) => (spec.describe(), spec.regions.clone()),
        };
        // None is live: nothing is dropped.
        let added = control.add_camera(CameraInput {
            name: name.clone(),
            policy: FullPolicy::Block,
            source,
            regions,
        });
        let (queue, stop) = match added {
            Ok(added) => added,
            Err(e) => {
                // The graph must still end, with what it has.
                control.seal();
                return Err(e.into());
            }
        };
        let (give_back, unreadable) = (give_back.clone(), unreadable.clone());
        running.push(std::thread::spawn(move || {
            match input {
                Input::Image(path) => {
                    if !read_image(name, &path, &queue) {
                        unreadable.fetch_add(1, Relaxed);
                    }
                }
                Input::Video(spec) => {
                    // Nobody listens to state changes here: the receiver is gone, sends are
                    // ignored.
                    let (ignored, _) = crossbeam_channel::unbounded();
                    source::spawn(*spec, queue, stop, ignored).join();
                }
            }
            let _ = give_back.recv();
        }));
    }
    // Every input is in: the graph ends when they do.
    control.seal();
    for t in running {
        let _ = t.join();
    }
    Ok(unreadable.load(Relaxed))
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

/// Reads an image and queues it; false (the queue closed) when it cannot be decoded.
fn read_image(name: Arc<str>, path: &Path, queue: &FrameQueue) -> bool {
    let decoded = match crate::images::read(path) {
        Ok(m) if !opencv::prelude::MatTraitConst::empty(&m) => {
            queue.push(Frame {
                meta: FrameMeta::new(name, 0, None),
                pixels: Pixels::Mat(m),
            });
            true
        }
        _ => {
            eprintln!("{}: cannot decode this image", path.display());
            false
        }
    };
    queue.close();
    decoded
}

/// How many of the videos gave no frame at all (each said so on stderr).
fn undecoded(stats: &GraphStats, videos: &[Arc<str>]) -> usize {
    videos
        .iter()
        .filter(|name| {
            let Some(camera) = stats.camera(name) else {
                eprintln!("{name}: no video frame could be decoded (see the log above)");
                return true;
            };
            let (coded, frames) = (camera.decoder_in.load(Relaxed), camera.frames.load(Relaxed));
            if frames == 0 {
                eprintln!("{name}: no video frame could be decoded (see the log above)");
                return true;
            }
            if coded > frames {
                // The decoder skipped what it could not decode; the frames after are numbered
                // as they came out.
                eprintln!(
                    "{name}: {} of {coded} coded frames could not be decoded and were skipped",
                    coded - frames
                );
            }
            false
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::decoder_threads;

    #[test]
    fn half_the_cores_decode_shared_by_the_videos_one_thread_at_least() {
        assert_eq!(
            decoder_threads(16, 1),
            8,
            "one video at a time: half the cores"
        );
        assert_eq!(decoder_threads(16, 8), 1);
        assert_eq!(decoder_threads(16, 3), 2);
        assert_eq!(decoder_threads(2, 1), 1);
        assert_eq!(decoder_threads(1, 1), 1);
        assert_eq!(decoder_threads(4, 0), 2);
    }
}
