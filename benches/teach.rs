//! Teaching, measured in one run on the bundled model, each figure beside its reference:
//! - training time for 40, 200 and 2000 images (`vigil train`'s whole path: read, hash, embed,
//!   5-fold cross-validation, fit, save), cold and with every embedding cached, beside the bare
//!   model's throughput (the floor for embedding);
//! - a head's cost per frame (a matrix product on the embedding) beside the model call per frame;
//! - held-out accuracy against examples per label (5/10/20/50), the logistic head beside a k-NN
//!   baseline on the same embeddings.
//!
//! The images are made here: objects pasted into a real background under random light, noise and
//! JPEG quality (as the tests make them). `cargo bench --bench teach` (needs `make setup`).

#[path = "../tests/common/teach_data.rs"]
mod teach_data;

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use teach_data::Props;
use vigil::config::Config;
use vigil::teach::embed::Embedder;
use vigil::teach::train::{self, Examples, TrainSettings};
use vigil::teach::{self, TeachConfig, TrainJob};

/// Draws of the training examples per point of the accuracy curve.
const DRAWS: u64 = 3;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let config = Config::parse(
        &format!("[model]\ndir = \"{}\"\n", root.join("models").display()),
        root.to_path_buf(),
    )
    .unwrap();
    gstreamer::init().unwrap();
    let model = config.load_model().unwrap();
    let porch = Props::porch(&root.join("fixtures"));
    let spec_len = model.spec().len();

    // Reference: the bare model, images/s at batch 16 (the embedder's batch).
    let input = vec![0.1f32; 16 * spec_len];
    model.run_each(0, &input, 16, |_, _, _| {}).unwrap();
    let t = Instant::now();
    let calls = 6;
    for _ in 0..calls {
        model.run_each(0, &input, 16, |_, _, _| {}).unwrap();
    }
    let model_ips = (calls * 16) as f64 / t.elapsed().as_secs_f64();
    let one = vec![0.1f32; spec_len];
    let t = Instant::now();
    for _ in 0..20 {
        model.run_each(0, &one, 1, |_, _, _| {}).unwrap();
    }
    let model_frame_ms = t.elapsed().as_secs_f64() * 1e3 / 20.0;

    println!("## Training time (vigil train's path: read, hash, embed, 5-fold CV, fit, save)");
    println!();
    println!(
        "Reference: the bare model embeds {model_ips:.1} images/s (batch 16), so embedding N images \
         takes at least N / {model_ips:.1} s."
    );
    println!();
    println!(
        "| images | embedding floor | cold: total | of which embedding | of which CV + fit | cached: total |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let two = porch.first(2);
    for per_label in [20, 100, 1000] {
        let n = per_label * 2;
        let data = tmp.path().join(format!("data-{n}"));
        two.write(&data.join("porch"), per_label, n as u64);
        let heads = tmp.path().join(format!("heads-{n}"));
        let job = TrainJob {
            head: "porch",
            data: &data,
            heads_dir: &heads,
            force: true,
            batch: 16,
        };
        let cfg = TeachConfig::default();
        let cold = teach::train_head(&cfg, &model, &job).unwrap();
        let warm = teach::train_head(&cfg, &model, &job).unwrap();
        assert_eq!(warm.embedded, 0);
        println!(
            "| {n} | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2} s |",
            n as f64 / model_ips,
            cold.seconds.total,
            cold.seconds.embedding,
            cold.seconds.training,
            warm.seconds.total
        );
    }

    // Embeddings for the rest: a pool of training examples and 100 held-out images per label.
    let mut embedder = Embedder::new(&model).unwrap();
    let labels: Vec<String> = porch.labels.iter().map(|(l, _)| l.clone()).collect();
    let embed = |embedder: &mut Embedder<'_>, per_label: usize, seed: u64| {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut e = Vec::new();
        let mut y = Vec::new();
        for label in 0..labels.len() {
            let images: Vec<_> = (0..per_label)
                .map(|_| porch.render(label, &mut rng))
                .collect();
            e.extend(embedder.embed_images(&images).unwrap());
            y.extend(std::iter::repeat_n(label, per_label));
        }
        (e, y)
    };
    let (pool_e, pool_y) = embed(&mut embedder, 50 * DRAWS as usize, 11);
    let (test_e, test_y) = embed(&mut embedder, 100, 12);
    let test = Examples {
        embeddings: &test_e,
        labels: &test_y,
        classes: labels.len(),
    };

    println!();
    println!("## A head's cost per frame");
    println!();
    let weights = train::fit(
        &Examples {
            embeddings: &pool_e,
            labels: &pool_y,
            classes: labels.len(),
        },
        &TrainSettings::default(),
    )
    .unwrap();
    let head = train::weights_head(&weights, &labels).unwrap();
    let mut out = Vec::with_capacity(labels.len());
    let reps = 20_000;
    let t = Instant::now();
    for i in 0..reps {
        head.apply(black_box(&test_e[i % test_e.len()]), &mut out);
        black_box(&out);
    }
    let head_us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
    println!("| step | per frame |");
    println!("| --- | --- |");
    println!(
        "| head ({} labels on a {}-value embedding) | {head_us:.2} µs |",
        labels.len(),
        test_e[0].len()
    );
    println!("| reference: the model call (batch 1) | {model_frame_ms:.2} ms |");
    println!(
        "| head / model | {:.3}% |",
        head_us / (model_frame_ms * 1e3) * 100.0
    );

    println!();
    println!(
        "## Held-out accuracy against examples per label ({} labels, {} held-out images, mean of {DRAWS} draws)",
        labels.len(),
        test_y.len()
    );
    println!();
    println!("| examples per label | logistic head (vigil) | 1-NN (cosine) | 5-NN (cosine) |");
    println!("| --- | --- | --- | --- |");
    for k in [5usize, 10, 20, 50] {
        let (mut head_acc, mut nn1, mut nn5) = (0.0, 0.0, 0.0);
        for draw in 0..DRAWS as usize {
            // Draw `k` of each label from the pool, a different slice per draw.
            let mut e = Vec::new();
            let mut y = Vec::new();
            let per = 50 * DRAWS as usize;
            for label in 0..labels.len() {
                let start = label * per + draw * 50;
                e.extend_from_slice(&pool_e[start..start + k]);
                y.extend(std::iter::repeat_n(label, k));
            }
            let ex = Examples {
                embeddings: &e,
                labels: &y,
                classes: labels.len(),
            };
            let w = train::fit(&ex, &TrainSettings::default()).unwrap();
            let h = train::weights_head(&w, &labels).unwrap();
            head_acc += train::accuracy_of(&h, &test, &labels);
            nn1 += knn_accuracy(&ex, &test, 1);
            nn5 += knn_accuracy(&ex, &test, 5.min(k));
        }
        let d = DRAWS as f64;
        println!(
            "| {k} | {:.1}% | {:.1}% | {:.1}% |",
            head_acc / d * 100.0,
            nn1 / d * 100.0,
            nn5 / d * 100.0
        );
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb).max(1e-12)
}

/// Accuracy of a k-nearest-neighbour vote (cosine similarity) of `train` on `test`.
fn knn_accuracy(train: &Examples<'_>, test: &Examples<'_>, k: usize) -> f64 {
    let mut right = 0;
    for (e, &truth) in test.embeddings.iter().zip(test.labels) {
        let mut near: Vec<(f32, usize)> = train
            .embeddings
            .iter()
            .zip(train.labels)
            .map(|(t, &l)| (cosine(e, t), l))
            .collect();
        near.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut votes = vec![0usize; train.classes];
        for (_, l) in near.iter().take(k) {
            votes[*l] += 1;
        }
        let best = (0..votes.len()).max_by_key(|&l| votes[l]).unwrap_or(0);
        right += usize::from(best == truth);
    }
    right as f64 / test.labels.len() as f64
}
