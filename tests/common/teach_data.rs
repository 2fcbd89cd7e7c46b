//! Training sets the tests (and the teach bench) make: objects pasted into a real background
//! (OpenCV's sample photos) at random places and sizes, under random light, sensor noise and JPEG
//! quality, as a camera's zone would see them.

// Each test or bench that includes this uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use opencv::core::{CV_8UC3, Mat, Rect, Scalar, Size};
use opencv::imgproc;
use opencv::prelude::*;

/// The side of an image made.
pub const SIDE: i32 = 320;

/// The pictures a training set is made from.
pub struct Props {
    background: Mat,
    /// (label, object pasted for it; None: the background alone).
    pub labels: Vec<(String, Option<Mat>)>,
}

fn read(path: &Path) -> Mat {
    let m = vigil::images::read(path)
        .unwrap_or_else(|e| panic!("{}: {e}: run `make setup`", path.display()));
    assert!(
        !m.empty(),
        "{} is missing: run `make setup`",
        path.display()
    );
    m
}

impl Props {
    /// `package` (a cardboard box), `squirrel` and `nothing`, on a building's front.
    pub fn porch(fixtures: &Path) -> Props {
        Props {
            background: read(&fixtures.join("home.jpg")),
            labels: vec![
                ("nothing".into(), None),
                ("package".into(), Some(read(&fixtures.join("box.png")))),
                (
                    "squirrel".into(),
                    Some(read(&fixtures.join("squirrel_cls.jpg"))),
                ),
            ],
        }
    }

    /// The first `n` labels only.
    pub fn first(&self, n: usize) -> Props {
        Props {
            background: self.background.clone(),
            labels: self.labels[..n].to_vec(),
        }
    }

    /// One image of label `i`.
    pub fn render(&self, i: usize, rng: &mut fastrand::Rng) -> Mat {
        let bg = &self.background;
        // A random part of the background, as a zone of some camera.
        let side = (bg.rows().min(bg.cols()) as f64 * (0.55 + 0.4 * rng.f64())) as i32;
        let x = rng.i32(0..=bg.cols() - side);
        let y = rng.i32(0..=bg.rows() - side);
        let mut img = Mat::default();
        imgproc::resize_def(
            &Mat::roi(bg, Rect::new(x, y, side, side)).unwrap(),
            &mut img,
            Size::new(SIDE, SIDE),
        )
        .unwrap();
        if let Some(object) = &self.labels[i].1 {
            paste(&mut img, object, rng);
        }
        light_and_noise(&img, rng)
    }

    /// Writes `per_label` images of each label into `<dir>/<label>/`, JPEG at a random quality;
    /// returns the folder.
    pub fn write(&self, dir: &Path, per_label: usize, seed: u64) -> PathBuf {
        let mut rng = fastrand::Rng::with_seed(seed);
        for (i, (label, _)) in self.labels.iter().enumerate() {
            let folder = dir.join(label);
            std::fs::create_dir_all(&folder).unwrap();
            for n in 0..per_label {
                let img = self.render(i, &mut rng);
                let quality = rng.u8(40..=95);
                let path = folder.join(format!("{seed}-{n:04}.jpg"));
                std::fs::write(&path, vigil::images::encode_jpeg(&img, quality).unwrap()).unwrap();
            }
        }
        dir.to_path_buf()
    }
}

/// Pastes `object` at a random place, 30% to 60% of the image high.
fn paste(img: &mut Mat, object: &Mat, rng: &mut fastrand::Rng) {
    let h = (SIDE as f64 * (0.3 + 0.3 * rng.f64())) as i32;
    let w = ((h as f64 * object.cols() as f64 / object.rows() as f64) as i32).min(SIDE - 2);
    let mut scaled = Mat::default();
    imgproc::resize_def(object, &mut scaled, Size::new(w, h)).unwrap();
    let x = rng.i32(0..=SIDE - w);
    let y = rng.i32(0..=SIDE - h);
    let mut roi = Mat::roi_mut(img, Rect::new(x, y, w, h)).unwrap();
    scaled.copy_to(&mut roi).unwrap();
}

/// Random brightness and contrast, then Gaussian noise.
fn light_and_noise(img: &Mat, rng: &mut fastrand::Rng) -> Mat {
    let mut lit = Mat::default();
    img.convert_to(
        &mut lit,
        -1,
        0.6 + 0.8 * rng.f64(),
        -30.0 + 60.0 * rng.f64(),
    )
    .unwrap();
    let mut noise = Mat::new_rows_cols_with_default(SIDE, SIDE, CV_8UC3, Scalar::all(0.0)).unwrap();
    opencv::core::set_rng_seed(rng.i32(0..i32::MAX)).unwrap();
    let sigma = 12.0 * rng.f64();
    let mut signed = Mat::default();
    lit.convert_to(&mut signed, opencv::core::CV_16SC3, 1.0, 0.0)
        .unwrap();
    let mut n16 =
        Mat::new_rows_cols_with_default(SIDE, SIDE, opencv::core::CV_16SC3, Scalar::all(0.0))
            .unwrap();
    opencv::core::randn(&mut n16, &Scalar::all(0.0), &Scalar::all(sigma)).unwrap();
    let mut sum = Mat::default();
    opencv::core::add_def(&signed, &n16, &mut sum).unwrap();
    sum.convert_to(&mut noise, CV_8UC3, 1.0, 0.0).unwrap();
    noise
}
