//! The decide stage: scores → decisions. Softmax, top-k, class groups and per-class (and
//! per-camera) thresholds; batches from several inference sessions are put back in order first.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use serde::Deserialize;
use vigil_engine::model::{Manifest, OutputKind};
use vigil_engine::serving::ModelVersion;

use crate::frame::{Detection, FrameResult, HeadInfo, Ranked, ResultBuffers, Scored, Watched};
use crate::pipeline::heads::Head;
use crate::stats::GraphStats;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GroupMode {
    /// The group's score is the highest of its members' scores.
    #[default]
    Max,
    /// The group's score is the sum of its members' scores (probabilities).
    Sum,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Model classes (labels) that make up the group.
    pub classes: Vec<String>,
    #[serde(default)]
    pub mode: GroupMode,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct DecideConfig {
    /// How many of the best classes each frame result lists.
    pub top_k: usize,
    /// Threshold for every class and group not named in `thresholds`.
    pub threshold: f32,
    /// Per class or group thresholds.
    pub thresholds: BTreeMap<String, f32>,
    /// Named sets of model classes, scored together.
    pub groups: BTreeMap<String, GroupConfig>,
}

impl Default for DecideConfig {
    fn default() -> Self {
        Self {
            top_k: 5,
            threshold: 0.5,
            thresholds: BTreeMap::new(),
            groups: BTreeMap::new(),
        }
    }
}

/// What decide needs besides the model: thresholds, groups and watched labels. Sent again on a
/// reload; the decider is rebuilt for each model version.
#[derive(Debug, Clone)]
pub struct DecideSettings {
    pub decide: DecideConfig,
    /// Each camera's threshold overrides.
    pub cameras: Vec<(String, BTreeMap<String, f32>)>,
    /// Each zone's, as (camera, zone, thresholds).
    pub zones: Vec<(String, String, BTreeMap<String, f32>)>,
    pub watch: Vec<String>,
    /// The heads cameras and zones are bound to.
    pub heads: Vec<HeadBinding>,
    /// Heads' labels that mean "nothing to see" (`teach.background`): never events.
    pub background: Vec<String>,
}

/// A camera's or a zone's head: its name, and the version in service when one is trained (until
/// then the region keeps the backbone's labels, and its frames feed the head's inbox).
#[derive(Debug, Clone)]
pub struct HeadBinding {
    /// None: every camera (`vigil classify --head`).
    pub camera: Option<String>,
    /// None: the camera's whole frame, and its zones that name no head of their own.
    pub zone: Option<String>,
    pub name: String,
    pub head: Option<Arc<Head>>,
}

impl HeadBinding {
    /// How well it fits a frame of `camera`'s `zone`: 3 the zone's own, 2 the camera's, 1 for
    /// every camera, 0 not at all.
    fn fit(&self, camera: &str, zone: Option<&str>) -> u8 {
        match (&self.camera, &self.zone) {
            (Some(c), Some(z)) if c == camera && Some(z.as_str()) == zone => 3,
            (Some(c), None) if c == camera => 2,
            (None, None) => 1,
            _ => 0,
        }
    }
}

/// The deciders of one model version: the backbone's, and one per trained head.
pub struct Deciders {
    model: Arc<ModelVersion>,
    main: Decider,
    heads: Vec<BoundHead>,
}

struct BoundHead {
    binding: HeadBinding,
    info: Arc<HeadInfo>,
    trained: Option<(Arc<Head>, Decider)>,
}

impl Deciders {
    /// The head a frame's region is bound to, if any.
    fn head(&self, meta: &crate::frame::FrameMeta) -> Option<&BoundHead> {
        let zone = meta.zone_name();
        self.heads
            .iter()
            .map(|h| (h.binding.fit(&meta.camera, zone), h))
            .filter(|(fit, _)| *fit > 0)
            .max_by_key(|(fit, _)| *fit)
            .map(|(_, h)| h)
    }

    /// Decides a frame: through its head (on its embedding) when its region has a trained one.
    pub fn decide_into(&self, mut scored: Scored, buffers: ResultBuffers) -> FrameResult {
        let Some(bound) = self.head(&scored.meta) else {
            return self.main.decide_into(scored, buffers);
        };
        let mut result = match &bound.trained {
            Some((head, decider)) => {
                head.apply(&scored.embedding, &mut scored.scores);
                decider.decide_into(scored, buffers)
            }
            None => self.main.decide_into(scored, buffers),
        };
        result.head = Some(bound.info.clone());
        result
    }
}

impl DecideSettings {
    /// The deciders of a model version: the backbone's and its heads'. A head trained on another
    /// backbone is left out (its region keeps the backbone's labels), with a warning.
    pub fn deciders(&self, model: &Arc<ModelVersion>) -> Deciders {
        let heads = self
            .heads
            .iter()
            .map(|b| {
                let fits = b.head.as_ref().filter(|h| {
                    let ok = h.backbone.name == model.info.name
                        && h.backbone.version == model.info.version;
                    if !ok {
                        tracing::warn!(head = %b.name, version = h.info.version,
                            trained_on = %format!("{} {}", h.backbone.name, h.backbone.version),
                            serving = %format!("{} {}", model.info.name, model.info.version),
                            "the head was trained on another backbone: not applied (train it again)");
                    }
                    ok
                });
                BoundHead {
                    info: Arc::new(HeadInfo {
                        name: b.name.clone(),
                        version: fits.map_or(0, |h| h.info.version),
                    }),
                    trained: fits.map(|h| (h.clone(), self.head_decider(h, model))),
                    binding: b.clone(),
                }
            })
            .collect();
        Deciders {
            model: model.clone(),
            main: self.decider(&model.manifest),
            heads,
        }
    }

    /// A head's decider: its labels (probabilities), the thresholds and groups that name them;
    /// its labels and those groups are watched, but for `background` labels.
    fn head_decider(&self, head: &Head, model: &ModelVersion) -> Decider {
        let manifest = Manifest {
            labels: head.labels.clone(),
            output: OutputKind::Probabilities,
            ..model.manifest.clone()
        };
        // The groups that name some of the head's labels.
        let decide = DecideConfig {
            groups: self
                .decide
                .groups
                .iter()
                .filter(|(_, g)| g.classes.iter().any(|c| head.labels.contains(c)))
                .map(|(n, g)| (n.clone(), g.clone()))
                .collect(),
            ..self.decide.clone()
        };
        let watch: Vec<String> = head
            .labels
            .iter()
            .filter(|l| !self.background.contains(l))
            .chain(decide.groups.keys())
            .cloned()
            .collect();
        Decider::with_watch(
            &decide,
            &manifest,
            self.cameras.iter().map(|(n, t)| (n.as_str(), t)),
            &watch,
        )
        .with_zones(
            &self.cameras,
            self.zones
                .iter()
                .map(|(c, z, t)| (c.as_str(), z.as_str(), t)),
        )
    }

    pub fn decider(&self, manifest: &Manifest) -> Decider {
        Decider::with_watch(
            &self.decide,
            manifest,
            self.cameras.iter().map(|(n, t)| (n.as_str(), t)),
            &self.watch,
        )
        .with_zones(
            &self.cameras,
            self.zones
                .iter()
                .map(|(c, z, t)| (c.as_str(), z.as_str(), t)),
        )
    }
}

/// The decide stage's ends.
pub struct DecideStage {
    pub settings: DecideSettings,
    /// Numbered batches of scores, in any order.
    pub input: Receiver<(u64, Vec<Scored>)>,
    /// New settings (a reload).
    pub updates: Receiver<DecideSettings>,
    pub output: Sender<FrameResult>,
    /// Result buffers given back by the sink.
    pub buffers_pool: Receiver<ResultBuffers>,
    /// Emptied result lists go back to the inference stage.
    pub scored_back: Sender<Vec<Scored>>,
}

/// The decider of the model version last seen (labels can change with a version).
type CurrentDecider = Option<Deciders>;

impl DecideStage {
    pub fn run(mut self, stats: &GraphStats) {
        let mut current: CurrentDecider = None;
        let mut next = 0u64;
        let mut waiting = BTreeMap::new();
        while let Ok((seq, batch)) = self.input.recv() {
            stats
                .decide
                .queue_depth
                .store(self.input.len() as u64, Ordering::Relaxed);
            waiting.insert(seq, batch);
            while let Some(mut batch) = waiting.remove(&next) {
                next += 1;
                for scored in batch.drain(..) {
                    if !self.decide_one(scored, &mut current, stats) {
                        return;
                    }
                }
                let _ = self.scored_back.try_send(batch);
            }
        }
    }

    /// Decides one frame and sends the result on (to the sink, or to the predict request that
    /// asked); false once the sink is gone.
    fn decide_one(
        &mut self,
        scored: Scored,
        current: &mut CurrentDecider,
        stats: &GraphStats,
    ) -> bool {
        if let Some(new) = self.updates.try_iter().last() {
            self.settings = new;
            *current = None;
        }
        if !current
            .as_ref()
            .is_some_and(|d| Arc::ptr_eq(&d.model, &scored.model))
        {
            *current = Some(self.settings.deciders(&scored.model));
        }
        let decider = current.as_ref().expect("set above");
        let stage = if scored.meta.reply.is_some() {
            &stats.requests
        } else {
            &stats.decide
        };
        stage.received(1);
        let started = Instant::now();
        let buffers = self.buffers_pool.try_recv().unwrap_or_default();
        let mut result = decider.decide_into(scored, buffers);
        stage.busy_since(started);
        if let Some(reply) = result.meta.reply.take() {
            let _ = reply.send(result);
            stage.sent(1);
            return true;
        }
        if self.output.send(result).is_err() {
            return false;
        }
        stage.sent(1);
        true
    }
}

/// What a watched label is: a model class (its index) or a group (its index).
#[derive(Debug, Clone, Copy)]
enum Target {
    Class(usize),
    Group(usize),
}

struct Group {
    name: Arc<str>,
    members: Vec<usize>,
    mode: GroupMode,
}

impl Group {
    /// The group's score among the class probabilities `p`.
    fn score(&self, p: &[f32]) -> f32 {
        let members = self.members.iter().map(|&i| p[i]);
        match self.mode {
            GroupMode::Max => members.fold(0.0, f32::max),
            GroupMode::Sum => members.sum::<f32>().min(1.0),
        }
    }
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
    /// Per (camera, zone): the zone's thresholds over its camera's.
    per_zone: HashMap<(Arc<str>, Arc<str>), Thresholds>,
    /// The config's thresholds, to resolve zones' later.
    thresholds: BTreeMap<String, f32>,
    default_threshold: f32,
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
            per_zone: HashMap::new(),
            thresholds: cfg.thresholds.clone(),
            default_threshold: cfg.threshold,
        }
    }

    /// Adds zones' thresholds: `(camera, zone, thresholds)`, each over its camera's (`cameras`,
    /// as given to [`Decider::new`]) and the config's.
    pub fn with_zones<'a>(
        mut self,
        cameras: &'a [(String, BTreeMap<String, f32>)],
        zones: impl IntoIterator<Item = (&'a str, &'a str, &'a BTreeMap<String, f32>)>,
    ) -> Decider {
        for (camera, zone, t) in zones {
            let camera_t = cameras.iter().find(|(n, _)| n == camera).map(|(_, t)| t);
            let layers: Vec<&BTreeMap<String, f32>> = [Some(t), camera_t, Some(&self.thresholds)]
                .into_iter()
                .flatten()
                .collect();
            let pick = |label: &str| {
                layers
                    .iter()
                    .find_map(|m| m.get(label).copied())
                    .unwrap_or(self.default_threshold)
            };
            let resolved = Thresholds {
                classes: self.labels.iter().map(|l| pick(l)).collect(),
                groups: self.groups.iter().map(|g| pick(&g.name)).collect(),
            };
            self.per_zone
                .insert((Arc::from(camera), Arc::from(zone)), resolved);
        }
        self
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
        let zone = scored.meta.zone.as_ref().and_then(|z| {
            self.per_zone
                .get(&(scored.meta.camera.clone(), z.name.clone()))
        });
        let thresholds = zone
            .or_else(|| self.per_camera.get(&scored.meta.camera))
            .unwrap_or(&self.default);
        self.fill_top(&p, &mut top);
        watched.extend(self.watch.iter().map(|(label, target)| {
            let (kind, score, threshold) = match *target {
                Target::Class(i) => ("class", p[i], thresholds.classes[i]),
                Target::Group(g) => ("group", self.groups[g].score(&p), thresholds.groups[g]),
            };
            Watched {
                label: label.clone(),
                kind,
                score,
                threshold,
            }
        }));
        self.fill_detections(&p, thresholds, &mut detections);
        FrameResult {
            meta: scored.meta,
            top,
            detections,
            probabilities: p,
            embedding: scored.embedding,
            watched,
            pixels: scored.pixels,
            model: scored.model.info.clone(),
            head: None,
        }
    }

    /// The best `top_k` classes, best first, by insertion into the (short) sorted list.
    fn fill_top(&self, p: &[f32], top: &mut Vec<Ranked>) {
        if self.top_k == 0 {
            return;
        }
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

    /// Every class and group at or over its threshold, best first.
    fn fill_detections(&self, p: &[f32], thresholds: &Thresholds, detections: &mut Vec<Detection>) {
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
            let score = g.score(p);
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
    use crate::frame::FrameMeta;
    use vigil_engine::model::{ColorOrder, InputSpec, Layout};

    fn manifest(labels: &[&str], output: OutputKind) -> Manifest {
        Manifest {
            path: "m.toml".into(),
            name: "m".into(),
            version: "1".into(),
            description: String::new(),
            output,
            output_name: "out".into(),
            embedding_name: None,
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
            embedding: Vec::new(),
            pixels: None,
            model: ModelVersion::of(&manifest(&["a"], OutputKind::Logits)),
        }
    }

    /// A 2-value embedding head "door" whose label "package" wins when the first value is high.
    fn door_head(backbone_version: &str) -> Arc<Head> {
        let manifest = crate::pipeline::heads::HeadManifest {
            name: "door".into(),
            version: 3,
            labels: vec!["nothing".into(), "package".into()],
            backbone: crate::pipeline::heads::Backbone {
                name: "m".into(),
                version: backbone_version.into(),
                dim: 2,
            },
            created: String::new(),
            samples: Vec::new(),
            samples_hash: String::new(),
            metrics: Default::default(),
        };
        let weights = vec![-4.0, 0.0, 4.0, 0.0];
        Arc::new(Head::new(&manifest, vec![0.0; 2], vec![1.0; 2], weights, vec![0.0; 2]).unwrap())
    }

    fn settings(head: Arc<Head>) -> DecideSettings {
        DecideSettings {
            decide: DecideConfig::default(),
            cameras: Vec::new(),
            zones: Vec::new(),
            watch: Vec::new(),
            heads: vec![
                HeadBinding {
                    camera: Some("porch".into()),
                    zone: Some("steps".into()),
                    name: "door".into(),
                    head: Some(head),
                },
                HeadBinding {
                    camera: Some("porch".into()),
                    zone: None,
                    name: "yard".into(),
                    head: None,
                },
            ],
            background: vec!["nothing".into()],
        }
    }

    fn frame(camera: &str, zone: Option<&str>, embedding: Vec<f32>) -> Scored {
        let mut s = scored(camera, vec![0.0]);
        s.meta.zone = zone.map(|z| {
            Arc::new(crate::frame::Zone {
                name: z.into(),
                rect: [0.0, 0.0, 1.0, 1.0],
                polygon: None,
            })
        });
        s.embedding = embedding;
        s
    }

    #[test]
    fn a_zones_head_labels_its_frames_and_other_regions_keep_the_models_labels() {
        let model = ModelVersion::of(&manifest(&["a"], OutputKind::Logits));
        let d = settings(door_head("1")).deciders(&model);
        let mut f = frame("porch", Some("steps"), vec![1.0, 0.0]);
        f.model = model.clone();
        let r = d.decide_into(f, ResultBuffers::default());
        assert_eq!(&*r.top[0].label, "package");
        assert!(r.top[0].score > 0.99);
        assert_eq!(r.head.as_deref().map(|h| h.version), Some(3));
        // Its labels are watched, but the background one.
        let watched: Vec<&str> = r.watched.iter().map(|w| &*w.label).collect();
        assert_eq!(watched, ["package"]);
        // The camera's other regions: its own (untrained) head, the model's labels, version 0.
        let mut f = frame("porch", Some("gate"), vec![1.0, 0.0]);
        f.model = model.clone();
        let r = d.decide_into(f, ResultBuffers::default());
        assert_eq!(&*r.top[0].label, "a");
        let head = r.head.expect("bound to yard");
        assert_eq!((head.name.as_str(), head.version), ("yard", 0));
        // Another camera: no head at all.
        let mut f = frame("street", None, vec![1.0, 0.0]);
        f.model = model;
        assert!(d.decide_into(f, ResultBuffers::default()).head.is_none());
    }

    #[test]
    fn a_head_trained_on_another_backbone_version_is_not_applied() {
        let model = ModelVersion::of(&manifest(&["a"], OutputKind::Logits));
        let d = settings(door_head("0.9")).deciders(&model);
        let mut f = frame("porch", Some("steps"), vec![1.0, 0.0]);
        f.model = model;
        let r = d.decide_into(f, ResultBuffers::default());
        assert_eq!(&*r.top[0].label, "a");
        assert_eq!(r.head.as_deref().map(|h| h.version), Some(0));
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
        let dirty = first.into_buffers().buffers;
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
