//! Training a head: a multinomial logistic regression (linfa) on the standardised embeddings of
//! the training set, judged by stratified k-fold cross-validation (accuracy, per-label precision
//! and recall, confusion matrix).

use std::collections::BTreeMap;

use linfa::prelude::*;
use linfa_logistic::MultiLogisticRegression;
use ndarray::{Array1, Array2};

use crate::pipeline::heads::{ClassMetrics, Head, Metrics};

/// How a head is trained.
#[derive(Debug, Clone, Copy)]
pub struct TrainSettings {
    /// L2 regularisation (larger: smoother, for few examples in many dimensions).
    pub alpha: f64,
    pub max_iterations: u64,
    /// Folds of the cross-validation (fewer when a label has fewer examples).
    pub folds: usize,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            alpha: 1.0,
            max_iterations: 150,
            folds: 5,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("training failed: {0}")]
pub struct TrainError(String);

/// Trained weights, as [`Head::new`] takes them.
pub struct Weights {
    pub mean: Vec<f32>,
    pub scale: Vec<f32>,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// Examples: one embedding per row, and its label's index.
pub struct Examples<'a> {
    pub embeddings: &'a [Vec<f32>],
    pub labels: &'a [usize],
    pub classes: usize,
}

/// Fits the weights on every example.
pub fn fit(ex: &Examples<'_>, settings: &TrainSettings) -> Result<Weights, TrainError> {
    let d = ex.embeddings.first().map_or(0, Vec::len);
    let (mean, scale) = standardisation(ex.embeddings, d);
    let x = matrix(ex.embeddings, &mean, &scale);
    let y = Array1::from_iter(ex.labels.iter().copied());
    let model = MultiLogisticRegression::default()
        .alpha(settings.alpha)
        .max_iterations(settings.max_iterations)
        .fit(&Dataset::new(x, y))
        .map_err(|e| TrainError(e.to_string()))?;
    // linfa keeps the classes it saw, in their order; every label is there (each has examples).
    let params = model.params();
    let intercept = model.intercept();
    let mut weight = Vec::with_capacity(ex.classes * d);
    let mut bias = Vec::with_capacity(ex.classes);
    for k in 0..ex.classes {
        weight.extend(params.column(k).iter().map(|w| *w as f32));
        bias.push(intercept[k] as f32);
    }
    Ok(Weights {
        mean,
        scale,
        weight,
        bias,
    })
}

/// Per dimension: the mean, and 1 / the standard deviation (1 where it does not vary).
fn standardisation(rows: &[Vec<f32>], d: usize) -> (Vec<f32>, Vec<f32>) {
    let n = rows.len().max(1) as f64;
    let mut mean = vec![0f64; d];
    for r in rows {
        for (m, x) in mean.iter_mut().zip(r) {
            *m += *x as f64 / n;
        }
    }
    let mut var = vec![0f64; d];
    for r in rows {
        for ((v, x), m) in var.iter_mut().zip(r).zip(&mean) {
            *v += (*x as f64 - m).powi(2) / n;
        }
    }
    let scale = var
        .iter()
        .map(|v| if *v > 1e-12 { 1.0 / v.sqrt() } else { 1.0 })
        .map(|s| s as f32)
        .collect();
    (mean.into_iter().map(|m| m as f32).collect(), scale)
}

fn matrix(rows: &[Vec<f32>], mean: &[f32], scale: &[f32]) -> Array2<f64> {
    let d = mean.len();
    Array2::from_shape_fn((rows.len(), d), |(i, j)| {
        ((rows[i][j] - mean[j]) * scale[j]) as f64
    })
}

/// The fold of each example: stratified, each label's examples dealt in turn.
pub fn folds(labels: &[usize], classes: usize, wanted: usize) -> (Vec<usize>, usize) {
    let mut counts = vec![0usize; classes];
    for &l in labels {
        counts[l] += 1;
    }
    let k = wanted.min(counts.iter().copied().min().unwrap_or(0)).max(2);
    let mut dealt = vec![0usize; classes];
    let assignment = labels
        .iter()
        .map(|&l| {
            dealt[l] += 1;
            (dealt[l] - 1) % k
        })
        .collect();
    (assignment, k)
}

/// Cross-validates: for each fold, trains on the others and predicts it. The confusion matrix
/// and the figures derived from it.
pub fn cross_validate(
    ex: &Examples<'_>,
    label_names: &[String],
    settings: &TrainSettings,
) -> Result<Metrics, TrainError> {
    let (fold_of, k) = folds(ex.labels, ex.classes, settings.folds);
    let mut confusion = vec![vec![0usize; ex.classes]; ex.classes];
    let mut probabilities = Vec::new();
    for fold in 0..k {
        let (train, test): (Vec<usize>, Vec<usize>) =
            (0..ex.labels.len()).partition(|&i| fold_of[i] != fold);
        let pick = |idx: &[usize]| -> (Vec<Vec<f32>>, Vec<usize>) {
            (
                idx.iter().map(|&i| ex.embeddings[i].clone()).collect(),
                idx.iter().map(|&i| ex.labels[i]).collect(),
            )
        };
        let (tx, ty) = pick(&train);
        let w = fit(
            &Examples {
                embeddings: &tx,
                labels: &ty,
                classes: ex.classes,
            },
            settings,
        )?;
        let head = weights_head(&w, label_names)?;
        for &i in &test {
            head.apply(&ex.embeddings[i], &mut probabilities);
            confusion[ex.labels[i]][argmax(&probabilities)] += 1;
        }
    }
    Ok(metrics(confusion, label_names, k))
}

