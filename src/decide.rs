//! Scores → decisions: softmax, top-k, class groups and per-class (and per-camera) thresholds.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;

use crate::config::{DecideConfig, GroupMode};
use crate::frame::{FrameMeta, Pixels, Scored};
use crate::model::{Manifest, OutputKind};
use crate::publish::payload::ModelInfo;

/// A class or group whose score passed its threshold in one frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    pub label: Arc<str>,
    /// "class" (a model class) or "group" (a configured set of classes).
    pub kind: &'static str,
    pub score: f32,
    pub threshold: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ranked {
    pub label: Arc<str>,
    pub score: f32,
}

/// A watched label's score in one frame, over its threshold or not (for the event lifecycle).
#[derive(Debug, Clone, PartialEq)]
pub struct Watched {
    pub label: Arc<str>,
    pub kind: &'static str,
    pub score: f32,
    pub threshold: f32,
}

/// One frame's outcome.
#[derive(Debug, Clone)]
pub struct FrameResult {
    pub meta: FrameMeta,
    /// The best `top_k` classes, best first.
    pub top: Vec<Ranked>,
    pub detections: Vec<Detection>,
    /// Probabilities of every class, model order (kept for comparisons and tests).
    pub probabilities: Vec<f32>,
    /// The watched labels' scores.
    pub watched: Vec<Watched>,
    /// The frame's pixels, when the graph keeps them (for snapshots).
    pub pixels: Option<Pixels>,
    /// The model version that classified the frame.
    pub model: Arc<ModelInfo>,
}

/// A result's vectors, given back once the result is out so that the next frame's reuse them
/// (no allocation per frame in steady state).
#[derive(Debug, Default)]
pub struct ResultBuffers {
    pub top: Vec<Ranked>,
    pub detections: Vec<Detection>,
    pub watched: Vec<Watched>,
}

impl FrameResult {
    /// The result's probabilities and vectors, emptied, for reuse.
    pub fn into_buffers(self) -> (Vec<f32>, ResultBuffers) {
        let mut b = ResultBuffers {
            top: self.top,
            detections: self.detections,
            watched: self.watched,
        };
        b.top.clear();
        b.detections.clear();
        b.watched.clear();
        let mut p = self.probabilities;
        p.clear();
        (p, b)
    }
}

/// What a watched label is: a model class (its index) or a group (its index).
#[derive(Debug, Clone, Copy)]
enum Target {
    Class(usize),
    Group(usize),
}

/// The labels the event lifecycle follows: `events.watch` when given, else every group and every
/// class named in a thresholds table (the config's own or a camera's).
pub fn watched_labels(config: &crate::config::Config) -> Vec<String> {
    if !config.events.watch.is_empty() {
        return config.events.watch.clone();
    }
    let mut labels: Vec<String> = config.decide.groups.keys().cloned().collect();
    let named = config
        .decide
        .thresholds
        .keys()
        .chain(config.cameras.values().flat_map(|c| c.thresholds.keys()));
    for l in named {
        if !labels.contains(l) {
            labels.push(l.clone());
        }
    }
    labels
}

struct Group {
    name: Arc<str>,
    members: Vec<usize>,
    mode: GroupMode,
}

/// Thresholds resolved to one value per class and per group.
#[derive(Clone)]
struct Thresholds {
    classes: Vec<f32>,
    groups: Vec<f32>,
}

pub struct Decider {
    /// Shared, so that results name their labels without copying them.
    labels: Vec<Arc<str>>,
    watch: Vec<(Arc<str>, Target)>,
    softmax: bool,
    top_k: usize,
    groups: Vec<Group>,
    default: Thresholds,
    per_camera: HashMap<Arc<str>, Thresholds>,
}

