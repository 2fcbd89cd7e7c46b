//! The stages do not change results: frames classified through the graph (preprocess workers,
//! batcher, batched inference, decide) score the same as a direct ONNX Runtime call on the same
//! preprocessed tensor, and the batch size makes no difference. The bundled model's embedding
//! output: its size, what it depends on, its variants, and its way through the graph.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use vigil::config::{Config, InferenceConfig};
use vigil::frame::{Frame, FrameMeta, Pixels};
use vigil::infer::Engine;
use vigil::model::Manifest;
use vigil::pipeline::decide::{softmax, top_k};
use vigil::pipeline::preprocess::Preprocessor;
use vigil::pipeline::{CameraInput, Graph, GraphConfig};
use vigil::serving::ModelSlot;
use vigil::source::FullPolicy;
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
    let failures =
        vigil::app::classify(config, paths, (Regions::whole(), None), 2, &mut out).unwrap();
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
        let image = vigil::images::read(std::path::Path::new(path)).unwrap();
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
        vigil::app::classify(&cfg, &video, (Regions::whole(), None), 1, &mut out).unwrap(),
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

/// The bundled model's `variant`, from `manifest`.
fn engine(manifest: &Manifest, variant: &str) -> Engine {
    let inference = InferenceConfig {
        library: Some(ort_library()),
        ..Default::default()
    };
    Engine::load(manifest, variant, &inference, &repo()).unwrap()
}

fn bundled_manifest() -> Manifest {
    Manifest::load(&repo().join("models/efficientnet-lite0.toml")).unwrap()
}

/// The photos preprocessed for `manifest`, one after the other in one tensor.
fn tensors(manifest: &Manifest, photos: &[&str]) -> Vec<f32> {
    let mut pre = Preprocessor::new(&manifest.input);
    let len = manifest.input.len();
    let mut data = vec![0f32; len * photos.len()];
    for (photo, slot) in photos.iter().zip(data.chunks_mut(len)) {
        let image = vigil::images::read(std::path::Path::new(&fixture(photo))).unwrap();
        pre.image_into(&image, None, slot).unwrap();
    }
    data
}

/// Each image's (scores, embedding), copied out of one run.
fn run(engine: &mut Engine, data: &[f32], n: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
    let mut out = Vec::new();
    engine
        .run_each(data, n, |i, scores, embedding| {
            assert_eq!(i, out.len());
            out.push((scores.to_vec(), embedding.to_vec()));
        })
        .unwrap();
    assert_eq!(out.len(), n);
    out
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn the_bundled_model_gives_each_image_1280_floats_that_differ_between_photos_and_repeat_exactly() {
    let manifest = bundled_manifest();
    let mut fp32 = engine(&manifest, "fp32");
    assert_eq!(fp32.embedding_dim, Some(1280));
    let data = tensors(&manifest, &["squirrel_cls.jpg", "orange.jpg"]);
    let first = run(&mut fp32, &data, 2);
    let (squirrel, orange) = (&first[0].1, &first[1].1);
    assert_eq!((squirrel.len(), orange.len()), (1280, 1280));
    // Pooled ReLU6 features: finite, in [0, 6], and not all zero.
    for e in [squirrel, orange] {
        assert!(e.iter().all(|x| (0.0..=6.0).contains(x)), "{e:?}");
        assert!(e.iter().any(|x| *x > 0.1));
    }
    let similarity = cosine(squirrel, orange);
    assert!(
        similarity < 0.9,
        "a squirrel and an orange: cosine {similarity}"
    );
    // The same images again: the same floats; alone (batch 1): the same within float noise.
    assert_eq!(run(&mut fp32, &data, 2), first);
    let len = manifest.input.len();
    let alone = run(&mut fp32, &data[len..], 1);
    assert!(max_diff(&alone[0].1, orange) < 1e-5);
    // Handing the arena's unused memory back leaves a session that gives the same floats.
    fp32.release_unused_memory().unwrap();
    assert_eq!(run(&mut fp32, &data, 2), first);
    // The scores handed beside the embedding are the model's scores.
    assert_eq!(
        fp32.run(&data, 2).unwrap(),
        [&first[0].0[..], &first[1].0[..]].concat()
    );
}

#[test]
fn the_int8_and_fp16_variants_give_an_embedding_close_to_fp32s() {
    let manifest = bundled_manifest();
    let photos = ["squirrel_cls.jpg", "baboon.jpg", "fruits.jpg"];
    let data = tensors(&manifest, &photos);
    let fp32 = run(&mut engine(&manifest, "fp32"), &data, photos.len());
    for (variant, least) in [("int8", 0.98), ("fp16", 0.9999)] {
        let mut e = engine(&manifest, variant);
        assert_eq!(e.embedding_dim, Some(1280), "{variant}");
        for (i, (_, embedding)) in run(&mut e, &data, photos.len()).iter().enumerate() {
            let c = cosine(embedding, &fp32[i].1);
            assert!(c >= least, "{variant} {}: cosine {c} < {least}", photos[i]);
        }
    }
}

/// The bundled manifest in `dir` without its embedding line, its paths made absolute.
fn manifest_without_embedding(dir: &Path) -> Manifest {
    let models = repo().join("models");
    let text = std::fs::read_to_string(models.join("efficientnet-lite0.toml"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("embedding = "))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            "\"imagenet.labels.txt\"",
            &format!("{:?}", models.join("imagenet.labels.txt")),
        )
        .replace(
            "\"efficientnet-lite0.",
            &format!("\"{}/efficientnet-lite0.", models.display()),
        );
    let path = dir.join("plain.toml");
    std::fs::write(&path, text).unwrap();
    Manifest::load(&path).unwrap()
}

#[test]
fn a_manifest_without_an_embedding_gives_the_same_scores_and_empty_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let plain = manifest_without_embedding(dir.path());
    assert_eq!(plain.embedding_name, None);
    let mut without = engine(&plain, "fp32");
    assert_eq!(without.embedding_dim, None);
    let data = tensors(&plain, &["baboon.jpg", "messi5.jpg"]);
    let got = run(&mut without, &data, 2);
    let with = run(&mut engine(&bundled_manifest(), "fp32"), &data, 2);
    for (a, b) in got.iter().zip(&with) {
        assert!(a.1.is_empty());
        assert_eq!(a.0, b.0);
    }
}

