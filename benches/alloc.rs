//! Heap allocations per frame on the frame path, counted by a counting global allocator (Rust
//! allocations only: OpenCV's own C++ buffers are reused by design but not counted here).
//! Each stage runs in steady state (buffers warm) on the bundled model, and is printed beside a
//! reference that allocates its output per frame, to show the counter works.
//!
//! `cargo bench --bench alloc` (needs `make setup`: ONNX Runtime).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use opencv::core::{CV_8UC3, Mat, Scalar};
use vigil::config::DecideConfig;
use vigil::frame::{Batch, FrameMeta, Prepared, Scored};
use vigil::infer::{Engine, InferenceConfig};
use vigil::model::Manifest;
use vigil::pipeline::decide::Decider;
use vigil::pipeline::preprocess::Preprocessor;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations per call of `f`, after a warm-up.
fn per_call<T>(calls: u64, mut f: impl FnMut() -> T) -> f64 {
    for _ in 0..3 {
        black_box(f());
    }
    let before = ALLOCATIONS.load(Relaxed);
    for _ in 0..calls {
        black_box(f());
    }
    (ALLOCATIONS.load(Relaxed) - before) as f64 / calls as f64
}

fn new_meta() -> FrameMeta {
    FrameMeta::new("bench".into(), 0, None)
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = Manifest::load(&root.join("models/efficientnet-lite0.toml")).unwrap();
    let slot = manifest.input.len();
    let frame =
        Mat::new_rows_cols_with_default(1080, 1920, CV_8UC3, Scalar::new(30.0, 120.0, 220.0, 0.0))
            .unwrap();

    // Frames share their camera's name (an Arc): cloning a meta does not allocate.
    let template = new_meta();
    let meta = || template.clone();
    let mut pre = Preprocessor::new(&manifest.input);
    let mut tensor = vec![0f32; slot];
    let preprocess = per_call(200, || pre.image_into(&frame, None, &mut tensor).unwrap());

    let mut tensors: Vec<Vec<f32>> = (0..8).map(|_| vec![0.5f32; slot]).collect();
    // As the batcher does: the batch the inference stage gave back, emptied.
    let mut shell = Some(Batch::reuse(Vec::with_capacity(8 * slot), 8));
    let batch = per_call(200, || {
        let mut b = shell.take().unwrap().recycle();
        for t in tensors.iter_mut() {
            *t = b.push(Prepared {
                meta: meta(),
                tensor: std::mem::take(t),
                pixels: None,
                live: true,
            });
        }
        shell = Some(b);
    }) / 8.0;

    let inference_cfg = InferenceConfig::default();
    let mut engine = Engine::load(&manifest, "fp32", &inference_cfg, root).unwrap();
    let input = vec![0.1f32; 8 * slot];
    // As the inference stage does: each image's scores and embedding copied into recycled
    // vectors (those a published result gave back).
    let dim = engine.embedding_dim.unwrap_or(0);
    let mut pool: Vec<(Vec<f32>, Vec<f32>)> = (0..8).map(|_| (Vec::new(), Vec::new())).collect();
    let infer = per_call(20, || {
        engine
            .run_each(&input, 8, |i, chunk, features| {
                let (scores, embedding) = &mut pool[i];
                scores.clear();
                scores.extend_from_slice(chunk);
                embedding.clear();
                embedding.extend_from_slice(features);
            })
            .unwrap()
    }) / 8.0;
    assert!(pool.iter().all(|(s, e)| s.len() == 1000 && e.len() == dim));
    let input16 = vec![0.1f32; 16 * slot];
    let per_batch_1 = per_call(20, || {
        engine.run_each(&input[..slot], 1, |_, _, _| {}).unwrap()
    });
    let per_batch_16 = per_call(10, || engine.run_each(&input16, 16, |_, _, _| {}).unwrap());
    let per_batch_8 = per_call(20, || engine.run_each(&input, 8, |_, _, _| {}).unwrap());

    // Decide with the buffers a published result gives back, and the event lifecycle, as the
    // sink runs it; watched labels and groups as in the demo.
    let mut config = DecideConfig::default();
    config.groups.insert(
        "cat".into(),
        vigil::config::GroupConfig {
            classes: vec!["tabby".into(), "tiger cat".into(), "Persian cat".into()],
            mode: vigil::config::GroupMode::Sum,
        },
    );
    let watch = vec!["cat".to_string(), "fox squirrel".to_string()];
    let decider = Decider::with_watch(&config, &manifest, [], &watch);
    let mut tracker = vigil::events::EventTracker::new(Default::default());
    let version = vigil::serving::ModelVersion::of(&manifest);
    let logits: Vec<f32> = (0..1000).map(|i| (i % 17) as f32 / 10.0).collect();
    let features: Vec<f32> = (0..dim).map(|i| (i % 7) as f32).collect();
    let mut spent = vigil::frame::Reusable::default();
    let decide = per_call(200, || {
        // As the inference stage fills the recycled vectors.
        spent.scores.extend_from_slice(&logits);
        spent.embedding.extend_from_slice(&features);
        let result = decider.decide_into(
            Scored {
                meta: meta(),
                scores: std::mem::take(&mut spent.scores),
                embedding: std::mem::take(&mut spent.embedding),
                pixels: None,
                model: version.clone(),
            },
            std::mem::take(&mut spent.buffers),
        );
        black_box(tracker.on_frame(&result));
        // What the sink gives back once the result is published.
        spent = result.into_buffers();
    });
    let reference = per_call(200, || vec![0f32; slot]);

    println!("heap allocations per frame, steady state (Rust allocations)");
    println!("(the model gives 1000 scores and a {dim}-float embedding per image)");
    println!("{:<46} {:>8}", "stage", "allocs");
    println!(
        "{:<46} {:>8.2}",
        "preprocess 1920x1080 -> 224x224 tensor slot", preprocess
    );
    println!(
        "{:<46} {:>8.2}",
        "batch assembly (8 frames, reused buffers)", batch
    );
    println!("{:<46} {:>8.2}", "inference (batch of 8, per frame)", infer);
    println!(
        "{:<46} {:>8.2}",
        "  vigil's own: copies into recycled vectors",
        infer - per_batch_8 / 8.0
    );
    println!(
        "{:<46} {:>8.2}",
        "  the ONNX Runtime call, per call: batch of 1", per_batch_1
    );
    println!(
        "{:<46} {:>8.2}",
        "  the ONNX Runtime call, per call: batch of 16", per_batch_16
    );
    println!(
        "{:<46} {:>8.2}",
        "decide + event lifecycle (1000 classes, top-5)", decide
    );
    println!(
        "{:<46} {:>8.2}",
        "reference: a new tensor per frame", reference
    );
}