impl Decider {
    /// `cameras`: each camera's threshold overrides. Labels must have been validated (an unknown
    /// label is ignored here).
    pub fn new<'a>(
        cfg: &DecideConfig,
        manifest: &Manifest,
        cameras: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, f32>)>,
    ) -> Decider {
        Self::with_watch(cfg, manifest, cameras, &[])
    }

    /// Like [`Decider::new`], also scoring `watch` (classes or groups) in every frame.
    pub fn with_watch<'a>(
        cfg: &DecideConfig,
        manifest: &Manifest,
        cameras: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, f32>)>,
        watch: &[String],
    ) -> Decider {
        let groups: Vec<Group> = cfg
            .groups
            .iter()
            .map(|(name, g)| Group {
                name: name.as_str().into(),
                members: g
                    .classes
                    .iter()
                    .filter_map(|c| manifest.label_index(c))
                    .collect(),
                mode: g.mode,
            })
            .collect();
        let resolve = |overrides: &[&BTreeMap<String, f32>]| {
            let pick = |label: &str| {
                overrides
                    .iter()
                    .find_map(|m| m.get(label).copied())
                    .unwrap_or(cfg.threshold)
            };
            Thresholds {
                classes: manifest.labels.iter().map(|l| pick(l)).collect(),
                groups: groups.iter().map(|g| pick(&g.name)).collect(),
            }
        };
        let default = resolve(&[&cfg.thresholds]);
        let per_camera = cameras
            .into_iter()
            .map(|(name, t)| (Arc::from(name), resolve(&[t, &cfg.thresholds])))
            .collect();
        let watch = watch
            .iter()
            .filter_map(|l| {
                let target = match manifest.label_index(l) {
                    Some(i) => Target::Class(i),
                    None => Target::Group(groups.iter().position(|g| *g.name == **l)?),
                };
                Some((Arc::from(l.as_str()), target))
            })
            .collect();
        Decider {
            labels: manifest
                .labels
                .iter()
                .map(|l| Arc::from(l.as_str()))
                .collect(),
            watch,
            softmax: manifest.output == OutputKind::Logits,
            top_k: cfg.top_k.min(manifest.labels.len()),
            groups,
            default,
            per_camera,
        }
    }

    pub fn decide(&self, scored: Scored) -> FrameResult {
        self.decide_into(scored, ResultBuffers::default())
    }

    /// Like [`Decider::decide`], filling `buffers` (cleared first) instead of new vectors.
    pub fn decide_into(&self, scored: Scored, buffers: ResultBuffers) -> FrameResult {
        let ResultBuffers {
            mut top,
            mut detections,
            mut watched,
        } = buffers;
        top.clear();
        detections.clear();
        watched.clear();
        let mut p = scored.scores;
        if self.softmax {
            softmax(&mut p);
        }
        let thresholds = self
            .per_camera
            .get(&scored.meta.camera)
            .unwrap_or(&self.default);
        // Top-k by insertion into the (short) sorted list.
        if self.top_k > 0 {
            for (i, &score) in p.iter().enumerate() {
                if top.len() == self.top_k && score <= top[self.top_k - 1].score {
                    continue;
                }
                let at = top.partition_point(|r| r.score >= score);
                if top.len() == self.top_k {
                    top.pop();
                }
                top.insert(
                    at,
                    Ranked {
                        label: self.labels[i].clone(),
                        score,
                    },
                );
            }
        }
        let group_score = |g: &Group| {
            let members = g.members.iter().map(|&i| p[i]);
            match g.mode {
                GroupMode::Max => members.fold(0.0, f32::max),
                GroupMode::Sum => members.sum::<f32>().min(1.0),
            }
        };
        watched.extend(self.watch.iter().map(|(label, target)| {
            let (kind, score, threshold) = match *target {
                Target::Class(i) => ("class", p[i], thresholds.classes[i]),
                Target::Group(g) => ("group", group_score(&self.groups[g]), thresholds.groups[g]),
            };
            Watched {
                label: label.clone(),
                kind,
                score,
                threshold,
            }
        }));
        detections.extend(
            p.iter()
                .zip(&thresholds.classes)
                .enumerate()
                .filter(|(_, (s, t))| **s >= **t)
                .map(|(i, (s, t))| Detection {
                    label: self.labels[i].clone(),
                    kind: "class",
                    score: *s,
                    threshold: *t,
                }),
        );
        for (g, t) in self.groups.iter().zip(&thresholds.groups) {
            let score = group_score(g);
            if score >= *t {
                detections.push(Detection {
                    label: g.name.clone(),
                    kind: "group",
                    score,
                    threshold: *t,
                });
            }
        }
        // Unstable: sorts in place without a buffer.
        detections.sort_unstable_by(|a, b| b.score.total_cmp(&a.score));
        FrameResult {
            meta: scored.meta,
            top,
            detections,
            probabilities: p,
            watched,
            pixels: scored.pixels,
            model: scored.model.info.clone(),
        }
    }
}

/// In place, numerically stable.
pub fn softmax(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in v.iter_mut() {
        *x /= sum;
    }
}

