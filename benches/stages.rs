//! Per-stage micro benchmarks: preprocess (crop + resize + normalise) at camera resolutions,
//! decide (softmax, top-k, groups, thresholds) on the bundled model's 1000 classes, and motion on
//! a camera's luma plane, and the JPEG encoding of an event's snapshot. The plain resize of the
//! same frame with OpenCV is measured beside preprocess as its reference; the `image` crate's
//! encoder (vigil's before) beside the snapshot encoding.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use opencv::core::{CV_8UC1, CV_8UC3, Mat, Scalar, Size};
use opencv::imgproc;
use opencv::prelude::MatTraitConstManual;
use vigil::config::{DecideConfig, GroupConfig, GroupMode};
use vigil::frame::{Batch, FrameMeta, Prepared, Scored};
use vigil::model::Manifest;
use vigil::pipeline::decide::Decider;
use vigil::pipeline::preprocess::Preprocessor;
use vigil::source::motion::{MotionConfig, MotionDetector};

fn manifest() -> Manifest {
    Manifest::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/efficientnet-lite0.toml"))
        .expect("the bundled manifest loads")
}

fn preprocess(c: &mut Criterion) {
    let m = manifest();
    let mut pre = Preprocessor::new(&m.input);
    let mut out = vec![0f32; m.input.len()];
    for (w, h) in [(640, 480), (1280, 720), (1920, 1080)] {
        let frame =
            Mat::new_rows_cols_with_default(h, w, CV_8UC3, Scalar::new(30.0, 120.0, 220.0, 0.0))
                .unwrap();
        c.bench_function(&format!("preprocess {w}x{h}"), |b| {
            b.iter(|| pre.image_into(black_box(&frame), None, &mut out).unwrap())
        });
        let mut resized = Mat::default();
        c.bench_function(&format!("reference: opencv resize only {w}x{h}"), |b| {
            b.iter(|| {
                imgproc::resize(
                    black_box(&frame),
                    &mut resized,
                    Size::new(224, 224),
                    0.0,
                    0.0,
                    imgproc::INTER_LINEAR,
                )
                .unwrap()
            })
        });
    }
}

fn decide(c: &mut Criterion) {
    let m = manifest();
    let mut cfg = DecideConfig::default();
    cfg.groups.insert(
        "cat".into(),
        GroupConfig {
            classes: [
                "tabby",
                "tiger cat",
                "Persian cat",
                "Siamese cat",
                "Egyptian cat",
            ]
            .map(String::from)
            .to_vec(),
            mode: GroupMode::Sum,
        },
    );
    let decider = Decider::new(&cfg, &m, []);
    let version = vigil::serving::ModelVersion::of(&m);
    let logits: Vec<f32> = (0..1000)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
        .collect();
    c.bench_function("decide 1000 classes", |b| {
        b.iter(|| {
            decider.decide(Scored {
                meta: FrameMeta::new("bench".into(), 0, None),
                scores: black_box(logits.clone()),
                embedding: Vec::new(),
                pixels: None,
                model: version.clone(),
            })
        })
    });
}

fn batch_assembly(c: &mut Criterion) {
    let m = manifest();
    let slot = m.input.len();
    let meta = FrameMeta::new("bench".into(), 0, None);
    let mut tensors: Vec<Vec<f32>> = (0..8).map(|_| vec![0.5f32; slot]).collect();
    let mut data = Vec::with_capacity(8 * slot);
    c.bench_function("batch assembly 8 frames", |b| {
        b.iter(|| {
            let mut batch = Batch::reuse(std::mem::take(&mut data), 8);
            for t in tensors.iter_mut() {
                let p = Prepared {
                    meta: meta.clone(),
                    tensor: std::mem::take(t),
                    pixels: None,
                    live: true,
                };
                *t = batch.push(p);
            }
            black_box(&batch.data);
            data = batch.data;
        })
    });
    let block = vec![0.5f32; 8 * slot];
    let mut copy = vec![0f32; 8 * slot];
    c.bench_function("reference: memcpy of 8 tensors", |b| {
        b.iter(|| copy.copy_from_slice(black_box(&block)))
    });
}

/// Motion on a camera's luma plane, in steady state (the background warm), at 720p and 1080p: a
/// still scene with sensor noise, the cost every analysed frame pays when gating is on.
fn motion(c: &mut Criterion) {
    let cfg = MotionConfig {
        enabled: true,
        ..Default::default()
    };
    for (w, h) in [(1280, 720), (1920, 1080)] {
        let mut d = MotionDetector::new(&cfg);
        let mut frames = Vec::new();
        for seed in 0..4 {
            let mut m = Mat::new_rows_cols_with_default(h, w, CV_8UC1, Scalar::all(0.0)).unwrap();
            opencv::core::set_rng_seed(seed).unwrap();
            opencv::core::randn(&mut m, &Scalar::all(110.0), &Scalar::all(3.0)).unwrap();
            frames.push(m);
        }
        d.detect(&frames[0]).unwrap();
        let mut i = 0;
        c.bench_function(&format!("motion {w}x{h} luma"), |b| {
            b.iter(|| {
                i = (i + 1) % frames.len();
                d.detect(black_box(&frames[i])).unwrap()
            })
        });
    }
}

fn snapshot(c: &mut Criterion) {
    let photo =
        vigil::images::read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/messi5.jpg"))
            .unwrap();
    let mut frame = Mat::default();
    imgproc::resize_def(&photo, &mut frame, Size::new(1280, 720)).unwrap();
    c.bench_function("snapshot jpeg 1280x720 q85", |b| {
        b.iter(|| vigil::images::encode_jpeg(black_box(&frame), 85).unwrap())
    });
    c.bench_function("reference: image crate jpeg 1280x720 q85", |b| {
        b.iter(|| {
            let mut rgb = Mat::default();
            imgproc::cvt_color_def(&frame, &mut rgb, imgproc::COLOR_BGR2RGB).unwrap();
            let mut out = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
                .encode(
                    rgb.data_bytes().unwrap(),
                    1280,
                    720,
                    image::ExtendedColorType::Rgb8,
                )
                .unwrap();
            out
        })
    });
}

criterion_group!(
    benches,
    preprocess,
    batch_assembly,
    decide,
    motion,
    snapshot
);
criterion_main!(benches);
