//! The stages do not change results: frames classified through the graph (preprocess workers,
//! batcher, batched inference, decide) score the same as a direct ONNX Runtime call on the same
//! preprocessed tensor, and the batch size makes no difference.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::*;
use vigil::config::{Config, InferenceConfig};
use vigil::infer::Engine;
use vigil::model::Manifest;
use vigil::pipeline::decide::{softmax, top_k};
use vigil::pipeline::preprocess::Preprocessor;
use vigil::source::zones::Regions;

fn config(max_batch: usize, max_wait: &str) -> Config {
    config_with(max_batch, max_wait, "")
}

fn config_with(max_batch: usize, max_wait: &str, extra: &str) -> Config {
    let mut c = Config::parse(
        &format!(
            "[model]\ndir = \"{}/models\"\n[pipeline]\nmax_batch = {max_batch}\nmax_wait = \"{max_wait}\"\n[decide]\ntop_k = 1000\n{extra}",
            repo().display()
        ),
        repo(),
    )
    .unwrap();
    c.inference.library = Some(ort_library());
    c
}

/// `vigil classify` in-process: every frame's 1000 scores, by (input, frame).
fn classify(config: &Config, paths: &[PathBuf]) -> HashMap<(String, u64), Vec<(String, f32)>> {
    let mut out = Vec::new();
    let failures = vigil::app::classify(config, paths, Regions::whole(), &mut out).unwrap();
    assert_eq!(failures, 0);
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| {
            let j: serde_json::Value = serde_json::from_str(l).unwrap();
            let top = j["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    (
                        t["label"].as_str().unwrap().to_string(),
                        t["score"].as_f64().unwrap() as f32,
                    )
                })
                .collect();
            (
                (
                    j["camera"].as_str().unwrap().to_string(),
                    j["frame"].as_u64().unwrap(),
                ),
                top,
            )
        })
        .collect()
}

#[test]
fn batched_pipeline_scores_equal_a_direct_onnx_runtime_call() {
    let photos = [
        "squirrel_cls.jpg",
        "orange.jpg",
        "butterfly.jpg",
        "baboon.jpg",
        "chicky_512.png",
        "fruits.jpg",
        "messi5.jpg",
    ];
    let paths: Vec<PathBuf> = photos.iter().map(|p| fixture(p)).collect();
    // A long max_wait so that the photos are batched together.
    let cfg = config(8, "300ms");
    let through_graph = classify(&cfg, &paths);

    let manifest = Manifest::load(&cfg.manifest_path()).unwrap();
    let inference = InferenceConfig {
        library: Some(ort_library()),
        ..Default::default()
    };
    let mut engine = Engine::load(&manifest, "fp32", &inference, &repo()).unwrap();
    let mut pre = Preprocessor::new(&manifest.input);
    for path in &paths {
        let image = opencv::imgcodecs::imread(path, opencv::imgcodecs::IMREAD_COLOR).unwrap();
        let mut tensor = vec![0f32; manifest.input.len()];
        pre.image_into(&image, None, &mut tensor).unwrap();
        let mut direct = engine.run(&tensor, 1).unwrap();
        softmax(&mut direct);
        let graph = &through_graph[&(path.display().to_string(), 0)];
        assert_eq!(graph.len(), 1000);
        let best = top_k(&direct, 1).next().unwrap();
        assert_eq!(graph[0].0, manifest.labels[best], "{}", path.display());
        let worst = graph
            .iter()
            .map(|(label, score)| (score - direct[manifest.label_index(label).unwrap()]).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-3, "{}: scores differ by {worst}", path.display());
    }
}

#[test]
fn the_batch_size_never_changes_results() {
    let video = vec![fixture("photos.mp4")];
    let one = classify(&config(1, "20ms"), &video);
    let sixteen = classify(&config(16, "50ms"), &video);
    assert_eq!(one.len(), 300);
    assert_eq!(sixteen.len(), 300);
    for (key, a) in &one {
        let b: HashMap<&str, f32> = sixteen[key].iter().map(|(l, s)| (l.as_str(), *s)).collect();
        assert_eq!(a[0].0, sixteen[key][0].0, "top-1 of frame {key:?}");
        for (label, score) in a {
            let d = (score - b[label.as_str()]).abs();
            assert!(
                d < 1e-4,
                "frame {key:?} {label}: {score} vs {}",
                b[label.as_str()]
            );
        }
    }
}

#[test]
fn several_inference_sessions_keep_every_frame_in_order_with_the_same_scores() {
    let video = vec![fixture("photos.mp4")];
    let one = classify(&config(2, "20ms"), &video);
    // classify() returns the lines by frame; check the raw order too.
    let mut out = Vec::new();
    let cfg = config_with(2, "20ms", "[inference]\nsessions = 3\n");
    assert_eq!(
        vigil::app::classify(&cfg, &video, Regions::whole(), &mut out).unwrap(),
        0
    );
    let frames: Vec<u64> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["frame"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        frames,
        (0..300).collect::<Vec<_>>(),
        "in order with 3 sessions"
    );
    let three = classify(&cfg, &video);
    for (key, a) in &one {
        let b = &three[key];
        assert_eq!(a[0].0, b[0].0, "top-1 of {key:?}");
        assert!((a[0].1 - b[0].1).abs() < 1e-4);
    }
}