/// Indices of the `k` largest values, largest first; allocates only the `k` indices.
pub fn top_k(v: &[f32], k: usize) -> impl Iterator<Item = usize> {
    let k = k.min(v.len());
    let mut best: Vec<usize> = Vec::with_capacity(k + 1);
    if k > 0 {
        for i in 0..v.len() {
            if best.len() == k && v[i] <= v[best[k - 1]] {
                continue;
            }
            let at = best.partition_point(|&b| v[b] >= v[i]);
            best.insert(at, i);
            best.truncate(k);
        }
    }
    best.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GroupConfig;
    use crate::model::{ColorOrder, InputSpec, Layout};

    fn manifest(labels: &[&str], output: OutputKind) -> Manifest {
        Manifest {
            path: "m.toml".into(),
            name: "m".into(),
            version: "1".into(),
            description: String::new(),
            output,
            output_name: "out".into(),
            input: InputSpec {
                name: "in".into(),
                layout: Layout::Nchw,
                color: ColorOrder::Rgb,
                width: 1,
                height: 1,
                crop: 1.0,
                mean: [0.0; 3],
                std: [1.0; 3],
            },
            labels: labels.iter().map(|s| s.to_string()).collect(),
            variants: Default::default(),
        }
    }

    fn scored(camera: &str, scores: Vec<f32>) -> Scored {
        Scored {
            meta: FrameMeta::new(camera.into(), 0, None),
            scores,
            pixels: None,
            model: crate::serving::ModelVersion::of(&manifest(&["a"], OutputKind::Logits)),
        }
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut v = vec![1.0, 3.0, 2.0, 5.0];
        softmax(&mut v);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(top_k(&v, 2).collect::<Vec<_>>(), vec![3, 1]);
        assert_eq!(
            top_k(&[0.5, 0.1, 0.9, 0.5], 3).collect::<Vec<_>>(),
            vec![2, 0, 3]
        );
        assert_eq!(top_k(&[1.0], 5).count(), 1);
    }

    #[test]
    fn groups_score_by_sum_or_max_and_thresholds_resolve_camera_first() {
        let m = manifest(
            &["tabby", "tiger cat", "dog", "car"],
            OutputKind::Probabilities,
        );
        let mut cfg = DecideConfig {
            threshold: 0.5,
            ..Default::default()
        };
        cfg.groups.insert(
            "cat".into(),
            GroupConfig {
                classes: vec!["tabby".into(), "tiger cat".into()],
                mode: GroupMode::Sum,
            },
        );
        cfg.groups.insert(
            "any-cat".into(),
            GroupConfig {
                classes: vec!["tabby".into(), "tiger cat".into()],
                mode: GroupMode::Max,
            },
        );
        cfg.thresholds.insert("car".into(), 0.05);
        let porch = BTreeMap::from([("car".to_string(), 0.9), ("dog".to_string(), 0.1)]);
        let d = Decider::new(&cfg, &m, [("porch", &porch)]);

        let r = d.decide(scored("yard", vec![0.3, 0.3, 0.2, 0.2]));
        let labels: Vec<_> = r.detections.iter().map(|d| &*d.label).collect();
        // cat = 0.6 (sum) passes 0.5; any-cat = 0.3 (max) does not; car 0.2 passes its 0.05.
        assert_eq!(labels, vec!["cat", "car"]);
        assert_eq!(r.detections[0].kind, "group");
        assert!((r.detections[0].score - 0.6).abs() < 1e-6);

        let r = d.decide(scored("porch", vec![0.3, 0.3, 0.2, 0.2]));
        let labels: Vec<_> = r.detections.iter().map(|d| &*d.label).collect();
        // On the porch: car needs 0.9, dog only 0.1.
        assert_eq!(labels, vec!["cat", "dog"]);
    }

    #[test]
    fn logits_become_probabilities_and_top_k_is_ordered() {
        let m = manifest(&["a", "b", "c"], OutputKind::Logits);
        let cfg = DecideConfig {
            top_k: 2,
            threshold: 0.99,
            ..Default::default()
        };
        let d = Decider::new(&cfg, &m, []);
        let r = d.decide(scored("x", vec![0.0, 2.0, 1.0]));
        assert_eq!(r.top.len(), 2);
        assert_eq!((&*r.top[0].label, &*r.top[1].label), ("b", "c"));
        assert!((r.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(r.detections.is_empty());
    }

    #[test]
    fn reused_buffers_give_the_same_result_as_new_ones() {
        let m = manifest(&["a", "b", "c", "d"], OutputKind::Logits);
        let cfg = DecideConfig {
            top_k: 3,
            threshold: 0.2,
            ..Default::default()
        };
        let d = Decider::with_watch(&cfg, &m, [], &["c".to_string()]);
        // Buffers left over from a frame with other labels and more detections.
        let first = d.decide(scored("x", vec![5.0, 0.0, 0.0, 4.0]));
        let (_, dirty) = first.into_buffers();
        let fresh = d.decide(scored("x", vec![0.0, 3.0, 1.0, 2.9]));
        let reused = d.decide_into(scored("x", vec![0.0, 3.0, 1.0, 2.9]), dirty);
        assert_eq!(reused.top, fresh.top);
        assert_eq!(reused.detections, fresh.detections);
        assert_eq!(reused.watched, fresh.watched);
        assert_eq!(reused.probabilities, fresh.probabilities);
        let labels: Vec<&str> = reused.top.iter().map(|r| &*r.label).collect();
        assert_eq!(labels, ["b", "d", "c"]);
    }
}