/// Photos through the graph (preprocess, batch, infer, decide) to a sink that keeps each
/// result's embedding, by photo.
fn embeddings_through_the_graph(config: &Config, photos: &[&str]) -> HashMap<u64, Vec<f32>> {
    let model = vigil::app::load_model(config).unwrap();
    let slot = Arc::new(ModelSlot::new(model, config.pipeline.max_batch));
    let (tx, results) = crossbeam_channel::unbounded();
    let graph = Graph::start(
        &GraphConfig::new(&config.pipeline, false),
        slot,
        config.decide_settings([]),
        move |results, _, recycler| {
            for r in results {
                let _ = tx.send((r.meta.index, r.embedding.clone(), r.probabilities.len()));
                recycler.recycle(r);
            }
        },
    );
    let (queue, _stop) = graph
        .control
        .add_camera(CameraInput {
            name: "photos".into(),
            policy: FullPolicy::Block,
            source: "test".into(),
            regions: Arc::new(Regions::whole()),
        })
        .unwrap();
    for (i, photo) in photos.iter().enumerate() {
        let image = vigil::images::read(std::path::Path::new(&fixture(photo))).unwrap();
        assert!(queue.push(Frame {
            meta: FrameMeta::new("photos".into(), i as u64, None),
            pixels: Pixels::Mat(image),
        }));
    }
    queue.close();
    graph.control.seal();
    let (_never_tx, never) = crossbeam_channel::bounded::<()>(0);
    graph.wait(&never, Duration::from_secs(60)).unwrap();
    results
        .try_iter()
        .map(|(index, embedding, classes)| {
            assert_eq!(classes, 1000);
            (index, embedding)
        })
        .collect()
}

#[test]
fn every_frame_through_the_graph_carries_its_embedding_as_a_direct_call_gives_it() {
    let photos = [
        "squirrel_cls.jpg",
        "orange.jpg",
        "butterfly.jpg",
        "chicky_512.png",
        "fruits.jpg",
    ];
    // Batches of up to 4, so that both full and partial batches go through.
    let cfg = config(4, "300ms");
    let through_graph = embeddings_through_the_graph(&cfg, &photos);
    assert_eq!(through_graph.len(), photos.len());
    let manifest = bundled_manifest();
    let data = tensors(&manifest, &photos);
    let direct = run(&mut engine(&manifest, "fp32"), &data, photos.len());
    for (i, (_, embedding)) in direct.iter().enumerate() {
        let graph = &through_graph[&(i as u64)];
        assert_eq!(graph.len(), 1280, "{}", photos[i]);
        let d = max_diff(graph, embedding);
        assert!(d < 1e-4, "{}: embeddings differ by {d}", photos[i]);
    }
}