/// A head of these weights, only to predict with (its name and version are placeholders).
pub fn weights_head(w: &Weights, labels: &[String]) -> Result<Head, TrainError> {
    let manifest = crate::pipeline::heads::HeadManifest {
        name: "(training)".into(),
        version: 0,
        labels: labels.to_vec(),
        backbone: crate::pipeline::heads::Backbone {
            name: String::new(),
            version: String::new(),
            dim: w.mean.len(),
        },
        created: String::new(),
        samples: Vec::new(),
        samples_hash: String::new(),
        metrics: Metrics::default(),
    };
    Head::new(
        &manifest,
        w.mean.clone(),
        w.scale.clone(),
        w.weight.clone(),
        w.bias.clone(),
    )
    .map_err(|e| TrainError(e.to_string()))
}

/// How an existing head does on examples labelled by name: an example of a label the head does
/// not know counts as wrong. Its accuracy.
pub fn accuracy_of(head: &Head, ex: &Examples<'_>, label_names: &[String]) -> f64 {
    let mut p = Vec::new();
    let right = (0..ex.labels.len())
        .filter(|&i| {
            head.apply(&ex.embeddings[i], &mut p);
            head.labels[argmax(&p)] == label_names[ex.labels[i]]
        })
        .count();
    right as f64 / ex.labels.len().max(1) as f64
}

pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Accuracy, per-label precision and recall, from a confusion matrix.
pub fn metrics(confusion: Vec<Vec<usize>>, labels: &[String], folds: usize) -> Metrics {
    let total: usize = confusion.iter().flatten().sum();
    let right: usize = (0..labels.len()).map(|i| confusion[i][i]).sum();
    let mut per_class = BTreeMap::new();
    for (i, name) in labels.iter().enumerate() {
        let actual: usize = confusion[i].iter().sum();
        let predicted: usize = confusion.iter().map(|row| row[i]).sum();
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        per_class.insert(
            name.clone(),
            ClassMetrics {
                precision: ratio(confusion[i][i], predicted),
                recall: ratio(confusion[i][i], actual),
                samples: actual,
            },
        );
    }
    Metrics {
        accuracy: right as f64 / total.max(1) as f64,
        folds,
        per_class,
        confusion,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two or three clusters in 32 dimensions, `n` per label.
    fn clusters(classes: usize, n: usize) -> (Vec<Vec<f32>>, Vec<usize>) {
        fastrand::seed(7);
        let mut e = Vec::new();
        let mut l = Vec::new();
        for c in 0..classes {
            for _ in 0..n {
                e.push(
                    (0..32)
                        .map(|j| fastrand::f32() + if j % classes == c { 1.0 } else { 0.0 })
                        .collect(),
                );
                l.push(c);
            }
        }
        (e, l)
    }

    #[test]
    fn separable_labels_are_learnt_and_cross_validated() {
        let (e, l) = clusters(3, 12);
        let names: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let ex = Examples {
            embeddings: &e,
            labels: &l,
            classes: 3,
        };
        let m = cross_validate(&ex, &names, &TrainSettings::default()).unwrap();
        assert_eq!(m.folds, 5);
        assert!(m.accuracy > 0.95, "{m:?}");
        assert_eq!(m.confusion.iter().flatten().sum::<usize>(), 36);
        assert_eq!(m.per_class["b"].samples, 12);
        let w = fit(&ex, &TrainSettings::default()).unwrap();
        let head = weights_head(&w, &names).unwrap();
        assert!(accuracy_of(&head, &ex, &names) > 0.95);
        // A head that does not know "c" gets its examples wrong.
        let two = weights_head(
            &fit(
                &Examples {
                    embeddings: &e[..24],
                    labels: &l[..24],
                    classes: 2,
                },
                &TrainSettings::default(),
            )
            .unwrap(),
            &names[..2],
        )
        .unwrap();
        assert!(accuracy_of(&two, &ex, &names) < 0.7);
    }

    #[test]
    fn folds_are_stratified_and_no_more_than_the_rarest_label_allows() {
        let labels = [0, 0, 0, 1, 1, 1, 1, 1, 1];
        let (f, k) = folds(&labels, 2, 5);
        assert_eq!(k, 3);
        assert_eq!(&f[..3], [0, 1, 2]);
        assert_eq!(&f[3..], [0, 1, 2, 0, 1, 2]);
    }
}
